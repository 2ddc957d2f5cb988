'''Vision Mamba: the official checkpoints' layout, MambaLRP on both scan directions against a per-timestep
bidirectional reference, conservation at tokens and pixels, the gamma rule per layer type, the GPU path.'''
import pytest
import torch

from captum_mamba import LayerMambaLRP, MambaLRP
from conftest import assert_snapshots_equal, relative_error, snapshot
from reference import vim_reference_relevance
from zennit_mamba import MambaComposite
from zennit_mamba.families.vim import VisionMamba, vim_base, vim_small, vim_tiny


def official_shapes(dim: int, depth: int = 24, classes: int = 1000, patches: int = 196, patch: int = 16) -> dict:
    '''Parameter names and shapes of hustvl/Vim's midclstok checkpoints (vim/models_mamba.py with bimamba v2 in
    mamba-1p1p1/mamba_ssm/modules/mamba_simple.py): d_inner = 2 dim, dt_rank = ceil(dim / 16), d_state 16.'''
    inner, rank = 2 * dim, -(-dim // 16)
    shapes = {
        'cls_token': (1, 1, dim), 'pos_embed': (1, patches + 1, dim), 'patch_embed.proj.weight': (dim, 3, patch, patch),
        'patch_embed.proj.bias': (dim,), 'norm_f.weight': (dim,), 'head.weight': (classes, dim),
        'head.bias': (classes,),
    }
    for layer in range(depth):
        prefix = f'layers.{layer}.'
        shapes[prefix + 'norm.weight'] = (dim,)
        shapes[prefix + 'mixer.in_proj.weight'] = (2 * inner, dim)
        shapes[prefix + 'mixer.out_proj.weight'] = (dim, inner)
        for suffix, a_log, d in (('', 'A_log', 'D'), ('_b', 'A_b_log', 'D_b')):
            shapes[prefix + 'mixer.' + a_log] = (inner, 16)
            shapes[prefix + 'mixer.' + d] = (inner,)
            shapes[prefix + f'mixer.conv1d{suffix}.weight'] = (inner, 1, 4)
            shapes[prefix + f'mixer.conv1d{suffix}.bias'] = (inner,)
            shapes[prefix + f'mixer.x_proj{suffix}.weight'] = (rank + 32, inner)
            shapes[prefix + f'mixer.dt_proj{suffix}.weight'] = (inner, rank)
            shapes[prefix + f'mixer.dt_proj{suffix}.bias'] = (inner,)
    return shapes


@pytest.mark.parametrize('make, dim', [(vim_tiny, 192), (vim_small, 384), (vim_base, 768)], ids=['Ti', 'S', 'B'])
def test_an_official_checkpoint_layout_loads_strictly(make, dim):
    model = make()
    generator = torch.Generator().manual_seed(0)
    checkpoint = {name: torch.randn(shape, generator=generator) for name, shape in official_shapes(dim).items()}
    model.load_state_dict(checkpoint, strict=True)
    assert all(torch.equal(model.state_dict()[name], value) for name, value in checkpoint.items())


def tiny_vim(seed: int = 0, biases: bool = False) -> VisionMamba:
    '''A 2-block Vim on 16x16 images (16 patches of 4x4, the class token at position 8), float64; without
    ``biases`` the position embedding, patch and head biases are zero, so that relevance has nowhere else to go.'''
    torch.manual_seed(seed)
    model = VisionMamba(img_size=16, patch_size=4, stride=4, depth=2, embed_dim=16, num_classes=5).double().eval()
    with torch.no_grad():
        model.cls_token.normal_()
        for name, parameter in model.named_parameters():
            if 'A_log' in name or 'A_b_log' in name or name.endswith(('.D', '.D_b')):
                parameter.add_(0.3 * torch.randn_like(parameter))
            elif 'dt_proj' in name and name.endswith('bias'):
                parameter.add_(3.0)  # trained models select more strongly than the initial tiny steps
            elif name.endswith('norm.weight') or name == 'norm_f.weight':
                parameter.add_(0.2 * torch.randn_like(parameter))
            elif not biases and (name.endswith('bias') or name == 'pos_embed'):
                parameter.zero_()
    return model


def images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def test_forward_unchanged_model_restored_and_token_relevance_matches_the_reference():
    model = tiny_vim(biases=True)
    before = snapshot(model)
    inputs = images()
    with torch.no_grad():
        expected_logits = model(inputs)
        with MambaComposite().context(model) as modified:
            assert relative_error(modified(inputs), expected_logits) <= 1e-14
    targets = expected_logits.argmax(-1)
    relevance = LayerMambaLRP(model, model.pos_drop, epsilon=1e-12).attribute(inputs, target=targets)
    expected, explained = vim_reference_relevance(model, model.tokens(inputs), targets)
    assert relative_error(relevance, expected) <= 1e-8  # epsilon 1e-12 against logits of 1e-2 to 1
    # the same from the token sequence given to the model
    tokens = model.tokens(inputs).detach()
    assert relative_error(MambaLRP(model, epsilon=1e-12).attribute(tokens, target=targets), expected) <= 1e-8
    # the biases (head, convolutions) take their share: most, not all, of the logit reaches the tokens
    assert ((relevance.sum((1, 2)) - explained).abs() < 0.2 * explained.abs()).all()
    assert_snapshots_equal(snapshot(model), before)


@pytest.mark.parametrize('rules', [{'silu', 'ssm', 'norm'}, {'silu', 'gate', 'norm'}, {'ssm', 'gate', 'norm'},
                                   {'silu', 'ssm', 'gate', 'norm', 'held_gate'}],
                         ids=['no-gate-rule', 'no-ssm-rule', 'no-silu-rule', 'held-gate'])
def test_each_rule_acts_on_both_directions(rules):
    # the ablations (and the held gate, gate_relevance='value') agree with the reference: a rule missing in one
    # direction shows here
    model = tiny_vim()
    inputs = images()
    targets = torch.tensor([1, 3])
    options = {'gate_relevance': 'value'} if 'held_gate' in rules else {'rules': rules}
    relevance = LayerMambaLRP(model, model.pos_drop, epsilon=1e-12, **options).attribute(inputs, target=targets)
    expected, _ = vim_reference_relevance(model, model.tokens(inputs), targets, rules)
    assert relative_error(relevance, expected) <= 1e-8  # epsilon 1e-12 against logits of 1e-2 to 1


def test_relevance_is_conserved_down_to_the_pixels():
    model = tiny_vim()
    inputs = images()
    targets = torch.tensor([0, 4])
    pixels, delta = MambaLRP(model, epsilon=1e-12).attribute(inputs, target=targets, return_convergence_delta=True)
    tokens = LayerMambaLRP(model, model.pos_drop, epsilon=1e-12).attribute(inputs, target=targets)
    with torch.no_grad():
        explained = model(inputs)[torch.arange(2), targets]
    # the class token is a parameter: the pixels and it share the logit
    class_token = tokens[:, model.token_position].sum(-1)
    assert ((pixels.sum((1, 2, 3)) + class_token - explained).abs() <= 1e-6 * explained.abs()).all()
    assert torch.allclose(delta, -class_token, rtol=1e-8)
    # each patch's pixels carry that patch token's relevance (a linear patch embedding without bias)
    patches = pixels.unfold(2, 4, 4).unfold(3, 4, 4).sum((1, 4, 5)).flatten(1)
    token_patches = torch.cat([tokens[:, :8], tokens[:, 9:]], dim=1).sum(-1)
    assert relative_error(patches, token_patches) <= 1e-10


def test_a_float_gamma_reaches_both_directions():
    model = tiny_vim()
    names = ('in_proj', 'conv1d', 'x_proj', 'dt_proj', 'out_proj')
    both = {name: 0.5 for name in names + ('conv1d_b', 'x_proj_b', 'dt_proj_b')}
    relevance = {key: LayerMambaLRP(model, model.pos_drop, epsilon=1e-12, gamma=gamma).attribute(images(), target=2)
                 for key, gamma in (('float', 0.5), ('both', both), ('forward', {name: 0.5 for name in names}))}
    assert relative_error(relevance['float'], relevance['both']) <= 1e-12
    assert relative_error(relevance['float'], relevance['forward']) > 1e-3


def test_recomputing_the_mixers_in_the_backward_pass_gives_the_same_relevance():
    model = tiny_vim()
    stored = LayerMambaLRP(model, model.pos_drop, epsilon=1e-12).attribute(images(), target=2)
    recomputed = LayerMambaLRP(model, model.pos_drop, epsilon=1e-12, recompute=True).attribute(images(), target=2)
    assert relative_error(recomputed, stored) <= 1e-12


@pytest.mark.parametrize('gamma', [{'in_proj': 0.25, 'out_proj': 0.25}, {torch.nn.Conv1d: 0.5},
                                   {torch.nn.Conv2d: 0.25, 'head': 0.1}, 0.25],
                         ids=['mixer-projections', 'convolutions', 'patches-and-head', 'all'])
def test_the_gamma_rule_per_layer_type_conserves(gamma):
    model = tiny_vim()
    before = snapshot(model)
    inputs = images()
    lrp_0 = LayerMambaLRP(model, model.pos_drop, epsilon=1e-12).attribute(inputs, target=2)
    relevance = LayerMambaLRP(model, model.pos_drop, epsilon=1e-12, gamma=gamma).attribute(inputs, target=2)
    with torch.no_grad():
        explained = model(inputs)[:, 2]
    assert ((relevance.sum((1, 2)) - explained).abs() <= 1e-6 * explained.abs()).all()
    if 'head' not in str(gamma) and torch.nn.Conv2d not in (gamma if isinstance(gamma, dict) else {}):
        assert relative_error(relevance, lrp_0) > 1e-3  # the rule acted
    assert_snapshots_equal(snapshot(model), before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_gpu_forward_and_relevance_match_the_cpu():
    # on a GPU with mamba-ssm, each direction's scan runs mamba-ssm's kernel (float32)
    model = tiny_vim(biases=True)
    inputs = images()
    targets = torch.tensor([1, 3])
    expected = LayerMambaLRP(model, model.pos_drop, epsilon=1e-12).attribute(inputs, target=targets)
    with torch.no_grad():
        expected_logits = model(inputs)
    gpu_model = tiny_vim(biases=True).float().cuda()
    with torch.no_grad():
        assert relative_error(gpu_model(inputs.float().cuda()).double().cpu(), expected_logits) <= 1e-4
    relevance = LayerMambaLRP(gpu_model, gpu_model.pos_drop, epsilon=1e-9).attribute(inputs.float().cuda(),
                                                                                      target=targets.cuda())
    assert relative_error(relevance.double().cpu(), expected) <= 1e-3
