"""Generate the ``SpanTrainJob`` CustomResourceDefinition from the pydantic API models.

Role: turn ``spantrain_planner.api`` into an ``apiextensions.k8s.io/v1`` CRD with a structural
OpenAPI v3 schema (every node typed, ``$ref`` inlined, optionals un-wrapped, int-or-string
marked, free-form maps marked ``x-kubernetes-preserve-unknown-fields``), field descriptions,
the CEL rules declared on the models (plus ``api.INTEGER_RULE`` on every integer of the spec),
the status subresource, printer columns and short names.
``crds/spantrainjobs.spantrain.io.yaml`` is its output (``spantrain crd``), never hand-edited;
a unit test regenerates it and diffs. The Helm chart embeds the same text.

Pure: pydantic, PyYAML and planner modules only; must not import torch, kopf or a Kubernetes
client.
"""

from __future__ import annotations

from typing import Any

import yaml

from spantrain_planner import api

#: JSON-schema keywords the structural OpenAPI subset keeps as they are.
_KEEP = {
    "type",
    "description",
    "enum",
    "default",
    "format",
    "pattern",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "minimum",
    "maximum",
    "required",
    "uniqueItems",
    "x-kubernetes-validations",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-int-or-string",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-map-type",
}

PRINTER_COLUMNS: list[dict[str, Any]] = [
    {
        "name": "Phase",
        "type": "string",
        "jsonPath": ".status.phase",
        "description": "Display phase of the job.",
    },
    {
        "name": "Stages",
        "type": "integer",
        "jsonPath": ".status.plan.numStages",
        "description": "Pipeline stages of the current plan.",
    },
    {
        "name": "Ready",
        "type": "string",
        "jsonPath": ".status.ready",
        "description": "Ready workers / workers.",
    },
    {
        "name": "Restarts",
        "type": "integer",
        "jsonPath": ".status.restarts",
        "description": "Restarts after worker failures.",
    },
    {
        "name": "Throughput",
        "type": "number",
        "jsonPath": ".status.progress.samplesPerSecond",
        "description": "Measured training throughput (samples/s), read from rank 0's metrics.",
    },
    {
        "name": "Step",
        "type": "integer",
        "jsonPath": ".status.progress.step",
        "description": "Last completed optimizer step.",
    },
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {
        "name": "ETA",
        "type": "integer",
        "jsonPath": ".status.progress.estimatedRemainingSeconds",
        "priority": 1,
        "description": "Estimated seconds to the last step.",
    },
    {
        "name": "Predicted",
        "type": "number",
        "jsonPath": ".status.plan.predictedSamplesPerSecond",
        "priority": 1,
        "description": "Throughput the plan predicts (samples/s).",
    },
    {
        "name": "Bottleneck",
        "type": "string",
        "jsonPath": ".status.plan.bottleneck",
        "priority": 1,
        "description": "Slowest stage or link of the plan.",
    },
    {
        "name": "Plan",
        "type": "string",
        "jsonPath": ".status.plan.hash",
        "priority": 1,
        "description": "Hash of plan.json.",
    },
]


class SchemaError(AssertionError):
    """A model cannot be expressed as a structural schema (a bug in ``api``)."""


