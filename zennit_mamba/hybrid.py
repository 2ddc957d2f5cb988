'''MambaLRP for hybrid models, whose layers interleave Mamba mixers with attention, MLPs and mixtures of experts.

A hybrid is explained in one pass: every rule is written as a detach in the model's forward, which makes the model
linear in its input embeddings (with biases zeroed), and relevance is gradient x input of that forward,
``R = x * J^T (R_out / y)``. This is the same relevance as LRP-0 layer by layer, and it needs no assumption about how
the layers are wired (residual sums, parallel branches, scalar multipliers, tied blocks). The treatments:

* Mamba and Mamba-2 mixers: the MambaLRP rules (identity SiLU, detached selection, half rule on the gate, detached
  gated-norm denominator), through the canonized mixer.
* RMS norms: LN-rule (denominator held constant).
* Activations: identity rule (``f(x) / x`` held constant), as for SiLU.
* Gated MLPs ``down(act(gate) * up)`` and gated experts: half rule on the product.
* Attention: the attention probabilities are held constant (relevance flows through the values only), as the SSM rule
  holds Mamba's hidden attention constant; MoE routing weights likewise (rule ``'attention'``).
'''
import copy
import weakref
from typing import Callable, FrozenSet, List, Optional

import torch
import torch.nn.functional as F
from transformers.activations import ACT2CLS
from transformers.integrations.moe import ExpertsInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface
from zennit.core import Hook, RemovableHandle, RemovableHandleList, Stabilizer

from .canonizers import InstanceAttributes
from .rules import (
    MAMBA_LRP_RULES, RULE_ATTRIBUTE, StabilizerLike, _DivideGradient, gate_product, half_rule, identity_rule,
    is_canonized_mixer,
)

#: the attention and experts implementation registered with transformers for explained models
IMPLEMENTATION = 'mamba_lrp'
#: the attribute of an attention or experts module that holds the rules it computes with
HYBRID_RULE_ATTRIBUTE = 'lrp_hybrid_rules'
#: (attributes of a gated MLP, the projection whose input is the gated product)
GATED_MLP_LAYOUTS = ((('gate_proj', 'up_proj', 'down_proj'), 'down_proj'),
                     (('gate_up_proj', 'down_proj'), 'down_proj'),
                     (('input_linear', 'output_linear'), 'output_linear'))
#: attributes of an MLP without a gate: ``down(act(up(x)))``
PLAIN_MLP_LAYOUT = ('up_proj', 'down_proj')


def _repeat_heads(states: torch.Tensor, repeats: int) -> torch.Tensor:
    return states if repeats == 1 else states.repeat_interleave(repeats, dim=1)


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    '''Eager attention whose probabilities are held constant while the module's rules include ``'attention'``.

    Accepts the masks of transformers' eager (additive) and sdpa (boolean, or None for plain causal) implementations.
    '''
    rules = getattr(module, HYBRID_RULE_ATTRIBUTE, frozenset())
    key = _repeat_heads(key, query.shape[1] // key.shape[1])
    value = _repeat_heads(value, query.shape[1] // value.shape[1])
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is None:
        if getattr(module, 'is_causal', True) and query.shape[2] > 1:
            causal = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device)
            scores = scores.masked_fill(~causal.tril(key.shape[2] - query.shape[2]), -torch.inf)
    elif attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask[..., :key.shape[2]], -torch.inf)
    else:
        scores = scores + attention_mask[..., :key.shape[2]]
    probabilities = F.softmax(scores, dim=-1, dtype=torch.promote_types(query.dtype, torch.float32)).to(query.dtype)
    if 'attention' in rules:
        probabilities = probabilities.detach()
    probabilities = F.dropout(probabilities, p=dropout, training=module.training)
    return torch.matmul(probabilities, value).transpose(1, 2).contiguous(), probabilities


def experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
    '''Gated experts with the half rule on ``act(gate) * up`` (the activation's own rule fires on ``act_fn``).'''
    if not self.has_gate:
        return type(self).forward.__wrapped__(self, hidden_states, top_k_index, top_k_weights)
    if self.has_bias or self.is_transposed or not self.is_concatenated:
        raise NotImplementedError(
            f'MambaLRP explains experts with concatenated [gate; up] weights without bias; '
            f'{type(self).__name__} stores them differently.'
        )
    rules = getattr(self, HYBRID_RULE_ATTRIBUTE, frozenset())
    output = torch.zeros_like(hidden_states, dtype=torch.promote_types(hidden_states.dtype, top_k_weights.dtype))
    for expert in top_k_index.unique().tolist():
        token, slot = torch.where(top_k_index == expert)
        gate, up = F.linear(hidden_states[token], self.gate_up_proj[expert]).chunk(2, dim=-1)
        expert_output = F.linear(gate_product(self.act_fn(gate), up, 'gate' in rules), self.down_proj[expert])
        output = output.index_add(0, token, (expert_output * top_k_weights[token, slot, None]).to(output.dtype))
    return output.to(hidden_states.dtype)


AttentionInterface.register(IMPLEMENTATION, attention_forward)
AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
ExpertsInterface.register(IMPLEMENTATION, experts_forward)


def activation_types() -> tuple:
    '''The element-wise activation classes of transformers' ``ACT2FN`` and torch's SiLU/ReLU/GELU.'''
    classes = {value[0] if isinstance(value, tuple) else value for value in ACT2CLS.values()}
    return tuple(classes | {torch.nn.SiLU, torch.nn.ReLU, torch.nn.GELU, torch.nn.Tanh})


def is_rms_norm(module: torch.nn.Module) -> bool:
    '''An element-wise RMSNorm ``w * h / rms(h)`` (not a gated or weightless norm inside a mixer).'''
    name = type(module).__name__
    return name.endswith('RMSNorm') and 'Gated' not in name and isinstance(getattr(module, 'weight', None),
                                                                           torch.nn.Parameter)


def gated_mlp_output(module: torch.nn.Module) -> Optional[str]:
    '''The name of the projection that receives the gated product of a gated MLP, or None.'''
    for attributes, output in GATED_MLP_LAYOUTS:
        if all(isinstance(getattr(module, attribute, None), torch.nn.Module) for attribute in attributes):
            return output
    return None


class _MultiplyGradient(torch.autograd.Function):
    '''Identity whose backward multiplies the gradient by the input: gradient to relevance at the model input.'''

    @staticmethod
    def forward(ctx, input: torch.Tensor, hook_ref: Callable) -> torch.Tensor:
        ctx.save_for_backward(input)
        ctx.hook_ref = hook_ref
        return input.view_as(input)

    @staticmethod
    def backward(ctx, gradient: torch.Tensor):
        input, = ctx.saved_tensors
        hook = ctx.hook_ref()
        return (gradient * input if hook is not None and hook.active else gradient), None


