"""Plan-independent checkpoints, keyed by global layer index.

Role: save and restore training state so that a job resumes under the same plan *or a
different one* (after a re-plan on node loss, or on other hardware). Layout under the
checkpoint root (storage every rank can reach, e.g. a ReadWriteMany volume)::

    step-00000100/layer-00003.pt   parameters + buffers of layer 3 and the AdamW state of
                                   each of its parameters (by parameter name in the layer)
    step-00000100/meta.json        step, data position, model, plan digest that wrote it
    step-00000100/rng.pt           torch CPU RNG state (rank 0's)
    latest                         name of the newest complete step directory

Replica 0 of each stage writes its layers; after a barrier rank 0 writes ``meta.json`` and then
atomically replaces ``latest`` — a step directory without ``meta.json`` was interrupted and
is never loaded. Because everything is keyed by global layer index, a rank of a new plan
loads exactly the layer files of its new stage. The data position is the step (samples are a
pure function of seed, step and index; see ``data``).

Called by ``runtime``; ``spantrain local`` reads the layout (``latest_step``) before it starts
any worker, so torch is imported only inside the functions that need it (the launcher and
``spantrain plan``, which loads every command, stay torch-free). Must not import
torch.distributed, kopf, the Kubernetes client or
``spantrain_operator``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

LATEST = "latest"


class CheckpointError(ValueError):
    """A checkpoint that does not fit the job; the message says what differs."""


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def _atomic_save(obj: Any, path: Path) -> None:
    import torch

    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_write(text: str, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def layer_state(layer: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Parameters, buffers and per-parameter optimizer state of one layer (CPU tensors)."""
    optim: dict[str, dict[str, torch.Tensor]] = {}
    for name, param in layer.named_parameters():
        state = optimizer.state.get(param)
        if state:
            optim[name] = {k: v.detach().cpu().clone() for k, v in state.items()}
    params = {k: v.detach().cpu().clone() for k, v in layer.state_dict().items()}
    return {"params": params, "optim": optim}


def save_layers(
    root: str | Path, step: int, layers: dict[int, nn.Module], optimizer: torch.optim.Optimizer
) -> None:
    """Write the layer files of one stage (called by replica 0 of every stage)."""
    directory = step_dir(root, step)
    directory.mkdir(parents=True, exist_ok=True)
    for index, layer in layers.items():
        _atomic_save(layer_state(layer, optimizer), directory / f"layer-{index:05d}.pt")


def commit(root: str | Path, step: int, meta: dict[str, Any]) -> None:
    """Mark step ``step`` complete (rank 0, after every stage has written its layers)."""
    import torch

    directory = step_dir(root, step)
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_save(torch.get_rng_state(), directory / "rng.pt")
    _atomic_write(json.dumps({"step": step, "dataPosition": {"step": step}, **meta}, indent=2),
                  directory / "meta.json")
    _atomic_write(directory.name, Path(root) / LATEST)


def latest_step(root: str | Path | None) -> int | None:
    """The newest committed step under ``root``, or None."""
    if not root:
        return None
    marker = Path(root) / LATEST
    if not marker.exists():
        return None
    meta = Path(root) / marker.read_text().strip() / "meta.json"
    if not meta.exists():
        return None
    return int(json.loads(meta.read_text())["step"])


@dataclass(frozen=True)
class Restored:
    step: int
    meta: dict[str, Any]


def load_layers(
    root: str | Path,
    step: int,
    layers: dict[int, nn.Module],
    optimizer: torch.optim.Optimizer,
    *,
    model_name: str,
    num_layers: int,
) -> Restored:
    """Load parameters and optimizer state of ``layers`` (any subset) from step ``step``."""
    import torch

    directory = step_dir(root, step)
    meta = json.loads((directory / "meta.json").read_text())
    if meta.get("model") != model_name or meta.get("numLayers") != num_layers:
        raise CheckpointError(
            f"checkpoint {directory} holds model {meta.get('model')} with "
            f"{meta.get('numLayers')} layers, this job trains {model_name} with {num_layers}; "
            "point training.checkpoint.path at an empty directory to start afresh"
        )
    for index, layer in layers.items():
        path = directory / f"layer-{index:05d}.pt"
        if not path.exists():
            raise CheckpointError(f"checkpoint {directory} lacks layer {index} ({path.name})")
        state = torch.load(path, map_location="cpu", weights_only=True)
        layer.load_state_dict(state["params"])
        params = dict(layer.named_parameters())
        for name, saved in state["optim"].items():
            p = params[name]
            optimizer.state[p] = {
                k: (v.to(p.device) if k == "step" else v.to(device=p.device, dtype=p.dtype))
                for k, v in saved.items()
            }
    rng = directory / "rng.pt"
    if rng.exists():
        torch.set_rng_state(torch.load(rng, weights_only=True))
    return Restored(step=step, meta=meta)


def load_full_params(root: str | Path, step: int | None = None) -> dict[str, torch.Tensor]:
    """Every parameter of a checkpoint as ``"<layer>.<name>"`` (tests and export)."""
    import torch

    step = latest_step(root) if step is None else step
    assert step is not None, f"no checkpoint under {root}"
    out: dict[str, torch.Tensor] = {}
    for path in sorted(step_dir(root, step).glob("layer-*.pt")):
        index = int(path.stem.split("-")[1])
        for name, value in torch.load(path, weights_only=True)["params"].items():
            out[f"{index}.{name}"] = value
    return out
