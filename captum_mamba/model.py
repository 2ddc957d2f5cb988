'''One module for every Captum method: a language model with embeddings (or token ids) in and the explained logits
out.'''
import inspect
import threading
from typing import Optional

import torch
from torch import Tensor

from ._explain import MAMBA_SSM_TAKES_NO_MASK, _is_mamba_ssm_lm, _logits, check_position, logits_at


class ExplainedLogits(torch.nn.Module):
    '''A transformers or mamba-ssm language model as Captum's methods expect it: inputs in, ``(batch, vocabulary)``
    logits of one position out.

    Float inputs are input embeddings, integer inputs token ids, so that Captum's methods (``InputXGradient``,
    ``IntegratedGradients``, ``Saliency``, ``NoiseTunnel``, :py:class:`~captum_mamba.MambaLRP`) take embeddings and
    their layer variants (``LayerIntegratedGradients``, ``LayerGradientXActivation``,
    :py:class:`~captum_mamba.LayerMambaLRP`) take token ids with ``wrapped.embeddings`` as the layer, all with the
    same ``attribute(inputs, target=..., additional_forward_args=(attention_mask,))`` call. MambaLRP registers its
    rules on the wrapped model inside; the other methods see the unmodified model.

    Parameters
    ----------
    model : :py:obj:`torch.nn.Module`
        A transformers causal language model (``MambaForCausalLM``, a hybrid, ...) or mamba-ssm's
        ``MambaLMHeadModel``.
    position : int, optional
        The sequence position whose logits are returned. With the default ``-1`` and an ``attention_mask``, each
        example's last real token (so right padding is never explained).

    Examples
    --------
    >>> from captum.attr import InputXGradient
    >>> from transformers import MambaConfig, MambaForCausalLM
    >>> from captum_mamba import ExplainedLogits, MambaLRP
    >>> model = MambaForCausalLM(MambaConfig(vocab_size=16, hidden_size=8, state_size=4, num_hidden_layers=1))
    >>> wrapped = ExplainedLogits(model)
    >>> embeddings = wrapped.embeddings(torch.tensor([[1, 2, 3]])).detach()
    >>> [method(wrapped).attribute(embeddings, target=5).shape for method in (MambaLRP, InputXGradient)]
    [torch.Size([1, 3, 8]), torch.Size([1, 3, 8])]
    '''

    def __init__(self, model: torch.nn.Module, position: int = -1):
        super().__init__()
        check_position(position)
        self.model = model
        self.position = position
        self._mamba_ssm = _is_mamba_ssm_lm(model)
        if not self._mamba_ssm and not hasattr(model, 'get_input_embeddings'):
            raise TypeError(
                f'ExplainedLogits takes a transformers or mamba-ssm language model, not {type(model).__name__}; '
                'for another model pass it (or a function of it) to the Captum method directly.'
            )
        parameters = set() if self._mamba_ssm else set(inspect.signature(model.forward).parameters)
        self._keep_last_logits = position == -1 and 'logits_to_keep' in parameters
        self._takes_use_cache = 'use_cache' in parameters

    @property
    def embeddings(self) -> torch.nn.Module:
        '''The model's input embedding layer: the layer of Captum's layer methods on token ids.'''
        return self.model.backbone.embedding if self._mamba_ssm else self.model.get_input_embeddings()

    def forward(self, inputs: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        '''Logits ``(batch, vocabulary)`` at :py:attr:`position`.

        Parameters
        ----------
        inputs : Tensor
            Input embeddings ``(batch, length, hidden)`` or token ids ``(batch, length)``.
        attention_mask : Tensor, optional
            ``(batch, length)``, 1 for real tokens and 0 for pads (transformers models only).
        '''
        if attention_mask is not None and not torch.is_tensor(attention_mask):
            raise TypeError(
                f'attention_mask is a {type(attention_mask).__name__}, not a tensor: pass the (batch, length) mask '
                f'itself, e.g. additional_forward_args=(encoding[\'attention_mask\'],).'
            )
        if self._mamba_ssm:
            logits = self._mamba_ssm_logits(inputs, attention_mask)
        else:
            keywords = {'inputs_embeds' if inputs.is_floating_point() else 'input_ids': inputs}
            if attention_mask is not None:
                keywords['attention_mask'] = attention_mask
            elif self._keep_last_logits:
                keywords['logits_to_keep'] = 1  # the head over every position is the largest tensor of a long input
            if self._takes_use_cache:
                keywords['use_cache'] = False
            logits = _logits(self.model(**keywords))
        return logits_at(logits, self.position, attention_mask)

    def _mamba_ssm_logits(self, inputs: Tensor, attention_mask: Optional[Tensor]) -> Tensor:
        if attention_mask is not None:
            raise ValueError(MAMBA_SSM_TAKES_NO_MASK)
        if not inputs.is_floating_point():
            return self.model(inputs).logits
        # mamba-ssm's backbone takes only token ids: its embedding layer's output is replaced by the inputs, in this
        # thread only (another may be running the same model meanwhile)
        caller = threading.get_ident()
        handle = self.embeddings.register_forward_hook(
            lambda module, args, output: inputs if threading.get_ident() == caller else output)
        try:
            ids = torch.zeros(inputs.shape[:2], dtype=torch.long, device=inputs.device)
            return self.model(ids).logits
        finally:
            handle.remove()
