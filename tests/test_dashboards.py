"""Grafana dashboards (dashboards/*.json, built by dashboards/build.py).

- The committed JSON is exactly what build.py (grafana-foundation-sdk, pinned) produces.
- Each dashboard validates against Grafana's own schema: @grafana/schema's `Dashboard` TypeScript type turned
  into JSON Schema by ts-json-schema-generator (scripts/grafana-schema.sh, npm), checked with jsonschema.
- Variables `datasource`, `node`, `namespace`, `pod`, `traffic_class` exist; every query uses the data source
  variable, and filters by every variable whose label its metric carries; every metric a query reads is one
  netwatchd exports (one test per metric, so a metric that is not implemented yet fails alone).
- End to end (kernel): real Prometheus scrapes a real netwatchd in a lab with traffic of every kind (pods on
  two nodes, services healthy / blackholed / refusing, the internet, the node itself, loopback, an identity
  outage); EVERY panel query (and every variable query) runs with the variables set to "All" (`.*`) and to
  one concrete node / namespace / pod / class, and must parse and return at least one finite value.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest

from netwatchd.export.metrics import all_metrics, exposed_name
from tests.promlab import INSTALL_HINT, NODE_LABEL, Prometheus, prometheus_binary

REPO = Path(__file__).resolve().parent.parent
DASHBOARD_FILES = sorted((REPO / "dashboards").glob("*.json"))
SDK_PIN = "1769699379!11.6.0"
REQUIRED_VARIABLES = ("datasource", "node", "namespace", "pod", "traffic_class")
FILTER_LABELS = ("node", "namespace", "pod", "traffic_class")
# Series Prometheus makes about its targets (they carry `node` from the scrape configuration).
PROMETHEUS_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
# Labels of the metrics the issue fixes but a probe may not export yet (used only for the filter check).
ISSUE_LABELS = {
    "netwatch_packets_total": ("traffic_class", "direction", "namespace", "pod"),
    "netwatch_bytes_total": ("traffic_class", "direction", "namespace", "pod"),
    "netwatch_node_transit_seconds": ("traffic_class", "path"),
}


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def panels(doc: dict) -> list[dict]:
    """Every non-row panel, rows' nested panels included."""
    out = []
    for p in doc.get("panels", []):
        if p.get("type") == "row":
            out.extend(p.get("panels", []))
        else:
            out.append(p)
    return out


@dataclass(frozen=True)
class Query:
    dashboard: str
    panel_id: int
    title: str
    ref: str
    expr: str

    @property
    def id(self) -> str:
        return f"{self.dashboard}#{self.panel_id}:{self.title}:{self.ref}"


def all_queries() -> list[Query]:
    return [Query(path.name, p["id"], p["title"], t["refId"], t["expr"])
            for path in DASHBOARD_FILES for p in panels(load(path)) for t in p.get("targets", [])]


def variable_queries() -> list[tuple[str, str, str]]:
    """(dashboard, variable name, query) of every query variable."""
    return [(path.name, v["name"], v["query"]) for path in DASHBOARD_FILES
            for v in load(path)["templating"]["list"] if v["type"] == "query"]


SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}")


def selectors(expr: str) -> list[tuple[str, str]]:
    return SELECTOR.findall(expr)


def metric_names(expr: str) -> set[str]:
    names = set(re.findall(r"\bnetwatch_[a-z0-9_]+", expr))
    return names | {m for m, _ in selectors(expr) if m in PROMETHEUS_SERIES}


def exported() -> dict[str, tuple[str, ...]]:
    """Every series name netwatchd exports -> its labels (histograms: _bucket/_count/_sum)."""
    out: dict[str, tuple[str, ...]] = {}
    for spec in all_metrics():
        base = exposed_name(spec)
        names = [f"{base}_bucket", f"{base}_count", f"{base}_sum"] if spec.kind == "histogram" else [base]
        for n in names:
            out[n] = spec.labels
    return out


def labels_of(metric: str) -> tuple[str, ...] | None:
    if metric in PROMETHEUS_SERIES:
        return ("node",)
    known = exported()
    if metric in known:
        return known[metric]
    base = re.sub(r"_(bucket|count|sum)$", "", metric)
    return ISSUE_LABELS.get(metric) or ISSUE_LABELS.get(base)


