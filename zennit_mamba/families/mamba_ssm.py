'''Canonized forwards for mamba-ssm's ``Block`` and ``MixerModel``.

mamba-ssm fuses the residual add into its RMSNorm kernel and passes the residual stream between blocks as a second
tensor; the canonized forwards add it in PyTorch and call the norm module on the sum, so that the LN-rule reaches it.
The canonized ``MixerModel`` also accepts ``inputs_embeds``, so relevance can be read at the embeddings:
``model(None, inputs_embeds=embeddings)`` on a ``MambaLMHeadModel``. The rule set is not used here (the mixers and
norms carry the rules), but every canonized forward receives it.
'''
from typing import Optional, Tuple

import torch

from zennit_mamba.core.family import Canonized, Family, resolve
from zennit_mamba.core.layers import COMPOSITION, INSIDE_MIXER, NORM
from zennit_mamba.mixers import mamba1, mamba2, mamba3


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


_RMS_NORM = 'mamba_ssm.ops.triton.layer_norm.RMSNorm'
_MIXERS = ('mamba_ssm.modules.mamba_simple.Mamba', 'mamba_ssm.modules.mamba2.Mamba2', 'mamba_ssm.modules.mamba3.Mamba3')


def _block_problem(block: torch.nn.Module) -> Optional[str]:
    '''A ``Block`` whose forward :py:func:`block_forward` does not reproduce.'''
    if type(block.mixer) not in tuple(filter(None, map(resolve, _MIXERS))):
        return f'a Block with mixer {type(block.mixer).__name__}, which MambaLRP does not support'
    if block.mlp is not None:
        return 'a Block with an MLP'
    return None if type(block.norm) is resolve(_RMS_NORM) else f'a Block with {type(block.norm).__name__}'


def _backbone_problem(backbone: torch.nn.Module) -> Optional[str]:
    norm = type(backbone.norm_f)
    return None if norm is resolve(_RMS_NORM) else f'a MixerModel with {norm.__name__}'


FAMILY = Family(
    name='mamba-ssm', library='mamba-ssm',
    library_modules=('mamba_ssm.modules.mamba_simple', 'mamba_ssm.modules.mamba2', 'mamba_ssm.modules.mamba3',
                     'mamba_ssm.modules.block',
                     'mamba_ssm.models.mixer_seq_simple'),
    canonized={
        _MIXERS[0]: mamba1.MAMBA_SSM_MIXER,
        _MIXERS[1]: mamba2.MAMBA_SSM_MIXER,
        _MIXERS[2]: mamba3.MIXER,
        'mamba_ssm.modules.block.Block': Canonized(block_forward, mixer=False, check=_block_problem),
        'mamba_ssm.models.mixer_seq_simple.MixerModel': Canonized(backbone_forward, added=('inputs_embeds',),
                                                                  mixer=False, check=_backbone_problem),
    },
    layers={
        'mamba_ssm.models.mixer_seq_simple.MambaLMHeadModel': COMPOSITION, _RMS_NORM: NORM,
        'mamba_ssm.ops.triton.layernorm_gated.RMSNorm': INSIDE_MIXER,
    },
)
