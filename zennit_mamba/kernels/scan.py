'''Vectorised selective scan in plain PyTorch, and the dispatch to mamba-ssm's CUDA kernel.

The recurrence ``s_t = a_t * s_{t-1} + b_t`` runs on time laid out as ``(chunk_length, num_chunks)``: position ``j``
of chunk ``m`` is time ``m * chunk_length + j``. One vectorised step advances every chunk at once, so a chunk of
at most ``MAX_CHUNK`` positions takes at most ``MAX_CHUNK`` steps whatever the sequence length; the states at the
chunk ends are carried across chunks by the same recurrence on the ``num_chunks`` chunk summaries, and added back
with the decay from each chunk's start. Only products and sums of decays ``<= 1`` are formed, so nothing
overflows, and every element is touched a few times (no ``log(length)`` factor of a parallel prefix scan).

:py:func:`selective_scan` is an autograd function that keeps no ``(batch, channels, state, length)`` tensor between
forward and backward: it works through channel blocks of bounded size, and its backward runs the transposed
(reverse-time) recurrence. When only ``x`` needs a gradient (the selection detached, as MambaLRP does), the states
are not recomputed in the backward pass.
'''
import math
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F

from zennit_mamba._optional import mamba_ssm_selective_scan

#: longest chunk; a chunk takes one vectorised step per position
MAX_CHUNK = 64
#: elements of one ``(batch, channels, state, length)`` block, per device type; bounds the scan's working memory
BLOCK_ELEMENTS = {'cpu': 2 ** 22, 'cuda': 2 ** 26}

IMPLEMENTATIONS = ('auto', 'torch', 'mamba_ssm')
#: the smallest step size a transposed scan run by a forward kernel divides by (the kernels multiply their input by
#: the step size): ``exp(2**-64 A)`` is 1 in float32, as for a step that underflowed to 0, for ``|A| < 2**40``
SMALLEST_STEP = 2.0 ** -64


def chunk_length(length: int) -> int:
    '''The chunk length for a sequence: about ``sqrt(length)`` (a power of two from 8 to MAX_CHUNK), at most
    ``length``.'''
    preferred = 2 ** round(math.log2(max(length, 1)) / 2)
    return min(length, max(8, min(MAX_CHUNK, preferred)))


