'''MambaLRP next to Captum's own attribution methods on one model and one batch.

Trains the quickstart's classifier (examples/sentiment_task.py), explains 16 test sentences with each method,
prints time, conservation and the share of relevance on the decisive words, and saves one heatmap figure.

Run: ``python examples/compare_methods.py [--out DIR]``.
'''
import argparse
import os
import statistics
import time
import warnings

import torch
from captum.attr import LRP, InputXGradient, IntegratedGradients, NoiseTunnel, Saliency

from captum_mamba import MambaLRP
from sentiment_task import NEUTRAL, make_sentences, trained_classifier, words
from zennit_mamba.heatmap import save_png

CLASSES = ('negative', 'positive')  # sentiment_task's labels


class EmbeddingClassifier(torch.nn.Module):
    '''The classifier as a function of its input embeddings, as Captum's input attribution methods need.'''

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.model(inputs_embeds=embeddings)


def methods(forward: torch.nn.Module):
    '''Name, attribution call and whether the attributions are relevances meant to sum to f(x).'''
    lrp, ixg = MambaLRP(forward), InputXGradient(forward)
    return [
        ('MambaLRP', lambda x, t: lrp.attribute(x, target=t), True),
        ('InputXGradient', lambda x, t: ixg.attribute(x, target=t), True),
        ('Saliency', lambda x, t: Saliency(forward).attribute(x, target=t, abs=False), False),
        ('IntegratedGradients (50 steps)',
         lambda x, t: IntegratedGradients(forward).attribute(x, target=t, n_steps=50), True),
        ('SmoothGrad (NoiseTunnel, 10 samples)',
         lambda x, t: NoiseTunnel(Saliency(forward)).attribute(
             x, target=t, nt_type='smoothgrad', nt_samples=10, stdevs=0.05, abs=False), False),
        ("Captum's LRP", lambda x, t: LRP(forward).attribute(x, target=t), True),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=' '.join(__doc__.split('\n\n')[0].split()))
    parser.add_argument('--out', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'output'),
                        help='directory the comparison is written to (default: examples/output)')
    parser.add_argument('--weights', default=None,
                        help='the classifier\'s weights: loaded if the file exists, else trained and saved there '
                             '(default: sentiment_classifier.pt in --out)')
    parser.add_argument('--repeats', type=int, default=3, help='timed runs per method; the median is shown (default 3)')
    args = parser.parse_args()

    # Captum's gradient methods warn that they set requires_grad on the inputs themselves
    warnings.filterwarnings('ignore', message='Input Tensor 0 did not already require gradients')
    model = trained_classifier(args.weights or os.path.join(args.out, 'sentiment_classifier.pt')).eval()
    forward = EmbeddingClassifier(model)
    ids, _ = make_sentences(16, seed=3)
    embeddings = model.backbone.embeddings(ids).detach()
    with torch.no_grad():
        logits = forward(embeddings)
    targets = logits.argmax(-1)
    explained = logits[torch.arange(len(ids)), targets]
    sentiment = torch.tensor([[word not in NEUTRAL for word in words(row)] for row in ids])

    print(f'\n{"method":38s} {"s / batch":>10s} {"|sum R - f| / |f|":>18s} {"share on sentiment words":>25s}')
    rows, captions = [], []
    for name, attribute, is_relevance in methods(forward):
        try:
            seconds = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                attributions = attribute(embeddings, targets)
                seconds.append(time.perf_counter() - start)
        except Exception as error:  # Captum's LRP has no rules for Mamba's modules
            print(f'{name:38s} fails: {type(error).__name__}: {str(error).splitlines()[0][:120]}')
            continue
        token_relevance = attributions.sum(-1).detach()
        share = (token_relevance.abs() * sentiment).sum() / token_relevance.abs().sum()
        delta = ((token_relevance.sum(-1) - explained).abs() / explained.abs()).mean()
        conservation = f'{delta:18.1e}' if is_relevance else f'{"(a gradient)":>18s}'
        print(f'{name:38s} {statistics.median(seconds):10.3f} {conservation} {share:25.1%}')
        rows.append((words(ids[0]), token_relevance[0].tolist()))
        captions.append(f'{name}: class {CLASSES[int(targets[0])]} (logit {float(explained[0]):.2f})')

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, 'compare_methods.png')
    save_png(path, rows, captions)
    print(f'\nwrote {path} (first sentence, one row per method, each explaining the predicted class '
          f'{CLASSES[int(targets[0])]!r}; red speaks for it, blue against)')


if __name__ == '__main__':
    main()
