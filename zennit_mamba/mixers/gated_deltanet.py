'''Gated DeltaNet (Qwen3-Next, Qwen3.5, OLMo-Hybrid): the canonical layer computation with the MambaLRP rules, and
the canonized forward of transformers' ``*GatedDeltaNet`` layers.

A Gated DeltaNet layer projects its input to queries, keys and values (through a short causal convolution and SiLU),
an output gate ``z`` and, per value head, a write strength ``b`` and a decay ``a``; then::

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,     o_t = S_t^T q_t
    g = -exp(A_log) * softplus(a + dt_bias),   beta = sigmoid(b),   q, k L2-normalised (q scaled by dim^-1/2)
    y = out_proj(w * rms(o) * silu(z))

MambaLRP's principles carry over one to one (``docs/rules.md``): SiLU after the convolution by the identity rule;
``q``, ``k``, ``g`` and ``beta`` are what the input selects, held constant by the selection rule (``'ssm'``), so that
the state, and ``o``, are linear in ``v`` as Mamba's scan is in ``x``; the gated norm by the LN-rule, the identity
rule on ``silu(z)`` and the half rule on the product. The projections and the convolution are linear layers, for
LRP-0 or Zennit's rules.

The families differ only in how the projections are laid out (one fused ``in_proj_qkvz``, or one projection each) and
in the names of the norm and output projection: a family file passes a :py:class:`GatedDeltaNetParts`.
'''
import functools
from typing import Callable, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from zennit_mamba.core.family import Canonized
from zennit_mamba.mixers.io import (
    MixerOutput, call_read_module, mask_padding, over_time_blocks, run_mixer, with_transformers_cache,
)

#: ``project(layer, hidden_states)``: the convolution's input ``[q, k, v]``, the gate ``z`` (``(batch, length,
#: value heads * value dim)``), and ``b`` and ``a`` (``(batch, length, value heads)``)
Projection = Callable[[torch.nn.Module, torch.Tensor], Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]


def _separate_projections(conv_input: Tuple[str, ...], z: str, b: str, a: str, layer: torch.nn.Module,
                          hidden_states: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    parts = [getattr(layer, name)(hidden_states) for name in conv_input]
    return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1),
            *(getattr(layer, name)(hidden_states) for name in (z, b, a)))


def separate_projections(conv_input: Tuple[str, ...], z: str, b: str, a: str) -> Projection:
    '''The :py:data:`Projection` of a layer with a projection for each part: those named by ``conv_input``
    (``[q, k, v]`` in one, or one each) concatenated, and the gate, write strength and decay.

    Examples
    --------
    >>> layer = torch.nn.Module()
    >>> layer.qkv, layer.z, layer.b, layer.a = (torch.nn.Linear(4, width) for width in (12, 4, 2, 2))
    >>> [tuple(part.shape) for part in separate_projections(('qkv',), 'z', 'b', 'a')(layer, torch.ones(1, 3, 4))]
    [(1, 3, 12), (1, 3, 4), (1, 3, 2), (1, 3, 2)]
    '''
    return functools.partial(_separate_projections, tuple(conv_input), z, b, a)


class GatedDeltaNetParts(NamedTuple):
    '''Where a family's Gated DeltaNet layer keeps what the computation reads.

    Parameters
    ----------
    project : callable
        The layer's input projections (:py:data:`Projection`).
    norm : str
        The gated RMS norm's attribute.
    output : str
        The output projection's attribute.
    '''
    project: Projection
    norm: str = 'norm'
    output: str = 'out_proj'


def l2_normalised(x: torch.Tensor, epsilon: float = 1e-6) -> torch.Tensor:
    '''``x / sqrt(|x|^2 + epsilon)`` over the last dimension, as transformers' and flash-linear-attention's
    ``l2norm``.'''
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + epsilon)


