"""Root test of the adapter's re-plan in real processes on the kernel testbed.

The adapter benchmark's cluster (two nodes of two quarter-core devices, 200 Mbit/s token
buckets between the nodes) trains a job whose first plan spans both nodes; at step
``CHANGE`` every inter-node bucket drops to a tenth. The workers must notice (the step grows,
the compute does not), time the links, plan afresh, find that the new plan pays for a
restart, checkpoint and exit with ``REPLAN_EXIT_CODE``; the starter (``bench.adapt.train``,
which does what ``spantrain local`` and the operator do) restarts the job on the plan they
left, from their checkpoint. Checked: one re-plan, its record (measured links near the
throttled rate, a predicted gain), the new plan on one node, every step trained exactly once
(nothing lost or repeated across the restart), and the loss never above the 20 steps before
the re-plan. Needs root, iproute2 and cgroup v1 cpu/cpuacct.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.testbed import requirements

pytestmark = [pytest.mark.root, pytest.mark.torch, pytest.mark.slow]

if (missing := requirements.testbed_missing()) is not None:
    pytest.skip(missing, allow_module_level=True)

from bench.adapt import (  # noqa: E402
    CHANGE,
    INTER_MBPS,
    cluster,
    core_tflops,
    loss_spike,
    profile,
    train,
)

from spantrain_planner.core.contract import REPLAN_FILE  # noqa: E402
from spantrain_planner.core.options import PlannerOptions  # noqa: E402
from spantrain_planner.inputs.cluster import resolve  # noqa: E402
from spantrain_planner.passes.adapt import ReplanInputs, ReplanRecord  # noqa: E402
from spantrain_planner.passes.search import search  # noqa: E402
from spantrain_testbed import Testbed  # noqa: E402

STEPS = 200  # enough left after the change that a restart (~10-15 s here) pays


def test_a_slowed_link_is_replanned_through_checkpoint_and_restart(tmp_path: Path) -> None:
    from spantrain_testbed.netns import plan_network

    per_core = core_tflops()
    spec = cluster(per_core)
    topo = resolve(spec)
    prof = profile()
    plan, _ = search(topo, prof, PlannerOptions(global_batch=16, num_microbatches=4))
    assert len({d.node for s in plan.stages for d in s.devices}) == 2  # it spans the link
    inputs = ReplanInputs(cluster=spec, profile=prof, options=PlannerOptions(global_batch=16))
    uplinks = [n.uplink_if for n in plan_network(topo, 212).nodes]
    out = tmp_path / "run"
    with Testbed(topo, instance=212, cores_per_tflops=1.0 / per_core) as tb:
        run = train(tb, plan, out, steps=STEPS, port=29790, adapt="replan",
                    change=lambda t: t.scale_links(0.1, uplinks), inputs=inputs)
    assert run.status == "ok", (out / "rank0.log").read_text()[-3000:]
    kinds = [a["kind"] for a in run.adaptations]
    assert kinds == ["replan"], run.adaptations
    entry = run.adaptations[0]
    assert entry["step"] > CHANGE and entry["gain"] > 0
    record = ReplanRecord.model_validate_json((out / REPLAN_FILE).read_text())
    assert record.step == entry["step"]
    for key, mbps in record.measured_links.items():  # the probes saw the throttled buckets
        assert mbps == pytest.approx(INTER_MBPS / 10, rel=0.25), key
    assert record.step_seconds_after < record.step_seconds_before
    new = record.new_plan()
    assert len({d.node for s in new.stages for d in s.devices}) == 1  # off the slow link
    assert json.loads((out / "plan.json").read_text()) == json.loads(new.to_json())
    # every step trained exactly once: the restart resumed at the checkpoint's step
    steps = [r["step"] for r in run.rows]
    assert steps == list(range(STEPS)), steps
    assert len(run.restarts) == 1
    assert loss_spike(run) == 0
