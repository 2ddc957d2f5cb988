'''GPU paths: transformers Mamba on CUDA, mamba-ssm's Mamba-1 and Mamba-2 modules and kernels. Skipped without CUDA or
mamba-ssm.'''
import copy
import importlib.util

import pytest
import torch

from conftest import embed, explain, make_mamba, relative_error
from reference import reference_relevance
from zennit_mamba import MambaComposite, UnsupportedModelError
from zennit_mamba._optional import mamba_ssm_modules
from zennit_mamba.kernels.scan import selective_scan
from zennit_mamba.kernels.ssd import ssd_scan
from zennit_mamba.kernels.ssd_triton import triton_ssd

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
needs_mamba_ssm = pytest.mark.skipif(
    not torch.cuda.is_available() or mamba_ssm_modules() is None, reason='needs a CUDA GPU and mamba-ssm'
)


@cuda
def test_transformers_model_on_cuda_conserves_and_matches_reference():
    model = make_mamba(layers=2, hidden=32).cuda()
    embeddings = embed(model, 2, 200).cuda()
    relevance, explained, targets = explain(model, embeddings)
    assert ((relevance.sum((1, 2)) - explained).abs() <= 1e-6 * explained.abs()).all()
    expected, _ = reference_relevance(model, embeddings, targets)
    assert relative_error(relevance, expected) <= 1e-8


def make_mamba_ssm(d_intermediate: int = 0, seed: int = 0):
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    torch.manual_seed(seed)
    config = MambaConfig(d_model=64, d_intermediate=d_intermediate, n_layer=2, vocab_size=64)
    model = MambaLMHeadModel(config, device='cuda', dtype=torch.float32).eval()
    with torch.no_grad():
        for block in model.backbone.layers:
            block.mixer.conv1d.bias.zero_()
            block.mixer.dt_proj.bias.add_(3.0)
            block.mixer.A_log.add_(0.3 * torch.randn_like(block.mixer.A_log))
    return model


def to_transformers(model):
    '''The same weights in transformers' MambaForCausalLM.'''
    from transformers import MambaConfig, MambaForCausalLM

    config = MambaConfig(
        vocab_size=model.lm_head.weight.shape[0], hidden_size=64, state_size=16, num_hidden_layers=2,
        expand=2, conv_kernel=4, layer_norm_epsilon=1e-5, residual_in_fp32=True,
    )
    converted = MambaForCausalLM(config).cuda().eval()
    state = {key.replace('backbone.embedding.', 'backbone.embeddings.'): value
             for key, value in model.state_dict().items()}
    converted.load_state_dict(state)
    return converted


def mamba_ssm_relevance(model, embeddings, targets, composite=None):
    embeddings = embeddings.detach().clone().requires_grad_()
    with (composite or MambaComposite()).context(model) as modified:
        logits = modified(None, inputs_embeds=embeddings).logits[:, -1]
        rows = torch.arange(len(targets))
        output_relevance = torch.zeros_like(logits)
        output_relevance[rows, targets] = logits[rows, targets]
        relevance, = torch.autograd.grad(logits, embeddings, output_relevance)
    return relevance, logits[rows, targets].detach()


@needs_mamba_ssm
def test_mamba_ssm_forward_unchanged_and_model_restored():
    model = make_mamba_ssm()
    ids = torch.randint(0, 64, (2, 50), device='cuda')
    with torch.no_grad():
        fused = model(ids).logits
    state = {key: value.clone() for key, value in model.state_dict().items()}
    with MambaComposite().context(model) as modified, torch.no_grad():
        inside = modified(ids).logits
    assert relative_error(inside, fused) <= 1e-4
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
    assert sum(len(module._forward_hooks) + len(module._forward_pre_hooks) for module in model.modules()) == 0
    assert not any('forward' in module.__dict__ for module in model.modules())
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, fused)


@needs_mamba_ssm
def test_mamba_ssm_relevance_equals_transformers_relevance_on_the_same_weights():
    model = make_mamba_ssm()
    converted = to_transformers(model)
    ids = torch.randint(0, 64, (2, 40), device='cuda')
    embeddings = model.backbone.embedding(ids).detach()
    expected, explained, targets = explain(converted, embeddings, epsilon=1e-6)
    relevance, logits = mamba_ssm_relevance(model, embeddings, targets)
    assert torch.allclose(logits, explained, rtol=1e-4)
    assert relative_error(relevance, expected) <= 1e-3
    assert ((relevance.sum((1, 2)) - logits).abs() <= 1e-3 * logits.abs()).all()


