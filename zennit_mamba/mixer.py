'''The canonical Mamba-1 mixer computation shared by every supported implementation.

Every operation on the relevance path runs through the mixer's own ``in_proj``, ``conv1d``, ``x_proj``, ``dt_proj``
and ``out_proj``, and either through the explicit submodules added by the canonizer (``lrp_conv_act``,
``lrp_softplus``, ``lrp_scan``, ``lrp_gate_act``, ``lrp_gate``), which carry one rule each, or, while a
:py:class:`~zennit_mamba.rules.MixerRules` (or the whole model's :py:class:`~zennit_mamba.model_rules.ModelRules`)
is registered on the mixer, through the same operations with the rules written as detaches.
'''
from typing import Callable, FrozenSet, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .layers import SelectiveScan, stack_operands
from .rules import RULE_ATTRIBUTE, gate_product, silu
from .scan import selective_scan


class MixerOutput(NamedTuple):
    '''Output of :py:func:`canonical_mixer` and the states a cache keeps.'''
    output: torch.Tensor
    conv_input: torch.Tensor
    last_state: torch.Tensor


def mask_padding(hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    '''Zero the padded positions of ``(batch, length, channels)`` hidden states.'''
    if attention_mask is None:
        return hidden_states
    return (hidden_states * attention_mask[:, :, None]).to(hidden_states.dtype)


class ModuleOps:
    '''The mixer's operations through the canonizer's explicit submodules, which carry one rule each.'''

    def __init__(self, mixer: torch.nn.Module):
        self.mixer = mixer

    def conv_act(self, x: torch.Tensor) -> torch.Tensor:
        return self.mixer.lrp_conv_act(x)

    def gate_act(self, gate: torch.Tensor) -> torch.Tensor:
        return self.mixer.lrp_gate_act(gate)

    def softplus(self, time_step: torch.Tensor) -> torch.Tensor:
        return self.mixer.lrp_softplus(time_step)

    def scan(self, x, delta, B, C, A, D) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.mixer.lrp_scan(SelectiveScan.pack(x, delta, B, C), A=A, D=D)

    def gate(self, scanned: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return self.mixer.lrp_gate(stack_operands(scanned, gate))


class DetachedOps:
    '''The mixer's operations with the MambaLRP rules in ``rules`` written as detaches.

    Gradient x input through the whole mixer computed this way equals the rules applied module by module (LRP-0 on
    the projections), at the cost of one gradient.
    '''

    def __init__(self, rules: FrozenSet[str]):
        self.rules = rules

    def conv_act(self, x: torch.Tensor) -> torch.Tensor:
        return silu(x, identity_rule='silu' in self.rules)

    def gate_act(self, gate: torch.Tensor) -> torch.Tensor:
        return silu(gate, identity_rule='silu' in self.rules)

    def softplus(self, time_step: torch.Tensor) -> torch.Tensor:
        return F.softplus(time_step)

    def scan(self, x, delta, B, C, A, D) -> Tuple[torch.Tensor, torch.Tensor]:
        if 'ssm' in self.rules:
            # A enters only through A_bar = exp(delta A), which the rule holds constant with delta, B and C
            delta, A, B, C = delta.detach(), A.detach(), B.detach(), C.detach()
        return selective_scan(x, delta, A, B, C, D)

    def gate(self, scanned: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return gate_product(scanned.to(torch.promote_types(scanned.dtype, gate.dtype)), gate, 'gate' in self.rules)


def canonical_mixer(
    mixer: torch.nn.Module,
    hidden_states: torch.Tensor,
    time_step_rank: int,
    state_size: int,
    attention_mask: Optional[torch.Tensor] = None,
) -> MixerOutput:
    '''Run a canonized Mamba-1 mixer on ``(batch, length, hidden)`` hidden states.

    Parameters
    ----------
    mixer : :py:obj:`torch.nn.Module`
        A mixer carrying the canonizer's submodules.
    hidden_states : :py:obj:`torch.Tensor`
        Normalised hidden states of shape ``(batch, length, hidden)``.
    time_step_rank, state_size : int
        Split sizes of the ``x_proj`` output: ``dt``, ``B`` and ``C``.
    attention_mask : :py:obj:`torch.Tensor`, optional
        ``(batch, length)`` mask; padded positions are zeroed before ``in_proj`` and after the convolution.

    Returns
    -------
    MixerOutput
        The mixer output, the (detached) input of the convolution and the last scan state, for caches.
    '''
    return run_mixer(mixer, _mixer, hidden_states, attention_mask, time_step_rank, state_size)


def run_mixer(mixer: torch.nn.Module, function: Callable, hidden_states, attention_mask, *arguments) -> MixerOutput:
    '''Call ``function(mixer, rules, hidden_states, attention_mask, *arguments)``.

    ``rules`` are those of the :py:class:`~zennit_mamba.rules.MixerRules` or
    :py:class:`~zennit_mamba.model_rules.ModelRules` registered on the mixer, which ``function`` writes as detaches,
    or None, where it runs the canonizer's submodules with their own rules. A rule that asks for it has the mixer
    recomputed in the backward pass.
    '''
    rule = getattr(mixer, RULE_ATTRIBUTE, None)
    rules = None if rule is None else rule.rules
    if rule is not None and rule.recompute and torch.is_grad_enabled():
        return checkpoint(function, mixer, rules, hidden_states, attention_mask, *arguments, use_reentrant=False)
    return function(mixer, rules, hidden_states, attention_mask, *arguments)


def _normalise_selection(mixer: torch.nn.Module, time_step, B, C):
    '''FalconMamba and Jamba normalise the selection (``dt``, ``B``, ``C``) before use; behind the SSM rule's
    detach this takes no relevance.'''
    if not hasattr(mixer, 'dt_layernorm'):
        return time_step, B, C
    return mixer.dt_layernorm(time_step), mixer.b_layernorm(B), mixer.c_layernorm(C)


def _mixer(mixer, rules, hidden_states, attention_mask, time_step_rank, state_size) -> MixerOutput:
    ops = ModuleOps(mixer) if rules is None else DetachedOps(rules)
    length = hidden_states.shape[1]
    dtype = hidden_states.dtype

    projected = mixer.in_proj(mask_padding(hidden_states, attention_mask)).transpose(1, 2)
    x, gate = projected.chunk(2, dim=1)
    conv_input = x.detach()

    x = ops.conv_act(mixer.conv1d(x.to(mixer.conv1d.weight.dtype))[..., :length]).to(dtype)
    x = mask_padding(x.transpose(1, 2), attention_mask)
    time_step, B, C = torch.split(mixer.x_proj(x), [time_step_rank, state_size, state_size], dim=-1)
    time_step, B, C = _normalise_selection(mixer, time_step, B, C)
    delta = ops.softplus(mixer.dt_proj(time_step))

    A, D = -torch.exp(mixer.A_log.float()), mixer.D.float()
    scanned, last_state = ops.scan(x.transpose(1, 2), delta.transpose(1, 2), B.transpose(1, 2), C.transpose(1, 2), A, D)

    gated = ops.gate(scanned, ops.gate_act(gate))
    return MixerOutput(mixer.out_proj(gated.transpose(1, 2).to(dtype)), conv_input, last_state)


def refuse_continuation() -> RuntimeError:
    '''The error for a call that continues from cached states of earlier tokens.'''
    return RuntimeError(
        'MambaLRP explains whole sequences, but this call continues from a cache of earlier tokens. '
        'Call the model on the full sequence without a cache (e.g. use_cache=False) inside the composite context.'
    )
