'''MambaLRP rules as Zennit hooks.

Inside a Zennit composite the tensor that flows backward is relevance, not gradient. Each rule below maps the
relevance of a module's output to the relevance of its input:

* :py:class:`SiLUIdentity` -- SiLU with the sigmoid factor held constant: relevance passes unchanged.
* :py:class:`HalfRule` -- a product of factors: each factor receives an equal share.
* :py:class:`DetachSelection` -- the selective scan with ``delta, B, C`` held constant: LRP-0 through the scan,
  which is then linear in ``x``.
* :py:class:`LNRule` -- RMSNorm with its denominator held constant: relevance passes unchanged.
* :py:class:`MixerRules` -- the SiLU, SSM and gate rules of a whole mixer in one pass, written as detaches.
* :py:class:`GradientTimesInput` -- LRP-0 through any module, ``R_in = x * J^T (R_out / y)``; on a module that is not
  linear in its input this is plain gradient x input, which is how the ablations switch a MambaLRP rule off.
'''
import weakref
from typing import Callable, Collection, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from zennit.core import Hook, RemovableHandle, RemovableHandleList, Stabilizer
from zennit.rules import Pass

from .layers import DETACH_ATTRIBUTE, SelectiveScan

StabilizerLike = Union[float, Callable[[torch.Tensor], torch.Tensor]]
#: the MambaLRP rules that can be switched on and off (``'attention'`` acts in hybrid models only)
MAMBA_LRP_RULES = frozenset({'silu', 'ssm', 'gate', 'norm', 'attention'})
#: the attribute of a canonized mixer that holds its registered :py:class:`MixerRules` (or the model's ModelRules)
RULE_ATTRIBUTE = 'lrp_mixer_rules'


class _RelevanceToGradient(torch.autograd.Function):
    '''Identity whose backward divides the incoming relevance by the (stabilised) output, while its hook is active:
    where a rule's relevance enters a module's own autograd graph.'''

    @staticmethod
    def forward(ctx, output: torch.Tensor, stabilizer: Callable, hook_ref: Callable) -> torch.Tensor:
        ctx.save_for_backward(output)
        ctx.stabilizer = stabilizer
        ctx.hook_ref = hook_ref
        return output.view_as(output)

    @staticmethod
    def backward(ctx, relevance: torch.Tensor) -> Tuple[Optional[torch.Tensor], None, None]:
        output, = ctx.saved_tensors
        hook = ctx.hook_ref()
        if hook is None or not hook.active:
            return relevance, None, None
        # what zennit's Hook.pre_backward keeps, so that tools reading a hook's stored tensors see it fired
        hook.stored_tensors['grad_output'] = (relevance,)
        return relevance / ctx.stabilizer(output), None, None


class _GradientToRelevance(torch.autograd.Function):
    '''Identity whose backward multiplies the gradient by the input, while its hook is active: where relevance leaves
    a module's own autograd graph.'''

    @staticmethod
    def forward(ctx, input: torch.Tensor, hook_ref: Callable) -> torch.Tensor:
        ctx.save_for_backward(input)
        ctx.hook_ref = hook_ref
        return input.view_as(input)

    @staticmethod
    def backward(ctx, gradient: torch.Tensor) -> Tuple[torch.Tensor, None]:
        input, = ctx.saved_tensors
        return (gradient * input if _is_active(ctx.hook_ref) else gradient), None


def _is_active(hook_ref: Callable) -> bool:
    hook = hook_ref()
    return hook is not None and hook.active


def relevance_to_gradient(output: torch.Tensor, stabilizer: StabilizerLike, hook: Hook) -> torch.Tensor:
    '''``output``, whose incoming relevance is divided by ``stabilize(output)`` in the backward pass while ``hook`` is
    active (:py:meth:`zennit.core.Composite.inactive` switches it off).'''
    if not output.requires_grad:
        return output
    return _RelevanceToGradient.apply(output, Stabilizer.ensure(stabilizer), weakref.ref(hook))


def gradient_to_relevance(input: torch.Tensor, hook: Hook) -> torch.Tensor:
    '''``input``, whose outgoing gradient is multiplied by ``input`` in the backward pass while ``hook`` is active.'''
    if not (input.requires_grad and input.is_floating_point()):
        return input
    return _GradientToRelevance.apply(input, weakref.ref(hook))


