'''Each rule on its own: local conservation and hand-computed cases, in each of its forms (the function the canonized
mixers call through a RuleSet, the Zennit hook on a module, and for the LN-rule the standard RMSNorm's forward with the
rule in place), and Zennit's own rules inside the one pass.'''
import importlib
import inspect
import math
import textwrap
import types

import pytest
import torch
from transformers.models.mamba.modeling_mamba import MambaRMSNorm
from zennit.core import Hook
from zennit.rules import Epsilon, Gamma, Pass

from zennit_mamba import DetachSelection, HalfRule, LNRule, RuleSet, SiLUIdentity, ZennitRule
from zennit_mamba.core.layers import AttentionProbabilities, GatedProduct, NormRule, runs_standard_rms_norm


def gradient_x_input(output, inputs, output_relevance=None):
    '''Relevance of ``inputs`` for ``output_relevance`` (the output itself by default): ``x * J^T (R / y)``.'''
    output_relevance = output.detach() if output_relevance is None else output_relevance
    gradients = torch.autograd.grad(output, inputs, output_relevance / output.detach(), allow_unused=True)
    return [None if gradient is None else value * gradient for value, gradient in zip(inputs, gradients)]


def through(rule, module, *inputs, output_relevance=None):
    '''Register ``rule`` on ``module``, run it on copies of ``inputs`` and return output and input relevance.'''
    leaves = [tensor.detach().clone().requires_grad_() for tensor in inputs]
    handles = rule.register(module) if rule is not None else None
    try:
        output = module(*leaves)
        return output.detach(), gradient_x_input(output, leaves, output_relevance)
    finally:
        if handles is not None:
            handles.remove()


def leaves(*values):
    return [value.detach().clone().requires_grad_() for value in values]


def test_silu_identity_passes_relevance_unchanged():
    x = torch.tensor([-3.0, -0.5, 0.7, 4.0], dtype=torch.float64)
    relevance_out = torch.tensor([0.1, -2.0, 1.0, 3.0], dtype=torch.float64)
    _, (relevance,) = through(SiLUIdentity(), torch.nn.SiLU(), x, output_relevance=relevance_out)
    assert torch.allclose(relevance, relevance_out, rtol=1e-14)
    # the mixers' form: the same rule through a RuleSet
    x, = leaves(x)
    relevance, = gradient_x_input(RuleSet({'silu'}).activation('silu', x), [x], relevance_out)
    assert torch.allclose(relevance, relevance_out, rtol=1e-14)


def test_gradient_x_input_on_silu_leaks_what_the_paper_says():
    # without the identity rule: R(x) = x * silu'(x) * R(y) / y, off from R(y) by (dR/dy) sigmoid'(x) x^2
    x = torch.tensor([-1.5, 0.3, 2.0], dtype=torch.float64)
    sigmoid = torch.sigmoid(x)
    y = x * sigmoid
    relevance_out = torch.ones(3, dtype=torch.float64)
    _, (relevance,) = through(None, torch.nn.SiLU(), x, output_relevance=relevance_out)
    expected = x * (sigmoid + x * sigmoid * (1 - sigmoid)) * relevance_out / y
    assert torch.allclose(relevance, expected, rtol=1e-12)
    leak = relevance_out / y * sigmoid * (1 - sigmoid) * x ** 2
    assert torch.allclose(relevance - relevance_out, leak, rtol=1e-12)
    x, = leaves(x)
    relevance, = gradient_x_input(RuleSet(()).activation('silu', x), [x], relevance_out)
    assert torch.allclose(relevance, expected, rtol=1e-12)


def test_half_rule_gives_each_factor_half():
    value, gate = leaves(torch.tensor([[2.0, -1.0, 0.5]], dtype=torch.float64),
                         torch.tensor([[3.0, 4.0, -2.0]], dtype=torch.float64))
    output = RuleSet({'gate'}).gate(value, gate)
    assert torch.equal(output, value * gate)
    for relevance in gradient_x_input(output, [value, gate]):
        assert torch.allclose(relevance, 0.5 * output.detach(), rtol=1e-14)


