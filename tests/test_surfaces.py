'''The surfaces beside the explanation itself, tried as a careless user would: a registration held across calls,
positions, gamma and layer_map selectors, computed or wrapped weights, forwards replaced by the user, Zennit rules
that credit zero inputs, forward functions that transform their input, metrics on padded batches, the LLM class,
gradients taken at the wrong time. Each case either works exactly or raises one clear error with the model left as
it was.'''
import copy
import threading
from fnmatch import fnmatchcase

import pytest
import torch
from captum.attr import InputXGradient, IntegratedGradients, LayerIntegratedGradients, Saliency, TextTokenInput
from zennit.rules import Epsilon, Flat, Gamma, WSquare

from captum_mamba import ExplainedLogits, LayerMambaLRP, MambaLRP
from captum_mamba.llm import MambaLLMAttribution
from captum_mamba.metrics import faithfulness
from conftest import assert_snapshots_equal, make_mamba, relative_error, snapshot, word_tokenizer
from test_families import BUILDERS, REFUSES_LEFT_PADDING, build
from test_misuse import MAMBA_SSM, model_of
from test_vim import images as vim_images, tiny_vim
from zennit_mamba import MAMBA_LRP_RULES as ALL_RULES, MambaComposite
from zennit_mamba.support import UnsupportedModelError

LANGUAGE_MODELS = ['Mamba'] + list(BUILDERS)
#: the same cases on mamba-ssm's MambaLMHeadModel with each of its mixers, in float32 on a GPU (skipped elsewhere)
WITH_MAMBA_SSM = LANGUAGE_MODELS + MAMBA_SSM
#: for cases that also run transformers' own forward (which calls mamba-ssm's CUDA kernels where it is installed)
UNMODIFIED = [pytest.param(name, marks=pytest.mark.unmodified_forward) for name in LANGUAGE_MODELS]
#: attributes the unmodified model's own forward writes at every call: RecurrentGemma's RG-LRU keeps its last state
#: (so a user's own gradient changes the model, with or without MambaLRP; MambaLRP's forward leaves it untouched)
OWN_FORWARD_WRITES = ('recurrent_states',)


def without_own_writes(state: dict) -> dict:
    '''A :py:func:`~conftest.snapshot` without the attributes of :data:`OWN_FORWARD_WRITES`.'''
    dicts = {name: {key: value for key, value in attributes.items() if key not in OWN_FORWARD_WRITES}
             for name, attributes in state['dicts'].items()}
    return dict(state, dicts=dicts)


def language_model(name):
    return model_of(name) if name.startswith('mamba-ssm') else make_mamba() if name == 'Mamba' else build(name)


def embeddings_of(model, batch=2, length=9):
    layer = ExplainedLogits(model).embeddings
    return layer(token_ids(batch, length).to(layer.weight.device)).detach()


def token_ids(batch=2, length=9, seed=1):
    return torch.randint(3, 40, (batch, length), generator=torch.Generator().manual_seed(seed))


def padded(padding, batch=3, length=9):
    '''Token ids and a mask with 0, 2 and 4 pads on the ``padding`` side.'''
    ids, mask = token_ids(batch, length), torch.ones(batch, length, dtype=torch.long)
    for example, pads in enumerate((0, 2, 4)[:batch]):
        if pads:
            (mask[example, :pads] if padding == 'left' else mask[example, length - pads:]).zero_()
    return ids.masked_fill(mask == 0, 0), mask


def plain_gradients(wrapped, embeddings, target=3):
    '''Captum's other methods and a gradient of one's own, on ``wrapped`` (an ExplainedLogits).'''
    leaf = embeddings.clone().requires_grad_()
    own, = torch.autograd.grad(wrapped(leaf)[:, target].sum(), leaf)
    return [IntegratedGradients(wrapped).attribute(embeddings, target=target, n_steps=3),
            Saliency(wrapped).attribute(embeddings, target=target),
            InputXGradient(wrapped).attribute(embeddings, target=target), own]


# --- a registration held across calls: other methods, own gradients, inactive(), after leaving -----------------

@pytest.mark.parametrize('name', UNMODIFIED + MAMBA_SSM)
@pytest.mark.parametrize('holder', ['MambaLRP', 'LayerMambaLRP'])
def test_other_methods_inside_a_held_registration_see_the_unmodified_model(name, holder):
    model = language_model(name)
    untouched = copy.deepcopy(model)
    wrapped = ExplainedLogits(model)
    embeddings = embeddings_of(model)
    expected = plain_gradients(ExplainedLogits(untouched), embeddings)
    explainer = MambaLRP(wrapped) if holder == 'MambaLRP' else LayerMambaLRP(wrapped, wrapped.embeddings)
    explained = embeddings if holder == 'MambaLRP' else token_ids().to(embeddings.device)
    outside = explainer.attribute(explained, target=3)
    before = snapshot(model)
    with explainer.registered():
        first = explainer.attribute(explained, target=3)
        actual = plain_gradients(wrapped, embeddings)
        last = explainer.attribute(explained, target=3)
    for got, wanted in zip(actual, expected):
        # mamba-ssm's models run in float32, where GPU kernels may add in another order each call
        assert relative_error(got, wanted) <= (1e-10 if embeddings.dtype == torch.float64 else 1e-5)
    assert torch.equal(first, outside) and torch.equal(last, outside)
    assert_snapshots_equal(without_own_writes(snapshot(model)), without_own_writes(before))


