"""The Helm chart, rendered and linted by Helm v4's own engine (helm-python-sdk).

Covers: default and "everything on" renders, strict lint, the values schema
(rejects wrong types, unknown keys, bad enums; documents every key), the
derived terminationGracePeriodSeconds, named ports and probes, and the
dashboard/alert copies shipped in the chart.
"""

from __future__ import annotations

import copy
import json

import helm_python
import pytest
import yaml

from support import (
    CHART,
    echo_service_binary,
    free_port,
    http_get,
    DASHBOARDS,
    CERT_MANAGER_VALUES,
    EVERYTHING_VALUES,
    KUBE_VERSION,
    PODMONITOR_VALUES,
    SHIPPED_FILES,
    load_values,
    manifests,
    one,
    render,
    services,
)


@pytest.fixture(scope="module")
def default_docs():
    return manifests(render())


@pytest.fixture(scope="module")
def everything_docs():
    return manifests(render(load_values(EVERYTHING_VALUES)))


@pytest.fixture(scope="module")
def podmonitor_docs():
    return manifests(render(load_values(PODMONITOR_VALUES)))


def kinds(docs):
    return sorted(d["kind"] for d in docs)


def container(deployment):
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def env_of(c):
    return {e["name"]: e.get("value") for e in c.get("env", [])}


# --- rendering ---------------------------------------------------------------


def test_default_render_is_a_plain_install(default_docs):
    """Zero values: Deployment, echo and admin Services, ServiceAccount, PDB and the helm test pod, nothing else."""
    assert kinds(default_docs) == ["Deployment", "Pod", "PodDisruptionBudget", "Service", "Service", "ServiceAccount"]
    pod = one(default_docs, "Pod", hook="test")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"


def test_everything_on_renders_every_kind(everything_docs):
    assert kinds(everything_docs) == sorted(
        [
            "ConfigMap", "Deployment", "HorizontalPodAutoscaler", "NetworkPolicy", "Pod",
            "PodDisruptionBudget", "PrometheusRule", "Service", "Service", "ServiceAccount",
            "ServiceMonitor",
        ]
    )
    deploy = one(everything_docs, "Deployment")
    assert "replicas" not in deploy["spec"], "with an HPA the Deployment must leave replicas to it"


@pytest.mark.parametrize("values_file", [None, EVERYTHING_VALUES, PODMONITOR_VALUES, CERT_MANAGER_VALUES],
                         ids=["default", "everything", "podmonitor", "cert-manager"])
def test_strict_lint_has_no_errors(values_file):
    values = load_values(values_file) if values_file else {}
    report = helm_python.lint(str(CHART), values, strict=True, kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == [], report
    serious = [m for m in report["messages"] if m["severity"] >= 2]
    assert serious == [], serious


def test_notes_say_how_to_try_the_release():
    notes = render()["echo-service/templates/NOTES.txt"]
    assert "kubectl -n apps port-forward svc/echo-echo-service 8000:tcp-echo\n" in notes
    assert "kubectl -n apps port-forward svc/echo-echo-service-admin 9000:admin" in notes
    assert "nc -w 2 127.0.0.1 8000" in notes
    assert "127.0.0.1:9000/metrics" in notes
    assert "helm test echo -n apps" in notes


# --- values schema -----------------------------------------------------------


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"replicaCount": "two"}, "/replicaCount"),
        ({"replicaCuont": 2}, "replicaCuont"),
        ({"service": {"tpye": "NodePort"}}, "tpye"),
        ({"service": {"type": "ExternalName"}}, "/service/type"),
        ({"shutdown": {"drainDelaySeconds": "5s"}}, "/shutdown/drainDelaySeconds"),
        ({"config": {"limits": {"idleTimeout": "5 minutes"}}}, "/config/limits/idleTimeout"),
        ({"config": {"logFormat": "xml"}}, "/config/logFormat"),
        ({"containerPorts": {"echo": 70000}}, "/containerPorts/echo"),
        ({"otel": {"protocol": "http/json"}}, "/otel/protocol"),
        ({"serviceMonitor": {"interval": "30"}}, "/serviceMonitor/interval"),
    ],
    ids=["type", "unknown-top-key", "unknown-nested-key", "enum", "int-not-duration",
         "duration-format", "log-format", "port-range", "otel-protocol", "prom-duration"],
)
def test_schema_rejects_bad_values(bad, message):
    with helm_python.Chart.load(str(CHART)) as chart:
        with pytest.raises(helm_python.HelmValuesError) as err:
            chart.render(bad, name="echo", namespace="apps")
    assert message in str(err.value)


