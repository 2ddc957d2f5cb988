'''MambaLRP on more than one GPU, through existing engines.

* ``--mode corpus``: a corpus of token sequences explained data-parallel, one process per GPU under ``torchrun``
  (each process explains every ``world``-th batch with ``captum_mamba.MambaLRP``); prints sequences per second
  and the largest relative conservation error. Run once as one process and once with ``torchrun --nproc_per_node
  2``: the ratio of the two throughputs is the speed-up.
* ``--mode sharded``: one model split layer-wise over the GPUs with accelerate's ``dispatch_model`` (each half of
  the layers on its own GPU), explained in one call; prints the largest difference from the same model explained
  on one GPU, relative to the largest relevance, and each GPU's peak memory.

Models: the benchmark's 130M-size Mamba (``benchmarks/speed.py``: 24 layers, width 768, random weights, float32,
conv biases zeroed); for ``--mode sharded``, ``--config`` takes a real-size configuration in bfloat16 instead
(e.g. Codestral-Mamba-7B at a length whose explanation does not fit one GPU: then it reports the out-of-memory
on one GPU and the sharded run's conservation). ``--quick`` runs a 2-layer model on the CPU (gloo), to check the
script.
'''
import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, 'benchmarks')]

from captum_mamba import MambaLRP  # noqa: E402
from speed import TARGET, build_model  # noqa: E402


def explain(model, embeddings: torch.Tensor) -> torch.Tensor:
    '''Relevance of each token (summed over the embedding) for the benchmark's target logit at the last position.'''
    return MambaLRP(model).attribute(embeddings, target=TARGET).sum(-1)


def corpus(args, device: str) -> None:
    distributed = int(os.environ.get('WORLD_SIZE', '1')) > 1
    if distributed:
        dist.init_process_group('nccl' if device == 'cuda' else 'gloo')
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    where = f'cuda:{rank}' if device == 'cuda' else 'cpu'
    if device == 'cuda':
        torch.cuda.set_device(rank)
    model = build_model(device, args.quick).to(where)
    ids = torch.randint(0, model.config.vocab_size, (args.sequences, args.length),
                        generator=torch.Generator().manual_seed(0))
    batches = [ids[start:start + args.batch] for start in range(0, len(ids), args.batch)]
    mine = batches[rank::world]
    embedding = model.get_input_embeddings()
    for warm_up in mine[:2]:
        explain(model, embedding(warm_up.to(where)).detach())
    if distributed:
        dist.barrier()
    if device == 'cuda':
        torch.cuda.synchronize()
    start = time.perf_counter()
    totals = [explain(model, embedding(batch.to(where)).detach()).sum(-1) for batch in mine]
    if device == 'cuda':
        torch.cuda.synchronize()
    if distributed:
        dist.barrier()
    seconds = time.perf_counter() - start
    # after the timing: each sequence's relevance against its logit
    worst = torch.zeros((), dtype=torch.float64, device=where)
    with torch.no_grad():
        for batch, total in zip(mine, totals):
            logit = model(inputs_embeds=embedding(batch.to(where)), use_cache=False).logits[:, -1, TARGET]
            # relative to the batch's largest logit: random weights give some logits near zero
            worst = torch.maximum(worst, ((total - logit).abs().max() / logit.abs().max()).double())
    if distributed:
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    if rank == 0:
        print(f'corpus: {world} process(es) on {device}, {args.sequences} sequences of {args.length} tokens in '
              f'batches of {args.batch}: {seconds:.2f} s, {args.sequences / seconds:.1f} sequences/s, largest '
              f'conservation error {worst.item():.1e} (relative to the batch\'s largest logit)', flush=True)
    if distributed:
        dist.destroy_process_group()


