'''Each rule on its own module: local conservation and hand-computed cases.'''
import inspect
import math

import pytest
import torch
from transformers.models.mamba.modeling_mamba import MambaRMSNorm
from zennit.core import Hook
from zennit.rules import Epsilon, Pass

from zennit_mamba import (
    DetachSelection, GateProduct, GradientTimesInput, HalfRule, LNRule, SelectiveScan, SiLU, SiLUIdentity,
)
from zennit_mamba.layers import DETACH_ATTRIBUTE, stack_operands


def propagate(rule, module, *inputs, output_relevance=None, **kwargs):
    '''Register ``rule`` on ``module``, run it on ``inputs`` and map output relevance to input relevance.'''
    leaves = [tensor.detach().clone().requires_grad_() for tensor in inputs]
    handles = rule.register(module)
    try:
        output = module(*leaves, **kwargs)
        output = output[0] if isinstance(output, tuple) else output
        if output_relevance is None:
            output_relevance = output.detach()
        relevance = torch.autograd.grad(output, leaves, output_relevance)
    finally:
        handles.remove()
    return output.detach(), relevance


def test_silu_identity_passes_relevance_unchanged():
    x = torch.tensor([-3.0, -0.5, 0.0, 0.7, 4.0], dtype=torch.float64)
    relevance_out = torch.tensor([0.1, -2.0, 0.5, 1.0, 3.0], dtype=torch.float64)
    _, (relevance,) = propagate(SiLUIdentity(), SiLU(), x, output_relevance=relevance_out)
    assert torch.equal(relevance, relevance_out)


def test_gradient_x_input_on_silu_leaks_what_the_paper_says():
    # without the identity rule: R(x) = x * silu'(x) * R(y) / y, off from R(y) by (dR/dy) sigmoid'(x) x^2
    x = torch.tensor([-1.5, 0.3, 2.0], dtype=torch.float64)
    sigmoid = torch.sigmoid(x)
    y = x * sigmoid
    relevance_out = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    _, (relevance,) = propagate(GradientTimesInput(1e-30), SiLU(), x, output_relevance=relevance_out)
    expected = x * (sigmoid + x * sigmoid * (1 - sigmoid)) * relevance_out / y
    assert torch.allclose(relevance, expected, rtol=1e-12)
    leak = relevance_out / y * sigmoid * (1 - sigmoid) * x ** 2
    assert torch.allclose(relevance - relevance_out, leak, rtol=1e-12)


def test_half_rule_gives_each_factor_half():
    value = torch.tensor([[2.0, -1.0, 0.5]], dtype=torch.float64)
    gate = torch.tensor([[3.0, 4.0, -2.0]], dtype=torch.float64)
    output, (relevance,) = propagate(HalfRule(), GateProduct(), stack_operands(value, gate))
    assert torch.equal(output, value * gate)
    assert torch.equal(relevance[..., 0], 0.5 * output)
    assert torch.equal(relevance[..., 1], 0.5 * output)


def test_gate_without_half_rule_doubles_relevance():
    value, gate = torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    output, (relevance,) = propagate(GradientTimesInput(1e-30), GateProduct(), stack_operands(value, gate))
    assert torch.allclose(relevance.sum(), 2 * output.sum(), rtol=1e-12)


def test_ln_rule_conserves_per_element_and_gradient_x_input_does_not():
    torch.manual_seed(0)
    norm = MambaRMSNorm(6).double()
    with torch.no_grad():
        norm.weight.normal_()
    hidden = torch.randn(2, 3, 6, dtype=torch.float64)
    output, (relevance,) = propagate(LNRule(), norm, hidden)
    assert torch.equal(relevance, output)
    _, (plain,) = propagate(GradientTimesInput(1e-30), norm, hidden)
    # the normalisation is scale invariant: gradient x input sums to ~0 per position (up to the norm's eps)
    assert plain.sum(-1).abs().max() < 1e-4 * output.abs().sum(-1).min()


def test_detach_selection_hand_computed_two_steps():
    # one channel, one state, two steps: y1 = (C1 d1 B1 + D) x1, y2 = C2 (a2 d1 B1 x1 + d2 B2 x2) + D x2
    x1, x2, d1, d2 = 0.8, -1.3, 0.4, 0.9
    B1, B2, C1, C2, A, D = 1.5, -0.7, 0.6, 2.0, -1.2, 0.3
    a2 = math.exp(d2 * A)
    y1 = (C1 * d1 * B1 + D) * x1
    y2 = C2 * (a2 * d1 * B1 * x1 + d2 * B2 * x2) + D * x2
    r1, r2 = 0.25, -1.5  # relevance of y1, y2
    expected_x1 = x1 * ((C1 * d1 * B1 + D) * r1 / y1 + C2 * a2 * d1 * B1 * r2 / y2)
    expected_x2 = x2 * (C2 * d2 * B2 + D) * r2 / y2

    def row(*values):
        return torch.tensor([[values]], dtype=torch.float64)

    packed = SelectiveScan.pack(row(x1, x2), row(d1, d2), row(B1, B2), row(C1, C2))
    output, (relevance,) = propagate(
        DetachSelection(1e-30), SelectiveScan(1, 1), packed, output_relevance=row(r1, r2),
        A=torch.tensor([[A]], dtype=torch.float64), D=torch.tensor([D], dtype=torch.float64),
    )
    assert torch.allclose(output, row(y1, y2), rtol=1e-14)
    x, delta, B, C = SelectiveScan(1, 1).unpack(relevance)
    assert torch.allclose(x, row(expected_x1, expected_x2), rtol=1e-12)
    # the selection receives no relevance
    assert torch.equal(delta, torch.zeros_like(delta))
    assert torch.equal(B, torch.zeros_like(B)) and torch.equal(C, torch.zeros_like(C))
    assert math.isclose(x.sum().item(), r1 + r2, rel_tol=1e-12)


