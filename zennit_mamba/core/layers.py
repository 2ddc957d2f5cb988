'''The treatments of the layers beside the mixers, which the family files name in their layer maps: the hooks that
attach MambaLRP's rules to norms, activations, attention, routers, gated MLPs, experts and squeeze-and-excitation,
the attention and experts implementations through which two of them act, and the treatment of torch's and
transformers' generic layers (:data:`GENERIC`).

Attention and experts run through implementations registered here with transformers, selected per module by a copy
of its config (:py:func:`select_implementation`) that also carries the rule's function; the module's own config is
untouched.
'''
import copy
import functools
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch
import torch.nn.functional as F
from transformers.activations import ACT2CLS
from transformers.integrations.moe import ExpertsInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface
from zennit.core import RemovableHandle, RemovableHandleList

from zennit_mamba.core.family import Treatment
from zennit_mamba.core.instance import InstanceAttributes, bind_forward, instance_forward, replaced_forward
from zennit_mamba.core.upstream import refuse_keywords
from zennit_mamba.rules import AttentionRule, HalfRule, LNRule, SiLUIdentity, identity_rule


#: the attention and experts implementation registered with transformers for explained models
IMPLEMENTATION = 'mamba_lrp'
#: the attribute of the config copy that holds the rule's function (``probabilities`` or ``gate``)
RULE_FIELD = '_mamba_lrp_rule'


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    '''transformers' SDPA attention with the probabilities passed through the rule of the module's config copy.

    The probabilities ``softmax(q k^T)`` are a function of the queries and keys alone, so holding them constant
    (:py:class:`~zennit_mamba.rules.AttentionRule`) is applying the rule to ``q`` and ``k``: then ``o = P V`` with
    relevance through ``V`` only, in SDPA's kernels, which keep no ``L x L`` probabilities for the backward pass.
    Keyword arguments it cannot honour (a sliding window the mask does not carry, soft-capping, packed sequences)
    are refused, not dropped.
    Returns no attention weights, as transformers' SDPA does.
    '''
    kwargs = without_window_in_mask(attention_mask, key, kwargs)
    refuse_keywords(module, kwargs)
    rule = _rule(module)
    return sdpa_attention_forward(module, rule(query), rule(key), value, attention_mask, dropout=dropout,
                                  scaling=scaling, **kwargs)


def without_window_in_mask(attention_mask, key: torch.Tensor, kwargs: dict) -> dict:
    '''``kwargs`` without ``sliding_window`` where the attention already keeps to the window without it: a 4D mask
    (transformers' SDPA and eager masks, which SDPA and eager attention read, build the window into it), or no mask
    and at most ``sliding_window`` keys (causal attention is then the window's; transformers skips the mask only
    then). Elsewhere (a flash or flex attention model's mask, which leaves the window to the kernel) the keyword stays,
    for :py:func:`~zennit_mamba.core.upstream.refuse_keywords` to refuse.

    Examples
    --------
    >>> key = torch.zeros(1, 2, 5, 4)
    >>> without_window_in_mask(None, key, {'sliding_window': 8})
    {}
    >>> without_window_in_mask(None, key, {'sliding_window': 4})
    {'sliding_window': 4}
    '''
    window = kwargs.get('sliding_window')
    if window is None:
        return kwargs
    if (torch.is_tensor(attention_mask) and attention_mask.dim() == 4) or (attention_mask is None
                                                                            and key.shape[2] <= window):
        return {name: value for name, value in kwargs.items() if name != 'sliding_window'}
    return kwargs


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


def _standard_rms_norm_forward(self, hidden_states):
    # transformers' RMSNorm forward, verbatim (Llama's, "copied from" in Mamba, Mamba2, FalconMamba, Bamba, Jamba,
    # Zamba, ...): a norm whose class forward compiles to the same code computes what NormRule.standard_rms_forward does
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
        Any module (the composite asks for those it gives :py:class:`NormRule`).

    Returns
    -------
    bool
        True where :py:meth:`NormRule.standard_rms_forward` computes what the module's call computes.

    Examples
    --------
    >>> from transformers.models.mamba.modeling_mamba import MambaRMSNorm
    >>> runs_standard_rms_norm(MambaRMSNorm(4)), runs_standard_rms_norm(torch.nn.LayerNorm(4))
    (True, False)
    '''
    return instance_forward(module) is None and _is_standard_rms_norm_forward(type(module).forward)


class NormRule(LNRule):
    '''The LN-rule on a norm module: a norm that runs transformers' standard RMSNorm forward
    (:py:func:`runs_standard_rms_norm`) gets that forward with the rule (:py:meth:`standard_rms_forward`: on float32
    inputs its own operations with ``r`` detached, no hook or autograd function on each call, whose host time shows
    on short inputs); any other norm a hook on its output (:py:meth:`LNRule.on_output`).'''

    def register(self, module: torch.nn.Module) -> RemovableHandleList:
        if runs_standard_rms_norm(module):
            return RemovableHandleList([RemovableHandle(self), bind_forward(module, NormRule.standard_rms_forward,
                                                                            self)])
        return super().register(module)

    @staticmethod
    def standard_rms_forward(rule: 'NormRule', module: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        '''transformers' standard RMSNorm forward (:py:func:`runs_standard_rms_norm`) under the rule: on float32
        inputs its own operations with the scale held constant, ``u = w * (h * r.detach())`` (so ``u`` is the
        original output); on others the ratio ``u / h`` held (:py:meth:`~zennit_mamba.rules.LNRule.apply`), since that
        forward computes in float32 and casts back, and a gradient through the cast would conserve only to float32's
        precision.

        Parameters
        ----------
        rule : :py:class:`NormRule`
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


