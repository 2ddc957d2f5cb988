'''What every canonized mixer shares around its computation: padding masks, refused arguments, caches filled as the
original forward fills them, recomputation in the backward pass, and time blocks on the CPU.'''
import functools
from typing import Callable, Iterator, NamedTuple, Optional, Tuple, TypeVar

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from zennit_mamba.core.hooks import ZennitRule
from zennit_mamba.core.instance import global_module_hooks
from zennit_mamba.core.upstream import refuse_keywords
from zennit_mamba.core.offload import weights_in_place
from zennit_mamba.kernels.ssd_triton import on_device_of

#: what a mixer function returns (a MixerOutput, or the output tensor itself)
T = TypeVar('T')

#: on a CPU, a mixer runs over time blocks of this many positions (each block's scan continued from the previous
#: block's last state; its projection and convolution also read the positions before it that the convolution needs):
#: every tensor of the mixer is then of a bounded size, which keeps a long input's time per token that of a short one
#: (whole 8,192-token tensors outgrow the caches and the TLB and are fresh mappings from the system, paid in page
#: faults)
CPU_TIME_BLOCK = 1024


class MixerOutput(NamedTuple):
    '''Output of a canonized mixer computation and the states a cache keeps.'''
    output: torch.Tensor
    conv_input: torch.Tensor
    last_state: torch.Tensor


