"""Alert rules with the real promtool (Debian `prometheus` package).

`promtool check rules` on the source file and on the rules the chart's
PrometheusRule renders (also with a nameOverride, which rewrites the job
selector), and `promtool test rules` on the unit tests.
"""

from __future__ import annotations

import subprocess

import yaml

from support import APT_PROMETHEUS, DASHBOARDS, manifests, one, render, require_executable

RULES = DASHBOARDS / "echo-service-alerts.yaml"
RULE_TESTS = DASHBOARDS / "tests" / "echo-service-alerts_test.yaml"


def promtool(*args: str, cwd=None) -> subprocess.CompletedProcess:
    binary = require_executable("promtool", APT_PROMETHEUS)
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_promtool_check_rules():
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_test_rules():
    result = promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_unit_test_that_fires_it():
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired = {
        case["alertname"]
        for t in tests
        for case in t.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    quiet = {
        case["alertname"]
        for t in tests
        for case in t.get("alert_rule_test", [])
        if not case.get("exp_alerts")
    }
    assert alerts - fired == set(), "alerts without a firing test"
    assert alerts - quiet == set(), "alerts without a not-firing test"


def test_every_alert_has_severity_summary_and_description():
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
            assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
            assert rule["annotations"]["runbook_url"], rule["alert"]
            assert 'job="echo-service"' in rule["expr"], f"{rule['alert']} must select the job"


def test_rendered_prometheusrule_passes_promtool(tmp_path):
    for values in ({"prometheusRule": {"enabled": True}},
                   {"prometheusRule": {"enabled": True}, "nameOverride": "tcp-echo"}):
        spec = one(manifests(render(values)), "PrometheusRule")["spec"]
        path = tmp_path / "rendered-rules.yaml"
        path.write_text(yaml.safe_dump(spec))
        result = promtool("check", "rules", str(path))
        assert result.returncode == 0, result.stdout + result.stderr


RUNBOOK_PREFIX = "https://github.com/echo-service/echo-service/blob/main/dashboards/runbooks/"


def all_rules():
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def test_every_alert_links_an_existing_runbook():
    for rule in all_rules():
        url = rule["annotations"].get("runbook_url", "")
        assert url == f"{RUNBOOK_PREFIX}{rule['alert']}.md", rule["alert"]
        runbook = DASHBOARDS / "runbooks" / f"{rule['alert']}.md"
        assert runbook.is_file(), f"missing {runbook}"
        text = runbook.read_text()
        assert text.startswith(f"# {rule['alert']}\n") and "## Diagnose" in text and "## Fix" in text


def test_runbook_base_url_is_configurable():
    spec = one(manifests(render({"prometheusRule": {"enabled": True,
                                                    "runbookBaseUrl": "https://wiki.example.com/echo/"}})), "PrometheusRule")["spec"]
    urls = [r["annotations"]["runbook_url"] for g in spec["groups"] for r in g["rules"]]
    assert urls and all(u.startswith("https://wiki.example.com/echo/EchoService") and u.endswith(".md") for u in urls), urls


def test_an_absent_rule_covers_every_pod_gone():
    absent = [r for r in all_rules() if "absent(" in r["expr"]]
    assert absent and absent[0]["labels"]["severity"] == "critical"


def test_restarting_has_a_for_and_every_rule_tolerates_a_blip():
    rules = {r["alert"]: r for r in all_rules()}
    assert rules["EchoServiceRestarting"].get("for"), "a single scrape must not page"
    # Only the panic rule fires at once (one panic is already a bug).
    assert sorted(a for a, r in rules.items() if not r.get("for")) == ["EchoServicePanics"]


def test_abnormal_disconnects_has_a_minimum_traffic_guard():
    expr = next(r["expr"] for r in all_rules() if r["alert"] == "EchoServiceAbnormalDisconnects")
    assert " and on (namespace, job)" in expr and "> 0.2" in expr


def test_tls_alerts_cover_expiry_within_14_days_and_a_guarded_failure_ratio():
    rules = {r["alert"]: r for r in all_rules()}
    expiry = rules["EchoServiceCertificateExpiringSoon"]["expr"]
    assert "echo_tls_certificate_expiry_timestamp_seconds" in expiry and "< 14 * 86400" in expiry
    assert "listener" in expiry, "one pod's listener with an old certificate must be visible"
    failures = rules["EchoServiceTLSHandshakeFailures"]["expr"]
    assert "> 0.1\n" in failures and " and on (namespace, job, listener)" in failures
    # Clients that leave before a ClientHello (L4 health checks) are not failures.
    assert 'result!="other"' in failures and "other" not in failures.split("result=~")[1].split('"')[1]
