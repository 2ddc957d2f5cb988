'''timm's EfficientViM (Lee et al., CVPR 2025): its HSM-SSD mixer under the MambaLRP rules.

HSM-SSD computes a Mamba-2-like state space in its dual form over all tokens of an image: from the input ``x``
(``(batch, channels, tokens)``) it selects ``B``, ``C`` and a step ``dt``, forms ``a = softmax_tokens(dt + A)``, reads
a hidden state ``h = x (a B)^T`` (``(batch, channels, state)``), mixes it in the state space as
``h' = out_proj(h * silu(z) + D h)`` with ``[h; z] = hz_proj(h)``, and writes it back, ``y = h' C``. The MambaLRP
treatment, as for Mamba's selective SSM: ``a``, ``B`` and ``C`` (the selection) are constants, so ``h`` and ``y``
are linear in ``x`` and ``h'``; the gate ``h * silu(z)`` takes the half rule and its SiLU the identity rule.
Around the mixer, the LayerNorms take the LN-rule (:py:class:`~zennit_mamba.rules.LNRule`), the squeeze-and-excitation
scales of the downsampling blocks are held constant (:py:class:`~zennit_mamba.rules.AttentionRule`, as routing weights
are), and convolutions, batch norms (affine in eval mode), ReLUs, pooling and the learned head weights pass relevance
by LRP-0.
'''
from typing import Tuple

import torch

from zennit_mamba.core.family import Canonized, Family, Treatment, in_module
from zennit_mamba.core.layers import COMPOSITION, EXCITATION, LINEAR, NORM, PLAIN_MLP
from zennit_mamba.rules import LNRule

MODULE = 'timm.models.efficientvim'


def hsmssd_forward(rules, self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    '''Forward of a canonized ``timm.models.efficientvim.HSMSSD``: the original computation under ``rules``.'''
    batch, _, height, width = x.shape
    x = x.flatten(2)
    selection = self.dw(self.BCdt_proj(x).reshape(batch, -1, height, width)).flatten(2)
    B, C, dt = torch.split(selection, [self.state_dim, self.state_dim, self.state_dim], dim=1)
    a = (dt + self.A.view(1, -1, 1)).softmax(-1)
    a, B, C = rules.selection(a, B, C)
    hidden = x @ (a * B).transpose(-2, -1)
    hidden, gate = torch.split(self.hz_proj(hidden), [self.d_inner, self.d_inner], dim=1)
    hidden = self.out_proj(rules.output_gate(hidden, rules.activation('silu', gate)) + hidden * self.D)
    y = hidden @ C
    return y.reshape(batch, -1, height, width).contiguous(), hidden


class ChannelNorm(LNRule):
    '''The LN-rule on timm's ``LayerNorm2d``, which normalises the channels of ``(batch, channels, height, width)``:
    the centred form over dimension 1.'''

    def on_output(self, module, args, output):
        weight, bias = (None if value is None else value.view(-1, 1, 1) for value in (module.weight, module.bias))
        return self.apply_centred(args[0].to(output.device), output, (1,), weight, bias, module.eps)


FAMILY = Family(
    name='EfficientViM', library='timm', library_modules=(MODULE,),
    canonized=in_module(MODULE, {'HSMSSD': Canonized(hsmssd_forward, selection=('BCdt_proj',))}),
    layers={
        **in_module(MODULE, {
            'EfficientViM': COMPOSITION, 'EfficientViMDistilled': COMPOSITION, 'EfficientViMStage': COMPOSITION,
            'EfficientViMBlock': COMPOSITION, 'Stem': COMPOSITION, 'ConvLayer1d': COMPOSITION,
            'ConvLayer2d': COMPOSITION, 'PatchMerging': COMPOSITION, 'FFN': PLAIN_MLP,
        }),
        'timm.layers.norm.LayerNorm': NORM,
        'timm.layers.norm.LayerNorm2d': Treatment('LN-rule over the channels', 'norm', ChannelNorm),
        'timm.layers.squeeze_excite.SEModule': EXCITATION,
        # the sigmoid inside squeeze-and-excitation, whose scale is held constant: no relevance passes it
        'timm.layers.activations.Sigmoid': LINEAR,
    },
)
