"""The planner's dynamic programs: layer partitions, device shares and micro-batch counts.

Role: for a fixed pipeline structure (which devices form each stage), the exact layer
partition that minimises the bottleneck stage time under every device's memory
(``partition_layers``, two-level on deep models through ``coarsen`` + ``windows``), the joint
stage-width x layer DP over an ordered list of device units (``joint_partition``), integer
per-device shares of a micro-batch, and the micro-batch counts worth trying. ``search``
composes these into whole plans.

Pure: planner modules and the standard library only.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from spantrain_planner.core.errors import InputError
from spantrain_planner.evaluation.simulator import (
    DEFAULT_COST,
    CostModel,
    ProfileSums,
    ring_allreduce_seconds,
)
from spantrain_planner.inputs.cluster import Topology
from spantrain_planner.inputs.profiles import LayerProfile, ModelProfile
from spantrain_planner.passes.assemble import StageLayout, boundary_seconds

COARSE_LAYERS = 24  # the structure search runs on at most this many merged layers
WINDOWED_DP_LAYERS = 128  # deeper models: the full-profile DP looks only near the merged cuts


# --------------------------------------------------------------------------------------------
# shares


def proportional_shares(weights: Sequence[float], total: int) -> list[int]:
    """Integers in proportion to ``weights`` that sum exactly to ``total`` (largest remainder).

    Ties in the remainders go to the earlier entry, so the result is deterministic.
    """
    assert total >= 0 and weights and all(w > 0 for w in weights)
    wsum = sum(weights)
    exact = [w * total / wsum for w in weights]
    floors = [math.floor(x) for x in exact]
    short = total - sum(floors)
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - floors[i]), i))
    for i in order[:short]:
        floors[i] += 1
    return floors


def even_shares(count: int, total: int) -> list[int]:
    """``total`` split as evenly as possible over ``count`` (earlier entries get the extra)."""
    base, extra = divmod(total, count)
    return [base + (1 if i < extra else 0) for i in range(count)]


# --------------------------------------------------------------------------------------------
# layer partition by dynamic programming


@dataclass(frozen=True)
class StageDevices:
    devices: tuple[int, ...]
    shares: tuple[int, ...]
    network_group: int


def _inflight(schedule: str, num_stages: int, stage_index: int, num_microbatches: int) -> int:
    if schedule == "gpipe":
        return num_microbatches
    return min(num_microbatches, num_stages - stage_index)


def _pareto_rows(rows: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Memory constraints (capacity, stashed rows) that no other constraint implies.

    A device with less memory and at least as many stashed rows as another is the binding
    one; keeping only the undominated rows makes the DP's memory test O(1) in practice.
    """
    kept: list[tuple[int, int]] = []
    for cap, r in sorted(set(rows), key=lambda t: (t[0], -t[1])):
        if all(r > r2 for _, r2 in kept):
            kept.append((cap, r))
    return kept


