'''Delta-rule layers (Gated DeltaNet in Qwen3-Next, Qwen3.5 and OLMo-Hybrid; Kimi Delta Attention in Kimi-Linear):
the canonical layer computation with the MambaLRP rules, and the canonized forward of their transformers classes.

Such a layer projects its input to queries, keys and values (through a short causal convolution and SiLU), an output
gate ``z``, and what selects how the state changes: a write strength ``beta`` per head and a log-decay ``g`` per head
(Gated DeltaNet) or per key channel (Kimi); then::

    S_t = (I - beta_t k_t k_t^T) diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T,     o_t = S_t^T q_t
    q, k L2-normalised (q scaled by dim^-1/2),     y = out_proj(w * rms(o) * act(z))

Gated DeltaNet computes ``g = -exp(A_log) * softplus(a + dt_bias)`` and ``beta = sigmoid(b)`` from projections ``a``
and ``b`` and gates with ``act = silu``; Kimi computes ``g`` in a forget-gate module and gates with ``act = sigmoid``.

MambaLRP's principles carry over one to one (``docs/rules.md``): SiLU after the convolution by the identity rule;
``q``, ``k``, ``g`` and ``beta`` are what the input selects, held constant by the selection rule (``'ssm'``), so that
the state, and ``o``, are linear in ``v`` as Mamba's scan is in ``x``; the norm by the LN-rule; a SiLU gate by the
identity rule and the half rule on the product (Mamba's gate), a sigmoid gate held constant (the attention rule, as
routing weights; the signal takes all relevance, as in LRP for LSTMs). The projections and the convolution are linear
layers, for LRP-0 or Zennit's rules.

A family file describes where its layer keeps each part with a :py:class:`DeltaLayerParts`.
'''
import functools
from typing import Callable, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from zennit_mamba.core.family import Canonized
from zennit_mamba.mixers.io import (
    MixerOutput, call_read_module, mask_padding, over_time_blocks, run_mixer, with_transformers_cache,
)

#: ``project(layer, hidden_states)``: the convolution's input ``[q, k, v]`` and the output gate ``z`` (each
#: ``(batch, length, width)``), the write strengths ``beta`` ``(batch, length, value heads)`` and the log-decays ``g``
#: (the same, or ``(batch, length, heads, key_dim)``)
Projection = Callable[[torch.nn.Module, torch.Tensor], Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]


class DeltaLayerParts(NamedTuple):
    '''Where a family's delta-rule layer keeps what the computation reads.

    Parameters
    ----------
    project : callable
        The layer's input projections (:py:data:`Projection`).
    norm : str, optional
        The gated RMS norm's attribute.
    output : str, optional
        The output projection's attribute.
    gate : str, optional
        The output gate's activation: ``'silu'`` or ``'sigmoid'``.
    '''
    project: Projection
    norm: str = 'norm'
    output: str = 'out_proj'
    gate: str = 'silu'


def gated_deltanet_selection(layer: torch.nn.Module, b: torch.Tensor, a: torch.Tensor
                             ) -> Tuple[torch.Tensor, torch.Tensor]:
    '''A Gated DeltaNet layer's write strengths and log-decays from its projections ``b`` and ``a``, as transformers
    computes them: ``beta = sigmoid(b)`` (twice that where OLMo-Hybrid allows negative eigenvalues) and ``g =
    -exp(A_log) * softplus(a + dt_bias)``, in float32 at least (``A_log`` is read in float32).'''
    beta = b.sigmoid()
    if getattr(layer, 'allow_neg_eigval', False):
        beta = beta * 2.0
    return beta, -layer.A_log.float().exp() * F.softplus(a.float() + layer.dt_bias)


def _separate_projections(conv_input: Tuple[str, ...], z: str, b: str, a: str, layer: torch.nn.Module,
                          hidden_states: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    parts = [getattr(layer, name)(hidden_states) for name in conv_input]
    b, a = getattr(layer, b)(hidden_states), getattr(layer, a)(hidden_states)
    return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1), getattr(layer, z)(hidden_states),
            *gated_deltanet_selection(layer, b, a))


def separate_projections(conv_input: Tuple[str, ...], z: str, b: str, a: str) -> Projection:
    '''The :py:data:`Projection` of a Gated DeltaNet layer with a projection for each part: those named by
    ``conv_input`` (``[q, k, v]`` in one, or one each) concatenated, the gate, and ``b`` and ``a``, from which
    :py:func:`gated_deltanet_selection` computes the write strengths and log-decays.'''
    return functools.partial(_separate_projections, tuple(conv_input), z, b, a)


