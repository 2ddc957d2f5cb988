'''Mamba-2 (transformers' ``Mamba2ForCausalLM``; Dao and Gu, 2024): SSD mixers with a gated RMSNorm between RMSNorms.'''
from zennit_mamba.core.family import Family, in_module
from zennit_mamba.core.layers import COMPOSITION, INSIDE_MIXER, NORM
from zennit_mamba.mixers import mamba2

MODULE = 'transformers.models.mamba2.modeling_mamba2'

FAMILY = Family(
    name='Mamba-2', library='transformers', library_modules=(MODULE,),
    canonized=in_module(MODULE, {'Mamba2Mixer': mamba2.TRANSFORMERS_MIXER}),
    layers=in_module(MODULE, {
        'Mamba2ForCausalLM': COMPOSITION, 'Mamba2Model': COMPOSITION, 'Mamba2PreTrainedModel': COMPOSITION,
        'Mamba2Block': COMPOSITION, 'Mamba2RMSNorm': NORM, 'MambaRMSNormGated': INSIDE_MIXER,
        'Mamba2RMSNormGated': INSIDE_MIXER,
    }),
    # transformers 5.25 renamed the gated norm
    renamed=((f'{MODULE}.MambaRMSNormGated', f'{MODULE}.Mamba2RMSNormGated'),),
)
