'''Canonized forwards for mamba-ssm's ``Block`` and ``MixerModel``.

mamba-ssm fuses the residual add into its RMSNorm kernel and passes the residual stream between blocks as a second
tensor; the canonized forwards add it in PyTorch and call the norm module on the sum, so that the LN-rule reaches it.
The canonized ``MixerModel`` also accepts ``inputs_embeds``, so relevance can be read at the embeddings:
``model(None, inputs_embeds=embeddings)`` on a ``MambaLMHeadModel``. The rule set is not used here (the mixers and
norms carry the rules), but every canonized forward receives it.
'''
from typing import Optional, Tuple

import torch


def _add(hidden_states: torch.Tensor, residual: Optional[torch.Tensor]) -> torch.Tensor:
    return hidden_states if residual is None else residual + hidden_states


def block_forward(
    rules, self, hidden_states: torch.Tensor, residual: Optional[torch.Tensor] = None, inference_params=None,
    **mixer_kwargs,
) -> Tuple[torch.Tensor, torch.Tensor]:
    '''Forward of a canonized ``mamba_ssm.modules.block.Block`` without MLP: add, norm, mixer.'''
    residual = _add(hidden_states, residual)
    hidden_states = self.norm(residual.to(dtype=self.norm.weight.dtype))
    if self.residual_in_fp32:
        residual = residual.to(torch.float32)
    hidden_states = self.mixer(hidden_states, inference_params=inference_params, **mixer_kwargs)
    return hidden_states, residual


def backbone_forward(
    rules,
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
    residual = _add(hidden_states, residual)
    return self.norm_f(residual.to(dtype=self.norm_f.weight.dtype))
