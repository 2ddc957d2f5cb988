'''Where an explanation's host time goes: the composite's registration, and each explanation with the registration
held across calls, beside gradient x input of the unmodified model (a), side by side in one run.

For each size: (a); MambaLRP registering the composite per call (``lrp_zennit`` of ``speed.py``); registering and
restoring alone; MambaLRP inside one registration held across calls (as ``with composite.context(model)`` around a
corpus, or ``captum_mamba.MambaLRP.registered()``); and the per-call explanation split into its phases, each ended
by a synchronisation (register, forward, backward, restore). The first four are measured in turn, round after
round (``--repeats`` rounds after a warm-up): medians, the time Python's garbage collector took in them, and for
MambaLRP the median over the rounds of its time divided by (a)'s in the same round, with quartiles (a host whose speed
drifts moves that less than the ratio of two medians). On a GPU, short inputs are bound by the host, so that a
millisecond of registration shows in the ratio to (a).

An A/B against another commit runs this script with that commit's checkout named in ``PYTHONPATH`` (its
``zennit_mamba`` is then imported instead of this one's; the header names the library measured), alternately with
this checkout's, on one machine.

Usage::

    python benchmarks/host_overhead.py --device cuda --sizes bamba:8192:1 bamba:1024:8 mamba:1024:1
    PYTHONPATH=/path/to/other/checkout python benchmarks/host_overhead.py --device cuda --sizes mamba:1024:1
'''
import argparse
import gc
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from speed import FAMILIES, build_model, explained_logit, method_table, paired_ratio, relevance_through  # noqa: E402
# after speed, which puts this checkout on the path
import zennit_mamba  # noqa: E402
from zennit_mamba import MambaComposite  # noqa: E402


class CollectorTime:
    '''Seconds spent in Python's garbage collector since the last :py:meth:`reset`.'''

    def __init__(self):
        self.seconds, self._start = 0.0, 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == 'start':
            self._start = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._start

    def reset(self) -> None:
        self.seconds = 0.0


def measured(function: Callable[[], object], synchronize: Callable[[], None],
             collector: CollectorTime) -> Tuple[float, float]:
    '''Seconds of one synchronised call of ``function``, and the collector's seconds in it.'''
    synchronize()
    collector.reset()
    start = time.perf_counter()
    function()
    synchronize()
    return time.perf_counter() - start, collector.seconds


def timed(function: Callable[[], object], synchronize: Callable[[], None], collector: CollectorTime,
          repeats: int) -> str:
    '''Median milliseconds of ``function`` (and of the collector's time in it) after one warm-up call.'''
    function()
    synchronize()
    seconds, collected = zip(*(measured(function, synchronize, collector) for _ in range(repeats)))
    return f'{statistics.median(seconds) * 1e3:.1f} ms (gc {statistics.median(collected) * 1e3:.1f})'


def measure_size(model, family: str, length: int, batch: int, device: str, repeats: int,
                 collector: CollectorTime) -> Dict[str, str]:
    synchronize = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
    embeddings = torch.randn(batch, length, model.config.hidden_size, device=device, dtype=model.dtype) * 0.5
    methods = method_table(family)
    composite = MambaComposite()

    def register_and_restore():
        with composite.context(model):
            pass

    def held() -> Tuple[float, float]:
        with composite.context(model) as modified:
            relevance_through(modified, embeddings)  # the registration's first call is not the one timed
            return measured(lambda: relevance_through(modified, embeddings), synchronize, collector)

    calls = {
        '(a) gradient x input': lambda: measured(lambda: methods['gi'](model, embeddings), synchronize, collector),
        'MambaLRP, registered per call': lambda: measured(lambda: methods['lrp_zennit'](model, embeddings),
                                                          synchronize, collector),
        'register and restore alone': lambda: measured(register_and_restore, synchronize, collector),
        'MambaLRP, registration held': held,
    }
    for call in calls.values():
        call()  # warm-up
    rounds = [{name: call() for name, call in calls.items()} for _ in range(repeats)]
    seconds = [{name: value[0] for name, value in round_.items()} for round_ in rounds]
    row = {}
    for name in calls:
        row[name] = (f'{statistics.median(round_[name] for round_ in seconds) * 1e3:.1f} ms '
                     f'(gc {statistics.median(round_[name][1] for round_ in rounds) * 1e3:.1f})')
        if name.startswith('MambaLRP'):
            lower, middle, upper = paired_ratio(seconds, name, '(a) gradient x input')
            row[name] += f', {middle:.3f} of (a) paired [{lower:.3f}, {upper:.3f}]'

    phases: Dict[str, List[float]] = {}

    def phased():
        marks = [time.perf_counter()]
        context = composite.context(model)
        modified = context.__enter__()
        synchronize()
        marks.append(time.perf_counter())
        leaf = embeddings.detach().requires_grad_()
        logit = explained_logit(modified, leaf)
        synchronize()
        marks.append(time.perf_counter())
        torch.autograd.grad(logit, leaf, logit.detach())
        synchronize()
        marks.append(time.perf_counter())
        context.__exit__(None, None, None)
        marks.append(time.perf_counter())
        for name, start, end in zip(('register', 'forward', 'backward', 'restore'), marks, marks[1:]):
            phases.setdefault(name, []).append((end - start) * 1e3)

    timed(phased, synchronize, collector, repeats)
    row['phases of a call (each synchronised)'] = ', '.join(
        f'{name} {statistics.median(values):.1f}' for name, values in phases.items()) + ' ms'
    return row


def main(argv: Optional[List[str]] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--device', default='cpu', choices=('cpu', 'cuda'))
    parser.add_argument('--sizes', nargs='+', default=['mamba:1024:1', 'bamba:1024:1'],
                        help='family:length:batch, families of speed.py at the device\'s size')
    parser.add_argument('--repeats', type=int, default=7, help='timed rounds, interleaved (default 7)')
    args = parser.parse_args(argv)
    collector = CollectorTime()
    device_name = torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'
    library = os.path.dirname(os.path.abspath(zennit_mamba.__file__))
    lines = [f'# Host overhead, {device_name}, {torch.get_num_threads()} threads, library {library}', '']
    print(lines[0], flush=True)
    models = {}
    for size in args.sizes:
        family, length, batch = size.split(':')
        if family not in FAMILIES:
            parser.error(f'unknown family {family!r}; choose from {FAMILIES}')
        if family not in models:
            models[family] = build_model(args.device, quick=False, family=family)
        row = measure_size(models[family], family, int(length), int(batch), args.device, args.repeats, collector)
        lines += [f'## {family}, {length} tokens, batch {batch}', ''] + [f'- {key}: {value}' for key, value in
                                                                        row.items()] + ['']
        print('\n'.join(lines[-len(row) - 3:]), flush=True)
    return '\n'.join(lines)


if __name__ == '__main__':
    main()
