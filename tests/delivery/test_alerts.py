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
            assert 'job="echo-service"' in rule["expr"], f"{rule['alert']} must select the job"


def test_rendered_prometheusrule_passes_promtool(tmp_path):
    for values in ({"prometheusRule": {"enabled": True}},
                   {"prometheusRule": {"enabled": True}, "nameOverride": "tcp-echo"}):
        spec = one(manifests(render(values)), "PrometheusRule")["spec"]
        path = tmp_path / "rendered-rules.yaml"
        path.write_text(yaml.safe_dump(spec))
        result = promtool("check", "rules", str(path))
        assert result.returncode == 0, result.stdout + result.stderr
