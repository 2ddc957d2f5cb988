'''A mixer's causal depthwise convolution on time-major inputs, one Triton kernel each way (GPU).

A Mamba-2 mixer's convolution reads a slice of ``in_proj``'s output, ``(batch, length, channels)`` with the channels
contiguous, and the SSD reads its output in the same layout. ``torch.nn.Conv1d`` takes ``(batch, channels, length)``
with time contiguous, so the module call costs a transposing copy of its input, of its output and of the output's
gradient (and keeps the copied input for its backward). :py:class:`CausalConv` computes the same convolution on the
time-major slice directly: for a width-``K`` kernel ``w`` (``(channels, K)``) and bias ``b``,

* forward: ``y_t = b + sum_k w_k x_{t - K + 1 + k}`` (``x_s = 0`` for ``s < 0``), per channel;
* backward: ``dL/dx_s = sum_k w_k dL/dy_{s + K - 1 - k}`` (positions past the end contribute 0),
  ``dL/dw_k = sum_{batch, t} dL/dy_t x_{t - K + 1 + k}`` and ``dL/db = sum_{batch, t} dL/dy_t``.

This is the plain gradient of the convolution (LRP-0 for it, MambaLRP's rule for linear layers), so it stands in for
the module call only where nothing observes that call (:py:func:`applies`): a Zennit rule (``gamma``, ``layer_map``), a
Captum layer method or accelerate's hooks need the module called, and get it. Arithmetic in float32; with
``TRITON_INTERPRET=1`` the kernels run on the CPU.
'''
import functools
from typing import Callable, NamedTuple, Optional, Tuple

import torch

from zennit_mamba.kernels.ssd_triton import blocks, on_device_of

#: positions and channels of a program's tile
_BLOCK_TIME, _BLOCK_CHANNELS = 64, 128


def applies(conv1d: torch.nn.Module, inputs: torch.Tensor) -> bool:
    '''Whether :py:class:`CausalConv` computes ``conv1d`` on the time-major ``inputs``
    ``(batch, length, channels)`` exactly as calling it would: ``conv1d`` is a plain ``torch.nn.Conv1d``, depthwise
    and causal (padding ``K - 1`` with zeros, stride and dilation 1), the inputs and the weight of a dtype whose
    arithmetic float32 holds (float32, float16, bfloat16), the inputs on a GPU, and Triton installed.

    Parameters
    ----------
    conv1d : :py:obj:`torch.nn.Module`
        The mixer's convolution.
    inputs : :py:obj:`torch.Tensor`
        Its input, time-major.

    Returns
    -------
    bool

    Examples
    --------
    >>> conv1d = torch.nn.Conv1d(4, 4, 3, groups=4, padding=2)
    >>> applies(conv1d, torch.zeros(1, 5, 4))  # a CPU tensor: the module is called
    False
    '''
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    return (inputs.is_cuda and inputs.dtype in dtypes and type(conv1d) is torch.nn.Conv1d
            and conv1d.weight.dtype in dtypes and conv1d.groups == conv1d.in_channels == conv1d.out_channels
            and conv1d.padding == (conv1d.kernel_size[0] - 1,) and conv1d.stride == (1,)
            and conv1d.dilation == (1,) and conv1d.padding_mode == 'zeros'
            and _kernels() is not None)


class CausalConv(torch.autograd.Function):
    '''``y = conv(x)``, causal and depthwise, on ``x`` ``(batch, length, channels)`` with the channels contiguous, a
    weight ``(channels, 1, K)`` and an optional bias ``(channels,)``: ``y`` ``(batch, length, channels)``, contiguous,
    in the dtype of ``x`` (the equations are the module's).'''

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        taps = weight.reshape(weight.shape[0], -1).contiguous()
        # x is a slice of the projection's output, which stays in memory anyway: kept as it is, not copied
        ctx.save_for_backward(x, taps)
        ctx.weight_shape, ctx.bias_dtype = weight.shape, None if bias is None else bias.dtype
        return _triton_forward(x, taps, bias)

    @staticmethod
    def backward(ctx, gradient: torch.Tensor):
        x, taps = ctx.saved_tensors
        wants_input, wants_weight, wants_bias = ctx.needs_input_grad
        gradient_x, gradient_taps, gradient_bias = _triton_backward(gradient, x, taps, wants_weight or wants_bias)
        return (gradient_x if wants_input else None,
                gradient_taps.reshape(ctx.weight_shape).to(taps.dtype) if wants_weight else None,
                gradient_bias.to(ctx.bias_dtype) if wants_bias else None)


def _strides(x: torch.Tensor) -> torch.Tensor:
    '''``x`` ``(batch, length, channels)`` with the channels contiguous (a view where they already are).'''
    return x if x.stride(-1) == 1 else x.contiguous()


