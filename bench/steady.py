"""Section 2, per-program kernel cost at steady load, against floors measured in the same window.

netwatchd runs with its defaults; its programs and their hooks are discovered (``bench.progs``), and an empty
program is loaded on exactly those hooks (``bench.floors``). With ``kernel.bpf_stats_enabled=1`` (this section
only) every program's ns/event is delta run_time_ns / delta run_cnt, netwatchd's and the floors' over the same
window, so both saw the same events. Four windows, one after the other, with paced request/response to the
ClusterIP (DNAT, conntrack; ``tcp_probe`` on every received segment) running through all of them:

- ``background``: nothing of ours drops. Tracepoints are global, so whatever else on this machine frees packets
  as dropped is counted here; its rate and cost are subtracted from the two drop windows below.
- ``steady``: plus paced UDP to a closed port of ``sink`` (every drop the same drops-map key), refused TCP
  connects (``inet_sock_set_state``, ``tcp_receive_reset``) and connects whose SYNs ``sink`` drops (one SYN
  retransmit each: ``tcp_retransmit_skb``). Every program's cost and multiple of its floor comes from here, and
  ``kfree_skb`` for a key that already exists.
- ``new keys``: paced UDP datagrams each from its own spoofed source address (``rr flows``), so every drop is a
  new drops-map key; kept below 90 % of the map's capacity (fill and overflow are read back and shown).
- ``background after``: like ``background``, once more: other work on a shared machine comes and goes, so the
  subtraction uses both, and a per-drop figure is flagged unreliable when the background dominates or moved.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass, field

from bench import daemon, floors, measure, progs, rr
from bench.config import CLOSED_PORT, DROPPED_PORT, FLOW_SOURCES, RR_PORT, VIP, Targets, log
from bench.report import NA, SummaryRow, table, target_text, verdict
from bench.world import Bench, Netwatchd

LEAD_S = 1.5  # drop loads start this long before their window: the 1 s SYN retransmits are flowing by then
MAP_ROOM = 0.90  # the new-key load stays below this fill of the drops map: clear of map-full (overflow)


@dataclass(frozen=True)
class Snapshot:
    t: float
    stats: dict[int, tuple[int, int]]  # prog id -> (run_cnt, run_time_ns)
    cpu_s: float  # daemon utime+stime (+ reaped children)
    runtime_s: float  # daemon schedstat
    rx: int  # packets the pods sent into the node


@dataclass(frozen=True)
class Window:
    name: str
    a: Snapshot
    b: Snapshot

    @property
    def seconds(self) -> float:
        return self.b.t - self.a.t

    def runs(self, prog_id: int) -> tuple[int, int]:
        """(events, run_time_ns) of ``prog_id`` in this window."""
        c0, t0 = self.a.stats.get(prog_id, (0, 0))
        c1, t1 = self.b.stats.get(prog_id, (0, 0))
        return c1 - c0, t1 - t0

    def rate(self, prog_id: int) -> float:
        return self.runs(prog_id)[0] / self.seconds

    def ns(self, prog_id: int) -> float:
        n, t = self.runs(prog_id)
        return t / n if n else float("nan")

    @property
    def pps(self) -> float:
        return (self.b.rx - self.a.rx) / self.seconds

    @property
    def daemon_cpu_pct(self) -> float:
        return 100 * (self.b.cpu_s - self.a.cpu_s) / self.seconds

    @property
    def daemon_runtime_pct(self) -> float:
        return 100 * (self.b.runtime_s - self.a.runtime_s) / self.seconds


@dataclass
class SteadyResults:
    rr_rate: float
    udp_rate: float
    refused_rate: float
    dropped_syn_rate: float
    programs: list[progs.Program]
    floors: list[floors.Floor]
    floor_ids: dict[str, int]  # floor key -> prog id
    floor_of: dict[int, str]  # netwatchd prog id -> floor key (same kind, same hooks)
    raw_floor_of_event: dict[str, str]  # event -> key of the empty raw tracepoint on it
    windows: dict[str, Window]
    new_keys_sent: int = 0
    new_keys_planned: int = 0
    drops_map: dict[str, int] = field(default_factory=dict)  # entries/capacity before, overflow delta
    rss_kib: int = 0
    hwm_kib: int = 0
    ifnames: dict[int, str] = field(default_factory=dict)
    tc_mode: str = ""
    probes: dict[str, list[tuple[str, bool]]] = field(default_factory=dict)


def snapshot(b: Bench, pid: int, ids: set[int]) -> Snapshot:
    return Snapshot(time.monotonic(), progs.run_stats(ids), measure.process_cpu_seconds(pid, children=True),
                    measure.process_runtime_seconds(pid), measure.link_rx_packets(b.node.netns, b.pod_veths))


def steady(b: Bench) -> SteadyResults:
    """Start netwatchd, load the floors on its hooks, and run the three windows (see the module docstring)."""
    nw = Netwatchd(b, where="steady")
    nw.start()
    try:
        plan, floor_of, raw_of = floors.plan(nw.programs)
        log(f"steady: netwatchd programs {[f'{p.name} ({p.hook_text()})' for p in nw.programs]}; "
            f"{len(plan)} floor(s), tc via {nw.tc_mode}")
        with floors.FloorSet(b.node, plan, nw.tc_mode) as fs, measure.bpf_stats_enabled():
            res = SteadyResults(0.45 * b.cfg.steady_pps, 0.10 * b.cfg.steady_pps, 0.01 * b.cfg.steady_pps,
                                0.002 * b.cfg.steady_pps, nw.programs, plan, fs.ids, floor_of, raw_of, {})
            _windows(b, nw, res)
        mem = measure.process_memory_kib(nw.pid)
        res.rss_kib, res.hwm_kib = mem.get("VmRSS", 0), mem.get("VmHWM", 0)
        res.ifnames, res.tc_mode, res.probes = progs.ifnames(b.node.netns), nw.tc_mode, nw.probes
        return res
    finally:
        nw.stop()


def _windows(b: Bench, nw: Netwatchd, res: SteadyResults) -> None:
    quick = b.cfg.quick
    warm, w_bg, w_main = (2.0, 2.0, b.cfg.steady_seconds) if quick else (3.0, 5.0, b.cfg.steady_seconds)
    w_new = 3.0 if quick else 10.0
    ids = {p.id for p in nw.programs} | set(res.floor_ids.values())
    total = warm + w_bg + LEAD_S + w_main + 3 + w_new + w_bg + 5
    rr_proc = rr.start_client(b.rr_bin, b.client, VIP, RR_PORT, total, res.rr_rate, cpu=b.cfg.cpu)
    time.sleep(warm)
    s0 = snapshot(b, nw.pid, ids)
    time.sleep(w_bg)
    res.windows["background"] = Window("background", s0, snapshot(b, nw.pid, ids))
    drop_loads = _start_drop_loads(b, res, LEAD_S + w_main)
    time.sleep(LEAD_S)
    s2 = snapshot(b, nw.pid, ids)
    time.sleep(w_main)
    res.windows["steady"] = Window("steady", s2, snapshot(b, nw.pid, ids))
    for proc in drop_loads:
        rr.finish(proc, 30)
    res.new_keys_planned = int(b.cfg.new_key_rate * w_new)
    room = _wait_map_room(nw, res, res.new_keys_planned, 2.0 if quick else 6.0)
    n_new = max(0, min(res.new_keys_planned, room, 65000))
    if n_new < res.new_keys_planned:
        log(f"WARNING: drops map has room for {n_new} of the {res.new_keys_planned} new keys planned")
    first = str(ipaddress.ip_network(FLOW_SOURCES)[1])
    s4 = snapshot(b, nw.pid, ids)
    res.new_keys_sent = rr.flows(b.rr_bin, b.flowgen, b.sink.ip, CLOSED_PORT, n_new, first, b.cfg.new_key_rate)
    s5 = snapshot(b, nw.pid, ids)
    res.windows["new keys"] = Window("new keys", s4, s5)
    time.sleep(w_bg)  # the background again, after: the machine's other work is not steady
    res.windows["background after"] = Window("background after", s5, snapshot(b, nw.pid, ids))
    res.drops_map["overflow_delta"] = _drops_map(nw).get("overflow", 0) - res.drops_map.get("overflow", 0)
    rr.finish(rr_proc, total + 15)


def _start_drop_loads(b: Bench, res: SteadyResults, seconds: float) -> list:
    """Same-key UDP drops, refused connects and dropped-SYN connects for ``seconds``."""
    return [rr.start_udp(b.rr_bin, b.udpgen, b.sink.ip, CLOSED_PORT, seconds, res.udp_rate),
            rr.start_connects(b.rr_bin, b.udpgen, b.sink.ip, CLOSED_PORT, seconds, res.refused_rate, 50),
            rr.start_connects(b.rr_bin, b.udpgen, b.sink.ip, DROPPED_PORT, seconds, res.dropped_syn_rate, 1200)]


def _wait_map_room(nw: Netwatchd, res: SteadyResults, want: int, patience: float) -> int:
    """Room for new keys in the drops map below MAP_ROOM; on a shared machine other labs' drops can fill it, so
    wait (up to ``patience`` s) for the daemon's eviction of idle entries. Leaves the last reading in res."""
    deadline = time.monotonic() + patience
    while True:
        res.drops_map = _drops_map(nw)
        room = int(MAP_ROOM * res.drops_map.get("capacity", 1 << 30)) - res.drops_map.get("entries", 0)
        if room >= want or time.monotonic() >= deadline:
            return room
        time.sleep(1.0)


