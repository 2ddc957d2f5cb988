'''Zamba (Zyphra, transformers' ``ZambaForCausalLM``): multi-head Mamba-1 mixers and one attention block shared by
the hybrid layers, whose input is the hidden state concatenated with the input embeddings.

The mixer splits ``in_proj``'s output into ``x`` and the gate ``z`` (interleaved per channel), convolves ``x``, and
runs one selective scan per Mamba head, each head with its own ``x_proj`` and ``dt_proj`` weights (parameters, not
modules) and its own ``A`` and ``D``; the heads' gated outputs ``y * silu(z)`` are concatenated into ``out_proj``.
The MambaLRP rules are the Mamba-1 ones, per head: the SiLU after the convolution and in the gate by the identity
rule, ``delta``, ``A``, ``B``, ``C`` of each head detached (the selection), the gate by the half rule.
'''
import functools
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from zennit_mamba.core.family import Canonized, Family, in_module
from zennit_mamba.core.layers import ATTENTION, COMPOSITION, NORM, gated_mlp
from zennit_mamba.mixers.io import (
    MixerOutput, call_read_module, mask_padding, over_time_blocks, run_mixer, with_transformers_cache,
)

MODULE = 'transformers.models.zamba.modeling_zamba'


def zamba_mixer(rules, mixer: torch.nn.Module, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor],
                blocks_allowed: bool = False) -> MixerOutput:
    '''Run a ``ZambaMambaMixer`` on ``(batch, length, hidden)`` hidden states under ``rules``; where
    ``blocks_allowed``, on a CPU, over time blocks (:py:func:`~zennit_mamba.mixers.io.over_time_blocks`).'''
    return over_time_blocks(rules, mixer, functools.partial(_mixer_block, rules, mixer), hidden_states,
                            attention_mask, blocks_allowed)


def _mixer_block(
    rules, mixer: torch.nn.Module, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor],
    initial_state: Optional[torch.Tensor], context: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    '''The mixer on consecutive positions (a :py:data:`~zennit_mamba.mixers.io.MixerBlock`): the output, the input of
    the convolution and the heads' last scan states ``(batch, heads, head_dim, state)``.'''
    batch, positions, _ = hidden_states.shape
    length, heads, head_dim = positions - context, mixer.n_mamba_heads, mixer.mamba_head_dim
    projected = mixer.in_proj(mask_padding(hidden_states, attention_mask)).transpose(1, 2)
    x, gate = projected.view(batch, -1, 2, positions).unbind(2)  # interleaved per channel
    gate = gate[..., context:].reshape(batch, heads, head_dim, length)
    conv = call_read_module(mixer.conv1d, x)[..., context:context + length]
    mask = None if attention_mask is None else attention_mask[:, context:]
    activated = mask_padding(rules.activation(mixer.activation, conv).transpose(1, 2), mask).transpose(1, 2)
    activated = activated.reshape(batch, heads, head_dim, length)
    A, outputs, states = -torch.exp(mixer.A_log.float()), [], []
    for head in range(heads):
        x_head = activated[:, head]
        time_step, B, C = torch.split((mixer.x_proj_weight[head] @ x_head).transpose(1, 2),
                                      [mixer.time_step_rank, mixer.ssm_state_size, mixer.ssm_state_size], dim=-1)
        delta = F.softplus(mixer.dt_proj_weight[head] @ time_step.transpose(1, 2)
                           + mixer.dt_proj_bias[head, :, None].float())
        selection = (x_head, delta, A[head], B.transpose(1, 2), C.transpose(1, 2), mixer.D[head].float())
        if initial_state is None:
            scanned, state = rules.scan(*selection)
        else:
            scanned, state = rules.scan(*selection, initial_state=initial_state[:, head])
        activated_gate = rules.activation('silu', gate[:, head])
        outputs.append(rules.output_gate(scanned.to(torch.promote_types(scanned.dtype, activated_gate.dtype)),
                                  activated_gate))
        states.append(state)
    output = mixer.out_proj(torch.cat(outputs, dim=1).transpose(1, 2).to(hidden_states.dtype))
    return output, x, torch.stack(states, dim=1)


def zamba_forward(rules, self, hidden_states: torch.Tensor, cache=None, attention_mask: Optional[torch.Tensor] = None,
                  **kwargs) -> torch.Tensor:
    '''Forward of a canonized ``ZambaMambaMixer``; fills a fresh cache as the original does.'''
    def run() -> MixerOutput:
        # time blocks only without a cache: a cache recording the past keeps the whole convolution input
        return run_mixer(rules, zamba_mixer, self, hidden_states, attention_mask, cache is None)

    return with_transformers_cache(self, cache, kwargs, run, hidden_states.dtype)


FAMILY = Family(
    name='Zamba', library='transformers', hybrid=True, beside='a shared attention block with gated MLPs',
    library_modules=(MODULE,),
    # the original forward convolves with conv1d's weights without calling it
    canonized=in_module(MODULE, {'ZambaMambaMixer': Canonized(zamba_forward, uncalled=('conv1d',))}),
    layers=in_module(MODULE, {
        'ZambaForCausalLM': COMPOSITION, 'ZambaForSequenceClassification': COMPOSITION, 'ZambaModel': COMPOSITION,
        'ZambaPreTrainedModel': COMPOSITION, 'ZambaMambaDecoderLayer': COMPOSITION, 'ZambaHybridLayer': COMPOSITION,
        # the shared block: attention and MLP on the hidden state concatenated with the embeddings
        'ZambaAttentionDecoderLayer': COMPOSITION, 'ZambaRMSNorm': NORM, 'ZambaAttention': ATTENTION,
        'ZambaMLP': gated_mlp('down_proj'),
    }),
)
