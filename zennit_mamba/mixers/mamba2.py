'''Mamba-2: the canonical mixer computation with the MambaLRP rules, and the canonized forwards of transformers'
``Mamba2Mixer`` (and its copies in Bamba, NemotronH, GraniteMoeHybrid, FalconH1 and Zamba2) and mamba-ssm's
``Mamba2``.

A Mamba-2 mixer is ``in_proj -> conv1d -> core -> out_proj``. The projections run as the mixer's own modules (so that
Zennit rules such as Gamma can attach to them; on a GPU, a convolution with nothing attached to it runs as
:py:class:`~zennit_mamba.kernels.causal_conv.CausalConv`, the same result without transposing copies); the core holds
every nonlinear operation, computed through the :py:class:`~zennit_mamba.core.ruleset.RuleSet` the canonizer bound: the
activation after the convolution, the step sizes, the SSD scan with its selection, the gated RMS norm ``norm(y *
silu(gate))`` and, in mamba-ssm's variant with ``d_ssm < d_inner``, the gated MLP ``silu(z0) * x0`` beside the SSM. On a
CPU, long inputs run through the mixer in time blocks (:py:data:`~zennit_mamba.mixers.io.CPU_TIME_BLOCK`), as Mamba-1's
do. '''
import functools
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from zennit_mamba.core.family import Canonized
from zennit_mamba.core.instance import called_plainly
from zennit_mamba.kernels import causal_conv

from zennit_mamba.kernels import fused
from zennit_mamba.mixers.io import (
    MixerOutput, call_read_module, mask_padding, over_time_blocks, run_mixer, with_mamba_ssm_cache,
    with_transformers_cache,
)


class Mamba2Layout(NamedTuple):
    '''Sizes and settings of a Mamba-2 mixer, read once from either library's attribute names.'''
    heads: int
    head_dim: int
    groups: int
    state_size: int
    ssm_width: int
    mlp_width: int
    time_step_limit: Tuple[float, float]
    chunk_size: int
    activation: str

    @property
    def conv_width(self) -> int:
        return self.ssm_width + 2 * self.groups * self.state_size

    @property
    def projection_split(self) -> List[int]:
        '''Widths of ``in_proj``'s output: MLP gate, MLP input, gate, convolution input, step sizes.'''
        return [self.mlp_width, self.mlp_width, self.ssm_width, self.conv_width, self.heads]


def transformers_layout(mixer: torch.nn.Module) -> Mamba2Layout:
    '''The layout of transformers' ``Mamba2Mixer`` and the hybrids' copies of it.'''
    return Mamba2Layout(
        heads=mixer.num_heads, head_dim=mixer.head_dim, groups=mixer.n_groups, state_size=mixer.ssm_state_size,
        ssm_width=mixer.intermediate_size, mlp_width=0, time_step_limit=tuple(mixer.time_step_limit),
        chunk_size=mixer.chunk_size, activation=mixer.activation,
    )


def mamba_ssm_layout(mixer: torch.nn.Module) -> Mamba2Layout:
    '''The layout of mamba-ssm's ``Mamba2``.'''
    ssm_part = 2 * mixer.d_ssm + 2 * mixer.ngroups * mixer.d_state + mixer.nheads
    return Mamba2Layout(
        heads=mixer.nheads, head_dim=mixer.headdim, groups=mixer.ngroups, state_size=mixer.d_state,
        ssm_width=mixer.d_ssm, mlp_width=(mixer.in_proj.out_features - ssm_part) // 2,
        time_step_limit=tuple(mixer.dt_limit), chunk_size=mixer.chunk_size, activation=mixer.activation,
    )


