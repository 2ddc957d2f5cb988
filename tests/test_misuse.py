'''What a careless user does: each case either works exactly (relevance sums to the explained logit, the model comes
back exactly as it was) or raises one clear error, and leaves the model as it was.'''
import copy
import pickle
import sys
import threading

import pytest
import torch

from captum_mamba import LayerMambaLRP, MambaLRP
from conftest import assert_snapshots_equal, make_mamba, relative_error, snapshot
from test_cuda import make_mamba_ssm, make_mamba_ssm2, needs_mamba_ssm
from test_families import REFUSES_LEFT_PADDING, build

from zennit_mamba import MambaComposite
from zennit_mamba.support import mixer_types

FAMILIES = ['Mamba', 'Mamba2', 'FalconMamba', 'Jamba', 'Bamba', 'NemotronH', 'GraniteMoeHybrid', 'FalconH1', 'Zamba2',
            'Zamba', 'Lfm2', 'Qwen3Next', 'Qwen3_5', 'Qwen3_5Moe', 'OlmoHybrid',
            'KimiLinear', 'MiniMax', 'RecurrentGemma', 'Rwkv', 'xLSTM']
HYBRIDS = FAMILIES[3:]
#: hybrids whose attention takes positions 0, 1, ... whatever the mask (no position_ids from it): transformers
#: computes rotary embeddings in float32, so left padding shifts them by float32 rounding (LFM2's own logits by 1.4e-9,
#: OLMo-Hybrid's relevance by 1.1e-7): these get position_ids from the mask, as a careful user passes them
POSITIONS_FROM_THE_MASK = {'Lfm2', 'Qwen3Next', 'Qwen3_5', 'Qwen3_5Moe', 'OlmoHybrid', 'MiniMax'}
#: padded against unpadded, where a family computes in float32 whatever the model's dtype: Kimi-Linear's router and
#: forget gate (its unmodified float64 model's own logits differ by 5.8e-8 with left padding); MiniMax's RMS norms
#: (4.7e-8)
PADDED_BOUND = {'KimiLinear': 1e-7, 'MiniMax': 1e-6}
#: mamba-ssm's own MambaLMHeadModel with each of its mixers, in float32 on a GPU (skipped elsewhere)
MAMBA_SSM = [pytest.param(name, marks=needs_mamba_ssm) for name in ('mamba-ssm Mamba', 'mamba-ssm Mamba2')]
EVERY_FAMILY = FAMILIES + MAMBA_SSM


def model_of(name):
    builders = {'Mamba': lambda: make_mamba(layers=2), 'mamba-ssm Mamba': make_mamba_ssm,
                'mamba-ssm Mamba2': make_mamba_ssm2}
    return builders.get(name, lambda: build(name))()


def is_mamba_ssm(model):
    return type(model).__name__ == 'MambaLMHeadModel'


def embedding_layer(model):
    return model.backbone.embedding if is_mamba_ssm(model) else model.get_input_embeddings()


def token_ids(model, batch, length, seed=1):
    ids = torch.randint(0, 40, (batch, length), generator=torch.Generator().manual_seed(seed))
    return ids.to(embedding_layer(model).weight.device)


def embeddings_for(model, batch=2, length=13):
    return embedding_layer(model)(token_ids(model, batch, length)).detach()


def exact(model):
    '''The bound for "the same computation": rounding differences only (mamba-ssm models run in float32).'''
    return 1e-12 if embedding_layer(model).weight.dtype == torch.float64 else 1e-5


def logits_of(model, embeddings, **kwargs):
    '''Last-position logits in the model's dtype (transformers casts a Mamba-only model's .logits to float32).'''
    if is_mamba_ssm(model):
        return model(None, inputs_embeds=embeddings, **kwargs).logits[:, -1]
    # xLSTM's causal LM soft-caps its logits (the explained output), which its head alone does not
    if 'labels' in kwargs or not hasattr(model, 'backbone') or hasattr(model.config, 'output_logit_soft_cap'):
        return model(inputs_embeds=embeddings, use_cache=False, **kwargs).logits[:, -1].to(embeddings.dtype)
    return model.lm_head(model.backbone(inputs_embeds=embeddings, use_cache=False).last_hidden_state[:, -1])


def explain(model, embeddings, composite=None, target=3, **kwargs):
    '''Relevance of ``embeddings`` for logit ``target`` at the last position, and that logit.'''
    leaf = embeddings.detach().clone().requires_grad_()
    with (composite or MambaComposite(epsilon=1e-12)).context(model) as modified:
        logits = logits_of(modified, leaf, **kwargs)
        relevance, = torch.autograd.grad(logits[:, target], leaf, logits[:, target].detach())
    return relevance, logits[:, target].detach()


