"""The chart's PROXY protocol, identity and downward-API values (issue 9).

Rendered by Helm's own engine: the identity port appears as tcp-identity on the
container, the Service and the NetworkPolicy only when enabled; the PROXY
settings and POD_IP reach the container env; the schema refuses the AWS
proxy-protocol annotation without a PROXY mode and a per-peer limit that would
count a node's SNAT address.
"""

from __future__ import annotations

import helm_python
import pytest

from support import EVERYTHING_VALUES, load_values, manifests, one, render, services

AWS_PROXY = "service.beta.kubernetes.io/aws-load-balancer-proxy-protocol"


def container(docs):
    (c,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def env_of(c):
    return {e["name"]: e.get("value") for e in c.get("env", [])}


def test_defaults_have_no_identity_port_and_no_proxy_env_but_the_pod_ip():
    docs = manifests(render())
    c = container(docs)
    assert [p["name"] for p in c["ports"]] == ["tcp-echo", "admin"]
    env = env_of(c)
    assert not any(k.startswith("ECHO_PROXY") or k in ("ECHO_IDENTITY_LISTEN", "ECHO_GREETING") for k in env)
    pod_ip = next(e for e in c["env"] if e["name"] == "POD_IP")
    assert pod_ip["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    # The admin port has its own ClusterIP Service; the echo Service carries only echo ports.
    echo_svc, admin_svc = services(docs)
    assert [p["name"] for p in echo_svc["spec"]["ports"]] == ["tcp-echo"]
    assert [p["name"] for p in admin_svc["spec"]["ports"]] == ["admin"]


def test_identity_and_proxy_values_reach_container_service_and_network_policy():
    values = load_values(EVERYTHING_VALUES)
    values["config"]["proxyProtocol"]["mode"] = "required"
    values["config"]["identity"]["greeting"] = True
    docs = manifests(render(values))
    c = container(docs)
    assert {"name": "tcp-identity", "containerPort": 8001, "protocol": "TCP"} in c["ports"]
    env = env_of(c)
    assert env["ECHO_IDENTITY_LISTEN"] == "[::]:8001"
    assert env["ECHO_GREETING"] == "true"
    assert env["ECHO_PROXY_PROTOCOL"] == "required"
    assert env["ECHO_PROXY_PROTOCOL_TRUSTED"] == "10.0.0.0/8,fd00::/8"
    assert env["ECHO_PROXY_HEADER_TIMEOUT"] == "3s"
    svc_ports = {p["name"]: p for p in services(docs)[0]["spec"]["ports"]}
    assert svc_ports["tcp-identity"]["targetPort"] == "tcp-identity"
    assert svc_ports["tcp-identity"]["port"] == 8001
    rules = one(docs, "NetworkPolicy")["spec"]["ingress"]
    (identity_rule,) = [r for r in rules if r["ports"] == [{"port": "tcp-identity", "protocol": "TCP"}]]
    echo_rule = next(r for r in rules if r["ports"] == [{"port": "tcp-echo", "protocol": "TCP"}])
    assert identity_rule.get("from") == echo_rule.get("from")


@pytest.mark.parametrize(
    "values",
    [
        {"service": {"type": "LoadBalancer", "annotations": {AWS_PROXY: "*"}}},
        {"service": {"annotations": {AWS_PROXY: "*"}}, "config": {"proxyProtocol": {"mode": "off"}}},
        {"service": {"type": "LoadBalancer"}, "config": {"limits": {"maxConnectionsPerPeer": 10}}},
        {
            "service": {"type": "NodePort", "externalTrafficPolicy": "Cluster"},
            "config": {"limits": {"maxConnectionsPerPeer": 10}},
        },
        {"config": {"proxyProtocol": {"mode": "sometimes"}}},
        {"config": {"proxyProtocol": {"trustedCidrs": ["10.0.0.0/8; rm -rf"]}}},
    ],
)
def test_schema_refuses_proxy_settings_that_cannot_work(values):
    with pytest.raises(helm_python.HelmValuesError):
        render(values)


@pytest.mark.parametrize(
    "values",
    [
        {"service": {"type": "LoadBalancer", "annotations": {AWS_PROXY: "*"}}, "config": {"proxyProtocol": {"mode": "required"}}},
        {"service": {"type": "LoadBalancer", "externalTrafficPolicy": "Local"}, "config": {"limits": {"maxConnectionsPerPeer": 10}}},
        {"service": {"type": "LoadBalancer"}, "config": {"limits": {"maxConnectionsPerPeer": 10}, "proxyProtocol": {"mode": "optional"}}},
        {"config": {"limits": {"maxConnectionsPerPeer": 10}}},
    ],
)
def test_schema_accepts_the_working_combinations(values):
    manifests(render(values))
