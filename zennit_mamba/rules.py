'''The MambaLRP rules, each written once as a small Zennit rule class that states its equation.

Every rule changes the *gradient* of one operation and leaves its forward value alone (the "efficient" form of LXT):
with all of them in place, a Mamba model is linear in its input embeddings (biases zeroed), and gradient x input of
the whole forward is the relevance, ``R = x * J^T (R_out / y)``; inside the model the relevance of any tensor ``h``
is ``h * gradient`` (:py:class:`~zennit_mamba.core.hooks.ExplainedModel` converts at the two ends).

Each rule has one function, ``apply``, the equation itself. The canonized Mamba mixers call it through the
:py:class:`RuleSet` that :py:class:`~zennit_mamba.canonizers.MambaCanonizer` binds into their forwards; on a
standalone module (an activation, an RMSNorm, attention, a gated MLP in a hybrid) the rule registers as a Zennit hook
that applies the same function to the module's output (:py:class:`~zennit_mamba.MambaComposite` maps module types to
rules as Zennit's composites do); an RMSNorm that runs transformers' standard forward takes that forward with the
rule in place instead (:py:meth:`LNRule.standard_rms_forward`).
'''
import functools
from typing import Callable, ClassVar, Collection, Optional, Tuple

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN
from zennit.core import Hook, RemovableHandle, RemovableHandleList

from zennit_mamba.core import layers
from zennit_mamba.core.instance import bind_forward, instance_forward
from zennit_mamba.kernels.scan import selective_scan
from zennit_mamba.kernels.ssd import ssd_scan
from zennit_mamba.core.switch import RuleSwitch, acts

#: the MambaLRP rules that can be switched on and off (``'attention'`` acts in hybrid models only)
MAMBA_LRP_RULES = frozenset({'silu', 'ssm', 'gate', 'norm', 'attention'})


