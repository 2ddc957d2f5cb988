'''Mamba-2's chunked SSD scan as four Triton kernels whose float32 matrix products are exact to float32 rounding.

mamba-ssm's Triton SSD rounds float32 operands of its matrix products to TF32 (10 mantissa bits); the PyTorch SSD
(:py:func:`~zennit_mamba.kernels.ssd._ssd`) is exact but forms every ``chunk x chunk`` mixing matrix in memory. These
kernels compute the same chunked form as :py:func:`~zennit_mamba.kernels.ssd._ssd` with ``tf32x3`` products (each
operand split into a TF32 head and tail, three tensor-core products: float32 accuracy at tensor-core speed); only the
``C . B`` products of a chunk reach memory, once per group of heads, and the decay-weighted mixing stays in registers:

1. ``chunk_states``: each chunk's own contribution to the state at its end,
   ``sum_s exp(log_decay_end - log_decay_s) u_s B_s^T`` with ``u = x * input_scale`` (``x * dt`` in the forward);
2. ``pass_states``: the states entering each chunk, ``S_c = exp(log_decay_end of c - 1) S_{c-1} + contribution``,
   one step per chunk;
3. ``chunk_products``: the within-chunk products ``C_t . B_s`` (on and below the diagonal), once per group of heads;
4. ``chunk_outputs``: ``y_t = exp(log_decay_t) C_t . S_entering + sum_{s <= t in the chunk}
   exp(log_decay_t - log_decay_s) (C_t . B_s) u_s``, written as ``output_scale_t y_t + skip x_t``.

They read and write in either direction of time (the transposed scan of the backward runs in reversed time), and
scale, skip and mask past the length as they go: no reversed, scaled or padded copy of an input reaches memory.

``log_decay`` is the cumulative sum of the non-positive log-steps within a chunk, so every decay formed is at most 1.
They have no backward of their own: MambaLRP's SSM rule makes the scan linear, and its backward is the same scan
in reversed time (:py:class:`~zennit_mamba.kernels.ssd._LinearSSD`). With ``TRITON_INTERPRET=1`` they run on the CPU.
'''
import contextlib
import functools
from typing import Callable, ContextManager, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

#: the float32 matrix products' precision: three TF32 products, float32 accuracy
PRECISION = 'tf32x3'
#: positions per tile of the within-chunk products
_BLOCK_TIME = 64
#: largest state size: the kernels hold the whole state in one tile (Mamba-2 models use 64 or 128); larger ones, whose
#: tiles exceed the shared memory (256 did on an H200), take the PyTorch SSD
MAX_STATE = 128


class _Kernels(NamedTuple):
    chunk_states: Callable
    pass_states: Callable
    chunk_products: Callable
    chunk_outputs: Callable


#: launch settings per kernel (warps, pipeline stages), chosen on an H200 for Mamba-2's head size 64 and state 128
LAUNCH = {'chunk_states': (4, 1), 'chunk_products': (4, 3), 'chunk_outputs': (4, 1)}
#: elements of the carried states per program of ``pass_states`` (each program steps through every chunk in turn)
PASS_BLOCK = 1024


def on_device_of(tensor: torch.Tensor) -> ContextManager:
    '''The context in which kernels launch on ``tensor``'s GPU: Triton launches on the current device, and under
    accelerate's dispatch the layers sit on several GPUs (nothing to do for CPU tensors, as in the interpreter's
    tests).

    Parameters
    ----------
    tensor : :py:obj:`torch.Tensor`
        A tensor of the computation.

    Returns
    -------
    contextlib.AbstractContextManager
        ``torch.cuda.device(tensor.device)`` for a CUDA tensor on another GPU than the current one, else a context
        that does nothing.

    Examples
    --------
    >>> with on_device_of(torch.zeros(1)):  # a CPU tensor: the current device stays as it is
    ...     pass
    '''
    if not tensor.is_cuda or tensor.get_device() == torch.cuda.current_device():
        # nothing to switch (the usual case): a context of its own costs microseconds of host time on every mixer
        return contextlib.nullcontext()
    return torch.cuda.device(tensor.device)


def power_of_two(size: int, smallest: int = 16) -> int:
    '''The tile covering ``size``: a power of two, at least ``smallest`` (Triton's products need 16).

    Examples
    --------
    >>> power_of_two(100), power_of_two(3)
    (128, 16)
    '''
    return max(smallest, 1 << (size - 1).bit_length())