def partition_layers(
    stages: Sequence[StageDevices],
    topology: Topology,
    sums: ProfileSums,
    num_microbatches: int,
    *,
    schedule: str = "1f1b",
    cost: CostModel = DEFAULT_COST,
    windows: Sequence[tuple[int, int]] | None = None,
) -> tuple[float, list[tuple[int, int]]] | None:
    """Contiguous layer ranges for the stages minimising the bottleneck stage time.

    Stage time per micro-batch = max(compute on its slowest device, its outgoing boundary
    transfer) + its all-reduce divided by the micro-batch count. Returns (bottleneck seconds,
    ranges) or None when no partition fits every device's memory. ``windows[j]`` (inclusive),
    when given, bounds where stage ``j`` may end (one entry per stage but the last): the
    optimum over those cuts, found in time proportional to the windows' sizes.
    """
    p = len(stages)
    num_layers = sums.profile.num_layers
    if p > num_layers:
        return None
    work = [0.0] * (num_layers + 1)  # F+B+W flops prefix, per sample
    for i, layer in enumerate(sums.profile.layers):
        work[i + 1] = (
            work[i] + layer.forward_flops + layer.backward_input_flops + layer.backward_weight_flops
        )
    params = sums._p
    stash = sums._s
    out_bytes = [layer.output_bytes for layer in sums.profile.layers]
    # per stage: slowest per-sample time factor, per-layer overhead (F + B + W), boundary
    # bytes->seconds factor, latency
    slow_factor = []
    overhead3 = [
        3 * cost.overhead_scale * max(topology.devices[d].layer_overhead for d in st.devices)
        for st in stages
    ]
    mem_rows = []
    for j, st in enumerate(stages):
        slow_factor.append(
            max(
                share / topology.devices[d].flops
                for d, share in zip(st.devices, st.shares, strict=True)
            )
        )
        infl = _inflight(schedule, p, j, num_microbatches)
        mem_rows.append(
            _pareto_rows(
                (topology.devices[d].memory_bytes, infl * share)
                for d, share in zip(st.devices, st.shares, strict=True)
            )
        )
    if not _memory_fits(mem_rows, params, stash, cost.state_copies, num_layers):
        return None
    link_factor = [0.0] * p
    link_latency = [0.0] * p
    for j in range(p - 1):
        a = StageLayout(0, 1, stages[j].devices, stages[j].shares)
        b = StageLayout(1, 2, stages[j + 1].devices, stages[j + 1].shares)
        lat = boundary_seconds(a, b, topology, 0)
        link_latency[j] = lat
        link_factor[j] = boundary_seconds(a, b, topology, 1_000_000) - lat
    ar_factor = []  # ring all-reduce seconds = x * bytes + y
    for st in stages:
        devs = list(st.devices)
        if len(devs) > 1:
            x = (
                ring_allreduce_seconds(topology, devs, 2_000_000)
                - ring_allreduce_seconds(topology, devs, 1_000_000)
            ) / 1_000_000
            y = ring_allreduce_seconds(topology, devs, 1_000_000) - x * 1_000_000
            ar_factor.append((x, max(y, 0.0)))
        else:
            ar_factor.append((0.0, 0.0))
    copies = cost.state_copies
    inf = math.inf
    best = [[inf] * (num_layers + 1) for _ in range(p + 1)]
    total = [[inf] * (num_layers + 1) for _ in range(p + 1)]  # tie-break: sum of stage times
    back = [[-1] * (num_layers + 1) for _ in range(p + 1)]
    best[0][0] = 0.0
    total[0][0] = 0.0
    m = num_microbatches
    for j in range(p):
        sf = slow_factor[j]
        oh = overhead3[j]
        lf = link_factor[j] / 1_000_000
        ll = link_latency[j]
        arx, ary = ar_factor[j]
        rows = mem_rows[j]
        last = j == p - 1
        lo_end = j + 1
        hi_end = num_layers - (p - 1 - j)
        if windows is not None and not last:
            lo_end, hi_end = max(lo_end, windows[j][0]), min(hi_end, windows[j][1])
        # the previous stage ends (this one starts) only inside its window
        top_start = windows[j - 1][1] if windows is not None and j > 0 else num_layers
        prev_row = best[j]
        prev_total = total[j]
        cur_row = best[j + 1]
        cur_total = total[j + 1]
        cur_back = back[j + 1]
        lowest = 0  # the first start whose range to ``end`` fits (more layers need more memory)
        for end in range(lo_end, hi_end + 1):
            if last and end != num_layers:
                continue
            while lowest < end and any(
                (params[end] - params[lowest]) * copies + r * (stash[end] - stash[lowest])
                > capacity
                for capacity, r in rows
            ):
                lowest += 1
            comm = 0.0 if last else 2.0 * (out_bytes[end - 1] * lf + ll)
            best_here = inf
            best_sum = inf
            arg = -1
            for start in range(min(end - 1, top_start), max(lowest, j) - 1, -1):
                pb = params[end] - params[start]
                compute = sf * (work[end] - work[start]) + oh * (end - start)
                ar = (arx * pb + ary) / m if arx else 0.0
                c = (comm if comm > compute else compute) + ar
                if c > best_here:
                    break  # cost only grows as the stage takes more layers
                prev = prev_row[start]
                if prev == inf:
                    continue
                v = prev if prev > c else c
                t = prev_total[start] + c
                if v < best_here or (v == best_here and t < best_sum):
                    best_here = v
                    best_sum = t
                    arg = start
            cur_row[end] = best_here
            cur_total[end] = best_sum
            cur_back[end] = arg
    if best[p][num_layers] == inf:
        return None
    ranges: list[tuple[int, int]] = []
    end = num_layers
    for j in range(p, 0, -1):
        start = back[j][end]
        ranges.append((start, end))
        end = start
    ranges.reverse()
    return best[p][num_layers], ranges


def _memory_fits(
    mem_rows: Sequence[Sequence[tuple[int, int]]],
    params: Sequence[int],
    stash: Sequence[int],
    copies: int,
    num_layers: int,
) -> bool:
    """Whether some partition fits memory at all, in linear time: each stage in turn takes
    as many layers as fit (exact, because a range needs no less memory than any range inside
    it), leaving one for each later stage."""
    p, start = len(mem_rows), 0
    for j, rows in enumerate(mem_rows):
        limit = num_layers if j == p - 1 else num_layers - (p - 1 - j)
        end = start
        while end < limit and not any(
            (params[end + 1] - params[start]) * copies + r * (stash[end + 1] - stash[start])
            > capacity
            for capacity, r in rows
        ):
            end += 1
        if end == start or (j == p - 1 and end < num_layers):
            return False
        start = end
    return True


