'''The Captum front end: agreement with the Zennit core, Captum conventions, bad input, LLM attribution.'''
import importlib.util
import threading

import pytest
import torch
from captum.attr import InputXGradient, LLMGradientAttribution, NoiseTunnel, TextTokenInput
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from captum_mamba import LayerMambaLRP, MambaLRP
from captum_mamba.llm import MambaLLMAttribution
from captum_mamba.visualization import records_to_html, save_text_heatmap, text_record, visualize_text
from zennit_mamba.core.instance import is_canonized
from conftest import assert_snapshots_equal, embed, explain, last_logits, make_mamba, relative_error, snapshot


class Float64Logits(torch.nn.Module):
    '''Logits at the last position in the model's own dtype (transformers casts .logits to float32).'''

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens_or_embeddings):
        if torch.is_floating_point(tokens_or_embeddings):
            return last_logits(self.model, tokens_or_embeddings)
        return last_logits(self.model, self.model.get_input_embeddings()(tokens_or_embeddings))


def token_ids(model, batch, length, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, length), generator=generator)


#: each fixture model's snapshot when it was built, to check that nothing is left behind on it
BUILT = {}


def built(model):
    BUILT[id(model)] = snapshot(model)
    return model


def assert_intact(model):
    '''Every module's attributes, hooks and state are as when the model was built.'''
    assert_snapshots_equal(snapshot(model), BUILT[id(model)])


@pytest.fixture
def model():
    return built(make_mamba(layers=2))


def test_mamba_lrp_equals_zennit_composite(model):
    embeddings = embed(model, 3, 11)
    expected, _, targets = explain(model, embeddings)
    attributions = MambaLRP(Float64Logits(model), epsilon=1e-12).attribute(embeddings, target=targets.tolist())
    assert attributions.shape == embeddings.shape
    assert relative_error(attributions, expected) <= 1e-10


def test_layer_mamba_lrp_on_token_ids_equals_zennit_composite(model):
    ids = token_ids(model, 3, 11)
    expected, _, targets = explain(model, model.get_input_embeddings()(ids).detach())
    wrapper = Float64Logits(model)
    attributions = LayerMambaLRP(wrapper, model.get_input_embeddings(), epsilon=1e-12).attribute(ids, target=targets)
    assert relative_error(attributions, expected) <= 1e-10


@pytest.mark.unmodified_forward
def test_transformers_model_directly(model):
    # float inputs become inputs_embeds, the ModelOutput's 3-D logits are explained at the last position
    ids = token_ids(model, 2, 9)
    embeddings = model.get_input_embeddings()(ids).detach()
    expected, _, targets = explain(model, embeddings)
    attributions = MambaLRP(model, epsilon=1e-12).attribute(embeddings, target=targets)
    layer = LayerMambaLRP(model, model.get_input_embeddings(), epsilon=1e-12).attribute(ids, target=targets)
    # transformers rounds the logits to float32, so the output relevance carries float32 rounding
    assert relative_error(attributions, expected) <= 1e-6
    assert relative_error(layer, expected) <= 1e-6


@pytest.mark.unmodified_forward
def test_convergence_delta_is_tiny_where_input_x_gradient_is_not(model):
    wrapper = Float64Logits(model)
    embeddings = embed(model, 4, 15)
    logits = wrapper(embeddings).detach()
    targets = logits.argmax(-1)
    explained = logits[torch.arange(4), targets]

    lrp = MambaLRP(wrapper, epsilon=1e-12)
    attributions, delta = lrp.attribute(embeddings, target=targets, return_convergence_delta=True)
    assert lrp.has_convergence_delta()
    assert torch.allclose(delta, lrp.compute_convergence_delta(attributions, explained))
    assert (delta.abs() <= 1e-6 * explained.abs()).all()

    baseline = InputXGradient(wrapper).attribute(embeddings, target=targets)
    baseline_delta = lrp.compute_convergence_delta(baseline, explained)
    print(f'relative |delta|: MambaLRP {(delta / explained).abs().max():.1e}, '
          f'InputXGradient {(baseline_delta / explained).abs().min():.1e} (smallest)')
    assert (baseline_delta.abs() > 1e-3 * explained.abs()).all()


def test_batch_with_a_target_per_example_equals_one_at_a_time(model):
    lrp = MambaLRP(Float64Logits(model), epsilon=1e-12)
    embeddings = embed(model, 3, 8)
    targets = [3, 0, 17]
    batch = lrp.attribute(embeddings, target=targets)
    for index, target in enumerate(targets):
        single = lrp.attribute(embeddings[index:index + 1], target=target)
        assert relative_error(batch[index:index + 1], single) <= 1e-12