def conserved(relevance, explained, bound=1e-7):
    return bool(((relevance.sum((1, 2)) - explained).abs() <= bound * explained.abs()).all())


@pytest.mark.parametrize('name', FAMILIES)
def test_labels_do_not_move_where_relevance_enters(name):
    # with labels= transformers puts the loss first in its output; relevance must still enter at the logits
    model = model_of(name)
    embeddings = embeddings_for(model, 2, 9)
    before = snapshot(model)
    expected, explained = explain(model, embeddings)
    labels = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(0))
    relevance, with_labels = explain(model, embeddings, labels=labels)
    assert relative_error(relevance, expected) <= 1e-6 and conserved(relevance, with_labels, 1e-6)
    assert_snapshots_equal(snapshot(model), before)


@pytest.mark.parametrize('name', EVERY_FAMILY)
def test_one_composite_on_a_second_model_is_refused_and_the_first_keeps_working(name):
    first, second = model_of(name), model_of(name)
    embeddings = embeddings_for(first, 1, 7)
    expected, _ = explain(first, embeddings)
    before = [snapshot(first), snapshot(second)]
    composite = MambaComposite(epsilon=1e-12)
    with composite.context(first):
        with pytest.raises(RuntimeError, match='already registered on a model'):
            composite.register(second)
        assert snapshot(second)['hooks'] == 0
        leaf = embeddings.clone().requires_grad_()
        logits = logits_of(first, leaf)
        relevance, = torch.autograd.grad(logits[:, 3], leaf, logits[:, 3].detach())
    assert relative_error(relevance, expected) <= exact(first)
    assert_snapshots_equal(snapshot(first), before[0])
    assert_snapshots_equal(snapshot(second), before[1])


@pytest.mark.parametrize('name', EVERY_FAMILY)
def test_entering_a_context_twice_on_one_model_is_refused(name):
    model = model_of(name)
    before = snapshot(model)
    composite = MambaComposite()
    with composite.context(model):
        with pytest.raises(RuntimeError, match='already registered on a model'):
            with composite.context(model):
                pass
        with pytest.raises(RuntimeError, match='already registered on this model'):
            with MambaComposite().context(model):
                pass
    assert_snapshots_equal(snapshot(model), before)


def test_contexts_left_in_any_order_restore_every_model():
    models = [make_mamba(layers=1, seed=seed) for seed in range(3)]
    before = [snapshot(model) for model in models]
    composites = [MambaComposite() for _ in models]
    for composite, model in zip(composites, models):
        composite.register(model)
    for index in (1, 0, 2):
        composites[index].remove()
    for model, snapshot_before in zip(models, before):
        assert_snapshots_equal(snapshot(model), snapshot_before)


@pytest.mark.parametrize('name', EVERY_FAMILY)
@pytest.mark.parametrize('copier', [copy.deepcopy, pickle.dumps], ids=['deepcopy', 'pickle'])
def test_copying_a_registered_model_is_refused_and_works_after_the_context(name, copier):
    model = model_of(name)
    before = snapshot(model)
    mixer = next(module for module in model.modules() if type(module) in mixer_types())
    with MambaComposite().context(model):
        for part in (model, mixer):
            with pytest.raises(TypeError, match='Leave the composite\'s context'):
                copier(part)
    assert_snapshots_equal(snapshot(model), before)
    duplicate = copy.deepcopy(model)
    assert snapshot(duplicate)['hooks'] == snapshot(duplicate)['instance_forwards'] == 0
    assert pickle.loads(pickle.dumps(model)) is not None


def in_threads(*targets):
    '''Run each target in its own thread, switching between threads as often as Python allows.'''
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=target) for target in targets]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)


@pytest.mark.parametrize('name', ['Mamba'] + MAMBA_SSM)
def test_registering_from_two_threads_never_leaves_hooks_behind(name):
    model = make_mamba(layers=1) if name == 'Mamba' else model_of(name)
    embeddings = embeddings_for(model, 1, 5)
    expected, _ = explain(model, embeddings)
    before = snapshot(model)
    outcomes, errors = [], []

    def explain_repeatedly():
        for _ in range(30):
            try:
                relevance, _ = explain(model, embeddings)
                outcomes.append(relative_error(relevance, expected))
            except RuntimeError as error:
                errors.append(str(error))

    in_threads(explain_repeatedly, explain_repeatedly)
    assert len(outcomes) + len(errors) == 60 and outcomes
    assert max(outcomes) <= exact(model)
    assert all('already registered on this model' in error for error in errors)
    assert_snapshots_equal(snapshot(model), before)


