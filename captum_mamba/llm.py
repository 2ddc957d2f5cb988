'''Explaining generated text: Captum's LLMGradientAttribution, with the relevance of every generated token kept.'''
from typing import Any, Dict, List, Optional, Union

import torch
from captum.attr import LLMAttributionResult, LLMGradientAttribution, TextTokenInput
from captum.attr._core.llm_attr import GradientForwardFunc, _convert_ids_to_pretty_tokens
from captum.attr._utils.interpretable_input import InterpretableInput
from torch import Tensor

from .layer import LayerMambaLRP
from .model import ExplainedLogits

TARGET_OUTPUTS = ('log_prob', 'logit')


class _TokenForwardFunc(GradientForwardFunc):
    '''Captum's per-token forward: the prompt (as Captum perturbs it) followed by the tokens generated so far, and
    the logit or log-probability of the next target token.'''

    def __init__(self, attr: 'MambaLLMAttribution', target_output: str):
        super().__init__(attr)
        self.target_output = target_output

    def next_logits(self, perturbed_tensor: Tensor, inp: Any, target_tokens: Tensor, cur_target_idx: int) -> Tensor:
        input_ids = self.attr._format_model_input(inp.to_model_input(perturbed_tensor))['input_ids']
        if cur_target_idx:
            generated = target_tokens[:cur_target_idx].unsqueeze(0).expand(input_ids.size(0), -1)
            input_ids = torch.cat([input_ids, generated.to(self.attr.device)], dim=1)
        return self.model(input_ids).logits[:, -1]

    def forward(self, perturbed_tensor: Tensor, inp: Any, target_tokens: Tensor, cur_target_idx: int) -> Tensor:
        logits = self.next_logits(perturbed_tensor, inp, target_tokens, cur_target_idx)
        if self.target_output == 'log_prob':
            logits = torch.log_softmax(logits, dim=-1)
        return logits[..., target_tokens[cur_target_idx]]

    @torch.no_grad()
    def conserved(self, perturbed_tensor: Tensor, inp: Any, target_tokens: Tensor, cur_target_idx: int) -> Tensor:
        '''What the relevances of one generated token sum to: its logit ``z_t``, or for its log-probability
        ``z_t - sum_j p_j z_j`` (relevance enters at the logits as gradient x input through the log-softmax).'''
        logits = self.next_logits(perturbed_tensor, inp, target_tokens, cur_target_idx)
        token = target_tokens[cur_target_idx]
        if self.target_output == 'logit':
            return logits[..., token]
        return logits[..., token] - (torch.softmax(logits, dim=-1) * logits).sum(-1)


class MambaLLMAttributionResult(LLMAttributionResult):
    '''Captum's :py:class:`~captum.attr.LLMAttributionResult` with the relevance Captum's result leaves out.

    ``token_attr`` (``n_output x n_input``) is the relevance of the prompt's tokens for each generated token, as in
    Captum. From the second generated token on, part of the relevance sits on the tokens generated before it:
    ``generated_token_attr`` (``n_output x n_output``; row ``t`` is non-zero only in columns ``s < t``) holds it, and
    ``explained`` each token's explained output, so that
    ``token_attr[t].sum() + generated_token_attr[t].sum() == explained[t]`` (with every prompt token interpretable;
    tokens left out by ``TextTokenInput(skip_tokens=...)`` keep their share out of ``token_attr``, as in Captum).
    '''

    def __init__(
        self,
        *,
        input_tokens: List[str],
        output_tokens: List[str],
        token_attr: Tensor,
        generated_token_attr: Tensor,
        explained: Tensor,
        inp: Optional[InterpretableInput] = None,
    ):
        super().__init__(input_tokens=input_tokens, output_tokens=output_tokens, seq_attr=token_attr.sum(0),
                         token_attr=token_attr, inp=inp)
        self.generated_token_attr = generated_token_attr
        self.explained = explained

    @property
    def all_token_attr(self) -> Tensor:
        '''``n_output x (n_input + n_output)``: relevance on the prompt's tokens, then on the generated tokens.'''
        return torch.cat([self.token_attr, self.generated_token_attr], dim=1)


