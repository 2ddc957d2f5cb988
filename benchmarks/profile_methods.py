'''Where the time of an explanation goes: the GPU kernels of each method, side by side, from torch.profiler.

For one model of ``speed.py`` (a family at 130M size in float32, or a real-size configuration in bfloat16) and one
input size, each method runs once to warm up and once under the profiler; the table lists the kernels that take the
most GPU time, summed over calls, and each method's total kernel time and launch count.

Usage::

    python benchmarks/profile_methods.py --family mamba2 --length 4096 --batch 8 --methods gi lrp_zennit
'''
import argparse
import os
import sys
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


def main(argv: Optional[List[str]] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--family', default='mamba2', choices=FAMILIES + tuple(sorted(REAL_SIZES)))
    parser.add_argument('--length', type=int, default=4096)
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--methods', nargs='+', default=['gi', 'lrp_zennit'])
    parser.add_argument('--top', type=int, default=15)
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
    text = '\n'.join(lines)
    print(text)
    return text


if __name__ == '__main__':
    main()
