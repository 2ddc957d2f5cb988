'''Where the time of an explanation goes: the GPU kernels of each method, side by side, from torch.profiler.

For one model of ``speed.py`` (a family at 130M size in float32, or a real-size configuration in bfloat16) and one
input size, each method runs once to warm up and once under the profiler; the table lists the kernels that take the
most GPU time, summed over calls, and each method's total kernel time and launch count. ``--syncs`` also runs each
method once under ``torch.cuda.set_sync_debug_mode('warn')`` and lists the lines that made the host wait for the GPU
(each such wait exposes the host time that follows it), with the call's wall time beside its kernel time. ``--gaps``
traces one call with Python stacks and sums the time the GPU stood idle before each kernel by the innermost line of this
package, transformers or mamba-ssm that launched it (or the operator, where no such line is on the stack): where host
time, not kernel time, makes an explanation slower.

Usage::

    python benchmarks/profile_methods.py --family mamba2 --length 4096 --batch 8 --methods gi lrp_zennit
'''
import argparse
import collections
import json
import os
import sys
import tempfile
import time
import traceback
import warnings
from typing import List, Optional

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from speed import FAMILIES, REAL_SIZES, build_model, method_table  # noqa: E402


def kernel_times(function, model, embeddings: torch.Tensor) -> dict:
    '''GPU time (ms) and calls per kernel name for one call of ``function``.'''
    function(model, embeddings)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        function(model, embeddings)
        torch.cuda.synchronize()
    times = {}
    for event in profiler.key_averages():
        if event.device_time_total > 0:
            times[event.key] = (event.device_time_total / 1e3, event.count)
    return times


#: the code whose lines name a synchronisation or a launch
OURS = ('zennit_mamba', 'captum_mamba', 'transformers', 'mamba_ssm', 'benchmarks')


def synchronisations(function, model, embeddings: torch.Tensor) -> collections.Counter:
    '''The innermost lines of this package, transformers, mamba-ssm or the benchmark that made the host wait for the
    GPU in one call of ``function``, with counts (in the backward pass, where the autograd engine passes the warning
    on).'''
    places, calling = collections.Counter(), []

    def record(message, category, filename, lineno, file=None, line=None):
        if not calling:
            return  # the call's only (setting the mode was once reported itself, before any call)
        frames = [frame for frame in traceback.extract_stack()[:-1] if any(part in frame.filename for part in OURS)]
        where = (f'{frames[-1].filename.split("site-packages/")[-1]}:{frames[-1].lineno} {frames[-1].line}'
                 if frames else f'{filename}:{lineno}')
        places[where] += 1

    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter('always')
        warnings.showwarning = record  # restored by catch_warnings
        torch.cuda.set_sync_debug_mode('warn')
        try:
            calling.append(True)
            function(model, embeddings)
        finally:
            torch.cuda.set_sync_debug_mode('default')
    return places


def idle_gaps(function, model, embeddings: torch.Tensor) -> collections.Counter:
    '''Microseconds the GPU stood idle in one call of ``function``, by what launched the kernel that ended the wait.'''
    function(model, embeddings)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as profiler:
        with torch.profiler.record_function('explanation'):
            function(model, embeddings)
            torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as folder:
        profiler.export_chrome_trace(os.path.join(folder, 'trace.json'))
        with open(os.path.join(folder, 'trace.json')) as file:
            events = [event for event in json.load(file)['traceEvents'] if event.get('ph') == 'X']
    return gaps_by_launcher(events)


