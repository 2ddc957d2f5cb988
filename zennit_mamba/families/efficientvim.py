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
    hidden = self.out_proj(rules.gate(hidden, rules.activation('silu', gate)) + hidden * self.D)
    y = hidden @ C
    return y.reshape(batch, -1, height, width).contiguous(), hidden
