"""netwatchctl: the top model (rates, resets, quantiles, sorting, filtering, JSON) on synthetic /metrics text,
the commands' output and exit codes against a fake netwatchd and a fake Prometheus, and every read command
against a real netwatchd in a lab node while the test drops packets (kernel tests)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import CollectorRegistry
from rich.console import Console

from netwatchd import ctl, ctl_top
from netwatchd.ctl_model import (
    COLUMNS,
    Filter,
    Histogram,
    NetwatchdSource,
    PrometheusSource,
    Row,
    Snapshot,
    Window,
    cell,
    counter_increase,
    fmt_rate,
    fmt_seconds,
    glob_to_regex,
    histogram_increase,
    histogram_quantile,
    parse_duration,
    parse_metrics,
    restarted,
    rows_from_scrapes,
    sort_rows,
)
from netwatchd.export.histogram import DEFAULT_BOUNDS_S, quantile

REPO = Path(__file__).resolve().parent.parent
NETWATCHCTL = [sys.executable, "-m", "netwatchd.ctl"]
STATS_WINDOWS = ["--bpf-stats-window", "1", "--bpf-stats-every", "2"]
DROP_LABELS = ("reason", "protocol", "traffic_class", "direction", "namespace", "pod", "service_namespace", "service")
SOCK_LABELS = ("traffic_class", "direction", "namespace", "pod", "service_namespace", "service")

# ----------------------------------------------------------------------------------------------------
# Synthetic /metrics text, written by prometheus_client itself (the daemon's exposition code path)
# ----------------------------------------------------------------------------------------------------


def counter(name: str, labels: tuple[str, ...], series: list[tuple[dict, float]]):
    fam = CounterMetricFamily(name.removesuffix("_total"), "test", labels=list(labels))
    for lab, v in series:
        fam.add_metric([lab.get(k, "") for k in labels], v)
    return fam


def histogram(name: str, labels: tuple[str, ...], series: list[tuple[dict, list[int]]]):
    """`series`: (labels, per-slot counts over DEFAULT_BOUNDS_S + the +Inf slot) -> cumulative buckets."""
    fam = HistogramMetricFamily(name, "test", labels=list(labels))
    for lab, slots in series:
        cum, buckets = 0, []
        for i, n in enumerate(slots):
            cum += n
            buckets.append((f"{DEFAULT_BOUNDS_S[i]:g}" if i < len(DEFAULT_BOUNDS_S) else "+Inf", cum))
        fam.add_metric([lab.get(k, "") for k in labels], buckets, sum_value=0.0)
    return fam


def gauge(name: str, labels: tuple[str, ...], series: list[tuple[dict, float]]):
    fam = GaugeMetricFamily(name, "test", labels=list(labels))
    for lab, v in series:
        fam.add_metric([lab.get(k, "") for k in labels], v)
    return fam


def exposition(*families) -> str:
    class Static:
        def collect(self):
            return list(families)

    reg = CollectorRegistry(auto_describe=False)
    reg.register(Static())
    return generate_latest(reg).decode()


def slots(**at: int) -> list[int]:
    """Per-slot counts: slots(s_0=3, s_7=1) -> 3 samples <= 5us, 1 in the 1ms bucket (index into the bounds)."""
    out = [0] * (len(DEFAULT_BOUNDS_S) + 1)
    for k, n in at.items():
        out[int(k[2:])] = n
    return out


WEB = {"namespace": "shop", "pod": "web"}
P2P = {"traffic_class": "pod_to_pod_local"}
SVC = {"traffic_class": "pod_to_service", "service_namespace": "shop", "service": "cart"}


def scrape_texts() -> tuple[str, str]:
    """Two scrapes of a netwatchd 2 s apart (see test_rates_over_the_window for what happened in between)."""
    drop = dict(protocol="udp", direction="egress")
    prev = exposition(
        counter("netwatch_drops_total", DROP_LABELS, [
            ({**WEB, **P2P, **drop, "reason": "NETFILTER_DROP"}, 10),
            ({**WEB, **P2P, **drop, "reason": "NO_SOCKET", "protocol": "tcp"}, 5),
            ({"traffic_class": "host", "direction": "ingress", "reason": "NOT_SPECIFIED", "protocol": "other"}, 100),
            ({"namespace": "shop", "pod": "db", **P2P, **drop, "reason": "NO_SOCKET"}, 7),
        ]),
        counter("netwatch_packets_total", ("traffic_class", "direction", "namespace", "pod"), [
            ({**WEB, **P2P, "direction": "egress"}, 1000), ({**WEB, **P2P, "direction": "ingress"}, 500),
            ({"namespace": "shop", "pod": "db", **P2P, "direction": "ingress"}, 50),
        ]),
        counter("netwatch_tcp_connect_failures_total", (*SOCK_LABELS, "outcome"), [
            ({**WEB, **P2P, "direction": "egress", "outcome": "refused"}, 1),
        ]),
        histogram("netwatch_tcp_connect_seconds", SOCK_LABELS, [
            ({**WEB, **SVC, "direction": "egress"}, slots(s_3=5, s_7=1)),
        ]),
        histogram("netwatch_node_transit_seconds", ("traffic_class", "path"), [
            ({**P2P, "path": "bridge"}, slots(s_1=10)),
        ]),
        gauge("netwatch_probe_attached", ("probe", "hook"), [({"probe": "drops", "hook": "tracepoint:skb:kfree_skb"},
                                                               1)]),
    )
    cur = exposition(
        counter("netwatch_drops_total", DROP_LABELS, [
            ({**WEB, **P2P, **drop, "reason": "NETFILTER_DROP"}, 30),  # +20
            ({**WEB, **P2P, **drop, "reason": "NO_SOCKET", "protocol": "tcp"}, 9),  # +4
            ({**WEB, **SVC, **drop, "reason": "NETFILTER_DROP", "protocol": "tcp"}, 4),  # new series: +4
            ({"traffic_class": "host", "direction": "ingress", "reason": "NOT_SPECIFIED", "protocol": "other"}, 50),
            ({"namespace": "shop", "pod": "db", **P2P, **drop, "reason": "NO_SOCKET"}, 7),  # +0
        ]),
        counter("netwatch_packets_total", ("traffic_class", "direction", "namespace", "pod"), [
            ({**WEB, **P2P, "direction": "egress"}, 1400), ({**WEB, **P2P, "direction": "ingress"}, 600),
            ({"namespace": "shop", "pod": "db", **P2P, "direction": "ingress"}, 60),
        ]),
        counter("netwatch_tcp_connect_failures_total", (*SOCK_LABELS, "outcome"), [
            ({**WEB, **P2P, "direction": "egress", "outcome": "refused"}, 3),
            ({**WEB, **P2P, "direction": "egress", "outcome": "timeout"}, 1),
        ]),
        # 100 new connects in the window: 90 in (10us, 20us], 9 in (1ms, 2ms], 1 in (100ms, 200ms]
        histogram("netwatch_tcp_connect_seconds", SOCK_LABELS, [
            ({**WEB, **SVC, "direction": "egress"}, slots(s_2=90, s_3=5, s_7=1, s_8=9, s_18=1)),
        ]),
        # transit: two paths of one class, summed before the quantile
        histogram("netwatch_node_transit_seconds", ("traffic_class", "path"), [
            ({**P2P, "path": "bridge"}, slots(s_1=10 + 50)),
            ({**P2P, "path": "forward"}, slots(s_5=50)),
        ]),
        gauge("netwatch_probe_attached", ("probe", "hook"), [({"probe": "drops", "hook": "tracepoint:skb:kfree_skb"},
                                                               1)]),
    )
    return prev, cur


def window_rows(**flt) -> dict[tuple[str, str, str], Row]:
    prev, cur = scrape_texts()
    rows = rows_from_scrapes(parse_metrics(prev, 100.0), parse_metrics(cur, 102.0), Filter.build(**flt))
    return {(r.namespace, r.pod, r.traffic_class): r for r in rows}


# ----------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------


def test_rates_over_the_window():
    rows = window_rows()
    web = rows[("shop", "web", "pod_to_pod_local")]
    assert web.drops_per_second == pytest.approx((20 + 4) / 2)
    assert web.drop_reasons == pytest.approx({"NETFILTER_DROP": 10.0, "NO_SOCKET": 2.0})
    assert web.top_reason == "NETFILTER_DROP"
    assert web.drops_total == 39
    assert web.packets_per_second == pytest.approx((400 + 100) / 2)  # both directions
    assert web.connect_failures_per_second == pytest.approx((2 + 1) / 2)
    assert web.connect_failures == pytest.approx({"refused": 1.0, "timeout": 0.5})
    db = rows[("shop", "db", "pod_to_pod_local")]
    assert db.drops_per_second == 0 and db.top_reason == "" and db.drops_total == 7
    assert db.packets_per_second == pytest.approx(5.0)


def test_a_series_born_in_the_window_counts_from_zero_and_names_its_service():
    svc = window_rows()[("shop", "web", "pod_to_service")]
    assert svc.drops_per_second == pytest.approx(2.0)
    assert svc.services == ["shop/cart"]
    assert svc.packets_per_second == 0  # the metric exists, this row has no series


def test_a_smaller_counter_is_a_restart():
    node = window_rows()[("", "", "host")]
    assert node.drops_per_second == pytest.approx(50 / 2)  # 100 -> 50: all 50 are new
    assert counter_increase(100, 50) == 50 and counter_increase(100, 130) == 30 and counter_increase(None, 4) == 4


def test_daemon_restart_seen_in_its_uptime_zeroes_the_previous_scrape():
    """After a restart a counter can already be past its old value: only the uptime tells."""
    prev_text, cur_text = scrape_texts()
    prev = parse_metrics(prev_text, 100.0, uptime=500.0)
    ok = parse_metrics(cur_text, 102.0, uptime=502.0)
    again = parse_metrics(cur_text, 102.0, uptime=1.5)
    assert not restarted(prev, ok) and restarted(prev, again)
    web_ok = {r.key: r for r in rows_from_scrapes(prev, ok)}[("", "shop", "web", "pod_to_pod_local")]
    web_new = {r.key: r for r in rows_from_scrapes(prev, again)}[("", "shop", "web", "pod_to_pod_local")]
    assert web_ok.drops_per_second == pytest.approx(12.0)
    assert web_new.drops_per_second == pytest.approx((30 + 9) / 2)


def test_connect_quantiles_from_the_buckets_that_grew():
    svc = window_rows()[("shop", "web", "pod_to_service")]
    # grown: 90 in (10us,20us], 9 in (1ms,2ms], 1 in (100ms,200ms]; p50 rank 50 -> 10us + 10us*50/90
    assert svc.connect_p50_seconds == pytest.approx(10e-6 + 10e-6 * 50 / 90)
    # p99 rank 99: 90 before (1ms,2ms], 9 in it -> its upper bound exactly
    assert svc.connect_p99_seconds == pytest.approx(2e-3)
    assert svc.rtt_p99_seconds is None  # no RTT histogram exported


def test_node_transit_is_per_class_summed_over_paths():
    rows = window_rows()
    # grown: 50 in (5us,10us] (bridge), 50 in (100us,200us] (forward): p99 rank 99 -> 100us + 100us*49/50
    expected = 100e-6 + 100e-6 * 49 / 50
    assert rows[("shop", "web", "pod_to_pod_local")].transit_p99_seconds == pytest.approx(expected)
    assert rows[("shop", "db", "pod_to_pod_local")].transit_p99_seconds == pytest.approx(expected)
    assert rows[("shop", "web", "pod_to_service")].transit_p99_seconds is None


def test_absent_metrics_are_none_and_shown_as_dash():
    web = window_rows()[("shop", "web", "pod_to_pod_local")]
    assert web.retransmits_per_second is None and web.bytes_per_second is None
    cols = {c.id: c for c in COLUMNS}
    assert cell(web, cols["retrans"]) == "-" and cell(web, cols["bytes"]) == "-"
    assert cell(web, cols["drops"]) == "12.0" and cell(web, cols["reason"]) == "NETFILTER_DROP"
    node = window_rows()[("", "", "host")]
    assert cell(node, cols["pod"]) == "(node)" and cell(node, cols["namespace"]) == "-"


def test_histogram_quantile_is_prometheus_and_agrees_with_the_daemon_side_helper():
    bounds = {0.1: 0, 0.2: 0, 0.5: 0, float("inf"): 0}
    assert histogram_quantile(0.5, bounds) is None  # no observations: NaN in Prometheus
    assert histogram_quantile(0.5, {0.1: 4}) is None  # no +Inf bucket
    assert histogram_quantile(0.99, {0.1: 1, 0.2: 1, float("inf"): 10}) == 0.2  # rank in +Inf: highest bound
    assert histogram_quantile(0.5, {0.1: 2, 0.2: 4, float("inf"): 4}) == pytest.approx(0.1)
    assert histogram_quantile(0.75, {0.1: 2, 0.2: 4, float("inf"): 4}) == pytest.approx(0.15)
    rng = random.Random(7)
    for _ in range(200):
        per_slot = [rng.choice([0, 0, 0, 1, 5, 30]) for _ in range(len(DEFAULT_BOUNDS_S) + 1)]
        cum, buckets = 0, {}
        for i, n in enumerate(per_slot):
            cum += n
            buckets[DEFAULT_BOUNDS_S[i] if i < len(DEFAULT_BOUNDS_S) else float("inf")] = cum
        for q in (0.5, 0.9, 0.99):
            mine, theirs = histogram_quantile(q, buckets), quantile(per_slot, q)
            assert (mine is None) == (theirs is None)
            if mine is not None:
                assert mine == pytest.approx(theirs), (per_slot, q)


def test_histogram_increase_handles_reset():
    prev = Histogram({0.1: 5, float("inf"): 6}, count=6)
    assert histogram_increase(prev, Histogram({0.1: 7, float("inf"): 9}, count=9)) == {0.1: 2, float("inf"): 3}
    assert histogram_increase(prev, Histogram({0.1: 1, float("inf"): 2}, count=2)) == {0.1: 1, float("inf"): 2}


def test_sorting_numbers_first_largest_missing_last_and_reverse():
    rows = list(window_rows().values())
    by_drops = [(r.pod, r.traffic_class) for r in sort_rows(rows, "drops")]
    assert by_drops == [("", "host"), ("web", "pod_to_pod_local"), ("web", "pod_to_service"),
                        ("db", "pod_to_pod_local")]
    assert [(r.pod, r.traffic_class) for r in sort_rows(rows, "drops", reverse=True)] == by_drops[::-1]
    by_p50 = [r.traffic_class for r in sort_rows(rows, "conn_p50")]
    assert by_p50[0] == "pod_to_service"  # the only value; the "-" rows follow in both directions
    assert [r.traffic_class for r in sort_rows(rows, "conn_p50", reverse=True)][0] == "pod_to_service"
    assert [r.pod for r in sort_rows(rows, "pod")] == ["", "db", "web", "web"]  # (node) sorts first
    assert [r.pod for r in sort_rows(rows, "pod", reverse=True)] == ["web", "web", "db", ""]


def test_filters_by_flag_globs_service_and_text():
    assert {k[1] for k in window_rows(pod="w*")} == {"web"}
    assert set(window_rows(namespace="shop", traffic_class="pod_to_service")) == {("shop", "web", "pod_to_service")}
    assert set(window_rows(service="shop/cart")) == {("shop", "web", "pod_to_service")}
    assert set(window_rows(service="cart")) == {("shop", "web", "pod_to_service")}
    assert set(window_rows(service="other/cart")) == set()
    assert set(window_rows(text="db")) == {("shop", "db", "pod_to_pod_local")}
    assert set(window_rows(text="pod:web class:pod_to_pod*")) == {("shop", "web", "pod_to_pod_local")}
    assert set(window_rows(text="svc:shop/cart")) == {("shop", "web", "pod_to_service")}
    assert set(window_rows(text="NETFILTER web")) == {("shop", "web", "pod_to_pod_local"),
                                                      ("shop", "web", "pod_to_service")}
    assert set(window_rows(text="(node)")) == {("", "", "host")}


def test_row_json_fields():
    doc = window_rows()[("shop", "web", "pod_to_service")].to_json()
    assert list(doc) == ["node", "namespace", "pod", "traffic_class", "packets_per_second", "bytes_per_second",
                         "drops_per_second", "drops_total", "top_reason", "drop_reasons", "connect_p50_seconds",
                         "connect_p99_seconds", "rtt_p99_seconds", "transit_p99_seconds", "retransmits_per_second",
                         "connect_failures_per_second", "connect_failures", "services"]
    assert doc["node"] == "" and doc["namespace"] == "shop" and doc["pod"] == "web"
    assert doc["traffic_class"] == "pod_to_service"
    assert doc["packets_per_second"] == 0 and doc["bytes_per_second"] is None
    assert doc["drops_per_second"] == 2.0 and doc["drops_total"] == 4.0
    assert doc["top_reason"] == "NETFILTER_DROP" and doc["drop_reasons"] == {"NETFILTER_DROP": 2.0}
    assert doc["connect_p99_seconds"] == pytest.approx(0.002) and doc["rtt_p99_seconds"] is None
    assert doc["retransmits_per_second"] is None and doc["connect_failures_per_second"] == 0
    assert doc["services"] == ["shop/cart"]
    json.dumps(doc)


def test_formatting():
    assert [fmt_rate(v) for v in (None, 0, 0.001, 1.234, 12.34, 1234.0, 2.5e6)] == \
        ["-", "0", "<0.01", "1.23", "12.3", "1.2k", "2.5M"]
    assert [fmt_seconds(v) for v in (None, 15e-6, 1.5e-3, 0.25, 2.0)] == ["-", "15us", "1.5ms", "250ms", "2.00s"]
    assert parse_duration("2m") == 120 and parse_duration("1m30s") == 90 and parse_duration("45") == 45
    with pytest.raises(ValueError):
        parse_duration("2x")
    assert glob_to_regex("web-*") == "web-.*" and glob_to_regex("a.b?") == "a\\.b."


# ----------------------------------------------------------------------------------------------------
# The interactive view, without a terminal
# ----------------------------------------------------------------------------------------------------


class StaticSource:
    kind = "netwatchd"
    endpoint = "http://fake:9990"

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.prev_text, self.cur_text = scrape_texts()

    def refresh(self, flt):
        if self.fail:
            from netwatchd.ctl_model import Unreachable

            raise Unreachable("connection refused")
        return self.recompute(flt)

    def recompute(self, flt):
        rows = rows_from_scrapes(parse_metrics(self.prev_text, 100.0), parse_metrics(self.cur_text, 102.0), flt)
        return Window(rows, 2.0, {"drops": True})


def screen(view: ctl_top.TopView, height: int = 40, width: int = 200) -> str:
    console = Console(file=io.StringIO(), width=width, height=height, color_system=None)
    console.print(view.render(console))
    return console.file.getvalue()


def table_pods(text: str) -> list[str]:
    """The POD column of the table rows on screen."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("NAMESPACE")) + 2
    out = []
    for line in lines[start:]:
        parts = line.split()
        if len(parts) < 3 or line.startswith(("q quit", "/", "...", "(")):
            break
        out.append(parts[1])
    return out


