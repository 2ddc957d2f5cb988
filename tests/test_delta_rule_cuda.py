'''The delta-rule layers on a GPU through flash-linear-attention's chunk kernels (kernels/delta_rule_fla.py): the
kernels' forward and the values-only backward held to the PyTorch form's definition, and whole models explained through
them. The kernel tests skip without CUDA and flash-linear-attention.'''
import pytest
import torch
import torch.nn.functional as F
import transformers as tf

from conftest import relative_error
from zennit_mamba import MambaComposite
from zennit_mamba.core import ruleset
from zennit_mamba.kernels.delta_rule import chunk_gated_delta_rule
from zennit_mamba.kernels import delta_rule_fla
from zennit_mamba.kernels.delta_rule_fla import _fla, fla_delta_rule_applies, fla_values_delta_rule

needs_fla = pytest.mark.skipif(not torch.cuda.is_available() or _fla() is None,
                               reason='needs a CUDA GPU and flash-linear-attention')


@pytest.fixture(autouse=True)
def one_configuration_per_kernel(monkeypatch):
    '''Each Triton kernel compiled with the first of its autotuning configurations only: flash-linear-attention
    autotunes every kernel over dozens of them per shape and dtype, which took this file past 5 minutes on an H100.
    The results do not depend on the configuration; speed is measured in benchmarks/speed.py, fully tuned.'''
    try:
        from triton.runtime.autotuner import Autotuner
    except ImportError:
        return
    prune = Autotuner.prune_configs
    monkeypatch.setattr(Autotuner, 'prune_configs', lambda self, *args, **kwargs: prune(self, *args, **kwargs)[:1])


