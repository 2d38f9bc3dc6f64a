"""End to end as a user meets SpanTrain: image, real nodes, ``helm install``, a job, faults,
Prometheus — ``scripts/e2e``.

Role: build or reuse the binaries and the images, bring up :class:`RealCluster` (real kubelets
and containerd on testbed devices), install the chart with the built image, ``kubectl apply``
a SpanTrainJob and follow it to ``Succeeded`` through three faults (a worker container
killed, a node stopped and deleted, the operator pod deleted), check every panel query of the
chart's dashboard against a real Prometheus that discovers the pods through the API server,
tear everything down and check that nothing is left. Prints one table of what it measured and,
last, the machine-readable line::

    e2e_nodes=<n> job=<phase> steps=<n> loss_first=<x> loss_last=<x> sim_error=<x>
    faults_survived=<n>/3 panels_with_data=<n>/<m> image_mb=<n>

Must not import the operator or worker code under test (it drives them as a user does, through
``kubectl``/``helm`` and the API); the planner only for reading the cluster description.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client as k8s_client

from tests.cluster.realnodes import (
    ClusterError,
    RealCluster,
    images_from_script,
    leftovers,
    run_dir,
)
from tests.e2e import prometheus

REPO = Path(__file__).resolve().parents[2]
NAMESPACE = "e2e"
OPERATOR_NS = "spantrain"
JOB_FILE = REPO / "examples" / "jobs" / "gpt-e2e.yaml"
CLUSTER_FILE = REPO / "examples" / "clusters" / "e2e-real.yaml"
GROUP, VERSION, PLURAL = "spantrain.io", "v1alpha1", "spantrainjobs"
PVC_NAME = "spantrain-checkpoints"
NUM_FAULTS = 3


def log(msg: str) -> None:
    print(f"[e2e {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Observation:
    """What the status poller saw: one row per distinct (attempt, step)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    last: dict[str, Any] = field(default_factory=dict)


class JobWatcher(threading.Thread):
    """Polls the job's status once a second and keeps what it saw (thread)."""

    def __init__(self, api: k8s_client.ApiClient, name: str) -> None:
        super().__init__(daemon=True)
        self.custom = k8s_client.CustomObjectsApi(api)
        self.name = name
        self.obs = Observation()
        self.stop = threading.Event()
        self.lock = threading.Lock()

    def status(self) -> dict[str, Any]:
        with self.lock:
            return dict(self.obs.last)

    def run(self) -> None:
        seen: set[tuple[int, int]] = set()
        while not self.stop.wait(1.0):
            try:
                obj = self.custom.get_namespaced_custom_object(
                    GROUP, VERSION, NAMESPACE, PLURAL, self.name)
            except Exception:
                continue
            st = obj.get("status") or {}
            prog = st.get("progress") or {}
            key = (int(st.get("attempt") or 0), int(prog.get("step") or 0))
            with self.lock:
                self.obs.last = st
                if prog and key not in seen and prog.get("loss") is not None:
                    seen.add(key)
                    self.obs.rows.append({
                        "attempt": key[0], "step": key[1], "loss": prog.get("loss"),
                        "measured": prog.get("samplesPerSecond"),
                        "predicted": prog.get("predictedSamplesPerSecond"),
                        "plan": (st.get("plan") or {}).get("hash"),
                        "nodes": tuple((st.get("plan") or {}).get("nodes") or ()),
                        "phase": st.get("phase"),
                    })


def wait_for(what: str, check: Callable[[], Any], timeout: float, every: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout:.0f}s")
        time.sleep(every)


def latest_checkpoint(root: Path) -> int | None:
    steps = [int(p.name.split("-")[1]) for p in root.glob("step-*") if (p / "meta.json").exists()]
    return max(steps) if steps else None


def job_pods(core: k8s_client.CoreV1Api, job: str) -> list[k8s_client.V1Pod]:
    return list(core.list_namespaced_pod(
        NAMESPACE, label_selector=f"spantrain.io/job-name={job}").items)


def resumed_from(cluster: RealCluster, pod: str) -> int | None:
    """The step rank 0 of ``pod`` says it resumed from (its ``event=start`` log line)."""
    out = cluster.kubectl("logs", "-n", NAMESPACE, pod, check=False)
    for line in out.splitlines():
        if "event=start" in line and "resumed_from=" in line:
            value = line.split("resumed_from=", 1)[1].split()[0]
            return None if value == "none" else int(value)
    return None


