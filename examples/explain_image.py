'''Explain a Vision Mamba's image classifications like the paper's figure: input, GI, SmoothGrad, IG, AttnRoll and
MambaLRP side by side.

Trains a small Vim (two bidirectional blocks, a middle class token) on scikit-learn's 8x8 digits upsampled to 16x16,
16 patches of 4x4 pixels, in about a minute on two CPU cores. Every method scores patches as in the faithfulness
benchmark (benchmarks/methods.py) and the scores are spread over each patch's pixels; MambaLRP is shown at the
pixels too (relevance of each pixel through the patch embedding). Heatmaps use Zennit's ``bwr`` colour map
symmetric around zero (red positive, blue negative), as ``zennit.image.imgify`` draws them and as every picture of
this package (:py:func:`zennit_mamba.heatmap.relevance_image`); one example is
also drawn with Captum's ``visualize_image_attr`` (given the same colour map).

Run: ``python examples/explain_image.py [--out DIR] [--quick]``; writes ``explain_image.png`` (the grid) and
``explain_image_captum.png`` to DIR.
'''
import argparse
import os
import sys
import time

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from captum.attr import visualization  # noqa: E402

from captum_mamba import MambaLRP  # noqa: E402
from zennit_mamba.heatmap import LEGEND, relevance_image  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks'))

from methods import methods  # noqa: E402
from tasks import accuracy, train_model, vim_digits_task  # noqa: E402

COLUMNS = ['InputXGradient', 'SmoothGrad', 'IntegratedGradients', 'AttnRoll', 'MambaLRP']
TITLES = {'InputXGradient': 'GI', 'IntegratedGradients': 'IG'}


def to_pixels(model, patch_scores: torch.Tensor) -> torch.Tensor:
    '''Per-patch scores ``(batch, 16)`` as ``(batch, 16, 16)`` maps (the class token has no pixels).'''
    position = model.token_position
    tokens = torch.cat([patch_scores[:, :position], torch.zeros_like(patch_scores[:, :1]),
                        patch_scores[:, position:]], dim=1)
    return model.vim.patch_map(tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=' '.join(__doc__.split('\n\n')[0].split()))
    parser.add_argument('--out', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'output'),
                        help='directory the pictures are written to (default: examples/output)')
    parser.add_argument('--quick', action='store_true', help='3 training epochs instead of 10')
    parser.add_argument('--examples', type=int, default=4, help='test images shown, one row each (default 4)')
    args = parser.parse_args()

    task = vim_digits_task(quick=False)
    start = time.perf_counter()
    torch.manual_seed(0)
    model = train_model(task, quick=args.quick)
    print(f'trained a {sum(p.numel() for p in model.parameters()):,}-parameter Vision Mamba in '
          f'{time.perf_counter() - start:.0f} s, test accuracy {accuracy(model, task):.1%}')

    patches = task.test_inputs[:args.examples]
    with torch.no_grad():
        logits = model(patches)
    targets = logits.argmax(-1)
    torch.manual_seed(0)  # SmoothGrad's noise
    chosen = methods(quick=False, vision=True)
    maps = {name: to_pixels(model, chosen[name](model, patches, targets)) for name in COLUMNS}
    vim = model.vim  # the Vim itself takes (batch, 1, 16, 16) images
    pixels = model.images(patches)
    pixel_relevance, constants = MambaLRP(vim).attribute(pixels, target=targets, return_constant_relevance=True)
    maps['MambaLRP (pixels)'] = pixel_relevance[:, 0]
    explained = logits[torch.arange(len(targets)), targets]
    kinds = {}
    for name, relevance in constants.items():  # the constants by kind: biases, class token, position embedding
        kind = name.rsplit('.', 1)[-1]
        kinds[kind] = kinds.get(kind, 0) + relevance
    shares = {'pixels': pixel_relevance.sum((1, 2, 3)), **kinds}
    print('MambaLRP: shares of the explained logit, per image (pixels + constants = logit): ' + '; '.join(
        f'{kind} ' + ', '.join(f'{value:.2f}' for value in (share / explained).tolist())
        for kind, share in shares.items()))

    columns = ['input'] + list(maps)
    figure, axes = plt.subplots(len(patches), len(columns), figsize=(1.7 * len(columns), 1.8 * len(patches) + 0.6))
    for row in range(len(patches)):
        axes[row, 0].imshow(pixels[row, 0], cmap='gray')
        axes[row, 0].set_ylabel(f'label {task.test_labels[row].item()}\npredicted {targets[row].item()}')
        for column, name in enumerate(maps, start=1):
            axes[row, column].imshow(relevance_image(maps[name][row]))
        for column, name in enumerate(columns):
            axes[row, column].set_xticks([]), axes[row, column].set_yticks([])
            if row == 0:
                axes[row, column].set_title(TITLES.get(name, name), fontsize=9)
    figure.suptitle(f'Vision Mamba on digits. Legend: {LEGEND}', fontsize=8)
    figure.tight_layout()
    os.makedirs(args.out, exist_ok=True)
    grid_path = os.path.join(args.out, 'explain_image.png')
    figure.savefig(grid_path, dpi=120)
    plt.close(figure)

    # Captum's own image view of the first example, in the same bwr colours
    captum_figure, _ = visualization.visualize_image_attr(
        maps['MambaLRP (pixels)'][0, :, :, None].detach().numpy(), pixels[0].permute(1, 2, 0).numpy(),
        method='blended_heat_map', sign='all', cmap='bwr', show_colorbar=True, use_pyplot=False,
        title='MambaLRP (Captum visualize_image_attr)')
    captum_path = os.path.join(args.out, 'explain_image_captum.png')
    captum_figure.savefig(captum_path, dpi=100)
    print(f'wrote {grid_path} and {captum_path}')


if __name__ == '__main__':
    main()
