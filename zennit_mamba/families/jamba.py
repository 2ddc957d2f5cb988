'''Jamba (AI21): Mamba-1 mixers with normalised selection, attention layers, gated MLPs and mixtures of experts.'''
from zennit_mamba.core.family import Family, in_module
from zennit_mamba.core.layers import ATTENTION, COMPOSITION, EXPERTS, NORM, ROUTER, gated_mlp
from zennit_mamba.mixers import mamba1

MODULE = 'transformers.models.jamba.modeling_jamba'

FAMILY = Family(
    name='Jamba', library='transformers', hybrid=True, beside='attention, gated MLPs, experts',
    library_modules=(MODULE,),
    canonized=in_module(MODULE, {'JambaMambaMixer': mamba1.TRANSFORMERS_MIXER}),
    layers=in_module(MODULE, {
        'JambaForCausalLM': COMPOSITION, 'JambaForSequenceClassification': COMPOSITION, 'JambaModel': COMPOSITION,
        'JambaPreTrainedModel': COMPOSITION, 'JambaMambaDecoderLayer': COMPOSITION,
        'JambaAttentionDecoderLayer': COMPOSITION, 'JambaSparseMoeBlock': COMPOSITION,
        # the block norms; inside the mixers the same class normalises the selection, which the mixer computes
        'JambaRMSNorm': NORM, 'JambaAttention': ATTENTION, 'JambaMLP': gated_mlp('down_proj'),
        'JambaTopKRouter': ROUTER, 'JambaExperts': EXPERTS,
    }),
)
