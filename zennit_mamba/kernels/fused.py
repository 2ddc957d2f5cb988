'''Rules fused into autograd functions with hand-written backward passes: a Mamba-1 branch (:py:class:`SiLUScanGate`)
and a Mamba-2 gated normalisation (:py:class:`GatedRMSNorm`: one Triton kernel each way on a GPU).

A Mamba-1 branch's SiLU, selective scan and gate under all three of their MambaLRP rules, as one autograd function
around mamba-ssm's CUDA kernels: the same relevance as :py:class:`~zennit_mamba.core.ruleset.RuleSet`'s operations in
turn, in fewer kernel launches and autograd nodes (the selection carries no gradient, so none of it is recorded).

For the convolution output ``c``, the gate input ``z`` and the (constant) selection ``delta, A, B, C``, the forward
is mamba-ssm's ``o = y * silu(z)`` with ``y = scan(silu(c))`` (one kernel, the skip ``D`` included). The backward
applies

* the half rule (:py:class:`~zennit_mamba.rules.HalfRule`): each factor of ``o = y * silu(z)`` gets half of
  ``dL/do``, so ``dL/dy = dL/do / 2 * silu(z)``;
* the identity rule for both SiLUs (:py:class:`~zennit_mamba.rules.SiLUIdentity`): ``dL/dx = dL/dsilu(x) *
  sigmoid(x)``, so that ``x * dL/dx = silu(x) * dL/dsilu(x)``;
* the detached selection (:py:class:`~zennit_mamba.rules.DetachSelection`): for constant ``delta, A, B, C`` the scan
  ``h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t``, ``y_t = C_t . h_t + D u_t`` is linear in ``u``, and its
  gradient is the transposed recurrence ``lambda_t = exp(delta_{t+1} A) lambda_{t+1} + C_t dL/dy_t``,
  ``dL/du_t = delta_t B_t . lambda_t + D dL/dy_t``. That is the same forward kernel run backwards in time with ``B``
  and ``C`` exchanged, the step sizes moved one position and the input divided by them (the kernel multiplies its
  input by the step size): one forward scan instead of mamba-ssm's backward kernel, which would also compute the
  discarded gradients of ``delta, A, B, C``.

So ``dL/dc = (delta * transposed_scan(dL/dy) + D dL/dy) * sigmoid(c)`` and ``dL/dz = dL/do / 2 * y * sigmoid(z)``.
The reversed scan runs in float32 whatever the model's dtype. Step sizes below ``2**-64`` (a softplus that underflowed)
are raised to it for the division: the decay ``exp(2**-64 A)`` is 1 in float32 as the original one is, for
``|A| < 2**40``.
'''
import functools
from typing import Callable, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from zennit_mamba._optional import mamba_ssm_scan_extension
from zennit_mamba.kernels.scan import SMALLEST_STEP
from zennit_mamba.kernels.ssd_triton import blocks, on_device_of, power_of_two

#: elements per program of the Triton kernels of :py:func:`branch_gradients`
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
        ctx.save_for_backward(conv, delta, A, B, C, D, gate, out)
        last_state = states[:, :, -1, 1::2]
        ctx.mark_non_differentiable(last_state)
        return gated, last_state

    @staticmethod
    def backward(ctx, gradient: torch.Tensor, _last_state_gradient: torch.Tensor):
        conv, delta, A, B, C, D, gate, out = ctx.saved_tensors
        gradient_conv, gradient_gate = branch_gradients(gradient.contiguous(), conv, gate, out, delta, A, B, C, D,
                                                        _kernel_forward_scan)
        return gradient_conv, None, gradient_gate, None, None, None, None, None


def _kernel_forward_scan(u, delta, A, B, C) -> torch.Tensor:
    '''mamba-ssm's forward scan without skip and gate, ``B`` and ``C`` of shape ``(batch, 1, state, length)``.'''
    return mamba_ssm_scan_extension().fwd(u, delta, A, B, C, None, None, None, False)[0]


