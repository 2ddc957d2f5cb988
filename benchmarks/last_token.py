'''The last-token question: does a method's relevance on the current (last) token match what that token does to the
output?

Heatmaps of language models often put the most relevance on the last token, even a neutral one. Here each position's
share of a method's |relevance| is set beside its share of the *deletion effects*: ``e_i = f(x) - f(x without token
i)`` (the token replaced by the task's deletion value, the unknown-token embedding on SST-2, as in the faithfulness
benchmark), the effect of that token alone. Per method, over the examples (means, with 95 % bootstrap intervals):

* ``last share``: the last token's share of |relevance|; ``effect share``: its share of |e| (the same for every
  method); ``over-credit``: their paired difference (positive: the method gives the last token more than its effect);
* ``last top``: how often the last token has the largest |relevance| (``effect`` row: the largest |e|);
* ``rank corr.``: Spearman correlation between relevance and effect over the positions; ``w/o last``: the same over
  the other positions only.

Run: ``OMP_NUM_THREADS=1 python benchmarks/last_token.py --tasks sst2 needle --examples 872`` (CPU); writes
``last_token.md`` to ``--out``.
'''
import argparse
import os
import statistics
import sys
from typing import Dict, List

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]

from faithfulness import bootstrap_interval, replacement  # noqa: E402
from methods import methods  # noqa: E402
from tasks import TASKS, example_batches, model_inputs, trained_model  # noqa: E402

#: the methods compared (of benchmarks/methods.py)
COMPARED = ('MambaLRP', 'MambaLRP (gate: value)', 'MambaLRP w/o SSM rule', 'MambaLRP w/o gate rule', 'LRP (LN-rule)',
            'InputXGradient',
            'IntegratedGradients', 'SmoothGrad', 'Saliency')


def deletion_effects(model, inputs: torch.Tensor, targets: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    '''``f(x) - f(x with position i replaced)`` for every position, ``(batch, length)``.'''
    batch, length = inputs.shape[:2]
    effects = torch.empty(batch, length, dtype=inputs.dtype)
    with torch.no_grad():
        full = model(inputs)[torch.arange(batch), targets]
        for row in range(batch):
            # a bounded number of deleted copies at a time (a 1,024-token needle sequence has 1,024)
            for start in range(0, length, max(1, 2 ** 15 // length)):
                positions = torch.arange(start, min(length, start + max(1, 2 ** 15 // length)))
                copies = inputs[row].unsqueeze(0).repeat(len(positions), *([1] * (inputs.dim() - 1)))
                copies[torch.arange(len(positions)), positions] = removed.to(copies)
                effects[row, positions] = full[row] - model(copies)[:, targets[row]]
    return effects


def spearman(first: torch.Tensor, second: torch.Tensor) -> float:
    if len(first) < 3:
        return float('nan')
    ranks = [values.argsort().argsort().double() for values in (first, second)]
    return torch.corrcoef(torch.stack(ranks))[0, 1].item()


def measure(task_name: str, examples: int, cache: str) -> Dict[str, List[dict]]:
    task = TASKS[task_name](quick=False)
    model = trained_model(task, quick=False, cache_dir=cache)
    chosen = {name: method for name, method in methods(quick=False).items() if name in COMPARED}
    records: Dict[str, List[dict]] = {name: [] for name in chosen}
    count = min(examples, len(task.test_labels))
    for indices, token_inputs in example_batches(task, count, 16):
        inputs = model_inputs(model, task, token_inputs)
        with torch.no_grad():
            targets = model(inputs).argmax(-1)
        effects = deletion_effects(model, inputs, targets, replacement(model, task, inputs)).double()
        for number, (name, method) in enumerate(chosen.items()):
            torch.manual_seed(1000 * indices[0] + number)
            scores = method(model, inputs, targets)
            if scores is None:
                continue
            scores = scores.detach().double()
            for row in range(len(indices)):
                relevance, effect = scores[row], effects[row]
                records[name].append({
                    'last_share': (relevance[-1].abs() / relevance.abs().sum().clamp(min=1e-30)).item(),
                    'effect_share': (effect[-1].abs() / effect.abs().sum().clamp(min=1e-30)).item(),
                    'last_top': float(relevance.abs().argmax() == len(relevance) - 1),
                    'effect_top': float(effect.abs().argmax() == len(effect) - 1),
                    'rank': spearman(relevance, effect), 'rank_rest': spearman(relevance[:-1], effect[:-1]),
                })
        print(f'{task_name}: {len(next(iter(records.values())))} / {count}', flush=True)
    return records


def interval_text(values: List[float], digits: int = 3) -> str:
    values = [value for value in values if value == value]  # without NaN (too short for a rank correlation)
    low, high = bootstrap_interval(values)
    return f'{statistics.mean(values):.{digits}f} ({low:.{digits}f} to {high:.{digits}f})'


def report(results: Dict[str, Dict[str, List[dict]]]) -> str:
    lines = ['# The last token: relevance share against the effect of deleting it', '', __doc__.split('\n\n')[1], '']
    for task_name, records in results.items():
        first = next(iter(records.values()))
        lines += [f'## {task_name} ({len(first)} examples)', '',
                  f'Effect of the last token: share of |e| {interval_text([r["effect_share"] for r in first])}, '
                  f'largest |e| in {statistics.mean(r["effect_top"] for r in first):.0%} of the examples.', '',
                  '| method | last share | over-credit (last share - effect share) | last top | rank corr. | '
                  'rank corr. w/o last |', '|---|---:|---:|---:|---:|---:|']
        for name, rows in records.items():
            lines.append(
                f'| {name} | {interval_text([r["last_share"] for r in rows])} '
                f'| {interval_text([r["last_share"] - r["effect_share"] for r in rows], 3)} '
                f'| {statistics.mean(r["last_top"] for r in rows):.0%} '
                f'| {interval_text([r["rank"] for r in rows], 2)} '
                f'| {interval_text([r["rank_rest"] for r in rows], 2)} |')
        lines.append('')
    return '\n'.join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--tasks', nargs='+', default=['sst2', 'needle'], choices=['sst2', 'needle'])
    parser.add_argument('--examples', type=int, default=200, help='test examples per task (default 200)')
    parser.add_argument('--out', default=os.path.join(ROOT, 'benchmarks', 'output'),
                        help='directory the table is written to (default: benchmarks/output)')
    args = parser.parse_args()
    results = {name: measure(name, args.examples, args.out) for name in args.tasks}
    text = report(results)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, 'last_token.md'), 'w') as handle:
        handle.write(text)


if __name__ == '__main__':
    main()
