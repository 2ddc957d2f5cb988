'''Canonized forwards for the Mamba-1 modules of :py:mod:`transformers` (``MambaMixer``, ``MambaBlock``).

They compute what the originals compute on the full-sequence path, with every operation on the relevance path
routed through an explicit submodule added by :py:class:`~zennit_mamba.canonizers.MambaCanonizer` (attributes
prefixed ``lrp_``). transformers' own forward calls functional kernels and ``dt_proj.weight`` directly, so rules on
``conv1d``, ``act`` or ``dt_proj`` would never fire there.
'''
from typing import Optional

import torch

from .layers import SelectiveScan, stack_operands


def _mask_padding(hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    '''Zero the padded positions of ``(batch, length, channels)`` hidden states, as transformers does.'''
    if attention_mask is None:
        return hidden_states
    return (hidden_states * attention_mask[:, :, None]).to(hidden_states.dtype)


def mixer_forward(
    self,
    hidden_states: torch.Tensor,
    cache_params=None,
    attention_mask: Optional[torch.Tensor] = None,
    **kwargs,
) -> torch.Tensor:
    '''Forward of a canonized ``MambaMixer``: hidden states ``(batch, length, hidden)`` to the same shape.'''
    if cache_params is not None and cache_params.get_conv_state(self.layer_idx) is not None:
        raise RuntimeError(
            'MambaLRP explains whole sequences, but this call continues from a cache of earlier tokens. '
            'Call the model on the full sequence with use_cache=False inside the composite context.'
        )
    seq_len = hidden_states.shape[1]
    dtype = hidden_states.dtype

    hidden_states = _mask_padding(hidden_states, attention_mask)
    projected = self.in_proj(hidden_states).transpose(1, 2)
    x, gate = projected.chunk(2, dim=1)
    if cache_params is not None:
        cache_params.update_conv_state(x.detach(), self.layer_idx, conv_kernel_size=self.conv_kernel_size)

    x = self.lrp_conv_act(self.conv1d(x.to(self.conv1d.weight.dtype))[..., :seq_len]).to(dtype)
    x = _mask_padding(x.transpose(1, 2), attention_mask)
    time_step, B, C = torch.split(
        self.x_proj(x), [self.time_step_rank, self.ssm_state_size, self.ssm_state_size], dim=-1
    )
    delta = self.lrp_softplus(self.dt_proj(time_step))

    packed = SelectiveScan.pack(x.transpose(1, 2), delta.transpose(1, 2), B.transpose(1, 2), C.transpose(1, 2))
    scanned, last_state = self.lrp_scan(packed, A=-torch.exp(self.A_log.float()), D=self.D.float())
    if cache_params is not None:
        cache_params.update_recurrent_state(last_state.to(dtype), self.layer_idx)

    gated = self.lrp_gate(stack_operands(scanned, self.lrp_gate_act(gate)))
    return self.out_proj(gated.transpose(1, 2).to(dtype))


def block_forward(
    self,
    hidden_states: torch.Tensor,
    cache_params=None,
    attention_mask: Optional[torch.Tensor] = None,
    **kwargs,
) -> torch.Tensor:
    '''Forward of a canonized ``MambaBlock``: the residual sum becomes an explicit :py:class:`zennit.layer.Sum`.'''
    residual = hidden_states
    hidden_states = self.norm(hidden_states.to(dtype=self.norm.weight.dtype))
    if self.residual_in_fp32:
        residual = residual.to(torch.float32)
    hidden_states = self.mixer(hidden_states, cache_params=cache_params, attention_mask=attention_mask)
    return self.lrp_residual(stack_operands(residual, hidden_states))
