'''RWKV-4's time mixing (transformers' ``RwkvSelfAttention``) under the MambaLRP rules: the WKV recurrence for whole
sequences at once, and the mixer around it (token shift, projections, receptance), over time blocks on a CPU.

Per channel, the WKV is a weighted average of the values seen so far::

    wkv_t = (sum_{i<t} exp(k_i - (t-1-i) w) v_i + exp(u + k_t) v_t) / (sum_{i<t} exp(k_i - (t-1-i) w) + exp(u + k_t))

with the decay ``w = exp(time_decay)`` and the bonus ``u = time_first`` of the channel. The keys choose how strongly
each value is written into the state, as ``B`` does in Mamba; with ``w`` and ``u`` they fix the weights of the
average. MambaLRP's selection rule (``'ssm'``) holds ``k``, ``w`` and ``u`` constant: the WKV is then linear in the
values, ``wkv_t = sum_i P_ti v_i`` with weights ``P_ti`` that sum to 1, and LRP-0 through it passes each output's
relevance to the values in proportion to their terms (the denominator depends on ``k``, ``w`` and ``u`` alone).

The state is kept as transformers keeps it: numerator and denominator scaled by ``exp(-m)``, where ``m`` is the
running maximum ``m_{t+1} = max(m_t - w, k_t)`` (so ``m_t = max_{i<t} (k_i - (t-1-i) w)``). The maxima are computed
first (:py:func:`wkv_maxima`), in float64 from a cumulative maximum; given them, the scaled numerator and denominator
follow linear recurrences ``s_{t+1} = exp(m_t - w - m_{t+1}) s_t + exp(k_t - m_{t+1}) x_t`` whose factors are at most
1, solved along the whole sequence at once by :py:func:`~zennit_mamba.kernels.scan.linear_recurrence`, with the
transposed recurrence as the backward pass. Any constant maxima give the exact ratio and its exact gradient (they
cancel), so they are held constant whichever rules are on; without the selection rule (the ablation) the gradient
also flows through ``k``, ``w`` and ``u``, exactly.
'''
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from zennit_mamba.kernels.scan import linear_recurrence
from zennit_mamba.mixers.io import runs_in_time_blocks, time_blocks


class WKVState(NamedTuple):
    '''The WKV state of one layer before the next token, each ``(batch, channels)``, as transformers keeps it: the
    numerator and denominator scaled by ``exp(-maximum)``. The numerator carries relevance (it is linear in the
    values); the denominator and the maximum are functions of the keys alone.'''
    numerator: torch.Tensor
    denominator: torch.Tensor
    maximum: torch.Tensor


