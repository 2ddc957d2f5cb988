'''RecurrentGemma (Griffin; transformers' ``RecurrentGemmaForCausalLM``): recurrent blocks with the RG-LRU, local
(sliding-window) attention layers, GeLU-gated MLPs, and a tanh soft-cap on the logits.

The rules, as equations (the recurrent block's in :py:mod:`zennit_mamba.mixers.rg_lru`):

- **Recurrent block** ``linear_out(h * gelu(linear_y(u)))`` with ``h_t = a_t h_{t-1} + m_t i_t x_t`` over the
  convolution's output ``x``: the decay ``a``, the normaliser ``m = sqrt(1 - a^2)`` and the input gate ``i`` are
  what the input selects, held constant (``'ssm'``), so that ``h`` is linear in ``x``; the GeLU by the identity rule
  (``'silu'``); the product by the half rule (``'gate'``).
- **MLP** ``down_proj(gelu(gate_proj(v)) * up_proj(v))``: the GeLU module by the identity rule, the product entering
  ``down_proj`` by the half rule, as every gated MLP.
- **Local attention**: the probabilities held constant (``'attention'``), through the SDPA implementation; the
  sliding window is in the mask the model builds (SDPA or eager models), which that implementation reads.
- **RMSNorms** ``u = h r (1 + w)`` with ``r = rsqrt(mean(h^2) + eps)``: the LN-rule (``'norm'``), ``u / h`` held.
- **Embedding normaliser** ``e * sqrt(hidden)`` (rounded to bfloat16): a constant scale, linear.
- **Soft-cap** of the logits, ``l' = tanh(l / cap) * cap``, computed by ``RecurrentGemmaForCausalLM.forward``: an
  element-wise function with ``f(0) = 0``, which takes the identity rule (``'silu'``): ``R(l) = R(l')``, so that the
  relevance at the inputs sums to the capped logit that is explained. Plain gradient x input through it would give
  ``l (1 - tanh^2(l / cap))`` instead, which is neither. The canonized ``RecurrentGemmaForCausalLM`` applies it.

What is refused, with the fix in the message: ``use_cache=True`` (the config's default) or a ``cache``, since the
recurrent blocks keep generation's states in module attributes that such a call overwrites (MambaLRP leaves the model
exactly as it was; the canonized blocks do not touch those attributes at all); and an attention mask with padding
before a token (left padding), since the recurrent blocks do not read the mask: the padded positions would flow into
the convolution and the recurrence, in the model's own forward too. Right padding (zeros after each row's tokens)
leaves the tokens before it as they are, and is accepted.
'''
from typing import Optional

import torch
from transformers.modeling_outputs import CausalLMOutput
from transformers.modeling_utils import slice_logits_to_keep

from zennit_mamba.core.family import Canonized, Family, in_module
from zennit_mamba.core.layers import ATTENTION, COMPOSITION, INSIDE_MIXER, NORM, POSITIONS, gated_mlp
from zennit_mamba.mixers.io import pop_return_dict, refuse_padding, soft_cap
from zennit_mamba.mixers.rg_lru import block_forward, refuses_cache

MODULE = 'transformers.models.recurrent_gemma.modeling_recurrent_gemma'


def model_forward(rules, self, input_ids: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None,
                  attention_mask: Optional[torch.Tensor] = None, inputs_embeds: Optional[torch.Tensor] = None,
                  use_cache: Optional[bool] = None, cache=None, **kwargs):
    '''Forward of a canonized ``RecurrentGemmaModel``: the original's, after refusing what it would compute otherwise
    than the explained sequence (see the module's docstring) before anything of the model changes: the original
    sets up the recurrent blocks' states on ``use_cache=True``.'''
    if cache is None:  # the cache's name before transformers 5.24, which the original still takes
        cache = kwargs.pop('past_key_values', None)
    if (use_cache if use_cache is not None else self.config.use_cache) or cache is not None:
        raise RuntimeError(refuses_cache())
    refuse_padding(attention_mask, 'RecurrentGemma', 'RecurrentGemma\'s recurrent blocks')
    return type(self).forward(self, input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                              inputs_embeds=inputs_embeds, use_cache=False, cache=None, **kwargs)


def causal_lm_forward(rules, self, input_ids: Optional[torch.Tensor] = None,
                      position_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                      inputs_embeds: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                      use_cache: Optional[bool] = None, logits_to_keep=0, cache=None, **kwargs):
    '''Forward of a canonized ``RecurrentGemmaForCausalLM``: the original's, with the identity rule on the logits'
    soft-cap, ``l' = tanh(l / cap) * cap`` with ``l' / l`` held constant, so that ``R(l) = R(l')``.'''
    return_dict = pop_return_dict(self.config, kwargs)
    outputs = self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                         inputs_embeds=inputs_embeds, use_cache=use_cache, cache=cache, **kwargs)
    logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
    logits = soft_cap(rules, logits, self.config.logits_soft_cap)
    loss = None
    if labels is not None:
        loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
    output = CausalLMOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                            attentions=outputs.attentions)
    return output if return_dict else output.to_tuple()


FAMILY = Family(
    name='RecurrentGemma', library='transformers', hybrid=True, beside='local attention, gated MLPs',
    library_modules=(MODULE,),
    canonized=in_module(MODULE, {
        'RecurrentGemmaRecurrentBlock': Canonized(block_forward,
                                                  projections=('linear_x', 'linear_y', 'conv_1d', 'linear_out')),
        'RecurrentGemmaModel': Canonized(model_forward, mixer=False),
        'RecurrentGemmaForCausalLM': Canonized(causal_lm_forward, mixer=False),
    }),
    layers=in_module(MODULE, {
        'RecurrentGemmaPreTrainedModel': COMPOSITION, 'RecurrentGemmaDecoderLayer': COMPOSITION,
        'RecurrentGemmaRMSNorm': NORM, 'RecurrentGemmaAttention': ATTENTION,
        'RecurrentGemmaRotaryEmbedding': POSITIONS, 'RecurrentGemmaMlp': gated_mlp('down_proj'),
        # computed by the canonized block from its parameters
        'RecurrentGemmaRglru': INSIDE_MIXER,
    }),
)
