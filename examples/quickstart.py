'''Quickstart: train a small Mamba sentiment classifier on the CPU and explain it with MambaLRP.

The data is generated: sentences of neutral words with a few positive and negative words, labelled positive when
positive words outnumber negative ones. So the words that decide the label are known, and a faithful explanation
should put its relevance on them.

Run: ``python examples/quickstart.py [--out DIR]``; writes ``quickstart.html`` and ``quickstart.png`` to DIR.
'''
import argparse
import os
import random
import time

import torch
from transformers import MambaConfig, MambaModel

from zennit_mamba import MambaComposite
from zennit_mamba.heatmap import html_heatmap, save_png, terminal_heatmap

POSITIVE = 'good great excellent wonderful superb brilliant lovely enjoyable delightful moving'.split()
NEGATIVE = 'bad awful terrible boring dull poor horrible weak tedious messy'.split()
NEUTRAL = (
    'the movie film plot actor scene was and a story with of it very quite music ending cast director script '
    'this that had is to in for on as by an at its their some'
).split()
VOCABULARY = NEUTRAL + POSITIVE + NEGATIVE
LENGTH = 16


def make_sentences(count: int, seed: int):
    '''Token ids and labels: 1 where positive words outnumber negative ones.'''
    rng = random.Random(seed)
    ids, labels = [], []
    while len(ids) < count:
        positive, negative = rng.randint(0, 3), rng.randint(0, 3)
        if positive == negative:
            continue
        words = rng.sample(POSITIVE, positive) + rng.sample(NEGATIVE, negative)
        words += rng.choices(NEUTRAL, k=LENGTH - len(words))
        rng.shuffle(words)
        ids.append([VOCABULARY.index(word) for word in words])
        labels.append(int(positive > negative))
    return torch.tensor(ids), torch.tensor(labels)


class MambaClassifier(torch.nn.Module):
    '''transformers' MambaModel with a linear head on the last position.'''

    def __init__(self, config: MambaConfig, classes: int = 2):
        super().__init__()
        self.backbone = MambaModel(config)
        self.head = torch.nn.Linear(config.hidden_size, classes, bias=False)

    def forward(self, input_ids=None, inputs_embeds=None):
        hidden = self.backbone(input_ids=input_ids, inputs_embeds=inputs_embeds, use_cache=False).last_hidden_state
        return self.head(hidden[:, -1])


def train(model: MambaClassifier, ids: torch.Tensor, labels: torch.Tensor, epochs: int = 20) -> None:
    optimiser = torch.optim.Adam(model.parameters(), lr=5e-3)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(ids))
        for start in range(0, len(ids), 64):
            batch = order[start:start + 64]
            loss = torch.nn.functional.cross_entropy(model(ids[batch]), labels[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    model.eval()


def explain(model: MambaClassifier, ids: torch.Tensor):
    '''MambaLRP relevance per token for the predicted class, and the explained logits.'''
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', default=os.path.join(os.path.dirname(__file__), 'output'))
    args = parser.parse_args()
    torch.manual_seed(0)
    # conv biases off: then relevance is conserved exactly (the dt bias sits behind MambaLRP's detach)
    config = MambaConfig(
        vocab_size=len(VOCABULARY), hidden_size=32, state_size=8, num_hidden_layers=2, use_conv_bias=False,
    )
    model = MambaClassifier(config)
    train_ids, train_labels = make_sentences(2000, seed=1)
    test_ids, test_labels = make_sentences(500, seed=2)

    start = time.perf_counter()
    train(model, train_ids, train_labels)
    with torch.no_grad():
        accuracy = (model(test_ids).argmax(-1) == test_labels).float().mean().item()
    print(f'trained in {time.perf_counter() - start:.0f} s, test accuracy {accuracy:.1%}')

    token_relevance, predicted, explained = explain(model, test_ids)
    sentiment = torch.tensor([[VOCABULARY[token] not in NEUTRAL for token in row] for row in test_ids.tolist()])
    share = (token_relevance.abs() * sentiment).sum() / token_relevance.abs().sum()
    error = ((token_relevance.sum(-1) - explained).abs() / explained.abs()).max()
    print(f'share of |relevance| on the {sentiment.float().mean():.0%} sentiment words: {share:.1%}; '
          f'largest conservation error |sum R - f| / |f|: {error:.1e}\n')

    rows, captions = [], []
    for index in range(6):
        tokens = [VOCABULARY[token] for token in test_ids[index].tolist()]
        relevance = token_relevance[index].tolist()
        caption = (f'label {["negative", "positive"][test_labels[index]]}, predicted '
                   f'{["negative", "positive"][predicted[index]]}, logit {explained[index]:.3f}, '
                   f'sum of relevance {sum(relevance):.3f}')
        print(caption)
        print(terminal_heatmap(tokens, relevance), '\n')
        rows.append((tokens, relevance))
        captions.append(caption)

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, 'quickstart.html'), 'w', encoding='utf-8') as file:
        file.write(html_heatmap(rows, captions, title='MambaLRP: token relevance (red positive, blue negative)'))
    save_png(os.path.join(args.out, 'quickstart.png'), rows, captions)
    print(f'wrote {args.out}/quickstart.html and quickstart.png')


if __name__ == '__main__':
    main()
