'''Kimi-Linear (transformers' ``KimiLinearForCausalLM``): Kimi Delta Attention layers, multi-head latent attention
every few layers, and mixtures of experts with shared experts.

Kimi Delta Attention is Gated DeltaNet with a decay per key channel, computed by a forget-gate module (a low-rank
projection, ``dt_bias`` and ``A_log``), and an output gated by a sigmoid: ``o_proj(w * rms(o) * sigmoid(z))``. The
rules are those of :py:mod:`~zennit_mamba.mixers.gated_deltanet`: the selection (``q``, ``k``, the decays and write
strengths) held constant, the sigmoid gate held as routing weights are. The latent attention normalises its
compressed keys and values with an RMSNorm, which takes the LN-rule (values pass it); its probabilities are held
constant. The experts' router (sigmoid scores with a correction bias and groups) gives weights held constant.
'''
from typing import Tuple

import torch

from zennit_mamba.core.family import Family, Treatment, in_module
from zennit_mamba.core.layers import ATTENTION, COMPOSITION, EXPERTS, INSIDE_MIXER, NORM, ROUTER, gated_mlp
from zennit_mamba.mixers.gated_deltanet import DeltaLayerParts, transformers_layer

MODULE = 'transformers.models.kimi_linear.modeling_kimi_linear'

#: the forget gate, which the canonized layer calls for the decays: behind the selection rule
FORGET_GATE = Treatment('computes the decays (the selection), behind the SSM rule: no relevance passes it')


def project(layer: torch.nn.Module, hidden_states: torch.Tensor
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    '''Kimi Delta Attention's projections: ``[q, k, v]`` for the convolution, the output gate through its low-rank
    pair, the write strengths ``sigmoid(b_proj(x))`` and the per-channel log-decays of ``forget_gate``.'''
    conv_input = torch.cat([layer.q_proj(hidden_states), layer.k_proj(hidden_states), layer.v_proj(hidden_states)],
                           dim=-1)
    gate = layer.g_b_proj(layer.g_a_proj(hidden_states))
    return conv_input, gate, torch.sigmoid(layer.b_proj(hidden_states)), layer.forget_gate(hidden_states)


PARTS = DeltaLayerParts(project, norm='o_norm', output='o_proj', gate='sigmoid')

FAMILY = Family(
    name='Kimi-Linear', library='transformers', hybrid=True, beside='latent attention, experts, shared experts',
    library_modules=(MODULE,),
    canonized=in_module(MODULE, {
        'KimiLinearDeltaAttention': transformers_layer(PARTS, selection=('forget_gate', 'b_proj')),
    }),
    layers=in_module(MODULE, {
        'KimiLinearForCausalLM': COMPOSITION, 'KimiLinearModel': COMPOSITION, 'KimiLinearPreTrainedModel': COMPOSITION,
        'KimiLinearDecoderLayer': COMPOSITION, 'KimiLinearMoE': COMPOSITION, 'KimiLinearRMSNorm': NORM,
        'KimiLinearRMSNormGated': INSIDE_MIXER, 'KimiLinearForgetGate': FORGET_GATE,
        'KimiLinearAttention': ATTENTION, 'KimiLinearMLP': gated_mlp('down_proj'), 'KimiLinearExperts': EXPERTS,
        'KimiLinearTopkRouter': ROUTER,
    }),
)
