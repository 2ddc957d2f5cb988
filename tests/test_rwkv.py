'''RWKV (RWKV-4, transformers' RwkvForCausalLM): the WKV computed at once against transformers' own recurrence and
against the weighted average written out pairwise, the whole model's relevance against a reference written from the
equations, the rules it needs, the state it fills, padding, time blocks and gamma.
'''
import pytest
import torch
import torch.nn.functional as F
from transformers.models.rwkv.modeling_rwkv import rwkv_linear_attention_cpu

from conftest import assert_snapshots_equal, relative_error, snapshot
from test_families import rwkv_model
from zennit_mamba import MAMBA_LRP_RULES, MambaComposite
from zennit_mamba.mixers import io as mixer_io
from zennit_mamba.mixers.rwkv import WKVState, wkv, wkv_maxima


def embeddings_for(model, batch=2, length=13, seed=1):
    ids = torch.randint(0, 40, (batch, length), generator=torch.Generator().manual_seed(seed))
    return model.get_input_embeddings()(ids).detach()


def explain(model, embeddings, composite=None, targets=None, **kwargs):
    '''Relevance of ``embeddings`` for the target logits at the last position, the explained logits, the targets.'''
    leaf = embeddings.detach().clone().requires_grad_()
    with (composite or MambaComposite(epsilon=1e-12)).context(model) as modified:
        logits = modified(inputs_embeds=leaf, use_cache=False, **kwargs).logits[:, -1]
        targets = logits.argmax(-1) if targets is None else targets
        explained = logits[torch.arange(len(targets)), targets]
        relevance, = torch.autograd.grad(explained, leaf, explained.detach())
    return relevance, explained.detach(), targets


def conservation_error(relevance, explained):
    return (relevance.sum((1, 2)) - explained).abs() / explained.abs()


# --- the WKV -----------------------------------------------------------------------------------------------------

def pairwise_wkv(key, value, decay, first, state=None):
    '''The WKV as the weighted average it is, every weight written out: ``exp(k_i - (t-1-i) w)`` for ``i < t``,
    ``exp(u + k_t)`` for ``i = t``, and ``exp(m_0 - t w)`` for the state's numerator and denominator.'''
    length = key.shape[1]
    t, i = torch.arange(length)[:, None], torch.arange(length)[None, :]
    distance = (t - 1 - i).to(key.dtype)[None, :, :, None]
    logits = key[:, None] - distance * decay
    logits = torch.where((i == t)[None, :, :, None], (first + key)[:, :, None].expand_as(logits), logits)
    logits = logits.masked_fill((i > t)[None, :, :, None], float('-inf'))
    numerator_terms, denominator_terms = logits.exp() * value[:, None], logits.exp()
    numerator, denominator = numerator_terms.sum(2), denominator_terms.sum(2)
    if state is not None:
        weight = torch.exp(state.maximum[:, None] - torch.arange(length, dtype=key.dtype)[None, :, None] * decay)
        numerator = numerator + weight * state.numerator[:, None]
        denominator = denominator + weight * state.denominator[:, None]
    return numerator / denominator