def test_view_keys_sort_filter_help_quit():
    view = ctl_top.TopView(StaticSource(), Filter(), "drops", False, False, 1.0)
    view.refresh()
    text = screen(view)
    assert "sort DROPS/S v" in text and "ok" in text
    assert table_pods(text) == ["(node)", "web", "web", "db"]
    assert view.handle_key("2") is None and view.sort == "pod"  # number keys: column 2 = POD
    assert table_pods(screen(view)) == ["(node)", "db", "web", "web"]
    view.handle_key("r")
    assert table_pods(screen(view)) == ["web", "web", "db", "(node)"] and "sort POD ^" not in screen(view)
    view.handle_key("s")
    assert view.sort == "class"
    view.handle_key("S")
    assert view.sort == "pod"
    assert view.handle_key("/") is None and view.editing == ""
    for ch in "db":
        assert view.handle_key(ch) == "refilter" and view.refilter()
    text = screen(view)
    assert "/db_" in text and table_pods(text) == ["db"]
    view.handle_key("\r")
    assert view.text == "db" and view.editing is None and "filter: db" in screen(view)
    view.handle_key("/")
    view.handle_key("x")
    view.handle_key("esc")  # cancel: back to the applied filter
    assert view.text == "db" and view.editing is None
    assert view.handle_key("c") == "refilter" and view.refilter() and len(table_pods(screen(view))) == 4
    view.handle_key("?")
    assert "netwatchctl top: help" in screen(view)
    view.handle_key("x")  # any key closes the help
    assert "netwatchctl top: help" not in screen(view)
    assert view.handle_key("q") == "quit"


