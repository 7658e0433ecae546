"""netwatchd's Grafana dashboards, as code: `python dashboards/build.py` writes dashboards/*.json.

Built with grafana-foundation-sdk (pinned: `pip install 'grafana-foundation-sdk==1769699379!11.6.0'`; an
unpinned install picks an older release because of a version-epoch quirk). The JSON files are committed:
import them into Grafana (or mount them into its dashboard provisioning directory). `--check` exits 1 when
a committed file differs from what this script builds (tests/test_dashboards.py runs it).

Every dashboard has the template variables `datasource` (a Prometheus data source), `node`, `namespace`,
`pod` and `traffic_class` (multi-value, "All" = `.*`, so series without the label, e.g. the node's own
traffic with pod="", still match). A variable filters every query whose metric has that label. `node` is
the label the Kubernetes scrape configuration (ServiceMonitor relabeling) adds; netwatchd's `up` series are
found by a job name containing "netwatchd", as in alerts/netwatchd-rules.yaml.

Two adjustments to the SDK's output, both for Grafana's own schema (@grafana/schema, checked by the tests):
panel ids are numbered in order (the SDK leaves them unset), and the interval-variable fields `auto`,
`auto_count`, `auto_min` that the SDK writes on every variable are removed (the schema does not allow them
and Grafana ignores them on other variable types).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import heatmap, prometheus, stat, table, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DashboardLinkType,
    DataSourceRef,
    DataTransformerConfig,
    Threshold,
    ThresholdsMode,
    VariableOption,
    VariableRefresh,
    VariableSort,
)
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

OUT_DIR = Path(__file__).resolve().parent
DS = DataSourceRef(type_val="prometheus", uid="${datasource}")
TRAFFIC_CLASSES = ("container_to_container", "pod_to_pod_local", "pod_to_pod_remote", "pod_to_service",
                   "pod_to_external", "external_to_pod", "host")
R = "$__rate_interval"
# Label matchers for the template variables, by what the metric carries.
POD = 'node=~"$node", namespace=~"$namespace", pod=~"$pod", traffic_class=~"$traffic_class"'
NODE_CLASS = 'node=~"$node", traffic_class=~"$traffic_class"'  # netwatch_node_transit_seconds
NODE = 'node=~"$node"'  # netwatchd's own metrics
UP = 'job=~".*netwatchd.*", node=~"$node"'  # Prometheus' series about the netwatchd targets
SVC = 'service!=""'
# Drops that only say the pod's own socket was gone or the segment a duplicate: not traffic lost between a
# pod and a service. NetwatchPodToServiceDropRatioHigh (alerts/netwatchd-rules.yaml) ignores the same list.
NOT_NETWORK = ('reason!~"NO_SOCKET|SOCKET_CLOSE|QUEUE_PURGE|TCP_CLOSE|TCP_RESET|TCP_ABORT_ON_DATA|TCP_OLD_DATA|'
               'TCP_OLD_SEQUENCE|TCP_OLD_ACK|TCP_TOO_OLD_ACK"')


def sel(metric: str, matchers: str, extra: str = "") -> str:
    return f"{metric}{{{matchers}{', ' + extra if extra else ''}}}"


def rate(metric: str, matchers: str = POD, extra: str = "", window: str = R) -> str:
    return f"rate({sel(metric, matchers, extra)}[{window}])"


def srate(by: str, metric: str, matchers: str = POD, extra: str = "") -> str:
    """sum by (`by`) of a rate; `by` empty: sum of everything."""
    return f"sum by ({by}) ({rate(metric, matchers, extra)})" if by else f"sum({rate(metric, matchers, extra)})"


def quantile(q: float, by: str, metric: str, matchers: str = POD, extra: str = "") -> str:
    le = f"{by}, le" if by else "le"
    return f"histogram_quantile({q}, sum by ({le}) ({rate(metric + '_bucket', matchers, extra)}))"


def or_zero(expr: str, like: str) -> str:
    """`expr`, or 0 for the label sets only `like` has (a ratio's numerator that may have no series)."""
    return f"({expr} or 0 * {like})" if like else f"({expr} or vector(0))"


def ratio(part: str, rest: str, by: str) -> str:
    """part / (part + rest), part counted as 0 where it has no series (e.g. no drops at all): the ratio is
    then 0 rather than missing; where `rest` has no series there is no ratio (nothing to compare with)."""
    p = or_zero(part, rest if by else "")
    return f"{p}\n/\n({p}\n + {rest})"


def drop_ratio(by: str, extra: str = "") -> str:
    """drops / (drops + packets) of the selected traffic, summed by `by`."""
    return ratio(srate(by, "netwatch_drops_total", extra=extra), srate(by, "netwatch_packets_total", extra=extra), by)


def topk_range(k: int, by: str, metric: str, matchers: str = POD, extra: str = "") -> str:
    return f"topk({k}, sum by ({by}) (increase({sel(metric, matchers, extra)}[$__range])))"


# ----------------------------------------------------------------------------------------------------
# Panels
# ----------------------------------------------------------------------------------------------------

Target = tuple[str, str]  # (expr, legend)


def _queries(panel, targets: Sequence[Target], instant: bool = False, fmt: PromQueryFormat | None = None):
    for i, (expr, legend) in enumerate(targets):
        q = prometheus.Dataquery().expr(expr).ref_id(chr(ord("A") + i)).datasource(DS)
        q = q.legend_format(legend or "__auto")
        if instant:
            q = q.instant()
        if fmt is not None:
            q = q.format(fmt)
        panel = panel.with_target(q)
    return panel


def ts(title: str, desc: str, unit: str, targets: Sequence[Target], w: int = 12, h: int = 8,
       stack: bool = False, minimum: float | None = 0):
    p = (timeseries.Panel().title(title).description(desc).datasource(DS).unit(unit).span(w).height(h)
         .line_width(1).fill_opacity(15 if stack else 5)
         .legend(cb.VizLegendOptions().display_mode(cm.LegendDisplayMode.TABLE)
                 .placement(cm.LegendPlacement.BOTTOM).show_legend(True).calcs(["mean", "max", "lastNotNull"]))
         .tooltip(cb.VizTooltipOptions().mode(cm.TooltipDisplayMode.MULTI).sort(cm.SortOrder.DESCENDING)))
    if stack:
        p = p.stacking(cb.StackingConfig().mode(cm.StackingMode.NORMAL))
    if minimum is not None:
        p = p.min(minimum)
    return _queries(p, targets)


def thresholds(*steps: tuple[float | None, str]):
    return (db.ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE)
            .steps([Threshold(value=v, color=c) for v, c in steps]))