def _deref(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Inline a ``$ref`` (or ``allOf: [$ref]``), letting the referring node's keys win."""
    ref = node.get("$ref")
    rest = {k: v for k, v in node.items() if k not in ("$ref", "allOf")}
    if ref is None and "allOf" in node and len(node["allOf"]) == 1:
        ref = node["allOf"][0].get("$ref")
    if ref is None:
        return node
    target = defs[ref.split("/")[-1]]
    merged = dict(target)
    merged.update(rest)
    # a model-level rule list and a field-level one both apply
    rules = target.get("x-kubernetes-validations", []) + rest.get("x-kubernetes-validations", [])
    if rules:
        merged["x-kubernetes-validations"] = rules
    return merged


def _structural(node: dict[str, Any], defs: dict[str, Any], path: str) -> dict[str, Any]:
    """Convert one pydantic JSON-schema node into the structural OpenAPI v3 subset."""
    node = _deref(node, defs)
    if "anyOf" in node:
        branches = [b for b in node["anyOf"] if b.get("type") != "null"]
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        if rest.get("default", 0) is None:
            del rest["default"]
        types = sorted(str(b.get("type")) for b in branches)
        if types == ["integer", "string"]:
            either = {k: v for k, v in rest.items() if k in _KEEP}
            either["x-kubernetes-int-or-string"] = True
            return _order(either)
        if len(branches) != 1:
            raise SchemaError(f"{path}: a union of {types} is not structural")
        inner = _deref(branches[0], defs)
        return _structural({**inner, **rest}, defs, path)
    if node.get("x-kubernetes-int-or-string") and "type" not in node:
        # an int-or-string type of its own (``api.Quantity``): constraints of both branches
        either = {k: v for k, v in node.items() if k in _KEEP}
        return _order(either)
    if "const" in node:
        node = {**{k: v for k, v in node.items() if k != "const"}, "enum": [node["const"]]}
        node.setdefault("type", "string")
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _KEEP:
            out[key] = value
        elif key == "exclusiveMinimum":
            out["minimum"], out["exclusiveMinimum"] = value, True
        elif key == "exclusiveMaximum":
            out["maximum"], out["exclusiveMaximum"] = value, True
    if out.get("default", 0) is None:
        del out["default"]
    if "description" in out:
        out["description"] = " ".join(str(out["description"]).split())
    if node.get("x-kubernetes-preserve-unknown-fields"):
        out["type"] = "object"
        return _order(out)
    if "type" not in out:
        raise SchemaError(f"{path}: no type")
    if out["type"] == "object":
        props = node.get("properties")
        if props:
            out["properties"] = {
                name: _structural(sub, defs, f"{path}.{name}") for name, sub in props.items()
            }
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            out["additionalProperties"] = _structural(extra, defs, f"{path}[*]")
        elif extra is True and not props:
            out["x-kubernetes-preserve-unknown-fields"] = True
    elif out["type"] == "array":
        out["items"] = _structural(node["items"], defs, f"{path}[]")
    return _order(out)


_ORDER = (
    "description",
    "type",
    "format",
    "enum",
    "default",
    "pattern",
    "minimum",
    "exclusiveMinimum",
    "maximum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "required",
    "properties",
    "additionalProperties",
    "items",
)


def _order(node: dict[str, Any]) -> dict[str, Any]:
    """Stable, readable key order (description first, nested schemas and rules last)."""
    head = {k: node[k] for k in _ORDER if k in node}
    tail = {k: node[k] for k in sorted(node) if k not in head}
    return {**head, **tail}


def model_schema(model: type[Any]) -> dict[str, Any]:
    """Structural OpenAPI v3 schema of a pydantic model (by alias, validation mode)."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    return _structural(raw, defs, model.__name__)


def _integer_rule(node: dict[str, Any]) -> None:
    """Give every integer under ``node`` ``api.INTEGER_RULE`` (5.0 is no integer)."""
    if node.get("type") == "integer":
        rules = node.get("x-kubernetes-validations", [])
        node["x-kubernetes-validations"] = [api.INTEGER_RULE.cel(), *rules]
    for sub in (node.get("properties") or {}).values():
        _integer_rule(sub)
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            _integer_rule(node[key])


def openapi_schema() -> dict[str, Any]:
    """The CRD's ``openAPIV3Schema`` for ``spantrain.io/v1alpha1``."""
    spec = model_schema(api.SpanTrainJobSpec)
    _integer_rule(spec)
    status = model_schema(api.SpanTrainJobStatus)
    doc = " ".join((api.SpanTrainJob.__doc__ or "").split())
    return {
        "description": "SpanTrainJob trains one network across the heterogeneous devices of a "
        "cloud-edge-end cluster with an asymmetric hybrid pipeline-parallel plan. " + doc,
        "type": "object",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
        "x-kubernetes-validations": [api.JOB_NAME_RULE.cel()],
    }


def crd() -> dict[str, Any]:
    """The complete CustomResourceDefinition object."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{api.PLURAL}.{api.GROUP}",
            "labels": {
                "app.kubernetes.io/name": "spantrain",
                "app.kubernetes.io/part-of": "spantrain",
            },
            "annotations": {
                "spantrain.io/generated-by": "spantrain crd (spantrain_planner.api); do not edit"
            },
        },
        "spec": {
            "group": api.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": api.KIND,
                "listKind": api.LIST_KIND,
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": list(api.SHORT_NAMES),
                "categories": list(api.CATEGORIES),
            },
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": openapi_schema()},
                }
            ],
        },
    }


HEADER = (
    "# Generated by `spantrain crd` from the spantrain_planner.api models -- do not edit.\n"
    "# Regenerate: spantrain crd > crds/spantrainjobs.spantrain.io.yaml\n"
)


def render_crd_yaml() -> str:
    """The CRD as YAML text (what ``spantrain crd`` prints and ``crds/`` holds)."""
    body = yaml.safe_dump(crd(), sort_keys=False, width=100, default_flow_style=False)
    return HEADER + body