def rank0_pod(core: k8s_client.CoreV1Api, job: str, attempt: int) -> str | None:
    for pod in job_pods(core, job):
        labels = pod.metadata.labels or {}
        if labels.get("spantrain.io/attempt") == str(attempt) and labels.get(
                "spantrain.io/rank") == "0":
            return str(pod.metadata.name)
    return None


def no_duplicates(core: k8s_client.CoreV1Api, job: str) -> str | None:
    """None when every live (attempt, rank) has one pod and only the current attempt runs."""
    seen: dict[tuple[str, str], str] = {}
    for pod in job_pods(core, job):
        if pod.metadata.deletion_timestamp:
            continue
        labels = pod.metadata.labels or {}
        key = (labels.get("spantrain.io/attempt", "?"), labels.get("spantrain.io/rank", "?"))
        if key in seen:
            return f"two pods for attempt/rank {key}: {seen[key]}, {pod.metadata.name}"
        seen[key] = pod.metadata.name
    attempts = {a for a, _ in seen}
    if len(attempts) > 1:
        return f"pods of several attempts alive at once: {sorted(attempts)}"
    return None


class Faults:
    """The three faults, each checked for survival."""

    def __init__(self, cluster: RealCluster, watcher: JobWatcher, job: str,
                 checkpoints: Path) -> None:
        self.cluster = cluster
        self.watcher = watcher
        self.job = job
        self.checkpoints = checkpoints
        self.survived: list[str] = []
        self.notes: list[str] = []
        self.api = cluster.api()
        self.core = k8s_client.CoreV1Api(self.api)

    def _progress(self) -> tuple[int, int]:
        st = self.watcher.status()
        return int(st.get("attempt") or 0), int((st.get("progress") or {}).get("step") or 0)

    def wait_training(self, past_checkpoint: int, timeout: float = 600) -> int:
        """Wait until a checkpoint beyond ``past_checkpoint`` exists and training goes on."""
        wait_for(f"a checkpoint after step {past_checkpoint}",
                 lambda: (latest_checkpoint(self.checkpoints) or -1) > past_checkpoint,
                 timeout)
        ckpt = latest_checkpoint(self.checkpoints) or 0
        wait_for(f"training past step {ckpt + 2}", lambda: self._progress()[1] >= ckpt + 2,
                 timeout)
        return ckpt

    def _fault_checkpoint(self) -> int | None:
        """The newest checkpoint once the old attempt has stopped making any (its peers
        block on the lost rank at once; a save in flight commits within a moment)."""
        time.sleep(3)
        return latest_checkpoint(self.checkpoints)

    def _check_resume(self, name: str, before_attempt: int, ckpt: int | None,
                      timeout: float = 600) -> bool:
        """A new attempt resumed from exactly the newest checkpoint and trains on."""
        attempt = wait_for(f"{name}: a new attempt",
                           lambda: self._progress()[0] > before_attempt and self._progress()[0],
                           timeout)
        wait_for(f"{name}: training after the restart",
                 lambda: self._progress()[0] >= attempt and self._progress()[1] > (ckpt or 0),
                 timeout)
        attempt = self._progress()[0]
        pod = rank0_pod(self.core, self.job, attempt)
        got = resumed_from(self.cluster, pod) if pod else None
        ok = got is not None and got == ckpt
        self.notes.append(f"{name}: newest checkpoint at the fault {ckpt}, attempt {attempt} "
                          f"resumed from {got}")
        return ok

    def kill_worker(self) -> None:
        """A worker container killed (SIGKILL of its process, as the OOM killer would)."""
        attempt, _ = self._progress()
        victim = None
        for pod in job_pods(self.core, self.job):
            if (pod.metadata.labels or {}).get("spantrain.io/rank") != "0" and pod.status.phase \
                    == "Running":
                victim = pod
        victim = victim or job_pods(self.core, self.job)[-1]
        node = self.cluster.node_by_name(victim.spec.node_name)
        cid = (victim.status.container_statuses or [])[0].container_id.split("://", 1)[1]
        info = json.loads(self.cluster.crictl(node, "inspect", cid))
        pid = int(info["info"]["pid"])
        log(f"fault 1: SIGKILL worker {victim.metadata.name} (pid {pid} on {node.name})")
        os.kill(pid, 9)
        ckpt = self._fault_checkpoint()
        if self._check_resume("worker killed", attempt, ckpt):
            self.survived.append("worker-killed")

    def lose_node(self) -> None:
        """A node stopped (kubelet, runtime, containers) and its Node deleted."""
        attempt, _ = self._progress()
        replans = int(self.watcher.status().get("replans") or 0)
        plan = self.watcher.status().get("plan") or {}
        busy = set()
        for pod in self.core.list_pod_for_all_namespaces().items:
            if pod.metadata.namespace != NAMESPACE and pod.spec.node_name:
                busy.add(pod.spec.node_name)  # CoreDNS, the operator: keep them
        candidates = [n for n in plan.get("nodes", []) if n not in busy]
        if not candidates:
            raise ClusterError(f"no plan node free of system pods to stop: plan "
                               f"{plan.get('nodes')}, system pods on {sorted(busy)}")
        victim = candidates[-1]
        log(f"fault 2: stopping node {victim} and deleting it")
        self.cluster.stop_node(victim)
        self.core.delete_node(victim)
        ckpt = self._fault_checkpoint()

        def replanned() -> bool:
            st = self.watcher.status()
            return int(st.get("replans") or 0) > replans and victim not in (
                (st.get("plan") or {}).get("nodes") or [])

        wait_for(f"a re-plan without {victim}", replanned, 300)
        nodes = (self.watcher.status().get("plan") or {}).get("nodes") or []
        self.notes.append(f"node lost: {victim} stopped and deleted, re-planned onto {nodes}")
        if self._check_resume("node lost", attempt, ckpt):
            self.survived.append("node-lost")

    def delete_operator(self) -> None:
        """The operator pod deleted: the Deployment replaces it; no duplicate workers."""
        attempt, step = self._progress()
        pods = self.core.list_namespaced_pod(
            OPERATOR_NS, label_selector="app.kubernetes.io/name=spantrain").items
        names = [p.metadata.name for p in pods]
        log(f"fault 3: deleting operator pod(s) {names}")
        for name in names:
            self.core.delete_namespaced_pod(name, OPERATOR_NS)

        def new_operator_ready() -> bool:
            for p in self.core.list_namespaced_pod(
                    OPERATOR_NS, label_selector="app.kubernetes.io/name=spantrain").items:
                if p.metadata.name in names:
                    continue
                conds = {c.type: c.status for c in (p.status.conditions or [])}
                if conds.get("Ready") == "True":
                    return True
            return False

        wait_for("a new operator pod Ready", new_operator_ready, 300)
        dup = None
        for _ in range(20):  # the new operator's first reconciles
            dup = dup or no_duplicates(self.core, self.job)
            time.sleep(1)
        wait_for("training after the operator restart",
                 lambda: self._progress()[1] > step + 2 or self.watcher.status().get(
                     "phase") == "Succeeded", 600)
        same_attempt = self._progress()[0] == attempt
        self.notes.append(f"operator deleted: duplicates={dup or 'none'}, attempt "
                          f"{attempt}->{self._progress()[0]}")
        if dup is None and same_attempt:
            self.survived.append("operator-deleted")


