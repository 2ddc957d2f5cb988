'''The canonical Mamba-2 mixer computation, shared by transformers' Mamba-2 mixer, the hybrids' copies of it and
mamba-ssm's ``Mamba2``.

A Mamba-2 mixer is ``in_proj -> conv1d -> core -> out_proj``, where the core holds every nonlinear operation: the
SiLU after the convolution, the step sizes, the SSD scan, the gated RMS norm ``norm(y * silu(gate))`` and, in
mamba-ssm's variant with ``d_ssm < d_inner``, the gated MLP ``silu(z0) * x0`` beside the SSM. The
projections run as the mixer's own modules (so that Zennit rules such as Gamma can attach to them); the core runs
as the explicit :py:class:`Mamba2Core` submodule added by the canonizer, whose MambaLRP rules are written as
detaches while a :py:class:`~zennit_mamba.rules.MixerRules` is registered on it, or, when one is registered on the
whole mixer, as a function of the same computation.
'''
import weakref
from typing import FrozenSet, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from .mixer import MixerOutput, mask_padding, run_mixer
from .rules import RULE_ATTRIBUTE, gate_product, identity_rule, silu
from .ssd import ssd_scan


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


class Mamba2Core(torch.nn.Module):
    '''Everything of a Mamba-2 mixer between its projections, on ``in_proj``'s output with the convolution applied.

    The packed input is ``cat([mlp_gate, mlp_input, gate, conv, dt], -1)`` (widths ``layout.projection_split``),
    where ``conv`` is the convolution's output before its activation. Returns the input of ``out_proj`` and the
    last scan state. The mixer is referenced weakly, so the core adds no cycle to the module tree.
    '''

    reads_mixer_rules = True

    def __init__(self, mixer: torch.nn.Module, layout: Mamba2Layout):
        super().__init__()
        self._mixer = weakref.ref(mixer)
        self.layout = layout

    def forward(
        self, packed: torch.Tensor, attention_mask: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        rule = getattr(self, RULE_ATTRIBUTE, None)
        return mamba2_core(self._mixer(), packed, attention_mask, rule.rules if rule is not None else frozenset())


def _activation(name: str, x: torch.Tensor, identity: bool) -> torch.Tensor:
    if name in ('silu', 'swish'):
        return silu(x, identity_rule=identity)
    # a fresh instance: the mixer's own ``act`` submodule may carry a Zennit rule of its own
    output = ACT2FN[name](x)
    return identity_rule(x, output) if identity else output


def _gated_norm(mixer: torch.nn.Module, y: torch.Tensor, gate: torch.Tensor, rules: FrozenSet[str]) -> torch.Tensor:
    '''``norm(y * silu(gate))`` (or ``norm(y) * silu(gate)``) with the gate, SiLU and LN rules as detaches.'''
    norm = getattr(mixer, 'norm', None)
    dtype = y.dtype
    compute = torch.promote_types(dtype, torch.float32)
    activated = silu(gate.to(compute), identity_rule='silu' in rules)
    if not hasattr(norm, 'weight'):
        # without a gated norm (FalconH1's mamba_rms_norm=False, mamba-ssm's rmsnorm=False) the gate acts directly
        return gate_product(y.to(compute), activated, 'gate' in rules).to(dtype)
    before_gate = getattr(norm, 'norm_before_gate', False)
    hidden = y.to(compute) if before_gate else gate_product(y.to(compute), activated, 'gate' in rules)
    width = hidden.shape[-1]
    group_size = getattr(norm, 'group_size', None) or width // norm.n_groups
    # transformers' name, then mamba-ssm's
    epsilon = norm.variance_epsilon if hasattr(norm, 'variance_epsilon') else norm.eps
    grouped = hidden.unflatten(-1, (width // group_size, group_size))
    scale = torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + epsilon)
    if 'norm' in rules:
        scale = scale.detach()
    hidden = norm.weight.to(compute) * (grouped * scale).flatten(-2)
    return (gate_product(hidden, activated, 'gate' in rules) if before_gate else hidden).to(dtype)


def mamba2_core(
    mixer: torch.nn.Module,
    packed: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    rules: FrozenSet[str],
) -> Tuple[torch.Tensor, torch.Tensor]:
    '''The core of a Mamba-2 mixer (see :py:class:`Mamba2Core`) with the MambaLRP rules in ``rules`` as detaches.'''
    layout = mixer.lrp_core.layout
    batch, length, _ = packed.shape
    heads, groups = layout.heads, layout.groups
    mlp_gate, mlp_input, gate, conv, time_step = torch.split(packed, layout.projection_split, dim=-1)

    conv = mask_padding(_activation(layout.activation, conv, 'silu' in rules), attention_mask)
    x, B, C = torch.split(conv, [layout.ssm_width, groups * layout.state_size, groups * layout.state_size], dim=-1)
    delta = F.softplus(time_step + mixer.dt_bias.to(time_step.dtype))
    low, high = layout.time_step_limit
    if (low, high) != (0.0, float('inf')):
        delta = delta.clamp(low, high)
    A = -torch.exp(mixer.A_log.float())
    if 'ssm' in rules:
        delta, A, B, C = delta.detach(), A.detach(), B.detach(), C.detach()

    scanned, last_state = ssd_scan(
        x.reshape(batch, length, heads, layout.head_dim),
        delta,
        A,
        B.reshape(batch, length, groups, -1),
        C.reshape(batch, length, groups, -1),
        # mamba-ssm's D_has_hdim keeps one skip weight per channel
        mixer.D if mixer.D.numel() == heads else mixer.D.reshape(heads, layout.head_dim),
        chunk_size=layout.chunk_size,
    )
    output = _gated_norm(mixer, scanned.reshape(batch, length, -1), gate, rules)
    if layout.mlp_width:
        compute = output.dtype
        activated = silu(mlp_gate.to(compute), identity_rule='silu' in rules)
        output = torch.cat([gate_product(mlp_input.to(compute), activated, 'gate' in rules), output], dim=-1)
    return output, last_state


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
    split = mixer.lrp_core.layout.projection_split
    before, conv, time_step = torch.split(projected, [sum(split[:3]), split[3], split[4]], dim=-1)
    conv_input = conv.transpose(1, 2).detach()
    conv = mixer.conv1d(conv.transpose(1, 2).to(mixer.conv1d.weight.dtype))[..., :length]
    packed = torch.cat([before, conv.transpose(1, 2).to(before.dtype), time_step], dim=-1)
    if rules is None:
        output, last_state = mixer.lrp_core(packed, attention_mask=attention_mask)
    else:
        output, last_state = mamba2_core(mixer, packed, attention_mask, rules)
    return MixerOutput(mixer.out_proj(output.to(hidden_states.dtype)), conv_input, last_state)
