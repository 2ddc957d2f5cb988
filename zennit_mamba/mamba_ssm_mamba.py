'''Canonized forwards for mamba-ssm's modules (``Mamba``, ``Mamba2``, ``Block``, ``MixerModel``).

mamba-ssm fuses the residual add into its RMSNorm kernel and passes the residual stream between blocks as a second
tensor; the canonized forwards add it through an explicit :py:class:`zennit.layer.Sum` and call the norm on the sum.
The canonized ``MixerModel`` also accepts ``inputs_embeds``, so relevance can be read at the embeddings:
``model(None, inputs_embeds=embeddings)`` on a ``MambaLMHeadModel``.
'''
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from .layers import residual_sum
from .mamba2 import canonical_mamba2
from .mixer import MixerOutput, canonical_mixer, refuse_continuation


def _run_filling_cache(mixer: torch.nn.Module, run: Callable[[], MixerOutput], batch: int, inference_params):
    '''``run()``, with the states of a fresh cache filled as the original forward fills them.'''
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


def mixer_forward(self, hidden_states: torch.Tensor, inference_params=None) -> torch.Tensor:
    '''Forward of a canonized ``mamba_ssm.modules.mamba_simple.Mamba``; fills a fresh cache as the original does.'''
    def run() -> MixerOutput:
        return canonical_mixer(self, hidden_states, self.dt_rank, self.d_state)

    return _run_filling_cache(self, run, hidden_states.shape[0], inference_params)


def mamba2_forward(
    self, u: torch.Tensor, seqlen: Optional[int] = None, seq_idx=None, cu_seqlens=None, inference_params=None
) -> torch.Tensor:
    '''Forward of a canonized ``mamba_ssm.modules.mamba2.Mamba2``; fills a fresh cache as the original does.

    ``u`` is ``(batch, length, hidden)``, or ``(batch * length, hidden)`` with ``seqlen`` given.
    '''
    if seq_idx is not None or cu_seqlens is not None:
        raise ValueError(
            'MambaLRP explains one sequence per batch row; packed sequences (seq_idx, cu_seqlens) are not supported. '
            'Pass the sequences as separate (padded) rows of the batch.'
        )
    hidden_states = u if seqlen is None else u.unflatten(0, (-1, seqlen))

    def run() -> MixerOutput:
        return canonical_mamba2(self, hidden_states)

    output = _run_filling_cache(self, run, hidden_states.shape[0], inference_params)
    return output if seqlen is None else output.flatten(0, 1)


def _add_residual(module: torch.nn.Module, hidden_states: torch.Tensor, residual: Optional[torch.Tensor]):
    if residual is None:
        return hidden_states
    return residual_sum(module, residual, hidden_states)


def block_forward(
    self, hidden_states: torch.Tensor, residual: Optional[torch.Tensor] = None, inference_params=None, **mixer_kwargs
) -> Tuple[torch.Tensor, torch.Tensor]:
    '''Forward of a canonized ``mamba_ssm.modules.block.Block`` without MLP: add, norm, mixer.'''
    residual = _add_residual(self, hidden_states, residual)
    hidden_states = self.norm(residual.to(dtype=self.norm.weight.dtype))
    if self.residual_in_fp32:
        residual = residual.to(torch.float32)
    hidden_states = self.mixer(hidden_states, inference_params=inference_params, **mixer_kwargs)
    return hidden_states, residual


def backbone_forward(
    self,
    input_ids: Optional[torch.Tensor] = None,
    inference_params=None,
    inputs_embeds: Optional[torch.Tensor] = None,
    **mixer_kwargs,
) -> torch.Tensor:
    '''Forward of a canonized ``mamba_ssm.models.mixer_seq_simple.MixerModel``, from token ids or embeddings.'''
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError('Pass exactly one of input_ids and inputs_embeds.')
    hidden_states = self.embedding(input_ids) if inputs_embeds is None else inputs_embeds
    residual = None
    for layer in self.layers:
        hidden_states, residual = layer(hidden_states, residual, inference_params=inference_params, **mixer_kwargs)
    residual = _add_residual(self, hidden_states, residual)
    return self.norm_f(residual.to(dtype=self.norm_f.weight.dtype))