def st(title: str, desc: str, unit: str, expr: str, w: int = 4, h: int = 4, steps=None):
    p = (stat.Panel().title(title).description(desc).datasource(DS).unit(unit).span(w).height(h)
         .graph_mode(cm.BigValueGraphMode.AREA).color_mode(cm.BigValueColorMode.VALUE)
         .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False)))
    p = p.thresholds(steps or thresholds((None, "green")))
    return _queries(p, [(expr, "")])


def tbl(title: str, desc: str, unit: str, expr: str, w: int = 12, h: int = 8, sort: str = "Value"):
    p = (table.Panel().title(title).description(desc).datasource(DS).unit(unit).span(w).height(h)
         .sort_by([cb.TableSortByFieldState().display_name(sort).desc(True)])
         .with_transformation(DataTransformerConfig(id_val="organize",
                                                    options={"excludeByName": {"Time": True}})))
    return _queries(p, [(expr, "")], instant=True, fmt=PromQueryFormat.TABLE)


def heat(title: str, desc: str, expr: str, w: int = 12, h: int = 8):
    p = (heatmap.Panel().title(title).description(desc).datasource(DS).span(w).height(h).calculate(False)
         .y_axis(heatmap.YAxisConfig().unit("s")))
    return _queries(p, [(expr, "{{le}}")], fmt=PromQueryFormat.HEATMAP)


def row(title: str):
    return db.Row(title)


# ----------------------------------------------------------------------------------------------------
# Dashboards
# ----------------------------------------------------------------------------------------------------


def variables(board):
    """datasource, node, namespace, pod, traffic_class (see module docstring)."""
    def query_var(name: str, label: str, query: str):
        return (db.QueryVariable(name).label(label).datasource(DS).query(query)
                .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.ALPHABETICAL_ASC)
                .multi(True).include_all(True).all_value(".*")
                .current(VariableOption(selected=True, text="All", value="$__all")))

    board = board.with_variable(db.DatasourceVariable("datasource").label("Data source").type("prometheus"))
    board = board.with_variable(query_var("node", "Node", "label_values(netwatch_build_info, node)"))
    board = board.with_variable(query_var(
        "namespace", "Namespace", 'label_values(netwatch_packets_total{node=~"$node"}, namespace)'))
    board = board.with_variable(query_var(
        "pod", "Pod", 'label_values(netwatch_packets_total{node=~"$node", namespace=~"$namespace"}, pod)'))
    board = board.with_variable(
        db.CustomVariable("traffic_class").label("Traffic class").values(",".join(TRAFFIC_CLASSES))
        .multi(True).include_all(True).all_value(".*")
        .current(VariableOption(selected=True, text="All", value="$__all")))
    return board