def test_tuple_inputs_give_tuple_attributions(model):
    class TwoParts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, prefix, suffix):
            return last_logits(self.model, torch.cat([prefix, suffix], dim=1))

    embeddings = embed(model, 2, 10)
    prefix, suffix = embeddings[:, :4], embeddings[:, 4:]
    whole = MambaLRP(Float64Logits(model)).attribute(embeddings, target=1)
    parts = MambaLRP(TwoParts()).attribute((prefix, suffix), target=1)
    assert isinstance(parts, tuple) and parts[0].shape == prefix.shape
    assert relative_error(torch.cat(parts, dim=1), whole) <= 1e-12


def test_noise_tunnel_without_noise_is_mamba_lrp(model):
    lrp = MambaLRP(Float64Logits(model))
    embeddings = embed(model, 2, 6)
    smoothed = NoiseTunnel(lrp).attribute(embeddings, nt_type='smoothgrad', nt_samples=3, stdevs=0.0, target=2)
    assert relative_error(smoothed, lrp.attribute(embeddings, target=2)) <= 1e-12


def test_token_ids_point_to_the_layer_method(model):
    with pytest.raises(TypeError, match=r'LayerMambaLRP\(model, model.get_input_embeddings\(\)\)'):
        MambaLRP(model).attribute(token_ids(model, 1, 5), target=0)
    assert_intact(model)


def test_baselines_are_refused_with_the_reason(model):
    with pytest.raises(TypeError, match='takes no baselines'):
        MambaLRP(model).attribute(embed(model, 1, 5), baselines=torch.zeros(1, 5, 16), target=0)


@pytest.mark.parametrize('target', [40, -1, [1, 99], torch.tensor([0, 40])], ids=['int', 'negative', 'list', 'tensor'])
def test_target_out_of_range_is_a_clear_error_and_leaves_the_model_intact(model, target):
    with pytest.raises(ValueError, match=r'out of range: the model has 40 outputs per example \(valid indices 0 to 39\)'):
        MambaLRP(Float64Logits(model)).attribute(embed(model, 2, 5), target=target)
    assert_intact(model)
    assert not model.training


def test_output_without_logits_is_a_clear_error_and_leaves_the_model_intact(model):
    class NamedHidden(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, embeddings):
            return {'hidden': last_logits(self.model, embeddings)}

    with pytest.raises(TypeError, match='Cannot find the logits in the model output of type dict'):
        MambaLRP(NamedHidden()).attribute(embed(model, 1, 5), target=0)
    assert_intact(model)


def test_missing_target_is_a_clear_error(model):
    with pytest.raises(ValueError, match='target is required: the model has 40 outputs'):
        MambaLRP(Float64Logits(model)).attribute(embed(model, 1, 5))


def test_inputs_keep_their_requires_grad_flag(model):
    lrp = MambaLRP(Float64Logits(model))
    plain = embed(model, 1, 5)
    tracked = plain.clone().requires_grad_()
    assert relative_error(lrp.attribute(tracked, target=1), lrp.attribute(plain, target=1)) == 0
    assert tracked.requires_grad and not plain.requires_grad and tracked.grad is None


class DroppedEmbeddings(Float64Logits):
    '''Dropout on the embeddings before the model: in training mode, another output on every call.'''

    def __init__(self, model):
        super().__init__(model)
        self.dropout = torch.nn.Dropout(0.5)

    def forward(self, embeddings):
        return super().forward(self.dropout(embeddings))


def test_training_mode_is_explained_in_eval_mode_and_restored(model):
    wrapper = DroppedEmbeddings(model).eval()
    lrp = MambaLRP(wrapper)
    embeddings = embed(model, 1, 5)
    expected = lrp.attribute(embeddings, target=1)
    wrapper.train()
    model.backbone.layers[0].eval()  # a mixed state must come back as it was
    flags = [module.training for module in wrapper.modules()]
    assert relative_error(lrp.attribute(embeddings, target=1), expected) == 0
    assert [module.training for module in wrapper.modules()] == flags


def test_a_held_registration_explains_as_each_call_and_restores_the_model_on_leaving(model):
    lrp, layer_lrp = MambaLRP(Float64Logits(model)), LayerMambaLRP(Float64Logits(model), model.get_input_embeddings())
    inputs = [embed(model, 2, 7, seed) for seed in (1, 2)]
    ids = token_ids(model, 2, 7)
    expected = [lrp.attribute(embeddings, target=3) for embeddings in inputs]
    expected_layer = layer_lrp.attribute(ids, target=3)
    before = snapshot(model)
    mixer = model.backbone.layers[0].mixer
    with lrp.registered() as held:
        assert held is lrp and is_canonized(mixer)
        attributions = [lrp.attribute(embeddings, target=3) for embeddings in inputs]
        assert is_canonized(mixer)  # kept between the calls
        with pytest.raises(RuntimeError, match='already active'):
            with lrp.registered():
                pass
        # another explainer, or this one from another thread, registers its own composite: refused while held
        with pytest.raises(RuntimeError, match='already registered'):
            layer_lrp.attribute(ids, target=3)
        errors = []
        thread = threading.Thread(target=lambda: errors.append(pytest.raises(RuntimeError, lrp.attribute,
                                                                             inputs[0], target=3)))
        thread.start()
        thread.join()
        assert len(errors) == 1
        assert is_canonized(mixer)
    assert not is_canonized(mixer)
    assert_snapshots_equal(snapshot(model), before)
    assert all(torch.equal(actual, wanted) for actual, wanted in zip(attributions, expected))
    with layer_lrp.registered():
        assert torch.equal(layer_lrp.attribute(ids, target=3), expected_layer)
    with pytest.raises(ZeroDivisionError):
        with lrp.registered():
            1 / 0
    assert_snapshots_equal(snapshot(model), before)
    assert lrp._holder is None


