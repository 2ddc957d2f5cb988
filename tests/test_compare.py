'''Comparing methods in one loop: Captum's own methods and MambaLRP on one ExplainedLogits, one attribute() call.'''
import pytest
import torch
from captum.attr import (
    InputXGradient, IntegratedGradients, LayerGradientXActivation, LayerIntegratedGradients, NoiseTunnel, Saliency,
)

from captum_mamba import ExplainedLogits, LayerMambaLRP, MambaLRP
from conftest import assert_snapshots_equal, make_mamba, relative_error, snapshot
from test_cuda import make_mamba_ssm, make_mamba_ssm2, needs_mamba_ssm
from test_families import build

#: methods on embeddings, and layer methods on token ids (with the embedding layer): built from the wrapped model alone
METHODS = {
    'MambaLRP': MambaLRP, 'InputXGradient': InputXGradient, 'IntegratedGradients': IntegratedGradients,
    'Saliency': Saliency, 'SmoothGrad': lambda forward: NoiseTunnel(InputXGradient(forward)),
}
LAYER_METHODS = {
    'LayerMambaLRP': LayerMambaLRP, 'LayerGradientXActivation': LayerGradientXActivation,
    'LayerIntegratedGradients': LayerIntegratedGradients,
}


def attribute_with_every_method(wrapped, embeddings, ids, forward_args=None):
    '''The one loop: every method, the same object and the same call.'''
    results = {}
    for method_name, method in METHODS.items():
        results[method_name] = method(wrapped).attribute(embeddings, target=3, additional_forward_args=forward_args)
    for method_name, method in LAYER_METHODS.items():
        results[method_name] = method(wrapped, wrapped.embeddings).attribute(
            ids, target=3, additional_forward_args=forward_args)
    return results


def model_of(name):
    return make_mamba(layers=2) if name == 'Mamba' else build(name)


@pytest.mark.parametrize('name', ['Mamba', 'Mamba2', 'Bamba'])
def test_one_loop_over_methods_on_one_wrapped_model(name):
    model = model_of(name)
    before = snapshot(model)
    wrapped = ExplainedLogits(model)
    ids = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6])  # right padding: the first example's last real token is 3
    embeddings = wrapped.embeddings(ids).detach()
    torch.manual_seed(0)  # NoiseTunnel's noise

    results = attribute_with_every_method(wrapped, embeddings, ids, (mask,))
    for method_name, attribution in results.items():
        assert attribution.shape == embeddings.shape and torch.isfinite(attribution).all(), method_name
        assert torch.equal(attribution[0, 4:], torch.zeros_like(attribution[0, 4:])), method_name  # pads
    # what each method must be, computed by hand from the model itself
    leaf = embeddings.clone().requires_grad_()
    logits = model(inputs_embeds=leaf, attention_mask=mask, use_cache=False).logits.to(leaf.dtype)
    explained = logits[[0, 1], [3, 5], 3]
    gradient, = torch.autograd.grad(explained.sum(), leaf)
    assert relative_error(results['InputXGradient'], gradient * embeddings) <= 1e-10
    assert relative_error(results['LayerGradientXActivation'], gradient * embeddings) <= 1e-10
    assert relative_error(results['Saliency'], gradient.abs()) <= 1e-10
    # the layer variant's default baseline is token id 0, the plain one's a zero embedding
    token_zero = wrapped.embeddings(torch.zeros_like(ids)).detach()
    expected = IntegratedGradients(wrapped).attribute(embeddings, token_zero, target=3, additional_forward_args=(mask,))
    assert relative_error(results['LayerIntegratedGradients'], expected) <= 1e-8
    relevance = MambaLRP(model).attribute(embeddings, target=3, additional_forward_args=(mask,))
    assert relative_error(results['MambaLRP'], relevance) <= 1e-12
    assert relative_error(results['LayerMambaLRP'], relevance) <= 1e-12
    # the default epsilon (1e-6) moves the sum by about epsilon
    assert ((relevance.sum((1, 2)) - explained.detach()).abs() <= 2e-6).all()
    assert_snapshots_equal(snapshot(model), before)


def test_mamba_lrp_takes_a_forward_function_with_the_model_named():
    model = make_mamba(layers=2)
    embeddings = model.get_input_embeddings()(torch.tensor([[1, 5, 2, 7]])).detach()
    expected = MambaLRP(model).attribute(embeddings, target=3)

    def last_logits(inputs):
        return model(inputs_embeds=inputs, use_cache=False).logits[:, -1]

    relevance = MambaLRP(last_logits, model=model).attribute(embeddings, target=3)
    assert relative_error(relevance, expected) <= 1e-12
    layer = LayerMambaLRP(lambda ids: model(ids, use_cache=False).logits[:, -1], model.get_input_embeddings(),
                          model=model)
    assert relative_error(layer.attribute(torch.tensor([[1, 5, 2, 7]]), target=3), expected) <= 1e-12
    with pytest.raises(TypeError, match=r'MambaLRP\(forward_func, model=model\)'):
        MambaLRP(last_logits)
    with pytest.raises(TypeError, match='takes a transformers or mamba-ssm language model'):
        ExplainedLogits(torch.nn.Linear(2, 2))


@needs_mamba_ssm
@pytest.mark.parametrize('make', [make_mamba_ssm, make_mamba_ssm2], ids=['Mamba', 'Mamba2'])
def test_one_loop_over_methods_on_a_mamba_ssm_model(make):
    # mamba-ssm's backbone takes only token ids: ExplainedLogits feeds embeddings through its embedding layer
    model = make()
    before = snapshot(model)
    wrapped = ExplainedLogits(model)
    ids = torch.randint(0, 64, (2, 50), device='cuda', generator=torch.Generator('cuda').manual_seed(2))
    embeddings = wrapped.embeddings(ids).detach()
    torch.manual_seed(0)
    results = attribute_with_every_method(wrapped, embeddings, ids)
    for method_name, attribution in results.items():
        assert attribution.shape == embeddings.shape and torch.isfinite(attribution).all(), method_name
    # the embedding path against Captum's layer hook on the token-id path
    assert relative_error(results['InputXGradient'], results['LayerGradientXActivation']) <= 1e-5
    assert relative_error(results['LayerMambaLRP'], results['MambaLRP']) <= 1e-5
    with torch.no_grad():
        explained = model(ids).logits[:, -1, 3]
    assert torch.allclose(results['MambaLRP'].sum((1, 2)), explained, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match='takes no attention_mask'):
        wrapped(embeddings, torch.ones_like(ids))
    assert_snapshots_equal(snapshot(model), before)