@functools.lru_cache(maxsize=None)
def triton_ssd_kernels() -> Optional[_Kernels]:
    '''The four kernels, or None where Triton is not installed (compiled on first use per shape class).'''
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def chunk_states(x, input_scale, log_decay, B, states, length, chunk_size, heads, chunks, heads_per_group,
                     head_dim, state_size, sx_b, sx_l, sx_h, si_b, si_l, si_h, sd_b, sd_c, sd_l, sd_h, sb_b, sb_l,
                     sb_g, ss_b, ss_c, ss_h, SCALED_INPUT: tl.constexpr, REVERSED: tl.constexpr,
                     BLOCK_TIME: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
        # program (batch, chunk, head) x head-dim block: sum_s exp(end - log_decay_s) u_s B_s^T
        index = tl.program_id(0).to(tl.int64)  # offsets past 2**31 elements stay exact
        head, chunk, batch = index % heads, (index // heads) % chunks, index // (heads * chunks)
        p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        n = tl.arange(0, BLOCK_N)
        decay_base = log_decay + batch * sd_b + chunk * sd_c + head * sd_h
        end = tl.load(decay_base + (chunk_size - 1) * sd_l)
        start = chunk * chunk_size
        x_base = x + batch * sx_b + head * sx_h
        scale_base = input_scale + batch * si_b + head * si_h
        b_base = B + batch * sb_b + (head // heads_per_group) * sb_g
        accumulated = tl.full((BLOCK_P, BLOCK_N), 0.0, tl.float32)
        for offset in range(0, chunk_size, BLOCK_TIME):
            s = offset + tl.arange(0, BLOCK_TIME)
            inside = (s < chunk_size) & (start + s < length)
            rows = start + s
            if REVERSED:
                rows = length - 1 - rows
            to_end = tl.exp(end - tl.load(decay_base + s * sd_l, mask=s < chunk_size, other=end))
            u = tl.load(x_base + rows[:, None] * sx_l + p[None, :],
                        mask=inside[:, None] & (p[None, :] < head_dim), other=0.0)
            if SCALED_INPUT:
                u = u * tl.load(scale_base + rows * si_l, mask=inside, other=0.0)[:, None]
            b = tl.load(b_base + rows[:, None] * sb_l + n[None, :],
                        mask=inside[:, None] & (n[None, :] < state_size), other=0.0)
            accumulated += tl.dot(tl.trans(u * to_end[:, None]), b, input_precision=PRECISION)
        target = states + batch * ss_b + chunk * ss_c + head * ss_h
        tl.store(target + p[:, None] * state_size + n[None, :], accumulated,
                 mask=(p[:, None] < head_dim) & (n[None, :] < state_size))

    @triton.jit
    def pass_states(states, log_decay, last_state, chunk_size, heads, chunks, elements,
                    sd_b, sd_c, sd_l, sd_h, ss_b, ss_c, ss_h, BLOCK: tl.constexpr):
        # program (batch, head) x element block: contributions in, entering states out (in place), the last state
        index = tl.program_id(0).to(tl.int64)  # offsets past 2**31 elements stay exact
        head, batch = index % heads, index // heads
        offsets = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < elements
        state = tl.full((BLOCK,), 0.0, tl.float32)
        where = states + batch * ss_b + head * ss_h + offsets
        end = log_decay + batch * sd_b + head * sd_h + (chunk_size - 1) * sd_l
        for _ in range(0, chunks):
            contribution = tl.load(where, mask=inside, other=0.0)
            tl.store(where, state, mask=inside)
            state = tl.exp(tl.load(end)) * state + contribution
            where += ss_c  # pointers advance in 64 bits
            end += sd_c
        tl.store(last_state + index * elements + offsets, state, mask=inside)

    @triton.jit
    def chunk_products(B, C, products, length, chunk_size, groups, chunks, state_size, sb_b, sb_l, sb_g, sc_b, sc_l,
                       sc_g, REVERSED: tl.constexpr, BLOCK_TIME: tl.constexpr, BLOCK_N: tl.constexpr,
                       PRECISION: tl.constexpr):
        # program (batch, chunk, group) x (time block, source block) on or below the diagonal: C_t . B_s, shared by
        # the group's heads
        index = tl.program_id(0).to(tl.int64)  # offsets past 2**31 elements stay exact
        group, chunk, batch = index % groups, (index // groups) % chunks, index // (groups * chunks)
        if tl.program_id(2) <= tl.program_id(1):
            t = tl.program_id(1) * BLOCK_TIME + tl.arange(0, BLOCK_TIME)
            s = tl.program_id(2) * BLOCK_TIME + tl.arange(0, BLOCK_TIME)
            n = tl.arange(0, BLOCK_N)
            start = chunk * chunk_size
            t_inside, s_inside = (t < chunk_size) & (start + t < length), (s < chunk_size) & (start + s < length)
            t_rows, s_rows = start + t, start + s
            if REVERSED:
                t_rows, s_rows = length - 1 - t_rows, length - 1 - s_rows
            c = tl.load(C + batch * sc_b + group * sc_g + t_rows[:, None] * sc_l + n[None, :],
                        mask=t_inside[:, None] & (n[None, :] < state_size), other=0.0)
            b = tl.load(B + batch * sb_b + group * sb_g + s_rows[:, None] * sb_l + n[None, :],
                        mask=s_inside[:, None] & (n[None, :] < state_size), other=0.0)
            product = tl.dot(c, tl.trans(b), input_precision=PRECISION)
            tl.store(products + index * chunk_size * chunk_size + t[:, None] * chunk_size + s[None, :], product,
                     mask=(t[:, None] < chunk_size) & (s[None, :] < chunk_size))

    @triton.jit
    def chunk_outputs(x, input_scale, output_scale, skip, log_decay, products, C, states, out, length, chunk_size,
                      heads, chunks, heads_per_group, head_dim, state_size, sx_b, sx_l, sx_h, si_b, si_l, si_h,
                      su_b, su_l, su_h, sk_h, sk_p, sd_b, sd_c, sd_l, sd_h, sc_b, sc_l, sc_g, ss_b, ss_c, ss_h,
                      so_b, so_l, so_h, SCALED_INPUT: tl.constexpr, SCALED_OUTPUT: tl.constexpr,
                      SKIP: tl.constexpr, REVERSED: tl.constexpr, BLOCK_TIME: tl.constexpr, BLOCK_P: tl.constexpr,
                      BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
        # program (batch, chunk, head) x (time block, head-dim block)
        index = tl.program_id(0).to(tl.int64)  # offsets past 2**31 elements stay exact
        head, chunk, batch = index % heads, (index // heads) % chunks, index // (heads * chunks)
        t = tl.program_id(1) * BLOCK_TIME + tl.arange(0, BLOCK_TIME)
        p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
        n = tl.arange(0, BLOCK_N)
        start = chunk * chunk_size
        t_inside, p_inside, n_inside = (t < chunk_size) & (start + t < length), p < head_dim, n < state_size
        t_rows = start + t
        if REVERSED:
            t_rows = length - 1 - t_rows
        group = head // heads_per_group
        decay_base = log_decay + batch * sd_b + chunk * sd_c + head * sd_h
        decay_t = tl.load(decay_base + t * sd_l, mask=t < chunk_size, other=0.0)
        c = tl.load(C + batch * sc_b + group * sc_g + t_rows[:, None] * sc_l + n[None, :],
                    mask=t_inside[:, None] & n_inside[None, :], other=0.0)
        # the entering state, read transposed: (state, head dim)
        entering = tl.load(states + batch * ss_b + chunk * ss_c + head * ss_h + p[None, :] * state_size + n[:, None],
                           mask=n_inside[:, None] & p_inside[None, :], other=0.0)
        accumulated = tl.dot(c, entering, input_precision=PRECISION) * tl.exp(decay_t)[:, None]
        x_base = x + batch * sx_b + head * sx_h
        scale_base = input_scale + batch * si_b + head * si_h
        groups = heads // heads_per_group
        products_base = products + ((batch * chunks + chunk) * groups + group) * chunk_size * chunk_size
        last = tl.minimum((tl.program_id(1) + 1) * BLOCK_TIME, chunk_size)
        for offset in range(0, last, BLOCK_TIME):
            s = offset + tl.arange(0, BLOCK_TIME)
            s_inside = (s < chunk_size) & (start + s < length)
            s_rows = start + s
            if REVERSED:
                s_rows = length - 1 - s_rows
            decay_s = tl.load(decay_base + s * sd_l, mask=s < chunk_size, other=0.0)
            causal = (s[None, :] <= t[:, None]) & (s[None, :] < chunk_size)
            product = tl.load(products_base + t[:, None] * chunk_size + s[None, :],
                              mask=causal & (t[:, None] < chunk_size), other=0.0)
            u = tl.load(x_base + s_rows[:, None] * sx_l + p[None, :], mask=s_inside[:, None] & p_inside[None, :],
                        other=0.0)
            if SCALED_INPUT:
                u = u * tl.load(scale_base + s_rows * si_l, mask=s_inside, other=0.0)[:, None]
            # masked before the exponential: later positions would give decays above 1
            mixing = tl.exp(tl.where(causal, decay_t[:, None] - decay_s[None, :], -float('inf'))) * product
            accumulated += tl.dot(mixing, u, input_precision=PRECISION)
        if SCALED_OUTPUT:
            accumulated *= tl.load(output_scale + batch * su_b + head * su_h + t_rows * su_l, mask=t_inside,
                                   other=0.0)[:, None]
        if SKIP:
            unscaled = tl.load(x_base + t_rows[:, None] * sx_l + p[None, :],
                               mask=t_inside[:, None] & p_inside[None, :], other=0.0)
            accumulated += tl.load(skip + head * sk_h + p * sk_p, mask=p_inside, other=0.0)[None, :] * unscaled
        tl.store(out + batch * so_b + head * so_h + t_rows[:, None] * so_l + p[None, :], accumulated,
                 mask=t_inside[:, None] & p_inside[None, :])

    return _Kernels(chunk_states, pass_states, chunk_products, chunk_outputs)


def triton_ssd_applies(x: torch.Tensor, state_size: int) -> bool:
    '''Whether :py:func:`triton_ssd` serves ``x``: CUDA float32 on an Ampere or later GPU where Triton is installed,
    states of at most ``MAX_STATE`` (under ``TRITON_INTERPRET=1`` it runs on the CPU too, as the tests call it).'''
    # tf32x3 needs TF32 tensor cores (compute capability 8.0, Ampere, and later); older GPUs take the PyTorch SSD
    return (x.is_cuda and x.dtype == torch.float32 and state_size <= MAX_STATE
            and torch.cuda.get_device_capability(x.device)[0] >= 8 and triton_ssd_kernels() is not None)


def triton_ssd(x: torch.Tensor, log_step: torch.Tensor, B: torch.Tensor, C: torch.Tensor, chunk_size: int,
               input_scale: Optional[torch.Tensor] = None, output_scale: Optional[torch.Tensor] = None,
               skip: Optional[torch.Tensor] = None, reverse: bool = False,
               initial_state: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    '''The SSD of :py:func:`~zennit_mamba.kernels.ssd._pytorch_ssd` (the same arguments and results) in float32: in scan
    order (reversed time where ``reverse``), ``y_t = sum_{s <= t} exp(sum_{r = s+1}^{t} log_step_r) (C_t . B_s) u_s``
    with ``u = x * input_scale``, and ``out = output_scale * y + skip * x``.

    The scaling, the skip and the reversal happen as the kernels read and write (no copies); positions past the
    length are masked, not padded.

    Parameters
    ----------
    x : :py:obj:`torch.Tensor`
        ``(batch, length, heads, head_dim)``, float32, rows of head_dim contiguous.
    log_step : :py:obj:`torch.Tensor`
        Non-positive ``(batch, length, heads)``, in the order of ``x``.
    B, C : :py:obj:`torch.Tensor`
        ``(batch, length, groups, state)`` with ``heads`` a multiple of ``groups`` (any strides, state contiguous).
    chunk_size : int
        Positions per chunk.
    input_scale, output_scale : :py:obj:`torch.Tensor`, optional
        float32 ``(batch, length, heads)``: the step sizes (the forward's ``x * dt``, the transposed scan's ``dt *``).
    skip : :py:obj:`torch.Tensor`, optional
        ``(heads,)`` or ``(heads, head_dim)``, float32.
    reverse : bool, optional
        Scan from the last position to the first.
    initial_state : None, optional
        Only None: these kernels start from a zero state (a scan continued from a state takes the PyTorch SSD).

    Returns
    -------
    tuple[:py:obj:`torch.Tensor`, :py:obj:`torch.Tensor`]
        The outputs ``(batch, length, heads, head_dim)`` and the last state ``(batch, heads, head_dim, state)``.

    Examples
    --------
    Needs Triton and a GPU (or ``TRITON_INTERPRET=1``): ``triton_ssd(x, dt * A, B, C, 256, input_scale=dt, skip=D)``.
    '''
    if initial_state is not None:
        raise ValueError('The Triton SSD starts from a zero state; a scan from an initial state takes the PyTorch SSD '
                         '(ssd_scan with implementation=\'torch\').')
    kernels = triton_ssd_kernels()
    batch, length, heads, head_dim = x.shape
    groups, state_size = B.shape[2], B.shape[3]
    x, B, C = (tensor if tensor.stride(-1) == 1 else tensor.contiguous() for tensor in (x, B, C))
    chunks = blocks(length, chunk_size)
    # the decays within each chunk, in scan order: zero log-steps past the length (decay 1; their inputs are masked)
    scan_log_step = log_step.float().flip(1) if reverse else log_step.float()
    log_decay = torch.cumsum(F.pad(scan_log_step, (0, 0, 0, chunks * chunk_size - length)).unflatten(
        1, (chunks, chunk_size)), dim=2)                                                  # (b, c, l, h)
    states = torch.empty(batch, chunks, heads, head_dim, state_size, device=x.device, dtype=torch.float32)
    last_state = torch.empty(batch, heads, head_dim, state_size, device=x.device, dtype=torch.float32)
    out = torch.empty(x.shape, device=x.device, dtype=torch.float32)
    # absent scales and skip: any tensor stands in (the kernels do not read it)
    input_scale_or_x, output_scale_or_x = (x if scale is None else scale for scale in (input_scale, output_scale))
    skip_or_x = x if skip is None else skip.reshape(heads, -1).expand(heads, head_dim)
    skip_strides = skip_or_x.stride()[:2]
    block_p, block_n = min(power_of_two(head_dim), 64), power_of_two(state_size)
    sizes = (length, chunk_size, heads, chunks, heads // groups, head_dim, state_size)
    x_strides = (x.stride(0), x.stride(1), x.stride(2))
    input_scale_strides, output_scale_strides = (scale.stride()[:3] for scale in (input_scale_or_x, output_scale_or_x))
    decay_strides = log_decay.stride()
    b_strides, c_strides = (B.stride(0), B.stride(1), B.stride(2)), (C.stride(0), C.stride(1), C.stride(2))
    state_strides = (states.stride(0), states.stride(1), states.stride(2))
    flags = dict(REVERSED=reverse, BLOCK_TIME=_BLOCK_TIME, PRECISION=PRECISION)

    time_blocks = blocks(chunk_size, _BLOCK_TIME)
    products = torch.empty(batch, chunks, groups, chunk_size, chunk_size, device=x.device, dtype=torch.float32)
    outputs_arguments = (x, input_scale_or_x, output_scale_or_x, skip_or_x, log_decay, products, C, states, out, *sizes,
                         *x_strides, *input_scale_strides, *output_scale_strides, *skip_strides, *decay_strides,
                         *c_strides, *state_strides, out.stride(0), out.stride(1), out.stride(2))
    with on_device_of(x):
        warps, stages = LAUNCH['chunk_states']
        kernels.chunk_states[(batch * chunks * heads, blocks(head_dim, block_p))](
            x, input_scale_or_x, log_decay, B, states, *sizes, *x_strides, *input_scale_strides, *decay_strides,
            *b_strides, *state_strides, SCALED_INPUT=input_scale is not None, BLOCK_P=block_p, BLOCK_N=block_n,
            num_warps=warps, num_stages=stages, **flags)
        elements = head_dim * state_size
        kernels.pass_states[(batch * heads, blocks(elements, PASS_BLOCK))](
            states, log_decay, last_state, chunk_size, heads, chunks, elements, *decay_strides, *state_strides,
            BLOCK=PASS_BLOCK)
        warps, stages = LAUNCH['chunk_products']
        kernels.chunk_products[(batch * chunks * groups, time_blocks, time_blocks)](
            B, C, products, length, chunk_size, groups, chunks, state_size, *b_strides, *c_strides, BLOCK_N=block_n,
            num_warps=warps, num_stages=stages, **flags)
        warps, stages = LAUNCH['chunk_outputs']
        kernels.chunk_outputs[(batch * chunks * heads, time_blocks, blocks(head_dim, block_p))](
            *outputs_arguments, SCALED_INPUT=input_scale is not None, SCALED_OUTPUT=output_scale is not None,
            SKIP=skip is not None, BLOCK_P=block_p, BLOCK_N=block_n, num_warps=warps, num_stages=stages, **flags)
    return out, last_state


def blocks(size: int, block: int) -> int:
    '''How many blocks of ``block`` cover ``size``.

    Examples
    --------
    >>> blocks(10, 4)
    3
    '''
    return -(-size // block)
