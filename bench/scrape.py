"""Section 3, ``/metrics`` scrape time at 0, 1k and 10k active drop keys, netwatchd with its defaults.

A flow is one UDP 5-tuple with its own (spoofed) source address in ``FLOW_SOURCES``, sent through the bridge to a
closed port of ``sink``, which drops it (NO_SOCKET; its ICMP replies are blackholed): one drops-map key per flow.
The flows are re-sent before every scrape so they stay active. With the default ``--interval 2`` a scrape reads
the maps itself unless a read finished in the last 50 ms, so nearly every scrape pays for the full map read.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass

from bench import daemon, rr
from bench.config import CLOSED_PORT, FLOW_SOURCES, Targets, log
from bench.report import SummaryRow, median, table, target_text, verdict
from bench.world import Bench, Netwatchd

FLOW_MEANING = (
    "A flow is one distinct UDP 5-tuple: source address 10.250.x.y (one per flow) and port, to a closed port of a "
    "pod on the node, sent through the bridge and dropped by the receiving pod's kernel (NO_SOCKET), so every flow "
    "is one key in the drops map (the entries column shows what each map held; tracepoints are global, so drops "
    "elsewhere on this machine add keys too); the flows are re-sent before every scrape. netwatchd runs with its "
    "default flags (a scrape reads the maps itself unless a read finished < 50 ms earlier).")


@dataclass
class ScrapeResult:
    flows: int
    entries: dict[str, int]
    times_ms: list[float]
    body_bytes: int
    where: str = "5-pod lab"

    @property
    def median_ms(self) -> float:
        return median(self.times_ms)

    @property
    def max_ms(self) -> float:
        return max(self.times_ms) if self.times_ms else float("nan")


def measure_scrapes(b: Bench, d: daemon.Daemon, flows: int, count: int, where: str) -> ScrapeResult:
    """``count`` timed scrapes of ``d`` with ``flows`` active flows (re-sent before each scrape)."""
    first_src = str(ipaddress.ip_network(FLOW_SOURCES)[1])
    times, body = [], ""
    for _ in range(count):
        if flows:
            rr.flows(b.rr_bin, b.flowgen, b.sink.ip, CLOSED_PORT, flows, first_src)
        time.sleep(0.3)  # let the packets land; also clear of the daemon's 50 ms refresh reuse
        status, body, ms = d.get("/metrics")
        if status != 200:
            raise RuntimeError(f"/metrics answered {status}")
        times.append(ms)
    res = ScrapeResult(flows, daemon.map_gauge(body, "netwatch_bpf_map_entries"), times, len(body), where)
    log(f"scrape ({where}) with {flows} flows: median {res.median_ms:.1f} ms, max {res.max_ms:.1f} ms, "
        f"entries {res.entries}")
    return res


def scrapes(b: Bench) -> list[ScrapeResult]:
    """Scrape /metrics with 0, then each --flows count of active flows."""
    nw = Netwatchd(b, where="scrape")
    nw.start()
    try:
        assert nw.d is not None
        return [measure_scrapes(b, nw.d, n, b.cfg.scrapes, "5-pod lab") for n in [0, *b.cfg.flows]]
    finally:
        nw.stop()


def render(results: list[ScrapeResult], scrapes_per_row: int) -> str:
    rows = [[r.where, f"{r.flows:,}", ", ".join(f"{k}={v:,}" for k, v in sorted(r.entries.items())) or "-",
             f"{r.median_ms:.1f}", f"{r.max_ms:.1f}", f"{r.body_bytes / 1024:.0f}"] for r in results]
    return "\n".join(["### /metrics scrape time", "", f"{FLOW_MEANING} {scrapes_per_row} scrapes per row.", "",
                      table(["node", "active flows", "BPF map entries (netwatch_bpf_map_entries)", "median ms",
                             "max ms", "body KiB"], rows)])


def summary(results: list[ScrapeResult], keys: int = 10000) -> list[SummaryRow]:
    """The 10k-key targets, on every row measured at (at least) ``keys`` flows — else on the largest one."""
    judged = [r for r in results if r.flows >= keys] or sorted(results, key=lambda r: r.flows)[-1:]
    rows = []
    for r in judged:
        note = "" if r.flows >= keys else f"only {r.flows:,} flows in this run"
        rows.append(SummaryRow(f"/metrics median at {r.flows:,} active keys ({r.where})", f"{r.median_ms:.1f} ms",
                               target_text(Targets.SCRAPE_MEDIAN_MS, " ms"),
                               verdict(r.median_ms, Targets.SCRAPE_MEDIAN_MS), note))
        rows.append(SummaryRow(f"/metrics max at {r.flows:,} active keys ({r.where})", f"{r.max_ms:.1f} ms",
                               target_text(Targets.SCRAPE_MAX_MS, " ms"), verdict(r.max_ms, Targets.SCRAPE_MAX_MS),
                               f"{len(r.times_ms)} scrapes" + (f"; {note}" if note else "")))
    return rows
