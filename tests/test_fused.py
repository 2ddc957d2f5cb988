'''The fused Mamba-1 branch's backward (zennit_mamba.kernels.fused) on the CPU, in float64: its transposed scan in
reversed time, run here by the package's PyTorch scan in place of mamba-ssm's forward kernel, gives the gradients of the
rule set's operations in turn. tests/test_cuda.py runs the same backward with the kernels on a GPU.'''
import pytest
import torch

from conftest import run_under_triton_interpreter
from zennit_mamba import MambaComposite
from zennit_mamba.kernels.fused import branch_gradients
from zennit_mamba import RuleSet
from zennit_mamba.kernels.scan import selective_scan


def torch_forward_scan(u, delta, A, B, C):
    return selective_scan(u, delta, A, B[:, 0], C[:, 0], implementation='torch')[0]


@pytest.mark.parametrize('length', [1, 2, 37])
def test_branch_gradients_equal_the_rule_sets_operations_in_turn(length):
    generator = torch.Generator().manual_seed(length)
    batch, channels, state = 2, 3, 4

    def random(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    # the convolution output as the mixer has it: a slice of a longer one
    conv = random(batch, channels, length + 3)[..., :length].requires_grad_()
    gate = random(batch, channels, length).requires_grad_()
    delta = torch.rand(batch, channels, length, generator=generator, dtype=torch.float64)
    delta[0, 0, 0] = 0.0  # an underflowed softplus: no input, decay 1
    A, B, C, D = -torch.rand(channels, state, generator=generator, dtype=torch.float64), \
        random(batch, state, length), random(batch, state, length), random(channels)
    rules = RuleSet()
    scanned, _ = rules.scan(rules.activation('silu', conv), delta, A, B, C, D)
    output = rules.gate(scanned, rules.activation('silu', gate))
    gradient = random(batch, channels, length)
    expected = torch.autograd.grad(output, (conv, gate), gradient)

    actual = branch_gradients(gradient, conv.detach(), gate.detach(), scanned.detach(), delta, A, B[:, None],
                              C[:, None], D, torch_forward_scan)
    for got, want in zip(actual, expected):
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('name', ['Mamba2', 'Bamba'])
def test_gated_norm_fused_equals_the_rule_sets_operations_in_turn(name, monkeypatch):
    '''Mamba-2's gated RMS normalisation as one function (fused.GatedRMSNorm) gives the relevance and the norm
    weights' gradient of the gate, SiLU and LN rules applied in turn (float64).'''
    from test_families import build, embeddings_for, explain, last_position_logits  # the families' float64 models
    from zennit_mamba.kernels import fused

    model = build(name)
    embeddings = embeddings_for(model)
    calls = []
    apply = fused.GatedRMSNorm.apply
    monkeypatch.setattr(fused.GatedRMSNorm, 'apply', lambda *arguments: calls.append(1) or apply(*arguments))

    def relevance_and_weight_gradients():
        relevance, _, _ = explain(model, embeddings, targets=torch.tensor([3, 5]))
        weights = [module.weight for module in model.modules() if type(module).__name__.endswith('RMSNormGated')]
        with MambaComposite().context(model) as modified:
            logits = last_position_logits(modified, embeddings)
            gradients = torch.autograd.grad(logits[:, 3].sum(), weights)
        return relevance, gradients

    fused_relevance, fused_gradients = relevance_and_weight_gradients()
    assert calls  # the fused function ran, once a Mamba-2 layer and call
    monkeypatch.setattr(RuleSet, 'fuses_gated_norm', lambda self: False)
    calls.clear()
    relevance, gradients = relevance_and_weight_gradients()
    assert not calls
    torch.testing.assert_close(fused_relevance, relevance, rtol=1e-10, atol=1e-12)
    for fused_gradient, gradient in zip(fused_gradients, gradients):
        torch.testing.assert_close(fused_gradient, gradient, rtol=1e-10, atol=1e-12)



# run in a fresh interpreter under Triton's interpreter (conftest.run_under_triton_interpreter)
_NORM_KERNELS_AGAINST_PYTORCH = '''
import torch
from zennit_mamba.kernels import fused

for weight_gradient in (True, False):
    generator = torch.Generator().manual_seed(3)
    y = torch.randn(37, 12, generator=generator).unflatten(0, (1, 37)).requires_grad_()
    gate = torch.randn(1, 37, 20, generator=generator)[..., 3:15].requires_grad_()
    weight = torch.randn(12, generator=generator).requires_grad_(weight_gradient)
    gradient = torch.randn(1, 37, 12, generator=generator)
    output = fused.GatedRMSNorm.apply(y, gate, weight, 6, 1e-5)  # on the CPU: the PyTorch computation
    expected = torch.autograd.grad(output, (y, gate, weight) if weight_gradient else (y, gate), gradient)

    triton_output, scale = fused._triton_gated_rms(y.detach(), gate.detach(), weight.detach(), 6, 1e-5)
    assert scale.shape == (37, 2)
    got = fused._triton_gated_rms_backward(gradient, y.detach(), gate.detach(), weight.detach(), scale, 6,
                                           weight_gradient)
    torch.testing.assert_close(triton_output, output.detach(), rtol=1e-5, atol=1e-6)
    assert (got[2] is None) != weight_gradient
    for actual, want in zip(got, expected):
        torch.testing.assert_close(actual, want, rtol=1e-5, atol=1e-6)
print('equal')
'''


def test_gated_norm_triton_kernels_equal_its_pytorch_computation():
    '''GatedRMSNorm's Triton forward and backward (under Triton's interpreter on the CPU, float32) equal its PyTorch
    computation, with and without the weight's gradient: two groups of six channels (a masked tile), 37 rows (a
    partial block of rows), the gate a slice of a wider tensor as in the mixer.'''
    run_under_triton_interpreter(_NORM_KERNELS_AGAINST_PYTORCH)
