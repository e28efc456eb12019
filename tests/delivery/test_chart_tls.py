"""The chart's TLS, mTLS and UDP echo values (issue 11).

Rendered by Helm's own engine: tls-echo and udp-echo appear on the container, the
echo Service and the NetworkPolicy only when enabled; the certificate Secret is
mounted read-only as a whole directory (a subPath mount never sees a Secret
update, so rotation would not reach the pod); cert-manager gets a Certificate
whose Secret is the one mounted; the schema refuses TLS without a certificate
source. The everything-on values run for real in test_kubelet.py (TLS and UDP
round trips against the binary started from the rendered env).
"""

from __future__ import annotations

import helm_python
import pytest

from support import EVERYTHING_VALUES, load_values, manifests, one, render, services

SECRET_TLS = {"tls": {"enabled": True, "secretName": "echo-tls"}}
CERT_MANAGER = {"tls": {"enabled": True, "certManager": {"enabled": True, "issuerRef": {"name": "internal-ca"}}}}


def pod_spec(docs):
    return one(docs, "Deployment")["spec"]["template"]["spec"]


def env_of(spec):
    (c,) = spec["containers"]
    return {e["name"]: e.get("value") for e in c.get("env", [])}


def test_defaults_have_no_tls_or_udp_port_volume_or_certificate():
    docs = manifests(render())
    spec = pod_spec(docs)
    (c,) = spec["containers"]
    assert [p["name"] for p in c["ports"]] == ["tcp-echo", "admin"]
    assert "volumes" not in spec and "volumeMounts" not in c
    assert not any(k.startswith(("ECHO_TLS", "ECHO_UDP")) for k in env_of(spec))
    assert [p["name"] for p in services(docs)[0]["spec"]["ports"]] == ["tcp-echo"]
    assert not [d for d in docs if d["kind"] == "Certificate"]


def test_existing_secret_is_mounted_as_a_directory_and_named_in_the_env():
    docs = manifests(render({**SECRET_TLS, "udp": {"enabled": True}}))
    spec = pod_spec(docs)
    (c,) = spec["containers"]
    ports = {p["name"]: p for p in c["ports"]}
    assert ports["tls-echo"] == {"name": "tls-echo", "containerPort": 8443, "protocol": "TCP"}
    assert ports["udp-echo"] == {"name": "udp-echo", "containerPort": 8000, "protocol": "UDP"}
    (mount,) = c["volumeMounts"]
    assert mount == {"name": "tls", "mountPath": "/etc/echo-service/tls", "readOnly": True}
    (volume,) = spec["volumes"]
    assert volume["secret"]["secretName"] == "echo-tls"
    env = env_of(spec)
    assert env["ECHO_TLS_LISTEN"] == "[::]:8443" and env["ECHO_UDP_LISTEN"] == "[::]:8000"
    assert env["ECHO_TLS_CERT"] == "/etc/echo-service/tls/tls.crt"
    assert env["ECHO_TLS_KEY"] == "/etc/echo-service/tls/tls.key"
    assert "ECHO_TLS_CLIENT_CA" not in env and "ECHO_TLS_CLIENT_AUTH" not in env
    svc = {p["name"]: p for p in services(docs)[0]["spec"]["ports"]}
    assert svc["tls-echo"]["targetPort"] == "tls-echo" and svc["tls-echo"]["protocol"] == "TCP"
    assert svc["udp-echo"]["targetPort"] == "udp-echo" and svc["udp-echo"]["protocol"] == "UDP"
    # A UDP Service port has no appProtocol tcp; 8000/TCP and 8000/UDP live side by side.
    assert "appProtocol" not in svc["udp-echo"] and svc["udp-echo"]["port"] == svc["tcp-echo"]["port"]


def test_no_mount_uses_subpath():
    for values in (SECRET_TLS, CERT_MANAGER, load_values(EVERYTHING_VALUES)):
        (c,) = pod_spec(manifests(render(values)))["containers"]
        assert c["volumeMounts"] and all("subPath" not in m and "subPathExpr" not in m for m in c["volumeMounts"])
        assert all(m["readOnly"] for m in c["volumeMounts"])


@pytest.mark.parametrize("source", ["secretName", "configMapName"])
def test_client_ca_from_a_secret_or_a_configmap(source):
    values = {"tls": {**SECRET_TLS["tls"], "clientCA": {source: "client-ca", "key": "bundle.pem"}, "clientAuth": "optional"}}
    spec = pod_spec(manifests(render(values)))
    env = env_of(spec)
    assert env["ECHO_TLS_CLIENT_CA"] == "/etc/echo-service/client-ca/bundle.pem"
    assert env["ECHO_TLS_CLIENT_AUTH"] == "optional"
    volume = next(v for v in spec["volumes"] if v["name"] == "tls-client-ca")
    kind = "secret" if source == "secretName" else "configMap"
    assert volume[kind]["secretName" if kind == "secret" else "name"] == "client-ca"
    assert volume[kind]["items"] == [{"key": "bundle.pem", "path": "bundle.pem"}]