def gated_deltanet(rules, layer: torch.nn.Module, parts: GatedDeltaNetParts, hidden_states: torch.Tensor,
                   attention_mask: Optional[torch.Tensor] = None, blocks_allowed: bool = False) -> MixerOutput:
    '''Run a Gated DeltaNet ``layer`` on ``(batch, length, hidden)`` hidden states under ``rules``: its output, and
    the (detached) convolution input ``(batch, width, length)`` and last state ``(batch, value heads, key dim, value
    dim)`` for a cache. Where ``blocks_allowed``, on a CPU, over time blocks, each continued from the previous block's
    last state (:py:func:`~zennit_mamba.mixers.io.over_time_blocks`).'''
    block = functools.partial(_mixer_block, rules, layer, parts)
    return over_time_blocks(rules, layer, block, hidden_states, attention_mask, blocks_allowed)


def _mixer_block(rules, layer: torch.nn.Module, parts: GatedDeltaNetParts, hidden_states: torch.Tensor,
                 attention_mask: Optional[torch.Tensor], initial_state: Optional[torch.Tensor],
                 context: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    '''The layer on consecutive positions, the first ``context`` of them read by the convolution only (a
    :py:data:`~zennit_mamba.mixers.io.MixerBlock`).'''
    conv_input, z, b, a = parts.project(layer, mask_padding(hidden_states, attention_mask))
    batch, length = conv_input.shape[0], conv_input.shape[1] - context
    conv1d = layer.conv1d
    convolved = call_read_module(conv1d, conv_input.transpose(1, 2).to(conv1d.weight.dtype))
    convolved = convolved[..., context:context + length].transpose(1, 2).to(conv_input.dtype)
    query, key, value = torch.split(rules.activation(layer.activation, convolved),
                                    [layer.key_dim, layer.key_dim, layer.value_dim], dim=-1)
    z, b, a = z[:, context:], b[:, context:], a[:, context:]

    beta = b.sigmoid()
    if getattr(layer, 'allow_neg_eigval', False):  # OLMo-Hybrid: write strengths in [0, 2]
        beta = beta * 2.0
    # as the original computes it: in float32 at least, since A_log is read in float32
    g = -layer.A_log.float().exp() * F.softplus(a.float() + layer.dt_bias)

    compute = torch.promote_types(value.dtype, torch.float32)
    query = query.reshape(batch, length, -1, layer.head_k_dim).to(compute)
    key = key.reshape(batch, length, -1, layer.head_k_dim).to(compute)
    value = value.reshape(batch, length, -1, layer.head_v_dim)
    if layer.num_v_heads != layer.num_k_heads:  # each query and key head serves consecutive value heads
        repeats = layer.num_v_heads // layer.num_k_heads
        query, key = (tensor.repeat_interleave(repeats, dim=2) for tensor in (query, key))
    query = l2_normalised(query) * layer.head_k_dim ** -0.5
    key = l2_normalised(key)

    # (batch, heads, length, ...) for the chunked rule
    output, last_state = rules.delta_rule(*(tensor.transpose(1, 2) for tensor in (query, key, value, g, beta)),
                                          initial_state=initial_state)
    output = output.transpose(1, 2)  # (batch, length, value heads, value dim)
    norm = getattr(layer, parts.norm)
    output = rules.gated_norm(output, z.unflatten(-1, (-1, layer.head_v_dim)), norm.weight, norm.variance_epsilon,
                              layer.head_v_dim, before_gate=True)
    output = getattr(layer, parts.output)(output.flatten(2).to(hidden_states.dtype))
    return output, conv_input.transpose(1, 2), last_state


def transformers_forward(parts: GatedDeltaNetParts, rules, self, hidden_states: torch.Tensor, cache=None,
                         attention_mask: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
    '''Forward of a canonized transformers Gated DeltaNet layer; fills a fresh cache as the original does.'''
    def run() -> MixerOutput:
        # time blocks only without a cache: a cache recording the past keeps the whole convolution input
        return run_mixer(rules, gated_deltanet, self, parts, hidden_states, attention_mask, cache is None)

    return with_transformers_cache(self, cache, kwargs, run, None)


def transformers_layer(parts: GatedDeltaNetParts, selection: Tuple[str, ...] = ()) -> Canonized:
    '''The canonized entry of a family's Gated DeltaNet class, laid out as ``parts`` says; ``selection`` names the
    projections that compute ``a`` and ``b`` alone (held constant by the selection rule).'''
    # the original forward convolves with conv1d's weights without calling it
    return Canonized(functools.partial(transformers_forward, parts), uncalled=('conv1d',), selection=selection)
