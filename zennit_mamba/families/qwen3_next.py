'''Qwen3-Next (transformers' ``Qwen3NextForCausalLM``): Gated DeltaNet layers, gated attention every few layers,
and mixtures of experts with a gated shared expert.

The Gated DeltaNet layers take MambaLRP's rules as :py:mod:`~zennit_mamba.mixers.gated_deltanet` derives them. Its
attention gates its output, ``o_proj((P V) * sigmoid(g))`` with ``[q, g]`` from one ``q_proj``: the attention rule
holds ``P`` and the gate constant (both select). Its sparse MoE block adds ``sigmoid(shared_expert_gate(x))`` times
the shared expert to the routed experts: the gate is held constant as the routing weights are. Its RMSNorms scale by
``1 + w``; the LN-rule holds their ratio ``u / h`` all the same.
'''
from typing import Tuple

import torch

from zennit_mamba.core.family import Family, in_module
from zennit_mamba.core.layers import (
    COMPOSITION, EXPERTS, INSIDE_MIXER, NORM, POSITIONS, ROUTER, gated_attention, gated_mlp, held_gate,
)
from zennit_mamba.mixers.gated_deltanet import DeltaLayerParts, gated_deltanet_selection, transformers_layer

MODULE = 'transformers.models.qwen3_next.modeling_qwen3_next'


def project(layer: torch.nn.Module, hidden_states: torch.Tensor
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    '''Qwen3-Next's projections: ``in_proj_qkvz`` and ``in_proj_ba``, grouped by key head, put in order by the layer's
    own ``fix_query_key_value_ordering``; the convolution's input, the gate, the write strengths and log-decays.'''
    query, key, value, z, b, a = layer.fix_query_key_value_ordering(layer.in_proj_qkvz(hidden_states),
                                                                     layer.in_proj_ba(hidden_states))
    conv_input = torch.cat([tensor.flatten(2) for tensor in (query, key, value)], dim=-1)
    return (conv_input, z.flatten(2), *gated_deltanet_selection(layer, b, a))


FAMILY = Family(
    name='Qwen3-Next', library='transformers', hybrid=True, beside='gated attention, experts, a gated shared expert',
    library_modules=(MODULE,),
    canonized=in_module(MODULE, {
        'Qwen3NextGatedDeltaNet': transformers_layer(DeltaLayerParts(project), selection=('in_proj_ba',)),
    }),
    layers=in_module(MODULE, {
        'Qwen3NextForCausalLM': COMPOSITION, 'Qwen3NextModel': COMPOSITION, 'Qwen3NextPreTrainedModel': COMPOSITION,
        'Qwen3NextDecoderLayer': COMPOSITION, 'Qwen3NextRMSNorm': NORM, 'Qwen3NextRMSNormGated': INSIDE_MIXER,
        'Qwen3NextAttention': gated_attention('q_proj'), 'Qwen3NextMLP': gated_mlp('down_proj'),
        'Qwen3NextSparseMoeBlock': held_gate('shared_expert_gate'), 'Qwen3NextExperts': EXPERTS,
        'Qwen3NextTopKRouter': ROUTER, 'Qwen3NextRotaryEmbedding': POSITIONS,
        # transformers' generic heads: a linear layer on the hidden states (of the last real token, for sequences)
        'Qwen3NextForSequenceClassification': COMPOSITION, 'Qwen3NextForTokenClassification': COMPOSITION,
        'Qwen3NextForQuestionAnswering': COMPOSITION,
    }),
)
