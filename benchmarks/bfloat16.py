'''MambaLRP in bfloat16 on trained weights: the shipped SST-2 Mamba and Vision Mamba explained in float32 and in
bfloat16 side by side.

Real models run in bfloat16. On random real-size layouts a bfloat16 explanation does not sum to the bfloat16 logit, but
random deep models are numerically chaotic; this measures it on trained weights. For each validation sentence, both
precisions explain the float32 model's predicted class (``MambaLRP(...).attribute(...,
return_constant_relevance=True)``), and the table reports:

* the logits' agreement: ``|logit_bf16 - logit_fp32| / |logit_fp32|``;
* conservation in each precision: ``|sum(R) + sum(constants) - logit| / |logit|``, at the precision's own logit;
* the relevances' agreement: the Pearson correlation of the per-token relevance of the two precisions, the share of
  sentences whose most relevant token is the same, and ``sum |R_bf16 - R_fp32| / sum |R_fp32|`` over tokens;
* faithfulness: dA_F of each precision's token ranking, both measured on the float32 model (so that only the
  ranking differs), and their paired difference with a bootstrap interval.

Run: ``OMP_NUM_THREADS=1 python benchmarks/bfloat16.py --task sst2`` (or ``vim-mnist``; CPU, ``--device cuda`` on a
GPU; ``--examples``), writes ``bfloat16_<task>_<device>.md`` to ``--out``.
'''
import argparse
import copy
import os
import statistics
import sys
from typing import Dict, List

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]

from captum_mamba import MambaLRP  # noqa: E402
from captum_mamba.metrics import faithfulness  # noqa: E402
from faithfulness import bootstrap_interval, replacement  # noqa: E402
from tasks import TASKS, example_batches, model_inputs, trained_model  # noqa: E402


#: the trained models measured: SST-2's Mamba and the 24-block Vision Mamba on MNIST
SHIPPED = {'sst2': 'SST-2 Mamba (`benchmarks/weights/sst2-small.pt`)',
           'vim-mnist': 'Vision Mamba of 24 blocks on MNIST (`benchmarks/weights/vim-mnist.pt`)'}


