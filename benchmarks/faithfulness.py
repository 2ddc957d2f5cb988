'''Faithfulness benchmark: MambaLRP against Captum's methods, attention rollouts and ablations, on five tasks.

Loads (SST-2, needle: shipped weights) or trains and caches a small Mamba classifier per task, explains test
examples with every method, and measures deletion and insertion curves, MoRF and LeRF
(``captum_mamba.metrics.faithfulness``: dA_F and dA_I per example), seconds per explanation and conservation.
Writes ``results.md``, ``results.csv``, ``curves_<task>.png`` and ``conservation_<task>.png`` to ``--out``.

Image tasks with ground truth (``vim-photo-digits``, ``vim-tiny-photo-digits``: digits pasted on natural photographs)
add the localisation of each method's relevance against the digits' masks (relevance mass accuracy, rank accuracy,
the pointing game) and delete to the mean training patch, inserting into the blurred image.

Run: ``python benchmarks/faithfulness.py [--quick] [--tasks sst2 digits needle vim-digits vim-mnist vim-photo-digits]
[--examples N] [--methods NAME ...]``;
data-parallel: ``torchrun --nproc_per_node 2 benchmarks/faithfulness.py ...`` (gloo on CPU, nccl on GPU) gives
the same tables, since examples are explained in the same fixed chunks whatever the number of processes.
'''
import argparse
import csv
import os
import statistics
import sys
import time
from collections import defaultdict
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from captum_mamba.metrics import faithfulness  # noqa: E402
from zennit_mamba import RuleSet  # noqa: E402
from methods import RELEVANCE_METHODS, canonized, methods  # noqa: E402
from tasks import TASKS, Task, accuracy, example_batches, model_inputs, trained_model  # noqa: E402

#: the localisation scores of tasks with ground-truth masks (:py:func:`localisation`)
LOCALISATION = ('mass_accuracy', 'rank_accuracy', 'pointing')
CHUNK = 16  # examples explained together; fixed, so results do not depend on the number of processes


def evaluation_examples(task: Task, quick: bool, requested: Optional[int] = None) -> int:
    return min(len(task.test_labels), requested or (24 if quick else 96))


def replacement(model, task: Task, inputs: torch.Tensor, indices: Optional[List[int]] = None) -> torch.Tensor:
    '''What a deleted position becomes: the task's own deletion value for test examples ``indices`` where it has one,
    else the unknown-token embedding, or zeros (black patches, zero embedding).'''
    if task.test_deletion is not None and indices is not None:
        return task.test_deletion[indices].to(inputs)
    if task.replacement_token is None:
        return torch.zeros_like(inputs[0, 0])
    return model.backbone.get_input_embeddings().weight[task.replacement_token].detach()


def insertion_baseline(model, task: Task, inputs: torch.Tensor, indices: Optional[List[int]] = None) -> torch.Tensor:
    '''What insertion starts from, unlike the deletion value (else dA_I would repeat dA_F): the task's own for test
    examples ``indices`` where it has one, else the mean token embedding over the vocabulary, or the mean training
    image (patch by patch).'''
    if task.test_insertion is not None and indices is not None:
        return task.test_insertion[indices].to(inputs)
    if task.uses_tokens:
        return model.backbone.get_input_embeddings().weight.detach().mean(0)
    return task.train_inputs.mean(0).to(inputs)


def localisation(scores: torch.Tensor, object_share: torch.Tensor) -> Dict[str, float]:
    '''How one example's patch scores ``scores`` meet the ground truth, the patches with object pixels (``object_share``
    > 0, each patch's share of them):

    * ``mass_accuracy``: the share of the positive relevance on object patches (Arras et al., 2022);
    * ``rank_accuracy``: the share of object patches among the ``K`` highest-scoring patches, ``K`` the number of
      object patches (Arras et al., 2022);
    * ``pointing``: whether the highest-scoring patch is an object patch (the pointing game, Zhang et al., 2018).

    Chance for the first two is the object patches' share of the image, ``object_share``.'''
    inside = object_share > 0
    if not inside.any():
        raise ValueError('an example without object patches has no localisation score')
    positive = scores.clamp(min=0)
    top = scores.topk(int(inside.sum())).indices
    return {'mass_accuracy': (positive[inside].sum() / positive.sum().clamp(min=1e-30)).item(),
            'rank_accuracy': inside[top].double().mean().item(),
            'pointing': float(inside[scores.argmax()].item()),
            'object_share': inside.double().mean().item()}