# --------------------------------------------------------------------------------------------
# joint DP over device prefixes and layer prefixes (stage widths chosen with the layers)


SKIP = -2  # back-pointer marker: the unit was left out


def joint_partition(
    units: Sequence[tuple[int, ...]],
    topology: Topology,
    sums: ProfileSums,
    num_microbatches: int,
    microbatch_size: int,
    *,
    same_stage_allowed: Callable[[int, int], bool] | None = None,
    skip_units: bool = False,
    cost: CostModel = DEFAULT_COST,
) -> list[tuple[float, list[StageDevices], list[tuple[int, int]]]]:
    """Choose stage widths and layer ranges together (Asteroid/PipeDream-style 2-D DP).

    ``units`` are atomic device blocks in pipeline order; a stage is a run of units
    ``[k0, k)`` (``same_stage_allowed(k0, k)`` may forbid runs, e.g. across network groups)
    holding layers ``[l0, l)``, with shares in proportion to speed. The boundary transfer is
    costed on the link from the stage's last device to the next unit's first. With
    ``skip_units`` any unit may be left out. Returns, for every prefix of units that can hold
    the whole model, (bottleneck, stages, layer ranges).
    """
    m, b = num_microbatches, microbatch_size
    num_layers = sums.profile.num_layers
    num_units = len(units)
    work = [0.0] * (num_layers + 1)
    for i, layer in enumerate(sums.profile.layers):
        work[i + 1] = work[i] + (
            layer.forward_flops + layer.backward_input_flops + layer.backward_weight_flops
        )
    params = sums._p
    stash = sums._s
    out_bytes = [layer.output_bytes for layer in sums.profile.layers]
    copies = cost.state_copies
    inf = math.inf
    f = [[inf] * (num_layers + 1) for _ in range(num_units + 1)]
    back: list[list[tuple[int, int]]] = [
        [(-1, -1)] * (num_layers + 1) for _ in range(num_units + 1)
    ]
    f[0][0] = 0.0
    stages: dict[tuple[int, int], StageDevices | None] = {}
    first_finite = [0]  # per unit prefix: the fewest layers it can hold (num_layers: none)
    for k in range(1, num_units + 1):
        if skip_units:
            # leave unit k-1 out: the best placements of the first k-1 units stay valid
            for l1 in range(num_layers + 1):
                if f[k - 1][l1] < f[k][l1]:
                    f[k][l1] = f[k - 1][l1]
                    back[k][l1] = (SKIP, l1)
        for k0 in range(k - 1, -1, -1):
            if same_stage_allowed is not None and not same_stage_allowed(k0, k):
                break
            devs = tuple(d for u in units[k0:k] for d in u)
            if len(devs) > b:
                break
            shares = proportional_shares([topology.devices[d].flops for d in devs], b)
            kept = [(d, sh) for d, sh in zip(devs, shares, strict=True) if sh > 0]
            stage = StageDevices(tuple(d for d, _ in kept), tuple(sh for _, sh in kept), 0)
            stages[(k0, k)] = stage
            slow = max(sh / topology.devices[d].flops for d, sh in kept)
            overhead3 = (
                3 * cost.overhead_scale * max(topology.devices[d].layer_overhead for d, _ in kept)
            )
            infl = min(m, num_units - k0)  # 1F1B bound with the most stages still to come
            rows = _pareto_rows((topology.devices[d].memory_bytes, infl * sh) for d, sh in kept)
            nxt = units[k][0] if k < num_units else None
            last = kept[-1][0]
            bw = topology.bandwidth[last][nxt] if nxt is not None else inf
            lat = topology.latency[last][nxt] if nxt is not None else 0.0
            devs_kept = [d for d, _ in kept]
            if len(devs_kept) > 1:
                ar1 = ring_allreduce_seconds(topology, devs_kept, 1_000_000)
                ar2 = ring_allreduce_seconds(topology, devs_kept, 2_000_000)
                arx = (ar2 - ar1) / 1_000_000
                ary = max(ar1 - arx * 1_000_000, 0.0)
            else:
                arx = ary = 0.0
            prev_row = f[k0]
            # the layers [l0, l1) this stage can hold: a longer range needs no less memory,
            # so for each end the feasible starts are a suffix [lowest, l1), and ``lowest``
            # never moves back as the end grows
            first = first_finite[k0]
            lowest = 0
            row, back_row = f[k], back[k]
            for l1 in range(1, num_layers + 1):
                while lowest < l1 and any(
                    (params[l1] - params[lowest]) * copies + r * (stash[l1] - stash[lowest]) > cap
                    for cap, r in rows
                ):
                    lowest += 1
                if lowest >= l1 or first >= l1:
                    continue
                comm = 0.0
                if nxt is not None and l1 < num_layers:
                    comm = 2.0 * (lat + b * out_bytes[l1 - 1] / bw)
                best_here = row[l1]
                for l0 in range(l1 - 1, max(lowest, first) - 1, -1):
                    prev = prev_row[l0]
                    if prev == inf:
                        continue
                    pb = params[l1] - params[l0]
                    compute = slow * (work[l1] - work[l0]) + overhead3 * (l1 - l0)
                    c = (comm if comm > compute else compute) + (
                        (arx * pb + ary) / m if arx else 0.0
                    )
                    if c >= best_here:
                        break  # c only grows with more layers: no longer start can win
                    v = prev if prev > c else c
                    if v < best_here:
                        best_here = v
                        back_row[l1] = (k0, l0)
                row[l1] = best_here
        first_finite.append(next((x for x in range(num_layers) if f[k][x] < inf), num_layers))
    results: list[tuple[float, list[StageDevices], list[tuple[int, int]]]] = []
    for k in range(1, num_units + 1):
        if f[k][num_layers] == inf:
            continue
        chosen: list[StageDevices] = []
        ranges: list[tuple[int, int]] = []
        kk, ll = k, num_layers
        while kk > 0:
            k0, l0 = back[kk][ll]
            if k0 == SKIP:  # unit kk-1 left out
                kk -= 1
                continue
            found = stages[(k0, kk)]
            assert found is not None
            chosen.append(found)
            ranges.append((l0, ll))
            kk, ll = k0, l0
        chosen.reverse()
        ranges.reverse()
        results.append((f[k][num_layers], chosen, ranges))
    return results