def new_board(uid: str, title: str, description: str):
    board = (db.Dashboard(title).uid(uid).description(description).tags(["netwatchd"])
             .refresh("30s").time("now-1h", "now").timezone("browser").tooltip(DashboardCursorSync.CROSSHAIR)
             .editable()
             .link(db.DashboardLink("netwatchd").type(DashboardLinkType.DASHBOARDS).tags(["netwatchd"])
                   .as_dropdown(True).include_vars(True).keep_time(True)))
    return variables(board)


def overview():
    b = new_board("netwatchd-overview", "netwatchd / Cluster overview",
                  "Traffic, drops and TCP health of every node, by traffic class.")
    b = b.with_row(row("Right now"))
    b = b.with_panel(st("Packets/s", "Packets seen by netwatchd on the selected nodes, pods and classes.", "pps",
                        srate("", "netwatch_packets_total")))
    b = b.with_panel(st("Drops/s", "Packets the kernel dropped (skb:kfree_skb), all reasons.", "pps",
                        srate("", "netwatch_drops_total"),
                        steps=thresholds((None, "green"), (1, "orange"), (100, "red"))))
    b = b.with_panel(st("Drop ratio", "drops / (drops + packets).", "percentunit", drop_ratio(""),
                        steps=thresholds((None, "green"), (0.01, "orange"), (0.05, "red"))))
    b = b.with_panel(st("TCP connect failures/s", "Connects refused, timed out or failed otherwise.", "cps",
                        srate("", "netwatch_tcp_connect_failures_total"),
                        steps=thresholds((None, "green"), (0.05, "orange"), (1, "red"))))
    b = b.with_panel(st("TCP retransmits/s", "Retransmitted TCP segments (SYNs included).", "pps",
                        srate("", "netwatch_tcp_retransmits_total")))
    b = b.with_panel(st("netwatchd targets up", "Nodes whose netwatchd Prometheus scrapes successfully.", "none",
                        f"sum(up{{{UP}}})"))

    b = b.with_row(row("By traffic class"))
    b = b.with_panel(ts("Packets/s by traffic class", "Packets per class, both directions.", "pps",
                        [(srate("traffic_class", "netwatch_packets_total"), "{{traffic_class}}")], stack=True))
    b = b.with_panel(ts("Throughput by traffic class", "Bytes per second per class, both directions.", "Bps",
                        [(srate("traffic_class", "netwatch_bytes_total"), "{{traffic_class}}")], stack=True))
    b = b.with_panel(ts("Drops/s by traffic class", "Kernel drops per class (all reasons).", "pps",
                        [(srate("traffic_class", "netwatch_drops_total"), "{{traffic_class}}")], stack=True))
    b = b.with_panel(ts("Drop ratio by traffic class", "drops / (drops + packets) per class.", "percentunit",
                        [(drop_ratio("traffic_class"), "{{traffic_class}}")]))
    b = b.with_panel(ts("TCP connect latency p99 by traffic class",
                        "SYN sent to ESTABLISHED, 99th percentile of successful connects.", "s",
                        [(quantile(0.99, "traffic_class", "netwatch_tcp_connect_seconds"), "{{traffic_class}}")]))
    b = b.with_panel(ts("TCP RTT p50 / p99 by traffic class", "Smoothed RTT (srtt) of TCP sockets.", "s",
                        [(quantile(0.5, "traffic_class", "netwatch_tcp_rtt_seconds"), "{{traffic_class}} p50"),
                         (quantile(0.99, "traffic_class", "netwatch_tcp_rtt_seconds"), "{{traffic_class}} p99")]))
    b = b.with_panel(ts("Node transit latency p99 by traffic class",
                        "Time packets spend crossing a node's datapath (veth, bridge, netfilter, uplink).", "s",
                        [(quantile(0.99, "traffic_class", "netwatch_node_transit_seconds", NODE_CLASS),
                          "{{traffic_class}}")]))
    b = b.with_panel(ts("TCP connect failures/s by traffic class and outcome",
                        "refused: RST; timeout: no answer; other: ICMP errors and the rest.", "cps",
                        [(srate("traffic_class, outcome", "netwatch_tcp_connect_failures_total"),
                          "{{traffic_class}} {{outcome}}")], stack=True))
    b = b.with_panel(ts("TCP retransmits/s by traffic class", "Retransmitted segments per class.", "pps",
                        [(srate("traffic_class", "netwatch_tcp_retransmits_total"), "{{traffic_class}}")],
                        stack=True))
    b = b.with_panel(ts("Drops/s by node", "Kernel drops per node.", "pps",
                        [(srate("node", "netwatch_drops_total"), "{{node}}")], stack=True))

    b = b.with_row(row("Top"))
    b = b.with_panel(tbl("Top drop reasons", "Kernel drop reasons over the time range.", "none",
                         topk_range(10, "reason, traffic_class", "netwatch_drops_total")))
    b = b.with_panel(tbl("Top pods by drops", "Pods with the most drops over the time range (pod empty: the node).",
                         "none", topk_range(10, "node, namespace, pod", "netwatch_drops_total")))
    return b


