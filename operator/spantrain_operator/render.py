"""Render the Kubernetes objects of a SpanTrainJob from its spec and plan.

Role: pure functions from (job identity, spec, plan, node facts) to plain manifests: the plan
ConfigMap (``plan.json`` + ``job.json``, immutable, named by plan hash), the headless Service,
one worker Pod per device (required node affinity to its node, ``nvidia.com/gpu: 1`` on GPU
devices, tolerations for its node's taints, owner reference, labels, the rendezvous
environment of torch and Kubeflow plus ``contract.WorkerEnv``, the plan mounted read-only, the
image of the node's architecture, ``spantrain worker``) and the optional gang-scheduling
PodGroup. Pod names are deterministic (``<job>-a<attempt>-r<rank>``), which is what makes creation
idempotent: a second create of the same pod is a conflict, never a duplicate.

Worker pods are hardened like the operator's Deployment: non-root as the image's user (uid/gid
10001, ``fsGroup`` 10001 so a checkpoint PVC is group-writable), ``RuntimeDefault`` seccomp,
no privilege escalation, every capability dropped, a read-only root filesystem with an
``emptyDir`` at ``/tmp`` for everything the worker, torch and matplotlib write (``HOME``,
``TMPDIR``, ``XDG_CACHE_HOME``, ``MPLCONFIGDIR``, ``TORCHINDUCTOR_CACHE_DIR``,
``TRITON_CACHE_DIR`` point there unless the job's ``env`` sets them).

Network, per pod: with ``addressMode: auto`` a pod on a KubeEdge edge node runs on the host
network (EdgeMesh does not resolve headless Services reliably), every other pod keeps its pod
network and a DNS name in the job's headless Service; ``MASTER_ADDR`` is rank 0's DNS name, or
its node's InternalIP when rank 0 itself is on an edge node. The explicit modes apply to every
pod alike.

Called by ``handlers``; pure. Must not import torch, spantrain_worker, kopf or the Kubernetes
client.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from spantrain_planner import api
from spantrain_planner.core import contract as c
from spantrain_planner.inputs.plan import DeviceAssignment, Plan, StagePlan

from . import settings
from .inventory import UNUSABLE_TAINTS, NodeFacts

DEFAULT_IMAGE = settings.DEFAULT_IMAGE
MANAGED_BY = "spantrain-operator"
CONTAINER = "worker"
PLAN_MOUNT = c.PLAN_MOUNT
METRICS_PORT = c.WORKER_METRICS_PORT
#: The image's user (Dockerfile: ``useradd --uid 10001``); workers run as it.
WORKER_UID = 10001
#: The writable scratch directory (an ``emptyDir``) under the read-only root filesystem.
SCRATCH_MOUNT = c.SCRATCH_MOUNT
#: Where the worker, torch and matplotlib write, all under the scratch ``emptyDir``; a job's
#: ``env`` entry of the same name wins.
SCRATCH_ENV: dict[str, str] = {
    "HOME": SCRATCH_MOUNT,
    "TMPDIR": SCRATCH_MOUNT,
    "XDG_CACHE_HOME": f"{SCRATCH_MOUNT}/cache",
    "MPLCONFIGDIR": f"{SCRATCH_MOUNT}/matplotlib",
    "TORCHINDUCTOR_CACHE_DIR": f"{SCRATCH_MOUNT}/torchinductor",
    "TRITON_CACHE_DIR": f"{SCRATCH_MOUNT}/triton",
    "PYTHONDONTWRITEBYTECODE": "1",
}

L_JOB = "spantrain.io/job-name"
L_STAGE = "spantrain.io/stage-index"
L_REPLICA = "spantrain.io/replica-index"
L_RANK = "spantrain.io/rank"
L_ATTEMPT = "spantrain.io/attempt"
L_PLAN = "spantrain.io/plan-hash"
L_ROLE = "spantrain.io/role"
A_DEVICE = "spantrain.io/device-id"
A_NODE = "spantrain.io/node"


@dataclass(frozen=True)
class JobRef:
    """Identity of the job the objects belong to."""

    name: str
    namespace: str
    uid: str

    def owner_reference(self) -> dict[str, Any]:
        return {
            "apiVersion": api.API_VERSION,
            "kind": api.KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


def job_labels(job: JobRef) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "spantrain",
        "app.kubernetes.io/instance": job.name,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        L_JOB: job.name,
    }


def _meta(job: JobRef, name: str, labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": job.namespace,
        "labels": {**job_labels(job), **(labels or {})},
        "ownerReferences": [job.owner_reference()],
    }


def plan_config_map_name(job_name: str, plan_hash: str) -> str:
    return f"{job_name}-plan-{plan_hash[:10]}"


def service_name(job_name: str) -> str:
    return job_name


def pod_name(job_name: str, attempt: int, rank: int) -> str:
    return f"{job_name}-a{attempt}-r{rank}"


def _job_json(spec: api.SpanTrainJobSpec) -> str:
    return json.dumps(spec.model_dump(mode="json", by_alias=True, exclude_none=True), indent=2)


def config_digest(spec: api.SpanTrainJobSpec, plan: Plan) -> str:
    """Hash of everything the ConfigMap holds: the plan *and* the spec.

    The ConfigMap is immutable and named by this hash, so a spec change that leaves the plan
    as it was (a new learning rate, say) still reaches the next attempt's workers.
    """
    text = plan.digest() + _job_json(spec)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def config_map(job: JobRef, spec: api.SpanTrainJobSpec, plan: Plan,
               replan_inputs: str | None = None) -> dict[str, Any]:
    """The plan ConfigMap: ``plan.json`` (what workers run), ``job.json`` (the spec) and,
    when the job may re-plan, ``replan-inputs.json`` (what its workers plan afresh with)."""
    data = {c.PLAN_FILE: plan.to_json(), c.JOB_FILE: _job_json(spec)}
    if replan_inputs is not None and may_replan(spec):
        data[c.REPLAN_INPUTS_FILE] = replan_inputs
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(
            job, plan_config_map_name(job.name, config_digest(spec, plan)),
            {L_PLAN: plan.digest()},
        ),
        "immutable": True,
        "data": data,
    }


def may_replan(spec: api.SpanTrainJobSpec) -> bool:
    """Whether the workers may stop for a re-plan: the adapter is in ``replan`` mode and a
    checkpoint carries the job across the restart."""
    return spec.planner.adapt == "replan" and bool(spec.training.checkpoint.path)


def service(job: JobRef, spec: api.SpanTrainJobSpec) -> dict[str, Any]:
    """Headless Service giving every worker a DNS name (published before pods are Ready)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(job, service_name(job.name)),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {L_JOB: job.name},
            "ports": [
                {"name": "rendezvous", "port": spec.rendezvous.port, "protocol": "TCP"},
                {"name": "metrics", "port": METRICS_PORT, "protocol": "TCP"},
            ],
        },
    }