def scan_inputs(channels=4, state=3, length=9, batch=2):
    torch.manual_seed(1)
    x = torch.randn(batch, channels, length, dtype=torch.float64)
    delta = torch.rand(batch, channels, length, dtype=torch.float64) + 0.1
    B, C = torch.randn(2, batch, state, length, dtype=torch.float64)
    A = -torch.rand(channels, state, dtype=torch.float64) - 0.5
    D = torch.randn(channels, dtype=torch.float64)
    return SelectiveScan.pack(x, delta, B, C), A, D


def test_detach_selection_conserves_locally_and_is_reverted():
    packed, A, D = scan_inputs()
    scan = SelectiveScan(4, 3)
    output, (relevance,) = propagate(DetachSelection(1e-30), scan, packed, A=A, D=D)
    assert torch.allclose(relevance.sum((1, 2)), output.sum((1, 2)), rtol=1e-12)
    assert not hasattr(scan, DETACH_ATTRIBUTE)


def test_selective_scan_without_the_rule_leaks_relevance_into_the_selection():
    packed, A, D = scan_inputs()
    output, (relevance,) = propagate(GradientTimesInput(1e-30), SelectiveScan(4, 3), packed, A=A, D=D)
    _, delta, B, C = SelectiveScan(4, 3).unpack(relevance)
    assert delta.abs().sum() > 1e-3 and B.abs().sum() > 1e-3 and C.abs().sum() > 1e-3


def test_detach_selection_refuses_other_modules():
    with pytest.raises(TypeError, match='SelectiveScan'):
        DetachSelection().register(torch.nn.Linear(2, 2))


def test_gradient_x_input_on_bias_free_linear_is_lrp0():
    torch.manual_seed(2)
    linear = torch.nn.Linear(5, 3, bias=False).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    relevance_out = torch.randn(4, 3, dtype=torch.float64)
    _, (relevance,) = propagate(GradientTimesInput(1e-30), linear, x, output_relevance=relevance_out)
    z = x @ linear.weight.T
    expected = x * ((relevance_out / z) @ linear.weight)
    assert torch.allclose(relevance, expected, rtol=1e-12)
    assert torch.allclose(relevance.sum(-1), relevance_out.sum(-1), rtol=1e-10)


def test_rules_copy_their_stabilizer():
    assert GradientTimesInput(0.5).copy().stabilizer == 0.5
    assert DetachSelection(0.25).copy().stabilizer == 0.25


class TwoInputProduct(torch.nn.Module):
    def forward(self, value, gate):
        return value * gate


#: zennit 1.0 hooks every tensor argument of a module and passes the others on to BasicHook's modified forward
ZENNIT_HOOKS_EVERY_ARGUMENT = 'kwargs' in inspect.signature(Hook.pre_forward).parameters


def test_zennit_rules_on_two_input_modules_hence_packed_inputs():
    value, gate = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    module = TwoInputProduct()

    def two_input_relevance(rule):
        handles = rule.register(module)
        try:
            output = module(value, gate)
            return output.detach(), torch.autograd.grad(output, (value, gate), output.detach())
        finally:
            handles.remove()

    # Pass returns one relevance for two inputs under either zennit
    with pytest.raises(RuntimeError, match='incorrect number of values'):
        two_input_relevance(Pass())
    if ZENNIT_HOOKS_EVERY_ARGUMENT:
        # zennit 1.0: LRP-0 reaches both factors, each with the whole relevance (the half rule's reason)
        output, relevance = two_input_relevance(Epsilon(1e-30))
        assert all(torch.allclose(factor, output, rtol=1e-12) for factor in relevance)
    else:
        # zennit 0.5.1 hooks see only a module's first input: a two-input product cannot carry a rule
        with pytest.raises(TypeError, match='missing 1 required positional argument'):
            two_input_relevance(Epsilon(1e-30))
    # on the packed GateProduct a zennit BasicHook reaches both factors under either version (LRP-0: R each)
    output, (relevance,) = propagate(Epsilon(1e-30), GateProduct(), stack_operands(value, gate))
    assert torch.allclose(relevance, output.unsqueeze(-1).expand(3, 2), rtol=1e-12)
