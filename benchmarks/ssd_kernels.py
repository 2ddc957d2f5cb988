'''The Mamba-2 SSD forward alone on a GPU: this package's Triton SSD (float32-exact products), mamba-ssm's Triton SSD
(TF32 products) and the PyTorch SSD, time and error against float64, side by side on one layer's shapes.

``--sweep`` also times the Triton SSD under each launch setting (warps, stages) of its kernels and each block of
``pass_states``.

Usage::

    python benchmarks/ssd_kernels.py --batch 8 --length 4096 --heads 24 --head-dim 64 --state 128 [--sweep]
'''
import argparse
import itertools
import os
import sys
from typing import List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from zennit_mamba.kernels import ssd, ssd_triton  # noqa: E402
from zennit_mamba._optional import mamba_ssm_chunk_scan  # noqa: E402


def milliseconds(function, repeats: int = 10) -> float:
    function()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        function()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def main(argv: Optional[List[str]] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--length', type=int, default=4096)
    parser.add_argument('--heads', type=int, default=24)
    parser.add_argument('--groups', type=int, default=1)
    parser.add_argument('--head-dim', type=int, default=64)
    parser.add_argument('--state', type=int, default=128)
    parser.add_argument('--chunk', type=int, default=256)
    parser.add_argument('--sweep', action='store_true')
    parser.add_argument('--our-chunks', type=int, nargs='*', default=[],
                        help='also time the Triton SSD with these chunk lengths (a constant selection may take any)')
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    shape = (args.batch, args.length, args.heads)
    x = torch.randn(*shape, args.head_dim, device='cuda')
    dt = torch.rand(shape, device='cuda') * 0.1
    A = -torch.rand(args.heads, device='cuda') * 4
    B, C = torch.randn(2, args.batch, args.length, args.groups, args.state, device='cuda')
    D = torch.zeros(args.heads, device='cuda')
    exact, _ = ssd._exact_ssd(ssd._pytorch_ssd, *(tensor.double() for tensor in (x, dt, A, B, C, D)), args.chunk)

    candidates = {
        'triton_ssd (ours, tf32x3)': lambda: ssd._exact_ssd(ssd_triton.triton_ssd, x, dt, A, B, C, D, args.chunk)[0],
        'pytorch ssd (float32)': lambda: ssd._exact_ssd(ssd._pytorch_ssd, x, dt, A, B, C, D, args.chunk)[0],
    }
    for chunk in args.our_chunks:
        candidates[f'triton_ssd (ours, tf32x3), chunk {chunk}'] = (
            lambda chunk=chunk: ssd._exact_ssd(ssd_triton.triton_ssd, x, dt, A, B, C, D, chunk)[0])
    kernel = mamba_ssm_chunk_scan()
    if kernel is not None:
        candidates['mamba-ssm (tf32)'] = lambda: ssd._kernel_ssd(kernel, x, dt, A, B, C, D, args.chunk)[0]
    lines = [f'# SSD forward, {vars(args)}, {torch.cuda.get_device_name()}', '',
             '| implementation | ms | error / max |', '|---|---|---|']
    for name, function in candidates.items():
        with torch.no_grad():
            error = ((function().double() - exact).abs().max() / exact.abs().max()).item()
            lines.append(f'| {name} | {milliseconds(function):.3f} | {error:.1e} |')
    if args.sweep:
        lines += ['', '| chunk_states | chunk_products | chunk_outputs | ms |', '|---|---|---|---|']
        settings = list(itertools.product((4, 8), (1, 2, 3)))
        default = dict(ssd_triton.LAUNCH)
        for kernel_name in default:
            for setting in settings:
                ssd_triton.LAUNCH.update(default, **{kernel_name: setting})
                time = milliseconds(candidates['triton_ssd (ours, tf32x3)'])
                row = [str(ssd_triton.LAUNCH[name]) for name in default]
                lines.append(f'| {" | ".join(row)} | {time:.3f} |')
        ssd_triton.LAUNCH.update(default)
        lines += ['', '| pass_states elements per program | ms |', '|---|---|']
        default_block = ssd_triton.PASS_BLOCK
        for block in (128, 256, 512, 1024):
            ssd_triton.PASS_BLOCK = block
            lines.append(f'| {block} | {milliseconds(candidates["triton_ssd (ours, tf32x3)"]):.3f} |')
        ssd_triton.PASS_BLOCK = default_block
    text = '\n'.join(lines)
    print(text)
    return text


if __name__ == '__main__':
    main()
