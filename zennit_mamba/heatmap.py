'''Token relevance heatmaps in one colour language: terminal text, standalone HTML and PNG.

Colours come from Zennit's ``bwr`` colour map (``zennit.image.CMAPS['bwr']``, the one ``zennit.image.imgify`` uses
for images): positive relevance red, negative blue, zero white, symmetric around zero with each row scaled by its
largest absolute relevance. Every picture carries a legend saying so. The Captum records of
:py:mod:`captum_mamba.visualization` use the same colours.
'''
import html
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from zennit.image import CMAPS

Colour = Tuple[int, int, int]

#: what every legend says
LEGEND = 'red: positive relevance, blue: negative, white: zero; each row scaled by its largest |relevance|'


def _bwr(relevance: torch.Tensor) -> np.ndarray:
    '''Zennit's ``bwr`` colours ``(..., 3)`` in [0, 1], scaled symmetrically by the largest absolute value.'''
    values = torch.as_tensor(relevance, dtype=torch.float64)
    scale = values.abs().max().item() or 1.0
    # zennit's map places white at 0x80 / 0xff of [0, 1]: zero relevance lands there exactly
    white = 0x80 / 0xff
    position = torch.where(values >= 0, white + (1 - white) * values / scale, white + white * values / scale)
    return CMAPS['bwr'](position.clamp(0, 1).numpy())


def token_colours(relevance: Sequence[float]) -> List[Colour]:
    '''RGB colours of Zennit's ``bwr`` map for token relevances, symmetric around zero per row.

    Examples
    --------
    >>> token_colours([1.0, -1.0, 0.0])
    [(255, 0, 0), (0, 0, 255), (255, 255, 255)]
    '''
    return [tuple(int(channel) for channel in colour) for colour in np.rint(255 * _bwr(relevance)).astype(int)]


def relevance_image(relevance: torch.Tensor) -> np.ndarray:
    '''An ``(height, width)`` relevance map as an RGB image ``(height, width, 3)`` of ``uint8``, in Zennit's ``bwr``
    symmetric around zero: what ``zennit.image.imgify(relevance, symmetric=True, cmap='bwr')`` draws, as an array.

    Examples
    --------
    >>> relevance_image(torch.tensor([[2.0, -2.0], [0.0, 1.0]]))[..., 0].tolist()
    [[255, 0], [255, 255]]
    '''
    return np.rint(255 * _bwr(relevance.detach().cpu())).astype(np.uint8)


def _legend_row() -> Tuple[List[str], List[float]]:
    '''The colour scale drawn by every legend: labels and values from -1 to 1.'''
    return ['-', ' ', ' ', ' ', '0', ' ', ' ', ' ', '+'], torch.linspace(-1, 1, 9).tolist()


def terminal_heatmap(tokens: Sequence[str], relevance: Sequence[float]) -> str:
    '''The tokens with 24-bit ANSI background colours, for printing to a terminal (see :py:func:`terminal_legend`).'''
    spans = (
        f'\x1b[48;2;{r};{g};{b}m\x1b[38;2;0;0;0m{token}\x1b[0m'
        for token, (r, g, b) in zip(tokens, token_colours(relevance))
    )
    return ' '.join(spans)


def terminal_legend() -> str:
    '''One line with the colour scale from most negative to most positive, and :py:data:`LEGEND`.'''
    scale = terminal_heatmap(*_legend_row())
    return f'{scale}  {LEGEND}'


def html_legend() -> str:
    '''An HTML line with the colour scale and :py:data:`LEGEND`.'''
    swatches = ''.join(
        f'<span style="display: inline-block; width: 18px; height: 12px; background-color: rgb({r},{g},{b}); '
        f'border: 1px solid #ccc;"></span>'
        for r, g, b in token_colours(_legend_row()[1])
    )
    return f'<div style="margin: 6px 0;"><b>Legend</b> &minus; {swatches} + &nbsp;{html.escape(LEGEND)}</div>'


def html_tokens(tokens: Sequence[str], relevance: Sequence[float]) -> str:
    '''The tokens as HTML spans coloured by relevance; hovering shows each value.'''
    return ' '.join(
        f'<span title="{float(value):+.4f}" style="background-color: rgb({r},{g},{b}); padding: 1px 3px;">'
        f'{html.escape(token)}</span>'
        for token, value, (r, g, b) in zip(tokens, relevance, token_colours(relevance))
    )


def html_heatmap(
    rows: Sequence[Tuple[Sequence[str], Sequence[float]]],
    captions: Optional[Sequence[str]] = None,
    title: str = 'Token relevance',
) -> str:
    '''A standalone HTML page with a legend and one coloured line of tokens per row.

    Parameters
    ----------
    rows : sequence of (tokens, relevance)
        Tokens and their relevances, one pair per explained input.
    captions : sequence of str, optional
        A caption shown above each row (e.g. label, prediction and explained logit).
    title : str, optional
        Page title.

    Returns
    -------
    str
        The HTML document.
    '''
    captions = captions or [''] * len(rows)
    body = [f'<p><b>{html.escape(caption)}</b><br>{html_tokens(tokens, relevance)}</p>'
            for (tokens, relevance), caption in zip(rows, captions)]
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title></head>\n'
        f'<body style="font-family: sans-serif; line-height: 2;">\n<h3>{html.escape(title)}</h3>\n{html_legend()}\n'
        + '\n'.join(body) + '\n</body></html>\n'
    )


def save_png(
    path: str,
    rows: Sequence[Tuple[Sequence[str], Sequence[float]]],
    captions: Optional[Sequence[str]] = None,
    width: float = 10.0,
) -> None:
    '''Render the same heatmap as :py:func:`html_heatmap` into a PNG file, wrapping long rows, with the legend.

    Parameters
    ----------
    path : str
        Where to write the PNG.
    rows, captions
        As for :py:func:`html_heatmap`.
    width : float, optional
        Figure width in inches.
    '''
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    rows, captions = [_legend_row()] + list(rows), [f'Legend: {LEGEND}'] + list(captions or [''] * len(rows))
    line_height, font_size = 0.32, 11
    lines_per_row = [2 + sum(len(token) + 1 for token in tokens) // 90 for tokens, _ in rows]
    figure = plt.figure(figsize=(width, line_height * (sum(lines_per_row) + len(rows)) + 0.3))
    renderer = figure.canvas.get_renderer()
    inches_to_figure = 1.0 / figure.get_size_inches()[1]
    y = 1.0 - line_height * inches_to_figure
    for (tokens, relevance), caption in zip(rows, captions):
        figure.text(0.01, y, caption, fontsize=font_size, weight='bold', va='baseline')
        y -= line_height * inches_to_figure
        x = 0.01
        for token, (r, g, b) in zip(tokens, token_colours(relevance)):
            text = figure.text(
                x, y, token, fontsize=font_size, va='baseline',
                bbox={'facecolor': (r / 255, g / 255, b / 255), 'edgecolor': 'none', 'pad': 1.5},
            )
            extent = text.get_window_extent(renderer=renderer).transformed(figure.transFigure.inverted())
            if extent.x1 > 0.99 and x > 0.01:
                x, y = 0.01, y - line_height * inches_to_figure
                text.set_position((x, y))
                extent = text.get_window_extent(renderer=renderer).transformed(figure.transFigure.inverted())
            x = extent.x1 + 0.006
        y -= 1.5 * line_height * inches_to_figure
    figure.savefig(path, dpi=120, bbox_inches='tight', pad_inches=0.15)
    plt.close(figure)