@pytest.mark.unmodified_forward
def test_another_thread_sees_the_unmodified_model_while_a_registration_is_held():
    model = make_mamba()
    wrapped, untouched = ExplainedLogits(model), ExplainedLogits(copy.deepcopy(model))
    embeddings = wrapped.embeddings(token_ids()).detach()
    expected = plain_gradients(untouched, embeddings)[-1]
    lrp = MambaLRP(wrapped)
    results = []
    with lrp.registered():
        thread = threading.Thread(target=lambda: results.append(plain_gradients(wrapped, embeddings)[-1]))
        thread.start()
        thread.join()
    assert torch.equal(results[0], expected)


@pytest.mark.parametrize('name', UNMODIFIED + ['Vim'])
def test_zennit_inactive_gives_the_plain_gradient_inside_the_context(name):
    model = tiny_vim() if name == 'Vim' else language_model(name)
    untouched = copy.deepcopy(model)
    inputs = vim_images() if name == 'Vim' else ExplainedLogits(model).embeddings(token_ids()).detach()

    def gradient(module):
        leaf = inputs.clone().requires_grad_()
        output = module(leaf) if name == 'Vim' else module(inputs_embeds=leaf, use_cache=False).logits[:, -1]
        return torch.autograd.grad(output[:, 3].sum(), leaf)[0]

    composite = MambaComposite()
    with composite.context(model) as modified:
        explained = gradient(modified)
        with composite.inactive():
            plain = gradient(modified)
        again = gradient(modified)
    assert relative_error(plain, gradient(untouched)) <= 1e-10
    assert relative_error(explained, plain) > 1e-3 and torch.equal(explained, again)


@pytest.mark.parametrize('name', WITH_MAMBA_SSM + ['Vim'])
def test_a_gradient_taken_after_the_context_is_left_is_refused(name):
    model = tiny_vim() if name == 'Vim' else language_model(name)
    inputs = vim_images() if name == 'Vim' else embeddings_of(model)
    leaf = inputs.clone().requires_grad_()
    with MambaComposite().context(model) as modified:
        output = modified(leaf) if name == 'Vim' else ExplainedLogits(modified)(leaf)
    with pytest.raises(RuntimeError, match='composite was removed since the forward pass'):
        torch.autograd.grad(output[:, 3].sum(), leaf)


@pytest.mark.parametrize('transform', ['vjp', 'grad'])
def test_torch_func_transforms_are_refused_with_the_way_out(transform):
    model = make_mamba()
    embeddings = ExplainedLogits(model).embeddings(token_ids()).detach()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match='torch.func transform.*torch.autograd.grad'):
        with MambaComposite().context(model) as modified:
            logits = lambda inputs: modified(inputs_embeds=inputs, use_cache=False).logits[:, -1, 3]  # noqa: E731
            if transform == 'vjp':
                torch.func.vjp(logits, embeddings)
            else:
                torch.func.grad(lambda inputs: logits(inputs).sum())(embeddings)
    assert_snapshots_equal(snapshot(model), before)


# --- positions ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', LANGUAGE_MODELS)
@pytest.mark.parametrize('padding, position', [('left', 1), ('right', -2), ('right', 8)])
@pytest.mark.parametrize('entry', ['MambaLRP', 'LayerMambaLRP', 'ExplainedLogits'])
def test_a_chosen_position_that_is_a_pad_is_refused(name, padding, position, entry):
    model = language_model(name)
    ids, mask = padded(padding)
    embeddings = model.get_input_embeddings()(ids).detach()
    before = snapshot(model)
    # RecurrentGemma refuses left padding itself (its recurrent blocks do not read the mask)
    refusal = 'do not read the attention mask' if name in REFUSES_LEFT_PADDING and padding == 'left' else \
        f'position {position} is padding in examples'
    with pytest.raises(ValueError, match=refusal):
        if entry == 'MambaLRP':
            MambaLRP(model, position=position).attribute(embeddings, target=3, additional_forward_args=(mask,))
        elif entry == 'LayerMambaLRP':
            LayerMambaLRP(model, model.get_input_embeddings(), position=position).attribute(
                ids, target=3, additional_forward_args=(mask,))
        else:
            MambaLRP(ExplainedLogits(model, position=position)).attribute(
                embeddings, target=3, additional_forward_args=(mask,))
    assert_snapshots_equal(snapshot(model), before)


# --- selectors ---------------------------------------------------------------------------------------------------

SELECTS_NOTHING = [
    ({'outproj': 0.25}, "'outproj' \\(did you mean 'out_proj'"),
    ({'mixer.out_proj': 0.25}, "'mixer.out_proj' \\(did you mean"),
    ({'backbone.layer.0.*': 0.25}, "'backbone.layer.0.\\*'"),
    ({torch.nn.Conv2d: 0.25}, 'Conv2d \\(no such layer'),
    ({'out_proj': 0.25, 'norm': 0.25}, "'norm'"),
]


