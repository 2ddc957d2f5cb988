'''Griffin's recurrent block (RecurrentGemma, transformers' ``RecurrentGemmaRecurrentBlock``): a causal depthwise
convolution, the Real-Gated Linear Recurrent Unit (RG-LRU) and a GeLU-gated output, under the MambaLRP rules.

The block computes, for normalised hidden states ``u`` of shape ``(batch, length, hidden)``::

    x        = conv_1d(linear_x(u))                       # causal depthwise convolution, width conv1d_width
    i_t      = sigmoid(x_t W_i + b_i)                      # input gate, block-diagonal per head
    r_t      = sigmoid(x_t W_r + b_r)                      # recurrence gate
    a_t      = exp(-8 r_t softplus(c))                     # c = recurrent_param;  a_t = 0 at a reset
    m_t      = sqrt(1 - a_t^2)                             # m_t = 1 at a reset (position_ids == 0)
    h_t      = a_t h_{t-1} + m_t i_t x_t                   # the RG-LRU, per channel
    output   = linear_out(h * gelu(linear_y(u)))

The rules, from MambaLRP's principles (``docs/rules.md``):

- **SSM rule** (``'ssm'``): ``a``, ``m`` and ``i`` are what the input selects (how much of the state is kept, how
  much of ``x`` is written), held constant (:py:meth:`~zennit_mamba.core.ruleset.RuleSet.selection`), so that
  ``h`` is linear in ``x`` and relevance flows through ``x`` only:
  ``R(x_t) + R(h_{t-1}) = R(h_t) + R(output_t)`` position by position. Without it the gates, which depend on ``x``,
  take relevance of their own and conservation breaks.
- **Identity rule** (``'silu'``) on the GeLU of the gate branch: ``R(linear_y(u)) = R(gelu(linear_y(u)))``.
- **Half rule** (``'gate'``) on the product ``h * gelu(linear_y(u))``, both factors input-dependent (Mamba's
  ``y * silu(z)``): each receives half.
- The projections and the convolution are linear layers: LRP-0, or Zennit's rules (``gamma``).

The recurrence is computed in float32 at least (transformers accumulates it in float32); in a float64 model in
float64, so that the relevance conserves to float64's precision (the model's own forward rounds the state to float32
there, a difference of about 1e-7 relative in the outputs). On a CPU, long inputs run over time blocks
(:py:func:`~zennit_mamba.mixers.io.time_blocks`), each continued from the previous block's last state.
'''
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from zennit_mamba.core.upstream import refuse_keywords
from zennit_mamba.mixers.io import run_mixer, runs_in_time_blocks, time_blocks


