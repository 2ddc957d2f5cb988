'''MambaLRP in one pass over a whole model, with every rule written as a detach in the model's forward.

With the rules as detaches (identity SiLU, detached selection, half rule on gates, detached norm denominators, and in
hybrids attention probabilities held constant), a Mamba model is linear in its input embeddings (biases zeroed), and
relevance is gradient x input of that forward, ``R = x * J^T (R_out / y)``. This is the same relevance as LRP-0
layer by layer with the MambaLRP rules, it needs no assumption about how the layers are wired (residual sums,
parallel branches, scalar multipliers, tied blocks), and it costs one gradient: the backward pass runs no hook except
at its two ends, where relevance turns into gradient (divided by the output) and back (multiplied by the input).

The two ends are those of the outermost call of any module of the model, so calling a part of the model (the
backbone, then the head) gives the relevance of each part in turn, as layer-by-layer rules would.
'''
import copy
from typing import Any, Callable, FrozenSet, Iterator, List, Optional, Tuple

import torch
from zennit.core import Hook, RemovableHandle, RemovableHandleList

from .canonizers import InstanceAttributes
from .hybrid import (
    HYBRID_RULE_ATTRIBUTE, IMPLEMENTATION, activation_types, gated_mlp_output, is_attention, is_experts, is_rms_norm,
)
from .layers import PLAIN_SUM_ATTRIBUTE
from .rules import (
    MAMBA_LRP_RULES, RULE_ATTRIBUTE, StabilizerLike, gradient_to_relevance, half_rule, identity_rule,
    is_canonized_mixer, relevance_to_gradient,
)


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