def network_policy(
    job: JobRef, spec: api.SpanTrainJobSpec, scrapers: list[dict[str, Any]]
) -> dict[str, Any]:
    """Ingress of the job's worker pods: anything from the job's own pods, the metrics port
    from ``scrapers`` (NetworkPolicy peers, e.g. Prometheus's namespace and pods), nothing
    else.

    Not only the rendezvous port: gloo and NCCL connect every pair of ranks on ports they pick
    at run time, so the job's pods must reach each other on any port. Pods on the host network
    (KubeEdge edge nodes) are outside any NetworkPolicy.
    """
    own = {"podSelector": {"matchLabels": {L_JOB: job.name}}}
    rules: list[dict[str, Any]] = [{"from": [own]}]
    if scrapers:
        rules.append({"from": scrapers, "ports": [{"protocol": "TCP", "port": "metrics"}]})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(job, job.name),
        "spec": {
            "podSelector": {"matchLabels": {L_JOB: job.name}},
            "policyTypes": ["Ingress"],
            "ingress": rules,
        },
    }


def address_mode(spec: api.SpanTrainJobSpec, plan: Plan, nodes: Mapping[str, NodeFacts]) -> str:
    """The job's rendezvous address mode with ``auto`` resolved: ``dns`` when no worker is on a
    KubeEdge edge node, ``hostNetwork`` when every worker is, ``mixed`` otherwise (edge pods
    on the host network, the others on DNS; see ``pod_host_network``)."""
    mode = spec.rendezvous.address_mode
    if mode != "auto":
        return mode
    used = {d.node for s in plan.stages for d in s.devices}
    edge = [_is_edge(nodes.get(n)) for n in sorted(used)]
    if all(edge):
        return "hostNetwork"
    return "mixed" if any(edge) else "dns"


