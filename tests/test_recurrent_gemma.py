'''RecurrentGemma (Griffin): the canonized recurrent block against the model's own and against a reference written
token by token from the equations (tests/reference.py), the soft-cap on the logits, padding, and the states the
recurrent blocks keep in module attributes.

The generic tests (conservation, forward unchanged, each rule needed, gamma, time blocks) run in test_families.py.
'''
import pytest
import torch

from conftest import assert_snapshots_equal, relative_error, snapshot
from reference import sequential_recurrent_gemma_block
from test_families import build, conservation_error, embeddings_for, explain
from zennit_mamba import MAMBA_LRP_RULES, MambaCanonizer, MambaComposite, RuleSet
from zennit_mamba.families import recurrent_gemma

NAME = 'RecurrentGemma'


def recurrent_blocks(model):
    return [layer.temporal_block for layer in model.model.layers if hasattr(layer.temporal_block, 'rg_lru')]


def with_biases(block: torch.nn.Module) -> torch.nn.Module:
    '''Nonzero biases everywhere in the block (the gates' included), which the relevance of the block's input must
    then pass as the reference does.'''
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in block.named_parameters():
            if 'bias' in name:
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    return block


#: a reset inside the sequence (a second document from position 7), as packed sequences have
POSITIONS = torch.cat([torch.arange(7), torch.arange(6)])[None]


def block_input(block: torch.nn.Module) -> torch.Tensor:
    return torch.randn(2, 13, block.hidden_size, generator=torch.Generator().manual_seed(4), dtype=torch.float64)


def canonized_block_relevance(block, u, output_gradient, rules):
    '''Gradient x input of the canonized block under ``rules`` for the output gradient given.'''
    instances = MambaCanonizer(RuleSet(rules)).apply(block)
    try:
        u = u.clone().requires_grad_()
        output, _ = block(u, position_ids=POSITIONS, attention_mask=None, use_cache=False)
        gradient, = torch.autograd.grad(output, u, output_gradient)
    finally:
        for instance in instances:
            instance.remove()
    return u * gradient, output.detach()


