"""A real multi-node Kubernetes cluster on one Linux machine, its nodes the testbed's devices.

Role: ``RealCluster`` starts the control plane of :mod:`tests.cluster.controlplane` (without
KWOK) and, for every node of a cluster description (``examples/clusters/*.yaml``, one device per
node), a real node: its own containerd (own root, state and socket), runc, bridge CNI with its
own pod network, kubelet and kube-proxy, all inside the device's network namespace of a
:class:`spantrain_testbed.Testbed`. So links between nodes are the testbed's kernel token
buckets (traffic to a node's pod network is shaped like traffic to the node), and every node's
pods run under the device's CPU quota (the kubelet's ``cgroupRoot`` is the device's cgroup).
Nodes are labelled from the same description the planner reads (``spantrain.io/*``, tier;
KubeEdge's label and taint on edge nodes). CoreDNS runs as a Deployment. ``stop`` (and
``sweep`` after a crash) leaves no process, mount, namespace, bridge, cgroup or iptables
chain behind.

``python -m tests.cluster.realnodes up|down|status`` (``scripts/cluster``) runs it by hand.
Facts and traps: ``../shared/reference/real-nodes.md``.

Must not import the SpanTrain code under test except the testbed (kernel plumbing) and the
planner's cluster description reader; no torch, kopf or operator.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes import client as k8s_client
from kubernetes.client.rest import ApiException

from spantrain_planner.inputs.cluster import ClusterSpec, Topology, load_cluster, resolve
from spantrain_testbed import cgroups as tb_cgroups
from spantrain_testbed.testbed import Testbed
from spantrain_testbed.testbed import sweep as testbed_sweep
from tests.cluster.controlplane import (
    ControlPlane,
    ControlPlaneError,
    _Proc,
    issue_cert,
    log_tail,
    spawn_logged,
    write_kubeconfig,
)

#: Everything of instance N lives under these (short: unix socket paths are ≤ 107 bytes).
RUN_ROOT = Path("/run/spantrain-cluster")
CACHE_ROOT = Path(os.environ.get("SPANTRAIN_CACHE", Path.home() / ".cache" / "spantrain"))
CLUSTER_CIDR = "10.244.0.0/16"
DNS_SERVICE_IP = "10.96.0.10"
CLUSTER_DOMAIN = "cluster.local"
CNI_BIN_DIR = "/usr/lib/cni"
KUBELET_PORT = 10250
#: KubeEdge marks its edge nodes with this label (and keeps cloud workloads off them with a
#: taint of the same key).
EDGE_ROLE = "node-role.kubernetes.io/edge"
#: Controllers every other cgroup v1 hierarchy needs the kubelet's cgroupRoot in (the testbed
#: makes cpu and cpuacct).
_OTHER_HIERARCHIES = ("cpuset", "memory", "devices", "freezer", "blkio", "pids", "systemd")
CGROUP_ROOT = Path("/sys/fs/cgroup")


class ClusterError(RuntimeError):
    """A node failed to come up; the message names it and carries its log tail."""


def pod_cidr(index: int) -> str:
    return f"10.244.{index}.0/24"


def host_address(instance: int) -> str:
    """The root namespace's address on the testbed's bridge: the control plane listens here."""
    return f"10.210.{instance}.254"


def run_dir(instance: int) -> Path:
    return RUN_ROOT / f"i{instance}"


def state_file(instance: int) -> Path:
    return RUN_ROOT / f"i{instance}.json"


def _run(cmd: Sequence[str], check: bool = True, timeout: float = 120) -> str:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, check=False, timeout=timeout)
    if check and proc.returncode != 0:
        raise ClusterError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


@dataclass(frozen=True)
class RealNode:
    """One Kubernetes node: a testbed device with its own runtime and pod network."""

    instance: int
    index: int
    name: str
    netns: str
    address: str
    cores: float
    dir: Path
    labels: Mapping[str, str]
    taints: tuple[Mapping[str, str], ...]

    @property
    def socket(self) -> Path:
        return self.dir / "containerd.sock"

    @property
    def cgroup_parent(self) -> str:
        """The kubelet's cgroupRoot: the device's testbed cgroup (its CPU quota)."""
        return "/" + str(self.cgroup_rel)

    @property
    def cgroup_rel(self) -> Path:
        return Path(tb_cgroups.device_group(self.instance, self.index).relative_to(
            tb_cgroups.CPU_ROOT))

    def nsenter(self) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.netns}", "--"]


DEVICE_PLUGIN_SOCKET = Path("/var/lib/kubelet/device-plugins/kubelet.sock")


def _inode(path: Path) -> tuple[int, int] | None:
    """The file's identity (inode and change time: an inode number can be reused)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_ctime_ns


