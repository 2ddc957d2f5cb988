'''Mamba-1: the canonical mixer computation with the MambaLRP rules, and the canonized forwards of transformers'
``MambaMixer``, ``FalconMambaMixer``, ``JambaMambaMixer`` and mamba-ssm's ``Mamba`` (mamba_simple).

Every operation on the relevance path runs through the mixer's own ``in_proj``, ``conv1d`` and ``out_proj`` (so
that Zennit rules such as Gamma can attach to them) or through the :py:class:`~zennit_mamba.core.ruleset.RuleSet` the
canonizer bound: the SiLUs, the scan with its selection, the gate. transformers' own forward calls functional kernels
and ``dt_proj.weight`` directly instead. On a CPU, long inputs run through the mixer in time blocks
(:py:data:`~zennit_mamba.mixers.io.CPU_TIME_BLOCK`), so that its projections and convolution are called once per
block.
'''
import contextlib
import functools
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from zennit_mamba.core.family import Canonized
from zennit_mamba.kernels import fused as fused_branch
from zennit_mamba.core.layers import has_submodules
from zennit_mamba.mixers.io import (
    MixerOutput, call_read_module, mask_padding, over_time_blocks, run_mixer, with_mamba_ssm_cache,
    with_transformers_cache,
)


def mamba1_mixer(
    rules,
    mixer: torch.nn.Module,
    hidden_states: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    time_step_rank: int,
    state_size: int,
    blocks_allowed: bool = False,
) -> MixerOutput:
    '''Run a Mamba-1 mixer on ``(batch, length, hidden)`` normalised hidden states under ``rules``; where
    ``blocks_allowed``, on a CPU, over time blocks of :py:data:`~zennit_mamba.mixers.io.CPU_TIME_BLOCK` positions (the
    same values and relevance as at once).

    Parameters
    ----------
    rules : :py:class:`~zennit_mamba.core.ruleset.RuleSet`
        The rules that are on.
    mixer : :py:obj:`torch.nn.Module`
        The mixer, whose projections, ``A_log`` and ``D`` are used.
    hidden_states : :py:obj:`torch.Tensor`
        Normalised hidden states of shape ``(batch, length, hidden)``.
    attention_mask : :py:obj:`torch.Tensor`, optional
        ``(batch, length)`` mask; padded positions are zeroed before ``in_proj`` and after the convolution.
    time_step_rank, state_size : int
        Split sizes of the ``x_proj`` output: ``dt``, ``B`` and ``C``.
    blocks_allowed : bool, optional
        Whether the mixer may run over time blocks (where :py:func:`~zennit_mamba.mixers.io.runs_in_time_blocks`:
        on a CPU, for inputs longer than one block, with the standard scan, no hook inside the mixer); then the
        returned convolution input is the last block's only, so a cache that keeps more than its last positions must
        not ask for blocks.

    Returns
    -------
    MixerOutput
        The mixer output, the (detached) input of the convolution and the (detached) last scan state, for caches.
    '''
    block = functools.partial(_mixer_block, rules, mixer, time_step_rank, state_size)
    return over_time_blocks(rules, mixer, block, hidden_states, attention_mask, blocks_allowed)


def _mixer_block(rules, mixer: torch.nn.Module, time_step_rank: int, state_size: int, hidden_states: torch.Tensor,
                 attention_mask: Optional[torch.Tensor], initial_state: Optional[torch.Tensor],
                 context: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    '''The mixer on consecutive positions (a :py:data:`~zennit_mamba.mixers.io.MixerBlock`): the output, the input of
    the convolution and the scan's last state (both with gradients).'''
    dtype = hidden_states.dtype
    projected = mixer.in_proj(mask_padding(hidden_states, attention_mask)).transpose(1, 2)
    x, gate = projected.chunk(2, dim=1)
    # FalconMamba and Jamba normalise the selection
    normalisers = ((mixer.dt_layernorm, mixer.b_layernorm, mixer.c_layernorm)
                   if has_submodules(mixer, ('dt_layernorm',)) else None)
    gated, last_state = selective_branch(
        rules, x, gate[..., context:],
        SelectiveParts(mixer.conv1d, mixer.x_proj, mixer.dt_proj, mixer.A_log, mixer.D, normalisers,
                       called_by_original=False),
        time_step_rank, state_size, dtype, None if attention_mask is None else attention_mask[:, context:],
        initial_state, context,
    )
    return mixer.out_proj(gated.transpose(1, 2).to(dtype)), x, last_state


class SelectiveParts(NamedTuple):
    '''The modules and parameters of one selective-scan branch of a Mamba-1 mixer (Vim's backward direction has
    its own).'''
    conv1d: torch.nn.Conv1d
    x_proj: torch.nn.Linear
    dt_proj: torch.nn.Linear
    A_log: torch.Tensor
    D: torch.Tensor
    normalisers: Optional[Tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]] = None
    #: whether the original forward calls ``conv1d`` and ``dt_proj`` (Vim's does); where not (transformers',
    #: mamba-ssm's read their weights), a hook that changes their output is refused
    #: (:py:func:`~zennit_mamba.mixers.io.call_read_module`)
    called_by_original: bool = True