def _triton_forward(x: torch.Tensor, taps: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    ''':py:class:`CausalConv`'s forward: ``y``, contiguous, in the dtype of ``x``.'''
    x = _strides(x)
    batch, length, channels = x.shape
    output = torch.empty(batch, length, channels, dtype=x.dtype, device=x.device)
    with on_device_of(x):
        _kernels().forward[(blocks(length, _BLOCK_TIME), blocks(channels, _BLOCK_CHANNELS), batch)](
            x, taps, taps if bias is None else bias, output, length, channels, x.stride(0), x.stride(1),
            WIDTH=taps.shape[1], BIAS=bias is not None, BLOCK_TIME=_BLOCK_TIME, BLOCK_CHANNELS=_BLOCK_CHANNELS)
    return output


def _triton_backward(gradient: torch.Tensor, x: torch.Tensor, taps: torch.Tensor,
                     weight_gradient: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    ''':py:class:`CausalConv`'s backward: ``dL/dx`` (contiguous, the dtype of ``x``) and, where ``weight_gradient``,
    float32 ``dL/dw`` ``(channels, K)`` and ``dL/db`` (partial sums per tile of positions, then summed).'''
    gradient, x = gradient.contiguous(), _strides(x)
    batch, length, channels = x.shape
    width = taps.shape[1]
    time_blocks = blocks(length, _BLOCK_TIME)
    gradient_x = torch.empty(batch, length, channels, dtype=x.dtype, device=x.device)
    # per tile of positions: the K taps' sums, then the bias's
    partial = torch.empty(batch * time_blocks if weight_gradient else 0, width + 1, channels, dtype=torch.float32,
                          device=x.device)
    with on_device_of(x):
        _kernels().backward[(time_blocks, blocks(channels, _BLOCK_CHANNELS), batch)](
            gradient, x, taps, gradient_x, partial, length, channels, time_blocks, x.stride(0), x.stride(1),
            WIDTH=width, WEIGHT=weight_gradient, BLOCK_TIME=_BLOCK_TIME, BLOCK_CHANNELS=_BLOCK_CHANNELS)
    if not weight_gradient:
        return gradient_x, None, None
    sums = partial.sum(0)
    return gradient_x, sums[:width].t(), sums[width]


class _Kernels(NamedTuple):
    forward: Callable
    backward: Callable


@functools.lru_cache(maxsize=None)
def _kernels() -> Optional[_Kernels]:
    '''The two kernels, or None where Triton is not installed. A program takes a tile of ``BLOCK_TIME`` positions
    and ``BLOCK_CHANNELS`` channels of one sequence; offsets in 64 bits (long inputs pass 2**31 elements).'''
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def forward(x, taps, bias, output, length, channels, x_batch_stride, x_time_stride, WIDTH: tl.constexpr,
                BIAS: tl.constexpr, BLOCK_TIME: tl.constexpr, BLOCK_CHANNELS: tl.constexpr):
        batch = tl.program_id(2).to(tl.int64)
        times = tl.program_id(0).to(tl.int64) * BLOCK_TIME + tl.arange(0, BLOCK_TIME)
        lanes = tl.program_id(1) * BLOCK_CHANNELS + tl.arange(0, BLOCK_CHANNELS)
        inside = lanes < channels
        total = tl.zeros((BLOCK_TIME, BLOCK_CHANNELS), dtype=tl.float32)
        if BIAS:
            total += tl.load(bias + lanes, mask=inside, other=0.0).to(tl.float32)[None, :]
        for tap in tl.static_range(WIDTH):
            # y_t reads x_{t - K + 1 + k}; positions before the start are the causal padding's zeros
            source = times - (WIDTH - 1) + tap
            here = ((source >= 0) & (source < length))[:, None] & inside[None, :]
            value = tl.load(x + batch * x_batch_stride + source[:, None] * x_time_stride + lanes[None, :], mask=here,
                            other=0.0).to(tl.float32)
            total += value * tl.load(taps + lanes * WIDTH + tap, mask=inside, other=0.0).to(tl.float32)[None, :]
        tl.store(output + (batch * length + times[:, None]) * channels + lanes[None, :],
                 total.to(output.dtype.element_ty), mask=(times < length)[:, None] & inside[None, :])

    @triton.jit
    def backward(gradient, x, taps, gradient_x, partial, length, channels, time_blocks, x_batch_stride,
                 x_time_stride, WIDTH: tl.constexpr, WEIGHT: tl.constexpr, BLOCK_TIME: tl.constexpr,
                 BLOCK_CHANNELS: tl.constexpr):
        batch = tl.program_id(2).to(tl.int64)
        time_block = tl.program_id(0).to(tl.int64)
        times = time_block * BLOCK_TIME + tl.arange(0, BLOCK_TIME)
        lanes = tl.program_id(1) * BLOCK_CHANNELS + tl.arange(0, BLOCK_CHANNELS)
        inside = lanes < channels
        rows = gradient + batch * length * channels
        total = tl.zeros((BLOCK_TIME, BLOCK_CHANNELS), dtype=tl.float32)
        for tap in tl.static_range(WIDTH):
            # x_s is read by y_{s + K - 1 - k} through tap k
            reader = times + (WIDTH - 1) - tap
            here = (reader < length)[:, None] & inside[None, :]
            g = tl.load(rows + reader[:, None] * channels + lanes[None, :], mask=here, other=0.0).to(tl.float32)
            total += g * tl.load(taps + lanes * WIDTH + tap, mask=inside, other=0.0).to(tl.float32)[None, :]
        within = (times < length)[:, None] & inside[None, :]
        tl.store(gradient_x + (batch * length + times[:, None]) * channels + lanes[None, :],
                 total.to(gradient_x.dtype.element_ty), mask=within)
        if WEIGHT:
            g = tl.load(rows + times[:, None] * channels + lanes[None, :], mask=within, other=0.0).to(tl.float32)
            sums = partial + (batch * time_blocks + time_block) * (WIDTH + 1) * channels + lanes
            for tap in tl.static_range(WIDTH):
                source = times - (WIDTH - 1) + tap
                here = within & (source >= 0)[:, None]
                value = tl.load(x + batch * x_batch_stride + source[:, None] * x_time_stride + lanes[None, :],
                                mask=here, other=0.0).to(tl.float32)
                tl.store(sums + tap * channels, tl.sum(g * value, axis=0), mask=inside)
            tl.store(sums + WIDTH * channels, tl.sum(g, axis=0), mask=inside)

    return _Kernels(forward, backward)
