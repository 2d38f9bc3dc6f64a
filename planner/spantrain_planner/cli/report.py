"""Human-readable reports: plan tables, baseline comparisons, aligned text tables.

Role: pure formatting of plans and scores for terminals and Markdown. Used by the CLI, the
worker's local launcher and the benchmarks. No I/O here: functions return strings.

Pure: planner modules and the standard library only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from spantrain_planner.inputs.measured import MergedCluster, timestamp
from spantrain_planner.inputs.plan import Plan


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], markdown: bool = False) -> str:
    """An aligned text table (or a Markdown table); numbers right-aligned."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))
    numeric = [
        all(_is_number(row[i]) for row in cells) if cells else False for i in range(len(headers))
    ]

    def fmt(row: Sequence[str]) -> str:
        parts = [
            c.rjust(widths[i]) if numeric[i] else c.ljust(widths[i]) for i, c in enumerate(row)
        ]
        return ("| " + " | ".join(parts) + " |") if markdown else "  ".join(parts).rstrip()

    lines = [fmt(list(headers))]
    if markdown:
        lines.append(
            "|"
            + "|".join(
                ("-" * (w + 1) + ":") if n else ("-" * (w + 2))
                for w, n in zip(widths, numeric, strict=True)
            )
            + "|"
        )
    else:
        lines.append("  ".join("-" * w for w in widths))
    lines.extend(fmt(row) for row in cells)
    return "\n".join(lines)


def _is_number(text: str) -> bool:
    try:
        float(text.rstrip("x%s").replace(",", ""))
    except ValueError:
        return False
    return True


def seconds(value: float) -> str:
    if value >= 1:
        return f"{value:.2f} s"
    if value >= 1e-3:
        return f"{value * 1e3:.1f} ms"
    return f"{value * 1e6:.0f} us"


def _devices_text(devices: Sequence[str]) -> str:
    """'cloud-0/gpu0..3' style compression of a device list."""
    by_node: dict[str, list[str]] = {}
    for d in devices:
        node, _, local = d.partition("/")
        by_node.setdefault(node, []).append(local)
    parts = []
    for node, locals_ in by_node.items():
        if len(locals_) == 1:
            parts.append(f"{node}/{locals_[0]}")
        else:
            parts.append(
                f"{node}/{locals_[0]}..{locals_[-1][-1]}"
                if len(locals_) > 2
                else f"{node}/{','.join(locals_)}"
            )
    return " ".join(parts)


def plan_table(plan: Plan) -> str:
    """The stages of a plan, one row each, then the prediction and the bottleneck."""
    rows = []
    for st in plan.stages:
        pr = st.predicted
        rows.append(
            [
                st.stage_index,
                f"{st.layer_start}-{st.layer_end - 1}",
                _devices_text([d.device_id for d in st.devices]),
                "/".join(str(d.microbatch_share) for d in st.devices),
                seconds(pr.forward_seconds),
                seconds(pr.backward_input_seconds + pr.backward_weight_seconds),
                seconds(pr.send_seconds) if pr.send_seconds else "-",
                seconds(pr.allreduce_seconds) if pr.allreduce_seconds else "-",
                f"{pr.memory_bytes / 2**30:.2f}",
            ]
        )
    head = (
        f"Plan {plan.digest()} ({plan.strategy}) for {plan.model.name} on {plan.cluster}: "
        f"{plan.pp_degree} stage(s), {plan.world_size} device(s), schedule {plan.schedule}, "
        f"{plan.num_microbatches} micro-batch(es) of {plan.microbatch_size} "
        f"(global batch {plan.global_batch})"
    )
    body = table(
        [
            "stage",
            "layers",
            "devices",
            "shares",
            "F/mb",
            "B+W/mb",
            "send/mb",
            "all-reduce",
            "mem GiB",
        ],
        rows,
    )
    lines = [head, body]
    if plan.predicted:
        p = plan.predicted
        lines.append(
            f"predicted: {seconds(p.step_seconds)} per step, {p.samples_per_second:.1f} "
            f"samples/s, utilisation {p.utilization:.0%}, bubbles {p.bubble_fraction:.0%}"
        )
        lines.append(f"bottleneck: {p.bottleneck}")
    if plan.excluded:
        lines.append(f"left out ({len(plan.excluded)} device(s)):")
        reasons: dict[str, list[str]] = {}
        for e in plan.excluded:
            reasons.setdefault(e.reason, []).append(e.device_id)
        for reason, devs in reasons.items():
            lines.append(f"  {_devices_text(devs)}: {reason}")
    return "\n".join(lines)


def baseline_table(
    ours: float, baselines: Mapping[str, float | None], markdown: bool = False
) -> str:
    """samples/s of SpanTrain and each baseline, with SpanTrain's ratio over each."""
    rows: list[list[object]] = [["spantrain", f"{ours:.1f}", "1.00x"]]
    for name, value in baselines.items():
        if value is None:
            rows.append([name, "infeasible", "-"])
        else:
            rows.append([name, f"{value:.1f}", f"{ours / value:.2f}x"])
    return table(["plan", "samples/s", "spantrain / plan"], rows, markdown=markdown)


def sources_table(merged: MergedCluster) -> str:
    """One line per fact: subject, fact, value, source (and age of measured facts)."""
    rows = [[s.subject, s.fact, s.value, s.source,
             timestamp(s.measured_at) if s.measured_at else "-"] for s in merged.sources]
    return table(["subject", "fact", "value", "source", "measured at"], rows)
