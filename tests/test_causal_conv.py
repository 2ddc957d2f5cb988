'''The Mamba-2 mixers' causal convolution on time-major inputs (zennit_mamba.kernels.causal_conv): its Triton kernels
against torch's Conv1d (under Triton's interpreter on the CPU, and on a GPU), when it stands in for the module call, and
a GPU explanation through it against one through the module.'''
import functools

import pytest
import torch
import transformers as tf

from conftest import explain, relative_error, run_under_triton_interpreter
from zennit_mamba import MambaComposite
from zennit_mamba.kernels import causal_conv
from zennit_mamba.core.hooks import ZennitRule
from zennit_mamba.core.instance import called_plainly

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')

# run in a fresh interpreter under Triton's interpreter (conftest.run_under_triton_interpreter)
_KERNELS_AGAINST_CONV1D = '''
import torch
from zennit_mamba.kernels import causal_conv

generator = torch.Generator().manual_seed(4)
# two tiles of positions and two of channels (both partly masked); fewer positions than the kernel's width; width 3
for batch, length, channels, width, bias in [(2, 70, 130, 4, True), (1, 2, 5, 4, False), (2, 9, 3, 3, True)]:
    torch.manual_seed(length)
    conv1d = torch.nn.Conv1d(channels, channels, width, groups=channels, padding=width - 1, bias=bias)
    # the convolution's input as the mixer has it: a slice of the projection's output
    projected = torch.randn(batch, length, channels + 7, generator=generator).requires_grad_()
    x = projected[..., 3:3 + channels]
    gradient = torch.randn(batch, length, channels, generator=generator)
    parameters = [conv1d.weight] + ([conv1d.bias] if bias else [])

    expected = conv1d(x.transpose(1, 2))[..., :length].transpose(1, 2)
    expected_gradients = torch.autograd.grad(expected, [projected] + parameters, gradient)
    output = causal_conv.CausalConv.apply(x, conv1d.weight, conv1d.bias)
    gradients = torch.autograd.grad(output, [projected] + parameters, gradient)
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-6)
    assert output.is_contiguous()
    for actual, want in zip(gradients, expected_gradients):
        torch.testing.assert_close(actual, want, rtol=1e-5, atol=1e-5)

    # without the parameters' gradients: the input's alone, the same
    taps = conv1d.weight.detach().reshape(channels, width)
    gradient_x, gradient_taps, gradient_bias = causal_conv._triton_backward(gradient, x.detach(), taps, False)
    assert gradient_taps is None and gradient_bias is None
    torch.testing.assert_close(gradient_x, expected_gradients[0][..., 3:3 + channels], rtol=1e-5, atol=1e-5)
print('equal')
'''


def test_kernels_equal_the_convolution_module_forward_and_backward():
    '''CausalConv's Triton forward and backward (under Triton's interpreter on the CPU, float32) equal torch's causal
    depthwise Conv1d and its gradients to the input, the weight and the bias.'''
    run_under_triton_interpreter(_KERNELS_AGAINST_CONV1D)


def test_a_call_is_plain_only_without_anything_observing_it():
    conv1d = torch.nn.Conv1d(4, 4, 3, groups=4, padding=2)
    assert called_plainly(conv1d)
    observers = [
        lambda: conv1d.register_forward_hook(lambda module, args, output: None),
        lambda: conv1d.register_forward_pre_hook(lambda module, args: None),
        lambda: conv1d.register_full_backward_hook(lambda module, grad_input, grad_output: None),
        lambda: conv1d.register_full_backward_pre_hook(lambda module, grad_output: None),
        lambda: torch.nn.modules.module.register_module_forward_hook(lambda module, args, output: None),
        # this package's own Zennit rules (gamma, layer_map) need the call too
        lambda: ZennitRule(torch.nn.Identity()).register(conv1d),
    ]
    for observe in observers:
        handle = observe()
        assert not called_plainly(conv1d)
        handle.remove()
        assert called_plainly(conv1d)
    # accelerate's hooks replace the instance's forward
    conv1d.forward = functools.partial(torch.nn.Conv1d.forward, conv1d)
    assert not called_plainly(conv1d)