def _is_edge(facts: NodeFacts | None) -> bool:
    return facts is not None and facts.platform == "kubeedge"


def pod_host_network(spec: api.SpanTrainJobSpec, facts: NodeFacts | None) -> bool:
    """Whether the pod on a node with ``facts`` runs on the host network: always in
    ``hostNetwork`` mode, on KubeEdge edge nodes in ``auto`` mode, never otherwise."""
    mode = spec.rendezvous.address_mode
    return mode == "hostNetwork" or (mode == "auto" and _is_edge(facts))


def pod_address_mode(spec: api.SpanTrainJobSpec, facts: NodeFacts | None) -> str:
    """How one pod is reached (``contract.ADDRESS_MODE``): dns, ip or hostNetwork."""
    mode = spec.rendezvous.address_mode
    if mode == "auto":
        return "hostNetwork" if _is_edge(facts) else "dns"
    return mode


def master_address(
    job: JobRef,
    spec: api.SpanTrainJobSpec,
    plan: Plan,
    nodes: Mapping[str, NodeFacts],
    attempt: int,
    rank0_pod_ip: str | None,
) -> str | None:
    """Where every rank finds rank 0; None while it is not known yet (ip mode, no pod IP).

    rank 0 on the pod network (dns mode, auto off the edge): its name in the headless Service;
    ip mode: its pod IP; rank 0 on the host network: its node's InternalIP (its pod IP, which
    is the same address, when the node reports none).
    """
    node0 = plan.stages[0].devices[0].node
    facts = nodes.get(node0)
    mode = pod_address_mode(spec, facts)
    if mode == "dns":
        return f"{pod_name(job.name, attempt, 0)}.{service_name(job.name)}.{job.namespace}.svc"
    if mode == "ip":
        return rank0_pod_ip
    return facts.internal_ip if facts is not None and facts.internal_ip else rank0_pod_ip


def worker_metrics_port(plan: Plan, rank: int, *, host_network: bool) -> int:
    """The metrics port of ``rank``'s pod: ``METRICS_PORT`` on the pod network; on the host
    network ``METRICS_PORT`` + the rank's index among the plan's ranks on the same node, so two
    workers of one node do not collide (rank 0, the one the operator reads, always gets
    ``METRICS_PORT``)."""
    if not host_network:
        return METRICS_PORT
    node = next(d.node for s in plan.stages for d in s.devices if d.rank == rank)
    ranks = sorted(d.rank for s in plan.stages for d in s.devices if d.node == node)
    return METRICS_PORT + ranks.index(rank)


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


#: Pod-level security context of every worker (the image's non-root user).
POD_SECURITY_CONTEXT: dict[str, Any] = {
    "runAsNonRoot": True,
    "runAsUser": WORKER_UID,
    "runAsGroup": WORKER_UID,
    "fsGroup": WORKER_UID,
    # chown a checkpoint volume only when its root does not match yet (large volumes)
    "fsGroupChangePolicy": "OnRootMismatch",
    "seccompProfile": {"type": "RuntimeDefault"},
}
#: Container-level security context of every worker.
CONTAINER_SECURITY_CONTEXT: dict[str, Any] = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}


def _image(spec: api.SpanTrainJobSpec, arch: str, default_image: str) -> str:
    return spec.images.get(arch) or spec.image or default_image