def test_view_says_reconnecting_and_keeps_the_last_rows():
    src = StaticSource()
    view = ctl_top.TopView(src, Filter(), "drops", False, False, 1.0)
    view.refresh()
    src.fail = True
    view.refresh()
    text = screen(view)
    assert "reconnecting... connection refused" in text and "web" in text
    src.fail = False
    view.refresh()
    assert "reconnecting" not in screen(view)


def test_view_truncates_to_the_screen():
    view = ctl_top.TopView(StaticSource(), Filter(), "drops", False, False, 1.0)
    view.refresh()
    text = screen(view, height=8)
    assert "... 2 more rows" in text and len(table_pods(text)) == 2


def test_view_drops_columns_that_do_not_fit_but_keeps_the_labels_and_the_sort_column():
    view = ctl_top.TopView(StaticSource(), Filter(), "connfail", False, False, 1.0)
    view.refresh()
    text = screen(view, width=80)
    head = text.splitlines()[2].split()
    assert head[:3] == ["NAMESPACE", "POD", "CLASS"] and head[-2:] == ["CONNFAIL/S", "v"]
    assert "TRANSIT-P99" not in head and "columns do not fit" in text
    assert max(len(line) for line in text.splitlines()) <= 80
    assert table_pods(text) == ["web", "(node)", "db", "web"]  # labels whole, never "sh…"; ties by labels


