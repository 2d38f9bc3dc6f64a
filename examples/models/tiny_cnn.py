"""A user model for SpanTrain: a small CNN on generated images, given as an entry point.

SpanTrain calls ``build(**config)`` (the profile's ``config``, keys in snake_case) in every
worker process, under the same torch seed, and expects ``(layers, loss_fn, dataset)``:

* ``layers`` -- ``nn.Module`` s run in order, the output of one the input of the next; the
  planner may cut the model between any two of them, so each layer's output is what crosses
  a stage boundary (keep the batch dimension first);
* ``loss_fn(logits, labels)`` -- the mean loss over the rows it is given;
* ``dataset`` -- an object with ``batch(step, indices) -> (inputs, labels)`` that is a pure
  function of its arguments: the first stage takes the inputs and the last stage the labels
  of the same samples without shipping labels through the pipeline.

Measure it, plan it, train it (from the repository root, so the module imports)::

    spantrain profile examples.models.tiny_cnn:build --output examples/models/tiny_cnn.profile.yaml
    spantrain plan examples/clusters/local-cpu.yaml --model examples/models/tiny_cnn.profile.yaml

and in a SpanTrainJob: ``model: {entrypoint: examples.models.tiny_cnn:build, profile: <the
YAML above>}``. This file imports only torch: a user model needs nothing from SpanTrain.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ConvBlock(nn.Module):
    """3x3 conv, BatchNorm, ReLU (stride 2 halves the image)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


class Head(nn.Module):
    """Global average pool, then a linear classifier."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        logits: Tensor = self.fc(x.mean(dim=(2, 3)))
        return logits


def _key(seed: int, step: int, index: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{step}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


class ShapesDataset:
    """Noisy, shifted copies of one fixed random template per class (learnable, generated)."""

    def __init__(self, image_size: int, num_classes: int, seed: int) -> None:
        self.image_size = image_size
        self.num_classes = num_classes
        self.seed = seed
        gen = torch.Generator().manual_seed(seed)
        self.templates = torch.randn(num_classes, 3, image_size, image_size, generator=gen)

    def batch(self, step: int, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        images, labels = [], []
        for i in indices:
            key = _key(self.seed, step, i)
            gen = torch.Generator().manual_seed(key)
            label = key % self.num_classes
            shift = int(torch.randint(-2, 3, (1,), generator=gen))
            noise = torch.randn(3, self.image_size, self.image_size, generator=gen)
            images.append(torch.roll(self.templates[label], shift, dims=1) + noise)
            labels.append(label)
        return torch.stack(images), torch.tensor(labels)


def build(
    width: int = 16, image_size: int = 16, num_classes: int = 10, data_seed: int = 1234
) -> tuple[list[nn.Module], nn.Module, ShapesDataset]:
    """Five layers: three conv blocks (two of them halving the image), a wider one, a head."""
    layers: list[nn.Module] = [
        ConvBlock(3, width),
        ConvBlock(width, 2 * width, stride=2),
        ConvBlock(2 * width, 2 * width),
        ConvBlock(2 * width, 4 * width, stride=2),
        Head(4 * width, num_classes),
    ]
    return layers, nn.CrossEntropyLoss(), ShapesDataset(image_size, num_classes, data_seed)
