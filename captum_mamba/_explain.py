'''What every Captum front end needs around the zennit_mamba composite.'''
import inspect
import threading
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterator, Mapping, Optional, Tuple, TypeVar

import torch
from captum._utils.typing import TargetType
from torch import Tensor

from zennit_mamba import MambaComposite
from zennit_mamba._optional import mamba_ssm_modules


MAMBA_SSM_TAKES_NO_MASK = (
    "mamba-ssm's MambaLMHeadModel takes no attention_mask: the mask would be read as position_ids, which it ignores, "
    'and the pads explained as tokens. Explain sequences of different lengths in separate calls without padding, or '
    "load the weights into transformers' Mamba(2)ForCausalLM, which honours a mask."
)


@contextmanager
def explaining(model: torch.nn.Module, composite: MambaComposite) -> Iterator[None]:
    '''Register ``composite`` on ``model`` in eval mode, its rules acting only on this thread's calls inside
    ``composite.rule_set.switch.acting()`` (other methods, gradients and threads see the unmodified model); restore
    training flags and hooks afterwards. The front end holds the explanation's ends
    (:py:meth:`~zennit_mamba.core.hooks.ExplainedModel.explained_by_caller`).'''
    training = [(module, module.training) for module in model.modules()]
    # only where a flag is set: setting the flags of a few hundred modules takes milliseconds of host time per call
    if any(flag for _, flag in training):
        model.eval()
    try:
        with composite.context(model), composite.rule_set.switch.held_by_this_thread():
            yield
    finally:
        for module, flag in training:
            if module.training != flag:
                module.training = flag


#: a Captum front end holding its registration
Explainer = TypeVar('Explainer', bound='HeldRegistration')


class _Hold:
    '''The thread inside :py:meth:`HeldRegistration.registered`, or None: only its calls skip the registration
    (another thread's call still registers, and is refused while the composite is held, rather than find the model
    restored under it). One object shared by the explainer's shallow copies (Captum's LLM classes make one).'''

    thread: Optional[int] = None


class HeldRegistration:
    '''What a Captum front end (with ``self.model`` and ``self.composite``) adds: :py:meth:`registered`, which keeps
    the composite registered across ``attribute()`` calls instead of registering it on every call.'''

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._hold = _Hold()

    @property
    def _holder(self) -> Optional[int]:
        return self._hold.thread

    @contextmanager
    def registered(self: Explainer) -> Iterator[Explainer]:
        '''Register the composite once for every ``attribute()`` call of this thread inside the block (in eval
        mode), and restore the model exactly on leaving. Each call's result is the same as outside; what it saves
        is the registration per call, 1-3 ms of host time that a GPU spends waiting on short inputs. The rules act
        on this explainer's calls only: inside the block, other methods (Captum's, a gradient of your own) and
        other threads compute with the unmodified model.

        Yields
        ------
        MambaLRP or LayerMambaLRP
            The explainer itself, its composite registered.

        Raises
        ------
        RuntimeError
            Inside a ``registered()`` block of the same explainer.

        Examples
        --------
        >>> from transformers import MambaConfig, MambaForCausalLM
        >>> from captum_mamba import MambaLRP
        >>> model = MambaForCausalLM(MambaConfig(vocab_size=16, hidden_size=8, state_size=4, num_hidden_layers=1))
        >>> corpus = [model.get_input_embeddings()(torch.tensor([[1, 2, 3]])).detach() for _ in range(2)]
        >>> lrp = MambaLRP(model)
        >>> with lrp.registered():
        ...     attributions = [lrp.attribute(embeddings, target=5) for embeddings in corpus]
        >>> len(attributions), attributions[0].shape
        (2, torch.Size([1, 3, 8]))
        '''
        if self._holder is not None:
            raise RuntimeError(
                f'{type(self).__name__}.registered() is already active; leave that block first (a block holds '
                f'the registration for all attribute() calls inside it).'
            )
        with explaining(self.model, self.composite):
            self._hold.thread = threading.get_ident()
            try:
                yield self
            finally:
                self._hold.thread = None

    @contextmanager
    def _registration(self) -> Iterator[None]:
        '''The registration for one ``attribute()`` call (none where this thread holds one), its rules acting.'''
        held = self._holder == threading.get_ident()
        registration = nullcontext() if held else explaining(self.model, self.composite)
        with registration, self.composite.rule_set.switch.acting():
            yield


