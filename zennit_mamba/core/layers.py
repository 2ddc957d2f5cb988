'''The non-Mamba layers of hybrid models (attention, MLPs, mixtures of experts): where the MambaLRP rules act on
them, and the attention and experts implementations through which :py:class:`~zennit_mamba.rules.AttentionRule` and
:py:class:`~zennit_mamba.rules.HalfRule` act.

Attention and experts run through implementations registered here with transformers, selected per module by a copy
of its config (:py:func:`select_implementation`) that also carries the rule's function; the module's own config is
untouched.
'''
import copy
import functools
from typing import Callable, Iterable, List, Optional

import torch
import torch.nn.functional as F
from transformers.activations import ACT2CLS
from transformers.integrations.moe import ExpertsInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from zennit_mamba.core.instance import InstanceAttributes
from zennit_mamba.mixers.io import refuse_keywords
from zennit_mamba.core.walk import modules_parents_first


#: the attention and experts implementation registered with transformers for explained models
IMPLEMENTATION = 'mamba_lrp'
#: the attribute of the config copy that holds the rule's function (``probabilities`` or ``gate``)
RULE_FIELD = '_mamba_lrp_rule'
#: (attributes of a gated MLP, the projection whose input is the gated product)
GATED_MLP_LAYOUTS = ((('gate_proj', 'up_proj', 'down_proj'), 'down_proj'),
                     (('gate_up_proj', 'down_proj'), 'down_proj'),
                     (('input_linear', 'output_linear'), 'output_linear'))
#: attributes of an MLP without a gate: ``down(act(up(x)))``
PLAIN_MLP_LAYOUT = ('up_proj', 'down_proj')


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    '''transformers' SDPA attention with the probabilities passed through the rule of the module's config copy.

    The probabilities ``softmax(q k^T)`` are a function of the queries and keys alone, so holding them constant
    (:py:class:`~zennit_mamba.rules.AttentionRule`) is applying the rule to ``q`` and ``k``: then ``o = P V`` with
    relevance through ``V`` only, in SDPA's kernels, which keep no ``L x L`` probabilities for the backward pass.
    Keyword arguments it cannot honour (a sliding window, soft-capping, packed sequences) are refused, not dropped.
    Returns no attention weights, as transformers' SDPA does.
    '''
    refuse_keywords(module, kwargs)
    rule = _rule(module)
    return sdpa_attention_forward(module, rule(query), rule(key), value, attention_mask, dropout=dropout,
                                  scaling=scaling, **kwargs)


def experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
    '''Gated experts with the half rule on ``act(gate) * up`` (the activation's own rule fires on ``act_fn``).'''
    if not self.has_gate:
        return type(self).forward.__wrapped__(self, hidden_states, top_k_index, top_k_weights)
    if self.has_bias or self.is_transposed or not self.is_concatenated:
        raise NotImplementedError(
            f'MambaLRP explains experts with concatenated [gate; up] weights without bias; '
            f'{type(self).__name__} stores them differently.'
        )
    half_rule = _rule(self)
    output = torch.zeros_like(hidden_states, dtype=torch.promote_types(hidden_states.dtype, top_k_weights.dtype))
    for expert in top_k_index.unique().tolist():
        token, slot = torch.where(top_k_index == expert)
        gate, up = F.linear(hidden_states[token], self.gate_up_proj[expert]).chunk(2, dim=-1)
        expert_output = F.linear(half_rule(self.act_fn(gate) * up), self.down_proj[expert])
        output = output.index_add(0, token, (expert_output * top_k_weights[token, slot, None]).to(output.dtype))
    return output.to(hidden_states.dtype)


