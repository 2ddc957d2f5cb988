'''The gated delta rule of Gated DeltaNet layers (Qwen3-Next, Qwen3.5, OLMo-Hybrid) and of Kimi Delta Attention,
chunked, in PyTorch.

Per head, with a state ``S`` of shape ``(key_dim, value_dim)``, decay ``a_t = exp(g_t)`` and write strength
``beta_t``::

    S_t = (I - beta_t k_t k_t^T) diag(a_t) S_{t-1} + beta_t k_t v_t^T,      o_t = S_t^T q_t

with one decay per head and step (Gated DeltaNet, where ``diag(a_t)`` is a scalar) or one per key channel (Kimi Delta
Attention).

The chunked form (Yang et al., "Gated Delta Networks", 2024) condenses the updates within a chunk into a triangular
solve (the UT transform) and carries the state across chunks; this is transformers' ``torch_chunk_gated_delta_rule``
without its cast to float32 (float64 stays float64, so that conservation can be checked to 1e-12), without the
query and key normalisation (the caller's) and with the state always returned. For constant ``q``, ``k``, ``g`` and
``beta`` (MambaLRP's selection rule) the output is linear in ``v`` and in the initial state, and its gradient is that
of the linear map: gradient x input conserves relevance.
'''
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F


def _unchanged(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def chunk_gated_delta_rule(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    chunk_size: int = 64,
    initial_state: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    '''The gated delta rule over a sequence, chunk by chunk.

    Parameters
    ----------
    query, key : :py:obj:`torch.Tensor`
        ``(batch, heads, length, key_dim)``, normalised and scaled as the layer does it.
    value : :py:obj:`torch.Tensor`
        ``(batch, heads, length, value_dim)``.
    g : :py:obj:`torch.Tensor`
        ``(batch, heads, length)``: the log-decay of each step (<= 0); or ``(batch, heads, length, key_dim)``, one per
        key channel.
    beta : :py:obj:`torch.Tensor`
        ``(batch, heads, length)``: the write strength of each step.
    chunk_size : int, optional
        Positions per chunk.
    initial_state : :py:obj:`torch.Tensor`, optional
        ``(batch, heads, key_dim, value_dim)``; zeros where not given.

    Returns
    -------
    (:py:obj:`torch.Tensor`, :py:obj:`torch.Tensor`)
        The output ``(batch, heads, length, value_dim)`` in the value's dtype, and the last state (in the compute
        dtype: the value's, at least float32).

    Examples
    --------
    >>> q, k = (torch.nn.functional.normalize(torch.randn(1, 2, 5, 4), dim=-1) for _ in range(2))
    >>> v, g, beta = torch.randn(1, 2, 5, 3), -torch.rand(1, 2, 5), torch.rand(1, 2, 5)
    >>> output, state = chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=2)
    >>> output.shape, state.shape
    (torch.Size([1, 2, 5, 3]), torch.Size([1, 2, 4, 3]))
    '''
    output_dtype, dtype = value.dtype, torch.promote_types(value.dtype, torch.float32)
    batch, heads, length, key_dim = key.shape
    value_dim = value.shape[-1]
    query, key, value, g, beta = (tensor.to(dtype) for tensor in (query, key, value, g, beta))

    per_channel = g.dim() == 4
    pad = (chunk_size - length % chunk_size) % chunk_size
    query, key, value = (F.pad(tensor, (0, 0, 0, pad)) for tensor in (query, key, value))
    g = F.pad(g, (0, 0, 0, pad) if per_channel else (0, pad))
    beta = F.pad(beta, (0, pad))
    chunks = (length + pad) // chunk_size

    v_beta = value * beta.unsqueeze(-1)
    k_beta = key * beta.unsqueeze(-1)
    query, key, k_beta, v_beta = (tensor.reshape(batch, heads, chunks, chunk_size, tensor.shape[-1])
                                  for tensor in (query, key, k_beta, v_beta))
    # log of the decay from the chunk's start, per step (and key channel: a trailing dimension of one otherwise)
    decay = g.reshape(batch, heads, chunks, chunk_size, -1).cumsum(-2)
    upper = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=query.device).triu(1)
    if per_channel:
        # exp(decay_i - decay_j) per key channel, for positions j <= i of a chunk
        pairwise = (decay.unsqueeze(-2) - decay.unsqueeze(-3)).masked_fill(upper[..., None], float('-inf')).exp()
        system = torch.einsum('bhnid,bhnjd,bhnijd->bhnij', k_beta, key, pairwise)
        within = torch.einsum('bhnid,bhnjd,bhnijd->bhnij', query, key, pairwise)
    else:
        scalar = decay.squeeze(-1)
        pairwise = (scalar.unsqueeze(-1) - scalar.unsqueeze(-2)).masked_fill(upper, float('-inf')).exp()
        system = (k_beta @ key.transpose(-1, -2)) * pairwise
        within = (query @ key.transpose(-1, -2)) * pairwise

    # the UT transform: the updates within a chunk as one unit-triangular solve
    new_values = torch.linalg.solve_triangular(system, v_beta, upper=False, unitriangular=True)
    decayed_keys = torch.linalg.solve_triangular(system, k_beta * decay.exp(), upper=False, unitriangular=True)
    query = query * decay.exp()
    key = key * (decay[..., -1:, :] - decay).exp()
    chunk_decay = decay[..., -1, :].exp().unsqueeze(-1)  # multiplies the state's rows (key channels)

    state = (torch.zeros(batch, heads, key_dim, value_dim, dtype=dtype, device=value.device)
             if initial_state is None else initial_state.to(dtype))
    outputs = []
    for chunk in range(chunks):
        corrected = new_values[:, :, chunk] - decayed_keys[:, :, chunk] @ state
        outputs.append(query[:, :, chunk] @ state + within[:, :, chunk] @ corrected)
        state = state * chunk_decay[:, :, chunk] + key[:, :, chunk].transpose(-1, -2) @ corrected
    output = torch.stack(outputs, 2).reshape(batch, heads, -1, value_dim)[:, :, :length]
    return output.to(output_dtype), state


def recurrent_gated_delta_rule(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: Optional[torch.Tensor] = None,
    projection_key: Optional[torch.Tensor] = None,
    read: Callable[[torch.Tensor], torch.Tensor] = _unchanged,
    write: Callable[[torch.Tensor], torch.Tensor] = _unchanged,
) -> Tuple[torch.Tensor, torch.Tensor]:
    '''The gated delta rule token by token, with its products exposed: each step decays and projects the state with
    ``projection_key`` (``key`` where not given), adds ``write(beta_t k_t v_t^T)`` and reads ``read(S_t^T q_t)``.
    The shapes and results of :py:func:`chunk_gated_delta_rule`; slower (one step per position), for rule sets that
    act on the products (AttnLRP's uniform rule on the read-out and the write).

    Examples
    --------
    >>> q, k = (torch.nn.functional.normalize(torch.randn(1, 2, 5, 4), dim=-1) for _ in range(2))
    >>> v, g, beta = torch.randn(1, 2, 5, 3), -torch.rand(1, 2, 5), torch.rand(1, 2, 5)
    >>> chunked, _ = chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=2)
    >>> torch.allclose(recurrent_gated_delta_rule(q, k, v, g, beta)[0], chunked, atol=1e-6)
    True
    '''
    output_dtype, dtype = value.dtype, torch.promote_types(value.dtype, torch.float32)
    batch, heads, length, key_dim = key.shape
    projection_key = key if projection_key is None else projection_key
    query, key, projection_key, value, g, beta = (tensor.to(dtype)
                                                  for tensor in (query, key, projection_key, value, g, beta))
    state = (torch.zeros(batch, heads, key_dim, value.shape[-1], dtype=dtype, device=value.device)
             if initial_state is None else initial_state.to(dtype))
    # the decay multiplies the state's rows: one factor per head, or per key channel
    decays = g.exp().unsqueeze(-1) if g.dim() == 4 else g.exp()[..., None, None]
    outputs = []
    for t in range(length):
        state = state * decays[:, :, t]
        k, strength = projection_key[:, :, t], beta[:, :, t, None, None]
        state = state - strength * k.unsqueeze(-1) * (k.unsqueeze(-2) @ state)
        state = state + write(strength * key[:, :, t].unsqueeze(-1) * value[:, :, t].unsqueeze(-2))
        outputs.append(read((state * query[:, :, t].unsqueeze(-1)).sum(-2)))
    return torch.stack(outputs, 2).to(output_dtype), state
