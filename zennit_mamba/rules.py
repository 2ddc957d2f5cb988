'''The MambaLRP rules, each written once as a small Zennit rule class that states its equation.

Every rule changes the *gradient* of one operation and leaves its forward value alone (the "efficient" form of LXT):
with all of them in place, a Mamba model is linear in its input embeddings (biases zeroed), and gradient x input of
the whole forward is the relevance, ``R = x * J^T (R_out / y)``; inside the model the relevance of any tensor ``h``
is ``h * gradient``.

Each rule has one function, ``apply``, the equation itself. The canonized mixers call it through the rule set bound
into their forwards (:py:class:`~zennit_mamba.core.ruleset.RuleSet`); on a standalone module a rule registers, as a
Zennit hook, a forward hook that applies the same function to the module's output (:py:meth:`Rule.on_output`). How
a rule attaches to a particular kind of module (an attention implementation, a gated MLP, a standard RMSNorm's own
forward) is the business of :py:mod:`zennit_mamba.core.layers`; this module imports torch and zennit only.
'''
from typing import ClassVar, Optional, Tuple

import torch
from zennit.core import Hook, RemovableHandle, RemovableHandleList

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
        #: whether the rule acts on a call (an object whose ``on()`` says so, the composite's
        #: :py:class:`~zennit_mamba.core.switch.RuleSwitch` once it attaches the rule); None: always
        self.switch = None

    def register(self, module: torch.nn.Module) -> RemovableHandleList:
        if type(self).on_output is Rule.on_output:
            raise TypeError(
                f'{type(self).__name__} acts inside canonized Mamba mixers (MambaCanonizer binds it), not on a '
                f'{type(module).__name__}.'
            )
        return RemovableHandleList([RemovableHandle(self), module.register_forward_hook(self._on_output_where_on)])

    def acts(self) -> bool:
        '''Whether the rule acts on a call made now (its switch is on).'''
        return self.switch is None or self.switch.on()

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


class LNRule(_ConstantFactor):
    '''LN-rule: the normalisation's denominator held constant.

    RMSNorm ``u = w * h * r`` with ``r = rsqrt(mean(h^2) + eps)`` constant is diagonal in ``h``: ``R(h_i) = R(u_i)``
    (``u / h`` held constant, :py:meth:`apply`). LayerNorm ``u = w * (h - mean(h)) * r + b`` with
    ``r = rsqrt(var(h) + eps)`` constant is linear in ``h``, the centring included (:py:meth:`apply_centred`).
    '''

    name = 'norm'

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
        dims = tuple(range(-len(module.normalized_shape), 0))
        return self.apply_centred(h, output, dims, module.weight, module.bias, module.eps)


class HalfRule(Rule):
    '''Half rule for a multiplicative gate ``o = y * g``: each factor receives half the relevance.

    ``o = 0.5 * o + 0.5 * o.detach()``: gradient x input gives ``R(y) = R(g) = R(o) / 2``, where plain gradient x
    input gives each factor all of ``R(o)`` and doubles it.
    '''

    name = 'gate'

    @staticmethod
    def apply(product: torch.Tensor) -> torch.Tensor:
        return _HalfGradient.apply(product) if product.requires_grad else product


class HeldGate(Rule):
    '''The gate rule's second treatment, ``gate_relevance='value'``: a mixer's output gate ``o = y * g``, ``g = act(z)``
    computed from the current token alone, is held constant like the selection, so relevance flows through the
    mixer's output ``y`` only.

    ``o = y * g.detach()``: gradient x input gives ``R(y) = R(o)`` and ``R(z) = 0``, where the half rule gives each
    factor ``R(o) / 2``. It applies MambaLRP's first principle (what the input selects is held) to the gate, as the
    library already treats the sigmoid output gates of Kimi, MiniMax and xLSTM.
    '''

    name = 'gate'

    @staticmethod
    def apply(gate: torch.Tensor) -> torch.Tensor:
        return gate.detach()


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
    held constant, so relevance flows through the values only; the routing weights of mixtures of experts and the
    scales ``s(x)`` of squeeze-and-excitation ``x * s(x)`` are held constant likewise.

    On a module's output (a router's weights and indices) every tensor is held constant.
    '''

    name = 'attention'

    @staticmethod
    def apply(constant: torch.Tensor) -> torch.Tensor:
        return constant.detach()

    def on_output(self, module, args, output):
        if torch.is_tensor(output):
            return self.apply(output)
        return tuple(self.apply(value) if torch.is_tensor(value) else value for value in output)


RULES = {rule.name: rule for rule in (SiLUIdentity, LNRule, HalfRule, DetachSelection, AttentionRule)}
