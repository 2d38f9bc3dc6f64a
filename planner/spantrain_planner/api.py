"""The ``SpanTrainJob`` API (group ``spantrain.io``, version ``v1alpha1``, short name ``stj``).

Role: the single source of truth for the custom resource. The CRD under ``crds/`` is generated
from these models (``spantrain_planner.crd``), the operator parses every object it sees with
them, and ``spantrain local`` reads a job manifest with them, so a field means the same thing
everywhere. Field descriptions become ``kubectl explain`` text; ``x-kubernetes-validations``
(CEL) rules attached here are enforced by the API server and mirrored by pydantic validators,
so a bad manifest fails the same way with or without a cluster.

Also ``planner_inputs(spec)``: the pure translation of a spec into what the planner needs
(``ModelProfile`` and ``PlannerOptions``).

Pure: pydantic and planner modules only; must not import torch, kopf or a Kubernetes client.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

from .cluster import load_document
from .errors import InputError
from .options import PlannerOptions
from .profiles import ModelProfile, build_profile, preset, preset_names

GROUP = "spantrain.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "SpanTrainJob"
LIST_KIND = "SpanTrainJobList"
PLURAL = "spantrainjobs"
SINGULAR = "spantrainjob"
SHORT_NAMES = ("stj",)
CATEGORIES = ("spantrain", "ml")

#: Job names become Service names and pod-name prefixes (``<job>-a<attempt>-r<rank>``, a DNS
#: label of at most 63 characters), so they are shorter RFC 1035 labels.
MAX_JOB_NAME = 40
JOB_NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"

#: Environment names the operator sets on every worker; user ``env`` may not override them.
RESERVED_ENV = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "PET_MASTER_ADDR",
    "PET_MASTER_PORT",
    "PET_NNODES",
    "PET_NODE_RANK",
    "PET_NPROC_PER_NODE",
    "PYTHONUNBUFFERED",
)

_ENTRYPOINT = r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$"
_LABEL_KEY = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"  # noqa: E501
CONDITION_TYPE_PATTERN = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$"  # noqa: E501
CONDITION_REASON_PATTERN = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"


def _cel(*rules: tuple[str, str]) -> dict[str, Any]:
    """``x-kubernetes-validations`` entries: (rule, message) pairs."""
    return {"x-kubernetes-validations": [{"rule": r, "message": m} for r, m in rules]}


_FREEFORM: dict[str, Any] = {"x-kubernetes-preserve-unknown-fields": True}


def _default_of(model: type[BaseModel]) -> dict[str, Any]:
    """A CRD ``default`` for an optional sub-object: the model's fully defaulted value (the
    API server runs CEL rules on a default as written, so ``{}`` would not do)."""
    return {"default": model().model_dump(mode="json", by_alias=True, exclude_none=True)}


class _Spec(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class _Status(BaseModel):
    # Status is written by the operator and read back; tolerate fields a newer operator wrote.
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


# ---------------------------------------------------------------------------------------------
# spec.model


class ModelSpec(_Spec):
    """Which network to train: exactly one of a built-in preset, a built-in family with its
    parameters, or a user entry point (with its measured profile)."""

    model_config = ConfigDict(
        json_schema_extra=_cel(
            (
                "[has(self.preset), has(self.family), has(self.entrypoint)]"
                ".filter(x, x).size() == 1",
                "set exactly one of model.preset, model.family or model.entrypoint",
            ),
            ("!has(self.config) || has(self.family)", "model.config needs model.family"),
            ("!has(self.profile) || has(self.entrypoint)", "model.profile needs model.entrypoint"),
        )
    )

    preset: str | None = Field(
        None,
        max_length=63,
        pattern=r"^[a-z0-9][-a-z0-9.]*$",
        description="A built-in model by name and size (e.g. gpt-mini, gpt2-small, resnet50); "
        "`spantrain plan --help` lists them.",
    )
    family: Literal["gpt", "resnet", "mlp"] | None = Field(
        None, description="A built-in model family, sized by `config`."
    )
    config: dict[str, Any] | None = Field(
        None,
        description="Parameters of `family` (camelCase), e.g. for gpt: numLayers, dModel, "
        "numHeads, seqLen, vocabSize; for resnet: block, stageBlocks, width, imageSize, "
        "numClasses; for mlp: inFeatures, hidden, numLayers, numClasses.",
        json_schema_extra=_FREEFORM,
    )
    entrypoint: str | None = Field(
        None,
        max_length=253,
        pattern=_ENTRYPOINT,
        description="A user model: `module:function` returning layers, a loss and a dataset.",
    )
    profile: dict[str, Any] | None = Field(
        None,
        description="The measured layer profile of the entry point's model (as written by "
        "`spantrain profile`); the planner needs it to cut the model.",
        json_schema_extra=_FREEFORM,
    )
    name: str | None = Field(
        None, max_length=63, description="Display name; defaults to the preset or family."
    )

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        given = [k for k in ("preset", "family", "entrypoint") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "set exactly one of model.preset, model.family or model.entrypoint"
                + (f" (got {', '.join(given)})" if given else "")
            )
        if self.config is not None and self.family is None:
            raise ValueError("model.config needs model.family")
        if self.profile is not None and self.entrypoint is None:
            raise ValueError("model.profile needs model.entrypoint")
        return self


# ---------------------------------------------------------------------------------------------
# spec.training


class CheckpointSpec(_Spec):
    """Where and how often workers save the plan-independent checkpoint (by global layer
    index), from which a restarted or re-planned job resumes."""

    path: str | None = Field(
        None,
        max_length=4096,
        description="Directory inside the worker containers; unset disables checkpoints "
        "(a restart then begins at step 0).",
    )
    interval_steps: int = Field(100, ge=1, description="Save every this many optimizer steps.")
    claim_name: str | None = Field(
        None,
        max_length=253,
        description="PersistentVolumeClaim mounted at `path` in every worker (it must be "
        "reachable from every planned node, e.g. ReadWriteMany).",
    )


class DataSpec(_Spec):
    """Training data."""

    corpus: str = Field(
        "stdlib",
        min_length=1,
        max_length=4096,
        description="Text corpus of the byte-level language models: `stdlib` (the Python "
        "standard library's source, present in every image) or a path inside the workers. "
        "Image and vector models use a deterministic generated dataset.",
    )


class TrainingSpec(_Spec):
    """How to train: batch, steps, optimizer, precision, checkpoints, data."""

    model_config = ConfigDict(
        json_schema_extra=_cel(
            ("self.warmupSteps <= self.steps", "training.warmupSteps must be <= training.steps")
        )
    )

    global_batch: int = Field(
        32, ge=1, le=1_048_576, description="Samples per optimizer step, over all devices."
    )
    steps: int = Field(1000, ge=1, description="Optimizer steps to train.")
    optimizer: Literal["adamw"] = Field("adamw", description="Optimizer.")
    learning_rate: float = Field(3e-4, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW decoupled weight decay.")
    warmup_steps: int = Field(0, ge=0, description="Linear learning-rate warm-up steps.")
    grad_clip_norm: float = Field(
        1.0, ge=0, description="Clip the global gradient norm to this; 0 disables clipping."
    )
    seed: int = Field(0, ge=0, description="Seed for initialisation and data sampling.")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="Compute precision (bf16 halves activation and weight bytes)."
    )
    checkpoint: CheckpointSpec = Field(
        default_factory=CheckpointSpec, json_schema_extra=_default_of(CheckpointSpec)
    )
    data: DataSpec = Field(default_factory=DataSpec, json_schema_extra=_default_of(DataSpec))

    @model_validator(mode="after")
    def _warmup(self) -> TrainingSpec:
        if self.warmup_steps > self.steps:
            raise ValueError(
                f"training.warmupSteps ({self.warmup_steps}) must be <= training.steps "
                f"({self.steps})"
            )
        return self


# ---------------------------------------------------------------------------------------------
# spec.planner: PlannerOptions minus globalBatch (which is training.globalBatch)


def _option(name: str) -> Any:
    """A copy of a ``PlannerOptions`` field (same type bounds, default and description)."""
    return copy.copy(PlannerOptions.model_fields[name])


class PlannerSpec(_Spec):
    """Planner knobs (the same as `spantrain plan`'s); the global batch is training.globalBatch."""

    schedule: Literal["auto", "gpipe", "1f1b", "zb"] = _option("schedule")
    num_microbatches: int | None = _option("num_microbatches")
    network_cut_ratio: float = _option("network_cut_ratio")
    compute_tolerance: float = _option("compute_tolerance")
    allow_exclusion: bool = _option("allow_exclusion")
    max_stages: int | None = _option("max_stages")


# ---------------------------------------------------------------------------------------------
# spec.placement


class NodeSelectorRequirement(_Spec):
    """A node label requirement, as in a Pod's node affinity."""

    model_config = ConfigDict(
        json_schema_extra=_cel(
            (
                "self.operator in ['Exists', 'DoesNotExist'] ? "
                "!has(self.values) || size(self.values) == 0 : "
                "(self.operator in ['In', 'NotIn'] ? has(self.values) && size(self.values) > 0 : "
                "has(self.values) && size(self.values) == 1)",
                "values must be empty for Exists/DoesNotExist, non-empty for In/NotIn and "
                "one integer for Gt/Lt",
            )
        )
    )

    key: str = Field(max_length=317, pattern=_LABEL_KEY, description="Node label key.")
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"] = Field(
        description="How the label's value is compared with `values`."
    )
    values: list[Annotated[str, Field(max_length=63)]] = Field(
        default_factory=list,
        max_length=64,
        description="Values for In/NotIn (one or more), Gt/Lt (one integer).",
    )

    @model_validator(mode="after")
    def _values(self) -> NodeSelectorRequirement:
        n = len(self.values)
        ok = {"Exists": n == 0, "DoesNotExist": n == 0, "In": n > 0, "NotIn": n > 0}.get(
            self.operator, n == 1
        )
        if not ok:
            raise ValueError(
                f"placement.matchExpressions[{self.key}]: operator {self.operator} "
                f"does not take {n} value(s)"
            )
        return self