def to_chunks(tensor: torch.Tensor, chunk: int, fill: float = 0.0) -> torch.Tensor:
    '''``(..., length)`` to the contiguous layout ``(..., chunk, num_chunks)``, the tail filled with ``fill``.'''
    length = tensor.shape[-1]
    num_chunks = -(-length // chunk)
    padded = F.pad(tensor, (0, num_chunks * chunk - length), value=fill) if num_chunks * chunk > length else tensor
    return padded.unflatten(-1, (num_chunks, chunk)).transpose(-1, -2).contiguous()


def from_chunks(tensor: torch.Tensor, length: int) -> torch.Tensor:
    '''Inverse of :py:func:`to_chunks`.'''
    return tensor.transpose(-1, -2).flatten(-2)[..., :length]


def _recurrence_in_chunks_(decay: torch.Tensor, drive: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    '''Overwrite ``drive`` (chunk layout) with the states of ``s = decay * s_previous + drive``.

    ``decay`` is left unchanged. Padded tail positions must have decay 1 and drive 0.
    '''
    chunk, num_chunks = drive.shape[-2], drive.shape[-1]
    positions = range(chunk - 1, -1, -1) if reverse else range(chunk)
    previous = None
    if num_chunks > 1:
        # each chunk's own contribution to the state at its far end (a small running tensor), and its total decay
        local = torch.zeros_like(drive[..., 0, :])
        for position in positions:
            torch.addcmul(drive[..., position, :], local, decay[..., position, :], out=local)
        carried = _recurrence(decay.prod(-2), local, reverse)
        # the state entering each chunk is the one leaving its neighbour
        previous = F.pad(carried[..., 1:], (0, 1)) if reverse else F.pad(carried[..., :-1], (1, 0))
    for position in positions:
        if previous is not None:
            drive[..., position, :].addcmul_(decay[..., position, :], previous)
        previous = drive[..., position, :]
    return drive


def _recurrence(decay: torch.Tensor, drive: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    '''States of ``s = decay * s_previous + drive`` along the last dimension.'''
    length = drive.shape[-1]
    chunk = chunk_length(length)
    states = _recurrence_in_chunks_(to_chunks(decay, chunk, fill=1.0), to_chunks(drive, chunk), reverse)
    return from_chunks(states, length)


def linear_recurrence(log_a: torch.Tensor, b: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    '''Solve ``s_t = exp(log_a_t) * s_{t-1} + b_t`` with ``s_{-1} = 0`` along the last dimension.

    Parameters
    ----------
    log_a : :py:obj:`torch.Tensor`
        Log-decays, non-positive, of shape ``(..., length)``.
    b : :py:obj:`torch.Tensor`
        Inputs of the same shape.
    reverse : bool, optional
        Run backwards in time: ``s_t = exp(log_a_t) * s_{t+1} + b_t`` with ``s_length = 0``.

    Returns
    -------
    :py:obj:`torch.Tensor`
        The states ``s`` of shape ``(..., length)``.

    Examples
    --------
    >>> log_a, b = torch.log(torch.tensor([0.5, 0.5, 0.5])), torch.tensor([1.0, 1.0, 1.0])
    >>> linear_recurrence(log_a, b)
    tensor([1.0000, 1.5000, 1.7500])
    '''
    return _recurrence(torch.exp(log_a), b, reverse)


def _channel_blocks(batch: int, channels: int, state_size: int, length: int, device: torch.device) -> List[slice]:
    per_channel = max(1, batch * state_size * length)
    size = max(1, BLOCK_ELEMENTS.get(device.type, BLOCK_ELEMENTS['cuda']) // per_channel)
    return [slice(start, min(start + size, channels)) for start in range(0, channels, size)]


class _Workspace:
    '''Two buffers for the ``(batch, channels, state, chunk, num_chunks)`` tensors of a scan's channel blocks (decays
    and states), allocated once per call for the largest block and reused by each: on a CPU, the allocator may return
    freed memory of this size to the system, and a fresh allocation then costs a page fault per 4 KiB.'''

    def __init__(self, like: torch.Tensor, shape: Tuple[int, ...]):
        self._decay, self._states = like.new_empty(math.prod(shape)), like.new_empty(math.prod(shape))

    def take(self, shape: Tuple[int, ...]) -> Tuple[torch.Tensor, torch.Tensor]:
        count = math.prod(shape)
        return self._decay[:count].view(shape), self._states[:count].view(shape)


def _block_shape(x_: torch.Tensor, A: torch.Tensor) -> Tuple[int, ...]:
    '''The shape of a scan's states for inputs ``x_`` in the chunk layout and state matrix ``A``.'''
    batch, channels, chunk, num_chunks = x_.shape
    return batch, channels, A.shape[1], chunk, num_chunks


class _SelectiveScan(torch.autograd.Function):
    '''``y_t = C_t . s_t + D x_t`` with ``s_t = exp(delta_t A) s_{t-1} + delta_t B_t x_t``, in channel blocks.

    Takes and returns ``(batch, channels | state, length)`` tensors of any strides. Each channel block is laid out in
    chunks on its own, so that besides the results no tensor of the inputs' full size is allocated: on a CPU, a
    fresh allocation above the allocator's mapping threshold (32 MiB in glibc) costs a page fault per 4 KiB, which
    made long inputs slower per token than short ones.
    '''

    @staticmethod
    def forward(ctx, x, delta, A, B, C, D, initial_state):
        batch, channels, length = x.shape
        chunk = chunk_length(length)
        B_, C_ = to_chunks(B, chunk), to_chunks(C, chunk)
        output = x.new_empty(batch, channels, length)
        last_state = x.new_empty(batch, channels, A.shape[1])
        last = (length - 1) % chunk, (length - 1) // chunk
        workspace = None
        for block in _channel_blocks(batch, channels, A.shape[1], length, x.device):
            x_, delta_ = to_chunks(x[:, block], chunk), to_chunks(delta[:, block], chunk)
            shape = _block_shape(x_, A)
            workspace = workspace or _Workspace(x, shape)  # the first block is the largest
            decay, states = workspace.take(shape)
            _states(x_, delta_, A[block], B_, decay, states,
                    None if initial_state is None else initial_state[:, block])
            # the decays are spent: their buffer takes the products with C
            output_ = torch.mul(states, C_[:, None], out=decay).sum(2)
            output[:, block] = _with_skip(from_chunks(output_, length), D, block, x)
            last_state[:, block] = states[..., last[0], last[1]]
        ctx.save_for_backward(x, delta, A, B, C, D, initial_state)
        return output, last_state

    @staticmethod
    def backward(ctx, grad_output, grad_last_state):
        x, delta, A, B, C, D, initial_state = ctx.saved_tensors
        needs_x, needs_delta, needs_A, needs_B, needs_C, needs_D, needs_initial = ctx.needs_input_grad
        selection = needs_delta or needs_A or needs_B or needs_C
        batch, channels, length = x.shape
        chunk = chunk_length(length)
        B_, C_ = to_chunks(B, chunk), to_chunks(C, chunk)
        grad_x = x.new_empty(batch, channels, length) if needs_x or selection or needs_initial else None
        grad_initial = torch.empty_like(initial_state) if needs_initial else None
        last = (length - 1) % chunk, (length - 1) // chunk
        grad_delta = torch.empty_like(grad_x) if selection else None
        grad_A = torch.empty_like(A) if selection else None
        grad_B = torch.zeros_like(B_) if selection else None
        grad_C = torch.zeros_like(C_) if selection else None
        grad_D = torch.empty_like(D) if D is not None and needs_D else None
        workspace = None
        for block in _channel_blocks(batch, channels, A.shape[1], length, x.device):
            A_block, grad_output_block = A[block], grad_output[:, block]
            if grad_D is not None:
                grad_D[block] = (grad_output_block * x[:, block]).sum((0, 2))
            if grad_x is None:
                continue
            delta_block, grad_output_ = to_chunks(delta[:, block], chunk), to_chunks(grad_output_block, chunk)
            # the transposed recurrence runs backwards in time and decays by the *next* step's factor
            next_delta = to_chunks(F.pad(delta[:, block, 1:], (0, 1)), chunk)
            shape = _block_shape(delta_block, A)
            workspace = workspace or _Workspace(x, shape)
            decay, grad_states = workspace.take(shape)
            torch.mul(grad_output_[:, :, None], C_[:, None], out=grad_states)
            # the last state's own gradient joins the transposed recurrence where it starts, at the last position
            grad_states[..., last[0], last[1]] += grad_last_state[:, block]
            _recurrence_in_chunks_(_decay(next_delta, A_block, out=decay), grad_states, reverse=True)
            if grad_initial is not None:
                # s_0 = exp(delta_0 A) h + drive_0
                grad_initial[:, block] = torch.exp(delta[:, block, 0, None] * A_block) * grad_states[..., 0, 0]
            grad_drive = torch.mul(grad_states, B_[:, None], out=decay).sum(2)
            grad_x[:, block] = _with_skip(from_chunks(delta_block * grad_drive, length), D, block, grad_output)
            if selection:
                x_block = to_chunks(x[:, block], chunk)
                delta_x = delta_block * x_block
                drive = delta_x[:, :, None] * B_[:, None]
                states = _states(x_block, delta_block, A_block, B_, torch.empty_like(drive), torch.empty_like(drive),
                                 None if initial_state is None else initial_state[:, block])
                grad_C.add_((states * grad_output_[:, :, None]).sum(1))
                grad_B.add_((grad_states * delta_x[:, :, None]).sum(1))
                # d s_t / d log_a_t = exp(log_a_t) s_{t-1} = s_t - drive_t (s_{-1} the initial state)
                grad_log_a = grad_states.mul_(states.sub_(drive))
                grad_delta[:, block] = from_chunks(
                    (grad_log_a * A_block[None, :, :, None, None]).sum(2) + grad_drive * x_block, length)
                grad_A[block] = (grad_log_a * delta_block[:, :, None]).sum((0, 3, 4))
        if selection:
            grad_B, grad_C = (from_chunks(tensor, length) for tensor in (grad_B, grad_C))
        return grad_x if needs_x else None, grad_delta, grad_A, grad_B, grad_C, grad_D, grad_initial


def _with_skip(y: torch.Tensor, D: Optional[torch.Tensor], block: slice, x: torch.Tensor) -> torch.Tensor:
    '''``y + D x`` on one channel block (``y`` alone without ``D``).'''
    return y if D is None else y.addcmul(D[None, block, None], x[:, block])


def _decay(delta: torch.Tensor, A: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    '''Decays ``exp(delta A)`` of shape ``(batch, channels, state, chunk, num_chunks)`` from ``delta`` in the chunk
    layout (into ``out``, if given).'''
    return torch.mul(delta[:, :, None], A[None, :, :, None, None], out=out).exp_()


def _with_initial_state(drive: torch.Tensor, decay: torch.Tensor,
                        initial_state: Optional[torch.Tensor]) -> torch.Tensor:
    '''``drive`` (chunk layout) with the initial state's share of the first state added in place, ``s_0 = a_0 h +
    drive_0`` (unchanged where ``initial_state``, of the block's channels, is None).'''
    if initial_state is not None:
        drive[..., 0, 0].addcmul_(decay[..., 0, 0], initial_state)
    return drive


def _states(x, delta, A, B, decay: torch.Tensor, states: torch.Tensor,
            initial_state: Optional[torch.Tensor] = None) -> torch.Tensor:
    '''Scan states ``(batch, channels, state, chunk, num_chunks)`` from inputs in the chunk layout, written to
    ``states``, with the decays written to ``decay``; from ``initial_state`` (this block's channels) where given.'''
    torch.mul((delta * x)[:, :, None], B[:, None], out=states)
    return _recurrence_in_chunks_(decay, _with_initial_state(states, _decay(delta, A, out=decay), initial_state))


def check_initial_state(initial_state: Optional[torch.Tensor], implementation: str, kernel: str, layout: str,
                        expected: Tuple[int, ...]) -> None:
    '''Refuse an ``initial_state`` that a scan cannot start from: with ``implementation='mamba_ssm'`` (``kernel``
    starts from a zero state), or of a shape other than ``expected`` (its dimensions named by ``layout``).

    Examples
    --------
    >>> check_initial_state(torch.zeros(1, 2), 'torch', 'a kernel', '(batch, channels)', (1, 3))
    Traceback (most recent call last):
    ...
    ValueError: initial_state must have the shape (batch, channels) = (1, 3), got (1, 2).
    '''
    if initial_state is None:
        return
    if implementation == 'mamba_ssm':
        raise ValueError(f'{kernel} takes no initial state: a scan from an initial state runs in PyTorch; use '
                         f'implementation=\'torch\'.')
    if tuple(initial_state.shape) != expected:
        raise ValueError(f'initial_state must have the shape {layout} = {expected}, got {tuple(initial_state.shape)}.')


def uses_kernel(
    kernel: Optional[Callable],
    x: torch.Tensor,
    implementation: str,
    auto_dtypes: Tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16),
) -> bool:
    '''Whether a scan runs mamba-ssm's ``kernel`` (None where not installed) on ``x`` for ``implementation``.

    ``'auto'`` uses it for CUDA tensors of ``auto_dtypes``; ``'mamba_ssm'`` requires it (any dtype but float64);
    ``'torch'`` never uses it.
    '''
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f'implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}')
    applies = kernel is not None and x.is_cuda and x.dtype != torch.float64
    if implementation == 'mamba_ssm' and not applies:
        raise RuntimeError('The mamba_ssm scan needs mamba-ssm installed and CUDA tensors in float32/16.')
    return applies and (implementation == 'mamba_ssm' or (implementation == 'auto' and x.dtype in auto_dtypes))


def selective_scan(
    x: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    implementation: str = 'auto',
    initial_state: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    '''Mamba-1 selective scan ``y_t = C_t . s_t + D x_t``, ``s_t = exp(delta_t A) s_{t-1} + delta_t B_t x_t``.

    Computed in float32 or wider, whatever the input precision, and returned in the dtype of ``x``. Differentiable
    in every input; gradients are computed only for the inputs that need them.

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
    implementation : str, optional
        ``'torch'`` for the chunked scan above, ``'mamba_ssm'`` for mamba-ssm's CUDA kernel (``selective_scan_fn``),
        ``'auto'`` for the kernel where it applies (mamba-ssm installed, CUDA tensors, not float64, no initial
        state), else torch.
    initial_state : :py:obj:`torch.Tensor`, optional
        ``s_{-1}`` of shape ``(batch, channels, state_size)`` (zero by default), differentiable; the torch
        implementation only (a scan continued from an earlier one, e.g. over time blocks).

    Returns
    -------
    tuple[:py:obj:`torch.Tensor`, :py:obj:`torch.Tensor`]
        Outputs ``y`` shaped like ``x``, and the last state of shape ``(batch, channels, state_size)`` in float32 or
        wider: differentiable from the torch implementation (so that a continued scan passes gradient back), without
        gradient from mamba-ssm's kernel.

    Examples
    --------
    >>> x, delta = torch.randn(1, 4, 10), torch.rand(1, 4, 10)
    >>> A, B, C = -torch.rand(4, 3), torch.randn(1, 3, 10), torch.randn(1, 3, 10)
    >>> y, last_state = selective_scan(x, delta, A, B, C)
    >>> y.shape, last_state.shape
    (torch.Size([1, 4, 10]), torch.Size([1, 4, 3]))
    '''
    kernel = mamba_ssm_selective_scan()
    check_initial_state(initial_state, implementation, 'mamba-ssm\'s selective_scan_fn',
                        '(batch, channels, state_size)', (x.shape[0], x.shape[1], A.shape[1]))
    if initial_state is None and uses_kernel(kernel, x, implementation):
        output, last_state = kernel(x, delta, A.float(), B, C, None if D is None else D.float(), return_last_state=True)
        return output.to(x.dtype), last_state.detach().float()

    dtype = torch.promote_types(x.dtype, torch.float32)
    # any strides: each channel block is copied into the chunk layout on its own
    output, last_state = _SelectiveScan.apply(
        *(tensor.to(dtype) for tensor in (x, delta, A, B, C)), None if D is None else D.to(dtype),
        None if initial_state is None else initial_state.to(dtype),
    )
    return output.to(x.dtype), last_state
