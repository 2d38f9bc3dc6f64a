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
from kubernetes.client.rest import ApiException

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
#: Steps each plan trains before the next fault, so that its throughput can be measured
MEASURE_STEPS = 80


def log(msg: str) -> None:
    print(f"[e2e {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Observation:
    """What the status poller saw: one row per distinct (attempt, step)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    last: dict[str, Any] = field(default_factory=dict)


class JobWatcher(threading.Thread):
    """Polls the job's status every 2 s and keeps what it saw (thread)."""

    def __init__(self, api: k8s_client.ApiClient, name: str) -> None:
        super().__init__(daemon=True)
        self.custom = k8s_client.CustomObjectsApi(api)
        self.core = k8s_client.CoreV1Api(api)
        self.name = name
        self.obs = Observation()
        self.stop = threading.Event()
        self.lock = threading.Lock()
        #: rank 0's log of every attempt, as last read (the operator deletes old pods)
        self.logs: dict[int, str] = {}

    def rank0_log(self, attempt: int) -> str:
        with self.lock:
            return self.logs.get(attempt, "")

    def _read_logs(self) -> None:
        for pod in job_pods(self.core, self.name):
            labels = pod.metadata.labels or {}
            if labels.get("spantrain.io/rank") != "0" or pod.status.phase not in (
                    "Running", "Succeeded", "Failed"):
                continue
            with contextlib.suppress(ApiException):
                text = self.core.read_namespaced_pod_log(pod.metadata.name, NAMESPACE)
                with self.lock:
                    self.logs[int(labels.get("spantrain.io/attempt", "0"))] = text

    def status(self) -> dict[str, Any]:
        with self.lock:
            return dict(self.obs.last)

    def run(self) -> None:
        seen: set[tuple[int, int]] = set()
        tick = 0
        while not self.stop.wait(2.0):
            tick += 1
            if tick % 3 == 0:  # rank 0's log every 6 s
                with contextlib.suppress(Exception):
                    self._read_logs()
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


def resumed_from(log_text: str) -> tuple[bool, int | None]:
    """(started, step): whether rank 0's log has its ``event=start`` line yet, and the step it
    says it resumed from (None: a fresh start)."""
    for line in log_text.splitlines():
        if "event=start" in line and "resumed_from=" in line:
            value = line.split("resumed_from=", 1)[1].split()[0]
            return True, None if value == "none" else int(value)
    return False, None


def step_throughputs(log_text: str) -> list[float]:
    """samples/s of the steps rank 0 logged (every ``logIntervalSteps``), in order."""
    out = []
    for line in log_text.splitlines():
        if "event=step" in line and "samples_per_second=" in line:
            out.append(float(line.split("samples_per_second=", 1)[1].split()[0]))
    return out


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
        """Wait until a checkpoint ``MEASURE_STEPS`` beyond ``past_checkpoint`` exists (long
        enough to measure the attempt's throughput) and training goes on."""
        wait_for(f"a checkpoint {MEASURE_STEPS} steps after step {past_checkpoint}",
                 lambda: (latest_checkpoint(self.checkpoints) or -1)
                 >= past_checkpoint + MEASURE_STEPS, timeout)
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
        started = wait_for(f"{name}: rank 0 of attempt {attempt} started",
                           lambda: resumed_from(self.watcher.rank0_log(attempt))[0], timeout)
        got = resumed_from(self.watcher.rank0_log(attempt))[1] if started else None
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


def helm_install(cluster: RealCluster, image_ref: str, node: str) -> None:
    repo, tag = image_ref.rsplit(":", 1)
    cmd = [
        str(cluster.bin_dir / "helm"), "install", "spantrain", str(REPO / "helm" / "spantrain"),
        "-n", OPERATOR_NS, "--create-namespace",
        "--set", f"image.repository={repo}", "--set", f"image.tag={tag}",
        "--set", "image.pullPolicy=Never",
        # keep the operator off the nodes whose loss the e2e injects
        "--set", f"nodeSelector.kubernetes\\.io/hostname={node}",
        # the chart's default reconcile interval: the measured throughput is the plan's
        # prediction's test, so the harness keeps its own load on the 2 cores low
        "--set", "reconcileInterval=2",
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
    config = prometheus.scrape_config(cp.server, cp.pki.ca_crt, crt, key, NAMESPACE,
                                      operator_namespace=OPERATOR_NS)
    with prometheus.run_prometheus(config) as url:
        yield url


def check_panels(url: str, patience: float = 45.0) -> tuple[int, int, list[str]]:
    """Panels whose query returns data; an empty one is asked again every 3 s for up to
    ``patience`` seconds (after the faults, new worker pods are new scrape targets: their
    series appear a scrape interval or two later)."""
    queries = prometheus.dashboard_queries(
        REPO / "helm" / "spantrain" / "dashboards" / "spantrain.json")
    waiting = list(queries)
    deadline = time.monotonic() + patience
    while True:
        waiting = [(t, e) for t, e in waiting if not prometheus.query_has_data(url, e)]
        if not waiting or time.monotonic() > deadline:
            break
        time.sleep(3)
    empty = [f"{title}: {expr}" for title, expr in waiting]
    panels = {title for title, _ in queries}
    empty_panels = {e.split(":", 1)[0] for e in empty}
    return len(panels) - len(empty_panels), len(panels), empty


CALIBRATION_CLUSTER = """apiVersion: spantrain.io/v1alpha1
kind: Cluster
name: one-device
nodes:
  - {{name: calib, tier: cloud,
     devices: [{{count: 1, accelerator: cpu, computeTflops: {tflops}, memoryBytes: 4Gi,
                layerOverheadUs: {overhead}}}]}}
"""
CALIBRATION_NS = "e2e-calibration"
CALIBRATION_STEPS = 24
#: Two runs per node: one micro-batch and many, which separates the per-layer overhead (paid
#: per micro-batch) from the FLOP/s (paid per sample).
CALIBRATION_MICROBATCHES = (1, 8)


def planner_step_seconds(work: Path, model: str, batch: int, microbatches: int,
                         tflops: float, overhead_us: float) -> float:
    """The planner's predicted step time for the job's model on one device."""
    (work / "one.yaml").write_text(CALIBRATION_CLUSTER.format(tflops=tflops,
                                                              overhead=overhead_us))
    subprocess.run(["spantrain", "plan", str(work / "one.yaml"), "--model", model, "--batch",
                    str(batch), "--microbatches", str(microbatches), "--no-baselines",
                    "-o", str(work / "plan.json")],
                   check=True, capture_output=True, text=True, timeout=120)
    plan = json.loads((work / "plan.json").read_text())
    return float(plan["predicted"]["stepSeconds"])


def fit_device(coeffs: dict[int, tuple[float, float]],
               measured: dict[int, float]) -> tuple[float, float]:
    """(TFLOP/s, per-layer overhead in µs) at which the planner predicts the measured step
    times: the prediction for ``m`` micro-batches is ``A_m / tflops + B_m * overhead``."""
    (a1, b1), (a2, b2) = (coeffs[m] for m in CALIBRATION_MICROBATCHES)
    t1, t2 = (measured[m] for m in CALIBRATION_MICROBATCHES)
    det = a1 * b2 - a2 * b1
    u = (t1 * b2 - t2 * b1) / det
    overhead = (a1 * t2 - a2 * t1) / det
    if overhead < 0 or u <= 0:  # noise: keep the FLOP/s, no overhead
        overhead = 0.0
        u = (a1 * t1 + a2 * t2) / (a1 * a1 + a2 * a2)
    return 1.0 / u, overhead


def calibrate_nodes(cluster: RealCluster, image_ref: str, job: dict[str, Any],
                    work: Path) -> list[str]:
    """Measure every node as the planner will see it (a small profiler): the job's model
    trained on one device in a pod on that node, under the node's CPU quota with the cluster
    running, once with one micro-batch and once with several. The fitted FLOP/s and per-layer
    overhead go into the node's ``spantrain.io/profile`` annotation, which the operator
    prefers to labels. Returns notes."""
    work.mkdir(parents=True, exist_ok=True)
    model = job["spec"]["model"]["preset"]
    batch = int(job["spec"]["training"]["globalBatch"])
    coeffs: dict[int, tuple[float, float]] = {}
    for m in CALIBRATION_MICROBATCHES:
        a = planner_step_seconds(work, model, batch, m, 1.0, 0.0)
        b = (planner_step_seconds(work, model, batch, m, 1.0, 1000.0) - a) / 1000.0
        coeffs[m] = (a, b)
    data: dict[str, str] = {"one.yaml": CALIBRATION_CLUSTER.format(tflops=1.0, overhead=0)}
    runs = []
    for m in CALIBRATION_MICROBATCHES:
        local_job = json.loads(json.dumps(job))
        local_job["spec"]["training"].pop("checkpoint", None)
        local_job["spec"].setdefault("planner", {})["numMicrobatches"] = m
        data[f"job-{m}.yaml"] = yaml.safe_dump(local_job)
        runs.append(
            f"spantrain local /cal/job-{m}.yaml --devices /cal/one.yaml --no-emulation "
            "--no-calibrate "
            f"--steps {CALIBRATION_STEPS} --fresh --out /tmp/out-{m} >/tmp/log 2>&1 "
            f"|| {{ cat /tmp/log; exit 1; }}; sed 's/^/m={m} /' /tmp/out-{m}/losses.jsonl")
    cluster.kubectl("create", "namespace", CALIBRATION_NS)
    manifests: list[dict[str, Any]] = [{
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "calibration", "namespace": CALIBRATION_NS}, "data": data,
    }]
    for node in cluster.nodes:
        manifests.append({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"calibrate-{node.name}", "namespace": CALIBRATION_NS},
            "spec": {
                "nodeName": node.name, "restartPolicy": "Never",
                "tolerations": [{"operator": "Exists"}],
                "containers": [{
                    "name": "calibrate", "image": image_ref, "imagePullPolicy": "Never",
                    "command": ["sh", "-c", " && ".join(runs)],
                    "env": [{"name": "OMP_NUM_THREADS", "value": "1"},
                            {"name": "SPANTRAIN_NUM_THREADS", "value": "1"}],
                    "volumeMounts": [{"name": "cal", "mountPath": "/cal"}],
                }],
                "volumes": [{"name": "cal", "configMap": {"name": "calibration"}}],
            },
        })
    cluster.apply(manifests)
    notes: list[str] = []
    with cluster.api() as api:
        core = k8s_client.CoreV1Api(api)

        def done() -> bool:
            phases = [core.read_namespaced_pod(f"calibrate-{n.name}", CALIBRATION_NS)
                      .status.phase for n in cluster.nodes]
            return all(p in ("Succeeded", "Failed") for p in phases)

        wait_for("calibration pods", done, 900, every=2)
        for node in cluster.nodes:
            out = core.read_namespaced_pod_log(f"calibrate-{node.name}", CALIBRATION_NS)
            measured: dict[int, float] = {}
            for m in CALIBRATION_MICROBATCHES:
                rows = [json.loads(line.split(" ", 1)[1]) for line in out.splitlines()
                        if line.startswith(f"m={m} ")]
                if len(rows) < CALIBRATION_STEPS:
                    raise ClusterError(f"calibration on {node.name} failed:\n{out[-3000:]}")
                measured[m] = statistics.median(
                    r["stepSeconds"] for r in rows[CALIBRATION_STEPS // 3:])
            tflops, overhead = fit_device(coeffs, measured)
            profile = {"computeTflops": round(tflops, 6), "layerOverheadUs": round(overhead, 1),
                       "source": "scripts/e2e calibration",
                       "measuredAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            core.patch_node(node.name, {"metadata": {"annotations": {
                "spantrain.io/profile": json.dumps(profile)}}})
            notes.append(
                f"calibration: {node.name} ({node.cores:.2f} cores) alone: "
                + ", ".join(f"{batch / measured[m]:.1f} samples/s at {m} micro-batch(es)"
                            for m in CALIBRATION_MICROBATCHES)
                + f" -> {tflops * 1e3:.2f} GFLOP/s, {overhead:.0f} µs per layer and pass")
        core.delete_namespace(CALIBRATION_NS)
    return notes


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
    job = yaml.safe_load(JOB_FILE.read_text())
    job_name = job["metadata"]["name"]
    result: dict[str, Any] = {"phase": "NotStarted", "faults": [], "panels": (0, 0, []),
                              "notes": []}
    cluster = RealCluster(
        bin_dir, CLUSTER_FILE, images=[p for _, p in images.values()],
        pause_image=images["pause"][0], coredns_image=images["coredns"][0],
        instance=args.instance, keep_logs=args.keep_logs)
    checkpoints = run_dir(args.instance) / "checkpoints"
    before = set(leftovers(args.instance))  # what others left (not ours to judge)
    try:
        with cluster:
            log(f"cluster up after {time.monotonic() - t0:.0f}s:\n"
                + cluster.kubectl("get", "nodes", "-L", "spantrain.io/tier,"
                                  "spantrain.io/compute-tflops"))
            notes = calibrate_nodes(cluster, image_ref, job,
                                    run_dir(args.instance) / "calibration")
            result["notes"] += notes
            log("\n".join(notes))
            helm_install(cluster, image_ref, cluster.system_node)
            log("chart installed; operator Ready")
            cluster.kubectl("create", "namespace", NAMESPACE)
            checkpoint_volume(cluster, checkpoints)
            with running_prometheus(cluster) as prom, cluster.api() as api:
                watcher = JobWatcher(api, job_name)
                watcher.start()
                job["metadata"]["namespace"] = NAMESPACE
                cluster.apply([job])
                log(f"applied {job_name}")
                # the claim is mounted at spec.training.checkpoint.path
                faults = Faults(cluster, watcher, job_name, checkpoints)
                try:
                    wait_for("Running", lambda: watcher.status().get("phase") == "Running", 600)
                    log(cluster.kubectl("get", "stj", "-n", NAMESPACE, "-o", "wide"))
                    faults.wait_training(-1)
                    faults.kill_worker()
                    faults.wait_training(latest_checkpoint(checkpoints) or 0)
                    faults.lose_node()
                    faults.wait_training(latest_checkpoint(checkpoints) or 0)
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
                result["logs"] = dict(watcher.logs)
                result["status"] = final
    finally:
        result["leftovers"] = [x for x in leftovers(args.instance) if x not in before]
    return report(result, image_mb, len(cluster.nodes), time.monotonic() - t0)