def _tolerations(
    spec: api.SpanTrainJobSpec, facts: NodeFacts | None
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [
        t.model_dump(by_alias=True, exclude_none=True) for t in spec.placement.tolerations
    ]
    if facts is not None and spec.placement.tolerate_node_taints:
        for taint in facts.taints:
            if taint.get("key") in UNUSABLE_TAINTS:
                continue
            tol: dict[str, Any] = {"key": taint.get("key"), "effect": taint.get("effect")}
            if taint.get("value"):
                tol.update(operator="Equal", value=taint.get("value"))
            else:
                tol["operator"] = "Exists"
            if tol not in out:
                out.append(tol)
    grace = spec.failure_policy.node_lost_grace_period_seconds
    for key in ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"):
        out.append(
            {"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": grace}
        )
    return out


def _env(pairs: Mapping[str, str | int]) -> list[dict[str, Any]]:
    return [{"name": k, "value": str(v)} for k, v in pairs.items()]


def _resources(spec: api.SpanTrainJobSpec, gpu: bool) -> dict[str, Any]:
    requests = {k: str(v) for k, v in spec.resources.requests.items()}
    limits = {k: str(v) for k, v in spec.resources.limits.items()}
    if gpu:
        limits["nvidia.com/gpu"] = "1"
        requests["nvidia.com/gpu"] = "1"
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def stage_neighbours(plan: Plan, stage: StagePlan) -> tuple[list[int], list[int]]:
    """Ranks of the previous and of the next stage."""
    s = stage.stage_index
    prev = [d.rank for d in plan.stages[s - 1].devices] if s > 0 else []
    nxt = [d.rank for d in plan.stages[s + 1].devices] if s + 1 < len(plan.stages) else []
    return prev, nxt


@dataclass(frozen=True)
class _Slot:
    """One device of the plan as a pod sees it (what every part of the pod is made from)."""

    job: JobRef
    spec: api.SpanTrainJobSpec
    plan: Plan
    stage: StagePlan
    replica: int
    device: DeviceAssignment
    facts: NodeFacts | None
    attempt: int
    master: str
    host_network: bool
    metrics_port: int

    @property
    def gpu(self) -> bool:
        return self.device.accelerator != "cpu"

    @property
    def name(self) -> str:
        return pod_name(self.job.name, self.attempt, self.device.rank)


def worker_pods(
    job: JobRef,
    spec: api.SpanTrainJobSpec,
    plan: Plan,
    nodes: Mapping[str, NodeFacts],
    *,
    attempt: int,
    rank0_pod_ip: str | None = None,
    default_image: str = DEFAULT_IMAGE,
) -> list[dict[str, Any]]:
    """One Pod per device of the plan, in rank order.

    In ``ip`` address mode, before rank 0 has a pod IP only rank 0's pod is returned; the
    others follow once ``rank0_pod_ip`` is known.
    """
    master = master_address(job, spec, plan, nodes, attempt, rank0_pod_ip)
    cm_name = plan_config_map_name(job.name, config_digest(spec, plan))
    pods: list[dict[str, Any]] = []
    for stage in plan.stages:
        for replica, device in enumerate(stage.devices):
            if master is None and device.rank != 0:
                continue
            facts = nodes.get(device.node)
            host_network = pod_host_network(spec, facts)
            slot = _Slot(job, spec, plan, stage, replica, device, facts, attempt, master or "",
                         host_network,
                         worker_metrics_port(plan, device.rank, host_network=host_network))
            pods.append(_worker_pod(slot, cm_name, default_image))
    return pods


def _worker_pod(slot: _Slot, cm_name: str, default_image: str) -> dict[str, Any]:
    spec, device = slot.spec, slot.device
    mounts, volumes = _volumes(spec, cm_name)
    container = _container(slot, _pod_env(slot), mounts, default_image)
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "securityContext": copy.deepcopy(POD_SECURITY_CONTEXT),
        "containers": [container],
        "volumes": volumes,
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchFields": [
                {"key": "metadata.name", "operator": "In", "values": [device.node]}
            ]}]
        }}},
        "tolerations": _tolerations(spec, slot.facts),
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 30,
    }
    if slot.host_network:
        pod_spec["hostNetwork"] = True
        pod_spec["dnsPolicy"] = "ClusterFirstWithHostNet"
    else:
        pod_spec["hostname"] = slot.name
        pod_spec["subdomain"] = service_name(slot.job.name)
    if slot.gpu and slot.facts is not None and slot.facts.platform == "k3s":
        pod_spec["runtimeClassName"] = "nvidia"
    annotations = {
        A_DEVICE: device.device_id,
        A_NODE: device.node,
        # for annotation-driven Prometheus scrape configs
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(slot.metrics_port),
        "prometheus.io/path": "/metrics",
    }
    labels = {
        L_STAGE: str(slot.stage.stage_index),
        L_REPLICA: str(slot.replica),
        L_RANK: str(device.rank),
        L_ATTEMPT: str(slot.attempt),
        L_PLAN: slot.plan.digest(),
        L_ROLE: "worker",
    }
    _schedule(slot, pod_spec, labels, annotations)
    meta = _meta(slot.job, slot.name, labels)
    meta["annotations"] = annotations
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": pod_spec}


