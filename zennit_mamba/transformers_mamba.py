'''Canonized forwards for the Mamba modules of :py:mod:`transformers`.

Mamba-1 mixers (``MambaMixer``, ``FalconMambaMixer``, Jamba's ``JambaMambaMixer``), Mamba-2 mixers (``Mamba2Mixer``
and its copies in Bamba, NemotronH, GraniteMoeHybrid, FalconH1 and Zamba2) and the Mamba-only blocks. They compute
what the originals compute on the full-sequence path. transformers' own mixer forwards call functional kernels and
``dt_proj.weight`` directly, so rules on ``conv1d``, ``act`` or ``dt_proj`` would never fire there.

Each forward takes exactly the parameters of the forward it replaces (checked at registration by
:py:func:`zennit_mamba.upstream.check_forward_signature`). transformers passes further keyword arguments through
``**kwargs`` to its kernels (packed-sequence indices such as ``seq_idx`` or ``cu_seq_lens_q``); the canonized
forward has no such kernels, so any keyword argument it receives, except those hybrids pass to every layer
(:py:data:`LAYER_KEYWORDS`) and those set to None, is refused by :py:func:`refuse_keywords`, never dropped.
'''
from typing import Optional

import torch

from .layers import residual_sum
from .mamba2 import canonical_mamba2
from .mixer import canonical_mixer, refuse_continuation


#: keyword arguments that hybrid models pass to every layer and that neither the Mamba path nor MambaLRP's attention
#: reads (transformers' own mixers hand them to kernels that ignore them): the only ones accepted and not used
LAYER_KEYWORDS = frozenset({
    'position_embeddings', 'position_ids', 'cache_position', 'output_attentions', 'output_router_logits', 'use_cache',
})


def refuse_keywords(module: torch.nn.Module, kwargs: dict) -> None:
    '''Raise for keyword arguments that MambaLRP's forward of ``module`` would otherwise have to drop: all but
    :py:data:`LAYER_KEYWORDS` and those whose value is None (nothing to honour).

    Examples
    --------
    >>> refuse_keywords(torch.nn.Identity(), {'position_ids': torch.arange(3), 'sliding_window': None})
    >>> refuse_keywords(torch.nn.Identity(), {'seq_idx': torch.zeros(1, 3)})
    Traceback (most recent call last):
    ...
    TypeError: MambaLRP's forward of Identity got keyword arguments ['seq_idx'], which the original ...
    '''
    unknown = sorted(key for key, value in kwargs.items() if key not in LAYER_KEYWORDS and value is not None)
    if unknown:
        raise TypeError(
            f'MambaLRP\'s forward of {type(module).__name__} got keyword arguments {unknown}, which the original '
            f'forward passes to its kernels (e.g. packed-sequence indices, a sliding window). MambaLRP explains one '
            f'sequence per batch row and does not drop arguments silently: call the model without them (pad the '
            f'sequences into separate rows and pass attention_mask).'
        )


def mixer_forward(
    self,
    hidden_states: torch.Tensor,
    cache=None,
    attention_mask: Optional[torch.Tensor] = None,
    **kwargs,
) -> torch.Tensor:
    '''Forward of a canonized Mamba-1 or Mamba-2 mixer; fills a fresh cache as the original does.'''
    refuse_keywords(self, kwargs)
    if cache is not None and cache.get_conv_state(self.layer_idx) is not None:
        raise refuse_continuation()
    if hasattr(self, 'lrp_core'):
        result = canonical_mamba2(self, hidden_states, attention_mask)
        state_dtype = result.last_state.dtype
    else:
        result = canonical_mixer(self, hidden_states, self.time_step_rank, self.ssm_state_size, attention_mask)
        state_dtype = hidden_states.dtype
    if cache is not None:
        # so that generation can continue from the cache
        cache.update_conv_state(result.conv_input, self.layer_idx, conv_kernel_size=self.conv_kernel_size)
        cache.update_recurrent_state(result.last_state.to(state_dtype), self.layer_idx)
    return result.output


def block_forward(
    self,
    hidden_states: torch.Tensor,
    cache=None,
    attention_mask: Optional[torch.Tensor] = None,
    **kwargs,
) -> torch.Tensor:
    '''Forward of a canonized ``MambaBlock``, ``FalconMambaBlock`` or ``Mamba2Block``: the residual sum becomes an
    explicit :py:class:`zennit.layer.Sum` (see :py:func:`~zennit_mamba.layers.residual_sum`).'''
    refuse_keywords(self, kwargs)
    residual = hidden_states
    hidden_states = self.norm(hidden_states.to(dtype=self.norm.weight.dtype))
    if self.residual_in_fp32:
        residual = residual.to(torch.float32)
    hidden_states = self.mixer(hidden_states, cache=cache, attention_mask=attention_mask)
    return residual_sum(self, residual, hidden_states)
