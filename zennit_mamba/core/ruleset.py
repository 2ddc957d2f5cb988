'''The rule set that canonized forwards compute with: each operation of a mixer under the MambaLRP rules that are on.'''
from typing import Collection, Tuple

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from zennit_mamba.core.switch import RuleSwitch
from zennit_mamba.kernels.delta_rule import chunk_gated_delta_rule, recurrent_gated_delta_rule
from zennit_mamba.kernels.delta_rule_fla import fla_delta_rule_applies, fla_values_delta_rule
from zennit_mamba.kernels.scan import selective_scan
from zennit_mamba.kernels.ssd import ssd_scan
from zennit_mamba.rules import (
    MAMBA_LRP_RULES, RULES, AttentionRule, DetachSelection, HalfRule, HeldGate, LNRule, SiLUIdentity,
)

#: where the delta-rule layers pass relevance (:py:class:`RuleSet`'s ``delta_relevance``)
DELTA_RELEVANCE = ('values', 'uniform')
#: the treatments of a mixer's output gate ``y * act(z)`` (:py:class:`HalfRule`, :py:class:`HeldGate`)
GATE_RELEVANCE = ('half', 'value')

#: each rule's equation as the fused functions restate it (kernels/fused.py, kernels/ssd_triton.py): where a rule's
#: ``apply`` is another function, the rule set computes the operations in turn
_EQUATIONS = {name: vars(rule).get('apply') for name, rule in RULES.items()}


