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
from typing import Any, Callable, NamedTuple, Optional, Union

import torch
from captum._utils.common import ExpansionTypes, _expand_additional_forward_args, _expand_target, _run_forward
from captum._utils.typing import TargetType
from torch import Tensor

from ._explain import check_additional_forward_args, is_padding_mask


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


def _perturbed(inputs: Tensor, order: Tensor, counts: Tensor, replacement: Tensor, insert: bool,
               real: Optional[Tensor]) -> Tensor:
    '''All perturbed copies: (batch * points, length, ...), example-major. The first ``count`` features in ``order``
    are replaced (deletion) or are the only ones not replaced (insertion); pads (``real`` False) never are.'''
    batch, length = inputs.shape[:2]
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(length, device=order.device).expand(batch, -1))
    replaced = (rank[:, None, :] < counts.to(rank.device)[None, :, None]) != insert  # (batch, points, length)
    if real is not None:
        replaced &= real[:, None, :]
    replaced = replaced.reshape(replaced.shape + (1,) * (inputs.dim() - 2))
    return torch.where(replaced, replacement.unsqueeze(1), inputs.unsqueeze(1)).flatten(0, 1)


def _curve(
    forward_func: Callable,
    inputs: Tensor,
    order: Tensor,
    counts: Tensor,
    replacement: Tensor,
    insert: bool,
    real: Optional[Tensor],
    target: TargetType,
    additional_forward_args: Optional[object],
    max_examples_per_batch: int,
) -> Tensor:
    points = len(counts)
    outputs = []
    for start in range(0, len(inputs), max_examples_per_batch):
        rows = torch.arange(start, min(start + max_examples_per_batch, len(inputs)))
        chunk = _perturbed(inputs[rows], order[rows], counts, replacement[rows], insert,
                           None if real is None else real[rows])
        with torch.no_grad():
            # the perturbed copies are example-major, so targets and arguments repeat per example
            output = _run_forward(
                forward_func, chunk,
                _expand_target(_rows_of(target, rows, len(inputs)), points, ExpansionTypes.repeat_interleave),
                _expand_additional_forward_args(_rows_of(additional_forward_args, rows, len(inputs)), points,
                                                ExpansionTypes.repeat_interleave),
            )
        outputs.append(output.reshape(-1, points))
    return torch.cat(outputs)


def _rows_of(value: Any, rows: Tensor, batch: int) -> Any:
    '''The examples ``rows`` of a target or of further forward arguments (tensors and lists with a batch dimension;
    other values are the same for every example).'''
    if isinstance(value, tuple):
        return tuple(_rows_of(entry, rows, batch) for entry in value)
    if isinstance(value, Tensor) and value.dim() and len(value) == batch:
        return value[rows.to(value.device)]
    if isinstance(value, list) and len(value) == batch:
        return [value[row] for row in rows.tolist()]
    return value


def padding_mask(inputs: Tensor, additional_forward_args: Optional[object]) -> Optional[Tensor]:
    '''The padding mask among the further forward arguments, as the front ends find it
    (:py:func:`~captum_mamba._explain.is_padding_mask`: the inputs' ``(batch, length)``, only 0 and 1), as booleans;
    None where there is none.

    Examples
    --------
    >>> padding_mask(torch.zeros(2, 3, 4), (torch.tensor([[0, 1, 1], [1, 1, 1]]),)).tolist()
    [[False, True, True], [True, True, True]]
    '''
    arguments = additional_forward_args if isinstance(additional_forward_args, tuple) else (additional_forward_args,)
    mask = next((argument for argument in arguments if is_padding_mask(argument, inputs)), None)
    return None if mask is None else mask.to(device=inputs.device, dtype=torch.bool)


