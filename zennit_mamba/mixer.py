'''The canonical Mamba-1 mixer computation shared by every supported implementation.

Every operation on the relevance path runs through a module: the mixer's own ``in_proj``, ``conv1d``, ``x_proj``,
``dt_proj`` and ``out_proj``, and the explicit submodules added by the canonizer (``lrp_conv_act``,
``lrp_softplus``, ``lrp_scan``, ``lrp_gate_act``, ``lrp_gate``).
'''
from typing import NamedTuple, Optional

import torch

from .layers import SelectiveScan, stack_operands


class MixerOutput(NamedTuple):
    '''Output of :py:func:`canonical_mixer` and the states a cache keeps.'''
    output: torch.Tensor
    conv_input: torch.Tensor
    last_state: torch.Tensor


def _mask_padding(hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    '''Zero the padded positions of ``(batch, length, channels)`` hidden states.'''
    if attention_mask is None:
        return hidden_states
    return (hidden_states * attention_mask[:, :, None]).to(hidden_states.dtype)


def canonical_mixer(
    mixer: torch.nn.Module,
    hidden_states: torch.Tensor,
    time_step_rank: int,
    state_size: int,
    attention_mask: Optional[torch.Tensor] = None,
) -> MixerOutput:
    '''Run a canonized Mamba-1 mixer on ``(batch, length, hidden)`` hidden states.

    Parameters
    ----------
    mixer : :py:obj:`torch.nn.Module`
        A mixer carrying the canonizer's submodules.
    hidden_states : :py:obj:`torch.Tensor`
        Normalised hidden states of shape ``(batch, length, hidden)``.
    time_step_rank, state_size : int
        Split sizes of the ``x_proj`` output: ``dt``, ``B`` and ``C``.
    attention_mask : :py:obj:`torch.Tensor`, optional
        ``(batch, length)`` mask; padded positions are zeroed before ``in_proj`` and after the convolution.

    Returns
    -------
    MixerOutput
        The mixer output, the (detached) input of the convolution and the last scan state, for caches.
    '''
    length = hidden_states.shape[1]
    dtype = hidden_states.dtype

    projected = mixer.in_proj(_mask_padding(hidden_states, attention_mask)).transpose(1, 2)
    x, gate = projected.chunk(2, dim=1)
    conv_input = x.detach()

    x = mixer.lrp_conv_act(mixer.conv1d(x.to(mixer.conv1d.weight.dtype))[..., :length]).to(dtype)
    x = _mask_padding(x.transpose(1, 2), attention_mask)
    time_step, B, C = torch.split(mixer.x_proj(x), [time_step_rank, state_size, state_size], dim=-1)
    delta = mixer.lrp_softplus(mixer.dt_proj(time_step))

    packed = SelectiveScan.pack(x.transpose(1, 2), delta.transpose(1, 2), B.transpose(1, 2), C.transpose(1, 2))
    scanned, last_state = mixer.lrp_scan(packed, A=-torch.exp(mixer.A_log.float()), D=mixer.D.float())

    gated = mixer.lrp_gate(stack_operands(scanned, mixer.lrp_gate_act(gate)))
    return MixerOutput(mixer.out_proj(gated.transpose(1, 2).to(dtype)), conv_input, last_state)


def refuse_continuation() -> RuntimeError:
    '''The error for a call that continues from cached states of earlier tokens.'''
    return RuntimeError(
        'MambaLRP explains whole sequences, but this call continues from a cache of earlier tokens. '
        'Call the model on the full sequence without a cache (e.g. use_cache=False) inside the composite context.'
    )
