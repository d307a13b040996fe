"""Kubernetes backend of the autoscaler: patch a worker Deployment's replicas and node affinity.

Uses the official ``kubernetes`` client. What it touches, and so what the autoscaler's RBAC role
in ``deploy/helm/veil`` grants: ``get``/``patch`` on the one worker Deployment, ``list`` pods in
its namespace (to count replicas per node) and, optionally, ``get``/``list`` nodes (read-only,
for each node's allocatable ``sgx.intel.com/epc``).

Placement is expressed as *preferred* node affinity (weights proportional to the wanted replica
count per node), never required affinity, so a vanished node cannot make pods unschedulable.
The affinity is only patched when the set of wanted nodes changes, because any change to the pod
template rolls the Deployment.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from veil.errors import ConfigError
from veil.serve.autoscaling import ANY_HOST, HostInfo
from veil.serve.autoscaling.controller import ScalingError

__all__ = ["KubernetesBackend"]

log = logging.getLogger("veil.serve.cluster")

MB = 1024 * 1024


def _api_error(what: str, exc: Exception) -> ScalingError:
    status = getattr(exc, "status", None)
    reason = getattr(exc, "reason", None) or type(exc).__name__
    return ScalingError(f"kubernetes: {what} failed ({status or 'no status'}: {reason})")


def _quantity_mb(q: object) -> float:
    from kubernetes.utils import parse_quantity

    try:
        return float(parse_quantity(str(q))) / MB
    except (ValueError, TypeError):
        return 0.0


class KubernetesBackend:
    """Scale one Deployment. ``apps_api`` / ``core_api`` are ``kubernetes.client`` API objects."""

    name = "kubernetes"

    def __init__(
        self,
        *,
        deployment: str,
        namespace: str,
        apps_api: Any,
        core_api: Any | None = None,
        host_label: str = "kubernetes.io/hostname",
        epc_resource: str = "sgx.intel.com/epc",
        manage_affinity: bool = True,
        read_nodes: bool = True,
        timeout_s: float = 10.0,
    ) -> None:
        if not deployment or not namespace:
            raise ConfigError("kubernetes backend needs a deployment name and a namespace")
        self.deployment = deployment
        self.namespace = namespace
        self.apps = apps_api
        self.core = core_api
        self.host_label = host_label
        self.epc_resource = epc_resource
        self.manage_affinity = manage_affinity
        self.read_nodes = read_nodes and core_api is not None
        self.timeout_s = timeout_s

    @classmethod
    def connect(
        cls,
        *,
        deployment: str,
        namespace: str,
        in_cluster: bool = False,
        kubeconfig: str | None = None,
        context: str | None = None,
        host: str | None = None,
        **kwargs: Any,
    ) -> KubernetesBackend:
        """Build the API clients: in-cluster service account, a kubeconfig, or a bare API URL."""
        from kubernetes import client, config

        try:
            if host is not None:
                cfg = client.Configuration()
                cfg.host = host.rstrip("/")
                api_client = client.ApiClient(cfg)
            elif in_cluster:
                config.load_incluster_config()
                api_client = client.ApiClient()
            else:
                api_client = config.new_client_from_config(config_file=kubeconfig, context=context)
        except (config.ConfigException, OSError) as exc:
            raise ConfigError(f"kubernetes: cannot load client configuration: {exc}") from None
        return cls(
            deployment=deployment,
            namespace=namespace,
            apps_api=client.AppsV1Api(api_client),
            core_api=client.CoreV1Api(api_client),
            **kwargs,
        )

    def _read(self) -> Any:
        try:
            return self.apps.read_namespaced_deployment(
                self.deployment, self.namespace, _request_timeout=self.timeout_s
            )
        except Exception as exc:  # ApiException, urllib3 errors
            raise _api_error(f"reading deployment {self.namespace}/{self.deployment}", exc) from None

    def _selector(self, dep: Any) -> str:
        labels = dep.spec.selector.match_labels or {}
        return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))

    def current(self) -> dict[str, int]:
        dep = self._read()
        replicas = int(dep.spec.replicas or 0)
        counts: dict[str, int] = {}
        if self.core is not None:
            try:
                pods = self.core.list_namespaced_pod(
                    self.namespace, label_selector=self._selector(dep), _request_timeout=self.timeout_s
                )
            except Exception as exc:
                raise _api_error("listing worker pods", exc) from None
            for pod in pods.items:
                if pod.metadata.deletion_timestamp is not None:
                    continue
                node = pod.spec.node_name if pod.spec is not None else None
                if node:
                    counts[node] = counts.get(node, 0) + 1
        scheduled = sum(counts.values())
        if scheduled < replicas:
            counts["(unscheduled)"] = replicas - scheduled
        elif scheduled > replicas:  # pods still terminating after a scale-down: trust the spec
            return self._trim(counts, replicas)
        return counts

    @staticmethod
    def _trim(counts: dict[str, int], replicas: int) -> dict[str, int]:
        out: dict[str, int] = {}
        left = replicas
        for node in sorted(counts, key=lambda n: (-counts[n], n)):
            take = min(counts[node], left)
            if take:
                out[node] = take
            left -= take
        return out

    @staticmethod
    def _pinnable(host: str, n: int) -> bool:
        """A real node name with replicas (not "anywhere" or the "(unscheduled)" bucket)."""
        return n > 0 and host != ANY_HOST and not host.startswith("(")

    def _affinity(self, placement: Mapping[str, int]) -> dict[str, Any]:
        wanted = {h: n for h, n in placement.items() if self._pinnable(h, n)}
        top = max(wanted.values(), default=1)
        terms = [
            {
                "weight": max(1, round(100 * n / top)),
                "preference": {
                    "matchExpressions": [{"key": self.host_label, "operator": "In", "values": [h]}]
                },
            }
            for h, n in sorted(wanted.items())
        ]
        return {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": terms}}

    @staticmethod
    def _affinity_hosts(dep: Any) -> set[str]:
        try:
            node_affinity = dep.spec.template.spec.affinity.node_affinity
            terms = node_affinity.preferred_during_scheduling_ignored_during_execution
        except AttributeError:
            return set()
        hosts: set[str] = set()
        for t in terms or []:
            for e in t.preference.match_expressions or []:
                hosts.update(e.values or [])
        return hosts

    def apply(self, replicas: int, placement: Mapping[str, int]) -> None:
        if replicas < 0:
            raise ConfigError("replicas must be >= 0")
        patch: dict[str, Any] = {"spec": {"replicas": int(replicas)}}
        if self.manage_affinity:
            dep = self._read()
            wanted = {h for h, n in placement.items() if self._pinnable(h, n)}
            if wanted and wanted != self._affinity_hosts(dep):
                patch["spec"]["template"] = {"spec": {"affinity": self._affinity(placement)}}
        try:
            self.apps.patch_namespaced_deployment(
                self.deployment, self.namespace, patch, _request_timeout=self.timeout_s
            )
        except Exception as exc:
            raise _api_error(f"patching deployment {self.namespace}/{self.deployment}", exc) from None
        log.info(
            "kubernetes: %s/%s -> %d replicas %s", self.namespace, self.deployment, replicas, dict(placement)
        )

    def hosts(self) -> list[HostInfo]:
        if not self.read_nodes or self.core is None:
            return []
        try:
            nodes = self.core.list_node(_request_timeout=self.timeout_s).items
            pods = self.core.list_namespaced_pod(self.namespace, _request_timeout=self.timeout_s).items
        except Exception as exc:
            raise _api_error("listing nodes", exc) from None
        mine = self.current()
        used: dict[str, float] = {}
        for pod in pods:
            node = pod.spec.node_name if pod.spec is not None else None
            if not node or pod.metadata.deletion_timestamp is not None:
                continue
            for c in pod.spec.containers or []:
                req = (c.resources.requests or {}) if c.resources is not None else {}
                if self.epc_resource in req:
                    used[node] = used.get(node, 0.0) + _quantity_mb(req[self.epc_resource])
        out = []
        for node in nodes:
            name = node.metadata.name
            alloc = (node.status.allocatable or {}) if node.status is not None else {}
            epc = _quantity_mb(alloc.get(self.epc_resource, 0))
            if epc <= 0:
                continue
            schedulable = not (node.spec is not None and node.spec.unschedulable)
            out.append(HostInfo(name, epc, used.get(name, 0.0), mine.get(name, 0), schedulable))
        return out