def _drops_map(nw: Netwatchd) -> dict[str, int]:
    """Fill of the drops map (a scrape: the daemon reads its maps for it), outside the measured windows."""
    assert nw.d is not None
    body = nw.d.metrics()
    name = "drops"
    out = {}
    for key, metric in (("entries", "netwatch_bpf_map_entries"), ("capacity", "netwatch_bpf_map_capacity"),
                        ("overflow", "netwatch_bpf_map_overflow_total")):
        value = daemon.map_gauge(body, metric).get(name)
        if value is not None:
            out[key] = value
    return out


# --- results ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProgramCost:
    program: progs.Program
    rate: float
    ns: float
    floor_ns: float
    floor_rate: float
    raw_floor_ns: float  # empty raw tracepoint on the same event (tracepoint programs), else NaN

    @property
    def multiple(self) -> float:
        return self.ns / self.floor_ns if self.floor_ns == self.floor_ns and self.floor_ns > 0 else float("nan")


def program_costs(st: SteadyResults) -> list[ProgramCost]:
    w = st.windows["steady"]
    out = []
    for p in st.programs:
        fid = st.floor_ids.get(st.floor_of.get(p.id, ""), -1)
        events = [h.event for h in p.hooks if h.kind in (progs.TP_KIND, progs.RAW_KIND)]
        raw = st.floor_ids.get(st.raw_floor_of_event.get(events[0], ""), -1) if len(events) == 1 else -1
        out.append(ProgramCost(p, w.rate(p.id), w.ns(p.id), w.ns(fid), w.rate(fid),
                               w.ns(raw) if p.kind == progs.TP_KIND else float("nan")))
    return out