def helm_install(cluster: RealCluster, image_ref: str) -> None:
    repo, tag = image_ref.rsplit(":", 1)
    cmd = [
        str(cluster.bin_dir / "helm"), "install", "spantrain", str(REPO / "helm" / "spantrain"),
        "-n", OPERATOR_NS, "--create-namespace",
        "--set", f"image.repository={repo}", "--set", f"image.tag={tag}",
        "--set", "image.pullPolicy=Never",
        # keep the operator off the nodes whose loss the e2e injects
        "--set", "nodeSelector.spantrain\\.io/tier=cloud",
        "--set", "reconcileInterval=1",
        "--wait", "--timeout", "5m",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=cluster.env(), check=False,
                          timeout=400)
    if proc.returncode != 0:
        raise ClusterError(f"helm install failed: {proc.stderr}\n"
                           + cluster.kubectl("get", "pods", "-A", "-o", "wide", check=False)
                           + cluster.kubectl("describe", "pods", "-n", OPERATOR_NS,
                                             check=False)[-4000:])


def checkpoint_volume(cluster: RealCluster, path: Path) -> None:
    """A hostPath-backed ReadWriteMany PersistentVolume: every node shares this machine's disk
    (a real cluster needs NFS or another RWX storage class)."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o777)
    cluster.apply([
        {"apiVersion": "v1", "kind": "PersistentVolume",
         "metadata": {"name": "spantrain-e2e-checkpoints"},
         "spec": {"capacity": {"storage": "5Gi"}, "accessModes": ["ReadWriteMany"],
                  "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "",
                  "hostPath": {"path": str(path), "type": "Directory"}}},
        {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
         "metadata": {"name": PVC_NAME, "namespace": NAMESPACE},
         "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "",
                  "volumeName": "spantrain-e2e-checkpoints",
                  "resources": {"requests": {"storage": "5Gi"}}}},
    ])


@contextlib.contextmanager
def running_prometheus(cluster: RealCluster) -> Iterator[str]:
    cp = cluster.control_plane
    crt, key = cp.pki.clients["admin"]
    config = prometheus.scrape_config(cp.server, cp.pki.ca_crt, crt, key, NAMESPACE)
    with prometheus.run_prometheus(config) as url:
        yield url


def check_panels(url: str) -> tuple[int, int, list[str]]:
    queries = prometheus.dashboard_queries(
        REPO / "helm" / "spantrain" / "dashboards" / "spantrain.json")
    empty = [f"{title}: {expr}" for title, expr in queries
             if not prometheus.query_has_data(url, expr)]
    panels = {title for title, _ in queries}
    empty_panels = {e.split(":", 1)[0] for e in empty}
    return len(panels) - len(empty_panels), len(panels), empty


CALIBRATION_CLUSTER = """apiVersion: spantrain.io/v1alpha1
kind: Cluster
name: one-core
nodes:
  - {name: calib, tier: cloud,
     devices: [{count: 1, accelerator: cpu, computeTflops: 1.0, memoryBytes: 4Gi}]}