def sim_error(rows: list[dict[str, Any]], logs: dict[int, str]) -> tuple[float, list[str]]:
    """|measured - predicted| / predicted for every attempt that trained long enough: measured
    is the median samples/s of the steps rank 0 logged (after its first two), predicted the
    plan's figure for that attempt; the worst of them."""
    predicted: dict[int, tuple[float, tuple[str, ...]]] = {}
    for row in rows:
        if row["predicted"]:
            predicted[row["attempt"]] = (float(row["predicted"]), row["nodes"])
    notes, errors = [], []
    for attempt, text in sorted(logs.items()):
        rates = step_throughputs(text)[2:]
        if len(rates) < 4 or attempt not in predicted:
            continue
        measured = statistics.median(rates)
        pred, nodes = predicted[attempt]
        errors.append(abs(measured - pred) / pred)
        notes.append(f"attempt {attempt} on {list(nodes)}: measured {measured:.1f} samples/s "
                     f"(median of {len(rates)} logged steps), predicted {pred:.1f} "
                     f"({errors[-1]:.0%} off)")
    if not errors:
        return float("nan"), ["no attempt trained long enough to measure its throughput"]
    return max(errors), notes


def report(result: dict[str, Any], image_mb: int, num_nodes: int, seconds: float) -> int:
    rows = result.get("rows") or []
    losses = [r["loss"] for r in rows if r["loss"] is not None]
    err, err_notes = sim_error(rows, result.get("logs") or {})
    status = result.get("status") or {}
    # the steps trained: rank 0's ``event=done steps=N`` (the status' progress is read every
    # few seconds and may miss the last steps)
    steps = int((status.get("progress") or {}).get("step") or 0)
    for text in (result.get("logs") or {}).values():
        for line in text.splitlines():
            if "event=done" in line and "steps=" in line:
                steps = max(steps, int(line.split("steps=", 1)[1].split()[0]))
    shown, total, _ = result["panels"]
    for note in [*result.get("notes", []), *err_notes]:
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

