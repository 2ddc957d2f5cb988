'''Where relevance turns into gradient and back: the two ends of an explained model, and the boundary of a Zennit
rule (Epsilon, Gamma, ZPlus, ...) inside it.

With the MambaLRP rules written into the forward (:py:mod:`zennit_mamba.rules`), the relevance of any tensor ``h``
inside the model is ``h * gradient``. :py:class:`ExplainedModel` divides the output relevance by the output where it
enters and multiplies the gradient by the input where it leaves, so that gradient x input of the whole call is the
relevance, at the cost of one gradient. :py:class:`ZennitRule` does the same around one module whose relevance a
Zennit rule computes: ``R_out = y * g`` at its output, the rule's ``R_in``, and ``g_in = R_in / x`` at its input (as
LXT's efficient mode embeds Zennit rules). Every conversion is an autograd function created per call, so a module
called twice is explained correctly.
'''
import functools
import threading
import weakref
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Tuple, Union

import torch
from torch.nn.utils import parametrize
from zennit.core import BasicHook, Hook, RemovableHandle, RemovableHandleList, Stabilizer

from zennit_mamba.core.switch import RuleSwitch, acts
from zennit_mamba.core.upstream import check_hooks_added_during_a_call
from zennit_mamba.core.walk import modules_parents_first

StabilizerLike = Union[float, Callable[[torch.Tensor], torch.Tensor]]

#: the suffixes of the parameters that torch's pre-hook reparametrisations compute ``<name>`` from before each call:
#: pruning and spectral_norm (``_orig``), the older weight_norm (``_g``, ``_v``)
_COMPUTED_FROM = ('_orig', '_g', '_v')


def _registered(hook_ref: Callable) -> Hook:
    '''The hook of a conversion made in the forward pass, or raise where its composite was removed, or switched off
    (``inactive()``), since: that graph holds the rules' detached factors, and its gradient without the conversions
    would be neither the relevance nor the plain gradient.'''
    hook = hook_ref()
    if hook is None or getattr(hook, 'removed', False):
        raise RuntimeError(
            'This gradient passes through a MambaLRP explanation whose composite was removed since the forward pass '
            '(its context was left, or remove() called): it would be neither the relevance nor the plain gradient. '
            'Take the gradient (torch.autograd.grad or backward) inside the composite\'s context.'
        )
    if not hook.active:
        raise RuntimeError(
            'This gradient is taken inside composite.inactive() through a forward pass computed with the MambaLRP '
            'rules: it would be neither the relevance nor the plain gradient. For the plain gradient, compute the '
            'forward pass inside inactive() too.'
        )
    return hook


class _RelevanceToGradient(torch.autograd.Function):
    '''Identity whose backward divides the incoming relevance by the (stabilised) output.'''

    @staticmethod
    def forward(ctx, output: torch.Tensor, stabilizer: Callable, hook_ref: Callable) -> torch.Tensor:
        ctx.save_for_backward(output)
        ctx.stabilizer, ctx.hook_ref = stabilizer, hook_ref
        return output.view_as(output)

    @staticmethod
    def backward(ctx, relevance: torch.Tensor) -> Tuple[torch.Tensor, None, None]:
        output, = ctx.saved_tensors
        _registered(ctx.hook_ref)
        return relevance / ctx.stabilizer(output), None, None


class ZeroInputRelevance:
    '''Relevance that a Zennit rule gives to elements of its input that are exactly 0 (Flat, WSquare, ZBox do): as
    gradient x input it would be 0, so the rule of a layer that takes an explained input directly hands it to that
    input's conversion here, which adds it to the input's relevance.'''

    #: the attribute of a converted input tensor that holds its ZeroInputRelevance
    ATTRIBUTE = '_mamba_lrp_zero_input_relevance'

    def __init__(self):
        self._relevance: Optional[torch.Tensor] = None

    def add(self, relevance: torch.Tensor) -> None:
        self._relevance = relevance if self._relevance is None else self._relevance + relevance

    def take(self) -> Optional[torch.Tensor]:
        relevance, self._relevance = self._relevance, None
        return relevance