class HeldOutputs(AttentionRule):
    '''The attention rule on gates that children of a module compute: their outputs held constant, so that
    ``x * sigmoid(gate(x))`` passes relevance through ``x`` only, as the routing weights of experts do (Qwen3-Next's
    ``shared_expert_gate``).

    Parameters
    ----------
    held : tuple of str
        The attributes of the children whose outputs are held.
    '''

    def __init__(self, held: Tuple[str, ...] = ()):
        super().__init__()
        self.held = tuple(held)

    def copy(self) -> 'HeldOutputs':
        rule = type(self)(self.held)
        rule.switch = self.switch
        return rule

    def register(self, module: torch.nn.Module) -> RemovableHandleList:
        return RemovableHandleList([RemovableHandle(self)] + [
            getattr(module, name).register_forward_hook(self._on_output_where_on) for name in self.held])


class AttentionProbabilities(HeldOutputs):
    '''The attention rule on a transformers attention module: its attention runs through :py:func:`attention_forward`,
    which holds the probabilities constant (through the queries and keys, inside SDPA); the outputs of the ``held``
    children too. Qwen3-Next's gated attention ``o_proj((P V) * sigmoid(g))`` holds its ``q_proj``, whose output is
    the queries and the gate ``g``: both select, neither carries relevance, so relevance flows through ``V`` only.'''

    def register(self, module: torch.nn.Module) -> RemovableHandleList:
        handles = super().register(module)
        handles.append(select_implementation(module, probabilities=self._apply_where_on))
        return handles

    def _apply_where_on(self, constant: torch.Tensor) -> torch.Tensor:
        return self.apply(constant) if self.acts() else constant


class HeldScale(AttentionRule):
    '''The attention rule on squeeze-and-excitation ``x * s(x)``: the per-channel scale ``s = output / x`` held
    constant, so that ``R(x) = R(output)``.'''

    def on_output(self, module, args, output):
        return identity_rule(args[0], output)


class GatedProduct(HalfRule):
    '''The half rule on a gated MLP ``output(act(gate) * up)``: on the input of its projection ``output``.

    Parameters
    ----------
    output : str
        The attribute of the projection that receives the gated product (``'down_proj'``).
    '''

    def __init__(self, output: str = 'down_proj'):
        super().__init__()
        self.output = output

    def copy(self) -> 'GatedProduct':
        rule = type(self)(self.output)
        rule.switch = self.switch
        return rule

    def register(self, module: torch.nn.Module) -> RemovableHandleList:
        handle = getattr(module, self.output).register_forward_pre_hook(self._halve_input)
        return RemovableHandleList([RemovableHandle(self), handle])

    def _halve_input(self, module, args):
        return (self.apply(args[0]),) + tuple(args[1:]) if self.acts() else None


class ExpertsGate(HalfRule):
    '''The half rule on transformers' experts: on each expert's gated product, in :py:func:`experts_forward`.'''

    def register(self, module: torch.nn.Module) -> RemovableHandleList:
        return RemovableHandleList([RemovableHandle(self), select_implementation(module, gate=self._apply_where_on)])

    def _apply_where_on(self, product: torch.Tensor) -> torch.Tensor:
        return self.apply(product) if self.acts() else product


def _experts_problem(module: torch.nn.Module) -> Optional[str]:
    if module.has_gate and (module.has_bias or module.is_transposed or not module.is_concatenated):
        return 'experts whose weights are not stored as concatenated [gate; up] without bias'
    return None


def _attention_problem(module: torch.nn.Module) -> Optional[str]:
    if not hasattr(vars(module).get('config'), '_attn_implementation'):
        return 'attention without a config that selects its implementation'
    return None