class Toleration(_Spec):
    """A toleration added to every worker pod (as in a Pod spec)."""

    key: str | None = Field(None, max_length=317, description="Taint key; empty matches all.")
    operator: Literal["Exists", "Equal"] = Field("Equal", description="Exists or Equal.")
    value: str | None = Field(None, max_length=63, description="Taint value for Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to tolerate; empty matches all."
    )
    toleration_seconds: int | None = Field(
        None, description="How long a NoExecute taint is tolerated before eviction."
    )


class PlacementSpec(_Spec):
    """Which nodes may host workers. The operator reads every Ready, schedulable node that
    matches, and the planner chooses among their devices."""

    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels that must all match."
    )
    match_expressions: list[NodeSelectorRequirement] = Field(
        default_factory=list,
        max_length=32,
        description="Further node label requirements (all must hold).",
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=32, description="Tolerations for every worker pod."
    )
    tolerate_node_taints: bool = Field(
        True,
        description="Consider tainted nodes (e.g. KubeEdge's node-role.kubernetes.io/edge "
        "NoSchedule) and give each worker tolerations for its own node's taints.",
    )
    max_devices: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="Use at most this many devices (the fastest ones).",
    )


# ---------------------------------------------------------------------------------------------
# spec.resources, rendezvous, policies, scheduling