def node_labels(spec: ClusterSpec, topology: Topology) -> dict[str, dict[str, str]]:
    """The ``spantrain.io/*`` labels of each node, from the description the planner reads.

    The description's compute is relative (it sets the CPU quotas); what a node really does is
    measured and written to its ``spantrain.io/profile`` annotation (``scripts/e2e``), which
    the operator prefers to labels.
    """
    out: dict[str, dict[str, str]] = {}
    for node in spec.nodes:
        device = next(d for d in topology.devices if d.node == node.name)
        tflops = device.flops / 1e12
        labels = {
            "spantrain.io/tier": node.tier,
            "spantrain.io/compute-tflops": f"{tflops:.6g}",
            "spantrain.io/memory-bytes": str(device.memory_bytes),
        }
        if node.bandwidth_mbps is not None:
            labels["spantrain.io/bandwidth-mbps"] = f"{node.bandwidth_mbps:g}"
        if node.latency_ms is not None:
            labels["spantrain.io/latency-ms"] = f"{node.latency_ms:g}"
        if node.zone:
            labels["topology.kubernetes.io/zone"] = node.zone
        if node.platform == "kubeedge":
            labels[EDGE_ROLE] = ""
        out[node.name] = labels
    return out


# ---------------------------------------------------------------------------------------------
# configuration files (pure text)


def containerd_config(node: RealNode, pause_image: str, root: Path) -> str:
    return f"""version = 2
root = "{root}"
state = "{node.dir / 'containerd'}"
[grpc]
  address = "{node.socket}"
[ttrpc]
  address = "{node.socket}.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{node.dir / 'opt'}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause_image}"
  # the CRI plugin sets oom_score_adj -998, which needs CAP_SYS_RESOURCE (not held here)
  restrict_oom_score_adj = true
  # pod network namespaces under the state dir, not /run/netns (the testbed's namespaces live
  # there and `ip netns` re-bind-mounts it, which would leak copies of pod namespaces)
  netns_mounts_under_state_dir = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{node.dir / 'cni'}"
"""


def cni_config(node: RealNode) -> str:
    return json.dumps({
        "cniVersion": "1.0.0",
        "name": "spantrain",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": True,
                # pods keep their source address between nodes (no masquerade)
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": pod_cidr(node.index)}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(node.dir / "ipam"),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }, indent=1)


def kubelet_config(node: RealNode, ca: Path, crt: Path, key: Path) -> str:
    cfg = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": node.address,
        "port": KUBELET_PORT,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": 10248,
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(ca)},
        },
        "authorization": {"mode": "Webhook"},
        "tlsCertFile": str(crt),
        "tlsPrivateKeyFile": str(key),
        "containerRuntimeEndpoint": f"unix://{node.socket}",
        # cgroup v1, no systemd: containerd 1.x cannot report its driver, so both say cgroupfs
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": node.cgroup_parent,
        "cgroupsPerQOS": True,
        "failCgroupV1": False,
        "failSwapOn": False,
        "clusterDNS": [DNS_SERVICE_IP],
        "clusterDomain": CLUSTER_DOMAIN,
        "resolvConf": str(node.dir / "resolv.conf"),
        "podLogsDir": str(node.dir / "pod-logs"),
        "serializeImagePulls": False,
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%",
                         "imagefs.available": "1%", "nodefs.inodesFree": "1%"},
        "maxPods": 30,
        "nodeStatusUpdateFrequency": "4s",
        "nodeStatusReportFrequency": "10s",
        "syncFrequency": "10s",
        "fileCheckFrequency": "10s",
        "rotateCertificates": False,
        "serverTLSBootstrap": False,
        "registerNode": True,
        "registerWithTaints": [dict(t) for t in node.taints],
        "localStorageCapacityIsolation": True,
        "shutdownGracePeriod": "0s",
    }
    return json.dumps(cfg, indent=1)


def kube_proxy_config(node: RealNode, kubeconfig: Path) -> str:
    return json.dumps({
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "mode": "iptables",
        "clusterCIDR": CLUSTER_CIDR,
        "hostnameOverride": node.name,
        "bindAddress": node.address,
        "healthzBindAddress": "127.0.0.1:10256",
        "metricsBindAddress": "127.0.0.1:10249",
        # leave the machine-wide conntrack table size alone (only the initial namespace has it)
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s",
                      "tcpCloseWaitTimeout": "0s"},
    }, indent=1)