def head_sizes(layer: torch.nn.Module) -> Tuple[int, int, int, int]:
    '''Key heads, value heads, key and value dimension per head, in either family's attribute names.'''
    if hasattr(layer, 'num_k_heads'):
        return layer.num_k_heads, layer.num_v_heads, layer.head_k_dim, layer.head_v_dim
    return layer.num_heads, layer.num_heads, layer.head_dim, layer.head_dim


def delta_layer(rules, layer: torch.nn.Module, parts: DeltaLayerParts, hidden_states: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None, blocks_allowed: bool = False) -> MixerOutput:
    '''Run a delta-rule ``layer`` on ``(batch, length, hidden)`` hidden states under ``rules``: its output, and the
    (detached) convolution input ``(batch, width, length)`` and last state ``(batch, value heads, key dim, value dim)``
    for a cache. Where ``blocks_allowed``, on a CPU, over time blocks, each continued from the previous block's last
    state (:py:func:`~zennit_mamba.mixers.io.over_time_blocks`).'''
    block = functools.partial(_mixer_block, rules, layer, parts)
    return over_time_blocks(rules, layer, block, hidden_states, attention_mask, blocks_allowed)


def _mixer_block(rules, layer: torch.nn.Module, parts: DeltaLayerParts, hidden_states: torch.Tensor,
                 attention_mask: Optional[torch.Tensor], initial_state: Optional[torch.Tensor],
                 context: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    '''The layer on consecutive positions, the first ``context`` of them read by the convolution only (a
    :py:data:`~zennit_mamba.mixers.io.MixerBlock`).'''
    conv_input, z, beta, g = parts.project(layer, mask_padding(hidden_states, attention_mask))
    key_heads, value_heads, key_dim, value_dim = head_sizes(layer)
    batch, length = conv_input.shape[0], conv_input.shape[1] - context
    conv1d = layer.conv1d
    convolved = call_read_module(conv1d, conv_input.transpose(1, 2).to(conv1d.weight.dtype))
    convolved = convolved[..., context:context + length].transpose(1, 2).to(conv_input.dtype)
    query, key, value = torch.split(rules.activation(layer.activation, convolved),
                                    [key_heads * key_dim, key_heads * key_dim, value_heads * value_dim], dim=-1)
    z, beta, g = z[:, context:], beta[:, context:], g[:, context:]

    compute = torch.promote_types(value.dtype, torch.float32)
    query = query.reshape(batch, length, key_heads, key_dim).to(compute)
    key = key.reshape(batch, length, key_heads, key_dim).to(compute)
    value = value.reshape(batch, length, value_heads, value_dim)
    if value_heads != key_heads:  # each query and key head serves consecutive value heads
        query, key = (tensor.repeat_interleave(value_heads // key_heads, dim=2) for tensor in (query, key))
    query = rules.delta_key_norm(query) * key_dim ** -0.5
    key = rules.delta_key_norm(key)

    # (batch, heads, length, ...) for the chunked rule
    output, last_state = rules.delta_rule(*(tensor.transpose(1, 2) for tensor in (query, key, value, g, beta)),
                                          initial_state=initial_state)
    output = output.transpose(1, 2)  # (batch, length, value heads, value dim)
    norm = getattr(layer, parts.norm)
    output = rules.gated_norm(output, z.unflatten(-1, (-1, value_dim)), norm.weight, norm.variance_epsilon,
                              value_dim, before_gate=True, activation=parts.gate)
    output = getattr(layer, parts.output)(output.flatten(2).to(hidden_states.dtype))
    return output, conv_input.transpose(1, 2), last_state


def transformers_forward(parts: DeltaLayerParts, rules, self, hidden_states: torch.Tensor, cache=None,
                         attention_mask: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
    '''Forward of a canonized transformers delta-rule layer; fills a fresh cache as the original does (the state in
    float32).'''
    def run() -> MixerOutput:
        # time blocks only without a cache: a cache recording the past keeps the whole convolution input
        return run_mixer(rules, delta_layer, self, parts, hidden_states, attention_mask, cache is None)

    return with_transformers_cache(self, cache, kwargs, run, torch.float32)


def transformers_layer(parts: DeltaLayerParts, selection: Tuple[str, ...] = ()) -> Canonized:
    '''The canonized entry of a family's delta-rule class, laid out as ``parts`` says; ``selection`` names the
    children that compute the write strengths and decays alone (held constant by the selection rule).'''
    # the original forward convolves with conv1d's weights without calling it
    return Canonized(functools.partial(transformers_forward, parts), uncalled=('conv1d',), selection=selection)
