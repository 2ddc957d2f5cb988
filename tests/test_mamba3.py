'''Mamba-3 (mamba-ssm's Mamba3, SISO) in plain PyTorch: the mixer against the token-by-token recurrence, MambaLRP's
conservation, each rule's ablation, the rules against the independent reference, both front ends, restoration.'''
import os

import pytest
import torch

from conftest import assert_snapshots_equal, relative_error, snapshot
from reference import ALL_RULES, _mamba3_mixer, reference_relevance as mamba3_reference_relevance
from captum_mamba import MambaLRP
from zennit_mamba import MambaComposite
from zennit_mamba.families.mamba3 import Mamba3, Mamba3LMHeadModel

#: mixer settings: the rotation of half or all state channels, two groups of B and C, the gated output norm
VARIANTS = {
    'Mamba3': dict(rope_fraction=0.5, ngroups=1, is_outproj_norm=False),
    'Mamba3-rope1-groups2': dict(rope_fraction=1.0, ngroups=2, is_outproj_norm=False),
    'Mamba3-outproj_norm': dict(rope_fraction=0.5, ngroups=2, is_outproj_norm=True),
}


def trained_like(module: torch.nn.Module) -> torch.nn.Module:
    '''Random step biases, B and C biases, skips and norm weights, as training gives (they start at constants).'''
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if not name.endswith(('in_proj.weight', 'out_proj.weight', 'embedding.weight')):
                parameter.add_(0.3 * torch.randn_like(parameter))
    return module


def language_model(variant: str = 'Mamba3') -> Mamba3LMHeadModel:
    torch.manual_seed(0)
    model = Mamba3LMHeadModel(d_model=32, n_layer=2, vocab_size=40, d_state=16, headdim=8, chunk_size=8,
                              **VARIANTS[variant])
    return trained_like(model).double().eval()


def embeddings_of(model: Mamba3LMHeadModel, batch: int = 2, length: int = 13) -> torch.Tensor:
    ids = torch.randint(0, 40, (batch, length), generator=torch.Generator().manual_seed(2))
    return model.get_input_embeddings()(ids).detach()


def explain(model, embeddings, rules=ALL_RULES, **options):
    embeddings = embeddings.detach().clone().requires_grad_()
    with MambaComposite(epsilon=1e-12, rules=rules, **options).context(model) as modified:
        logits = modified(inputs_embeds=embeddings)[:, -1]
        targets = logits.argmax(-1)
        explained = logits[torch.arange(len(targets)), targets]
        relevance, = torch.autograd.grad(explained, embeddings, explained.detach())
    return relevance, explained.detach(), targets


