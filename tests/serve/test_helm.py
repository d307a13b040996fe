"""The Helm chart and kustomize tree: render, validate every manifest, check the security shape."""

from __future__ import annotations

import asyncio
import copy
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python
import kmock
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "veil"
KUSTOMIZE = ROOT / "deploy" / "kustomize"
K8S_VERSION = "1.33.0"
MODES = {"simulated": "values-simulated.yaml", "sgx": "values-sgx.yaml"}
needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")


def render(mode: str, extra: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    values = yaml.safe_load((CHART / MODES[mode]).read_text())
    for k, v in (extra or {}).items():
        values.setdefault(k, {}).update(v)
    out = helm_python.Chart.load(str(CHART)).render(values, name="veil", namespace="veil", is_install=True)
    return [d for p in sorted(out) if p.endswith(".yaml") for d in yaml.safe_load_all(out[p]) if d]


def by(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (hit,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return hit


def container(doc: dict[str, Any]) -> dict[str, Any]:
    c: dict[str, Any] = doc["spec"]["template"]["spec"]["containers"][0]
    return c


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {m: render(m) for m in MODES}


@pytest.mark.parametrize("mode", list(MODES))
def test_every_manifest_validates(rendered: dict[str, list[dict[str, Any]]], mode: str) -> None:
    docs = rendered[mode]
    kinds = {d["kind"] for d in docs}
    assert {"StatefulSet", "Deployment", "Service", "NetworkPolicy", "PodDisruptionBudget", "Role"} <= kinds
    for d in docs:
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)


def test_validator_rejects_a_broken_manifest(rendered: dict[str, list[dict[str, Any]]]) -> None:
    bad = copy.deepcopy(by(rendered["sgx"], "Deployment", "veil-worker"))
    bad["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
    bad = copy.deepcopy(by(rendered["sgx"], "Deployment", "veil-worker"))
    bad["spec"]["template"]["spec"]["containerz"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_lint_has_no_errors() -> None:
    for values in MODES.values():
        report = helm_python.lint(str(CHART), yaml.safe_load((CHART / values).read_text()), strict=False)
        assert report["errors"] == [] and all(m["severity"] < 3 for m in report["messages"]), report


def test_sgx_worker_requests_epc_and_mounts_enclave(rendered: dict[str, list[dict[str, Any]]]) -> None:
    w = by(rendered["sgx"], "Deployment", "veil-worker")
    c = container(w)
    assert c["resources"]["requests"]["sgx.intel.com/epc"] == "64Mi"
    assert c["resources"]["limits"]["sgx.intel.com/epc"] == "64Mi"
    assert c["resources"]["limits"]["sgx.intel.com/enclave"] == 1
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert "/dev/sgx_enclave" in mounts
    vols = {v["name"]: v for v in w["spec"]["template"]["spec"]["volumes"]}
    assert vols["sgx-enclave"]["hostPath"] == {"path": "/dev/sgx_enclave", "type": "CharDevice"}
    assert "--tee=gramine" in c["args"]
    assert not any(e["name"].startswith("VEIL_SIM") for e in c["env"])
    assert w["spec"]["template"]["spec"]["nodeSelector"] == {"intel.feature.node.kubernetes.io/sgx": "true"}
    kms = container(by(rendered["sgx"], "StatefulSet", "veil-kms"))
    assert "--allow-simulated" not in kms["args"]


def test_simulated_worker_is_labelled_and_uses_epc_model(rendered: dict[str, list[dict[str, Any]]]) -> None:
    w = by(rendered["simulated"], "Deployment", "veil-worker")
    c = container(w)
    assert not any(k.startswith("sgx.intel.com") for k in c["resources"]["requests"])
    assert "/dev/sgx_enclave" not in {m["mountPath"] for m in c["volumeMounts"]}
    env = {e["name"]: e for e in c["env"]}
    assert env["VEIL_SIM_EPC_MB"]["value"] == "93"
    assert env["VEIL_SIM_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert w["metadata"]["labels"]["veil.dev/tee"] == "simulated"
    assert "--allow-simulated" in container(by(rendered["simulated"], "StatefulSet", "veil-kms"))["args"]


def test_kms_statefulset_has_pvc_and_token_from_secret(rendered: dict[str, list[dict[str, Any]]]) -> None:
    kms = by(rendered["sgx"], "StatefulSet", "veil-kms")
    (pvc,) = kms["spec"]["volumeClaimTemplates"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "1Gi"
    env = {e["name"]: e for e in container(kms)["env"]}
    assert env["VEIL_KMS_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "veil-kms-admin"
    assert not any(d["kind"] == "Secret" for d in rendered["sgx"])  # the chart never invents secrets
    assert (
        "--kms=http://veil-kms.veil.svc:8443"
        in container(by(rendered["sgx"], "Deployment", "veil-worker"))["args"]
    )
    tls = render("sgx", {"kms": {"tlsSecret": "veil-kms-tls"}})
    for d in tls:
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)
    wargs = container(by(tls, "Deployment", "veil-worker"))["args"]
    assert "--kms=https://veil-kms.veil.svc:8443" in wargs and "--kms-ca=/etc/veil-kms-tls/ca.crt" in wargs
    assert "--tls-cert=/etc/veil-kms-tls/tls.crt" in container(by(tls, "StatefulSet", "veil-kms"))["args"]


def test_autoscaler_rbac_is_limited_to_scaling_workers(rendered: dict[str, list[dict[str, Any]]]) -> None:
    role = by(rendered["sgx"], "Role", "veil-autoscaler")
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): r for r in role["rules"]}
    dep = rules[(("apps",), ("deployments",))]
    assert dep["resourceNames"] == ["veil-worker"] and sorted(dep["verbs"]) == ["get", "patch"]
    assert rules[(("",), ("pods",))]["verbs"] == ["list"]
    assert len(rules) == 2
    crole = by(rendered["sgx"], "ClusterRole", "veil-veil-autoscaler")
    assert crole["rules"] == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list"]}]
    for d in rendered["sgx"]:
        for r in d.get("rules", []):
            assert "*" not in r["verbs"] and "*" not in r["resources"]
    # only the autoscaler gets a service-account token
    for d in rendered["sgx"]:
        if d["kind"] in {"Deployment", "StatefulSet"}:
            spec = d["spec"]["template"]["spec"]
            assert spec.get("automountServiceAccountToken", True) is (
                d["metadata"]["name"] == "veil-autoscaler"
            )
            assert spec["securityContext"]["runAsNonRoot"] is True
            assert container(d)["securityContext"]["allowPrivilegeEscalation"] is False


def test_network_policies_and_pdbs(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["sgx"]
    deny = by(docs, "NetworkPolicy", "veil-default-deny")
    assert deny["spec"]["policyTypes"] == ["Ingress", "Egress"] and "ingress" not in deny["spec"]
    worker_np = by(docs, "NetworkPolicy", "veil-worker")
    assert (
        worker_np["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"][
            "app.kubernetes.io/component"
        ]
        == "gateway"
    )
    kms_np = by(docs, "NetworkPolicy", "veil-kms")
    assert kms_np["spec"]["egress"] == []
    # every workload's pods are selected by a component policy
    comps = {
        np["spec"]["podSelector"]["matchLabels"].get("app.kubernetes.io/component")
        for np in docs
        if np["kind"] == "NetworkPolicy"
    }
    assert {"gateway", "worker", "kms", "autoscaler"} <= comps
    assert by(docs, "PodDisruptionBudget", "veil-worker")["spec"]["maxUnavailable"] == 1
    assert by(docs, "PodDisruptionBudget", "veil-gateway")["spec"]["minAvailable"] == 1
    off = render("sgx", {"networkPolicy": {"enabled": False}, "autoscaler": {"enabled": False}})
    assert not any(d["kind"] in {"NetworkPolicy", "Role", "ClusterRole"} for d in off)


def test_bad_tee_mode_fails_to_render() -> None:
    with pytest.raises(helm_python.HelmError, match=r"tee\.mode must be simulated or sgx"):
        render("sgx", {"tee": {"mode": "tdx"}})


def test_kustomize_tree_is_generated_from_the_chart() -> None:
    r = subprocess.run(
        [sys.executable, str(KUSTOMIZE / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr


def _strip(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {
            k: (
                {
                    lk: lv
                    for lk, lv in v.items()
                    if lk not in ("helm.sh/chart", "app.kubernetes.io/managed-by")
                }
                if k == "labels" and isinstance(v, dict)
                else _strip(v)
            )
            for k, v in obj.items()
        }
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


@pytest.mark.slow
@needs_kubectl
@pytest.mark.parametrize("mode", list(MODES))
def test_kustomize_overlay_equals_helm_render(rendered: dict[str, list[dict[str, Any]]], mode: str) -> None:
    out = subprocess.run(
        ["kubectl", "kustomize", str(KUSTOMIZE / "overlays" / mode)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    kdocs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out) if d}
    hdocs = {(d["kind"], d["metadata"]["name"]): _strip(d) for d in rendered[mode]}
    for d in hdocs.values():  # helm leaves namespace to the release; kustomize writes it
        if d["kind"] not in {"ClusterRole", "ClusterRoleBinding"}:
            d["metadata"]["namespace"] = "veil"
    assert kdocs.keys() == hdocs.keys()
    for k in kdocs:
        assert kdocs[k] == hdocs[k], k
        kubernetes_validate.validate(kdocs[k], K8S_VERSION, strict=True)


# ----------------------------------------------------------------------------- kubectl dry-run


_KINDS = {
    ("apps", "deployments"): "Deployment",
    ("apps", "statefulsets"): "StatefulSet",
    ("rbac.authorization.k8s.io", "roles"): "Role",
    ("rbac.authorization.k8s.io", "rolebindings"): "RoleBinding",
    ("rbac.authorization.k8s.io", "clusterroles"): "ClusterRole",
    ("rbac.authorization.k8s.io", "clusterrolebindings"): "ClusterRoleBinding",
    ("networking.k8s.io", "networkpolicies"): "NetworkPolicy",
    ("policy", "poddisruptionbudgets"): "PodDisruptionBudget",
}
_CORE = {"services": "Service", "serviceaccounts": "ServiceAccount"}


@pytest.fixture()
def api_server() -> Iterator[str]:
    """kmock serving API discovery for the chart's kinds (kubectl needs it for resource mapping)."""
    box: dict[str, Any] = {}
    ready, stop = threading.Event(), threading.Event()

    async def main() -> None:
        async with kmock.KubernetesEmulator() as k, kmock.Server(k) as srv:
            for (group, plural), kind in _KINDS.items():
                info = k.resources[kmock.resource(group, "v1", plural)]
                info.kind = kind
                info.namespaced = not plural.startswith("cluster")
                info.verbs = {"get", "list", "create", "patch"}
            # kmock 0.8 reports groupVersion "/v1" for the core group; serve it explicitly
            k["get /api/v1"] << {
                "kind": "APIResourceList",
                "apiVersion": "v1",
                "groupVersion": "v1",
                "resources": [
                    {
                        "name": p,
                        "singularName": p[:-1],
                        "namespaced": True,
                        "kind": kind,
                        "verbs": ["get", "list", "create", "patch"],
                    }
                    for p, kind in _CORE.items()
                ],
            }
            box["url"] = str(srv.url).rstrip("/")
            ready.set()
            while not stop.is_set():
                await asyncio.sleep(0.02)

    t = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
    t.start()
    assert ready.wait(20)
    yield box["url"]
    stop.set()
    t.join(10)


@pytest.mark.slow
@needs_kubectl
@pytest.mark.parametrize("mode", list(MODES))
def test_kubectl_apply_dry_run(
    rendered: dict[str, list[dict[str, Any]]], mode: str, api_server: str, tmp_path: Path
) -> None:
    f = tmp_path / "all.yaml"
    f.write_text(yaml.safe_dump_all(rendered[mode]))
    env = {**os.environ, "KUBECONFIG": str(tmp_path / "none")}
    r = subprocess.run(
        [
            "kubectl",
            "apply",
            "--dry-run=client",
            "--validate=false",
            "-n",
            "veil",
            "--server",
            api_server,
            "-f",
            str(f),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("created (dry run)") == len(rendered[mode])
