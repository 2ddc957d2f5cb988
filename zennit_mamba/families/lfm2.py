'''LFM2 (Liquid AI, transformers' ``Lfm2ForCausalLM``): gated short convolutions, a few attention layers, and
SwiGLU MLPs.

The short convolution ``y = out_proj(C * conv(B * x))``, with ``[B, C, x] = in_proj(h)`` and a causal depthwise
convolution of a few taps, is a selective state space of its own kind: ``B`` writes the input into the convolution's
short memory and ``C`` reads it out, both chosen by the input, as ``B`` and ``C`` are in Mamba. MambaLRP's first
principle (:py:class:`~zennit_mamba.rules.DetachSelection`, the ``'ssm'`` rule) holds them constant, so that the
block is linear in ``x`` and relevance flows through ``x`` only: ``R(x_t) = x_t * (B_t * conv^T(C * R_out / y))_t``.
Without the rule, gradient x input gives each of the three factors the whole relevance (a product of input-dependent
terms, as the gate without the half rule), and conservation fails. The MLP ``w2(silu(w1 h) * w3 h)`` takes the
identity rule on its SiLU and the half rule on its gate; the attention layers the attention rule (their query and key
norms sit behind it).
'''
from typing import Optional, Tuple

import torch

from zennit_mamba.core.family import Canonized, Family, in_module
from zennit_mamba.core.layers import ATTENTION, COMPOSITION, NORM, POSITIONS
from zennit_mamba.core.upstream import refuse_keywords
from zennit_mamba.mixers.io import (
    call_read_module, mask_padding, refuse_continuation, run_mixer, runs_in_time_blocks, time_blocks,
)

MODULE = 'transformers.models.lfm2.modeling_lfm2'


def short_conv(rules, conv: torch.nn.Module, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor],
               blocks_allowed: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    '''An ``Lfm2ShortConv`` on ``(batch, length, hidden)`` hidden states under ``rules``: the output and the input of
    the convolution ``B * x`` (for a cache). Where ``blocks_allowed``, on a CPU, over time blocks, each reading the
    convolution's left context (:py:func:`~zennit_mamba.mixers.io.time_blocks`): there is no state to carry.'''
    if not runs_in_time_blocks(rules, conv, hidden_states, blocks_allowed):
        return _mixer_block(rules, conv, hidden_states, attention_mask, 0)
    outputs = []
    for positions, context in time_blocks(hidden_states.shape[1], conv.conv_kernel_size - 1):
        mask = None if attention_mask is None else attention_mask[:, positions]
        output, conv_input = _mixer_block(rules, conv, hidden_states[:, positions], mask, context)
        outputs.append(output)
    return torch.cat(outputs, 1), conv_input


def _mixer_block(rules, conv: torch.nn.Module, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor],
           context: int) -> Tuple[torch.Tensor, torch.Tensor]:
    '''The short convolution on consecutive positions, the first ``context`` of them read by the convolution only.'''
    length = hidden_states.shape[1] - context
    projected = conv.in_proj(mask_padding(hidden_states, attention_mask)).transpose(-1, -2)
    B, C, x = projected.chunk(3, dim=-2)
    B, C = rules.selection(B, C)
    conv_input = B * x
    convolved = call_read_module(conv.conv, conv_input.to(conv.conv.weight.dtype))[..., context:context + length]
    y = C[..., context:] * convolved.to(C.dtype)
    return conv.out_proj(y.transpose(-1, -2).contiguous()), conv_input


def short_conv_forward(rules, self, hidden_states: torch.Tensor, cache=None,
                       attention_mask: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
    '''Forward of a canonized ``Lfm2ShortConv``; fills a fresh cache's convolution state as the original does.'''
    refuse_keywords(self, kwargs)
    if cache is not None and cache.get_conv_state(self.layer_idx) is not None:
        raise refuse_continuation()
    # time blocks only without a cache: a cache recording the past keeps the whole convolution input
    output, conv_input = run_mixer(rules, short_conv, self, hidden_states, attention_mask, cache is None)
    if cache is not None:
        cache.update_conv_state(conv_input.detach(), self.layer_idx, conv_kernel_size=self.conv_kernel_size)
    return output


def mlp_forward(rules, self, x: torch.Tensor) -> torch.Tensor:
    '''Forward of a canonized ``Lfm2MLP``, ``w2(silu(w1 x) * w3 x)``: its SiLU (functional, no module a hook could
    take) by the identity rule, the product by the half rule.'''
    return self.w2(rules.gate(rules.activation('silu', self.w1(x)), self.w3(x)))


FAMILY = Family(
    name='LFM2', library='transformers', hybrid=True, beside='attention, gated MLPs',
    library_modules=(MODULE,),
    canonized=in_module(MODULE, {
        # the original forward convolves with conv's weights without calling it
        'Lfm2ShortConv': Canonized(short_conv_forward, uncalled=('conv',)),
        'Lfm2MLP': Canonized(mlp_forward, mixer=False),
    }),
    layers=in_module(MODULE, {
        'Lfm2ForCausalLM': COMPOSITION, 'Lfm2Model': COMPOSITION, 'Lfm2PreTrainedModel': COMPOSITION,
        'Lfm2DecoderLayer': COMPOSITION, 'Lfm2RMSNorm': NORM, 'Lfm2Attention': ATTENTION,
        'Lfm2RotaryEmbedding': POSITIONS,
    }),
)