class _GradientToRelevance(torch.autograd.Function):
    '''Identity whose backward multiplies the gradient by the input, and adds the relevance that rules gave to its
    zero elements.'''

    @staticmethod
    def forward(ctx, input: torch.Tensor, hook_ref: Callable, zero_inputs: ZeroInputRelevance) -> torch.Tensor:
        ctx.save_for_backward(input)
        ctx.hook_ref, ctx.zero_inputs = hook_ref, zero_inputs
        return input.view_as(input)

    @staticmethod
    def backward(ctx, gradient: torch.Tensor) -> Tuple[torch.Tensor, None, None]:
        input, = ctx.saved_tensors
        _registered(ctx.hook_ref)
        relevance = gradient * input
        at_zeros = ctx.zero_inputs.take()
        if at_zeros is not None:
            relevance = relevance + at_zeros
        check_relevance_finite(relevance)
        return relevance, None, None


def check_relevance_finite(relevance: torch.Tensor) -> None:
    '''Raise where relevance of a finite input (checked in the forward pass) holds NaN or inf, naming the examples.'''
    if not torch.isfinite(relevance).all():
        raise FloatingPointError(
            f'The relevance at the explained model\'s input holds NaN or inf (examples '
            f'{_examples_with(~torch.isfinite(relevance))} of the batch) although the input is finite: the '
            f'explained output, or a value on the way to it, overflowed in {relevance.dtype}. This happens in '
            f'bfloat16 and float16 with long inputs or untrained weights; explain the model in float32 '
            f'(model.float()), or check its output for those examples.'
        )


def _examples_with(mask: torch.Tensor) -> list:
    '''The batch indices where ``mask`` (batch first) holds any True.'''
    return mask.reshape(len(mask), -1).any(1).nonzero().flatten().tolist() if mask.dim() else [0]


def relevance_to_gradient(output: torch.Tensor, stabilizer: StabilizerLike, hook: Hook) -> torch.Tensor:
    '''``output``, whose incoming relevance is divided by ``stabilize(output)`` in the backward pass (which ``hook``'s
    removal, or :py:meth:`zennit.core.Composite.inactive`, since the forward pass refuses).'''
    if not output.requires_grad:
        return output
    return _RelevanceToGradient.apply(output, Stabilizer.ensure(stabilizer), weakref.ref(hook))


def gradient_to_relevance(input: torch.Tensor, hook: Hook) -> torch.Tensor:
    '''``input``, whose outgoing gradient is multiplied by ``input`` in the backward pass (plus the relevance a Zennit
    rule on a layer that takes it gives to its zero elements).'''
    if not (input.requires_grad and input.is_floating_point()):
        return input
    zero_inputs = ZeroInputRelevance()
    converted = _GradientToRelevance.apply(input, weakref.ref(hook), zero_inputs)
    setattr(converted, ZeroInputRelevance.ATTRIBUTE, zero_inputs)
    return converted


def replace_output(output: Any, function: Callable[[torch.Tensor], torch.Tensor], field: Optional[str] = None) -> Any:
    '''A module's ``output`` with ``function`` applied to one tensor of it, or None where it has no such tensor.

    The tensor is the output itself, the entry ``field`` (the first entry where None) of a dict such as transformers'
    ``ModelOutput`` or of a namedtuple such as mamba-ssm's ``CausalLMOutput`` (both keep their type), or the first
    element of a tuple.

    Examples
    --------
    >>> replace_output((torch.ones(2), 'cache'), torch.neg)
    (tensor([-1., -1.]), 'cache')
    >>> replace_output({'loss': None}, torch.neg, field='logits') is None
    True
    '''
    if torch.is_tensor(output):
        return function(output)
    if isinstance(output, dict):
        key = next(iter(output), None) if field is None else field
        if not torch.is_tensor(output.get(key)):
            return None
        output[key] = function(output[key])
        return output
    if hasattr(output, '_replace'):
        fields = output._fields
        key = (fields[0] if fields else None) if field is None else field
        if key not in fields or not torch.is_tensor(getattr(output, key)):
            return None
        return output._replace(**{key: function(getattr(output, key))})
    if isinstance(output, tuple) and output and torch.is_tensor(output[0]):
        return (function(output[0]),) + tuple(output[1:])
    return None