def coredns_manifests(image: str, node: str) -> list[dict[str, Any]]:
    """CoreDNS as a Deployment behind ``kube-dns`` (ttl 2: a name looked up before its pod
    existed is not cached as missing for 30 s)."""
    labels = {"k8s-app": "kube-dns"}
    corefile = f""".:53 {{
    errors
    health :8080
    ready :8181
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 2
    }}
    cache 2
}}
"""
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": "coredns", "namespace": "kube-system"}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": "system:coredns"},
         "rules": [
             {"apiGroups": [""], "resources": ["endpoints", "services", "pods", "namespaces"],
              "verbs": ["list", "watch"]},
             {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
              "verbs": ["list", "watch"]},
         ]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "system:coredns"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                     "name": "system:coredns"},
         "subjects": [{"kind": "ServiceAccount", "name": "coredns",
                       "namespace": "kube-system"}]},
        {"apiVersion": "v1", "kind": "ConfigMap",
         "metadata": {"name": "coredns", "namespace": "kube-system"},
         "data": {"Corefile": corefile}},
        {"apiVersion": "apps/v1", "kind": "Deployment",
         "metadata": {"name": "coredns", "namespace": "kube-system", "labels": labels},
         "spec": {
             "replicas": 1,
             "selector": {"matchLabels": labels},
             "template": {
                 "metadata": {"labels": labels},
                 "spec": {
                     "serviceAccountName": "coredns",
                     "dnsPolicy": "Default",
                     "priorityClassName": "system-cluster-critical",
                     "nodeSelector": {"kubernetes.io/hostname": node},
                     "containers": [{
                         "name": "coredns",
                         "image": image,
                         "imagePullPolicy": "Never",
                         "args": ["-conf", "/etc/coredns/Corefile"],
                         "ports": [
                             {"name": "dns", "containerPort": 53, "protocol": "UDP"},
                             {"name": "dns-tcp", "containerPort": 53, "protocol": "TCP"},
                         ],
                         "volumeMounts": [{"name": "config", "mountPath": "/etc/coredns",
                                           "readOnly": True}],
                         "readinessProbe": {"httpGet": {"path": "/ready", "port": 8181},
                                            "periodSeconds": 2},
                         "livenessProbe": {"httpGet": {"path": "/health", "port": 8080},
                                           "periodSeconds": 10},
                         "securityContext": {
                             "allowPrivilegeEscalation": False,
                             "readOnlyRootFilesystem": True,
                             "capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]},
                         },
                     }],
                     "volumes": [{"name": "config", "configMap": {"name": "coredns"}}],
                 },
             },
         }},
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": "kube-dns", "namespace": "kube-system", "labels": labels},
         "spec": {
             "clusterIP": DNS_SERVICE_IP,
             "selector": labels,
             "ports": [{"name": "dns", "port": 53, "protocol": "UDP"},
                       {"name": "dns-tcp", "port": 53, "protocol": "TCP"}],
         }},
    ]


# ---------------------------------------------------------------------------------------------
# processes


def _stop_proc(proc: _Proc, grace: float = 10.0) -> None:
    if proc.popen.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.popen.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.popen.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.popen.wait(timeout=5)
    proc.log_file.close()


def _mounts_under(prefixes: Sequence[Path]) -> list[str]:
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            point = line.split()[1].replace("\\040", " ")
            if any(point == str(p) or point.startswith(str(p) + "/") for p in prefixes):
                out.append(point)
    return sorted(set(out), key=lambda p: -p.count("/"))


def _unmount_all(prefixes: Sequence[Path]) -> None:
    for _ in range(5):
        points = _mounts_under(prefixes)
        if not points:
            return
        for point in points:
            subprocess.run(["umount", point], capture_output=True, check=False)
            if point in _mounts_under(prefixes):
                subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def _kill_matching(pattern: str) -> None:
    """SIGKILL every process whose command line contains ``pattern`` (shims of a node's
    containerd name its socket)."""
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
        except OSError:
            continue
        if pattern in cmdline:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(entry.name), signal.SIGKILL)


def _cgroup_dirs(instance: int, index: int | None) -> list[Path]:
    out = []
    for h in _OTHER_HIERARCHIES:
        base = CGROUP_ROOT / h / f"stb{instance}"
        out.append(base if index is None else base / f"d{index}")
    return out


def _make_cgroups(instance: int, indices: Sequence[int]) -> None:
    for h in _OTHER_HIERARCHIES:
        parent = CGROUP_ROOT / h / f"stb{instance}"
        if not (CGROUP_ROOT / h).is_dir():
            continue
        parent.mkdir(exist_ok=True)
        for k in indices:
            (parent / f"d{k}").mkdir(exist_ok=True)
        if h == "cpuset":  # a cpuset child starts empty and then holds no task
            cpus = (CGROUP_ROOT / h / "cpuset.cpus").read_text().strip()
            mems = (CGROUP_ROOT / h / "cpuset.mems").read_text().strip()
            for d in (parent, *(parent / f"d{k}" for k in indices)):
                (d / "cpuset.cpus").write_text(cpus)
                (d / "cpuset.mems").write_text(mems)


def _remove_cgroup_tree(top: Path) -> None:
    if not top.is_dir():
        return
    dirs = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
    for d in [*dirs, top]:
        with contextlib.suppress(OSError):
            for pid in (d / "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        for _ in range(50):
            try:
                d.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.1)