def kfree_program(st: SteadyResults) -> progs.Program | None:
    """netwatchd's program on the kfree_skb event (tracepoint or raw tracepoint), whatever its name."""
    return next((p for p in st.programs if any(h.event == "kfree_skb" for h in p.hooks)), None)


@dataclass(frozen=True)
class DropCost:
    window: str
    rate: float  # kfree_skb events/s, all of them
    ns: float  # per event, all events
    background_rates: tuple[float, float]  # kfree_skb events/s before and after, nothing of ours dropping
    ours_ns: float  # per drop of ours: the background's events at the background's cost subtracted
    background_share: float

    @property
    def background_rate(self) -> float:
        return sum(self.background_rates) / 2

    @property
    def unreliable(self) -> bool:
        """Other work dominates the events, or changed a lot between the two background windows."""
        lo, hi = sorted(self.background_rates)
        return self.background_share > 0.5 or (self.background_share > 0.1 and hi > 2 * lo + 10)


def drop_cost(st: SteadyResults, prog_id: int, window: str) -> DropCost:
    """kfree_skb's cost in ``window``, all events and ours alone (background: both background windows)."""
    w, bgs = st.windows[window], [st.windows["background"], st.windows["background after"]]
    n, t = w.runs(prog_id)
    bg_n, bg_t = (sum(bg.runs(prog_id)[i] for bg in bgs) for i in (0, 1))
    bg_events = bg_n / sum(bg.seconds for bg in bgs) * w.seconds
    bg_ns = bg_t / bg_n if bg_n else 0.0
    ours = n - bg_events
    ours_ns = (t - bg_events * bg_ns) / ours if ours > 0 else float("nan")
    rates = tuple(bg.rate(prog_id) for bg in bgs)
    return DropCost(window, n / w.seconds, t / n if n else float("nan"), rates, ours_ns, bg_events / n if n else 0.0)


