'''Qwen3.5 (transformers' ``Qwen3_5ForCausalLM``): Gated DeltaNet layers, gated attention every few layers, and
gated MLPs.

The language model is Qwen3-Next's without experts and with one projection per part of its Gated DeltaNet layers
(``in_proj_qkv``, ``in_proj_z``, ``in_proj_b``, ``in_proj_a``); the rules are the same
(:py:mod:`~zennit_mamba.families.qwen3_next`). The vision encoder of the multimodal model is not explained yet: a
model that contains it is refused.
'''
from zennit_mamba.core.family import Family, in_module
from zennit_mamba.core.layers import (
    COMPOSITION, INSIDE_MIXER, NORM, POSITIONS, gated_attention, gated_mlp, not_explained,
)
from zennit_mamba.mixers.gated_deltanet import DeltaLayerParts, separate_projections, transformers_layer

MODULE = 'transformers.models.qwen3_5.modeling_qwen3_5'
#: how a multimodal model's language part is explained meanwhile
VISION = not_explained('explain the language model, Qwen3_5ForCausalLM')

PARTS = DeltaLayerParts(separate_projections(('in_proj_qkv',), 'in_proj_z', 'in_proj_b', 'in_proj_a'))

FAMILY = Family(
    name='Qwen3.5', library='transformers', hybrid=True, beside='gated attention, gated MLPs',
    library_modules=(MODULE,),
    canonized=in_module(MODULE, {
        'Qwen3_5GatedDeltaNet': transformers_layer(PARTS, selection=('in_proj_b', 'in_proj_a')),
    }),
    layers=in_module(MODULE, {
        'Qwen3_5ForCausalLM': COMPOSITION, 'Qwen3_5TextModel': COMPOSITION, 'Qwen3_5PreTrainedModel': COMPOSITION,
        'Qwen3_5DecoderLayer': COMPOSITION, 'Qwen3_5RMSNorm': NORM, 'Qwen3_5RMSNormGated': INSIDE_MIXER,
        'Qwen3_5Attention': gated_attention('q_proj'), 'Qwen3_5MLP': gated_mlp('down_proj'),
        'Qwen3_5TextRotaryEmbedding': POSITIONS,
        # transformers' generic heads: a linear layer on the hidden states (of the last real token, for sequences)
        'Qwen3_5TextForSequenceClassification': COMPOSITION, 'Qwen3_5ForTokenClassification': COMPOSITION,
        # the multimodal model: its wrappers compose, its vision encoder is refused
        'Qwen3_5Model': COMPOSITION, 'Qwen3_5ForConditionalGeneration': COMPOSITION,
        'Qwen3_5ForSequenceClassification': COMPOSITION,
        'Qwen3_5VisionModel': VISION, 'Qwen3_5VisionBlock': VISION, 'Qwen3_5VisionAttention': VISION,
        'Qwen3_5VisionMLP': VISION, 'Qwen3_5VisionPatchEmbed': VISION, 'Qwen3_5VisionPatchMerger': VISION,
        'Qwen3_5VisionRotaryEmbedding': VISION,
    }),
)
