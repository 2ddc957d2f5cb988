'''The chunked state-space-duality (SSD) scan of Mamba-2 in plain PyTorch, and the dispatch to mamba-ssm's kernel.

Mamba-2's recurrence per head ``h`` is ``S_t = exp(dt_t A_h) S_{t-1} + dt_t x_t B_t^T`` with output
``y_t = S_t C_t + D_h x_t``. Within a chunk of ``chunk_size`` positions the outputs are a masked matrix product (the
"attention" form); the states at the chunk ends are carried across chunks by the same recurrence, one step per chunk.
Only decays ``exp(sum of dt A) <= 1`` are formed, so nothing overflows, and the computation stays in the input's
precision (at least float32): float64 models are explained in float64.

The scan is differentiable in all inputs; MambaLRP detaches ``dt``, ``A``, ``B`` and ``C``, which makes it linear in
``x``.
'''
from typing import Tuple

import torch
import torch.nn.functional as F

from ._optional import mamba_ssm_chunk_scan
from .scan import BLOCK_ELEMENTS, uses_kernel


def _chunked(tensor: torch.Tensor, chunk_size: int) -> torch.Tensor:
    '''``(batch, length, ...)`` with length a multiple of ``chunk_size`` to ``(batch, chunks, chunk_size, ...)``.'''
    return tensor.unflatten(1, (-1, chunk_size))


def _within_chunks(log_decay, C, B, x_dt, causal) -> torch.Tensor:
    '''The outputs of chunks from their own inputs, in the masked matrix ("attention") form.'''
    between = log_decay[:, :, :, None, :] - log_decay[:, :, None, :, :]  # (b, c, l, s, h)
    mixing = torch.exp(between.masked_fill(~causal[:, :, None], -torch.inf))
    mixing = mixing * torch.einsum('bclhn,bcshn->bclsh', C, B)
    return torch.einsum('bclsh,bcshp->bclhp', mixing, x_dt)


def _torch_ssd(x, dt, A, B, C, D, chunk_size) -> Tuple[torch.Tensor, torch.Tensor]:
    batch, length, heads, _ = x.shape
    dtype = torch.promote_types(x.dtype, torch.float32)
    x, dt, A, B, C = (tensor.to(dtype) for tensor in (x, dt, A, B, C))
    B = B.repeat_interleave(heads // B.shape[2], dim=2)
    C = C.repeat_interleave(heads // C.shape[2], dim=2)

    # zero step sizes in the padded tail: decay 1, no input
    padding = -length % chunk_size
    x, dt, B, C = (F.pad(tensor, (0, 0) * (tensor.dim() - 2) + (0, padding)) for tensor in (x, dt, B, C))
    x_dt = _chunked(x * dt[..., None], chunk_size)                       # (b, c, l, h, p)
    B, C = _chunked(B, chunk_size), _chunked(C, chunk_size)              # (b, c, l, h, n)
    log_decay = torch.cumsum(_chunked(dt * A, chunk_size), dim=2)        # (b, c, l, h), decreasing in l

    # within a chunk: y_l = sum_{s <= l} exp(log_decay_l - log_decay_s) (C_l . B_s) x_dt_s, a few chunks at a time so
    # that the (chunk_size x chunk_size) mixing matrices stay in a bounded block (time linear in the length)
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=x.device).tril()
    per_chunk = batch * chunk_size * chunk_size * heads
    step = max(1, BLOCK_ELEMENTS.get(x.device.type, BLOCK_ELEMENTS['cuda']) // per_chunk)
    outputs = torch.cat([
        _within_chunks(log_decay[:, start:start + step], C[:, start:start + step], B[:, start:start + step],
                       x_dt[:, start:start + step], causal)
        for start in range(0, x_dt.shape[1], step)
    ], dim=1)

    # each chunk's own contribution to the state at its end, then the states entering each chunk
    to_end = torch.exp(log_decay[:, :, -1:] - log_decay)
    contributions = torch.einsum('bclhn,bclh,bclhp->bchpn', B, to_end, x_dt)
    chunk_decay = torch.exp(log_decay[:, :, -1])                        # (b, c, h)
    state = torch.zeros_like(contributions[:, 0])
    entering = []
    for chunk in range(contributions.shape[1]):
        entering.append(state)
        state = chunk_decay[:, chunk, :, None, None] * state + contributions[:, chunk]
    entering = torch.stack(entering, dim=1)                             # (b, c, h, p, n)
    outputs = outputs + torch.einsum('bclhn,bchpn,bclh->bclhp', C, entering, torch.exp(log_decay))

    outputs = outputs.flatten(1, 2)[:, :length] + D.to(dtype).reshape(heads, -1) * x[:, :length]
    return outputs, state


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    chunk_size: int = 256,
    implementation: str = 'auto',
) -> Tuple[torch.Tensor, torch.Tensor]:
    '''Mamba-2's SSD scan with positive step sizes ``dt`` (softplus and limits already applied).

    Parameters
    ----------
    x : :py:obj:`torch.Tensor`
        Inputs of shape ``(batch, length, heads, head_dim)``.
    dt : :py:obj:`torch.Tensor`
        Step sizes of shape ``(batch, length, heads)``.
    A : :py:obj:`torch.Tensor`
        Negative decay rates of shape ``(heads,)``.
    B, C : :py:obj:`torch.Tensor`
        Input and output matrices of shape ``(batch, length, groups, state)``; ``heads`` is a multiple of ``groups``.
    D : :py:obj:`torch.Tensor`
        Skip weights of shape ``(heads,)``, or ``(heads, head_dim)`` for one per channel.
    chunk_size : int, optional
        Positions per chunk of the matrix form.
    implementation : {'auto', 'torch', 'mamba_ssm'}, optional
        ``'auto'`` uses mamba-ssm's ``mamba_chunk_scan_combined`` for CUDA float16/bfloat16 tensors where mamba-ssm
        is installed, and the PyTorch computation otherwise. The kernel's Triton matrix products round float32
        inputs to TF32 (about 1e-3 relative error, measured on an H100), so float32 stays in PyTorch, where it is
        exact to float32 rounding; ``'mamba_ssm'`` asks for the kernel anyway.

    Returns
    -------
    tuple of :py:obj:`torch.Tensor`
        The outputs ``(batch, length, heads, head_dim)`` in the promoted dtype of ``x`` and float32, and the last
        state ``(batch, heads, head_dim, state)``.

    Examples
    --------
    >>> x, dt = torch.ones(1, 3, 1, 1), torch.ones(1, 3, 1)
    >>> B = C = torch.ones(1, 3, 1, 1)
    >>> y, _ = ssd_scan(x, dt, torch.tensor([-0.6931]), B, C, torch.zeros(1), chunk_size=2)
    >>> y.flatten()
    tensor([1.0000, 1.5000, 1.7500])
    '''
    kernel = mamba_ssm_chunk_scan()
    if uses_kernel(kernel, x, implementation, auto_dtypes=(torch.float16, torch.bfloat16)):
        return _kernel_ssd(kernel, x, dt, A, B, C, D, chunk_size)
    return _torch_ssd(x, dt, A, B, C, D, chunk_size)


def _kernel_ssd(kernel, x, dt, A, B, C, D, chunk_size) -> Tuple[torch.Tensor, torch.Tensor]:
    outputs, state = kernel(
        x.contiguous(), dt.contiguous(), A.float().contiguous(), B.contiguous(), C.contiguous(), chunk_size,
        D=D.float().contiguous(), return_final_states=True,
    )
    return outputs.float(), state

