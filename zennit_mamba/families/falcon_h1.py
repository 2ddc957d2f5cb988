'''FalconH1 (TII): attention and Mamba-2 mixers side by side in every layer, gated MLPs.'''
from zennit_mamba.core.family import Family, in_module
from zennit_mamba.core.layers import ATTENTION, COMPOSITION, INSIDE_MIXER, NORM, POSITIONS, gated_mlp
from zennit_mamba.mixers import mamba2

MODULE = 'transformers.models.falcon_h1.modeling_falcon_h1'

FAMILY = Family(
    name='FalconH1', library='transformers', hybrid=True, beside='attention (in parallel), gated MLPs',
    library_modules=(MODULE,),
    canonized=in_module(MODULE, {'FalconH1Mixer': mamba2.TRANSFORMERS_MIXER}),
    layers=in_module(MODULE, {
        'FalconH1ForCausalLM': COMPOSITION, 'FalconH1Model': COMPOSITION, 'FalconH1PreTrainedModel': COMPOSITION,
        'FalconH1DecoderLayer': COMPOSITION, 'FalconH1RMSNorm': NORM, 'FalconH1RMSNormGated': INSIDE_MIXER,
        'FalconH1Attention': ATTENTION, 'FalconH1MLP': gated_mlp('down_proj'), 'FalconH1RotaryEmbedding': POSITIONS,
    }),
)