def _gated_norm(rules, mixer: torch.nn.Module, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    '''``norm(y * silu(gate))`` (or ``norm(y) * silu(gate)``) with the gate, SiLU and LN rules.'''
    norm = getattr(mixer, 'norm', None)
    if not hasattr(norm, 'weight'):
        # without a gated norm (FalconH1's mamba_rms_norm=False, mamba-ssm's rmsnorm=False) the gate acts directly
        compute = torch.promote_types(y.dtype, torch.float32)
        return rules.output_gate(y.to(compute), rules.activation('silu', gate.to(compute))).to(y.dtype)
    before_gate = getattr(norm, 'norm_before_gate', False)
    group_size = getattr(norm, 'group_size', None) or y.shape[-1] // norm.n_groups
    # transformers' name, then mamba-ssm's
    epsilon = norm.variance_epsilon if hasattr(norm, 'variance_epsilon') else norm.eps
    if rules.fuses_gated_norm() and not before_gate:
        return fused.GatedRMSNorm.apply(y, gate, norm.weight, group_size, epsilon)
    return rules.gated_norm(y, gate, norm.weight, epsilon, group_size, before_gate)


def mamba2_core(
    rules, mixer: torch.nn.Module, layout: Mamba2Layout, gates: torch.Tensor, conv: torch.Tensor,
    time_step: torch.Tensor, attention_mask: Optional[torch.Tensor], initial_state: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    '''Everything of a Mamba-2 mixer between its projections, on ``gates = cat([mlp_gate, mlp_input, gate], -1)``,
    the convolution output ``conv`` (before its activation) and the step sizes before the softplus, each
    ``(batch, length, width)`` (widths ``layout.projection_split``): the input of ``out_proj`` and the last scan
    state (the scan continued from ``initial_state`` where given). (Passed apart, not concatenated: a concatenation
    would copy the projection forward and backward.)'''
    batch, length, _ = conv.shape
    heads, groups = layout.heads, layout.groups
    mlp_gate, mlp_input, gate = torch.split(gates, layout.projection_split[:3], dim=-1)

    conv = mask_padding(rules.activation(layout.activation, conv), attention_mask)
    x, B, C = torch.split(conv, [layout.ssm_width, groups * layout.state_size, groups * layout.state_size], dim=-1)
    delta = F.softplus(time_step + mixer.dt_bias.to(time_step.dtype))
    low, high = layout.time_step_limit
    if (low, high) != (0.0, float('inf')):
        delta = delta.clamp(low, high)

    inputs = (
        x.reshape(batch, length, heads, layout.head_dim),
        delta,
        -torch.exp(mixer.A_log.float()),
        B.reshape(batch, length, groups, -1),
        C.reshape(batch, length, groups, -1),
        # mamba-ssm's D_has_hdim keeps one skip weight per channel
        mixer.D if mixer.D.numel() == heads else mixer.D.reshape(heads, layout.head_dim),
    )
    # the state only where a time block continues: a rule set that changes the SSD sees no blocks, so one written
    # for the signature without it keeps working (as in Mamba-1's selective_branch)
    if initial_state is None:
        scanned, last_state = rules.ssd(*inputs, chunk_size=layout.chunk_size)
    else:
        scanned, last_state = rules.ssd(*inputs, chunk_size=layout.chunk_size, initial_state=initial_state)
    output = _gated_norm(rules, mixer, scanned.reshape(batch, length, -1), gate)
    if layout.mlp_width:
        activated = rules.activation('silu', mlp_gate.to(output.dtype))
        output = torch.cat([rules.gate(mlp_input.to(output.dtype), activated), output], dim=-1)
    return output, last_state


def mamba2_mixer(
    rules, mixer: torch.nn.Module, layout: Mamba2Layout, hidden_states: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None, blocks_allowed: bool = False,
) -> MixerOutput:
    '''Run a Mamba-2 mixer of ``layout`` on ``(batch, length, hidden)`` hidden states under ``rules``; returns the
    mixer output, the (detached) input of the convolution and the (detached) last scan state, for caches. Where
    ``blocks_allowed``, on a CPU, over time blocks (:py:func:`~zennit_mamba.mixers.io.runs_in_time_blocks`; the same
    values and relevance as at once): then the convolution input returned is the last block's only, so a cache that
    keeps more than its last positions must not allow blocks.'''
    block = functools.partial(_mixer_block, rules, mixer, layout)
    return over_time_blocks(rules, mixer, block, hidden_states, attention_mask, blocks_allowed)


def _mixer_block(rules, mixer: torch.nn.Module, layout: Mamba2Layout, hidden_states: torch.Tensor,
                 attention_mask: Optional[torch.Tensor], initial_state: Optional[torch.Tensor],
                 context: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    '''The mixer on consecutive positions (a :py:data:`~zennit_mamba.mixers.io.MixerBlock`): the output, the input of
    the convolution ``(batch, width, positions)`` and the scan's last state (both with gradients).'''
    hidden_states = mask_padding(hidden_states, attention_mask)
    if getattr(mixer, 'ssm_in_multiplier', None) is not None:
        hidden_states = hidden_states * mixer.ssm_in_multiplier
    projected = mixer.in_proj(hidden_states)
    if getattr(mixer, 'mup_vector', None) is not None:
        projected = projected * mixer.mup_vector
    split = layout.projection_split
    before, conv_input, time_step = torch.split(projected, [sum(split[:3]), split[3], split[4]], dim=-1)
    conv1d = mixer.conv1d
    # the kernel stands in for the module's call only where nothing observes that call
    if context == 0 and called_plainly(conv1d) and causal_conv.applies(conv1d, conv_input):
        # in the layout of the projection and the SSD, without transposing copies (a GPU without time blocks)
        conv = causal_conv.CausalConv.apply(conv_input.to(conv1d.weight.dtype), conv1d.weight, conv1d.bias)
        conv = conv.to(before.dtype)
    else:
        length = conv_input.shape[1] - context
        # the causal convolution's outputs at the positions after the context
        conv = call_read_module(conv1d, conv_input.transpose(1, 2).to(conv1d.weight.dtype))
        conv = conv[..., context:context + length]
        # (batch, length, width) with channels contiguous, as the scan's kernels read them
        conv = conv.transpose(1, 2).to(before.dtype).contiguous()
    conv_input = conv_input.transpose(1, 2)
    output, last_state = mamba2_core(
        rules, mixer, layout, before[:, context:], conv, time_step[:, context:],
        None if attention_mask is None else attention_mask[:, context:], initial_state)
    return mixer.out_proj(output.to(hidden_states.dtype)), conv_input, last_state


def transformers_forward(
    rules,
    self,
    hidden_states: torch.Tensor,
    cache=None,
    attention_mask: Optional[torch.Tensor] = None,
    **kwargs,
) -> torch.Tensor:
    '''Forward of a canonized transformers Mamba-2 mixer; fills a fresh cache as the original does.'''
    def run() -> MixerOutput:
        # time blocks only without a cache: a cache recording the past keeps the whole convolution input
        return run_mixer(rules, mamba2_mixer, self, transformers_layout(self), hidden_states, attention_mask,
                         cache is None)

    return with_transformers_cache(self, cache, kwargs, run, None)


def mamba_ssm_forward(
    rules, self, u: torch.Tensor, seqlen: Optional[int] = None, seq_idx=None, cu_seqlens=None, inference_params=None
) -> torch.Tensor:
    '''Forward of a canonized ``mamba_ssm.modules.mamba2.Mamba2``; fills a fresh cache as the original does.

    ``u`` is ``(batch, length, hidden)``, or ``(batch * length, hidden)`` with ``seqlen`` given.
    '''
    if seq_idx is not None or cu_seqlens is not None:
        raise ValueError(
            'MambaLRP explains one sequence per batch row; packed sequences (seq_idx, cu_seqlens) are not supported. '
            'Pass the sequences as separate (padded) rows of the batch.'
        )
    hidden_states = u if seqlen is None else u.unflatten(0, (-1, seqlen))

    def run() -> MixerOutput:
        return run_mixer(rules, mamba2_mixer, self, mamba_ssm_layout(self), hidden_states)

    output = with_mamba_ssm_cache(self, inference_params, hidden_states.shape[0], run)
    return output if seqlen is None else output.flatten(0, 1)


def _tensor_parallel(mixer: torch.nn.Module) -> Optional[str]:
    return None if getattr(mixer, 'process_group', None) is None else 'tensor-parallel (a process group)'


#: transformers' Mamba-2 mixers (Mamba-2, Bamba, NemotronH, GraniteMoeHybrid, FalconH1, Zamba2): their forward reads
#: ``conv1d``'s weights without calling it
TRANSFORMERS_MIXER = Canonized(transformers_forward, uncalled=('conv1d',))
#: mamba-ssm's ``Mamba2``, likewise; not tensor-parallel
MAMBA_SSM_MIXER = Canonized(mamba_ssm_forward, uncalled=('conv1d',), check=_tensor_parallel)