@pytest.mark.parametrize('name', ['Mamba', 'Mamba2', 'Jamba', 'FalconH1'])
@pytest.mark.parametrize('gamma, message', SELECTS_NOTHING)
def test_a_gamma_key_that_selects_no_layer_is_refused(name, gamma, message):
    model = language_model(name)
    embeddings = model.get_input_embeddings()(token_ids()).detach()
    before = snapshot(model)
    with pytest.raises(ValueError, match='gamma selects no linear or convolution layer for .*' + message):
        MambaLRP(model, gamma=gamma).attribute(embeddings, target=3)
    with pytest.raises(ValueError, match='gamma selects no linear or convolution layer'):
        with MambaComposite(gamma=gamma).context(model):
            pass
    assert_snapshots_equal(snapshot(model), before)


@pytest.mark.parametrize('layer_map', [[(torch.nn.Conv2d, Flat())], [(torch.nn.Linear, Epsilon()),
                                                                      (torch.nn.Linear, Gamma())]],
                         ids=['absent type', 'shadowed entry'])
def test_a_layer_map_entry_that_selects_nothing_is_refused(layer_map):
    model = make_mamba()
    before = snapshot(model)
    with pytest.raises(ValueError, match='layer_map entries \\(.*\\) select no module'):
        with MambaComposite(layer_map=layer_map).context(model):
            pass
    assert_snapshots_equal(snapshot(model), before)


@pytest.mark.parametrize('name', ['Mamba', 'Mamba2', 'Jamba'])
def test_two_gamma_keys_on_one_layer_must_agree(name):
    model = language_model(name)
    embeddings = model.get_input_embeddings()(token_ids()).detach()
    pattern = next(key for key in ('backbone.layers.0.*', 'model.layers.0.*')
                   if any(module_name.startswith(key[:-2]) for module_name, _ in model.named_modules()))
    with pytest.raises(ValueError, match="different values \\('out_proj': 0.25, '.*': 0.5\\)"):
        MambaLRP(model, gamma={'out_proj': 0.25, pattern: 0.5}).attribute(embeddings, target=3)
    agreeing = MambaLRP(model, gamma={'out_proj': 0.25, pattern: 0.25}, epsilon=1e-12).attribute(embeddings, target=3)
    # the same layers as disjoint keys: the pattern, and every other out_proj by its name
    others = {module_name: 0.25 for module_name, _ in model.named_modules()
              if module_name.endswith('out_proj') and not fnmatchcase(module_name, pattern)}
    expected = MambaLRP(model, gamma={pattern: 0.25, **others}, epsilon=1e-12).attribute(embeddings, target=3)
    assert others and relative_error(agreeing, expected) <= 1e-12


# --- computed and wrapped weights ----------------------------------------------------------------------------------

class Halved(torch.nn.Module):
    '''A parametrization: the stored tensor is twice the weight the layer computes with.'''

    def forward(self, weight):
        return weight / 2

    def right_inverse(self, weight):
        return weight * 2


def computed(layer, how):
    if how == 'parametrize':
        torch.nn.utils.parametrize.register_parametrization(layer, 'weight', Halved())
    elif how == 'weight_norm':
        torch.nn.utils.parametrizations.weight_norm(layer)
    elif how == 'old weight_norm':
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', FutureWarning)
            torch.nn.utils.weight_norm(layer)


@pytest.mark.parametrize('name', ['Mamba', 'Mamba2'])
@pytest.mark.parametrize('how', ['parametrize', 'weight_norm', 'old weight_norm'])
def test_gamma_on_a_computed_weight_is_gamma_on_the_weight_it_computes(name, how):
    model = language_model(name)
    embeddings = model.get_input_embeddings()(token_ids()).detach()
    gamma = {'out_proj': 0.25, 'in_proj': 0.5}
    expected = MambaLRP(model, gamma=gamma, epsilon=1e-12).attribute(embeddings, target=3)
    plain = MambaLRP(model, epsilon=1e-12).attribute(embeddings, target=3)
    for module_name, module in list(model.named_modules()):
        if module_name.endswith(('out_proj', 'in_proj')):
            computed(module, how)
    assert relative_error(MambaLRP(model, gamma=gamma, epsilon=1e-12).attribute(embeddings, target=3), expected) \
        <= 1e-12
    assert relative_error(expected, plain) > 1e-3  # gamma changes the relevance: LRP-0 would be caught


class LoRA(torch.nn.Module):
    '''A LoRA adapter's layout (peft's names): the base layer plus a low-rank update.'''

    def __init__(self, base):
        super().__init__()
        self.base_layer = base
        self.lora_A = torch.nn.Linear(base.in_features, 2, bias=False, dtype=base.weight.dtype)
        self.lora_B = torch.nn.Linear(2, base.out_features, bias=False, dtype=base.weight.dtype)
        torch.nn.init.normal_(self.lora_B.weight, std=0.1)

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x))


def with_adapters(model):
    for module in list(model.modules()):
        if 'in_proj' in module._modules and isinstance(module.in_proj, torch.nn.Linear):
            module.in_proj = LoRA(module.in_proj)
    return model


