'''The gated delta rule of Gated DeltaNet layers: the chunked form against the rule's definition token by token, and
the selection rule that makes it linear in the values.'''
import pytest
import torch

from conftest import relative_error
from reference import sequential_gated_delta_rule
from zennit_mamba import RuleSet
from zennit_mamba.kernels.delta_rule import chunk_gated_delta_rule


def inputs(batch=2, heads=3, length=11, key_dim=4, value_dim=5, seed=0, per_channel=False):
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=generator)

    query = torch.nn.functional.normalize(normal(batch, heads, length, key_dim), dim=-1) * key_dim ** -0.5
    key = torch.nn.functional.normalize(normal(batch, heads, length, key_dim), dim=-1)
    g = -torch.nn.functional.softplus(normal(batch, heads, length, *((key_dim,) if per_channel else ())))
    beta = torch.sigmoid(normal(batch, heads, length))
    return query, key, normal(batch, heads, length, value_dim), g, beta, normal(batch, heads, key_dim, value_dim)


@pytest.mark.parametrize('chunk_size', [1, 4, 11, 64])
@pytest.mark.parametrize('with_state', [False, True], ids=['zero state', 'initial state'])
@pytest.mark.parametrize('per_channel', [False, True], ids=['decay per head', 'decay per key channel'])
def test_the_chunked_form_is_the_rule_token_by_token(chunk_size, with_state, per_channel):
    query, key, value, g, beta, state = inputs(per_channel=per_channel)
    state = state if with_state else None
    expected, expected_state = sequential_gated_delta_rule(query, key, value, g, beta, state)
    output, last_state = chunk_gated_delta_rule(query, key, value, g, beta, chunk_size=chunk_size, initial_state=state)
    assert relative_error(output, expected) <= 1e-12
    assert relative_error(last_state, expected_state) <= 1e-12
    assert output.dtype == torch.float64  # no cast to float32 on the way


@pytest.mark.parametrize('per_channel', [False, True], ids=['decay per head', 'decay per key channel'])
def test_continuing_from_the_last_state_is_the_whole_sequence(per_channel):
    query, key, value, g, beta, _ = inputs(length=13, per_channel=per_channel)
    whole, whole_state = chunk_gated_delta_rule(query, key, value, g, beta, chunk_size=4)
    first, state = chunk_gated_delta_rule(*(tensor[:, :, :6] for tensor in (query, key, value, g, beta)), chunk_size=4)
    second, last_state = chunk_gated_delta_rule(*(tensor[:, :, 6:] for tensor in (query, key, value, g, beta)),
                                                chunk_size=4, initial_state=state)
    assert relative_error(torch.cat([first, second], 2), whole) <= 1e-12
    assert relative_error(last_state, whole_state) <= 1e-12


def relevance_sums(rules, per_channel=False):
    '''Gradient x input of the outputs, for a random output relevance, over the values and the initial state, and
    the output relevance's sum: equal where the rule set makes the delta rule linear in them.'''
    query, key, value, g, beta, state = (tensor.requires_grad_() for tensor in inputs(per_channel=per_channel))
    output, _ = RuleSet(rules).delta_rule(query, key, value, g, beta, chunk_size=4, initial_state=state)
    output_relevance = torch.randn(output.shape, dtype=output.dtype, generator=torch.Generator().manual_seed(3))
    gradients = torch.autograd.grad(output, (value, state), output_relevance)
    relevance = sum((tensor * gradient).sum() for tensor, gradient in zip((value, state), gradients))
    return relevance, (output * output_relevance).sum()


@pytest.mark.parametrize('per_channel', [False, True], ids=['decay per head', 'decay per key channel'])
def test_with_the_selection_held_constant_the_rule_conserves_relevance(per_channel):
    relevance, explained = relevance_sums({'ssm'}, per_channel)
    assert abs(relevance - explained) <= 1e-12 * abs(explained)


def test_without_the_selection_rule_gradient_x_input_does_not_conserve():
    query, key, value, g, beta, state = (tensor.requires_grad_() for tensor in inputs())
    output, _ = RuleSet(()).delta_rule(query, key, value, g, beta, chunk_size=4, initial_state=state)
    selection_gradients = torch.autograd.grad(output.sum(), (query, key, g, beta))
    assert all(gradient.abs().sum() > 1e-3 for gradient in selection_gradients)  # relevance would leak into them
    with_rule = torch.autograd.grad(RuleSet({'ssm'}).delta_rule(query, key, value, g, beta, chunk_size=4,
                                                                initial_state=state)[0].sum(),
                                    (query, key, g, beta), allow_unused=True)
    assert all(gradient is None for gradient in with_rule)


