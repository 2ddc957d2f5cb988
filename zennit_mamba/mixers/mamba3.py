'''Mamba-3's mixer (mamba-ssm's ``Mamba3``, SISO): the canonical computation with the MambaLRP rules.

The mixer has no convolution. One projection of the input gives the gate ``z``, the values ``x`` (heads of
``headdim`` channels), ``B`` and ``C`` (``ngroups`` groups of ``d_state``), and per head a step ``dd_dt``, a decay
``dd_A``, a trapezoid weight and shared rotation speeds; then, per head ``h`` and token ``t``::

    A_t = min(-softplus(dd_A_t), -A_floor),   DT_t = softplus(dd_dt_t + dt_bias),   alpha_t = exp(A_t DT_t)
    sigma_t = sigmoid(trap_t),   theta_t = theta_{t-1} + pi tanh(angles_t) DT_t
    k_t = rot(rms(B_t) w_B + B_bias, theta_t),   q_t = rot(rms(C_t) w_C + C_bias, theta_t)
    S_t = alpha_t S_{t-1} + alpha_t DT_t (1 - sigma_t) x_{t-1} k_{t-1}^T + DT_t sigma_t x_t k_t^T
    y_t = S_t q_t + D x_t,   out = out_proj(y * silu(z))     (or out_proj(w * rms(y) * silu(z)), is_outproj_norm)

``rot`` turns the channel pairs ``(2i, 2i + 1)``, ``i < num_rope_angles``, by ``theta_t[i]``: a complex-valued state
written as rotations, whose read-out ``q_t . k_s`` depends on ``theta_t - theta_s``. The trapezoidal update blends the
current and the previous token's input. (``tests/reference.py`` has the recurrence token by token, checked against
mamba-ssm's Triton kernels run by Triton's interpreter.)

MambaLRP's principles carry over: everything the input selects, ``DT``, ``A`` (so ``alpha``), ``sigma``, the
normalised, biased and rotated ``q`` and ``k`` (so the angles), is held constant by the selection rule. Then ``S`` and
``y`` are linear in ``x``: the trapezoid adds the previous token's ``x`` with a constant weight, a second linear term,
so relevance flows to both tokens in proportion to their contribution. ``D x`` is linear too. The gate takes the
identity rule on SiLU and the half rule on the product; the output norm the LN-rule (before the gate). The
projections are linear layers, for LRP-0 or Zennit's rules.

Unrolled, with ``c_t = sum_{r <= t} A_r DT_r``: ``y_t = sum_{s < t} exp(c_t - c_s) (q_t . k_s) w_s x_s + DT_t sigma_t
(q_t . k_t) x_t + D x_t`` with ``w_s = DT_s sigma_s + DT_{s+1} (1 - sigma_{s+1})`` (0 past the end): Mamba-2's SSD with
the input scaled by ``w`` and the diagonal corrected, which :py:func:`trapezoid_ssd` computes.
'''
import contextlib
import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from zennit_mamba.core.family import Canonized
from zennit_mamba.kernels.ssd import held_selection_ssd
from zennit_mamba.mixers.io import run_mixer


class Mamba3Selection(NamedTuple):
    '''What a Mamba-3 mixer's input selects, per ``(batch, length, heads)``: the log-decay ``A DT``, the step ``DT``,
    the trapezoid weight ``sigma`` and the rotated queries and keys ``(..., d_state)``.'''
    log_decay: torch.Tensor
    step: torch.Tensor
    trap: torch.Tensor
    query: torch.Tensor
    key: torch.Tensor


def rms(x: torch.Tensor, weight: torch.Tensor, epsilon: float = 1e-5) -> torch.Tensor:
    '''``weight * x / sqrt(mean(x^2) + epsilon)`` over the last dimension (mamba-ssm's RMSNorm without gate).'''
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + epsilon))