def node_view():
    b = new_board("netwatchd-node", "netwatchd / Node",
                  "One node's datapath: transit latency per path, traffic and drops per class, TCP health.")
    b = b.with_row(row("Node"))
    b = b.with_panel(st("Packets/s", "Packets on the selected nodes.", "pps", srate("", "netwatch_packets_total")))
    b = b.with_panel(st("Drops/s", "Kernel drops on the selected nodes.", "pps", srate("", "netwatch_drops_total"),
                        steps=thresholds((None, "green"), (1, "orange"), (100, "red"))))
    b = b.with_panel(st("Transit p99", "99th percentile of node transit time, all classes and paths.", "s",
                        quantile(0.99, "", "netwatch_node_transit_seconds", NODE_CLASS),
                        steps=thresholds((None, "green"), (0.001, "orange"), (0.01, "red"))))
    b = b.with_panel(st("TCP connects/s", "Successful TCP connects made on the selected nodes.", "cps",
                        srate("", "netwatch_tcp_connect_seconds_count")))
    b = b.with_panel(st("Local pods", "Pods the kubelet lists on the selected nodes.", "none",
                        f"sum(netwatch_identity_pods{{{NODE}}})"))
    b = b.with_panel(st("netwatchd BPF CPU", "CPU time of netwatchd's BPF programs (1 = one CPU).", "percentunit",
                        srate("", "netwatch_bpf_program_run_seconds_total", NODE)))

    b = b.with_row(row("Datapath"))
    b = b.with_panel(ts("Node transit latency p50 / p99 by path",
                        "Time from entering the node's datapath to leaving it, per path.", "s",
                        [(quantile(0.5, "path", "netwatch_node_transit_seconds", NODE_CLASS), "{{path}} p50"),
                         (quantile(0.99, "path", "netwatch_node_transit_seconds", NODE_CLASS), "{{path}} p99")]))
    b = b.with_panel(heat("Node transit latency distribution", "Packets per transit-time bucket.",
                          f"sum by (le) ({rate('netwatch_node_transit_seconds_bucket', NODE_CLASS)})"))
    b = b.with_panel(ts("Node transit latency p99 by traffic class and path", "Per class and path.", "s",
                        [(quantile(0.99, "traffic_class, path", "netwatch_node_transit_seconds", NODE_CLASS),
                          "{{traffic_class}} {{path}}")], w=24))
    b = b.with_panel(ts("Packets/s by traffic class and direction", "Direction is seen from the local pod.", "pps",
                        [(srate("traffic_class, direction", "netwatch_packets_total"),
                          "{{traffic_class}} {{direction}}")], stack=True))
    b = b.with_panel(ts("Throughput by traffic class and direction", "Bytes per second.", "Bps",
                        [(srate("traffic_class, direction", "netwatch_bytes_total"),
                          "{{traffic_class}} {{direction}}")], stack=True))

    b = b.with_row(row("Drops"))
    b = b.with_panel(ts("Drops/s by reason", "Kernel drop reasons, named by the running kernel.", "pps",
                        [(srate("reason", "netwatch_drops_total"), "{{reason}}")], stack=True))
    b = b.with_panel(ts("Drops/s by traffic class and direction", "Whose traffic is dropped.", "pps",
                        [(srate("traffic_class, direction", "netwatch_drops_total"),
                          "{{traffic_class}} {{direction}}")], stack=True))
    b = b.with_panel(tbl("Top pods by packets", "Busiest pods over the time range.", "none",
                         topk_range(10, "node, namespace, pod", "netwatch_packets_total")))
    b = b.with_panel(tbl("Top pods by drops", "Pods with the most drops over the time range.", "none",
                         topk_range(10, "node, namespace, pod, reason", "netwatch_drops_total")))

    b = b.with_row(row("TCP"))
    b = b.with_panel(ts("TCP connect latency p99 by traffic class", "Successful connects.", "s",
                        [(quantile(0.99, "traffic_class", "netwatch_tcp_connect_seconds"), "{{traffic_class}}")]))
    b = b.with_panel(ts("TCP RTT p99 by traffic class", "Smoothed RTT.", "s",
                        [(quantile(0.99, "traffic_class", "netwatch_tcp_rtt_seconds"), "{{traffic_class}}")]))
    b = b.with_panel(ts("TCP connect failures/s by traffic class and outcome", "refused / timeout / other.", "cps",
                        [(srate("traffic_class, outcome", "netwatch_tcp_connect_failures_total"),
                          "{{traffic_class}} {{outcome}}")], stack=True))
    b = b.with_panel(ts("TCP retransmits/s by traffic class", "Retransmitted segments.", "pps",
                        [(srate("traffic_class", "netwatch_tcp_retransmits_total"), "{{traffic_class}}")],
                        stack=True))
    return b


