"""Pipeline schedules as per-stage action lists.

Role: produce, for every stage, the ordered list of actions (``F<m>``, ``B<m>``, ``W<m>``,
``BW<m>``) its devices execute in one training step. The simulator times these lists and the
worker executes them, so what is predicted is what runs.

* ``gpipe``: all forwards, then all full backwards (in micro-batch order, like PyTorch).
* ``1f1b``: ``p - s - 1`` warm-up forwards, then one forward / one full backward, then drain.
* ``zb``: zero-bubble with the backward split into B (input gradient, on the critical path)
  and W (weight gradient, deferrable). Unlike the published ZB-H1/H2 schedules, which assume
  identical stages, the order is computed by a greedy list scheduler that plays the step
  forward in time with each stage's *own* F/B/W durations and each boundary's *own* transfer
  time: when a stage is free it runs a ready B first (it unblocks upstream stages), else a
  ready F if its in-flight limit allows, else a deferred W (filling what would be a bubble).
  Two limits bound activation memory: forwards whose B has not run (``p - s``, as in 1F1B) and
  deferred W passes; the planner raises them where memory allows and keeps the faster order.

Pure: standard library only.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass


def gpipe(num_microbatches: int) -> list[str]:
    m = num_microbatches
    return [f"F{i}" for i in range(m)] + [f"BW{i}" for i in range(m)]


def one_f_one_b(num_stages: int, stage_index: int, num_microbatches: int) -> list[str]:
    m = num_microbatches
    warmup = min(num_stages - stage_index - 1, m)
    actions = [f"F{i}" for i in range(warmup)]
    for i in range(m - warmup):
        actions.append(f"F{warmup + i}")
        actions.append(f"BW{i}")
    actions.extend(f"BW{i}" for i in range(m - warmup, m))
    return actions


@dataclass(frozen=True)
class StageCost:
    """Per-micro-batch durations of one stage (slowest device), seconds."""

    forward: float
    backward_input: float
    backward_weight: float
    send_forward: float = 0.0  # activation transfer to the next stage
    send_backward: float = 0.0  # gradient transfer to the previous stage


def zero_bubble(
    costs: Sequence[StageCost],
    num_microbatches: int,
    inflight_limits: Sequence[int] | None = None,
    max_pending_w: Sequence[int] | None = None,
) -> list[list[str]]:
    """Greedy heterogeneity-aware zero-bubble schedule; returns one action list per stage.

    ``inflight_limits[s]`` caps forwards whose B has not run (1F1B's ``p - s`` by default);
    ``max_pending_w[s]`` caps B passes whose W is still deferred (``s + 1`` by default, so
    forwards without their W stay within ``p + 1``, about 1F1B's first stage: ZB-H1's
    memory; on equal stages this reaches ZB-H1's bubble of (p - 1)(F + B - W)).
    Both bound activation memory; the simulator reports the resulting peak.
    """
    p, m = len(costs), num_microbatches
    limits = list(inflight_limits) if inflight_limits is not None else [p - s for s in range(p)]
    # ZB-H1's memory rule: forwards not yet weight-graded stay within p + 1 on every stage,
    # about 1F1B's first stage; so stage s may defer up to s + 1 weight passes
    w_caps = list(max_pending_w) if max_pending_w is not None else [s + 1 for s in range(p)]
    assert len(limits) == p and all(limit >= 1 for limit in limits)
    assert len(w_caps) == p and all(cap >= 1 for cap in w_caps)
    free = [0.0] * p
    next_f = [0] * p
    next_b = [0] * p
    pending_w: list[list[int]] = [[] for _ in range(p)]
    # time the input of F(s, i) / the gradient for B(s, i) is available at stage s
    f_ready: list[dict[int, float]] = [dict() for _ in range(p)]
    b_ready: list[dict[int, float]] = [dict() for _ in range(p)]
    for i in range(m):
        f_ready[0][i] = 0.0
    actions: list[list[str]] = [[] for _ in range(p)]
    done = [False] * p
    # event loop: repeatedly pick the stage that can start something earliest
    heap: list[tuple[float, int]] = [(0.0, s) for s in range(p)]
    heapq.heapify(heap)
    while heap:
        now, s = heapq.heappop(heap)
        if done[s] or now < free[s]:
            # busy: the entry (free[s], s) its running action pushed is still queued (times
            # never go back), so this one is dropped rather than queued again as a duplicate
            # (duplicates multiply: every busy stage's entries would come back at once)
            continue
        cost = costs[s]
        inflight = next_f[s] - next_b[s]  # forwards whose B has not run
        w_full = len(pending_w[s]) >= w_caps[s]
        b_at = b_ready[s].get(next_b[s]) if next_b[s] < next_f[s] and not w_full else None
        f_at = f_ready[s].get(next_f[s]) if next_f[s] < m and inflight < limits[s] else None
        choice: str | None = None
        if b_at is not None and b_at <= now:
            choice = "B"
        elif f_at is not None and f_at <= now:
            choice = "F"
        elif pending_w[s] and (w_full or b_at is None or now + cost.backward_weight <= b_at):
            # a W fills idle time, but never delays a B whose gradient is already on its way
            choice = "W"
        if choice is None:
            # wait for the earliest known arrival; if none is known yet, another stage will
            # produce one and re-queue this stage.
            waits = [t for t in (b_at, f_at) if t is not None and t > now]
            if waits:
                heapq.heappush(heap, (min(waits), s))
            continue
        if choice == "F":
            i = next_f[s]
            next_f[s] += 1
            end = now + cost.forward
            actions[s].append(f"F{i}")
            if s + 1 < p:
                f_ready[s + 1][i] = end + cost.send_forward
                heapq.heappush(heap, (f_ready[s + 1][i], s + 1))
            else:
                b_ready[s][i] = end  # the loss is local to the last stage
        elif choice == "B":
            i = next_b[s]
            next_b[s] += 1
            end = now + cost.backward_input
            actions[s].append(f"B{i}")
            pending_w[s].append(i)
            if s > 0:
                b_ready[s - 1][i] = end + cost.send_backward
                heapq.heappush(heap, (b_ready[s - 1][i], s - 1))
        else:
            i = pending_w[s].pop(0)
            end = now + cost.backward_weight
            actions[s].append(f"W{i}")
        free[s] = end
        if next_b[s] == m and not pending_w[s]:
            done[s] = True
        else:
            heapq.heappush(heap, (end, s))
    assert all(done), "zero-bubble scheduler stalled"
    return actions


def fuse_backward(actions: list[str]) -> list[str]:
    """Replace each ``B<m>`` immediately followed by ``W<m>`` by ``BW<m>`` (same semantics)."""
    fused: list[str] = []
    k = 0
    while k < len(actions):
        a = actions[k]
        is_b = a.startswith("B") and not a.startswith("BW")
        if is_b and k + 1 < len(actions) and actions[k + 1] == "W" + a[1:]:
            fused.append("BW" + a[1:])
            k += 2
            continue
        fused.append(a)
        k += 1
    return fused


def static_schedule(schedule: str, num_stages: int, num_microbatches: int) -> list[list[str]]:
    """Action lists for the cost-independent schedules (gpipe, 1f1b)."""
    if schedule == "gpipe":
        return [gpipe(num_microbatches) for _ in range(num_stages)]
    if schedule == "1f1b":
        return [one_f_one_b(num_stages, s, num_microbatches) for s in range(num_stages)]
    raise ValueError(f"{schedule!r} needs stage costs; use zero_bubble()")