class GradientTimesInput(Hook):
    '''LRP-0 through a module's own autograd graph: ``R_in = x * J^T (R_out / stabilize(y))``.

    The division is applied to the relevance arriving at the module's output and the multiplication to the gradient
    leaving its input, so the module's forward runs once and its graph is differentiated once. For a module that is
    linear in its input (a Linear without bias, or a Mamba operation whose input-dependent factors are detached),
    relevance is conserved.

    The conversions are autograd functions inserted by plain torch forward hooks (the first output, every
    floating-point positional input), not zennit's ``Hook.pre_forward``/``post_forward``, whose signatures differ
    between zennit 0.5 and 1.0; each call of the module keeps its own tensors, so a module called twice is explained
    correctly.

    Parameters
    ----------
    stabilizer : float or callable, optional
        Stabiliser of the division, as in :py:class:`zennit.rules.Epsilon`.

    Examples
    --------
    >>> module = torch.nn.Linear(3, 2, bias=False)
    >>> handles = GradientTimesInput().register(module)
    >>> x = torch.randn(1, 3, requires_grad=True)
    >>> y = module(x)
    >>> relevance, = torch.autograd.grad(y, x, y)
    >>> handles.remove()
    >>> bool(torch.allclose(relevance.sum(), y.sum()))
    True
    '''

    def __init__(self, stabilizer: StabilizerLike = 1e-6):
        super().__init__()
        self.stabilizer = stabilizer

    def register(self, module: torch.nn.Module) -> RemovableHandleList:
        '''Convert relevance to gradient at ``module``'s output and back at its inputs; the handles undo it.'''
        return RemovableHandleList([
            RemovableHandle(self),
            module.register_forward_pre_hook(self._relevance_leaves_at_inputs),
            module.register_forward_hook(self._relevance_enters_at_output),
        ])

    def _relevance_leaves_at_inputs(self, module: torch.nn.Module, args: tuple) -> tuple:
        return tuple(gradient_to_relevance(arg, self) if torch.is_tensor(arg) else arg for arg in args)

    def _relevance_enters_at_output(self, module: torch.nn.Module, args: tuple, output):
        if isinstance(output, tuple):
            return (relevance_to_gradient(output[0], self.stabilizer, self),) + tuple(output[1:])
        return relevance_to_gradient(output, self.stabilizer, self)

    def copy(self) -> 'GradientTimesInput':
        return self.__class__(self.stabilizer)


class _ModuleSetting(GradientTimesInput):
    '''A :py:class:`GradientTimesInput` that also sets an attribute of its module while registered.'''

    attribute = ''

    def __init__(self, stabilizer: StabilizerLike = 1e-6):
        super().__init__(stabilizer)
        self._module: Optional[weakref.ref] = None

    def check(self, module: torch.nn.Module) -> None:
        '''Raise a TypeError for a module this rule does not apply to.'''

    def register(self, module: torch.nn.Module):
        self.check(module)
        handles = super().register(module)
        setattr(module, self.attribute, self)
        self._module = weakref.ref(module)
        return handles

    def remove(self):
        super().remove()
        module = self._module() if self._module is not None else None
        if module is not None and getattr(module, self.attribute, None) is self:
            delattr(module, self.attribute)
        self._module = None


class DetachSelection(_ModuleSetting):
    '''MambaLRP rule for the selective SSM: ``delta``, ``A_bar``, ``B_bar`` and ``C`` are constants.

    While registered, the :py:class:`~zennit_mamba.layers.SelectiveScan` computes its autograd graph with the
    input-dependent parameters detached; its output is then linear in ``x`` (state path and ``D`` skip) and LRP-0
    through that graph conserves relevance. The selection inputs receive no relevance.

    Parameters
    ----------
    stabilizer : float or callable, optional
        Stabiliser of the division, as in :py:class:`zennit.rules.Epsilon`.
    '''

    attribute = DETACH_ATTRIBUTE

    def check(self, module: torch.nn.Module) -> None:
        if not isinstance(module, SelectiveScan):
            raise TypeError(f'DetachSelection applies to SelectiveScan modules, not {type(module).__name__}')