@cuda
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_kernels_equal_the_convolution_module_on_a_gpu(dtype, monkeypatch):
    # cuDNN's default TF32 convolutions would round the module's products
    monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', False)
    torch.manual_seed(0)
    conv1d = torch.nn.Conv1d(1792, 1792, 4, groups=1792, padding=3).cuda().to(dtype)
    projected = torch.randn(2, 1000, 3352, device='cuda', dtype=dtype).requires_grad_()
    x = projected[..., 1536:3328]
    gradient = torch.randn(2, 1000, 1792, device='cuda', dtype=dtype)
    assert causal_conv.applies(conv1d, x)
    wanted = [projected, conv1d.weight, conv1d.bias]
    expected = conv1d(x.transpose(1, 2))[..., :1000].transpose(1, 2)
    output = causal_conv.CausalConv.apply(x, conv1d.weight, conv1d.bias)
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    assert relative_error(output.float(), expected.float()) <= tolerance
    for actual, want in zip(torch.autograd.grad(output, wanted, gradient),
                            torch.autograd.grad(expected, wanted, gradient)):
        assert relative_error(actual.float(), want.float()) <= tolerance


@cuda
def test_only_a_plain_causal_depthwise_convolution_is_replaced():
    x = torch.zeros(1, 5, 4, device='cuda')
    assert causal_conv.applies(torch.nn.Conv1d(4, 4, 3, groups=4, padding=2).cuda(), x)
    not_causal = torch.nn.Conv1d(4, 4, 3, groups=4, padding=1).cuda()
    not_depthwise = torch.nn.Conv1d(4, 4, 3, padding=2).cuda()
    dilated = torch.nn.Conv1d(4, 4, 3, groups=4, padding=2, dilation=2).cuda()
    circular = torch.nn.Conv1d(4, 4, 3, groups=4, padding=2, padding_mode='circular').cuda()
    subclass = type('Subclass', (torch.nn.Conv1d,), {})(4, 4, 3, groups=4, padding=2).cuda()
    for conv1d in (not_causal, not_depthwise, dilated, circular, subclass):
        assert not causal_conv.applies(conv1d, x)
    assert not causal_conv.applies(torch.nn.Conv1d(4, 4, 3, groups=4, padding=2).double().cuda(), x.double())


@cuda
def test_a_gpu_explanation_through_the_kernel_equals_one_through_the_module(monkeypatch):
    '''A float32 Mamba2 on a GPU: the relevance with the kernel standing in for every conv1d equals the relevance with
    the module called (a hook on each convolution keeps the module call).'''
    monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', False)
    torch.manual_seed(0)
    model = tf.Mamba2ForCausalLM(tf.Mamba2Config(
        vocab_size=40, hidden_size=64, state_size=16, num_hidden_layers=2, num_heads=8, head_dim=16, n_groups=1,
        chunk_size=32, expand=2)).cuda().eval()
    embeddings = model.get_input_embeddings()(torch.randint(0, 40, (2, 300), device='cuda')).detach()
    convolutions = [layer.mixer.conv1d for layer in model.backbone.layers]

    class Observed(MambaComposite):
        '''The composite with a hook on each convolution once registered, as a Captum layer method puts one.'''

        def register(self, module):
            super().register(module)
            self.handles.extend(conv1d.register_forward_hook(lambda *arguments: None) for conv1d in convolutions)

    def relevance(composite, targets=None):
        return explain(model, embeddings, targets=targets, composite=composite)

    assert all(causal_conv.applies(conv1d, embeddings) for conv1d in convolutions)
    through_kernel, explained, targets = relevance(MambaComposite())
    through_module, _, _ = relevance(Observed(), targets)
    # float32 sums of terms of both signs: rounding relative to the terms' magnitude
    scale = through_kernel.abs().sum((1, 2))
    assert ((through_kernel.sum((1, 2)) - explained).abs() <= 1e-5 * scale).all()
    assert relative_error(through_kernel, through_module) <= 1e-5
