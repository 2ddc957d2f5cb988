'''A Mamba-1 branch's SiLU, selective scan and gate under all three of their MambaLRP rules, as one autograd function
around mamba-ssm's CUDA kernels: the same relevance as :py:class:`~zennit_mamba.rules.RuleSet`'s operations in turn,
in fewer kernel launches and autograd nodes (the selection carries no gradient, so none of it is recorded).

For the convolution output ``c``, the gate input ``z`` and the (constant) selection ``delta, A, B, C``, the forward
is mamba-ssm's ``o = scan(silu(c)) * silu(z)`` (one kernel, the skip ``D`` included). The backward applies

* the half rule (:py:class:`~zennit_mamba.rules.HalfRule`): each factor of ``o = y * g`` gets half of ``dL/do``;
* the identity rule for both SiLUs (:py:class:`~zennit_mamba.rules.SiLUIdentity`): ``dL/dx = dL/dsilu(x) *
  sigmoid(x)``, so that ``x * dL/dx = silu(x) * dL/dsilu(x)``;
* the detached selection (:py:class:`~zennit_mamba.rules.DetachSelection`): mamba-ssm's backward kernel gives the
  gradient of the scan in ``silu(c)`` for fixed ``delta, A, B, C``; its other gradients are discarded.

So ``dL/dc = bwd_u(dL/do / 2) * sigmoid(c)`` and ``dL/dz = dL/do / 2 * y * sigmoid(z)``.
'''
import functools
from typing import Tuple

import torch

from ._optional import mamba_ssm_scan_extension

#: elements per program of the Triton kernel of :py:func:`rule_factors`
_BLOCK = 1024


def applies(conv: torch.Tensor) -> bool:
    '''Whether the fused function can compute a branch whose convolution output is ``conv``: a CUDA tensor of a
    dtype mamba-ssm's kernel takes, with mamba-ssm installed and gradients recorded.

    Parameters
    ----------
    conv : :py:obj:`torch.Tensor`
        The branch's convolution output ``(batch, channels, length)``.

    Returns
    -------
    bool

    Examples
    --------
    >>> applies(torch.zeros(1, 2, 3))  # a CPU tensor: the rule set's operations in turn
    False
    '''
    return (conv.is_cuda and conv.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and torch.is_grad_enabled() and mamba_ssm_scan_extension() is not None)


class SiLUScanGate(torch.autograd.Function):
    '''``scan(silu(conv)) * silu(gate)`` with the SiLU, SSM and gate rules (see the module's equations).'''

    @staticmethod
    def forward(ctx, conv: torch.Tensor, activated: torch.Tensor, gate: torch.Tensor, delta: torch.Tensor,
                A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        kernel = mamba_ssm_scan_extension()
        # the kernel's layout: time contiguous, B and C with one group (batch, 1, state, length)
        u, delta, gate = (value.contiguous() for value in (activated, delta, gate))
        B, C = (value.contiguous().unsqueeze(1) for value in (B, C))
        out, states, gated = kernel.fwd(u, delta, A, B, C, D, gate, None, False)
        ctx.save_for_backward(conv, u, delta, A, B, C, D, gate, states, out)
        last_state = states[:, :, -1, 1::2]
        ctx.mark_non_differentiable(last_state)
        return gated, last_state

    @staticmethod
    def backward(ctx, gradient: torch.Tensor, _last_state_gradient: torch.Tensor):
        conv, u, delta, A, B, C, D, gate, states, out = ctx.saved_tensors
        gradient = gradient.contiguous()
        # the kernel's gradient in u for fixed delta, A, B, C (z given: it multiplies by silu(z) itself), for the whole
        # gradient; the half rule's factor 1/2 is applied below, with the SiLUs' factors
        gradient_u = mamba_ssm_scan_extension().bwd(u, delta, A, B, C, D, gate, None, gradient, states, out, None,
                                                    False, False)[0]
        gradient_conv, gradient_gate = rule_factors(gradient_u, conv, gradient, out, gate)
        return gradient_conv, None, gradient_gate, None, None, None, None, None


def rule_factors(gradient_u: torch.Tensor, conv: torch.Tensor, gradient: torch.Tensor, out: torch.Tensor,
                 gate: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    '''``dL/dc = gradient_u / 2 * sigmoid(c)`` and ``dL/dz = dL/do / 2 * y * sigmoid(z)``, in one Triton kernel where
    Triton is installed and the tensors are on a GPU (one pass over five tensors instead of six element-wise
    kernels), else in PyTorch.

    Parameters
    ----------
    gradient_u : :py:obj:`torch.Tensor`
        The scan kernel's gradient in its input ``silu(c)`` for the whole output gradient.
    conv, gradient, out, gate : :py:obj:`torch.Tensor`
        ``c`` (rows of one stride, as the convolution's sliced output is), ``dL/do``, the scan output ``y`` before
        the gate, and ``z``; all ``(batch, channels, length)``.

    Returns
    -------
    tuple[:py:obj:`torch.Tensor`, :py:obj:`torch.Tensor`]
        ``dL/dc`` and ``dL/dz``.

    Examples
    --------
    >>> ones = torch.ones(1, 1, 2)
    >>> rule_factors(ones, torch.zeros(1, 1, 2), ones, ones, torch.zeros(1, 1, 2))[0]
    tensor([[[0.2500, 0.2500]]])
    '''
    kernel = _triton_rule_factors()
    length = conv.shape[-1]
    # the convolution's output is a slice (batch, channels, length) of a longer contiguous one: rows of one stride
    rows_of_one_stride = conv.stride(-1) == 1 and conv.stride(0) == conv.shape[1] * conv.stride(1)
    if kernel is None or not conv.is_cuda or not rows_of_one_stride or not all(
            value.is_contiguous() for value in (gradient_u, gradient, out, gate)):
        return 0.5 * gradient_u * torch.sigmoid(conv), (0.5 * gradient * out * torch.sigmoid(gate)).to(gate.dtype)
    gradient_conv = torch.empty(conv.shape, dtype=conv.dtype, device=conv.device)
    gradient_gate = torch.empty_like(gate)
    count = conv.numel()
    kernel[(-(-count // _BLOCK),)](gradient_u, conv, gradient, out, gate, gradient_conv, gradient_gate, count,
                                    length, conv.stride(1), BLOCK=_BLOCK)
    return gradient_conv, gradient_gate


@functools.lru_cache(maxsize=None)
def _triton_rule_factors():
    '''The Triton kernel of :py:func:`rule_factors`, or None where Triton is not installed.'''
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def rule_factors_kernel(gradient_u, conv, gradient, out, gate, gradient_conv, gradient_gate, count, length,
                            conv_row_stride, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < count
        conv_offsets = (offsets // length) * conv_row_stride + offsets % length
        # computed in float32, stored in each output's dtype
        c = tl.load(conv + conv_offsets, mask=inside).to(tl.float32)
        z = tl.load(gate + offsets, mask=inside).to(tl.float32)
        du = tl.load(gradient_u + offsets, mask=inside).to(tl.float32)
        g = tl.load(gradient + offsets, mask=inside).to(tl.float32)
        y = tl.load(out + offsets, mask=inside).to(tl.float32)
        tl.store(gradient_conv + offsets, (0.5 * du * tl.sigmoid(c)).to(gradient_conv.dtype.element_ty), mask=inside)
        tl.store(gradient_gate + offsets, (0.5 * g * y * tl.sigmoid(z)).to(gradient_gate.dtype.element_ty),
                 mask=inside)

    return rule_factors_kernel
