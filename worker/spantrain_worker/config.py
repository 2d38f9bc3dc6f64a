"""Worker configuration: training knobs and the environment contract with the operator.

Role: the boundary model of what a worker is told besides its plan. ``TrainingConfig`` mirrors
the ``spec.training`` block of a SpanTrainJob (camelCase, unknown keys ignored so the API can
grow); ``WorkerEnv`` reads the variables the operator injects into every pod (and
``spantrain local`` into every process):

  MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK   rendezvous (rank 0 serves the store)
  SPANTRAIN_PLAN              path of plan.json (required)
  SPANTRAIN_TRAINING          path of the training block (JSON/YAML), or of a whole
                              SpanTrainJob manifest; optional (defaults below)
  SPANTRAIN_JOB               job name, for logs and metrics
  SPANTRAIN_NAMESPACE         the job's namespace, for metrics (label spantrain_namespace)
  SPANTRAIN_CHECKPOINT_DIR    overrides training.checkpoint.path (shared storage for all ranks)
  SPANTRAIN_METRICS_PORT      Prometheus port (default 9400; 0 turns the endpoint off)
  SPANTRAIN_OUTPUT_DIR        where to write losses.jsonl / timeline.json (local runs, tests)
  SPANTRAIN_EMULATION         path of an emulation file (``spantrain local`` only)
  SPANTRAIN_RENDEZVOUS_TIMEOUT  seconds to wait for every rank (default 300)
  SPANTRAIN_DEVICE            auto | cpu | cuda
  SPANTRAIN_PACE_CORES        the testbed device's CPU share: each compute action lasts at
                              least its CPU time / this (set by ``Testbed.device_env``)

Pure (pydantic, PyYAML via the planner's loader). Must not import torch.distributed, kopf, the
Kubernetes client or ``spantrain_operator``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from spantrain_planner.cluster import load_document
from spantrain_planner.plan import Plan


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


def load_training(path: str | Path | None) -> TrainingConfig:
    """A training block from a file holding the block, a job's spec, or a whole SpanTrainJob.

    The operator mounts the spec (``job.json``); ``spantrain local`` passes the manifest.
    """
    if path is None:
        return TrainingConfig()
    doc: dict[str, Any] = load_document(path)
    if "spec" in doc:
        doc = doc["spec"] or {}
    if isinstance(doc.get("training"), dict):
        doc = doc["training"]
    return TrainingConfig.model_validate(doc)


@dataclass(frozen=True)
class WorkerEnv:
    """The SPANTRAIN_* part of a worker's environment (rendezvous lives in ``comm``)."""

    plan_path: str
    training_path: str | None
    job: str
    checkpoint_dir: str | None
    metrics_port: int
    output_dir: str | None
    emulation_path: str | None
    pace_cores: float | None = None
    namespace: str = ""

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> WorkerEnv:
        env = dict(os.environ if env is None else env)
        if "SPANTRAIN_PLAN" not in env:
            raise ValueError("SPANTRAIN_PLAN is not set: it must name the plan.json the "
                             "operator mounts (spantrain local sets it)")
        return cls(
            plan_path=env["SPANTRAIN_PLAN"],
            training_path=env.get("SPANTRAIN_TRAINING") or None,
            job=env.get("SPANTRAIN_JOB", "spantrain"),
            checkpoint_dir=env.get("SPANTRAIN_CHECKPOINT_DIR") or None,
            metrics_port=int(env.get("SPANTRAIN_METRICS_PORT", "9400")),
            output_dir=env.get("SPANTRAIN_OUTPUT_DIR") or None,
            emulation_path=env.get("SPANTRAIN_EMULATION") or None,
            pace_cores=_positive(env, "SPANTRAIN_PACE_CORES"),
            namespace=env.get("SPANTRAIN_NAMESPACE", ""),
        )


def _positive(env: dict[str, str], name: str) -> float | None:
    raw = env.get(name)
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise ValueError(f"{name}={raw!r}: must be a positive number of cores (or unset)")
    return value


def load_plan(path: str | Path) -> Plan:
    return Plan.model_validate_json(Path(path).read_text())
