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
from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Tuple, Union

import torch
from zennit.core import Hook, RemovableHandle, RemovableHandleList, Stabilizer

from .upstream import check_hooks_added_during_a_call
from .walk import modules_parents_first

StabilizerLike = Union[float, Callable[[torch.Tensor], torch.Tensor]]


def _active(hook_ref: Callable) -> Optional[Hook]:
    hook = hook_ref()
    return hook if hook is not None and hook.active else None


class _RelevanceToGradient(torch.autograd.Function):
    '''Identity whose backward divides the incoming relevance by the (stabilised) output while its hook is active.'''

    @staticmethod
    def forward(ctx, output: torch.Tensor, stabilizer: Callable, hook_ref: Callable) -> torch.Tensor:
        ctx.save_for_backward(output)
        ctx.stabilizer, ctx.hook_ref = stabilizer, hook_ref
        return output.view_as(output)

    @staticmethod
    def backward(ctx, relevance: torch.Tensor) -> Tuple[torch.Tensor, None, None]:
        output, = ctx.saved_tensors
        if _active(ctx.hook_ref) is None:
            return relevance, None, None
        return relevance / ctx.stabilizer(output), None, None


class _GradientToRelevance(torch.autograd.Function):
    '''Identity whose backward multiplies the gradient by the input while its hook is active.'''

    @staticmethod
    def forward(ctx, input: torch.Tensor, hook_ref: Callable) -> torch.Tensor:
        ctx.save_for_backward(input)
        ctx.hook_ref = hook_ref
        return input.view_as(input)

    @staticmethod
    def backward(ctx, gradient: torch.Tensor) -> Tuple[torch.Tensor, None]:
        input, = ctx.saved_tensors
        if _active(ctx.hook_ref) is None:
            return gradient, None
        relevance = gradient * input
        if not torch.isfinite(relevance).all():
            # the input was checked in the forward: the output, or a value on the way to it, is not finite
            raise FloatingPointError(
                f'The relevance at the explained model\'s input holds NaN or inf (examples '
                f'{_examples_with(~torch.isfinite(relevance))} of the batch) although the input is finite: the '
                f'explained output, or a value on the way to it, overflowed in {input.dtype}. This happens in '
                f'bfloat16 and float16 with long inputs or untrained weights; explain the model in float32 '
                f'(model.float()), or check its output for those examples.'
            )
        return relevance, None


def _examples_with(mask: torch.Tensor) -> list:
    '''The batch indices where ``mask`` (batch first) holds any True.'''
    return mask.reshape(len(mask), -1).any(1).nonzero().flatten().tolist() if mask.dim() else [0]


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
    (:py:func:`~zennit_mamba.upstream.check_hooks_added_during_a_call`).

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
        # per thread (one context may serve several): the module of the outermost call, how often it is entered
        # within itself, and whether that call's arguments took the multiplication
        self._local = threading.local()
        # per thread, the exit hook of its latest outermost call (removed lazily, see _enter)
        self._exits: Dict[int, torch.utils.hooks.RemovableHandle] = {}

    def _thread_state(self) -> threading.local:
        if not hasattr(self._local, 'outermost'):
            self._local.outermost, self._local.depth, self._local.input_multiplied = None, 0, False
        return self._local

    def copy(self) -> 'ExplainedModel':
        return self.__class__(self.stabilizer, self.opaque)

    def register(self, module: torch.nn.Module,
                 tracked: Optional[Iterable[torch.nn.Module]] = None) -> RemovableHandleList:
        '''Register the ends on ``module``: the embeddings' hook and a pre-hook on each tracked module, which are
        ``tracked`` where the caller has walked the model already (its modules parents first, each once, none inside
        an opaque module), else found here.'''
        check_hooks_added_during_a_call()
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
        for value in inputs:
            if not torch.isfinite(value).all():
                examples = _examples_with(~torch.isfinite(value))
                raise ValueError(
                    f'An input of the explained model holds NaN or inf (examples {examples} of the batch): its '
                    f'relevance would be NaN. Remove or replace those values before explaining.'
                )
        self._thread_state().input_multiplied = bool(inputs)
        return tuple(map(multiply, args)), {key: multiply(value) for key, value in kwargs.items()}

    def _relevance_leaves_at_embeddings(self, module, input, output):
        state = self._thread_state()
        if state.outermost is not None and not state.input_multiplied:
            return gradient_to_relevance(output, self)
        return None


class _ThroughZennitRule(torch.autograd.Function):
    '''``output`` of ``module`` on ``input``, whose backward maps the gradient at the output through a Zennit rule:
    ``g_in = rule(x, y * g) / x``; while the hook is inactive, the gradient passes to ``output``'s own graph.'''

    @staticmethod
    def forward(ctx, input, output, hook_ref, module):
        ctx.save_for_backward(input, output)
        ctx.hook_ref, ctx.module = hook_ref, module
        return output.view_as(output)

    @staticmethod
    def backward(ctx, gradient):
        input, output = ctx.saved_tensors
        hook = _active(ctx.hook_ref)
        if hook is None:
            return None, gradient, None, None
        relevance = hook.relevance(ctx.module, input, output * gradient)
        return torch.where(input == 0, 0.0, relevance / input).to(input.dtype), None, None, None


class ZennitRule(Hook):
    '''A Zennit rule on one module inside a one-pass explanation.

    At the module's output the gradient becomes relevance, ``R_out = y * g``; the rule computes ``R_in`` from the
    module's input of that call (Zennit's ``BasicHook`` rules: Epsilon, Gamma, ZPlus, AlphaBeta, ...; ``Pass``); at the
    input it becomes gradient again, ``g_in = R_in / x`` (0 where ``x`` is 0, where these rules give no relevance).
    Works with zennit 0.5 and 1.0, and for a module called several times.

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
        # the Zennit rule keeps the input it works on in its own state: one backward pass at a time uses it
        self._lock = threading.Lock()

    def copy(self) -> 'ZennitRule':
        return self.__class__(self.rule.copy())

    def register(self, module: torch.nn.Module) -> RemovableHandleList:
        return RemovableHandleList([RemovableHandle(self), module.register_forward_hook(self._through_rule)])

    def _through_rule(self, module, args, output):
        if not (args and _is_float_tensor(args[0])):
            return None
        return replace_output(output, lambda tensor: _ThroughZennitRule.apply(args[0], tensor, weakref.ref(self),
                                                                              module))

    def relevance(self, module: torch.nn.Module, input: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
        '''``R_in`` of ``module``'s input ``input`` for the output relevance ``relevance``, by the Zennit rule.'''
        with self._lock:
            # what zennit 0.5 (input) and 1.0 (input and kwargs) store in the forward pass, for this call
            self.rule.stored_tensors.update(input=(input,), kwargs={})
            try:
                with torch.enable_grad():
                    result = self.rule.backward(_shadow(module), (input,), (relevance,))
            finally:
                self.rule.stored_tensors.clear()
        return result[0]


def _shadow(module: torch.nn.Module) -> torch.nn.Module:
    '''``module`` with parameter and buffer dicts of its own: Zennit's rules swap in modified parameters while they
    compute (``ParamMod``), which must not reach a forward of the module running meanwhile in another thread.'''
    shadow = object.__new__(type(module))
    shadow.__dict__.update(module.__dict__)
    shadow.__dict__.update(_parameters=dict(module._parameters), _buffers=dict(module._buffers))
    return shadow
