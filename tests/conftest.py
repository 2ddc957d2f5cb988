'''Shared helpers: small transformers Mamba models built from configs with fixed seeds, and explanation helpers.'''
import os
import sys
from typing import Collection, Optional, Tuple

import pytest
import torch
from transformers import MambaConfig, MambaForCausalLM
from transformers.utils import logging as transformers_logging

sys.path.insert(0, os.path.dirname(__file__))

from zennit_mamba import MambaComposite  # noqa: E402
from zennit_mamba._optional import mamba_ssm_modules  # noqa: E402

# transformers announces its reference kernels on every call without mamba-ssm; the tests do not need to read that
transformers_logging.set_verbosity_error()


def pytest_configure(config):
    # tests/mutation_check.py runs the suite with one rule switched off by patching the rule itself
    if os.environ.get('MAMBA_LRP_MUTATION'):
        from mutation_check import apply_mutation

        apply_mutation(os.environ['MAMBA_LRP_MUTATION'])
    config.addinivalue_line(
        'markers', 'unmodified_forward: runs transformers\' own Mamba forward on the CPU or in float64',
    )


def pytest_collection_modifyitems(config, items):
    # where mamba-ssm is installed, transformers' own Mamba forward calls its CUDA kernels, which take only CUDA
    # tensors in float32/16; the canonized forward does not use them
    if mamba_ssm_modules() is None:
        return
    skip = pytest.mark.skip(reason='transformers dispatches to mamba-ssm kernels (CUDA float32/16 only)')
    for item in items:
        if 'unmodified_forward' in item.keywords:
            item.add_marker(skip)


def make_mamba(
    layers: int = 2,
    hidden: int = 16,
    state: int = 8,
    vocab: int = 40,
    seed: int = 0,
    zero_conv_bias: bool = True,
    residual_in_fp32: bool = False,
    dtype: torch.dtype = torch.float64,
) -> MambaForCausalLM:
    '''A randomly initialised transformers MambaForCausalLM in eval mode.'''
    torch.manual_seed(seed)
    config = MambaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        state_size=state,
        num_hidden_layers=layers,
        conv_kernel=4,
        residual_in_fp32=residual_in_fp32,
    )
    model = MambaForCausalLM(config).to(dtype).eval()
    with torch.no_grad():
        for block in model.backbone.layers:
            # A_log and D start as constants; spread them so that every channel behaves differently
            block.mixer.A_log.add_(0.3 * torch.randn_like(block.mixer.A_log))
            block.mixer.D.add_(0.5 * torch.randn_like(block.mixer.D))
            block.norm.weight.add_(0.2 * torch.randn_like(block.norm.weight))
            # initial step sizes are tiny (0.001 to 0.1); trained models select more strongly
            block.mixer.dt_proj.bias.add_(3.0)
            block.mixer.dt_proj.weight.mul_(5.0)
            if zero_conv_bias:
                block.mixer.conv1d.bias.zero_()
    return model


def embed(model: MambaForCausalLM, batch: int, length: int, seed: int = 1) -> torch.Tensor:
    '''Embeddings of random token ids, detached.'''
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=generator)
    ids = ids.to(model.get_input_embeddings().weight.device)
    return model.get_input_embeddings()(ids).detach()


def last_logits(model: torch.nn.Module, embeddings: torch.Tensor, **kwargs) -> torch.Tensor:
    '''Logits at the last position in the model's dtype (transformers casts ``.logits`` to float32).'''
    hidden = model.backbone(inputs_embeds=embeddings, use_cache=False, **kwargs).last_hidden_state
    return model.lm_head(hidden[:, -1])


