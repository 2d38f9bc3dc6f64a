"""Scale: 50 SpanTrainJobs on 500 KWOK nodes all reach Running; prints the time from apply to
all of a job's pods created (median and p99).

Each job gets its own pool of 10 nodes (2 GPU servers + 8 CPU/ARM boxes, selected by a
``spantrain.io/pool`` label), so the jobs do not compete for the same fake GPUs. All 50 are
applied at once; the latency includes queueing behind the other jobs' planning.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import threading
import time
from typing import Any

import pytest
from kopf.testing import KopfRunner
from kubernetes import client as k8s_client
from prometheus_client import REGISTRY
from stj_helpers import GROUP, PLURAL, VERSION, create_job, job_manifest, operator_args, wait_for

# part of the default run; alone: scripts/test tests/kube_operator/test_scale.py -s
pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.scale]

NUM_JOBS = 50
NODES_PER_POOL = 10
P99_TARGET_SECONDS = 15.0  # apply -> all of a job's pods created, 99th percentile


def pool_nodes(pool: int) -> list[dict[str, Any]]:
    specs: list[dict[str, Any]] = []
    for i in range(NODES_PER_POOL):
        name = f"scale-p{pool:02d}-n{i}"
        tier = "edge" if i >= 2 else "cloud"
        labels = {"spantrain.io/pool": f"p{pool}", "spantrain.io/tier": tier}
        alloc: dict[str, str] = {"cpu": "8", "memory": "16Gi", "pods": "110"}
        if i < 2:
            labels.update({"nvidia.com/gpu.product": "NVIDIA-GeForce-RTX-3090",
                           "nvidia.com/gpu.memory": "24576"})
            alloc["nvidia.com/gpu"] = "2"
        elif i % 2:
            labels.update({"kubernetes.io/arch": "arm64", "node-role.kubernetes.io/edge": ""})
        specs.append({"name": name, "labels": labels, "allocatable": alloc})
    return specs


class KubeletStandIn:
    """Puts back the Ready condition of Running fake pods whose node is Ready again.

    Under load KWOK renews 500 node leases late, the node lifecycle controller marks the
    nodes' pods NotReady, and when the node is Ready again nothing marks them Ready (a kubelet
    would; KWOK's pod-ready stage only fires on pods without a podIP), so a job would never
    reach Running. This thread does what the kubelet would, every second, until the harness
    gives KWOK a stage for it (a ``pod-ready-again`` stage: Running, not deleted, no
    fail-after annotation, ``.status.conditions.[] | select( .type == "Ready" ) | .status``
    In [False] -> Ready and ContainersReady True).
    """

    def __init__(self, core: k8s_client.CoreV1Api, ns: str) -> None:
        self.core, self.ns = core, ns
        self.fixed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            with contextlib.suppress(Exception):
                self._once()

    def _once(self) -> None:
        pods = json.loads(self.core.list_namespaced_pod(self.ns, resource_version="0",
                                                        _preload_content=False).data)["items"]
        stuck = []
        for pod in pods:
            st = pod.get("status") or {}
            conds = {c["type"]: c for c in st.get("conditions") or []}
            if (st.get("phase") == "Running" and not pod["metadata"].get("deletionTimestamp")
                    and conds.get("Ready", {}).get("status") == "False"
                    and conds.get("ContainersReady", {}).get("status") == "True"):
                stuck.append((pod, conds))
        if not stuck:
            return  # the 500 nodes are read only when some pod needs them
        nodes = json.loads(self.core.list_node(resource_version="0",
                                               _preload_content=False).data)["items"]
        ready = {n["metadata"]["name"] for n in nodes
                 if any(c["type"] == "Ready" and c["status"] == "True"
                        for c in n["status"].get("conditions") or [])}
        for pod, conds in stuck:
            if pod["spec"].get("nodeName") in ready:
                fixed = [{**c, "status": "True"} if c["type"] == "Ready" else c
                         for c in conds.values()]
                self.core.patch_namespaced_pod_status(
                    pod["metadata"]["name"], self.ns, {"status": {"conditions": fixed}})
                self.fixed += 1

    def __enter__(self) -> KubeletStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


class Recorder:
    """When each job's pods were created and when it was Running, from two watch streams.

    Polling the API server for 500 pods four times a second loads the API server and this
    process (which also runs the operator being measured) more than the operator does; a
    watch delivers each change once, at the moment it happens.
    """

    def __init__(self, core: k8s_client.CoreV1Api, custom: k8s_client.CustomObjectsApi,
                 ns: str) -> None:
        self.core, self.custom, self.ns = core, custom, ns
        self.pods: dict[str, set[str]] = {}  # job -> pod names seen
        self.want: dict[str, int] = {}  # job -> its plan's device count
        self.created: dict[str, float] = {}  # job -> when its last pod appeared
        self.running: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._watch, args=(kind,), daemon=True)
                         for kind in ("pods", "jobs")]

    def _stream(self, kind: str, version: str) -> Any:
        args = {"watch": True, "resource_version": version, "timeout_seconds": 30,
                "allow_watch_bookmarks": True, "_preload_content": False}
        if kind == "pods":
            return self.core.list_namespaced_pod(self.ns, **args)
        return self.custom.list_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, **args)

    def _watch(self, kind: str) -> None:
        version = "0"
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                resp = self._stream(kind, version)
                for line in resp:
                    if self._stop.is_set():
                        break
                    event = json.loads(line)
                    obj = event["object"]
                    version = obj["metadata"].get("resourceVersion", version)
                    if event["type"] in ("ADDED", "MODIFIED"):
                        self._seen(kind, obj, time.monotonic())

    def _seen(self, kind: str, obj: dict[str, Any], now: float) -> None:
        with self._lock:
            if kind == "pods":
                job = (obj["metadata"].get("labels") or {}).get("spantrain.io/job-name")
                if job:
                    self.pods.setdefault(job, set()).add(obj["metadata"]["name"])
            else:
                job, st = obj["metadata"]["name"], obj.get("status") or {}
                want = (st.get("plan") or {}).get("numDevices")
                if want:
                    self.want[job] = want
                if job not in self.running and st.get("phase") == "Running":
                    self.running[job] = now
            if job and job not in self.created and self.want.get(job) and len(
                    self.pods.get(job, ())) >= self.want[job]:
                self.created[job] = now

    def __enter__(self) -> Recorder:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()


def _pods_per_job(core: k8s_client.CoreV1Api, ns: str) -> dict[str, int]:
    """Pods of every job, from raw JSON (deserialising 200 V1Pods four times a second would
    take the GIL from the in-process operator being measured)."""
    resp = core.list_namespaced_pod(ns, resource_version="0", _preload_content=False)
    counts: dict[str, int] = {}
    for pod in json.loads(resp.data)["items"]:
        job = (pod["metadata"].get("labels") or {}).get("spantrain.io/job-name")
        if job:
            counts[job] = counts.get(job, 0) + 1
    return counts


def _reached_running(core: k8s_client.CoreV1Api, ns: str) -> set[str]:
    """Jobs the operator announced Running (its ``Running`` event): a job that was Running
    counts even if a fake node's missed heartbeat has since marked its pods NotReady."""
    events = core.list_namespaced_event(ns, field_selector="reason=Running",
                                        _preload_content=False)
    return {e["involvedObject"]["name"] for e in json.loads(events.data)["items"]
            if e["involvedObject"].get("kind") == "SpanTrainJob"}


