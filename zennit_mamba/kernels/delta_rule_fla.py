'''The gated delta rule on a GPU through flash-linear-attention's chunk kernels, with a backward pass that computes
only what MambaLRP's selection rule leaves: the gradient of the values (and of the initial state).

With the queries, keys, log-decays and write strengths held constant, the layer's output is a linear map of the
values, ``o = M(q, k, g, beta) v`` (:py:mod:`~zennit_mamba.kernels.delta_rule`), and its backward pass is ``M^T``
applied to the output gradient. flash-linear-attention (``fla-core``, the kernels transformers runs for these
layers) computes that in three steps of its own backward pass, written in the chunks' WY form (``u = A (beta v)``
within a chunk, ``A`` the inverse of the chunk's unit-triangular system):

1. ``dv_local``: the output gradient's share within each chunk (``chunk_bwd_dv_local``; Kimi: ``Aqk^T do``);
2. ``du``: the state gradient carried backwards across chunks and added (``chunk_gated_delta_rule_bwd_dhu``);
3. ``dv = beta * A^T du`` within each chunk (written here in PyTorch).

The rest of its backward pass (the gradients of ``q``, ``k``, ``g`` and ``beta``, the larger part of the work) is
skipped. The forward pass is the kernels' own, so the explained output is the output the model computes with these
kernels. ``tests/test_delta_rule_cuda.py`` holds both passes to
:py:func:`~zennit_mamba.kernels.delta_rule.chunk_gated_delta_rule` and its autograd gradient in float64, and to the
kernels' own backward pass.

The kernels' internal functions are those of ``fla-core`` 0.6; :py:func:`fla_delta_rule_applies` is False with
another version or where they cannot be imported, and the PyTorch form serves.
'''
import functools
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

#: positions per chunk of the kernels
CHUNK = 64

#: whether the rule set runs these kernels on a GPU: yes. On an H100 (Triton 3.6, fla 0.6.0) tests/test_delta_rule_cuda.py
#: passed: the forward and the values' (and initial state's) gradient equal the float64 rule within 2e-3 in float32
#: (per head and per key channel, 64 and 200 positions, with and without an initial state) and within 3e-2 in
#: bfloat16; OLMo-Hybrid, Qwen3-Next and Kimi-Linear explained through them keep the model's forward (1e-4),
#: conserve (1e-3, float32) and equal the PyTorch form's relevance (5e-3). (fla's own gated backward, which these
#: kernels do not use, is refused by fla on Hopper with Triton < 3.7.1.) False makes every device compute with the
#: PyTorch form.
SERVES_THE_RULE_SET = True


@functools.lru_cache(maxsize=None)
def _fla():
    '''The internal functions of flash-linear-attention's chunk kernels, or None where they cannot be imported.'''
    try:
        import fla

        if not fla.__version__.startswith('0.6'):  # the internal functions' names and results are 0.6's
            return None
        from fla.ops.common.chunk_delta_h import chunk_gated_delta_rule_bwd_dhu
        from fla.ops.common.chunk_o import chunk_bwd_dv_local
        from fla.ops.gated_delta_rule.chunk import chunk_gated_delta_rule_fwd
        from fla.ops.gated_delta_rule.wy_fast import recompute_w_u_fwd
        from fla.ops.kda.chunk_fwd import chunk_kda_fwd
        from fla.ops.kda.wy_fast import recompute_w_u_fwd as kda_recompute_w_u_fwd
    except Exception:  # not installed, or another version's layout
        return None
    return dict(bwd_dhu=chunk_gated_delta_rule_bwd_dhu, dv_local=chunk_bwd_dv_local, fwd=chunk_gated_delta_rule_fwd,
                w_u=recompute_w_u_fwd, kda_fwd=chunk_kda_fwd, kda_w_u=kda_recompute_w_u_fwd)


def fla_delta_rule_applies(value: torch.Tensor, key_dim: int) -> bool:
    '''Whether :py:func:`fla_values_delta_rule` serves a layer's values (where :py:data:`SERVES_THE_RULE_SET`): on a
    CUDA GPU of compute capability 8.0 or later (the kernels' Triton), in float32 or bfloat16, the dtypes checked on a
    GPU (float64 takes the PyTorch form, exact; float16 too, unchecked), key heads of at most 256 channels, with
    flash-linear-attention installed.'''
    return (SERVES_THE_RULE_SET and value.is_cuda and value.dtype in (torch.float32, torch.bfloat16)
            and key_dim <= 256
            and torch.cuda.get_device_capability(value.device)[0] >= 8 and _fla() is not None)


