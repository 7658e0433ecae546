"""Prometheus collectors: read what the kernel counted at scrape time and yield metric families.

Each metric is declared once as a `MetricSpec` (name, help, labels in a fixed order): the daemon's own
metrics here, each probe's in its module (`Probe.metrics`). `all_metrics()` is the reference table printed
by `netwatchctl metrics` and kept in the README.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

import netwatchd


@dataclass(frozen=True)
class MetricSpec:
    name: str  # without the _total suffix for counters, as prometheus_client expects
    kind: str  # counter | gauge | histogram | info
    help: str
    labels: tuple[str, ...]


def exposed_name(spec: MetricSpec) -> str:
    return {"counter": f"{spec.name}_total", "info": f"{spec.name}_info"}.get(spec.kind, spec.name)


def family(spec: MetricSpec):
    """An empty prometheus_client family for `spec`, labels in the declared order."""
    cls = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily, "histogram": HistogramMetricFamily}[spec.kind]
    return cls(spec.name, spec.help, labels=list(spec.labels))


PROBE_ATTACHED = MetricSpec("netwatch_probe_attached", "gauge",
                            "1 when the probe's hook is attached, 0 when it is missing or failed.",
                            ("probe", "hook"))
HOOK_AVAILABLE = MetricSpec("netwatch_hook_available", "gauge",
                            "1 when this kernel offers the hook kind (tracepoint, tc, kprobe, fentry, ...).",
                            ("hook",))
MAP_ENTRIES = MetricSpec("netwatch_bpf_map_entries", "gauge",
                         "Entries in a BPF aggregation map at the last read.", ("map",))
MAP_CAPACITY = MetricSpec("netwatch_bpf_map_capacity", "gauge",
                          "max_entries of a BPF aggregation map.", ("map",))
MAP_OVERFLOW = MetricSpec("netwatch_bpf_map_overflow", "counter",
                          "Events not counted per key because the map was full.", ("map",))
MAP_EVICTIONS = MetricSpec("netwatch_bpf_map_evictions", "counter",
                           "Idle map entries deleted by user space to keep room (their totals are kept).",
                           ("map",))
SERIES_FOLDED = MetricSpec("netwatch_series_budget_folded", "counter",
                           "Increments folded into pod=\"__overflow__\" because the series budget was reached.",
                           ("metric",))
IDENTITY_UP = MetricSpec("netwatch_identity_up", "gauge",
                         "1 while an identity source (kubelet, apiserver) answers; 0 while netwatchd keeps "
                         "counting on the last good data.", ("source",))
IDENTITY_PODS = MetricSpec("netwatch_identity_pods", "gauge", "Local pods known from the kubelet.", ())
IDENTITY_ERRORS = MetricSpec("netwatch_identity_errors", "counter",
                             "Failed identity requests by source (kubelet, apiserver) and kind (unreachable, timeout, "
                             "unauthorized, malformed, http_error, watch_interrupted).", ("source", "kind"))
PROG_RUNS = MetricSpec("netwatch_bpf_program_runs", "counter",
                       "Times each of netwatchd's BPF programs ran: an estimate, kernel BPF stats measured in "
                       "short windows (--bpf-stats-window every --bpf-stats-every) and scaled.", ("probe", "program"))
PROG_RUN_SECONDS = MetricSpec("netwatch_bpf_program_run_seconds", "counter",
                              "Kernel time spent in each of netwatchd's BPF programs, estimated like "
                              "netwatch_bpf_program_runs; divide the two rates for the cost per event.",
                              ("probe", "program"))
BUILD_INFO = MetricSpec("netwatch_build", "info", "netwatchd version and data sources.",
                        ("version", "identity"))

DAEMON_METRICS = (PROBE_ATTACHED, HOOK_AVAILABLE, MAP_ENTRIES, MAP_CAPACITY, MAP_OVERFLOW, MAP_EVICTIONS,
                  SERIES_FOLDED, IDENTITY_UP, IDENTITY_PODS, IDENTITY_ERRORS, PROG_RUNS, PROG_RUN_SECONDS, BUILD_INFO)


def all_metrics() -> tuple[MetricSpec, ...]:
    """Every metric netwatchd can export: each registered probe's, then the daemon's."""
    from netwatchd.probes.registry import PROBES

    specs: list[MetricSpec] = []
    for factory in PROBES.values():
        specs.extend(getattr(factory, "metrics", ()))
    return (*specs, *DAEMON_METRICS)


class NetwatchCollector(Collector):
    """Yields every netwatchd metric from the daemon's state; `refresh` is called first (reads maps)."""

    def __init__(self, state, refresh: Callable[[], None]) -> None:
        self.state = state
        self.refresh = refresh

    def collect(self) -> Iterator:
        self.refresh()
        st = self.state
        attached = [p for p in st.probes if p.name not in st.probe_errors]
        for probe in attached:
            yield from probe.collect()

        fam = family(PROBE_ATTACHED)
        for (probe, hook), ok in sorted(st.probe_status.items()):
            fam.add_metric([probe, hook], 1.0 if ok else 0.0)
        yield fam
        fam = family(HOOK_AVAILABLE)
        for h in st.hooks:
            fam.add_metric([h.kind], 1.0 if h.available else 0.0)
        yield fam

        entries, capacity = family(MAP_ENTRIES), family(MAP_CAPACITY)
        overflow, evictions, folded = family(MAP_OVERFLOW), family(MAP_EVICTIONS), family(SERIES_FOLDED)
        for probe in attached:
            for name, m in sorted(probe.map_stats().items()):
                entries.add_metric([name], m.entries)
                capacity.add_metric([name], m.capacity)
                overflow.add_metric([name], m.overflow)
                evictions.add_metric([name], m.evictions)
            for metric, n in sorted(probe.folded().items()):
                folded.add_metric([metric], n)
        yield from (entries, capacity, overflow, evictions, folded)

        runs, run_s = family(PROG_RUNS), family(PROG_RUN_SECONDS)
        if st.bpf_stats is not None:
            live = {p.name for p in attached}
            for (probe, program), est in sorted(st.bpf_stats.snapshot().items()):
                if probe in live:
                    runs.add_metric([probe, program], est.runs)
                    run_s.add_metric([probe, program], est.run_time_ns / 1e9)
        yield from (runs, run_s)

        up, pods, errors = family(IDENTITY_UP), family(IDENTITY_PODS), family(IDENTITY_ERRORS)
        ident = st.identity
        if ident is not None:
            for source, ok in sorted(ident.sources_up().items()):
                up.add_metric([source], 1.0 if ok else 0.0)
            pods.add_metric([], len(ident.resolver.pods))
            for (source, kind), n in sorted(ident.errors.items()):
                errors.add_metric([source, kind], n)
        yield from (up, pods, errors)

        info = InfoMetricFamily(BUILD_INFO.name, BUILD_INFO.help)
        info.add_metric([], {"version": netwatchd.__version__, "identity": st.identity_source})
        yield info
