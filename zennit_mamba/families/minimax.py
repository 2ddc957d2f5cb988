'''MiniMax (transformers' ``MiniMaxForCausalLM``): lightning attention layers, softmax attention every few layers, and
mixtures of experts.

Lightning attention is linear attention with a fixed decay ``lambda_h = exp(-s_h)`` per head (the slope rate): with
``[q, k, v] = act(qkv_proj(x))`` (SiLU),::

    S_t = lambda_h S_{t-1} + k_t v_t^T,     o_t = S_t^T q_t = sum_{s <= t} lambda_h^(t-s) (q_t . k_s) v_s
    y = out_proj(sigmoid(output_gate(x)) * norm(o))

MambaLRP's principles carry over as for Gated DeltaNet (:py:mod:`~zennit_mamba.mixers.gated_deltanet`): the queries and
keys are what the input selects (how strongly position ``s`` is written and read), held constant by the selection rule
(``'ssm'``), so that ``o`` is linear in ``v`` and relevance flows through the values only, as through ``x`` in Mamba's
scan (the decays are constants already); the activation by the identity rule (``'silu'``); the RMS norm over all heads
by the LN-rule (``'norm'``: its ratio held where the canonized layer calls the norm); the sigmoid output gate held
constant as routing weights are (``'attention'``): the signal takes all relevance. The residual sums scaled by the
layers' alpha and beta factors are linear (LRP-0). The softmax attention layers take the attention rule, the experts
the half rule on their gated products, the router's weights are held.
'''
from typing import Optional

import torch

from zennit_mamba.core.family import Canonized, Family, in_module
from zennit_mamba.core.layers import ATTENTION, COMPOSITION, EXPERTS, NORM, POSITIONS, ROUTER
from zennit_mamba.core.upstream import refuse_keywords
from zennit_mamba.mixers.io import mask_padding, refuse_continuation, run_mixer

MODULE = 'transformers.models.minimax.modeling_minimax'


def lightning_attention(rules, layer: torch.nn.Module, hidden_states: torch.Tensor,
                        attention_mask: Optional[torch.Tensor]):
    '''A ``MiniMaxLightningAttention`` on ``(batch, length, hidden)`` hidden states under ``rules``: the output and
    the last state ``sum_s lambda^(L-1-s) k_s v_s^T`` ``(batch, heads, head_dim, head_dim)`` (for a cache).

    Computed block by block as the original (``block_size`` positions: inside a block the decayed products ``q k^T``,
    across blocks the state), so that memory grows with the length, not its square.'''
    batch, length, _ = hidden_states.shape
    heads, head_dim, block_size = layer.num_attention_heads, layer.head_dim, layer.block_size
    projected = layer.qkv_proj(mask_padding(hidden_states, attention_mask))
    qkv = mask_padding(rules.activated(projected, layer.act_fn(projected)), attention_mask)
    query, key, value = qkv.reshape(batch, length, heads, 3 * head_dim).transpose(1, 2).split(head_dim, dim=-1)
    query, key = rules.selection(query, key)

    state = value.new_zeros(batch, heads, head_dim, head_dim)
    outputs = []
    for start in range(0, length, block_size):
        size = min(block_size, length - start)
        block_query, block_key, block_value = (tensor[:, :, start:start + size] for tensor in (query, key, value))
        # inside the block: sum_{s <= t} lambda^(t-s) (q_t . k_s) v_s; from before it: lambda^(t+1) q_t . S
        weights = (block_query @ block_key.transpose(-1, -2)) * layer.diagonal_decay[:, :, :size, :size]
        outputs.append(weights @ block_value + (block_query * layer.query_decay[:, :size]) @ state)
        written = (block_key * layer.key_decay[:, -size:]).transpose(-1, -2) @ block_value
        state = state * torch.exp(-layer.slope_rate * size) + written
    output = torch.cat(outputs, dim=-2).transpose(1, 2).reshape(batch, length, heads * head_dim)
    gate, = rules.held(torch.sigmoid(layer.output_gate(hidden_states)))
    # the norm's own forward (in float32, whatever the dtype), its ratio held by the LN-rule
    return layer.out_proj(gate * rules.norm(output, layer.norm(output))), state


def lightning_attention_forward(rules, self, hidden_states: torch.Tensor, position_embeddings=None,
                                attention_mask: Optional[torch.Tensor] = None, cache=None, **kwargs):
    '''Forward of a canonized ``MiniMaxLightningAttention``; fills a fresh cache's state as the original does.'''
    refuse_keywords(self, kwargs)
    if cache is not None and cache.get_linear_cache(self.layer_idx) is not None:
        raise refuse_continuation()
    output, state = run_mixer(rules, lightning_attention, self, hidden_states, attention_mask)
    if cache is not None:
        cache.set_linear_cache(self.layer_idx, state.detach())
    return output, state.detach()


FAMILY = Family(
    name='MiniMax', library='transformers', hybrid=True, beside='attention, experts',
    library_modules=(MODULE,),
    canonized=in_module(MODULE, {
        'MiniMaxLightningAttention': Canonized(lightning_attention_forward, projections=('qkv_proj',)),
    }),
    layers=in_module(MODULE, {
        'MiniMaxForCausalLM': COMPOSITION, 'MiniMaxForSequenceClassification': COMPOSITION,
        'MiniMaxForTokenClassification': COMPOSITION, 'MiniMaxForQuestionAnswering': COMPOSITION,
        'MiniMaxModel': COMPOSITION, 'MiniMaxPreTrainedModel': COMPOSITION, 'MiniMaxDecoderLayer': COMPOSITION,
        # the block norms; inside the lightning attention the canonized layer computes the norm with the LN-rule
        'MiniMaxSparseMoeBlock': COMPOSITION, 'MiniMaxRMSNorm': NORM, 'MiniMaxAttention': ATTENTION,
        'MiniMaxTopKRouter': ROUTER, 'MiniMaxExperts': EXPERTS, 'MiniMaxRotaryEmbedding': POSITIONS,
    }),
)
