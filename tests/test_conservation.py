'''Conservation and agreement with the independent slow reference, on transformers Mamba models in float64.'''
import pytest
import torch

from conftest import embed, explain, gradient_x_input, make_mamba, relative_error
from reference import ALL_RULES, reference_relevance

from zennit_mamba import MambaComposite

#: the ways a composite explains a model: the whole model in one pass (ModelRules), the same with each mixer
#: recomputed in the backward pass, layer by layer with one pass per mixer (MixerRules; a rule on the head forces
#: layer by layer), and one rule per operation (a rule on every projection; gamma=0 is LRP-0)
PATHS = {
    'one-pass': {},
    'recomputed': {'recompute': True},
    'mixer-by-mixer': {'gamma': {'lm_head': 0.0}},
    'module-by-module': {'gamma': 0.0},
}

SIZES = [
    # layers, hidden, state, batch, length
    (1, 8, 4, 2, 1),
    (2, 16, 8, 3, 7),
    (3, 24, 16, 2, 64),
    (4, 32, 16, 2, 257),
]


@pytest.mark.unmodified_forward
@pytest.mark.parametrize('layers, hidden, state, batch, length', SIZES)
def test_conservation_where_gradient_x_input_violates_it(layers, hidden, state, batch, length):
    model = make_mamba(layers=layers, hidden=hidden, state=state, seed=layers)
    embeddings = embed(model, batch, length)
    relevance, explained, targets = explain(model, embeddings)

    error = (relevance.sum((1, 2)) - explained).abs() / explained.abs()
    assert (error <= 1e-6).all(), error

    baseline = gradient_x_input(model, embeddings, targets)
    baseline_error = (baseline.sum((1, 2)) - explained).abs() / explained.abs()
    # the violation is visible: orders of magnitude above float rounding (a single-token input has no
    # selective-scan coupling, but SiLU and the gate still break it)
    assert (baseline_error > 1e-3).all(), baseline_error


def test_conservation_with_residual_in_float32():
    # transformers' default keeps the residual stream in float32, so relevance passes through a float32 cast
    model = make_mamba(layers=2, residual_in_fp32=True)
    relevance, explained, _ = explain(model, embed(model, 2, 19))
    error = (relevance.sum((1, 2)) - explained).abs() / explained.abs()
    assert (error <= 1e-6).all(), error


def test_conv_bias_absorbs_exactly_its_share():
    model = make_mamba(layers=1)
    with torch.no_grad():
        model.backbone.layers[0].mixer.conv1d.bias.normal_(0.0, 0.5)
    embeddings = embed(model, 2, 9)
    relevance, explained, _ = explain(model, embeddings)
    # with biases the sum differs from the logit...
    assert ((relevance.sum((1, 2)) - explained).abs() > 1e-6 * explained.abs()).all()
    # ...and agrees with the reference, where the bias is part of the same forward
    expected, _ = reference_relevance(model, embeddings, explain(model, embeddings)[2])
    assert relative_error(relevance, expected) <= 1e-8


@pytest.mark.parametrize('layers, length', [(1, 1), (2, 13), (3, 70)])
def test_agrees_with_sequential_reference(layers, length):
    model = make_mamba(layers=layers, hidden=16, state=8, seed=10 + layers)
    embeddings = embed(model, 3, length, seed=layers)
    relevance, explained, targets = explain(model, embeddings)
    expected, expected_logits = reference_relevance(model, embeddings, targets)

    assert torch.allclose(explained, expected_logits, rtol=1e-10, atol=0)
    assert relative_error(relevance, expected) <= 1e-8


@pytest.mark.parametrize('rules', [
    ALL_RULES - {'silu'},
    ALL_RULES - {'ssm'},
    ALL_RULES - {'gate'},
    ALL_RULES - {'norm'},
    frozenset({'norm'}),
    frozenset(),
], ids=['no-silu', 'no-ssm', 'no-gate', 'no-norm', 'ln-rule-only', 'gradient-x-input'])
def test_ablations_agree_with_reference_and_break_conservation(rules):
    model = make_mamba(layers=2, seed=3)
    embeddings = embed(model, 2, 17)
    relevance, explained, targets = explain(model, embeddings, rules=rules)
    expected, _ = reference_relevance(model, embeddings, targets, rules=rules)

    # without the LN-rule the gradient passes the model's float32 normalisation, hence the looser bound
    assert relative_error(relevance, expected) <= (1e-8 if 'norm' in rules else 1e-5)
    # switching a rule off changes the result (so the rule fired) and breaks conservation
    full, _, _ = explain(model, embeddings, targets)
    assert relative_error(relevance, full) > 1e-4
    assert ((relevance.sum((1, 2)) - explained).abs() > 1e-4 * explained.abs()).any()


def test_each_example_explains_its_own_target():
    model = make_mamba(layers=2)
    embeddings = embed(model, 3, 11)
    targets = torch.tensor([0, 5, 17])
    relevance, explained, _ = explain(model, embeddings, targets)
    for index in range(3):
        single, single_logit, _ = explain(model, embeddings[index:index + 1], targets[index:index + 1])
        assert relative_error(relevance[index:index + 1], single) <= 1e-10
        assert torch.isclose(explained[index], single_logit[0], rtol=1e-12)


@pytest.mark.parametrize('path', PATHS)
@pytest.mark.parametrize('rules', [ALL_RULES, ALL_RULES - {'ssm'}, ALL_RULES - {'gate', 'silu'}, frozenset()],
                         ids=['all', 'no-ssm', 'no-gate-no-silu', 'none'])
def test_every_path_agrees_with_reference(path, rules):
    model = make_mamba(layers=2, seed=5)
    embeddings = embed(model, 2, 40)
    composite = MambaComposite(epsilon=1e-12, rules=rules, **PATHS[path])
    relevance, explained, targets = explain(model, embeddings, composite=composite)
    expected, expected_logits = reference_relevance(model, embeddings, targets, rules=rules)
    assert torch.allclose(explained, expected_logits, rtol=1e-10, atol=0)
    assert relative_error(relevance, expected) <= (1e-8 if 'norm' in rules else 1e-5)


@pytest.mark.parametrize('path', PATHS)
def test_the_held_gate_variant_agrees_with_the_reference_on_every_path(path):
    # gate_relevance='value': the output gate silu(z) held, relevance through the scan's output only
    model = make_mamba(layers=2, seed=5)
    embeddings = embed(model, 2, 40)
    composite = MambaComposite(epsilon=1e-12, gate_relevance='value', **PATHS[path])
    relevance, explained, targets = explain(model, embeddings, composite=composite)
    expected, expected_logits = reference_relevance(model, embeddings, targets, rules=ALL_RULES | {'held_gate'})
    assert torch.allclose(explained, expected_logits, rtol=1e-10, atol=0)
    assert relative_error(relevance, expected) <= 1e-8
    assert ((relevance.sum((1, 2)) - explained).abs() <= 1e-9 * explained.abs()).all()
    half, _ = reference_relevance(model, embeddings, targets)
    assert relative_error(relevance, half) > 1e-2