@pytest.mark.parametrize('name', ['Mamba', 'Mamba2', 'Zamba2'])
@pytest.mark.parametrize('gamma', [0.25, {'in_proj': 0.25}, {'*.in_proj': 0.25}], ids=['float', 'name', 'pattern'])
def test_gamma_on_a_wrapped_layer_is_refused_and_its_layers_can_be_selected(name, gamma):
    model = with_adapters(language_model(name))
    embeddings = model.get_input_embeddings()(token_ids()).detach()
    before = snapshot(model)
    with pytest.raises(ValueError, match="selects '.*in_proj', a LoRA, which is not a linear.*\\.in_proj\\.base_layer"):
        MambaLRP(model, gamma=gamma).attribute(embeddings, target=3)
    assert_snapshots_equal(snapshot(model), before)
    relevance, delta = MambaLRP(model, gamma={'*.in_proj.*': 0.25}, epsilon=1e-12).attribute(
        embeddings, target=3, return_convergence_delta=True)
    explained = relevance.sum((1, 2)) - delta
    assert (delta.abs() <= 1e-6 * explained.abs()).all()  # float32 logits of Mamba-only models
    plain = MambaLRP(model, epsilon=1e-12).attribute(embeddings, target=3)
    assert relative_error(relevance, plain) > 1e-3


def test_a_zennit_rule_on_a_wrapper_type_is_refused():
    model = with_adapters(make_mamba())
    before = snapshot(model)
    with pytest.raises(TypeError, match='Gamma computes with the parameters .* this LoRA holds none of its own'):
        with MambaComposite(layer_map=[(LoRA, Gamma(0.25))]).context(model):
            pass
    assert_snapshots_equal(snapshot(model), before)


# --- forwards replaced by the user ---------------------------------------------------------------------------------

def mixers_of(model):
    from zennit_mamba.support import mixer_types
    return [module for module in model.modules() if type(module) in mixer_types()]


@pytest.mark.parametrize('name', WITH_MAMBA_SSM + ['Vim'])
def test_a_forward_replaced_on_a_mixer_instance_is_refused(name):
    model = tiny_vim() if name == 'Vim' else language_model(name)
    mixer = mixers_of(model)[0]
    original = mixer.forward

    def patched(*args, **kwargs):
        output = original(*args, **kwargs)
        return (2 * output[0],) + tuple(output[1:]) if isinstance(output, tuple) else 2 * output

    mixer.forward = patched
    before = snapshot(model)
    with pytest.raises(UnsupportedModelError, match="at '.*' \\(forward set on the instance \\('.*patched'\\)\\)"):
        with MambaComposite().context(model):
            pass
    assert_snapshots_equal(snapshot(model), before)


def test_a_forward_replaced_on_the_mixer_class_is_refused(monkeypatch):
    from transformers.models.mamba.modeling_mamba import MambaMixer
    model = make_mamba()

    def forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
        return 2 * original(self, hidden_states, cache, attention_mask, **kwargs)

    original = MambaMixer.forward
    monkeypatch.setattr(MambaMixer, 'forward', forward)
    with pytest.raises(UnsupportedModelError, match='forward replaced on the class by .*forward'):
        with MambaComposite().context(model):
            pass


# --- Zennit rules that credit zero inputs ----------------------------------------------------------------------------

@pytest.mark.parametrize('rule', [Flat, WSquare])
@pytest.mark.parametrize('entry', ['MambaLRP', 'Zennit'])
def test_a_rule_that_credits_zero_pixels_is_exact_at_the_first_layer(rule, entry):
    model = tiny_vim()
    inputs = vim_images()
    inputs[:, :, :6] = 0  # a black band: a third of the pixels are exactly 0
    targets = model(inputs).argmax(-1)
    layer_map = [(torch.nn.Conv2d, rule())]
    if entry == 'MambaLRP':
        pixels = MambaLRP(model, epsilon=1e-12, layer_map=layer_map).attribute(inputs, target=targets)
    else:
        leaf = inputs.clone().requires_grad_()
        with MambaComposite(epsilon=1e-12, layer_map=layer_map).context(model) as modified:
            logits = modified(leaf)
            chosen = logits[torch.arange(2), targets]
            pixels, = torch.autograd.grad(chosen, leaf, chosen.detach())
    patches = LayerMambaLRP(model, model.patch_embed, epsilon=1e-12, layer_map=layer_map).attribute(
        inputs, target=targets)
    # the same rule, applied by Zennit itself to the convolution with the patches' relevance as its output relevance
    convolution, leaf = model.patch_embed.proj, inputs.clone().requires_grad_()
    handles = rule().register(convolution)
    try:
        output = convolution(leaf)
        expected, = torch.autograd.grad(output, leaf, patches.transpose(1, 2).reshape(output.shape))
    finally:
        handles.remove()
    # the Zennit context divides by the logit stabilised by epsilon, the patches' relevance (Captum) does not
    assert relative_error(pixels, expected) <= (1e-12 if entry == 'MambaLRP' else 1e-9)
    assert pixels[:, :, :6].abs().sum() > 1e-3 * pixels.abs().sum()  # the zero pixels hold relevance


@pytest.mark.parametrize('model_name', ['Vim (scaled input)', 'EfficientViM'])
def test_a_rule_that_credits_zero_inputs_inside_the_model_is_refused(model_name):
    if model_name == 'EfficientViM':
        pytest.importorskip('timm')
        from test_efficientvim import images as efficientvim_images, tiny_efficientvim
        model, inputs = tiny_efficientvim(), efficientvim_images()
        forward = model  # the stem's later convolutions take ReLU outputs, zero in places
    else:
        model, inputs = tiny_vim(), vim_images()
        inputs[:, :, :6] = 0
        forward = lambda images: model(2 * images)  # noqa: E731  the convolution's input is computed
    before = snapshot(model)
    with pytest.raises(RuntimeError, match='Flat on a Conv2d gives relevance to input elements that are exactly 0'):
        MambaLRP(forward, model=model, layer_map=[(torch.nn.Conv2d, Flat())]).attribute(inputs, target=1)
    assert_snapshots_equal(snapshot(model), before)