def explain(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
    '''Token relevance, the constants' total and the explained logit of ``model`` in its own precision.'''
    relevance, constants = MambaLRP(model).attribute(inputs, target=targets, return_constant_relevance=True)
    with torch.no_grad():
        logits = model(inputs)
    explained = logits[torch.arange(len(targets)), targets]
    total = sum(constants.values()) if constants else torch.zeros_like(explained)
    return {'tokens': relevance.float().sum(-1), 'constants': total.float(), 'explained': explained.float()}


def measure(task_name: str, device: str, examples: int, batch: int) -> List[dict]:
    task = TASKS[task_name](quick=False)
    model = trained_model(task, quick=False, cache_dir=os.path.join(ROOT, 'benchmarks', 'output')).to(device)
    half = copy.deepcopy(model).to(torch.bfloat16)
    records = []
    for indices, token_ids in example_batches(task, examples, batch):
        inputs = model_inputs(model, task, token_ids.to(device))
        with torch.no_grad():
            targets = model(inputs).argmax(-1)
        full = explain(model, inputs, targets)
        low = explain(half, inputs.to(torch.bfloat16), targets)
        removed = replacement(model, task, inputs)
        step = max(1, inputs.shape[1] // 32)
        scores = {name: result['tokens'] for name, result in (('float32', full), ('bfloat16', low))}
        curves = {name: faithfulness(model, inputs, score, target=targets, replacement=removed, step=step)
                  for name, score in scores.items()}
        for row, example in enumerate(indices):
            tokens_full, tokens_low = full['tokens'][row].flatten(), low['tokens'][row].flatten()
            both = torch.stack((tokens_full, tokens_low))
            correlation = torch.corrcoef(both)[0, 1].item() if len(tokens_full) > 1 else 1.0
            records.append({
                'example': example, 'length': inputs.shape[1],
                'logit_error': ((low['explained'][row] - full['explained'][row]).abs()
                                / full['explained'][row].abs()).item(),
                'conservation_float32': ((tokens_full.sum() + full['constants'][row] - full['explained'][row]).abs()
                                         / full['explained'][row].abs()).item(),
                'conservation_bfloat16': ((tokens_low.sum() + low['constants'][row] - low['explained'][row]).abs()
                                          / low['explained'][row].abs()).item(),
                'correlation': correlation,
                'same_top_token': float(tokens_full.argmax() == tokens_low.argmax()),
                'relevance_error': ((tokens_low - tokens_full).abs().sum() / tokens_full.abs().sum()).item(),
                'delta_af_float32': curves['float32'].delta_af[row].item(),
                'delta_af_bfloat16': curves['bfloat16'].delta_af[row].item(),
            })
        print(f'{len(records)} / {examples}', flush=True)
    return records


def report(records: List[dict], task_name: str, description: str) -> str:
    def summary(key: str, digits: int = 3, scientific: bool = False) -> str:
        values = [record[key] for record in records]
        form = (lambda value: f'{value:.1e}') if scientific else (lambda value: f'{value:.{digits}f}')
        return f'{form(statistics.median(values))} (max {form(max(values))})' if scientific else \
            f'{form(statistics.mean(values))}'

    differences = [record['delta_af_bfloat16'] - record['delta_af_float32'] for record in records]
    low, high = bootstrap_interval(differences)
    lines = [
        f'# MambaLRP in bfloat16 on trained weights ({description})', '',
        f'The shipped {SHIPPED[task_name]}, {len(records)} test examples, each explained at the float32 model\'s '
        'predicted class in float32 and in bfloat16 (weights and inputs cast); "token": a word, or an image patch. '
        'Relative errors: median (max).', '',
        '| measure | value |', '|---|---|',
        f'| bfloat16 logit vs float32 logit, relative | {summary("logit_error", scientific=True)} |',
        f'| conservation, float32: inputs + constants vs logit | {summary("conservation_float32", scientific=True)} |',
        f'| conservation, bfloat16: inputs + constants vs its logit | '
        f'{summary("conservation_bfloat16", scientific=True)} |',
        f'| token relevance, Pearson correlation bfloat16 vs float32 (mean) | {summary("correlation")} |',
        f'| same most relevant token (share of examples) | {summary("same_top_token", 2)} |',
        f'| token relevance, sum abs difference / sum abs float32 | {summary("relevance_error", scientific=True)} |',
        f'| dA_F, float32 ranking (mean) | {summary("delta_af_float32")} |',
        f'| dA_F, bfloat16 ranking (mean), on the float32 model | {summary("delta_af_bfloat16")} |',
        f'| dA_F bfloat16 - float32, paired (95 % interval) | {statistics.mean(differences):+.4f} '
        f'({low:+.4f} to {high:+.4f}) |',
    ]
    return '\n'.join(lines) + '\n'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--task', default='sst2', choices=sorted(SHIPPED), help='the trained model (default: sst2)')
    parser.add_argument('--device', default='cpu', help='where the model runs (default: cpu)')
    parser.add_argument('--examples', type=int, default=200, help='validation sentences explained (default 200)')
    parser.add_argument('--batch', type=int, default=16, help='sentences per call (default 16)')
    parser.add_argument('--out', default=os.path.join(ROOT, 'benchmarks', 'output'),
                        help='directory the table is written to (default: benchmarks/output)')
    args = parser.parse_args()
    records = measure(args.task, args.device, args.examples, args.batch)
    device = (torch.cuda.get_device_name() if args.device.startswith('cuda')
              else f'CPU, {torch.get_num_threads()} threads')
    text = report(records, args.task, device)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f'bfloat16_{args.task}_{args.device.split(":")[0]}.md'), 'w') as handle:
        handle.write(text)


if __name__ == '__main__':
    main()