def explained_model(method: str, forward_func: Any, model: Optional[torch.nn.Module]) -> torch.nn.Module:
    '''The module the rules are registered on: ``model`` where given, else ``forward_func`` itself.'''
    if model is None:
        if not isinstance(forward_func, torch.nn.Module):
            raise TypeError(
                f'{method} got a {type(forward_func).__name__} as forward function: name the model its rules act on, '
                f'{method}(forward_func, model=model).'
            )
        return forward_func
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f'{method} explains a torch.nn.Module, not {type(model).__name__}')
    if forward_func is not model and not callable(forward_func):
        raise TypeError(f'forward_func must be callable, not {type(forward_func).__name__}')
    return model


def refuse_extra_arguments(method: str, arguments: dict) -> None:
    '''Raise for arguments ``attribute()`` does not take, explaining why there are no baselines.'''
    if 'baselines' in arguments:
        raise TypeError(
            f'{method} takes no baselines: its relevances sum to f(x) itself, not to f(x) - f(baseline). '
            'For attributions relative to a baseline use IntegratedGradients.'
        )
    if arguments:
        raise TypeError(f'{method}.attribute() got unexpected arguments: {sorted(arguments)}')


def check_inputs(method: str, inputs: Tuple[Any, ...], embeddings: bool, layer: Optional[torch.nn.Module] = None):
    '''Raise a clear error for inputs MambaLRP cannot explain, before the model is touched.

    ``embeddings``: the model is a language model whose float inputs are embeddings ``(batch, length, hidden)``;
    ``layer``: the layer of a layer method (an embedding layer takes token ids).
    '''
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            f'{method}.attribute() was called inside torch.inference_mode(), where no gradient can be computed; call '
            'it outside (it needs no torch.no_grad() either: the model is left unchanged).'
        )
    for index, tensor in enumerate(inputs):
        if isinstance(tensor, Mapping):
            raise TypeError(
                f'Input {index} is a {type(tensor).__name__} (e.g. a tokenizer\'s output): pass its tensor, '
                "encoding['input_ids'], and the mask as additional_forward_args=(encoding['attention_mask'],)."
            )
        if not torch.is_tensor(tensor):
            raise TypeError(f'Input {index} is a {type(tensor).__name__}, not a tensor.')
        if tensor.numel() == 0:
            raise ValueError(f'Input {index} of shape {tuple(tensor.shape)} is empty: nothing to explain.')
        if embeddings and tensor.is_floating_point() and tensor.dim() != 3:
            raise ValueError(
                f'Input {index} of shape {tuple(tensor.shape)}: a language model takes embeddings of shape (batch, '
                'length, hidden); add the batch dimension with embeddings[None].'
            )
        if isinstance(layer, torch.nn.Embedding) and not tensor.is_floating_point() and tensor.dim() != 2:
            raise ValueError(
                f'Input {index} of shape {tuple(tensor.shape)}: token ids are (batch, length); add the batch '
                'dimension with input_ids[None].'
            )
        if isinstance(layer, torch.nn.Embedding) and tensor.is_floating_point():
            raise TypeError(
                f'{method} on the embedding layer takes token ids, but input {index} is {tensor.dtype}: for '
                'embeddings use MambaLRP(model).attribute(embeddings, target=...).'
            )


def check_position(position: Any) -> None:
    '''Refuse a ``position`` that is not an int (a sequence index, negative from the end).'''
    if isinstance(position, bool) or not isinstance(position, int):
        raise TypeError(f'position must be an int (a sequence index, -1 for the last), not {position!r}.')


def check_additional_forward_args(arguments: Any) -> None:
    '''Refuse a dict of further arguments: Captum passes ``additional_forward_args`` by position, so a dict would
    arrive as one positional argument.'''
    if isinstance(arguments, Mapping):
        raise TypeError(
            f'additional_forward_args is a {type(arguments).__name__}: Captum passes these arguments by position, so '
            f'it would arrive as one argument. Pass a tuple in the order the model takes them, e.g. '
            f'additional_forward_args=(attention_mask,); the attention mask is passed to the model by name.'
        )