# --- forward functions that transform their input -------------------------------------------------------------------

@pytest.mark.parametrize('name', LANGUAGE_MODELS)
def test_a_scaled_input_passes_its_relevance_on_exactly(name):
    model = language_model(name)
    wrapped = ExplainedLogits(model)
    embeddings = wrapped.embeddings(token_ids()).detach()
    scaled, delta = MambaLRP(lambda inputs: wrapped(4 * inputs), model=model, epsilon=1e-12).attribute(
        embeddings, target=3, return_convergence_delta=True)
    expected = MambaLRP(wrapped, epsilon=1e-12).attribute(4 * embeddings, target=3)
    assert relative_error(scaled, expected) <= 1e-12
    assert (delta.abs() <= 1e-6 * scaled.sum((1, 2)).abs()).all()


def test_a_normalised_image_gives_its_shift_a_share_as_a_bias():
    model = tiny_vim()
    raw = vim_images().sigmoid()
    normalised = (raw - 0.5) / 0.25
    target = model(normalised).argmax(-1)
    attributions, delta = MambaLRP(lambda images: model((images - 0.5) / 0.25), model=model, epsilon=1e-12).attribute(
        raw, target=target, return_convergence_delta=True)
    # LRP-0 on the normalisation x' = 4 x - 2: R(x) = x * 4 * R(x') / x', the shift -2 takes the rest
    relevance, normalised_delta = MambaLRP(model, epsilon=1e-12).attribute(normalised, target=target,
                                                                          return_convergence_delta=True)
    assert relative_error(attributions, raw * 4 * relevance / normalised) <= 1e-10
    shift_share = (-2 * relevance / normalised).sum((1, 2, 3))
    assert relative_error(delta, normalised_delta - shift_share) <= 1e-8
    assert (shift_share.abs() > 1e-3 * normalised_delta.abs()).all()  # the shift's share is what differs


# --- metrics on padded batches --------------------------------------------------------------------------------------

@pytest.mark.unmodified_forward
@pytest.mark.parametrize('name', ['Mamba', 'Mamba2', 'Jamba', 'Zamba2'])
@pytest.mark.parametrize('padding', ['left', 'right'])
def test_faithfulness_of_a_padded_batch_is_each_example_alone(name, padding):
    model = language_model(name)
    wrapped = ExplainedLogits(model)
    ids, mask = padded(padding)
    embeddings = wrapped.embeddings(ids).detach()
    attributions = MambaLRP(wrapped).attribute(embeddings, target=3, additional_forward_args=(mask,))
    together = faithfulness(wrapped, embeddings, attributions, target=3, additional_forward_args=(mask,), step=2,
                            insertion_baseline=0.5)
    for example in range(len(ids)):
        real = mask[example].bool()
        alone = faithfulness(wrapped, embeddings[example:example + 1, real], attributions[example:example + 1, real],
                             target=3, step=2, insertion_baseline=0.5)
        points = alone.morf.shape[1]
        for field in ('morf', 'lerf', 'insertion_morf', 'insertion_lerf'):
            assert relative_error(getattr(together, field)[example, :points], getattr(alone, field)[0]) <= 1e-5
            assert getattr(together, field)[example, points:].isnan().all()
        assert torch.equal(together.fractions[example, :points], alone.fractions)
        for field in ('delta_af', 'delta_ai'):
            assert abs(getattr(together, field)[example] - getattr(alone, field)[0]) <= 1e-5


# --- the LLM class ----------------------------------------------------------------------------------------------------

def test_the_llm_class_refuses_a_method_whose_rows_sum_to_no_explained_output():
    model = make_mamba()
    with pytest.raises(TypeError, match="LayerIntegratedGradients's attributions sum to something else.*"
                                        "LLMGradientAttribution"):
        MambaLLMAttribution(LayerIntegratedGradients(model, model.get_input_embeddings()), word_tokenizer())


@pytest.mark.unmodified_forward
def test_the_llm_class_inside_a_held_registration_and_an_empty_target():
    model, tokenizer = make_mamba(), word_tokenizer()
    lrp = LayerMambaLRP(model, model.get_input_embeddings(), epsilon=1e-12)
    prompt = TextTokenInput('the plot was', tokenizer)
    made_before = MambaLLMAttribution(lrp, tokenizer)
    expected = made_before.attribute(prompt, target='good film').all_token_attr
    with lrp.registered():
        inside = MambaLLMAttribution(lrp, tokenizer).attribute(prompt, target='good film').all_token_attr
        before = made_before.attribute(prompt, target='good film').all_token_attr
    assert torch.equal(inside, expected) and torch.equal(before, expected)
    with pytest.raises(ValueError, match="The target '' has no tokens"):
        made_before.attribute(prompt, target='')


# --- arguments in the wrong container ---------------------------------------------------------------------------------