def pod_view():
    b = new_board("netwatchd-pod", "netwatchd / Pod",
                  "Drill-down into pods: their traffic per class, what drops it and why, TCP latency and failures.")
    b = b.with_row(row("Pod"))
    b = b.with_panel(st("Packets/s", "Packets of the selected pods.", "pps", srate("", "netwatch_packets_total")))
    b = b.with_panel(st("Drops/s", "Their packets dropped by the kernel.", "pps", srate("", "netwatch_drops_total"),
                        steps=thresholds((None, "green"), (1, "orange"), (100, "red"))))
    b = b.with_panel(st("Drop ratio", "drops / (drops + packets).", "percentunit", drop_ratio(""),
                        steps=thresholds((None, "green"), (0.01, "orange"), (0.05, "red"))))
    b = b.with_panel(st("TCP connect p99", "Successful connects the pods made.", "s",
                        quantile(0.99, "", "netwatch_tcp_connect_seconds")))
    b = b.with_panel(st("TCP RTT p99", "Smoothed RTT of the pods' sockets.", "s",
                        quantile(0.99, "", "netwatch_tcp_rtt_seconds")))
    b = b.with_panel(st("TCP connect failures/s", "Connects that never completed.", "cps",
                        srate("", "netwatch_tcp_connect_failures_total"),
                        steps=thresholds((None, "green"), (0.05, "orange"), (1, "red"))))

    b = b.with_row(row("Traffic"))
    b = b.with_panel(ts("Packets/s by traffic class and direction", "egress: sent by the pod; ingress: to it.",
                        "pps", [(srate("namespace, pod, traffic_class, direction", "netwatch_packets_total"),
                                 "{{namespace}}/{{pod}} {{traffic_class}} {{direction}}")]))
    b = b.with_panel(ts("Throughput by traffic class and direction", "Bytes per second.", "Bps",
                        [(srate("namespace, pod, traffic_class, direction", "netwatch_bytes_total"),
                          "{{namespace}}/{{pod}} {{traffic_class}} {{direction}}")]))

    b = b.with_row(row("Drops"))
    b = b.with_panel(ts("Drops/s by reason and traffic class", "Kernel drop reasons of the pods' packets.", "pps",
                        [(srate("namespace, pod, reason, traffic_class", "netwatch_drops_total"),
                          "{{namespace}}/{{pod}} {{reason}} {{traffic_class}}")]))
    b = b.with_panel(ts("Drops/s to services", "pod_to_service drops by the service called.", "pps",
                        [(srate("namespace, pod, service_namespace, service", "netwatch_drops_total", extra=SVC),
                          "{{namespace}}/{{pod}} -> {{service_namespace}}/{{service}}")]))
    b = b.with_panel(tbl("Drops over the time range", "Every drop label set of the pods.", "none",
                         topk_range(50, "namespace, pod, reason, protocol, traffic_class, direction, "
                                        "service_namespace, service", "netwatch_drops_total"), w=24))

    b = b.with_row(row("TCP"))
    b = b.with_panel(ts("TCP connect latency p50 / p99 by traffic class", "Successful connects.", "s",
                        [(quantile(0.5, "traffic_class", "netwatch_tcp_connect_seconds"), "{{traffic_class}} p50"),
                         (quantile(0.99, "traffic_class", "netwatch_tcp_connect_seconds"), "{{traffic_class}} p99")]))
    b = b.with_panel(ts("TCP RTT p50 / p99 by traffic class", "Smoothed RTT.", "s",
                        [(quantile(0.5, "traffic_class", "netwatch_tcp_rtt_seconds"), "{{traffic_class}} p50"),
                         (quantile(0.99, "traffic_class", "netwatch_tcp_rtt_seconds"), "{{traffic_class}} p99")]))
    b = b.with_panel(ts("TCP connects/s by traffic class", "Successful connects.", "cps",
                        [(srate("traffic_class", "netwatch_tcp_connect_seconds_count"), "{{traffic_class}}")],
                        stack=True))
    b = b.with_panel(ts("TCP connect failures/s by outcome and service", "service empty: not a service.", "cps",
                        [(srate("outcome, traffic_class, service_namespace, service",
                                "netwatch_tcp_connect_failures_total"),
                          "{{outcome}} {{traffic_class}} {{service_namespace}}/{{service}}")], stack=True))
    b = b.with_panel(ts("TCP retransmits/s by traffic class", "Retransmitted segments.", "pps",
                        [(srate("traffic_class", "netwatch_tcp_retransmits_total"), "{{traffic_class}}")],
                        stack=True, w=24))
    return b


