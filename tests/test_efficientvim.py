'''timm's EfficientViM: its HSM-SSD mixer, LayerNorms and squeeze-and-excitation under the MambaLRP treatment.'''
import pytest
import torch

timm = pytest.importorskip('timm')

from captum_mamba import MambaLRP  # noqa: E402
from conftest import assert_snapshots_equal, relative_error, snapshot  # noqa: E402
from zennit_mamba import MAMBA_LRP_RULES, MambaComposite  # noqa: E402


def tiny_efficientvim() -> torch.nn.Module:
    '''Three one-block stages on 64x64 images, float64, in eval mode; every bias that is not inside a
    squeeze-and-excitation scale (held constant) is zero, so that relevance has nowhere else to go.'''
    from timm.models.efficientvim import EfficientViM

    torch.manual_seed(0)
    model = EfficientViM(num_classes=5, embed_dim=(16, 32, 48), depths=(1, 1, 1), state_dim=(9, 4, 1))
    model = model.double().eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            excitation = '.conv.2.fc' in name  # PatchMerging's SqueezeExcite
            if excitation or name.endswith(('.D', 'alpha')):
                parameter.normal_()  # initial values (D = 1, tiny LayerScales, zero SE biases) hide the rules
            elif name.endswith('bias'):
                parameter.zero_()
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.zero_()
                module.running_var.uniform_(0.5, 2.0)
                module.weight.normal_()
    return model


def images() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def relevance_of(model, rules=MAMBA_LRP_RULES, **options) -> torch.Tensor:
    return MambaLRP(model, epsilon=1e-12, rules=rules, **options).attribute(images(), target=1)


def conservation_error(model, rules=MAMBA_LRP_RULES, **options) -> torch.Tensor:
    inputs = images()
    with torch.no_grad():
        explained = model(inputs)[:, 1]
    relevance = relevance_of(model, rules, **options)
    return ((relevance.sum((1, 2, 3)) - explained).abs() / explained.abs()).max()


def test_relevance_is_conserved_and_the_model_restored():
    model = tiny_efficientvim()
    before = snapshot(model)
    with torch.no_grad():
        expected = model(images())
        with MambaComposite().context(model) as modified:
            assert relative_error(modified(images()), expected) <= 1e-12
    assert conservation_error(model) <= 1e-8
    assert_snapshots_equal(snapshot(model), before)


def test_the_held_gate_variant_conserves_and_moves_relevance():
    model = tiny_efficientvim()
    assert conservation_error(model, gate_relevance='value') <= 1e-8
    assert relative_error(relevance_of(model, gate_relevance='value'), relevance_of(model)) > 1e-3


@pytest.mark.parametrize('rule', ['ssm', 'gate', 'norm', 'silu', 'attention'])
def test_each_rule_is_needed(rule):
    # measured without the rule: ssm, gate, norm 4e-2 to 4; silu 1e-5; attention (the SE scales) 2e-6
    assert conservation_error(tiny_efficientvim(), MAMBA_LRP_RULES - {rule}) > 1e-7