# ----------------------------------------------------------------------------------------------------
# Built from code, valid for Grafana
# ----------------------------------------------------------------------------------------------------


def test_dashboards_exist():
    assert [p.name for p in DASHBOARD_FILES] == sorted(
        ["overview.json", "node.json", "pod.json", "services.json", "self-health.json"])


def test_committed_json_is_what_build_py_produces():
    try:
        version = metadata.version("grafana-foundation-sdk")
    except metadata.PackageNotFoundError:
        pytest.skip(f"grafana-foundation-sdk is not installed (pip install 'grafana-foundation-sdk=={SDK_PIN}')")
    assert version == SDK_PIN, f"dashboards are built with grafana-foundation-sdk=={SDK_PIN}, not {version}"
    res = subprocess.run([sys.executable, str(REPO / "dashboards" / "build.py"), "--check"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.fixture(scope="module")
def grafana_schemas() -> dict[str, dict]:
    """version -> Grafana's dashboard JSON Schema (scripts/grafana-schema.sh: npm, cached in .cache/)."""
    res = subprocess.run([str(REPO / "scripts" / "grafana-schema.sh")], capture_output=True, text=True,
                         timeout=600)
    if res.returncode != 0:
        pytest.skip(f"Grafana's schema could not be fetched with npm: {res.stderr.strip()[-500:]}")
    out = {}
    for line in res.stdout.splitlines():
        version, path = line.split(" ", 1)
        out[version] = json.loads(Path(path).read_text())
    return out


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=[p.name for p in DASHBOARD_FILES])
def test_dashboard_matches_grafana_schema(path, grafana_schemas):
    jsonschema = pytest.importorskip("jsonschema", reason="pip install jsonschema")
    doc = load(path)
    for version, schema in grafana_schemas.items():
        validator = jsonschema.validators.validator_for(schema)(schema)
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message[:300]}" for e in validator.iter_errors(doc)]
        assert errors == [], f"@grafana/schema {version}"


def test_schema_validation_rejects_a_bad_dashboard(grafana_schemas):
    """The schema is strict enough to matter: an unknown panel field and a wrong type are errors."""
    jsonschema = pytest.importorskip("jsonschema", reason="pip install jsonschema")
    doc = load(DASHBOARD_FILES[0])
    panels(doc)[0]["not_a_grafana_field"] = 1
    doc["refresh"] = 30
    for schema in grafana_schemas.values():
        validator = jsonschema.validators.validator_for(schema)(schema)
        assert len(list(validator.iter_errors(doc))) >= 2


# ----------------------------------------------------------------------------------------------------
# Variables, data source, queries (static)
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=[p.name for p in DASHBOARD_FILES])
def test_variables_and_datasource(path):
    doc = load(path)
    assert doc["uid"].startswith("netwatchd-") and doc["title"].startswith("netwatchd / ")
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert tuple(variables) == REQUIRED_VARIABLES
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in FILTER_LABELS:
        v = variables[name]
        assert v["multi"] and v["includeAll"] and v["allValue"] == ".*", name
    assert variables["traffic_class"]["query"].split(",") == [
        "container_to_container", "pod_to_pod_local", "pod_to_pod_remote", "pod_to_service", "pod_to_external",
        "external_to_pod", "host"]
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    for p in panels(doc):
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p.get("description"), p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"] and t["expr"].strip(), p["title"]


@pytest.mark.parametrize("query", all_queries(), ids=lambda q: q.id)
def test_query_filters_by_every_variable_its_metric_has(query):
    for metric, matchers in selectors(query.expr):
        labels = labels_of(metric)
        if labels is None:
            continue  # not a netwatchd metric the issue names: test_dashboard_metric_is_exported fails for it
        for label in FILTER_LABELS:
            if label == "node" or label in labels:
                assert f'{label}=~"${label}"' in matchers, f"{metric}{{{matchers}}} lacks the ${label} filter"


def test_service_drop_ratio_panel_is_what_the_alert_evaluates():
    """The Services dashboard's per-pair drop ratio leaves out the same socket-level reasons as the alert."""
    import yaml

    rules = yaml.safe_load((REPO / "alerts" / "netwatchd-rules.yaml").read_text())
    alert = next(r for g in rules["groups"] for r in g["rules"]
                 if r.get("alert") == "NetwatchPodToServiceDropRatioHigh")
    (panel,) = [q for q in all_queries() if q.title == "Drop ratio per client pod and service"]
    excluded = set(re.findall(r'reason!~"([^"]*)"', alert["expr"]))
    assert len(excluded) == 1 and set(re.findall(r'reason!~"([^"]*)"', panel.expr)) == excluded