def _curves_on_one_grid(forward_func, inputs, scores, real, counts, target, additional_forward_args,
                        replacement, insertion_baseline, max_examples_per_batch) -> list:
    '''The fields of a :py:class:`FaithfulnessResult` for examples that share one grid of ``counts``; pads (``real``
    False) rank last in both orders, so that the counts run over the real positions only.'''
    fractions = counts.to(torch.float64) / counts[-1]
    padded = real is not None
    most_first = (scores.masked_fill(~real, -torch.inf) if padded else scores).argsort(
        dim=1, descending=True, stable=True)
    least_first = (scores.masked_fill(~real, torch.inf) if padded else scores).argsort(dim=1, stable=True)

    def curves(baseline, insert):
        arguments = (counts, baseline, insert, real, target, additional_forward_args, max_examples_per_batch)
        morf = _curve(forward_func, inputs, most_first, *arguments)
        lerf = _curve(forward_func, inputs, least_first, *arguments)
        areas = [torch.trapezoid(curve.double(), fractions.to(curve.device), dim=1) for curve in (morf, lerf)]
        return morf, lerf, areas[0], areas[1]

    morf, lerf, area_morf, area_lerf = curves(replacement, insert=False)
    deletion = [morf, lerf, fractions, area_morf, area_lerf, area_lerf - area_morf]
    if insertion_baseline is None:
        return deletion
    morf, lerf, area_morf, area_lerf = curves(insertion_baseline, insert=True)
    return deletion + [morf, lerf, area_morf, area_lerf, area_morf - area_lerf]


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

    A padded batch (an integer or boolean ``(batch, length)`` attention mask among ``additional_forward_args``, as
    the front ends take it) is measured over each example's real positions only: pads are never removed or
    inserted, and each example's curve has the points of its own length, so that it is the example's curve measured
    alone. Then ``fractions`` is ``(batch, points)`` too, and the curves of shorter examples end in NaN.

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
    additional_forward_args : tuple, optional
        Further arguments of ``forward_func``, as in Captum; tensors with a batch dimension are expanded per
        perturbation.
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
    check_additional_forward_args(additional_forward_args)
    if additional_forward_args is not None and not isinstance(additional_forward_args, tuple):
        additional_forward_args = (additional_forward_args,)
    batch, length = inputs.shape[:2]
    scores = attributions.detach().reshape(batch, length, -1).sum(-1)
    inputs = inputs.detach()

    def like_inputs(value):
        return None if value is None else torch.as_tensor(value, dtype=inputs.dtype, device=inputs.device).expand_as(
            inputs)

    replacement, insertion_baseline = like_inputs(replacement), like_inputs(insertion_baseline)
    real = padding_mask(inputs, additional_forward_args)
    if real is None:
        return FaithfulnessResult(*_curves_on_one_grid(
            forward_func, inputs, scores, None, _removal_counts(length, step), target, additional_forward_args,
            replacement, insertion_baseline, max_examples_per_batch or batch))
    lengths = real.sum(1)
    if not lengths.all():
        raise ValueError('An example of the batch is all padding (its attention_mask has no 1): nothing to measure.')
    # the examples of one real length share a grid; each field is gathered into (batch, most points), NaN after
    # an example's last point
    points = len(_removal_counts(int(lengths.max()), step))
    fields = None
    for count in lengths.unique().tolist():
        rows = (lengths == count).nonzero().flatten()
        group = _curves_on_one_grid(
            forward_func, inputs[rows], scores[rows], real[rows], _removal_counts(count, step),
            _rows_of(target, rows, batch), _rows_of(additional_forward_args, rows, batch), replacement[rows],
            None if insertion_baseline is None else insertion_baseline[rows], max_examples_per_batch or batch)
        group[2] = group[2].to(group[0].device).expand(len(rows), -1)  # the fractions, per example
        if fields is None:
            fields = [torch.full((batch, points)[:value.dim()], torch.nan, dtype=value.dtype, device=value.device)
                      for value in group]
        for field, value in zip(fields, group):
            if value.dim() > 1:
                field[rows.to(field.device), :value.shape[1]] = value
            else:
                field[rows.to(field.device)] = value
    return FaithfulnessResult(*fields)