@pytest.mark.parametrize('name', ['Mamba'] + MAMBA_SSM)
@pytest.mark.parametrize('options', [{}, {'gamma': 0.25}], ids=['lrp-0', 'gamma'])
def test_one_context_serves_two_threads_exactly(name, options):
    model = model_of(name)
    embeddings = [embeddings_for(model, 1, length) for length in (6, 11)]
    expected = [explain(model, value, MambaComposite(epsilon=1e-12, **options))[0] for value in embeddings]
    results = {}

    def explain_in_thread(index, modified):
        for _ in range(10):
            leaf = embeddings[index].clone().requires_grad_()
            logits = logits_of(modified, leaf)
            relevance, = torch.autograd.grad(logits[:, 3], leaf, logits[:, 3].detach())
            results.setdefault(index, []).append(relative_error(relevance, expected[index]))

    before = snapshot(model)
    with MambaComposite(epsilon=1e-12, **options).context(model) as modified:
        in_threads(lambda: explain_in_thread(0, modified), lambda: explain_in_thread(1, modified))
    assert max(max(errors) for errors in results.values()) <= exact(model) and len(results) == 2
    assert_snapshots_equal(snapshot(model), before)


@pytest.mark.parametrize('name', EVERY_FAMILY)
@pytest.mark.parametrize('bad', [float('nan'), float('inf')], ids=['nan', 'inf'])
def test_non_finite_inputs_are_refused_by_name(name, bad):
    model = model_of(name)
    embeddings = embeddings_for(model, 2, 6)
    embeddings[1, 2, 0] = bad
    before = snapshot(model)
    with pytest.raises(ValueError, match=r'NaN or inf \(examples \[1\]'):
        explain(model, embeddings)
    with pytest.raises(ValueError, match=r'NaN or inf \(examples \[1\]'):
        MambaLRP(model).attribute(embeddings, target=3)
    assert_snapshots_equal(snapshot(model), before)


@pytest.mark.parametrize('name', EVERY_FAMILY)
def test_an_overflowing_output_is_refused_by_name_not_returned_as_nan_relevance(name):
    '''A finite input whose explained output overflows (the output layer's weights at +-inf: logits NaN, as a bfloat16
    forward that overflows gives) raises an error naming the precision, in both front ends, and restores the model.'''
    model = model_of(name)
    embeddings = embeddings_for(model, 2, 6)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(1e308).mul_(1e10)
    before = snapshot(model)
    with pytest.raises(FloatingPointError, match=r'NaN or inf \(examples \[0, 1\].*overflowed in torch.float'):
        explain(model, embeddings)
    with pytest.raises(FloatingPointError, match=r'NaN or inf \(examples \[0, 1\].*model.float\(\)'):
        MambaLRP(model).attribute(embeddings, target=3)
    assert_snapshots_equal(snapshot(model), before)


@pytest.mark.parametrize('options, message', [
    ({'epsilon': 0.0}, 'epsilon must be positive'),
    ({'epsilon': -1e-6}, 'epsilon must be positive'),
    ({'gamma': -1.0}, 'gamma must be >= 0'),
    ({'gamma': {'out_proj': -0.5}}, 'gamma must be >= 0'),
    ({'gamma': float('nan')}, 'gamma must be >= 0'),
    ({'rules': {'SiLU'}}, 'Unknown MambaLRP rules'),
], ids=['epsilon-0', 'epsilon-negative', 'gamma-negative', 'gamma-dict-negative', 'gamma-nan', 'rule-name'])
def test_invalid_options_are_refused_when_the_composite_is_made(options, message):
    with pytest.raises(ValueError, match=message):
        MambaComposite(**options)