def modules_outside_mixers(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    '''The modules of ``model``, parents first and each once (blocks may be shared, as in Zamba2), without those
    inside canonized mixers: a mixer computes with the rules by itself, and a recomputing mixer calls its inner
    modules again in the backward pass.'''
    seen, pending = set(), [model]
    while pending:
        module = pending.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield module
        if not is_canonized_mixer(module):
            pending.extend(reversed(list(module.children())))


class ModelRules(Hook):
    '''All MambaLRP rules of a model in one pass: gradient x input of its forward with the rules as detaches.

    Registered on the root of a model (a ``...ForCausalLM``, a backbone, a mamba-ssm ``MambaLMHeadModel``). Relevance
    enters at the first output of the outermost call of any of its modules, where it is divided by that output, as
    every Zennit rule does, and leaves at that call's floating-point tensor arguments (e.g. ``inputs_embeds``), or
    where only token ids are passed, at the input embedding layer's output. Inside the call,
    tensors carry gradients of the rule-modified forward; the relevance of an inner tensor ``h`` is ``h * gradient``.

    Parameters
    ----------
    rules : collection of str, optional
        The rules that are on, a subset of ``{'silu', 'ssm', 'gate', 'norm', 'attention'}``.
    stabilizer : float or callable, optional
        Stabiliser of the division at the output.
    recompute : bool, optional
        Recompute each Mamba mixer in the backward pass (see :py:class:`~zennit_mamba.rules.MixerRules`).

    Examples
    --------
    :py:class:`~zennit_mamba.MambaComposite` registers it by itself where no projection takes a rule of its own:

    >>> from transformers import BambaConfig, BambaForCausalLM
    >>> from zennit_mamba import MambaComposite
    >>> model = BambaForCausalLM(BambaConfig(
    ...     vocab_size=16, hidden_size=16, intermediate_size=16, num_hidden_layers=2, attn_layer_indices=[1],
    ...     num_attention_heads=2, num_key_value_heads=1, mamba_n_heads=2, mamba_d_head=16, mamba_d_state=4,
    ...     mamba_chunk_size=4, mamba_conv_bias=False)).eval()
    >>> embeddings = model.get_input_embeddings()(torch.tensor([[1, 2, 3]])).detach().requires_grad_()
    >>> with MambaComposite().context(model) as modified:
    ...     logits = modified(inputs_embeds=embeddings, use_cache=False).logits
    ...     output_relevance = torch.zeros_like(logits)
    ...     output_relevance[0, -1, 5] = logits[0, -1, 5]
    ...     relevance, = torch.autograd.grad(logits, embeddings, output_relevance)
    >>> bool(torch.isclose(relevance.sum(), logits[0, -1, 5], rtol=1e-3))
    True
    '''

    def __init__(
        self,
        rules: FrozenSet[str] = MAMBA_LRP_RULES,
        stabilizer: StabilizerLike = 1e-6,
        recompute: bool = False,
    ):
        super().__init__()
        self.rules = frozenset(rules)
        self.stabilizer = stabilizer
        self.recompute = recompute
        # the modules being called, outermost first; the outermost call's input takes the multiplication
        self._calls: List[torch.nn.Module] = []
        self._input_multiplied = False

    def copy(self) -> 'ModelRules':
        return self.__class__(self.rules, self.stabilizer, self.recompute)

    def register(self, module: torch.nn.Module) -> RemovableHandleList:
        handles = RemovableHandleList([RemovableHandle(self)])
        try:
            embeddings = module.get_input_embeddings() if hasattr(module, 'get_input_embeddings') else None
            if embeddings is not None:
                handles.append(embeddings.register_forward_hook(self._relevance_leaves_at_embeddings))
            handles.extend(self._write_rules(module))
        except BaseException:
            handles.remove()
            raise
        return handles

    def _multiply(self, tensor: torch.Tensor) -> torch.Tensor:
        return gradient_to_relevance(tensor, self)

    def _enter(self, module, args, kwargs):
        if not self._calls:
            args, kwargs = self._relevance_leaves_at_input(args, kwargs)
        self._calls.append(module)
        return args, kwargs

    def _leave(self, module, input, output):
        if not self._calls or self._calls[-1] is not module:
            # a hook before ours raised, so this call was never entered
            return None
        self._calls.pop()
        if self._calls or output is None:
            return None
        return self._relevance_enters_at_output(output)

    def _relevance_leaves_at_input(self, args: tuple, kwargs: dict) -> Tuple[tuple, dict]:
        '''Multiply the gradient at every floating-point tensor argument of the call by that argument; where there
        is none (token ids), the embeddings' hook does it.'''
        def multiply(value):
            return self._multiply(value) if _is_float_tensor(value) else value

        self._input_multiplied = any(map(_is_float_tensor, args + tuple(kwargs.values())))
        return tuple(map(multiply, args)), {key: multiply(value) for key, value in kwargs.items()}

    def _relevance_leaves_at_embeddings(self, module, input, output):
        if self._calls and not self._input_multiplied:
            return self._multiply(output)
        return None

    def _relevance_enters_at_output(self, output):
        return replace_output(output, lambda tensor: relevance_to_gradient(tensor, self.stabilizer, self))

    def _write_rules(self, model: torch.nn.Module) -> List:
        '''Set the rules inside the model: the hooks at the ends of a call, attributes read by mixers, blocks,
        attention and experts, and forward hooks on norms, activations and routers.'''
        handles = []
        activations = activation_types()
        for submodule in modules_outside_mixers(model):
            handles.append(submodule.register_forward_pre_hook(self._enter, with_kwargs=True))
            # always called, also when the forward raises, so that the call stack stays balanced
            handles.append(submodule.register_forward_hook(self._leave, always_call=True))
            if is_canonized_mixer(submodule):
                handles.append(InstanceAttributes(submodule, {RULE_ATTRIBUTE: self}))
            elif hasattr(submodule, 'lrp_residual'):
                handles.append(InstanceAttributes(submodule, {PLAIN_SUM_ATTRIBUTE: True}))
            elif is_attention(submodule) or is_experts(submodule):
                # a copy of the module's config that selects the implementation registered in .hybrid
                config = copy.copy(submodule.config)
                implementation = '_attn_implementation' if is_attention(submodule) else '_experts_implementation'
                setattr(config, f'{implementation}_internal', IMPLEMENTATION)
                handles.append(InstanceAttributes(submodule, {'config': config, HYBRID_RULE_ATTRIBUTE: self.rules}))
            elif is_rms_norm(submodule) and 'norm' in self.rules:
                handles.append(submodule.register_forward_hook(_identity_rule_hook))
            elif isinstance(submodule, activations) and 'silu' in self.rules:
                handles.append(submodule.register_forward_hook(_identity_rule_hook))
            elif type(submodule).__name__.endswith('Router') and 'attention' in self.rules:
                handles.append(submodule.register_forward_hook(_detach_hook))
            output = gated_mlp_output(submodule) if 'gate' in self.rules else None
            if output is not None:
                handles.append(getattr(submodule, output).register_forward_pre_hook(_half_rule_hook))
        return handles


def _is_float_tensor(value) -> bool:
    return torch.is_tensor(value) and value.is_floating_point()


def _identity_rule_hook(module, input, output):
    return identity_rule(input[0], output)


def _half_rule_hook(module, input):
    return (half_rule(input[0]),) + tuple(input[1:])


def _detach_hook(module, input, output):
    return tuple(value.detach() if torch.is_tensor(value) else value for value in output)
