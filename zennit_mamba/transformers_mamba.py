'''Canonized forwards for the Mamba modules of :py:mod:`transformers`.

Mamba-1 mixers (``MambaMixer``, ``FalconMambaMixer``, Jamba's ``JambaMambaMixer``), Mamba-2 mixers (``Mamba2Mixer``
and its copies in Bamba, NemotronH, GraniteMoeHybrid, FalconH1 and Zamba2) and the Mamba-only blocks. They compute
what the originals compute on the full-sequence path. transformers' own mixer forwards call functional kernels and
``dt_proj.weight`` directly, so rules on ``conv1d``, ``act`` or ``dt_proj`` would never fire there.
'''
from typing import Optional

import torch

from .layers import residual_sum
from .mamba2 import canonical_mamba2
from .mixer import canonical_mixer, refuse_continuation


def mixer_forward(
    self,
    hidden_states: torch.Tensor,
    cache_params=None,
    attention_mask: Optional[torch.Tensor] = None,
    **kwargs,
) -> torch.Tensor:
    '''Forward of a canonized Mamba-1 or Mamba-2 mixer; fills a fresh cache as the original does.'''
    if cache_params is not None and cache_params.get_conv_state(self.layer_idx) is not None:
        raise refuse_continuation()
    if hasattr(self, 'lrp_core'):
        result = canonical_mamba2(self, hidden_states, attention_mask)
        state_dtype = result.last_state.dtype
    else:
        result = canonical_mixer(self, hidden_states, self.time_step_rank, self.ssm_state_size, attention_mask)
        state_dtype = hidden_states.dtype
    if cache_params is not None:
        # so that generation can continue from the cache
        cache_params.update_conv_state(result.conv_input, self.layer_idx, conv_kernel_size=self.conv_kernel_size)
        cache_params.update_recurrent_state(result.last_state.to(state_dtype), self.layer_idx)
    return result.output


def block_forward(
    self,
    hidden_states: torch.Tensor,
    cache_params=None,
    attention_mask: Optional[torch.Tensor] = None,
    **kwargs,
) -> torch.Tensor:
    '''Forward of a canonized ``MambaBlock``, ``FalconMambaBlock`` or ``Mamba2Block``: the residual sum becomes an
    explicit :py:class:`zennit.layer.Sum` (see :py:func:`~zennit_mamba.layers.residual_sum`).'''
    residual = hidden_states
    hidden_states = self.norm(hidden_states.to(dtype=self.norm.weight.dtype))
    if self.residual_in_fp32:
        residual = residual.to(torch.float32)
    hidden_states = self.mixer(hidden_states, cache_params=cache_params, attention_mask=attention_mask)
    return residual_sum(self, residual, hidden_states)