def _rule(module: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    return getattr(module.config, RULE_FIELD, None) or (lambda tensor: tensor)


def select_implementation(module: torch.nn.Module, **rule: Callable) -> InstanceAttributes:
    '''Run an attention or experts ``module`` through this file's implementation with the rule function given as
    ``probabilities=`` or ``gate=``, through a copy of its config; removing the result restores the module.'''
    (field, function), = rule.items()
    config = copy.copy(module.config)
    implementation = '_attn_implementation' if field == 'probabilities' else '_experts_implementation'
    setattr(config, f'{implementation}_internal', IMPLEMENTATION)
    setattr(config, RULE_FIELD, function)
    return InstanceAttributes(module, {'config': config})


AttentionInterface.register(IMPLEMENTATION, attention_forward)
AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
ExpertsInterface.register(IMPLEMENTATION, experts_forward)


@functools.lru_cache(maxsize=None)
def activation_types() -> tuple:
    '''The element-wise activation classes of transformers' ``ACT2FN`` and torch's SiLU/ReLU/GELU.'''
    classes = {value[0] if isinstance(value, tuple) else value for value in ACT2CLS.values()}
    return tuple(classes | {torch.nn.SiLU, torch.nn.ReLU, torch.nn.GELU, torch.nn.Tanh})


def is_rms_norm(module: torch.nn.Module) -> bool:
    '''An element-wise RMSNorm ``w * h / rms(h)`` (not a gated or weightless norm inside a mixer).'''
    name = type(module).__name__
    return name.endswith('RMSNorm') and 'Gated' not in name and isinstance(getattr(module, 'weight', None),
                                                                           torch.nn.Parameter)


def has_submodules(module: torch.nn.Module, names: Iterable[str]) -> bool:
    '''Whether ``module`` has registered submodules of all ``names``, looked up in the submodule dictionary (as
    is_attention and is_experts read instance attributes from vars()): a missing attribute raises inside
    ``Module.__getattr__``, microseconds on each module at every registration and on every mixer call.

    Examples
    --------
    >>> block = torch.nn.Module()
    >>> block.o_proj = torch.nn.Linear(2, 2)
    >>> has_submodules(block, ('o_proj',)), has_submodules(block, ('o_proj', 'q_proj'))
    (True, False)
    '''
    children = module._modules
    for name in names:
        if not isinstance(children.get(name), torch.nn.Module):
            return False
    return True


def gated_mlp_output(module: torch.nn.Module) -> Optional[str]:
    '''The name of the projection that receives the gated product of a gated MLP (whose projections are registered
    submodules), or None.'''
    for attributes, output in GATED_MLP_LAYOUTS:
        if has_submodules(module, attributes):
            return output
    return None


def is_attention(module: torch.nn.Module) -> bool:
    '''A transformers attention module (an ``o_proj`` submodule, a ``config`` instance attribute) whose
    implementation is selected through its config.'''
    return has_submodules(module, ('o_proj',)) and hasattr(vars(module).get('config'), '_attn_implementation')


def is_excitation(module: torch.nn.Module) -> bool:
    '''A squeeze-and-excitation module ``x * s(x)`` (timm's ``SEModule``, torchvision's ``SqueezeExcitation``).'''
    return type(module).__name__ in ('SEModule', 'SqueezeExcite', 'SqueezeExcitation')


def is_experts(module: torch.nn.Module) -> bool:
    '''A transformers mixture-of-experts module whose implementation is selected through its config (both
    instance attributes, as transformers' ``use_experts_implementation`` sets them).'''
    attributes = vars(module)
    return 'has_gate' in attributes and hasattr(attributes.get('config'), '_experts_implementation')


#: torch's own linear, embedding and pass-through layers: no rule of their own (LRP-0 is their gradient x input)
PLAIN_LAYERS = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Dropout, torch.nn.Identity)


def unsupported_parts(model: torch.nn.Module, mixer_types: tuple) -> List[str]:
    '''Modules of a hybrid model that no MambaLRP rule or linear treatment covers,
    as ``'Type at name'``; the mixers of ``mixer_types`` are treated.'''
    activations = activation_types()
    found, treated = [], set()
    # parents first, each module once, without the inside of the treated modules (the walk asks whether to descend
    # after the loop's body has seen the module, so the body's verdict is read, not computed again)
    for name, module in modules_parents_first(model, lambda module: id(module) not in treated):
        children = [child for child in module._modules.values() if child is not None]
        problem = None
        if type(module) in mixer_types or is_attention(module):
            treated.add(id(module))
            continue  # treated as a whole
        if is_experts(module):
            treated.add(id(module))
            if module.has_gate and (module.has_bias or module.is_transposed or not module.is_concatenated):
                problem = 'experts whose weights are not stored as concatenated [gate; up] without bias'
        elif any(isinstance(child, activations) for child in children):
            if gated_mlp_output(module) is None and not all(hasattr(module, name) for name in PLAIN_MLP_LAYOUT):
                problem = 'an MLP whose gating is unknown'
        elif not children and not (
            isinstance(module, PLAIN_LAYERS + activations) or is_rms_norm(module)
            or type(module).__name__.endswith(('Router', 'RotaryEmbedding'))
        ):
            problem = 'a layer without a MambaLRP treatment'
        if problem is not None:
            found.append(f'{type(module).__name__} at \'{name}\' ({problem})')
    return found
