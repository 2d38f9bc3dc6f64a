"""Each ``SPANTRAIN_*`` variable is spelled in one module: ``spantrain_planner.core.contract``.

The operator renders a worker's environment, the worker and the testbed read it, the chart
sets the operator's: all import the names from the contract, so none can drift.
"""

from __future__ import annotations

import re
from pathlib import Path

from spantrain_planner.core import contract

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("operator", "worker", "planner", "bench", "testbed")
CONTRACT = Path(contract.__file__).resolve()


def test_variables_are_spelled_only_in_the_contract() -> None:
    spelled = {
        str(path.relative_to(REPO)): sorted(set(re.findall(r"SPANTRAIN_\w*", path.read_text())))
        for top in SOURCES
        for path in (REPO / top).rglob("*.py")
        if path != CONTRACT and "SPANTRAIN_" in path.read_text()
    }
    assert not spelled, f"import these from spantrain_planner.core.contract: {spelled}"


def test_every_name_is_prefixed_and_unique() -> None:
    names = {k: v for k, v in vars(contract).items()
             if k.isupper() and isinstance(v, str) and v.startswith(contract.PREFIX)}
    assert len(names) > 30
    assert len(set(names.values())) == len(names), "two constants name the same variable"


def test_worker_env_round_trips() -> None:
    env = contract.WorkerEnv(
        plan_path="/p/plan.json", training_path="/p/job.json", job="j", namespace="ns",
        checkpoint_dir="/ck", metrics_port=9401, output_dir="/out", emulation_path="/e.json",
        rendezvous_timeout=60, device="cpu", pace_cores=0.25, num_threads=1,
        timeline_steps="3,4", dump_grads_step=2,
    )
    assert contract.WorkerEnv.from_env(env.to_env()) == env
    assert contract.WorkerEnv.from_env({contract.PLAN: "/p"}) == contract.WorkerEnv("/p")


def test_malformed_values_name_the_variable() -> None:
    bad = [
        ({}, contract.PLAN),
        ({contract.PLAN: "/p", contract.DEVICE: "tpu"}, contract.DEVICE),
        ({contract.PLAN: "/p", contract.METRICS_PORT: "http"}, contract.METRICS_PORT),
        ({contract.PLAN: "/p", contract.PACE_CORES: "-1"}, contract.PACE_CORES),
        ({contract.PLAN: "/p", contract.RENDEZVOUS_TIMEOUT: "soon"}, contract.RENDEZVOUS_TIMEOUT),
        ({contract.PLAN: "/p", contract.NUM_THREADS: "0"}, contract.NUM_THREADS),
    ]
    for env, name in bad:
        try:
            contract.WorkerEnv.from_env(env)
        except ValueError as err:
            assert name in str(err), (env, err)
        else:
            raise AssertionError(f"{env} accepted")