def _is_float_tensor(value) -> bool:
    return torch.is_tensor(value) and value.is_floating_point()


def check_finite(inputs: Iterable[torch.Tensor]) -> None:
    '''Raise for an input that holds NaN or inf, naming the examples: its relevance would be NaN.'''
    for value in inputs:
        if not torch.isfinite(value).all():
            raise ValueError(
                f'An input of the explained model holds NaN or inf (examples {_examples_with(~torch.isfinite(value))} '
                f'of the batch): its relevance would be NaN. Remove or replace those values before explaining.'
            )


def _refuse_function_transforms() -> None:
    '''Raise inside a ``torch.func`` transform (``vjp``, ``grad``, ``jacrev``, ``vmap``): the rules are autograd
    functions of the classic form, which those transforms cannot trace.'''
    functorch = getattr(torch._C, '_functorch', None)
    peek = getattr(functorch, 'peek_interpreter_stack', None)
    if peek is not None and peek() is not None:
        raise RuntimeError(
            'A MambaLRP explanation runs under a torch.func transform (vjp, grad, jacrev, vmap), which cannot trace '
            'its rules: take the relevance with torch.autograd.grad(output, inputs, output_relevance) inside the '
            'composite\'s context instead (or Captum\'s MambaLRP, which does).'
        )


