'''xLSTM: the canonized mLSTM layer against the model's own and against a reference written token by token from the
equations (tests/reference.py), with each rule and without, the soft-cap on the logits, padding, the cache, and the
settings refused.

The generic tests (conservation, forward unchanged, each rule needed, gamma) run in test_families.py.
'''
import pytest
import torch
import transformers as tf
from transformers.models.xlstm.modeling_xlstm import xLSTMCache

from conftest import assert_snapshots_equal, relative_error, snapshot
from reference import sequential_mlstm_layer
from test_families import BUILDERS, XLSTM, build, conservation_error, embeddings_for, explain, like_trained_xlstm
from zennit_mamba import MAMBA_LRP_RULES as ALL_RULES, MambaComposite, UnsupportedModelError
from zennit_mamba.core.ruleset import RuleSet
from zennit_mamba.families import xlstm
from zennit_mamba.mixers.mlstm import mlstm_layer

NAME = 'xLSTM'


def variant(monkeypatch, dtype=torch.float64, zero_biases=True, **changes) -> torch.nn.Module:
    '''The tiny xLSTM of test_families.py with ``changes`` to its config, built as ``build`` builds it.'''
    if changes.get('weight_mode') == 'fused':
        # transformers' initialisation of the fused gates fails (5.24: a bias of 2 * heads taken as one of heads);
        # torch's initialisation of each layer instead, every weight random, as a loaded checkpoint's
        from transformers.models.xlstm.modeling_xlstm import xLSTMPreTrainedModel

        monkeypatch.setattr(xLSTMPreTrainedModel, '_init_weights', lambda self, module: None)
    monkeypatch.setitem(BUILDERS, 'xLSTM-variant',
                        lambda: like_trained_xlstm(tf.xLSTMForCausalLM(tf.xLSTMConfig(**dict(XLSTM, **changes)))))
    return build('xLSTM-variant', dtype=dtype, zero_biases=zero_biases)


def layer_inputs(dtype=torch.float64, length: int = 13):
    '''Inputs of the second mLSTM layer and random weights on its outputs.'''
    generator = torch.Generator().manual_seed(2)
    inputs = torch.randn(2, length, 32, dtype=torch.float64, generator=generator)
    return inputs.to(dtype), torch.randn(2, length, 32, dtype=torch.float64, generator=generator).to(dtype)


@pytest.mark.parametrize('length', [13, 12, 1], ids=['chunks-and-steps', 'chunks', 'one-step'])
@pytest.mark.parametrize('weight_mode', ['single', 'fused'])
def test_the_canonized_layer_computes_the_models_own(length, weight_mode, monkeypatch):
    # in float32 the very same operations (the backend's own kernels on the held selection)
    model = variant(monkeypatch, torch.float32, zero_biases=False, use_bias=True, weight_mode=weight_mode)
    layer = model.backbone.blocks[1].mlstm_layer
    inputs, _ = layer_inputs(torch.float32, length)
    with torch.no_grad():
        expected, expected_state = layer(inputs)
        output, state = mlstm_layer(RuleSet(), layer, inputs)
    assert torch.equal(output, expected)
    assert all(torch.equal(got, want) for got, want in zip(state, expected_state))
    # in float64 the positions computed step by step keep their states in float64, where transformers rounds them to
    # float32 (the chunkwise positions are the same operations)
    model = model.double()
    with torch.no_grad():
        expected, _ = layer(inputs.double())
        output, _ = mlstm_layer(RuleSet(), layer, inputs.double())
    assert relative_error(output, expected) <= 1e-6
    if length % model.config.chunk_size == 0:
        assert torch.equal(output, expected)


def test_train_mode_computes_the_models_own(monkeypatch):
    # mode='train' (with return_last_states, else the original layer cannot unpack its backend's output): one
    # chunkwise pass over the whole sequence, whose length must be a multiple of chunk_size, as in the original
    model = variant(monkeypatch, torch.float32, mode='train')
    layer = model.backbone.blocks[0].mlstm_layer
    inputs, _ = layer_inputs(torch.float32, 12)
    with torch.no_grad():
        assert torch.equal(mlstm_layer(RuleSet(), layer, inputs)[0], layer(inputs)[0])
        with pytest.raises(ValueError, match='not divisible by chunk size'):
            mlstm_layer(RuleSet(), layer, inputs[:, :11])


