'''The chunked state-space-duality (SSD) scan of Mamba-2 in plain PyTorch, and the dispatch to mamba-ssm's kernel.

Mamba-2's recurrence per head ``h`` is ``S_t = exp(dt_t A_h) S_{t-1} + dt_t x_t B_t^T`` with output
``y_t = S_t C_t + D_h x_t``. Within a chunk of ``chunk_size`` positions the outputs are a masked matrix product (the
"attention" form); the states at the chunk ends are carried across chunks by the same recurrence, one step per chunk.
Only decays ``exp(sum of dt A) <= 1`` are formed, so nothing overflows, and the computation stays in the input's
precision (at least float32): float64 models are explained in float64.

The scan is differentiable in all inputs; MambaLRP detaches ``dt``, ``A``, ``B`` and ``C``, which makes it linear in
``x``: then its backward is the transposed scan (:py:class:`_LinearSSD`), and nothing of the forward is kept for it.
'''
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from zennit_mamba._optional import mamba_ssm_chunk_scan
from zennit_mamba.kernels.scan import BLOCK_ELEMENTS, SMALLEST_STEP, check_initial_state, uses_kernel
from zennit_mamba.kernels.ssd_triton import triton_ssd, triton_ssd_applies

#: longest chunk of :py:class:`_LinearSSD` on the CPU: the within-chunk products cost ``length * chunk`` per head, the
#: carried states ``length * head_dim * state`` whatever the chunk, so short chunks are cheaper there (the model's 256:
#: 1.5x the time of 64 at 8,192 tokens, measured on one core); on a GPU fewer, larger chunks mean fewer launches.
#: Autograd through the chunks (the selection not detached) keeps the model's chunk: it saves a state per chunk
CPU_CHUNK = 64


def _chunked(tensor: torch.Tensor, chunk_size: int) -> torch.Tensor:
    '''``(batch, length, ...)`` with length a multiple of ``chunk_size`` to ``(batch, chunks, chunk_size, ...)``.'''
    return tensor.unflatten(1, (-1, chunk_size))


def _within_chunks(log_decay, C, B, x_dt, causal) -> torch.Tensor:
    '''The outputs of chunks from their own inputs, in the masked matrix ("attention") form.'''
    between = log_decay[:, :, :, None, :] - log_decay[:, :, None, :, :]  # (b, c, l, s, h)
    mixing = torch.exp(between.masked_fill(~causal[:, :, None], -torch.inf))
    mixing = mixing * torch.einsum('bclhn,bcshn->bclsh', C, B)
    return torch.einsum('bclsh,bcshp->bclhp', mixing, x_dt)


