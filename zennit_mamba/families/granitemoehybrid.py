'''GraniteMoeHybrid (IBM Granite 4.0): Mamba-2 mixers, attention, mixtures of experts and a shared gated MLP.'''
from zennit_mamba.core.family import Family, in_module
from zennit_mamba.core.layers import ATTENTION, COMPOSITION, EXPERTS, INSIDE_MIXER, NORM, POSITIONS, ROUTER, gated_mlp
from zennit_mamba.mixers import mamba2

MODULE = 'transformers.models.granitemoehybrid.modeling_granitemoehybrid'

FAMILY = Family(
    name='GraniteMoeHybrid', library='transformers', hybrid=True, beside='attention, experts, a shared gated MLP',
    library_modules=(MODULE,),
    canonized=in_module(MODULE, {'GraniteMoeHybridMambaLayer': mamba2.TRANSFORMERS_MIXER}),
    layers=in_module(MODULE, {
        'GraniteMoeHybridForCausalLM': COMPOSITION, 'GraniteMoeHybridModel': COMPOSITION,
        'GraniteMoeHybridPreTrainedModel': COMPOSITION, 'GraniteMoeHybridDecoderLayer': COMPOSITION,
        'GraniteMoeHybridMoE': COMPOSITION, 'GraniteMoeHybridRMSNorm': NORM,
        'GraniteMoeHybridRMSNormGated': INSIDE_MIXER, 'GraniteMoeHybridAttention': ATTENTION,
        'GraniteMoeHybridMLP': gated_mlp('output_linear'), 'GraniteMoeHybridExperts': EXPERTS,
        'GraniteMoeHybridTopKRouter': ROUTER, 'GraniteMoeHybridRotaryEmbedding': POSITIONS,
    }),
)