class ResourcesSpec(_Spec):
    """Compute resources of every worker container. GPU workers also get nvidia.com/gpu: 1."""

    requests: dict[str, int | str] = Field(
        default_factory=dict, description="Requests, e.g. {cpu: '2', memory: 4Gi}."
    )
    limits: dict[str, int | str] = Field(
        default_factory=dict, description="Limits, e.g. {memory: 8Gi}."
    )


class EnvVar(_Spec):
    """An extra environment variable for every worker."""

    model_config = ConfigDict(
        json_schema_extra=_cel(
            (
                "!self.name.startsWith('SPANTRAIN_') && !(self.name in "
                + str(list(RESERVED_ENV)).replace('"', "'")
                + ")",
                "env name is reserved: the operator sets MASTER_*, WORLD_SIZE, RANK, "
                "LOCAL_RANK, PET_* and SPANTRAIN_*",
            )
        )
    )

    name: str = Field(
        max_length=253, pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$", description="Variable name."
    )
    value: str = Field("", max_length=32768, description="Variable value.")

    @model_validator(mode="after")
    def _not_reserved(self) -> EnvVar:
        if self.name.startswith("SPANTRAIN_") or self.name in RESERVED_ENV:
            raise ValueError(f"env name {self.name} is reserved for the operator")
        return self