def selective_branch(
    rules,
    x: torch.Tensor,
    gate: torch.Tensor,
    parts: SelectiveParts,
    time_step_rank: int,
    state_size: int,
    dtype: torch.dtype,
    attention_mask: Optional[torch.Tensor] = None,
    initial_state: Optional[torch.Tensor] = None,
    context: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    '''Convolution, SiLU, selection, scan and gate of one Mamba-1 branch under ``rules``.

    ``x`` and ``gate`` are the two halves of ``in_proj``'s output, ``(batch, channels, length)``, except that ``x``
    starts with ``context`` positions before those of ``gate``, which only the convolution reads (a time block's left
    context); the scan starts from ``initial_state`` where given. Returns the gated scan output
    ``(batch, channels, length)`` and the scan's last state.
    '''
    length = gate.shape[-1]
    # the causal convolution's outputs at the positions after the context
    call = (lambda module, input: module(input)) if parts.called_by_original else call_read_module
    conv = call(parts.conv1d, x.to(parts.conv1d.weight.dtype))[..., context:context + length]
    # with all three rules on: one fused function, the selection computed without a graph (it is constant); with
    # padding the masked scan input is not silu(conv), so the rule set's operations run in turn
    fused = (rules.fuses_branch() and attention_mask is None and initial_state is None
             and fused_branch.applies(conv))
    with torch.no_grad() if fused else contextlib.nullcontext():
        x = (F.silu(conv) if fused else rules.activation('silu', conv)).to(dtype)
        x = mask_padding(x.transpose(1, 2), attention_mask)
        time_step, B, C = torch.split(parts.x_proj(x), [time_step_rank, state_size, state_size], dim=-1)
        if parts.normalisers is not None:
            # behind the SSM rule the selection's normalisation takes no relevance
            time_step, B, C = (norm(value) for norm, value in zip(parts.normalisers, (time_step, B, C)))
        delta = F.softplus(call(parts.dt_proj, time_step))

    A, D = -torch.exp(parts.A_log.float()), parts.D.float()
    if fused:
        return fused_branch.SiLUScanGate.apply(conv, x.transpose(1, 2), gate, delta.transpose(1, 2), A,
                                               B.transpose(1, 2), C.transpose(1, 2), D)
    selection = (delta.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), D)
    # the state only where a time block continues: a rule set that changes the scan sees no blocks, so one written
    # for the signature without it keeps working
    if initial_state is None:
        scanned, last_state = rules.scan(x.transpose(1, 2), *selection)
    else:
        scanned, last_state = rules.scan(x.transpose(1, 2), *selection, initial_state=initial_state)
    gate = rules.activation('silu', gate)
    return rules.output_gate(scanned.to(torch.promote_types(scanned.dtype, gate.dtype)), gate), last_state


def transformers_forward(
    rules,
    self,
    hidden_states: torch.Tensor,
    cache=None,
    attention_mask: Optional[torch.Tensor] = None,
    **kwargs,
) -> torch.Tensor:
    '''Forward of a canonized transformers Mamba-1 mixer; fills a fresh cache as the original does.'''
    def run() -> MixerOutput:
        # time blocks only without a cache: a cache recording the past keeps the whole convolution input
        return run_mixer(rules, mamba1_mixer, self, hidden_states, attention_mask, self.time_step_rank,
                         self.ssm_state_size, cache is None)

    return with_transformers_cache(self, cache, kwargs, run, hidden_states.dtype)


def mamba_ssm_forward(rules, self, hidden_states: torch.Tensor, inference_params=None) -> torch.Tensor:
    '''Forward of a canonized ``mamba_ssm.modules.mamba_simple.Mamba``; fills a fresh cache as the original does.'''
    def run() -> MixerOutput:
        return run_mixer(rules, mamba1_mixer, self, hidden_states, None, self.dt_rank, self.d_state)

    return with_mamba_ssm_cache(self, inference_params, hidden_states.shape[0], run)


#: transformers' Mamba-1 mixers (Mamba, FalconMamba, Jamba): their forward reads ``conv1d``'s and ``dt_proj``'s
#: weights without calling them; ``x_proj`` and ``dt_proj`` compute the selection
TRANSFORMERS_MIXER = Canonized(transformers_forward, uncalled=('conv1d', 'dt_proj'), selection=('x_proj', 'dt_proj'))
#: mamba-ssm's ``Mamba`` (mamba_simple), likewise
MAMBA_SSM_MIXER = Canonized(mamba_ssm_forward, uncalled=('conv1d', 'dt_proj'), selection=('x_proj', 'dt_proj'))