def test_held_gate_gives_the_value_all_and_the_gate_nothing():
    # gate_relevance='value' (HeldGate): R(y) = y * g, R(g) = 0; the half rule stays on other products
    value, gate = leaves(torch.tensor([[2.0, -1.0, 0.5]], dtype=torch.float64),
                         torch.tensor([[3.0, 4.0, -2.0]], dtype=torch.float64))
    rules = RuleSet({'gate'}, gate_relevance='value')
    output = rules.output_gate(value, gate)
    assert torch.equal(output, value * gate)
    value_relevance, = gradient_x_input(output, [value])
    assert torch.equal(value_relevance, torch.tensor([[6.0, -4.0, -1.0]], dtype=torch.float64))
    assert torch.autograd.grad(output.sum(), gate, allow_unused=True, retain_graph=True) == (None,)  # held
    for relevance in gradient_x_input(rules.gate(value, gate), [value, gate]):
        assert torch.allclose(relevance, 0.5 * output.detach(), rtol=1e-14)
    # without the gate rule (its ablation) the product is plain, whichever treatment is chosen
    plain = RuleSet((), gate_relevance='value').output_gate(value, gate)
    assert torch.allclose(sum(gradient_x_input(plain, [value, gate])), 2 * output.detach(), rtol=1e-14)


def test_an_unknown_gate_relevance_is_refused():
    with pytest.raises(ValueError, match="gate_relevance must be one of \\('half', 'value'\\)"):
        RuleSet(gate_relevance='gate')


def test_gate_without_half_rule_doubles_relevance():
    value, gate = leaves(torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64))
    output = RuleSet(()).gate(value, gate)
    relevance = gradient_x_input(output, [value, gate])
    assert torch.allclose(sum(relevance).sum(), 2 * output.sum(), rtol=1e-12)