class MambaLLMAttribution(LLMGradientAttribution):
    ''':py:class:`captum.attr.LLMGradientAttribution` that explains each generated token's logit and reports all of
    its relevance.

    Captum explains the log-probability of each generated token. With MambaLRP the relevance then enters as
    gradient x input through the log-softmax and sums to ``z_t - sum_j p_j z_j`` (the token's logit minus the
    probability-weighted mean logit) rather than to the log-probability. With ``target_output='logit'`` (the default)
    the relevances of each generated token sum to its logit, which MambaLRP conserves. Either way the result is a
    :py:class:`MambaLLMAttributionResult`, whose rows (prompt and earlier generated tokens) sum to ``explained``.

    Parameters
    ----------
    attr_method : LayerMambaLRP
        The attribution method, ``LayerMambaLRP(model, model.get_input_embeddings())``; other methods are refused
        (their rows sum to no ``explained``: use Captum's ``LLMGradientAttribution`` for them).
    tokenizer
        The model's tokenizer (Hugging Face interface).
    target_output : {'logit', 'log_prob'}, optional
        What is explained for each generated token.
    '''

    def __init__(self, attr_method: Any, tokenizer: Any, target_output: str = 'logit'):
        if target_output not in TARGET_OUTPUTS:
            raise ValueError(f'target_output must be one of {TARGET_OUTPUTS}, not {target_output!r}')
        if not isinstance(attr_method, LayerMambaLRP):
            raise TypeError(
                f'MambaLLMAttribution reports each row\'s explained output, which only LayerMambaLRP\'s relevances sum '
                f'to; {type(attr_method).__name__}\'s attributions sum to something else (IntegratedGradients: f(x) - '
                f'f(baseline), approximately). For it use Captum\'s LLMGradientAttribution({type(attr_method).__name__}'
                f'(...), tokenizer), whose token_attr has the same layout.'
            )
        model = attr_method.model
        if not hasattr(model, 'get_input_embeddings') or isinstance(model, ExplainedLogits):
            raise TypeError(
                f'MambaLLMAttribution generates text with the language model itself: pass it to LayerMambaLRP, '
                f'LayerMambaLRP(model, model.get_input_embeddings()), not a {type(model).__name__}.'
            )
        if attr_method.layer is not model.get_input_embeddings():
            raise ValueError(
                'MambaLLMAttribution explains tokens: its LayerMambaLRP must be on the input embedding layer, '
                'LayerMambaLRP(model, model.get_input_embeddings()) (relevance at a layer inside the model does not '
                'sum to the explained output: the residual stream passes beside it).'
            )
        super().__init__(attr_method, tokenizer)
        self.target_output = target_output
        self.attr_method.forward_func = _TokenForwardFunc(self, target_output)

    def attribute(
        self,
        inp: TextTokenInput,
        target: Union[str, Tensor, None] = None,
        gen_args: Optional[Dict[str, Any]] = None,
        **kwargs: Any,
    ) -> MambaLLMAttributionResult:
        '''Relevance of the prompt's tokens and of the earlier generated tokens for each generated token.

        Parameters
        ----------
        inp : TextTokenInput
            The prompt.
        target : str or Tensor, optional
            The continuation to explain; generated with ``gen_args`` where not given.
        gen_args : dict, optional
            Generation arguments (Captum's defaults: greedy, 25 new tokens).
        **kwargs
            Passed to the attribution method's ``attribute()``, which refuses arguments it does not take.

        Returns
        -------
        MambaLLMAttributionResult
        '''
        target_tokens = self._get_target_tokens(inp, target, gen_args=gen_args)
        if not len(target_tokens):
            raise ValueError(
                f'The target {target!r} has no tokens (or the generation none): nothing to explain. Give a '
                f'continuation that tokenizes to at least one token, or gen_args that generate one.'
            )
        prompt = inp.to_tensor().to(self.device)
        count = len(target_tokens)
        on_prompt, on_generated, explained = [], [], []
        for index in range(count):
            arguments = (inp, target_tokens, index)
            relevance = self.attr_method.attribute(prompt, additional_forward_args=arguments, **kwargs)
            relevance = relevance.detach().sum(-1)[0]  # (prompt length + index,)
            prompt_length = len(relevance) - index
            on_prompt.append(relevance[:prompt_length])
            on_generated.append(torch.nn.functional.pad(relevance[prompt_length:], (0, count - index)))
            explained.append(self.attr_method.forward_func.conserved(prompt, *arguments)[0])
        token_attr = torch.stack(on_prompt)
        if inp.itp_mask is not None:
            token_attr = token_attr[:, inp.itp_mask[0].to(token_attr.device)]
        return MambaLLMAttributionResult(
            input_tokens=inp.values,
            output_tokens=_convert_ids_to_pretty_tokens(target_tokens, self.tokenizer),
            token_attr=token_attr,
            generated_token_attr=torch.stack(on_generated),
            explained=torch.stack(explained).to(token_attr.dtype),
            inp=inp,
        )
