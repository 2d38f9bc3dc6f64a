"""The bad-manifest corpus against the real kube-apiserver, compared with pydantic.

Every case of ``tests/corpus/bad_manifests.py`` is created with ``dryRun=All`` (strict field
validation, as kubectl does) in one namespace. A rejection must come back as 400/422 naming the
case's field (and, for a CEL rule, its message), and pydantic must reject the same manifest
naming the same field; an acceptance must be accepted by both, and the object the API server
would store (defaults applied) must parse into the same spec pydantic makes of the manifest.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client as k8s_client
from kubernetes.client.rest import ApiException
from pydantic import ValidationError
from tests.cluster.controlplane import ClusterHelpers
from tests.corpus.bad_manifests import CASES, Case

from spantrain_planner import api

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def corpus_namespace(control_plane: ClusterHelpers, kube_api: k8s_client.ApiClient,
                     crd_installed: None) -> Iterator[str]:
    name = f"stj-corpus-{uuid.uuid4().hex[:6]}"
    control_plane.create_namespace(name)
    yield name
    k8s_client.CoreV1Api(kube_api).delete_namespace(name)


def _dry_run_create(kube_api: k8s_client.ApiClient, ns: str, body: dict[str, Any]
                    ) -> dict[str, Any]:
    return k8s_client.CustomObjectsApi(kube_api).create_namespaced_custom_object(
        api.GROUP, api.VERSION, ns, api.PLURAL, body, field_validation="Strict", dry_run="All",
    )


def _names_field(path: str, field: str) -> bool:
    return path == field or path.startswith((field + ".", field + "["))


def _dotted(path: str) -> str:
    """Map keys as ``.key``: the API server writes ``requests[cpu]`` for CEL errors and
    ``requests.cpu`` for OpenAPI ones (list indexes stay ``[0]``)."""
    return re.sub(r"\[([^\[\]0-9][^\[\]]*)\]", r".\1", path)


def _rejection(err: ApiException) -> tuple[str, list[str]]:
    """(message, field paths of its causes) of a rejected request."""
    body = json.loads(err.body) if isinstance(err.body, str | bytes) else {}
    causes = (body.get("details") or {}).get("causes") or []
    return str(body.get("message", err.body)), [_dotted(c["field"]) for c in causes
                                                 if c.get("field")]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_api_server_agrees_with_pydantic(kube_api: k8s_client.ApiClient,
                                         corpus_namespace: str, case: Case) -> None:
    manifest = case.manifest()
    try:
        mine: api.SpanTrainJob | None = api.parse_job(manifest)
        paths: list[str] = []
        lines: list[str] = []
    except ValidationError as err:
        mine = None
        paths = [api.error_path(e) for e in err.errors()]
        lines = api.error_lines(err)
    try:
        stored = _dry_run_create(kube_api, corpus_namespace, manifest)
    except ApiException as err:
        message, fields = _rejection(err)
        assert case.verdict == "reject", f"{case.name}: the API server rejected it: {message}"
        assert err.status in (400, 422), f"{case.name}: {err.status} {message}"
        assert case.field is not None
        # a cause at the field (or inside it), or the field in the words of the message
        # (strict decoding errors and the root-level metadata.name rule have no cause path)
        assert any(_names_field(f, case.field) for f in fields) or case.field in message, (
            f"{case.name}: {case.field} not named: {message} {fields}")
        if case.rule is not None:
            assert case.rule in message, f"{case.name}: {case.rule!r} not in {message}"
        assert mine is None, f"{case.name}: the API server rejects it, pydantic accepts it"
        assert any(_names_field(p, case.field) for p in paths), (case.name, lines)
        return
    assert case.verdict == "accept", f"{case.name}: the API server accepted it"
    assert mine is not None, f"{case.name}: pydantic rejects it: {lines}"
    # what the operator would read back (API server defaults) is what pydantic made of it
    assert api.parse_spec(stored["spec"]) == mine.spec, case.name