def test_the_canonized_block_computes_the_models_own_block():
    block = with_biases(recurrent_blocks(build(NAME))[0])
    u = block_input(block)
    with torch.no_grad():
        expected, _ = block(u, position_ids=POSITIONS, attention_mask=None, use_cache=False)
    output_gradient = torch.randn(expected.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    _, output = canonized_block_relevance(block, u, output_gradient, MAMBA_LRP_RULES)
    # transformers accumulates the recurrence in float32 whatever the model's dtype; the canonized block in float64
    assert relative_error(output, expected) <= 1e-6


@pytest.mark.parametrize('rules', [MAMBA_LRP_RULES, MAMBA_LRP_RULES - {'ssm'}, MAMBA_LRP_RULES - {'gate', 'silu'}],
                         ids=['all', 'without-ssm', 'without-gate-silu'])
def test_the_block_relevance_equals_the_token_by_token_reference(rules):
    block = with_biases(recurrent_blocks(build(NAME))[1])
    u = block_input(block)
    output_gradient = torch.randn(2, 13, block.hidden_size, generator=torch.Generator().manual_seed(5),
                                  dtype=torch.float64)
    relevance, output = canonized_block_relevance(block, u, output_gradient, rules)
    leaf = u.clone().requires_grad_()
    expected_output = sequential_recurrent_gemma_block(block, leaf, POSITIONS, rules)
    gradient, = torch.autograd.grad(expected_output, leaf, output_gradient)
    assert relative_error(output, expected_output.detach()) <= 1e-12
    assert relative_error(relevance, leaf * gradient) <= 1e-8
    # the rules change the relevance: the reference without them differs
    plain = sequential_recurrent_gemma_block(block, leaf, POSITIONS, ())
    gradient, = torch.autograd.grad(plain, leaf, output_gradient)
    assert relative_error(relevance, leaf * gradient) > 1e-3


def test_the_block_conserves_with_zero_biases_and_needs_the_ssm_rule():
    # R(u) sums to the output's relevance: linear_out, the held recurrence, the half rule and linear_y, linear_x
    # conserve; without the SSM rule the gates take relevance of their own
    block = recurrent_blocks(build(NAME))[0]
    u = block_input(block)
    ones = torch.ones_like(u)
    relevance, output = canonized_block_relevance(block, u, ones, MAMBA_LRP_RULES)
    assert relative_error(relevance.sum(), output.sum()) <= 1e-12
    relevance, output = canonized_block_relevance(block, u, ones, MAMBA_LRP_RULES - {'ssm'})
    assert relative_error(relevance.sum(), output.sum()) > 1e-4


def test_the_whole_model_computes_its_own_logits_in_float64():
    model = build(NAME)
    embeddings = embeddings_for(model)
    with torch.no_grad():
        expected = model(inputs_embeds=embeddings, use_cache=False).logits
        with MambaComposite().context(model) as modified:
            logits = modified(inputs_embeds=embeddings, use_cache=False).logits
        assert relative_error(logits, expected) <= 1e-6
        # the local attention's window (8) is shorter than the sequence (13): the mask carries it
        assert model.config.sliding_window < embeddings.shape[1]


def test_the_soft_capped_logit_is_conserved_at_the_lm_heads_input(monkeypatch):
    model = build(NAME)
    embeddings = embeddings_for(model)
    captured = {}
    # the lm_head's input: the final norm's output after its LN-rule
    handle = model.lm_head.register_forward_pre_hook(lambda module, args: captured.setdefault('h', args[0]))
    try:
        relevance, explained, targets = explain(model, embeddings)
        with MambaComposite(epsilon=1e-12).context(model) as modified:
            leaf = embeddings.clone().requires_grad_()
            captured.clear()
            logits = modified(inputs_embeds=leaf, use_cache=False).logits
            rows = torch.arange(2)
            output_relevance = torch.zeros_like(logits)
            output_relevance[rows, -1, targets] = logits[rows, -1, targets]
            at_input, gradient = torch.autograd.grad(logits, (leaf, captured['h']), output_relevance)
    finally:
        handle.remove()
    # the explained logit is the capped one, tanh(l / cap) * cap, and it is what the relevance sums to, at the
    # lm_head's input (before the cap and the head) as at the embeddings
    cap = model.config.logits_soft_cap
    with torch.no_grad():
        hidden = model.model(inputs_embeds=embeddings, use_cache=False).last_hidden_state
        pre_cap = model.lm_head(hidden)[rows, -1, targets]
    assert relative_error(explained, torch.tanh(pre_cap / cap) * cap) <= 1e-6
    assert (pre_cap - explained).abs().min() > 1e-2  # the cap bites on these logits
    at_head = (captured['h'] * gradient).detach()
    assert (conservation_error(at_head, explained) <= 1e-11).all()  # the stabiliser epsilon=1e-12 alone
    assert (conservation_error(at_input, explained) <= 1e-11).all()
    # without the identity rule on the cap (every other rule on), the relevance sums to neither logit
    monkeypatch.setattr(recurrent_gemma, 'soft_cap', lambda rules, logits, cap: torch.tanh(logits / cap) * cap)
    relevance, explained, _ = explain(model, embeddings, targets=targets)
    assert (conservation_error(relevance, explained) > 1e-3).all()


def test_the_state_attributes_are_left_as_they_were_and_caches_are_refused():
    model = build(NAME)
    embeddings = embeddings_for(model)
    with torch.no_grad():
        model(inputs_embeds=embeddings, use_cache=True)  # generation's states, in the blocks' attributes
    blocks = recurrent_blocks(model)
    states = [(block.conv1d_state, block.rg_lru.recurrent_states) for block in blocks]
    values = [(conv.clone(), recurrent.clone()) for conv, recurrent in states]
    assert all(conv is not None and recurrent.abs().sum() > 0 for conv, recurrent in states)
    before = snapshot(model)
    relevance, explained, _ = explain(model, embeddings)
    assert (conservation_error(relevance, explained) <= 1e-11).all()
    with MambaComposite().context(model) as modified:
        # the config's default, use_cache=True, would overwrite them: refused before anything changes
        for call in (lambda: modified(inputs_embeds=embeddings),
                     lambda: modified(inputs_embeds=embeddings, use_cache=True),
                     lambda: modified.model(inputs_embeds=embeddings),
                     lambda: blocks[0](embeddings, position_ids=torch.arange(13)[None], attention_mask=None)):
            with pytest.raises(RuntimeError, match='use_cache=False and no cache'):
                call()
        from transformers import DynamicCache

        with pytest.raises(RuntimeError, match='use_cache=False and no cache'):
            modified(inputs_embeds=embeddings, use_cache=False, cache=DynamicCache(config=model.config))
        # under the name transformers took before 5.24, which the original still honours
        with pytest.raises(RuntimeError, match='use_cache=False and no cache'):
            modified(inputs_embeds=embeddings, use_cache=False, past_key_values=DynamicCache(config=model.config))
    assert_snapshots_equal(snapshot(model), before)
    for block, (conv, recurrent), (conv_value, recurrent_value) in zip(blocks, states, values):
        assert block.conv1d_state is conv and block.rg_lru.recurrent_states is recurrent
        assert torch.equal(conv, conv_value) and torch.equal(recurrent, recurrent_value)
    # the model's own call still clears them, as before
    with torch.no_grad():
        model(inputs_embeds=embeddings, use_cache=False)
    assert all(block.conv1d_state is None for block in blocks)


def test_a_sliding_window_the_mask_does_not_carry_is_refused():
    # a flash attention model's mask leaves the window to the kernel: the SDPA implementation would attend past it
    from zennit_mamba.core.layers import attention_forward, select_implementation

    model = build(NAME)
    attention = model.model.layers[1].temporal_block
    query = key = value = torch.zeros(1, 4, 13, 8, dtype=torch.float64)
    attributes = select_implementation(attention, probabilities=lambda constant: constant)
    try:
        with pytest.raises(TypeError, match='sliding_window'):
            attention_forward(attention, query, key, value, None, sliding_window=8)
        output, _ = attention_forward(attention, query, key, value, None, sliding_window=13)
        assert output.shape == (1, 13, 4, 8)
    finally:
        attributes.remove()
