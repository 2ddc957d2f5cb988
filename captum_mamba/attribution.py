'''MambaLRP as a Captum attribution method.'''
import sys
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator, List, Optional, Tuple, Union

import torch
from captum._utils.common import _format_output, _format_tensor_into_tuples, _is_tuple, _run_forward
from captum._utils.typing import TargetType, TensorOrTupleOfTensorsGeneric
from captum.attr import GradientAttribution
from captum.log import log_usage
from torch import Tensor

from zennit_mamba import MambaComposite
from zennit_mamba.constants import additive_parameters, constant_relevance

from ._explain import (
    ExplainedForward, HeldRegistration, _is_language_model, check_additional_forward_args, check_inputs,
    check_position, explained_model, refuse_extra_arguments,
)


@contextmanager
def _requiring_gradients(parameters: List[torch.nn.Parameter]) -> Iterator[None]:
    '''Frozen parameters made to require gradients while an explanation takes theirs.'''
    try:
        for parameter in parameters:
            parameter.requires_grad_(True)
        yield
    finally:
        for parameter in parameters:
            parameter.requires_grad_(False)


def _called_by_noise_tunnel() -> bool:
    '''Whether Captum's NoiseTunnel calls this ``attribute`` (it calls the undecorated function from its own).'''
    frame = sys._getframe(1)
    for _ in range(4):
        frame = frame.f_back
        if frame is None:
            return False
        if frame.f_globals.get('__name__', '').endswith('noise_tunnel'):
            return True
    return False


def _warn_where_unaccounted(relevance: Tuple[Tensor, ...], constants: dict, explained: Tensor) -> None:
    '''Warn where the inputs' and the constants' relevance leave more than rounding of the explained output: a rule
    left out (``rules=``, an ablation, does not conserve), or a forward function with parameters outside ``model``.'''
    total = sum(tensor.flatten(1).sum(1).double() for tensor in relevance) + sum(
        value.double() for value in constants.values())
    remainder = (explained.reshape(-1).double() - total).abs()
    scale = explained.reshape(-1).double().abs().clamp(min=torch.finfo(explained.dtype).tiny)
    worst = (remainder / scale).max().item()
    if worst > 1e-3:
        warnings.warn(
            f'The inputs and the constants leave {worst:.1e} of the explained output unaccounted for: relevance is '
            f'not conserved by this explanation (a rule left out with rules=), or the forward function computes with '
            f'parameters outside model= (their share is not itemised).', stacklevel=3)