@pytest.mark.parametrize('name', HYBRIDS)
def test_left_padding_on_a_hybrid_gives_zero_relevance_to_pads_and_no_nan(name):
    model = build(name)
    embeddings = embeddings_for(model, 2, 8)
    pads = torch.randn(2, 3, embeddings.shape[-1], dtype=embeddings.dtype, generator=torch.Generator().manual_seed(4))
    padded = torch.cat([pads, embeddings], dim=1)
    mask = torch.cat([torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 8, dtype=torch.long)], dim=1)
    if name in REFUSES_LEFT_PADDING:
        before = snapshot(model)
        with pytest.raises(ValueError, match='do not read the attention mask'):
            explain(model, padded, attention_mask=mask)
        assert_snapshots_equal(snapshot(model), before)
        return
    expected, explained = explain(model, embeddings)
    positions = {'position_ids': (mask.cumsum(-1) - 1).clamp(min=0)} if name in POSITIONS_FROM_THE_MASK else {}
    relevance, padded_explained = explain(model, padded, attention_mask=mask, **positions)
    assert torch.isfinite(relevance).all()
    assert torch.equal(relevance[:, :3], torch.zeros_like(relevance[:, :3]))
    assert relative_error(relevance[:, 3:], expected) <= PADDED_BOUND.get(name, 1e-8)
    assert relative_error(padded_explained, explained) <= PADDED_BOUND.get(name, 1e-10)


@pytest.mark.parametrize('name', EVERY_FAMILY)
def test_layer_relevance_is_a_plain_tensor_like_mamba_lrp(name):
    model = model_of(name)
    relevance = LayerMambaLRP(model, embedding_layer(model)).attribute(token_ids(model, 1, 6, seed=3), target=3)
    assert not relevance.requires_grad and relevance.grad_fn is None
    assert relevance.cpu().numpy().shape == (1, 6, relevance.shape[-1])


def _inference_mode(call):
    with torch.inference_mode():
        return call()


#: (case, call on (model, embeddings, token ids), error type, key phrase of the message)
REFUSED = [
    ('batch-0', lambda m, e, i: MambaLRP(m).attribute(e[:0], target=3), ValueError, 'is empty'),
    ('length-0', lambda m, e, i: MambaLRP(m).attribute(e[:, :0], target=3), ValueError, 'is empty'),
    ('float-target', lambda m, e, i: MambaLRP(m).attribute(e, target=3.0), TypeError, 'target must be an int'),
    ('bool-target', lambda m, e, i: MambaLRP(m).attribute(e, target=True), TypeError, 'target must be an int'),
    ('string-target', lambda m, e, i: MambaLRP(m).attribute(e, target='3'), TypeError, 'target must be an int'),
    ('float-tensor-target', lambda m, e, i: MambaLRP(m).attribute(e, target=torch.tensor([3.0, 1.0])), TypeError,
     'target must be an int'),
    ('embeddings-to-layer-method', lambda m, e, i: LayerMambaLRP(m, embedding_layer(m)).attribute(e, target=3),
     TypeError, 'takes token ids'),
    ('unbatched-embeddings', lambda m, e, i: MambaLRP(m).attribute(e[0], target=3), ValueError,
     'add the batch dimension'),
    ('position-past-the-end', lambda m, e, i: MambaLRP(m, position=9).attribute(e, target=3), ValueError,
     'outside the 6 positions'),
    ('inference-mode', lambda m, e, i: _inference_mode(lambda: MambaLRP(m).attribute(e, target=3)), RuntimeError,
     'inference_mode'),
    ('compiled-model', lambda m, e, i: MambaLRP(m.compiled).attribute(e, target=3), ValueError, 'model._orig_mod'),
    ('data-parallel', lambda m, e, i: MambaLRP(m.parallel).attribute(e, target=3), ValueError, 'model.module'),
    ('batch-encoding', lambda m, e, i: LayerMambaLRP(m, embedding_layer(m)).attribute({'input_ids': i},
                                                                                             target=3),
     TypeError, "encoding['input_ids']"),
    ('all-padding', lambda m, e, i: MambaLRP(m).attribute(e, target=3, additional_forward_args=(
        torch.tensor([[1] * 6, [0] * 6]),)), ValueError, 'all padding'),
]


@pytest.mark.parametrize('name, call, error, phrase', [
    pytest.param(name, *case[1:], id=f'{case[0]}-{name}', marks=marks)
    for name, marks in [(name, ()) for name in FAMILIES] + [(param.values[0], param.marks) for param in MAMBA_SSM]
    for case in REFUSED
    # mamba-ssm takes no mask at all: test_mamba_ssm_refuses_a_mask_and_labels
    if not (name.startswith('mamba-ssm') and case[0] == 'all-padding')
])
def test_refused_with_a_clear_error_and_the_model_untouched(name, call, error, phrase):
    model = model_of(name)
    embeddings = embeddings_for(model, 2, 6)
    ids = token_ids(model, 2, 6, seed=5)
    # torch.compile marks the module it wraps, DataParallel moves it to a GPU where there is one: the case that uses
    # a wrapper makes it before the snapshot (and only that case, so that the others run where they were built)
    if 'compiled' in call.__code__.co_names:
        object.__setattr__(model, 'compiled', torch.compile(model))
    if 'parallel' in call.__code__.co_names:
        object.__setattr__(model, 'parallel', torch.nn.DataParallel(model))
    before = snapshot(model)
    with pytest.raises(error, match=phrase.replace('[', r'\[').replace('(', r'\(')):
        call(model, embeddings, ids)
    assert_snapshots_equal(snapshot(model), before)