class _IdentityRule(torch.autograd.Function):
    '''``output``, whose backward passes the gradient to ``input`` scaled by ``output / input`` (0 where ``input``
    is 0), and none to ``output``'s own graph: no kernel in the forward pass.'''

    @staticmethod
    def forward(ctx, input: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(input, output)
        return output.view_as(output)

    @staticmethod
    def backward(ctx, gradient: torch.Tensor) -> Tuple[torch.Tensor, None]:
        input, output = ctx.saved_tensors
        # in place on the one new tensor: each tensor of the input's size is another allocation (on a CPU, above
        # 32 MiB, another page fault per 4 KiB)
        ratio = (output / input).masked_fill_(input == 0, 0.0)
        return ratio.mul_(gradient).to(input.dtype), None


class _HalfGradient(torch.autograd.Function):
    '''Identity whose backward halves the gradient: no kernel in the forward pass.'''

    @staticmethod
    def forward(ctx, product: torch.Tensor) -> torch.Tensor:
        return product.view_as(product)

    @staticmethod
    def backward(ctx, gradient: torch.Tensor) -> torch.Tensor:
        return gradient * 0.5


def identity_rule(input: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    '''``output`` of an element-wise map of ``input`` with the factor ``output / input`` held constant.

    Gradient x input through the result passes each element's relevance unchanged.

    Examples
    --------
    >>> x = torch.tensor([-1.0, 0.0, 2.0], requires_grad=True)
    >>> y = identity_rule(x, torch.nn.functional.silu(x))
    >>> gradient, = torch.autograd.grad(y, x, torch.ones(3))  # output relevance y, divided by y
    >>> torch.allclose(x * gradient, y)
    True
    '''
    return _IdentityRule.apply(input, output) if input.requires_grad else output


class Rule(Hook):
    '''A MambaLRP rule: a change of one operation's gradient, applied by :py:meth:`apply` in the forward pass.

    As a Zennit hook, it registers a forward hook that passes the module's output through the rule
    (:py:meth:`on_output`); rules that act inside canonized mixers only refuse to register.
    '''

    #: the name that switches the rule on or off (``MambaComposite(rules=...)``)
    name: ClassVar[str] = ''

    def __init__(self):
        super().__init__()
        #: whether the rule acts on a call (:py:class:`~zennit_mamba.core.switch.RuleSwitch`): the composite's, once it
        #: attaches the rule; None (always) for a rule registered on its own
        self.switch: Optional[RuleSwitch] = None

    def register(self, module: torch.nn.Module) -> RemovableHandleList:
        if type(self).on_output is Rule.on_output:
            raise TypeError(
                f'{type(self).__name__} acts inside canonized Mamba mixers (MambaCanonizer binds it), not on a '
                f'{type(module).__name__}.'
            )
        return RemovableHandleList([RemovableHandle(self), module.register_forward_hook(self._on_output_where_on)])

    def acts(self) -> bool:
        '''Whether the rule acts on a call made now (its switch is on).'''
        return acts(self.switch)

    def _on_output_where_on(self, module: torch.nn.Module, args: tuple, output):
        return self.on_output(module, args, output) if self.acts() else None

    def on_output(self, module: torch.nn.Module, args: tuple, output):
        '''The module's output passed through the rule.'''
        raise NotImplementedError

    def copy(self) -> 'Rule':
        rule = type(self)()
        rule.switch = self.switch
        return rule


class _ConstantFactor(Rule):
    '''An element-wise map ``y = x * (y / x)`` with the factor held constant: ``R(x) = R(y)`` per element.'''

    @staticmethod
    def apply(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return identity_rule(x, y)

    def on_output(self, module, args, output):
        # under accelerate's hooks a module may take its input on another device than its output's
        return self.apply(args[0].to(output.device), output)


class SiLUIdentity(_ConstantFactor):
    '''Identity rule for SiLU (and any activation ``f`` with ``f(0) = 0``): ``y = x * (f(x) / x)`` with the factor
    held constant, so ``R(x) = R(y)``.

    For SiLU the factor is ``sigmoid(x)``: gradient x input of ``x * sigmoid(x).detach()`` is ``R(y)`` exactly,
    where plain gradient x input leaks ``(dR/dy) sigmoid'(x) x^2``.
    '''

    name = 'silu'


def _standard_rms_norm_forward(self, hidden_states):
    # transformers' RMSNorm forward, verbatim (Llama's, "copied from" in Mamba, Mamba2, FalconMamba, Bamba, Jamba,
    # Zamba, ...): a norm whose class forward compiles to the same code computes what LNRule.standard_rms_forward does
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    return self.weight * hidden_states.to(input_dtype)


@functools.lru_cache(maxsize=None)
def _is_standard_rms_norm_forward(forward: Callable) -> bool:
    '''Whether ``forward`` is :py:func:`_standard_rms_norm_forward` in another place: the same bytecode, constants,
    names and variables, no closure, and ``torch`` in its globals being torch (once per function object).'''
    code, reference = getattr(forward, '__code__', None), _standard_rms_norm_forward.__code__
    if code is None or getattr(forward, '__globals__', {}).get('torch') is not torch:
        return False
    fields = ('co_code', 'co_consts', 'co_names', 'co_varnames', 'co_argcount', 'co_kwonlyargcount', 'co_freevars')
    return all(getattr(code, field) == getattr(reference, field) for field in fields)


def runs_standard_rms_norm(module: torch.nn.Module) -> bool:
    '''Whether a call of ``module`` runs transformers' standard RMSNorm forward: its class's forward (also inside
    accelerate's hook) is that code, and no other forward is set on the instance.

    Parameters
    ----------
    module : :py:obj:`torch.nn.Module`
        Any module (the composite asks for those it maps to :py:class:`LNRule`).

    Returns
    -------
    bool
        True where :py:meth:`LNRule.standard_rms_forward` computes what the module's call computes.

    Examples
    --------
    >>> from transformers.models.mamba.modeling_mamba import MambaRMSNorm
    >>> runs_standard_rms_norm(MambaRMSNorm(4)), runs_standard_rms_norm(torch.nn.LayerNorm(4))
    (True, False)
    '''
    return instance_forward(module) is None and _is_standard_rms_norm_forward(type(module).forward)


class LNRule(_ConstantFactor):
    '''LN-rule: the normalisation's denominator held constant.

    RMSNorm ``u = w * h * r`` with ``r = rsqrt(mean(h^2) + eps)`` constant is diagonal in ``h``: ``R(h_i) = R(u_i)``
    (``u / h`` held constant). LayerNorm ``u = w * (h - mean(h)) * r + b`` with ``r = rsqrt(var(h) + eps)`` constant
    is linear in ``h``, the centring included (:py:meth:`apply_centred`).

    A norm that runs transformers' standard RMSNorm forward (:py:func:`runs_standard_rms_norm`) gets that forward
    with the rule (:py:meth:`standard_rms_forward`: on float32 inputs its own operations with ``r`` detached, no hook
    or autograd function on each call, whose host time shows on short inputs); any other norm a hook on its output.
    '''

    name = 'norm'

    def register(self, module: torch.nn.Module) -> RemovableHandleList:
        if runs_standard_rms_norm(module):
            return RemovableHandleList([RemovableHandle(self), bind_forward(module, LNRule.standard_rms_forward, self)])
        return super().register(module)

    @staticmethod
    def standard_rms_forward(rule: 'LNRule', module: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        '''transformers' standard RMSNorm forward (:py:func:`runs_standard_rms_norm`) under the rule: on float32
        inputs its own operations with the scale held constant, ``u = w * (h * r.detach())`` (so ``u`` is the
        original output); on others the ratio ``u / h`` held (:py:meth:`apply`), since that forward computes in
        float32 and casts back, and a gradient through the cast would conserve only to float32's precision.

        Parameters
        ----------
        rule : :py:class:`LNRule`
            The registered rule (bound as the first argument, as a rule set is to a canonized mixer's forward).
        module : :py:obj:`torch.nn.Module`
            The norm, whose ``weight`` and ``variance_epsilon`` are read.
        hidden_states : :py:obj:`torch.Tensor`
            The norm's input ``h``, normalised over its last dimension.

        Returns
        -------
        :py:obj:`torch.Tensor`
            The norm's output ``u``, with the LN-rule's gradient.
        '''
        if hidden_states.dtype != torch.float32:
            return rule.apply(hidden_states, _standard_rms_norm_forward(module, hidden_states))
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return module.weight * (hidden_states * torch.rsqrt(variance + module.variance_epsilon).detach())

    @staticmethod
    def apply_centred(h: torch.Tensor, u: torch.Tensor, dims: Tuple[int, ...], weight: Optional[torch.Tensor],
                      bias: Optional[torch.Tensor], eps: float) -> torch.Tensor:
        '''``u`` of a LayerNorm of ``h`` over ``dims`` (its affine ``weight`` and ``bias`` already broadcastable),
        with the gradient of ``w * (h - mean(h)) * r + b`` for a constant ``r``.'''
        scale = torch.rsqrt(h.var(dims, unbiased=False, keepdim=True) + eps).detach()
        linear = (h - h.mean(dims, keepdim=True)) * scale
        if weight is not None:
            linear = linear * weight
        if bias is not None:
            linear = linear + bias
        return linear + (u - linear).detach()

    def on_output(self, module, args, output):
        # under accelerate's hooks a module may take its input on another device than its output's
        h = args[0].to(output.device)
        if not isinstance(module, torch.nn.LayerNorm):
            return self.apply(h, output)
        count = len(module.normalized_shape)
        if type(module).__name__.endswith('2d'):
            # timm's LayerNorm2d normalises the channels of (batch, channels, height, width)
            shape, dims = (-1, 1, 1), (1,)
        else:
            shape, dims = module.normalized_shape, tuple(range(-count, 0))
        weight, bias = (None if value is None else value.view(shape) for value in (module.weight, module.bias))
        return self.apply_centred(h, output, dims, weight, bias, module.eps)


class HalfRule(Rule):
    '''Half rule for a multiplicative gate ``o = y * g``: each factor receives half the relevance.

    ``o = 0.5 * o + 0.5 * o.detach()``: gradient x input gives ``R(y) = R(g) = R(o) / 2``, where plain gradient x
    input gives each factor all of ``R(o)`` and doubles it. On a gated MLP ``down(act(gate) * up)`` the rule
    applies to the input of ``down``; on mixture-of-experts modules to each expert's product.
    '''

    name = 'gate'

    @staticmethod
    def apply(product: torch.Tensor) -> torch.Tensor:
        return _HalfGradient.apply(product) if product.requires_grad else product

    def register(self, module: torch.nn.Module) -> RemovableHandleList:
        handles = RemovableHandleList([RemovableHandle(self)])
        if layers.is_experts(module):
            handles.append(layers.select_implementation(module, gate=self._apply_where_on))
            return handles
        output = layers.gated_mlp_output(module)
        if output is None:
            raise TypeError(f'HalfRule applies to gated MLPs and experts, not to {type(module).__name__}')
        handles.append(getattr(module, output).register_forward_pre_hook(self._halve_input))
        return handles

    def _apply_where_on(self, product: torch.Tensor) -> torch.Tensor:
        return self.apply(product) if self.acts() else product

    def _halve_input(self, module, args):
        return (self.apply(args[0]),) + tuple(args[1:]) if self.acts() else None


class DetachSelection(Rule):
    '''MambaLRP rule for the selective SSM: ``delta``, ``A_bar = exp(delta A)``, ``B_bar = delta B`` and ``C`` are
    constants.

    The scan ``s_t = A_bar_t s_{t-1} + B_bar_t x_t``, ``y_t = C_t s_t + D x_t`` is then linear in ``x``, and LRP-0
    through it conserves ``R(x_t) + R(s_{t-1}) = R(s_t) + R(y_t)``; the selection receives no relevance.
    '''

    name = 'ssm'

    @staticmethod
    def apply(*selection: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return tuple(value.detach() for value in selection)


class AttentionRule(Rule):
    '''CP-LRP for the attention of hybrids, the analogue of the SSM rule: ``o = P V`` with the probabilities ``P``
    held constant, so relevance flows through the values only (``P`` is computed from the queries and keys alone,
    which :py:func:`~zennit_mamba.core.layers.attention_forward` holds constant inside SDPA); the routing weights of
    mixtures of experts and the scales ``s(x)`` of squeeze-and-excitation ``x * s(x)`` (EfficientViM) are held
    constant likewise.
    '''

    name = 'attention'

    @staticmethod
    def apply(constant: torch.Tensor) -> torch.Tensor:
        return constant.detach()

    def register(self, module: torch.nn.Module) -> RemovableHandleList:
        handles = RemovableHandleList([RemovableHandle(self)])
        if layers.is_attention(module):
            handles.append(layers.select_implementation(module, probabilities=self._apply_where_on))
        else:
            handles.append(module.register_forward_hook(self._on_output_where_on))
        return handles

    def _apply_where_on(self, constant: torch.Tensor) -> torch.Tensor:
        return self.apply(constant) if self.acts() else constant

    def on_output(self, module, args, output):
        if layers.is_excitation(module):
            # squeeze-and-excitation x * s(x): the per-channel scale s = output / x held constant
            return identity_rule(args[0], output)
        # a router: every output (weights, indices) held constant
        return tuple(self.apply(value) if torch.is_tensor(value) else value for value in output)


RULES = {rule.name: rule for rule in (SiLUIdentity, LNRule, HalfRule, DetachSelection, AttentionRule)}


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

    Examples
    --------
    >>> rules = RuleSet({'gate'})
    >>> y, g = torch.tensor([2.0], requires_grad=True), torch.tensor([3.0], requires_grad=True)
    >>> o = rules.gate(y, g)
    >>> [float(value * gradient) for value, gradient in zip((y, g), torch.autograd.grad(o, (y, g), o / o))]
    [3.0, 3.0]
    '''

    def __init__(self, rules: Collection[str] = MAMBA_LRP_RULES, recompute: bool = False):
        self.names = frozenset(rules)
        unknown = self.names - MAMBA_LRP_RULES
        if unknown:
            raise ValueError(f'Unknown MambaLRP rules {sorted(unknown)}; choose from {sorted(MAMBA_LRP_RULES)}.')
        self.recompute = recompute
        #: whether the rules act on a call: while off, a canonized mixer runs its own forward
        #: (:py:class:`~zennit_mamba.core.instance.CanonizedForward`)
        self.switch = RuleSwitch()

    def __repr__(self) -> str:
        return f'RuleSet({sorted(self.names)}, recompute={self.recompute})'

    def rule(self, name: str) -> Optional[Rule]:
        '''A fresh instance of the rule ``name``, or None where it is off.'''
        return RULES[name]() if name in self.names else None

    def activation(self, name: str, x: torch.Tensor) -> torch.Tensor:
        '''The activation ``name`` of ``ACT2FN`` (SiLU for Mamba), under :py:class:`SiLUIdentity`.'''
        y = F.silu(x) if name in ('silu', 'swish') else ACT2FN[name](x)
        return SiLUIdentity.apply(x, y) if 'silu' in self.names else y

    def gate(self, value: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        '''``value * gate`` under :py:class:`HalfRule`.'''
        product = value * gate
        return HalfRule.apply(product) if 'gate' in self.names else product

    def norm(self, h: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        '''The output ``u`` of an RMS normalisation of ``h`` under :py:class:`LNRule`.'''
        return LNRule.apply(h, u) if 'norm' in self.names else u

    def selection(self, *selection: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        '''``delta, A, B, C`` of a scan under :py:class:`DetachSelection`.'''
        return DetachSelection.apply(*selection) if 'ssm' in self.names else selection

    def fuses(self, rules: Collection[str], operations: Collection[str]) -> bool:
        '''Whether a fused function with a hand-written backward may compute what ``operations`` compute under
        ``rules``: those rules on, and none of those operations changed by a subclass (such a rule set computes them
        in turn).'''
        return set(rules) <= self.names and all(
            getattr(type(self), operation) is getattr(RuleSet, operation) for operation in operations)

    def fuses_branch(self) -> bool:
        '''Whether a Mamba-1 branch's SiLU, scan and gate may run as one fused function
        (:py:class:`~zennit_mamba.kernels.fused.SiLUScanGate`).'''
        return self.fuses({'silu', 'ssm', 'gate'}, ('activation', 'selection', 'scan', 'gate'))

    def fuses_gated_norm(self) -> bool:
        '''Whether a Mamba-2 gated RMS normalisation may run as one fused function
        (:py:class:`~zennit_mamba.kernels.fused.GatedRMSNorm`).'''
        return self.fuses({'silu', 'gate', 'norm'}, ('activation', 'gate', 'norm'))

    def scan(self, x, delta, A, B, C, D, initial_state=None) -> Tuple[torch.Tensor, torch.Tensor]:
        '''The Mamba-1 selective scan (:py:func:`~zennit_mamba.kernels.scan.selective_scan`) with the selection rule; from
        ``initial_state`` (the last state of the previous time block, which carries relevance) where given.'''
        delta, A, B, C = self.selection(delta, A, B, C)
        return selective_scan(x, delta, A, B, C, D, initial_state=initial_state)

    def scans_in_time_blocks(self) -> bool:
        '''Whether a mixer may run over time blocks, each scan continued from the previous block's last state
        (:py:data:`~zennit_mamba.mixers.io.CPU_TIME_BLOCK`): not where a subclass changes a scan, which then sees
        the whole sequence at once.'''
        return self.fuses((), ('scan', 'ssd'))

    def ssd(self, x, delta, A, B, C, D, chunk_size: int, initial_state=None) -> Tuple[torch.Tensor, torch.Tensor]:
        '''The Mamba-2 SSD scan (:py:func:`~zennit_mamba.kernels.ssd.ssd_scan`) with the selection rule; from
        ``initial_state`` (the last state of the previous time block, which carries relevance) where given.'''
        delta, A, B, C = self.selection(delta, A, B, C)
        return ssd_scan(x, delta, A, B, C, D, chunk_size=chunk_size, initial_state=initial_state)