def word_tokenizer(words):
    tokenizer = Tokenizer(models.WordLevel({word: index for index, word in enumerate(words)}, unk_token=words[0]))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token=words[0])


@pytest.fixture
def language_model():
    words = ['<unk>'] + [f'w{index}' for index in range(39)]
    model = built(make_mamba(layers=2, vocab=len(words), dtype=torch.float32))
    return model, word_tokenizer(words), LayerMambaLRP(model, model.get_input_embeddings(), epsilon=1e-9)


PROMPT, CONTINUATION = 'w1 w5 w9 w3 w7', 'w2 w8'


@pytest.mark.unmodified_forward
def test_llm_attribution_of_logits_is_layer_relevance_of_the_prompt(language_model):
    model, tokenizer, layer_lrp = language_model
    result = MambaLLMAttribution(layer_lrp, tokenizer, target_output='logit').attribute(
        TextTokenInput(PROMPT, tokenizer), target=CONTINUATION)
    assert result.token_attr.shape == (2, 5)
    assert_intact(model)

    ids = tokenizer.encode(PROMPT + ' ' + CONTINUATION, return_tensors='pt')
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits[0]
    for step, token in enumerate(ids[0, 5:].tolist()):
        # generated token `step` explained from the prompt and the tokens generated before it
        context = layer_lrp.attribute(ids[:, :5 + step], target=token).sum(-1)[0]
        assert torch.isclose(context.sum(), logits[4 + step, token], rtol=1e-4)
        # Captum keeps the prompt's share of it
        assert torch.allclose(result.token_attr[step], context[:5], rtol=1e-5, atol=1e-7)


@pytest.mark.unmodified_forward
def test_llm_attribution_of_log_probabilities_is_gradient_x_input_through_log_softmax(language_model):
    model, tokenizer, layer_lrp = language_model
    result = LLMGradientAttribution(layer_lrp, tokenizer).attribute(
        TextTokenInput(PROMPT, tokenizer), target=CONTINUATION)
    ids = tokenizer.encode(PROMPT, return_tensors='pt')
    token = tokenizer.encode(CONTINUATION)[0]
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits[0, -1].double()
    expected = logits[token] - (torch.softmax(logits, -1) * logits).sum()
    assert torch.isclose(result.token_attr[0].sum().double(), expected, rtol=1e-4)
    assert_intact(model)


def test_llm_attribution_refuses_unknown_targets():
    model = make_mamba(layers=1, dtype=torch.float32)
    with pytest.raises(ValueError, match="target_output must be one of"):
        MambaLLMAttribution(LayerMambaLRP(model, model.get_input_embeddings()), word_tokenizer(['a']), 'prob')


def test_visualisation_writes_captum_table_html_and_png(tmp_path):
    record = text_record(['good', 'plot', 'bad'], torch.tensor([2.0, 0.5, -1.0]), 1.5, 1, 0.8, 1, 1, 1e-9)
    assert record.word_attributions.tolist() == [1.0, 0.25, -0.5]
    html_path, png_path = tmp_path / 'heatmap.html', tmp_path / 'heatmap.png'
    save_text_heatmap([record], str(html_path), str(png_path))
    html = html_path.read_text()
    assert html == records_to_html([record])
    # one colour language: Zennit's bwr, the most positive token red, the most negative half-way to blue, a legend
    assert all(f'{word}' in html for word in ['good', 'plot', 'bad']) and 'Legend' in html
    assert 'rgb(255,0,0);' in html and 'rgb(128,128,255);' in html and 'hsl(' not in html
    assert png_path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_visualize_text_shows_the_same_table_or_says_what_it_needs():
    record = text_record(['good', 'bad'], torch.tensor([1.0, -1.0]), 0.5, 1, 0.9, 1, 1)
    if importlib.util.find_spec('IPython') is None:
        with pytest.raises(ImportError, match='needs IPython; elsewhere write them with save_text_heatmap'):
            visualize_text([record])
    else:
        assert visualize_text([record]).data == records_to_html([record])
