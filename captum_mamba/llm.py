'''Explaining generated text: Captum's LLMGradientAttribution with the logit of each token as the target.'''
from typing import Any

import torch
from captum.attr import LLMGradientAttribution
from captum.attr._core.llm_attr import GradientForwardFunc
from torch import Tensor

TARGET_OUTPUTS = ('log_prob', 'logit')


class _LogitForwardFunc(GradientForwardFunc):
    '''Captum's per-token forward, returning the logit of the target token instead of its log-probability.'''

    def forward(self, perturbed_tensor: Tensor, inp: Any, target_tokens: Tensor, cur_target_idx: int) -> Tensor:
        input_ids = self.attr._format_model_input(inp.to_model_input(perturbed_tensor))['input_ids']
        if cur_target_idx:
            generated = target_tokens[:cur_target_idx].unsqueeze(0).expand(input_ids.size(0), -1)
            input_ids = torch.cat([input_ids, generated.to(self.attr.device)], dim=1)
        logits = self.model(input_ids).logits[:, -1]
        return logits[..., target_tokens[cur_target_idx]]


class MambaLLMAttribution(LLMGradientAttribution):
    ''':py:class:`captum.attr.LLMGradientAttribution` that can explain each generated token's logit.

    Captum explains the log-probability of each generated token. With MambaLRP the relevance then enters as
    gradient x input through the log-softmax, and sums to ``z_t - sum_j p_j z_j`` (the token's logit minus the
    probability-weighted mean logit) rather than to the log-probability. With ``target_output='logit'`` the
    relevances of each generated token sum to its logit, which MambaLRP conserves.

    Parameters
    ----------
    attr_method : LayerMambaLRP (or another layer method Captum supports)
        The attribution method, typically ``LayerMambaLRP(model, model.get_input_embeddings())``.
    tokenizer
        The model's tokenizer (Hugging Face interface).
    target_output : {'log_prob', 'logit'}, optional
        What is explained for each generated token.
    '''

    def __init__(self, attr_method: Any, tokenizer: Any, target_output: str = 'logit'):
        if target_output not in TARGET_OUTPUTS:
            raise ValueError(f'target_output must be one of {TARGET_OUTPUTS}, not {target_output!r}')
        super().__init__(attr_method, tokenizer)
        self.target_output = target_output
        if target_output == 'logit':
            self.attr_method.forward_func = _LogitForwardFunc(self)