def check_target(output: Tensor, target: TargetType) -> None:
    '''Raise a precise error for a target that does not fit the explained output.'''
    if isinstance(target, (bool, str, float)) or (torch.is_tensor(target) and (
            target.is_floating_point() or target.dtype == torch.bool)):
        raise TypeError(f'target must be an int, a tensor of ints or a list of ints, not {target!r}.')
    outputs_per_example = output[0].numel() if output.dim() > 0 and len(output) else 0
    if target is None:
        if output.dim() > 1 and outputs_per_example > 1:
            raise ValueError(
                f'target is required: the model has {outputs_per_example} outputs per example. '
                'Pass target=<class index>, a tensor of indices, or a list with one index per example.'
            )
        return
    if output.dim() < 2:
        raise ValueError('The explained output is one value per example; pass target=None.')
    if isinstance(target, list) and target and isinstance(target[0], tuple):
        wrong = [index for index in target if len(index) != output.dim() - 1]
        if wrong:
            raise ValueError(
                f'target {wrong[0]!r} indexes {len(wrong[0])} dimensions, but each example\'s output has '
                f'{output.dim() - 1} ({tuple(output.shape[1:])}).'
            )
        return  # checked further by Captum's own selection
    indices = torch.as_tensor(target).flatten()
    classes = output.shape[1]
    if indices.is_floating_point() or ((indices < 0) | (indices >= classes)).any():
        raise ValueError(
            f'target {target!r} is out of range: the model has {classes} outputs per example '
            f'(valid indices 0 to {classes - 1}).'
        )


class ExplainedForward:
    '''Adapt a model or forward function to the 2-D (or 1-D) output Captum selects targets from.

    Parameters
    ----------
    forward_func : callable
        The model, or the forward function Captum gave the attribution method.
    position : int
        Sequence position whose logits are explained when the output has a sequence dimension.
    target : optional
        The Captum target, checked against the output before Captum selects it.
    embeddings : bool
        Whether float inputs of a transformers model are embeddings (passed as ``inputs_embeds``).
    '''

    def __init__(self, forward_func: Callable, position: int, target: TargetType, embeddings: bool):
        self.forward_func = forward_func
        self.position = position
        self.target = target
        # decided once: both depend only on what forward_func is
        self.pretrained = _is_transformers_model(forward_func)
        self.mamba_ssm = _is_mamba_ssm_lm(forward_func)
        self.embeddings_keyword = embeddings and _is_language_model(forward_func)
        # the last position's logits alone: the LM head over every position of a long input is the largest tensor
        self.last_logits_only = (
            self.pretrained and position == -1
            and 'logits_to_keep' in inspect.signature(forward_func.forward).parameters
        )

    def __call__(self, *args: Any) -> Tensor:
        keywords = {'use_cache': False} if self.pretrained else {}
        mask = self._attention_mask(args)
        if mask is not None and self.mamba_ssm:
            raise ValueError(MAMBA_SSM_TAKES_NO_MASK)
        if mask is not None:
            # by name: the position of attention_mask differs between transformers' models (Mamba2 takes
            # inputs_embeds second)
            keywords['attention_mask'] = mask
            args = tuple(argument for argument in args if argument is not mask)
        if self.last_logits_only and mask is None:
            keywords['logits_to_keep'] = 1
        if self.embeddings_keyword:
            keywords['inputs_embeds'] = args[0]
            args = (None,) + tuple(args[1:])
        output = _logits(self.forward_func(*args, **keywords))
        if output.dim() == 3:
            output = logits_at(output, self.position, mask)
        elif self.position != -1:
            raise ValueError(
                f'position={self.position} chooses among logits per position, but the forward function returns '
                f'{tuple(output.shape)}, one position already chosen: choose it there (ExplainedLogits(model, '
                f'position={self.position})), and leave position at -1 here.'
            )
        check_target(output, self.target)
        return output

    def _attention_mask(self, args: Tuple[Any, ...]) -> Optional[Tensor]:
        '''The attention mask of a language model, the one further argument it takes (its forward's other parameters
        come in different orders: transformers' Mamba2 takes ``inputs_embeds`` second); None where there is none.'''
        if (not (self.pretrained or self.mamba_ssm or self.embeddings_keyword) or not args
                or not torch.is_tensor(args[0]) or len(args) == 1):
            return None
        if len(args) == 2 and is_padding_mask(args[1], args[0]):
            return args[1]
        given = ', '.join(f'{type(value).__name__} of shape {tuple(value.shape)}' if torch.is_tensor(value)
                          else type(value).__name__ for value in args[1:])
        raise TypeError(
            f'A language model takes, besides its inputs, only an attention_mask among additional_forward_args: one '
            f'tensor of the inputs\' (batch, length) {tuple(args[0].shape[:2])}, 1 for real tokens and 0 for pads. Got '
            f'{given}. Pass other arguments through a forward function, e.g. MambaLRP(lambda embeddings: '
            f'model(inputs_embeds=embeddings, ...).logits, model=model).'
        )


