"""The process contract: every ``SPANTRAIN_*`` environment variable and the files they name.

Role: the one definition of what a SpanTrain process is told through its environment.

* The operator renders a worker pod's environment and ``spantrain local`` (and the testbed's
  benchmarks) a worker process's from ``WorkerEnv.to_env``; the worker reads it back with
  ``WorkerEnv.from_env``. Both sides import the names below, so a renamed variable cannot
  drift between them.
* The operator's own settings (``spantrain_operator.settings``) and the testbed's device
  environment use the names defined here too.

Nothing outside this module (and its tests) spells a variable's name. Pure standard library;
must not import pydantic models, torch, kopf, the Kubernetes client or any other SpanTrain
module.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T", int, float)

PREFIX = "SPANTRAIN_"
"""Reserved: users may not set variables with this prefix in ``spec.env``."""

# ---------------------------------------------------------------------------------------------
# files the operator mounts into every worker (the plan ConfigMap)

PLAN_MOUNT = "/etc/spantrain/plan"  #: read-only (the plan ConfigMap)
SCRATCH_MOUNT = "/tmp"  #: the writable emptyDir under the read-only root filesystem
PLAN_FILE = "plan.json"
JOB_FILE = "job.json"
#: what the workers need to plan afresh (``passes.adapt.ReplanInputs``), beside the plan
REPLAN_INPUTS_FILE = "replan-inputs.json"
#: what the workers leave in their output directory when they stop for a re-plan
REPLAN_FILE = "replan.json"
#: a worker's exit status after a checkpoint for a re-plan (EX_TEMPFAIL): not a failure; its
#: starter re-plans from ``REPLAN_FILE`` and restarts the job from the checkpoint
REPLAN_EXIT_CODE = 75
#: where a container's last words go (Kubernetes' default ``terminationMessagePath``): a worker
#: that stops for a re-plan writes its request there, and the operator reads it from the pod
TERMINATION_LOG = "/dev/termination-log"

# ---------------------------------------------------------------------------------------------
# worker: read by the worker (``WorkerEnv``, ``comm``)

PLAN = PREFIX + "PLAN"  #: path of plan.json (required)
TRAINING = PREFIX + "TRAINING"  #: training block, job spec or whole manifest (JSON/YAML)
JOB = PREFIX + "JOB"  #: job name, for logs and metrics
NAMESPACE = PREFIX + "NAMESPACE"  #: the job's namespace, for metrics
CHECKPOINT_DIR = PREFIX + "CHECKPOINT_DIR"  #: overrides training.checkpoint.path
METRICS_PORT = PREFIX + "METRICS_PORT"  #: Prometheus port (0: no endpoint)
OUTPUT_DIR = PREFIX + "OUTPUT_DIR"  #: losses.jsonl / timeline.json (local runs, tests)
EMULATION = PREFIX + "EMULATION"  #: emulation file (``spantrain local`` only)
RENDEZVOUS_TIMEOUT = PREFIX + "RENDEZVOUS_TIMEOUT"  #: seconds to wait for every rank
DEVICE = PREFIX + "DEVICE"  #: auto | cpu | cuda
PACE_CORES = PREFIX + "PACE_CORES"  #: the testbed device's CPU share (pads compute actions)
#: a file holding the device's current CPU share: the testbed rewrites it when it changes a
#: quota under a running job, and the worker's pacing follows
PACE_FILE = PREFIX + "PACE_FILE"
POD_IP = PREFIX + "POD_IP"  #: the pod's address (picks gloo's / NCCL's interface)
NUM_THREADS = PREFIX + "NUM_THREADS"  #: torch intra-op threads
TIMELINE_STEPS = PREFIX + "TIMELINE_STEPS"  #: comma-separated steps whose timeline is kept
DUMP_GRADS_STEP = PREFIX + "DUMP_GRADS_STEP"  #: tests: dump gradients after this step
REPLAN_INPUTS = PREFIX + "REPLAN_INPUTS"  #: path of REPLAN_INPUTS_FILE (unset: no re-plan)

# worker: rendered by the operator for people (kubectl exec, logs); no process reads them
ATTEMPT = PREFIX + "ATTEMPT"
STAGE_INDEX = PREFIX + "STAGE_INDEX"
NUM_STAGES = PREFIX + "NUM_STAGES"
REPLICA_INDEX = PREFIX + "REPLICA_INDEX"
STAGE_RANKS = PREFIX + "STAGE_RANKS"
PREV_RANKS = PREFIX + "PREV_RANKS"
NEXT_RANKS = PREFIX + "NEXT_RANKS"
DEVICE_ID = PREFIX + "DEVICE_ID"
PLAN_HASH = PREFIX + "PLAN_HASH"
ADDRESS_MODE = PREFIX + "ADDRESS_MODE"
CHECKPOINT_INTERVAL = PREFIX + "CHECKPOINT_INTERVAL"

# ---------------------------------------------------------------------------------------------
# testbed: set by ``Testbed.device_env`` for a process inside an emulated device

DEVICE_ADDR = PREFIX + "DEVICE_ADDR"
TESTBED_DEVICE = PREFIX + "TESTBED_DEVICE"
TESTBED_INSTANCE = PREFIX + "TESTBED_INSTANCE"

# ---------------------------------------------------------------------------------------------
# operator: its settings (the Helm chart sets them; ``spantrain_operator.settings`` reads them)

RECONCILE_INTERVAL = PREFIX + "RECONCILE_INTERVAL"
WORKER_IMAGE = PREFIX + "WORKER_IMAGE"
NETWORK_POLICY_SCRAPERS = PREFIX + "NETWORK_POLICY_SCRAPERS"
PROGRESS_INTERVAL = PREFIX + "PROGRESS_INTERVAL"
PROGRESS_TIMEOUT = PREFIX + "PROGRESS_TIMEOUT"
WORKERS = PREFIX + "WORKERS"
PEERING = PREFIX + "PEERING"
PEERING_PRIORITY = PREFIX + "PEERING_PRIORITY"
PEERING_MANDATORY = PREFIX + "PEERING_MANDATORY"
LOG_LEVEL = PREFIX + "LOG_LEVEL"
LIVENESS = PREFIX + "LIVENESS"
POD_DELETE_GRACE_SECONDS = PREFIX + "POD_DELETE_GRACE_SECONDS"
PLAN_PROCESSES = PREFIX + "PLAN_PROCESSES"
PLAN_BUDGET_SECONDS = PREFIX + "PLAN_BUDGET_SECONDS"
# (the operator's metrics port is METRICS_PORT too: one process, one port)

WORKER_METRICS_PORT = 9400
RENDEZVOUS_TIMEOUT_SECONDS = 300.0


def number(env: Mapping[str, str], name: str, default: float, *, minimum: float = 0.0) -> float:
    """``env[name]`` as a number >= ``minimum`` (``default`` when unset or empty); a clear
    ``ValueError`` naming the variable otherwise."""
    return _read(env, name, default, float, "a number", minimum)


def integer(env: Mapping[str, str], name: str, default: int, *, minimum: int = 0) -> int:
    """``env[name]`` as an integer >= ``minimum``, like ``number``."""
    return _read(env, name, default, int, "an integer", minimum)


def _read(
    env: Mapping[str, str], name: str, default: T, kind: Callable[[str], T], what: str,
    minimum: float,
) -> T:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: not {what}") from None
    if not value >= minimum:
        raise ValueError(f"{name}={raw!r}: must be at least {minimum:g}")
    return value


@dataclass(frozen=True)
class WorkerEnv:
    """What a worker is told besides rendezvous (MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK)."""

    plan_path: str
    training_path: str | None = None
    job: str = "spantrain"
    namespace: str = ""
    checkpoint_dir: str | None = None
    metrics_port: int = WORKER_METRICS_PORT
    output_dir: str | None = None
    emulation_path: str | None = None
    rendezvous_timeout: float = RENDEZVOUS_TIMEOUT_SECONDS
    device: str = "auto"
    pace_cores: float | None = None
    pace_file: str | None = None
    num_threads: int | None = None
    timeline_steps: str | None = None
    dump_grads_step: int | None = None
    replan_inputs_path: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WorkerEnv:
        env = os.environ if env is None else env
        if not env.get(PLAN):
            raise ValueError(f"{PLAN} is not set: it must name the plan.json the operator "
                             "mounts (spantrain local sets it)")
        device = env.get(DEVICE) or "auto"
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"{DEVICE}={device!r}: use auto, cpu or cuda")
        pace = number(env, PACE_CORES, 0.0)
        if env.get(PACE_CORES, "").strip() and not pace > 0:
            raise ValueError(f"{PACE_CORES}={env[PACE_CORES]!r}: must be a positive number of "
                             "cores (or unset)")
        threads = integer(env, NUM_THREADS, 0, minimum=1) if env.get(NUM_THREADS) else None
        dump = integer(env, DUMP_GRADS_STEP, 0, minimum=-1) if env.get(DUMP_GRADS_STEP) else None
        return cls(
            plan_path=env[PLAN],
            training_path=env.get(TRAINING) or None,
            job=env.get(JOB) or "spantrain",
            namespace=env.get(NAMESPACE, ""),
            checkpoint_dir=env.get(CHECKPOINT_DIR) or None,
            metrics_port=integer(env, METRICS_PORT, WORKER_METRICS_PORT),
            output_dir=env.get(OUTPUT_DIR) or None,
            emulation_path=env.get(EMULATION) or None,
            rendezvous_timeout=number(env, RENDEZVOUS_TIMEOUT, RENDEZVOUS_TIMEOUT_SECONDS),
            device=device,
            pace_cores=pace or None,
            pace_file=env.get(PACE_FILE) or None,
            num_threads=threads,
            timeline_steps=env.get(TIMELINE_STEPS) or None,
            dump_grads_step=dump,
            replan_inputs_path=env.get(REPLAN_INPUTS) or None,
        )

    def to_env(self) -> dict[str, str]:
        """The variables that carry this (unset fields are left out)."""
        out = {PLAN: self.plan_path, JOB: self.job, METRICS_PORT: str(self.metrics_port),
               DEVICE: self.device}
        optional: dict[str, object] = {
            TRAINING: self.training_path,
            NAMESPACE: self.namespace or None,
            CHECKPOINT_DIR: self.checkpoint_dir,
            OUTPUT_DIR: self.output_dir,
            EMULATION: self.emulation_path,
            PACE_CORES: None if self.pace_cores is None else f"{self.pace_cores:.6g}",
            PACE_FILE: self.pace_file,
            NUM_THREADS: self.num_threads,
            TIMELINE_STEPS: self.timeline_steps,
            DUMP_GRADS_STEP: self.dump_grads_step,
            REPLAN_INPUTS: self.replan_inputs_path,
        }
        if self.rendezvous_timeout != RENDEZVOUS_TIMEOUT_SECONDS:
            optional[RENDEZVOUS_TIMEOUT] = f"{self.rendezvous_timeout:g}"
        out.update({k: str(v) for k, v in optional.items() if v is not None})
        return out


def rendezvous_env(addr: str, port: int, world_size: int, rank: int) -> dict[str, str]:
    """torch.distributed's env:// rendezvous variables."""
    return {"MASTER_ADDR": addr, "MASTER_PORT": str(port), "WORLD_SIZE": str(world_size),
            "RANK": str(rank)}
