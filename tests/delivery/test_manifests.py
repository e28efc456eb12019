"""Rendered manifests against real Kubernetes tooling.

- kubernetes-validate --strict: the bundled OpenAPI schemas of Kubernetes
  1.30 (unknown fields are errors).
- prometheus-operator objects (skipped by kubernetes-validate as CRDs, like
  the cert-manager Certificate): the
  cloudcoil pydantic models, plus a round trip that catches keys the models
  would silently drop (typos).
- checkov: zero failures for the restricted-profile checks on the default
  render, and no failures at all outside a short, justified list.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml
from cloudcoil.models.prometheus_operator import v1 as promop

from support import (
    CERT_MANAGER_VALUES,
    EVERYTHING_VALUES,
    KUBE_VERSION,
    PODMONITOR_VALUES,
    load_values,
    manifests,
    render,
    strip_source,
    venv_tool,
    write_manifests,
)

RENDERS = {"default": None, "everything": EVERYTHING_VALUES, "podmonitor": PODMONITOR_VALUES,
           "cert-manager": CERT_MANAGER_VALUES}

# Restricted Pod Security checks (shared/TOOLING.md): privileged, hostPID,
# hostIPC, hostNetwork, allowPrivilegeEscalation, root containers, added
# capabilities, hostPort, docker socket, NET_RAW, seccomp, capabilities, SYS_ADMIN, high UID.
RESTRICTED_CHECKS = [
    "CKV_K8S_16", "CKV_K8S_17", "CKV_K8S_18", "CKV_K8S_19", "CKV_K8S_20", "CKV_K8S_23",
    "CKV_K8S_25", "CKV_K8S_26", "CKV_K8S_27", "CKV_K8S_28", "CKV_K8S_31", "CKV_K8S_37",
    "CKV_K8S_39", "CKV_K8S_40",
]

# Failures outside the restricted profile that the chart accepts on purpose.
ACCEPTED = {
    "CKV_K8S_11": "no CPU limit by default: CFS throttling adds latency to every echo (memory is limited)",
    "CKV_K8S_43": "no published image digest to default to; image.digest pins one",
    "CKV_K8S_15": "IfNotPresent is right for immutable version tags",
    "CKV2_K8S_6": "NetworkPolicy is opt-in (networkPolicy.enabled); the helm test pod is not a workload",
    "CKV_K8S_8": "only the short-lived helm test pod has no liveness probe",
    "CKV_K8S_9": "only the short-lived helm test pod has no readiness probe",
    "CKV_K8S_35": "the everything-on values pass an OTLP header from a Secret as env, like most OTLP setups",
}


@pytest.fixture(scope="module", params=list(RENDERS), ids=list(RENDERS))
def rendered(request, tmp_path_factory):
    values = load_values(RENDERS[request.param]) if RENDERS[request.param] else {}
    docs = manifests(render(values))
    directory = tmp_path_factory.mktemp(f"render-{request.param}")
    return request.param, docs, write_manifests(docs, directory), directory


def test_kubernetes_validate_strict(rendered):
    name, docs, paths, _ = rendered
    builtin = [p for p, d in zip(paths, docs) if not d["apiVersion"].startswith(("monitoring.coreos.com/", "cert-manager.io/"))]
    result = subprocess.run(
        [venv_tool("kubernetes-validate"), "--strict", "-k", KUBE_VERSION, "--quiet", *map(str, builtin)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, f"{name}: {result.stdout}{result.stderr}"


def test_kubernetes_validate_catches_an_unknown_field(tmp_path):
    """The validator really is strict: a typo in a rendered Deployment fails."""
    deploy = next(d for d in manifests(render()) if d["kind"] == "Deployment")
    deploy = strip_source(deploy)
    deploy["spec"]["template"]["spec"]["containers"][0]["lifecycle"]["preStop"]["slep"] = {"seconds": 1}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(deploy))
    result = subprocess.run(
        [venv_tool("kubernetes-validate"), "--strict", "-k", KUBE_VERSION, "--quiet", str(path)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0 and "slep" in result.stdout + result.stderr


def test_prometheus_operator_objects_match_the_crd_models():
    docs = manifests(render(load_values(EVERYTHING_VALUES))) + manifests(render(load_values(PODMONITOR_VALUES)))
    crds = [strip_source(d) for d in docs if d["apiVersion"] == "monitoring.coreos.com/v1"]
    assert sorted(d["kind"] for d in crds) == ["PodMonitor", "PrometheusRule", "ServiceMonitor"]
    for doc in crds:
        model = getattr(promop, doc["kind"]).model_validate(doc)
        # The models ignore unknown keys; a lossless round trip proves there are none.
        assert model.model_dump(mode="json", by_alias=True, exclude_unset=True) == doc, doc["kind"]


@pytest.fixture(scope="module")
def checkov_results(rendered):
    """One full checkov run per render: (passed, failed) check results."""
    name, _, _, directory = rendered
    argv = [venv_tool("checkov"), "-d", str(directory), "--framework", "kubernetes",
            "--skip-download", "--compact", "-o", "json"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=240)
    assert result.stdout.strip(), f"checkov printed nothing: {result.stderr[-2000:]}"
    report = json.loads(result.stdout)
    reports = report if isinstance(report, list) else [report]
    passed = [c for r in reports for c in r["results"]["passed_checks"]]
    failed = [c for r in reports for c in r["results"]["failed_checks"]]
    return passed, failed


def test_checkov_restricted_profile_has_zero_failures(checkov_results):
    passed, failed = checkov_results
    assert [(c["check_id"], c["resource"]) for c in failed if c["check_id"] in RESTRICTED_CHECKS] == []
    # Every restricted check ran, on the Deployment and on the test pod.
    kinds = {c["resource"].split(".")[0] for c in passed}
    for kind in ("Deployment", "Pod") if "Pod" in kinds else ("Deployment",):
        ran = {c["check_id"] for c in passed if c["resource"].startswith(kind + ".")}
        assert set(RESTRICTED_CHECKS) <= ran, (kind, sorted(set(RESTRICTED_CHECKS) - ran))


def test_checkov_has_no_unexpected_failures(checkov_results):
    _, failed = checkov_results
    unexpected = sorted({(c["check_id"], c["check_name"], c["resource"]) for c in failed if c["check_id"] not in ACCEPTED})
    assert unexpected == []
