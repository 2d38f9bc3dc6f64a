"""Units, cluster resolution and model profiles (table-driven)."""

from __future__ import annotations

from pathlib import Path

import pytest

from spantrain_planner.core.errors import InputError
from spantrain_planner.core.units import mbps_to_bytes_per_second, parse_bytes
from spantrain_planner.inputs.cluster import ClusterSpec, load_cluster, resolve
from spantrain_planner.inputs.profiles import get_profile, gpt_profile, preset, preset_names

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "clusters"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("24Gi", 24 * 2**30),
        ("512Mi", 512 * 2**20),
        ("1.5Gi", int(1.5 * 2**30)),
        ("8G", 8 * 10**9),
        ("100", 100),
        (1234, 1234),
        ("2e3", 2000),
    ],
)
def test_parse_bytes(text: str | int, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["lots", "12Qi", "-1", "Gi"])
def test_parse_bytes_rejects(bad: str) -> None:
    with pytest.raises(ValueError, match="bytes|unit"):
        parse_bytes(bad)


def test_mbps() -> None:
    assert mbps_to_bytes_per_second(100) == 12.5e6


def _spec(**links: object) -> ClusterSpec:
    return ClusterSpec.model_validate(
        {
            "name": "t",
            "nodes": [
                {
                    "name": "c0",
                    "tier": "cloud",
                    "intraNodeBandwidthMbps": 80000,
                    "devices": [
                        {
                            "count": 2,
                            "computeTflops": 10,
                            "memoryBytes": "8Gi",
                            "accelerator": "A100",
                        }
                    ],
                },
                {
                    "name": "c1",
                    "tier": "cloud",
                    "bandwidthMbps": 5000,
                    "latencyMs": 0.3,
                    "devices": [{"computeTflops": 10, "memoryBytes": "8Gi", "accelerator": "A100"}],
                },
                {
                    "name": "e0",
                    "tier": "edge",
                    "devices": [{"computeTflops": 2, "memoryBytes": "4Gi", "accelerator": "cpu"}],
                },
            ],
            "links": links,
        }
    )


@pytest.mark.parametrize(
    ("links", "pair", "mbps", "ms"),
    [
        ({}, (0, 1), 80000, 0.01),  # same node: intra-node link
        ({}, (0, 2), 5000, 0.1 + 0.3),  # uplinks: the slower, latencies add
        ({}, (0, 3), 1000, 0.1 + 1.0),  # tier defaults (cloud 10G, edge 1G)
        (
            {"rules": [{"between": ["cloud", "edge"], "bandwidthMbps": 100, "latencyMs": 5}]},
            (2, 3),
            100,
            5,
        ),
        (
            {
                "rules": [
                    {"between": ["cloud", "edge"], "bandwidthMbps": 100},
                    {"between": ["c1", "e0"], "bandwidthMbps": 300, "latencyMs": 1},
                ]
            },
            (2, 3),
            300,
            1,
        ),  # node-node beats tier-tier
        (
            {
                "rules": [{"between": ["c1", "edge"], "bandwidthMbps": 200, "latencyMs": 1}],
                "matrix": [{"a": "e0", "b": "c1", "bandwidthMbps": 42, "latencyMs": 7}],
            },
            (3, 2),
            42,
            7,
        ),  # a measured matrix entry beats every rule
    ],
)
def test_link_resolution(
    links: dict[str, object], pair: tuple[int, int], mbps: float, ms: float
) -> None:
    topo = resolve(_spec(**links))
    i, j = pair
    assert topo.bandwidth[i][j] == pytest.approx(mbps * 1e6 / 8)
    assert topo.bandwidth[j][i] == topo.bandwidth[i][j]
    assert topo.latency[i][j] == pytest.approx(ms / 1000)


def test_matrix_links_are_directed() -> None:
    """A measured asymmetric link keeps both directions (it used to be made symmetric, the
    first entry of the pair winning, so a plan could route over the slow direction)."""
    links: dict[str, list[dict[str, object]]] = {"matrix": [
        {"a": "c1", "b": "e0", "bandwidthMbps": 1000, "latencyMs": 1},
        {"a": "e0", "b": "c1", "bandwidthMbps": 10, "latencyMs": 20},
    ]}
    topo = resolve(_spec(**links))
    assert topo.bandwidth[2][3] == pytest.approx(1000e6 / 8)  # c1 -> e0
    assert topo.bandwidth[3][2] == pytest.approx(10e6 / 8)  # e0 -> c1
    assert topo.latency[3][2] == pytest.approx(0.020)
    assert topo.transfer_seconds(3, 2, 1e6) > 50 * topo.transfer_seconds(2, 3, 1e6)
    # one direction given: it holds for both
    one = resolve(_spec(matrix=links["matrix"][1:]))
    assert one.bandwidth[2][3] == one.bandwidth[3][2] == pytest.approx(10e6 / 8)