@needs_mamba_ssm
def test_mamba_ssm_cache_is_filled_and_continuation_refused():
    from mamba_ssm.utils.generation import InferenceParams

    model = make_mamba_ssm()
    ids = torch.randint(0, 64, (1, 12), device='cuda')
    expected = InferenceParams(max_seqlen=32, max_batch_size=1)
    filled = InferenceParams(max_seqlen=32, max_batch_size=1)
    with torch.no_grad():
        model(ids, inference_params=expected)
        with MambaComposite().context(model) as modified:
            modified(ids, inference_params=filled)
            filled.seqlen_offset = 12
            with pytest.raises(RuntimeError, match='explains whole sequences'):
                modified(ids[:, :1], inference_params=filled)
    # in_proj as a module call and as mamba-ssm's `weight @ x` round differently in float32
    for layer, (conv_state, ssm_state) in expected.key_value_memory_dict.items():
        assert relative_error(filled.key_value_memory_dict[layer][0], conv_state) <= 1e-5
        assert relative_error(filled.key_value_memory_dict[layer][1], ssm_state) <= 1e-4


@needs_mamba_ssm
def test_mamba_ssm_block_with_mlp_is_refused():
    model = make_mamba_ssm(d_intermediate=32)
    with pytest.raises(UnsupportedModelError, match='Block with an MLP'):
        MambaComposite().register(model)
    assert sum(len(module._forward_hooks) for module in model.modules()) == 0


@needs_mamba_ssm
@pytest.mark.parametrize('selection_detached', [False, True])
def test_torch_scan_matches_mamba_ssm_kernel_forward_and_backward(selection_detached):
    torch.manual_seed(0)
    x = torch.randn(2, 64, 1000, device='cuda')
    delta = torch.rand(2, 64, 1000, device='cuda')
    A = -torch.rand(64, 16, device='cuda') * 8
    B, C = torch.randn(2, 2, 16, 1000, device='cuda')
    D = torch.randn(64, device='cuda')
    grad_output = torch.randn_like(x)
    results = {}
    for implementation in ('torch', 'mamba_ssm'):
        inputs = [tensor.clone().requires_grad_() for tensor in (x, delta, A, B, C, D)]
        arguments = [tensor.detach() if selection_detached and index in (1, 2, 3, 4) else tensor
                     for index, tensor in enumerate(inputs)]
        output, _ = selective_scan(*arguments, implementation=implementation)
        wanted = [tensor for tensor in arguments if tensor.requires_grad]
        results[implementation] = (output,) + torch.autograd.grad(output, wanted, grad_output)
    assert len(results['torch']) == (3 if selection_detached else 7)
    for ours, kernel in zip(results['torch'], results['mamba_ssm']):
        assert relative_error(ours, kernel) <= 1e-4


@needs_mamba_ssm
@pytest.mark.parametrize('recompute', [False, True])
def test_float32_model_through_the_kernel_conserves_and_matches_the_float64_reference(recompute, monkeypatch):
    # cuDNN's default TF32 convolutions would round conv1d to 10 mantissa bits; this test is about float32
    monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', False)
    reference_model = make_mamba(layers=2, hidden=32).cuda()
    model = copy.deepcopy(reference_model).float()
    embeddings = embed(reference_model, 2, 300).cuda()
    relevance, explained, targets = explain(model, embeddings.float(), composite=MambaComposite(recompute=recompute))
    assert ((relevance.sum((1, 2)) - explained).abs() <= 1e-4 * explained.abs()).all()
    expected, _ = reference_relevance(reference_model, embeddings, targets)
    # mamba-ssm's kernel uses fast exponentials: measured 1.1e-4 on an H100
    assert relative_error(relevance.double(), expected) <= 5e-4


def causal_conv1d_installed() -> bool:
    return importlib.util.find_spec('causal_conv1d') is not None


def make_mamba_ssm2(seed: int = 0, **mixer_options):
    '''A two-layer mamba-ssm Mamba-2 language model; its own forward takes the fused path where causal-conv1d
    is installed (which that path needs).'''
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    torch.manual_seed(seed)
    mixer = dict(layer='Mamba2', d_state=16, headdim=16, chunk_size=32, use_mem_eff_path=causal_conv1d_installed())
    config = MambaConfig(d_model=64, d_intermediate=0, n_layer=2, vocab_size=64, ssm_cfg=dict(mixer, **mixer_options))
    model = MambaLMHeadModel(config, device='cuda', dtype=torch.float32).eval()
    with torch.no_grad():
        for block in model.backbone.layers:
            block.mixer.conv1d.bias.zero_()
            block.mixer.A_log.add_(0.3 * torch.randn_like(block.mixer.A_log))
            block.mixer.D.add_(0.5 * torch.randn_like(block.mixer.D))
            if hasattr(block.mixer, 'norm'):
                block.mixer.norm.weight.add_(0.2 * torch.randn_like(block.mixer.norm.weight))
    return model