def _fmt_ns(v: float) -> str:
    return "-" if v != v else f"{v:.0f}"


def _fmt_rate(v: float) -> str:
    return f"{v:,.0f}" if v >= 10 else f"{v:.2f}"


def render(st: SteadyResults) -> str:
    w = st.windows["steady"]
    cost_rows = []
    for c in program_costs(st):
        no_events = c.rate == 0
        cost_rows.append([c.program.name, c.program.type, c.program.hook_text(st.ifnames), _fmt_rate(c.rate),
                          "no events" if no_events else _fmt_ns(c.ns),
                          f"{_fmt_ns(c.floor_ns)} ({_fmt_rate(c.floor_rate)}/s)",
                          "-" if no_events else f"{c.multiple:.2f}x", target_text(Targets.FLOOR_MULTIPLE, "x"),
                          NA if no_events else verdict(c.multiple, Targets.FLOOR_MULTIPLE), _fmt_ns(c.raw_floor_ns)])
    floor_rows = [[f.key, f.kind, _floor_hooks(f, st.ifnames), _fmt_rate(w.rate(st.floor_ids.get(f.key, -1))),
                   _fmt_ns(w.ns(st.floor_ids.get(f.key, -1)))] for f in st.floors]
    out = [
        f"### Per-program kernel cost at steady load ({w.pps:,.0f} packets/s into the node)",
        "",
        f"Load: paced 1-byte request/response pod->service at {st.rr_rate:,.0f} transactions/s throughout; in the "
        f"`steady` window also {st.udp_rate:,.0f} UDP datagrams/s to a closed port of another pod (one drops-map key), "
        f"{st.refused_rate:,.0f} refused connects/s and {st.dropped_syn_rate:,.0f} connects/s whose SYNs are dropped "
        f"(one retransmit each). Window {w.seconds:.1f} s; kernel.bpf_stats_enabled=1 only in this section. "
        f"Programs: those netwatchd loaded (new since it started, held by its process), hooks as the kernel "
        f"reports them (tc via {st.tc_mode}). Floor = an empty program of the same kind on exactly the same hooks "
        "(tc: `return TC_ACT_UNSPEC`, first in line; tracepoints: `return 0`), measured in the same window: its "
        "events/s should equal the program's. Tracepoints are global: they count every hit on this machine.",
        "",
        table(["program", "type", "hook", "events/s", "ns/event", "floor ns/event (events/s)", "multiple of floor",
               "target", "verdict", "empty raw tracepoint on the event, ns"], cost_rows),
        "",
        table(["floor", "kind", "hooks", "events/s", "ns/event"], floor_rows),
        "",
        _render_drops(st),
        "",
        table(["netwatchd process (steady window)", "measured", "target", "verdict"], [
            ["CPU, % of one core: utime+stime (schedstat)",
             f"{w.daemon_cpu_pct:.2f} ({w.daemon_runtime_pct:.2f})", target_text(Targets.STEADY_CPU_PCT),
             verdict(max(w.daemon_cpu_pct, w.daemon_runtime_pct), Targets.STEADY_CPU_PCT)],
            ["RSS now / peak, MiB", f"{st.rss_kib / 1024:.0f} / {st.hwm_kib / 1024:.0f}", "", ""],
        ]),
    ]
    return "\n".join(out)


def _floor_hooks(f: floors.Floor, ifnames: dict[int, str]) -> str:
    return progs.Program(0, f.key, f.kind, f.hooks).hook_text(ifnames)