def branch_gradients(gradient: torch.Tensor, conv: torch.Tensor, gate: torch.Tensor, out: torch.Tensor,
                     delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor,
                     forward_scan: Callable[..., torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    '''``dL/dc`` and ``dL/dz`` of the branch ``o = scan(silu(c)) * silu(z)`` under the three rules (the module's
    equations), with the transposed scan computed by ``forward_scan`` in reversed time.

    Parameters
    ----------
    gradient : :py:obj:`torch.Tensor`
        ``dL/do``, contiguous ``(batch, channels, length)``.
    conv, gate, out, delta : :py:obj:`torch.Tensor`
        ``c`` (rows of one stride), ``z``, the scan output ``y`` before the gate (skip included) and the step sizes,
        ``(batch, channels, length)``; all but ``c`` contiguous.
    A, B, C, D : :py:obj:`torch.Tensor`
        ``(channels, state)``, ``(batch, 1, state, length)`` twice, ``(channels,)``.
    forward_scan : callable
        ``forward_scan(u, delta, A, B, C)``: the scan's output ``C_t . h_t`` (no skip) for inputs in the layout
        above, in float32 (float64 for float64 inputs), mamba-ssm's forward kernel on a GPU.

    Returns
    -------
    tuple[:py:obj:`torch.Tensor`, :py:obj:`torch.Tensor`]
        ``dL/dc`` and ``dL/dz`` in the dtypes of ``c`` and ``z``.

    Examples
    --------
    One channel, one state, two steps: ``y_t = h_t`` with ``h_t = 0.5 h_{t-1} + u_t`` (``delta = 1``,
    ``A = log 0.5``), and the scan written out as a loop:

    >>> def loop(u, delta, A, B, C):
    ...     h, ys = 0.0, []
    ...     for t in range(u.shape[-1]):
    ...         h = torch.exp(delta[..., t] * A) * h + delta[..., t] * B[..., t] * u[..., t]
    ...         ys.append(C[..., t] * h)
    ...     return torch.stack(ys, -1).reshape(u.shape)
    >>> ones, zeros = torch.ones(1, 1, 2), torch.zeros(1, 1, 2)
    >>> A, B, C, D = torch.log(torch.tensor([[0.5]])), torch.ones(1, 1, 1, 2), torch.ones(1, 1, 1, 2), torch.zeros(1)
    >>> big = torch.full((1, 1, 2), 50.0)  # silu(z) = z and sigmoid(z) = 1 for this gate
    >>> branch_gradients(ones, zeros, big, ones, ones, A, B, C, D, loop)[0]  # dL/dy = 25: (25 * 1.5, 25) / 2
    tensor([[[18.7500, 12.5000]]])
    '''
    kernel = _triton_kernels()
    on_triton = kernel is not None and conv.is_cuda and _rows_of_one_stride(conv)
    # float32 (the kernel's float32 instantiation), or float64 where the tests run this on the CPU
    dtype = torch.promote_types(conv.dtype, torch.float32)
    B_reversed, C_reversed = (matrix.to(dtype).flip(-1) for matrix in (B, C))
    if on_triton:
        count, length = gradient.numel(), gradient.shape[-1]
        u_reversed = torch.empty(gradient.shape, dtype=dtype, device=gradient.device)
        delta_reversed, gradient_gate = torch.empty_like(u_reversed), torch.empty_like(gate)
        grid = (blocks(count, _BLOCK),)
        with on_device_of(conv):
            kernel.reversed_inputs[grid](gradient, gate, out, delta, u_reversed, delta_reversed, gradient_gate, count,
                                         length, SMALLEST_STEP, BLOCK=_BLOCK)
            # C takes B's place and B C's: the output of the reversed scan is B_t . lambda_t
            scanned_reversed = forward_scan(u_reversed, delta_reversed, A, C_reversed, B_reversed)
            gradient_conv = torch.empty(conv.shape, dtype=conv.dtype, device=conv.device)
            kernel.input_gradient[grid](scanned_reversed, delta, gradient, gate, D, conv, gradient_conv, count,
                                        length, conv.shape[1], conv.stride(1), BLOCK=_BLOCK)
        return gradient_conv, gradient_gate

    gradient, gate, out, delta, conv = (value.to(dtype) for value in (gradient, gate, out, delta, conv))
    gradient_y = 0.5 * gradient * F.silu(gate)
    gradient_gate = 0.5 * gradient * out * torch.sigmoid(gate)
    # the step after each position (any positive value after the last: it decays the zero state of the reversed scan)
    later_delta = F.pad(delta[..., 1:], (0, 1), value=1.0).clamp_min(SMALLEST_STEP)
    scanned_reversed = forward_scan((gradient_y / later_delta).flip(-1), later_delta.flip(-1), A, C_reversed,
                                    B_reversed)
    gradient_u = delta * scanned_reversed.flip(-1) + D[:, None] * gradient_y
    return (gradient_u * torch.sigmoid(conv)).to(conv.dtype), gradient_gate.to(gate.dtype)


def _rows_of_one_stride(conv: torch.Tensor) -> bool:
    '''Whether ``conv`` is a slice ``(batch, channels, length)`` of a longer contiguous convolution output.'''
    return conv.stride(-1) == 1 and conv.stride(0) == conv.shape[1] * conv.stride(1)


class _TritonKernels(NamedTuple):
    reversed_inputs: Callable
    input_gradient: Callable


@functools.lru_cache(maxsize=None)
def _triton_kernels() -> Optional[_TritonKernels]:
    '''The two element-wise Triton kernels of :py:func:`branch_gradients`, or None where Triton is not installed.
    Each thread block takes ``BLOCK`` elements of the reversed layout (row, reversed time); arithmetic in float32.'''
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def reversed_inputs(gradient, gate, out, delta, u_reversed, delta_reversed, gradient_gate, count, length,
                        smallest_step, BLOCK: tl.constexpr):
        # dL/dy / delta_{t+1} and delta_{t+1}, reversed in time; dL/dz in place
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < count
        time = offsets % length
        source = offsets - time + (length - 1 - time)
        g = tl.load(gradient + source, mask=inside).to(tl.float32)
        z = tl.load(gate + source, mask=inside).to(tl.float32)
        y = tl.load(out + source, mask=inside).to(tl.float32)
        has_later = inside & (time > 0)
        later = tl.load(delta + source + 1, mask=has_later, other=1.0).to(tl.float32)
        later = tl.maximum(later, smallest_step)
        sigmoid_z = tl.sigmoid(z)
        tl.store(u_reversed + offsets, 0.5 * g * z * sigmoid_z / later, mask=inside)
        tl.store(delta_reversed + offsets, later, mask=inside)
        tl.store(gradient_gate + source, (0.5 * g * y * sigmoid_z).to(gradient_gate.dtype.element_ty), mask=inside)

    @triton.jit
    def input_gradient(scanned_reversed, delta, gradient, gate, D, conv, gradient_conv, count, length, channels,
                       conv_row_stride, BLOCK: tl.constexpr):
        # (delta_t * scan_t + D dL/dy_t) * sigmoid(c_t)
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < count
        time = offsets % length
        row = offsets // length
        scanned = tl.load(scanned_reversed + offsets - time + (length - 1 - time), mask=inside)
        step = tl.load(delta + offsets, mask=inside).to(tl.float32)
        g = tl.load(gradient + offsets, mask=inside).to(tl.float32)
        z = tl.load(gate + offsets, mask=inside).to(tl.float32)
        skip = tl.load(D + row % channels, mask=inside).to(tl.float32)
        c = tl.load(conv + row * conv_row_stride + time, mask=inside).to(tl.float32)
        gradient_u = step * scanned + skip * 0.5 * g * z * tl.sigmoid(z)
        tl.store(gradient_conv + offsets, (gradient_u * tl.sigmoid(c)).to(gradient_conv.dtype.element_ty),
                 mask=inside)

    return _TritonKernels(reversed_inputs, input_gradient)


class GatedRMSNorm(torch.autograd.Function):
    '''Mamba-2's gated normalisation ``o = w * n(h)``, ``h = y * silu(z)``, with ``n`` the RMS normalisation over
    groups of ``group_size`` channels, under the gate, SiLU and LN rules, in one node that keeps ``y``, ``z`` and the
    scales (the rules applied in turn keep several float32 copies).

    * LN rule (:py:class:`~zennit_mamba.rules.LNRule`): the scale ``r = rsqrt(mean_group(h^2) + eps)`` is constant,
      so ``dL/dh = dL/do * w * r``;
    * half rule (:py:class:`~zennit_mamba.rules.HalfRule`): ``dL/dy = dL/dh / 2 * silu(z)``,
      ``dL/dsilu(z) = dL/dh / 2 * y``;
    * SiLU identity rule (:py:class:`~zennit_mamba.rules.SiLUIdentity`): ``dL/dz = dL/dsilu(z) * sigmoid(z)``.

    The weight's gradient is that of ``o = w * n(h)``: ``sum(dL/do * n(h))`` over batch and positions. Computed in
    float32 (float64 for float64 inputs), returned in the dtype of ``y``.

    Examples
    --------
    >>> y = torch.tensor([[3.0, 4.0]], requires_grad=True)
    >>> z = torch.full((1, 2), 50.0, requires_grad=True)  # silu(z) = z, sigmoid(z) = 1
    >>> o = GatedRMSNorm.apply(y, z, torch.ones(2), 2, 0.0)
    >>> y_gradient, z_gradient = torch.autograd.grad(o, (y, z), o.detach())
    >>> relevance = (y * y_gradient + z * z_gradient).detach()
    >>> round(float(relevance.sum()), 4), round(float((o * o).detach().sum()), 4)  # conserved: half to y, half to z
    (2.0, 2.0)
    '''

    @staticmethod
    def forward(ctx, y: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, group_size: int,
                epsilon: float) -> torch.Tensor:
        ctx.group_size, ctx.epsilon = group_size, epsilon
        ctx.on_triton = y.is_cuda and y.dtype in (torch.float32, torch.float16, torch.bfloat16) \
            and _norm_kernels() is not None
        if ctx.on_triton:
            output, scale = _triton_gated_rms(y, gate, weight, group_size, epsilon)
            ctx.save_for_backward(y, gate, weight, scale)
            return output
        normalised, scale = _gated_rms(y, gate, group_size, epsilon)
        ctx.save_for_backward(y, gate, weight, scale)
        return (weight.to(normalised.dtype) * normalised).to(y.dtype)

    @staticmethod
    def backward(ctx, gradient: torch.Tensor):
        y, gate, weight, scale = ctx.saved_tensors
        if ctx.on_triton:
            return _triton_gated_rms_backward(gradient, y, gate, weight, scale, ctx.group_size,
                                             ctx.needs_input_grad[2]) + (None, None)
        compute = scale.dtype
        weighted = gradient.to(compute) * weight.to(compute)
        half_h = 0.5 * (weighted.unflatten(-1, (-1, ctx.group_size)) * scale).flatten(-2)
        z = gate.to(compute)
        sigmoid = torch.sigmoid(z)
        gradient_y = (half_h * z * sigmoid).to(y.dtype)
        gradient_gate = (half_h * y.to(compute) * sigmoid).to(gate.dtype)
        gradient_weight = None
        if ctx.needs_input_grad[2]:
            normalised, _ = _gated_rms(y, gate, ctx.group_size, ctx.epsilon)
            gradient_weight = (gradient.to(compute) * normalised).flatten(0, -2).sum(0).to(weight.dtype)
        return gradient_y, gradient_gate, gradient_weight, None, None


def _gated_rms(y: torch.Tensor, gate: torch.Tensor, group_size: int,
               epsilon: float) -> Tuple[torch.Tensor, torch.Tensor]:
    '''``n(y * silu(z))`` and its scales ``(..., groups, 1)``, in float32 or wider.'''
    compute = torch.promote_types(y.dtype, torch.float32)
    grouped = (y.to(compute) * F.silu(gate.to(compute))).unflatten(-1, (-1, group_size))
    scale = torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + epsilon)
    return (grouped * scale).flatten(-2), scale


#: rows per program of the gated normalisation's backward kernel: each program sums its rows' terms of the weight's
#: gradient, so that ``rows / _NORM_ROWS`` partial sums per channel reach memory, not a term per element
_NORM_ROWS = 16


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    '''``(..., width)`` as ``(rows, width)`` with the channels contiguous (a view where the strides allow).'''
    rows = tensor.reshape(-1, tensor.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _norm_launch(group_size: int) -> Tuple[int, int]:
    '''The tile over a group's channels (a power of two) and the warps that hold it.'''
    block = power_of_two(group_size)
    return block, min(16, max(4, block // 256))


def _triton_gated_rms(y: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, group_size: int,
                      epsilon: float) -> Tuple[torch.Tensor, torch.Tensor]:
    '''``w * n(y * silu(z))`` (:py:class:`GatedRMSNorm`'s forward) in one Triton kernel: the output in the dtype
    of ``y`` and the scales ``r``, float32 ``(rows, groups)``; arithmetic in float32.'''
    kernels = _norm_kernels()
    width = y.shape[-1]
    y_rows, gate_rows = _rows(y), _rows(gate)
    groups = width // group_size
    output = torch.empty(y_rows.shape, dtype=y.dtype, device=y.device)
    scale = torch.empty(y_rows.shape[0], groups, dtype=torch.float32, device=y.device)
    block, warps = _norm_launch(group_size)
    with on_device_of(y):
        kernels.forward[(y_rows.shape[0], groups)](
            y_rows, gate_rows, weight, output, scale, group_size, groups, epsilon, y_rows.stride(0),
            gate_rows.stride(0), BLOCK=block, num_warps=warps)
    return output.view(y.shape), scale


def _triton_gated_rms_backward(gradient: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor,
                               scale: torch.Tensor, group_size: int,
                               weight_gradient: bool) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    ''':py:class:`GatedRMSNorm`'s backward in one Triton kernel (the equations of its docstring): ``dL/dy``,
    ``dL/dz`` and, where ``weight_gradient``, ``dL/dw`` (partial sums per ``_NORM_ROWS`` rows, then summed).'''
    kernels = _norm_kernels()
    width = y.shape[-1]
    gradient_rows, y_rows, gate_rows = _rows(gradient), _rows(y), _rows(gate)
    rows, groups = y_rows.shape[0], width // group_size
    gradient_y = torch.empty(y_rows.shape, dtype=y.dtype, device=y.device)
    gradient_gate = torch.empty(gate_rows.shape, dtype=gate.dtype, device=gate.device)
    row_blocks = blocks(rows, _NORM_ROWS)
    partial = torch.empty(row_blocks if weight_gradient else 0, width, dtype=torch.float32, device=y.device)
    block, warps = _norm_launch(group_size)
    with on_device_of(y):
        kernels.backward[(row_blocks, groups)](
            gradient_rows, y_rows, gate_rows, weight, scale, gradient_y, gradient_gate, partial, rows, group_size,
            groups, width, gradient_rows.stride(0), y_rows.stride(0), gate_rows.stride(0), ROWS=_NORM_ROWS,
            BLOCK=block, WEIGHT=weight_gradient, num_warps=warps)
    gradient_weight = partial.sum(0).to(weight.dtype) if weight_gradient else None
    return gradient_y.view(y.shape), gradient_gate.view(gate.shape), gradient_weight


class _NormKernels(NamedTuple):
    forward: Callable
    backward: Callable


@functools.lru_cache(maxsize=None)
def _norm_kernels() -> Optional[_NormKernels]:
    '''The two Triton kernels of :py:class:`GatedRMSNorm` on a GPU, or None where Triton is not installed. A program
    takes one group of channels of one row (forward) or of ``ROWS`` rows (backward); arithmetic in float32.'''
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def forward(y, gate, weight, output, scale, group_size, groups, epsilon, y_row_stride, gate_row_stride,
                BLOCK: tl.constexpr):
        row, group = tl.program_id(0).to(tl.int64), tl.program_id(1)
        inside = tl.arange(0, BLOCK) < group_size
        channels = group * group_size + tl.arange(0, BLOCK)
        value = tl.load(y + row * y_row_stride + channels, mask=inside, other=0.0).to(tl.float32)
        z = tl.load(gate + row * gate_row_stride + channels, mask=inside, other=0.0).to(tl.float32)
        h = value * z * tl.sigmoid(z)
        r = tl.rsqrt(tl.sum(h * h, axis=0) / group_size + epsilon)
        w = tl.load(weight + channels, mask=inside, other=0.0).to(tl.float32)
        tl.store(output + row * groups * group_size + channels, (w * h * r).to(output.dtype.element_ty), mask=inside)
        tl.store(scale + row * groups + group, r)

    @triton.jit
    def backward(gradient, y, gate, weight, scale, gradient_y, gradient_gate, partial, rows, group_size, groups,
                 width, gradient_row_stride, y_row_stride, gate_row_stride, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                 WEIGHT: tl.constexpr):
        row_block, group = tl.program_id(0).to(tl.int64), tl.program_id(1)
        inside = tl.arange(0, BLOCK) < group_size
        channels = group * group_size + tl.arange(0, BLOCK)
        w = tl.load(weight + channels, mask=inside, other=0.0).to(tl.float32)
        weight_terms = tl.zeros((BLOCK,), dtype=tl.float32)
        for offset in range(0, ROWS):
            row = row_block * ROWS + offset
            here = inside & (row < rows)
            g = tl.load(gradient + row * gradient_row_stride + channels, mask=here, other=0.0).to(tl.float32)
            value = tl.load(y + row * y_row_stride + channels, mask=here, other=0.0).to(tl.float32)
            z = tl.load(gate + row * gate_row_stride + channels, mask=here, other=0.0).to(tl.float32)
            r = tl.load(scale + row * groups + group, mask=row < rows, other=0.0)
            sigmoid = tl.sigmoid(z)
            # LN rule: dL/dh = dL/do w r; half rule: half of it to each factor; SiLU identity rule: times sigmoid(z)
            half_h = 0.5 * g * w * r
            tl.store(gradient_y + row * width + channels, (half_h * z * sigmoid).to(gradient_y.dtype.element_ty),
                     mask=here)
            tl.store(gradient_gate + row * width + channels,
                     (half_h * value * sigmoid).to(gradient_gate.dtype.element_ty), mask=here)
            if WEIGHT:
                weight_terms += g * value * z * sigmoid * r
        if WEIGHT:
            tl.store(partial + row_block * width + channels, weight_terms, mask=inside)

    return _NormKernels(forward, backward)