def _within_chunks_transposed(matrix: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    '''``matrix^T gradient`` chunk by chunk: ``matrix`` ``(batch, length, heads, CHUNK)`` holds each chunk's
    lower-triangular ``(CHUNK, CHUNK)`` matrix by rows (what the kernels leave above the diagonal is not read),
    ``gradient`` is ``(batch, length, heads, dim)``.'''
    length = gradient.shape[1]
    pad = (CHUNK - length % CHUNK) % CHUNK
    matrix = F.pad(matrix, (0, 0, 0, 0, 0, pad)).unflatten(1, (-1, CHUNK)).float()
    # (chunk position t, heads, chunk position s): s <= t
    causal = torch.ones(CHUNK, CHUNK, dtype=torch.bool, device=matrix.device).tril()
    matrix = matrix.masked_fill(~causal[:, None, :], 0.0)
    gradient = F.pad(gradient, (0, 0, 0, 0, 0, pad)).unflatten(1, (-1, CHUNK)).float()
    # contiguous: the result may go to a kernel that reads it by the strides of the contiguous layout (einsum's
    # result need not be laid out so)
    return torch.einsum('bnths,bnthv->bnshv', matrix, gradient).flatten(1, 2)[:, :length].contiguous()


class _ValuesDeltaRule(torch.autograd.Function):
    '''The chunk kernels' forward; a backward pass for the values and the initial state only.'''

    @staticmethod
    def forward(ctx, query, key, value, g, beta, initial_state):
        with torch.cuda.device(value.device):  # Triton launches on the current device
            return _ValuesDeltaRule._forward(ctx, query, key, value, g, beta, initial_state)

    @staticmethod
    def backward(ctx, output_gradient, last_state_gradient):
        with torch.cuda.device(output_gradient.device), torch.autocast('cuda', enabled=False):
            return _ValuesDeltaRule._backward(ctx, output_gradient, last_state_gradient)

    @staticmethod
    def _forward(ctx, query, key, value, g, beta, initial_state):
        kernels = _fla()
        per_channel = g.dim() == 4
        if per_channel:
            output, last_state, g, within, system = kernels['kda_fwd'](
                q=query, k=key, v=value, g=g, beta=beta, scale=1.0, initial_state=initial_state,
                output_final_state=True, chunk_size=CHUNK)[:5]
        else:
            g, output, system, last_state = kernels['fwd'](
                q=query, k=key, v=value, g=g, beta=beta, scale=1.0, initial_state=initial_state,
                output_final_state=True, chunk_size=CHUNK)[:4]
            within = None
        ctx.per_channel = per_channel
        ctx.save_for_backward(query, key, value, g, beta, system, within, initial_state)
        return output.to(value.dtype), last_state

    @staticmethod
    def _backward(ctx, output_gradient, last_state_gradient):
        query, key, value, g, beta, system, within, initial_state = ctx.saved_tensors
        kernels = _fla()
        # the kernels read by strides of the contiguous layout (a gradient of last_state.sum() is a broadcast view)
        output_gradient = output_gradient.contiguous()
        if last_state_gradient is not None:
            last_state_gradient = last_state_gradient.contiguous()
        if ctx.per_channel:
            w, _, decayed_query, decayed_key = kernels['kda_w_u'](q=query, k=key, v=value, beta=beta, A=system, gk=g)
            # within a chunk, o = Aqk v_new (Aqk lower-triangular, the scale folded in)
            local = _within_chunks_transposed(within, output_gradient).to(output_gradient.dtype)
            _, initial_gradient, value_gradient = kernels['bwd_dhu'](
                q=decayed_query, k=decayed_key, w=w, gk=g, h0=initial_state, dht=last_state_gradient,
                do=output_gradient, dv=local, scale=1.0, chunk_size=CHUNK)
        else:
            w, _ = kernels['w_u'](k=key, v=value, beta=beta, A=system, g=g)
            local = kernels['dv_local'](q=query, k=key, g=g, do=output_gradient, scale=1.0, chunk_size=CHUNK)
            _, initial_gradient, value_gradient = kernels['bwd_dhu'](
                q=query, k=key, w=w, g=g, h0=initial_state, dht=last_state_gradient, do=output_gradient,
                dv=local, scale=1.0, chunk_size=CHUNK)
        value_gradient = _within_chunks_transposed(system, value_gradient) * beta.unsqueeze(-1).float()
        return (None, None, value_gradient.to(value.dtype), None, None,
                None if initial_state is None else initial_gradient)


def fla_values_delta_rule(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, g: torch.Tensor,
                          beta: torch.Tensor, initial_state: Optional[torch.Tensor] = None
                          ) -> Tuple[torch.Tensor, torch.Tensor]:
    '''The gated delta rule of :py:func:`~zennit_mamba.kernels.delta_rule.chunk_gated_delta_rule` (the same
    arguments, ``(batch, heads, length, ...)``, and results) by flash-linear-attention's chunk kernels, for constant
    ``query``, ``key``, ``g`` and ``beta``: their gradients are not computed (the selection rule holds them).

    ``query``, ``key`` and ``value`` are computed in the value's dtype (as the layers run the kernels), ``g`` in
    float32; the last state is float32.'''
    if any(tensor.requires_grad for tensor in (query, key, g, beta)):
        raise ValueError('fla_values_delta_rule holds the queries, keys, decays and write strengths constant: '
                         'pass them detached (the selection rule), or use chunk_gated_delta_rule')
    dtype = value.dtype
    # the kernels' layout: (batch, length, heads, ...)
    query, key, value = (tensor.transpose(1, 2).to(dtype).contiguous() for tensor in (query, key, value))
    g = g.transpose(1, 2).float().contiguous()
    beta = beta.transpose(1, 2).to(dtype).contiguous()
    if initial_state is not None:
        initial_state = initial_state.float().contiguous()
    output, last_state = _ValuesDeltaRule.apply(query, key, value, g, beta, initial_state)
    return output.transpose(1, 2), last_state
