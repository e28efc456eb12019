"""Chart defects a real cluster would hit on day one (issue 13, section 2).

Each test renders the chart with Helm v4's engine (helm-python-sdk) and
states the rule the defect broke: the admin port off public Services, the
helm test pod admitted through the NetworkPolicy, monitors that cannot both
scrape, Service passthrough, PDBs that cannot block drains, pod labels that a
chart bump does not change, dashboards of two releases that do not collide,
Linkerd, namespaceOverride, global.imageRegistry and the test pod's image.
Rendered objects are checked with kubernetes-validate --strict where the
field is new.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import helm_python
import pytest
import yaml

from support import (
    CHART,
    EVERYTHING_VALUES,
    KUBE_VERSION,
    load_values,
    manifests,
    one,
    render,
    services,
    strip_source,
    venv_tool,
)


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def strict_validate(doc, tmp_path, kube_version=KUBE_VERSION):
    path = tmp_path / f"{doc['kind']}-{doc['metadata']['name']}.yaml"
    path.write_text(yaml.safe_dump(strip_source(doc)))
    return subprocess.run(
        [venv_tool("kubernetes-validate"), "--strict", "-k", kube_version, "--quiet", str(path)],
        capture_output=True, text=True, timeout=120,
    )


# --- 2. the admin port never on a public Service ---------------------------------


@pytest.mark.parametrize("svc_type", ["ClusterIP", "NodePort", "LoadBalancer"])
def test_admin_port_is_on_its_own_clusterip_service(svc_type):
    docs = manifests(render({"service": {"type": svc_type}, "serviceMonitor": {"enabled": True}}))
    echo, admin = services(docs)
    assert echo["spec"]["type"] == svc_type
    assert [p["name"] for p in echo["spec"]["ports"]] == ["tcp-echo"], "metrics/health must not be on the echo Service"
    assert admin["spec"]["type"] == "ClusterIP"
    assert [(p["name"], p["targetPort"]) for p in admin["spec"]["ports"]] == [("admin", "admin")]
    # The ServiceMonitor selects the admin Service only.
    sm = one(docs, "ServiceMonitor")["spec"]["selector"]["matchLabels"]
    assert matches(sm, admin["metadata"]["labels"]) and not matches(sm, echo["metadata"]["labels"])
    # Both Services reach the same pods; the admin one also while they are not Ready
    # (draining, or full at maxConnections: exactly when their metrics matter).
    assert echo["spec"]["selector"] == admin["spec"]["selector"]
    assert admin["spec"]["publishNotReadyAddresses"] is True
    assert "publishNotReadyAddresses" not in echo["spec"]


def test_helm_test_pod_reads_metrics_through_the_admin_service():
    docs = manifests(render({"service": {"type": "LoadBalancer"}}))
    echo, admin = services(docs)
    (c,) = one(docs, "Pod", hook="test")["spec"]["containers"]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["ECHO_HOST"] == echo["metadata"]["name"] and env["ADMIN_HOST"] == admin["metadata"]["name"]
    assert env["ADMIN_PORT"] == str(admin["spec"]["ports"][0]["port"])


# --- 3. helm test through a NetworkPolicy with allowEchoFrom ----------------------


def test_networkpolicy_admits_the_test_pod_on_the_echo_port_too():
    values = {"networkPolicy": {"enabled": True, "allowEchoFrom": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}}
    docs = manifests(render(values))
    np = one(docs, "NetworkPolicy")
    test_labels = one(docs, "Pod", hook="test")["metadata"]["labels"]

    def admitted(port):
        for rule in np["spec"]["ingress"]:
            if any(p["port"] == port for p in rule["ports"]):
                if "from" not in rule:
                    return True
                if any(matches(peer.get("podSelector", {}).get("matchLabels", {}), test_labels)
                       and "namespaceSelector" not in peer and "podSelector" in peer for peer in rule["from"]):
                    return True
        return False

    assert admitted("tcp-echo"), "helm test does an echo round trip: it must reach tcp-echo"
    assert admitted("admin")
    # The user's peers are kept.
    echo_rule = next(r for r in np["spec"]["ingress"] if r["ports"][0]["port"] == "tcp-echo")
    assert {"ipBlock": {"cidr": "10.0.0.0/8"}} in echo_rule["from"]


def test_everything_values_cover_ipv6_next_to_ipv4():
    np = one(manifests(render(load_values(EVERYTHING_VALUES))), "NetworkPolicy")
    echo_rule = np["spec"]["ingress"][0]
    cidrs = [p["ipBlock"]["cidr"] for p in echo_rule["from"] if "ipBlock" in p]
    assert cidrs == ["0.0.0.0/0", "::/0"]
    assert "::/0" in (CHART / "values.yaml").read_text(), "the values.yaml example must show ::/0"


# --- 5. ServiceMonitor and PodMonitor exclusive ------------------------------------


def test_servicemonitor_and_podmonitor_are_exclusive():
    with helm_python.Chart.load(str(CHART)) as chart:
        with pytest.raises(helm_python.HelmValuesError, match="'not' failed"):
            chart.render({"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}}, name="echo", namespace="apps")
    # Either one alone renders.
    assert one(manifests(render({"serviceMonitor": {"enabled": True}})), "ServiceMonitor")
    assert one(manifests(render({"podMonitor": {"enabled": True}})), "PodMonitor")


# --- 6. Service passthrough ----------------------------------------------------------


def test_service_passthrough_fields_reach_the_service(tmp_path):
    service = {
        "type": "LoadBalancer", "loadBalancerClass": "service.k8s.aws/nlb",
        "ipFamilyPolicy": "PreferDualStack", "ipFamilies": ["IPv6", "IPv4"],
        "internalTrafficPolicy": "Local", "trafficDistribution": "PreferClose",
        "sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 600}},
    }
    docs = manifests(render({"service": service}))
    echo, admin = services(docs)
    for key, value in service.items():
        assert echo["spec"][key] == value, key
    # The admin Service follows the IP families (a dual-stack scrape) but stays internal.
    assert admin["spec"]["ipFamilyPolicy"] == "PreferDualStack" and admin["spec"]["ipFamilies"] == ["IPv6", "IPv4"]
    assert "loadBalancerClass" not in admin["spec"]
    # trafficDistribution is a 1.31+ field; the others are known to 1.30.
    for doc in (echo, admin):
        result = strict_validate(doc, tmp_path, "1.31.0")
        assert result.returncode == 0, result.stdout + result.stderr


def test_load_balancer_class_only_on_load_balancers():
    echo, _ = services(manifests(render({"service": {"loadBalancerClass": "x.example/lb"}})))
    assert "loadBalancerClass" not in echo["spec"]


@pytest.mark.parametrize("bad", [
    {"ipFamilyPolicy": "DualStack"}, {"ipFamilies": ["IPv5"]}, {"internalTrafficPolicy": "Node"},
    {"sessionAffinity": "Cookie"}, {"trafficDistribution": "Nearest"},
])
def test_schema_rejects_bad_passthrough_values(bad):
    with helm_python.Chart.load(str(CHART)) as chart:
        with pytest.raises(helm_python.HelmValuesError, match=f"/service/{next(iter(bad))}"):
            chart.render({"service": bad}, name="echo", namespace="apps")


# --- 7. PDB: never a budget that blocks every drain; the eviction policy ------------


@pytest.mark.parametrize("values, message", [
    ({"replicaCount": 1, "podDisruptionBudget": {"minAvailable": 1}}, "minAvailable=1 with 1 replica"),
    ({"replicaCount": 2, "podDisruptionBudget": {"minAvailable": 2}}, "minAvailable=2 with 2 replica"),
    ({"autoscaling": {"enabled": True, "minReplicas": 1}, "podDisruptionBudget": {"minAvailable": 1}}, "with 1 replica"),
    ({"podDisruptionBudget": {"minAvailable": "100%"}}, "minAvailable=100%"),
    ({"podDisruptionBudget": {"maxUnavailable": 0}}, "maxUnavailable=0"),
    ({"podDisruptionBudget": {"maxUnavailable": "0%"}}, "maxUnavailable=0"),
], ids=["one-replica", "all-replicas", "hpa-min-1", "100-percent", "max-unavailable-0", "zero-percent"])
def test_pdb_that_would_block_every_drain_fails_to_render(values, message):
    with pytest.raises(helm_python.HelmRenderError, match="blocks every node drain") as err:
        render(values)
    assert message in str(err.value)


def test_single_replica_pdb_lets_a_drain_evict_it():
    pdb = one(manifests(render({"replicaCount": 1})), "PodDisruptionBudget")["spec"]
    assert pdb["maxUnavailable"] == 1 and "minAvailable" not in pdb


def test_busy_pods_are_not_evicted_outside_the_budget():
    """With maxConnections, a full pod is not-ready: AlwaysAllow would evict exactly those."""
    plain = one(manifests(render()), "PodDisruptionBudget")["spec"]
    assert plain["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    limited = one(manifests(render({"config": {"limits": {"maxConnections": 100}}})), "PodDisruptionBudget")["spec"]
    assert limited["unhealthyPodEvictionPolicy"] == "IfHealthyBudget"
    chosen = one(manifests(render({"config": {"limits": {"maxConnections": 100}},
                                   "podDisruptionBudget": {"unhealthyPodEvictionPolicy": "AlwaysAllow"}})),
                  "PodDisruptionBudget")["spec"]
    assert chosen["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


# --- 8. a chart bump does not restart pods ---------------------------------------------


def test_chart_version_bump_leaves_the_pod_template_unchanged(tmp_path):
    bumped = tmp_path / "echo-service"
    shutil.copytree(CHART, bumped)
    chart_yaml = yaml.safe_load((bumped / "Chart.yaml").read_text())
    chart_yaml["version"] = "9.9.9"
    (bumped / "Chart.yaml").write_text(yaml.safe_dump(chart_yaml))
    with helm_python.Chart.load(str(bumped)) as chart:
        out = chart.render({}, name="echo", namespace="apps")
    after = one(manifests({k: v for k, v in out.items() if v.strip()}), "Deployment")
    before = one(manifests(render()), "Deployment")
    assert after["metadata"]["labels"]["helm.sh/chart"] == "echo-service-9.9.9"
    assert after["spec"]["template"] == before["spec"]["template"]
    labels = before["spec"]["template"]["metadata"]["labels"]
    assert "helm.sh/chart" not in labels and "app.kubernetes.io/version" not in labels
    assert matches(before["spec"]["selector"]["matchLabels"], labels)


def test_pod_labels_and_common_labels_still_reach_the_pods():
    deploy = one(manifests(render({"podLabels": {"tier": "edge"}, "commonLabels": {"team": "platform"}})), "Deployment")
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert labels["tier"] == "edge" and labels["team"] == "platform"


# --- 9. two releases in one Grafana ---------------------------------------------------------


def test_two_releases_get_distinct_dashboard_uids_titles_and_keys():
    seen = []
    for name, namespace in (("echo", "apps"), ("echo2", "apps"), ("echo", "staging")):
        cm = one(manifests(render({"grafanaDashboard": {"enabled": True}}, name=name, namespace=namespace)), "ConfigMap")
        ((key, text),) = cm["data"].items()
        dashboard = json.loads(text)
        assert 1 <= len(dashboard["uid"]) <= 40
        seen.append((key, dashboard["uid"], dashboard["title"]))
    for i in range(3):
        assert len({s[i] for s in seen}) == 3, seen


def test_dashboard_uid_stays_within_grafanas_40_characters():
    cm = one(manifests(render({"grafanaDashboard": {"enabled": True}, "fullnameOverride": "x" * 63})), "ConfigMap")
    (text,) = cm["data"].values()
    assert len(json.loads(text)["uid"]) <= 40


# --- 9. the duration histogram covers the longest max age -------------------------------------


def test_max_connection_age_is_capped_at_the_histogram_range():
    env = {e["name"]: e.get("value") for e in one(manifests(render(
        {"config": {"limits": {"maxConnectionAge": "23h", "maxConnectionAgeJitter": "60m"}}})), "Deployment")
        ["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["ECHO_MAX_CONNECTION_AGE"] == "23h"
    for limits in ({"maxConnectionAge": "25h"}, {"maxConnectionAge": "24h", "maxConnectionAgeJitter": "1s"},
                   {"maxConnectionAge": "86401000ms"}):
        with pytest.raises(helm_python.HelmRenderError, match="at most 24h"):
            render({"config": {"limits": limits}})


# --- 10. Linkerd --------------------------------------------------------------------------------


def test_linkerd_opaque_port_is_the_echo_port():
    pod = one(manifests(render({"containerPorts": {"echo": 7000}})), "Deployment")["spec"]["template"]["metadata"]
    assert pod["annotations"]["config.linkerd.io/opaque-ports"] == "7000"
    off = one(manifests(render({"linkerd": {"opaqueEchoPort": False}})), "Deployment")["spec"]["template"]["metadata"]
    assert "config.linkerd.io/opaque-ports" not in off.get("annotations", {})
    # The user's annotations are kept next to it.
    both = one(manifests(render({"podAnnotations": {"a": "b"}})), "Deployment")["spec"]["template"]["metadata"]
    assert both["annotations"]["a"] == "b" and "config.linkerd.io/opaque-ports" in both["annotations"]


# --- 11. namespaceOverride, global.imageRegistry, the test pod, Chart.yaml ------------------------


def test_namespace_override_moves_every_namespaced_object():
    docs = manifests(render({"namespaceOverride": "edge", "serviceMonitor": {"enabled": True},
                             "networkPolicy": {"enabled": True}, "prometheusRule": {"enabled": True},
                             "grafanaDashboard": {"enabled": True}}))
    assert {d["metadata"]["namespace"] for d in docs} == {"edge"}
    assert one(docs, "ServiceMonitor")["spec"]["namespaceSelector"] == {"matchNames": ["edge"]}


def test_global_image_registry_applies_to_every_image():
    docs = manifests(render({"global": {"imageRegistry": "mirror.example.com:5000/"}}))
    images = [c["image"] for d in docs if d["kind"] in ("Deployment", "Pod")
              for c in (d["spec"].get("template", d)["spec"]["containers"])]
    assert sorted(images) == ["mirror.example.com:5000/echo-service/echo-service:0.1.0",
                              "mirror.example.com:5000/library/busybox:1.36.1"]


def test_default_images_are_fully_qualified():
    docs = manifests(render())
    deploy_image = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"]
    test_image = one(docs, "Pod", hook="test")["spec"]["containers"][0]["image"]
    assert deploy_image == "ghcr.io/echo-service/echo-service:0.1.0"
    assert test_image == "docker.io/library/busybox:1.36.1"


def test_test_pod_image_pins_by_digest_and_schedules_like_the_service():
    docs = manifests(render(load_values(EVERYTHING_VALUES)))
    pod = one(docs, "Pod", hook="test")["spec"]
    assert pod["containers"][0]["image"] == (
        "registry.example.com/mirror/busybox@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef")
    assert pod["imagePullSecrets"] == [{"name": "test-regcred"}]
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pod["tolerations"][0]["key"] == "dedicated"
    # Without its own pull secrets the test pod uses the chart's.
    plain = one(manifests(render({"imagePullSecrets": [{"name": "regcred"}]})), "Pod", hook="test")["spec"]
    assert plain["imagePullSecrets"] == [{"name": "regcred"}]


def test_chart_yaml_has_home_sources_and_a_shipped_icon():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["home"].startswith("https://") and chart["sources"] and all(s.startswith("https://") for s in chart["sources"])
    assert chart["icon"].startswith("https://") and chart["icon"].endswith("/helm/echo-service/icon.svg")
    assert (CHART / "icon.svg").read_text().startswith("<svg")