def sharded(args, device: str) -> None:
    import accelerate

    model = build_model(device, args.quick, family=args.config or 'mamba')
    devices = list(range(torch.cuda.device_count())) if device == 'cuda' else []
    if len(devices) < 2:
        raise SystemExit('--mode sharded needs two GPUs')
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.length), generator=torch.Generator().manual_seed(0))
    model = model.to('cuda:0')
    torch.cuda.reset_peak_memory_stats(0)
    try:
        one_embeddings = model.get_input_embeddings()(ids.to('cuda:0')).detach()
        with torch.no_grad():
            one_logit = model(inputs_embeds=one_embeddings, use_cache=False, logits_to_keep=1).logits[:, -1, TARGET]
        expected = explain(model, one_embeddings).cpu()
        on_one = f'fits one GPU (there the unmodified model\'s logits {one_logit.float().tolist()})'
    except FloatingPointError as error:
        expected, on_one = None, f'on one GPU is refused ({error})'
    except torch.cuda.OutOfMemoryError:
        expected = None
        on_one = (f'does not fit one GPU (out of memory at {torch.cuda.max_memory_allocated(0) / 2 ** 30:.1f} of '
                  f'{torch.cuda.get_device_properties(0).total_memory / 2 ** 30:.1f} GiB)')
    torch.cuda.empty_cache()
    layers = len(model.backbone.layers)
    # the head may share its weight with the embedding: both on cuda:0 (accelerate moves the last output there)
    device_map = {'backbone.embeddings': 0, 'backbone.norm_f': 1, 'lm_head': 0}
    device_map.update({f'backbone.layers.{index}': 0 if index < layers // 2 else 1 for index in range(layers)})
    model = accelerate.dispatch_model(model, device_map=device_map)
    for index in devices:
        torch.cuda.reset_peak_memory_stats(index)
    embeddings = model.get_input_embeddings()(ids.to('cuda:0')).detach()
    with torch.no_grad():
        logit = model(inputs_embeds=embeddings, use_cache=False, logits_to_keep=1).logits[:, -1, TARGET].float()
    try:
        relevance = explain(model, embeddings).cpu()
    except FloatingPointError as error:  # the explanation refuses relevance that is not finite
        print(f'sharded: {args.config or "mamba-130m"}, batch {args.batch} of {args.length} tokens, which {on_one}: '
              f'the explanation refused: {error} (the unmodified model\'s logits {logit.tolist()})', flush=True)
        return
    peaks = ', '.join(f'cuda:{index} {torch.cuda.max_memory_allocated(index) / 2 ** 30:.2f} GiB' for index in devices)
    if expected is not None and not torch.isfinite(logit).all():
        # the unmodified model's forward under dispatch_model gave NaN (bfloat16 Mamba-2 layers on the GPU that is not
        # the current one, seen on two H200s; MambaLRP's forward sets each mixer's device): the one-GPU logit instead
        print(f'the unmodified model\'s logits under dispatch_model: {logit.tolist()}; conservation against its logits '
              f'on one GPU', flush=True)
        logit = one_logit.float()
    conservation = ((relevance.sum(-1).to(logit.device) - logit).abs().max() / logit.abs().max()).item()
    if expected is not None:
        difference = ((relevance - expected).abs().max() / expected.abs().max()).item()
        compared = f'largest relevance difference from one GPU {difference:.1e} (relative to the largest relevance)'
    else:
        compared = 'no single-GPU result to compare'
    print(f'sharded: {args.config or "mamba-130m"} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B '
          f'parameters, {next(model.parameters()).dtype}), {layers} layers over cuda:0 and cuda:1 (accelerate '
          f'dispatch_model), batch {args.batch} of {args.length} tokens, which {on_one}: {compared}; conservation '
          f'error {conservation:.1e} of the largest logit; peak memory {peaks}', flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=' '.join(__doc__.split('\n\n')[0].split()))
    parser.add_argument('--mode', choices=('corpus', 'sharded'), default='corpus')
    parser.add_argument('--sequences', type=int, default=256)
    parser.add_argument('--length', type=int, default=1024)
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--quick', action='store_true', help='a 2-layer model on the CPU')
    parser.add_argument('--config', choices=('codestral-mamba-7b', 'mamba-2.8b', 'falcon-mamba-7b'),
                        help='--mode sharded: a real-size configuration in bfloat16 instead of the 130M model')
    args = parser.parse_args()
    device = 'cpu' if args.quick else 'cuda'
    (corpus if args.mode == 'corpus' else sharded)(args, device)


if __name__ == '__main__':
    main()
