"""The one module of the operator that talks to the Kubernetes API.

Role: thin, idempotent verbs over the official client: create-if-absent (a 409 is success:
names are deterministic, so a repeated create never makes a duplicate), delete-if-present,
server-side apply, a merge patch of the job's status subresource (fields dropped from the
status are sent as null), reading the plan ConfigMap, listing pods by label, and Events with
CamelCase reasons. Everything else in the operator passes plain dicts to and from here.

Called by ``handlers``. Must not import torch or spantrain_worker.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from kubernetes import client, config
from kubernetes.client.rest import ApiException

from spantrain_planner import api

from . import settings

FIELD_MANAGER = "spantrain-operator"
#: statuses with which the API server refuses an object itself (not a transient failure):
#: 400 Bad Request, 403 Forbidden (RBAC, admission, quota), 422 Invalid
REFUSED = (400, 403, 422)


class Refused(Exception):
    """The API server refused to create an object (``status`` 400, 403 or 422)."""

    def __init__(self, kind: str, name: str, status: int, message: str) -> None:
        super().__init__(f"the API server refused {kind} {name} ({status}): {message}")
        self.kind, self.name, self.status, self.message = kind, name, status, message


def _drain(response: Any) -> None:
    """Read an answer that was not deserialised, so its connection goes back to the pool."""
    response.read()
    response.release_conn()


def _api_message(err: ApiException) -> str:
    """The message of the Status the API server answered with (it names the field)."""
    try:
        return str(json.loads(err.body or "{}").get("message") or err.reason)
    except (ValueError, AttributeError):
        return str(err.body or err.reason)
#: Grace period when the operator stops a healthy worker (suspend, spec change, deadline).
#: Workers checkpoint on their own schedule, so they need little time to stop. Pods of a dead
#: attempt are deleted at once instead (``reconcile.deletions`` decides).
POD_DELETE_GRACE_SECONDS = settings.current().pod_delete_grace_seconds
log = logging.getLogger(__name__)

_CUSTOM_KINDS: dict[str, str] = {
    # apiVersion/kind -> plural, for objects created through CustomObjectsApi
    "scheduling.volcano.sh/v1beta1/PodGroup": "podgroups",
    "scheduling.x-k8s.io/v1alpha1/PodGroup": "podgroups",
}


class Kube:
    """A Kubernetes API session (the operator holds one)."""

    def __init__(self, api_client: client.ApiClient | None = None) -> None:
        if api_client is None:
            api_client = new_api_client()
        self.api = api_client
        self.core = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)

    # -- generic -----------------------------------------------------------------------------

    def create_if_absent(self, obj: Mapping[str, Any]) -> bool:
        """Create ``obj``; True if created, False if it already existed."""
        kind = obj["kind"]
        ns = obj["metadata"]["namespace"]
        raw = {"_preload_content": False}  # the answer is not read: skip deserialising it
        try:
            if kind == "Pod":
                _drain(self.core.create_namespaced_pod(ns, obj, **raw))
            elif kind == "ConfigMap":
                _drain(self.core.create_namespaced_config_map(ns, obj, **raw))
            elif kind == "Service":
                _drain(self.core.create_namespaced_service(ns, obj, **raw))
            elif kind == "NetworkPolicy":
                net = client.NetworkingV1Api(self.api)
                _drain(net.create_namespaced_network_policy(ns, obj, **raw))
            else:
                key = f"{obj['apiVersion']}/{kind}"
                group, version = obj["apiVersion"].split("/")
                self.custom.create_namespaced_custom_object(
                    group, version, ns, _CUSTOM_KINDS[key], obj
                )
        except ApiException as err:
            if err.status == 409:
                return False
            if err.status in REFUSED:
                name = obj["metadata"]["name"]
                raise Refused(kind, name, err.status, _api_message(err)) from None
            raise
        return True

    def apply(self, obj: Mapping[str, Any]) -> None:
        """Server-side apply of a namespaced core object (ConfigMap, Service)."""
        kind, ns, name = obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"]
        kwargs = {
            "field_manager": FIELD_MANAGER,
            "force": True,
            "_content_type": "application/apply-patch+yaml",
        }
        if kind == "ConfigMap":
            self.core.patch_namespaced_config_map(name, ns, obj, **kwargs)
        elif kind == "Service":
            self.core.patch_namespaced_service(name, ns, obj, **kwargs)
        else:
            raise ValueError(f"apply: unsupported kind {kind}")

    def delete_pod(self, namespace: str, name: str, *, grace_seconds: int | None = None) -> bool:
        """Delete a pod; ``grace_seconds`` None is ``POD_DELETE_GRACE_SECONDS``, 0 is at once."""
        grace = POD_DELETE_GRACE_SECONDS if grace_seconds is None else grace_seconds
        try:
            _drain(self.core.delete_namespaced_pod(name, namespace, grace_period_seconds=grace,
                                                   _preload_content=False))
        except ApiException as err:
            if err.status == 404:
                return False
            raise
        return True

    def delete_config_map(self, namespace: str, name: str) -> bool:
        try:
            self.core.delete_namespaced_config_map(name, namespace)
        except ApiException as err:
            if err.status == 404:
                return False
            raise
        return True

    def read_config_map_data(self, namespace: str, name: str) -> dict[str, str] | None:
        try:
            cm = self.core.read_namespaced_config_map(name, namespace)
        except ApiException as err:
            if err.status == 404:
                return None
            raise
        return dict(cm.data or {})

    def list_pods(self, namespace: str, labels: Mapping[str, str]) -> list[dict[str, Any]]:
        selector = ",".join(f"{k}={v}" for k, v in labels.items())
        pods = self.core.list_namespaced_pod(namespace, label_selector=selector)
        return [self.api.sanitize_for_serialization(p) for p in pods.items]

    def list_nodes(self) -> list[dict[str, Any]]:
        return [self.api.sanitize_for_serialization(n) for n in self.core.list_node().items]

    # -- the job -----------------------------------------------------------------------------

    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            obj = self.custom.get_namespaced_custom_object(
                api.GROUP, api.VERSION, namespace, api.PLURAL, name
            )
        except ApiException as err:
            if err.status == 404:
                return None
            raise
        return dict(obj)

    def patch_job_status(
        self, namespace: str, name: str, old: Mapping[str, Any], new: Mapping[str, Any]
    ) -> bool:
        """Merge-patch ``status`` from ``old`` to ``new``; False if nothing changed."""
        if dict(old) == dict(new):
            return False
        body: dict[str, Any] = dict(new)
        for key in old:
            if key not in new:
                body[key] = None
        try:
            self.custom.patch_namespaced_custom_object_status(
                api.GROUP, api.VERSION, namespace, api.PLURAL, name, {"status": body}
            )
        except ApiException as err:
            if err.status == 404:
                return False
            raise
        return True

    def delete_job(self, namespace: str, name: str) -> None:
        try:
            self.custom.delete_namespaced_custom_object(
                api.GROUP, api.VERSION, namespace, api.PLURAL, name,
                propagation_policy="Background",
            )
        except ApiException as err:
            if err.status != 404:
                raise

    def event(
        self, job: Mapping[str, Any], kind: str, reason: str, message: str
    ) -> None:
        """Record an Event on the job (best effort: a failed event never fails a reconcile)."""
        meta = job.get("metadata") or {}
        ns = meta.get("namespace", "default")
        now = datetime.now(UTC)
        body = {
            "metadata": {"generateName": f"{meta.get('name')}.", "namespace": ns},
            "involvedObject": {
                "apiVersion": api.API_VERSION,
                "kind": api.KIND,
                "name": meta.get("name"),
                "namespace": ns,
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "reason": reason,
            "message": message[:1024],
            "type": kind,
            "source": {"component": FIELD_MANAGER},
            "firstTimestamp": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "lastTimestamp": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "count": 1,
            "reportingComponent": FIELD_MANAGER,
            "reportingInstance": os.environ.get("HOSTNAME", FIELD_MANAGER),
        }
        try:
            _drain(self.core.create_namespaced_event(ns, body, _preload_content=False))
        except ApiException as err:  # events are advisory
            log.warning("could not record event %s on %s: %s", reason, meta.get("name"), err)


def new_api_client() -> client.ApiClient:
    """In-cluster configuration when running in a pod, else the kubeconfig.

    The connection pool is as large as kopf's thread pool (``Settings.workers``), so
    concurrent reconciles do not queue for, and keep reopening, connections.
    """
    cfg = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=cfg)
    except config.ConfigException:
        # the client's default path is fixed at import time; read KUBECONFIG now
        config.load_kube_config(
            config_file=os.environ.get("KUBECONFIG"), client_configuration=cfg
        )
    cfg.connection_pool_maxsize = max(settings.current().workers, 4)
    return client.ApiClient(cfg)
