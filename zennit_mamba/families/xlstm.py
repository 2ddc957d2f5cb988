'''xLSTM (transformers' ``xLSTMForCausalLM``): mLSTM blocks (matrix memory with exponential gating), each followed by
a SwiGLU feed-forward, and a tanh soft-cap on the logits.

The rules, as equations (the mLSTM layer's in :py:mod:`zennit_mamba.mixers.mlstm`):

- **mLSTM layer** ``out_proj(sigmoid(o~) * multihead_norm(h))`` with ``C_t = f_t C_{t-1} + i_t v_t k_t^T``,
  ``n_t = f_t n_{t-1} + i_t k_t``, ``h_t = C_t q_t / (max(|n_t^T q_t|, exp(-m_t)) + eps)``: the queries, keys and the
  gate pre-activations are held constant (``'ssm'``), and with them the gates ``i = exp(i~)``, ``f = sigmoid(f~)``,
  the stabiliser ``m`` and the denominator, so that ``h`` is linear in ``v`` and relevance flows through the values
  only; the sigmoid output gate held (``'attention'``); the multi-head norm by the LN-rule (``'norm'``).
- **Feed-forward** ``proj_down(silu(proj_up_gate(x)) * proj_up(x))`` (or both from ``proj_up_gate_z``): the SiLU module
  by the identity rule (``'silu'``), the product entering ``proj_down`` by the half rule (``'gate'``), as every gated
  MLP.
- **RMSNorms** (before each layer and feed-forward, and after the blocks) ``u = w h r``, ``r = rsqrt(mean(h^2) +
  eps)``: the LN-rule (``'norm'``), ``u / h`` held.
- **Soft-cap** of the logits, ``l' = tanh(l / cap) * cap`` (``output_logit_soft_cap``), computed by
  ``xLSTMForCausalLM.forward``: an element-wise function with ``f(0) = 0``, which takes the identity rule (``'silu'``):
  ``R(l) = R(l')``, so that the relevance at the inputs sums to the capped logit that is explained (plain gradient x
  input through it would give ``l (1 - tanh^2(l / cap))``). The canonized ``xLSTMForCausalLM`` applies it. The soft-cap
  of the gate pre-activations (``gate_soft_cap``) is inside the selection, held with it.

transformers casts the logits to float32; in a float64 model the canonized ``xLSTMForCausalLM`` keeps them in float64
(a cast to float32 would round the explained logit, and the relevance sums to the unrounded one), in other dtypes
casts as the original.

What is refused, with the fix in the message: a cache of earlier tokens (a fresh cache, which the config's
``use_cache=True`` makes, is filled as the original fills it); an attention mask with padding before a token (left
padding), since no layer reads the mask: the padded positions would flow into the mLSTM recurrence, in the model's
own forward too (right padding leaves the tokens before it as they are, and is accepted); a sequence longer than
``max_inference_chunksize`` in eval mode, which the original computes under ``torch.no_grad`` in pieces, its states
rounded to bfloat16 between them; the ``xlstm`` package's kernels (installed, they replace transformers' own classes);
backend modes the original layer cannot run (see :py:mod:`zennit_mamba.mixers.mlstm`).
'''
from typing import Optional

import torch

from zennit_mamba.core.family import Canonized, Family, Treatment, in_module
from zennit_mamba.core.layers import COMPOSITION, INSIDE_MIXER, NORM, gated_mlp
from zennit_mamba.mixers.io import pop_return_dict, refuse_continuation, refuse_padding, soft_cap
from zennit_mamba.mixers.mlstm import MODULE, layer_forward, layer_problem


def _continues(cache) -> bool:
    '''Whether ``cache`` (an ``xLSTMCache``) holds the states of earlier tokens: the model has counted tokens into it
    or marked it filled (a state the model passes on is checked again by the canonized layer).'''
    offset = getattr(cache, 'seqlen_offset', 0)
    return getattr(cache, 'rnn_state_initial', True) is False or bool(torch.as_tensor(offset).any())


