'''NemotronH (NVIDIA): Mamba-2 mixers, attention, squared-ReLU MLPs and mixtures of experts, each its own block.'''
from zennit_mamba.core.family import Family, in_module
from zennit_mamba.core.layers import ATTENTION, COMPOSITION, EXPERTS, INSIDE_MIXER, NORM, PLAIN_MLP, ROUTER
from zennit_mamba.mixers import mamba2

MODULE = 'transformers.models.nemotron_h.modeling_nemotron_h'

FAMILY = Family(
    name='NemotronH', library='transformers', hybrid=True, beside='attention, MLPs, experts',
    library_modules=(MODULE,),
    canonized=in_module(MODULE, {'NemotronHMamba2Mixer': mamba2.TRANSFORMERS_MIXER}),
    layers=in_module(MODULE, {
        'NemotronHForCausalLM': COMPOSITION, 'NemotronHModel': COMPOSITION, 'NemotronHPreTrainedModel': COMPOSITION,
        'NemotronHBlock': COMPOSITION, 'NemotronHMoE': COMPOSITION, 'NemotronHRMSNorm': NORM,
        'NemotronHRMSNormGated': INSIDE_MIXER, 'NemotronHAttention': ATTENTION, 'NemotronHMLP': PLAIN_MLP,
        'NemotronHExperts': EXPERTS, 'NemotronHTopkRouter': ROUTER,
    }),
)