def rg_lru_gates(rg_lru: torch.nn.Module, x: torch.Tensor, reset: torch.Tensor
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    '''The RG-LRU's selection for ``(batch, length, width)`` inputs ``x`` (the convolution's output), as transformers
    computes it: the input gate ``i``, the decay ``a`` (0 at a reset) and the normaliser ``m = sqrt(1 - a^2)``
    (1 at a reset), each ``(batch, length, width)``. ``reset`` is ``position_ids[..., None] == 0``.'''
    batch, length, width = x.shape
    heads, block_width = rg_lru.num_attention_heads, rg_lru.block_width
    # (heads, batch * length, block width): one block-diagonal matrix per head, as transformers' baddbmm
    per_head = x.reshape(batch * length, heads, block_width).permute(1, 0, 2)

    def gate(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        projected = torch.baddbmm(bias[:, None, :], per_head, weight)
        return torch.sigmoid(projected.transpose(0, 1).reshape(batch, length, width))

    input_gate = gate(rg_lru.input_gate_weight, rg_lru.input_gate_bias)
    recurrent_gate = gate(rg_lru.recurrent_gate_weight, rg_lru.recurrent_gate_bias)
    log_a = -8.0 * recurrent_gate * F.softplus(rg_lru.recurrent_param)
    a = torch.exp(log_a)
    multiplier = torch.sqrt(1 - torch.exp(2 * log_a))  # transformers clips this square root's gradient only
    multiplier = reset + ~reset * multiplier
    return input_gate, a * ~reset, multiplier


def linear_recurrence(a: torch.Tensor, u: torch.Tensor, initial_state: Optional[torch.Tensor]
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    '''``h_t = a_t h_{t-1} + u_t`` over ``(batch, length, width)`` inputs, from ``initial_state`` (zeros where None),
    position by position: the states ``h`` and the last state.'''
    state = torch.zeros_like(u[:, 0]) if initial_state is None else initial_state
    states = []
    for t in range(u.shape[1]):
        state = a[:, t] * state + u[:, t]
        states.append(state)
    return torch.stack(states, 1), state


def recurrent_block(rules, block: torch.nn.Module, hidden_states: torch.Tensor, position_ids: torch.Tensor,
                    blocks_allowed: bool = True) -> torch.Tensor:
    '''A ``RecurrentGemmaRecurrentBlock`` on ``(batch, length, hidden)`` hidden states under ``rules``, from a zero
    state. ``position_ids`` ``(batch or 1, length)`` reset the recurrence where they are 0, as transformers' does.
    Where ``blocks_allowed``, on a CPU, over time blocks, each continued from the previous block's last state (which
    carries relevance) and each convolution also reading the positions before its block that it needs.'''
    if not runs_in_time_blocks(rules, block, hidden_states, blocks_allowed):
        return _mixer_block(rules, block, hidden_states, position_ids, None, 0)[0]
    outputs, state = [], None
    for positions, context in time_blocks(hidden_states.shape[1], block.conv1d_width - 1):
        output, state = _mixer_block(rules, block, hidden_states[:, positions], position_ids[:, positions], state,
                                     context)
        outputs.append(output)
    return torch.cat(outputs, 1)


def _mixer_block(rules, block: torch.nn.Module, hidden_states: torch.Tensor, position_ids: torch.Tensor,
                 initial_state: Optional[torch.Tensor], context: int) -> Tuple[torch.Tensor, torch.Tensor]:
    '''The block on consecutive positions, the first ``context`` of them read by the convolution only: the output at
    the others and the recurrence's last state (in the compute dtype, carrying relevance to the next block).'''
    length = hidden_states.shape[1] - context
    gate_input = block.linear_y(hidden_states[:, context:])
    gate = rules.activated(gate_input, block.act_fn(gate_input))
    projected = block.linear_x(hidden_states).transpose(1, 2)
    # conv_1d pads both sides; its first outputs are the causal ones
    x = block.conv_1d(projected)[..., context:context + length].transpose(1, 2)
    reset = position_ids[:, context:, None] == 0
    input_gate, a, multiplier = rules.selection(*rg_lru_gates(block.rg_lru, x, reset))
    normalised = x * input_gate * multiplier.type(x.dtype)
    compute = torch.promote_types(x.dtype, torch.float32)
    states, last_state = linear_recurrence(a.to(compute), normalised.to(compute), initial_state)
    output = rules.output_gate(states.to(x.dtype), gate)
    return block.linear_out(output), last_state


def block_forward(rules, self, input_states: torch.Tensor, position_ids: torch.Tensor,
                  attention_mask: Optional[torch.Tensor] = None, use_cache: bool = True, **kwargs) -> tuple:
    '''Forward of a canonized ``RecurrentGemmaRecurrentBlock``: ``(output, None)`` as the original returns.

    The block keeps the states of generation in attributes (``conv1d_state``, ``rg_lru.recurrent_states``), which the
    original overwrites on every call (``use_cache=True``) or clears (``use_cache=False``). MambaLRP leaves them as they
    are, so that explaining leaves the model exactly as it was, and refuses ``use_cache=True``, whose purpose is to fill
    them. The attention mask is not read (the original ignores it too; the model refuses padding before it, see
    :py:mod:`zennit_mamba.families.recurrent_gemma`).'''
    refuse_keywords(self, {key: value for key, value in kwargs.items() if key != 'cache'})
    if use_cache:
        raise RuntimeError(refuses_cache())
    return run_mixer(rules, recurrent_block, self, input_states, position_ids, True), None


def refuses_cache() -> str:
    '''Why a RecurrentGemma call with ``use_cache=True`` (the model's default) or a cache is refused.'''
    return ('RecurrentGemma keeps the states of generation in its recurrent blocks\' attributes (conv1d_state, '
            'rg_lru.recurrent_states), which a call with use_cache=True (the config\'s default) overwrites, and a '
            'cache of earlier tokens would continue from them. MambaLRP explains whole sequences and leaves the model '
            'as it was: call the model with use_cache=False and no cache inside the composite context (or set '
            'model.config.use_cache = False).')
