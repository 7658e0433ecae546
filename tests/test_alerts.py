"""Alert rules (alerts/netwatchd-rules.yaml): promtool checks and unit tests, hygiene, and one end-to-end test.

- `promtool check rules` and `promtool test rules alerts/tests/*.yaml` (every alert has a firing case in
  those files and every file is run).
- Each alert has a severity and the summary / description / runbook annotations; every metric its
  expression reads is one netwatchd exports (`netwatchctl metrics`), one test per metric so a metric that
  is not implemented yet fails alone.
- End to end (kernel): real Prometheus scrapes a real netwatchd in a lab node; a client pod calls a service
  whose only backend the test then blackholes; NetwatchPodToServiceDropRatioHigh goes pending, then firing.
  Prometheus evaluates a copy of the shipped rules whose `for:` durations are shortened; the expressions
  are asserted identical to the shipped ones.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from netwatchd.export.metrics import all_metrics, exposed_name
from tests.promlab import INSTALL_HINT, NODE_LABEL, Prometheus, prometheus_binary, promtool_binary

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "alerts" / "netwatchd-rules.yaml"
RULE_TESTS = sorted((REPO / "alerts" / "tests").glob("*.yaml"))
SEVERITIES = {"critical", "warning", "info"}
# Series Prometheus itself makes (not netwatchd's): allowed in expressions.
PROMETHEUS_SERIES = {"up"}


def load_rules(path: Path = RULES) -> list[dict]:
    return [r for g in yaml.safe_load(path.read_text())["groups"] for r in g["rules"]]


def alert_rules() -> list[dict]:
    return [r for r in load_rules() if "alert" in r]


def exported_names() -> set[str]:
    """Every series name netwatchd can export (histograms: _bucket, _count, _sum)."""
    names = set()
    for spec in all_metrics():
        base = exposed_name(spec)
        names |= {f"{base}_bucket", f"{base}_count", f"{base}_sum"} if spec.kind == "histogram" else {base}
    return names


def metric_names(expr: str) -> set[str]:
    """Metric names an expression reads (netwatch_* identifiers plus Prometheus' own series)."""
    names = set(re.findall(r"\bnetwatch_[a-z0-9_]+", expr))
    names |= {n for n in PROMETHEUS_SERIES if re.search(rf"\b{n}\s*\{{", expr)}
    return names


def referenced_metrics() -> list[str]:
    return sorted({n for r in load_rules() for n in metric_names(r["expr"])})


def promtool() -> str:
    tool = promtool_binary()
    if tool is None:
        pytest.skip(INSTALL_HINT)
    return tool


# ----------------------------------------------------------------------------------------------------
# promtool
# ----------------------------------------------------------------------------------------------------


def test_promtool_check_rules():
    res = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"SUCCESS: {len(load_rules())} rules found" in res.stdout


@pytest.mark.parametrize("test_file", RULE_TESTS, ids=[p.name for p in RULE_TESTS])
def test_promtool_unit_tests(test_file):
    res = subprocess.run([promtool(), "test", "rules", test_file.name], capture_output=True, text=True,
                         cwd=test_file.parent)
    assert res.returncode == 0, res.stdout + res.stderr


def test_every_alert_has_firing_and_quiet_unit_tests():
    """Each alert: at least one case where it fires and one evaluation where it must not (exp_alerts: [])."""
    firing, quiet = set(), set()
    for path in RULE_TESTS:
        doc = yaml.safe_load(path.read_text())
        assert doc["rule_files"] == ["../netwatchd-rules.yaml"], path
        for case in doc["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {r["alert"] for r in alert_rules()}
    assert names - firing == set(), "alerts without a firing unit test"
    assert names - quiet == set(), "alerts without a not-firing unit test"


# ----------------------------------------------------------------------------------------------------
# Hygiene
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_alert_has_severity_and_runbook(rule):
    assert rule["alert"].startswith("Netwatch")
    assert rule["labels"]["severity"] in SEVERITIES
    ann = rule["annotations"]
    assert set(ann) >= {"summary", "description", "runbook"}
    assert all(len(ann[k].split()) >= n for k, n in (("summary", 4), ("description", 15), ("runbook", 25)))
    assert rule.get("for"), "every alert waits before firing"


@pytest.mark.parametrize("metric", referenced_metrics())
def test_alert_metric_is_exported(metric):
    """Fails for a metric no probe exports (yet): `netwatchctl metrics` is the reference."""
    if metric in PROMETHEUS_SERIES:
        return
    assert metric in exported_names(), f"{metric} is not exported by netwatchd (see `netwatchctl metrics`)"


# ----------------------------------------------------------------------------------------------------
# End to end: real Prometheus, real netwatchd, a blackholed service backend
# ----------------------------------------------------------------------------------------------------

ALERT = "NetwatchPodToServiceDropRatioHigh"
TEST_FOR = "4s"
NS = "alrt"
VIP, PORT, BACKEND_PORT = "10.96.77.10", 80, 8080

# Opens a TCP connection to dst:port every `period` seconds without waiting for it (non-blocking), keeps
# each for 1 s, then closes it: a steady stream of new connects, whether they complete or not.
_CONNECT_LOOP = r"""
import socket, sys, time
dst, port, period = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
open_ = []
while True:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    s.connect_ex((dst, port))
    open_.append((time.monotonic(), s))
    while open_ and open_[0][0] < time.monotonic() - 1.0:
        open_.pop(0)[1].close()
    time.sleep(period)
"""


def short_for_rules(dest: Path) -> Path:
    """The shipped rules with every `for:` shortened to TEST_FOR; nothing else changes."""
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = TEST_FOR
    dest.write_text(yaml.safe_dump(doc, sort_keys=False))
    shipped = {r["alert"]: r["expr"] for r in alert_rules()}
    copied = {r["alert"]: r["expr"] for r in load_rules(dest) if "alert" in r}
    assert copied == shipped, "the test rules must evaluate exactly the shipped expressions"
    return dest


@pytest.mark.kernel
def test_pod_to_service_drop_alert_goes_pending_then_firing(lab, tmp_path):
    """A client calls a service; its only backend gets a blackhole route; the alert fires for that pair."""
    if prometheus_binary() is None:
        pytest.skip(INSTALL_HINT)
    from netwatchd.lab.cluster import LabCluster
    from netwatchd.lab.traffic import start_tcp_server, tcp_connect
    from tests.support import start_netwatchd

    rules = short_for_rules(tmp_path / "rules.yaml")
    node = lab.add_node("n1", pod_cidr="10.244.77.0/24", pod_cidr6="fd00:10:244:77::/64")
    client = node.add_pod("client", namespace=NS)
    backend = node.add_pod("backend", namespace=NS)
    start_tcp_server(backend, BACKEND_PORT)
    with LabCluster(lab, node) as cluster:
        cluster.add_service(NS, "cart", VIP, PORT, [(backend, BACKEND_PORT)])
        daemon = start_netwatchd(cluster.netwatchd_args(), netns=node.netns)
        prom = None
        try:
            prom = Prometheus(node, daemon.port, rule_files=[rules])
            prom.wait_scraped()
            assert prom.vector('netwatch_identity_up{source="apiserver"} == 1'), "services not known yet"
            assert tcp_connect(client, VIP, PORT) == "ok"

            # Healthy: 20 connects/s to the service for a few seconds, no alert for this pod.
            loop = client.popen([sys.executable, "-c", _CONNECT_LOOP, VIP, str(PORT), "0.05"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                assert not ours(prom.alerts()), "alert while the service is healthy"
                time.sleep(0.5)

            # Blackhole the only backend: every SYN (after kube-proxy's DNAT) now dies on the node.
            node.run(["ip", "route", "add", "blackhole", f"{backend.ip}/32"])
            states, seen = [], None
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                alerts = ours(prom.alerts())
                # Only the blackholed pair: the client's own closes (unread greetings, late replies dying on
                # closed sockets: QUEUE_PURGE / NO_SOCKET) are not network drops and must not alert.
                assert {a["labels"].get("service") for a in alerts} <= {"cart"}, alerts
                for a in alerts:
                    if not states or states[-1] != a["state"]:
                        states.append(a["state"])
                    seen = a
                if "firing" in states:
                    break
                time.sleep(0.2)
            loop.terminate()
            assert states[:2] == ["pending", "firing"], f"states seen: {states}; prometheus log: {prom.log()[-2000:]}"
            assert seen["labels"] == {"alertname": ALERT, "severity": "critical", "node": NODE_LABEL,
                                      "namespace": NS, "pod": "client", "service_namespace": NS,
                                      "service": "cart"}
            ratio = float(seen["value"])
            assert 0.05 < ratio <= 1.0
            assert seen["annotations"]["summary"].startswith(f"Pod {NS}/client loses ")
            assert seen["annotations"]["summary"].endswith(f"of its traffic to service {NS}/cart")
        finally:
            if prom is not None:
                prom.close()
            assert daemon.stop() == 0, "".join(daemon.stderr_lines)[-2000:]


def ours(alerts: list[dict]) -> list[dict]:
    """This test's alert for this test's pods (netwatchd sees drops of every lab on the machine)."""
    return [a for a in alerts if a["labels"].get("alertname") == ALERT and a["labels"].get("namespace") == NS]