# --------------------------------------------------------------------------------------------
# coarsening (keeps the structure search fast on deep models)



def coarsen(
    profile: ModelProfile, max_layers: int = COARSE_LAYERS
) -> tuple[ModelProfile, list[int]]:
    """Merge runs of consecutive layers into at most ``max_layers`` of similar work.

    Returns the merged profile and the fine index where each merged layer starts (plus the
    end), so ranges found on the merged profile map back exactly.
    """
    n = profile.num_layers
    if n <= max_layers:
        return profile, list(range(n + 1))
    work = [
        layer.forward_flops + layer.backward_input_flops + layer.backward_weight_flops
        for layer in profile.layers
    ]
    total = sum(work) or 1.0
    bounds = [0]
    acc = 0.0
    for i in range(n):
        acc += work[i]
        left = max_layers - len(bounds)  # merged layers still to open after this one
        due = acc >= total * len(bounds) / max_layers or n - (i + 1) <= left
        if i + 1 < n and due and len(bounds) < max_layers:
            bounds.append(i + 1)
    bounds.append(n)
    merged = []
    for a, b in itertools.pairwise(bounds):
        chunk = profile.layers[a:b]
        merged.append(
            LayerProfile(
                name=f"{chunk[0].name}..{chunk[-1].name}" if b - a > 1 else chunk[0].name,
                forward_flops=sum(x.forward_flops for x in chunk),
                backward_input_flops=sum(x.backward_input_flops for x in chunk),
                backward_weight_flops=sum(x.backward_weight_flops for x in chunk),
                param_count=sum(x.param_count for x in chunk),
                param_bytes=sum(x.param_bytes for x in chunk),
                output_bytes=chunk[-1].output_bytes,
                stash_bytes=sum(x.stash_bytes for x in chunk),
            )
        )
    return profile.model_copy(update={"layers": merged}), bounds


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def microbatch_candidates(
    global_batch: int, num_stages: int, widest: int, requested: int | None
) -> list[int]:
    """Micro-batch counts worth trying: divisors of the batch near 1, p, 2p, 4p, 8p."""
    if requested is not None:
        if global_batch % requested:
            raise InputError(
                f"planner.numMicrobatches={requested} does not divide training.globalBatch="
                f"{global_batch}; choose a divisor such as "
                f"{', '.join(map(str, divisors(global_batch)[:8]))}"
            )
        return [requested] if global_batch // requested >= widest else []
    valid = [d for d in divisors(global_batch) if global_batch // d >= widest]
    if not valid:
        return []
    targets = [1, num_stages, 2 * num_stages, 4 * num_stages, 8 * num_stages]

    def nearest(target: int) -> int:
        return min(valid, key=lambda d: (abs(math.log(d / target)), d))

    return sorted({nearest(t) for t in targets})


def microbatch_fallbacks(global_batch: int, widest: int, tried: Sequence[int]) -> list[int]:
    """Every larger feasible count than ``tried``: smaller micro-batches stash less, so a model
    that fits no tried count may fit one of these (a one-stage plan of a large model at 16 or
    32 micro-batches, say). Tried only when none of ``tried`` fits."""
    top = max(tried, default=0)
    return [d for d in divisors(global_batch) if d > top and global_batch // d >= widest]