def mask_padding(hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    '''Zero the padded positions of ``(batch, length, channels)`` hidden states.'''
    if attention_mask is None:
        return hidden_states
    return (hidden_states * attention_mask[:, :, None]).to(hidden_states.dtype)


#: a mixer's computation on consecutive positions, ``block(hidden_states, attention_mask, initial_state, context)``:
#: the output at the positions after the first ``context`` (the convolution's left context only), the input of the
#: convolution and the scan's last state, the scan continued from ``initial_state`` where it is not None
MixerBlock = Callable[[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], int],
                      Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def over_time_blocks(rules, mixer: torch.nn.Module, block: MixerBlock, hidden_states: torch.Tensor,
                     attention_mask: Optional[torch.Tensor], allowed: bool) -> MixerOutput:
    '''``block`` on the whole ``(batch, length, hidden)`` sequence, or, where :py:func:`runs_in_time_blocks`, over
    time blocks, each scan continued from the previous block's last state and each projection and convolution also
    reading the convolution's left context (projected again with the block): the same values and relevance. Returns
    the outputs and the (detached) convolution input and last state; over blocks the convolution input is the last
    block's only, so a cache that keeps more than its last positions must not allow blocks.'''
    if not runs_in_time_blocks(rules, mixer, hidden_states, allowed):
        output, conv_input, last_state = block(hidden_states, attention_mask, None, 0)
        return MixerOutput(output, conv_input.detach(), last_state.detach())
    outputs, last_state = [], None
    for positions, context in time_blocks(hidden_states.shape[1], mixer.conv1d.kernel_size[0] - 1):
        output, conv_input, last_state = block(
            hidden_states[:, positions], None if attention_mask is None else attention_mask[:, positions], last_state,
            context)
        outputs.append(output)
    return MixerOutput(torch.cat(outputs, 1), conv_input.detach(), last_state.detach())


def runs_in_time_blocks(rules, mixer: torch.nn.Module, hidden_states: torch.Tensor, allowed: bool) -> bool:
    '''Whether ``mixer`` runs over time blocks of :py:data:`CPU_TIME_BLOCK` positions: where its caller ``allowed``
    it (no cache that keeps the whole convolution input), on a CPU, for ``(batch, length, hidden)`` inputs longer than
    one block, with a rule set whose scans are the standard ones, and with nothing inside the mixer that would see a
    block's call as the whole sequence's (:py:func:`observed_inside`).'''
    return (allowed and hidden_states.device.type == 'cpu' and hidden_states.shape[1] > CPU_TIME_BLOCK
            and rules.scans_in_time_blocks() and not observed_inside(mixer))


def observed_inside(mixer: torch.nn.Module) -> bool:
    '''Whether a module inside ``mixer`` has a hook other than this package's Zennit rules (which take each call on
    its own), or torch has global module hooks: such a hook, e.g. a Captum layer method's on ``in_proj``, would record
    one time block's call in place of the whole sequence's.

    Examples
    --------
    >>> mixer = torch.nn.Sequential(torch.nn.Linear(2, 2))
    >>> observed_inside(mixer)
    False
    >>> handle = mixer[0].register_forward_hook(lambda module, input, output: None)
    >>> observed_inside(mixer)
    True
    >>> handle.remove()
    '''
    if global_module_hooks():
        return True
    for module in mixer.modules():
        if module is mixer:
            continue  # the mixer itself is called once, whatever runs inside it
        if module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks:
            return True
        if _foreign_forward_hooks(module):
            return True
    return False


def _foreign_forward_hooks(module: torch.nn.Module) -> bool:
    '''Whether ``module`` has a forward hook other than this package's Zennit rules (which take each call on its own
    and keep its value).'''
    return any(not isinstance(getattr(hook, '__self__', None), ZennitRule) for hook in module._forward_hooks.values())


def call_read_module(module: torch.nn.Module, input: torch.Tensor) -> torch.Tensor:
    '''``module(input)`` for a linear or convolution module whose weights the original forward reads without calling
    it (:py:attr:`~zennit_mamba.support.Family.uncalled`): called, so that rules and Captum's layer methods attach, and,
    where a forward hook other than this package's rules is on it, checked to equal what the weights compute, since
    such a hook does not act on the original forward.'''
    output = module(input)
    if _foreign_forward_hooks(module) or global_module_hooks():
        with torch.no_grad():
            expected = type(module).forward(module, input)
        if not torch.equal(output, expected):
            raise RuntimeError(
                f'A forward hook on a {type(module).__name__} inside a Mamba mixer changes its output. The original '
                f'forward reads this module\'s weights without calling it, so the hook does not act on the model, but '
                f'would under MambaLRP, which explains through the call: remove the hook while explaining.'
            )
    return output


def time_blocks(length: int, context_size: int) -> Iterator[Tuple[slice, int]]:
    '''The positions each time block of a ``length``-position input reads, and how many of them come before the
    block: its own, and up to ``context_size`` before it that the causal convolution's first outputs read (as many
    as there are, so that a block's first output sees what one pass sees).

    Examples
    --------
    >>> list(time_blocks(2500, 3))  # with CPU_TIME_BLOCK = 1024
    [(slice(0, 1024, None), 0), (slice(1021, 2048, None), 3), (slice(2045, 3072, None), 3)]
    '''
    for start in range(0, length, CPU_TIME_BLOCK):
        context = min(start, context_size)
        yield slice(start - context, start + CPU_TIME_BLOCK), context


def refuse_continuation() -> RuntimeError:
    '''The error for a call that continues from cached states of earlier tokens.'''
    return RuntimeError(
        'MambaLRP explains whole sequences, but this call continues from a cache of earlier tokens. '
        'Call the model on the full sequence without a cache (e.g. use_cache=False) inside the composite context.'
    )


def refuse_padding(attention_mask: Optional[torch.Tensor], family: str, layers: str) -> None:
    '''Raise for an attention mask other than a ``(batch, length)`` one without padding before a token, for a model
    ``family`` whose ``layers`` (``"RecurrentGemma's recurrent blocks"``) do not read the mask: padding before a token
    flows into them, in the model's own forward too. Right padding leaves the tokens before it as they are.'''
    if attention_mask is None:
        return
    if not torch.is_tensor(attention_mask) or attention_mask.dim() != 2:
        raise ValueError(
            f'MambaLRP explains {family} with a (batch, length) attention_mask of ones and zeros (or none); got '
            f'{type(attention_mask).__name__ if not torch.is_tensor(attention_mask) else attention_mask.shape}. Pass '
            'the tokenizer\'s 2D mask.')
    kept = attention_mask.bool()
    # a position kept after one that is masked: padding (or a hole) before a token
    before = (kept[:, 1:] & ~kept[:, :-1]).any(-1)
    if before.any():
        raise ValueError(
            f'{layers} do not read the attention mask, but examples {before.nonzero().flatten().tolist()} have '
            'padding before a real token: it flows into their recurrence (and convolution), in the model\'s own '
            'forward too, so the output would not be that of the unpadded sequence. Pad on the right '
            '(tokenizer.padding_side = "right") and explain the logits at each row\'s last token, or explain each '
            'sequence without padding.')


def pop_return_dict(config, kwargs: dict) -> bool:
    '''Whether a canonized causal-LM forward returns its output object or a tuple: ``kwargs``' ``return_dict``
    (removed from them), else the config's, as transformers' ``can_return_tuple`` decides.'''
    return_dict = kwargs.pop('return_dict', None)
    return getattr(config, 'return_dict', True) if return_dict is None else return_dict


def soft_cap(rules, logits: torch.Tensor, cap: Optional[float]) -> torch.Tensor:
    '''A soft-cap of the logits ``l' = tanh(l / cap) * cap`` (none where ``cap`` is None), as transformers computes
    it, under the identity rule (an element-wise function with ``f(0) = 0``): ``l' / l`` held constant, so that
    ``R(l) = R(l')`` and the relevance sums to the capped logit that is explained.'''
    if cap is None:
        return logits
    return rules.activated(logits, torch.nn.functional.tanh(logits / cap) * cap)


def run_mixer(rules, function: Callable[..., T], mixer: torch.nn.Module, *arguments) -> T:
    '''``function(rules, mixer, *arguments)``, recomputed in the backward pass where ``rules.recompute``, with its
    input's GPU as the current device.

    Triton kernels launch on the current device; under accelerate's ``dispatch_model`` the layers sit on several
    GPUs, and a Mamba-2 mixer on another GPU than the current one gave NaN in bfloat16 (seen on two H200s, in the
    unmodified model's forward too).
    '''
    hidden_states = next(argument for argument in arguments if torch.is_tensor(argument))  # the mixer's input
    # under accelerate's offloading hooks, child weights are read without a call: weights_in_place
    with weights_in_place(mixer), on_device_of(hidden_states):
        if rules.recompute and torch.is_grad_enabled():
            # the recomputation may run in autograd's thread: the rules on the mixer's modules (gamma, layer_map)
            # decide there as they do now
            return checkpoint(functools.partial(_deciding, rules.switch.on(), function), rules, mixer, *arguments,
                              use_reentrant=False)
        return function(rules, mixer, *arguments)


def _deciding(on: bool, function: Callable[..., T], rules, *arguments) -> T:
    with rules.switch.deciding(on):
        return function(rules, *arguments)


def with_transformers_cache(
    mixer: torch.nn.Module, cache, kwargs: dict, run: Callable[[], MixerOutput], state_dtype: Optional[torch.dtype],
) -> torch.Tensor:
    '''``run()`` for a transformers mixer: refused arguments and continuations raise, a fresh ``cache`` is filled
    as the original forward fills it (the recurrent state in ``state_dtype``, its own dtype where None).'''
    refuse_keywords(mixer, kwargs)
    if cache is not None and cache.get_conv_state(mixer.layer_idx) is not None:
        raise refuse_continuation()
    result = run()
    if cache is not None:
        # so that generation can continue from the cache
        cache.update_conv_state(result.conv_input, mixer.layer_idx, conv_kernel_size=mixer.conv_kernel_size)
        cache.update_recurrent_state(result.last_state.to(state_dtype or result.last_state.dtype), mixer.layer_idx)
    return result.output


def with_mamba_ssm_cache(mixer: torch.nn.Module, inference_params, batch: int, run: Callable[[], MixerOutput]):
    '''``run()`` for a mamba-ssm mixer, with the states of a fresh cache filled as the original forward fills
    them; a continuation raises.'''
    states = None
    if inference_params is not None:
        if inference_params.seqlen_offset > 0:
            raise refuse_continuation()
        states = mixer._get_states_from_cache(inference_params, batch)
    result = run()
    if states is not None:
        conv_state, ssm_state = states
        conv_state.copy_(F.pad(result.conv_input, (mixer.d_conv - result.conv_input.shape[-1], 0)))
        ssm_state.copy_(result.last_state)
    return result.output

