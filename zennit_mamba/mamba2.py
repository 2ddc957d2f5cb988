'''The canonical Mamba-2 mixer computation, shared by transformers' Mamba-2 mixer and the hybrids' copies of it.

A Mamba-2 mixer is ``in_proj -> conv1d -> core -> out_proj``, where the core holds every nonlinear operation: the
SiLU after the convolution, the step sizes, the SSD scan and the gated RMS norm ``norm(y * silu(gate))``. The
projections run as the mixer's own modules (so that Zennit rules such as Gamma can attach to them); the core runs
as the explicit :py:class:`Mamba2Core` submodule added by the canonizer, whose MambaLRP rules are written as
detaches while a :py:class:`~zennit_mamba.rules.MixerRules` is registered on it, or, when one is registered on the
whole mixer, as a function of the same computation.
'''
import weakref
from typing import FrozenSet, Optional, Tuple

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from .mixer import MixerOutput, mask_padding, run_mixer
from .rules import RULE_ATTRIBUTE, half_rule, identity_rule, silu
from .ssd import ssd_scan


class Mamba2Core(torch.nn.Module):
    '''Everything of a Mamba-2 mixer between its projections, on the packed input ``cat([gate, conv, dt], -1)``.

    ``conv`` is the convolution's output before its activation. Returns the input of ``out_proj`` and the last scan
    state. The mixer is referenced weakly, so the core adds no cycle to the module tree.
    '''

    reads_mixer_rules = True

    def __init__(self, mixer: torch.nn.Module):
        super().__init__()
        self._mixer = weakref.ref(mixer)

    def forward(
        self, packed: torch.Tensor, attention_mask: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        rule = getattr(self, RULE_ATTRIBUTE, None)
        return mamba2_core(self._mixer(), packed, attention_mask, rule.rules if rule is not None else frozenset())


def _activation(mixer: torch.nn.Module, x: torch.Tensor, identity: bool) -> torch.Tensor:
    if mixer.activation == 'silu':
        return silu(x, identity_rule=identity)
    # a fresh instance: the mixer's own ``act`` submodule may carry a Zennit rule of its own
    output = ACT2FN[mixer.activation](x)
    return identity_rule(x, output) if identity else output


def _gated_norm(mixer: torch.nn.Module, y: torch.Tensor, gate: torch.Tensor, rules: FrozenSet[str]) -> torch.Tensor:
    '''``norm(y * silu(gate))`` (or ``norm(y) * silu(gate)``) with the gate, SiLU and LN rules as detaches.'''
    norm = mixer.norm
    dtype = y.dtype
    compute = torch.promote_types(dtype, torch.float32)
    activated = silu(gate.to(compute), identity_rule='silu' in rules)

    def gated(value: torch.Tensor) -> torch.Tensor:
        product = value * activated
        return half_rule(product) if 'gate' in rules else product

    if not hasattr(norm, 'weight'):
        # FalconH1 without its gated norm (mamba_rms_norm=False) gates the scan output directly
        return gated(y.to(compute)).to(dtype)
    before_gate = getattr(norm, 'norm_before_gate', False)
    hidden = y.to(compute) if before_gate else gated(y.to(compute))
    width = hidden.shape[-1]
    group_size = getattr(norm, 'group_size', None) or width // norm.n_groups
    grouped = hidden.unflatten(-1, (width // group_size, group_size))
    scale = torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    if 'norm' in rules:
        scale = scale.detach()
    hidden = norm.weight.to(compute) * (grouped * scale).flatten(-2)
    return (gated(hidden) if before_gate else hidden).to(dtype)


def mamba2_core(
    mixer: torch.nn.Module,
    packed: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    rules: FrozenSet[str],
) -> Tuple[torch.Tensor, torch.Tensor]:
    '''The core of a Mamba-2 mixer (see :py:class:`Mamba2Core`) with the MambaLRP rules in ``rules`` as detaches.'''
    batch, length, _ = packed.shape
    heads, head_dim, groups_state = mixer.num_heads, mixer.head_dim, mixer.n_groups * mixer.ssm_state_size
    gate, conv, time_step = torch.split(packed, [mixer.intermediate_size, mixer.conv_dim, heads], dim=-1)

    conv = mask_padding(_activation(mixer, conv, 'silu' in rules), attention_mask)
    x, B, C = torch.split(conv, [mixer.intermediate_size, groups_state, groups_state], dim=-1)
    delta = F.softplus(time_step + mixer.dt_bias.to(time_step.dtype))
    low, high = mixer.time_step_limit
    if (low, high) != (0.0, float('inf')):
        delta = delta.clamp(low, high)
    A = -torch.exp(mixer.A_log.float())
    if 'ssm' in rules:
        delta, A, B, C = delta.detach(), A.detach(), B.detach(), C.detach()

    scanned, last_state = ssd_scan(
        x.reshape(batch, length, heads, head_dim),
        delta,
        A,
        B.reshape(batch, length, mixer.n_groups, -1),
        C.reshape(batch, length, mixer.n_groups, -1),
        mixer.D,
        chunk_size=mixer.chunk_size,
    )
    scanned = scanned.reshape(batch, length, -1)
    return _gated_norm(mixer, scanned, gate, rules), last_state


def canonical_mamba2(
    mixer: torch.nn.Module, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None
) -> MixerOutput:
    '''Run a canonized Mamba-2 mixer on ``(batch, length, hidden)`` hidden states.

    Parameters
    ----------
    mixer : :py:obj:`torch.nn.Module`
        A Mamba-2 mixer carrying the canonizer's :py:class:`Mamba2Core` as ``lrp_core``.
    hidden_states : :py:obj:`torch.Tensor`
        Normalised hidden states.
    attention_mask : :py:obj:`torch.Tensor`, optional
        ``(batch, length)`` mask; padded positions are zeroed before ``in_proj`` and after the convolution.

    Returns
    -------
    MixerOutput
        The mixer output, the (detached) input of the convolution and the last scan state, for caches.
    '''
    return run_mixer(mixer, _mamba2, hidden_states, attention_mask)


def _mamba2(mixer, rules, hidden_states, attention_mask) -> MixerOutput:
    length = hidden_states.shape[1]
    hidden_states = mask_padding(hidden_states, attention_mask)
    if getattr(mixer, 'ssm_in_multiplier', None) is not None:
        hidden_states = hidden_states * mixer.ssm_in_multiplier
    projected = mixer.in_proj(hidden_states)
    if getattr(mixer, 'mup_vector', None) is not None:
        projected = projected * mixer.mup_vector
    gate, conv, time_step = torch.split(
        projected, [mixer.intermediate_size, mixer.conv_dim, mixer.num_heads], dim=-1
    )
    conv_input = conv.transpose(1, 2).detach()
    conv = mixer.conv1d(conv.transpose(1, 2).to(mixer.conv1d.weight.dtype))[..., :length]
    packed = torch.cat([gate, conv.transpose(1, 2).to(gate.dtype), time_step], dim=-1)
    if rules is None:
        output, last_state = mixer.lrp_core(packed, attention_mask=attention_mask)
    else:
        output, last_state = mamba2_core(mixer, packed, attention_mask, rules)
    return MixerOutput(mixer.out_proj(output.to(hidden_states.dtype)), conv_input, last_state)