"""


def calibrate(work: Path, steps: int = 24) -> tuple[float, str]:
    """This machine's effective FLOP/s on one core for the e2e job's model, as the planner
    counts it: the job trained on one device at full speed (one thread) for a few steps,
    measured samples/s over what the planner predicts for a 1-TFLOP/s device. The nodes are
    labelled with this times their CPU quota, so the plan's prediction is for the real nodes."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "one.yaml").write_text(CALIBRATION_CLUSTER)
    out = work / "run"
    subprocess.run(
        ["spantrain", "local", str(JOB_FILE), "--devices", str(work / "one.yaml"),
         "--no-emulation", "--steps", str(steps), "--fresh", "--out", str(out)],
        check=True, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "SPANTRAIN_NUM_THREADS": "1"})
    rows = [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]
    measured = statistics.median(r["samplesPerSecond"] for r in rows[steps // 2:])
    plan = json.loads((out / "plan.json").read_text())
    predicted = float(plan["predicted"]["samplesPerSecond"])
    flops = 1e12 * measured / predicted
    return flops, (f"calibration: one core trains {measured:.1f} samples/s, the planner "
                   f"predicts {predicted:.1f} at 1 TFLOP/s -> {flops / 1e9:.2f} GFLOP/s per core")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/e2e",
        description="From helm install to a trained model on real nodes (root): builds or "
        "reuses the binaries and images, starts a real multi-node cluster, installs the chart, "
        "trains a job through three faults, checks the dashboard against Prometheus and tears "
        "everything down.")
    parser.add_argument("--instance", type=int, default=61)
    parser.add_argument("--keep-logs", type=Path, default=None,
                        help="copy every component's log here before tearing down")
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    bin_dir = Path(subprocess.run([str(REPO / "scripts" / "k8s-binaries")], check=True,
                                  capture_output=True, text=True).stdout.split()[-1])
    images = images_from_script(REPO)
    image_ref, image_archive = images["spantrain"]
    image_mb = round(image_archive.stat().st_size / 2**20)
    log(f"binaries and images ready after {time.monotonic() - t0:.0f}s ({image_ref}, "
        f"{image_mb} MB)")
    flops_per_core, calib_note = calibrate(run_dir(args.instance).with_name(
        f"calibration-{args.instance}"))
    log(calib_note)
    job = yaml.safe_load(JOB_FILE.read_text())
    job_name = job["metadata"]["name"]
    result: dict[str, Any] = {"phase": "NotStarted", "faults": [], "panels": (0, 0, []),
                              "notes": [calib_note]}
    cluster = RealCluster(
        bin_dir, CLUSTER_FILE, images=[p for _, p in images.values()],
        pause_image=images["pause"][0], coredns_image=images["coredns"][0],
        instance=args.instance, keep_logs=args.keep_logs, flops_per_core=flops_per_core)
    checkpoints = run_dir(args.instance) / "checkpoints"
    before = set(leftovers(args.instance))  # what others left (not ours to judge)
    try:
        with cluster:
            log(f"cluster up after {time.monotonic() - t0:.0f}s:\n"
                + cluster.kubectl("get", "nodes", "-L", "spantrain.io/tier,"
                                  "spantrain.io/compute-tflops"))
            helm_install(cluster, image_ref)
            log("chart installed; operator Ready")
            cluster.kubectl("create", "namespace", NAMESPACE)
            checkpoint_volume(cluster, checkpoints)
            with running_prometheus(cluster) as prom, cluster.api() as api:
                watcher = JobWatcher(api, job_name)
                watcher.start()
                job["metadata"]["namespace"] = NAMESPACE
                cluster.apply([job])
                log(f"applied {job_name}")
                faults = Faults(cluster, watcher, job_name, checkpoints / job_name)
                try:
                    wait_for("Running", lambda: watcher.status().get("phase") == "Running", 600)
                    log(cluster.kubectl("get", "stj", "-n", NAMESPACE, "-o", "wide"))
                    faults.wait_training(-1)
                    faults.kill_worker()
                    faults.wait_training(latest_checkpoint(checkpoints / job_name) or 0)
                    faults.lose_node()
                    faults.wait_training(latest_checkpoint(checkpoints / job_name) or 0)
                    faults.delete_operator()
                    time.sleep(6)  # a few scrapes after the last fault
                    result["panels"] = check_panels(prom)
                    log(f"panels with data: {result['panels'][0]}/{result['panels'][1]}"
                        + "".join(f"\n  no data: {e}" for e in result["panels"][2]))
                finally:
                    result["faults"] = faults.survived
                    result["notes"] += faults.notes
                final = wait_for("Succeeded or Failed", lambda: watcher.status().get("phase")
                                 in ("Succeeded", "Failed") and watcher.status(), 900)
                result["phase"] = final.get("phase")
                log(cluster.kubectl("get", "stj", "-n", NAMESPACE, "-o", "wide"))
                watcher.stop.set()
                result["rows"] = list(watcher.obs.rows)
                result["status"] = final
    finally:
        result["leftovers"] = [x for x in leftovers(args.instance) if x not in before]
    return report(result, image_mb, len(cluster.nodes), time.monotonic() - t0)


def sim_error(rows: list[dict[str, Any]]) -> tuple[float, str]:
    """|measured - predicted| / predicted for the first plan (median of its steady steps)."""
    if not rows:
        return float("nan"), "no progress seen"
    first_plan = rows[0]["plan"]
    steady = [r for r in rows if r["plan"] == first_plan and r["attempt"] == rows[0]["attempt"]
              and r["measured"]][2:]
    if not steady or not steady[0]["predicted"]:
        return float("nan"), "no measured throughput for the first plan"
    measured = statistics.median(r["measured"] for r in steady)
    predicted = float(steady[0]["predicted"])
    return abs(measured - predicted) / predicted, (
        f"first plan on {list(rows[0]['nodes'])}: measured {measured:.2f} samples/s (median of "
        f"{len(steady)} readings), predicted {predicted:.2f}")


def report(result: dict[str, Any], image_mb: int, num_nodes: int, seconds: float) -> int:
    rows = result.get("rows") or []
    losses = [r["loss"] for r in rows if r["loss"] is not None]
    err, err_note = sim_error(rows)
    status = result.get("status") or {}
    steps = int((status.get("progress") or {}).get("step") or 0)
    shown, total, _ = result["panels"]
    for note in [*result.get("notes", []), err_note]:
        print(f"  {note}")
    left = result.get("leftovers") or []
    print(f"  leftovers after teardown: {left or 'none'}")
    print(f"  wall time: {seconds:.0f}s")
    print(f"e2e_nodes={num_nodes} job={result['phase']} steps={steps} "
          f"loss_first={losses[0] if losses else float('nan'):.4f} "
          f"loss_last={losses[-1] if losses else float('nan'):.4f} sim_error={err:.3f} "
          f"faults_survived={len(result['faults'])}/{NUM_FAULTS} "
          f"panels_with_data={shown}/{total} image_mb={image_mb}", flush=True)
    return 0 if result["phase"] == "Succeeded" and not left else 1


if __name__ == "__main__":
    sys.exit(main())