def _pod_env(slot: _Slot) -> list[dict[str, Any]]:
    """Rendezvous (torch's and Kubeflow's names), where the pod sits in the plan, the worker's
    contract, the scratch directories, the job's own ``env``, and the pod's IP."""
    spec, plan, stage, device = slot.spec, slot.plan, slot.stage, slot.device
    prev, nxt = stage_neighbours(plan, stage)
    world, port = plan.world_size, spec.rendezvous.port
    checkpoint = spec.training.checkpoint
    env: dict[str, str | int] = {
        "MASTER_ADDR": slot.master,
        "MASTER_PORT": port,
        "WORLD_SIZE": world,
        "RANK": device.rank,
        "LOCAL_RANK": 0,
        "LOCAL_WORLD_SIZE": 1,
        "PET_MASTER_ADDR": slot.master,
        "PET_MASTER_PORT": port,
        "PET_NNODES": world,
        "PET_NODE_RANK": device.rank,
        "PET_NPROC_PER_NODE": 1,
        "PYTHONUNBUFFERED": 1,
        # for people (kubectl exec, logs): where this pod sits in the plan
        c.ATTEMPT: slot.attempt,
        c.STAGE_INDEX: stage.stage_index,
        c.NUM_STAGES: len(plan.stages),
        c.REPLICA_INDEX: slot.replica,
        c.STAGE_RANKS: ",".join(str(d.rank) for d in stage.devices),
        c.PREV_RANKS: ",".join(map(str, prev)),
        c.NEXT_RANKS: ",".join(map(str, nxt)),
        c.DEVICE_ID: device.device_id,
        c.PLAN_HASH: plan.digest(),
        c.ADDRESS_MODE: pod_address_mode(spec, slot.facts),
    }
    # the worker's contract: plan, job spec (the worker reads its training block)
    env.update(c.WorkerEnv(
        plan_path=f"{c.PLAN_MOUNT}/{c.PLAN_FILE}",
        training_path=f"{c.PLAN_MOUNT}/{c.JOB_FILE}",
        job=slot.job.name, namespace=slot.job.namespace, metrics_port=slot.metrics_port,
        device="cuda" if slot.gpu else "cpu", checkpoint_dir=checkpoint.path or None,
        # the file may be absent (a ConfigMap made without it): the worker then re-balances
        replan_inputs_path=(f"{c.PLAN_MOUNT}/{c.REPLAN_INPUTS_FILE}" if may_replan(spec)
                            else None),
    ).to_env())
    if checkpoint.path:
        env[c.CHECKPOINT_INTERVAL] = checkpoint.interval_steps
    user_env = {e.name for e in spec.env}
    env.update({k: v for k, v in SCRATCH_ENV.items() if k not in user_env})
    return [
        *_env(env),
        *({"name": e.name, "value": e.value} for e in spec.env),
        {"name": c.POD_IP, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
    ]


def _volumes(
    spec: api.SpanTrainJobSpec, cm_name: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The plan (read-only), the scratch ``emptyDir`` and the checkpoint volume: mounts and
    volumes."""
    checkpoint = spec.training.checkpoint
    mounts: list[dict[str, Any]] = [
        {"name": "plan", "mountPath": PLAN_MOUNT, "readOnly": True},
        {"name": "scratch", "mountPath": SCRATCH_MOUNT},
    ]
    volumes: list[dict[str, Any]] = [
        {"name": "plan", "configMap": {"name": cm_name}},
        {"name": "scratch", "emptyDir": {}},
    ]
    if checkpoint.path and (checkpoint.claim_name or not _under(checkpoint.path, SCRATCH_MOUNT)):
        # the root filesystem is read-only: without a claim the checkpoints live in an
        # emptyDir (they survive container restarts, not a new pod)
        mounts.append({"name": "checkpoint", "mountPath": checkpoint.path})
        volumes.append(
            {"name": "checkpoint", "persistentVolumeClaim": {"claimName": checkpoint.claim_name}}
            if checkpoint.claim_name
            else {"name": "checkpoint", "emptyDir": {}}
        )
    return mounts, volumes


def _container(
    slot: _Slot, env: list[dict[str, Any]], mounts: list[dict[str, Any]], default_image: str
) -> dict[str, Any]:
    spec = slot.spec
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": _image(spec, slot.device.arch, default_image),
        # args only: the image's entrypoint (tini -- spantrain) stays PID 1, reaps the
        # worker's children and forwards SIGTERM
        "args": ["worker"],
        "env": env,
        # on the host network a declared port is a host port the scheduler reserves: there
        # only rank 0 (the store) declares the rendezvous port
        "ports": [
            *(
                [{"name": "rendezvous", "containerPort": spec.rendezvous.port}]
                if slot.device.rank == 0 or not slot.host_network
                else []
            ),
            {"name": "metrics", "containerPort": slot.metrics_port},
        ],
        "volumeMounts": mounts,
        "securityContext": copy.deepcopy(CONTAINER_SECURITY_CONTEXT),
    }
    if spec.image_pull_policy:
        container["imagePullPolicy"] = spec.image_pull_policy
    resources = _resources(spec, slot.gpu)
    if resources:
        container["resources"] = resources
    return container


def _schedule(
    slot: _Slot, pod_spec: dict[str, Any], labels: dict[str, str], annotations: dict[str, str]
) -> None:
    """Gang scheduling, scheduler, priority and service account (in place)."""
    spec, sched = slot.spec, slot.spec.scheduling
    if sched.gang == "volcano":
        pod_spec["schedulerName"] = "volcano"
        annotations["scheduling.k8s.io/group-name"] = pod_group_name(slot.job.name, slot.attempt)
        if sched.queue:
            annotations["scheduling.volcano.sh/queue-name"] = sched.queue
    elif sched.gang == "coscheduling":
        labels["scheduling.x-k8s.io/pod-group"] = pod_group_name(slot.job.name, slot.attempt)
    if sched.scheduler_name:
        pod_spec["schedulerName"] = sched.scheduler_name
    if sched.priority_class_name:
        pod_spec["priorityClassName"] = sched.priority_class_name
    if spec.service_account_name:
        pod_spec["serviceAccountName"] = spec.service_account_name
    else:
        # workers never call the API: no token unless the job names an account
        pod_spec["automountServiceAccountToken"] = False


def pod_group_name(job_name: str, attempt: int) -> str:
    return f"{job_name}-a{attempt}"


def pod_group(
    job: JobRef, spec: api.SpanTrainJobSpec, plan: Plan, attempt: int
) -> dict[str, Any] | None:
    """The gang-scheduling PodGroup (all workers or none), or None without gang scheduling."""
    sched = spec.scheduling
    name = pod_group_name(job.name, attempt)
    if sched.gang == "volcano":
        body: dict[str, Any] = {"minMember": plan.world_size}
        if sched.queue:
            body["queue"] = sched.queue
        if sched.priority_class_name:
            body["priorityClassName"] = sched.priority_class_name
        return {
            "apiVersion": "scheduling.volcano.sh/v1beta1",
            "kind": "PodGroup",
            "metadata": _meta(job, name),
            "spec": body,
        }
    if sched.gang == "coscheduling":
        return {
            "apiVersion": "scheduling.x-k8s.io/v1alpha1",
            "kind": "PodGroup",
            "metadata": _meta(job, name),
            "spec": {
                "minMember": plan.world_size,
                "scheduleTimeoutSeconds": sched.schedule_timeout_seconds,
            },
        }
    return None