@pytest.mark.parametrize(("matrix", "message"), [
    ([{"a": "c1", "b": "c1", "bandwidthMbps": 5}], "to itself"),
    ([{"a": "c1", "b": "e0", "bandwidthMbps": 5}, {"a": "c1", "b": "e0", "bandwidthMbps": 6}],
     "a second entry from 'c1' to 'e0'"),
])
def test_matrix_rejects_self_links_and_repeats(matrix: list[object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _spec(matrix=matrix)


def test_device_ids_and_kinds() -> None:
    topo = resolve(_spec())
    assert [d.id for d in topo.devices] == ["c0/gpu0", "c0/gpu1", "c1/gpu0", "e0/cpu0"]
    assert topo.devices[3].flops == 2e12


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["nodes"].append(dict(d["nodes"][0])), "unique"),
        (
            lambda d: d.update(
                links={"rules": [{"between": ["cloud", "moon"], "bandwidthMbps": 1}]}
            ),
            "moon",
        ),
        (lambda d: d["nodes"][0]["devices"][0].update(memoryBytes="lots"), "memoryBytes"),
        (lambda d: d["nodes"][0]["devices"][0].update(computeTflops=0), "computeTflops"),
    ],
)
def test_cluster_validation(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    data = {
        "name": "x",
        "nodes": [{"name": "a", "devices": [{"computeTflops": 1, "memoryBytes": "1Gi"}]}],
    }
    mutate(data)
    with pytest.raises(ValueError, match=message):
        ClusterSpec.model_validate(data)


def test_example_clusters_load() -> None:
    sizes = {p.stem: resolve(load_cluster(p)).num_devices for p in EXAMPLES.glob("*.yaml")}
    assert sizes["paper-env1"] == 15 and sizes["paper-env2"] == 15
    assert sizes["mixed-edge"] == 7 and sizes["large-1024"] == 1024


def test_load_cluster_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("nodes: [{name: a}]\n")
    with pytest.raises(InputError, match="invalid cluster description"):
        load_cluster(bad)
    with pytest.raises(InputError, match="cannot read"):
        load_cluster(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    ("name", "params", "layers"),
    [
        # torchvision's resnet50 has exactly 25,557,032 parameters
        ("resnet50-imagenet", 25_557_032, 18),
        # resnet18 with a 3x3 stem and 10 classes: 11,689,512 - 7,680 - 507,870
        ("resnet18", 11_173_962, 10),
        # GPT-2 small is 124,439,808 with a tied head; ours is untied (+50257 x 768)
        ("gpt2-small", 124_439_808 + 50257 * 768, 14),
    ],
)
def test_presets_match_reference_counts(name: str, params: int, layers: int) -> None:
    profile = preset(name)
    assert profile.param_count == params
    assert profile.num_layers == layers
    assert profile.param_bytes == 4 * params


def test_gpt_profile_formulas() -> None:
    p = gpt_profile("t", num_layers=2, d_model=64, num_heads=4, seq_len=32, vocab_size=100)
    block = p.layers[1]
    assert block.param_count == 12 * 64 * 64 + 13 * 64
    assert block.forward_flops == 24 * 32 * 64 * 64 + 4 * 32 * 32 * 64
    assert block.output_bytes == 32 * 64 * 4
    assert p.layers[0].backward_input_flops == 0  # nothing upstream of the embedding
    with pytest.raises(InputError, match="divisible"):
        gpt_profile("t", num_layers=1, d_model=30, num_heads=4, seq_len=8, vocab_size=10)


def test_profile_lookup(tmp_path: Path) -> None:
    assert "gpt2-small" in preset_names()
    with pytest.raises(InputError, match="unknown model preset"):
        get_profile("gpt5")
    path = tmp_path / "p.json"
    path.write_text(preset("mlp-tiny").model_dump_json(by_alias=True))
    assert get_profile(str(path)) == preset("mlp-tiny")