class ModelRules(Hook):
    '''All MambaLRP rules of a hybrid model in one pass: gradient x input of its forward with the rules as detaches.

    Registered on the model that is called (e.g. a ``...ForCausalLM``). Relevance leaves at the input embeddings
    (``inputs_embeds``, or the input embedding layer's output where token ids are passed) and enters at the first
    output (``logits``), where it is divided by the output, as every Zennit rule does.

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
    :py:class:`~zennit_mamba.MambaComposite` registers it on hybrids by itself:

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

    def copy(self) -> 'ModelRules':
        return self.__class__(self.rules, self.stabilizer, self.recompute)

    def register(self, module: torch.nn.Module) -> RemovableHandleList:
        handles = RemovableHandleList([RemovableHandle(self)])
        try:
            handles.append(module.register_forward_pre_hook(self._relevance_leaves_at_input, with_kwargs=True))
            handles.append(module.register_forward_hook(self._relevance_enters_at_output))
            embeddings = module.get_input_embeddings() if hasattr(module, 'get_input_embeddings') else None
            if embeddings is not None:
                handles.append(embeddings.register_forward_hook(self._relevance_leaves_at_embeddings))
            handles.extend(self._write_rules(module))
        except BaseException:
            handles.remove()
            raise
        return handles

    def _multiply(self, tensor: torch.Tensor) -> torch.Tensor:
        return _MultiplyGradient.apply(tensor, weakref.ref(self)) if tensor.requires_grad else tensor

    def _relevance_leaves_at_input(self, module, args, kwargs):
        self._embeddings_passed = kwargs.get('inputs_embeds') is not None
        if self._embeddings_passed:
            kwargs = dict(kwargs, inputs_embeds=self._multiply(kwargs['inputs_embeds']))
        elif args and torch.is_tensor(args[0]) and args[0].is_floating_point():
            self._embeddings_passed = True
            args = (self._multiply(args[0]),) + tuple(args[1:])
        return args, kwargs

    def _relevance_leaves_at_embeddings(self, module, input, output):
        if not getattr(self, '_embeddings_passed', True):
            return self._multiply(output)
        return None

    def _relevance_enters_at_output(self, module, input, output):
        def divide(tensor):
            if not (torch.is_tensor(tensor) and tensor.requires_grad and self.active):
                return tensor
            return _DivideGradient.apply(tensor, Stabilizer.ensure(self.stabilizer))

        if torch.is_tensor(output):
            return divide(output)
        if isinstance(output, dict):
            key = next(iter(output.keys()))
            output[key] = divide(output[key])
            return output
        if isinstance(output, tuple):
            return (divide(output[0]),) + tuple(output[1:])
        return None

    def _write_rules(self, model: torch.nn.Module) -> List:
        '''Set the rules inside the model: attributes read by mixers, attention and experts, and forward hooks.'''
        handles = []
        activations = activation_types()
        for name, submodule in model.named_modules():
            if is_canonized_mixer(submodule):
                handles.append(InstanceAttributes(submodule, {RULE_ATTRIBUTE: self}))
            elif _is_attention(submodule) or _is_experts(submodule):
                # a copy of the module's config that selects the implementation registered above
                config = copy.copy(submodule.config)
                implementation = '_attn_implementation' if _is_attention(submodule) else '_experts_implementation'
                setattr(config, f'{implementation}_internal', IMPLEMENTATION)
                handles.append(InstanceAttributes(submodule, {'config': config, HYBRID_RULE_ATTRIBUTE: self.rules}))
            elif is_rms_norm(submodule) and 'norm' in self.rules:
                handles.append(submodule.register_forward_hook(_identity_rule_hook))
            elif isinstance(submodule, activations) and 'silu' in self.rules:
                handles.append(submodule.register_forward_hook(_identity_rule_hook))
            elif type(submodule).__name__.endswith('Router') and 'attention' in self.rules:
                handles.append(submodule.register_forward_hook(_detach_hook))
            output = gated_mlp_output(submodule)
            if output is not None and 'gate' in self.rules:
                handles.append(getattr(submodule, output).register_forward_pre_hook(_half_rule_hook))
        return handles


def _identity_rule_hook(module, input, output):
    return identity_rule(input[0], output)


def _half_rule_hook(module, input):
    return (half_rule(input[0]),) + tuple(input[1:])


def _detach_hook(module, input, output):
    return tuple(value.detach() if torch.is_tensor(value) else value for value in output)


def _is_attention(module: torch.nn.Module) -> bool:
    return hasattr(getattr(module, 'config', None), '_attn_implementation') and hasattr(module, 'o_proj')


def _is_experts(module: torch.nn.Module) -> bool:
    return hasattr(module, 'has_gate') and hasattr(getattr(module, 'config', None), '_experts_implementation')


_KNOWN_LEAVES = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Dropout, torch.nn.Identity)


def unsupported_parts(model: torch.nn.Module, mixer_types: tuple) -> List[str]:
    '''Modules of a hybrid model that :py:class:`ModelRules` has no sound treatment for, as ``'Type at name'``;
    the mixers of ``mixer_types`` are treated.'''
    activations = activation_types()
    found, treated = [], []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in treated):
            continue
        children = list(module.children())
        problem = None
        if type(module) in mixer_types or _is_attention(module):
            treated.append(f'{name}.')
        elif _is_experts(module):
            treated.append(f'{name}.')
            if module.has_gate and (module.has_bias or module.is_transposed or not module.is_concatenated):
                problem = 'experts whose weights are not stored as concatenated [gate; up] without bias'
        elif any(isinstance(child, activations) for child in children):
            if gated_mlp_output(module) is None and not all(hasattr(module, name) for name in PLAIN_MLP_LAYOUT):
                problem = 'an MLP whose gating is unknown'
        elif not children and not (
            isinstance(module, _KNOWN_LEAVES + activations) or is_rms_norm(module)
            or type(module).__name__.endswith(('Router', 'RotaryEmbedding'))
        ):
            problem = 'a layer without a MambaLRP treatment'
        if problem is not None:
            found.append(f'{type(module).__name__} at \'{name}\' ({problem})')
    return found
