"""Command line of the testbed: ``spantrain testbed up|down|status|run`` (root needed).

Role: thin argparse front for ``spantrain_testbed.testbed``; prints what it did. ``up`` leaves
the instance in place (persistent) until ``down``; ``run`` starts a command on one device of a
live instance, or with ``--cluster`` brings a temporary one up around the command. Registered
as the ``testbed`` subcommand of ``spantrain`` (entry-point group ``spantrain.commands``);
``python -m spantrain_testbed`` is the same.

Must not import torch, ``spantrain_worker`` or ``spantrain_operator``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from spantrain_planner.core import contract
from spantrain_planner.core.errors import InputError
from spantrain_planner.inputs.cluster import load_cluster, resolve

from . import cgroups
from .testbed import Testbed, TestbedError, status, sweep, sweep_all

DESCRIPTION = (
    "Emulate a heterogeneous cluster on this machine: one network namespace per device, "
    "token-bucket links, CPU-quota devices."
)
EPILOG = (
    "Bandwidth is enforced per ordered node pair with tc htb/tbf token buckets, compute per "
    "device with cgroup v1 CPU quotas proportional to FLOP/s. Latency is NOT emulated (no "
    "netem in this kernel). Names: stbN-* (namespaces, links), cgroups stbN, subnet "
    "10.210.N.0/24, state in /run/spantrain-testbed/."
)


def _build(args: argparse.Namespace, persistent: bool) -> Testbed:
    topology = resolve(load_cluster(args.cluster))
    return Testbed(
        topology,
        instance=args.instance,
        budget_cores=args.budget_cores,
        cores_per_tflops=args.cores_per_tflops,
        bandwidth_scale=args.bandwidth_scale,
        persistent=persistent,
    )


def _print_status(entries: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print(json.dumps(entries, indent=1))
        return
    if not entries:
        print("no testbed instance on this machine")
    for e in entries:
        owner = "persistent" if e["owner_pid"] is None else f"owner pid {e['owner_pid']}"
        if e["state"] and not e["owner_alive"]:
            owner += " (dead: leftover, `down` removes it)"
        print(f"instance {e['instance']}: {e['cluster'] or '(no state file: leftover)'}, {owner};"
              f" {e['namespaces']} namespaces, {e['links']} links, cgroups "
              f"{'yes' if e['cgroups'] else 'no'}, {e['processes']} processes")
        for d in e.get("devices", []):
            print(f"  {d['device']:<24} {d['netns']:<10} {d['address']:<14} {d['ifname']:<10}"
                  f" {d['cores']:.3f} cores  cpu {d['cpu_seconds']} s")
        for s in e.get("shaping", []):
            where = f"{s['netns']}:{s['interface']}" if s["netns"] else s["interface"]
            print(f"  {s['kind']} on {where}: {'; '.join(s['classes'])}")


def add_testbed_parser(subparsers: Any) -> None:
    """Register ``spantrain testbed`` (the ``spantrain.commands`` entry point)."""
    parser = subparsers.add_parser(
        "testbed",
        help="emulate a heterogeneous cluster on this machine (root: namespaces, cgroups)",
        description=DESCRIPTION,
        epilog=EPILOG,
    )
    _add_commands(parser)
    parser.set_defaults(func=lambda args: _run(parser, args))


def _add_commands(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="testbed_command", required=True, metavar="ACTION")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--instance", type=int, default=0,
                       help="instance number N: names stbN-*, subnet 10.210.N.0/24 (default 0)")

    def shaping(p: argparse.ArgumentParser) -> None:
        p.add_argument("--budget-cores", type=float, default=cgroups.DEFAULT_BUDGET_CORES,
                       help="CPU cores all devices together may use (default %(default)s)")
        p.add_argument("--cores-per-tflops", type=float, default=None,
                       help="fixed compute scale instead of filling --budget-cores")
        p.add_argument("--bandwidth-scale", type=float, default=1.0,
                       help="multiply every link rate by this (default 1)")

    p_up = sub.add_parser("up", help="create the testbed for CLUSTER.yaml (stays until down)",
                          epilog=EPILOG)
    p_up.add_argument("cluster", metavar="CLUSTER.yaml", help="cluster description")
    common(p_up)
    shaping(p_up)
    p_up.add_argument("--json", action="store_true", help="print the instance as JSON")

    p_down = sub.add_parser("down", help="remove an instance (or --all), also after a crash")
    common(p_down)
    p_down.add_argument("--all", action="store_true", help="remove every instance")

    p_status = sub.add_parser("status", help="show instances, devices, quotas and shaping")
    p_status.add_argument("--instance", type=int, default=None, help="only this instance")
    p_status.add_argument("--json", action="store_true")

    p_run = sub.add_parser(
        "run", help="run a command on one device: DEVICE -- CMD ...",
        description="Run CMD inside DEVICE's namespace and cgroup (GLOO_SOCKET_IFNAME, "
        f"{contract.DEVICE_ADDR} and MASTER_ADDR set) and wait for it; exits with its code.",
    )
    common(p_run)
    shaping(p_run)
    p_run.add_argument("--cluster", metavar="CLUSTER.yaml", default=None,
                       help="bring up a temporary instance for the command, remove it after")
    p_run.add_argument("device", help="device id (e.g. cloud-0/gpu0) or index")
    p_run.add_argument("cmd", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        if args.testbed_command == "up":
            tb = _build(args, persistent=True).up()
            if args.json:
                print(json.dumps(tb.describe(), indent=1))
            else:
                _print_status(status(tb.instance), False)
                print(f"up. Latency is not emulated (no netem); remove with: "
                      f"spantrain testbed down --instance {tb.instance}")
            return 0
        if args.testbed_command == "down":
            if args.all:
                gone = sweep_all()
                print(f"removed instances {gone}" if gone else "nothing to remove")
            else:
                sweep(args.instance)
                print(f"instance {args.instance} removed")
            return 0
        if args.testbed_command == "status":
            _print_status(status(args.instance), args.json)
            return 0
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        if not cmd:
            parser.error("run: give a command after the device: run DEVICE -- CMD ...")
        device: int | str = int(args.device) if args.device.isdigit() else args.device
        if args.cluster:
            with _build(args, persistent=False) as tb:
                return tb.run(device, cmd, stdin=None).wait()
        return Testbed.from_state(args.instance).run(device, cmd, stdin=None).wait()
    except (TestbedError, InputError, ValueError, OSError) as err:
        print(f"spantrain testbed: {err}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None, prog: str = "python -m spantrain_testbed") -> int:
    """Stand-alone entry (``python -m spantrain_testbed``): same actions as ``spantrain
    testbed``."""
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EPILOG)
    _add_commands(parser)
    return _run(parser, parser.parse_args(argv))