def wkv_inputs(dtype=torch.float64, length=11, channels=6, key_scale=3.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    key = key_scale * torch.randn(2, length, channels, generator=generator, dtype=dtype)
    value = torch.randn(2, length, channels, generator=generator, dtype=dtype)
    decay = torch.exp(1.5 * torch.randn(channels, generator=generator, dtype=dtype))
    first = torch.randn(channels, generator=generator, dtype=dtype)
    state = WKVState(torch.randn(2, channels, generator=generator, dtype=dtype),
                     torch.rand(2, channels, generator=generator, dtype=dtype) + 1.0,
                     torch.randn(2, channels, generator=generator, dtype=dtype))
    return key, value, decay, first, state


@pytest.mark.parametrize('with_state', [False, True], ids=['fresh', 'from-a-state'])
def test_the_wkv_is_transformers_recurrence(with_state):
    # transformers' recurrence reads the keys in float32: the comparison is in float32
    key, value, decay, first, state = wkv_inputs(torch.float32, key_scale=10.0)
    expected, expected_state = rwkv_linear_attention_cpu(torch.log(decay), first, key, value,
                                                         state=list(state) if with_state else None, return_state=True)
    output, last = wkv(key, value, decay, first, state if with_state else None)
    assert relative_error(output, expected) <= 1e-5
    assert torch.allclose(last.maximum, expected_state[2], atol=1e-5)
    for actual, want in zip(last[:2], expected_state[:2]):
        assert relative_error(actual, want) <= 1e-5


@pytest.mark.parametrize('with_state', [False, True], ids=['fresh', 'from-a-state'])
def test_the_wkv_and_its_gradients_are_the_weighted_averages(with_state):
    # every argument's gradient (the ablation's) and the value's alone (the selection held)
    inputs = wkv_inputs()
    state = inputs[-1] if with_state else None
    leaves = [tensor.clone().requires_grad_() for tensor in inputs[:4]]
    state_leaves = None if state is None else WKVState(state.numerator.clone().requires_grad_(),
                                                      state.denominator.clone().requires_grad_(), state.maximum)
    output_gradient = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    output, last = wkv(*leaves, state_leaves)
    expected = pairwise_wkv(*leaves, state_leaves)
    assert relative_error(output, expected) <= 1e-12
    wrt = leaves + ([] if state is None else list(state_leaves[:2]))
    for actual, want in zip(torch.autograd.grad(output, wrt, output_gradient),
                            torch.autograd.grad(expected, wrt, output_gradient)):
        assert relative_error(actual, want) <= 1e-10
    # held selection: only the values (and the state's numerator) carry a gradient, the same one
    held = [inputs[0], leaves[1], inputs[2], inputs[3]]
    output, _ = wkv(*held, state_leaves)
    expected = pairwise_wkv(*held, state_leaves)
    wrt = [leaves[1]] + ([] if state is None else [state_leaves.numerator])
    for actual, want in zip(torch.autograd.grad(output, wrt, output_gradient),
                            torch.autograd.grad(expected, wrt, output_gradient)):
        assert relative_error(actual, want) <= 1e-10
    # the state after the last token continues the average: the two halves give the whole
    first_half, state_between = wkv(*(tensor[:, :5] if tensor.dim() == 3 else tensor for tensor in inputs[:4]), state)
    second_half, _ = wkv(*(tensor[:, 5:] if tensor.dim() == 3 else tensor for tensor in inputs[:4]), state_between)
    whole, _ = wkv(*inputs[:4], state)
    assert relative_error(torch.cat([first_half, second_half], 1), whole) <= 1e-12


def test_the_wkv_stays_finite_where_its_terms_overflow():
    # keys of +-60 and decays of up to e^6 per token: exp of them overflows float32, the scaled sums do not
    key, value, decay, first, _ = wkv_inputs(torch.float32, length=300, channels=8, key_scale=30.0)
    decay = torch.exp(torch.linspace(-6.0, 6.0, 8))
    output, last = wkv(key, value, decay, first)
    expected = pairwise_wkv(key.double(), value.double(), decay.double(), first.double())
    assert torch.isfinite(output).all() and all(torch.isfinite(part).all() for part in last)
    assert relative_error(output, expected) <= 1e-5


def test_the_maxima_are_transformers_running_maxima():
    key, _, decay, _, state = wkv_inputs(length=40, key_scale=5.0)
    maxima = wkv_maxima(key, decay, state.maximum)
    running = state.maximum.clone()
    for position in range(key.shape[1]):
        assert torch.equal(maxima[:, position], running) or relative_error(maxima[:, position], running) <= 1e-14
        running = torch.maximum(running - decay, key[:, position])
    assert relative_error(maxima[:, -1], running) <= 1e-14


# --- the whole model ---------------------------------------------------------------------------------------------

def _norm(module, hidden, rules):
    scale = torch.rsqrt(hidden.var(-1, unbiased=False, keepdim=True) + module.eps)
    centred = hidden - hidden.mean(-1, keepdim=True)
    return centred * (scale.detach() if 'norm' in rules else scale) * module.weight + module.bias


def reference_logits(model, embeddings, rules):
    '''RWKV-4 written from its equations with the rules as detached factors: the LayerNorms' scales (LN-rule), the
    keys, decays and bonuses (the selection), the receptances (held as gates), the squared ReLU's ``relu(x)``
    (identity rule, ``relu(x)^2 = x * relu(x)``); the WKV as the pairwise weighted average.'''
    def held(tensor, rule):
        return tensor.detach() if rule in rules else tensor

    def shift(hidden):
        return F.pad(hidden, (0, 0, 1, 0))[:, :-1]

    def mix(hidden, shifted, weight):
        return hidden * weight + shifted * (1 - weight)

    backbone, hidden = model.rwkv, embeddings
    for index, block in enumerate(backbone.blocks):
        if index == 0:
            hidden = _norm(block.pre_ln, hidden, rules)
        attention, normalised = block.attention, _norm(block.ln1, hidden, rules)
        shifted = shift(normalised)
        key = attention.key(mix(normalised, shifted, attention.time_mix_key))
        value = attention.value(mix(normalised, shifted, attention.time_mix_value))
        receptance = torch.sigmoid(attention.receptance(mix(normalised, shifted, attention.time_mix_receptance)))
        mixed = pairwise_wkv(held(key, 'ssm'), value, held(torch.exp(attention.time_decay), 'ssm'),
                             held(attention.time_first, 'ssm'))
        hidden = hidden + attention.output(held(receptance, 'attention') * mixed)
        forward, normalised = block.feed_forward, _norm(block.ln2, hidden, rules)
        shifted = shift(normalised)
        key = forward.key(mix(normalised, shifted, forward.time_mix_key))
        activated = key * held(torch.relu(key), 'silu')
        receptance = torch.sigmoid(forward.receptance(mix(normalised, shifted, forward.time_mix_receptance)))
        hidden = hidden + held(receptance, 'attention') * forward.value(activated)
        if backbone.layers_are_rescaled and (index + 1) % model.config.rescale_every == 0:
            hidden = hidden / 2
    return model.head(_norm(backbone.ln_out, hidden, rules))


RULE_SETS = [MAMBA_LRP_RULES, MAMBA_LRP_RULES - {'ssm'}, MAMBA_LRP_RULES - {'attention'},
             MAMBA_LRP_RULES - {'silu', 'norm'}, frozenset()]


@pytest.mark.parametrize('rules', RULE_SETS, ids=['all', 'without-ssm', 'without-attention', 'without-silu-norm',
                                                  'none'])
def test_the_relevance_is_the_references(rules):
    model = rwkv_model(zero_biases=False)
    embeddings = embeddings_for(model)
    relevance, explained, targets = explain(model, embeddings, MambaComposite(epsilon=1e-12, rules=rules))
    leaf = embeddings.clone().requires_grad_()
    logits = reference_logits(model, leaf, rules)[:, -1]
    expected_explained = logits[torch.arange(2), targets]
    gradient, = torch.autograd.grad(expected_explained.sum(), leaf)
    assert relative_error(explained, expected_explained.detach()) <= 1e-8
    assert relative_error(relevance, leaf.detach() * gradient) <= 1e-8


def test_conservation_and_every_rule_on_its_path_is_needed():
    model = rwkv_model()
    embeddings = embeddings_for(model)
    relevance, explained, targets = explain(model, embeddings)
    assert (conservation_error(relevance, explained) <= 1e-10).all()
    for rule in ('silu', 'ssm', 'norm', 'attention'):
        relevance, explained, _ = explain(model, embeddings, MambaComposite(epsilon=1e-12,
                                                                            rules=MAMBA_LRP_RULES - {rule}), targets)
        assert (conservation_error(relevance, explained) > 1e-4).any(), rule
    # recomputed in the backward pass, and the plain gradient x input for comparison
    recomputed, _, _ = explain(model, embeddings, MambaComposite(epsilon=1e-12, recompute=True), targets)
    assert relative_error(recomputed, explain(model, embeddings, targets=targets)[0]) <= 1e-12
    leaf = embeddings.clone().requires_grad_()
    logits = model(inputs_embeds=leaf, use_cache=False).logits[:, -1]
    gradient, = torch.autograd.grad(logits[torch.arange(2), targets].sum(), leaf)
    assert (conservation_error(leaf.detach() * gradient, explained) > 1e-3).all()


def test_the_forward_is_unchanged_and_the_model_restored():
    model = rwkv_model(torch.float32, zero_biases=False)
    embeddings = embeddings_for(model)
    with torch.no_grad():
        expected = model(inputs_embeds=embeddings).logits
    before = snapshot(model)
    with MambaComposite().context(model) as modified:
        with torch.no_grad():
            inside = modified(inputs_embeds=embeddings).logits
        assert snapshot(model)['hooks'] > 0
    assert relative_error(inside, expected) <= 1e-5
    assert_snapshots_equal(snapshot(model), before)
    with torch.no_grad():
        assert torch.equal(model(inputs_embeds=embeddings).logits, expected)


def test_a_fresh_state_is_filled_as_the_original_fills_it_and_a_continuation_is_refused():
    model = rwkv_model()
    embeddings = embeddings_for(model, 2, 6)
    with torch.no_grad():
        plain = model(inputs_embeds=embeddings, use_cache=True)
        with MambaComposite().context(model) as modified:
            output = modified(inputs_embeds=embeddings, use_cache=True)
            for length in (1, 3):  # one token reads the state as the shifted token, more tokens overwrite it
                with pytest.raises(RuntimeError, match='explains whole sequences'):
                    modified(inputs_embeds=embeddings[:, :length], state=output.state, use_cache=True)
        # generation goes on from the state as from the original's
        following = embeddings_for(model, 2, 1, seed=9)
        continued = model(inputs_embeds=following, state=[part.clone() for part in output.state], use_cache=True)
        # (the model updates a state it is given in place)
        plain_state = [part.clone() for part in plain.state]
        expected = model(inputs_embeds=following, state=plain.state, use_cache=True)
    # transformers' recurrence reads the keys in float32
    assert relative_error(output.logits, plain.logits) <= 1e-6
    for actual, want in zip(output.state, plain_state):
        assert relative_error(actual, want) <= 1e-6
    assert relative_error(continued.logits, expected.logits) <= 1e-6


@pytest.mark.parametrize('block', [1, 2, 5])
def test_time_blocks_give_the_relevance_outputs_and_state_of_one_pass(block, monkeypatch):
    from zennit_mamba.mixers import rwkv as rwkv_mixer

    model = rwkv_model()
    embeddings = embeddings_for(model)

    def outcomes():
        results = []
        for composite in (MambaComposite(epsilon=1e-12), MambaComposite(epsilon=1e-12, rules=MAMBA_LRP_RULES - {'ssm'}),
                          MambaComposite(epsilon=1e-12, gamma={'value': 0.25}),
                          MambaComposite(epsilon=1e-12, recompute=True)):
            results += explain(model, embeddings, composite, targets=torch.tensor([3, 5]))[:2]
        with torch.no_grad(), MambaComposite().context(model) as modified:
            results += modified(inputs_embeds=embeddings, use_cache=True).state
        return results

    calls = []
    monkeypatch.setattr(rwkv_mixer, '_mixer_block', lambda *arguments, block_of=rwkv_mixer._mixer_block:
                        calls.append(1) or block_of(*arguments))
    whole = outcomes()
    one_pass = len(calls)
    monkeypatch.setattr(mixer_io, 'CPU_TIME_BLOCK', block)
    calls.clear()
    blocked = outcomes()
    assert len(calls) == -(-13 // block) * one_pass
    for got, want in zip(blocked, whole):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_gamma_conserves_and_changes_relevance_and_the_keys_alone_are_refused():
    model = rwkv_model()
    embeddings = embeddings_for(model)
    lrp0, explained, targets = explain(model, embeddings)
    gamma = {name: 0.25 for name in ('key', 'value', 'receptance', 'output')}
    relevance, _, _ = explain(model, embeddings, MambaComposite(epsilon=1e-12, gamma=gamma), targets)
    assert (conservation_error(relevance, explained) <= 1e-10).all()
    assert relative_error(relevance, lrp0) > 1e-3
    # the time mixing's keys select (held by the SSM rule): a key that selects only them acts nowhere
    with pytest.raises(ValueError, match='layers of the selection'):
        explain(model, embeddings, MambaComposite(gamma={'*.attention.key': 0.25}))


def test_a_long_float32_sequence_is_the_models_own_and_conserves():
    # 400 tokens through transformers' own recurrence: the scaled sums keep the long decays finite
    model = rwkv_model(torch.float32)
    embeddings = embeddings_for(model, 1, 400)
    with torch.no_grad():
        expected = model(inputs_embeds=embeddings, use_cache=False).logits[:, -1]
    relevance, explained, _ = explain(model, embeddings, MambaComposite())
    assert relative_error(explained, expected.max(-1).values) <= 1e-5
    assert (conservation_error(relevance, explained) <= 1e-4).all()


def test_bfloat16_is_explained_in_its_dtype():
    model = rwkv_model(torch.bfloat16)
    embeddings = embeddings_for(model)
    relevance, explained, _ = explain(model, embeddings, MambaComposite())
    assert relevance.dtype == torch.bfloat16 and torch.isfinite(relevance).all()
    assert (conservation_error(relevance.double(), explained.double()) <= 0.05).all()


def test_layer_relevance_and_labels():
    from captum_mamba import LayerMambaLRP, MambaLRP

    model = rwkv_model()
    ids = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        explained = model(ids).logits[:, -1, 3]
    at_embeddings = LayerMambaLRP(model, model.get_input_embeddings(), epsilon=1e-12).attribute(ids, target=3)
    expected = MambaLRP(model, epsilon=1e-12).attribute(model.get_input_embeddings()(ids).detach(), target=3)
    assert relative_error(at_embeddings, expected) <= 1e-10
    inside = LayerMambaLRP(model, model.rwkv.blocks[1], epsilon=1e-12).attribute(ids, target=3,
                                                                                  attribute_to_layer_input=True)
    for relevance in (at_embeddings, inside):  # the model's own logit: its keys read in float32
        assert (conservation_error(relevance, explained) <= 1e-6).all()
    embeddings = model.get_input_embeddings()(ids).detach()
    with_labels, _, _ = explain(model, embeddings, targets=torch.tensor([3, 3]), labels=ids)
    assert relative_error(with_labels, expected) <= 1e-10
