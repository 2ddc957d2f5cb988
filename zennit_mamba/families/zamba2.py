'''Zamba2 (Zyphra): Mamba-2 mixers and one attention block shared between layers (with per-layer LoRA adapters).'''
from zennit_mamba.core.family import Family, in_module
from zennit_mamba.core.layers import ATTENTION, COMPOSITION, INSIDE_MIXER, NORM, POSITIONS, gated_mlp
from zennit_mamba.mixers import mamba2

MODULE = 'transformers.models.zamba2.modeling_zamba2'

FAMILY = Family(
    name='Zamba2', library='transformers', hybrid=True, beside='a shared attention block with gated MLPs',
    library_modules=(MODULE,),
    canonized=in_module(MODULE, {'Zamba2MambaMixer': mamba2.TRANSFORMERS_MIXER}),
    layers=in_module(MODULE, {
        'Zamba2ForCausalLM': COMPOSITION, 'Zamba2ForSequenceClassification': COMPOSITION, 'Zamba2Model': COMPOSITION,
        'Zamba2PreTrainedModel': COMPOSITION, 'Zamba2MambaDecoderLayer': COMPOSITION,
        'Zamba2HybridLayer': COMPOSITION, 'Zamba2AttentionDecoderLayer': COMPOSITION, 'Zamba2RMSNorm': NORM,
        'Zamba2RMSNormGated': INSIDE_MIXER, 'Zamba2Attention': ATTENTION, 'Zamba2MLP': gated_mlp('down_proj'),
        'Zamba2RotaryEmbedding': POSITIONS,
    }),
)
