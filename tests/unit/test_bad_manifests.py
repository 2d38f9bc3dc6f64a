"""The bad-manifest corpus against pydantic (what ``spantrain local`` and the operator use).

Every case must get the verdict the corpus gives, a rejection must name the case's field path
(Kubernetes style, as the API server does: ``tests/kube_operator/test_bad_manifests.py`` sends the
same corpus there), and every CEL rule of the generated CRD must have a pydantic mirror that a
case exercises. Needs pydantic and PyYAML only (no Kubernetes client, kopf or torch).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from spantrain_planner import api
from spantrain_planner.api import crd
from spantrain_planner.core.errors import InputError
from tests.corpus.bad_manifests import BASE, BASE_PATH, CASES, RESERVED_ENV_MESSAGE, Case

#: Rules whose pydantic mirror is not a validator with the same message: the env-name pair
#: (``EnvVar``) and the rules a strict type mirrors (``api.INTEGER_RULE``).
TYPE_MIRRORED = {RESERVED_ENV_MESSAGE} | {r.message for r in api.RULES if r.mirrored_by_type}


def names_field(path: str, field: str) -> bool:
    """``path`` is ``field`` or lies inside it."""
    return path == field or path.startswith((field + ".", field + "["))


def pydantic_verdict(case: Case) -> tuple[api.SpanTrainJob | None, list[str], list[str]]:
    """(job or None, error paths, error lines) of validating the case's manifest."""
    try:
        return api.parse_job(case.manifest()), [], []
    except ValidationError as err:
        return None, [api.error_path(e) for e in err.errors()], api.error_lines(err)


def test_corpus_shape() -> None:
    assert len(CASES) >= 60
    assert len({c.name for c in CASES}) == len(CASES), "duplicate case names"
    for case in CASES:
        assert (case.field is not None) == (case.verdict == "reject"), case.name
        assert case.field is None or case.field.startswith(("spec", "metadata")), case.name
    api.parse_job(BASE)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_pydantic_verdict(case: Case) -> None:
    job, paths, lines = pydantic_verdict(case)
    if case.verdict == "accept":
        assert job is not None, f"{case.name}: rejected:\n" + "\n".join(lines)
        # accepted means usable: the planner gets its inputs (no InputError at plan time)
        api.planner_inputs(job.spec)
        return
    assert job is None, f"{case.name}: accepted"
    assert case.field is not None
    assert any(names_field(p, case.field) for p in paths), (
        f"{case.name}: no error at {case.field}:\n" + "\n".join(lines)
    )
    # the message itself names the field, as the API server's does
    assert any(line.startswith(case.field) for line in lines), lines
    if case.rule is not None and case.rule not in TYPE_MIRRORED:
        assert any(case.rule in line for line in lines), f"{case.rule!r} not in {lines}"


def test_load_job_message_names_the_field(tmp_path: Any) -> None:
    """``spantrain local``'s error (``load_job``) is in Kubernetes terms."""
    case = next(c for c in CASES if c.name == "toleration-exists-with-value")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(case.manifest()))
    with pytest.raises(InputError) as info:
        api.load_job(path)
    assert "spec.placement.tolerations[0].value: value must be empty" in str(info.value)


def _crd_rules() -> list[dict[str, str]]:
    doc = yaml.safe_load(crd.render_crd_yaml())
    schema = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    found: list[dict[str, str]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            found.extend(node.get("x-kubernetes-validations", []))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return found


def test_every_cel_rule_has_a_pydantic_mirror_and_a_case() -> None:
    cel = {(r["rule"], r["message"]) for r in _crd_rules()}
    ours = {(r.rule, r.message) for r in api.RULES}
    # every Rule is in the CRD, and every CRD rule is a Rule
    assert ours == cel, (ours - cel, cel - ours)
    assert any(m.startswith(RESERVED_ENV_MESSAGE) for _, m in ours)
    # every rule that can be checked on one object is exercised, and both sides reject
    covered = {c.rule for c in CASES if c.verdict == "reject"}
    untested = {m for rule, m in cel if "oldSelf" not in rule and not any(
        c is not None and m.startswith(c) for c in covered)}
    assert not untested, f"CEL rules without a corpus case: {untested}"
    # transition rules are the API server's alone (pydantic sees one object): only these
    assert {m for rule, m in cel if "oldSelf" in rule} == {
        "model is immutable", "runPolicy.activeDeadlineSeconds is immutable"}


def test_rule_mirrors_fire_with_the_rules_message() -> None:
    """Each case that names a Rule gets that Rule's own error from pydantic (not another
    check that happens to reject it first)."""
    for case in CASES:
        rule = next((r for r in api.RULES if r.message == case.rule), None)
        if rule is None or rule.mirrored_by_type:
            continue
        with pytest.raises(ValidationError) as info:
            api.parse_job(case.manifest())
        fired = [(e.get("ctx") or {}).get("rule") for e in info.value.errors()]
        assert rule.rule in fired, f"{case.name}: {rule.message!r} did not fire: {fired}"


def test_quantity_values() -> None:
    assert api.quantity_value("500m") == Decimal("0.5")
    assert api.quantity_value("4Gi") == 4 * 2**30
    assert api.quantity_value("1e3") == 1000
    assert api.quantity_value("1Pi") == api.MAX_QUANTITY_VALUE
    assert api.quantity_value("-1") is None and api.quantity_value("1.5.0") is None
    assert api.quantity_value("1e99999999999") is None  # exponent beyond an int32
    big = api.quantity_value("1e400")
    assert big is not None and big > api.MAX_QUANTITY_VALUE


def test_yaml_numbers_read_as_kubectl_reads_them(tmp_path: Any) -> None:
    """kubectl (go-yaml) reads ``1e-3`` as a number; so must ``spantrain local``, or the strict
    model would refuse a manifest the API server takes."""
    path = tmp_path / "job.yaml"
    text = BASE_PATH.read_text().replace("learningRate: 0.001", "learningRate: 1e-3")
    assert "learningRate: 1e-3" in text
    path.write_text(text)
    assert api.load_job(path).spec.training.learning_rate == 0.001
    path.write_text(text.replace("steps: 300", "steps: 3e2"))
    with pytest.raises(InputError, match="spec.training.steps"):
        api.load_job(path)
