'''The relevance of the constants (biases, class tokens, position embeddings): with it, the explained output is
accounted for whole, inputs + constants = output, through the Zennit and the Captum front end.'''
import pytest
import torch
import transformers as tf

from captum_mamba import ExplainedLogits, MambaLRP
from zennit_mamba import MambaComposite
from zennit_mamba.constants import ADDITIVE_NAMES, additive_parameters, constant_relevance
from test_vim import images, tiny_vim


def with_biases(model: torch.nn.Module) -> torch.nn.Module:
    '''Every additive parameter non-zero, as in a trained checkpoint.'''
    torch.manual_seed(3)
    with torch.no_grad():
        for parameter in additive_parameters(model).values():
            parameter.normal_(0.0, 0.5)
    return model


def mamba(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == 'Mamba':
        config = tf.MambaConfig(vocab_size=30, hidden_size=16, state_size=4, num_hidden_layers=2, use_bias=True)
        return with_biases(tf.MambaForCausalLM(config)).double().eval()
    config = tf.Mamba2Config(vocab_size=30, hidden_size=16, num_heads=4, head_dim=8, state_size=8, n_groups=1,
                             num_hidden_layers=2, chunk_size=4, use_bias=True)
    return with_biases(tf.Mamba2ForCausalLM(config)).double().eval()


def token_embeddings(model, batch: int = 3, length: int = 9) -> torch.Tensor:
    ids = torch.randint(0, 30, (batch, length), generator=torch.Generator().manual_seed(4))
    return model.get_input_embeddings()(ids).detach()


def assert_accounted(inputs: torch.Tensor, constants: dict, explained: torch.Tensor, tolerance: float = 1e-6):
    total = inputs + sum(constants.values())
    assert ((total - explained).abs() <= tolerance * explained.abs().clamp(min=1e-3)).all(), (total, explained)


@pytest.mark.parametrize('family', ['Mamba', 'Mamba2'])
def test_inputs_and_constants_make_the_explained_logit_through_zennit(family):
    model = mamba(family)
    embeddings = token_embeddings(model).requires_grad_()
    with MambaComposite(epsilon=1e-12).context(model) as modified:
        explained = modified(inputs_embeds=embeddings).logits[:, -1, 5]
        constants = constant_relevance(explained, model)
        relevance, = torch.autograd.grad(explained, embeddings, explained.detach())
    assert {name.rsplit('.', 1)[-1] for name in constants} == {'bias'}
    assert any('conv1d' in name for name in constants) and any('out_proj' in name for name in constants)
    # without the constants the logit is far from accounted for
    assert (relevance.sum((1, 2)) - explained).abs().min() > 1e-2
    assert_accounted(relevance.sum((1, 2)), constants, explained)


@pytest.mark.parametrize('family', ['Mamba', 'Mamba2'])
def test_inputs_and_constants_make_the_explained_logit_through_captum(family):
    model = mamba(family)
    embeddings = token_embeddings(model)
    targets = torch.tensor([5, 0, 7])
    for forward in (model, ExplainedLogits(model)):
        relevance, delta, constants = MambaLRP(forward, epsilon=1e-12).attribute(
            embeddings, target=targets, return_convergence_delta=True, return_constant_relevance=True)
        with torch.no_grad():
            explained = model(inputs_embeds=embeddings).logits[torch.arange(3), -1, targets]
        assert_accounted(relevance.sum((1, 2)), constants, explained)
        # the convergence delta is the constants' share
        assert torch.allclose(delta, -sum(constants.values()), atol=1e-6)
        # per example: each row's constants differ
        assert len(set(constants[next(iter(constants))].tolist())) == 3


def test_vim_pixels_and_constants_make_the_logit_through_both_front_ends():
    model = with_biases(tiny_vim())
    names = set(additive_parameters(model))
    assert {'cls_token', 'pos_embed', 'patch_embed.proj.bias', 'head.bias'} <= names
    inputs, targets = images(), torch.tensor([0, 4])
    pixels, constants = MambaLRP(model, epsilon=1e-12).attribute(inputs, target=targets,
                                                                  return_constant_relevance=True)
    with torch.no_grad():
        explained = model(inputs)[torch.arange(2), targets]
    assert_accounted(pixels.sum((1, 2, 3)), constants, explained)
    # the position embedding and the class token take a visible share
    assert constants['pos_embed'].abs().min() > 1e-3 and constants['cls_token'].abs().min() > 1e-3

    inputs = inputs.clone().requires_grad_()
    with MambaComposite(epsilon=1e-12).context(model) as modified:
        logits = modified(inputs)
        explained = logits[torch.arange(2), targets]
        zennit_constants = constant_relevance(explained, model)
        relevance, = torch.autograd.grad(explained, inputs, explained.detach())
    assert_accounted(relevance.sum((1, 2, 3)), zennit_constants, explained)
    for name, value in constants.items():
        assert torch.allclose(zennit_constants[name], value, rtol=1e-8, atol=1e-12)


def test_each_additive_name_is_needed():
    '''Leaving a kind of constant out leaves part of the logit unaccounted for (the names' mutation).'''
    model = with_biases(tiny_vim())
    inputs, targets = images(), torch.tensor([0, 4])
    with torch.no_grad():
        explained = model(inputs)[torch.arange(2), targets]
    pixels = MambaLRP(model, epsilon=1e-12).attribute(inputs, target=targets)
    for left_out in ('bias', 'cls_token', 'pos_embed'):
        assert left_out in ADDITIVE_NAMES
        parameters = {name: parameter for name, parameter in additive_parameters(model).items()
                      if name.rsplit('.', 1)[-1] != left_out}
        inputs_ = inputs.clone().requires_grad_()
        with MambaComposite(epsilon=1e-12).context(model) as modified:
            logit = modified(inputs_)[torch.arange(2), targets]
            constants = constant_relevance(logit, model, parameters)
        with pytest.raises(AssertionError):
            assert_accounted(pixels.sum((1, 2, 3)), constants, explained)


def test_frozen_constants_are_explained_and_stay_frozen():
    model = mamba('Mamba').requires_grad_(False)
    embeddings = token_embeddings(model)
    relevance, constants = MambaLRP(model, epsilon=1e-12).attribute(embeddings, target=5,
                                                                     return_constant_relevance=True)
    with torch.no_grad():
        explained = model(inputs_embeds=embeddings).logits[:, -1, 5]
    assert_accounted(relevance.sum((1, 2)), constants, explained)
    assert not any(parameter.requires_grad for parameter in model.parameters())
    # on the Zennit path, the gradient cannot reach a frozen parameter: refused with the fix
    embeddings.requires_grad_()
    with MambaComposite().context(model) as modified:
        explained = modified(inputs_embeds=embeddings).logits[:, -1, 5]
        with pytest.raises(ValueError, match='requires_grad_'):
            constant_relevance(explained, model)


@pytest.mark.parametrize('gamma', [0.25, {'conv1d': 0.5, 'head': 0.1}])
def test_constants_of_layers_under_a_zennit_rule_take_what_the_rule_keeps(gamma):
    '''With the gamma rule on a layer with a bias, the rule computes the bias's share: the input's relevance and all
    constants still make the logit, through both front ends.'''
    model = with_biases(tiny_vim())
    inputs, targets = images(), torch.tensor([0, 4])
    pixels, constants = MambaLRP(model, epsilon=1e-12, gamma=gamma).attribute(inputs, target=targets,
                                                                               return_constant_relevance=True)
    with torch.no_grad():
        explained = model(inputs)[torch.arange(2), targets]
    assert_accounted(pixels.sum((1, 2, 3)), constants, explained)
    ruled = [name for name in constants if 'conv1d' in name]
    assert ruled and all(constants[name].abs().min() > 0 for name in ruled)

    inputs = inputs.clone().requires_grad_()
    with MambaComposite(epsilon=1e-12, gamma=gamma).context(model) as modified:
        explained = modified(inputs)[torch.arange(2), targets]
        zennit_constants = constant_relevance(explained, model)
        relevance, = torch.autograd.grad(explained, inputs, explained.detach())
    assert_accounted(relevance.sum((1, 2, 3)), zennit_constants, explained)


def test_a_bias_two_ruled_layers_share_takes_both_shares():
    '''A Parameter tied across layers under a Zennit rule: each layer's rule keeps its share, both reach it.'''
    model = mamba('Mamba')
    model.backbone.layers[1].mixer.out_proj.bias = model.backbone.layers[0].mixer.out_proj.bias
    embeddings = token_embeddings(model)
    with torch.no_grad():
        explained = model(inputs_embeds=embeddings).logits[:, -1, 5]
    for gamma in (None, {'out_proj': 0.5}):
        relevance, constants = MambaLRP(model, epsilon=1e-12, gamma=gamma).attribute(
            embeddings, target=5, return_constant_relevance=True)
        assert_accounted(relevance.sum((1, 2)), constants, explained)


def test_a_rule_on_a_layer_whose_output_is_held_leaves_it_held():
    '''Qwen3.5's gated attention holds q_proj's output (queries and gate): a Zennit rule there must not attach it to
    the input again (relevance would pass the softmax and the gate, and conservation break by percent).'''
    from zennit.rules import Epsilon
    from test_families import build

    model = build('Qwen3_5')
    embeddings = model.get_input_embeddings()(
        torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(4))).detach()
    with torch.no_grad():
        explained = model(inputs_embeds=embeddings, use_cache=False).logits[:, -1, 5]
    for options in ({'gamma': {'q_proj': 0.0, 'o_proj': 0.0}}, {'layer_map': [(torch.nn.Linear, Epsilon(1e-12))]}):
        relevance = MambaLRP(model, epsilon=1e-12, **options).attribute(embeddings, target=5)
        assert ((relevance.sum((1, 2)) - explained).abs() <= 1e-6 * explained.abs()).all()


