'''RWKV (RWKV-4, transformers' ``RwkvForCausalLM``; Peng et al., 2023): blocks of time mixing, a gated linear
recurrence, and channel mixing, a gated squared-ReLU MLP, each reading the previous token through a token shift.

The time mixing ``output(sigmoid(r) * wkv(k, v))`` is the mixer (:py:mod:`~zennit_mamba.mixers.rwkv`): its WKV, a
decaying weighted average of the values with weights set by the keys, takes the selection rule (``k``, the decay and
the bonus held constant, so that it is linear in ``v``); the receptance ``sigmoid(r)``, a value in (0, 1) that scales
the WKV, is held as routing weights and Kimi's sigmoid output gate are (the attention rule). The channel mixing
``sigmoid(r) * value(relu(key(x))^2)`` holds its receptance likewise and takes the identity rule on the squared ReLU.
The token shifts ``h_t * mix + h_{t-1} * (1 - mix)`` and the halving of the hidden states every ``rescale_every``
blocks are linear (LRP-0); the LayerNorms take the LN-rule.

transformers' RWKV ignores ``attention_mask``: left padding would be read as tokens, so a mask with a pad before a
real token is refused; right padding, after the explained token, changes nothing before it and is accepted.
'''

import torch

from zennit_mamba.core.family import Canonized, Family, in_module
from zennit_mamba.core.layers import COMPOSITION, LINEAR
from zennit_mamba.mixers.io import refuse_continuation, refuse_padding, run_mixer
from zennit_mamba.mixers.rwkv import shift_mix, time_mixing

MODULE = 'transformers.models.rwkv.modeling_rwkv'


def _continues(state, layer: int, *parts: int) -> bool:
    '''Whether the ``parts`` of RWKV's ``state`` list hold anything for ``layer``: a fresh state (made by the model
    for ``use_cache``) holds zeros there until the layer fills them, a state from earlier tokens does not (the
    previous token's input, and a denominator of at least 1).'''
    return state is not None and any(bool(state[part][:, :, layer].any()) for part in parts)


def time_mixing_forward(rules, self, hidden: torch.Tensor, state=None, use_cache: bool = False):
    '''Forward of a canonized ``RwkvSelfAttention``; fills a fresh state as the original does.'''
    if _continues(state, self.layer_id, 1, 3):
        raise refuse_continuation()
    output, last = run_mixer(rules, time_mixing, self, hidden, True)
    if state is not None:
        state[1][:, :, self.layer_id] = hidden[:, -1].detach()
        for part, value in zip((2, 3, 4), last):
            state[part][:, :, self.layer_id] = value.detach()
    return output, state


def channel_mixing_forward(rules, self, hidden: torch.Tensor, state=None):
    '''Forward of a canonized ``RwkvFeedForward``, ``sigmoid(r) * value(relu(key(x))^2)`` on the token-shifted input:
    the squared ReLU (functional, no module a hook could take) by the identity rule, the receptance held.'''
    if _continues(state, self.layer_id, 0):
        raise refuse_continuation()
    shifted = self.time_shift(hidden)
    key = rules.activation('relu2', self.key(shift_mix(hidden, shifted, self.time_mix_key)))
    receptance, = rules.held(torch.sigmoid(self.receptance(shift_mix(hidden, shifted, self.time_mix_receptance))))
    if state is not None:
        state[0][:, :, self.layer_id] = hidden[:, -1].detach()
    return receptance * self.value(key), state


def model_forward(rules, self, input_ids=None, attention_mask=None, inputs_embeds=None, state=None, use_cache=None,
                  output_attentions=None, output_hidden_states=None, return_dict=None, **kwargs):
    '''Forward of a canonized ``RwkvModel``: left padding refused
    (:py:func:`~zennit_mamba.mixers.io.refuse_padding`), then the
    original.'''
    refuse_padding(attention_mask, 'RWKV', 'RWKV\'s layers')
    return type(self).forward(self, input_ids, attention_mask, inputs_embeds, state, use_cache, output_attentions,
                              output_hidden_states, return_dict, **kwargs)


def causal_lm_forward(rules, self, input_ids=None, attention_mask=None, inputs_embeds=None, state=None, labels=None,
                      use_cache=None, output_attentions=None, output_hidden_states=None, return_dict=None,
                      logits_to_keep=0, **kwargs):
    '''Forward of a canonized ``RwkvForCausalLM``: left padding refused
    (:py:func:`~zennit_mamba.mixers.io.refuse_padding`), then the
    original.'''
    refuse_padding(attention_mask, 'RWKV', 'RWKV\'s layers')
    return type(self).forward(self, input_ids, attention_mask, inputs_embeds, state, labels, use_cache,
                              output_attentions, output_hidden_states, return_dict, logits_to_keep, **kwargs)


FAMILY = Family(
    name='RWKV', library='transformers', hybrid=True, beside='channel mixing (a gated squared-ReLU MLP)',
    library_modules=(MODULE,),
    canonized=in_module(MODULE, {
        # gamma=<float> takes the time mixing's projections by these names, and the channel mixing's of the same names
        'RwkvSelfAttention': Canonized(time_mixing_forward, selection=('key',),
                                       projections=('key', 'value', 'receptance', 'output')),
        'RwkvFeedForward': Canonized(channel_mixing_forward, mixer=False),
        'RwkvModel': Canonized(model_forward, mixer=False),
        'RwkvForCausalLM': Canonized(causal_lm_forward, mixer=False),
    }),
    layers={
        **in_module(MODULE, {'RwkvPreTrainedModel': COMPOSITION, 'RwkvBlock': COMPOSITION}),
        # the token shift: one position down, a zero first
        'torch.nn.modules.padding.ZeroPad2d': LINEAR,
    },
)
