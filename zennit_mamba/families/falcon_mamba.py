'''FalconMamba (transformers' ``FalconMambaForCausalLM``): Mamba-1 mixers whose selection (``dt``, ``B``, ``C``) is
RMS-normalised, behind the SSM rule.'''
from zennit_mamba.core.family import Family, in_module
from zennit_mamba.core.layers import COMPOSITION, NORM, SELECTION
from zennit_mamba.mixers import mamba1

MODULE = 'transformers.models.falcon_mamba.modeling_falcon_mamba'

FAMILY = Family(
    name='FalconMamba', library='transformers', library_modules=(MODULE,),
    canonized=in_module(MODULE, {'FalconMambaMixer': mamba1.TRANSFORMERS_MIXER}),
    layers=in_module(MODULE, {
        'FalconMambaForCausalLM': COMPOSITION, 'FalconMambaModel': COMPOSITION,
        'FalconMambaPreTrainedModel': COMPOSITION, 'FalconMambaBlock': COMPOSITION, 'FalconMambaRMSNorm': NORM,
        'FalconMambaWeightlessRMSNorm': SELECTION,
    }),
)
