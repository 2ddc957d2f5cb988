'''The mLSTM layer of xLSTM (transformers' ``xLSTMLayer``): matrix memory with exponential gating, under the MambaLRP
rules.

The layer computes, for normalised hidden states ``x`` of shape ``(batch, length, hidden)``, per head (``qk`` and
``v`` head dimensions may differ)::

    q, k, v, o~ = q(x), k(x), v(x), ogate_preact(x)          # or split from qkv_opreact(x) (weight_mode='fused')
    i~, f~      = soft_cap(igate_preact(x)), soft_cap(fgate_preact(x))   # cap * tanh(. / cap), gate_soft_cap
    m_t = max(log sigmoid(f~_t) + m_{t-1}, i~_t)             # the stabiliser
    C_t = f_t C_{t-1} + i_t k_t v_t^T,   n_t = f_t n_{t-1} + i_t k_t
          with f_t = exp(log sigmoid(f~_t) + m_{t-1} - m_t),  i_t = exp(i~_t - m_t)
    h_t = C_t^T q_t / (max(|n_t . q_t|, exp(-m_t)) + eps)    # q scaled by 1 / sqrt(qk head dim)
    y   = out_proj(sigmoid(o~) * multihead_norm(h))          # multihead_norm: a LayerNorm per head, weighted

(transformers computes ``h`` chunkwise, in chunks of ``chunk_size`` positions with the states carried between them,
and the positions after the last full chunk step by step; the stabiliser ``m`` is that of the form that computes a
position, which changes ``h`` only through ``eps``).

The rules, from MambaLRP's principles (``docs/rules.md``):

- **SSM rule** (``'ssm'``): ``q``, ``k`` and the gate pre-activations ``i~``, ``f~`` (after their soft-cap) are what the
  input selects (where the memory is written and read, how strongly, how much is kept), held constant
  (:py:meth:`~zennit_mamba.core.ruleset.RuleSet.selection`). The stabiliser ``m``, the gates ``i``, ``f`` and the
  normaliser ``n`` with the denominator ``max(|n^T q|, exp(-m)) + eps`` are functions of these alone, so they are
  constants too, and ``h_t = sum_{s <= t} w_ts v_s`` is linear in the values: relevance flows through ``v`` only,
  as through ``x`` in Mamba's scan. Without it the selection takes relevance of its own and conservation breaks.
- **Output gate** ``sigmoid(o~) * h``: a sigmoid that scales a signal, held constant by the attention rule
  (``'attention'``, :py:meth:`~zennit_mamba.core.ruleset.RuleSet.held`), as routing weights and Kimi's sigmoid
  output gate are: ``R(h) = R(y)``, the gate takes none.
- **Multi-head norm** ``u = w (h - mean(h)) / sqrt(var(h) + eps)`` per head: the LN-rule (``'norm'``), ``u / h`` held
  (:py:meth:`~zennit_mamba.core.ruleset.RuleSet.norm`), so that ``R(h_i) = R(u_i)``.
- The projections ``v`` (or ``qkv_opreact``) and ``out_proj`` are linear layers: LRP-0, or Zennit's rules (``gamma``).

The recurrence is the model's own: the canonized layer calls the layer's backend (``xLSTMBackend``: transformers'
native chunkwise and recurrent PyTorch kernels) on the held selection, so its forward is the original's. Only in a
float64 model are the step-by-step positions' states kept in float64 (the backend keeps them in
``inference_state_dtype``, float32, which rounds ``h`` to float32 there: a difference of about 1e-7 relative in the
outputs), so that the relevance conserves to float64's precision.

What is refused, with the reason: ``mode='train_with_padding'``, and ``mode='train'`` with
``return_last_states=False`` (the original layer cannot unpack the backend's output then and raises); a call that
continues from a state (a cache filled by earlier tokens, :py:func:`~zennit_mamba.mixers.io.refuse_continuation`);
a backend laid out otherwise than transformers' native one (the ``xlstm`` package's kernels).
'''
import functools
from typing import Optional, Tuple

import torch

from zennit_mamba.mixers.io import refuse_continuation, run_mixer

#: the transformers module of the xLSTM classes
MODULE = 'transformers.models.xlstm.modeling_xlstm'

#: the modes of the backend the canonized layer reproduces
MODES = ('inference', 'train')

#: a layer's recurrent states (C, n, m): ``(batch, heads, qk, v)``, ``(batch, heads, qk)``, ``(batch, heads, 1)``
State = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def layer_problem(layer: torch.nn.Module) -> Optional[str]:
    '''What of an ``xLSTMLayer``'s configuration the canonized layer does not reproduce, or None.'''
    config = layer.config
    if config.mode not in MODES:
        return (f'mode={config.mode!r}, whose backend call the original layer cannot unpack (it returns no states); '
                f'set config.mode = "inference" (the default)')
    if config.mode == 'train' and not config.return_last_states:
        return ('mode="train" with return_last_states=False, whose backend output the original layer cannot unpack; '
                'set config.mode = "inference" (the default) or config.return_last_states = True')
    if config.weight_mode not in ('single', 'fused'):
        return f'weight_mode={config.weight_mode!r}, which MambaLRP does not know'
    if _float64_inference(layer.mlstm_backend) is None:
        return ('a backend other than transformers\' native PyTorch kernels (the xlstm package\'s?), whose states '
                'MambaLRP cannot keep in float64')
    return None