def model_forward(rules, self, input_ids: Optional[torch.Tensor] = None, inputs_embeds: Optional[torch.Tensor] = None,
                  cache=None, use_cache: Optional[bool] = None, **kwargs):
    '''Forward of a canonized ``xLSTMModel``: the original's, after refusing what it would compute otherwise than the
    explained sequence with gradients (see the module's docstring), before anything of the model changes.'''
    if cache is None and kwargs.get('cache_params') is not None:  # the name before transformers 5.24
        cache = kwargs.pop('cache_params')
    if cache is not None and _continues(cache):
        raise refuse_continuation()
    refuse_padding(kwargs.get('attention_mask'), 'xLSTM', 'xLSTM\'s mLSTM layers')
    given = inputs_embeds if inputs_embeds is not None else input_ids
    hidden_states = kwargs.get('output_hidden_states')
    hidden_states = self.config.output_hidden_states if hidden_states is None else hidden_states
    if (given is not None and not self.training and self.config.max_inference_chunksize < given.shape[1]
            and not hidden_states):
        raise ValueError(
            f'xLSTM computes a sequence longer than config.max_inference_chunksize '
            f'({self.config.max_inference_chunksize}) in eval mode under torch.no_grad, in pieces whose states it '
            f'rounds to bfloat16: no relevance could pass it. Set model.config.max_inference_chunksize to at least '
            f'the length ({given.shape[1]}) while explaining.')
    return type(self).forward(self, input_ids=input_ids, inputs_embeds=inputs_embeds, cache=cache,
                              use_cache=use_cache, **kwargs)


def causal_lm_forward(rules, self, input_ids: Optional[torch.Tensor] = None,
                      inputs_embeds: Optional[torch.Tensor] = None, cache=None, labels: Optional[torch.Tensor] = None,
                      use_cache: Optional[bool] = None, **kwargs):
    '''Forward of a canonized ``xLSTMForCausalLM``: the original's, with the identity rule on the logits' soft-cap,
    ``l' = tanh(l / cap) * cap`` with ``l' / l`` held constant, so that ``R(l) = R(l')``; the logits in float32 at
    least (float64 in a float64 model).'''
    from transformers.models.xlstm.modeling_xlstm import xLSTMCausalLMOutput

    return_dict = pop_return_dict(self.config, kwargs)
    outputs = self.backbone(input_ids, cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
    logits = self.lm_head(outputs[0].to(self.lm_head.weight.dtype))
    logits = soft_cap(rules, logits.to(torch.promote_types(logits.dtype, torch.float32)),
                      self.config.output_logit_soft_cap)
    loss = None
    if labels is not None:
        loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
    output = xLSTMCausalLMOutput(loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states)
    return output if return_dict else output.to_tuple()


def _block_problem(block: torch.nn.Module) -> Optional[str]:
    '''An ``xLSTMBlock`` of the ``xlstm`` package's kernels (installed, transformers builds its blocks from them).'''
    from transformers.models.xlstm import modeling_xlstm

    if getattr(modeling_xlstm, 'external_xlstm', False):
        return ('built from the xlstm package\'s kernels, which replace transformers\' native PyTorch ones when it is '
                'installed; MambaLRP reproduces the native ones: uninstall xlstm (pip uninstall xlstm)')
    return None


FAMILY = Family(
    name='xLSTM', library='transformers', hybrid=True, beside='gated MLPs',
    library_modules=(MODULE,),
    canonized=in_module(MODULE, {
        'xLSTMLayer': Canonized(layer_forward, check=layer_problem,
                                selection=('q', 'k', 'igate_preact', 'fgate_preact', 'ifgate_preact'),
                                # the values' projection (fused with the others' where weight_mode='fused')
                                projections=('v', 'qkv_opreact')),
        'xLSTMModel': Canonized(model_forward, mixer=False),
        'xLSTMForCausalLM': Canonized(causal_lm_forward, mixer=False),
    }),
    layers=in_module(MODULE, {
        'xLSTMPreTrainedModel': COMPOSITION,
        'xLSTMBlock': Treatment(COMPOSITION.description, check=_block_problem),
        'xLSTMRMSNorm': NORM, 'xLSTMFeedForward': gated_mlp('proj_down'),
        # called by the canonized layer, the norm with the LN-rule and the backend on the held selection
        'xLSTMMultiHeadLayerNorm': INSIDE_MIXER, 'xLSTMBackend': INSIDE_MIXER,
    }),
)