def test_50_jobs_on_500_nodes(
    kube_api: Any, namespace: str, crd_installed: None, kubeconfig_env: None, control_plane: Any
) -> None:
    core = k8s_client.CoreV1Api(kube_api)
    custom = k8s_client.CustomObjectsApi(kube_api)
    existing = {n.metadata.name for n in core.list_node().items}
    specs = [s for p in range(NUM_JOBS) for s in pool_nodes(p) if s["name"] not in existing]
    t0 = time.monotonic()
    names = control_plane.add_nodes(specs)
    # schedulable, not only Ready: the latency measured is the operator's, not node start-up
    control_plane.wait_nodes_ready(names, timeout=300, untainted=True)
    print(f"\nscale: {len(names)} nodes Ready in {time.monotonic() - t0:.1f} s")
    ns = namespace
    try:
        with KopfRunner(operator_args(ns), timeout=120), KubeletStandIn(core, ns) as kubelet, \
                Recorder(core, custom, ns) as seen:
            time.sleep(1)  # the watches are open before the first job
            applied: dict[str, float] = {}
            for p in range(NUM_JOBS):
                name = f"scale-{p:02d}"
                create_job(kube_api, ns, job_manifest(
                    name, model={"preset": "gpt2-small"}, training={"globalBatch": 32},
                    placement={"nodeSelector": {"spantrain.io/pool": f"p{p}"}},
                ))
                applied[name] = time.monotonic()
            created, running = seen.created, seen.running

            def all_running() -> bool:
                if len(running) < NUM_JOBS:  # a Running job whose pods a missed heartbeat
                    now = time.monotonic()  # has since marked NotReady still counts
                    with seen._lock:
                        for name in _reached_running(core, ns) - running.keys():
                            running[name] = now
                return len(created) == len(running) == NUM_JOBS

            try:
                wait_for(all_running, 420, f"{NUM_JOBS} jobs Running", interval=2)
            except BaseException:
                _dump_stuck(custom, core, ns, set(running))
                raise
        lat = sorted(created[j] - applied[j] for j in applied)
        run = sorted(running[j] - applied[j] for j in applied)
        print(f"scale: {NUM_JOBS} jobs on {len(names) or NUM_JOBS * NODES_PER_POOL} nodes; "
              f"apply -> all pods created: median {statistics.median(lat):.2f} s, "
              f"p99 {_p99(lat):.2f} s, max {lat[-1]:.2f} s; apply -> Running: median "
              f"{statistics.median(run):.2f} s, p99 {_p99(run):.2f} s "
              f"({kubelet.fixed} pod(s) marked Ready again after a missed node heartbeat)")
        # context: planning is CPU-bound; the operator runs it in planner processes
        plans = REGISTRY.get_sample_value("spantrain_operator_plan_seconds_count") or 0
        plan_s = REGISTRY.get_sample_value("spantrain_operator_plan_seconds_sum") or 0
        print(f"scale: {plans:.0f} plans in this process, {plan_s / max(plans, 1):.2f} s each "
              f"on average ({plan_s:.1f} s in all)")
        # issue 13's target; on this 2-core machine, alone, p99 was 10.0-12.0 s in 5 runs
        assert _p99(lat) <= P99_TARGET_SECONDS, (
            f"apply -> all pods created p99 {_p99(lat):.2f} s > {P99_TARGET_SECONDS} s")
    finally:
        for spec in specs:
            with contextlib.suppress(Exception):
                core.delete_node(spec["name"])


def _dump_stuck(custom: Any, core: k8s_client.CoreV1Api, ns: str, done: set[str]) -> None:
    """What a job that never reached Running looks like: its status and its pods'."""
    pods = json.loads(core.list_namespaced_pod(ns, _preload_content=False).data)["items"]
    for j in custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"]:
        name = j["metadata"]["name"]
        if name in done:
            continue
        st = j.get("status") or {}
        print(f"stuck {name}: phase={st.get('phase')} ready={st.get('ready')} "
              f"attempt={st.get('attempt')} restarts={st.get('restarts')} "
              f"message={st.get('message')!r}")
        for pod in pods:
            if (pod["metadata"].get("labels") or {}).get("spantrain.io/job-name") != name:
                continue
            pst = pod.get("status") or {}
            conds = {c["type"]: c["status"] for c in pst.get("conditions") or []}
            print(f"  {pod['metadata']['name']} node={pod['spec'].get('nodeName')} "
                  f"phase={pst.get('phase')} conds={conds} "
                  f"deleting={bool(pod['metadata'].get('deletionTimestamp'))}")


def _p99(sorted_values: list[float]) -> float:
    return sorted_values[min(len(sorted_values) - 1, round(0.99 * (len(sorted_values) - 1)))]
