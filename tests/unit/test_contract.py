"""The operator/worker contract: what the operator renders is exactly what a worker reads.

Renders the ConfigMap and pods for a job, writes the ConfigMap's files where the pod mounts
them, and hands each pod's environment to the worker's own parsers: the plan, the training
block and the rendezvous variables must come out as the job says.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")

from spantrain_operator import render
from spantrain_planner import api
from spantrain_worker.config import WorkerEnv, load_plan, load_training
from tests.unit.test_render import JOB, facts, make_plan


def test_rendered_pod_is_what_the_worker_reads(tmp_path: Path) -> None:
    spec = api.SpanTrainJobSpec.model_validate(
        {
            "model": {"preset": "gpt-mini"},
            "training": {
                "globalBatch": 16, "steps": 123, "learningRate": 0.002, "seed": 7,
                "checkpoint": {"path": "/ck", "intervalSteps": 10},
            },
        }
    )
    plan = make_plan()
    cm = render.config_map(JOB, spec, plan)
    pods = render.worker_pods(JOB, spec, plan, facts(), attempt=0)
    assert len(pods) == plan.world_size
    for pod in pods:
        container = pod["spec"]["containers"][0]
        env: dict[str, str] = {e["name"]: str(e["value"]) for e in container["env"]
                               if "value" in e}
        mount = next(m for m in container["volumeMounts"] if m["name"] == "plan")
        assert mount["readOnly"] is True
        # put the ConfigMap's files where the pod would see them
        local = tmp_path / pod["metadata"]["name"]
        local.mkdir()
        for name, text in cm["data"].items():
            (local / name).write_text(text)
        rewritten: dict[str, Any] = {
            k: v.replace(mount["mountPath"], str(local)) for k, v in env.items()
        }
        worker_env = WorkerEnv.from_env(rewritten)
        assert load_plan(worker_env.plan_path) == plan
        training = load_training(worker_env.training_path)
        assert (training.steps, training.seed) == (123, 7)
        assert training.checkpoint.path == "/ck"
        assert training.learning_rate == pytest.approx(0.002)
        assert worker_env.checkpoint_dir == "/ck"
        assert worker_env.job == JOB.name
        assert int(env["WORLD_SIZE"]) == plan.world_size
        assert container.get("args") == ["worker"]


def test_a_spec_change_reaches_the_workers_even_with_the_same_plan() -> None:
    base = {"model": {"preset": "gpt-mini"}, "training": {"globalBatch": 16, "steps": 10}}
    spec_a = api.SpanTrainJobSpec.model_validate(base)
    spec_b = api.SpanTrainJobSpec.model_validate(
        {**base, "training": {**base["training"], "learningRate": 0.01}}
    )
    plan = make_plan()
    cm_a, cm_b = render.config_map(JOB, spec_a, plan), render.config_map(JOB, spec_b, plan)
    assert cm_a["metadata"]["name"] != cm_b["metadata"]["name"]  # immutable: a new ConfigMap
    pod_b = render.worker_pods(JOB, spec_b, plan, facts(), attempt=1)[0]
    volumes = {v["name"]: v for v in pod_b["spec"]["volumes"]}
    assert volumes["plan"]["configMap"]["name"] == cm_b["metadata"]["name"]