def sweep(instance: int) -> None:
    """Remove everything a (possibly crashed) cluster instance left: processes, containers,
    mounts, cgroups, namespaces, links, routes, state."""
    rd = run_dir(instance)
    _kill_matching(str(rd) + "/")
    # container processes live in the nodes' cgroups; the testbed kills cpu-cgroup members
    for top in _cgroup_dirs(instance, None):
        _remove_cgroup_tree(top)
    _unmount_all([rd, CACHE_ROOT / "cluster" / f"i{instance}"])
    testbed_sweep(instance)
    shutil.rmtree(rd, ignore_errors=True)
    shutil.rmtree(CACHE_ROOT / "cluster" / f"i{instance}", ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        state_file(instance).unlink()


# ---------------------------------------------------------------------------------------------
# the cluster


class RealCluster:
    """Control plane + real nodes on a testbed; a context manager.

    ``images`` are docker archives imported into every node's containerd (kept between runs in
    ``$SPANTRAIN_CACHE/cluster``, so a warm start imports only what changed); ``pause_image``
    and ``coredns_image`` name refs among them.
    """

    def __init__(
        self,
        bin_dir: Path,
        cluster_file: Path,
        *,
        images: Sequence[Path],
        pause_image: str,
        coredns_image: str,
        instance: int = 60,
        budget_cores: float = 1.2,
        keep_logs: Path | None = None,
    ) -> None:
        self.bin_dir = bin_dir
        self.spec = load_cluster(cluster_file)
        self.topology = resolve(self.spec)
        if len(self.topology.devices) != len(self.spec.nodes):
            raise ClusterError(
                f"{cluster_file}: every node must have exactly one device (a node is one "
                f"testbed device); it has {len(self.topology.devices)} devices on "
                f"{len(self.spec.nodes)} nodes")
        self.images = list(images)
        self.pause_image = pause_image
        self.coredns_image = coredns_image
        self.instance = instance
        self.budget_cores = budget_cores
        self.keep_logs = keep_logs
        self.testbed = Testbed(
            self.topology, instance=instance, budget_cores=budget_cores,
            routed={k: [pod_cidr(k)] for k in range(len(self.spec.nodes))},
        )
        self.control_plane = ControlPlane(bin_dir, host=host_address(instance), kwok=False)
        self.nodes: list[RealNode] = []
        self._procs: dict[str, _Proc] = {}
        self._stopped_nodes: set[str] = set()
        self.labels = node_labels(self.spec, self.topology)

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> RealCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def kubeconfig(self) -> Path:
        return self.control_plane.kubeconfig

    @property
    def log_dir(self) -> Path:
        return run_dir(self.instance) / "logs"

    def start(self) -> RealCluster:
        if os.geteuid() != 0:
            raise ClusterError("real nodes need root (namespaces, cgroups, mounts)")
        sweep(self.instance)
        rd = run_dir(self.instance)
        rd.mkdir(parents=True)
        self.log_dir.mkdir()
        state_file(self.instance).write_text(json.dumps({"owner_pid": os.getpid()}))
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        inst = self.instance
        self.testbed.up()
        net = self.testbed.net
        host = host_address(inst)
        _run(["ip", "addr", "add", f"{host}/24", "dev", net.bridge])
        for k, dev in enumerate(net.devices):
            _run(["ip", "route", "replace", pod_cidr(k), "via", dev.address])
        _make_cgroups(inst, [d.index for d in net.devices])
        rd = run_dir(inst)
        for k, (node_spec, dev) in enumerate(zip(self.spec.nodes, net.devices, strict=True)):
            taints: tuple[Mapping[str, str], ...] = ()
            if node_spec.platform == "kubeedge":
                taints = ({"key": EDGE_ROLE, "effect": "NoSchedule"},)
            self.nodes.append(RealNode(
                instance=inst, index=k, name=node_spec.name, netns=dev.netns, address=dev.address,
                cores=self.testbed.quotas[k].cores, dir=rd / f"n{k}",
                labels=self.labels[node_spec.name], taints=taints,
            ))
        for node in self.nodes:
            ns = ["ip", "netns", "exec", node.netns]
            _run([*ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
            # pod -> Service -> pod on the same bridge: the reply must see kube-proxy's NAT
            _run([*ns, "sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1"], check=False)
            _run([*ns, "ip", "route", "replace", self.control_plane.service_cidr, "via", host])
            for other in self.nodes:
                if other.index != node.index:
                    _run([*ns, "ip", "route", "replace", pod_cidr(other.index), "via",
                          other.address])
        cp = self.control_plane
        cp.start()
        # prepare node files and certificates, start the runtimes, import images (slow) in
        # parallel with the kubelets' wait for them
        proxy_crt, proxy_key = issue_cert(cp.pki.dir, "kube-proxy", "/CN=system:kube-proxy")
        template = self._image_template()
        for node in self.nodes:
            self._write_node_files(node, proxy_crt, proxy_key)
            clone_root(template, self._node_root(node))
        for node in self.nodes:
            self._procs[f"containerd-{node.name}"] = spawn_logged(
                f"containerd-{node.name}",
                [*node.nsenter(), "containerd", "--config", str(node.dir / "containerd.toml")],
                self.log_dir)
        for node in self.nodes:
            self._wait_containerd(node)
        for node in self.nodes:
            self._start_node_agents(node)
        self.wait_nodes_ready([n.name for n in self.nodes], timeout=120)
        self._label_nodes()
        self.apply(coredns_manifests(self.coredns_image, self.system_node))
        self.wait_deployment("kube-system", "coredns", timeout=120)

    def _write_node_files(self, node: RealNode, proxy_crt: Path, proxy_key: Path) -> None:
        cp = self.control_plane
        d = node.dir
        for sub in ("cni", "ipam", "pod-logs", "kubelet", "opt"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        (d / "containerd.toml").write_text(
            containerd_config(node, self.pause_image, self._node_root(node)))
        (d / "cni" / "10-spantrain.conflist").write_text(cni_config(node))
        (d / "resolv.conf").write_text(f"nameserver {host_address(self.instance)}\n")
        pki = cp.pki.dir
        crt, key = issue_cert(pki, f"node-{node.index}", f"/O=system:nodes/CN=system:node:"
                              f"{node.name}")
        serve_crt, serve_key = issue_cert(
            pki, f"kubelet-{node.index}", f"/CN={node.name}",
            server_sans=[f"IP:{node.address}", f"DNS:{node.name}"])
        write_kubeconfig(d / "kubelet.kubeconfig", cp.server, cp.pki.ca_crt, crt, key,
                         f"system:node:{node.name}")
        write_kubeconfig(d / "kube-proxy.kubeconfig", cp.server, cp.pki.ca_crt, proxy_crt,
                         proxy_key, "system:kube-proxy")
        (d / "kubelet.json").write_text(kubelet_config(node, cp.pki.ca_crt, serve_crt, serve_key))
        (d / "kube-proxy.json").write_text(kube_proxy_config(node, d / "kube-proxy.kubeconfig"))

    def _ctr(self, node: RealNode, *args: str, timeout: float = 600) -> str:
        return _run(["ctr", "--address", str(node.socket), "-n", "k8s.io", *args],
                    timeout=timeout)

    def _wait_containerd(self, node: RealNode, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        proc = self._procs[f"containerd-{node.name}"]
        while True:
            if proc.popen.poll() is not None:
                raise ClusterError(f"containerd of {node.name} exited:\n{log_tail(proc.log_path)}")
            if node.socket.exists():
                with contextlib.suppress(ClusterError, subprocess.TimeoutExpired):
                    self._ctr(node, "version", timeout=5)
                    return
            if time.monotonic() > deadline:
                raise ClusterError(f"containerd of {node.name} not up after {timeout:.0f}s:\n"
                                   f"{log_tail(proc.log_path)}")
            time.sleep(0.2)

    def _node_root(self, node: RealNode) -> Path:
        return CACHE_ROOT / "cluster" / f"i{self.instance}" / f"n{node.index}"

    def _image_template(self) -> Path:
        """A containerd root with every image imported and unpacked, made once per set of
        images (cached). Nodes start from hard-linked clones of it: the image is several GB
        (amd64 torch with its CUDA wheels), and unpacking it once per node would cost that
        much disk and time again for every node."""
        refs = sorted(archive_ref(a) for a in self.images)
        key = hashlib.sha256("\n".join(refs).encode()).hexdigest()[:12]
        base = CACHE_ROOT / "cluster"
        template = base / f"template-{key}"
        if (template / ".complete").exists():
            return template
        base.mkdir(parents=True, exist_ok=True)
        for old in base.glob("template-*"):
            shutil.rmtree(old, ignore_errors=True)
        state = run_dir(self.instance) / "template"
        state.mkdir(parents=True, exist_ok=True)
        sock = state / "containerd.sock"
        (state / "config.toml").write_text(
            f'version = 2\nroot = "{template}"\nstate = "{state / "state"}"\n'
            f'[grpc]\n  address = "{sock}"\n[ttrpc]\n  address = "{sock}.ttrpc"\n'
            f'[plugins."io.containerd.internal.v1.opt"]\n  path = "{state / "opt"}"\n')
        proc = spawn_logged("containerd-template",
                      ["containerd", "--config", str(state / "config.toml")], self.log_dir)
        try:
            deadline = time.monotonic() + 60
            while subprocess.run(["ctr", "--address", str(sock), "version"],
                                 capture_output=True, check=False, timeout=10).returncode:
                if time.monotonic() > deadline or proc.popen.poll() is not None:
                    raise ClusterError(f"containerd for the image template did not start:\n"
                                       f"{log_tail(proc.log_path)}")
                time.sleep(0.3)
            for archive in self.images:
                log_progress(f"importing {archive.name} into the node image template")
                cmd = ["ctr", "--address", str(sock), "-n", "k8s.io", "images", "import",
                       str(archive)]
                try:
                    _run(cmd, timeout=1800)
                except ClusterError as err:  # seen once: "parent snapshot ... does not exist"
                    log_progress(f"import failed, once more: {err}")
                    _run(cmd, timeout=1800)
            # unpacked layers are all a node needs (CRI's discard_unpacked_layers does the
            # same for pulled images): drop the compressed copies, several GB
            for digest in layer_digests(self.images):
                _run(["ctr", "--address", str(sock), "-n", "k8s.io", "content", "rm", digest],
                     check=False)
        finally:
            _stop_proc(proc)
            _kill_matching(str(sock))
            _unmount_all([template, state])
        (template / ".complete").write_text("\n".join(refs) + "\n")
        return template

    def _start_node_agents(self, node: RealNode) -> None:
        d = node.dir
        bins = self.bin_dir
        # every kubelet binds the same /var/lib/kubelet/device-plugins/kubelet.sock (the path
        # is fixed, not under --root-dir): one removes the file and binds while another does
        # the same, and the loser exits with "address already in use". Start them one after
        # another: each waits for the previous one's socket (a later kubelet then replaces
        # the file; the earlier keeps its unlinked socket, which nothing here uses).
        before = _inode(DEVICE_PLUGIN_SOCKET)
        self._procs[f"kubelet-{node.name}"] = spawn_logged(f"kubelet-{node.name}", [
            *node.nsenter(), str(bins / "kubelet"),
            f"--config={d / 'kubelet.json'}",
            f"--kubeconfig={d / 'kubelet.kubeconfig'}",
            f"--root-dir={d / 'kubelet'}",
            f"--cert-dir={d / 'kubelet' / 'pki'}",
            f"--hostname-override={node.name}",
            f"--node-ip={node.address}",
            # lowering its own oom_score_adj needs CAP_SYS_RESOURCE
            "--oom-score-adj=0",
            "--v=1",
        ], self.log_dir)
        self._procs[f"kube-proxy-{node.name}"] = spawn_logged(f"kube-proxy-{node.name}", [
            *node.nsenter(), str(bins / "kube-proxy"), f"--config={d / 'kube-proxy.json'}",
            "--v=1",
        ], self.log_dir)
        deadline = time.monotonic() + 60
        while _inode(DEVICE_PLUGIN_SOCKET) in (None, before) and time.monotonic() < deadline:
            if self._procs[f"kubelet-{node.name}"].popen.poll() is not None:
                break  # wait_nodes_ready reports the kubelet's exit with its log
            time.sleep(0.1)

    def _label_nodes(self) -> None:
        with self.api() as api:
            core = k8s_client.CoreV1Api(api)
            for node in self.nodes:
                core.patch_node(node.name, {"metadata": {"labels": dict(node.labels)}})

    def stop_node(self, name: str) -> None:
        """Stop a node as a machine stops: its kubelet, kube-proxy, containers and runtime."""
        node = next(n for n in self.nodes if n.name == name)
        for part in ("kube-proxy", "kubelet"):
            proc = self._procs.pop(f"{part}-{name}", None)
            if proc is not None:
                _stop_proc(proc, grace=2)
        self._remove_pods(node)
        proc = self._procs.pop(f"containerd-{name}", None)
        if proc is not None:
            _stop_proc(proc)
        _kill_matching(str(node.socket))
        _remove_cgroup_tree_children(node)
        _unmount_all([node.dir])
        self._stopped_nodes.add(name)

    def _remove_pods(self, node: RealNode) -> None:
        if not node.socket.exists():
            return
        crictl = [str(self.bin_dir / "crictl"), "--runtime-endpoint", f"unix://{node.socket}",
                  "--timeout", "30s"]
        _run([*crictl, "rmp", "--all", "--force"], check=False, timeout=120)

    def stop(self) -> None:
        """Tear everything down (idempotent): pods, nodes, control plane, testbed."""
        for node in self.nodes:
            if node.name not in self._stopped_nodes:
                with contextlib.suppress(Exception):
                    self.stop_node(node.name)
        for proc in list(self._procs.values()):
            _stop_proc(proc)
        self._procs.clear()
        if self.keep_logs is not None and self.log_dir.is_dir():
            shutil.copytree(self.log_dir, self.keep_logs, dirs_exist_ok=True)
        self.control_plane.stop()
        sweep(self.instance)

    # -- helpers ---------------------------------------------------------------------------

    def api(self) -> k8s_client.ApiClient:
        return self.control_plane.api_client()

    def env(self) -> dict[str, str]:
        return self.control_plane.env()

    def kubectl(self, *args: str, check: bool = True, timeout: float = 120) -> str:
        proc = subprocess.run(
            [str(self.bin_dir / "kubectl"), *args], capture_output=True, text=True,
            env=self.env(), check=False, timeout=timeout)
        if check and proc.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)}: {proc.stderr.strip()}")
        return proc.stdout

    def apply(self, manifests: Sequence[Mapping[str, Any]]) -> None:
        text = json.dumps({"apiVersion": "v1", "kind": "List", "items": list(manifests)})
        proc = subprocess.run(
            [str(self.bin_dir / "kubectl"), "apply", "--server-side", "-f", "-"],
            input=text, capture_output=True, text=True, env=self.env(), check=False,
            timeout=120)
        if proc.returncode != 0:
            raise ClusterError(f"kubectl apply: {proc.stderr.strip()}")

    def wait_nodes_ready(self, names: Sequence[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = set(names)
        with self.api() as api:
            core = k8s_client.CoreV1Api(api)
            while pending:
                for item in core.list_node().items:
                    conds = {c.type: c.status for c in (item.status.conditions or [])}
                    if conds.get("Ready") == "True":
                        pending.discard(item.metadata.name)
                if not pending:
                    return
                if time.monotonic() > deadline:
                    tails = "\n".join(
                        f"--- kubelet-{n} ---\n{log_tail(self.log_dir / f'kubelet-{n}.log')}"
                        for n in sorted(pending))
                    raise ClusterError(f"nodes not Ready after {timeout:.0f}s: "
                                       f"{sorted(pending)}\n{tails}")
                for proc in self._procs.values():
                    if proc.popen.poll() is not None:
                        raise ClusterError(f"{proc.name} exited ({proc.popen.returncode}):\n"
                                           f"{log_tail(proc.log_path)}")
                time.sleep(0.5)

    def wait_deployment(self, namespace: str, name: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self.api() as api:
            apps = k8s_client.AppsV1Api(api)
            while True:
                try:
                    dep = apps.read_namespaced_deployment(name, namespace)
                    if (dep.status.available_replicas or 0) >= (dep.spec.replicas or 1):
                        return
                except ApiException as exc:
                    if exc.status != 404:
                        raise
                if time.monotonic() > deadline:
                    raise ClusterError(
                        f"deployment {namespace}/{name} not available after {timeout:.0f}s:\n"
                        + self.kubectl("get", "pods", "-A", "-o", "wide", check=False)
                        + self.kubectl("describe", "pods", "-n", namespace, check=False)[-3000:])
                time.sleep(1)

    @property
    def system_node(self) -> str:
        """The node cluster services (CoreDNS) run on: the first cloud node."""
        return next((n.name for n in self.spec.nodes if n.tier == "cloud"),
                    self.spec.nodes[0].name)

    def node_by_name(self, name: str) -> RealNode:
        return next(n for n in self.nodes if n.name == name)

    def crictl(self, node: RealNode, *args: str) -> str:
        return _run([str(self.bin_dir / "crictl"), "--runtime-endpoint",
                     f"unix://{node.socket}", *args])


#: Processes a cluster runs; none may survive its teardown.
CLUSTER_PROCESSES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler",
                     "kubelet", "kube-proxy", "containerd", "containerd-shim-runc-v2", "coredns",
                     "prometheus")


def leftovers(instance: int) -> list[str]:
    """What a torn-down instance left on the machine (empty when clean): processes, mounts,
    namespaces, links, cgroups and iptables chains."""
    found: list[str] = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                comm = (entry / "comm").read_text().strip()
                if comm in CLUSTER_PROCESSES:
                    found.append(f"process {comm} ({entry.name})")
    found += [f"mount {m}" for m in _mounts_under([RUN_ROOT, CACHE_ROOT / "cluster"])]
    links = [line.split(":")[1].strip().split("@")[0]
             for line in _run(["ip", "-o", "link", "show"]).splitlines() if ":" in line]
    found += [f"link {name}" for name in links if name.startswith(f"stb{instance}-")]
    found += [f"netns {line.split()[0]}" for line in _run(["ip", "netns", "list"]).splitlines()
              if line.startswith(f"stb{instance}-")]
    found += [f"cgroup {d}" for d in _cgroup_dirs(instance, None) if d.exists()]
    found += [f"cgroup {tb_cgroups.group(instance)}"] if tb_cgroups.group(instance).exists() else []
    chains = _run(["iptables-save"], check=False)
    found += [f"iptables {line}" for line in chains.splitlines()
              if line.startswith(":") and (line[1:].startswith(("KUBE-", "CNI-")))]
    return found


def _remove_cgroup_tree_children(node: RealNode) -> None:
    """Kill what still runs in a node's cgroups and remove the kubelet's sub-groups (the
    device's own group stays: the testbed owns it)."""
    inst = node.instance
    tops = [CGROUP_ROOT / h / f"stb{inst}" / f"d{node.index}"
            for h in (*_OTHER_HIERARCHIES, "cpu", "cpuacct")]
    for top in tops:
        if top.is_dir():
            for child in [p for p in top.iterdir() if p.is_dir()]:
                _remove_cgroup_tree(child)


def log_progress(message: str) -> None:
    print(f"[cluster] {message}", file=sys.stderr, flush=True)


def clone_root(template: Path, root: Path) -> None:
    """A node's containerd root as a hard-linked copy of ``template``: image content and
    unpacked layers (read-only overlay lower dirs) are shared, while the bolt databases, which
    containerd writes in place, are real copies."""
    shutil.rmtree(root, ignore_errors=True)
    root.parent.mkdir(parents=True, exist_ok=True)
    _run(["cp", "-al", str(template), str(root)], timeout=600)
    for db in root.rglob("*.db"):
        data = db.read_bytes()
        db.unlink()
        db.write_bytes(data)
    with contextlib.suppress(FileNotFoundError):
        (root / ".complete").unlink()


def layer_digests(archives: Sequence[Path]) -> list[str]:
    """The layer blobs of docker archives, as containerd names them (sha256 of the tar)."""
    import tarfile

    out = []
    for archive in archives:
        with tarfile.open(archive) as tar:
            member = tar.extractfile("manifest.json")
            assert member is not None
            for layer in json.load(member)[0].get("Layers") or []:
                name = Path(layer).name
                stem = name.split(".")[0]
                if re.fullmatch(r"[0-9a-f]{64}", stem):
                    out.append(f"sha256:{stem}")
                elif re.fullmatch(r"[0-9a-f]{64}", Path(layer).parent.name):
                    out.append(f"sha256:{Path(layer).parent.name}")
    return out


def archive_ref(archive: Path) -> str:
    """The image reference a docker archive carries (its manifest's first RepoTag)."""
    import tarfile

    with tarfile.open(archive) as tar:
        member = tar.extractfile("manifest.json")
        if member is None:
            raise ClusterError(f"{archive}: no manifest.json (not a docker archive)")
        manifest = json.load(member)
    tags = manifest[0].get("RepoTags") or []
    if not tags:
        raise ClusterError(f"{archive}: the image has no tag")
    ref = str(tags[0])
    return ref if "/" in ref.split(":")[0] or ref.startswith("localhost/") else (
        f"docker.io/library/{ref}")


# ---------------------------------------------------------------------------------------------
# command line: scripts/cluster


def images_from_script(repo: Path) -> dict[str, tuple[str, Path]]:
    """Run ``scripts/image`` (builds or reuses); name -> (ref, archive)."""
    out = _run([str(repo / "scripts" / "image")], timeout=7200)
    found: dict[str, tuple[str, Path]] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] in ("spantrain", "pause", "coredns"):
            found[parts[0]] = (parts[1], Path(parts[2]))
    missing = {"spantrain", "pause", "coredns"} - found.keys()
    if missing:
        raise ClusterError(f"scripts/image printed no line for {sorted(missing)}:\n{out}")
    return found


def _main(argv: Sequence[str] | None = None) -> int:
    repo = Path(__file__).resolve().parents[2]
    parser = argparse.ArgumentParser(
        prog="scripts/cluster",
        description="A real multi-node Kubernetes cluster on this machine (root): control "
        "plane, CoreDNS, and one node (containerd + kubelet + kube-proxy) per device of a "
        "cluster description, each in a testbed network namespace with token-bucket links and "
        "a CPU quota. `up` stays in the foreground until Ctrl-C (or `down`).")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the cluster and wait (Ctrl-C tears it down)")
    up.add_argument("--cluster", type=Path, default=repo / "examples/clusters/e2e-real.yaml",
                    help="cluster description, one device per node (default: %(default)s)")
    up.add_argument("--instance", type=int, default=60, help="testbed instance (10.210.N.0/24)")
    up.add_argument("--budget-cores", type=float, default=1.2,
                    help="CPU cores all nodes' pods share, in proportion to their compute")
    down = sub.add_parser("down", help="stop a running `up` and remove whatever it left")
    down.add_argument("--instance", type=int, default=60)
    args = parser.parse_args(argv)
    if args.command == "down":
        state = state_file(args.instance)
        if state.exists():
            pid = json.loads(state.read_text()).get("owner_pid")
            with contextlib.suppress(ProcessLookupError, TypeError):
                os.kill(int(pid), signal.SIGTERM)
                for _ in range(600):
                    os.kill(int(pid), 0)
                    time.sleep(0.1)
        sweep(args.instance)
        print(f"cluster instance {args.instance}: removed")
        return 0
    bin_dir = Path(_run([str(repo / "scripts" / "k8s-binaries")], timeout=7200).split()[-1])
    images = images_from_script(repo)
    cluster = RealCluster(
        bin_dir, args.cluster, images=[p for _, p in images.values()],
        pause_image=images["pause"][0], coredns_image=images["coredns"][0],
        instance=args.instance, budget_cores=args.budget_cores)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with cluster:
        print(f"export KUBECONFIG={cluster.kubeconfig}")
        print(cluster.kubectl("get", "nodes", "-o", "wide"))
        print(f"spantrain image: {images['spantrain'][0]}  (Ctrl-C or `scripts/cluster down` "
              "to stop)", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while not stop.wait(1.0):
                pass
    return 0


if __name__ == "__main__":
    sys.exit(_main())


__all__ = ["ClusterError", "ControlPlaneError", "RealCluster", "RealNode", "sweep"]
