'''Bamba (IBM): Mamba-2 mixers with attention layers and gated MLPs.'''
from zennit_mamba.core.family import Family, in_module
from zennit_mamba.core.layers import ATTENTION, COMPOSITION, INSIDE_MIXER, NORM, POSITIONS, gated_mlp
from zennit_mamba.mixers import mamba2

MODULE = 'transformers.models.bamba.modeling_bamba'

FAMILY = Family(
    name='Bamba', library='transformers', hybrid=True, beside='attention, gated MLPs',
    library_modules=(MODULE,),
    canonized=in_module(MODULE, {'BambaMixer': mamba2.TRANSFORMERS_MIXER}),
    layers=in_module(MODULE, {
        'BambaForCausalLM': COMPOSITION, 'BambaModel': COMPOSITION, 'BambaPreTrainedModel': COMPOSITION,
        'BambaDecoderLayer': COMPOSITION, 'BambaRMSNorm': NORM, 'BambaRMSNormGated': INSIDE_MIXER,
        'BambaAttention': ATTENTION, 'BambaMLP': gated_mlp('down_proj'), 'BambaRotaryEmbedding': POSITIONS,
    }),
)
