"""`spantrain local` and existing checkpoints: resume, discard on request, never silently."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")  # commit() saves the RNG state with torch


from spantrain_worker.checkpoint import CheckpointError, commit
from spantrain_worker.commands import prepare_checkpoints

pytestmark = pytest.mark.torch


def _checkpoint(root: Path, step: int) -> None:
    (root / f"step-{step:08d}").mkdir(parents=True)
    (root / f"step-{step:08d}" / "layer-00000.pt").write_bytes(b"weights")
    commit(root, step, {"model": "m", "numLayers": 1})


def test_empty_or_missing_directory_starts_fresh(tmp_path: Path) -> None:
    assert prepare_checkpoints(tmp_path / "none", resume=False, fresh=False).endswith("none")
    assert "no checkpoint" in prepare_checkpoints(tmp_path, resume=True, fresh=False)
    assert prepare_checkpoints(tmp_path, resume=False, fresh=True) == f"checkpoints: {tmp_path}"


def test_an_existing_checkpoint_is_refused_without_a_flag(tmp_path: Path) -> None:
    _checkpoint(tmp_path, 40)
    with pytest.raises(CheckpointError, match="at step 40") as err:
        prepare_checkpoints(tmp_path, resume=False, fresh=False)
    assert "--resume" in str(err.value) and "--fresh" in str(err.value)
    assert (tmp_path / "latest").exists() and (tmp_path / "step-00000040").is_dir()


def test_resume_keeps_the_checkpoint(tmp_path: Path) -> None:
    _checkpoint(tmp_path, 40)
    assert "resuming from step 40" in prepare_checkpoints(tmp_path, resume=True, fresh=False)
    assert (tmp_path / "step-00000040" / "layer-00000.pt").exists()


def test_fresh_deletes_only_the_checkpoint_files(tmp_path: Path) -> None:
    _checkpoint(tmp_path, 40)
    (tmp_path / "step-00000050").mkdir()  # an interrupted save
    (tmp_path / "notes.txt").write_text("the user's own file")
    (tmp_path / "data").mkdir()
    line = prepare_checkpoints(tmp_path, resume=False, fresh=True)
    assert "deleted the old checkpoint" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "notes.txt"]


def test_incomplete_checkpoint_files_are_refused_too(tmp_path: Path) -> None:
    (tmp_path / "step-00000010").mkdir()
    with pytest.raises(CheckpointError, match="incomplete checkpoint files"):
        prepare_checkpoints(tmp_path, resume=False, fresh=False)