def rotate_pairs(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    '''The channel pairs ``(2i, 2i + 1)`` of ``x`` ``(..., channels)`` turned by ``angles[..., i]`` (``i <
    angles.shape[-1]``); the other channels unchanged.'''
    pairs = angles.shape[-1]
    turned = x[..., :2 * pairs].unflatten(-1, (pairs, 2))
    first, second = turned[..., 0], turned[..., 1]
    cos, sin = angles.cos(), angles.sin()
    turned = torch.stack((first * cos - second * sin, first * sin + second * cos), dim=-1).flatten(-2)
    return torch.cat((turned, x[..., 2 * pairs:]), dim=-1)


def trapezoid_ssd(x: torch.Tensor, selection: Mamba3Selection, D: torch.Tensor, chunk_size: int = 64) -> torch.Tensor:
    '''``y_t = S_t q_t + D x_t`` of the trapezoidal recurrence (the module docstring) for ``x`` ``(batch, length,
    heads, headdim)``, from a zero state; linear in ``x`` for a constant selection.'''
    step, trap = selection.step, selection.trap
    current = step * trap
    # the weight of x_s in every later state: its own step's share and the next step's share of the previous token
    later = current + F.pad((step * (1 - trap))[:, 1:], (0, 0, 0, 1))
    y = held_selection_ssd(x, selection.log_decay, selection.key, selection.query, later, D, chunk_size)
    # the diagonal term has the current token's share only
    return y + ((current - later) * (selection.query * selection.key).sum(-1)).unsqueeze(-1) * x


def mamba3_mixer(rules, mixer: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    '''A Mamba-3 mixer (mamba-ssm's parameter names: ``in_proj``, ``dt_bias``, ``B_bias``, ``C_bias``, ``B_norm``,
    ``C_norm``, ``D``, ``norm`` where ``is_outproj_norm``, ``out_proj``) on ``(batch, length, d_model)`` under
    ``rules``, computed in float32 or wider.'''
    if hidden_states.dim() != 3:
        raise ValueError(f'a Mamba-3 mixer takes (batch, length, d_model) inputs, got shape '
                         f'{tuple(hidden_states.shape)}: add the batch dimension (inputs[None])')
    batch, length, _ = hidden_states.shape
    heads, headdim, state = mixer.nheads, mixer.headdim, mixer.d_state
    groups, angles_count, inner = mixer.num_bc_heads, mixer.num_rope_angles, mixer.d_inner
    dtype = torch.promote_types(hidden_states.dtype, torch.float32)
    projected = mixer.in_proj(hidden_states).to(dtype)
    z, x, B, C, dd_dt, dd_A, trap, angles = torch.split(
        projected, [inner, inner, groups * state, groups * state, heads, heads, heads, angles_count], dim=-1)

    # the selection is constant under the SSM rule: where that rule computes as stated, it is computed without a graph
    # (whose per-head norms' and rotations' intermediates would be held until the rule cuts the graph, raising the
    # mixer's peak memory); a replaced rule (the mutation check) or an ablation takes the graph
    with torch.no_grad() if rules.fuses({'ssm'}, ('selection',)) else contextlib.nullcontext():
        A = torch.clamp(-F.softplus(dd_A), max=-mixer.A_floor)
        step = F.softplus(dd_dt + mixer.dt_bias.to(dtype))
        turn = torch.tanh(angles).unsqueeze(2) * math.pi * step.unsqueeze(-1)    # (batch, length, heads, angles)
        theta = torch.remainder(torch.cumsum(turn, dim=1), 2 * math.pi)
        # each head reads its group's B and C
        group = torch.arange(heads, device=hidden_states.device) // (heads // groups)
        key = rms(B.unflatten(-1, (groups, state)), mixer.B_norm.weight.to(dtype), mixer.B_norm.eps)[:, :, group]
        query = rms(C.unflatten(-1, (groups, state)), mixer.C_norm.weight.to(dtype), mixer.C_norm.eps)[:, :, group]
        key = rotate_pairs(key + mixer.B_bias.to(dtype)[:, 0], theta)
        query = rotate_pairs(query + mixer.C_bias.to(dtype)[:, 0], theta)
        trap = torch.sigmoid(trap)
    selection = Mamba3Selection(*rules.selection(A * step, step, trap, query, key))

    y = trapezoid_ssd(x.unflatten(-1, (heads, headdim)), selection, mixer.D.to(dtype), mixer.chunk_size)
    if mixer.is_outproj_norm:
        norm = mixer.norm
        y = rules.gated_norm(y.flatten(2), z, norm.weight, norm.eps, headdim, before_gate=True)
    else:
        y = rules.output_gate(y.flatten(2), rules.activation('silu', z))
    return mixer.out_proj(y.to(hidden_states.dtype))


def canonized_forward(rules, self: torch.nn.Module, u: torch.Tensor, seq_idx=None, cu_seqlens=None,
                      inference_params=None) -> torch.Tensor:
    '''Forward of a Mamba-3 mixer (mamba-ssm's ``Mamba3`` or the plain-PyTorch copy) under
    :py:class:`~zennit_mamba.MambaComposite`.'''
    if seq_idx is not None or cu_seqlens is not None or inference_params is not None:
        raise NotImplementedError('MambaLRP explains a Mamba-3 mixer on whole sequences: no seq_idx, cu_seqlens or '
                                  'inference cache')
    return run_mixer(rules, mamba3_mixer, self, u)


def _mimo(mixer: torch.nn.Module) -> Optional[str]:
    '''A setting :py:func:`mamba3_mixer` does not compute: the MIMO form (its kernels are TileLang's).'''
    return 'the MIMO form (is_mimo=True), which MambaLRP does not compute yet' if mixer.is_mimo else None


#: mamba-ssm's ``Mamba3`` and the plain-PyTorch copy (:py:mod:`zennit_mamba.families.mamba3`): SISO only
MIXER = Canonized(canonized_forward, check=_mimo)
