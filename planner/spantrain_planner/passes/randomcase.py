"""Random small planning instances (for property tests and the optimality benchmark).

Role: a seeded generator of heterogeneous clusters and layer profiles: devices of random speed
and memory spread over a few nodes, a random link matrix, layers of random cost. Pure and
deterministic for a given seed; uses only the standard library's ``random.Random``.
"""

from __future__ import annotations

import random

from spantrain_planner.inputs.cluster import ClusterSpec, Topology, resolve
from spantrain_planner.inputs.profiles import LayerProfile, ModelProfile


def random_cluster(rng: random.Random, num_devices: int) -> Topology:
    """``num_devices`` devices on 1..num_devices nodes with random links between nodes."""
    num_nodes = rng.randint(max(1, num_devices // 2), num_devices)
    counts = [1] * num_nodes
    for _ in range(num_devices - num_nodes):
        counts[rng.randrange(num_nodes)] += 1
    tiers = ["cloud", "edge", "end"]
    nodes = []
    for i, count in enumerate(counts):
        nodes.append(
            {
                "name": f"n{i}",
                "tier": tiers[rng.randrange(3)],
                "devices": [
                    {
                        "count": count,
                        "accelerator": "gpu",
                        "computeTflops": round(rng.choice([0.5, 1, 2, 5, 10, 20]), 3),
                        "memoryBytes": rng.choice([2, 4, 8, 16]) * 2**30,
                    }
                ],
            }
        )
    matrix = []
    for a in range(num_nodes):
        for b in range(a + 1, num_nodes):
            matrix.append(
                {
                    "a": f"n{a}",
                    "b": f"n{b}",
                    "bandwidthMbps": rng.choice([50, 100, 300, 1000, 10000]),
                    "latencyMs": rng.choice([0.1, 0.5, 2, 5]),
                }
            )
    spec = ClusterSpec.model_validate(
        {"name": "random", "nodes": nodes, "links": {"matrix": matrix}}
    )
    return resolve(spec)


def random_profile(rng: random.Random, num_layers: int) -> ModelProfile:
    """Layers with random FLOPs (1-50 GFLOP/sample), parameters and activation sizes."""
    layers = []
    for i in range(num_layers):
        f = rng.uniform(1e9, 5e10)
        params = rng.randint(1, 50) * 1_000_000
        layers.append(
            LayerProfile(
                name=f"layer{i}",
                forward_flops=f,
                backward_input_flops=f * rng.uniform(0.8, 1.2) if i else 0.0,
                backward_weight_flops=f * rng.uniform(0.8, 1.2),
                param_count=params,
                param_bytes=params * 4,
                output_bytes=rng.choice([1, 4, 16, 64]) * 100_000,
                stash_bytes=rng.choice([1, 4, 16]) * 1_000_000,
            )
        )
    return ModelProfile(name=f"random{num_layers}", family="custom", layers=layers)