def test_cert_manager_certificate_writes_the_mounted_secret():
    docs = manifests(render(CERT_MANAGER))
    cert = one(docs, "Certificate")
    assert cert["apiVersion"] == "cert-manager.io/v1"
    spec = cert["spec"]
    (volume,) = pod_spec(docs)["volumes"]
    assert spec["secretName"] == volume["secret"]["secretName"] == "echo-echo-service-tls"
    assert spec["issuerRef"] == {"name": "internal-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}
    assert spec["dnsNames"] == ["echo-echo-service", "echo-echo-service.apps", "echo-echo-service.apps.svc",
                                "echo-echo-service.apps.svc.cluster.local"]
    # Renewal starts before the 14-day EchoServiceCertificateExpiringSoon alert would fire.
    assert spec["duration"] == "2160h" and spec["renewBefore"] == "360h" and 360 > 14 * 24
    assert spec["privateKey"]["rotationPolicy"] == "Always"


def test_cert_manager_uses_given_secret_name_and_dns_names():
    values = {"tls": {**CERT_MANAGER["tls"], "secretName": "my-tls",
                      "certManager": {**CERT_MANAGER["tls"]["certManager"], "dnsNames": ["echo.example.com"]}}}
    docs = manifests(render(values))
    spec = one(docs, "Certificate")["spec"]
    assert spec["secretName"] == "my-tls" == pod_spec(docs)["volumes"][0]["secret"]["secretName"]
    assert spec["dnsNames"] == ["echo.example.com"]


def test_networkpolicy_admits_tls_and_udp_like_the_echo_port():
    values = load_values(EVERYTHING_VALUES)
    rules = one(manifests(render(values)), "NetworkPolicy")["spec"]["ingress"]
    echo_rule = next(r for r in rules if r["ports"] == [{"port": "tcp-echo", "protocol": "TCP"}])
    for port, protocol in (("tls-echo", "TCP"), ("udp-echo", "UDP")):
        (rule,) = [r for r in rules if r["ports"] == [{"port": port, "protocol": protocol}]]
        assert rule.get("from") == echo_rule.get("from") and rule.get("from"), port
    # Without allowEchoFrom the echo ports are open to everyone, TLS and UDP too.
    values["networkPolicy"]["allowEchoFrom"] = []
    rules = one(manifests(render(values)), "NetworkPolicy")["spec"]["ingress"]
    for port in ("tcp-echo", "tls-echo", "udp-echo"):
        (rule,) = [r for r in rules if r["ports"][0]["port"] == port]
        assert "from" not in rule, port


@pytest.mark.parametrize(
    "values",
    [
        {"tls": {"enabled": True}},
        {"tls": {"enabled": True, "certManager": {"enabled": True}}},
        {"tls": {"enabled": True, "secretName": "echo-tls", "clientCA": {"secretName": "a", "configMapName": "b"}}},
        {"tls": {"enabled": True, "secretName": "echo-tls", "clientAuth": "request"}},
        {"tls": {"enabled": True, "secretName": "echo-tls", "alpn": ["h2,http/1.1"]}},
        {"tls": {"enabled": True, "secretName": "echo-tls", "handshakeTimeout": "ten seconds"}},
        {"tls": {"enabled": True, "secretName": "Echo_TLS"}},
        {"tls": {"enabled": True, "certManager": {"enabled": True, "issuerRef": {"name": "ca"}, "privateKeyAlgorithm": "DSA"}}},
        {"udp": {"enabled": True, "port": 70000}},
        {"udp": {"protocol": "UDP"}},
    ],
)
def test_schema_refuses_tls_and_udp_settings_that_cannot_work(values):
    with pytest.raises(helm_python.HelmValuesError):
        render(values)


@pytest.mark.parametrize(
    "values",
    [SECRET_TLS, CERT_MANAGER, {"udp": {"enabled": True}}, {"tls": {"secretName": "unused-while-off"}}],
)
def test_schema_accepts_the_working_combinations(values):
    manifests(render(values))


def notes(values=None) -> str:
    return next(text for path, text in render(values).items() if path.endswith("NOTES.txt"))


def test_notes_show_how_to_try_tls_and_udp_only_when_enabled():
    assert "openssl s_client" not in notes() and "UDP:" not in notes()
    text = notes({**SECRET_TLS, "udp": {"enabled": True, "port": 7}})
    assert "openssl s_client -quiet -connect 127.0.0.1:8443" in text
    # kubectl port-forward has no UDP: the note says so and uses the in-cluster name.
    assert "port-forward carries TCP only" in text and "UDP:echo-echo-service.apps:7" in text