def _dashboard_metrics() -> list[str]:
    names = {n for q in all_queries() for n in metric_names(q.expr)}
    names |= {n for _, _, q in variable_queries() for n in metric_names(q)}
    return sorted(names)


@pytest.mark.parametrize("metric", _dashboard_metrics())
def test_dashboard_metric_is_exported(metric):
    """Fails for a metric no probe exports (yet): `netwatchctl metrics` is the reference."""
    if metric in PROMETHEUS_SERIES:
        return
    assert metric in exported(), f"{metric} is not exported by netwatchd (see `netwatchctl metrics`)"


# ----------------------------------------------------------------------------------------------------
# End to end: every query against real Prometheus scraping a real netwatchd with real traffic
# ----------------------------------------------------------------------------------------------------

NS = "dash"
PORT = 8080
SVC_OK = ("10.96.87.10", 80)  # backends: web (node 1) and db (node 2)
SVC_BLACKHOLED = ("10.96.87.11", 80)  # backend "dead": a blackhole route on node 1
SVC_REFUSED = ("10.96.87.12", 80)  # backend web:9, nothing listens
VARIANTS = {
    "all": {"node": ".*", "namespace": ".*", "pod": ".*", "traffic_class": ".*"},
    "one": {"node": NODE_LABEL, "namespace": NS, "pod": "client", "traffic_class": "pod_to_service"},
}
GRAFANA_VARS = {"__rate_interval": "1m", "__interval": "15s", "__range": "5m"}

# Per "c,HOST,PORT[,TIMEOUT]": connect (TIMEOUT s, default 0.5), read the greeting, 512 bytes echoed, close;
# again 0.1 s later. Per "k,HOST,PORT": one long connection, a 1-byte echo every 50 ms (RTT samples over time).
_LOAD = r"""
import socket, sys, threading, time
def connects(host, port, timeout=0.5):
    while True:
        try:
            s = socket.create_connection((host, port), timeout=timeout)
            s.settimeout(1.0); s.recv(200); s.sendall(b"x" * 512); s.recv(4096); s.close()
        except OSError:
            pass
        time.sleep(0.1)
def chatty(host, port):
    while True:
        try:
            s = socket.create_connection((host, port), timeout=1.0)
            s.settimeout(1.0); s.recv(200)
            while True:
                s.sendall(b"y"); s.recv(16); time.sleep(0.05)
        except OSError:
            time.sleep(0.2)
for arg in sys.argv[1:]:
    kind, host, port, *timeout = arg.split(",")
    args = (host, int(port), *map(float, timeout))
    threading.Thread(target=connects if kind == "c" else chatty, args=args, daemon=True).start()
while True:
    time.sleep(3600)
"""


def substitute(expr: str, variables: dict[str, str]) -> str:
    values = {**GRAFANA_VARS, **variables}
    return re.sub(r"\$\{?(\w+)\}?", lambda m: values.get(m.group(1), m.group(0)), expr)


@dataclass
class Env:
    prom: Prometheus
    present: set[str]  # netwatch_* series names the lab's netwatchd exports