class RendezvousSpec(_Spec):
    """How workers find rank 0 (the c10d store) and each other."""

    port: int = Field(29500, ge=1024, le=65535, description="Rendezvous (c10d store) port.")
    address_mode: Literal["auto", "dns", "ip", "hostNetwork"] = Field(
        "auto",
        description="dns: rank 0's name in the job's headless Service; ip: rank 0's pod IP "
        "(workers are created once rank 0 has one); hostNetwork: pods on the host network, "
        "rank 0's node InternalIP. auto, per pod: pods on KubeEdge edge nodes on the host "
        "network (EdgeMesh does not resolve headless Services reliably), the others on dns; "
        "rank 0 is found by its DNS name, or by its node's InternalIP when it is on an edge "
        "node.",
    )


class FailurePolicy(_Spec):
    """What happens when a worker fails or a node goes away. A pipeline cannot run with a
    stage missing, so any failure restarts the whole job from its last checkpoint."""

    max_restarts: int = Field(
        3,
        ge=0,
        le=1000,
        description="Restarts after worker failures before the job is Failed (like backoffLimit).",
    )
    node_lost_grace_period_seconds: int = Field(
        300,
        ge=0,
        le=86400,
        description="A node NotReady this long (or deleted) counts as lost; its workers "
        "tolerate not-ready/unreachable taints this long.",
    )
    replan_on_node_loss: bool = Field(
        True,
        description="On a lost node, re-plan on the remaining nodes and restart from the "
        "checkpoint (does not count against maxRestarts); otherwise treat it as a failure.",
    )


class RunPolicy(_Spec):
    """Lifetime of the job and its pods (PyTorchJob's words)."""

    clean_pod_policy: Literal["All", "Running", "None"] = Field(
        "Running",
        description="Pods deleted when the job finishes: All, Running (those still running) "
        "or None.",
    )
    ttl_seconds_after_finished: int | None = Field(
        None, ge=0, description="Delete the finished job (and its pods) after this many seconds."
    )
    active_deadline_seconds: int | None = Field(
        None,
        ge=1,
        description="Fail the job (reason DeadlineExceeded) this long after it started. Immutable.",
    )


class SchedulingSpec(_Spec):
    """Scheduler and gang scheduling for the worker pods."""

    model_config = ConfigDict(
        json_schema_extra=_cel(
            (
                "self.gang != 'volcano' || !has(self.schedulerName) || "
                "self.schedulerName == 'volcano'",
                "scheduling.gang volcano needs schedulerName volcano (or unset)",
            )
        )
    )

    scheduler_name: str | None = Field(
        None, max_length=253, description="schedulerName of the worker pods."
    )
    gang: Literal["none", "volcano", "coscheduling"] = Field(
        "none",
        description="Gang scheduling: volcano (a Volcano PodGroup, minMember = all workers), "
        "coscheduling (a scheduler-plugins PodGroup) or none.",
    )
    queue: str | None = Field(None, max_length=253, description="Volcano queue.")
    priority_class_name: str | None = Field(
        None, max_length=253, description="priorityClassName of the worker pods."
    )
    schedule_timeout_seconds: int = Field(
        300, ge=1, description="PodGroup schedule timeout (coscheduling)."
    )


# ---------------------------------------------------------------------------------------------
# spec