@pytest.mark.parametrize('entry', ['MambaLRP', 'LayerMambaLRP', 'faithfulness', 'ExplainedLogits'])
def test_a_dict_of_further_arguments_is_refused_with_the_way_out(entry):
    model = make_mamba()
    ids, mask = padded('left')
    embeddings = model.get_input_embeddings()(ids).detach()
    arguments = {'attention_mask': mask}
    before = snapshot(model)
    with pytest.raises(TypeError, match='additional_forward_args=\\(.*attention_mask.*\\)'):
        if entry == 'MambaLRP':
            MambaLRP(model).attribute(embeddings, target=3, additional_forward_args=arguments)
        elif entry == 'LayerMambaLRP':
            LayerMambaLRP(model, model.get_input_embeddings()).attribute(ids, target=3,
                                                                         additional_forward_args=arguments)
        elif entry == 'faithfulness':
            faithfulness(ExplainedLogits(model), embeddings, embeddings, target=3, additional_forward_args=arguments)
        else:
            MambaLRP(ExplainedLogits(model)).attribute(embeddings, target=3, additional_forward_args=(arguments,))
    assert_snapshots_equal(snapshot(model), before)


# --- what a second round of trying found ------------------------------------------------------------------------------

@pytest.mark.parametrize('name', ['Mamba', 'Mamba2', 'Jamba'])
def test_a_forward_function_that_calls_the_model_in_parts_is_explained_whole(name):
    model = language_model(name)
    wrapped = ExplainedLogits(model)
    embeddings = wrapped.embeddings(token_ids()).detach()
    backbone, head = model.base_model, model.get_output_embeddings()

    def in_parts(inputs):
        return head(backbone(inputs_embeds=inputs, use_cache=False).last_hidden_state[:, -1])

    parts, delta = MambaLRP(in_parts, model=model, epsilon=1e-12).attribute(embeddings, target=3,
                                                                           return_convergence_delta=True)
    whole = MambaLRP(wrapped, epsilon=1e-12).attribute(embeddings, target=3)
    assert relative_error(parts, whole) <= 1e-6  # Mamba-only models' .logits are float32
    assert (delta.abs() <= 1e-10 * parts.sum((1, 2)).abs()).all()


@pytest.mark.unmodified_forward
@pytest.mark.parametrize('name', ['Mamba', 'Mamba2', 'Jamba'])
@pytest.mark.parametrize('padding', ['left', 'right'])
def test_a_float_attention_mask_is_a_mask_and_other_arguments_are_refused(name, padding):
    model = language_model(name)
    ids, mask = padded(padding)
    embeddings = model.get_input_embeddings()(ids).detach()
    lrp = MambaLRP(model, epsilon=1e-12)
    expected = lrp.attribute(embeddings, target=3, additional_forward_args=(mask,))
    assert torch.equal(lrp.attribute(embeddings, target=3, additional_forward_args=(mask.double(),)), expected)
    scores = expected.sum(-1)
    as_ints = faithfulness(ExplainedLogits(model), embeddings, scores, target=3, additional_forward_args=(mask,))
    as_floats = faithfulness(ExplainedLogits(model), embeddings, scores, target=3,
                             additional_forward_args=(mask.double(),))
    assert torch.equal(as_ints.delta_af, as_floats.delta_af)
    before = snapshot(model)
    for arguments in [(ids,), (mask, mask), (mask[:, 1:],), ([1, 0],)]:
        with pytest.raises(TypeError, match='only an attention_mask among additional_forward_args'):
            lrp.attribute(embeddings, target=3, additional_forward_args=arguments)
    assert_snapshots_equal(snapshot(model), before)


def test_a_class_forward_replaced_with_functools_wraps_is_refused(monkeypatch):
    import functools
    from transformers.models.mamba.modeling_mamba import MambaMixer
    original = MambaMixer.forward

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        return 2 * original(self, *args, **kwargs)

    monkeypatch.setattr(MambaMixer, 'forward', forward)
    with pytest.raises(UnsupportedModelError, match="forward replaced on the class by 'MambaMixer.forward' from "
                                                     ".*test_surfaces.py"):
        with MambaComposite().context(make_mamba()):
            pass


def test_gamma_on_a_pruned_weight_is_gamma_on_the_weight_it_computes():
    import torch.nn.utils.prune as prune
    model = make_mamba()
    embeddings = model.get_input_embeddings()(token_ids()).detach()
    pruned = copy.deepcopy(model)
    for layer in pruned.backbone.layers:
        prune.l1_unstructured(layer.mixer.in_proj, 'weight', 0.3)
    materialised = copy.deepcopy(model)
    for layer, source in zip(materialised.backbone.layers, pruned.backbone.layers):
        layer.mixer.in_proj.weight.data.copy_(source.mixer.in_proj.weight)
    gamma = {'in_proj': 0.25}
    expected = MambaLRP(materialised, gamma=gamma, epsilon=1e-12).attribute(embeddings, target=3)
    assert relative_error(MambaLRP(pruned, gamma=gamma, epsilon=1e-12).attribute(embeddings, target=3),
                          expected) <= 1e-12
    assert relative_error(MambaLRP(pruned, epsilon=1e-12).attribute(embeddings, target=3), expected) > 1e-4


