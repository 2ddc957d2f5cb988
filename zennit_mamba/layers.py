'''Explicit modules for the operations a Mamba block otherwise performs functionally.

Canonizers insert these so that rules can be attached to every operation on the relevance path. Each module takes
exactly one tensor input that carries relevance (several operands are stacked or concatenated into it), because
Zennit hooks see only a module's first input.
'''
from typing import Tuple

import torch
import torch.nn.functional as F

from .scan import selective_scan

#: the attribute of a :py:class:`SelectiveScan` that holds its registered DetachSelection rule
DETACH_ATTRIBUTE = 'lrp_detach_selection'
#: the attribute of a canonized block that, while true, makes its residual sum a plain addition (a one-pass rule
#: differentiates the sum as it is, so no rule needs to attach to it)
PLAIN_SUM_ATTRIBUTE = 'lrp_plain_sum'


def stack_operands(*operands: torch.Tensor) -> torch.Tensor:
    '''Stack operands along a new last dimension in their promoted dtype, as the single input of
    :py:class:`GateProduct` or :py:class:`zennit.layer.Sum`.'''
    dtype = operands[0].dtype
    for operand in operands[1:]:
        dtype = torch.promote_types(dtype, operand.dtype)
    return torch.stack([operand.to(dtype) for operand in operands], dim=-1)


def residual_sum(block: torch.nn.Module, residual: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    '''``residual + update`` through the canonized ``block``'s explicit :py:class:`zennit.layer.Sum`
    (``block.lrp_residual``), or as a plain addition while the block's :data:`PLAIN_SUM_ATTRIBUTE` is set.'''
    if getattr(block, PLAIN_SUM_ATTRIBUTE, False):
        return residual + update
    return block.lrp_residual(stack_operands(residual, update))


class SiLU(torch.nn.Module):
    '''``x * sigmoid(x)``; one instance per call site, so that no hook is shared between two uses.'''

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.silu(input)


class Softplus(torch.nn.Module):
    '''``log(1 + exp(x))``, the positive step size of the selective scan.'''

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.softplus(input)


class GateProduct(torch.nn.Module):
    '''Product of the operands stacked along the last dimension: ``stack([y, gate], -1) -> y * gate``.'''

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return input.prod(dim=-1)


class SelectiveScan(torch.nn.Module):
    '''Selective scan of Mamba-1 on one packed input ``cat([x, delta, B, C], dim=1)``.

    Parameters
    ----------
    channels : int
        Number of channels of ``x`` and ``delta``.
    state_size : int
        Number of rows of ``B`` and ``C``.

    While a :py:class:`~zennit_mamba.rules.DetachSelection` is registered (it sets :py:data:`DETACH_ATTRIBUTE`), the
    input-dependent parameters ``delta``, ``B`` and ``C`` are constants for autograd, so that the output is linear
    in ``x``; the forward values do not depend on it.
    '''

    def __init__(self, channels: int, state_size: int):
        super().__init__()
        self.channels = channels
        self.state_size = state_size

    def forward(
        self, packed: torch.Tensor, A: torch.Tensor, D: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        '''Return the scan output of shape ``(batch, channels, length)`` and the last state (no gradient).'''
        x, delta, B, C = self.unpack(packed)
        if getattr(self, DETACH_ATTRIBUTE, None) is not None:
            delta, A, B, C = delta.detach(), A.detach(), B.detach(), C.detach()
        return selective_scan(x, delta, A, B, C, D)

    def unpack(self, packed: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        '''Split the packed input into ``x, delta, B, C``.'''
        sizes = [self.channels, self.channels, self.state_size, self.state_size]
        return torch.split(packed, sizes, dim=1)

    @staticmethod
    def pack(x: torch.Tensor, delta: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
        '''Concatenate ``x, delta`` (batch, channels, length) and ``B, C`` (batch, state, length) along dim 1.'''
        dtype = torch.promote_types(x.dtype, delta.dtype)
        return torch.cat([x.to(dtype), delta.to(dtype), B.to(dtype), C.to(dtype)], dim=1)

    def extra_repr(self) -> str:
        return f'channels={self.channels}, state_size={self.state_size}'
