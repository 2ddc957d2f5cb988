'''Faithfulness of attributions by input perturbation (MoRF / LeRF curves), in the style of ``captum.metrics``.

Features are positions along dimension 1 (tokens, patches); a position's score is the sum of its attributions over
the remaining dimensions (signed: the most relevant feature is the one with the highest score).

* Deletion ("flipping"): removing a feature replaces it by ``replacement``. The curves record the explained output
  after removing 0, ``step``, ``2 * step``, ... features, most relevant first (MoRF) or least relevant first (LeRF);
  the areas are taken over the fraction removed, from 0 to 1, and ``delta_af = area_lerf - area_morf``.
* Insertion: starting from ``insertion_baseline`` at every position, the features are put back, most relevant
  first (MoRF) or least relevant first (LeRF), and ``delta_ai = area_morf - area_lerf`` of those curves.

Both are higher for more faithful attributions (Rezaei Jafari et al., 2024). Inserting the ``k`` most relevant
features into a baseline equal to ``replacement`` is deleting the ``length - k`` least relevant ones, so with one
value for both and ``step`` dividing the length, ``delta_ai`` equals ``delta_af``: give insertion its own baseline.
'''
from typing import Callable, NamedTuple, Optional, Union

import torch
from captum._utils.common import ExpansionTypes, _expand_additional_forward_args, _expand_target, _run_forward
from captum._utils.typing import TargetType
from torch import Tensor


class FaithfulnessResult(NamedTuple):
    '''Perturbation curves and their areas, per example; the insertion fields are ``None`` unless an
    ``insertion_baseline`` was given.'''
    morf: Tensor  #: (batch, points): output after removing the most relevant features first
    lerf: Tensor  #: (batch, points): output after removing the least relevant features first
    fractions: Tensor  #: (points,): fraction of features removed (inserted) at each point
    area_morf: Tensor  #: (batch,)
    area_lerf: Tensor  #: (batch,)
    delta_af: Tensor  #: (batch,): ``area_lerf - area_morf``
    insertion_morf: Optional[Tensor] = None  #: (batch, points): output after inserting the most relevant first
    insertion_lerf: Optional[Tensor] = None  #: (batch, points): output after inserting the least relevant first
    area_insertion_morf: Optional[Tensor] = None  #: (batch,)
    area_insertion_lerf: Optional[Tensor] = None  #: (batch,)
    delta_ai: Optional[Tensor] = None  #: (batch,): ``area_insertion_morf - area_insertion_lerf``


def _removal_counts(length: int, step: int) -> Tensor:
    counts = list(range(0, length, step)) + [length]
    return torch.tensor(counts)


def _perturbed(inputs: Tensor, order: Tensor, counts: Tensor, replacement: Tensor, insert: bool) -> Tensor:
    '''All perturbed copies: (batch * points, length, ...), example-major. The first ``count`` features in ``order``
    are replaced (deletion) or are the only ones not replaced (insertion).'''
    batch, length = inputs.shape[:2]
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(length, device=order.device).expand(batch, -1))
    chosen = rank[:, None, :] < counts.to(rank.device)[None, :, None]  # (batch, points, length)
    chosen = chosen.reshape(chosen.shape + (1,) * (inputs.dim() - 2))
    replaced = torch.where(chosen != insert, replacement.unsqueeze(1), inputs.unsqueeze(1))
    return replaced.flatten(0, 1)


def _curve(
    forward_func: Callable,
    inputs: Tensor,
    order: Tensor,
    counts: Tensor,
    replacement: Tensor,
    insert: bool,
    target: TargetType,
    additional_forward_args: Optional[object],
    max_examples_per_batch: int,
) -> Tensor:
    points = len(counts)
    outputs = []
    for start in range(0, len(inputs), max_examples_per_batch):
        stop = start + max_examples_per_batch
        chunk = _perturbed(inputs[start:stop], order[start:stop], counts, replacement[start:stop], insert)
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
    insertion_baseline: Optional[Union[float, Tensor]] = None,
) -> FaithfulnessResult:
    '''MoRF and LeRF deletion curves of the explained output and ``delta_af``; with ``insertion_baseline`` also the
    insertion curves and ``delta_ai``.

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
    insertion_baseline : float or Tensor, optional
        The input insertion starts from, shaped like ``replacement``. Not given: no insertion curves.

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
    >>> inserted = faithfulness(lambda x: (x * weights).sum(1, keepdim=True), inputs, inputs, target=0,
    ...                         insertion_baseline=1.0)
    >>> inserted.insertion_morf.tolist(), inserted.insertion_lerf.tolist()
    ([[3.0, 5.0, 5.0, 2.0]], [[3.0, 0.0, 0.0, 2.0]])
    >>> round(inserted.delta_ai.item(), 4)  # an additive model: the same as delta_af, whatever the baselines
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
    counts = _removal_counts(length, step)
    fractions = counts.to(torch.float64) / length
    inputs = inputs.detach()
    most_first = scores.argsort(dim=1, descending=True, stable=True)
    least_first = scores.argsort(dim=1, stable=True)

    def curves(baseline, insert):
        baseline = torch.as_tensor(baseline, dtype=inputs.dtype, device=inputs.device).expand_as(inputs)
        arguments = (counts, baseline, insert, target, additional_forward_args, max_examples_per_batch or batch)
        morf = _curve(forward_func, inputs, most_first, *arguments)
        lerf = _curve(forward_func, inputs, least_first, *arguments)
        areas = [torch.trapezoid(curve.double(), fractions.to(curve.device), dim=1) for curve in (morf, lerf)]
        return morf, lerf, areas[0], areas[1]

    morf, lerf, area_morf, area_lerf = curves(replacement, insert=False)
    deletion = (morf, lerf, fractions, area_morf, area_lerf, area_lerf - area_morf)
    if insertion_baseline is None:
        return FaithfulnessResult(*deletion)
    morf, lerf, area_morf, area_lerf = curves(insertion_baseline, insert=True)
    return FaithfulnessResult(*deletion, morf, lerf, area_morf, area_lerf, area_morf - area_lerf)
