'''MiniMax's lightning attention: the canonized layer against the recurrence token by token (tests/reference.py), with
each rule and without, and its cache.'''
import pytest
import torch

from conftest import relative_error
from reference import sequential_lightning_attention
from test_families import build, embeddings_for
from zennit_mamba import MAMBA_LRP_RULES as ALL_RULES, MambaComposite
from zennit_mamba.core.ruleset import RuleSet
from zennit_mamba.families.minimax import lightning_attention


def lightning_layer():
    '''The first lightning attention layer of the tiny MiniMax model (blocks of 8 positions), its inputs of 19
    positions (three blocks) and random weights on its outputs.'''
    model = build('MiniMax')
    layer = model.model.layers[0].self_attn
    generator = torch.Generator().manual_seed(2)
    inputs = torch.randn(2, 19, 32, dtype=torch.float64, generator=generator)
    with torch.no_grad():
        layer.norm.weight.normal_(1.0, 0.3, generator=generator)  # a trained norm's weights
        # the decays in float64 (computed in float32 when the model was made, before it was converted)
        for buffer, decays in zip((layer.query_decay, layer.key_decay, layer.diagonal_decay),
                                  layer.decay_factors(layer.slope_rate)):
            buffer.copy_(decays)
    return layer, inputs, torch.randn(2, 19, 32, dtype=torch.float64, generator=generator)


def test_the_reference_is_the_layer_transformers_runs():
    layer, inputs, _ = lightning_layer()
    assert type(layer).__name__ == 'MiniMaxLightningAttention' and layer.block_size < inputs.shape[1]
    with torch.no_grad():
        expected = layer(inputs, None, None)[0]
        assert relative_error(sequential_lightning_attention(layer, inputs, ()), expected) <= 1e-12
        assert relative_error(lightning_attention(RuleSet(), layer, inputs, None)[0], expected) <= 1e-12


@pytest.mark.parametrize('rules', [ALL_RULES] + [ALL_RULES - {rule} for rule in ('ssm', 'silu', 'norm', 'attention')],
                         ids=['all', 'without-ssm', 'without-silu', 'without-norm', 'without-attention'])
def test_relevance_is_the_references(rules):
    layer, inputs, weights = lightning_layer()

    def relevance(compute):
        leaf = inputs.clone().requires_grad_()
        output = (compute(leaf) * weights).sum()
        gradient, = torch.autograd.grad(output, leaf)
        return leaf * gradient, output.detach()

    actual, explained = relevance(lambda leaf: lightning_attention(RuleSet(rules), layer, leaf, None)[0])
    expected, _ = relevance(lambda leaf: sequential_lightning_attention(layer, leaf, rules))
    assert relative_error(actual, expected) <= 1e-10
    # the layer has no bias: under all rules it is linear in its input, and relevance sums to its output
    error = abs(float(actual.sum() - explained)) / abs(float(explained))
    assert error <= 1e-10 if rules == ALL_RULES else error > 1e-4


def test_a_fresh_cache_is_filled_as_the_original_fills_it():
    model = build('MiniMax')
    embeddings = embeddings_for(model, 1, 11)
    with torch.no_grad():
        plain = model(inputs_embeds=embeddings, use_cache=True)
        with MambaComposite().context(model) as modified:
            output = modified(inputs_embeds=embeddings, use_cache=True)
            with pytest.raises(RuntimeError, match='explains whole sequences'):
                modified(inputs_embeds=embeddings[:, :1], cache=output.cache, use_cache=True)
    assert relative_error(output.logits, plain.logits) <= 1e-10
    for layer, kind in enumerate(model.config.layer_types):
        if kind == 'linear_attention':
            assert relative_error(output.cache.get_linear_cache(layer), plain.cache.get_linear_cache(layer)) <= 1e-12
        else:
            assert torch.equal(output.cache.layers[layer].keys, plain.cache.layers[layer].keys)
    # the unmodified model continues from the cache that MambaLRP filled as from its own
    with torch.no_grad():
        step = embeddings[:, -1:]
        continued = model(inputs_embeds=step, cache=output.cache, use_cache=True).logits
        expected = model(inputs_embeds=step, cache=plain.cache, use_cache=True).logits
    assert relative_error(continued, expected) <= 1e-10
