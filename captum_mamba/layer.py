'''MambaLRP relevance at a layer, as a Captum layer attribution method.'''
from typing import Any, Callable, List, Optional, Tuple, Union

import torch
from captum._utils.common import _format_output
from captum._utils.gradient import compute_layer_gradients_and_eval
from captum._utils.typing import TargetType
from captum.attr import LayerGradientXActivation
from captum.log import log_usage
from torch import Tensor

from zennit_mamba import MambaComposite
from zennit_mamba.core.hooks import check_finite, check_relevance_finite
from zennit_mamba.core.layers import INSIDE_MIXER
from zennit_mamba.support import treatment_of

from ._explain import (
    ExplainedForward, HeldRegistration, check_additional_forward_args, check_inputs, check_position,
    explained_model, refuse_extra_arguments,
)


class LayerMambaLRP(HeldRegistration, LayerGradientXActivation):
    '''MambaLRP relevance of a layer's output (or input), e.g. of the embeddings given token ids.

    A subclass of :py:class:`captum.attr.LayerGradientXActivation`, so that
    :py:class:`captum.attr.LLMGradientAttribution` accepts it. That class replaces ``forward_func`` with its own
    wrapper around the model, which is why the rules are registered on ``model``'s modules, not on a wrapper.

    Parameters
    ----------
    forward_func : :py:obj:`torch.nn.Module` or callable
        The model, or a function of the inputs that calls ``model`` (e.g. :py:class:`~captum_mamba.ExplainedLogits`).
    layer : :py:obj:`torch.nn.Module`
        The layer whose relevance is returned, e.g. ``model.get_input_embeddings()``.
    position : int, optional
        Sequence position explained when the output has logits per position (last by default).
    device_ids : list of int, optional
        As for Captum's layer methods with DataParallel models.
    model : :py:obj:`torch.nn.Module`, optional
        The model whose Mamba mixers carry the rules; required where ``forward_func`` is a plain function.
    **composite_options
        Options of :py:class:`zennit_mamba.MambaComposite`: ``epsilon``, ``gamma``, ``rules``, ``layer_map``,
        ``recompute``, ``delta_relevance``, ``gate_relevance``.

    Examples
    --------
    >>> from transformers import MambaConfig, MambaForCausalLM
    >>> model = MambaForCausalLM(MambaConfig(vocab_size=16, hidden_size=8, state_size=4, num_hidden_layers=1))
    >>> lrp = LayerMambaLRP(model, model.get_input_embeddings())
    >>> lrp.attribute(torch.tensor([[1, 2, 3]]), target=5).shape
    torch.Size([1, 3, 8])
    '''

    def __init__(
        self,
        forward_func: Union[torch.nn.Module, Callable[..., Any]],
        layer: torch.nn.Module,
        position: int = -1,
        device_ids: Optional[List[int]] = None,
        model: Optional[torch.nn.Module] = None,
        **composite_options: Any,
    ):
        super().__init__(forward_func, layer, device_ids, multiply_by_inputs=False)
        if treatment_of(layer) is INSIDE_MIXER:
            raise ValueError(
                f'LayerMambaLRP on a {type(layer).__name__}, which the canonized mixer computes from its parameters '
                f'without calling it: no layer method observes it. Attribute to the mixer\'s output, or to a layer '
                f'inside it that it calls (in_proj, out_proj).'
            )
        self.model = explained_model('LayerMambaLRP', forward_func, model)
        check_position(position)
        self.position = position
        self.composite = MambaComposite(**composite_options)

    @log_usage(part_of_slo=True)
    def attribute(
        self,
        inputs: Union[Tensor, Tuple[Tensor, ...]],
        target: TargetType = None,
        additional_forward_args: Optional[object] = None,
        attribute_to_layer_input: bool = False,
        **kwargs: Any,
    ) -> Union[Tensor, Tuple[Tensor, ...]]:
        '''Relevance of the layer's output (or input) for the target output of each example.

        Parameters
        ----------
        inputs : Tensor or tuple of Tensor
            Model inputs, e.g. token ids.
        target : int, Tensor, list, optional
            Output index to explain, as in Captum.
        additional_forward_args : optional
            Further arguments passed to the forward function after the inputs.
        attribute_to_layer_input : bool, optional
            Relevance of the layer's input instead of its output.

        Returns
        -------
        Tensor or tuple of Tensor
            Relevance shaped like the layer's output (or input); it sums to the explained output.
        '''
        refuse_extra_arguments('LayerMambaLRP', kwargs)
        check_additional_forward_args(additional_forward_args)
        if attribute_to_layer_input and isinstance(self.layer, torch.nn.Embedding):
            raise TypeError(
                'The embedding layer\'s input is token ids, which carry no relevance: attribute_to_layer_input=False '
                'gives the relevance of the embeddings (sum it over the last dimension for each token\'s).'
            )
        check_inputs('LayerMambaLRP', inputs if isinstance(inputs, tuple) else (inputs,), embeddings=False,
                     layer=self.layer)
        inputs_tuple = inputs if isinstance(inputs, tuple) else (inputs,)
        check_finite([tensor for tensor in inputs_tuple if tensor.is_floating_point()])
        forward = ExplainedForward(self.forward_func, self.position, target, embeddings=False)
        with self._registration(), self.composite.ends.explained_by_caller(), torch.enable_grad():
            try:
                relevance, activations = compute_layer_gradients_and_eval(
                    forward,
                    self.layer,
                    inputs,
                    target,
                    additional_forward_args,
                    device_ids=self.device_ids,
                    attribute_to_layer_input=attribute_to_layer_input,
                )
            except AssertionError as error:
                if 'did not obtain any outputs' in str(error):
                    raise ValueError(
                        f'The {type(self.layer).__name__} given to LayerMambaLRP was not called in the forward pass: '
                        f'a canonized mixer computes some modules from their parameters. Choose a module the forward '
                        f'calls: the mixer itself, or a layer it calls (in_proj, out_proj).'
                    ) from error
                if not attribute_to_layer_input or 'not a torch.Tensor' not in str(error):
                    raise
                raise TypeError(
                    f'The {type(self.layer).__name__} is called with its input by keyword (as transformers\' decoder '
                    f'layers are), which Captum\'s layer methods cannot read as the layer input: attribute to the '
                    f'output of the module before it (attribute_to_layer_input=False on that module) instead.'
                ) from error
        # the gradient of the explained value through the rule-modified forward: the layer's relevance is gradient x
        # activation
        relevance = tuple((gradient * activation).detach() for gradient, activation in zip(relevance, activations))
        for tensor in relevance:
            check_relevance_finite(tensor)
        return _format_output(len(relevance) > 1, relevance)

    @classmethod
    def get_name(cls) -> str:
        return 'LayerMambaLRP'
