'''Faithfulness of attributions by input perturbation (MoRF / LeRF curves), in the style of ``captum.metrics``.

Features are positions along dimension 1 (tokens, patches); a position's score is the sum of its attributions over
the remaining dimensions. Removing a feature replaces it by ``replacement``. The curves record the explained output
after removing 0, ``step``, ``2 * step``, ... features, most relevant first (MoRF) or least relevant first (LeRF);
the areas are taken over the fraction removed, from 0 to 1, and ``delta_af = area_lerf - area_morf`` is higher for
more faithful attributions (Rezaei Jafari et al., 2024).
'''
from typing import Callable, NamedTuple, Optional, Union

import torch
from captum._utils.common import ExpansionTypes, _expand_additional_forward_args, _expand_target, _run_forward
from captum._utils.typing import TargetType
from torch import Tensor


class FaithfulnessResult(NamedTuple):
    '''Perturbation curves and their areas, per example.'''
    morf: Tensor  #: (batch, points): output after removing the most relevant features first
    lerf: Tensor  #: (batch, points): output after removing the least relevant features first
    fractions: Tensor  #: (points,): fraction of features removed at each point
    area_morf: Tensor  #: (batch,)
    area_lerf: Tensor  #: (batch,)
    delta_af: Tensor  #: (batch,): ``area_lerf - area_morf``


def _removal_counts(length: int, step: int) -> Tensor:
    counts = list(range(0, length, step)) + [length]
    return torch.tensor(counts)


def _perturbed(inputs: Tensor, order: Tensor, counts: Tensor, replacement: Tensor) -> Tensor:
    '''All perturbed copies: (batch * points, length, ...), example-major.'''
    batch, length = inputs.shape[:2]
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(length, device=order.device).expand(batch, -1))
    removed = rank[:, None, :] < counts.to(rank.device)[None, :, None]  # (batch, points, length)
    removed = removed.reshape(removed.shape + (1,) * (inputs.dim() - 2))
    replaced = torch.where(removed, replacement.unsqueeze(1), inputs.unsqueeze(1))
    return replaced.flatten(0, 1)


def _curve(
    forward_func: Callable,
    inputs: Tensor,
    order: Tensor,
    counts: Tensor,
    replacement: Tensor,
    target: TargetType,
    additional_forward_args: Optional[object],
    max_examples_per_batch: int,
) -> Tensor:
    points = len(counts)
    outputs = []
    for start in range(0, len(inputs), max_examples_per_batch):
        stop = start + max_examples_per_batch
        chunk = _perturbed(inputs[start:stop], order[start:stop], counts, replacement[start:stop])
        chunk_target = target[start:stop] if isinstance(target, (list, Tensor)) and not _is_scalar(target) else target
        chunk_arguments = _slice_arguments(additional_forward_args, start, stop)
        with torch.no_grad():
            # the perturbed copies are example-major, so targets and arguments repeat per example
            output = _run_forward(
                forward_func, chunk, _expand_target(chunk_target, points, ExpansionTypes.repeat_interleave),
                _expand_additional_forward_args(chunk_arguments, points, ExpansionTypes.repeat_interleave),
            )
        outputs.append(output.reshape(-1, points))
    return torch.cat(outputs)


def _is_scalar(target: Union[list, Tensor]) -> bool:
    return isinstance(target, Tensor) and target.dim() == 0


def _slice_arguments(arguments: Optional[object], start: int, stop: int) -> Optional[object]:
    if arguments is None:
        return None
    arguments = arguments if isinstance(arguments, tuple) else (arguments,)
    return tuple(argument[start:stop] if isinstance(argument, Tensor) else argument for argument in arguments)


def faithfulness(
    forward_func: Callable,
    inputs: Tensor,
    attributions: Tensor,
    target: TargetType = None,
    additional_forward_args: Optional[object] = None,
    replacement: Union[float, Tensor] = 0.0,
    step: int = 1,
    max_examples_per_batch: Optional[int] = None,
) -> FaithfulnessResult:
    '''MoRF and LeRF perturbation curves of the explained output, and ``delta_af``.

    Parameters
    ----------
    forward_func : callable
        The model or function explained, as given to the attribution method.
    inputs : Tensor
        Inputs of shape ``(batch, length, ...)``; features are the ``length`` positions.
    attributions : Tensor
        Attributions shaped like ``inputs`` (or ``(batch, length)`` scores).
    target : int, Tensor, list, optional
        The explained output, as in Captum.
    additional_forward_args : optional
        Further arguments of ``forward_func``; tensors with a batch dimension are expanded per perturbation.
    replacement : float or Tensor, optional
        Value of a removed feature: a scalar, a tensor shaped like one position (e.g. the embedding of an unknown
        token), or a tensor shaped like ``inputs`` (a baseline per position).
    step : int, optional
        Features removed per step.
    max_examples_per_batch : int, optional
        Examples whose perturbed copies are evaluated in one forward call (all by default).

    Returns
    -------
    FaithfulnessResult
        The curves, the fractions removed, their areas and ``delta_af`` per example.

    Examples
    --------
    >>> weights = torch.tensor([1.0, 1.0, 1.0])
    >>> inputs = torch.tensor([[3.0, 1.0, -2.0]])
    >>> result = faithfulness(lambda x: (x * weights).sum(1, keepdim=True), inputs, inputs, target=0)
    >>> result.morf.tolist(), result.lerf.tolist()
    ([[2.0, -1.0, -2.0, 0.0]], [[2.0, 4.0, 3.0, 0.0]])
    >>> round(result.delta_af.item(), 4)
    3.3333
    '''
    if step < 1:
        raise ValueError(f'step must be a positive number of features, got {step}')
    if attributions.shape[:2] != inputs.shape[:2]:
        raise ValueError(
            f'attributions {tuple(attributions.shape)} do not match the inputs {tuple(inputs.shape)} in '
            '(batch, length)'
        )
    batch, length = inputs.shape[:2]
    scores = attributions.detach().reshape(batch, length, -1).sum(-1)
    replacement = torch.as_tensor(replacement, dtype=inputs.dtype, device=inputs.device).expand_as(inputs)
    counts = _removal_counts(length, step)
    fractions = counts.to(torch.float64) / length
    arguments = (counts, replacement, target, additional_forward_args, max_examples_per_batch or batch)
    inputs = inputs.detach()
    morf = _curve(forward_func, inputs, scores.argsort(dim=1, descending=True, stable=True), *arguments)
    lerf = _curve(forward_func, inputs, scores.argsort(dim=1, stable=True), *arguments)
    area_morf = torch.trapezoid(morf.double(), fractions.to(morf.device), dim=1)
    area_lerf = torch.trapezoid(lerf.double(), fractions.to(lerf.device), dim=1)
    return FaithfulnessResult(morf, lerf, fractions, area_morf, area_lerf, area_lerf - area_morf)