def test_schema_is_draft7_and_accepts_the_shipped_values():
    import jsonschema

    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    jsonschema.Draft7Validator.check_schema(schema)
    defaults = load_values(CHART / "values.yaml")
    # Helm validates the user's values merged over the defaults.
    for values in (defaults, deep_merge(defaults, load_values(EVERYTHING_VALUES))):
        jsonschema.Draft7Validator(schema).validate(values)


def deep_merge(base, override):
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _walk(schema, values, path=""):
    """Yield (path, problem) for keys of values.yaml the schema does not describe."""
    props = schema.get("properties", {})
    for key, value in values.items():
        where = f"{path}.{key}" if path else key
        if key not in props:
            yield where, "missing from values.schema.json"
            continue
        sub = props[key]
        if not sub.get("description"):
            yield where, "has no description"
        if isinstance(value, dict) and "properties" in sub:
            yield from _walk(sub, value, where)


def test_every_value_is_described_in_the_schema():
    schema = json.loads((CHART / "values.schema.json").read_text())
    problems = list(_walk(schema, load_values(CHART / "values.yaml")))
    assert problems == []

    def undescribed(node, path="$"):
        for key, sub in node.get("properties", {}).items():
            if not sub.get("description"):
                yield f"{path}.{key}"
            yield from undescribed(sub, f"{path}.{key}")

    assert list(undescribed(schema)) == []


def test_every_schema_key_has_a_default_in_values_yaml():
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = load_values(CHART / "values.yaml")

    def missing(node, vals, path=""):
        for key, sub in node.get("properties", {}).items():
            where = f"{path}.{key}" if path else key
            if key == "global":
                continue
            if key not in vals:
                # Optional tuning keys of a probe are documented but unset by default.
                if not path.startswith("probes."):
                    yield where
                continue
            if isinstance(vals[key], dict) and "properties" in sub:
                yield from missing(sub, vals[key], where)

    assert list(missing(schema, values)) == []


# --- the Deployment ------------------------------------------------------------


def test_ports_are_named_and_probes_use_the_admin_port_by_name(default_docs):
    c = container(one(default_docs, "Deployment"))
    assert [(p["name"], p["containerPort"]) for p in c["ports"]] == [("tcp-echo", 8000), ("admin", 9000)]
    assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    svc, admin = services(default_docs)
    (echo_port,) = svc["spec"]["ports"]
    assert echo_port["targetPort"] == "tcp-echo" and echo_port["appProtocol"] == "tcp"
    (admin_port,) = admin["spec"]["ports"]
    assert admin_port["name"] == "admin" and admin_port["targetPort"] == "admin"


@pytest.mark.parametrize(
    "shutdown, expected",
    [
        ({}, 30),
        ({"preStopSleepSeconds": 0, "drainDelaySeconds": 0, "timeoutSeconds": 3, "graceMarginSeconds": 2}, 5),
        ({"preStopSleepSeconds": 10, "drainDelaySeconds": 20, "timeoutSeconds": 60, "graceMarginSeconds": 5}, 95),
    ],
    ids=["default", "no-prestop", "long"],
)
def test_grace_period_covers_prestop_drain_and_shutdown(shutdown, expected):
    docs = manifests(render({"shutdown": shutdown}))
    deploy = one(docs, "Deployment")
    spec = deploy["spec"]["template"]["spec"]
    c = container(deploy)
    env = env_of(c)
    assert spec["terminationGracePeriodSeconds"] == expected
    pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    drain = int(env["ECHO_DRAIN_DELAY"].removesuffix("s"))
    timeout = int(env["ECHO_SHUTDOWN_TIMEOUT"].removesuffix("s"))
    assert pre_stop + drain + timeout < spec["terminationGracePeriodSeconds"]
    if shutdown.get("preStopSleepSeconds") == 0:
        assert "lifecycle" not in c, "a 0 s sleep action is rejected before Kubernetes 1.32"


def test_restricted_security_by_default(default_docs):
    spec = one(default_docs, "Deployment")["spec"]["template"]["spec"]
    sc = container({"spec": {"template": {"spec": spec}}})["securityContext"]
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 65532
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert one(default_docs, "ServiceAccount")["automountServiceAccountToken"] is False


