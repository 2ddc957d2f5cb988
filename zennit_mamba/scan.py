'''Vectorised selective scan in plain PyTorch.

The recurrence ``s_t = exp(log_a_t) * s_{t-1} + b_t`` is solved in chunks: inside a chunk with a Hillis-Steele scan
(``log2(chunk)`` vectorised steps), across chunks with the same scan over the chunk summaries. Every decay factor
that is ever formed is ``exp`` of a sum of non-positive log-decays, so nothing overflows, and no Python loop runs
over time steps.
'''
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

DEFAULT_CHUNK_SIZE = 32


def _shift(tensor: torch.Tensor, steps: int) -> torch.Tensor:
    '''Shift ``tensor`` by ``steps`` towards later positions along the last dim, filling with zeros.'''
    return F.pad(tensor[..., :-steps], (steps, 0))


def _inclusive_scan(log_a: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    '''Scan ``s_t = exp(log_a_t) s_{t-1} + b_t`` along the last dim with ``s_{-1} = 0``.

    Returns the states and the inclusive cumulative log-decay ``sum_{k <= t} log_a_k``.
    '''
    length = log_a.shape[-1]
    cum_log_a = log_a.cumsum(-1)
    states = b
    step = 1
    while step < length:
        # s_t covers (t - step, t]; adding the decayed window ending at t - step doubles its reach
        decay = torch.exp(cum_log_a - _shift(cum_log_a, step))
        states = states + decay * _shift(states, step)
        step *= 2
    return states, cum_log_a


def linear_recurrence(
    log_a: torch.Tensor,
    b: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    '''Solve ``s_t = exp(log_a_t) * s_{t-1} + b_t`` with ``s_{-1} = 0`` along the last dimension.

    Parameters
    ----------
    log_a : :py:obj:`torch.Tensor`
        Log-decays, non-positive, of shape ``(..., length)``.
    b : :py:obj:`torch.Tensor`
        Inputs of the same shape.
    chunk_size : int, optional
        Length of the chunks scanned in parallel, at least 2.

    Returns
    -------
    :py:obj:`torch.Tensor`
        The states ``s`` of shape ``(..., length)``.
    '''
    if chunk_size < 2:
        raise ValueError(f'chunk_size must be at least 2, got {chunk_size}')
    length = log_a.shape[-1]
    if length <= chunk_size:
        return _inclusive_scan(log_a, b)[0]

    num_chunks = -(-length // chunk_size)
    padding = num_chunks * chunk_size - length
    # padded steps have decay 1 and input 0, so they leave the states unchanged
    log_a = F.pad(log_a, (0, padding)).unflatten(-1, (num_chunks, chunk_size))
    b = F.pad(b, (0, padding)).unflatten(-1, (num_chunks, chunk_size))

    local_states, local_cum = _inclusive_scan(log_a, b)
    # states at the end of every chunk, carried across chunks by the same recurrence
    carried = linear_recurrence(local_cum[..., -1], local_states[..., -1], chunk_size)
    incoming = _shift(carried, 1)
    states = local_states + torch.exp(local_cum) * incoming.unsqueeze(-1)
    return states.flatten(-2)[..., :length]


def selective_scan(
    x: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tuple[torch.Tensor, torch.Tensor]:
    '''Mamba-1 selective scan ``y_t = C_t . s_t + D x_t``, ``s_t = exp(delta_t A) s_{t-1} + delta_t B_t x_t``.

    Computed in float32 or wider, whatever the input precision, and returned in the dtype of ``x``.

    Parameters
    ----------
    x : :py:obj:`torch.Tensor`
        Inputs of shape ``(batch, channels, length)``.
    delta : :py:obj:`torch.Tensor`
        Positive step sizes, same shape as ``x``.
    A : :py:obj:`torch.Tensor`
        Negative state matrix (diagonal per channel) of shape ``(channels, state_size)``.
    B : :py:obj:`torch.Tensor`
        Input matrices of shape ``(batch, state_size, length)``.
    C : :py:obj:`torch.Tensor`
        Output matrices of shape ``(batch, state_size, length)``.
    D : :py:obj:`torch.Tensor`, optional
        Skip weights of shape ``(channels,)``.
    chunk_size : int, optional
        Chunk length of the parallel scan.

    Returns
    -------
    tuple[:py:obj:`torch.Tensor`, :py:obj:`torch.Tensor`]
        Outputs ``y`` shaped like ``x``, and the last state of shape ``(batch, channels, state_size)``.

    Examples
    --------
    >>> x, delta = torch.randn(1, 4, 10), torch.rand(1, 4, 10)
    >>> A, B, C = -torch.rand(4, 3), torch.randn(1, 3, 10), torch.randn(1, 3, 10)
    >>> y, last_state = selective_scan(x, delta, A, B, C)
    >>> y.shape, last_state.shape
    (torch.Size([1, 4, 10]), torch.Size([1, 4, 3]))
    '''
    dtype = torch.promote_types(x.dtype, torch.float32)
    x_, delta_, A_, B_, C_ = (tensor.to(dtype) for tensor in (x, delta, A, B, C))
    # layout (batch, channels, state, length): time last, where the scan runs
    log_a = delta_[:, :, None, :] * A_[None, :, :, None]
    b = (delta_ * x_)[:, :, None, :] * B_[:, None, :, :]
    states = linear_recurrence(log_a, b, chunk_size)
    y = torch.einsum('bcnl,bnl->bcl', states, C_)
    if D is not None:
        y = y + D.to(dtype)[None, :, None] * x_
    return y.to(x.dtype), states[..., -1]