class _Recurrence(torch.autograd.Function):
    '''``s_p = exp(log_a_p) s_{p-1} + b_p`` along the last dimension (``s_{-1} = 0``), with the transposed recurrence
    as its backward pass: ``lambda_p = g_p + exp(log_a_{p+1}) lambda_{p+1}``, the gradient of ``b`` is ``lambda`` and
    that of ``log_a_p`` is ``lambda_p exp(log_a_p) s_{p-1}`` (computed only where asked).'''

    @staticmethod
    def forward(ctx, log_a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # the recurrence overwrites the tensor it is given, which may be a view of b's memory
        states = linear_recurrence(log_a, b.clone())
        ctx.save_for_backward(log_a, states if ctx.needs_input_grad[0] else None)
        return states

    @staticmethod
    def backward(ctx, gradient: torch.Tensor) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        log_a, states = ctx.saved_tensors
        adjoint = linear_recurrence(F.pad(log_a[..., 1:], (0, 1)), gradient.clone(), reverse=True)
        log_a_gradient = None
        if ctx.needs_input_grad[0]:
            log_a_gradient = adjoint * torch.exp(log_a) * F.pad(states[..., :-1], (1, 0))
        return log_a_gradient, adjoint if ctx.needs_input_grad[1] else None


def recurrence(log_a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    '''The states of ``s_p = exp(log_a_p) s_{p-1} + b_p`` along the last dimension (``s_{-1} = 0``, ``log_a <= 0``),
    differentiable in both.

    Examples
    --------
    >>> recurrence(torch.log(torch.tensor([1.0, 0.5, 0.5])), torch.tensor([1.0, 1.0, 2.0]))
    tensor([1.0000, 1.5000, 2.7500])
    '''
    return _Recurrence.apply(log_a, b)


def wkv_maxima(key: torch.Tensor, decay: torch.Tensor, initial: Optional[torch.Tensor] = None) -> torch.Tensor:
    '''transformers' running maxima of the WKV state, ``m_{t+1} = max(m_t - w, k_t)``, before each of the ``length``
    tokens and after the last: ``(batch, length + 1, channels)`` in float64, without a gradient.

    Computed at once as ``m_t = max(m_0 - t w, max_{i<t} (k_i + i w) - (t-1) w)`` (the cumulative maximum of
    ``k_i + i w``, in float64 so that the shift by ``i w`` loses nothing that matters), ``m_0`` the ``initial``
    maximum or ``-inf`` for a fresh state.

    Examples
    --------
    >>> wkv_maxima(torch.tensor([[[0.0], [3.0], [1.0]]]), torch.tensor([1.0])).flatten().tolist()
    [-inf, 0.0, 3.0, 2.0]
    '''
    key, decay = key.detach().double(), decay.detach().double()
    batch, length, channels = key.shape
    positions = torch.arange(length, dtype=torch.float64, device=key.device)[:, None]
    # index j: max_{i<=j} (k_i + i w) - j w, the maximum before token j + 1
    maxima = torch.cummax(key + positions * decay, dim=1).values - positions * decay
    if initial is None:
        first = torch.full((batch, 1, channels), float('-inf'), dtype=torch.float64, device=key.device)
    else:
        first = initial.detach().double()[:, None]
        maxima = torch.maximum(maxima, first - (positions + 1) * decay)
    return torch.cat([first, maxima], dim=1)


def wkv(key: torch.Tensor, value: torch.Tensor, decay: torch.Tensor, first: torch.Tensor,
        state: Optional[WKVState] = None) -> Tuple[torch.Tensor, WKVState]:
    '''RWKV-4's WKV of ``(batch, length, channels)`` keys and values, from ``state`` (a fresh one where None).

    What transformers' ``rwkv_linear_attention_cpu`` computes token by token (and its CUDA kernel), at once: the
    maxima first (:py:func:`wkv_maxima`, held constant: they cancel in the ratio), then the scaled numerator and
    denominator by :py:func:`recurrence`. Differentiable in every argument; where ``key``, ``decay`` and ``first`` need
    no gradient (held by the selection rule), the output is linear in ``value`` and in the state's numerator.

    Parameters
    ----------
    key, value : :py:obj:`torch.Tensor`
        ``(batch, length, channels)``.
    decay : :py:obj:`torch.Tensor`
        ``w = exp(time_decay)``, ``(channels,)``: the state decays by ``exp(-w)`` per token.
    first : :py:obj:`torch.Tensor`
        ``u = time_first``, ``(channels,)``: the bonus of the current token's key.
    state : :py:class:`WKVState`, optional
        The state before the first token (a previous time block's last).

    Returns
    -------
    (:py:obj:`torch.Tensor`, :py:class:`WKVState`)
        The WKV in ``value``'s dtype, and the state after the last token (computed in float32 at least).
    '''
    dtype, compute = value.dtype, torch.promote_types(torch.promote_types(key.dtype, value.dtype), torch.float32)
    maxima = wkv_maxima(key, decay, None if state is None else state.maximum)
    before, after = maxima[:, :-1], maxima[:, 1:]
    key, value, decay, first = (tensor.to(compute) for tensor in (key, value, decay, first))
    # the output's own maximum over the state's and the current token's terms (held, as the state's maxima)
    output_maximum = torch.maximum(before, (first + key).detach().double())
    log_decay = (before - after).to(compute) - decay  # m_t - w - m_{t+1} <= 0; -inf from a fresh state
    write = torch.exp(key - after.to(compute))  # exp(k_t - m_{t+1}) <= 1
    numerator0 = denominator0 = torch.zeros_like(key[:, :1])
    if state is not None:
        numerator0, denominator0 = state.numerator.to(compute)[:, None], state.denominator.to(compute)[:, None]
    # (batch, channels, length + 1): the scaled sums before each token and after the last
    log_a = F.pad(log_decay, (0, 0, 1, 0)).transpose(1, 2)
    numerator = recurrence(log_a, torch.cat([numerator0, write * value], dim=1).transpose(1, 2)).transpose(1, 2)
    denominator = recurrence(log_a, torch.cat([denominator0, write], dim=1).transpose(1, 2)).transpose(1, 2)
    scale = torch.exp((before - output_maximum).to(compute))  # of the state's terms; 0 for a fresh state
    current = torch.exp(first + key - output_maximum.to(compute))  # of the current token's term
    output = (scale * numerator[:, :-1] + current * value) / (scale * denominator[:, :-1] + current)
    last = WKVState(numerator[:, -1], denominator[:, -1], after[:, -1].to(compute))
    return output.to(dtype), last


def shift_mix(hidden: torch.Tensor, shifted: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    '''RWKV's token shift: ``hidden * mix + shifted * (1 - mix)``, linear in both.'''
    return hidden * mix + shifted * (1 - mix)


def time_mixing(rules, mixer: torch.nn.Module, hidden_states: torch.Tensor,
                blocks_allowed: bool = True) -> Tuple[torch.Tensor, WKVState]:
    '''An ``RwkvSelfAttention`` on ``(batch, length, hidden)`` normalised hidden states under ``rules``: its output and
    its WKV state after the last token. Where ``blocks_allowed``, on a CPU, over time blocks
    (:py:func:`~zennit_mamba.mixers.io.time_blocks`), each reading the position before it for the token shift and
    continuing the WKV from the previous block's state (its numerator carries relevance): the same values and
    relevance as at once.'''
    if not runs_in_time_blocks(rules, mixer, hidden_states, blocks_allowed):
        return _mixer_block(rules, mixer, hidden_states, None, 0)
    outputs, state = [], None
    for positions, context in time_blocks(hidden_states.shape[1], 1):
        output, state = _mixer_block(rules, mixer, hidden_states[:, positions], state, context)
        outputs.append(output)
    return torch.cat(outputs, 1), state


def _mixer_block(rules, mixer: torch.nn.Module, hidden_states: torch.Tensor, state: Optional[WKVState],
                 context: int) -> Tuple[torch.Tensor, WKVState]:
    '''The time mixing on consecutive positions, the first ``context`` of them read by the token shift only: the
    keys, the decay and the bonus held by the selection rule, the receptance ``sigmoid(r)`` (a value in (0, 1) that
    scales the WKV, as an output gate) held as routing weights are, so that relevance flows through the values.'''
    shifted = mixer.time_shift(hidden_states)[:, context:]
    hidden_states = hidden_states[:, context:]
    key = mixer.key(shift_mix(hidden_states, shifted, mixer.time_mix_key))
    value = mixer.value(shift_mix(hidden_states, shifted, mixer.time_mix_value))
    receptance, = rules.held(torch.sigmoid(mixer.receptance(shift_mix(hidden_states, shifted,
                                                                   mixer.time_mix_receptance))))
    key, decay, first = rules.selection(key, torch.exp(mixer.time_decay), mixer.time_first)
    mixed, state = wkv(key, value, decay, first, state)
    return mixer.output(receptance * mixed), state