def is_padding_mask(value: Any, inputs: Tensor) -> bool:
    '''Whether ``value`` is a padding mask of ``inputs``: a tensor of their ``(batch, length)`` holding only 0 and 1
    (booleans, integers or floats, as transformers takes them).

    Examples
    --------
    >>> inputs = torch.zeros(2, 3, 4)
    >>> is_padding_mask(torch.tensor([[0, 1, 1], [1, 1, 1]]), inputs), is_padding_mask(torch.ones(2, 3) * 2, inputs)
    (True, False)
    '''
    if not torch.is_tensor(value) or value.shape != inputs.shape[:2]:
        return False
    return value.dtype == torch.bool or bool(((value == 0) | (value == 1)).all())


def logits_at(logits: Tensor, position: int, mask: Optional[Tensor] = None) -> Tensor:
    '''The ``(batch, classes)`` logits at ``position`` of ``(batch, length, classes)`` logits; with a padding mask and
    ``position=-1``, each example's last real token (right padding would otherwise explain a pad).'''
    length = logits.shape[1]
    if not -length <= position < length:
        raise ValueError(f'position {position} is outside the {length} positions of the input.')
    if mask is None:
        return logits[:, position]
    real = mask.to(torch.bool)
    if not real.any(1).all():
        raise ValueError('An example of the batch is all padding (its attention_mask has no 1): nothing to explain.')
    if position != -1:
        padded = (~real[:, position]).nonzero().flatten().tolist()
        if padded:
            raise ValueError(
                f'position {position} is padding in examples {padded} of the batch (their attention_mask is 0 there): '
                f'a pad\'s logits explain nothing. Choose a position that is real in every example, position=-1 for '
                f'each example\'s last real token, or explain those examples on their own.'
            )
        return logits[:, position]
    last = length - 1 - real.flip(1).to(torch.int8).argmax(1)
    return logits[torch.arange(len(logits), device=logits.device), last.to(logits.device)]


def _is_transformers_model(forward_func: Callable) -> bool:
    return hasattr(forward_func, 'config') and hasattr(forward_func, 'get_input_embeddings')


def _is_language_model(forward_func: Callable) -> bool:
    '''A transformers or mamba-ssm model, or another with input embeddings that takes them as ``inputs_embeds``
    (this package's ``Mamba3LMHeadModel``): its float inputs are embeddings, passed as ``inputs_embeds``.'''
    return (_is_transformers_model(forward_func) or _is_mamba_ssm_lm(forward_func)
            or (isinstance(forward_func, torch.nn.Module) and hasattr(forward_func, 'get_input_embeddings')
                and 'inputs_embeds' in inspect.signature(forward_func.forward).parameters))


def _is_mamba_ssm_lm(forward_func: Callable) -> bool:
    '''A mamba-ssm MambaLMHeadModel, which takes ``inputs_embeds`` once canonized.'''
    mamba_ssm = mamba_ssm_modules()
    return mamba_ssm is not None and isinstance(getattr(forward_func, 'backbone', None), mamba_ssm.MixerModel)


def _logits(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, dict) and 'logits' in output:
        return output['logits']
    if hasattr(output, 'logits'):
        return output.logits
    if isinstance(output, tuple):
        return output[0]
    raise TypeError(
        f'Cannot find the logits in the model output of type {type(output).__name__}: explain a model that returns '
        f'logits (e.g. MambaForCausalLM, not its backbone), or pass a forward function that returns them.'
    )
