"""Section 4, the daemon as a process: idle on a full node, memory with 10k drop keys, start-to-ready.

The bench node is filled up to ``--node-pods`` pods (110: Kubernetes' default maximum per node), each a netns
with a veth on the bridge, and netwatchd gets pod identity from the lab kubelet and apiserver (the only flags
it gets; the rest are its defaults). After a warm-up (every pod identified, a few identity refreshes) and with
no traffic, its CPU is measured over ``--idle-seconds``: utime+stime including reaped children (a short-lived
helper counts), and schedstat (ns-precise, live threads). Then ``--drop-keys`` active drop keys (one spoofed
source each, as in the scrape section), a shorter CPU window with them, timed scrapes, and the RSS there: the
target's condition (110 pods and 10k active drop keys).

Start-to-ready is timed on every start of the run: from launching the process to the first 200 of /readyz.
The peak RSS during start is VmHWM read right after ready (the daemon process itself), and separately the peak
of the daemon plus its children, sampled every 20 ms while it started.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass

from bench import daemon, measure, rr
from bench.config import CLOSED_PORT, CLUSTER_CIDRS, FLOW_SOURCES, Targets, log
from bench.report import NA, SummaryRow, median, table, target_text, verdict
from bench.scrape import ScrapeResult, measure_scrapes
from bench.world import Bench, Netwatchd, lab_cluster


@dataclass(frozen=True)
class CpuWindow:
    seconds: float
    cpu_pct: float  # utime+stime (+ reaped children), % of one core
    runtime_pct: float  # schedstat

    @property
    def worst(self) -> float:
        """The higher of the two: tick-based accounting can miss short bursts, schedstat misses reaped children."""
        return max(self.cpu_pct, self.runtime_pct)


@dataclass
class FullNodeResults:
    pods: int
    identified: int
    identify_s: float  # from ready until the daemon knew every pod
    start: daemon.StartRecord
    idle: CpuWindow
    rss_idle_kib: int
    keys: int
    drops_entries: int
    keyed: CpuWindow
    rss_keys_kib: int
    hwm_keys_kib: int
    scrape: ScrapeResult
    args: list[str]


def fill_node(b: Bench, pods: int) -> None:
    """Add idle pods until the bench node has ``pods`` pods."""
    todo = pods - len(b.node.pods)
    t0 = time.monotonic()
    for i in range(todo):
        b.node.add_pod(f"idle-{i:03d}")
    log(f"full node: {len(b.node.pods)} pods ({todo} added in {time.monotonic() - t0:.0f} s)")


def cpu_window(pid: int, seconds: float) -> CpuWindow:
    c0, r0, t0 = measure.process_cpu_seconds(pid, children=True), measure.process_runtime_seconds(pid), \
        time.monotonic()
    time.sleep(seconds)
    c1, r1, t1 = measure.process_cpu_seconds(pid, children=True), measure.process_runtime_seconds(pid), \
        time.monotonic()
    return CpuWindow(t1 - t0, 100 * (c1 - c0) / (t1 - t0), 100 * (r1 - r0) / (t1 - t0))


def wait_identified(d: daemon.Daemon, pods: int, timeout: float = 60.0) -> tuple[int, float]:
    """Poll (1/s) until netwatch_identity_pods reaches ``pods``; (pods known, seconds waited)."""
    t0, known = time.monotonic(), 0
    while time.monotonic() - t0 < timeout:
        known = int(sum(v for _, v in daemon.samples(d.metrics(), "netwatch_identity_pods")))
        if known >= pods:
            break
        time.sleep(1.0)
    return known, time.monotonic() - t0


def drop_entries(d: daemon.Daemon) -> tuple[int, int]:
    """(entries, capacity) of the drops map, from a scrape."""
    body = d.metrics()
    return (daemon.map_gauge(body, "netwatch_bpf_map_entries").get("drops", 0),
            daemon.map_gauge(body, "netwatch_bpf_map_capacity").get("drops", 1 << 30))


def wait_drop_entries(d: daemon.Daemon, want: int, timeout: float = 15.0) -> int:
    """Poll until the drops map holds ``want`` entries (or the timeout); the last count."""
    deadline, entries = time.monotonic() + timeout, 0
    while time.monotonic() < deadline:
        entries = drop_entries(d)[0]
        if entries >= want:
            break
        time.sleep(1.0)
    return entries


def full_node(b: Bench) -> FullNodeResults:
    """Fill the node, run netwatchd with the lab kubelet/apiserver, measure idle, then with drop keys."""
    cfg = b.cfg
    fill_node(b, cfg.node_pods)
    cluster = b.cluster or lab_cluster(b.lab, b.node, b.server, dnat=False)
    try:
        cluster.sync()  # publish every pod to the kubelet
        args = cluster.netwatchd_args() + ["--cluster-cidr", CLUSTER_CIDRS] + cfg.netwatchd_args
        nw = Netwatchd(b, where=f"full node ({len(b.node.pods)} pods)", args=args)
        nw.start()
        try:
            return _measure(b, nw, args)
        finally:
            nw.stop()
    finally:
        if cluster is not b.cluster:
            cluster.close()


def _measure(b: Bench, nw: Netwatchd, args: list[str]) -> FullNodeResults:
    cfg, d = b.cfg, nw.d
    assert d is not None and d.start is not None
    known, identify_s = wait_identified(d, len(b.node.pods))
    log(f"full node: {known}/{len(b.node.pods)} pods identified {identify_s:.1f} s after ready; warm-up "
        f"{cfg.idle_warmup:g} s, then {cfg.idle_seconds:g} s idle")
    time.sleep(cfg.idle_warmup)
    idle = cpu_window(nw.pid, cfg.idle_seconds)
    rss_idle = measure.process_memory_kib(nw.pid).get("VmRSS", 0)
    log(f"full node idle: {idle.cpu_pct:.2f} % ({idle.runtime_pct:.2f} % schedstat), RSS {rss_idle / 1024:.0f} MiB")
    before, capacity = drop_entries(d)  # drops elsewhere on the machine are keys too (tracepoints are global)
    rr.flows(b.rr_bin, b.flowgen, b.sink.ip, CLOSED_PORT, cfg.drop_keys, str(ipaddress.ip_network(FLOW_SOURCES)[1]))
    # Past 75 % the daemon evicts idle entries: then the count stops short of before + keys.
    entries = wait_drop_entries(d, min(before + cfg.drop_keys, int(0.75 * capacity)))
    keyed = cpu_window(nw.pid, max(1.0, cfg.idle_seconds / 2))
    sc = measure_scrapes(b, d, cfg.drop_keys, cfg.scrapes, f"full node, {len(b.node.pods)} pods")
    mem = measure.process_memory_kib(nw.pid)
    log(f"full node with {entries} drop entries: {keyed.cpu_pct:.2f} % CPU, RSS {mem.get('VmRSS', 0) / 1024:.0f} MiB")
    return FullNodeResults(len(b.node.pods), known, identify_s, d.start, idle, rss_idle, cfg.drop_keys, entries,
                           keyed, mem.get("VmRSS", 0), mem.get("VmHWM", 0), sc, args)


# --- results ------------------------------------------------------------------------------------------------


def _mib(kib: float) -> str:
    return f"{kib / 1024:.0f} MiB"


def lab_starts(starts: list[daemon.StartRecord]) -> list[daemon.StartRecord]:
    """Starts on the 5-pod lab node (every section but the full node)."""
    return [s for s in starts if not s.where.startswith("full node")]


def render(fn: FullNodeResults | None, starts: list[daemon.StartRecord]) -> str:
    lab = lab_starts(starts)
    rows = []
    if lab:
        ready = [s.ready_s for s in lab]
        rows += [
            [f"start-to-ready, 5-pod lab: median (min-max) of {len(lab)} starts",
             f"{median(ready):.2f} s ({min(ready):.2f}-{max(ready):.2f})", target_text(Targets.START_S, " s"),
             verdict(median(ready), Targets.START_S)],
            ["peak RSS during start (VmHWM right after ready), 5-pod lab: median / max",
             f"{_mib(median([s.hwm_kib for s in lab]))} / {_mib(max(s.hwm_kib for s in lab))}", "", ""],
            ["peak RSS of daemon + children during start (sampled), 5-pod lab: max",
             _mib(max(s.tree_peak_kib for s in lab)), "", ""],
        ]
    if fn:
        n, k = fn.pods, fn.keys
        rows += [
            [f"start-to-ready, full node ({n} pods, kubelet + apiserver)", f"{fn.start.ready_s:.2f} s",
             target_text(Targets.START_S, " s"), verdict(fn.start.ready_s, Targets.START_S)],
            ["peak RSS during start, full node: VmHWM / daemon + children (sampled)",
             f"{_mib(fn.start.hwm_kib)} / {_mib(fn.start.tree_peak_kib)}", "", ""],
            ["every pod identified (netwatch_identity_pods), after ready", f"{fn.identified}/{n} in "
             f"{fn.identify_s:.1f} s", "", ""],
            [f"CPU idle, {n} pods, no traffic, {fn.idle.seconds:.0f} s: utime+stime incl. children (schedstat)",
             f"{fn.idle.cpu_pct:.2f} % ({fn.idle.runtime_pct:.2f} %)", target_text(Targets.IDLE_CPU_PCT, " %"),
             verdict(fn.idle.worst, Targets.IDLE_CPU_PCT)],
            [f"RSS idle, {n} pods, no traffic", _mib(fn.rss_idle_kib), "", ""],
            [f"CPU with {k:,} drop keys, no traffic, {fn.keyed.seconds:.0f} s (schedstat)",
             f"{fn.keyed.cpu_pct:.2f} % ({fn.keyed.runtime_pct:.2f} %)", "", ""],
            [f"RSS at {k:,} active drop keys ({fn.drops_entries:,} drops entries), {n} pods, after "
             f"{len(fn.scrape.times_ms)} scrapes; VmHWM", f"{_mib(fn.rss_keys_kib)}; {_mib(fn.hwm_keys_kib)}",
             target_text(Targets.RSS_MIB, " MiB"), verdict(fn.rss_keys_kib / 1024, Targets.RSS_MIB)],
        ]
    args = f" Full node: netwatchd ran with `{' '.join(fn.args)}` (nothing else: defaults)." if fn else ""
    return "\n".join(["### netwatchd as a process: start, memory, idle on a full node", "",
                      "Start-to-ready = launching the process until /readyz answers 200 (polled every 20 ms)." + args,
                      "", table(["", "measured", "target", "verdict"], rows)])


def summary(fn: FullNodeResults | None, starts: list[daemon.StartRecord], quick: bool) -> list[SummaryRow]:
    rows = []
    lab = lab_starts(starts)
    if lab:
        ready = median([s.ready_s for s in lab])
        rows.append(SummaryRow("start-to-ready (5-pod lab)", f"{ready:.2f} s median of {len(lab)} starts (max "
                               f"{max(s.ready_s for s in lab):.2f})", target_text(Targets.START_S, " s"),
                               verdict(ready, Targets.START_S)))
    if fn is None:
        return rows + [SummaryRow("full node (idle CPU, RSS)", "not measured", "", NA)]
    small = " (quick run: fewer pods and keys than the target's)" if quick else ""
    rows += [
        SummaryRow(f"start-to-ready (full node, {fn.pods} pods)", f"{fn.start.ready_s:.2f} s",
                   target_text(Targets.START_S, " s"), verdict(fn.start.ready_s, Targets.START_S)),
        SummaryRow(f"RSS, {fn.pods} pods + {fn.keys:,} active drop keys", _mib(fn.rss_keys_kib),
                   target_text(Targets.RSS_MIB, " MiB"), verdict(fn.rss_keys_kib / 1024, Targets.RSS_MIB),
                   f"idle {_mib(fn.rss_idle_kib)}; peak during start {_mib(fn.start.hwm_kib)}{small}"),
        SummaryRow(f"idle CPU, {fn.pods} pods, no traffic, kubelet + apiserver", f"{fn.idle.worst:.2f} % of one core",
                   target_text(Targets.IDLE_CPU_PCT, " %"), verdict(fn.idle.worst, Targets.IDLE_CPU_PCT),
                   f"{fn.idle.seconds:.0f} s window after warm-up{small}"),
    ]
    return rows