@pytest.mark.parametrize('name', FAMILIES)
@pytest.mark.parametrize('padding', ['right', 'left'])
def test_a_padding_mask_is_honoured_and_the_last_real_token_explained(name, padding):
    # the mask passes as Captum's additional_forward_args; pads get no relevance, whatever the model's argument order
    model = model_of(name)
    embeddings = embeddings_for(model, 2, 6)
    lrp = MambaLRP(model, epsilon=1e-12)
    short = lrp.attribute(embeddings[:1, :4], target=3)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6])
    if padding == 'left':
        embeddings, mask = embeddings.flip(1), mask.flip(1)
        embeddings[0, 2:] = embeddings[0, 2:].flip(0)  # the real tokens in their order again
        if name in REFUSES_LEFT_PADDING:
            with pytest.raises(ValueError, match='do not read the attention mask'):
                lrp.attribute(embeddings, target=3, additional_forward_args=(mask,))
            return
    relevance = lrp.attribute(embeddings, target=3, additional_forward_args=(mask,))
    real = relevance[0][mask[0].bool()]
    assert torch.equal(relevance[0][~mask[0].bool()], torch.zeros_like(relevance[0][~mask[0].bool()]))
    # Captum passes the mask alone: left padding shifts the rotary positions of POSITIONS_FROM_THE_MASK's families
    assert relative_error(real, short[0]) <= (2e-7 if name in POSITIONS_FROM_THE_MASK else PADDED_BOUND.get(name, 1e-8))
    assert relative_error(relevance[1:], lrp.attribute(embeddings[1:], target=3)) <= 1e-10


@pytest.mark.parametrize('name', MAMBA_SSM)
def test_mamba_ssm_refuses_a_mask_and_labels(name):
    # MambaLMHeadModel would read a mask passed after the inputs as position_ids and ignore it: pads explained as
    # tokens; it has no labels argument (its mixers refuse unknown keywords, as the unmodified model does)
    model = model_of(name)
    embeddings = embeddings_for(model, 2, 6)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6], device=embeddings.device)
    before = snapshot(model)
    with pytest.raises(ValueError, match='MambaLMHeadModel takes no attention_mask'):
        MambaLRP(model).attribute(embeddings, target=3, additional_forward_args=(mask,))
    with pytest.raises(ValueError, match='MambaLMHeadModel takes no attention_mask'):
        LayerMambaLRP(model, embedding_layer(model)).attribute(token_ids(model, 2, 6), target=3,
                                                               additional_forward_args=(mask,))
    with pytest.raises(TypeError, match="'labels'"):
        explain(model, embeddings, labels=token_ids(model, 2, 6))
    assert_snapshots_equal(snapshot(model), before)
    _, explained = explain(model, embeddings)
    assert conserved(MambaLRP(model).attribute(embeddings, target=3), explained, 1e-4)


def test_zennits_attributor_on_a_language_model_names_the_wrapper_and_the_wrapper_works():
    '''Zennit's attributors call the model with the explained input positionally: a transformers model takes token
    ids there. Refused naming ExplainedLogits; the recipe with it conserves; the model is left without the check.'''
    from zennit.attribution import Gradient
    from captum_mamba import ExplainedLogits

    model = make_mamba()
    embeddings = model.get_input_embeddings()(torch.tensor([[1, 2, 3, 4]])).detach()
    before = snapshot(model)
    with pytest.raises(TypeError, match='ExplainedLogits'):
        with Gradient(model, MambaComposite()) as attributor:
            attributor(embeddings, torch.eye(40)[[5]])
    assert_snapshots_equal(snapshot(model), before)
    with Gradient(ExplainedLogits(model), MambaComposite(epsilon=1e-12)) as attributor:
        output, relevance = attributor(embeddings, lambda logits: logits * torch.eye(40, dtype=logits.dtype)[[5]])
    assert torch.allclose(relevance.sum(), output[0, 5].to(relevance.dtype), rtol=1e-6)
    assert_snapshots_equal(snapshot(model), before)
    with torch.no_grad():  # token ids still pass
        model(torch.tensor([[1, 2, 3]]))