def explain_chunk(model, task: Task, indices: List[int], token_inputs: torch.Tensor, quick: bool,
                  only: Optional[List[str]] = None) -> List[dict]:
    '''Per-example records of every method on one chunk of test examples (of one length).'''
    device = next(model.parameters()).device
    inputs = model_inputs(model, task, token_inputs.to(device))
    with torch.no_grad():
        logits = model(inputs)
    targets = logits.argmax(-1)
    explained = logits[torch.arange(len(targets)), targets]
    step = max(1, inputs.shape[1] // (8 if quick else 32))  # curves of up to 9 (quick) or 33 points
    removed = replacement(model, task, inputs, indices)
    inserted_into = insertion_baseline(model, task, inputs, indices)
    records = []
    for number, (name, method) in enumerate(methods(quick, vision=task.vim is not None).items()):
        if only and name not in only:
            continue
        # noise (SmoothGrad) depends on the chunk and method only, not on what this process did before
        torch.manual_seed(1000 * indices[0] + number)
        start = time.perf_counter()
        scores = method(model, inputs, targets)
        if scores is None:  # the method does not apply to this model
            continue
        if device.type == 'cuda':
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / len(targets)
        # the perturbed copies through the parallel scan with no rule: the same function as transformers' step loop
        # (to rounding), several times faster
        with canonized(model, RuleSet(())):
            result = faithfulness(model, inputs, scores, target=targets, replacement=removed, step=step,
                                  insertion_baseline=inserted_into)
        for row, example in enumerate(indices):
            record = {
                'task': task.name, 'method': name, 'example': example, 'length': inputs.shape[1],
                'delta_af': result.delta_af[row].item(), 'area_morf': result.area_morf[row].item(),
                'area_lerf': result.area_lerf[row].item(), 'delta_ai': result.delta_ai[row].item(),
                'area_insertion_morf': result.area_insertion_morf[row].item(),
                'area_insertion_lerf': result.area_insertion_lerf[row].item(), 'seconds': seconds,
                'explained': explained[row].item(), 'relevance_sum': scores[row].sum().item(),
                'fractions': result.fractions.tolist(),
                'morf': result.morf[row].tolist(), 'lerf': result.lerf[row].tolist(),
                'insertion_morf': result.insertion_morf[row].tolist(),
                'insertion_lerf': result.insertion_lerf[row].tolist(),
            }
            if task.needle_positions is not None:
                magnitude = scores[row].abs()
                position = task.needle_positions[example].item()
                record['needle_share'] = (magnitude[position] / magnitude.sum().clamp(min=1e-30)).item()
            if task.test_masks is not None:
                record.update(localisation(scores[row].detach().double().cpu(), task.test_masks[example].double()))
            records.append(record)
    return records


def bootstrap_interval(values: List[float], resamples: int = 2000, seed: int = 0) -> Tuple[float, float]:
    '''The 95 % percentile bootstrap interval of the mean of ``values`` (fixed seed: the same for the same values).'''
    values = torch.tensor(values, dtype=torch.float64)
    picks = torch.randint(0, len(values), (resamples, len(values)), generator=torch.Generator().manual_seed(seed))
    means = values[picks].mean(1)
    return means.quantile(0.025).item(), means.quantile(0.975).item()


def win_rates(records: List[dict], key: str = 'delta_af') -> Dict[Tuple[str, str], float]:
    '''Per (task, method): the share of the task's examples on which the method's score ``key`` (dA_F, dA_I) is
    the highest of all methods (ties shared).'''
    per_example = defaultdict(dict)
    for record in records:
        per_example[(record['task'], record['example'])][record['method']] = record[key]
    wins, examples = defaultdict(float), defaultdict(int)
    for (task, _), scores in per_example.items():
        best = max(scores.values())
        winners = [method for method, score in scores.items() if score == best]
        for method in scores:
            wins[(task, method)] += (method in winners) / len(winners)
        examples[task] += 1
    return {(task, method): count / examples[task] for (task, method), count in wins.items()}


def paired_differences(records: List[dict], key: str = 'delta_af',
                       reference: str = 'MambaLRP') -> Dict[Tuple[str, str], Tuple[float, float, float]]:
    '''Per (task, method): the mean over the task's examples of the method's score ``key`` minus ``reference``'s on
    the same example, and the 95 % bootstrap interval of that mean (the examples resampled in pairs, so what they
    share, how hard each example is, cancels). Where the interval excludes 0 the two methods differ on these
    examples.'''
    per_example = defaultdict(dict)
    for record in records:
        per_example[(record['task'], record['example'])][record['method']] = record[key]
    differences = defaultdict(list)
    for (task, _), scores in sorted(per_example.items()):
        if reference in scores:
            for method, score in scores.items():
                differences[(task, method)].append(score - scores[reference])
    return {pair: (sum(values) / len(values), *bootstrap_interval(values)) for pair, values in differences.items()}


def summarise(records: List[dict], quick: bool) -> Dict[str, List[dict]]:
    '''One row per (task, method): means over examples, the 95 % bootstrap intervals of dA_F and dA_I, their win
    rates, and the paired differences of dA_F from MambaLRP.'''
    groups = defaultdict(list)
    for record in records:
        groups[(record['task'], record['method'])].append(record)
    scores = ('delta_af', 'delta_ai')
    wins = {key: win_rates(records, key) for key in scores}
    paired = paired_differences(records)
    tables = defaultdict(list)
    for (task, method), rows in groups.items():
        count = len(rows)
        row = {'task': task, 'method': method, 'examples': count}
        for key in scores:
            row[key] = sum(r[key] for r in rows) / count
            row[f'{key}_low'], row[f'{key}_high'] = bootstrap_interval([r[key] for r in rows])
            row[f'{key}_win_rate'] = wins[key][(task, method)]
        if (task, method) in paired:
            row['delta_af_minus_lrp'], row['delta_af_minus_lrp_low'], row['delta_af_minus_lrp_high'] = \
                paired[(task, method)]
        row.update({
            'area_morf': sum(r['area_morf'] for r in rows) / count,
            'area_lerf': sum(r['area_lerf'] for r in rows) / count,
            'area_insertion_morf': sum(r['area_insertion_morf'] for r in rows) / count,
            'area_insertion_lerf': sum(r['area_insertion_lerf'] for r in rows) / count,
            # median over chunks: the first chunk of each method pays one-off warm-up costs
            'seconds_per_explanation': statistics.median(r['seconds'] for r in rows),
            'conservation_error': (
                sum(abs(r['relevance_sum'] - r['explained']) / abs(r['explained']) for r in rows) / count
                if method in RELEVANCE_METHODS else float('nan')
            ),
        })
        if 'needle_share' in rows[0]:
            row['needle_share'] = sum(r['needle_share'] for r in rows) / count
        for key in LOCALISATION if 'pointing' in rows[0] else ():
            row[key] = sum(r[key] for r in rows) / count
            row[f'{key}_low'], row[f'{key}_high'] = bootstrap_interval([r[key] for r in rows])
        if 'pointing' in rows[0]:
            row['object_share'] = sum(r['object_share'] for r in rows) / count
        tables[task].append(row)
    order = list(methods(quick, vision=True))
    return {task: sorted(rows, key=lambda row: order.index(row['method'])) for task, rows in tables.items()}


def markdown(tables: Dict[str, List[dict]], accuracies: Dict[str, float]) -> str:
    lines = []
    for task, rows in tables.items():
        needle = 'needle_share' in rows[0]
        lines += [f'### {task} (test accuracy {accuracies[task]:.1%}, {rows[0]["examples"]} explained examples)', '',
                  '| method | dA_F | 95 % interval | wins | dA_F - MambaLRP (paired 95 % interval) | dA_I '
                  '| 95 % interval | wins | s / explanation | conservation error |'
                  + (' relevance on needle |' if needle else ''),
                  '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|' + ('---:|' if needle else '')]
        for row in rows:
            conservation = '—' if row['conservation_error'] != row['conservation_error'] else \
                f'{row["conservation_error"]:.1e}'
            scores = [f' {row[key]:.3f} | {row[key + "_low"]:.3f} to {row[key + "_high"]:.3f} | '
                      f'{row[key + "_win_rate"]:.0%} |' for key in ('delta_af', 'delta_ai')]
            difference = ' — |' if 'delta_af_minus_lrp' not in row or row['method'] == 'MambaLRP' else (
                f' {row["delta_af_minus_lrp"]:+.3f} ({row["delta_af_minus_lrp_low"]:+.3f} to '
                f'{row["delta_af_minus_lrp_high"]:+.3f}) |')
            scores = scores[0] + difference + scores[1]
            lines.append(f'| {row["method"]} |{scores} {row["seconds_per_explanation"]:.4f} | {conservation} |'
                         + (f' {row["needle_share"]:.1%} |' if needle else ''))
        lines.append('')
        if 'pointing' in rows[0]:
            lines += [f'Localisation against the known masks (chance: the object patches\' share, '
                      f'{rows[0]["object_share"]:.1%} of each image on average; 95 % intervals):', '',
                      '| method | relevance mass accuracy | rank accuracy | pointing game |', '|---|---:|---:|---:|']
            for row in rows:
                lines.append(f'| {row["method"]} |' + ''.join(
                    f' {row[key]:.3f} ({row[key + "_low"]:.3f} to {row[key + "_high"]:.3f}) |'
                    for key in LOCALISATION))
            lines.append('')
    return '\n'.join(lines)


def plot(records: List[dict], tables: Dict[str, List[dict]], out: str) -> None:
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    import numpy

    grid = numpy.linspace(0, 1, 33)  # examples of different lengths: each curve read at the same fractions
    panels = {'morf': 'deletion, MoRF (most relevant removed first)', 'lerf': 'deletion, LeRF',
              'insertion_morf': 'insertion, MoRF (most relevant inserted first)', 'insertion_lerf': 'insertion, LeRF'}
    for task, rows in tables.items():
        figure, axes = plt.subplots(2, 2, figsize=(12, 9), sharey=True)
        for index, row in enumerate(rows):
            method_records = [r for r in records if r['task'] == task and r['method'] == row['method']]
            # a colour of its own for each of up to 20 methods (the default cycle repeats after 10), and a line
            # style that changes every 10
            style = dict(color=plt.get_cmap('tab20')(index % 20), linestyle=('-', '--')[index // 10 % 2],
                         linewidth=2.5 if row['method'] == 'MambaLRP' else 1.0)
            for axis, key in zip(axes.flat, panels):
                curve = numpy.mean([numpy.interp(grid, r['fractions'], r[key]) for r in method_records], axis=0)
                axis.plot(grid, curve, label=row['method'], **style)
        for axis, title in zip(axes.flat, panels.values()):
            axis.set_title(title, fontsize=10)
            axis.set_xlabel('fraction of positions removed or inserted')
        for axis in axes[:, 0]:
            axis.set_ylabel('explained logit')
        axes[0, 1].legend(fontsize=7)
        figure.suptitle(f'{task}: perturbation curves')
        figure.tight_layout()
        figure.savefig(os.path.join(out, f'curves_{task}.png'), dpi=110)
        plt.close(figure)

        figure, axis = plt.subplots(figsize=(5, 5))
        for method, marker in (('InputXGradient', 'x'), ('MambaLRP', 'o')):
            method_records = [r for r in records if r['task'] == task and r['method'] == method]
            axis.scatter([r['relevance_sum'] for r in method_records], [r['explained'] for r in method_records],
                         marker=marker, label=method, alpha=0.7)
        limits = axis.get_xlim()
        axis.plot(limits, limits, color='grey', linewidth=0.8)
        axis.set_xlabel('sum of relevances')
        axis.set_ylabel('explained logit f(x)')
        axis.set_title(f'{task}: conservation')
        axis.legend()
        figure.tight_layout()
        figure.savefig(os.path.join(out, f'conservation_{task}.png'), dpi=110)
        plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=' '.join(__doc__.split('\n\n')[0].split()))
    parser.add_argument('--quick', action='store_true', help='small data, models and example counts')
    # the photo-digits tasks train their Vision Mamba first (hours on a CPU, minutes on a GPU): named only
    parser.add_argument('--tasks', nargs='+', default=[name for name in TASKS if not name.endswith('photo-digits')],
                        choices=list(TASKS))
    parser.add_argument('--examples', type=int, help='test examples explained per task (default 96, quick 24)')
    parser.add_argument('--device', default='cpu', help='where the models run (cuda: the GPU benchmark)')
    parser.add_argument('--sst2-size', default='small',
                        help="the SST-2 classifier: 'small' (shipped), '130m', 'deltanet-small' (Gated DeltaNet) or "
                             "'minimax-small' (lightning attention)")
    parser.add_argument('--methods', nargs='+', metavar='NAME',
                        help='only these methods (names as in the tables; default: all)')
    parser.add_argument('--weights', help='directory of the SST-2 weights (default: the shipped ones)')
    parser.add_argument('--out', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'output',
                                                      'faithfulness'),
                        help='directory the tables and plots are written to (default: benchmarks/output/faithfulness)')
    args = parser.parse_args()
    unknown = set(args.methods or ()) - set(methods(False, vision=True))
    if unknown:
        parser.error(f'unknown methods {sorted(unknown)}; the names are those of the tables: '
                     f'{", ".join(methods(False, vision=True))}')
    torch.manual_seed(0)

    distributed = int(os.environ.get('WORLD_SIZE', '1')) > 1
    if distributed:
        dist.init_process_group('nccl' if torch.cuda.is_available() else 'gloo')
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    torch.set_num_threads(max(1, torch.get_num_threads() // world))
    cache = os.path.join(args.out, 'cache')

    records, accuracies = [], {}
    for name in args.tasks:
        task = TASKS[name](args.quick, **({'size': args.sst2_size, 'weights': args.weights} if name == 'sst2' else {}))
        if rank == 0:
            model = trained_model(task, args.quick, cache)  # trains once, the other ranks load it
        if distributed:
            dist.barrier()
        if rank != 0:
            model = trained_model(task, args.quick, cache)
        model = model.to(args.device)
        accuracies[name] = accuracy(model, task)
        count = evaluation_examples(task, args.quick, args.examples)
        chunks = list(example_batches(task, count, CHUNK))
        for indices, inputs in tqdm(chunks[rank::world], desc=f'{name} (rank {rank})', disable=rank != 0):
            records += explain_chunk(model, task, indices, inputs, args.quick, args.methods)
        if not distributed:
            # the tables of the tasks done so far: a long run stopped later keeps them (after the last task, the run's)
            tables, text = write_tables(records, accuracies, args)

    if distributed:
        gathered = [None] * world
        dist.all_gather_object(gathered, records)
        records = [record for part in gathered for record in part]
        dist.destroy_process_group()
    if rank != 0:
        return
    if distributed:
        tables, text = write_tables(records, accuracies, args)
    plot(records, tables, args.out)
    print(text)
    print(f'wrote {args.out}/results.md, results.csv and the plots')


def write_tables(records: List[dict], accuracies: Dict[str, float], args: argparse.Namespace) -> tuple:
    '''Sorts ``records`` and writes their ``results.md`` and ``results.csv`` to ``args.out``; returns the tables and
    the markdown.'''
    records.sort(key=lambda record: (record['task'], record['method'], record['example']))
    tables = summarise(records, args.quick)
    os.makedirs(args.out, exist_ok=True)
    text = markdown(tables, accuracies)
    with open(os.path.join(args.out, 'results.md'), 'w') as file:
        file.write(text)
    with open(os.path.join(args.out, 'results.csv'), 'w', newline='') as file:
        rows = [row for task_rows in tables.values() for row in task_rows]
        writer = csv.DictWriter(file, fieldnames=sorted({key for row in rows for key in row}))
        writer.writeheader()
        writer.writerows(rows)
    return tables, text


if __name__ == '__main__':
    main()
