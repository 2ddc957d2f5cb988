'''Faithfulness benchmark: MambaLRP against Captum's methods, attention rollouts and ablations, on four tasks.

Trains (and caches) a small Mamba classifier per task, explains test examples with every method, and measures
MoRF/LeRF perturbation curves (``captum_mamba.metrics.faithfulness``), seconds per explanation and conservation.
Writes ``results.md``, ``results.csv``, ``curves_<task>.png`` and ``conservation_<task>.png`` to ``--out``.

Run: ``python benchmarks/faithfulness.py [--quick] [--tasks sentiment digits needle vim-digits]``;
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
from typing import Dict, List, Tuple

import torch
import torch.distributed as dist
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from captum_mamba.metrics import faithfulness  # noqa: E402
from methods import RELEVANCE_METHODS, methods  # noqa: E402
from tasks import TASKS, Task, accuracy, model_inputs, trained_model  # noqa: E402

CHUNK = 16  # examples explained together; fixed, so results do not depend on the number of processes


def evaluation_examples(task: Task, quick: bool) -> int:
    return min(len(task.test_labels), 24 if quick else 96)


def replacement(model, task: Task, inputs: torch.Tensor) -> torch.Tensor:
    '''What a removed position becomes: the unknown-token embedding, or zeros.'''
    if task.replacement_token is None:
        return torch.zeros_like(inputs[0, 0])
    return model.backbone.embeddings.weight[task.replacement_token].detach()


def explain_chunk(model, task: Task, chunk: slice, quick: bool) -> List[dict]:
    '''Per-example records of every method on one chunk of test examples.'''
    inputs = model_inputs(model, task, task.test_inputs[chunk])
    with torch.no_grad():
        logits = model(inputs)
    targets = logits.argmax(-1)
    explained = logits[torch.arange(len(targets)), targets]
    step = max(1, inputs.shape[1] // 32)
    removed = replacement(model, task, inputs)
    records = []
    for number, (name, method) in enumerate(methods(quick, vision=task.name == 'vim-digits').items()):
        # noise (SmoothGrad) depends on the chunk and method only, not on what this process did before
        torch.manual_seed(1000 * chunk.start + number)
        start = time.perf_counter()
        scores = method(model, inputs, targets)
        seconds = (time.perf_counter() - start) / len(targets)
        result = faithfulness(model, inputs, scores, target=targets, replacement=removed, step=step)
        for index in range(len(targets)):
            record = {
                'task': task.name, 'method': name, 'example': chunk.start + index,
                'delta_af': result.delta_af[index].item(), 'area_morf': result.area_morf[index].item(),
                'area_lerf': result.area_lerf[index].item(), 'seconds': seconds,
                'explained': explained[index].item(), 'relevance_sum': scores[index].sum().item(),
                'morf': result.morf[index].tolist(), 'lerf': result.lerf[index].tolist(),
            }
            if task.needle_positions is not None:
                magnitude = scores[index].abs()
                position = task.needle_positions[chunk][index]
                record['needle_share'] = (magnitude[position] / magnitude.sum().clamp(min=1e-30)).item()
            records.append(record)
    return records


def bootstrap_interval(values: List[float], resamples: int = 2000, seed: int = 0) -> Tuple[float, float]:
    '''The 95 % percentile bootstrap interval of the mean of ``values`` (fixed seed: the same for the same values).'''
    values = torch.tensor(values, dtype=torch.float64)
    picks = torch.randint(0, len(values), (resamples, len(values)), generator=torch.Generator().manual_seed(seed))
    means = values[picks].mean(1)
    return means.quantile(0.025).item(), means.quantile(0.975).item()


def win_rates(records: List[dict]) -> Dict[Tuple[str, str], float]:
    '''Per (task, method): the share of the task's examples on which the method's dA_F is the highest of all
    methods (ties shared).'''
    per_example = defaultdict(dict)
    for record in records:
        per_example[(record['task'], record['example'])][record['method']] = record['delta_af']
    wins, examples = defaultdict(float), defaultdict(int)
    for (task, _), scores in per_example.items():
        best = max(scores.values())
        winners = [method for method, score in scores.items() if score == best]
        for method in scores:
            wins[(task, method)] += (method in winners) / len(winners)
        examples[task] += 1
    return {(task, method): count / examples[task] for (task, method), count in wins.items()}


def summarise(records: List[dict], quick: bool) -> Dict[str, List[dict]]:
    '''One row per (task, method): means over examples, the 95 % bootstrap interval of dA_F and the win rate.'''
    groups = defaultdict(list)
    for record in records:
        groups[(record['task'], record['method'])].append(record)
    wins = win_rates(records)
    tables = defaultdict(list)
    for (task, method), rows in groups.items():
        count = len(rows)
        low, high = bootstrap_interval([r['delta_af'] for r in rows])
        row = {
            'task': task, 'method': method, 'examples': count,
            'delta_af': sum(r['delta_af'] for r in rows) / count,
            'delta_af_low': low, 'delta_af_high': high, 'win_rate': wins[(task, method)],
            'area_morf': sum(r['area_morf'] for r in rows) / count,
            'area_lerf': sum(r['area_lerf'] for r in rows) / count,
            # median over chunks: the first chunk of each method pays one-off warm-up costs
            'seconds_per_explanation': statistics.median(r['seconds'] for r in rows),
            'conservation_error': (
                sum(abs(r['relevance_sum'] - r['explained']) / abs(r['explained']) for r in rows) / count
                if method in RELEVANCE_METHODS else float('nan')
            ),
        }
        if 'needle_share' in rows[0]:
            row['needle_share'] = sum(r['needle_share'] for r in rows) / count
        tables[task].append(row)
    order = list(methods(quick, vision=True))
    return {task: sorted(rows, key=lambda row: order.index(row['method'])) for task, rows in tables.items()}


def markdown(tables: Dict[str, List[dict]], accuracies: Dict[str, float]) -> str:
    lines = []
    for task, rows in tables.items():
        needle = 'needle_share' in rows[0]
        lines += [f'### {task} (test accuracy {accuracies[task]:.1%}, {rows[0]["examples"]} explained examples)', '',
                  '| method | dA_F | 95 % interval | wins | A_MoRF | A_LeRF | s / explanation | conservation error |'
                  + (' relevance on needle |' if needle else ''),
                  '|---|---:|---:|---:|---:|---:|---:|---:|' + ('---:|' if needle else '')]
        for row in rows:
            conservation = '—' if row['conservation_error'] != row['conservation_error'] else \
                f'{row["conservation_error"]:.1e}'
            lines.append(
                f'| {row["method"]} | {row["delta_af"]:.3f} | {row["delta_af_low"]:.3f} to {row["delta_af_high"]:.3f} | '
                f'{row["win_rate"]:.0%} | {row["area_morf"]:.3f} | {row["area_lerf"]:.3f} | '
                f'{row["seconds_per_explanation"]:.4f} | {conservation} |'
                + (f' {row["needle_share"]:.1%} |' if needle else '')
            )
        lines.append('')
    return '\n'.join(lines)


def plot(records: List[dict], tables: Dict[str, List[dict]], out: str) -> None:
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    for task, rows in tables.items():
        figure, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
        for row in rows:
            method_records = [r for r in records if r['task'] == task and r['method'] == row['method']]
            for axis, key in zip(axes, ('morf', 'lerf')):
                curve = torch.tensor([r[key] for r in method_records]).mean(0)
                axis.plot(torch.linspace(0, 1, len(curve)), curve, label=row['method'],
                          linewidth=2.5 if row['method'] == 'MambaLRP' else 1.0)
        for axis, title in zip(axes, ('MoRF (most relevant removed first)', 'LeRF (least relevant first)')):
            axis.set_title(title)
            axis.set_xlabel('fraction of positions removed')
        axes[0].set_ylabel('explained logit')
        axes[1].legend(fontsize=7)
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help='small data, models and example counts')
    parser.add_argument('--tasks', nargs='+', default=list(TASKS), choices=list(TASKS))
    parser.add_argument('--out', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'output',
                                                      'faithfulness'))
    args = parser.parse_args()
    torch.manual_seed(0)

    distributed = int(os.environ.get('WORLD_SIZE', '1')) > 1
    if distributed:
        dist.init_process_group('nccl' if torch.cuda.is_available() else 'gloo')
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    torch.set_num_threads(max(1, torch.get_num_threads() // world))
    cache = os.path.join(args.out, 'cache')

    records, accuracies = [], {}
    for name in args.tasks:
        task = TASKS[name](args.quick)
        if rank == 0:
            model = trained_model(task, args.quick, cache)  # trains once, the other ranks load it
        if distributed:
            dist.barrier()
        if rank != 0:
            model = trained_model(task, args.quick, cache)
        accuracies[name] = accuracy(model, task)
        count = evaluation_examples(task, args.quick)
        chunks = [slice(start, min(start + CHUNK, count)) for start in range(0, count, CHUNK)]
        for chunk in tqdm(chunks[rank::world], desc=f'{name} (rank {rank})', disable=rank != 0):
            records += explain_chunk(model, task, chunk, args.quick)

    if distributed:
        gathered = [None] * world
        dist.all_gather_object(gathered, records)
        records = [record for part in gathered for record in part]
        dist.destroy_process_group()
    if rank != 0:
        return
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
    plot(records, tables, args.out)
    print(text)
    print(f'wrote {args.out}/results.md, results.csv and the plots')


if __name__ == '__main__':
    main()