def test_refusals_and_warnings_where_the_constants_cannot_be_read():
    from captum.attr import NoiseTunnel
    from zennit.rules import Gamma

    # a ruled layer's frozen bias on the Zennit path: no backward pass would reach its rule
    model = with_biases(tiny_vim())
    model.patch_embed.proj.bias.requires_grad_(False)
    inputs = images().requires_grad_()
    with MambaComposite(layer_map=[(torch.nn.Conv2d, Gamma(0.5))]).context(model) as modified:
        explained = modified(inputs)[:, 0]
        with pytest.raises(ValueError, match='patch_embed.proj.bias does not require a gradient'):
            constant_relevance(explained, model)
    # a model without constants has none, on both paths
    from test_mamba3 import embeddings_of, language_model

    plain = language_model()
    embeddings = embeddings_of(plain).requires_grad_()
    with MambaComposite().context(plain) as modified:
        assert constant_relevance(modified(inputs_embeds=embeddings)[:, -1, 0], plain) == {}
    assert MambaLRP(plain).attribute(embeddings.detach(), target=0, return_constant_relevance=True)[1] == {}
    # NoiseTunnel averages attributions only
    model = mamba('Mamba')
    embeddings = token_embeddings(model)
    with pytest.raises(ValueError, match='NoiseTunnel'):
        NoiseTunnel(MambaLRP(model)).attribute(embeddings, nt_type='smoothgrad', nt_samples=2, target=5,
                                               return_constant_relevance=True)
    # a forward function with parameters outside model=, and an ablation: not accounted for, said so
    head = torch.nn.Linear(30, 3).double()
    forward = lambda inputs: head(model(inputs_embeds=inputs, use_cache=False).logits[:, -1].double())  # noqa: E731
    with pytest.warns(UserWarning, match='unaccounted'):
        MambaLRP(forward, model=model, epsilon=1e-12).attribute(embeddings, target=1, return_constant_relevance=True)
    with pytest.warns(UserWarning, match='not conserved'):
        MambaLRP(model, rules=()).attribute(embeddings, target=1, return_constant_relevance=True)
