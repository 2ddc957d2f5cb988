'''The vectorised scan against a per-timestep loop.'''
import pytest
import torch

from zennit_mamba.scan import linear_recurrence, selective_scan


def sequential_scan(x, delta, A, B, C, D):
    state = torch.zeros(x.shape[0], x.shape[1], A.shape[1], dtype=x.dtype)
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


@pytest.mark.parametrize('chunk_size', [2, 7, 64])
def test_chunk_size_does_not_change_the_result(chunk_size):
    log_a = -torch.rand(3, 200, dtype=torch.float64)
    b = torch.randn(3, 200, dtype=torch.float64)
    assert torch.allclose(linear_recurrence(log_a, b, chunk_size), linear_recurrence(log_a, b, 200), rtol=1e-12)


def test_chunk_size_below_two_is_refused():
    with pytest.raises(ValueError, match='chunk_size must be at least 2'):
        linear_recurrence(torch.zeros(1, 4), torch.zeros(1, 4), chunk_size=1)


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