class MambaLRP(HeldRegistration, GradientAttribution):
    '''MambaLRP (Rezaei Jafari et al., NeurIPS 2024): relevances of the inputs that sum to the explained output.

    The model is explained in eval mode with :py:class:`zennit_mamba.MambaComposite` registered on it; both are
    undone afterwards. Inputs are float tensors: for a transformers or mamba-ssm language model they are the input
    embeddings (passed as ``inputs_embeds``). To explain token ids, use
    :py:class:`~captum_mamba.LayerMambaLRP` on the embedding layer.

    Parameters
    ----------
    forward_func : :py:obj:`torch.nn.Module` or callable
        The model, or (as Captum's methods take it) a function of the inputs that calls ``model`` and returns its
        output or a value computed from its logits, e.g. :py:class:`~captum_mamba.ExplainedLogits`. Relevance leaves
        at the inputs given to :py:meth:`attribute`: what the function computes from them before the model is
        differentiated as it is (LRP-0), so a scaling passes relevance on exactly and a shift (a normalisation's
        mean) takes its share as a bias does.
    position : int, optional
        Sequence position explained when the output has logits per position (last by default).
    model : :py:obj:`torch.nn.Module`, optional
        The model whose Mamba mixers carry the rules; required where ``forward_func`` is a plain function. Relevance
        enters at its logits.
    **composite_options
        Options of :py:class:`zennit_mamba.MambaComposite`: ``epsilon``, ``gamma``, ``rules``, ``layer_map``,
        ``recompute``, ``delta_relevance``, ``gate_relevance``.

    Examples
    --------
    >>> from transformers import MambaConfig, MambaForCausalLM
    >>> model = MambaForCausalLM(MambaConfig(vocab_size=16, hidden_size=8, state_size=4, num_hidden_layers=1))
    >>> embeddings = model.get_input_embeddings()(torch.tensor([[1, 2, 3]])).detach()
    >>> attributions, delta = MambaLRP(model).attribute(embeddings, target=5, return_convergence_delta=True)
    >>> attributions.shape, bool(delta.abs() < 1e-3)
    (torch.Size([1, 3, 8]), True)
    >>> last_logits = lambda embeddings: model(inputs_embeds=embeddings).logits[:, -1]
    >>> MambaLRP(last_logits, model=model).attribute(embeddings, target=5).shape
    torch.Size([1, 3, 8])
    '''

    def __init__(
        self,
        forward_func: Union[torch.nn.Module, Callable[..., Any]],
        position: int = -1,
        model: Optional[torch.nn.Module] = None,
        **composite_options: Any,
    ):
        super().__init__(forward_func)
        self.model = explained_model('MambaLRP', forward_func, model)
        check_position(position)
        self.position = position
        self.composite = MambaComposite(**composite_options)

    @log_usage(part_of_slo=True)
    def attribute(
        self,
        inputs: TensorOrTupleOfTensorsGeneric,
        target: TargetType = None,
        additional_forward_args: Optional[object] = None,
        return_convergence_delta: bool = False,
        return_constant_relevance: bool = False,
        **kwargs: Any,
    ) -> Union[TensorOrTupleOfTensorsGeneric, Tuple[Any, ...]]:
        '''Relevance of each input element for the target output of each example.

        Parameters
        ----------
        inputs : Tensor or tuple of Tensor
            Float inputs with the batch in the first dimension (embeddings for language models).
        target : int, Tensor, list, optional
            Output index to explain, as in Captum: one for all examples, or one per example.
        additional_forward_args : optional
            Further arguments passed to the model after the inputs.
        return_convergence_delta : bool, optional
            Also return ``sum(attributions) - f(x)`` per example: minus the relevance of the model's constants
            (biases, class tokens, position embeddings), which are part of the output too, and of what epsilon keeps.
        return_constant_relevance : bool, optional
            Also return the relevance of each of those constants per example, a dict parameter name -> ``(batch,)``
            (:py:func:`zennit_mamba.constants.constant_relevance`; one backward pass per example), so that
            ``sum(attributions) + sum(constants) = f(x)``, with a warning where they do not (an ablation by
            ``rules=``; a forward function's own parameters outside ``model``). Not through NoiseTunnel.

        Returns
        -------
        Tensor or tuple of Tensor, then the convergence delta and the constants' relevance where asked for
            Attributions shaped like ``inputs``; they sum to the explained output less the constants' share.

        Examples
        --------
        >>> attributions, constants = MambaLRP(model).attribute(embeddings, target=5,
        ...                                                      return_constant_relevance=True)  # doctest: +SKIP
        >>> attributions.sum() + sum(constants.values())  # the explained logit  # doctest: +SKIP
        '''
        refuse_extra_arguments('MambaLRP', kwargs)
        check_additional_forward_args(additional_forward_args)
        is_inputs_tuple = _is_tuple(inputs)
        check_inputs('MambaLRP', inputs if is_inputs_tuple else (inputs,),
                     embeddings=_is_language_model(self.forward_func))
        inputs = _format_tensor_into_tuples(inputs)
        for index, tensor in enumerate(inputs):
            if not torch.is_floating_point(tensor):
                raise TypeError(
                    f'Input {index} has dtype {tensor.dtype}: MambaLRP explains float inputs (embeddings). '
                    'For token ids use LayerMambaLRP(model, model.get_input_embeddings()).attribute(ids, target=...).'
                )
        # copies: the caller's tensors keep their requires_grad flag and graph
        inputs = tuple(tensor.detach().requires_grad_() for tensor in inputs)

        if return_constant_relevance and _called_by_noise_tunnel():
            raise ValueError('return_constant_relevance is not available through NoiseTunnel, which averages the '
                             'attributions of noisy copies (not the constants\' relevance): call MambaLRP.attribute '
                             'itself.')
        forward = ExplainedForward(self.forward_func, self.position, target, embeddings=True)
        constants = additive_parameters(self.model) if return_constant_relevance else {}
        frozen = [parameter for parameter in constants.values() if not parameter.requires_grad]
        with self._registration(), torch.enable_grad():
            # the ends are here: the gradient of the explained value starts the backward pass, and relevance leaves at
            # the inputs given here (what a forward function computes around the model is differentiated as it is)
            with self.composite.ends.explained_by_caller(inputs) as converted, _requiring_gradients(frozen):
                explained = _run_forward(forward, converted, target, additional_forward_args)
                if constants:
                    # the gradient of the explained value is the relevance here: the seed is 1
                    constants = constant_relevance(explained, self.model, constants, seed=1.0)
                relevance = torch.autograd.grad(torch.unbind(explained), inputs, allow_unused=True)
        unused = [index for index, gradient in enumerate(relevance) if gradient is None]
        if unused:
            raise ValueError(
                f'The explained output has no gradient path to input {unused[0]}: a forward function that detaches '
                f'it or computes under torch.no_grad() hides it from the explanation (relevance would be 0). Remove '
                f'the detach; an input the output does not use has no relevance to explain.'
            )
        attributions = _format_output(is_inputs_tuple, relevance)
        if return_constant_relevance:
            _warn_where_unaccounted(relevance, constants, explained.detach())
        returned = (attributions,)
        if return_convergence_delta:
            returned += (self.compute_convergence_delta(attributions, explained.detach()),)
        if return_constant_relevance:
            returned += (constants,)
        return returned if len(returned) > 1 else attributions

    def has_convergence_delta(self) -> bool:
        return True

    def compute_convergence_delta(
        self, attributions: TensorOrTupleOfTensorsGeneric, output: Tensor
    ) -> Tensor:
        '''``sum(attributions) - output`` per example: minus the share of the model's constants (biases, class tokens,
        position embeddings; ``return_constant_relevance`` itemises it) and of what epsilon keeps; zero where the
        constants are zero (transformers initialises convolution biases to zero, trained models have non-zero ones).

        Parameters
        ----------
        attributions : Tensor or tuple of Tensor
            Attributions as returned by :py:meth:`attribute`.
        output : Tensor
            The explained output per example, shape ``(batch,)``.

        Returns
        -------
        Tensor
            The delta per example.
        '''
        attributions = _format_tensor_into_tuples(attributions)
        total = sum(attribution.flatten(1).sum(1) for attribution in attributions)
        return total - output.reshape(-1).to(total.dtype)

    @property
    def multiplies_by_inputs(self) -> bool:
        return True

    @classmethod
    def get_name(cls) -> str:
        return 'MambaLRP'