@pytest.mark.unmodified_forward
@pytest.mark.parametrize('name', ['Mamba', 'Mamba2', 'Bamba'])
def test_a_hook_on_a_module_the_original_forward_does_not_call(name):
    model = language_model(name)
    embeddings = model.get_input_embeddings()(token_ids()).detach()
    conv1d = mixers_of(model)[0].conv1d
    with torch.no_grad():
        expected = ExplainedLogits(model)(embeddings)
    # a pre-hook (spectral_norm sets the weight in one) would change the model if called: refused, model untouched
    torch.nn.utils.spectral_norm(conv1d)
    before = snapshot(model)
    with pytest.raises(UnsupportedModelError, match="conv1d' \\(a forward pre-hook: .*remove it while explaining"):
        MambaLRP(model).attribute(embeddings, target=3)
    assert_snapshots_equal(snapshot(model), before)
    with torch.no_grad():
        assert torch.equal(ExplainedLogits(model)(embeddings), expected)
    torch.nn.utils.remove_spectral_norm(conv1d)
    # a forward hook that changes the output is refused; one that observes it is called (Captum's layer methods)
    handle = conv1d.register_forward_hook(lambda module, args, output: 2 * output)
    with pytest.raises(RuntimeError, match='A forward hook on a Conv1d inside a Mamba mixer changes its output'):
        MambaLRP(model).attribute(embeddings, target=3)
    handle.remove()
    seen = []
    handle = conv1d.register_forward_hook(lambda module, args, output: seen.append(output.shape))
    MambaLRP(model).attribute(embeddings, target=3)
    handle.remove()
    assert seen


def test_a_backward_inside_inactive_of_a_forward_with_the_rules_is_refused():
    model = make_mamba()
    embeddings = ExplainedLogits(model).embeddings(token_ids()).detach().requires_grad_()
    composite = MambaComposite(gamma=0.25)
    with composite.context(model) as modified:
        logits = modified(inputs_embeds=embeddings, use_cache=False).logits[:, -1, 3]
        with composite.inactive(), pytest.raises(RuntimeError, match='inside composite.inactive\\(\\) through a'):
            torch.autograd.grad(logits.sum(), embeddings)


def test_a_detached_input_is_refused_not_explained_as_zero():
    model = make_mamba()
    embeddings = ExplainedLogits(model).embeddings(token_ids()).detach()
    with pytest.raises(ValueError, match='no gradient path to input 0'):
        MambaLRP(lambda inputs: ExplainedLogits(model)(inputs.detach()), model=model).attribute(embeddings, target=3)


@pytest.mark.parametrize('make, error, message', [
    (lambda model: MambaLRP(model, position=3.0), TypeError, 'position must be an int'),
    (lambda model: ExplainedLogits(model, position=None), TypeError, 'position must be an int'),
    (lambda model: MambaLRP(model, gamma={'out_proj': '0.25'}), TypeError, 'gamma values are numbers'),
    (lambda model: MambaLRP(model, gamma={3: 0.25}), TypeError, 'gamma keys are attribute names'),
    (lambda model: MambaLRP(model, gamma=float('inf')), ValueError, 'gamma must be >= 0 and finite'),
    (lambda model: MambaLRP(model, layer_map=[([torch.nn.Linear], Epsilon())]), TypeError, 'a type or a tuple'),
    (lambda model: MambaLRP(model, layer_map=[(torch.nn.Linear, 'epsilon')]), TypeError, 'are Zennit rules'),
    (lambda model: MambaLLMAttribution(LayerMambaLRP(ExplainedLogits(model), ExplainedLogits(model).embeddings),
                                       word_tokenizer()), TypeError, 'with the language model itself'),
    (lambda model: MambaLLMAttribution(LayerMambaLRP(model, model.backbone.layers[0].mixer), word_tokenizer()),
     ValueError, 'on the input embedding layer'),
], ids=['float position', 'None position', 'string gamma', 'int key', 'infinite gamma', 'list of types',
        'string rule', 'wrapper in the LLM class', 'LLM class on a mixer'])
def test_options_that_cannot_work_are_refused_when_made(make, error, message):
    with pytest.raises(error, match=message):
        make(make_mamba())


@pytest.mark.parametrize('call, error, message', [
    (lambda model, ids, embeddings: MambaLRP(model, layer_map=[(torch.nn.Linear, __import__('zennit').rules.Pass())])
     .attribute(embeddings, target=3), RuntimeError, 'Pass on a Linear gives relevance of shape'),
    (lambda model, ids, embeddings: LayerMambaLRP(model, model.get_input_embeddings()).attribute(
        ids, target=3, attribute_to_layer_input=True), TypeError, 'input is token ids, which carry no relevance'),
    (lambda model, ids, embeddings: LayerMambaLRP(model, model.get_input_embeddings()).attribute(ids[0], target=3),
     ValueError, 'token ids are \\(batch, length\\)'),
    (lambda model, ids, embeddings: MambaLRP(model).attribute(embeddings, target=[(5, 3), (1, 2)]), ValueError,
     'indexes 2 dimensions'),
    (lambda model, ids, embeddings: MambaLRP(model.backbone).attribute(embeddings, target=3), TypeError,
     'not its backbone'),
    (lambda model, ids, embeddings: MambaLRP(ExplainedLogits(model), position=2).attribute(embeddings, target=3),
     ValueError, 'one position already chosen'),
], ids=['Pass on a Linear', 'embedding input', 'unbatched ids', 'target tuples', 'backbone', 'position twice'])
def test_calls_that_cannot_work_are_refused_with_the_way_out(call, error, message):
    model = make_mamba()
    ids = token_ids()
    embeddings = model.get_input_embeddings()(ids).detach()
    before = snapshot(model)
    with pytest.raises(error, match=message):
        call(model, ids, embeddings)
    assert_snapshots_equal(snapshot(model), before)