class RuleSet:
    '''The MambaLRP rules that are on, the one state object the canonized forwards close over.

    Each operation of a canonized mixer is computed by one method here, which applies the rule's ``apply`` where
    that rule is on and the plain operation where it is off (the ablations).

    Parameters
    ----------
    rules : collection of str, optional
        The rules that are on, a subset of :py:data:`MAMBA_LRP_RULES`.
    recompute : bool, optional
        Recompute each mixer in the backward pass instead of storing its activations.
    delta_relevance : str, optional
        Where the delta-rule layers (Gated DeltaNet, Kimi) pass relevance: ``'values'`` (MambaLRP's principle: the
        queries and keys select, held constant with the decays and write strengths, so that relevance flows through
        the values only) or ``'uniform'`` (AttnLRP's treatment of attention: relevance also through the queries and
        the written keys, the uniform rule splitting each product, the read-out ``S^T q`` and the write ``k v^T``,
        between its factors; the projections ``I - beta k k^T``, decays and write strengths held; token by token).
    gate_relevance : str, optional
        How a mixer's output gate ``o = y * act(z)`` passes relevance: ``'half'`` (the paper's half rule, each factor
        half) or ``'value'`` (the gate, computed from the current token alone, held constant as the selection is, so
        all of it flows through ``y``: :py:class:`HeldGate`). Products inside feed-forward blocks (SwiGLU) keep the
        half rule either way.

    Examples
    --------
    >>> rules = RuleSet({'gate'})
    >>> y, g = torch.tensor([2.0], requires_grad=True), torch.tensor([3.0], requires_grad=True)
    >>> o = rules.gate(y, g)
    >>> [float(value * gradient) for value, gradient in zip((y, g), torch.autograd.grad(o, (y, g), o / o))]
    [3.0, 3.0]
    '''

    def __init__(self, rules: Collection[str] = MAMBA_LRP_RULES, recompute: bool = False,
                 delta_relevance: str = 'values', gate_relevance: str = 'half'):
        if isinstance(rules, str) or not isinstance(rules, Collection):
            raise TypeError(f'rules must be a collection of rule names such as {{\'silu\', \'ssm\'}} (() for none), '
                            f'got {rules!r}')
        self.names = frozenset(rules)
        unknown = self.names - MAMBA_LRP_RULES
        if unknown:
            raise ValueError(f'Unknown MambaLRP rules {sorted(unknown)}; choose from {sorted(MAMBA_LRP_RULES)}.')
        if delta_relevance not in DELTA_RELEVANCE:
            raise ValueError(f'delta_relevance must be one of {DELTA_RELEVANCE}, got {delta_relevance!r}.')
        if gate_relevance not in GATE_RELEVANCE:
            raise ValueError(f'gate_relevance must be one of {GATE_RELEVANCE}, got {gate_relevance!r}.')
        self.recompute = recompute
        self.delta_relevance = delta_relevance
        self.gate_relevance = gate_relevance
        #: whether the rules act on a call: while off, a canonized mixer runs its own forward
        #: (:py:class:`~zennit_mamba.core.instance.CanonizedForward`)
        self.switch = RuleSwitch()

    def __repr__(self) -> str:
        return (f'RuleSet({sorted(self.names)}, recompute={self.recompute}, '
                f'delta_relevance={self.delta_relevance!r}, gate_relevance={self.gate_relevance!r})')

    def activation(self, name: str, x: torch.Tensor) -> torch.Tensor:
        '''The activation ``name`` of ``ACT2FN`` (SiLU for Mamba), under :py:class:`SiLUIdentity`.'''
        return self.activated(x, F.silu(x) if name in ('silu', 'swish') else ACT2FN[name](x))

    def activated(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        '''The output ``y = act(x)`` of an element-wise activation (a layer's own activation module) under
        :py:class:`SiLUIdentity`.'''
        return SiLUIdentity.apply(x, y) if 'silu' in self.names else y

    def gate(self, value: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        '''``value * gate`` under :py:class:`HalfRule`.'''
        product = value * gate
        return HalfRule.apply(product) if 'gate' in self.names else product

    def output_gate(self, value: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        '''A mixer's output gate ``value * gate`` (``gate = act(z)``, from the current token): under
        :py:class:`HalfRule` (``gate_relevance='half'``) or with ``gate`` held by :py:class:`HeldGate` (``'value'``).'''
        if self.gate_relevance == 'value' and 'gate' in self.names:
            return value * HeldGate.apply(gate)
        return self.gate(value, gate)

    def norm(self, h: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        '''The output ``u`` of an RMS normalisation of ``h`` under :py:class:`LNRule`.'''
        return LNRule.apply(h, u) if 'norm' in self.names else u

    def selection(self, *selection: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        '''``delta, A, B, C`` of a scan under :py:class:`DetachSelection`.'''
        return DetachSelection.apply(*selection) if 'ssm' in self.names else selection

    def fuses(self, rules: Collection[str], operations: Collection[str]) -> bool:
        '''Whether a fused function with a hand-written backward may compute what ``operations`` compute under
        ``rules``: those rules on, their equations the ones the fused functions restate (a rule whose ``apply`` was
        replaced computes in turn, as the mutation check replaces them), and none of those operations changed by a
        subclass (such a rule set computes them in turn).'''
        return set(rules) <= self.names and all(
            vars(RULES[name]).get('apply') is _EQUATIONS[name] for name in rules) and all(
            getattr(type(self), operation) is getattr(RuleSet, operation) for operation in operations)

    def fuses_branch(self) -> bool:
        '''Whether a Mamba-1 branch's SiLU, scan and gate may run as one fused function
        (:py:class:`~zennit_mamba.kernels.fused.SiLUScanGate`).'''
        return self.gate_relevance == 'half' and self.fuses(
            {'silu', 'ssm', 'gate'}, ('activation', 'selection', 'scan', 'gate', 'output_gate'))

    def fuses_gated_norm(self) -> bool:
        '''Whether a Mamba-2 gated RMS normalisation may run as one fused function
        (:py:class:`~zennit_mamba.kernels.fused.GatedRMSNorm`).'''
        return self.gate_relevance == 'half' and self.fuses(
            {'silu', 'gate', 'norm'}, ('activation', 'gate', 'output_gate', 'norm', 'gated_norm'))

    def gated_norm(self, y: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, epsilon: float, group_size: int,
                   before_gate: bool, activation: str = 'silu') -> torch.Tensor:
        '''The gated RMS normalisation of a mixer's output ``y`` over groups of ``group_size`` channels:
        ``w * rms(y * act(gate))``, or ``w * rms(y) * act(gate)`` where ``before_gate`` (the delta-rule layers'), with
        :py:class:`LNRule` on the normalisation. A SiLU gate (Mamba's) takes :py:class:`SiLUIdentity` and
        :py:meth:`output_gate` on the product; a sigmoid gate (Kimi's), a value in (0, 1) that scales the signal as a
        routing weight does, is held constant by :py:meth:`held` and the product passes relevance to ``y``. Computed
        in float32 at least, returned in ``y``'s dtype.'''
        dtype = y.dtype
        compute = torch.promote_types(dtype, torch.float32)
        if activation == 'sigmoid':
            activated, product = self.held(torch.sigmoid(gate.to(compute)))[0], torch.mul
        else:
            activated, product = self.activation(activation, gate.to(compute)), self.output_gate
        hidden = y.to(compute) if before_gate else product(y.to(compute), activated)
        grouped = hidden.unflatten(-1, (hidden.shape[-1] // group_size, group_size))
        normalised = self.norm(grouped, grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + epsilon))
        hidden = weight.to(compute) * normalised.flatten(-2)
        return (product(hidden, activated) if before_gate else hidden).to(dtype)

    def held(self, *gates: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        '''Gates, routing weights or probabilities that scale a signal, under :py:class:`AttentionRule`.'''
        return tuple(AttentionRule.apply(gate) for gate in gates) if 'attention' in self.names else gates

    def scan(self, x, delta, A, B, C, D, initial_state=None) -> Tuple[torch.Tensor, torch.Tensor]:
        '''The Mamba-1 selective scan (:py:func:`~zennit_mamba.kernels.scan.selective_scan`) with the selection rule;
        from ``initial_state`` (the last state of the previous time block, which carries relevance) where given.'''
        delta, A, B, C = self.selection(delta, A, B, C)
        return selective_scan(x, delta, A, B, C, D, initial_state=initial_state)

    def scans_in_time_blocks(self) -> bool:
        '''Whether a mixer may run over time blocks, each scan continued from the previous block's last state
        (:py:data:`~zennit_mamba.mixers.io.CPU_TIME_BLOCK`): not where a subclass changes a scan, which then sees
        the whole sequence at once.'''
        return self.fuses((), ('scan', 'ssd', 'delta_rule'))

    def ssd(self, x, delta, A, B, C, D, chunk_size: int, initial_state=None) -> Tuple[torch.Tensor, torch.Tensor]:
        '''The Mamba-2 SSD scan (:py:func:`~zennit_mamba.kernels.ssd.ssd_scan`) with the selection rule; from
        ``initial_state`` (the last state of the previous time block, which carries relevance) where given.'''
        delta, A, B, C = self.selection(delta, A, B, C)
        return ssd_scan(x, delta, A, B, C, D, chunk_size=chunk_size, initial_state=initial_state)

    def delta_rule(self, query, key, value, g, beta, chunk_size: int = 64,
                   initial_state=None) -> Tuple[torch.Tensor, torch.Tensor]:
        '''The gated delta rule of a Gated DeltaNet or Kimi layer
        (:py:func:`~zennit_mamba.kernels.delta_rule.chunk_gated_delta_rule`) with the selection rule: the queries and
        keys (after their normalisation), the log-decays ``g`` and the write strengths ``beta`` are what the input
        selects, held constant, so that the output is linear in the values and the initial state. With
        ``delta_relevance='uniform'`` the queries and the written keys pass relevance too
        (:py:func:`~zennit_mamba.kernels.delta_rule.recurrent_gated_delta_rule` with :py:class:`HalfRule` on the
        read-out and the write; the projections' keys, ``g`` and ``beta`` held). The values' rule is to run
        flash-linear-attention's chunk kernels on a GPU once they are validated
        (:py:data:`~zennit_mamba.kernels.delta_rule_fla.SERVES_THE_RULE_SET`).'''
        if self.delta_relevance == 'uniform' and 'ssm' in self.names:
            projection_key, g, beta = self.selection(key, g, beta)
            uniform = HalfRule.apply if 'gate' in self.names else (lambda product: product)
            return recurrent_gated_delta_rule(query, key, value, g, beta, initial_state,
                                              projection_key=projection_key, read=uniform, write=uniform)
        query, key, g, beta = self.selection(query, key, g, beta)
        if 'ssm' in self.names and fla_delta_rule_applies(value, key.shape[-1]):
            # the kernels the layers run on a GPU, the backward pass computing the values' gradient only
            return fla_values_delta_rule(query, key, value, g, beta, initial_state=initial_state)
        return chunk_gated_delta_rule(query, key, value, g, beta, chunk_size=chunk_size, initial_state=initial_state)

    def delta_key_norm(self, x: torch.Tensor) -> torch.Tensor:
        '''The L2 normalisation of a delta-rule layer's queries or keys, ``x / sqrt(|x|^2 + 1e-6)``: under
        ``delta_relevance='uniform'``, where relevance passes them, with the scale held constant by :py:class:`LNRule`
        (a normalisation, whose gradient x input is about zero otherwise).'''
        normalised = x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)
        return self.norm(x, normalised) if self.delta_relevance == 'uniform' else normalised