def delta_rule_inputs(per_channel: bool, length: int, dtype=torch.float32, device='cuda', heads=4, key_dim=64,
                      value_dim=32, batch=2):
    '''Normalised queries and keys, values, log-decays (per head or per key channel), write strengths and an initial
    state, as a trained layer gives them.'''
    generator = torch.Generator().manual_seed(0)

    def normal(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    query = F.normalize(normal(batch, heads, length, key_dim), dim=-1) * key_dim ** -0.5
    key = F.normalize(normal(batch, heads, length, key_dim), dim=-1)
    value = normal(batch, heads, length, value_dim)
    g = -F.softplus(normal(batch, heads, length, *((key_dim,) if per_channel else ())) - 2.0)
    beta = normal(batch, heads, length).sigmoid()
    state = normal(batch, heads, key_dim, value_dim) * 0.3
    return [tensor.to(device, dtype if index in (0, 1, 2) else torch.float32)
            for index, tensor in enumerate((query, key, value, g, beta, state))]


def test_the_kernels_serve_only_cuda_tensors_they_can_hold_constant():
    query, key, value, g, beta, _ = delta_rule_inputs(False, 8, torch.float64, 'cpu')
    assert not fla_delta_rule_applies(value, key.shape[-1])
    with pytest.raises(ValueError, match='selection rule'):
        fla_values_delta_rule(query.requires_grad_(), key, value, g, beta)


def test_the_chunks_transposed_product_is_the_loop_and_contiguous():
    '''``A^T g`` chunk by chunk, from the lower triangles only (what lies above is garbage in fla's buffers), as a
    kernel reads it: contiguous.'''
    from zennit_mamba.kernels.delta_rule_fla import CHUNK, _within_chunks_transposed

    generator = torch.Generator().manual_seed(0)
    matrix = torch.randn(2, 150, 3, CHUNK, generator=generator, dtype=torch.float64)
    gradient = torch.randn(2, 150, 3, 5, generator=generator, dtype=torch.float64)
    product = _within_chunks_transposed(matrix, gradient)
    expected = torch.zeros_like(gradient)
    for start in range(0, 150, CHUNK):
        size = min(CHUNK, 150 - start)
        # (t, heads, s) with s <= t kept
        block = torch.tril(matrix[:, start:start + size, :, :size].permute(0, 2, 1, 3)).permute(0, 2, 1, 3)
        expected[:, start:start + size] = torch.einsum('bths,bthv->bshv', block, gradient[:, start:start + size])
    assert product.is_contiguous()
    assert relative_error(product.double(), expected) <= 1e-6  # computed in float32


@needs_fla
@pytest.mark.parametrize('per_channel', [False, True], ids=['per head', 'per key channel'])
@pytest.mark.parametrize('length', [64, 200])
@pytest.mark.parametrize('with_state', [False, True])
def test_kernels_forward_and_values_backward_equal_the_rule_in_float64(per_channel, length, with_state):
    query, key, value, g, beta, state = delta_rule_inputs(per_channel, length)
    state = state if with_state else None
    value = value.requires_grad_()
    if with_state:
        state.requires_grad_()
    output, last = fla_values_delta_rule(query, key, value, g, beta, initial_state=state)
    output_gradient = torch.randn_like(output)
    last_gradient = torch.randn_like(last)
    wanted = [value] + ([state] if with_state else [])
    gradients = torch.autograd.grad((output * output_gradient).sum() + (last * last_gradient).sum(), wanted)

    exact = [tensor.detach().double().requires_grad_() for tensor in wanted]
    expected, expected_last = chunk_gated_delta_rule(query.double(), key.double(), exact[0], g.double(), beta.double(),
                                                     initial_state=exact[1] if with_state else None)
    expected_gradients = torch.autograd.grad(
        (expected * output_gradient.double()).sum() + (expected_last * last_gradient.double()).sum(), exact)
    assert relative_error(output.double(), expected) <= 2e-3
    assert relative_error(last.double(), expected_last) <= 2e-3
    for gradient, expected_gradient in zip(gradients, expected_gradients):
        assert relative_error(gradient.double(), expected_gradient) <= 2e-3


@needs_fla
@pytest.mark.parametrize('per_channel', [False, True], ids=['per head', 'per key channel'])
def test_kernels_in_bfloat16(per_channel):
    query, key, value, g, beta, _ = delta_rule_inputs(per_channel, 200, torch.bfloat16)
    value = value.requires_grad_()
    output, _ = fla_values_delta_rule(query, key, value, g, beta)
    output_gradient = torch.randn_like(output)
    gradient, = torch.autograd.grad(output, value, output_gradient)
    exact = value.detach().double().requires_grad_()
    expected, _ = chunk_gated_delta_rule(query.double(), key.double(), exact, g.double(), beta.double())
    expected_gradient, = torch.autograd.grad(expected, exact, output_gradient.double())
    assert output.dtype == gradient.dtype == torch.bfloat16
    assert relative_error(output.double(), expected) <= 3e-2
    assert relative_error(gradient.double(), expected_gradient) <= 3e-2


@needs_fla
@pytest.mark.parametrize('per_channel', [False, True], ids=['per head', 'per key channel'])
def test_values_backward_equals_the_kernels_own_backward(per_channel):
    '''The values' gradient of the values-only backward against flash-linear-attention's full backward pass.'''
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk_gated_delta_rule
    from fla.ops.kda import chunk_kda

    query, key, value, g, beta, _ = delta_rule_inputs(per_channel, 200)
    value = value.requires_grad_()
    output, _ = fla_values_delta_rule(query, key, value, g, beta)
    output_gradient = torch.randn_like(output)
    gradient, = torch.autograd.grad(output, value, output_gradient)

    layout = [tensor.transpose(1, 2).contiguous() for tensor in (query, key, value.detach(), g, beta)]
    layout[2].requires_grad_()
    own = chunk_kda if per_channel else fla_chunk_gated_delta_rule
    try:
        kernels_output, _ = own(*layout, scale=1.0)
        expected, = torch.autograd.grad(kernels_output, layout[2], output_gradient.transpose(1, 2).contiguous())
    except RuntimeError as error:  # fla 0.6 refuses its gated backward on Hopper with Triton < 3.7.1
        pytest.skip(f'flash-linear-attention refuses its own backward here: {error}')
    assert relative_error(kernels_output.transpose(1, 2), output) <= 1e-5
    # two float32 backward passes of other kernels and orders (Kimi's: 1.2e-3 apart on an H100), each within 2e-3 of
    # the float64 rule (test_kernels_forward_and_values_backward_equal_the_rule_in_float64)
    assert relative_error(gradient, expected.transpose(1, 2)) <= 2e-3


#: the delta-rule families with heads the kernels take (16 channels or more)
GPU_FAMILIES = {
    'OlmoHybrid': lambda: tf.OlmoHybridForCausalLM(tf.OlmoHybridConfig(
        vocab_size=64, hidden_size=128, intermediate_size=192, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, layer_types=['linear_attention', 'full_attention', 'linear_attention',
                                            'linear_attention'],
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32, linear_value_head_dim=32,
        pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    'Qwen3Next': lambda: tf.Qwen3NextForCausalLM(tf.Qwen3NextConfig(
        vocab_size=64, hidden_size=128, intermediate_size=192, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, layer_types=['linear_attention', 'full_attention', 'linear_attention',
                                                         'linear_attention'],
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32, linear_value_head_dim=32,
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
        pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    'KimiLinear': lambda: tf.KimiLinearForCausalLM(tf.KimiLinearConfig(
        vocab_size=64, hidden_size=128, intermediate_size=192, moe_intermediate_size=32, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_rope_head_dim=16, v_head_dim=32,
        qk_nope_head_dim=32, num_local_experts=4, num_experts_per_tok=2, linear_head_dim=32, linear_num_heads=4,
        layer_types=['linear_attention', 'full_attention', 'linear_attention', 'linear_attention'],
        mlp_layer_types=['dense', 'sparse', 'dense', 'sparse'], pad_token_id=0, bos_token_id=1, eos_token_id=2)),
}


def gpu_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = GPU_FAMILIES[name]().cuda().eval()
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if parameter_name.endswith('.bias'):
                parameter.zero_()
            elif parameter_name.endswith('dt_bias'):
                parameter.add_(2.0)
    return model


def explained_relevance(model, embeddings):
    embeddings = embeddings.detach().clone().requires_grad_()
    with MambaComposite().context(model) as modified:
        logits = modified(inputs_embeds=embeddings, use_cache=False).logits[:, -1]
        target = logits[torch.arange(len(logits)), logits.argmax(-1)]
        relevance, = torch.autograd.grad(target, embeddings, target.detach())
    return relevance, logits.detach(), target.detach()


@needs_fla
@pytest.mark.parametrize('name', list(GPU_FAMILIES))
def test_models_through_the_kernels_keep_the_forward_conserve_and_equal_the_pytorch_form(name, monkeypatch):
    model = gpu_model(name)
    embeddings = model.get_input_embeddings()(
        torch.randint(3, 64, (2, 300), generator=torch.Generator().manual_seed(1)).cuda()).detach()
    with torch.no_grad():
        expected_logits = model(inputs_embeds=embeddings, use_cache=False).logits[:, -1]

    monkeypatch.setattr(delta_rule_fla, 'SERVES_THE_RULE_SET', True)
    calls = []
    kernels = ruleset.fla_values_delta_rule
    monkeypatch.setattr(ruleset, 'fla_values_delta_rule', lambda *args, **kwargs: calls.append(1) or kernels(
        *args, **kwargs))
    relevance, logits, explained = explained_relevance(model, embeddings)
    assert len(calls) == 3  # the three delta-rule layers ran the kernels
    assert relative_error(logits, expected_logits) <= 1e-4  # transformers runs the same kernels
    assert ((relevance.sum((1, 2)) - explained).abs() <= 1e-3 * explained.abs()).all()

    # the PyTorch form (float32, exact in float64) on the same model
    monkeypatch.setattr(ruleset, 'fla_delta_rule_applies', lambda *args: False)
    pytorch_relevance, _, _ = explained_relevance(model, embeddings)
    assert len(calls) == 3
    assert relative_error(relevance, pytorch_relevance) <= 5e-3