@pytest.mark.parametrize('module', ['qwen3_next', 'qwen3_5', 'olmo_hybrid'])
def test_the_reference_is_the_recurrence_transformers_decodes_with(module):
    # each family's own token-by-token form (the one its layers decode with), in float32 as it computes: the same
    # convention (state keys x values, decay before the update, read out after it) as tests/reference.py
    import importlib

    modeling = importlib.import_module(f'transformers.models.{module}.modeling_{module}')
    query, key, value, g, beta, state = inputs()
    key_dim = query.shape[-1]
    expected, expected_state = sequential_gated_delta_rule(query, key, value, g, beta, state)
    # transformers takes (batch, length, heads, ...) and scales the queries itself
    unscaled = query / key_dim ** -0.5
    output, last_state = modeling.torch_recurrent_gated_delta_rule(
        *(tensor.transpose(1, 2) for tensor in (unscaled, key, value, g, beta)), initial_state=state,
        output_final_state=True)
    assert relative_error(output.transpose(1, 2).double(), expected) <= 1e-6
    assert relative_error(last_state.double(), expected_state) <= 1e-6


def test_the_reference_is_kimi_delta_attentions_recurrence():
    # Kimi Delta Attention decays each key channel: its token-by-token form in transformers (float32) against the
    # reference's
    from transformers.models.kimi_linear.modeling_kimi_linear import recurrent_kimi_delta_attention

    query, key, value, g, beta, state = inputs(per_channel=True)
    expected, expected_state = sequential_gated_delta_rule(query, key, value, g, beta, state)
    unscaled = query / query.shape[-1] ** -0.5
    output, last_state = recurrent_kimi_delta_attention(
        *(tensor.transpose(1, 2) for tensor in (unscaled, key, value, g, beta)), initial_state=state,
        output_final_state=True)
    assert relative_error(output.transpose(1, 2).double(), expected) <= 1e-6
    assert relative_error(last_state.double(), expected_state) <= 1e-6


@pytest.mark.parametrize('per_channel', [False, True], ids=['decay per head', 'decay per key channel'])
def test_the_recurrent_form_is_the_rule_token_by_token(per_channel):
    from zennit_mamba.kernels.delta_rule import recurrent_gated_delta_rule

    query, key, value, g, beta, state = inputs(per_channel=per_channel)
    expected, expected_state = sequential_gated_delta_rule(query, key, value, g, beta, state)
    output, last_state = recurrent_gated_delta_rule(query, key, value, g, beta, state)
    assert relative_error(output, expected) <= 1e-12 and relative_error(last_state, expected_state) <= 1e-12


def uniform_relevance(length, per_channel=False):
    '''Relevance of queries, keys, values and the initial state under delta_relevance='uniform', and the explained
    sum, for a random output relevance.'''
    query, key, value, g, beta, state = (tensor.requires_grad_()
                                         for tensor in inputs(length=length, per_channel=per_channel))
    output, _ = RuleSet(delta_relevance='uniform').delta_rule(query, key, value, g, beta, initial_state=state)
    output_relevance = torch.randn(output.shape, dtype=output.dtype, generator=torch.Generator().manual_seed(3))
    gradients = torch.autograd.grad(output, (query, key, value, state), output_relevance)
    return [(tensor * gradient).sum() for tensor, gradient in zip((query, key, value, state), gradients)], \
        (output * output_relevance).sum()


@pytest.mark.parametrize('per_channel', [False, True], ids=['decay per head', 'decay per key channel'])
def test_the_uniform_variant_conserves_through_queries_keys_values_and_state(per_channel):
    relevance, explained = uniform_relevance(11, per_channel)
    assert abs(sum(relevance) - explained) <= 1e-12 * abs(explained)
    assert all(abs(part) > 1e-3 * abs(explained) for part in relevance[:3])  # each passes relevance


def test_the_uniform_variant_splits_one_step_by_hand():
    # one step from a zero state, o_0 = (beta k v^T)^T q:
    # the read-out halves between q and the state, the write halves between k and v
    query, key, value, g, beta, state = (tensor.requires_grad_() for tensor in inputs(length=1))
    output, _ = RuleSet(delta_relevance='uniform').delta_rule(query, key, value, g, beta,
                                                               initial_state=torch.zeros_like(state))
    output_relevance = torch.randn(output.shape, dtype=output.dtype, generator=torch.Generator().manual_seed(3))
    gradients = torch.autograd.grad(output, (query, key, value), output_relevance)
    relevance = [(tensor * gradient).sum() for tensor, gradient in zip((query, key, value), gradients)]
    explained = (output * output_relevance).sum()
    assert torch.allclose(torch.stack(relevance), torch.stack([explained / 2, explained / 4, explained / 4]),
                          rtol=1e-12)


def test_an_unknown_delta_relevance_is_refused():
    with pytest.raises(ValueError, match="delta_relevance must be one of \\('values', 'uniform'\\)"):
        RuleSet(delta_relevance='queries')