def test_parse_keys():
    assert list(ctl_top.parse_keys("q\x1b[Ax\x1b")) == ["q", "up", "x", "esc"]
    assert list(ctl_top.parse_keys("\x1b[15~/")) == ["/"]


def test_colours_follow_no_color(monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    assert ctl_top.make_console("auto").no_color
    monkeypatch.delenv("NO_COLOR")
    assert ctl_top.make_console("never").color_system is None
    assert ctl_top.make_console("always").is_terminal


# ----------------------------------------------------------------------------------------------------
# Commands against a fake netwatchd / a fake Prometheus (HTTP in this process)
# ----------------------------------------------------------------------------------------------------


class FakeServer:
    """An HTTP server answering GET paths from `routes` (path -> callable returning (status, body))."""

    def __init__(self, routes: dict) -> None:
        self.routes = routes
        self.requests: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                outer.requests.append(self.path)
                path, _, query = self.path.partition("?")
                fn = outer.routes.get(path)
                status, body = fn(urllib.parse.parse_qs(query)) if fn else (404, "not found")
                data = body if isinstance(body, bytes) else body.encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@contextlib.contextmanager
def fake_netwatchd(probes_ok: bool = True, identity_up: bool = True) -> Iterator[FakeServer]:
    prev, cur = scrape_texts()
    scrapes = [prev, cur]
    runs = {"n": 0}

    def metrics(_q):  # the first scrape sees `prev`, every later one `cur`
        return 200, scrapes.pop(0) if len(scrapes) > 1 else scrapes[0]

    def probes(_q):
        runs["n"] += 1
        n = runs["n"]
        progs = [{"program": "tracepoint__skb__kfree_skb", "prog_id": 7, "run_cnt": 1000 * n,
                  "run_time_ns": 150_000 * n, "ns_per_run": 150.0}]
        docs = [{"probe": "drops", "attached": True, "reason": "", "hooks": ["tracepoint:skb:kfree_skb"],
                 "programs": progs}]
        docs.append({"probe": "tc", "attached": probes_ok, "reason": "" if probes_ok else "tcx: EPERM",
                     "hooks": ["tc:veth", "tc:bridge"], "programs": []})
        return 200, json.dumps({"probes": docs})

    pods = [{"namespace": "shop", "pod": "web", "uid": "u1", "ips": ["10.244.1.2", "fd00::2"], "host_network": False,
             "phase": "Running", "workload": "ReplicaSet/web-1", "netns_inode": 4026532319, "host_veth": "veth1",
             "host_veth_ifindex": 5, "source": "kubelet"},
            {"namespace": "kube-system", "pod": "agent", "uid": "u2", "ips": ["192.168.100.1"], "host_network": True,
             "phase": "Running", "workload": "", "netns_inode": 0, "host_veth": "", "host_veth_ifindex": 0,
             "source": "kubelet"}]
    status = {"version": "t", "uptime_seconds": 10.0, "identity": {"source": "kubelet",
                                                                   "up": {"kubelet": identity_up}}}
    srv = FakeServer({"/metrics": metrics, "/api/v1/probes": probes,
                      "/api/v1/pods": lambda q: (200, json.dumps({"pods": pods})),
                      "/api/v1/status": lambda q: (200, json.dumps(status))})
    try:
        yield srv
    finally:
        srv.close()


def run_ctl(capsys, *argv: str) -> tuple[int, str, str]:
    code = ctl.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_top_once_json_document(capsys):
    with fake_netwatchd() as srv:
        code, out, err = run_ctl(capsys, "top", "--endpoint", srv.url, "--once", "-o", "json", "--interval", "0.1")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["source"] == "netwatchd" and doc["endpoint"] == srv.url
    assert doc["window_seconds"] > 0 and doc["sort"] == "drops" and doc["reverse"] is False
    assert doc["probes"] == {"drops": True}
    assert doc["filter"] == {"namespace": [], "pod": [], "traffic_class": [], "service": [], "node": [], "text": ""}
    keys = [(r["namespace"], r["pod"], r["traffic_class"]) for r in doc["rows"]]
    assert keys == [("", "", "host"), ("shop", "web", "pod_to_pod_local"), ("shop", "web", "pod_to_service"),
                    ("shop", "db", "pod_to_pod_local")]
    web = doc["rows"][1]
    assert web["top_reason"] == "NETFILTER_DROP" and web["drops_total"] == 39
    assert web["drop_reasons"]["NETFILTER_DROP"] / web["drops_per_second"] == pytest.approx(20 / 24)


def test_top_once_table_filters_and_no_ansi(capsys):
    with fake_netwatchd() as srv:
        code, out, _ = run_ctl(capsys, "top", "--endpoint", srv.url, "--once", "--interval", "0.1", "--pod", "web",
                               "-o", "wide", "--sort", "pod")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["NAMESPACE", "POD", "CLASS", "PKTS/S", "BYTES/S", "DROPS/S", "DROPS", "TOP-REASON",
                                "CONN-P50", "CONN-P99", "RTT-P99", "TRANSIT-P99", "RETRANS/S", "CONNFAIL/S", "SERVICES"]
    assert [line.split()[1] for line in lines[1:]] == ["web", "web"]
    assert "\x1b" not in out


def test_top_batch_mode_without_a_terminal_prints_each_refresh():
    with fake_netwatchd() as srv:
        res = subprocess.run([*NETWATCHCTL, "top", "--endpoint", srv.url, "--interval", "0.2", "--iterations", "2",
                              "-o", "json"], capture_output=True, text=True, timeout=30, cwd=REPO,
                             env={**os.environ, "FORCE_COLOR": "1"})
    assert res.returncode == 0, res.stderr
    docs = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(docs) == 2 and all(d["rows"] for d in docs)
    assert "\x1b" not in res.stdout


def test_drops_pods_probes_commands(capsys):
    with fake_netwatchd(probes_ok=False) as srv:
        code, out, _ = run_ctl(capsys, "drops", "--endpoint", srv.url, "-o", "json", "--once")
        assert code == 0
        rows = json.loads(out)  # the first scrape of the fake: cumulative counters
        assert rows[0] == {"reason": "NOT_SPECIFIED", "protocol": "other", "traffic_class": "host",
                           "direction": "ingress", "namespace": "", "pod": "", "service_namespace": "", "service": "",
                           "packets": 100, "bytes": 0}
        code, out, _ = run_ctl(capsys, "drops", "--endpoint", srv.url, "--pod", "web", "--reason", "NO_SOCKET")
        assert code == 0 and [line.split()[4] for line in out.splitlines()[1:]] == ["NO_SOCKET"]

        code, out, _ = run_ctl(capsys, "pods", "--endpoint", srv.url, "-o", "json")
        assert code == 0
        pods = json.loads(out)
        assert [(p["namespace"], p["pod"]) for p in pods] == [("kube-system", "agent"), ("shop", "web")]
        assert pods[1]["ips"] == ["10.244.1.2", "fd00::2"] and pods[1]["netns_inode"] == 4026532319
        code, out, _ = run_ctl(capsys, "pods", "--endpoint", srv.url, "-n", "shop")
        assert out.splitlines()[1].split() == ["shop", "web", "10.244.1.2,fd00::2", "4026532319", "veth1", "no",
                                               "kubelet"]

        code, out, err = run_ctl(capsys, "probes", "--endpoint", srv.url, "-o", "json", "--interval", "0.2")
        assert code == 4 and "probe(s) not attached: tc" in err
        probes = {p["probe"]: p for p in json.loads(out)}
        drops = probes["drops"]
        assert drops["attached"] is True and drops["hooks"] == ["tracepoint:skb:kfree_skb"]
        assert drops["ns_per_event"] == 150.0  # 150 us more per 1000 more runs
        assert 1000 / 1.0 < drops["events_per_second"] <= 1000 / 0.2  # 1000 runs over >= 0.2 s
        assert drops["programs"][0]["prog_id"] == 7
        assert probes["tc"] == {"probe": "tc", "attached": False, "reason": "tcx: EPERM",
                                "hooks": ["tc:veth", "tc:bridge"], "events_per_second": None, "ns_per_event": None,
                                "bpf_stats": False, "programs": []}


def test_drops_follow_prints_new_drops_only(capsys):
    def event(seq, pod="web", reason="NETFILTER_DROP"):
        return {"reason": reason, "protocol": "udp", "traffic_class": "pod_to_pod_local", "direction": "egress",
                "namespace": "shop", "pod": pod, "service_namespace": "", "service": "", "time": 1.0e9 + seq,
                "src": "10.244.1.2", "dst": "10.244.1.3", "sport": 5000, "dport": 7777, "location": "nf_hook_slow",
                "seq": seq}

    asked: list[dict] = []

    def recent(q):
        asked.append(q)
        since = int(q["since"][0])
        evs = [event(1), event(2)] if since == 0 else [event(3, pod="db"), event(4), event(5, reason="NO_SOCKET"),
                                                        event(6)]
        return 200, json.dumps({"seq": evs[-1]["seq"], "rate_limit": 50, "suppressed": 0, "events": evs})

    srv = FakeServer({"/api/v1/drops/recent": recent})
    try:
        code, out, err = run_ctl(capsys, "drops", "--endpoint", srv.url, "--follow", "-o", "json", "--count", "2",
                                 "--pod", "web", "--reason", "NETFILTER_DROP", "--rate", "50")
        assert code == 0, err
        assert [json.loads(line)["seq"] for line in out.splitlines()] == [4, 6]  # not 1, 2: history
        assert asked[0]["rate"] == ["50"] and asked[1]["since"] == ["2"]
        code, out, _ = run_ctl(capsys, "drops", "--endpoint", srv.url, "--follow", "--all", "--once")
        lines = out.splitlines()
        assert lines[0].split() == ["TIME", "NAMESPACE", "POD", "CLASS", "DIRECTION", "REASON", "PROTOCOL", "SRC",
                                    "DST", "LOCATION"]
        assert lines[1].split()[1:] == ["shop", "web", "pod_to_pod_local", "egress", "NETFILTER_DROP", "udp",
                                        "10.244.1.2:5000", "10.244.1.3:7777", "nf_hook_slow"]
    finally:
        srv.close()
    srv = FakeServer({"/api/v1/drops/recent": lambda q: (503, json.dumps({"error": "the drops probe is not "
                                                                                   "attached"}))})
    try:
        code, _, err = run_ctl(capsys, "drops", "--endpoint", srv.url, "--follow")
        assert code == 4 and "not attached" in err
    finally:
        srv.close()


def test_exit_codes(capsys):
    with fake_netwatchd(probes_ok=True) as srv:
        assert run_ctl(capsys, "probes", "--endpoint", srv.url, "--interval", "0.05")[0] == 0
        assert run_ctl(capsys, "pods", "--endpoint", srv.url)[0] == 0
    with fake_netwatchd(identity_up=False) as srv:
        code, _, err = run_ctl(capsys, "pods", "--endpoint", srv.url)
        assert code == 4 and "kubelet" in err
    # nothing listens there
    for cmd in (["top", "--once"], ["drops"], ["pods"], ["probes"]):
        code, out, err = run_ctl(capsys, *cmd, "--endpoint", "http://127.0.0.1:9", "--timeout", "2")
        assert code == 3 and out == "" and "cannot reach netwatchd" in err, cmd
    with pytest.raises(SystemExit) as exc:
        ctl.main(["top", "--window", "1m"])  # --window needs --prometheus
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        ctl.main(["top", "-o", "yaml"])
    assert exc.value.code == 2
    # a daemon with no probe attached: top shows what it has and exits 4
    not_attached = exposition(gauge("netwatch_probe_attached", ("probe", "hook"), [({"probe": "drops", "hook": "x"},
                                                                                    0)]))
    srv = FakeServer({"/metrics": lambda q: (200, not_attached)})
    try:
        code, _, err = run_ctl(capsys, "top", "--endpoint", srv.url, "--once", "--interval", "0.05")
        assert code == 4 and "no probe is attached" in err
        assert run_ctl(capsys, "drops", "--endpoint", srv.url)[0] == 4
    finally:
        srv.close()


def test_prometheus_source_queries_and_rows(capsys):
    """Instant queries by (node, namespace, pod, traffic_class); filters pushed into the selectors."""
    answers = {
        "netwatch_packets_total": [({"node": "n1", **WEB, **P2P}, 250.0), ({"node": "n2", **WEB, **P2P}, 10.0)],
        "netwatch_drops_total": [({"node": "n1", **WEB, **P2P, "reason": "NETFILTER_DROP", "service_namespace": "",
                                   "service": ""}, 3.0)],
        "netwatch_tcp_connect_seconds_bucket": [({"node": "n1", **WEB, **P2P}, 0.0015)],
        "netwatch_node_transit_seconds_bucket": [({"node": "n1", **P2P}, 0.00004), ({"node": "n2", **P2P}, "NaN")],
    }

    def query(q):
        promql = q["query"][0]
        queries.append(promql)
        result = []
        for metric, series in answers.items():
            if metric in promql and not ("rate(" not in promql and metric == "netwatch_drops_total"):
                result = [{"metric": m, "value": [time.time(), str(v)]} for m, v in series]
        if "netwatch_bytes_total" in promql:
            return 400, json.dumps({"status": "error", "errorType": "bad_data", "error": "boom"}) if fail else \
                json.dumps({"status": "success", "data": {"resultType": "vector", "result": []}})
        return 200, json.dumps({"status": "success", "data": {"resultType": "vector", "result": result}})

    queries: list[str] = []
    fail = False
    srv = FakeServer({"/api/v1/query": query})
    try:
        code, out, err = run_ctl(capsys, "top", "--prometheus", srv.url, "--window", "90s", "--once", "-o", "json")
        assert code == 0, err
        doc = json.loads(out)
        assert doc["source"] == "prometheus" and doc["window_seconds"] == 90
        rows = {(r["node"], r["traffic_class"]): r for r in doc["rows"]}
        n1, n2 = rows[("n1", "pod_to_pod_local")], rows[("n2", "pod_to_pod_local")]
        assert n1["packets_per_second"] == 250 and n1["drops_per_second"] == 3 and n1["top_reason"] == "NETFILTER_DROP"
        assert n1["connect_p50_seconds"] == 0.0015 and n1["transit_p99_seconds"] == 0.00004
        assert n2["drops_per_second"] == 0 and n2["transit_p99_seconds"] is None and n2["connect_p99_seconds"] is None
        assert n1["retransmits_per_second"] is None  # nothing answered for that metric
        assert any(q.startswith("sum by (node, namespace, pod, traffic_class) (rate(netwatch_packets_total{}[90s]))")
                   for q in queries)
        assert any(q.startswith("histogram_quantile(0.99, sum by (node, namespace, pod, traffic_class, le) (rate("
                                "netwatch_tcp_connect_seconds_bucket{}[90s])))") for q in queries)
        assert any("sum by (node, traffic_class, le) (rate(netwatch_node_transit_seconds_bucket{}[90s]))" in q
                   for q in queries)

        queries.clear()
        code, out, _ = run_ctl(capsys, "top", "--prometheus", srv.url, "--once", "-o", "wide", "--namespace", "shop",
                               "--pod", "web-*,api", "--service", "shop/cart", "--service", "db", "--node", "n1")
        assert code == 0 and out.splitlines()[0].split()[:4] == ["NODE", "NAMESPACE", "POD", "CLASS"]
        drops_q = next(q for q in queries if "rate(netwatch_drops_total" in q)
        assert 'namespace=~"shop"' in drops_q and 'pod=~"web-.*|api"' in drops_q and 'node=~"n1"' in drops_q
        assert 'service_namespace=~"shop",service=~"cart"' in drops_q and '[120s]) or rate(' in drops_q
        packets_q = next(q for q in queries if "netwatch_packets_total" in q)
        assert "service" not in packets_q

        # the interactive filter: plain words and label words from the last answers, svc: words ask again
        src = PrometheusSource(srv.url, window=60)
        src.refresh(Filter())
        asked = len(queries)
        assert [r.node for r in src.recompute(Filter(text="node:n2")).rows] == ["n2"]
        assert [r.node for r in src.recompute(Filter(text="n1 web")).rows] == ["n1"]
        assert src.recompute(Filter(text="svc:cart")) is None and len(queries) == asked

        fail = True
        code, _, err = run_ctl(capsys, "top", "--prometheus", srv.url, "--once")
        assert code == 4 and "bad_data: boom" in err
    finally:
        srv.close()
    code, _, err = run_ctl(capsys, "top", "--prometheus", "http://127.0.0.1:9", "--once", "--timeout", "2")
    assert code == 3 and "cannot reach Prometheus" in err


def test_netwatchd_source_recovers_after_the_daemon_restarts():
    """Unreachable while down; the next scrapes carry on (the model counts from the restarted counters)."""
    prev, cur = scrape_texts()
    state = {"up": True, "text": prev, "uptime": 100.0}

    def get(url, timeout):
        from netwatchd.ctl_model import Unreachable

        if not state["up"]:
            raise Unreachable("connection refused")
        if url.endswith("/api/v1/status"):
            return 200, json.dumps({"uptime_seconds": state["uptime"]}).encode()
        return 200, state["text"].encode()

    clock = iter(range(0, 100, 2))
    src = NetwatchdSource("127.0.0.1:9990", get=get, clock=lambda: float(next(clock)))
    assert src.endpoint == "http://127.0.0.1:9990"
    assert src.refresh(Filter()) is None  # first scrape: the start of the first window
    state["up"] = False
    with pytest.raises(Exception, match="connection refused"):
        src.refresh(Filter())
    state.update(up=True, text=cur, uptime=1.0)  # restarted: counters from zero, uptime small
    w = src.refresh(Filter())
    web = {r.key: r for r in w.rows}[("", "shop", "web", "pod_to_pod_local")]
    assert web.drops_total == 39 and web.drops_per_second == pytest.approx(39 / w.seconds)


def test_snapshot_parses_counters_histograms_and_empty_families():
    text = exposition(counter("netwatch_tcp_retransmits_total", SOCK_LABELS, []),
                      histogram("netwatch_tcp_rtt_seconds", SOCK_LABELS, [({**WEB, **P2P}, slots(s_4=2))]))
    snap = parse_metrics(text, 1.0)
    assert isinstance(snap, Snapshot)
    assert "netwatch_tcp_retransmits_total" in snap.present and snap.counters["netwatch_tcp_retransmits_total"] == {}
    (h,) = snap.histograms["netwatch_tcp_rtt_seconds"].values()
    assert h.count == 2 and h.buckets[float("inf")] == 2 and h.buckets[100e-6] == 2 and h.buckets[50e-6] == 0


def test_prometheus_source_rejects_non_prometheus_answers():
    src = PrometheusSource("http://x", get=lambda url, t: (200, b"<html>"))
    from netwatchd.ctl_model import Unreachable

    with pytest.raises(Unreachable):
        src.query("up")


# ----------------------------------------------------------------------------------------------------
# A real netwatchd in a lab node (kernel tests)
# ----------------------------------------------------------------------------------------------------


class CtlLab:
    """Node n1 (pods shop/web, shop/db, shop/cart; Service shop/cart -> cart:8080; Service shop/gone -> db:9090,
    blackholed by a FORWARD DROP) and node n2, a lab kubelet/apiserver, netwatchd in n1's netns. Pod CIDRs and
    service VIPs are random per run (see __init__)."""

    def __init__(self, lab) -> None:
        from netwatchd.lab.cluster import LabCluster
        from netwatchd.lab.traffic import ping, start_tcp_server
        from tests.support import start_netwatchd

        self.lab = lab
        # pod CIDRs of their own: netwatchd attributes kernel-wide drops by address, and other labs on this
        # machine (concurrent test runs) use the default 10.244.n.0/24
        b = random.randrange(200, 250)
        self.n1 = lab.add_node("n1", pod_cidr=f"10.{b}.1.0/24", pod_cidr6=f"fd00:10:{b}:1::/64")
        self.n2 = lab.add_node("n2", pod_cidr=f"10.{b}.2.0/24", pod_cidr6=f"fd00:10:{b}:2::/64")
        lab.add_uplink(self.n1, self.n2)
        self.web, self.db, self.cart = (self.n1.add_pod(n, namespace="shop") for n in ("web", "db", "cart"))
        start_tcp_server(self.cart, 8080)
        self.cluster = LabCluster(lab, self.n1)
        self.cart_vip, self.gone_vip = f"10.96.{b}.10", f"10.96.{b}.20"  # service VIPs of their own too
        self.cluster.add_service("shop", "cart", self.cart_vip, 80, [(self.cart, 8080)])
        self.cluster.add_service("shop", "gone", self.gone_vip, 80, [(self.db, 9090)])
        self.n1.iptables("-I", "FORWARD", "-p", "tcp", "--dport", "9090", "-j", "DROP")
        self.n1.iptables("-I", "FORWARD", "-s", self.web.ip, "-d", self.db.ip, "-p", "udp", "--dport", "7777",
                         "-j", "DROP")
        assert ping(self.web, self.db.ip) == 1  # neighbours resolved: every datagram reaches FORWARD
        self.start_netwatchd = start_netwatchd
        # stats windows of 1 s every 2 s, so `netwatchctl probes` sees the load a test just started
        self.daemon = start_netwatchd([*self.cluster.netwatchd_args(), *STATS_WINDOWS], netns=self.n1.netns)
        self.wait_identity()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.daemon.port}"

    def wait_identity(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (self.daemon.value("netwatch_identity_up", source="kubelet") == 1
                    and self.daemon.value("netwatch_identity_up", source="apiserver") == 1):
                time.sleep(1.0)  # the Services reached the watcher
                return
            time.sleep(0.2)
        raise AssertionError("netwatchd did not see the lab kubelet and apiserver")

    def restart_daemon(self) -> None:
        """Stop netwatchd and start it again on the same port."""
        port = self.daemon.port
        assert self.daemon.stop() == 0
        self.daemon = self.start_netwatchd([*self.cluster.netwatchd_args(), *STATS_WINDOWS,
                                            "--listen", f"127.0.0.1:{port}"],
                                           netns=self.n1.netns)

    def ctl(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """netwatchctl inside the node's netns (where netwatchd listens on 127.0.0.1)."""
        return self.n1.run([sys.executable, "-m", "netwatchd.ctl", *argv], check=False, timeout=timeout,
                           cwd=REPO, env={**os.environ, "NETWATCHD_ENDPOINT": self.endpoint})

    def close(self) -> None:
        try:
            code = self.daemon.stop()
            assert code == 0, "".join(self.daemon.stderr_lines)[-2000:]
        finally:
            self.cluster.close()


@contextlib.contextmanager
def ctl_lab() -> Iterator[CtlLab]:
    from netwatchd.lab.netns import Lab

    if os.geteuid() != 0:
        pytest.skip("lab namespaces need root")
    with Lab() as lab:
        env = CtlLab(lab)
        try:
            yield env
        finally:
            env.close()


@pytest.fixture(scope="module")
def env():
    with ctl_lab() as e:
        yield e


def json_of(res: subprocess.CompletedProcess):
    assert res.returncode == 0, (res.returncode, res.stdout, res.stderr)
    return json.loads(res.stdout)


@pytest.mark.kernel
def test_real_drops_json_counts_exactly_what_the_test_dropped(env):
    from netwatchd.lab.traffic import send_udp

    key = {"reason": "NETFILTER_DROP", "protocol": "udp", "traffic_class": "pod_to_pod_local", "direction": "egress",
           "namespace": "shop", "pod": "web", "service_namespace": "", "service": ""}

    def row():
        return next((r for r in json_of(env.ctl("drops", "--once", "-o", "json"))
                     if {k: r[k] for k in key} == key), {"packets": 0, "bytes": 0})

    before = row()
    send_udp(env.web, env.db.ip, 7777, 25, payload=b"x" * 32)
    labels = {k: v for k, v in key.items() if k not in ("service_namespace", "service")}
    env.daemon.wait_for("netwatch_drops_total", before["packets"] + 25, **labels)
    after = row()
    assert set(after) == {*key, "packets", "bytes"}
    assert after["packets"] - before["packets"] == 25
    assert after["bytes"] - before["bytes"] == 25 * (20 + 8 + 32)
    table = env.ctl("drops", "--pod", "web", "--reason", "NETFILTER_DROP", "-o", "wide")
    assert table.returncode == 0 and "\x1b" not in table.stdout
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["NAMESPACE", "POD", "CLASS", "DIRECTION", "REASON", "PROTOCOL", "PACKETS", "BYTES",
                                "SERVICE"]
    assert ["shop", "web", "pod_to_pod_local", "egress", "NETFILTER_DROP", "udp", str(after["packets"]),
            str(after["bytes"]), "-"] in [line.split() for line in lines[1:]]


@pytest.mark.kernel
def test_real_top_once_json_shows_the_faults(env):
    from netwatchd.lab.traffic import start_load

    loads = [start_load(env.web, [("udp", env.db.ip, 7777)], interval=0.1),
             start_load(env.web, [("tcp", env.cart_vip, 80)], interval=0.1),
             start_load(env.web, [("tcp", env.gone_vip, 80)], interval=0.1)]
    try:
        time.sleep(1.0)
        doc = json_of(env.ctl("top", "--once", "-o", "json", "--interval", "3"))
        only_gone = json_of(env.ctl("top", "--once", "-o", "json", "--interval", "1", "--service", "shop/gone"))
        only_p2p = json_of(env.ctl("top", "--once", "-o", "json", "--interval", "1", "--pod", "w*", "--class",
                                   "pod_to_pod_local"))
    finally:
        for p in loads:
            p.kill()
            p.wait()
    assert doc["source"] == "netwatchd" and 2.5 < doc["window_seconds"] < 6
    assert doc["probes"].get("drops") is True
    rows = {(r["namespace"], r["pod"], r["traffic_class"]): r for r in doc["rows"]}
    p2p = rows[("shop", "web", "pod_to_pod_local")]
    assert p2p["top_reason"] == "NETFILTER_DROP"
    assert 3 <= p2p["drop_reasons"]["NETFILTER_DROP"] <= 12  # one datagram every ~0.1 s
    assert p2p["drops_total"] >= p2p["drop_reasons"]["NETFILTER_DROP"] * 2.5
    svc = rows[("shop", "web", "pod_to_service")]
    assert "shop/gone" in svc["services"] and svc["drops_per_second"] > 0
    assert svc["drop_reasons"].get("NETFILTER_DROP", 0) > 0
    present = env.daemon.metrics()
    if "netwatch_tcp_connect_seconds" in present:  # the tcp probe: connects to shop/cart succeed in ~100 us
        assert svc["connect_p50_seconds"] is not None and svc["connect_p50_seconds"] < 0.05
        assert svc["connect_failures"].get("timeout", 0) > 0 or svc["connect_failures_per_second"] == 0
    else:
        assert svc["connect_p50_seconds"] is None
    if "netwatch_packets_total" not in present:
        assert p2p["packets_per_second"] is None
    assert ("web", "pod_to_service") in [(r["pod"], r["traffic_class"]) for r in only_gone["rows"]]
    assert all("shop/gone" in r["services"] for r in only_gone["rows"])
    assert [(r["pod"], r["traffic_class"]) for r in only_p2p["rows"]] == [("web", "pod_to_pod_local")]
    assert only_p2p["filter"]["pod"] == ["w*"] and only_p2p["filter"]["traffic_class"] == ["pod_to_pod_local"]


@pytest.mark.kernel
def test_real_pods_json_matches_the_lab(env):
    pods = json_of(env.ctl("pods", "--once", "-o", "json"))
    assert [(p["namespace"], p["pod"]) for p in pods] == [("shop", "cart"), ("shop", "db"), ("shop", "web")]
    for p in pods:
        lab_pod = env.n1.pods[f"shop/{p['pod']}"]
        assert p["ips"] == [lab_pod.ip, lab_pod.ip6]
        assert p["netns_inode"] == lab_pod.netns_inode()
        assert p["host_veth"] == lab_pod.host_veth and p["host_veth_ifindex"] == lab_pod.host_veth_ifindex
        assert p["host_network"] is False and p["source"] == "kubelet" and p["uid"] == lab_pod.uid
    table = env.ctl("pods", "-o", "table", "--pod", "web")
    assert table.returncode == 0
    assert table.stdout.splitlines()[1].split() == ["shop", "web", f"{env.web.ip},{env.web.ip6}",
                                                     str(env.web.netns_inode()), env.web.host_veth, "no", "kubelet"]


@pytest.mark.kernel
def test_real_probes_json_counts_events(env):
    from netwatchd.lab.traffic import start_load

    load = start_load(env.web, [("udp", env.db.ip, 7777)], interval=0.02)
    try:
        time.sleep(2.5)  # a whole stats window (STATS_WINDOWS) under load
        res = env.ctl("probes", "--once", "-o", "json", "--interval", "1")
    finally:
        load.kill()
        load.wait()
    probes = {p["probe"]: p for p in json_of(res)}
    drops = probes["drops"]
    assert drops["attached"] is True and drops["reason"] == ""
    assert "raw_tracepoint:skb:kfree_skb" in drops["hooks"]
    assert drops["events_per_second"] >= 20  # at least our ~50 dropped datagrams per second
    assert drops["bpf_stats"] is True and drops["ns_per_event"] > 0
    assert drops["programs"] and all(g["prog_id"] > 0 for g in drops["programs"])
    assert all(p["attached"] for p in probes.values())


@pytest.mark.kernel
def test_real_drops_follow_streams_the_drops_as_they_happen(env):
    from netwatchd.lab.traffic import start_load

    load = start_load(env.web, [("udp", env.db.ip, 7777)], interval=0.1)
    try:
        res = env.ctl("drops", "--follow", "-o", "json", "--count", "3", "--pod", "web", "--reason",
                      "NETFILTER_DROP", "--class", "pod_to_pod_local", timeout=30)
    finally:
        load.kill()
        load.wait()
    assert res.returncode == 0, res.stderr
    events = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(events) == 3
    for ev in events:
        assert (ev["namespace"], ev["pod"], ev["traffic_class"], ev["direction"], ev["reason"], ev["protocol"]) == \
            ("shop", "web", "pod_to_pod_local", "egress", "NETFILTER_DROP", "udp")
        assert (ev["src"], ev["dst"], ev["dport"]) == (env.web.ip, env.db.ip, 7777)
    assert [e["seq"] for e in events] == sorted({e["seq"] for e in events})


@pytest.mark.kernel
def test_real_unreachable_is_exit_3(env):
    res = env.ctl("top", "--once", "--endpoint", "http://127.0.0.1:1", "--timeout", "2")
    assert res.returncode == 3 and res.stdout == "" and "cannot reach netwatchd" in res.stderr


@pytest.mark.kernel
def test_real_top_through_prometheus(env):
    """A real Prometheus scraping this node's netwatchd: rows gain the node; drops and reason as caused."""
    promlab = pytest.importorskip("tests.promlab")
    if promlab.prometheus_binary() is None:
        pytest.skip(promlab.INSTALL_HINT)
    from netwatchd.lab.traffic import start_load

    load = start_load(env.web, [("udp", env.db.ip, 7777)], interval=0.1)
    prom = promlab.Prometheus(env.n1, env.daemon.port)
    try:
        deadline = time.monotonic() + 30
        row = None
        while time.monotonic() < deadline and row is None:
            time.sleep(1.0)
            doc = json_of(env.ctl("top", "--prometheus", f"http://127.0.0.1:{promlab.PORT}", "--window", "5s",
                                  "--once", "-o", "json", "--pod", "web", "--class", "pod_to_pod_local"))
            # rate() over 5 s needs a few scrapes before it settles near the ~10/s the load sends
            row = next((r for r in doc["rows"] if r["top_reason"] == "NETFILTER_DROP"
                        and r["drops_per_second"] >= 3), None)
    finally:
        load.kill()
        load.wait()
        prom.close()
    assert row is not None, doc
    assert doc["source"] == "prometheus" and doc["window_seconds"] == 5
    assert row["node"] == promlab.NODE_LABEL and row["namespace"] == "shop" and row["pod"] == "web"
    assert 3 <= row["drops_per_second"] <= 12 and row["drops_total"] > 0


def test_closed_pipe_is_not_a_traceback():
    """`netwatchctl metrics | head -1`: the reader leaves early; no traceback, exit 0."""
    import subprocess
    import sys

    res = subprocess.run(f"{sys.executable} -m netwatchd.ctl metrics | head -1", shell=True, capture_output=True,
                         text=True, timeout=60)
    assert res.stdout.startswith("METRIC") and "Traceback" not in res.stderr, res.stderr
