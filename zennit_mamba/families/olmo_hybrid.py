'''OLMo-Hybrid (transformers' ``OlmoHybridForCausalLM``): Gated DeltaNet layers with full attention every few layers,
and gated MLPs.

Its Gated DeltaNet layers project each part on its own (``q_proj``, ``k_proj``, ``v_proj``, the gate ``g_proj``,
``b_proj``, ``a_proj``) and may let the write strength reach 2 (``linear_allow_neg_eigval``: ``beta = 2 sigmoid(b)``,
held constant as any ``beta``); the rules are those of :py:mod:`~zennit_mamba.mixers.gated_deltanet`. Its attention
has no output gate, and its attention layers normalise after the attention and the MLP (post-norm): the LN-rule holds
each norm's ratio whatever its place.
'''
from zennit_mamba.core.family import Family, in_module
from zennit_mamba.core.layers import ATTENTION, COMPOSITION, INSIDE_MIXER, NORM, POSITIONS, gated_mlp
from zennit_mamba.mixers.gated_deltanet import DeltaLayerParts, separate_projections, transformers_layer

MODULE = 'transformers.models.olmo_hybrid.modeling_olmo_hybrid'

PARTS = DeltaLayerParts(separate_projections(('q_proj', 'k_proj', 'v_proj'), 'g_proj', 'b_proj', 'a_proj'),
                           norm='o_norm', output='o_proj')

FAMILY = Family(
    name='OLMo-Hybrid', library='transformers', hybrid=True, beside='attention, gated MLPs',
    library_modules=(MODULE,),
    canonized=in_module(MODULE, {
        'OlmoHybridGatedDeltaNet': transformers_layer(PARTS, selection=('b_proj', 'a_proj')),
    }),
    layers=in_module(MODULE, {
        'OlmoHybridForCausalLM': COMPOSITION, 'OlmoHybridModel': COMPOSITION, 'OlmoHybridPreTrainedModel': COMPOSITION,
        'OlmoHybridAttentionDecoderLayer': COMPOSITION, 'OlmoHybridLinearAttentionDecoderLayer': COMPOSITION,
        'OlmoHybridRMSNorm': NORM, 'OlmoHybridRMSNormGated': INSIDE_MIXER, 'OlmoHybridAttention': ATTENTION,
        'OlmoHybridMLP': gated_mlp('down_proj'), 'OlmoHybridRotaryEmbedding': POSITIONS,
    }),
)
