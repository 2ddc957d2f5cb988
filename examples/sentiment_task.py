'''A generated sentiment task with known decisive words, and a small Mamba classifier for it (used by the examples).

Sentences of neutral words with a few positive and negative words are labelled positive when positive words
outnumber negative ones, so the words that decide the label are known.
'''
import os
import random
import time
from typing import Optional

import torch
from transformers import MambaConfig, MambaModel
from transformers.utils import logging as transformers_logging

# without mamba-ssm, transformers announces its reference kernels on every call
transformers_logging.set_verbosity_error()

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


def trained_classifier(weights: Optional[str] = None, epochs: int = 20, seed: int = 0) -> MambaClassifier:
    '''A 2-layer classifier trained on 2,000 generated sentences; prints its test accuracy.

    With ``weights`` (a file path) the trained weights are saved there, and loaded from there on later calls
    (the examples share one classifier: each trains it only when the file is missing).
    '''
    torch.manual_seed(seed)
    # conv biases off: then relevance is conserved exactly (the dt bias sits behind MambaLRP's detach)
    config = MambaConfig(
        vocab_size=len(VOCABULARY), hidden_size=32, state_size=8, num_hidden_layers=2, use_conv_bias=False,
    )
    model = MambaClassifier(config)
    start = time.perf_counter()
    if weights is not None and os.path.exists(weights):
        model.load_state_dict(torch.load(weights, weights_only=True))
        model.eval()
        done = f'loaded {weights}'
    else:
        train(model, *make_sentences(2000, seed=1), epochs=epochs)
        if weights is not None:
            os.makedirs(os.path.dirname(os.path.abspath(weights)), exist_ok=True)
            torch.save(model.state_dict(), weights)
        done = f'trained in {time.perf_counter() - start:.0f} s'
    test_ids, test_labels = make_sentences(500, seed=2)
    with torch.no_grad():
        accuracy = (model(test_ids).argmax(-1) == test_labels).float().mean().item()
    print(f'{done}, test accuracy {accuracy:.1%}')
    return model


def words(ids: torch.Tensor):
    '''The words of one sentence of token ids.'''
    return [VOCABULARY[token] for token in ids.tolist()]