def mamba2_to_transformers(model):
    '''The same weights in transformers' Mamba2ForCausalLM (mamba-ssm's default Mamba2 settings).'''
    from transformers import Mamba2Config, Mamba2ForCausalLM

    config = Mamba2Config(
        vocab_size=64, hidden_size=64, state_size=16, num_hidden_layers=2, expand=2, head_dim=16, num_heads=8,
        n_groups=1, conv_kernel=4, chunk_size=32, use_conv_bias=True, use_bias=False, layer_norm_epsilon=1e-5,
        residual_in_fp32=True, tie_word_embeddings=True,
    )
    converted = Mamba2ForCausalLM(config).cuda().eval()
    state = {key.replace('backbone.embedding.', 'backbone.embeddings.'): value
             for key, value in model.state_dict().items()}
    converted.load_state_dict(state)
    return converted


#: mamba-ssm Mamba2 settings that change the computation: grouped B/C, norm before the gate and step limits;
#: no gated norm, a gated MLP beside the SSM (d_ssm < d_inner) and one skip weight per channel
MAMBA2_VARIANTS = [
    {},
    dict(ngroups=2, norm_before_gate=True, dt_limit=(0.01, 0.5)),
    dict(d_ssm=64, rmsnorm=False, D_has_hdim=True),
]