# --- a third round: the modules inside a mixer ---------------------------------------------------------------------

@pytest.mark.parametrize('name', ['Mamba2', 'Bamba', 'NemotronH', 'Zamba2', 'GraniteMoeHybrid', 'Qwen3Next'])
@pytest.mark.parametrize('where', ['instance', 'class'])
def test_a_gated_norm_replaced_inside_a_mixer_is_refused(name, where, monkeypatch):
    # the canonized mixer computes its gated norm from the norm's weight: a replaced forward would be dropped
    model = language_model(name)
    norm = mixers_of(model)[0].norm
    if where == 'instance':
        original = norm.forward
        norm.forward = lambda *args, **kwargs: 2 * original(*args, **kwargs)
    else:
        original = type(norm).forward
        monkeypatch.setattr(type(norm), 'forward', lambda self, *args, **kwargs: 2 * original(self, *args, **kwargs))
    before = snapshot(model)
    with pytest.raises(UnsupportedModelError, match="norm' \\(forward (set on the instance|replaced on the class)"):
        MambaLRP(model).attribute(model.get_input_embeddings()(token_ids()).detach(), target=3)
    assert_snapshots_equal(snapshot(model), before)


class DoubledConv(torch.nn.Conv1d):
    def forward(self, x):
        return 2 * super().forward(x)


@pytest.mark.parametrize('name', ['Mamba', 'Mamba2', 'Jamba', 'Zamba'])
@pytest.mark.parametrize('change', ['subclass', 'instance forward', 'wrapped dt_proj'])
def test_a_module_the_original_reads_without_calling_must_be_the_plain_layer(name, change):
    model = language_model(name)
    mixer = mixers_of(model)[0]
    if change == 'subclass':
        mixer.conv1d.__class__ = DoubledConv
    elif change == 'instance forward':
        original = mixer.conv1d.forward
        mixer.conv1d.forward = lambda x: 2 * original(x)
    elif hasattr(mixer, 'dt_proj'):
        mixer.dt_proj = LoRA(mixer.dt_proj)
    else:
        pytest.skip(f'{name} has no dt_proj module')
    before = snapshot(model)
    with pytest.raises(UnsupportedModelError, match='the original forward reads its weights without calling it'):
        MambaLRP(model).attribute(model.get_input_embeddings()(token_ids()).detach(), target=3)
    assert_snapshots_equal(snapshot(model), before)


@pytest.mark.parametrize('name', ['Mamba', 'FalconMamba', 'Jamba'])
def test_gamma_on_the_selection_alone_is_refused_and_beside_others_inert(name):
    model = language_model(name)
    embeddings = model.get_input_embeddings()(token_ids()).detach()
    with pytest.raises(ValueError, match="'dt_proj' \\(it selects .*layers of the selection, which the SSM rule"):
        MambaLRP(model, gamma={'dt_proj': 0.25}).attribute(embeddings, target=3)
    # without the SSM rule relevance passes the selection, and the key acts
    without_ssm = ALL_RULES - {'ssm'}
    acting = MambaLRP(model, gamma={'dt_proj': 0.25}, rules=without_ssm, epsilon=1e-12).attribute(embeddings, target=3)
    plain = MambaLRP(model, rules=without_ssm, epsilon=1e-12).attribute(embeddings, target=3)
    assert not torch.equal(acting, plain)
    # beside a key that acts, a key on the selection changes nothing (a list of all projections)
    both = MambaLRP(model, gamma={'out_proj': 0.25, 'dt_proj': 0.25}, epsilon=1e-12).attribute(embeddings, target=3)
    alone = MambaLRP(model, gamma={'out_proj': 0.25}, epsilon=1e-12).attribute(embeddings, target=3)
    assert torch.equal(both, alone)


def test_a_gamma_key_that_layer_map_overrides_names_the_entry():
    model = make_mamba()
    with pytest.raises(ValueError, match="'out_proj' \\(the layers it selects take the rule of layer_map's entry "
                                         "\\(Linear\\) first\\)"):
        with MambaComposite(gamma={'out_proj': 0.25}, layer_map=[(torch.nn.Linear, Epsilon())]).context(model):
            pass


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
@pytest.mark.parametrize('options', [{'gamma': 0.25}, {'layer_map': [(torch.nn.Conv1d, Epsilon(1e-12))]}],
                         ids=['gamma', 'layer_map'])
def test_recomputed_mixers_decide_the_rules_as_their_forward_did_on_a_gpu(options):
    # on a GPU the backward pass, and the mixers' recomputation in it, runs in autograd's own thread
    model = make_mamba().cuda()
    embeddings = model.get_input_embeddings()(token_ids().cuda()).detach()
    stored = MambaLRP(model, epsilon=1e-12, **options).attribute(embeddings, target=3)
    recomputed = MambaLRP(model, epsilon=1e-12, recompute=True, **options).attribute(embeddings, target=3)
    assert relative_error(recomputed, stored) <= 1e-12


def test_the_input_of_a_layer_called_by_keyword_is_refused_with_the_way_out():
    model = build('Zamba2')
    ids = token_ids()
    with pytest.raises(TypeError, match='called with its input by keyword.*attribute_to_layer_input=False'):
        LayerMambaLRP(model, model.model.layers[0]).attribute(ids, target=3, attribute_to_layer_input=True)