def services():
    b = new_board("netwatchd-services", "netwatchd / Services",
                  "Pod-to-service traffic by service: drops, connect failures, latency. Filters select the "
                  "client pods.")
    svc_by = "service_namespace, service"
    b = b.with_row(row("Services"))
    b = b.with_panel(st("Drops/s to services", "Kernel drops of pod-to-service traffic to known services.", "pps",
                        srate("", "netwatch_drops_total", extra=SVC), w=6,
                        steps=thresholds((None, "green"), (1, "orange"), (100, "red"))))
    b = b.with_panel(st("Connect failures/s to services", "TCP connects to services that never completed.", "cps",
                        srate("", "netwatch_tcp_connect_failures_total", extra=SVC), w=6,
                        steps=thresholds((None, "green"), (0.05, "orange"), (1, "red"))))
    failures = srate("", "netwatch_tcp_connect_failures_total", extra=SVC)
    connects = srate("", "netwatch_tcp_connect_seconds_count", extra=SVC)
    b = b.with_panel(st("Connect failure ratio", "failures / (failures + successful connects).", "percentunit",
                        ratio(failures, or_zero(connects, ""), ""), w=6,
                        steps=thresholds((None, "green"), (0.01, "orange"), (0.1, "red"))))
    b = b.with_panel(st("Connect p99 to services", "Successful connects to services.", "s",
                        quantile(0.99, "", "netwatch_tcp_connect_seconds", extra=SVC), w=6))

    b = b.with_row(row("Drops"))
    b = b.with_panel(ts("Drops/s by service", "pod_to_service drops summed over client pods.", "pps",
                        [(srate(svc_by, "netwatch_drops_total", extra=SVC), "{{service_namespace}}/{{service}}")],
                        stack=True))
    b = b.with_panel(ts("Drops/s by service and reason", "The kernel's reason for each service's drops.", "pps",
                        [(srate(f"{svc_by}, reason", "netwatch_drops_total", extra=SVC),
                          "{{service_namespace}}/{{service}} {{reason}}")], stack=True))
    pair = "node, namespace, pod, service_namespace, service"
    pkts = "node, namespace, pod"
    ratio_drops = srate(pair, "netwatch_drops_total", extra=f'traffic_class="pod_to_service", {NOT_NETWORK}')
    ratio_pkts = srate(pkts, "netwatch_packets_total", extra='traffic_class="pod_to_service"')
    b = b.with_panel(ts("Drop ratio per client pod and service",
                        "What NetwatchPodToServiceDropRatioHigh evaluates: the pair's network drops (socket-close "
                        "and duplicate reasons left out) over those drops plus all the pod's pod_to_service packets "
                        "(alert above 5 % for 10 m, at 1 packet/s or more).", "percentunit",
                        [(f"{ratio_drops}\n/\n({ratio_drops}\n + on (node, namespace, pod) group_left () "
                          f"{ratio_pkts})",
                          "{{namespace}}/{{pod}} -> {{service_namespace}}/{{service}}")], w=24))

    b = b.with_row(row("Connects"))
    b = b.with_panel(ts("Connect failures/s by service and outcome", "refused / timeout / other.", "cps",
                        [(srate(f"{svc_by}, outcome", "netwatch_tcp_connect_failures_total", extra=SVC),
                          "{{service_namespace}}/{{service}} {{outcome}}")], stack=True))
    f_by = srate(svc_by, "netwatch_tcp_connect_failures_total", extra=SVC)
    c_by = srate(svc_by, "netwatch_tcp_connect_seconds_count", extra=SVC)
    b = b.with_panel(ts("Connect failure ratio by service",
                        "What NetwatchServiceConnectFailures evaluates (alert above 10 % for 5 m): failures over "
                        "failures plus successful connects.", "percentunit",
                        [(f"{or_zero(f_by, c_by)}\n/\n({or_zero(f_by, c_by)}\n + {or_zero(c_by, f_by)})",
                          "{{service_namespace}}/{{service}}")]))
    b = b.with_panel(ts("Connect latency p99 by service", "Successful connects to each service.", "s",
                        [(quantile(0.99, svc_by, "netwatch_tcp_connect_seconds", extra=SVC),
                          "{{service_namespace}}/{{service}}")]))
    b = b.with_panel(ts("Connects/s by service", "Successful connects to each service.", "cps",
                        [(srate(svc_by, "netwatch_tcp_connect_seconds_count", extra=SVC),
                          "{{service_namespace}}/{{service}}")], stack=True))
    b = b.with_panel(ts("RTT p99 by service", "Smoothed RTT of connections to each service.", "s",
                        [(quantile(0.99, svc_by, "netwatch_tcp_rtt_seconds", extra=SVC),
                          "{{service_namespace}}/{{service}}")]))
    b = b.with_panel(ts("Retransmits/s by service", "Retransmitted segments (SYNs included) per service.", "pps",
                        [(srate(svc_by, "netwatch_tcp_retransmits_total", extra=SVC),
                          "{{service_namespace}}/{{service}}")], stack=True))
    b = b.with_panel(tbl("Failing clients", "Client pods and outcomes of failed connects over the time range.",
                         "none", topk_range(20, f"node, namespace, pod, {svc_by}, outcome",
                                            "netwatch_tcp_connect_failures_total", extra=SVC), w=24))
    return b


