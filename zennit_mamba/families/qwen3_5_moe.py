'''Qwen3.5-MoE (transformers' ``Qwen3_5MoeForCausalLM``): Qwen3.5's Gated DeltaNet and gated attention layers with
Qwen3-Next's mixtures of experts (routed experts and a shared expert behind a sigmoid gate); the rules of
:py:mod:`~zennit_mamba.families.qwen3_next`. The vision encoder of the multimodal model is not explained yet.
'''
from zennit_mamba.core.family import Family, in_module
from zennit_mamba.core.layers import (
    COMPOSITION, EXPERTS, INSIDE_MIXER, NORM, POSITIONS, ROUTER, gated_attention, gated_mlp, held_gate, not_explained,
)
from zennit_mamba.mixers.gated_deltanet import DeltaLayerParts, separate_projections, transformers_layer

MODULE = 'transformers.models.qwen3_5_moe.modeling_qwen3_5_moe'
VISION = not_explained('explain the language model, Qwen3_5MoeForCausalLM')

PARTS = DeltaLayerParts(separate_projections(('in_proj_qkv',), 'in_proj_z', 'in_proj_b', 'in_proj_a'))

FAMILY = Family(
    name='Qwen3.5-MoE', library='transformers', hybrid=True,
    beside='gated attention, experts, a gated shared expert', library_modules=(MODULE,),
    canonized=in_module(MODULE, {
        'Qwen3_5MoeGatedDeltaNet': transformers_layer(PARTS, selection=('in_proj_b', 'in_proj_a')),
    }),
    layers=in_module(MODULE, {
        'Qwen3_5MoeForCausalLM': COMPOSITION, 'Qwen3_5MoeTextModel': COMPOSITION,
        'Qwen3_5MoePreTrainedModel': COMPOSITION, 'Qwen3_5MoeDecoderLayer': COMPOSITION, 'Qwen3_5MoeRMSNorm': NORM,
        'Qwen3_5MoeRMSNormGated': INSIDE_MIXER, 'Qwen3_5MoeAttention': gated_attention('q_proj'),
        'Qwen3_5MoeMLP': gated_mlp('down_proj'), 'Qwen3_5MoeSparseMoeBlock': held_gate('shared_expert_gate'),
        'Qwen3_5MoeExperts': EXPERTS, 'Qwen3_5MoeTopKRouter': ROUTER, 'Qwen3_5MoeTextRotaryEmbedding': POSITIONS,
        # the multimodal model: its wrappers compose, its vision encoder is refused
        'Qwen3_5MoeModel': COMPOSITION, 'Qwen3_5MoeForConditionalGeneration': COMPOSITION,
        'Qwen3_5MoeVisionModel': VISION, 'Qwen3_5MoeVisionBlock': VISION, 'Qwen3_5MoeVisionAttention': VISION,
        'Qwen3_5MoeVisionMLP': VISION, 'Qwen3_5MoeVisionPatchEmbed': VISION, 'Qwen3_5MoeVisionPatchMerger': VISION,
        'Qwen3_5MoeVisionRotaryEmbedding': VISION,
    }),
)