def _float64_inference(backend: torch.nn.Module):
    '''The backend's inference function (``wrap_chunkwise_arbitrary_sequence_length`` with its chunkwise, sequence
    and step kernels, as the backend bound them) with the step-by-step kernels keeping their states in float64; None
    where the backend is not laid out so.'''
    run = getattr(backend, '_inference_fn', None)
    if not isinstance(run, functools.partial):
        return None
    keywords = dict(run.keywords)
    for name in ('mlstm_sequence_kernel', 'mlstm_step_kernel'):
        kernel = keywords.get(name)
        if not isinstance(kernel, functools.partial) or 'dtype_state' not in kernel.keywords:
            return None
        keywords[name] = functools.partial(kernel.func, *kernel.args, **{**kernel.keywords,
                                                                         'dtype_state': torch.float64})
    return functools.partial(run.func, *run.args, **keywords)


def mlstm_cell(backend: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               igate: torch.Tensor, fgate: torch.Tensor) -> Tuple[torch.Tensor, State]:
    '''The mLSTM cell on ``(batch, heads, length, dim)`` queries, keys and values and ``(batch, heads, length)`` gate
    pre-activations, from a zero state, as the layer's ``backend`` computes it (in a float64 model, the step-by-step
    positions' states in float64): ``h`` ``(batch, heads, length, v)`` and the last states ``(C, n, m)``.'''
    arguments = dict(query=query, key=key, value=value, igate=igate, fgate=fgate)
    if 'inference' in backend.config.mode and value.dtype == torch.float64:
        return _float64_inference(backend)(**arguments)
    # the layer's own call of its backend (in 'train' mode the config's return_last_states, which is True here)
    return backend(**arguments, return_last_states=True)


def mlstm_layer(rules, layer: torch.nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, State]:
    '''An ``xLSTMLayer`` on ``(batch, length, hidden)`` inputs under ``rules``, from a zero state: the output and the
    last states (detached), as the original returns them.'''
    from transformers.models.xlstm.modeling_xlstm import soft_cap

    config = layer.config
    batch, length, _ = x.shape
    heads = config.num_heads
    if config.weight_mode == 'single':
        query, key, value, o_preact = layer.q(x), layer.k(x), layer.v(x), layer.ogate_preact(x)
        i_preact = soft_cap(layer.igate_preact(x), cap_value=config.gate_soft_cap)
        f_preact = soft_cap(layer.fgate_preact(x), cap_value=config.gate_soft_cap)
    else:
        qk_dim, v_dim = layer.qk_dim, layer.v_dim
        query, key, value, o_preact = torch.tensor_split(
            layer.qkv_opreact(x), (qk_dim, 2 * qk_dim, 2 * qk_dim + v_dim), dim=-1)
        gates = soft_cap(layer.ifgate_preact(x), cap_value=config.gate_soft_cap)
        i_preact, f_preact = torch.tensor_split(gates, (heads,), dim=-1)
    query, key, value = (tensor.reshape(batch, length, heads, -1).transpose(1, 2) for tensor in (query, key, value))
    # the selection: where the memory is written and read, and the gates; m, n and the denominator follow from them
    query, key, i_preact, f_preact = rules.selection(query, key, i_preact.transpose(1, 2), f_preact.transpose(1, 2))
    h, state = mlstm_cell(layer.mlstm_backend, query, key, value, i_preact, f_preact)
    h = h.transpose(1, 2)  # (batch, length, heads, v head dim)
    # the norm's own forward (in float32 where the config forces it), its ratio u / h held by the LN-rule
    normalised = rules.norm(h.reshape(batch, length, -1), layer.multihead_norm(h).reshape(batch, length, -1))
    gate, = rules.held(layer.ogate_act_fn(o_preact))
    return layer.out_proj(gate * normalised), tuple(tensor.detach() for tensor in state)


def layer_forward(rules, self, x: torch.Tensor, state: Optional[State] = None) -> Tuple[torch.Tensor, State]:
    '''Forward of a canonized ``xLSTMLayer``: ``(output, (C, n, m))`` as the original returns.

    A state is what the model passes from a cache: a fresh cache's (zeros, which the original starts from as from
    none) is accepted, the model filling the cache from the returned states as the original does; a state of earlier
    tokens is refused.'''
    if x.ndim != 3:
        raise ValueError(f'Input must have shape [batch_size, sequence_length, HD], got {x.shape}')
    if state is not None and any(torch.is_tensor(part) and bool(part.any()) for part in state):
        raise refuse_continuation()
    return run_mixer(rules, mlstm_layer, self, x)