def gaps_by_launcher(events: List[dict]) -> collections.Counter:
    '''From a Chrome trace's complete events around one ``explanation`` annotation: the microseconds the GPU stood
    idle before each kernel, summed by the innermost host frame that launched it.'''
    call = next(event for event in events if event['name'] == 'explanation' and event.get('cat') == 'user_annotation')
    kernels = sorted((event for event in events if event.get('cat') in ('kernel', 'gpu_memcpy', 'gpu_memset')),
                     key=lambda event: event['ts'])
    # the runtime's launches, and the driver's (Triton's kernels)
    launches = {event['args'].get('correlation'): event for event in events
                if event.get('cat') in ('cuda_runtime', 'cuda_driver')}
    launcher = {}
    # per thread, sweep the host frames (nested intervals) and the launches in time order with a stack of open frames
    frames, calls = collections.defaultdict(list), collections.defaultdict(list)
    for event in events:
        if event.get('cat') in ('python_function', 'cpu_op'):
            frames[event['tid']].append(event)
    for kernel in kernels:
        launch = launches.get(kernel['args'].get('correlation'))
        if launch is not None:
            calls[launch['tid']].append(launch)
    for tid, launched in calls.items():
        opened, stack = iter(sorted(frames[tid], key=lambda event: event['ts'])), []
        following = next(opened, None)
        for launch in sorted(launched, key=lambda event: event['ts']):
            while following is not None and following['ts'] <= launch['ts']:
                stack.append(following)
                following = next(opened, None)
            stack = [frame for frame in stack if frame['ts'] + frame.get('dur', 0) >= launch['ts']]
            python = [frame for frame in stack
                      if frame['cat'] == 'python_function' and any(part in frame['name'] for part in OURS)]
            operators = [frame for frame in stack if frame['cat'] == 'cpu_op']
            name = (python or operators or [launch])[-1]['name']
            launcher[launch['args'].get('correlation')] = name.split('site-packages/')[-1]

    gaps = collections.Counter()
    busy_until = call['ts']
    for kernel in kernels:
        if kernel['ts'] > busy_until:
            gaps[launcher.get(kernel['args'].get('correlation'), 'unknown launch')] += kernel['ts'] - busy_until
        busy_until = max(busy_until, kernel['ts'] + kernel.get('dur', 0))
    gaps['(after the last kernel)'] += max(0.0, call['ts'] + call['dur'] - busy_until)
    return gaps


def main(argv: Optional[List[str]] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--family', default='mamba2', choices=FAMILIES + tuple(sorted(REAL_SIZES)))
    parser.add_argument('--length', type=int, default=4096)
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--methods', nargs='+', default=['gi', 'lrp_zennit'])
    parser.add_argument('--top', type=int, default=15)
    parser.add_argument('--syncs', action='store_true', help='list the lines that synchronised with the GPU')
    parser.add_argument('--gaps', action='store_true', help='sum the GPU\'s idle time by what launched next')
    args = parser.parse_args(argv)

    model = build_model('cuda', quick=False, family=args.family)
    dtype = next(model.parameters()).dtype
    embeddings = torch.randn(args.batch, args.length, model.config.hidden_size, device='cuda', dtype=dtype)
    methods = method_table(args.family)
    lines = [f'# {args.family}, {args.length} tokens, batch {args.batch}, {torch.cuda.get_device_name()}']
    for name in args.methods:
        times = kernel_times(methods[name], model, embeddings)
        total, launches = sum(ms for ms, _ in times.values()), sum(count for _, count in times.values())
        lines += ['', f'## {name}: {total:.1f} ms of kernels, {launches} launches', '', '| ms | calls | kernel |',
                  '|---|---|---|']
        for key, (ms, count) in sorted(times.items(), key=lambda item: -item[1][0])[:args.top]:
            lines.append(f'| {ms:.1f} | {count} | {key[:110]} |')
        if args.syncs:
            function = methods[name]
            function(model, embeddings)
            torch.cuda.synchronize()
            start = time.perf_counter()
            function(model, embeddings)
            torch.cuda.synchronize()
            wall = (time.perf_counter() - start) * 1e3
            places = synchronisations(function, model, embeddings)
            lines += ['', f'wall time {wall:.1f} ms against {total:.1f} ms of kernels; {sum(places.values())} '
                      f'synchronisations:', '']
            lines += [f'- {count} x {place}' for place, count in places.most_common()]
        if args.gaps:
            gaps = idle_gaps(methods[name], model, embeddings)
            lines += ['', f'GPU idle {sum(gaps.values()) / 1e3:.1f} ms in the traced call, by the launching frame:', '',
                      '| ms | frame |', '|---|---|']
            lines += [f'| {us / 1e3:.2f} | {where[:150]} |' for where, us in gaps.most_common(args.top)]
    text = '\n'.join(lines)
    print(text)
    return text


if __name__ == '__main__':
    main()
