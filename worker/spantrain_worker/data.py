"""Deterministic datasets: sample ``i`` of step ``t`` is a pure function of ``(seed, t, i)``.

Role: give the first stage its inputs and the last stage its labels for exactly the rows each
rank holds, with no labels shipped through the pipeline and no shared state: every rank
computes the same sample from the same key. Also makes the data position of a checkpoint
trivial (it is the step). Datasets:

* ``LMDataset`` — byte-level language modelling over a text corpus that exists on every
  machine: the Python standard library's ``.py`` files (sorted paths, capped size), or a
  user-given file or directory. Vocabulary: the 256 byte values.
* ``ImageDataset`` — generated images for the CNN: a fixed random template per class plus
  per-sample noise and a random shift, so the classes are learnable and loss falls.
* ``SyntheticDataset`` — Gaussian vectors labelled by a fixed random linear teacher (MLP).

Nothing is downloaded. Used by ``models`` (which pairs a dataset with each family), the
runtime, the baseline loop and the tests. Must not import torch.distributed, kopf, the
Kubernetes client or ``spantrain_operator``.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

#: Default cap on the corpus (bytes): enough text for the demo, quick to read.
DEFAULT_CORPUS_BYTES = 4 * 2**20


class DataError(ValueError):
    """A data source that cannot be used; the message names the path and the knob."""


class Dataset(Protocol):
    """What the runtime needs from a dataset."""

    def batch(self, step: int, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        """(inputs, labels) of samples ``indices`` (global indices within the step)."""
        ...


def sample_key(seed: int, step: int, index: int) -> int:
    """A 63-bit key for sample ``index`` of step ``step`` (pure, platform-independent)."""
    digest = hashlib.blake2b(f"{seed}:{step}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _text_files(root: Path) -> Iterator[Path]:
    """Text files under ``root`` in a deterministic (sorted, depth-first) order, lazily."""
    if root.is_file():
        yield root
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
        for name in sorted(filenames):
            if name.endswith((".py", ".txt", ".md", ".rst")):
                yield Path(dirpath) / name


def load_corpus(path: str | None = None, max_bytes: int = DEFAULT_CORPUS_BYTES) -> bytes:
    """The corpus: a user file/directory, or (``None``/``"stdlib"``) the stdlib sources."""
    root = stdlib_root() if path in (None, "", "stdlib") else Path(str(path))
    if not root.exists():
        raise DataError(f"corpus {root} does not exist; set training.data.corpus to a file, "
                        "a directory of text files, or 'stdlib'")
    chunks: list[bytes] = []
    total = 0
    for file in _text_files(root):
        try:
            data = file.read_bytes()
        except OSError:
            continue
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    corpus = b"".join(chunks)[:max_bytes]
    if len(corpus) < 1024:
        raise DataError(f"corpus {root} holds only {len(corpus)} bytes; give at least 1 KiB")
    return corpus


class LMDataset:
    """Byte-level next-token prediction: input = bytes[o:o+S], label = bytes[o+1:o+S+1]."""

    def __init__(self, seq_len: int, *, seed: int, corpus: str | None = None,
                 max_bytes: int = DEFAULT_CORPUS_BYTES) -> None:
        self.seq_len = seq_len
        self.seed = seed
        raw = load_corpus(corpus, max_bytes)
        self.tokens = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
        self.digest = hashlib.blake2b(raw, digest_size=8).hexdigest()
        if len(raw) <= seq_len + 1:
            raise DataError(f"corpus of {len(raw)} bytes is shorter than seqLen {seq_len}")

    def batch(self, step: int, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        span = self.tokens.numel() - self.seq_len - 1
        offsets = torch.tensor([sample_key(self.seed, step, i) % span for i in indices])
        window = offsets[:, None] + torch.arange(self.seq_len + 1)[None, :]
        chunk = self.tokens[window]
        return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()


class ImageDataset:
    """Generated 3-channel images; the class decides the template, the key the noise."""

    def __init__(self, image_size: int, num_classes: int, *, seed: int) -> None:
        self.image_size = image_size
        self.num_classes = num_classes
        self.seed = seed
        gen = torch.Generator().manual_seed(seed ^ 0x5EED)
        self.templates = torch.randn(num_classes, 3, image_size, image_size, generator=gen)

    def batch(self, step: int, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        images, labels = [], []
        for i in indices:
            key = sample_key(self.seed, step, i)
            label = key % self.num_classes
            gen = torch.Generator().manual_seed(key)
            shift = int(torch.randint(0, 4, (2,), generator=gen).sum())
            noise = torch.randn(3, self.image_size, self.image_size, generator=gen)
            images.append(torch.roll(self.templates[label], shift, dims=2) + 1.5 * noise)
            labels.append(label)
        return torch.stack(images), torch.tensor(labels)


class SyntheticDataset:
    """Gaussian inputs labelled by ``argmax(teacher @ x)`` (a learnable task for the MLP)."""

    def __init__(self, in_features: int, num_classes: int, *, seed: int) -> None:
        self.in_features = in_features
        self.seed = seed
        gen = torch.Generator().manual_seed(seed ^ 0x7EAC)
        self.teacher = torch.randn(num_classes, in_features, generator=gen)

    def batch(self, step: int, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        xs = [torch.randn(self.in_features,
                          generator=torch.Generator().manual_seed(sample_key(self.seed, step, i)))
              for i in indices]
        x = torch.stack(xs)
        return x, (x @ self.teacher.T).argmax(dim=1)