class MixerRules(_ModuleSetting):
    '''All MambaLRP rules of a canonized Mamba mixer, applied in one pass over the whole mixer.

    While registered, the mixer computes its forward with the rules written as detaches (:py:func:`silu`,
    :py:func:`half_rule`, the selection detached in the scan), and relevance passes through it as gradient x input:
    ``R_in = x * J^T (R_out / stabilize(y))``. This equals the rules applied module by module with LRP-0 on the
    projections, but the mixer's submodules carry no hooks, so it costs one gradient.

    Parameters
    ----------
    rules : collection of str, optional
        The mixer's MambaLRP rules that are on, a subset of ``{'silu', 'ssm', 'gate'}``; an operation whose rule is
        off is differentiated as it is.
    stabilizer : float or callable, optional
        Stabiliser of the division at the mixer output, as in :py:class:`zennit.rules.Epsilon`.
    recompute : bool, optional
        Keep only the mixer's input for the backward pass and recompute the rest there
        (:py:func:`torch.utils.checkpoint.checkpoint`): memory per layer no longer grows with the mixer's width.

    Examples
    --------
    >>> from transformers import MambaConfig, MambaModel
    >>> from zennit_mamba import MambaCanonizer
    >>> model = MambaModel(MambaConfig(vocab_size=10, hidden_size=8, state_size=4, num_hidden_layers=1))
    >>> canonizers = MambaCanonizer().apply(model)
    >>> mixer = model.layers[0].mixer
    >>> handles = MixerRules().register(mixer)
    >>> u = torch.randn(1, 5, 8, requires_grad=True)
    >>> y = mixer(u)
    >>> relevance, = torch.autograd.grad(y, u, y)
    >>> handles.remove()
    >>> for canonizer in canonizers:
    ...     canonizer.remove()
    >>> bool(torch.isclose(relevance.sum(), y.sum(), rtol=1e-3))
    True
    '''

    attribute = RULE_ATTRIBUTE

    def __init__(
        self,
        rules: Collection[str] = frozenset({'silu', 'ssm', 'gate'}),
        stabilizer: StabilizerLike = 1e-6,
        recompute: bool = False,
    ):
        super().__init__(stabilizer)
        self.rules = frozenset(rules)
        self.recompute = recompute

    def check(self, module: torch.nn.Module) -> None:
        if not reads_mixer_rules(module):
            raise TypeError(f'MixerRules applies to canonized Mamba mixers, not {type(module).__name__}')

    def copy(self) -> 'MixerRules':
        return self.__class__(self.rules, self.stabilizer, self.recompute)


def is_canonized_mixer(module: torch.nn.Module) -> bool:
    '''Whether ``module`` is a Mamba-1 or Mamba-2 mixer carrying a canonizer's submodules.'''
    return hasattr(module, 'lrp_scan') or hasattr(module, 'lrp_core')


def reads_mixer_rules(module: torch.nn.Module) -> bool:
    '''Whether ``module`` computes with the rules of a :py:class:`MixerRules` registered on it: a canonized mixer,
    or the core of a canonized Mamba-2 mixer.'''
    return getattr(module, 'reads_mixer_rules', False) or is_canonized_mixer(module)


def silu(x: torch.Tensor, identity_rule: bool = True) -> torch.Tensor:
    '''SiLU; with ``identity_rule`` the sigmoid factor is a constant for autograd (``x * sigmoid(x).detach()``).'''
    if identity_rule:
        return x * torch.sigmoid(x).detach()
    return F.silu(x)


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
        ratio = torch.where(input == 0, 0.0, output / input)
        return (gradient * ratio).to(input.dtype), None


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

    Gradient x input through the result passes each element's relevance unchanged: the identity rule of SiLU for
    any activation with ``f(0) = 0``, and the LN-rule for a norm whose denominator is held constant.

    Examples
    --------
    >>> x = torch.tensor([-1.0, 0.0, 2.0], requires_grad=True)
    >>> y = identity_rule(x, torch.nn.functional.silu(x))
    >>> gradient, = torch.autograd.grad(y, x, torch.ones(3))  # output relevance y, divided by y
    >>> torch.allclose(x * gradient, y)
    True
    '''
    return _IdentityRule.apply(input, output) if input.requires_grad else output


def half_rule(product: torch.Tensor) -> torch.Tensor:
    '''The product of two factors with half its gradient: gradient x input gives each factor half the relevance.'''
    return _HalfGradient.apply(product) if product.requires_grad else product


def gate_product(value: torch.Tensor, gate: torch.Tensor, half: bool = True) -> torch.Tensor:
    '''``value * gate``; with ``half``, under the half rule (the MambaLRP gate rule, see :py:func:`half_rule`).'''
    product = value * gate
    return half_rule(product) if half else product


class SiLUIdentity(Pass):
    '''MambaLRP rule for SiLU: ``y = x * sigmoid(x)`` with the sigmoid held constant, so ``R(x) = R(y)``.

    Gradient x input of ``x * sigmoid(x).detach()`` gives ``x * sigmoid(x) * R / y = R`` exactly, which is what
    passing the relevance through computes, without the division.
    '''


class LNRule(Pass):
    '''LN-rule for RMSNorm: ``u = w * h * r`` with ``r = rsqrt(mean(h^2) + eps)`` held constant.

    The normalisation is then diagonal in ``h``, and each element keeps its relevance: ``R(h_i) = R(u_i)``.
    '''


class HalfRule(Hook):
    '''MambaLRP rule for a multiplicative gate ``o = y * g``: each factor receives half the relevance.

    Equivalent to gradient x input of ``0.5 * o + 0.5 * o.detach()``. The module's input holds the factors stacked
    along its last dimension (:py:class:`~zennit_mamba.layers.GateProduct`); with ``n`` factors each receives
    ``R / n``.
    '''

    def backward(self, module, grad_input, grad_output):
        factors = grad_input[0].shape[-1]
        share = grad_output[0].unsqueeze(-1) / factors
        return (share.expand_as(grad_input[0]),) + (None,) * (len(grad_input) - 1)