class ExplainedModel(Hook):
    '''The two ends of an explanation: relevance enters at the output of the outermost call of any module of the
    model, divided by that output, and leaves at that call's inputs, multiplied by them: ``R = x * J^T (R_out / y)``.

    Registered on the root of a model by :py:class:`~zennit_mamba.MambaComposite`, after every other hook. The inputs
    are the call's floating-point tensor arguments (e.g. ``inputs_embeds``) or, where only token ids are passed, the
    input embedding layer's output. Because the ends are those of the outermost call, calling parts of the model in
    turn (the backbone, then the head) gives each part's relevance, as layer-by-layer rules would. Inside the call,
    tensors carry gradients of the rule-modified forward; the relevance of an inner tensor ``h`` is ``h * gradient``.

    A pre-hook on each tracked module notices the outermost call, which then registers the exit hook on its own module
    only, for the rest of the call (one hook per module instead of two: registration is host time on every
    explanation); that torch runs a hook registered this way is checked once per process
    (:py:func:`~zennit_mamba.core.upstream.check_hooks_added_during_a_call`).

    Parameters
    ----------
    stabilizer : float or callable, optional
        Stabiliser of the division at the output.
    opaque : tuple of type, optional
        Modules whose inside is not tracked (Mamba mixers, which may be recomputed in the backward pass, where their
        inner calls must not count as outermost).
    '''

    def __init__(self, stabilizer: StabilizerLike = 1e-6, opaque: Tuple[type, ...] = ()):
        super().__init__()
        self.stabilizer = stabilizer
        self.opaque = opaque
        #: whether the ends convert a call (:py:class:`~zennit_mamba.core.switch.RuleSwitch`; None: always)
        self.switch: Optional[RuleSwitch] = None
        #: set by remove(): a gradient through this explanation's graph is refused from then on
        self.removed = False
        # per thread (one context may serve several): the module of the outermost call, how often it is entered
        # within itself, and whether that call's arguments took the multiplication
        self._local = threading.local()
        # per thread, the exit hook of its latest outermost call (removed lazily, see _enter)
        self._exits: Dict[int, torch.utils.hooks.RemovableHandle] = {}

    def _thread_state(self) -> threading.local:
        if not hasattr(self._local, 'outermost'):
            self._local.outermost, self._local.depth, self._local.input_multiplied = None, 0, False
            self._local.at_caller = False
        return self._local

    def copy(self) -> 'ExplainedModel':
        hook = self.__class__(self.stabilizer, self.opaque)
        hook.switch = self.switch
        return hook

    @contextmanager
    def explained_by_caller(self, inputs: Tuple[torch.Tensor, ...] = ()) -> Iterator[Tuple[torch.Tensor, ...]]:
        '''Let the caller hold the two ends (as Captum's front ends do): inside the block, this thread's calls of the
        model convert nothing; the caller starts the backward pass from the value it explains, whose gradient is the
        output relevance divided by the output, exactly, and takes the relevance as gradient x input at ``inputs``,
        which it passes on converted (yielded). What it computes between them and the model (a transform of the
        inputs, a function of the logits, the model called in parts) is differentiated as it is, LRP-0 on it: a scaling
        passes relevance on exactly, a shift takes its share as a bias does.

        Parameters
        ----------
        inputs : tuple of Tensor, optional
            Float tensors that require grad, where the relevance leaves (none for relevance read at a layer).

        Yields
        ------
        tuple of Tensor
            ``inputs`` converted, to be passed on instead of them.

        Raises
        ------
        ValueError
            Where an input holds NaN or inf.
        '''
        check_finite(inputs)
        state = self._thread_state()
        previous, state.at_caller = state.at_caller, True
        try:
            yield tuple(gradient_to_relevance(value, self) for value in inputs)
        finally:
            state.at_caller = previous

    def register(self, module: torch.nn.Module,
                 tracked: Optional[Iterable[torch.nn.Module]] = None) -> RemovableHandleList:
        '''Register the ends on ``module``: the embeddings' hook and a pre-hook on each tracked module, which are
        ``tracked`` where the caller has walked the model already (its modules parents first, each once, none inside
        an opaque module), else found here.'''
        check_hooks_added_during_a_call()
        self.removed = False
        handles = RemovableHandleList([RemovableHandle(self)])
        embeddings = module.get_input_embeddings() if hasattr(module, 'get_input_embeddings') else None
        if embeddings is not None:
            handles.append(embeddings.register_forward_hook(self._relevance_leaves_at_embeddings))
        for submodule in self._tracked(module) if tracked is None else tracked:
            # first around each call, so that the conversion at the input wraps the hooks of other rules; the exit
            # hook is registered by the outermost call on its own module only (see _enter)
            handles.append(submodule.register_forward_pre_hook(self._enter, with_kwargs=True, prepend=True))
        return handles

    def remove(self) -> None:
        super().remove()
        self.removed = True
        for handle in list(self._exits.values()):
            handle.remove()
        self._exits.clear()

    def _tracked(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        '''The modules of ``model``, parents first and each once (blocks may be shared, as in Zamba2), without those
        inside opaque modules.'''
        for _, module in modules_parents_first(model, lambda module: not isinstance(module, self.opaque)):
            yield module

    def _enter(self, module, args, kwargs):
        state = self._thread_state()
        if state.outermost is None:
            if state.at_caller or not acts(self.switch):
                # the caller holds the ends, or the rules are off for this call (the model computes as if nothing
                # were registered)
                return None
            _refuse_function_transforms()
            args, kwargs = self._relevance_leaves_at_input(args, kwargs)
            state.outermost, state.depth = module, 1
            thread = threading.get_ident()
            # the previous call's exit hook is removed only now: removing it inside itself would change the hook
            # dictionary that torch iterates over when a forward raised
            stale = self._exits.pop(thread, None)
            if stale is not None:
                stale.remove()
            # registered during this call, after the module's other forward hooks, so that it runs last of them and
            # also when the forward raises (torch reads the forward hooks after the forward)
            self._exits[thread] = module.register_forward_hook(functools.partial(self._leave, thread),
                                                               always_call=True)
        elif module is state.outermost:
            state.depth += 1  # the outermost module called within itself
        return args, kwargs

    def _leave(self, thread, module, input, output):
        state = self._thread_state()
        if thread != threading.get_ident() or module is not state.outermost:
            return None  # another thread's exit hook on this module, or not the outermost call
        state.depth -= 1
        if state.depth:
            return None
        state.outermost = None
        if output is None:
            return None
        # at the logits where there are any: with labels=, transformers puts the loss first
        field = 'logits' if 'logits' in getattr(output, '_fields', output if isinstance(output, dict) else ()) else None
        return replace_output(output, lambda tensor: relevance_to_gradient(tensor, self.stabilizer, self), field)

    def _relevance_leaves_at_input(self, args: tuple, kwargs: dict) -> Tuple[tuple, dict]:
        '''Multiply the gradient at every floating-point tensor argument of the call by that argument; where there
        is none (token ids), the embeddings' hook does it.'''
        def multiply(value):
            return gradient_to_relevance(value, self) if _is_float_tensor(value) else value

        inputs = [value for value in args + tuple(kwargs.values()) if _is_float_tensor(value)]
        check_finite(inputs)
        self._thread_state().input_multiplied = bool(inputs)
        return tuple(map(multiply, args)), {key: multiply(value) for key, value in kwargs.items()}

    def _relevance_leaves_at_embeddings(self, module, input, output):
        state = self._thread_state()
        if state.outermost is not None and not state.input_multiplied:
            return gradient_to_relevance(output, self)
        return None


class _ThroughZennitRule(torch.autograd.Function):
    '''``output`` of ``module`` on ``input``, whose backward maps the gradient at the output through a Zennit rule:
    ``g_in = rule(x, y * g) / x``.'''

    @staticmethod
    def forward(ctx, input, output, hook_ref, module, parameters, zero_inputs):
        ctx.save_for_backward(input, output)
        ctx.hook_ref, ctx.module, ctx.parameters, ctx.zero_inputs = hook_ref, module, parameters, zero_inputs
        # a copy, not a view: a layer's output may be changed in place next (ReLU(inplace=True), BatchNorm)
        return output.clone()

    @staticmethod
    def backward(ctx, gradient):
        input, output = ctx.saved_tensors
        hook = _registered(ctx.hook_ref)
        output_relevance = output * gradient
        relevance = hook.relevance(ctx.module, input, output_relevance, ctx.parameters)
        if hook.kept is not None:
            # what the rule gives the input less than it received: the share of the layer's bias (and stabiliser)
            kept = output_relevance.sum() - relevance.sum()
            hook.kept[ctx.module] = hook.kept.get(ctx.module, 0.0) + kept.detach()
        zero = input == 0
        if ctx.zero_inputs is not None and hook.may_credit_zero_inputs:
            # the layer takes an explained input directly: its conversion adds what the rule gave to the zeros
            ctx.zero_inputs.add(torch.where(zero, relevance, 0.0).to(input.dtype))
        elif hook.may_credit_zero_inputs and bool((relevance.masked_fill(~zero, 0.0) != 0).any()):
            raise RuntimeError(
                f'{type(hook.rule).__name__} on a {type(ctx.module).__name__} gives relevance to input elements that '
                f'are exactly 0, which no gradient can carry (relevance leaves as gradient x input, 0 there): it would '
                f'be lost. Such rules (Flat, WSquare, ZBox) are exact only on a layer that takes the explained input '
                f'itself (the first layer, e.g. a patch embedding\'s convolution on the pixels). Put it there, or use '
                f'a rule that gives zero inputs no relevance (Epsilon, Gamma, ZPlus, AlphaBeta).'
            )
        return torch.where(zero, 0.0, relevance / input).to(input.dtype), None, None, None, None, None


class ZennitRule(Hook):
    '''A Zennit rule on one module inside a one-pass explanation.

    At the module's output the gradient becomes relevance, ``R_out = y * g``; the rule computes ``R_in`` from the
    module's input of that call (Zennit's ``BasicHook`` rules: Epsilon, Gamma, ZPlus, AlphaBeta, ...; ``Pass``); at the
    input it becomes gradient again, ``g_in = R_in / x``. Where ``x`` is 0, gradient x input is 0: the relevance a
    rule gives there (Flat, WSquare, ZBox do) is handed to the explained input's conversion where the layer takes that
    input itself, and refused with an error elsewhere. The rule computes with the parameters of the call, also where
    they are computed (``torch.nn.utils.parametrize``, weight norm). Works with zennit 0.5 and 1.0, and for a module
    called several times.

    Parameters
    ----------
    rule : :py:class:`zennit.core.Hook`
        The Zennit rule, e.g. ``Gamma(0.25)``; it is only asked for relevance, never registered itself.

    Examples
    --------
    >>> from zennit.rules import Epsilon
    >>> linear = torch.nn.Linear(3, 2, bias=False)
    >>> handles = ZennitRule(Epsilon(1e-9)).register(linear)
    >>> x = torch.randn(4, 3, requires_grad=True)
    >>> y = linear(x)
    >>> gradient, = torch.autograd.grad(y, x, torch.ones_like(y))  # relevance y at the output: gradient 1
    >>> handles.remove()
    >>> bool(torch.allclose((x * gradient).sum(1), y.sum(1), atol=1e-5))
    True
    '''

    def __init__(self, rule: Hook):
        super().__init__()
        self.rule = rule
        #: whether the rule acts on a call (:py:class:`~zennit_mamba.core.switch.RuleSwitch`; None: always)
        self.switch: Optional[RuleSwitch] = None
        #: whether the rule may give relevance to zero inputs (then checked in each backward pass)
        self.may_credit_zero_inputs = _may_credit_zero_inputs(rule)
        #: where set (:py:func:`zennit_mamba.constants.constant_relevance`), the relevance each module's rule keeps
        #: in a backward pass, ``R_out - R_in`` summed, is added to it by module
        self.kept: Optional[Dict[torch.nn.Module, torch.Tensor]] = None
        # the Zennit rule keeps the input it works on in its own state: one backward pass at a time uses it
        self._lock = threading.Lock()

    def copy(self) -> 'ZennitRule':
        hook = self.__class__(self.rule.copy())
        hook.switch = self.switch
        return hook

    def register(self, module: torch.nn.Module) -> RemovableHandleList:
        holders = _children_with_parameters(module)
        if isinstance(self.rule, BasicHook) and holders and not effective_parameters(module):
            raise TypeError(
                f'{type(self.rule).__name__} computes with the parameters of the module it is on, but this '
                f'{type(module).__name__} holds none of its own: its children ({", ".join(holders)}) do, and would '
                f'keep their parameters (a wrapper such as a LoRA adapter\'s). Put the rule on those layers, or merge '
                f'the wrapper into one layer first (peft: merge_and_unload()).'
            )
        return RemovableHandleList([RemovableHandle(self), module.register_forward_hook(self._through_rule)])

    def _through_rule(self, module, args, output):
        if not (args and _is_float_tensor(args[0])) or not acts(self.switch):
            return None
        # the parameters of this call (a parametrization computes them on each), and where the layer takes an
        # explained input itself, the place for the relevance of its zero elements
        parameters = effective_parameters(module)
        zero_inputs = getattr(args[0], ZeroInputRelevance.ATTRIBUTE, None)
        # an output another rule holds constant (the attention rule on a gate's or queries' projection, hooked
        # before) stays held: the rule would attach it to the input again, and relevance would pass the gate
        return replace_output(output, lambda tensor: tensor if not tensor.requires_grad else _ThroughZennitRule.apply(
            args[0], tensor, weakref.ref(self), module, parameters, zero_inputs))

    def relevance(self, module: torch.nn.Module, input: torch.Tensor, relevance: torch.Tensor,
                  parameters: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
        '''``R_in`` of ``module``'s input ``input`` for the output relevance ``relevance``, by the Zennit rule, with the
        ``parameters`` of the call (:py:func:`effective_parameters`; found now where not given).'''
        shadow = _shadow(module, effective_parameters(module) if parameters is None else parameters)
        with self._lock:
            # what zennit 0.5 (input) and 1.0 (input and kwargs) store in the forward pass, for this call
            self.rule.stored_tensors.update(input=(input,), kwargs={})
            try:
                with torch.enable_grad():
                    result = self.rule.backward(shadow, (input,), (relevance,))
            finally:
                self.rule.stored_tensors.clear()
        if result[0].shape != input.shape:
            raise RuntimeError(
                f'{type(self.rule).__name__} on a {type(module).__name__} gives relevance of shape '
                f'{tuple(result[0].shape)} for an input of shape {tuple(input.shape)}: the rule is not one for this '
                f'layer (Pass is for modules whose output has the input\'s shape).'
            )
        return result[0]


def _may_credit_zero_inputs(rule: Hook) -> bool:
    '''Whether ``rule`` may give relevance to inputs that are 0: not where it is a Zennit ``BasicHook`` whose input
    modifiers all map 0 to 0 (Epsilon, Gamma, ZPlus, AlphaBeta: their relevance is the input times a factor).'''
    modifiers = getattr(rule, 'input_modifiers', None)
    if not isinstance(rule, BasicHook) or not modifiers:
        return True
    zeros = torch.zeros(1, 1, 2, 2)
    try:
        return not all(torch.equal(modifier(zeros), zeros) for modifier in modifiers)
    except Exception:  # a modifier that needs a particular shape (ZBox's bounds): assume it may
        return True


def _children_with_parameters(module: torch.nn.Module) -> list:
    return [name for name, child in module.named_children() if any(True for _ in child.parameters())]


def effective_parameters(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    '''The parameters ``module``'s forward computes with now, by name: its own, and where one is computed from others
    the computed value in its place, not what it is computed from: ``torch.nn.utils.parametrize``'s, and the tensor
    that a forward pre-hook sets on the instance before each call from ``<name>_orig`` or ``<name>_g`` and
    ``<name>_v`` (pruning, the older ``weight_norm`` and ``spectral_norm``).

    Examples
    --------
    >>> linear = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(3, 2))
    >>> sorted(effective_parameters(linear)), bool(torch.equal(effective_parameters(linear)['weight'], linear.weight))
    (['bias', 'weight'], True)
    '''
    parameters = dict(module._parameters)
    if parametrize.is_parametrized(module):
        for name in module.parametrizations:
            parameters[name] = getattr(module, name)
    for name, value in module.__dict__.items():
        sources = [f'{name}{suffix}' for suffix in _COMPUTED_FROM if f'{name}{suffix}' in parameters]
        if sources and torch.is_tensor(value):
            for source in sources:
                del parameters[source]
            parameters[name] = value
    return parameters


def _shadow(module: torch.nn.Module, parameters: Dict[str, torch.Tensor]) -> torch.nn.Module:
    '''``module`` as its plain class (without a parametrization) with ``parameters`` and a buffer dict of its own:
    Zennit's rules swap in modified parameters while they compute (``ParamMod``), which must not reach a forward of the
    module running meanwhile in another thread, nor the tensors a parametrization computes them from.'''
    shadow = object.__new__(parametrize.type_before_parametrizations(module))
    shadow.__dict__.update(module.__dict__)
    modules = {name: child for name, child in module._modules.items() if name != 'parametrizations'}
    # a computed parameter as a Parameter (sharing its memory), as Zennit's ParamMod restores what it swapped
    parameters = {name: value if value is None or isinstance(value, torch.nn.Parameter)
                  else torch.nn.Parameter(value.detach(), requires_grad=False) for name, value in parameters.items()}
    shadow.__dict__.update(_parameters=parameters, _buffers=dict(module._buffers), _modules=modules)
    for name in parameters:
        shadow.__dict__.pop(name, None)  # weight_norm's computed weight is an instance attribute
    return shadow
