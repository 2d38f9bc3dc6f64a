"""The CRD is generated from the API models: regenerate and diff, and check its shape."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from spantrain_planner import api
from spantrain_planner.api import crd

REPO = Path(__file__).resolve().parents[2]
CRD_FILE = REPO / "crds" / "spantrainjobs.spantrain.io.yaml"
REGENERATE = "spantrain crd > crds/spantrainjobs.spantrain.io.yaml"


def test_checked_in_crd_is_generated() -> None:
    assert CRD_FILE.read_text() == crd.render_crd_yaml(), f"stale CRD; run: {REGENERATE}"


def test_helm_chart_crd_matches() -> None:
    chart_crd = REPO / "helm" / "spantrain" / "files" / "spantrainjobs.spantrain.io.yaml"
    if chart_crd.exists():
        assert chart_crd.read_text() == crd.render_crd_yaml(), f"stale chart CRD; {REGENERATE}"


def test_generation_is_deterministic() -> None:
    assert crd.render_crd_yaml() == crd.render_crd_yaml()


def _walk(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = [(path, node)]
    for name, sub in (node.get("properties") or {}).items():
        out += _walk(sub, f"{path}.{name}")
    if "items" in node:
        out += _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        out += _walk(node["additionalProperties"], f"{path}{{}}")
    return out


def test_schema_is_structural() -> None:
    doc = yaml.safe_load(crd.render_crd_yaml())
    version = doc["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        assert "$ref" not in node and "anyOf" not in node and "title" not in node, path
        assert ("type" in node or node.get("x-kubernetes-int-or-string")), f"{path}: untyped"
        if node.get("type") == "object" and "properties" in node:
            assert node.get("additionalProperties") in (None,), path
    spec = schema["properties"]["spec"]
    assert spec["properties"]["model"]["description"]
    named = [(p, n) for p, n in _walk(schema) if p and not p.endswith(("[]", "{}"))]
    missing = [p for p, n in named if not n.get("description")]
    assert missing == [".apiVersion", ".kind", ".metadata"], missing


def test_crd_names_columns_and_rules() -> None:
    doc = yaml.safe_load(crd.render_crd_yaml())
    names = doc["spec"]["names"]
    assert names["shortNames"] == ["stj"] and names["kind"] == api.KIND
    version = doc["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")]
    assert columns == ["Phase", "Stages", "Ready", "Restarts", "Throughput", "Step", "Age"]
    rules = [r["rule"] for r in version["schema"]["openAPIV3Schema"]["properties"]["spec"]
             ["x-kubernetes-validations"]]
    assert any("oldSelf.runPolicy.activeDeadlineSeconds" in r for r in rules)
    assert any("self.model == oldSelf.model" in r for r in rules)
    conds = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"][
        "conditions"]
    assert conds["x-kubernetes-list-type"] == "map"
    assert conds["x-kubernetes-list-map-keys"] == ["type"]


def test_crd_defaults_validate_against_the_models() -> None:
    """Every object default in the CRD is what pydantic would fill in."""
    doc = yaml.safe_load(crd.render_crd_yaml())
    spec = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    filled = {k: v["default"] for k, v in spec["properties"].items() if "default" in v}
    parsed = api.parse_spec({"model": {"preset": "gpt-mini"}, **filled})
    assert parsed == api.parse_spec({"model": {"preset": "gpt-mini"}})


def test_printer_columns_name_declared_fields() -> None:
    """Every column reads a field the schema declares (a typo would show an empty column)."""
    doc = yaml.safe_load(crd.render_crd_yaml())
    version = doc["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]
    by_name = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert by_name["Throughput"] == ".status.progress.samplesPerSecond"  # measured, not planned
    for name, path in by_name.items():
        if path.startswith(".metadata."):
            continue
        node = schema
        for part in path.strip(".").split("."):
            assert part in (node.get("properties") or {}), f"{name}: {path} is not in the schema"
            node = node["properties"][part]
