"""Timeline charts: devices x time, bars for F / B / W / BW / all-reduce / optimizer.

Role: draw a simulated (``SimResult.intervals``) or measured (the worker's trace) timeline as
a PNG, so a person can see bubbles and bottlenecks at a glance. matplotlib is imported lazily
(``spantrain[charts]``): the planner stays importable without it.

Pure apart from writing the file; must not import torch, kopf or a Kubernetes client.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

COLORS = {
    "F": "#4C78A8",
    "B": "#F58518",
    "W": "#54A24B",
    "BW": "#E45756",
    "AR": "#B279A2",
    "OPT": "#9D755D",
    "SEND": "#BAB0AC",
}
LABELS = {
    "F": "forward",
    "B": "backward (input grad)",
    "W": "backward (weight grad)",
    "BW": "backward (full)",
    "AR": "all-reduce",
    "OPT": "optimizer",
    "SEND": "send",
}


class Bar(Protocol):
    """Anything with these read-only attributes (the simulator's and the worker's intervals)."""

    @property
    def device(self) -> int: ...
    @property
    def start(self) -> float: ...
    @property
    def end(self) -> float: ...
    @property
    def kind(self) -> str: ...
    @property
    def microbatch(self) -> int: ...


def draw_timeline(
    bars: Sequence[Bar],
    device_labels: Sequence[str],
    path: str | Path,
    title: str,
) -> Path:
    """Write a Gantt chart of ``bars`` to ``path`` (PNG) and return the path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError as err:  # pragma: no cover - depends on the install
        raise RuntimeError(
            "drawing charts needs matplotlib: pip install 'spantrain[charts]'"
        ) from err
    n = len(device_labels)
    end = max((b.end for b in bars), default=1.0)
    fig, ax = plt.subplots(figsize=(12, 1.0 + 0.42 * n))
    kinds_seen: list[str] = []
    for bar in bars:
        ring = bar.kind == "AR"  # overlaps the compute bars: a thin strip under them
        ax.barh(
            bar.device + (0.3 if ring else 0.0),
            bar.end - bar.start,
            left=bar.start,
            height=0.2 if ring else 0.8,
            color=COLORS.get(bar.kind, "#777777"),
            edgecolor="white",
            linewidth=0.3,
        )
        if bar.kind not in kinds_seen:
            kinds_seen.append(bar.kind)
        width = bar.end - bar.start
        if bar.microbatch >= 0 and width > end / 60:
            ax.text(
                bar.start + width / 2,
                bar.device,
                str(bar.microbatch),
                ha="center",
                va="center",
                fontsize=6,
                color="white",
            )
    ax.set_yticks(range(n))
    ax.set_yticklabels(device_labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_xlim(0, end * 1.01)
    ax.set_title(title, fontsize=9)
    ax.legend(
        handles=[Patch(color=COLORS[k], label=LABELS[k]) for k in COLORS if k in kinds_seen],
        loc="upper center",
        bbox_to_anchor=(0.5, -0.12 - 0.6 / max(n, 1)),
        ncol=6,
        fontsize=7,
        frameon=False,
    )
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