def test_values_reach_the_container_env(everything_docs):
    c = container(one(everything_docs, "Deployment"))
    env = env_of(c)
    assert env["ECHO_LISTEN"] == "[::]:8000" and env["ECHO_ADMIN_LISTEN"] == "[::]:9000"
    assert env["ECHO_DRAIN_DELAY"] == "5s" and env["ECHO_SHUTDOWN_TIMEOUT"] == "30s"
    assert env["ECHO_MAX_CONNECTIONS"] == "10000"
    assert env["ECHO_THROTTLE_BYTES_PER_SECOND"] == "1048576"
    assert env["ECHO_IDLE_TIMEOUT"] == "5m"
    assert env["ECHO_MAX_CONNECTION_AGE_GRACE"] == "30s"
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.observability:4317"
    assert env["OTEL_TRACES_SAMPLER_ARG"] == "0.25"
    attrs = env["OTEL_RESOURCE_ATTRIBUTES"].split(",")
    assert "k8s.pod.name=$(POD_NAME)" in attrs and "deployment.environment=staging" in attrs
    names = [e["name"] for e in c["env"]]
    # $(POD_NAME) only expands when POD_NAME is defined earlier in the list.
    assert names.index("POD_NAME") < names.index("OTEL_RESOURCE_ATTRIBUTES")
    assert c["args"] == ["--log-level=info"]
    assert "OTEL_EXPORTER_OTLP_HEADERS" in names


def test_defaults_set_no_limits_and_no_otel(default_docs):
    env = env_of(container(one(default_docs, "Deployment")))
    assert not [k for k in env if k.startswith("OTEL_")]
    for name in ("ECHO_MAX_CONNECTIONS", "ECHO_IDLE_TIMEOUT", "ECHO_THROTTLE_BYTES_PER_SECOND",
                 "ECHO_MAX_CONNECTION_AGE_GRACE"):
        assert name not in env


def test_otel_enabled_without_endpoint_fails_to_render():
    with pytest.raises(helm_python.HelmRenderError, match="otel.endpoint is required"):
        render({"otel": {"enabled": True}})


