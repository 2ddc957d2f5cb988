'''Token heatmaps through Captum's visualisation (``captum.attr.visualization``), also outside notebooks.

``visualize_text`` needs IPython; :py:func:`save_text_heatmap` writes the same table as standalone HTML and a PNG.
'''
import colorsys
import re
from typing import List, Optional, Sequence

import torch
from captum.attr._utils.visualization import (
    VisualizationDataRecord, _get_color, format_classname, format_word_importances,
)

from zennit_mamba.heatmap import Colour, save_png


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

    The relevances are scaled by their largest absolute value, as Captum's colours expect values in [-1, 1].

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
    '''The table :py:func:`captum.attr.visualization.visualize_text` shows, as a standalone HTML document.'''
    rows = ['<tr><th>True Label</th><th>Predicted Label</th><th>Attribution Label</th>'
            '<th>Attribution Score</th><th>Word Importance</th></tr>']
    for record in records:
        rows.append(''.join([
            '<tr>',
            format_classname(record.true_class),
            format_classname(f'{record.pred_class} ({record.pred_prob:.2f})'),
            format_classname(record.attr_class),
            format_classname(f'{record.attr_score:.2f}'),
            format_word_importances(record.raw_input_ids, record.word_attributions),
            '</tr>',
        ]))
    legend_html = ''
    if legend:
        swatches = ''.join(
            f'<span style="display: inline-block; width: 10px; height: 10px; border: 1px solid; '
            f'background-color: {_get_color(value)}"></span> {name} '
            for value, name in zip([-1, 0, 1], ['Negative', 'Neutral', 'Positive'])
        )
        legend_html = f'<div style="border-top: 1px solid; margin-top: 5px; padding-top: 5px"><b>Legend: </b>{swatches}</div>'
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>MambaLRP</title></head><body>\n'
        f'{legend_html}<table>{"".join(rows)}</table>\n</body></html>\n'
    )


def captum_colours(relevance: Sequence[float]) -> List[Colour]:
    '''Captum's text colours (green positive, red negative) as RGB, for values in [-1, 1].'''
    colours = []
    for value in relevance:
        hue, saturation, lightness = (int(part) for part in re.findall(r'\d+', _get_color(float(value))))
        r, g, b = colorsys.hls_to_rgb(hue / 360, lightness / 100, saturation / 100)
        colours.append((round(255 * r), round(255 * g), round(255 * b)))
    return colours


def save_text_heatmap(
    records: Sequence[VisualizationDataRecord],
    html_path: Optional[str] = None,
    png_path: Optional[str] = None,
) -> None:
    '''Write Captum text records as standalone HTML and/or PNG, in Captum's colours.

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
        save_png(png_path, rows, captions, colours=captum_colours)