class GatedMLP(torch.nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = (torch.nn.Linear(width, width, bias=False) for _ in range(3))

    def forward(self, x):
        self.product = torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(self.product)


def test_half_rule_on_a_gated_mlp_halves_the_product_gradient():
    torch.manual_seed(0)
    mlp = GatedMLP().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    # the half rule attaches to a gated MLP's product as GatedProduct (zennit_mamba.core.layers)
    _, (halved,) = through(GatedProduct('down_proj'), mlp, x)
    _, (plain,) = through(None, mlp, x)
    assert torch.allclose(halved, 0.5 * plain, rtol=1e-12)
    with pytest.raises(TypeError, match='acts inside canonized Mamba mixers'):
        HalfRule().register(torch.nn.Linear(2, 2))


def test_ln_rule_conserves_per_element_and_gradient_x_input_does_not():
    torch.manual_seed(0)
    norm = MambaRMSNorm(6).double()
    with torch.no_grad():
        norm.weight.normal_()
    hidden = torch.randn(2, 3, 6, dtype=torch.float64)
    output, (relevance,) = through(LNRule(), norm, hidden)
    assert torch.allclose(relevance, output, rtol=1e-14)
    _, (plain,) = through(None, norm, hidden)
    # the normalisation is scale invariant: gradient x input sums to ~0 per position (up to the norm's eps)
    assert plain.sum(-1).abs().max() < 1e-4 * output.abs().sum(-1).min()


class OffsetRMSNorm(MambaRMSNorm):
    '''An RMSNorm whose forward is not transformers' standard one: ``(1 + w) * h / rms(h)``.'''

    def forward(self, hidden_states):
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return (1 + self.weight) * hidden_states * torch.rsqrt(variance + self.variance_epsilon)


def test_ln_rule_on_a_float32_standard_rms_norm_is_its_forward_with_the_scale_constant():
    torch.manual_seed(0)
    norm = MambaRMSNorm(6)
    with torch.no_grad():
        norm.weight.normal_()
    hidden = torch.randn(2, 3, 6)
    original = norm(hidden)
    # the LN-rule attaches to a norm as NormRule (zennit_mamba.core.layers)
    handles = NormRule().register(norm)
    assert 'forward' in vars(norm)  # no hook: the forward itself, with the scale detached
    leaf = hidden.clone().requires_grad_()
    output = norm(leaf)
    gradient, = torch.autograd.grad(output, leaf, torch.ones_like(output), retain_graph=True)
    handles.remove()
    assert 'forward' not in vars(norm)
    assert torch.equal(output, original)
    scale = torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    assert torch.allclose(gradient, norm.weight * scale, rtol=1e-6)  # d(w h r)/dh for a constant r
    relevance, = gradient_x_input(output, [leaf])
    assert torch.allclose(relevance, output.detach(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('family', ['mamba', 'falcon_mamba', 'mamba2', 'bamba', 'jamba', 'zamba2', 'granitemoehybrid',
                                    'falcon_h1'])
def test_the_families_norms_run_the_standard_forward(family):
    # upstream code that stops matching falls back to the hook (correct, slower): this test notices it
    module = importlib.import_module(f'transformers.models.{family}.modeling_{family}')
    norm, = (value for name, value in vars(module).items()
             if name.endswith('RMSNorm') and 'Gated' not in name and 'Weightless' not in name)
    assert runs_standard_rms_norm(norm(4))


def test_ln_rule_takes_a_hook_on_norms_that_do_not_run_the_standard_forward():
    torch.manual_seed(0)
    offset = OffsetRMSNorm(6).double()
    wrapped = MambaRMSNorm(6).double()
    wrapped.forward = lambda hidden_states: 2 * MambaRMSNorm.forward(wrapped, hidden_states)
    hidden = torch.randn(2, 3, 6, dtype=torch.float64)
    # the standard forward's code (compiled beside an import, as in a module), where ``torch`` then names another
    # object
    namespace = {}
    exec('import torch\n' + textwrap.dedent(inspect.getsource(MambaRMSNorm.forward)), namespace)
    namespace['torch'] = types.SimpleNamespace(float32=torch.float32, rsqrt=lambda value: 2 * torch.rsqrt(value))
    elsewhere = type('ElsewhereRMSNorm', (MambaRMSNorm,), {'forward': namespace['forward']})(6).double()
    for norm in (offset, wrapped, elsewhere):
        with torch.no_grad():
            norm.weight.normal_()
        original = norm(hidden)
        output, (relevance,) = through(LNRule(), norm, hidden)
        # the module's own forward ran, with the ratio u / h held constant
        assert torch.equal(output, original)
        assert torch.allclose(relevance, output, rtol=1e-14)


def scan_leaves(x, delta, B, C):
    return leaves(x, delta, B, C)


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

    x, delta, B, C = scan_leaves(row(x1, x2), row(d1, d2), row(B1, B2), row(C1, C2))
    output, _ = RuleSet({'ssm'}).scan(x, delta, torch.tensor([[A]], dtype=torch.float64), B, C,
                                      torch.tensor([D], dtype=torch.float64))
    assert torch.allclose(output, row(y1, y2), rtol=1e-14)
    relevance = gradient_x_input(output, [x, delta, B, C], row(r1, r2))
    assert torch.allclose(relevance[0], row(expected_x1, expected_x2), rtol=1e-12)
    # the selection receives no relevance
    assert relevance[1:] == [None, None, None]
    assert math.isclose(relevance[0].sum().item(), r1 + r2, rel_tol=1e-12)


def scan_inputs(channels=4, state=3, length=9, batch=2):
    torch.manual_seed(1)
    x = torch.randn(batch, channels, length, dtype=torch.float64)
    delta = torch.rand(batch, channels, length, dtype=torch.float64) + 0.1
    B, C = torch.randn(2, batch, state, length, dtype=torch.float64)
    A = -torch.rand(channels, state, dtype=torch.float64) - 0.5
    D = torch.randn(channels, dtype=torch.float64)
    return scan_leaves(x, delta, B, C), A, D


def test_detach_selection_conserves_locally():
    (x, delta, B, C), A, D = scan_inputs()
    output, _ = RuleSet({'ssm'}).scan(x, delta, A, B, C, D)
    relevance, = gradient_x_input(output, [x])
    assert torch.allclose(relevance.sum((1, 2)), output.detach().sum((1, 2)), rtol=1e-12)


def test_selective_scan_without_the_rule_leaks_relevance_into_the_selection():
    (x, delta, B, C), A, D = scan_inputs()
    output, _ = RuleSet(()).scan(x, delta, A, B, C, D)
    _, delta, B, C = gradient_x_input(output, [x, delta, B, C])
    assert delta.abs().sum() > 1e-3 and B.abs().sum() > 1e-3 and C.abs().sum() > 1e-3


def test_attention_rule_makes_attention_linear_in_its_input():
    # CP-LRP: with the probabilities constant, o = O (P (h W_v)) is linear in h, and gradient x input conserves
    from test_families import build

    model = build('Bamba')
    attention = model.model.layers[1].self_attn
    hidden = torch.randn(2, 7, 32, dtype=torch.float64)
    position_embeddings = model.model.rotary_emb(hidden, torch.arange(7)[None])

    def relevance_sums(rule):
        h, = leaves(hidden)
        handles = rule.register(attention) if rule is not None else None
        try:
            output = attention(h, position_embeddings=position_embeddings)[0]
        finally:
            if handles is not None:
                handles.remove()
        relevance, = gradient_x_input(output.sum(-1), [h])
        return relevance.sum(-1).sum(-1), output.detach().sum(-1).sum(-1)

    # the attention rule attaches to transformers' attention as AttentionProbabilities (zennit_mamba.core.layers)
    relevance, explained = relevance_sums(AttentionProbabilities())
    assert torch.allclose(relevance, explained, rtol=1e-12)
    relevance, explained = relevance_sums(None)
    assert not torch.allclose(relevance, explained, rtol=1e-3)


def test_rules_that_act_inside_mixers_refuse_modules():
    with pytest.raises(TypeError, match='acts inside canonized Mamba mixers'):
        DetachSelection().register(torch.nn.Linear(2, 2))


def test_unknown_rule_names_are_refused():
    with pytest.raises(ValueError, match=r"Unknown MambaLRP rules \['selu'\]"):
        RuleSet({'silu', 'selu'})


def test_zennit_epsilon_inside_the_one_pass_is_lrp0_on_a_linear():
    torch.manual_seed(2)
    linear = torch.nn.Linear(5, 3, bias=False).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    relevance_out = torch.randn(4, 3, dtype=torch.float64)
    _, (relevance,) = through(ZennitRule(Epsilon(1e-30)), linear, x, output_relevance=relevance_out)
    z = x @ linear.weight.T
    expected = x * ((relevance_out / z) @ linear.weight)
    assert torch.allclose(relevance, expected, rtol=1e-12)
    assert torch.allclose(relevance.sum(-1), relevance_out.sum(-1), rtol=1e-10)


def zennit_own_relevance(rule, module, x, relevance_out):
    '''Relevance by zennit's own hook mechanism (relevance flows backward as the gradient).'''
    x = x.detach().clone().requires_grad_()
    handles = rule.register(module)
    try:
        output = module(x)
        return torch.autograd.grad(output, x, relevance_out)[0]
    finally:
        handles.remove()


def test_zennit_gamma_inside_the_one_pass_equals_zennit_itself_also_when_called_twice():
    torch.manual_seed(3)
    linear = torch.nn.Linear(5, 5).double()
    first, second = torch.randn(2, 4, 5, dtype=torch.float64)
    relevance_out = torch.randn(4, 5, dtype=torch.float64)
    expected = zennit_own_relevance(Gamma(0.25, stabilizer=1e-30), linear, first, relevance_out)
    _, (relevance,) = through(ZennitRule(Gamma(0.25, stabilizer=1e-30)), linear, first,
                              output_relevance=relevance_out)
    assert torch.allclose(relevance, expected, rtol=1e-10)

    # the same module on two inputs in one graph: each call keeps its own input (zennit's hook keeps the last)
    a, b = leaves(first, second)
    handles = ZennitRule(Gamma(0.25, stabilizer=1e-30)).register(linear)
    try:
        outputs = linear(a), linear(b)
        relevance_a, relevance_b = torch.autograd.grad(outputs, (a, b), (relevance_out / outputs[0].detach(),
                                                                         relevance_out / outputs[1].detach()))
    finally:
        handles.remove()
    assert torch.allclose(a * relevance_a, expected, rtol=1e-10)
    assert torch.allclose(b * relevance_b, zennit_own_relevance(Gamma(0.25, stabilizer=1e-30), linear, second,
                                                                relevance_out), rtol=1e-10)


class TwoInputProduct(torch.nn.Module):
    def forward(self, value, gate):
        return value * gate


#: zennit 1.0 hooks every tensor argument of a module and passes the others on to BasicHook's modified forward
ZENNIT_HOOKS_EVERY_ARGUMENT = 'kwargs' in inspect.signature(Hook.pre_forward).parameters


def test_zennit_rules_on_two_input_modules():
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