def exact_layer(monkeypatch, **changes):
    '''The second mLSTM layer of the tiny model with eps = 0 and its norms in float64: the reference's step-by-step
    stabiliser then gives the chunkwise form's values to float64's precision (the stabiliser changes the output only
    through eps, and a norm in float32 would round the difference up to float32's precision).'''
    model = variant(monkeypatch, eps=0.0, norm_reduction_force_float32=False, **changes)
    return model.backbone.blocks[1].mlstm_layer


@pytest.mark.parametrize('weight_mode', ['single', 'fused'])
def test_the_reference_is_the_layer_transformers_runs(weight_mode, monkeypatch):
    layer = exact_layer(monkeypatch, weight_mode=weight_mode)
    inputs, _ = layer_inputs()
    with torch.no_grad():
        assert relative_error(sequential_mlstm_layer(layer, inputs, ()), layer(inputs)[0]) <= 1e-6
        assert relative_error(sequential_mlstm_layer(layer, inputs, ()), mlstm_layer(RuleSet(), layer, inputs)[0]) \
            <= 1e-12


@pytest.mark.parametrize('rules', [ALL_RULES] + [ALL_RULES - {rule} for rule in ('ssm', 'norm', 'attention')],
                         ids=['all', 'without-ssm', 'without-norm', 'without-attention'])
@pytest.mark.parametrize('weight_mode', ['single', 'fused'])
def test_relevance_is_the_references(rules, weight_mode, monkeypatch):
    layer = exact_layer(monkeypatch, weight_mode=weight_mode)
    inputs, weights = layer_inputs()

    def relevance(compute):
        leaf = inputs.clone().requires_grad_()
        output = (compute(leaf) * weights).sum()
        gradient, = torch.autograd.grad(output, leaf)
        return leaf * gradient, output.detach()

    actual, explained = relevance(lambda leaf: mlstm_layer(RuleSet(rules), layer, leaf)[0])
    expected, _ = relevance(lambda leaf: sequential_mlstm_layer(layer, leaf, rules))
    assert relative_error(actual, expected) <= 1e-8
    # the layer has no bias: under all rules it is linear in its input, and relevance sums to its output
    error = abs(float(actual.sum().detach() - explained)) / abs(float(explained))
    assert error <= 1e-12 if rules == ALL_RULES else error > 1e-3


def test_the_relevance_with_the_models_eps_is_the_references(monkeypatch):
    # with transformers' eps (1e-6) the two stabilisers give outputs a little apart; the relevance agrees to that
    layer = variant(monkeypatch, norm_reduction_force_float32=False).backbone.blocks[1].mlstm_layer
    assert layer.config.eps == 1e-6
    inputs, weights = layer_inputs()
    results = []
    for compute in (lambda leaf: mlstm_layer(RuleSet(), layer, leaf)[0],
                    lambda leaf: sequential_mlstm_layer(layer, leaf, ALL_RULES)):
        leaf = inputs.clone().requires_grad_()
        results.append(leaf * torch.autograd.grad((compute(leaf) * weights).sum(), leaf)[0])
    assert relative_error(*results) <= 1e-7


def test_the_whole_model_conserves_and_keeps_float64_logits():
    model = build(NAME)
    embeddings = embeddings_for(model)
    with torch.no_grad():
        expected = model(inputs_embeds=embeddings, use_cache=False).logits
        with MambaComposite().context(model) as modified:
            logits = modified(inputs_embeds=embeddings, use_cache=False).logits
    # transformers casts the logits to float32; the canonized model keeps a float64 model's in float64
    assert expected.dtype == torch.float32 and logits.dtype == torch.float64
    assert relative_error(logits, expected.double()) <= 1e-6
    relevance, explained, _ = explain(model, embeddings)
    assert (conservation_error(relevance, explained) <= 1e-11).all()


def test_recomputed_layers_and_gamma_on_the_values_give_conserved_relevance():
    model = build(NAME)
    embeddings = embeddings_for(model)
    expected, explained, targets = explain(model, embeddings)
    relevance, _, _ = explain(model, embeddings, MambaComposite(epsilon=1e-12, recompute=True), targets)
    torch.testing.assert_close(relevance, expected, rtol=1e-10, atol=1e-12)
    # gamma on the values' projection alone (the queries', keys' and gates' are held: no relevance passes them)
    relevance, _, _ = explain(model, embeddings, MambaComposite(epsilon=1e-12, gamma={'v': 0.25}), targets)
    assert (conservation_error(relevance, explained) <= 1e-11).all()
    assert relative_error(relevance, expected) > 1e-4