@needs_mamba_ssm
@pytest.mark.parametrize('options', MAMBA2_VARIANTS)
def test_mamba_ssm_mamba2_forward_unchanged_conserves_and_model_restored(options, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', False)
    model = make_mamba_ssm2(**options)
    ids = torch.randint(0, 64, (2, 100), device='cuda')
    with torch.no_grad():
        original = model(ids).logits
    state = {key: value.clone() for key, value in model.state_dict().items()}
    with MambaComposite().context(model) as modified, torch.no_grad():
        inside = modified(ids).logits
    assert relative_error(inside, original) <= 1e-4
    embeddings = model.backbone.embedding(ids).detach()
    relevance, logits = mamba_ssm_relevance(model, embeddings, inside[:, -1].argmax(-1))
    # float32 rounding: up to 3.3e-5 measured on an H100
    assert ((relevance.sum((1, 2)) - logits).abs() <= 1e-4 * logits.abs()).all()
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
    assert sum(len(module._forward_hooks) + len(module._forward_pre_hooks) for module in model.modules()) == 0
    assert not any('forward' in module.__dict__ for module in model.modules())


@needs_mamba_ssm
def test_mamba_ssm_mamba2_relevance_matches_transformers_and_the_float64_reference(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', False)
    model = make_mamba_ssm2()
    converted = mamba2_to_transformers(model)
    ids = torch.randint(0, 64, (2, 150), device='cuda')
    embeddings = model.backbone.embedding(ids).detach()
    expected, explained, targets = explain(converted, embeddings, epsilon=1e-6)
    relevance, logits = mamba_ssm_relevance(model, embeddings, targets)
    assert torch.allclose(logits, explained, rtol=1e-4)
    assert relative_error(relevance, expected) <= 1e-4
    reference, _ = reference_relevance(converted.double(), embeddings.double(), targets)
    # float32 against the per-timestep loop in float64: 9.3e-5 measured on an H100, 1.7e-4 for the same model in
    # float32 on a CPU (this model's float32 conditioning, not the GPU path)
    assert relative_error(relevance.double(), reference) <= 5e-4


@needs_mamba_ssm
def test_mamba_ssm_mamba2_cache_is_filled_and_packed_sequences_refused():
    from mamba_ssm.utils.generation import InferenceParams

    model = make_mamba_ssm2(use_mem_eff_path=False)
    ids = torch.randint(0, 64, (1, 40), device='cuda')
    expected = InferenceParams(max_seqlen=64, max_batch_size=1)
    filled = InferenceParams(max_seqlen=64, max_batch_size=1)
    with torch.no_grad():
        model(ids, inference_params=expected)
        with MambaComposite().context(model) as modified:
            modified(ids, inference_params=filled)
            mixer = modified.backbone.layers[0].mixer
            with pytest.raises(ValueError, match='packed sequences'):
                mixer(torch.zeros(1, 4, 64, device='cuda'), seq_idx=torch.zeros(1, 4, dtype=torch.int32))
    for layer, (conv_state, ssm_state) in expected.key_value_memory_dict.items():
        assert relative_error(filled.key_value_memory_dict[layer][0], conv_state) <= 1e-5
        # the original fills the state from its SSD kernel, which rounds float32 to TF32 (9.6e-4 measured)
        assert relative_error(filled.key_value_memory_dict[layer][1], ssm_state) <= 5e-3


@needs_mamba_ssm
def test_mamba_ssm_block_with_attention_is_refused():
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    config = MambaConfig(d_model=64, d_intermediate=0, n_layer=2, vocab_size=64, ssm_cfg=dict(layer='Mamba2'),
                         attn_layer_idx=[1], attn_cfg=dict(num_heads=4))
    model = MambaLMHeadModel(config, device='cuda')
    with pytest.raises(UnsupportedModelError, match='Block with mixer MHA'):
        MambaComposite().register(model)
    assert sum(len(module._forward_hooks) for module in model.modules()) == 0


@needs_mamba_ssm
@pytest.mark.parametrize('per_channel_skip', [False, True])
@pytest.mark.parametrize('selection_detached', [False, True])
def test_torch_ssd_matches_mamba_ssm_kernel_forward_and_backward(selection_detached, per_channel_skip):
    torch.manual_seed(0)
    batch, length, heads, head_dim, groups, state = 2, 300, 8, 16, 2, 16
    x = torch.randn(batch, length, heads, head_dim, device='cuda')
    dt = torch.rand(batch, length, heads, device='cuda') * 0.5
    A = -torch.rand(heads, device='cuda') * 4
    B, C = torch.randn(2, batch, length, groups, state, device='cuda')
    D = torch.randn(heads, head_dim, device='cuda') if per_channel_skip else torch.randn(heads, device='cuda')
    grad_output = torch.randn_like(x)
    results = {}
    for implementation in ('torch', 'mamba_ssm'):
        inputs = [tensor.clone().requires_grad_() for tensor in (x, dt, A, B, C)]
        arguments = [tensor.detach() if selection_detached and index > 0 else tensor
                     for index, tensor in enumerate(inputs)]
        output, last_state = ssd_scan(*arguments, D, chunk_size=64, implementation=implementation)
        wanted = [tensor for tensor in arguments if tensor.requires_grad]
        results[implementation] = (output, last_state) + torch.autograd.grad(output, wanted, grad_output)
    assert len(results['torch']) == (3 if selection_detached else 7)
    # the kernel's Triton matrix products round float32 to TF32 (10 mantissa bits): 1.6e-3 measured on an H100,
    # which is why 'auto' takes this package's Triton SSD for float32
    for ours, kernel in zip(results['torch'], results['mamba_ssm']):
        assert relative_error(ours, kernel) <= 5e-3


@cuda
@pytest.mark.parametrize('heads, groups, head_dim, state, chunk', [(24, 1, 64, 128, 256), (6, 2, 48, 100, 64)])
def test_triton_ssd_is_float32_exact_forward_and_backward(heads, groups, head_dim, state, chunk, monkeypatch):
    ''''auto' runs CUDA float32 under the SSM rule through the package's Triton SSD (compiled, tf32x3 products): its
    outputs and its transposed-scan gradient agree with the float64 PyTorch SSD to float32 accuracy, 100 times below
    TF32's rounding (a Mamba2-130M head layout, and one with masked tiles, groups and a padded tail).'''
    from zennit_mamba.kernels import ssd

    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip('the Triton SSD serves Ampere and later GPUs (TF32 tensor cores); older ones take the PyTorch SSD')
    calls = []
    monkeypatch.setattr(ssd, 'triton_ssd',
                        lambda *arguments, **options: calls.append(1) or triton_ssd(*arguments, **options))
    torch.manual_seed(0)
    batch, length = 2, 1000
    x = torch.randn(batch, length, heads, head_dim, device='cuda', requires_grad=True)
    dt = torch.rand(batch, length, heads, device='cuda') * 0.2
    A = -torch.rand(heads, device='cuda') * 4
    B, C = torch.randn(2, batch, length, groups, state, device='cuda')
    D = torch.randn(heads, device='cuda')
    output, last_state = ssd.ssd_scan(x, dt, A, B, C, D, chunk_size=chunk)
    assert output.grad_fn.name().startswith('_LinearSSD')
    grad_output = torch.randn_like(output)
    gradient, = torch.autograd.grad(output, x, grad_output)
    x64 = x.detach().double().requires_grad_()
    expected, expected_state = ssd_scan(x64, *(tensor.double() for tensor in (dt, A, B, C, D)), chunk_size=chunk)
    expected_gradient, = torch.autograd.grad(expected, x64, grad_output.double())
    with torch.no_grad():  # the no-gradient forward takes the Triton SSD too
        no_grad_output, _ = ssd.ssd_scan(x, dt, A, B, C, D, chunk_size=chunk)
    assert len(calls) == 3  # forward, transposed scan, no-gradient forward
    for ours, exact in ((output, expected), (last_state, expected_state), (gradient, expected_gradient),
                        (no_grad_output, expected)):
        assert relative_error(ours, exact) <= 1e-5


@needs_mamba_ssm
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_fused_backward_kernels_match_the_float64_computation(dtype):
    '''The fused branch's backward on the GPU (two Triton kernels around mamba-ssm's forward scan in reversed time)
    equals the same equations in float64 on the CPU with the PyTorch scan; one step size underflowed to 0.'''
    from zennit_mamba.kernels.fused import _kernel_forward_scan, branch_gradients

    generator = torch.Generator('cuda').manual_seed(0)
    batch, channels, state, length = 2, 48, 16, 301

    def random(*shape):
        return torch.randn(*shape, device='cuda', generator=generator)

    gradient, gate, out = (random(batch, channels, length).to(dtype) for _ in range(3))
    conv = random(batch, channels, length + 3).to(dtype)[..., :length]
    delta = torch.rand(batch, channels, length, device='cuda', generator=generator).to(dtype)
    delta[0, 0, 5] = 0.0
    A, D = -torch.rand(channels, state, device='cuda', generator=generator), random(channels)
    B, C = (random(batch, 1, state, length).to(dtype) for _ in range(2))
    actual = branch_gradients(gradient, conv, gate, out, delta, A, B, C, D, _kernel_forward_scan)

    def torch_forward_scan(u, delta, A, B, C):
        return selective_scan(u, delta, A, B[:, 0], C[:, 0], implementation='torch')[0]

    expected = branch_gradients(*(value.cpu().double() for value in (gradient, conv, gate, out, delta, A, B, C, D)),
                                torch_forward_scan)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    for got, want in zip(actual, expected):
        assert got.dtype == dtype
        assert relative_error(got.cpu().double(), want) <= tolerance


@needs_mamba_ssm
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_fused_branch_is_taken_and_equals_the_operations_in_turn(dtype, monkeypatch):
    '''All three rules on, on the GPU: each Mamba-1 branch runs the fused function, with the relevance of the rule
    set's operations in turn (float32: 1e-5; bfloat16: rounding of the two paths differs).'''
    import zennit_mamba.kernels.fused as fused
    from zennit_mamba import RuleSet

    monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', False)
    model = make_mamba(layers=2, hidden=32).cuda().to(dtype)
    embeddings = embed(model, 2, 300).cuda()
    calls = []
    apply = fused.SiLUScanGate.apply
    monkeypatch.setattr(fused.SiLUScanGate, 'apply', lambda *arguments: calls.append(1) or apply(*arguments))
    relevance, explained, targets = explain(model, embeddings)
    assert len(calls) == 2  # one per layer
    monkeypatch.setattr(RuleSet, 'fuses_branch', lambda self: False)
    expected, _, _ = explain(model, embeddings, targets=targets)
    assert len(calls) == 2
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert relative_error(relevance.float(), expected.float()) <= tolerance


@needs_mamba_ssm
@pytest.mark.parametrize('make, convert', [('make_mamba_ssm', 'to_transformers'),
                                           ('make_mamba_ssm2', 'mamba2_to_transformers')], ids=['Mamba', 'Mamba2'])
def test_mamba_ssm_held_gate_equals_the_float64_reference(make, convert, monkeypatch):
    # gate_relevance='value' takes the unfused path on the GPU (the fused kernels restate the half rule)
    monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', False)
    model = globals()[make]()
    converted = globals()[convert](model)
    ids = torch.randint(0, 64, (2, 150), device='cuda')
    embeddings = model.backbone.embedding(ids).detach()
    targets = explain(converted, embeddings)[2]
    relevance, logits = mamba_ssm_relevance(model, embeddings, targets, MambaComposite(gate_relevance='value'))
    assert ((relevance.sum((1, 2)) - logits).abs() <= 1e-3 * logits.abs()).all()
    reference, _ = reference_relevance(converted.double(), embeddings.double(), targets,
                                       rules={'silu', 'ssm', 'gate', 'norm', 'held_gate'})
    assert relative_error(relevance.double(), reference) <= 5e-4
