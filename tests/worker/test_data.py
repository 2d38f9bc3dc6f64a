"""Datasets are pure functions of (seed, step, index): every rank sees the same samples."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from spantrain_worker.data import (  # noqa: E402
    DataError,
    ImageDataset,
    LMDataset,
    SyntheticDataset,
    load_corpus,
)

pytestmark = pytest.mark.torch


@pytest.mark.parametrize("make", [
    lambda: LMDataset(16, seed=1),
    lambda: ImageDataset(8, 10, seed=1),
    lambda: SyntheticDataset(16, 10, seed=1),
])
def test_rows_agree_however_the_batch_is_split(make) -> None:  # type: ignore[no-untyped-def]
    a, b = make(), make()
    x, y = a.batch(5, range(8))
    x1, y1 = b.batch(5, range(0, 3))
    x2, y2 = b.batch(5, range(3, 8))
    assert torch.equal(x, torch.cat([x1, x2]))
    assert torch.equal(y, torch.cat([y1, y2]))
    x_other, _ = a.batch(6, range(8))
    assert not torch.equal(x, x_other)


def test_lm_labels_are_the_next_bytes() -> None:
    data = LMDataset(32, seed=0)
    x, y = data.batch(0, [0])
    assert torch.equal(x[0, 1:], y[0, :-1])
    assert int(x.max()) < 256


def test_corpus_errors_name_the_path(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(DataError, match="does not exist"):
        load_corpus(str(tmp_path / "nope"))
    (tmp_path / "small.txt").write_text("x")
    with pytest.raises(DataError, match="only 1 bytes"):
        load_corpus(str(tmp_path))
