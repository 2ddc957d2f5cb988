'''The vectorised scan against a per-timestep loop.'''
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from zennit_mamba.kernels import scan
from zennit_mamba.kernels.scan import linear_recurrence, selective_scan


def sequential_scan(x, delta, A, B, C, D, initial_state=None):
    state = torch.zeros(x.shape[0], x.shape[1], A.shape[1], dtype=x.dtype) if initial_state is None else initial_state
    outputs = []
    for t in range(x.shape[-1]):
        state = torch.exp(delta[..., t, None] * A) * state + (delta[..., t] * x[..., t])[..., None] * B[:, None, :, t]
        outputs.append((state * C[:, None, :, t]).sum(-1) + D * x[..., t])
    return torch.stack(outputs, -1), state


def random_inputs(length, dtype, channels=5, state=4, batch=2, step_scale=3.0, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.rand(*shape, generator=generator, dtype=dtype)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype)

    return (
        randn(batch, channels, length), step_scale * rand(batch, channels, length), -16 * rand(channels, state),
        randn(batch, state, length), randn(batch, state, length), randn(channels),
    )


@pytest.mark.parametrize('length', [1, 2, 5, 31, 32, 33, 100, 1025])
@pytest.mark.parametrize('dtype, tolerance', [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_matches_sequential_scan(length, dtype, tolerance):
    inputs = random_inputs(length, dtype)
    output, last_state = selective_scan(*inputs)
    expected, expected_state = sequential_scan(*(tensor.double() for tensor in inputs))
    assert output.dtype == dtype
    assert (output.double() - expected).abs().max() <= tolerance * expected.abs().max()
    assert (last_state.double() - expected_state).abs().max() <= tolerance * expected_state.abs().max()


def sequential_recurrence(log_a, b, reverse=False):
    steps = range(b.shape[-1] - 1, -1, -1) if reverse else range(b.shape[-1])
    state, states = torch.zeros_like(b[..., 0]), [None] * b.shape[-1]
    for t in steps:
        state = torch.exp(log_a[..., t]) * state + b[..., t]
        states[t] = state
    return torch.stack(states, -1)


@pytest.mark.parametrize('reverse', [False, True])
@pytest.mark.parametrize('decay_scale', [0.01, 1.0, 40.0])
def test_recurrence_matches_the_loop_in_both_directions(reverse, decay_scale):
    # decay_scale 40 forces chunks of two steps and several levels of carried chunk states
    generator = torch.Generator().manual_seed(0)
    log_a = -decay_scale * torch.rand(3, 700, generator=generator, dtype=torch.float64)
    b = torch.randn(3, 700, generator=generator, dtype=torch.float64)
    expected = sequential_recurrence(log_a, b, reverse)
    assert relative(linear_recurrence(log_a, b, reverse), expected) < 1e-12


def relative(actual, expected):
    # an all-zero expectation (the gradient of A at length 1) is compared in absolute terms
    scale = expected.abs().max()
    return ((actual.double() - expected).abs().max() / (scale if scale > 0 else 1)).item()


@pytest.mark.parametrize('length', [1, 3, 64, 65, 300])
@pytest.mark.parametrize('selection_detached', [False, True])
def test_gradients_match_autograd_through_the_loop(length, selection_detached):
    inputs = [tensor.requires_grad_() for tensor in random_inputs(length, torch.float64)]
    grad_output = torch.randn(2, 5, length, dtype=torch.float64)
    x, delta, A, B, C, D = inputs
    if selection_detached:
        delta, A, B, C = (tensor.detach() for tensor in (delta, A, B, C))
    arguments = (x, delta, A, B, C, D)
    wanted = [tensor for tensor in arguments if tensor.requires_grad]
    actual = torch.autograd.grad(selective_scan(*arguments)[0], wanted, grad_output)
    expected = torch.autograd.grad(sequential_scan(*arguments)[0], wanted, grad_output)
    assert len(wanted) == (2 if selection_detached else 6)
    for got, want in zip(actual, expected):
        assert relative(got, want) < 1e-10


@pytest.mark.parametrize('length', [1, 3, 65])
@pytest.mark.parametrize('selection_detached', [False, True])
@pytest.mark.parametrize('channels_per_block', [2, 5])
def test_a_scan_continued_from_a_state_passes_gradient_to_it_and_from_its_last_state(
        length, selection_detached, channels_per_block, monkeypatch):
    # as the time blocks of a mixer: every input, the initial state among them, gets the loop's gradient of a loss
    # that reads both the outputs and the last state
    monkeypatch.setitem(scan.BLOCK_ELEMENTS, 'cpu', channels_per_block * 2 * 4 * length)
    inputs = [tensor.requires_grad_() for tensor in random_inputs(length, torch.float64)]
    generator = torch.Generator().manual_seed(length)
    initial = torch.randn(2, 5, 4, generator=generator, dtype=torch.float64).requires_grad_()
    grad_output, grad_last = torch.randn(2, 5, length, dtype=torch.float64), torch.randn(2, 5, 4, dtype=torch.float64)
    x, delta, A, B, C, D = inputs
    if selection_detached:
        delta, A, B, C = (tensor.detach() for tensor in (delta, A, B, C))
    arguments = (x, delta, A, B, C, D)
    wanted = [tensor for tensor in arguments if tensor.requires_grad] + [initial]
    output, last = selective_scan(*arguments, initial_state=initial)
    expected_output, expected_last = sequential_scan(*arguments, initial_state=initial)
    assert relative(output, expected_output) < 1e-12 and relative(last, expected_last) < 1e-12
    actual = torch.autograd.grad((output, last), wanted, (grad_output, grad_last))
    expected = torch.autograd.grad((expected_output, expected_last), wanted, (grad_output, grad_last))
    for got, want in zip(actual, expected):
        assert relative(got, want) < 1e-10


def test_channel_blocks_do_not_change_the_result(monkeypatch):
    inputs = [tensor.requires_grad_() for tensor in random_inputs(50, torch.float64, channels=7)]
    output, last_state = selective_scan(*inputs)
    gradients = torch.autograd.grad(output.sum(), inputs)
    monkeypatch.setitem(scan.BLOCK_ELEMENTS, 'cpu', 1)  # one channel per block
    blocked_output, blocked_state = selective_scan(*inputs)
    blocked_gradients = torch.autograd.grad(blocked_output.sum(), inputs)
    # the chunk length follows the decays of each block, so results agree to rounding, not bit for bit
    assert torch.allclose(blocked_output, output, rtol=1e-12) and torch.allclose(blocked_state, last_state, rtol=1e-12)
    for blocked, whole in zip(blocked_gradients, gradients):
        assert torch.allclose(blocked, whole, rtol=1e-12, atol=1e-12)


class _Allocations(TorchDispatchMode):
    """Counts the tensors of at least ``elements`` elements that operations create (no views, no in-place or out=)."""

    def __init__(self, elements: int):
        super().__init__()
        self.elements, self.count = elements, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        arguments = {value.untyped_storage().data_ptr() for value in tree_flatten((args, kwargs))[0]
                     if isinstance(value, torch.Tensor)}
        # views and in-place results share an argument's storage
        self.count += sum(1 for value in tree_flatten(result)[0] if isinstance(value, torch.Tensor)
                          and value.untyped_storage().data_ptr() not in arguments and value.numel() >= self.elements)
        return result


def test_channel_blocks_allocate_nothing_of_full_size_but_the_results_and_two_buffers(monkeypatch):
    # on a CPU each fresh allocation of a long input's size costs page faults: only the scan's output, the input
    # gradient and, each way, the two buffers every channel block reuses may be that large
    batch, channels, state, length = 2, 8, 4, 64
    monkeypatch.setitem(scan.BLOCK_ELEMENTS, 'cpu', 2 * batch * state * length)  # two channels per block
    x, delta, A, B, C, D = random_inputs(length, torch.float64, channels=channels, state=state, batch=batch)
    x.requires_grad_()
    gradient = torch.ones(batch, channels, length, dtype=torch.float64)
    with _Allocations(x.numel()) as allocations:  # the size of a block's states: x.numel() here
        output, _ = selective_scan(x, delta, A, B, C, D)
        torch.autograd.grad(output, x, gradient)
    assert allocations.count <= 6


def test_unknown_or_unavailable_implementation_is_refused():
    inputs = random_inputs(4, torch.float32)
    with pytest.raises(ValueError, match='implementation must be one of'):
        selective_scan(*inputs, implementation='triton')
    with pytest.raises(RuntimeError, match='needs mamba-ssm installed and CUDA tensors'):
        selective_scan(*inputs, implementation='mamba_ssm')
    with pytest.raises(ValueError, match='takes no initial state'):
        selective_scan(*inputs, implementation='mamba_ssm', initial_state=torch.zeros(2, 5, 4))
    # a state broadcast over the batch would be silently wrong in the backward: refused
    with pytest.raises(ValueError, match=r'initial_state must have the shape .* \(2, 5, 4\), got \(1, 5, 4\)'):
        selective_scan(*inputs, initial_state=torch.zeros(1, 5, 4))


def test_strong_decay_stays_finite():
    # exp(-sum log_a) over a chunk would overflow here; the scan only forms decays <= 1
    inputs = random_inputs(300, torch.float32, step_scale=50.0)
    output, _ = selective_scan(*inputs)
    expected, _ = sequential_scan(*(tensor.double() for tensor in inputs))
    assert torch.isfinite(output).all()
    assert (output.double() - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_half_precision_inputs_accumulate_in_float32():
    inputs = random_inputs(64, torch.float32)
    output, last_state = selective_scan(*(tensor.bfloat16() for tensor in inputs))
    expected, _ = sequential_scan(*(tensor.bfloat16().double() for tensor in inputs))
    assert output.dtype == torch.bfloat16 and last_state.dtype == torch.float32
    assert (output.double() - expected).abs().max() <= 1e-2 * expected.abs().max()


def sequential_ssd(x, dt, A, B, C, D, initial_state=None):
    '''Mamba-2's recurrence step by step: S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T, y_t = S_t C_t + D x_t (B and C
    one per head or shared; D per head or per channel), from S_{-1} = initial_state (zero by default).'''
    batch, length, heads, head_dim = x.shape
    B, C = (matrix[:, :, None].expand(-1, -1, heads, -1) if matrix.dim() == 3 else matrix for matrix in (B, C))
    D = D.reshape(heads, -1)
    state = torch.zeros(batch, heads, head_dim, B.shape[-1], dtype=x.dtype) if initial_state is None else initial_state
    outputs = []
    for t in range(length):
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]
        state = decay * state + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        outputs.append((state * C[:, t, :, None, :]).sum(-1) + D * x[:, t])
    return torch.stack(outputs, 1), state


@pytest.mark.parametrize('whole_block', [True, False])
def test_ssd_matches_the_recurrence_with_chunks_in_blocks_or_all_at_once(whole_block, monkeypatch):
    '''The PyTorch SSD (70 positions, chunks of 16) equals the step-by-step recurrence, whether its within-chunk
    products run over all chunks at once or one chunk per block.'''
    from zennit_mamba.kernels.ssd import ssd_scan

    if not whole_block:
        monkeypatch.setitem(scan.BLOCK_ELEMENTS, 'cpu', 1)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 70, 3, 4, generator=generator, dtype=torch.float64)
    dt = torch.rand(2, 70, 3, generator=generator, dtype=torch.float64)
    A = -2 * torch.rand(3, generator=generator, dtype=torch.float64)
    B, C = (torch.randn(2, 70, 1, 5, generator=generator, dtype=torch.float64) for _ in range(2))
    D = torch.randn(3, generator=generator, dtype=torch.float64)
    outputs, state = ssd_scan(x, dt, A, B, C, D, chunk_size=16, implementation='torch')
    expected, expected_state = sequential_ssd(x, dt, A, B[:, :, 0], C[:, :, 0], D)
    torch.testing.assert_close(outputs, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state, expected_state, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('skip_per_channel', [False, True])
@pytest.mark.parametrize('whole_block', [True, False])
def test_ssd_backward_for_a_constant_selection_is_the_transposed_scan(skip_per_channel, whole_block, monkeypatch):
    '''With dt, A, B, C detached (the SSM rule) the SSD's backward is its own transposed scan, not autograd through
    the chunks: its gradients in x and D equal autograd's through the step-by-step recurrence (two groups of B and C
    for four heads, 70 positions in chunks of 16, the skip per head or per channel).'''
    from zennit_mamba.kernels import ssd

    if not whole_block:
        monkeypatch.setitem(scan.BLOCK_ELEMENTS, 'cpu', 1)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 70, 4, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    dt = torch.rand(2, 70, 4, generator=generator, dtype=torch.float64)
    A = -2 * torch.rand(4, generator=generator, dtype=torch.float64)
    B, C = (torch.randn(2, 70, 2, 5, generator=generator, dtype=torch.float64) for _ in range(2))
    D = torch.randn(*((4, 3) if skip_per_channel else (4,)), generator=generator, dtype=torch.float64,
                    requires_grad=True)
    outputs, _ = ssd.ssd_scan(x, dt, A, B, C, D, chunk_size=16, implementation='torch')
    assert outputs.grad_fn.name().startswith('_LinearSSD')
    expected, _ = sequential_ssd(x, dt, A, B.repeat_interleave(2, 2), C.repeat_interleave(2, 2), D)
    grad_outputs = torch.randn(outputs.shape, generator=generator, dtype=torch.float64)
    actual = torch.autograd.grad(outputs, (x, D), grad_outputs)
    wanted = torch.autograd.grad(expected, (x, D), grad_outputs)
    for got, want in zip(actual, wanted):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('length', [1, 13, 70])
@pytest.mark.parametrize('selection_detached', [False, True])
def test_an_ssd_continued_from_a_state_passes_gradient_to_it_and_from_its_last_state(length, selection_detached):
    '''As the time blocks of a Mamba-2 mixer: every input, the initial state among them, gets the recurrence's
    gradient of a loss that reads both the outputs and the last state, through the transposed scan (the selection
    detached, the SSM rule) or autograd through the chunks (chunks of 16: one partial, one, several and a tail).'''
    from zennit_mamba.kernels.ssd import ssd_scan

    generator = torch.Generator().manual_seed(length)
    x = torch.randn(2, length, 4, 3, generator=generator, dtype=torch.float64)
    dt = torch.rand(2, length, 4, generator=generator, dtype=torch.float64)
    A = -2 * torch.rand(4, generator=generator, dtype=torch.float64)
    B, C = (torch.randn(2, length, 2, 5, generator=generator, dtype=torch.float64) for _ in range(2))
    D = torch.randn(4, generator=generator, dtype=torch.float64)
    initial = torch.randn(2, 4, 3, 5, generator=generator, dtype=torch.float64)
    inputs = [tensor.requires_grad_() for tensor in (x, dt, A, B, C, D, initial)]
    x, dt, A, B, C, D, initial = inputs
    if selection_detached:
        dt, A, B, C = (tensor.detach() for tensor in (dt, A, B, C))
    wanted = [tensor for tensor in (x, dt, A, B, C, D, initial) if tensor.requires_grad]
    outputs, last = ssd_scan(x, dt, A, B, C, D, chunk_size=16, initial_state=initial)
    assert outputs.grad_fn.name().startswith('_LinearSSD') == selection_detached
    expected, expected_last = sequential_ssd(
        x, dt, A, *(matrix.repeat_interleave(2, 2) for matrix in (B, C)), D, initial_state=initial)
    torch.testing.assert_close(outputs, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(last, expected_last, rtol=1e-10, atol=1e-12)
    grad_outputs = torch.randn(outputs.shape, generator=generator, dtype=torch.float64)
    grad_last = torch.randn(last.shape, generator=generator, dtype=torch.float64)
    actual = torch.autograd.grad((outputs, last), wanted, (grad_outputs, grad_last))
    expected = torch.autograd.grad((expected, expected_last), wanted, (grad_outputs, grad_last))
    for got, want in zip(actual, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_an_ssd_from_an_initial_state_refuses_the_kernels_and_a_wrong_shape():
    from zennit_mamba.kernels import ssd, ssd_triton

    x, dt, B, C = torch.ones(2, 3, 4, 2), torch.ones(2, 3, 4), torch.ones(2, 3, 1, 5), torch.ones(2, 3, 1, 5)
    A, D = -torch.ones(4), torch.zeros(4)
    with pytest.raises(ValueError, match='from an initial state runs in PyTorch'):
        ssd.ssd_scan(x, dt, A, B, C, D, implementation='mamba_ssm', initial_state=torch.zeros(2, 4, 2, 5))
    # a state broadcast over the batch would be silently wrong in the backward: refused
    with pytest.raises(ValueError, match=r'initial_state must have the shape .* \(2, 4, 2, 5\), got \(1, 4, 2, 5\)'):
        ssd.ssd_scan(x, dt, A, B, C, D, initial_state=torch.zeros(1, 4, 2, 5))
    with pytest.raises(ValueError, match='The Triton SSD starts from a zero state'):
        ssd_triton.triton_ssd(x, dt, B, C, 2, initial_state=torch.zeros(2, 4, 2, 5))


@pytest.fixture
def interpreted_triton(monkeypatch):
    '''The Triton SSD's kernels built by Triton's interpreter (``TRITON_INTERPRET=1``): they run on the CPU.'''
    triton = pytest.importorskip('triton')
    from zennit_mamba.kernels import ssd_triton

    if tuple(int(part) for part in triton.__version__.split('.')[:2]) < (3, 8):
        # seen with Triton 3.6 and NumPy 2: its interpreter cannot take a loop bound passed as an argument
        pytest.skip('Triton\'s interpreter before 3.8 fails on loop bounds passed as arguments')
    monkeypatch.setenv('TRITON_INTERPRET', '1')
    ssd_triton.triton_ssd_kernels.cache_clear()
    yield ssd_triton
    ssd_triton.triton_ssd_kernels.cache_clear()


@pytest.mark.parametrize('batch, length, heads, groups, head_dim, state, chunk', [
    (2, 70, 4, 2, 3, 5, 16),        # tiles larger than every size: all masked
    (1, 300, 2, 1, 70, 100, 128),   # two head-dim tiles, a masked state tile, chunks of two time tiles, a padded tail
])
def test_triton_ssd_forward_and_transposed_scan_match_the_recurrence(
        interpreted_triton, batch, length, heads, groups, head_dim, state, chunk):
    '''The Triton SSD (interpreted on the CPU, float32), as the forward and as the transposed scan of the SSM rule's
    backward, equals the step-by-step recurrence and autograd through it (float64 on the float32-rounded inputs).'''
    from zennit_mamba.kernels import ssd

    generator = torch.Generator().manual_seed(2)
    x = torch.randn(batch, length, heads, head_dim, generator=generator).requires_grad_()
    dt = torch.rand(batch, length, heads, generator=generator)
    A = -2 * torch.rand(heads, generator=generator)
    B, C = (torch.randn(batch, length, groups, state, generator=generator) for _ in range(2))
    D = torch.randn(heads, generator=generator)
    outputs, last_state = ssd._LinearSSD.apply(x, dt, A, B, C, D, chunk, None, interpreted_triton.triton_ssd, None)
    x64 = x.detach().double().requires_grad_()
    expected, expected_state = sequential_ssd(
        x64, dt.double(), A.double(), *(matrix.double().repeat_interleave(heads // groups, 2) for matrix in (B, C)),
        D.double())
    grad_outputs = torch.randn(outputs.shape, generator=generator)
    gradient, = torch.autograd.grad(outputs, x, grad_outputs)
    expected_gradient, = torch.autograd.grad(expected, x64, grad_outputs.double())
    for got, want in ((outputs, expected), (last_state, expected_state), (gradient, expected_gradient)):
        assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()
