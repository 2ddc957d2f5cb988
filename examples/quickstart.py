'''Quickstart: train a small Mamba sentiment classifier on the CPU and explain it with MambaLRP.

The data is generated (examples/sentiment_task.py): a faithful explanation should put its relevance on the
positive and negative words that decide the label.

Run: ``python examples/quickstart.py [--out DIR]``; writes ``quickstart.html`` and ``quickstart.png`` to DIR.
'''
import argparse
import os

import torch

from sentiment_task import NEUTRAL, make_sentences, trained_classifier, words
from zennit_mamba import MambaComposite
from zennit_mamba.heatmap import html_heatmap, save_png, terminal_heatmap, terminal_legend

LABELS = ['negative', 'positive']


def explain(model: torch.nn.Module, ids: torch.Tensor):
    '''MambaLRP relevance per token for the predicted class, the predictions and the explained logits.'''
    embeddings = model.backbone.embeddings(ids).detach().requires_grad_()
    with MambaComposite().context(model) as modified:
        logits = modified(inputs_embeds=embeddings)
        predicted = logits.argmax(-1)
        rows = torch.arange(len(ids))
        output_relevance = torch.zeros_like(logits)
        output_relevance[rows, predicted] = logits[rows, predicted]
        relevance, = torch.autograd.grad(logits, embeddings, output_relevance)
    return relevance.sum(-1), predicted, logits[rows, predicted].detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=' '.join(__doc__.split('\n\n')[0].split()))
    parser.add_argument('--out', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'output'),
                        help='directory the heatmaps are written to (default: examples/output)')
    parser.add_argument('--weights', default=None,
                        help='the classifier\'s weights: loaded if the file exists, else trained and saved there '
                             '(default: sentiment_classifier.pt in --out)')
    args = parser.parse_args()

    model = trained_classifier(args.weights or os.path.join(args.out, 'sentiment_classifier.pt'))
    test_ids, test_labels = make_sentences(500, seed=2)
    token_relevance, predicted, explained = explain(model, test_ids)

    sentiment = torch.tensor([[word not in NEUTRAL for word in words(row)] for row in test_ids])
    share = (token_relevance.abs() * sentiment).sum() / token_relevance.abs().sum()
    error = ((token_relevance.sum(-1) - explained).abs() / explained.abs()).max()
    print(f'share of |relevance| on the {sentiment.float().mean():.0%} sentiment words: {share:.1%}; '
          f'largest conservation error |sum R - f| / |f|: {error:.1e}\n')

    print(terminal_legend(), '\n')
    rows, captions = [], []
    for index in range(6):
        relevance = token_relevance[index].tolist()
        caption = (f'label {LABELS[test_labels[index]]}, predicted {LABELS[predicted[index]]}, '
                   f'logit {explained[index]:.3f}, sum of relevance {sum(relevance):.3f}')
        print(caption)
        print(terminal_heatmap(words(test_ids[index]), relevance), '\n')
        rows.append((words(test_ids[index]), relevance))
        captions.append(caption)

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, 'quickstart.html'), 'w', encoding='utf-8') as file:
        file.write(html_heatmap(rows, captions, title='MambaLRP: token relevance'))
    save_png(os.path.join(args.out, 'quickstart.png'), rows, captions)
    print(f'wrote {args.out}/quickstart.html and quickstart.png')


if __name__ == '__main__':
    main()