class SpanTrainJobSpec(_Spec):
    """Desired state of a SpanTrainJob: what to train and where it may run. The operator plans
    the pipeline (stages, devices, shares, schedule) from the nodes it finds."""

    model_config = ConfigDict(
        json_schema_extra=_cel(
            ("self.model == oldSelf.model", "model is immutable"),
            (
                "has(self.runPolicy.activeDeadlineSeconds) == "
                "has(oldSelf.runPolicy.activeDeadlineSeconds) && "
                "(!has(self.runPolicy.activeDeadlineSeconds) || "
                "self.runPolicy.activeDeadlineSeconds == "
                "oldSelf.runPolicy.activeDeadlineSeconds)",
                "runPolicy.activeDeadlineSeconds is immutable",
            ),
            (
                "!has(self.planner.numMicrobatches) || "
                "self.planner.numMicrobatches <= self.training.globalBatch",
                "planner.numMicrobatches must be <= training.globalBatch",
            ),
        )
    )

    model: ModelSpec
    training: TrainingSpec = Field(
        default_factory=TrainingSpec, json_schema_extra=_default_of(TrainingSpec)
    )
    planner: PlannerSpec = Field(
        default_factory=PlannerSpec, json_schema_extra=_default_of(PlannerSpec)
    )
    placement: PlacementSpec = Field(
        default_factory=PlacementSpec, json_schema_extra=_default_of(PlacementSpec)
    )
    image: str | None = Field(
        None,
        max_length=1024,
        description="Worker image (defaults to the operator's configured image).",
    )
    images: dict[str, str] = Field(
        default_factory=dict,
        description="Per-architecture worker images keyed by kubernetes.io/arch "
        "(amd64, arm64, arm); they override `image` on nodes of that architecture.",
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(
        None, description="imagePullPolicy of the worker containers."
    )
    resources: ResourcesSpec = Field(
        default_factory=ResourcesSpec, json_schema_extra=_default_of(ResourcesSpec)
    )
    env: list[EnvVar] = Field(
        default_factory=list, max_length=64, description="Extra environment for every worker."
    )
    rendezvous: RendezvousSpec = Field(
        default_factory=RendezvousSpec, json_schema_extra=_default_of(RendezvousSpec)
    )
    failure_policy: FailurePolicy = Field(
        default_factory=FailurePolicy, json_schema_extra=_default_of(FailurePolicy)
    )
    run_policy: RunPolicy = Field(
        default_factory=RunPolicy, json_schema_extra=_default_of(RunPolicy)
    )
    scheduling: SchedulingSpec = Field(
        default_factory=SchedulingSpec, json_schema_extra=_default_of(SchedulingSpec)
    )
    suspend: bool = Field(
        False,
        description="Suspend the job: its pods are deleted, its plan is kept; unsuspending "
        "recreates them and resumes from the checkpoint.",
    )
    service_account_name: str | None = Field(
        None, max_length=253, description="serviceAccountName of the worker pods."
    )

    @model_validator(mode="after")
    def _microbatches(self) -> SpanTrainJobSpec:
        nmb = self.planner.num_microbatches
        if nmb is not None and nmb > self.training.global_batch:
            raise ValueError(
                f"planner.numMicrobatches ({nmb}) must be <= training.globalBatch "
                f"({self.training.global_batch})"
            )
        return self


# ---------------------------------------------------------------------------------------------
# status

Phase = Literal["Pending", "Planned", "Running", "Restarting", "Suspended", "Succeeded", "Failed"]
PHASES: tuple[str, ...] = (
    "Pending",
    "Planned",
    "Running",
    "Restarting",
    "Suspended",
    "Succeeded",
    "Failed",
)
CONDITION_TYPES: tuple[str, ...] = (
    "Planned",
    "Running",
    "Degraded",
    "Succeeded",
    "Failed",
    "Suspended",
)


class Condition(_Status):
    """A condition in the style of metav1.Condition (KEP-1623)."""

    type: str = Field(
        max_length=316,
        pattern=CONDITION_TYPE_PATTERN,
        description="Planned, Running, Degraded, Succeeded, Failed or Suspended.",
    )
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    observed_generation: int | None = Field(
        None, ge=0, description="The .metadata.generation the condition was set from."
    )
    last_transition_time: str = Field(
        json_schema_extra={"format": "date-time"},
        description="When the status last changed.",
    )
    reason: str = Field(
        min_length=1,
        max_length=1024,
        pattern=CONDITION_REASON_PATTERN,
        description="CamelCase reason.",
    )
    message: str = Field("", max_length=32768, description="Human-readable detail.")


class StageSummary(_Status):
    """One pipeline stage of the plan."""

    index: int = Field(ge=0, description="Stage index (0 = first layers).")
    layer_start: int = Field(ge=0, description="First layer (inclusive).")
    layer_end: int = Field(ge=1, description="Last layer (exclusive).")
    replicas: int = Field(ge=1, description="Devices (data-parallel width) of the stage.")
    nodes: list[str] = Field(default_factory=list, description="Nodes hosting the devices.")
    devices: list[str] = Field(default_factory=list, description="Device ids, in rank order.")
    ranks: list[int] = Field(default_factory=list, description="Global ranks.")
    shares: list[int] = Field(
        default_factory=list, description="Samples of every micro-batch per device."
    )


class PlanSummary(_Status):
    """What the planner decided (the full plan is plan.json in `configMap`)."""

    hash: str = Field(description="Content hash of plan.json.")
    config_map: str = Field(description="ConfigMap holding plan.json.")
    generation: int = Field(0, description="Spec generation the plan was computed for.")
    spec_hash: str | None = Field(
        None, description="Hash of the spec fields the plan depends on (a change re-plans)."
    )
    reason: str | None = Field(
        None, description="Why this plan was made: Initial, SpecChanged or NodeLost."
    )
    computed_at: str | None = Field(
        None, json_schema_extra={"format": "date-time"}, description="When it was computed."
    )
    strategy: str = Field("spantrain", description="Planner that produced it.")
    schedule: str = Field(description="Pipeline schedule: gpipe, 1f1b or zb.")
    num_stages: int = Field(ge=1, description="Pipeline stages.")
    num_devices: int = Field(ge=1, description="Workers (world size).")
    num_microbatches: int = Field(ge=1, description="Micro-batches per step.")
    microbatch_size: int = Field(ge=1, description="Samples per micro-batch.")
    num_excluded: int = Field(0, ge=0, description="Candidate devices left out.")
    predicted_step_seconds: float | None = Field(None, description="Simulated step time.")
    predicted_samples_per_second: float | None = Field(
        None, description="Simulated throughput (samples/s)."
    )
    bottleneck: str | None = Field(None, description="Slowest stage or link, in words.")
    nodes: list[str] = Field(default_factory=list, description="Every node the plan uses.")
    stages: list[StageSummary] = Field(
        default_factory=list, description="Pipeline stages, first layers first."
    )


class StageStatus(_Status):
    """Readiness of one stage's workers."""

    index: int = Field(ge=0, description="Stage index.")
    ready: int = Field(0, ge=0, description="Workers running and ready.")
    total: int = Field(0, ge=0, description="Workers of the stage.")
    failed: int = Field(0, ge=0, description="Workers failed.")


class Progress(_Status):
    """Training progress as reported by the workers."""

    step: int = Field(0, ge=0, description="Last completed optimizer step.")
    steps: int = Field(0, ge=0, description="Steps to train.")
    progress_percentage: int = Field(0, ge=0, le=100, description="step / steps, in percent.")
    loss: float | None = Field(None, description="Last reported training loss.")
    samples_per_second: float | None = Field(
        None, description="Measured throughput (samples/s), read from rank 0's metrics."
    )
    predicted_samples_per_second: float | None = Field(
        None, description="Throughput the current plan predicts (samples/s), beside the measured."
    )
    estimated_remaining_seconds: int | None = Field(None, ge=0, description="ETA.")
    last_updated_time: str | None = Field(
        None, json_schema_extra={"format": "date-time"}, description="When progress was read."
    )


class SpanTrainJobStatus(_Status):
    """Observed state of a SpanTrainJob, written by the operator."""

    observed_generation: int | None = Field(None, description="Last spec generation acted on.")
    phase: Phase = Field(
        "Pending",
        description="Pending, Planned, Running, Restarting, Suspended, Succeeded or Failed "
        "(for display; the conditions are authoritative).",
    )
    reason: str | None = Field(None, description="CamelCase reason of the last phase change.")
    message: str | None = Field(None, description="Detail of the last phase change.")
    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=16,
        description="Conditions keyed by type: Planned, Running, Degraded, Succeeded, Failed, "
        "Suspended.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    plan: PlanSummary | None = None
    stages: list[StageStatus] = Field(
        default_factory=list,
        description="Readiness of every stage's workers.",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["index"],
        },
    )
    ready: str | None = Field(None, description="Ready workers / workers, e.g. 4/4.")
    attempt: int = Field(
        0,
        ge=0,
        description="Pod generation: bumped by every restart and re-plan (pod names carry it).",
    )
    restarts: int = Field(0, ge=0, description="Restarts after worker failures.")
    replans: int = Field(0, ge=0, description="Re-plans after lost nodes.")
    start_time: str | None = Field(
        None,
        json_schema_extra={"format": "date-time"},
        description="When workers were first created (reset by suspension; the deadline "
        "counts from here).",
    )
    completion_time: str | None = Field(
        None, json_schema_extra={"format": "date-time"}, description="When the job finished."
    )
    progress: Progress | None = None