def test_topology_spread_gets_the_selector_labels(default_docs):
    deploy = one(default_docs, "Deployment")
    (tsc,) = deploy["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert tsc["labelSelector"]["matchLabels"] == deploy["spec"]["selector"]["matchLabels"]


# --- optional objects ----------------------------------------------------------


def test_pdb_is_not_gated_on_replica_count():
    docs = manifests(render({"replicaCount": 1}))
    assert one(docs, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


def test_monitors_scrape_the_admin_port_and_keep_the_job_name(everything_docs, podmonitor_docs):
    sm = one(everything_docs, "ServiceMonitor")
    pm = one(podmonitor_docs, "PodMonitor")
    _, svc = services(everything_docs)
    assert [e["port"] for e in sm["spec"]["endpoints"]] == ["admin"]
    assert [e["port"] for e in pm["spec"]["podMetricsEndpoints"]] == ["admin"]
    for mon in (sm, pm):
        assert mon["spec"]["jobLabel"] == "app.kubernetes.io/name"
        assert mon["spec"]["namespaceSelector"] == {"matchNames": ["apps"]}
    # The ServiceMonitor selects the admin Service, which carries the jobLabel label.
    for key, value in sm["spec"]["selector"]["matchLabels"].items():
        assert svc["metadata"]["labels"][key] == value
    assert pm["metadata"]["namespace"] == "monitoring"


def test_networkpolicy_opens_echo_and_limits_admin(everything_docs):
    np = one(everything_docs, "NetworkPolicy")
    # A third rule, the identity port, is checked in test_chart_proxy.py.
    echo_rule, admin_rule = np["spec"]["ingress"][:2]
    assert echo_rule["ports"] == [{"port": "tcp-echo", "protocol": "TCP"}]
    assert admin_rule["ports"] == [{"port": "admin", "protocol": "TCP"}]
    test_pod = one(everything_docs, "Pod", hook="test")
    # The helm test pod may reach the admin port ...
    allowed = admin_rule["from"][0]["podSelector"]["matchLabels"]
    assert all(test_pod["metadata"]["labels"].get(k) == v for k, v in allowed.items())
    # ... but is not selected by the Service (it must never receive echo traffic).
    svc_selector = services(everything_docs)[0]["spec"]["selector"]
    assert not all(test_pod["metadata"]["labels"].get(k) == v for k, v in svc_selector.items())
    assert np["spec"]["policyTypes"] == ["Ingress", "Egress"]


def test_networkpolicy_default_echo_port_is_open_to_everyone():
    docs = manifests(render({"networkPolicy": {"enabled": True}}))
    np = one(docs, "NetworkPolicy")
    assert "from" not in np["spec"]["ingress"][0]
    assert np["spec"]["policyTypes"] == ["Ingress"]


def test_hpa_uses_cpu_and_active_connections(everything_docs):
    hpa = one(everything_docs, "HorizontalPodAutoscaler")
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Resource"]["resource"]["target"]["averageUtilization"] == 60
    assert metrics["Pods"]["pods"]["metric"]["name"] == "echo_connections_active"
    assert hpa["spec"]["scaleTargetRef"]["name"] == one(everything_docs, "Deployment")["metadata"]["name"]


def test_service_type_options(everything_docs):
    svc = services(everything_docs)[0]["spec"]
    assert svc["type"] == "LoadBalancer" and svc["externalTrafficPolicy"] == "Local"
    assert svc["ports"][0]["nodePort"] == 30800
    # externalTrafficPolicy is invalid on ClusterIP Services: it must be dropped there.
    plain = services(manifests(render({"service": {"externalTrafficPolicy": "Local"}})))[0]["spec"]
    assert "externalTrafficPolicy" not in plain


# --- shipped dashboards and rules ------------------------------------------------


@pytest.mark.parametrize("name", SHIPPED_FILES)
def test_chart_ships_identical_copies_of_dashboards(name):
    source = (DASHBOARDS / name).read_bytes()
    shipped = (CHART / "files" / name).read_bytes()
    assert shipped == source, f"helm/echo-service/files/{name} differs from dashboards/{name}: run `make dashboards-sync`"


def test_dashboard_configmap_carries_the_dashboard_and_sidecar_label(everything_docs):
    cm = one(everything_docs, "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "Echo"}
    shipped = json.loads((DASHBOARDS / "echo-service-dashboard.json").read_text())
    ((key, text),) = cm["data"].items()
    assert key == "apps-echo-dashboard.json"
    dashboard = json.loads(text)
    # Only uid and title carry the release; the rest is the shipped dashboard.
    assert {k: v for k, v in dashboard.items() if k not in ("uid", "title")} == {
        k: v for k, v in shipped.items() if k not in ("uid", "title")
    }


def test_prometheusrule_carries_the_alert_rules():
    source = yaml.safe_load((DASHBOARDS / "echo-service-alerts.yaml").read_text())
    docs = manifests(render({"prometheusRule": {"enabled": True}}))
    assert one(docs, "PrometheusRule")["spec"] == source


def test_prometheusrule_follows_a_name_override():
    source = yaml.safe_load((DASHBOARDS / "echo-service-alerts.yaml").read_text())
    docs = manifests(render({"nameOverride": "tcp-echo", "prometheusRule": {"enabled": True}}))
    spec = one(docs, "PrometheusRule")["spec"]
    exprs = [r["expr"] for g in spec["groups"] for r in g["rules"]]
    assert all('job="tcp-echo"' in e and 'job="echo-service"' not in e for e in exprs)
    expected = copy.deepcopy(source)
    for g in expected["groups"]:
        for r in g["rules"]:
            r["expr"] = r["expr"].replace('job="echo-service"', 'job="tcp-echo"')
    assert spec == expected


def test_readme_values_table_lists_every_value():
    schema = json.loads((CHART / "values.schema.json").read_text())
    readme = (CHART / "README.md").read_text()
    table = {line.split("|")[1].strip().strip("`") for line in readme.splitlines() if line.startswith("| `")}

    def leaves(vals, sch, path=""):
        for key, value in vals.items():
            sub = sch["properties"][key]
            where = f"{path}.{key}" if path else key
            if isinstance(value, dict) and value and "properties" in sub:
                yield from leaves(value, sub, where)
            else:
                yield where

    missing = [key for key in leaves(load_values(CHART / "values.yaml"), schema) if key not in table]
    assert missing == [], "add these to the values table in helm/echo-service/README.md"


def test_admin_port_off_the_service_needs_podmonitor_and_no_helm_test():
    """Keeping the admin port off the Service is allowed, but not with what needs it."""
    with pytest.raises(helm_python.HelmRenderError, match="tests.enabled needs service.admin.enabled"):
        render({"service": {"admin": {"enabled": False}}})
    with pytest.raises(helm_python.HelmRenderError, match="serviceMonitor.enabled needs service.admin.enabled"):
        render({"service": {"admin": {"enabled": False}}, "tests": {"enabled": False}, "serviceMonitor": {"enabled": True}})
    docs = manifests(render({"service": {"admin": {"enabled": False}}, "tests": {"enabled": False}, "podMonitor": {"enabled": True}}))
    echo_svc, admin_svc = services(docs)
    assert [p["name"] for p in echo_svc["spec"]["ports"]] == ["tcp-echo"] and admin_svc is None
    assert one(docs, "PodMonitor")["spec"]["podMetricsEndpoints"][0]["port"] == "admin"
    assert not [d for d in docs if d["kind"] == "Pod"]


# --- fault injection (issue 10) ----------------------------------------------

FAULT_VALUES = {
    "faults": [
        {"kind": "latency", "delay": "50ms", "jitter": "10ms"},
        {"kind": "reset", "after_bytes": 1024, "probability": 0.5, "peers": ["10.0.0.0/8", "2001:db8::/32"]},
        {"kind": "bandwidth", "bytes_per_second": 1048576},
        {"kind": "accept_delay", "delay": "2s", "probability": 0.1},
    ],
    "faultSeed": 42,
    "adminControl": {"enabled": True, "tokenSecret": {"name": "echo-admin-token", "key": "token"}},
}


def test_faults_and_admin_control_are_off_by_default(default_docs):
    names = [e["name"] for e in container(one(default_docs, "Deployment")).get("env", [])]
    for name in ("ECHO_FAULTS", "ECHO_FAULT_SEED", "ECHO_ADMIN_CONTROL", "ECHO_ADMIN_TOKEN"):
        assert name not in names
    assert "readyz/disable" not in render()["echo-service/templates/NOTES.txt"]


def test_faults_render_as_echo_faults_specs_and_the_token_comes_from_a_secret():
    rendered = render(FAULT_VALUES)
    c = container(one(manifests(rendered), "Deployment"))
    env = {e["name"]: e for e in c["env"]}
    assert env["ECHO_FAULTS"]["value"] == (
        "latency,delay=50ms,jitter=10ms;"
        "reset,after-bytes=1024,peers=10.0.0.0/8|2001:db8::/32,probability=0.5;"
        "bandwidth,bytes-per-second=1048576;"
        "accept-delay,delay=2s,probability=0.1"
    )
    assert env["ECHO_FAULT_SEED"]["value"] == "42"
    assert env["ECHO_ADMIN_CONTROL"]["value"] == "true"
    assert env["ECHO_ADMIN_TOKEN"]["valueFrom"] == {
        "secretKeyRef": {"name": "echo-admin-token", "key": "token"}
    }
    notes = rendered["echo-service/templates/NOTES.txt"]
    assert "get secret echo-admin-token" in notes
    assert "-H \"Authorization: Bearer $TOKEN\" -X PUT 127.0.0.1:9000/faults" in notes
    assert "-X POST 127.0.0.1:9000/readyz/disable" in notes


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"faults": [{"kind": "teleport"}]}, "/faults/0/kind"),
        ({"faults": [{"kind": "close", "after-bytes": 3}]}, "after-bytes"),
        ({"faults": [{"kind": "latency", "delay": "50"}]}, "/faults/0/delay"),
        ({"faults": [{"kind": "reset", "probability": 2}]}, "/faults/0/probability"),
        ({"adminControl": {"enabeld": True}}, "enabeld"),
    ],
    ids=["kind", "kebab-key", "duration", "probability", "unknown-key"],
)
def test_schema_rejects_bad_faults(bad, message):
    with helm_python.Chart.load(str(CHART)) as chart:
        with pytest.raises(helm_python.HelmValuesError) as err:
            chart.render(bad, name="echo", namespace="apps")
    assert message in str(err.value)


def test_the_real_binary_serves_the_rendered_faults():
    """The rendered ECHO_FAULTS means to the service what the values say: GET /faults
    returns every configured field."""
    import subprocess
    import time

    c = container(one(manifests(render(FAULT_VALUES)), "Deployment"))
    env = {e["name"]: e["value"] for e in c["env"] if e["name"] in ("ECHO_FAULTS", "ECHO_FAULT_SEED")}
    admin = free_port()
    proc = subprocess.Popen(
        [str(echo_service_binary()), "--listen", "127.0.0.1:0", "--admin-listen", f"127.0.0.1:{admin}"],
        env={"PATH": "/usr/bin:/bin", **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()
            try:
                status, body = http_get(admin, "/faults")
                break
            except OSError:
                assert time.monotonic() < deadline, "service did not start"
                time.sleep(0.05)
        assert status == 200
        served = json.loads(body)
        assert len(served) == len(FAULT_VALUES["faults"])
        for want, got in zip(FAULT_VALUES["faults"], served):
            for key, value in want.items():
                assert got[key] == value, (key, want, got)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
