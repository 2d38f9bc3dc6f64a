"""The ``spantrain`` command: a dispatcher whose subcommands come from entry points.

Role: parse ``spantrain <command> ...`` and hand over to the command's module. Commands
register under the ``spantrain.commands`` entry-point group as a function
``add_parser(subparsers) -> None`` that adds an ``argparse`` sub-parser and sets
``func=<callable(args) -> int>``; so the planner's dispatcher never imports the worker or
the operator, and a planner-only install simply lacks their commands. The planner's own
commands (``plan``, ``crd``) live in ``spantrain_planner.cli.commands``.

Must not import torch, kopf or a Kubernetes client.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points

from spantrain_planner import __version__
from spantrain_planner.core.errors import PlanningError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spantrain",
        description="Train one network across heterogeneous cloud-edge-end devices.",
    )
    parser.add_argument("--version", action="version", version=f"spantrain {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for ep in sorted(entry_points(group="spantrain.commands"), key=lambda e: e.name):
        try:
            add_parser = ep.load()
        except ImportError as err:  # an extra that is not installed
            stub = sub.add_parser(ep.name, help=f"(unavailable: {err.name} is not installed)")
            stub.set_defaults(func=_missing(ep.name, str(err.name)))
            continue
        add_parser(sub)
    return parser


def _missing(command: str, module: str) -> object:
    def run(_: argparse.Namespace) -> int:
        extra = "operator" if module in ("kopf", "kubernetes") else "worker"
        print(
            f"spantrain {command}: needs {module}; install it with "
            f"pip install 'spantrain[{extra}]'",
            file=sys.stderr,
        )
        return 2

    return run


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        code: int = args.func(args)
    except PlanningError as err:
        print(f"spantrain {args.command}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"spantrain {args.command}: interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