def explain(
    model: MambaForCausalLM,
    embeddings: torch.Tensor,
    targets: Optional[torch.Tensor] = None,
    epsilon: float = 1e-12,
    rules: Collection[str] = frozenset({'silu', 'ssm', 'gate', 'norm'}),
    composite: Optional[MambaComposite] = None,
    **kwargs,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    '''MambaLRP relevance of ``embeddings`` for the target logits at the last position.

    Returns relevance, explained logits and targets.
    '''
    composite = composite or MambaComposite(epsilon=epsilon, rules=rules)
    embeddings = embeddings.detach().clone().requires_grad_()
    with composite.context(model) as modified:
        logits = last_logits(modified, embeddings, **kwargs)
        if targets is None:
            targets = logits.argmax(-1)
        relevance = target_relevance(logits, embeddings, targets)
    return relevance, logits[torch.arange(len(targets)), targets].detach(), targets


def target_relevance(logits: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    '''The gradient at ``inputs`` of ``(batch, classes)`` logits, given each example's target logit (and zero
    elsewhere) as the output gradient: inside a composite, the relevance of ``inputs``.'''
    rows = torch.arange(len(targets))
    output_relevance = torch.zeros_like(logits)
    output_relevance[rows, targets] = logits[rows, targets]
    return torch.autograd.grad(logits, inputs, output_relevance)[0]


def gradient_x_input(
    model: MambaForCausalLM, embeddings: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    '''Plain gradient x input on the unmodified model.'''
    embeddings = embeddings.detach().clone().requires_grad_()
    logits = last_logits(model, embeddings)
    explained = logits[torch.arange(len(targets)), targets]
    gradient, = torch.autograd.grad(explained.sum(), embeddings)
    return embeddings * gradient


#: a word-level vocabulary with the special tokens Captum's and inseq's generation use
WORDS = '<pad> <unk> </s> the plot was good bad film very not it is great dull and but story'.split()


def word_tokenizer(vocabulary_size: int = 40):
    '''A Hugging Face tokenizer built here (no download): one id per whitespace-separated word.'''
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = WORDS + [f'w{index}' for index in range(vocabulary_size - len(WORDS))]
    tokenizer = Tokenizer(models.WordLevel({word: index for index, word in enumerate(words)}, unk_token='<unk>'))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token='<unk>', pad_token='<pad>', eos_token='</s>')


def run_under_triton_interpreter(script: str) -> None:
    '''Run ``script`` in a fresh interpreter with ``TRITON_INTERPRET=1`` (Triton's own jit functions, such as
    ``tl.sum``, run interpreted only where it was set before Triton was first imported, and a test session imports it
    early: zennit does) and assert that it printed ``equal``; skipped without Triton or before 3.8, whose interpreter
    fails on loop bounds passed as arguments.'''
    import subprocess

    triton = pytest.importorskip('triton')
    if tuple(int(part) for part in triton.__version__.split('.')[:2]) < (3, 8):
        pytest.skip('Triton\'s interpreter before 3.8 fails on loop bounds passed as arguments')
    result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                            env={**os.environ, 'TRITON_INTERPRET': '1'}, timeout=300)
    assert result.stdout.strip() == 'equal', result.stderr[-3000:]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    '''Largest absolute difference relative to the largest absolute expected value.'''
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def _fingerprint(value):
    '''What must come back unchanged: plain values by value, containers by their keys and the identity of their
    entries (parameters, buffers, submodules, hooks), everything else (configs, functions) by identity.'''
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return tuple((key, id(entry)) for key, entry in value.items())
    return id(value)


def snapshot(model: torch.nn.Module) -> dict:
    '''Everything a composite could leave behind on ``model``: each module's ``__dict__`` (instance attributes,
    parameters, buffers, submodules, every kind of hook), the state, and torch's global module hooks.'''
    modules = list(model.named_modules(remove_duplicate=False))
    return {
        'modules': [(name, id(module)) for name, module in modules],
        'dicts': {name: {key: _fingerprint(value) for key, value in vars(module).items()} for name, module in modules},
        'state': {key: value.clone() for key, value in model.state_dict(keep_vars=False).items()},
        'hooks': sum(
            len(module._forward_hooks) + len(module._forward_pre_hooks) + len(module._backward_hooks)
            + len(module._backward_pre_hooks) for module in model.modules()
        ),
        'instance_forwards': sum('forward' in vars(module) for module in model.modules()),
        'rule_settings': sum(key.startswith('lrp_') for module in model.modules() for key in vars(module)),
        'global_hooks': sum(len(hooks) for hooks in (
            torch.nn.modules.module._global_forward_hooks, torch.nn.modules.module._global_forward_pre_hooks,
            torch.nn.modules.module._global_backward_hooks)),
    }


def assert_snapshots_equal(after: dict, before: dict) -> None:
    '''Assert that ``model`` is exactly as it was: same modules, attributes, hooks and state.'''
    assert after['modules'] == before['modules']
    for name, attributes in before['dicts'].items():
        assert after['dicts'][name] == attributes, name
    assert after['state'].keys() == before['state'].keys()
    assert all(torch.equal(after['state'][key], value) for key, value in before['state'].items())
    for key in ('hooks', 'instance_forwards', 'rule_settings', 'global_hooks'):
        assert after[key] == before[key], key


@pytest.fixture
def model() -> MambaForCausalLM:
    return make_mamba()