def _inside_mixer_problem(module: torch.nn.Module) -> Optional[str]:
    '''A module that a canonized mixer computes from its parameters, without calling it: a forward replaced on it or
    a hook on it acts on the original forward only.'''
    replaced = replaced_forward(module)
    if replaced is not None:
        return f'{replaced}, which the canonized mixer, computing this module from its parameters, would not run'
    if module._forward_hooks or module._forward_pre_hooks:
        return 'a hook on it, which the canonized mixer, computing this module from its parameters, would not run'
    return None


def gated_mlp(output: str) -> Treatment:
    '''The treatment of a gated MLP whose projection ``output`` receives the gated product.'''
    def check(module: torch.nn.Module) -> Optional[str]:
        return None if has_submodules(module, (output,)) else f'a gated MLP without its projection {output!r}'

    return Treatment(f'gated MLP: half rule on the product entering `{output}`', 'gate',
                     functools.partial(GatedProduct, output), check)


def gated_attention(gate: str) -> Treatment:
    '''The treatment of an attention module whose child ``gate`` computes its output gate (with its queries).'''
    def check(module: torch.nn.Module) -> Optional[str]:
        return (_attention_problem(module) if has_submodules(module, (gate,))
                else f'a gated attention without its projection {gate!r}')

    return Treatment(f'attention: probabilities and the output gate from `{gate}` held constant', 'attention',
                     functools.partial(AttentionProbabilities, (gate,)), check)


def held_gate(gate: str) -> Treatment:
    '''The treatment of a block that scales a branch by ``sigmoid(gate(x))``: the gate held constant.'''
    def check(module: torch.nn.Module) -> Optional[str]:
        return None if has_submodules(module, (gate,)) else f'a gated block without its gate {gate!r}'

    return Treatment(f'the gate from `{gate}` held constant (as routing weights)', 'attention',
                     functools.partial(HeldOutputs, (gate,)), check)


def not_explained(what: str) -> Treatment:
    '''The treatment of a class MambaLRP names but does not explain yet (a vision encoder beside a language model):
    a model that has one is refused, with ``what`` to do instead.'''
    return Treatment(f'not explained yet: {what}', check=lambda module: f'not explained yet; {what}')


#: a module that only composes its children (and residual sums): LRP-0, its children's rules act
COMPOSITION = Treatment('composes its children and residual sums (LRP-0)')
#: a linear map (projections, convolutions, embeddings, affine norms in eval mode, pooling): LRP-0, or the rule
#: ``gamma`` or ``layer_map`` selects
LINEAR = Treatment('linear: LRP-0 (or the rule gamma or layer_map selects)')
#: position encodings that take positions, not the hidden states: no relevance passes them
POSITIONS = Treatment('position encoding of the attention: no relevance path')
NORM = Treatment('LN-rule', 'norm', NormRule)
ACTIVATION = Treatment('identity rule', 'silu', SiLUIdentity)
ATTENTION = Treatment('attention: probabilities held constant (CP-LRP)', 'attention', AttentionProbabilities,
                      _attention_problem)
ROUTER = Treatment('router: routing weights held constant', 'attention', AttentionRule)
EXPERTS = Treatment('experts: half rule on each expert\'s gated product', 'gate', ExpertsGate, _experts_problem)
EXCITATION = Treatment('squeeze-and-excitation: the scale held constant', 'attention', HeldScale)
#: an MLP ``down(act(up(x)))`` without a gate: LRP-0, the activation's identity rule
PLAIN_MLP = Treatment('MLP without a gate: LRP-0 and the activation\'s identity rule')
#: a norm of the selection (FalconMamba's ``dt``, ``B``, ``C``), which the mixer calls behind the SSM rule
SELECTION = Treatment('normalises the selection, behind the SSM rule: no relevance passes it')
#: a module inside a mixer that the canonized forward computes from its parameters (a gated norm)
INSIDE_MIXER = Treatment('computed by the canonized mixer with its rules', check=_inside_mixer_problem)


def _generic() -> Dict[type, Treatment]:
    '''torch's and transformers' generic layers: linear ones, containers, activations, LayerNorm.'''
    nn = torch.nn
    treatments = {kind: LINEAR for kind in (
        nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding, nn.Dropout, nn.Identity, nn.BatchNorm1d, nn.BatchNorm2d,
        nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.Flatten)}
    treatments.update({kind: COMPOSITION for kind in (nn.ModuleList, nn.ModuleDict, nn.Sequential)})
    activations = {value[0] if isinstance(value, tuple) else value for value in ACT2CLS.values()}
    treatments.update({kind: ACTIVATION for kind in activations | {nn.SiLU, nn.ReLU, nn.GELU, nn.Tanh}})
    treatments[nn.LayerNorm] = NORM
    return treatments


#: the treatment of torch's and transformers' generic layers, by exact class
GENERIC: Dict[type, Treatment] = _generic()
