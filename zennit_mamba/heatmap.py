'''Token relevance heatmaps: coloured terminal text, standalone HTML and PNG.

Positive relevance is red, negative blue, with the colour scaled per row by the largest absolute relevance.
'''
import html
from typing import Callable, List, Optional, Sequence, Tuple

import torch

Colour = Tuple[int, int, int]
ColourMap = Callable[[Sequence[float]], List[Colour]]


def token_colours(relevance: Sequence[float]) -> List[Colour]:
    '''RGB colours for token relevances: white at zero, red at the most positive, blue at the most negative.

    Examples
    --------
    >>> token_colours([1.0, -0.5, 0.0])
    [(255, 0, 0), (128, 128, 255), (255, 255, 255)]
    '''
    values = torch.as_tensor(relevance, dtype=torch.float64)
    scale = values.abs().max().item() or 1.0
    colours = []
    for value in (values / scale).tolist():
        fade = round(255 * (1 - abs(value)))
        colours.append((255, fade, fade) if value >= 0 else (fade, fade, 255))
    return colours


def terminal_heatmap(tokens: Sequence[str], relevance: Sequence[float]) -> str:
    '''The tokens with 24-bit ANSI background colours, for printing to a terminal.'''
    spans = (
        f'\x1b[48;2;{r};{g};{b}m\x1b[38;2;0;0;0m{token}\x1b[0m'
        for token, (r, g, b) in zip(tokens, token_colours(relevance))
    )
    return ' '.join(spans)


def html_heatmap(
    rows: Sequence[Tuple[Sequence[str], Sequence[float]]],
    captions: Optional[Sequence[str]] = None,
    title: str = 'Token relevance',
) -> str:
    '''A standalone HTML page with one coloured line of tokens per row.

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
    body = []
    for (tokens, relevance), caption in zip(rows, captions):
        spans = ' '.join(
            f'<span title="{value:+.4f}" style="background-color: rgb({r},{g},{b}); padding: 1px 3px;">'
            f'{html.escape(token)}</span>'
            for token, value, (r, g, b) in zip(tokens, relevance, token_colours(relevance))
        )
        body.append(f'<p><b>{html.escape(caption)}</b><br>{spans}</p>')
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title></head>\n'
        f'<body style="font-family: sans-serif; line-height: 2;">\n<h3>{html.escape(title)}</h3>\n'
        + '\n'.join(body) + '\n</body></html>\n'
    )


def save_png(
    path: str,
    rows: Sequence[Tuple[Sequence[str], Sequence[float]]],
    captions: Optional[Sequence[str]] = None,
    width: float = 10.0,
    colours: ColourMap = token_colours,
) -> None:
    '''Render the same heatmap as :py:func:`html_heatmap` into a PNG file, wrapping long rows.

    ``colours`` maps one row's relevances to RGB colours (:py:func:`token_colours` by default).
    '''
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    captions = captions or [''] * len(rows)
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
        for token, (r, g, b) in zip(tokens, colours(relevance)):
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