def _ssd(x_dt, log_step, B, C, chunk_size, initial_state=None) -> Tuple[torch.Tensor, torch.Tensor]:
    '''``y_t = sum_{s <= t} exp(sum_{r = s+1}^{t} log_step_r) (C_t . B_s) x_dt_s`` in chunks, and the last state;
    from the state ``initial_state`` before the first position where given (its term in ``y_t`` is
    ``exp(sum_{r = 0}^{t} log_step_r) C_t . initial_state``).

    ``x_dt`` is ``(batch, length, heads, head_dim)``, ``log_step`` (non-positive) ``(batch, length, heads)``, ``B``
    and ``C`` ``(batch, length, heads, state)``, ``initial_state`` ``(batch, heads, head_dim, state)``, all of one
    dtype.
    '''
    batch, length, heads, _ = x_dt.shape
    # zero inputs and log-steps in the padded tail: decay 1, no input
    padding = -length % chunk_size
    x_dt, log_step, B, C = (F.pad(tensor, (0, 0) * (tensor.dim() - 2) + (0, padding))
                            for tensor in (x_dt, log_step, B, C))
    x_dt = _chunked(x_dt, chunk_size)                                    # (b, c, l, h, p)
    B, C = _chunked(B, chunk_size), _chunked(C, chunk_size)              # (b, c, l, h, n)
    log_decay = torch.cumsum(_chunked(log_step, chunk_size), dim=2)      # (b, c, l, h), decreasing in l

    # within a chunk: y_l = sum_{s <= l} exp(log_decay_l - log_decay_s) (C_l . B_s) x_dt_s, a few chunks at a time so
    # that the (chunk_size x chunk_size) mixing matrices stay in a bounded block (time linear in the length)
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=x_dt.device).tril()
    per_chunk = batch * chunk_size * chunk_size * heads
    step = max(1, BLOCK_ELEMENTS.get(x_dt.device.type, BLOCK_ELEMENTS['cuda']) // per_chunk)
    outputs = torch.cat([
        _within_chunks(log_decay[:, start:start + step], C[:, start:start + step], B[:, start:start + step],
                       x_dt[:, start:start + step], causal)
        for start in range(0, x_dt.shape[1], step)
    ], dim=1)

    # each chunk's own contribution to the state at its end, then the states entering each chunk
    to_end = torch.exp(log_decay[:, :, -1:] - log_decay)
    contributions = torch.einsum('bclhn,bclh,bclhp->bchpn', B, to_end, x_dt)
    chunk_decay = torch.exp(log_decay[:, :, -1])                        # (b, c, h)
    state = torch.zeros_like(contributions[:, 0]) if initial_state is None else initial_state
    entering = []
    for chunk in range(contributions.shape[1]):
        entering.append(state)
        state = chunk_decay[:, chunk, :, None, None] * state + contributions[:, chunk]
    entering = torch.stack(entering, dim=1)                             # (b, c, h, p, n)
    outputs = outputs + torch.einsum('bclhn,bchpn,bclh->bclhp', C, entering, torch.exp(log_decay))
    return outputs.flatten(1, 2)[:, :length], state


def _pytorch_ssd(x, log_step, B, C, chunk_size, input_scale=None, output_scale=None, skip=None,
                 reverse=False, initial_state=None) -> Tuple[torch.Tensor, torch.Tensor]:
    '''The SSD core with its input and output scaled and the skip, in either direction of time (the interface
    :py:func:`~zennit_mamba.kernels.ssd_triton.triton_ssd` shares): :py:func:`_ssd` of
    ``u = x * input_scale`` in scan order (reversed where ``reverse``) from ``initial_state`` where given, then
    ``out = output_scale * y + skip * x`` in the order of ``x``.

    ``x`` is ``(batch, length, heads, head_dim)``; ``log_step`` and the scales ``(batch, length, heads)`` in the
    order of ``x``; ``B`` and ``C`` ``(batch, length, groups, state)``, repeated from groups to heads; ``skip``
    ``(heads,)`` or ``(heads, head_dim)``. Returns the outputs and the last state of the scan.
    '''
    heads = x.shape[2]
    inputs = x if input_scale is None else x * input_scale[..., None]
    B, C = (matrix.repeat_interleave(heads // matrix.shape[2], dim=2) for matrix in (B, C))
    in_scan_order = (lambda tensor: tensor.flip(1)) if reverse else (lambda tensor: tensor)
    outputs, state = _ssd(*(in_scan_order(tensor) for tensor in (inputs, log_step, B, C)), chunk_size, initial_state)
    outputs = in_scan_order(outputs)
    if output_scale is not None:
        outputs = outputs * output_scale[..., None]
    if skip is not None:
        outputs = outputs + skip.reshape(heads, -1) * x
    return outputs, state


def _exact_ssd(core, x, dt, A, B, C, D, chunk_size, initial_state=None) -> Tuple[torch.Tensor, torch.Tensor]:
    '''The SSD with skip in the promoted dtype of ``x`` (float32 or wider) by ``core`` (:py:func:`_pytorch_ssd` or
    :py:func:`~zennit_mamba.kernels.ssd_triton.triton_ssd`), from ``initial_state`` where given (the PyTorch core
    only).'''
    dtype = torch.promote_types(x.dtype, torch.float32)
    x, dt, A, B, C, D = (tensor.to(dtype) for tensor in (x, dt, A, B, C, D))
    return core(x, dt * A, B, C, chunk_size, input_scale=dt, skip=D,
                initial_state=None if initial_state is None else initial_state.to(dtype))


class _LinearSSD(torch.autograd.Function):
    '''The SSD for a constant selection ``dt, A, B, C`` (MambaLRP's SSM rule): a linear map of ``x``, whose backward is
    the transposed map, the same scan run backwards in time with ``B`` and ``C`` exchanged.

    With ``y_t = sum_{s <= t} exp(sum_{r = s+1}^{t} dt_r A) (C_t . B_s) dt_s x_s + D x_t``,
    ``dL/dx_s = dt_s sum_{t >= s} exp(sum_{r = s+1}^{t} dt_r A) (B_s . C_t) dL/dy_t + D dL/dy_s``: in reversed time
    ``t' = L - 1 - t`` this is the forward scan of the reversed gradient with ``C`` as the input matrix, ``B`` as the
    output matrix and the step sizes moved one position (the decay between ``s`` and ``t`` is that of the steps after
    ``s``). Nothing of the forward's chunked products is kept for the backward (autograd would keep every mixing
    matrix), and the backward is one forward scan.

    ``kernel`` (mamba-ssm's ``mamba_chunk_scan_combined``), where not None, computes both; it multiplies its input by
    the step size, so the reversed gradient is divided by the moved steps (at least ``SMALLEST_STEP``) and the scan
    runs in float32. Otherwise ``core`` does (:py:func:`_pytorch_ssd`, or the Triton SSD for CUDA float32), in the
    promoted dtype of ``x``.

    With the PyTorch core the map is linear in an ``initial_state`` ``S_{-1}`` too (a time block continuing the
    previous block's scan), and the last state ``S_{L-1}`` carries gradient: the transposed scan starts from the last
    state's gradient ``G`` (it enters ``dL/dx_s`` as ``dt_s exp(sum_{r = s+1}^{L-1} dt_r A) G B_s``), and its own last
    state ``Lambda_0 = sum_t exp(sum_{r = 1}^{t} dt_r A) dL/dy_t C_t^T + exp(sum_{r = 1}^{L-1} dt_r A) G`` gives
    ``dL/dS_{-1} = exp(dt_0 A) Lambda_0``. The other cores' last state has no gradient.
    '''

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, chunk_size, kernel, core, initial_state):
        ctx.chunk_size, ctx.kernel, ctx.core = chunk_size, kernel, core
        ctx.carries_state = kernel is None and core is _pytorch_ssd
        ctx.save_for_backward(x, dt, A, B, C, D)
        if kernel is None:
            outputs, state = _exact_ssd(core, x, dt, A, B, C, D, chunk_size, initial_state)
        else:
            outputs, state = _kernel_ssd(kernel, x, dt, A, B, C, D, chunk_size)
        if not ctx.carries_state:
            ctx.mark_non_differentiable(state)
        return outputs, state

    @staticmethod
    def backward(ctx, grad_outputs, grad_state):
        x, dt, A, B, C, D = ctx.saved_tensors
        heads = x.shape[2]
        dtype = torch.promote_types(x.dtype, torch.float32)
        dt, grad_outputs = dt.to(dtype), grad_outputs.to(dtype)
        grad_initial = None
        if ctx.kernel is None:
            # the log-step of position t + 1 (zero after the last); the core reverses time as it reads
            later_log_step = F.pad((dt * A.to(dtype))[:, 1:], (0, 0, 0, 1))
            grad_x, reversed_last = ctx.core(
                grad_outputs, later_log_step, C.to(dtype), B.to(dtype), ctx.chunk_size, output_scale=dt,
                skip=D.to(dtype), reverse=True, initial_state=grad_state.to(dtype) if ctx.carries_state else None)
            if ctx.needs_input_grad[9]:
                grad_initial = torch.exp(dt[:, 0] * A.to(dtype))[..., None, None] * reversed_last
        else:
            # the step of position t + 1 (any positive one after the last: it decays the reversed scan's zero state)
            later = F.pad(dt[:, 1:], (0, 0, 0, 1), value=1.0).clamp_min(SMALLEST_STEP)
            grad_x_dt = ctx.kernel(
                (grad_outputs / later[..., None]).flip(1).contiguous(), later.flip(1).contiguous(),
                A.float().contiguous(), *(matrix.float().flip(1).contiguous() for matrix in (C, B)), ctx.chunk_size,
            )
            grad_x = grad_x_dt.flip(1) * dt[..., None] + D.to(dtype).reshape(heads, -1) * grad_outputs
        grad_D = None
        if ctx.needs_input_grad[5]:
            per_channel = (grad_outputs * x.to(dtype)).sum((0, 1))              # (heads, head_dim)
            grad_D = (per_channel if D.dim() == 2 else per_channel.sum(-1)).to(D.dtype)
        return grad_x.to(x.dtype), None, None, None, None, grad_D, None, None, None, grad_initial


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    chunk_size: int = 256,
    implementation: str = 'auto',
    initial_state: Optional[torch.Tensor] = None,
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
        Positions per chunk of the matrix form (the model's; for a constant selection the PyTorch computation on the
        CPU takes at most ``CPU_CHUNK``, which changes rounding only).
    implementation : {'auto', 'torch', 'mamba_ssm'}, optional
        ``'auto'`` uses mamba-ssm's ``mamba_chunk_scan_combined`` for CUDA float16/bfloat16 tensors where mamba-ssm
        is installed. Its Triton matrix products round float32 inputs to TF32 (about 1e-3 relative error, measured
        on an H100), so CUDA float32 takes this package's Triton SSD (:py:mod:`~zennit_mamba.kernels.ssd_triton`,
        products exact to float32 rounding) where the selection is constant (MambaLRP's SSM rule, or no gradient taken),
        and the PyTorch computation otherwise, as every other device and dtype does; ``'torch'`` always takes the
        PyTorch computation; ``'mamba_ssm'`` asks for mamba-ssm's kernel anyway.
    initial_state : :py:obj:`torch.Tensor`, optional
        The state ``S_{-1}`` before the first position, ``(batch, heads, head_dim, state)`` (zero by default),
        differentiable; the PyTorch computation only (a scan continued from an earlier one, e.g. over time blocks).

    Returns
    -------
    tuple of :py:obj:`torch.Tensor`
        The outputs ``(batch, length, heads, head_dim)`` in the promoted dtype of ``x`` and float32, and the last
        state ``(batch, heads, head_dim, state)``: differentiable from the PyTorch computation (so that a continued
        scan passes gradient back), without gradient from the kernels.

    Examples
    --------
    >>> x, dt = torch.ones(1, 3, 1, 1), torch.ones(1, 3, 1)
    >>> B = C = torch.ones(1, 3, 1, 1)
    >>> y, _ = ssd_scan(x, dt, torch.tensor([-0.6931]), B, C, torch.zeros(1), chunk_size=2)
    >>> y.flatten()
    tensor([1.0000, 1.5000, 1.7500])
    '''
    check_initial_state(initial_state, implementation, 'mamba-ssm\'s mamba_chunk_scan_combined',
                        '(batch, heads, head_dim, state)', (x.shape[0], x.shape[2], x.shape[3], B.shape[-1]))
    kernel = mamba_ssm_chunk_scan()
    if initial_state is not None or not uses_kernel(kernel, x, implementation,
                                                    auto_dtypes=(torch.float16, torch.bfloat16)):
        kernel = None
    selection_constant = not (torch.is_grad_enabled() and any(tensor.requires_grad for tensor in (dt, A, B, C)))
    # the Triton SSD has no backward in the selection: it serves a constant one (forward and transposed scan)
    on_triton = (implementation == 'auto' and initial_state is None and selection_constant
                 and triton_ssd_applies(x, B.shape[-1]))
    core = triton_ssd if on_triton else _pytorch_ssd
    if torch.is_grad_enabled() and selection_constant:
        if x.device.type == 'cpu':
            chunk_size = min(chunk_size, CPU_CHUNK)  # the outputs do not depend on the chunk length
        return _LinearSSD.apply(x, dt, A, B, C, D, chunk_size, kernel, core, initial_state)
    if kernel is not None:
        return _kernel_ssd(kernel, x, dt, A, B, C, D, chunk_size)
    return _exact_ssd(core, x, dt, A, B, C, D, chunk_size, initial_state)


def _kernel_ssd(kernel, x, dt, A, B, C, D, chunk_size) -> Tuple[torch.Tensor, torch.Tensor]:
    outputs, state = kernel(
        x.contiguous(), dt.contiguous(), A.float().contiguous(), B.contiguous(), C.contiguous(), chunk_size,
        D=D.float().contiguous(), return_final_states=True,
    )
    return outputs.float(), state


class _HeldSelectionSSD(torch.autograd.Function):
    '''The SSD core with per-position log-steps and input scales for a constant selection (Mamba-3's trapezoidal
    form, :py:func:`held_selection_ssd`): a linear map of ``x``, whose backward is the transposed scan.

    With ``y_t = sum_{s <= t} exp(sum_{r = s+1}^{t} l_r) (C_t . B_s) w_s x_s + D x_t``,
    ``dL/dx_s = w_s sum_{t >= s} exp(sum_{r = s+1}^{t} l_r) (B_s . C_t) dL/dy_t + D dL/dy_s``: the same core run in
    reversed time on the gradient, ``C`` and ``B`` exchanged, the log-steps moved one position and ``w`` scaling the
    output (as :py:class:`_LinearSSD`).'''

    @staticmethod
    def forward(ctx, x, log_step, B, C, input_scale, skip, chunk_size, core):
        ctx.chunk_size, ctx.core = chunk_size, core
        ctx.save_for_backward(log_step, B, C, input_scale, skip)
        outputs, _ = core(x, log_step, B, C, chunk_size, input_scale=input_scale, skip=skip)
        return outputs

    @staticmethod
    def backward(ctx, grad_outputs):
        log_step, B, C, input_scale, skip = ctx.saved_tensors
        later_log_step = F.pad(log_step[:, 1:], (0, 0, 0, 1))  # the core reverses time as it reads
        grad_x, _ = ctx.core(grad_outputs.to(input_scale.dtype).contiguous(), later_log_step, C, B, ctx.chunk_size,
                             output_scale=input_scale, skip=skip, reverse=True)
        return grad_x, None, None, None, None, None, None, None


def held_selection_ssd(x: torch.Tensor, log_step: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                       input_scale: torch.Tensor, skip: torch.Tensor, chunk_size: int = 64) -> torch.Tensor:
    '''``y_t = sum_{s <= t} exp(sum_{r = s+1}^{t} log_step_r) (C_t . B_s) input_scale_s x_s + skip x_t`` (the SSD
    with a log-step and an input scale per position and head, as Mamba-3's trapezoidal update has them), from a zero
    state, in the promoted dtype of ``x`` (float32 or wider).

    Where the selection (``log_step``, ``B``, ``C``, ``input_scale``) is constant (detached: MambaLRP's SSM rule) and a
    gradient is taken, the map is linear in ``x`` and its backward is the transposed scan (nothing of the forward kept),
    on CUDA float32 by this package's Triton SSD; otherwise autograd differentiates the PyTorch computation.

    ``x`` is ``(batch, length, heads, head_dim)``; ``log_step`` (non-positive) and ``input_scale`` ``(batch, length,
    heads)``; ``B`` and ``C`` ``(batch, length, groups, state)``; ``skip`` ``(heads,)``.

    Examples
    --------
    >>> x, ones = torch.ones(1, 3, 1, 1), torch.ones(1, 3, 1)
    >>> B = C = torch.ones(1, 3, 1, 1)
    >>> held_selection_ssd(x, ones * -0.6931, B, C, ones, torch.zeros(1), chunk_size=2).flatten()
    tensor([1.0000, 1.5000, 1.7500])
    '''
    dtype = torch.promote_types(x.dtype, torch.float32)
    x, log_step, B, C, input_scale, skip = (tensor.to(dtype) for tensor in (x, log_step, B, C, input_scale, skip))
    selection = (log_step, B, C, input_scale)
    if not (torch.is_grad_enabled() and x.requires_grad) or any(tensor.requires_grad for tensor in selection):
        return _pytorch_ssd(x, log_step, B, C, chunk_size, input_scale=input_scale, skip=skip)[0]
    core = triton_ssd if triton_ssd_applies(x, B.shape[-1]) else _pytorch_ssd
    if x.device.type == 'cpu':
        chunk_size = min(chunk_size, CPU_CHUNK)  # the outputs do not depend on the chunk length
    return _HeldSelectionSSD.apply(x, log_step.contiguous(), B, C, input_scale.contiguous(), skip, chunk_size, core)
