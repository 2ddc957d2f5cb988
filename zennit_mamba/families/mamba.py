'''Mamba (transformers' ``MambaForCausalLM``; Gu and Dao, 2023): Mamba-1 mixers between RMSNorms, the paper's model.'''
from zennit_mamba.core.family import Family, in_module
from zennit_mamba.core.layers import COMPOSITION, NORM
from zennit_mamba.mixers import mamba1

MODULE = 'transformers.models.mamba.modeling_mamba'

FAMILY = Family(
    name='Mamba', library='transformers', library_modules=(MODULE,),
    canonized=in_module(MODULE, {'MambaMixer': mamba1.TRANSFORMERS_MIXER}),
    layers=in_module(MODULE, {
        'MambaForCausalLM': COMPOSITION, 'MambaModel': COMPOSITION, 'MambaPreTrainedModel': COMPOSITION,
        'MambaBlock': COMPOSITION, 'MambaRMSNorm': NORM,
    }),
)
