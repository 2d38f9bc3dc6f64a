"""Worker configuration: training knobs and the environment contract with the operator.

Role: the boundary model of what a worker is told besides its plan. ``TrainingConfig`` mirrors
the ``spec.training`` block of a SpanTrainJob (camelCase, unknown keys ignored so the API can
grow); the environment (``WorkerEnv``) is defined in ``spantrain_planner.core.contract``, shared
with the operator that renders it.

Pure (pydantic, PyYAML via the planner's loader). Must not import torch.distributed, kopf, the
Kubernetes client or ``spantrain_operator``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from spantrain_planner import api
from spantrain_planner.core.contract import WorkerEnv
from spantrain_planner.core.options import AdaptMode
from spantrain_planner.inputs.cluster import load_document
from spantrain_planner.inputs.plan import Plan

__all__ = ["TrainingConfig", "WorkerEnv", "load_plan", "load_training"]


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True
    )


class CheckpointConfig(_Model):
    path: str | None = Field(None, description="Directory shared by every rank.")
    interval_steps: int = Field(0, ge=0, description="Save every N steps (0: only at the end).")


class DataConfig(_Model):
    corpus: str = Field("stdlib", description="'stdlib' or a text file/directory path.")


class TrainingConfig(_Model):
    """Training knobs (the ``spec.training`` block of a SpanTrainJob)."""

    steps: int = Field(100, ge=1)
    learning_rate: float = Field(3e-3, gt=0)
    min_learning_rate_ratio: float = Field(0.1, ge=0, le=1, description="Cosine floor / peak.")
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(10, ge=0)
    grad_clip_norm: float | None = Field(1.0, description="Global-norm clip; null/0 disables.")
    adam_betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = 1e-8
    seed: int = 0
    precision: Literal["fp32", "bf16", "fp64"] = Field(
        "fp32", description="fp32; bf16 (autocast, fp32 master weights and boundaries); fp64 "
        "(tests: exact gradient comparisons).")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    log_interval_steps: int = Field(10, ge=1)
    adapt: AdaptMode = Field(
        "off", description="The dynamic adapter (a job's spec.planner.adapt; off outside a job).")


def load_training(path: str | Path | None) -> TrainingConfig:
    """The training knobs in a file holding a whole SpanTrainJob, a job's spec (the operator
    mounts ``job.json``), or a bare training block (tests, benchmarks).

    A job's training block is read by the API's own model (``api.TrainingSpec``: the same
    checks and defaults as the API server and ``spantrain local``); the worker-only knobs
    (``TrainingConfig``'s others) keep their defaults there.
    """
    if path is None:
        return TrainingConfig()
    doc: dict[str, Any] = load_document(path)
    spec = doc.get("spec") if "spec" in doc else (doc if "model" in doc else None)
    if isinstance(spec, dict):
        block = api.TrainingSpec.model_validate(spec.get("training") or {})
        planner = api.PlannerSpec.model_validate(spec.get("planner") or {})
        return TrainingConfig.model_validate(
            {**block.model_dump(mode="json", by_alias=True), "adapt": planner.adapt})
    if isinstance(doc.get("training"), dict):
        doc = doc["training"]
    return TrainingConfig.model_validate(doc)


def load_plan(path: str | Path) -> Plan:
    return Plan.model_validate_json(Path(path).read_text())
