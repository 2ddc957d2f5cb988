'''Speed and memory of MambaLRP against gradient x input and Integrated Gradients, side by side in one run.

Methods, on the same model and inputs (random weights, conv biases zeroed so that relevance is conserved; float32,
or bfloat16 for the real-size configurations of ``--configs``):

* ``gi``: gradient x input on the unmodified model, through transformers' own forward (on the GPU with mamba-ssm
  installed, its CUDA scan; on the CPU, transformers' per-step loop).
* ``gi_same_kernels``: gradient x input through the canonized model with every MambaLRP rule off (the same kernels
  as MambaLRP).
* ``lrp_zennit``: MambaLRP through ``MambaComposite``; ``lrp_captum``: through ``captum_mamba.MambaLRP``; each
  registers the composite on every call, as one explanation does.
* ``lrp_captum_held``: ``captum_mamba.MambaLRP`` explaining a corpus: ``HELD_CALLS`` explanations inside one
  ``registered()`` block, timed together and reported per explanation (the registration, a few milliseconds of host
  time, paid once).
* ``ig50``: Captum's IntegratedGradients with 50 steps (one example per internal batch).
* ``sequential``: the per-timestep sequential reference of the same rules (tests/reference.py).

Times are medians over ``--repeats`` runs, each run measuring every method once in turn, after one warm-up. Beside
the ratio of two medians, each ratio is also given paired: the median (and quartiles) over the runs of the ratio
within a run, which a host whose speed drifts between runs moves less (on a GPU, short inputs are bound by the host).
Peak memory is what the call adds to what was allocated before it: the CUDA allocator's peak, or on the CPU
(Linux, glibc) the process's peak resident memory in the warm-up call, made with freed memory returned to the OS at
once (timed calls run with the usual allocator; a method run only once has no CPU memory figure). A method whose
estimated time exceeds ``--budget`` seconds is skipped and marked so, as is one that ran out of memory; one whose
estimated or first-measured time is too long to repeat within the budget is measured once ("1 run").
``--long N`` also explains one N-token input with ``recompute=True`` and reports time, memory and conservation.

Run: ``python benchmarks/speed.py`` (CPU: 4 layers, d_model 256) or ``python benchmarks/speed.py --device cuda``
(24 layers, d_model 768, the 130M size); ``--families mamba mamba2 falcon_mamba bamba olmo_hybrid kimi_linear mamba3``
measures each family at that size (Bamba: its last layer attention; the delta-rule hybrids: every fourth; Mamba-3:
mamba-ssm's ``Mamba3`` mixers in ``Mamba3LMHeadModel`` on a GPU, the plain-PyTorch copy elsewhere); ``--configs
mamba-2.8b falcon-mamba-7b codestral-mamba-7b bamba-9b olmo-hybrid-7b`` the
published models' layouts in bfloat16; ``--quick`` for a small smoke run. Writes ``speed_<device>.md`` and
``speed_<device>.csv`` (a row per family, length, batch and method; a column per ratio) to ``--out``.
'''
import argparse
import csv
import ctypes
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
from captum.attr import IntegratedGradients
import transformers
from transformers import MambaConfig
from transformers.utils import logging as transformers_logging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# this checkout's packages ahead of installed ones, but after the entries of PYTHONPATH: a checkout of another commit
# named there is measured instead (an A/B, e.g. host_overhead.py)
_NAMED = {os.path.abspath(entry) for entry in os.environ.get('PYTHONPATH', '').split(os.pathsep) if entry}
_AFTER = max((index + 1 for index, entry in enumerate(sys.path) if os.path.abspath(entry or '.') in _NAMED), default=0)
sys.path[_AFTER:_AFTER] = [ROOT, os.path.join(ROOT, 'tests')]

from captum_mamba import MambaLRP  # noqa: E402
from reference import reference_relevance  # noqa: E402
from zennit_mamba import MambaComposite  # noqa: E402

METHODS = ('gi', 'gi_same_kernels', 'lrp_zennit', 'lrp_captum', 'lrp_captum_held', 'ig50', 'sequential')
#: explanations per measured call of ``lrp_captum_held`` (its time is divided by them)
HELD_CALLS = 4
#: how each method's time grows with length per device, to skip what would exceed the budget (the per-step paths
#: grow faster: transformers' CPU loop for ``gi``, the reference's loop for ``sequential``)
GROWTH = {'cpu': {'gi': 2.5, 'sequential': 1.2}, 'cuda': {'sequential': 1.2}}
SIZES = {'cpu': dict(hidden_size=256, num_hidden_layers=4), 'cuda': dict(hidden_size=768, num_hidden_layers=24)}
TARGET = 7