def _render_drops(st: SteadyResults) -> str:
    p = kfree_program(st)
    if p is None:
        return "No netwatchd program on the kfree_skb event was found: no per-drop cost."
    rows = []
    for window, target, what in (("steady", Targets.KFREE_EXISTING_KEY_NS, "every drop an existing key"),
                                 ("new keys", Targets.KFREE_NEW_KEY_NS, "every drop a new key")):
        c = drop_cost(st, p.id, window)
        rows.append([f"{what} (`{window}`)", _fmt_rate(c.rate), _fmt_ns(c.ns),
                     " / ".join(_fmt_rate(r) for r in c.background_rates),
                     f"{c.background_share:.0%}" + (" (unreliable)" if c.unreliable else ""),
                     _fmt_ns(c.ours_ns), target_text(target, " ns"), verdict(c.ours_ns, target)])
    m = st.drops_map
    fill = (f"The drops map held {m.get('entries', '?'):,} of {m.get('capacity', '?'):,} entries before the new-key "
            f"window; {st.new_keys_sent:,} new keys were sent (planned {st.new_keys_planned:,}); map-full overflows in "
            f"it: {m.get('overflow_delta', '?')}." if m else "The drops map's fill was not exported.")
    return "\n".join([
        f"`{p.name}` per drop. Background = kfree_skb events/s from elsewhere on this machine in two windows with "
        "nothing of ours dropping, one before the drop loads and one after; the per-drop cost of ours subtracts "
        f"that many events at the background's own cost. {fill}",
        "",
        table(["drop load", "kfree_skb events/s (all)", "ns/event (all)", "background events/s (before / after)",
               "background share",
               "ns per drop of ours", "target", "verdict"], rows),
    ])


def _background_note(c: DropCost) -> str:
    """How much of the kfree_skb events were not ours, and whether the subtraction can be trusted."""
    if c.background_share < 0.01:
        return ""
    before, after = c.background_rates
    note = f"background ({before:,.0f} / {after:,.0f} drops/s before / after) {c.background_share:.0%} of events, " \
        "subtracted"
    if c.unreliable:
        note += " (**unreliable**: other work on this machine dominates or varies; rerun on a quiet machine)"
    return note


def summary(st: SteadyResults) -> list[SummaryRow]:
    rows, silent = [], []
    for c in program_costs(st):
        if c.rate == 0:
            silent.append(c.program.name)
            continue
        kind = {"tc": "tc program", "tracepoint": "tracepoint program", "raw_tracepoint": "raw tracepoint program"}
        rows.append(SummaryRow(f"{kind.get(c.program.kind, c.program.kind)} `{c.program.name}` vs its floor",
                               f"{c.multiple:.2f}x ({_fmt_ns(c.ns)} / {_fmt_ns(c.floor_ns)} ns)",
                               target_text(Targets.FLOOR_MULTIPLE, "x"), verdict(c.multiple, Targets.FLOOR_MULTIPLE),
                               c.program.hook_text(st.ifnames)))
    if silent:
        rows.append(SummaryRow("programs without events in the steady window", ", ".join(silent), "", NA,
                               "not judged (an uplink program on a lab node without uplink traffic, or a hook the "
                               "load does not reach)"))
    p = kfree_program(st)
    for window, target, what in (("new keys", Targets.KFREE_NEW_KEY_NS, "kfree_skb per drop, every drop a new key"),
                                 ("steady", Targets.KFREE_EXISTING_KEY_NS, "kfree_skb per drop, existing key")):
        c = drop_cost(st, p.id, window) if p else None
        note = _background_note(c) if c else ""
        if window == "new keys" and st.new_keys_sent < st.new_keys_planned:
            m = st.drops_map
            note = (f"only {st.new_keys_sent:,} of {st.new_keys_planned:,} new keys sent: the drops map held "
                    f"{m.get('entries', 0):,} of {m.get('capacity', 0):,} entries (other drops on this machine)"
                    + (f"; {note}" if note else ""))
        measured = "no kfree_skb program" if c is None else "not measured" if c.ours_ns != c.ours_ns else \
            f"{_fmt_ns(c.ours_ns)} ns"
        rows.append(SummaryRow(what, measured,
                               target_text(target, " ns"), verdict(c.ours_ns, target) if c else NA, note))
    w = st.windows["steady"]
    cpu = max(w.daemon_cpu_pct, w.daemon_runtime_pct)
    rows.append(SummaryRow(f"daemon CPU at steady load ({w.pps:,.0f} packets/s)", f"{cpu:.2f} % of one core",
                           target_text(Targets.STEADY_CPU_PCT, " %"), verdict(cpu, Targets.STEADY_CPU_PCT),
                           "the bench's own target"))
    return rows