def test_the_soft_capped_logit_is_conserved(monkeypatch):
    model = build(NAME)
    embeddings = embeddings_for(model)
    relevance, explained, targets = explain(model, embeddings)
    cap = model.config.output_logit_soft_cap
    with torch.no_grad():
        hidden = model.backbone(inputs_embeds=embeddings, use_cache=False).last_hidden_state
        pre_cap = model.lm_head(hidden)[torch.arange(2), -1, targets]
    # the explained logit is the capped one, and the relevance sums to it
    # (the model's own backbone rounds the positions it computes step by step to float32)
    assert relative_error(explained, torch.tanh(pre_cap / cap) * cap) <= 1e-6
    assert (pre_cap - explained).abs().min() > 1e-2  # the cap bites on these logits
    assert (conservation_error(relevance, explained) <= 1e-11).all()
    # without the identity rule on the cap (every other rule on), the relevance sums to neither logit
    monkeypatch.setattr(xlstm, 'soft_cap', lambda rules, logits, cap: torch.tanh(logits / cap) * cap)
    relevance, explained, _ = explain(model, embeddings, targets=targets)
    assert (conservation_error(relevance, explained) > 1e-3).all()
    assert (conservation_error(relevance, pre_cap) > 1e-3).all()


def test_a_fresh_cache_is_filled_as_the_original_fills_it_and_a_continuation_is_refused():
    model = build(NAME)
    embeddings = embeddings_for(model, 1, 6)
    with torch.no_grad():
        plain = model(inputs_embeds=embeddings)  # the config's use_cache=True: a fresh cache, filled
        before = snapshot(model)
        with MambaComposite().context(model) as modified:
            output = modified(inputs_embeds=embeddings)
            with pytest.raises(RuntimeError, match='explains whole sequences'):
                modified(inputs_embeds=embeddings[:, :1], cache=output.cache, use_cache=True)
            # a cache the model has not counted tokens into, but whose states the user filled
            filled = xLSTMCache(model.config, 1, dtype=torch.float64)
            filled.rnn_state[1][0].normal_()
            with pytest.raises(RuntimeError, match='explains whole sequences'):
                modified(inputs_embeds=embeddings, cache=filled, use_cache=True)
        assert_snapshots_equal(snapshot(model), before)
    assert relative_error(output.logits, plain.logits) <= 1e-6
    assert int(output.cache.seqlen_offset) == int(plain.cache.seqlen_offset) == 6
    for layer in range(model.config.num_hidden_layers):
        for got, want in zip(output.cache.rnn_state[layer], plain.cache.rnn_state[layer]):
            assert not got.requires_grad and got.abs().sum() > 0
            assert relative_error(got, want) <= 1e-6
    # generation continues from the filled cache as from the original's
    with torch.no_grad():
        step = embeddings[:, -1:]
        continued = model(inputs_embeds=step, cache=output.cache, use_cache=True).logits
        expected = model(inputs_embeds=step, cache=plain.cache, use_cache=True).logits
    assert relative_error(continued, expected) <= 1e-6


def test_a_sequence_computed_in_pieces_without_gradients_is_refused(monkeypatch):
    # past max_inference_chunksize the original runs under torch.no_grad, its states rounded to bfloat16
    model = variant(monkeypatch, max_inference_chunksize=8)
    embeddings = embeddings_for(model)
    with MambaComposite().context(model) as modified:
        with pytest.raises(ValueError, match='max_inference_chunksize'):
            modified(inputs_embeds=embeddings, use_cache=False)
    model.config.max_inference_chunksize = 13
    relevance, explained, _ = explain(model, embeddings)
    assert (conservation_error(relevance, explained) <= 1e-11).all()


@pytest.mark.parametrize('changes, reason', [
    (dict(mode='train_with_padding', return_last_states=False), "mode='train_with_padding'"),
    (dict(mode='train', return_last_states=False), 'return_last_states=False'),
], ids=['train-with-padding', 'train-without-states'])
def test_modes_the_original_layer_cannot_run_are_refused(changes, reason, monkeypatch):
    model = variant(monkeypatch, **changes)
    before = snapshot(model)
    with pytest.raises(UnsupportedModelError, match=f'xLSTMLayer at .*{reason}'):
        MambaComposite().context(model).__enter__()
    assert_snapshots_equal(snapshot(model), before)
    # the original cannot run them either
    with pytest.raises((ValueError, RuntimeError)):
        model(inputs_embeds=embeddings_for(model, 2, 12), use_cache=False)