class SpanTrainJob(BaseModel):
    """A SpanTrainJob manifest (apiVersion, kind, metadata, spec, status)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    api_version: Literal["spantrain.io/v1alpha1"] = "spantrain.io/v1alpha1"
    kind: Literal["SpanTrainJob"] = "SpanTrainJob"
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: SpanTrainJobSpec
    status: SpanTrainJobStatus | None = None

    @property
    def name(self) -> str:
        return str(self.metadata.get("name", "job"))

    @model_validator(mode="after")
    def _name(self) -> SpanTrainJob:
        name = self.metadata.get("name")
        if name is not None and (
            len(str(name)) > MAX_JOB_NAME or not re.match(JOB_NAME_PATTERN, str(name))
        ):
            raise ValueError(
                f"metadata.name {name!r} must be a lower-case RFC 1035 label of at most "
                f"{MAX_JOB_NAME} characters"
            )
        return self


def parse_spec(data: dict[str, Any]) -> SpanTrainJobSpec:
    """Validate a spec dict (as the API server stores it) into the model."""
    return SpanTrainJobSpec.model_validate(data)


def load_job(path: str | Path) -> SpanTrainJob:
    """Load and validate a SpanTrainJob manifest (YAML or JSON)."""
    data = load_document(path)
    try:
        return SpanTrainJob.model_validate(data)
    except ValidationError as err:
        raise InputError(f"{path}: invalid SpanTrainJob:\n{err}") from None


# ---------------------------------------------------------------------------------------------
# spec -> planner inputs


@dataclass(frozen=True)
class PlannerInputs:
    """What ``spantrain_planner.search.make_plan`` needs besides the topology."""

    profile: ModelProfile
    options: PlannerOptions


def bytes_per_element(precision: str) -> int:
    """Bytes of one activation/weight element at a training precision."""
    return 2 if precision == "bf16" else 4


def model_profile(spec: SpanTrainJobSpec) -> ModelProfile:
    """The layer profile of the spec's model (analytic for built-ins, given for entry points)."""
    m = spec.model
    bpe = bytes_per_element(spec.training.precision)
    if m.preset is not None:
        if m.preset not in preset_names():
            raise InputError(
                f"model.preset {m.preset!r} is unknown; choose one of: {', '.join(preset_names())}"
            )
        profile = preset(m.preset, bpe)
    elif m.family is not None:
        try:
            profile = build_profile(m.family, m.name or m.family, dict(m.config or {}), bpe)
        except TypeError as err:
            raise InputError(f"model.config does not fit family {m.family}: {err}") from None
    else:
        if m.profile is None:
            raise InputError(
                f"model.entrypoint {m.entrypoint} needs model.profile; measure it with "
                "`spantrain profile` and paste the result under model.profile"
            )
        data = {k: v for k, v in m.profile.items() if k not in ("apiVersion", "kind")}
        data.setdefault("name", m.name or str(m.entrypoint))
        data["family"] = "custom"
        data["entrypoint"] = m.entrypoint
        try:
            profile = ModelProfile.model_validate(data)
        except ValidationError as err:
            raise InputError(f"model.profile is not a valid profile:\n{err}") from None
    if m.name and profile.name != m.name:
        profile = profile.model_copy(update={"name": m.name})
    return profile


def planner_options(spec: SpanTrainJobSpec) -> PlannerOptions:
    """``PlannerOptions`` of a spec: the planner block plus training.globalBatch."""
    knobs = spec.planner.model_dump(exclude_none=True)
    return PlannerOptions(global_batch=spec.training.global_batch, **knobs)


def planner_inputs(spec: SpanTrainJobSpec) -> PlannerInputs:
    """The model profile and planner options a spec asks for (pure; raises ``InputError``)."""
    return PlannerInputs(profile=model_profile(spec), options=planner_options(spec))