#: the families the benchmark covers; ``sequential`` (tests/reference.py) exists for Mamba and Mamba2 only
FAMILIES = ('mamba', 'mamba2', 'falcon_mamba', 'bamba', 'olmo_hybrid', 'kimi_linear', 'mamba3')
#: the families whose layers run flash-linear-attention's delta-rule kernels where it is installed
DELTA_RULE_FAMILIES = {'olmo_hybrid', 'kimi_linear', 'olmo-hybrid-7b'}
REFERENCE_FAMILIES = {'mamba', 'mamba2'}


def _config(family: str, vocab_size: int, hidden_size: int, num_hidden_layers: int):
    '''Each family at one width and depth, with its published layout's proportions (Mamba-2: heads of 64, state
    128; Bamba: Mamba-2 layers and one attention layer, the last).'''
    head_dim = min(64, hidden_size // 2)
    mamba2 = dict(num_heads=2 * hidden_size // head_dim, head_dim=head_dim, n_groups=1, state_size=128,
                  chunk_size=256, expand=2)
    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers)
    if family == 'mamba':
        return MambaConfig(state_size=16, **common)
    if family == 'falcon_mamba':
        return transformers.FalconMambaConfig(state_size=16, **common)
    if family == 'mamba2':
        return transformers.Mamba2Config(**mamba2, **common)
    # the delta-rule hybrids: three delta-rule layers to one attention layer, Qwen3-Next's proportions (heads of 128,
    # twice as many value heads as key heads); Kimi: one head size, a dense MLP in every layer
    # (the last layer attention at any depth: OLMo-Hybrid needs one)
    layer_types = ['full_attention' if layer % 4 == 3 or layer == num_hidden_layers - 1 else 'linear_attention'
                   for layer in range(num_hidden_layers)]
    common.update(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # within any vocabulary
    if family == 'olmo_hybrid':
        return transformers.OlmoHybridConfig(
            intermediate_size=2 * hidden_size, num_attention_heads=hidden_size // head_dim,
            num_key_value_heads=hidden_size // head_dim, layer_types=layer_types,
            linear_num_key_heads=max(1, hidden_size // 256), linear_num_value_heads=max(2, hidden_size // 128),
            linear_key_head_dim=min(128, hidden_size), linear_value_head_dim=min(128, hidden_size), **common)
    if family == 'kimi_linear':
        return transformers.KimiLinearConfig(
            intermediate_size=2 * hidden_size, num_attention_heads=hidden_size // head_dim,
            num_key_value_heads=hidden_size // head_dim, kv_lora_rank=hidden_size // 2, qk_rope_head_dim=head_dim // 2,
            qk_nope_head_dim=head_dim, v_head_dim=head_dim, layer_types=layer_types,
            mlp_layer_types=['dense'] * num_hidden_layers, linear_num_heads=max(1, hidden_size // 128),
            linear_head_dim=min(128, hidden_size), **common)
    return transformers.BambaConfig(
        intermediate_size=2 * hidden_size, attn_layer_indices=[num_hidden_layers - 1],
        num_attention_heads=hidden_size // head_dim, num_key_value_heads=hidden_size // head_dim,
        mamba_n_heads=mamba2['num_heads'], mamba_d_head=head_dim, mamba_n_groups=1, mamba_d_state=128,
        mamba_chunk_size=256, mamba_expand=2, **common)


#: real-size configurations (``--configs``), explained in bfloat16 with random weights: the published models'
#: layouts (their config.json: widths, depths, heads, state and vocabulary sizes, Bamba's attention layers) and
#: parameter counts (2.77, 7.27, 7.29 and 9.78 billion; OLMo-Hybrid 7B 7.43)
REAL_SIZES = {
    'mamba-2.8b': lambda: MambaConfig(hidden_size=2560, num_hidden_layers=64, state_size=16, vocab_size=50280),
    'falcon-mamba-7b': lambda: transformers.FalconMambaConfig(
        hidden_size=4096, num_hidden_layers=64, state_size=16, expand=2, time_step_rank=256, vocab_size=65024,
        tie_word_embeddings=False),
    'codestral-mamba-7b': lambda: transformers.Mamba2Config(
        hidden_size=4096, num_hidden_layers=64, num_heads=128, head_dim=64, n_groups=8, state_size=128, expand=2,
        chunk_size=256, vocab_size=32768),
    'bamba-9b': lambda: transformers.BambaConfig(
        hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
        num_key_value_heads=8, attn_layer_indices=[9, 18, 27], mamba_n_heads=128, mamba_d_head=64, mamba_n_groups=1,
        mamba_d_state=128, mamba_chunk_size=256, mamba_expand=2, vocab_size=128256),
    # transformers' defaults are the published OLMo-Hybrid 7B layout (width 3840, 32 layers, every 4th attention)
    'olmo-hybrid-7b': lambda: transformers.OlmoHybridConfig(),
}


def mamba3_model(device: str, vocab_size: int, hidden_size: int, num_hidden_layers: int) -> torch.nn.Module:
    '''A language model of Mamba-3 blocks (Mamba-3's 130M-size layout on a GPU: state 128, heads of 64, rotation of
    half the state), float32: on a GPU with mamba-ssm, its ``Mamba3`` (Triton kernels); else the plain-PyTorch copy.'''
    from zennit_mamba.families.mamba3 import Mamba3LMHeadModel

    mixer_class = None
    if device == 'cuda':
        try:
            from mamba_ssm.modules.mamba3 import Mamba3 as mixer_class
        except ImportError:
            pass
    head_dim = min(64, hidden_size // 2)
    model = Mamba3LMHeadModel(d_model=hidden_size, n_layer=num_hidden_layers, vocab_size=vocab_size,
                              mixer_class=mixer_class, d_state=min(128, hidden_size), headdim=head_dim, chunk_size=64)
    return model.to(device).eval()


def layout(model: torch.nn.Module) -> Tuple[int, torch.dtype, int]:
    '''The width and dtype of a model's input embeddings, and its number of layers.'''
    weight = model.get_input_embeddings().weight
    layers = model.config.num_hidden_layers if hasattr(model, 'config') else len(model.backbone.layers)
    return weight.shape[-1], weight.dtype, layers


def time_flas_gated_backward_on_old_triton() -> Optional[str]:
    '''flash-linear-attention 0.6 refuses its gated backward (``chunk_bwd_dqkwg``) on Hopper GPUs with Triton 3.4 to
    3.7.0, which miscompiles it (fla issue #640), so gradient x input of an unmodified Gated DeltaNet model cannot
    run there. Its time is what ``gi`` compares against, not its values: the refusal is lifted for this process and
    the returned note says so (None where nothing was lifted).'''
    try:
        from fla.ops.common import chunk_o
    except ImportError:
        return None
    if not (chunk_o.IS_NVIDIA_HOPPER and chunk_o.TRITON_ABOVE_3_4_0 and not chunk_o.TRITON_ABOVE_3_7_1):
        return None
    chunk_o.TRITON_ABOVE_3_7_1 = True
    import triton
    return (f'gi of the delta-rule models ran flash-linear-attention\'s gated backward, which fla refuses with '
            f'Triton {triton.__version__} on Hopper (it computes wrong gradients there, fla #640): timed only, its '
            f'values unused')


def build_model(device: str, quick: bool, family: str = 'mamba') -> torch.nn.Module:
    '''The family's causal LM with random weights, float32, convolution biases zeroed (so relevance is
    conserved); or a real-size configuration of :py:data:`REAL_SIZES` in bfloat16, built on ``device``.'''
    torch.manual_seed(0)
    if family in REAL_SIZES:
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # a 7B model's weights initialised in float32 would take 28 GB
        try:
            with torch.device(device):
                model = transformers.AutoModelForCausalLM.from_config(REAL_SIZES[family]()).eval()
        finally:
            torch.set_default_dtype(default)
    else:
        size = dict(hidden_size=64, num_hidden_layers=2) if quick else SIZES[device]
        vocab_size = 50280 if device == 'cuda' else 1000
        if family == 'mamba3':
            model = mamba3_model(device, vocab_size, **size)
        else:
            model = transformers.AutoModelForCausalLM.from_config(_config(family, vocab_size, **size)).to(device).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv1d) and module.bias is not None:
                module.bias.zero_()
    return model


def explained_logit(model, embeddings: torch.Tensor, **kwargs) -> torch.Tensor:
    if not isinstance(model, transformers.PreTrainedModel):  # Mamba3LMHeadModel: logits at every position
        return model(inputs_embeds=embeddings, **kwargs)[:, -1, TARGET]
    logits = model(inputs_embeds=embeddings, use_cache=False, logits_to_keep=1, **kwargs).logits
    return logits[:, -1, TARGET]


def gradient_x_input(model, embeddings: torch.Tensor) -> torch.Tensor:
    embeddings = embeddings.detach().requires_grad_()
    gradient, = torch.autograd.grad(explained_logit(model, embeddings).sum(), embeddings)
    return gradient * embeddings


def relevance_through(modified, embeddings: torch.Tensor) -> torch.Tensor:
    '''Relevance of the explained logit through a model a composite is registered on.'''
    embeddings = embeddings.detach().requires_grad_()
    logit = explained_logit(modified, embeddings)
    relevance, = torch.autograd.grad(logit, embeddings, logit.detach())
    return relevance


def with_composite(composite: MambaComposite) -> Callable:
    def explain(model, embeddings: torch.Tensor) -> torch.Tensor:
        with composite.context(model) as modified:
            return relevance_through(modified, embeddings)
    return explain


def lrp_captum(model, embeddings: torch.Tensor) -> torch.Tensor:
    return MambaLRP(model).attribute(embeddings, target=TARGET)


def lrp_captum_held(model, embeddings: torch.Tensor) -> torch.Tensor:
    explainer = MambaLRP(model)
    with explainer.registered():
        for _ in range(HELD_CALLS):
            relevance = explainer.attribute(embeddings, target=TARGET)
    return relevance


lrp_captum_held.explanations = HELD_CALLS


def integrated_gradients(model, embeddings: torch.Tensor) -> torch.Tensor:
    forward = lambda inputs: explained_logit(model, inputs)  # noqa: E731
    return IntegratedGradients(forward).attribute(embeddings, n_steps=50, internal_batch_size=len(embeddings))


def sequential(model, embeddings: torch.Tensor) -> torch.Tensor:
    return reference_relevance(model, embeddings, torch.full((len(embeddings),), TARGET))[0]


def method_table(family: str = 'mamba') -> Dict[str, Callable]:
    methods = {
        'gi': gradient_x_input,
        'gi_same_kernels': with_composite(MambaComposite(rules=())),
        'lrp_zennit': with_composite(MambaComposite()),
        'lrp_captum': lrp_captum,
        'lrp_captum_held': lrp_captum_held,
        'ig50': integrated_gradients,
        'sequential': sequential,
    }
    if family not in REFERENCE_FAMILIES:
        del methods['sequential']
    return methods


def _synchronize(device: str) -> None:
    if device == 'cuda':
        torch.cuda.synchronize()


def _libc():
    try:
        return ctypes.CDLL('libc.so.6')
    except OSError:
        return None


def cpu_allocations_returned(returned: bool) -> None:
    '''With ``returned``, freed tensors go back to the OS at once (glibc), so that a call's resident peak is its
    own. Without, for timings, glibc's mapping threshold is 32 MiB, the most a default process raises it to: larger
    blocks are fresh mappings (a page fault per 4 KiB on first touch), smaller ones come from the heap, whose memory
    freed at its top still goes back to the system above the trim threshold (128 KiB here; a default process raises
    it with the mapping threshold), so some of them fault again too.'''
    libc = _libc()
    if libc is not None:
        libc.mallopt(-3, 1 << 17 if returned else 1 << 25)  # M_MMAP_THRESHOLD


def _resident_kib(field: str) -> Optional[int]:
    try:
        with open('/proc/self/status') as status:
            for line in status:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def measure(function: Callable, device: str, memory: bool = True) -> Dict[str, float]:
    '''Seconds and peak added memory (MiB) of one call; on the CPU, ``memory`` makes freed memory go back to the
    OS at once, which slows the call down, so times and memory come from separate calls there.'''
    if device == 'cpu':
        cpu_allocations_returned(memory)
    if device == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        libc = _libc()
        if libc is not None:
            libc.malloc_trim(0)
        try:
            with open('/proc/self/clear_refs', 'w') as clear_refs:
                clear_refs.write('5')  # reset the peak resident set size
        except OSError:
            pass
        before = _resident_kib('VmRSS:')
    start = time.perf_counter()
    function()
    _synchronize(device)
    seconds = time.perf_counter() - start
    if device == 'cuda':
        peak = (torch.cuda.max_memory_allocated() - before) / 2 ** 20
    else:
        high_water = _resident_kib('VmHWM:')
        peak = float('nan') if not memory or before is None or high_water is None else (high_water - before) / 2 ** 10
    return {'seconds': seconds, 'memory': peak}


def run_size(model, methods: Dict[str, Callable], device: str, length: int, batch: int, repeats: int,
             estimates: Dict[str, float], budget: float) -> Dict[str, dict]:
    '''Medians over repeats of every method that fits the budget, measured in turn.'''
    generator = torch.Generator().manual_seed(length + batch)
    hidden_size, dtype, _ = layout(model)
    embeddings = (torch.randn(batch, length, hidden_size, generator=generator) * 0.5).to(device, dtype)
    chosen = {name: method for name, method in methods.items() if estimates.get(name, 0.0) <= budget}
    # a method too slow for warm-up and repeats within the budget runs once
    once = {name for name in chosen if estimates.get(name, 0.0) * (repeats + 1) > budget}
    samples = {name: [] for name in chosen}
    # seconds per explanation of each method in each measured round, for the paired ratios
    rounds: List[Dict[str, float]] = [{} for _ in range(repeats)]
    failed, peaks = set(), {}
    for name, method in chosen.items():
        if name not in estimates:
            # no estimate yet (the first size): one timed call tells whether repeats fit the budget; on a GPU after
            # an untimed one, which compiles and autotunes Triton kernels (mamba-ssm's SSD: 90 s on an H200)
            try:
                if device == 'cuda':
                    method(model, embeddings)
                probe = measure(lambda: method(model, embeddings), device, memory=False)
            except torch.OutOfMemoryError:
                failed.add(name)
                continue
            if probe['seconds'] * (repeats + 1) > budget:
                once.add(name)
                samples[name].append(probe)
    for repeat in range(repeats + 1):
        for name, method in chosen.items():
            if name in once and (repeat > 0 or samples[name]):
                continue
            if name in failed:
                continue
            try:
                # the warm-up round measures memory; a method run once is timed and its CPU memory not measured
                result = measure(lambda: method(model, embeddings), device, memory=repeat == 0 and name not in once)
            except torch.OutOfMemoryError:
                failed.add(name)
            if name in failed:
                # outside the except block: the exception no longer holds the failed call's tensors
                torch.cuda.empty_cache()
                continue
            if repeat == 0:
                peaks[name] = result['memory']
            if repeat > 0 or name in once:  # the first round warms up
                samples[name].append(result)
            if repeat > 0 and name not in once:
                rounds[repeat - 1][name] = result['seconds'] / getattr(method, 'explanations', 1)
    rows = {}
    for name in methods:
        if name not in chosen:
            estimate = estimates[name]
            rows[name] = {'skipped': 'out of memory before' if estimate == float('inf') else f'est. {estimate:.0f} s'}
            continue
        if name in failed:
            rows[name] = {'skipped': 'out of memory'}
            continue
        seconds = statistics.median(sample['seconds'] for sample in samples[name])
        memory = peaks.get(name, float('nan')) if device == 'cpu' else statistics.median(
            sample['memory'] for sample in samples[name])
        # per explanation; the estimates for the next size are per call
        explanations = getattr(methods[name], 'explanations', 1)
        rows[name] = {'seconds': seconds / explanations, 'call_seconds': seconds, 'memory': memory,
                      'once': name in once,
                      'paired': {base: paired_ratio(rounds, name, base) for base in ('gi', 'gi_same_kernels')}}
    return rows


def paired_ratio(rounds: List[Dict[str, float]], name: str, base: str) -> Optional[Tuple[float, float, float]]:
    '''Lower quartile, median and upper quartile over the rounds of ``name``'s time divided by ``base``'s time in
    the same round, or None where no round measured both.

    Examples
    --------
    >>> rounds = [{'gi': 1.0, 'lrp': 0.5}, {'gi': 4.0, 'lrp': 2.0}, {'gi': 1.0, 'lrp': 2.0}]
    >>> paired_ratio(rounds, 'lrp', 'gi')  # the ratio of the medians would be 2.0
    (0.5, 0.5, 1.25)
    '''
    ratios = sorted(round_[name] / round_[base] for round_ in rounds
                    if name in round_ and base in round_ and round_[base] > 0)
    if not ratios:
        return None
    if len(ratios) == 1:
        return ratios[0], ratios[0], ratios[0]
    lower, _, upper = statistics.quantiles(ratios, n=4, method='inclusive')
    return lower, statistics.median(ratios), upper


def next_estimates(rows: Dict[str, dict], estimates: Dict[str, float], factor: float, device: str) -> Dict[str, float]:
    '''Estimated seconds at a size ``factor`` times larger (work), from the last measurement.'''
    updated = {}
    for name, row in rows.items():
        if row.get('skipped') == 'out of memory':
            updated[name] = float('inf')
            continue
        last = row.get('call_seconds', estimates.get(name, 0.0))
        updated[name] = last * factor ** GROWTH[device].get(name, 1.0)
    return updated


def ratio(rows: Dict[str, dict], name: str, base: str, key: str = 'seconds') -> Optional[float]:
    if key not in rows.get(name, {}) or key not in rows.get(base, {}) or not rows[base][key] > 0:
        return None
    return rows[name][key] / rows[base][key]


def long_input(model, device: str, length: int) -> dict:
    '''MambaLRP with recomputation on one long input: seconds, peak memory and conservation error.'''
    generator = torch.Generator().manual_seed(length)
    embeddings = (torch.randn(1, length, layout(model)[0], generator=generator) * 0.5).to(device)
    outcome = {}

    def explain():
        inputs = embeddings.detach().requires_grad_()
        with MambaComposite(recompute=True).context(model) as modified:
            logit = explained_logit(modified, inputs)
            relevance, = torch.autograd.grad(logit, inputs, logit.detach())
        outcome['error'] = ((relevance.sum() - logit.sum()).abs() / logit.abs().sum()).item()

    outcome.update(measure(explain, device))
    return outcome


def fmt(value: Optional[float], digits: int = 2) -> str:
    return '-' if value is None or value != value else f'{value:.{digits}f}'


def _median(paired: Optional[Tuple[float, float, float]]) -> Optional[float]:
    return None if paired is None else paired[1]


def fmt_paired(paired: Optional[Tuple[float, float, float]]) -> str:
    return '-' if paired is None else f'{paired[1]:.2f} [{paired[0]:.2f}, {paired[2]:.2f}]'


def report(results: List[dict], device: str, long_results: List[dict], description: str) -> str:
    lines = [f'# MambaLRP speed, {description}', '',
             'Seconds per explanation (median; "1 run": too slow for repeats, measured once, its first call; '
             f'lrp_captum_held: a call of {HELD_CALLS} explanations in one registration, divided by them), and ratios '
             'of time and peak memory to gradient x input on the unmodified model (a) and on the canonized model '
             'with the same kernels (b); "paired": the median over the runs of the time ratio within a run, with '
             'its quartiles. "n/a": not measured in this run, or no sequential reference for the family.', '',
             '| family | L | batch | method | seconds | time / (a) | time / (b) | paired time / (a) [quartiles] | '
             'paired time / (b) | peak MiB | memory / (a) | memory / (b) |',
             '|---|---|---|---|---|---|---|---|---|---|---|---|']
    for result in results:
        rows, size = result['rows'], f"| {result['family']} | {result['length']} | {result['batch']}"
        for name in METHODS:
            row = rows.get(name, {'skipped': 'n/a'})
            if 'skipped' in row:
                reason = row['skipped'] if row['skipped'] == 'n/a' else f"skipped ({row['skipped']})"
                lines.append(f'{size} | {name} | {reason} | | | | | | | |')
                continue
            runs = ' (1 run)' if row['once'] else ''
            lines.append(
                f"{size} | {name} | {row['seconds']:.4f}{runs} "
                f"| {fmt(ratio(rows, name, 'gi'))} | {fmt(ratio(rows, name, 'gi_same_kernels'))} "
                f"| {fmt_paired(row['paired']['gi'])} | {fmt(_median(row['paired']['gi_same_kernels']))} "
                f"| {fmt(row['memory'], 1)} | {fmt(ratio(rows, name, 'gi', 'memory'))} "
                f"| {fmt(ratio(rows, name, 'gi_same_kernels', 'memory'))} |"
            )
    lines += ['', '## Checks', '']
    lines += checks(results)
    for long_result in long_results:
        lines += ['', f"Long input ({long_result['family']}): {long_result['length']} tokens, batch 1, "
                      f"recompute=True: {long_result['seconds']:.2f} s, peak {long_result['memory'] / 1024:.2f} GiB "
                      f"added, relative conservation error {long_result['error']:.1e}"]
    return '\n'.join(lines) + '\n'


def checks(results: List[dict]) -> List[str]:
    lines = []
    for result in results:
        rows, size = result['rows'], f"{result['family']}, L={result['length']}, batch {result['batch']}"
        lines.append(
            f"- {size}: MambaLRP / same-kernel GI = {fmt(ratio(rows, 'lrp_zennit', 'gi_same_kernels'))} time, "
            f"{fmt(ratio(rows, 'lrp_zennit', 'gi_same_kernels', 'memory'))} memory; "
            f"MambaLRP / unmodified GI = {fmt(ratio(rows, 'lrp_zennit', 'gi'))} "
            f"(paired {fmt_paired(rows.get('lrp_zennit', {}).get('paired', {}).get('gi'))}); "
            f"IG-50 / MambaLRP = {fmt(ratio(rows, 'ig50', 'lrp_zennit'))}"
            + (f"; sequential reference / MambaLRP = {fmt(ratio(rows, 'sequential', 'lrp_zennit'))}"
               if 'sequential' in rows else '')
        )
    by_size = {(result['family'], result['length'], result['batch']): result['rows'] for result in results}
    for family, batch in sorted({(result['family'], result['batch']) for result in results}):
        if (family, 1024, batch) in by_size and (family, 8192, batch) in by_size:
            pair = {'long': by_size[(family, 8192, batch)].get('lrp_zennit', {}),
                    'short': by_size[(family, 1024, batch)].get('lrp_zennit', {})}
            scaling = ratio(pair, 'long', 'short')
            lines.append(f'- scaling, {family}, batch {batch}: MambaLRP time(8192) / time(1024) = {fmt(scaling)}')
    return lines


def write_csv(results: List[dict], path: str) -> None:
    with open(path, 'w', newline='') as handle:
        writer = csv.writer(handle)
        writer.writerow(['family', 'length', 'batch', 'method', 'seconds', 'peak_mib', 'time_vs_gi',
                         'time_vs_same_kernels', 'memory_vs_gi', 'memory_vs_same_kernels', 'skipped',
                         'paired_time_vs_gi', 'paired_time_vs_gi_q1', 'paired_time_vs_gi_q3',
                         'paired_time_vs_same_kernels'])
        for result in results:
            rows = result['rows']
            for name in METHODS:
                row = rows.get(name, {'skipped': 'n/a'})
                paired = row.get('paired', {})
                versus_gi, versus_same = paired.get('gi') or ('', '', ''), paired.get('gi_same_kernels')
                writer.writerow([result['family'], result['length'], result['batch'], name, row.get('seconds', ''),
                                 row.get('memory', ''), ratio(rows, name, 'gi') or '',
                                 ratio(rows, name, 'gi_same_kernels') or '', ratio(rows, name, 'gi', 'memory') or '',
                                 ratio(rows, name, 'gi_same_kernels', 'memory') or '', row.get('skipped', ''),
                                 versus_gi[1], versus_gi[0], versus_gi[2],
                                 '' if versus_same is None else versus_same[1]])


def main(argv: Optional[List[str]] = None) -> List[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--device', default='cpu', choices=('cpu', 'cuda'))
    parser.add_argument('--lengths', type=int, nargs='+', default=[128, 1024, 8192])
    parser.add_argument('--batches', type=int, nargs='+', help='batch sizes (default 1 and 8; quick: 1 and 2)')
    parser.add_argument('--repeats', type=int, default=3, help='timed rounds per case, methods interleaved (default 3)')
    parser.add_argument('--budget', type=float, default=60.0, help='skip a method estimated to take longer (s)')
    parser.add_argument('--long', type=int, default=0, help='also explain one input of this many tokens')
    parser.add_argument('--families', nargs='+', default=None, choices=FAMILIES,
                        help='families at the device\'s size, float32 (default: mamba, unless --configs)')
    parser.add_argument('--configs', nargs='+', default=[], choices=sorted(REAL_SIZES),
                        help='real-size configurations, bfloat16, random weights (a GPU\'s worth of memory)')
    parser.add_argument('--methods', nargs='+', default=list(METHODS), choices=METHODS,
                        help='the methods to measure (gi_same_kernels, ratio (b), is always measured, unless '
                             '--without-same-kernels)')
    parser.add_argument('--without-same-kernels', action='store_true',
                        help='leave out ratio (b): on the delta-rule hybrids and Mamba-3 the canonized model with '
                             'every rule off runs PyTorch autograd through their scans, 2.4 to 9.2 times (a) on an '
                             'H100, which at 8,192 x 8 takes most of a run')
    parser.add_argument('--quick', action='store_true', help='tiny model, short inputs, one repeat')
    parser.add_argument('--out', default=os.path.join(ROOT, 'benchmarks', 'output'),
                        help='directory the tables are written to (default: benchmarks/output)')
    args = parser.parse_args(argv)
    if args.quick:
        args.lengths, args.repeats = [16, 64], 1
    args.batches = args.batches or ([1, 2] if args.quick else [1, 8])
    transformers_logging.set_verbosity_error()
    os.makedirs(args.out, exist_ok=True)

    args.families = args.families if args.families is not None else ([] if args.configs else ['mamba'])
    results, long_results, sizes, notes = [], [], [], []
    for family in args.families + args.configs:
        if args.device == 'cuda' and family in DELTA_RULE_FAMILIES and 'gi' in args.methods:
            note = time_flas_gated_backward_on_old_triton()
            notes += [note] if note and note not in notes else []
        model = build_model(args.device, args.quick, family)
        hidden_size, dtype, layers = layout(model)
        sizes.append(f'{family} ({layers} layers, d_model {hidden_size}, '
                     f'{str(dtype).replace("torch.", "")})')
        measured = set(args.methods) | {'gi_same_kernels'}
        measured -= {'gi_same_kernels'} if args.without_same_kernels else set()
        methods = {name: method for name, method in method_table(family).items() if name in measured}
        for batch in args.batches:
            estimates, previous = {}, None
            for length in sorted(args.lengths):
                if previous is not None:
                    estimates = next_estimates(results[-1]['rows'], estimates, length / previous, args.device)
                rows = run_size(model, methods, args.device, length, batch, args.repeats, estimates, args.budget)
                results.append({'family': family, 'length': length, 'batch': batch, 'rows': rows})
                previous = length
                timings = (f"{name} {row['seconds']:.3f}s" if 'seconds' in row else f'{name} skipped'
                           for name, row in rows.items())
                print(f'{family} L={length} batch={batch}: ' + ', '.join(timings), flush=True)
                # written after every size, so that a run cut short (a device's time limit) keeps what it measured
                write_tables(results, long_results, sizes, notes, args)
        if args.long:
            long_results.append(dict(family=family, length=args.long, **long_input(model, args.device, args.long)))
            print(f'long input: {long_results[-1]}', flush=True)
        del model
        if args.device == 'cuda':
            torch.cuda.empty_cache()
    print(write_tables(results, long_results, sizes, notes, args))
    return results


def write_tables(results: List[dict], long_results: List[dict], sizes: List[str], notes: List[str],
                 args: argparse.Namespace) -> str:
    '''Writes ``speed_<device>.md`` and ``speed_<device>.csv`` to ``args.out`` and returns the markdown.'''
    description = (f'{args.device}, ' + ', '.join(sizes) + f', {torch.get_num_threads()} threads'
                   + (f', {torch.cuda.get_device_name()}' if args.device == 'cuda' else ''))
    text = report(results, args.device, long_results, description) + ''.join(f'\nNote: {note}\n' for note in notes)
    with open(os.path.join(args.out, f'speed_{args.device}.md'), 'w') as handle:
        handle.write(text)
    write_csv(results, os.path.join(args.out, f'speed_{args.device}.csv'))
    return text


if __name__ == '__main__':
    main()