@pytest.mark.parametrize('variant', list(VARIANTS))
@pytest.mark.parametrize('length', [1, 8, 21])
def test_mixer_equals_the_recurrence_token_by_token(variant, length):
    mixer = trained_like(Mamba3(d_model=32, d_state=16, headdim=8, chunk_size=8, **VARIANTS[variant])).double()
    u = torch.randn(2, length, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert relative_error(mixer(u), _mamba3_mixer(mixer, u, ())) <= 1e-12


def test_weights_load_strictly_with_mamba_ssms_names_and_shapes():
    mixer = Mamba3(d_model=32, d_state=16, headdim=8, is_outproj_norm=True)
    shapes = {name: tuple(value.shape) for name, value in mixer.state_dict().items()}
    # mamba_ssm.modules.mamba3.Mamba3(d_model=32, d_state=16, headdim=8, is_outproj_norm=True): 2 * 64 + 2 * 16 + 3 *
    # 8 heads + 4 angles rows of in_proj
    assert shapes == {'in_proj.weight': (188, 32), 'dt_bias': (8,), 'B_bias': (8, 1, 16), 'C_bias': (8, 1, 16),
                      'B_norm.weight': (16,), 'C_norm.weight': (16,), 'D': (8,), 'norm.weight': (64,),
                      'out_proj.weight': (32, 64)}
    copy = Mamba3(d_model=32, d_state=16, headdim=8, is_outproj_norm=True)
    copy.load_state_dict(trained_like(mixer).state_dict(), strict=True)


@pytest.mark.parametrize('variant', list(VARIANTS))
def test_conservation_and_the_reference(variant):
    model = language_model(variant)
    embeddings = embeddings_of(model)
    relevance, explained, targets = explain(model, embeddings)
    assert ((relevance.sum((1, 2)) - explained).abs() <= 1e-9 * explained.abs()).all()
    expected, expected_explained = mamba3_reference_relevance(model, embeddings, targets)
    assert relative_error(explained, expected_explained) <= 1e-12
    assert relative_error(relevance, expected) <= 1e-9

    # gradient x input of the unmodified model does not conserve
    embeddings = embeddings.clone().requires_grad_()
    logits = model(inputs_embeds=embeddings)[:, -1]
    gradient, = torch.autograd.grad(logits[torch.arange(len(targets)), targets].sum(), embeddings)
    assert (((embeddings * gradient).sum((1, 2)) - explained).abs() > 1e-3 * explained.abs()).all()


@pytest.mark.parametrize('variant', list(VARIANTS))
def test_the_held_gate_variant_conserves_and_equals_the_reference(variant):
    model = language_model(variant)
    embeddings = embeddings_of(model)
    relevance, explained, targets = explain(model, embeddings, gate_relevance='value')
    assert ((relevance.sum((1, 2)) - explained).abs() <= 1e-9 * explained.abs()).all()
    expected, _ = mamba3_reference_relevance(model, embeddings, targets, ALL_RULES | {'held_gate'})
    assert relative_error(relevance, expected) <= 1e-9
    assert relative_error(relevance, explain(model, embeddings)[0]) > 1e-3


@pytest.mark.parametrize('variant', list(VARIANTS))
@pytest.mark.parametrize('rule', sorted(ALL_RULES))
def test_each_rule_is_needed_and_its_ablation_equals_the_reference(variant, rule):
    model = language_model(variant)
    embeddings = embeddings_of(model)
    rules = ALL_RULES - {rule}
    relevance, explained, targets = explain(model, embeddings, rules)
    assert ((relevance.sum((1, 2)) - explained).abs() > 1e-6 * explained.abs()).any()
    expected, _ = mamba3_reference_relevance(model, embeddings, targets, rules)
    assert relative_error(relevance, expected) <= 1e-9


def test_captum_front_end_and_restoration():
    model = language_model('Mamba3-outproj_norm')
    embeddings = embeddings_of(model)
    with torch.no_grad():
        logits = model(inputs_embeds=embeddings)
    before = snapshot(model)

    def last_logits(inputs):
        return model(inputs_embeds=inputs)[:, -1]

    targets = logits[:, -1].argmax(-1)
    relevance, delta = MambaLRP(last_logits, model=model, epsilon=1e-12).attribute(
        embeddings, target=targets, return_convergence_delta=True)
    assert (delta.abs() <= 1e-9 * logits[torch.arange(2), -1, targets].abs()).all()
    expected, _ = mamba3_reference_relevance(model, embeddings, targets)
    assert relative_error(relevance, expected) <= 1e-9
    assert_snapshots_equal(snapshot(model), before)
    with torch.no_grad():
        assert torch.equal(model(inputs_embeds=embeddings), logits)


def test_whole_sequences_only():
    mixer = Mamba3(d_model=32, d_state=16, headdim=8)
    with pytest.raises(NotImplementedError, match='whole sequences'):
        mixer(torch.randn(1, 3, 32), inference_params=object())
    with pytest.raises(NotImplementedError, match='SISO'):
        Mamba3(d_model=32, is_mimo=True)


def test_the_held_selection_is_computed_without_a_graph():
    '''Under the SSM rule as stated the selection (norms, rotations, steps of every head) is computed without a graph:
    the same relevance as a rule set whose selection is its own method (which takes the graph), with none of the
    selection's operations recorded for the backward pass (they would raise the mixer's peak memory).'''
    from zennit_mamba import RuleSet
    from zennit_mamba.mixers.mamba3 import mamba3_mixer

    class OwnSelection(RuleSet):
        def selection(self, *selection):
            return RuleSet.selection(self, *selection)

    mixer = trained_like(Mamba3(d_model=32, d_state=16, headdim=8, chunk_size=8, **VARIANTS['Mamba3'])).double()
    u = torch.randn(2, 21, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    results = []
    for rules in (RuleSet(), OwnSelection()):
        saved, inputs = [0], u.clone().requires_grad_()

        def pack(tensor):
            saved[0] += tensor.numel()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            output = mamba3_mixer(rules, mixer, inputs)
        gradient, = torch.autograd.grad(output.sum(), inputs)
        results.append((output.detach(), gradient, saved[0]))
    (output, gradient, saved), (own_output, own_gradient, own_saved) = results
    assert torch.equal(output, own_output) and relative_error(gradient, own_gradient) <= 1e-12
    assert saved < 0.7 * own_saved


def _mamba_ssm_mamba3():
    try:
        from mamba_ssm.modules.mamba3 import Mamba3 as KernelMamba3
    except Exception:  # not installed, or without CUDA
        return None
    return KernelMamba3


def held_ssd_inputs(dtype=torch.float64, length=37):
    generator = torch.Generator().manual_seed(5)

    def normal(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)

    x = normal(2, length, 4, 8)
    log_step = -torch.nn.functional.softplus(normal(2, length, 4))
    B, C = normal(2, length, 2, 16), normal(2, length, 2, 16)
    return x, log_step, B, C, normal(2, length, 4).exp(), normal(4)


def test_the_held_selection_scans_backward_is_the_transposed_scan():
    '''The trapezoid's SSD with the selection held: its backward (the transposed scan) equals autograd through the
    chunks, and with the selection not held autograd reaches it.'''
    from zennit_mamba.kernels.ssd import _pytorch_ssd, held_selection_ssd

    x, log_step, B, C, scale, skip = held_ssd_inputs()
    gradient = torch.randn(2, 37, 4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    held = x.clone().requires_grad_()
    output = held_selection_ssd(held, log_step, B, C, scale, skip, chunk_size=8)
    reached, = torch.autograd.grad(output, held, gradient)
    exact = x.clone().requires_grad_()
    expected_output, _ = _pytorch_ssd(exact, log_step, B, C, 8, input_scale=scale, skip=skip)
    expected, = torch.autograd.grad(expected_output, exact, gradient)
    assert relative_error(output, expected_output) <= 1e-12
    assert relative_error(reached, expected) <= 1e-12
    log_step.requires_grad_()
    output = held_selection_ssd(x.clone().requires_grad_(), log_step, B, C, scale, skip, chunk_size=8)
    assert torch.autograd.grad(output, log_step, gradient)[0].abs().sum() > 0


_HELD_SSD_UNDER_TRITON = '''
import torch
from zennit_mamba.kernels.ssd import _HeldSelectionSSD, _pytorch_ssd
from zennit_mamba.kernels.ssd_triton import triton_ssd
from test_mamba3 import held_ssd_inputs
x, log_step, B, C, scale, skip = held_ssd_inputs(torch.float32, length=70)
gradient = torch.randn_like(x)
results = []
for core in (triton_ssd, _pytorch_ssd):
    inputs = x.clone().requires_grad_()
    output = _HeldSelectionSSD.apply(inputs, log_step, B, C, scale, skip, 16, core)
    results.append((output, torch.autograd.grad(output, inputs, gradient)[0]))
close = all(((a - b).abs().max() <= 1e-4 * b.abs().max()).item() for a, b in zip(*results))
print('equal' if close else 'differ')
'''


def test_the_held_selection_scan_on_the_triton_ssd_equals_the_pytorch_one():
    from conftest import run_under_triton_interpreter

    run_under_triton_interpreter(f'import sys; sys.path[:0] = {[os.path.dirname(os.path.abspath(__file__))]!r}\n'
                                 + _HELD_SSD_UNDER_TRITON)


@pytest.mark.skipif(not torch.cuda.is_available() or _mamba_ssm_mamba3() is None,
                    reason='needs a CUDA GPU and mamba-ssm with Mamba3')
@pytest.mark.parametrize('variant', list(VARIANTS))
def test_mamba_ssms_mamba3_loads_into_the_plain_copy_and_computes_the_same(variant):
    torch.manual_seed(0)
    kernels = trained_like(_mamba_ssm_mamba3()(d_model=64, d_state=32, headdim=16, chunk_size=16, device='cuda',
                                               **VARIANTS[variant])).eval()
    plain = Mamba3(d_model=64, d_state=32, headdim=16, chunk_size=16, **VARIANTS[variant]).cuda().eval()
    plain.load_state_dict(kernels.state_dict(), strict=True)
    u = torch.randn(2, 100, 64, device='cuda', generator=torch.Generator('cuda').manual_seed(1))
    with torch.no_grad():
        # the kernels read q, k, v, the trapezoid weights and angles in bfloat16 (2e-3 to 4e-3 relative on the
        # float64 recurrence, measured under Triton's interpreter)
        assert relative_error(plain(u).double(), kernels(u).double()) <= 2e-2


@pytest.mark.skipif(not torch.cuda.is_available() or _mamba_ssm_mamba3() is None,
                    reason='needs a CUDA GPU and mamba-ssm with Mamba3')
@pytest.mark.parametrize('variant', list(VARIANTS))
@pytest.mark.parametrize('gate_relevance', ['half', 'value'])
def test_mamba_ssms_mamba3_is_explained_as_the_plain_copy_through_both_front_ends(variant, gate_relevance):
    '''mamba-ssm's own Mamba3 mixers in a language model, canonized: relevance conserved in float32 and equal to the
    plain copy's (the same computation), the model's kernels restored after explaining; with either gate treatment
    (the plain copy's held gate equals the float64 reference in ``test_the_held_gate_variant_...``).'''
    from captum_mamba import ExplainedLogits

    torch.manual_seed(0)
    options = dict(d_model=64, n_layer=2, vocab_size=50, d_state=32, headdim=16, chunk_size=16, **VARIANTS[variant])
    kernels = trained_like(Mamba3LMHeadModel(mixer_class=_mamba_ssm_mamba3(), **options).cuda()).eval()
    plain = Mamba3LMHeadModel(**options).cuda().eval()
    plain.load_state_dict(kernels.state_dict(), strict=True)
    ids = torch.randint(0, 50, (2, 150), generator=torch.Generator().manual_seed(2)).cuda()
    embeddings = kernels.get_input_embeddings()(ids).detach()
    with torch.no_grad():
        before = kernels(inputs_embeds=embeddings)
    targets = before[:, -1].argmax(-1)

    expected, explained, _ = explain(plain, embeddings, gate_relevance=gate_relevance)
    relevance, kernels_explained, _ = explain(kernels, embeddings, gate_relevance=gate_relevance)
    assert relative_error(kernels_explained, explained) <= 1e-5
    assert relative_error(relevance, expected) <= 1e-4
    assert ((relevance.sum((1, 2)) - kernels_explained).abs() <= 1e-3 * kernels_explained.abs()).all()
    for front_end in (kernels, ExplainedLogits(kernels)):
        explainer = MambaLRP(front_end, gate_relevance=gate_relevance)
        assert relative_error(explainer.attribute(embeddings, target=targets), expected) <= 1e-4
    with torch.no_grad():  # the kernels' forward again, bit for bit
        assert torch.equal(kernels(inputs_embeds=embeddings), before)


def test_both_front_ends_take_the_language_model_itself_and_refuse_a_mask():
    from captum_mamba import ExplainedLogits

    model = language_model()
    embeddings = embeddings_of(model)
    with torch.no_grad():
        targets = model(inputs_embeds=embeddings)[:, -1].argmax(-1)
    expected, _ = mamba3_reference_relevance(model, embeddings, targets)
    for explained in (model, ExplainedLogits(model)):
        assert relative_error(MambaLRP(explained, epsilon=1e-12).attribute(embeddings, target=targets),
                              expected) <= 1e-9
        with pytest.raises(ValueError, match='takes no attention_mask'):
            MambaLRP(explained).attribute(embeddings, target=targets,
                                          additional_forward_args=(torch.ones(2, 13, dtype=torch.long),))


def test_a_zennit_rule_on_a_module_mambalrp_computes_itself_is_refused():
    from zennit.rules import Gamma, ZPlus

    from conftest import make_mamba
    from zennit_mamba.families.mamba3 import MixerRMSNorm

    for model, layer_map in ((language_model(), [(Mamba3, ZPlus())]), (language_model(), [(MixerRMSNorm, Gamma())]),
                             (make_mamba(layers=1, hidden=16), [(type(make_mamba(layers=1).backbone.layers[0].mixer),
                                                                 ZPlus())])):
        before = snapshot(model)
        with pytest.raises(ValueError, match='cannot act on'):
            with MambaComposite(layer_map=layer_map).context(model):
                pass
        assert_snapshots_equal(snapshot(model), before)


def test_a_composite_on_a_bare_mixer_registers_and_leaves_cleanly_twice():
    mixer = trained_like(Mamba3(d_model=32, d_state=16, headdim=8, chunk_size=8)).double()
    u = torch.randn(2, 7, 32, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        expected = mixer(u)
    for _ in range(2):
        with MambaComposite(epsilon=1e-12).context(mixer) as modified:
            output = modified(u)
            relevance, = torch.autograd.grad(output, u, output.detach())
        assert relative_error(output.detach(), expected) <= 1e-12
        # the output's relevance (each element its value) conserved at the inputs
        assert relative_error(relevance.sum(), output.detach().sum()) <= 1e-9
    assert 'forward' not in vars(mixer)


def test_settings_and_inputs_that_cannot_work_are_refused():
    with pytest.raises(ValueError, match='finite'):
        MambaComposite(epsilon=float('inf'))
    for rules in (None, 'ssm'):
        with pytest.raises(TypeError, match='collection of rule names'):
            MambaComposite(rules=rules)
    with pytest.raises(ValueError, match='must divide'):
        Mamba3(d_model=32, d_state=16, headdim=8, ngroups=3)
    with pytest.raises(ValueError, match='add the batch dimension'):
        Mamba3(d_model=32, d_state=16, headdim=8)(torch.randn(5, 32))


def test_a_layer_method_on_a_norm_the_mixer_computes_without_calling_it_is_refused():
    from captum_mamba import LayerMambaLRP

    model = language_model('Mamba3-outproj_norm')
    mixer = model.backbone.layers[0].mixer
    for layer in (mixer.B_norm, mixer.norm):
        with pytest.raises(ValueError, match='without calling it'):
            LayerMambaLRP(model, layer)
    # the mixer and the layers it calls are observed
    ids = torch.randint(0, 40, (2, 13), generator=torch.Generator().manual_seed(2))
    relevance = LayerMambaLRP(model, mixer.out_proj, epsilon=1e-12).attribute(ids, target=3)
    assert relevance.shape == (2, 13, 32)


def test_the_mimo_form_is_refused_when_registering():
    '''mamba-ssm's MIMO Mamba3 (TileLang kernels) computes what mamba3_mixer does not: refused, naming it.'''
    model = language_model()
    model.backbone.layers[1].mixer.is_mimo = True  # as mamba-ssm's Mamba3(is_mimo=True) has it
    with pytest.raises(Exception, match='MIMO'):
        with MambaComposite().context(model):
            pass
