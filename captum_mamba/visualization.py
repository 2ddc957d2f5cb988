'''Token heatmaps for Captum's records, in the colours of :py:mod:`zennit_mamba.heatmap` (Zennit's ``bwr``: red
positive, blue negative, white zero, symmetric around zero), with a legend.

:py:func:`text_record` builds Captum's :py:class:`~captum.attr.visualization.VisualizationDataRecord`;
:py:func:`visualize_text` shows records in a notebook like Captum's ``visualize_text`` (whose own colours are green
for positive and red for negative; use ours so that every picture of this package reads the same), and
:py:func:`save_text_heatmap` writes the same table as standalone HTML and a PNG.
'''
import html
from typing import Optional, Sequence

import torch
from captum.attr._utils.visualization import VisualizationDataRecord

from zennit_mamba.heatmap import html_legend, html_tokens, save_png


def text_record(
    tokens: Sequence[str],
    token_relevance: torch.Tensor,
    explained: float,
    predicted: int,
    probability: float,
    label: int,
    target: int,
    delta: float = 0.0,
) -> VisualizationDataRecord:
    '''A Captum :py:class:`~captum.attr.visualization.VisualizationDataRecord` for one explained sequence.

    Parameters
    ----------
    tokens : sequence of str
        The tokens shown, one per relevance.
    token_relevance : Tensor
        Relevance per token, shape ``(len(tokens),)``; scaled by its largest absolute value (Captum's records hold
        values in [-1, 1]).
    explained : float
        The explained output (e.g. the target's logit), which the relevances sum to; Captum's "attribution score".
    predicted : int
        The model's predicted class; Captum's "predicted label".
    probability : float
        The predicted class's probability.
    label : int
        The true class; Captum's "true label".
    target : int
        The explained class; Captum's "attribution label".
    delta : float, optional
        The convergence delta, ``sum(relevance) - explained``.

    Returns
    -------
    VisualizationDataRecord

    Examples
    --------
    >>> record = text_record(['a', 'b'], torch.tensor([2.0, -1.0]), 1.0, 1, 0.9, 1, 1)
    >>> record.word_attributions.tolist()
    [1.0, -0.5]
    '''
    relevance = token_relevance.detach().double().cpu()
    scale = relevance.abs().max().item() or 1.0
    return VisualizationDataRecord(
        relevance / scale, probability, predicted, label, target, explained, list(tokens), delta,
    )


def records_to_html(records: Sequence[VisualizationDataRecord], legend: bool = True) -> str:
    '''The table of Captum's ``visualize_text`` (true, predicted and explained label, score, tokens) as a
    standalone HTML document, in this package's colours.'''
    header = ''.join(f'<th>{name}</th>' for name in (
        'True Label', 'Predicted Label', 'Attribution Label', 'Attribution Score', 'Word Importance'))
    rows = [f'<tr>{header}</tr>']
    for record in records:
        cells = [str(record.true_class), f'{record.pred_class} ({record.pred_prob:.2f})', str(record.attr_class),
                 f'{record.attr_score:.2f}']
        tokens = html_tokens(record.raw_input_ids, [float(value) for value in record.word_attributions])
        rows.append('<tr>' + ''.join(f'<td>{html.escape(cell)}</td>' for cell in cells) + f'<td>{tokens}</td></tr>')
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>MambaLRP</title></head>'
        '<body style="font-family: sans-serif; line-height: 2;">\n'
        f'{html_legend() if legend else ""}<table>{"".join(rows)}</table>\n</body></html>\n'
    )


def visualize_text(records: Sequence[VisualizationDataRecord], legend: bool = True):
    '''Show records in a Jupyter notebook, as Captum's ``visualize_text`` does, in this package's colours.

    Returns the ``IPython.display.HTML`` object it displays.
    '''
    try:
        from IPython.display import HTML, display
    except ImportError as error:
        raise ImportError('visualize_text shows records in a notebook and needs IPython; elsewhere write them with '
                          'save_text_heatmap(records, html_path, png_path).') from error

    shown = HTML(records_to_html(records, legend))
    display(shown)
    return shown


def save_text_heatmap(
    records: Sequence[VisualizationDataRecord],
    html_path: Optional[str] = None,
    png_path: Optional[str] = None,
) -> None:
    '''Write Captum text records as standalone HTML and/or PNG, both with the legend.

    Parameters
    ----------
    records : sequence of VisualizationDataRecord
        E.g. from :py:func:`text_record`.
    html_path, png_path : str, optional
        Where to write the HTML document and the PNG image.
    '''
    if html_path is not None:
        with open(html_path, 'w', encoding='utf-8') as file:
            file.write(records_to_html(records))
    if png_path is not None:
        rows = [(record.raw_input_ids, [float(value) for value in record.word_attributions]) for record in records]
        captions = [
            f'label {record.true_class}, predicted {record.pred_class} ({record.pred_prob:.2f}), '
            f'explained {record.attr_class}: {record.attr_score:.3f}, delta {record.convergence_score:.1e}'
            for record in records
        ]
        save_png(png_path, rows, captions)
