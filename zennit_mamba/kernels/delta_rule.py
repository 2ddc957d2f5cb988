'''The gated delta rule of Gated DeltaNet layers (Qwen3-Next, Qwen3.5, OLMo-Hybrid), chunked, in PyTorch.

Per head, with a state ``S`` of shape ``(key_dim, value_dim)``, decay ``a_t = exp(g_t)`` and write strength
``beta_t``::

    S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,      o_t = S_t^T q_t

The chunked form (Yang et al., "Gated Delta Networks", 2024) condenses the updates within a chunk into a triangular
solve (the UT transform) and carries the state across chunks; this is transformers' ``torch_chunk_gated_delta_rule``
without its cast to float32 (float64 stays float64, so that conservation can be checked to 1e-12), without the
query and key normalisation (the caller's) and with the state always returned. For constant ``q``, ``k``, ``g`` and
``beta`` (MambaLRP's selection rule) the output is linear in ``v`` and in the initial state, and its gradient is that
of the linear map: gradient x input conserves relevance.
'''
from typing import Optional, Tuple

import torch
import torch.nn.functional as F


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
        ``(batch, heads, length)``: the log-decay of each step (<= 0).
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

    pad = (chunk_size - length % chunk_size) % chunk_size
    query, key, value = (F.pad(tensor, (0, 0, 0, pad)) for tensor in (query, key, value))
    g, beta = (F.pad(tensor, (0, pad)) for tensor in (g, beta))
    chunks = (length + pad) // chunk_size

    v_beta = value * beta.unsqueeze(-1)
    k_beta = key * beta.unsqueeze(-1)
    query, key, k_beta, v_beta = (tensor.reshape(batch, heads, chunks, chunk_size, tensor.shape[-1])
                                  for tensor in (query, key, k_beta, v_beta))
    decay = g.reshape(batch, heads, chunks, chunk_size).cumsum(-1)  # log of the decay from the chunk's start
    upper = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=query.device).triu(1)
    # exp(decay_i - decay_j), the decay between positions j <= i of a chunk
    pairwise = (decay.unsqueeze(-1) - decay.unsqueeze(-2)).masked_fill(upper, float('-inf')).exp()

    # the UT transform: the updates within a chunk as one unit-triangular solve
    system = (k_beta @ key.transpose(-1, -2)) * pairwise
    new_values = torch.linalg.solve_triangular(system, v_beta, upper=False, unitriangular=True)
    decayed_keys = torch.linalg.solve_triangular(system, k_beta * decay.exp().unsqueeze(-1), upper=False,
                                                 unitriangular=True)
    within = (query @ key.transpose(-1, -2)) * pairwise
    query = query * decay.exp().unsqueeze(-1)
    key = key * (decay[..., -1:] - decay).exp().unsqueeze(-1)
    chunk_decay = decay[..., -1].exp()[..., None, None]

    state = (torch.zeros(batch, heads, key_dim, value_dim, dtype=dtype, device=value.device)
             if initial_state is None else initial_state.to(dtype))
    outputs = []
    for chunk in range(chunks):
        corrected = new_values[:, :, chunk] - decayed_keys[:, :, chunk] @ state
        outputs.append(query[:, :, chunk] @ state + within[:, :, chunk] @ corrected)
        state = state * chunk_decay[:, :, chunk] + key[:, :, chunk].transpose(-1, -2) @ corrected
    output = torch.stack(outputs, 2).reshape(batch, heads, -1, value_dim)[:, :, :length]
    return output.to(output_dtype), state