def self_health():
    b = new_board("netwatchd-self", "netwatchd / Self-health",
                  "Is netwatchd running, attached and complete on every node, and what does it cost?")
    b = b.with_row(row("Status"))
    b = b.with_panel(st("Targets up", "netwatchd targets Prometheus scrapes successfully.", "none",
                        f"sum(up{{{UP}}})"))
    b = b.with_panel(st("Targets down", "netwatchd targets Prometheus fails to scrape.", "none",
                        f"sum(1 - up{{{UP}}})", steps=thresholds((None, "green"), (1, "red"))))
    b = b.with_panel(st("Probes not attached", "Probe hooks that failed or are missing on the kernel.", "none",
                        f"sum(1 - netwatch_probe_attached{{{NODE}}})", steps=thresholds((None, "green"), (1, "red"))))
    b = b.with_panel(st("Identity sources down", "kubelet / apiserver connections failing.", "none",
                        f"sum(1 - netwatch_identity_up{{{NODE}}})", steps=thresholds((None, "green"), (1, "red"))))
    b = b.with_panel(st("BPF CPU", "CPU time of all netwatchd BPF programs (1 = one CPU).", "percentunit",
                        srate("", "netwatch_bpf_program_run_seconds_total", NODE)))
    b = b.with_panel(st("Samples per scrape", "Series netwatchd exports, all selected nodes.", "none",
                        f"sum(scrape_samples_scraped{{{UP}}})"))

    b = b.with_row(row("Probes and versions"))
    b = b.with_panel(tbl("Probes", "1: attached; 0: missing hook or failed (see the netwatchd log).", "none",
                         f"netwatch_probe_attached{{{NODE}}}", w=8, sort="node"))
    b = b.with_panel(tbl("Hooks this kernel offers", "netwatchd uses tracepoints and tc.", "none",
                         f"netwatch_hook_available{{{NODE}}}", w=8, sort="node"))
    b = b.with_panel(tbl("Versions", "netwatchd version and identity source per node.", "none",
                         f"netwatch_build_info{{{NODE}}}", w=8, sort="node"))

    b = b.with_row(row("BPF"))
    b = b.with_panel(ts("BPF CPU by probe", "Kernel time in netwatchd's programs (1 = one CPU).", "percentunit",
                        [(srate("node, probe", "netwatch_bpf_program_run_seconds_total", NODE),
                          "{{node}} {{probe}}")], stack=True))
    runs = srate("probe, program", "netwatch_bpf_program_runs_total", NODE)
    secs = srate("probe, program", "netwatch_bpf_program_run_seconds_total", NODE)
    b = b.with_panel(ts("Cost per event by program", "Kernel time per program run.", "s",
                        [(f"{secs}\n/\n{runs}", "{{probe}} {{program}}")]))
    b = b.with_panel(ts("Program runs/s", "Events handled per program.", "ops",
                        [(runs, "{{probe}} {{program}}")], stack=True))
    b = b.with_panel(ts("BPF map fill", "Entries over capacity per aggregation map; idle entries are evicted "
                        "past 75 %.", "percentunit",
                        [(f"max by (node, map) (netwatch_bpf_map_entries{{{NODE}}} / "
                          f"netwatch_bpf_map_capacity{{{NODE}}})", "{{node}} {{map}}")]))
    b = b.with_panel(ts("Map overflows and evictions/s", "Overflow: events counted without their key (map full).",
                        "ops", [(srate("node, map", "netwatch_bpf_map_overflow_total", NODE),
                                 "{{node}} {{map}} overflow"),
                                (srate("node, map", "netwatch_bpf_map_evictions_total", NODE),
                                 "{{node}} {{map}} evicted")]))
    b = b.with_panel(ts("Series budget: folded increments/s", "Counted into pod=\"__overflow__\" past --max-series.",
                        "ops", [(srate("node, metric", "netwatch_series_budget_folded_total", NODE),
                                 "{{node}} {{metric}}")]))

    b = b.with_row(row("Identity and scrapes"))
    b = b.with_panel(ts("Identity sources up", "1 while the kubelet / apiserver answers.", "none",
                        [(f"netwatch_identity_up{{{NODE}}}", "{{node}} {{source}}")], w=8))
    b = b.with_panel(ts("Local pods known", "Pods the kubelet lists per node.", "none",
                        [(f"netwatch_identity_pods{{{NODE}}}", "{{node}}")], w=8))
    b = b.with_panel(ts("Identity errors/s", "Failed refreshes by source and kind.", "ops",
                        [(srate("node, source, kind", "netwatch_identity_errors_total", NODE),
                          "{{node}} {{source}} {{kind}}")], w=8))
    b = b.with_panel(ts("Scrape duration", "Time Prometheus needs to scrape netwatchd (it reads its maps then).",
                        "s", [(f"scrape_duration_seconds{{{UP}}}", "{{node}}")]))
    b = b.with_panel(ts("Samples per scrape", "Series netwatchd exports per node.", "none",
                        [(f"scrape_samples_scraped{{{UP}}}", "{{node}}")]))
    return b


DASHBOARDS = {
    "overview.json": overview,
    "node.json": node_view,
    "pod.json": pod_view,
    "services.json": services,
    "self-health.json": self_health,
}


# ----------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------


def _fix(doc: dict) -> dict:
    """Schema fixes (module docstring): sequential panel ids, no interval fields on other variables."""
    next_id = 1
    for panel in doc.get("panels", []):
        for p in [panel, *panel.get("panels", [])]:
            p["id"] = next_id
            next_id += 1
    for var in doc.get("templating", {}).get("list", []):
        if var.get("type") != "interval":
            for key in ("auto", "auto_count", "auto_min"):
                var.pop(key, None)
    return doc


def render(factory) -> str:
    doc = json.loads(json.dumps(factory().build(), cls=JSONEncoder))
    return json.dumps(_fix(doc), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if a committed dashboard is not up to date")
    ap.add_argument("--out", type=Path, default=OUT_DIR, help="output directory (default: dashboards/)")
    args = ap.parse_args(argv)
    stale = []
    for name, factory in DASHBOARDS.items():
        text = render(factory)
        path = args.out / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(f"out of date (run python dashboards/build.py): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