@pytest.fixture(scope="module")
def env():
    """A two-node lab with traffic of every class, netwatchd on node 1, Prometheus scraping it."""
    import os

    if os.geteuid() != 0:
        pytest.skip("lab namespaces need root")
    if prometheus_binary() is None:
        pytest.skip(INSTALL_HINT)
    from netwatchd.lab.cluster import LabCluster
    from netwatchd.lab.netns import Lab
    from netwatchd.lab.traffic import start_tcp_server
    from tests.support import start_netwatchd

    lab = Lab()
    daemon = prom = None
    try:
        n1 = lab.add_node("n1", pod_cidr="10.244.87.0/24", pod_cidr6="fd00:10:244:87::/64")
        n2 = lab.add_node("n2", pod_cidr="10.244.88.0/24", pod_cidr6="fd00:10:244:88::/64")
        lab.add_uplink(n1, n2)
        inet = lab.add_internet(n1)
        client, web, dead = (n1.add_pod(n, namespace=NS) for n in ("client", "web", "dead"))
        db = n2.add_pod("db", namespace=NS)
        for ep in (web, db, inet):
            start_tcp_server(ep, PORT)
        start_tcp_server(client, 7070, ip="127.0.0.1")
        inet.run(["ip", "route", "add", n1.pod_cidr, "via", n1.uplink_ip])
        cluster = LabCluster(lab, n1)
        cluster.add_service(NS, "shop", *SVC_OK, [(web, PORT), (db, PORT)])
        cluster.add_service(NS, "broken", *SVC_BLACKHOLED, [(dead, PORT)])
        cluster.add_service(NS, "closed", *SVC_REFUSED, [(web, 9)])
        n1.run(["ip", "route", "add", "blackhole", f"{dead.ip}/32"])

        # stats windows every 2 s, so the self-health cost panels have data within the test's time range
        daemon = start_netwatchd([*cluster.netwatchd_args(), "--identity-interval", "1", "--bpf-stats-window", "1",
                                  "--bpf-stats-every", "2"], netns=n1.netns)
        prom = Prometheus(n1, daemon.port)
        prom.wait_scraped()

        def load(ep, *targets: str) -> None:
            ep.popen([sys.executable, "-c", _LOAD, *targets], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        load(client, f"c,{web.ip},{PORT}", f"c,{db.ip},{PORT}", f"c,{SVC_OK[0]},{SVC_OK[1]}",
             f"k,{SVC_OK[0]},{SVC_OK[1]}", f"c,{SVC_BLACKHOLED[0]},{SVC_BLACKHOLED[1]}",
             f"c,{SVC_BLACKHOLED[0]},{SVC_BLACKHOLED[1]},3.5",
             f"c,{SVC_REFUSED[0]},{SVC_REFUSED[1]}", f"c,{inet.ip},{PORT}", "c,127.0.0.1,7070")
        load(n1, f"c,{web.ip},{PORT}")  # the node itself (host)
        load(inet, f"c,{web.ip},{PORT}")  # from outside the cluster (external_to_pod)
        # (one client of the blackholed service waits 3.5 s per connect: SYN retransmits at 1 s and 3 s)
        time.sleep(3)
        cluster.kubelet.mode = "error500"  # an identity outage: netwatch_identity_errors_total
        time.sleep(3)
        cluster.kubelet.mode = "ok"
        time.sleep(15)  # enough samples in every 1m rate window, traffic still flowing while queries run
        present = {r["metric"]["__name__"] for r in prom.vector('count by (__name__) ({__name__=~"netwatch_.*"})')}
        yield Env(prom, present)
    finally:
        if prom is not None:
            prom.close()
        if daemon is not None:
            daemon.stop()
        lab.close()


def _check(env: Env, expr: str, what: str) -> list[dict]:
    res = env.prom.query(expr)
    assert res.get("status") == "success", f"{what}: does not run: {res.get('errorType')}: {res.get('error')}"
    result = res["data"]["result"]
    finite = [r for r in result if not math.isnan(float(r["value"][1]))]
    if not finite:
        missing = sorted(n for n in metric_names(expr) if n.startswith("netwatch_") and n not in env.present)
        why = (f"metric(s) not exported by this netwatchd yet: {', '.join(missing)}" if missing
               else "the metrics exist but this selection has no data" if not result else "only NaN values")
        pytest.fail(f"{what}: no data ({why})\n{expr}")
    return result


@pytest.mark.kernel
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("query", all_queries(), ids=lambda q: q.id)
def test_panel_query_returns_data(env, query, variant):
    _check(env, substitute(query.expr, VARIANTS[variant]), f"{query.id} [{variant}]")


def _label_values_query(query: str) -> tuple[str, str]:
    m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query)
    assert m, f"unexpected variable query {query!r}"
    return f"count by ({m.group(2)}) ({m.group(1)})", m.group(2)


@pytest.mark.kernel
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dashboard,name,query", variable_queries(), ids=lambda x: x if "(" not in x else "q")
def test_variable_query_lists_the_lab(env, dashboard, name, query, variant):
    expr, label = _label_values_query(query)
    result = _check(env, substitute(expr, VARIANTS[variant]), f"{dashboard} ${name} [{variant}]")
    values = {r["metric"].get(label, "") for r in result}
    assert VARIANTS["one"][name] in values
