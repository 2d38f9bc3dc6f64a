"""The interface gloo and NCCL bind to: the one holding the pod's IP (``SPANTRAIN_POD_IP``),
unless the user chose one; pure choice plus a look at this machine's real interfaces."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("torch")

from spantrain_worker import comm

ADDRS = {"lo": ["127.0.0.1", "::1"], "eth0": ["10.244.1.7", "fd00::7"],
         "veth-a": ["192.168.5.2"]}


def test_picks_the_interface_holding_the_pod_ip() -> None:
    env = {"SPANTRAIN_POD_IP": "192.168.5.2"}
    assert comm.socket_ifname_env(env, ADDRS) == {
        "GLOO_SOCKET_IFNAME": "veth-a", "NCCL_SOCKET_IFNAME": "=veth-a"}
    assert comm.socket_ifname_env({"SPANTRAIN_POD_IP": "fd00:0::7"}, ADDRS)[
        "GLOO_SOCKET_IFNAME"] == "eth0"


def test_leaves_the_users_choice_and_unknown_ips_alone() -> None:
    env = {"SPANTRAIN_POD_IP": "10.244.1.7", "GLOO_SOCKET_IFNAME": "eth1"}
    assert comm.socket_ifname_env(env, ADDRS) == {"NCCL_SOCKET_IFNAME": "=eth0"}
    env["NCCL_SOCKET_IFNAME"] = "ib"
    assert comm.socket_ifname_env(env, ADDRS) == {}
    assert comm.socket_ifname_env({"SPANTRAIN_POD_IP": "10.9.9.9"}, ADDRS) == {}
    assert comm.socket_ifname_env({"SPANTRAIN_POD_IP": "not-an-ip"}, ADDRS) == {}
    assert comm.socket_ifname_env({}, ADDRS) == {}


def test_reads_this_machines_interfaces(monkeypatch: pytest.MonkeyPatch) -> None:
    addrs = comm.local_addresses()
    assert "127.0.0.1" in addrs.get("lo", [])
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        monkeypatch.delenv(var, raising=False)
    chosen = comm.set_socket_ifname({"SPANTRAIN_POD_IP": "127.0.0.1"})
    assert chosen == {"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "=lo"}
    assert os.environ["GLOO_SOCKET_IFNAME"] == "lo"
