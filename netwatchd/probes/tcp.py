"""Probe `tcp`: TCP connect latency and failures, smoothed RTT and retransmits, per pod and traffic class.

Kernel side (`bpf/tcp.c`, tracepoints only) aggregates per (socket netns, local address, remote address,
family, role): connect-latency and RTT histograms binned into the exported buckets (export.histogram), and
counters of failed connects by outcome and of retransmits. This side reads those maps, attributes each key
with `pipeline.socket_labels` (the socket's netns names the pod; the peer address names the service) and
exports cumulative Prometheus series. Idle keys are evicted when a map fills up; their totals are kept.
"""

from __future__ import annotations

import contextlib
import ctypes
import gzip
import ipaddress
import math
import os
import re
import struct
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from netwatchd.classify import IPAddress
from netwatchd.export.histogram import DEFAULT_BOUNDS_S, HistogramAccounting, bpf_defines
from netwatchd.export.metrics import MetricSpec, exposed_name, family
from netwatchd.pipeline import SOCKET_LABELS, SeriesBudget, forget_pod_series, socket_labels
from netwatchd.probes.base import Hook, MapStats, ProbeContext
from netwatchd.probes.loader import compile_program, hook_programs

DEFAULT_MAX_ENTRIES = 16384  # each aggregation map (keys: pods x peers, not connections)
DEFAULT_SOCKET_ENTRIES = 65536  # per-socket LRU (connect start time, role, last RTT sample)
DEFAULT_RTT_INTERVAL_S = 1.0  # at most one RTT sample per socket per interval
FALLBACK_HZ = 1000  # when CONFIG_HZ cannot be read: the highest common HZ, so intervals only get longer
EVICT_AT = 0.75  # evict idle keys once a map is this full
SOCKET_COUNT_EVERY_S = 10.0  # counting the per-socket LRU walks it key by key: not on every refresh
_POD, _NS = SOCKET_LABELS.index("pod"), SOCKET_LABELS.index("namespace")

ROLE_CLIENT, ROLE_SERVER = 1, 2  # bpf/tcp.c ROLE_*
OUTCOMES = ("refused", "timeout", "other")  # index = bpf/tcp.c OUTCOME_*
AGG_MAPS = ("tcp_connect", "tcp_rtt", "tcp_counts")  # index = bpf/tcp.c OVERFLOW_*
SOCKET_MAP = "tcp_socks"
RTT_MEMO_SLOTS = 1024  # sockets whose next RTT sample is not due yet (bpf/tcp.c rtt_memo)
# struct tcp_key in bpf/tcp.c: local[16], remote[16], u32 netns, u8 family, u8 role, u8 pad[2].
KEY_LAYOUT = struct.Struct("=16s16sIBB2x")

TCP_CONNECT = MetricSpec(
    "netwatch_tcp_connect_seconds", "histogram",
    "TCP connect latency: SYN sent to ESTABLISHED, of connects the local pod (or node) made.", SOCKET_LABELS)
TCP_CONNECT_FAILURES = MetricSpec(
    "netwatch_tcp_connect_failures", "counter",
    "TCP connects that never reached ESTABLISHED, by outcome: refused (RST), timeout (no answer before the "
    "SYNs ran out or the application gave up), other (e.g. ICMP unreachable).", (*SOCKET_LABELS, "outcome"))
TCP_RTT = MetricSpec(
    "netwatch_tcp_rtt_seconds", "histogram",
    "Smoothed RTT (srtt) of TCP sockets, sampled at most once per socket per --tcp-rtt-interval.", SOCKET_LABELS)
TCP_RETRANSMITS = MetricSpec(
    "netwatch_tcp_retransmits", "counter",
    "TCP retransmissions (tcp:tcp_retransmit_skb; one per retransmitted skb, SYNs included).", SOCKET_LABELS)


@dataclass(frozen=True)
class SockKey:
    """One kernel aggregation key, decoded. `raw` is the map key; the rest is what attribution needs."""

    raw: bytes
    netns: int
    local: IPAddress
    remote: IPAddress
    client: bool  # the local side connected (egress) rather than accepted (ingress)


def _addr(raw: bytes, family: int) -> IPAddress:
    """v4 sits in the first 4 of 16 bytes; a dual-stack socket's v4-mapped v6 address becomes the v4 one."""
    if family == 4:
        return ipaddress.IPv4Address(raw[:4])
    ip = ipaddress.IPv6Address(raw[:16])
    return ip.ipv4_mapped or ip


def decode_key(raw: bytes) -> SockKey:
    """Decode a raw `struct tcp_key` (see KEY_LAYOUT)."""
    local, remote, netns, fam, role = KEY_LAYOUT.unpack(raw[:KEY_LAYOUT.size])
    if fam not in (4, 6):
        raise ValueError(f"bad address family {fam} in tcp key")
    return SockKey(bytes(raw), netns, _addr(local, fam), _addr(remote, fam), role != ROLE_SERVER)


def tracepoint_fields(tracefs: Path, name: str) -> set[str]:
    """Field names of tracepoint `category:event` from its format file (empty set when absent)."""
    category, _, event = name.partition(":")
    try:
        text = (tracefs / "events" / category / event / "format").read_text()
    except OSError:
        return set()
    out = set()
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("field:"):
            decl = line[len("field:"):].split(";", 1)[0].strip()
            out.add(decl.split()[-1].split("[", 1)[0])
    return out


def kernel_hz(proc: Path = Path("/proc"), boot: Path = Path("/boot"), release: str | None = None) -> int | None:
    """CONFIG_HZ of the running kernel (jiffies per second) from /proc/config.gz or /boot/config-<release>."""
    release = release or os.uname().release
    for path in (proc / "config.gz", boot / f"config-{release}"):
        try:
            raw = path.read_bytes()
            text = (gzip.decompress(raw) if path.suffix == ".gz" else raw).decode(errors="replace")
        except (OSError, EOFError, gzip.BadGzipFile):
            continue
        m = re.search(r"^CONFIG_HZ=(\d+)$", text, re.MULTILINE)
        if m:
            return int(m.group(1))
    return None


def interval_jiffies(interval_s: float, hz: int | None) -> int:
    """The RTT sampling interval in jiffies (at least 1 when the interval is positive)."""
    if interval_s <= 0:
        return 0
    return max(1, math.ceil(interval_s * (hz or FALLBACK_HZ)))


class TcpAccounting:
    """Cumulative, labelled TCP series from the kernel's cumulative per-key values.

    `label_fn(key)` gives the socket labels (SOCKET_LABELS) of a SockKey; each metric family has its own
    series budget (pods past it fold into pod="__overflow__").
    """

    def __init__(self, label_fn: Callable[[SockKey], tuple[str, ...]], series_limit: int = 10000,
                 bounds_s: Sequence[float] = DEFAULT_BOUNDS_S) -> None:
        self.label_fn = label_fn
        self.budgets = {spec.name: SeriesBudget(series_limit)
                        for spec in (TCP_CONNECT, TCP_CONNECT_FAILURES, TCP_RTT, TCP_RETRANSMITS)}
        self.connect = HistogramAccounting(self._admit(TCP_CONNECT), bounds_s)
        self.rtt = HistogramAccounting(self._admit(TCP_RTT), bounds_s)
        self.failures: dict[tuple[str, ...], int] = {}
        self.retransmits: dict[tuple[str, ...], int] = {}
        self._last_counts: dict[Hashable, tuple[int, ...]] = {}
        self.lock = threading.Lock()

    def _admit(self, spec: MetricSpec) -> Callable[[SockKey], tuple[str, ...]]:
        budget = self.budgets[spec.name]
        return lambda key: budget.admit(self.label_fn(key), _POD, _NS)

    def update_counts(self, entries: Iterable[tuple[SockKey, Sequence[int]]]) -> None:
        """`entries`: (key, cumulative (refused, timeout, other, retransmits)) from the tcp_counts map."""
        fail_budget, retr_budget = self.budgets[TCP_CONNECT_FAILURES.name], self.budgets[TCP_RETRANSMITS.name]
        with self.lock:
            for key, values in entries:
                values = tuple(int(v) for v in values)
                last = self._last_counts.get(key, (0,) * len(values))
                deltas = [a - b for a, b in zip(values, last, strict=True)]
                if any(d < 0 for d in deltas):  # the entry was deleted and re-created since the last read
                    deltas = list(values)
                self._last_counts[key] = values
                if not any(deltas):
                    continue
                labels = self.label_fn(key)
                for outcome, d in zip(OUTCOMES, deltas[:len(OUTCOMES)], strict=True):
                    if d:
                        lab = fail_budget.admit((*labels, outcome), _POD, _NS)
                        self.failures[lab] = self.failures.get(lab, 0) + d
                if deltas[len(OUTCOMES)]:
                    lab = retr_budget.admit(labels, _POD, _NS)
                    self.retransmits[lab] = self.retransmits.get(lab, 0) + deltas[len(OUTCOMES)]

    def forget_keys(self, map_name: str, keys: Iterable[SockKey]) -> None:
        """Forget the last values of keys evicted from one kernel map (the same key may live on in the others);
        if they come back they count from zero. Label totals are kept."""
        if map_name == "tcp_connect":
            self.connect.forget_keys(keys)
        elif map_name == "tcp_rtt":
            self.rtt.forget_keys(keys)
        else:
            with self.lock:
                for k in keys:
                    self._last_counts.pop(k, None)

    def forget_pod(self, namespace: str, pod: str) -> int:
        """Drop every series of a pod that went away; returns how many."""

        def gone(labels: tuple[str, ...]) -> bool:
            return labels[_NS] == namespace and labels[_POD] == pod

        removed = self.connect.forget_labels(gone) + self.rtt.forget_labels(gone)
        with self.lock:
            return removed + forget_pod_series((self.failures, self.retransmits), self.budgets.values(),
                                               namespace, pod, _NS, _POD)

    def families(self) -> list:
        out = [self.connect.family(TCP_CONNECT.name, TCP_CONNECT.help, TCP_CONNECT.labels)]
        with self.lock:
            failures, retransmits = sorted(self.failures.items()), sorted(self.retransmits.items())
        fam = family(TCP_CONNECT_FAILURES)
        for labels, value in failures:
            fam.add_metric(list(labels), value)
        out.append(fam)
        out.append(self.rtt.family(TCP_RTT.name, TCP_RTT.help, TCP_RTT.labels))
        fam = family(TCP_RETRANSMITS)
        for labels, value in retransmits:
            fam.add_metric(list(labels), value)
        out.append(fam)
        return out

    def folded(self) -> dict[str, int]:
        specs = (TCP_CONNECT, TCP_CONNECT_FAILURES, TCP_RTT, TCP_RETRANSMITS)
        return {exposed_name(s): self.budgets[s.name].folded for s in specs}


class TcpProbe:
    """See module docstring."""

    name = "tcp"
    hooks = (
        Hook("raw_tracepoint", "sock:inet_sock_set_state", "nw_sock_set_state"),
        Hook("raw_tracepoint", "tcp:tcp_receive_reset", "nw_tcp_receive_reset"),
        Hook("raw_tracepoint", "tcp:tcp_probe", "nw_tcp_probe"),
        Hook("raw_tracepoint", "tcp:tcp_retransmit_skb", "nw_tcp_retransmit"),
    )
    metrics = (TCP_CONNECT, TCP_CONNECT_FAILURES, TCP_RTT, TCP_RETRANSMITS)

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES, socket_entries: int = DEFAULT_SOCKET_ENTRIES,
                 rtt_interval_s: float = DEFAULT_RTT_INTERVAL_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self.socket_entries = socket_entries
        self.rtt_interval_s = rtt_interval_s
        self.clock = clock
        self._bpf = None
        self.accounting: TcpAccounting | None = None
        self.stats = self._fresh_stats()
        self._values: dict[str, dict[bytes, bytes]] = {m: {} for m in AGG_MAPS}  # last raw value per key
        self._decoded: dict[bytes, SockKey] = {}
        self._counted_sockets_at = float("-inf")
        self.hz: int | None = None

    def _fresh_stats(self) -> dict[str, MapStats]:
        stats = {m: MapStats(capacity=self.max_entries) for m in AGG_MAPS}
        stats[SOCKET_MAP] = MapStats(capacity=self.socket_entries)
        return stats

    def attach(self, ctx: ProbeContext) -> None:
        settings = ctx.settings
        if settings is not None:
            self.max_entries = getattr(settings, "tcp_map_entries", self.max_entries)
            self.socket_entries = getattr(settings, "tcp_socket_entries", self.socket_entries)
            self.rtt_interval_s = getattr(settings, "tcp_rtt_interval", self.rtt_interval_s)
        if self.max_entries < 1 or self.socket_entries < 1 or self.rtt_interval_s < 0:
            raise ValueError("tcp map sizes must be >= 1 and the RTT interval >= 0")
        self.stats = self._fresh_stats()
        self.hz = kernel_hz()
        defines: dict[str, int | str] = {
            "TCP_MAX_ENTRIES": self.max_entries,
            "TCP_SOCK_ENTRIES": self.socket_entries,
            "TCP_RTT_INTERVAL_JIFFIES": f"{interval_jiffies(self.rtt_interval_s, self.hz)}ULL",
            "TCP_RTT_MEMO": RTT_MEMO_SLOTS,
            **bpf_defines(DEFAULT_BOUNDS_S),
        }
        if "err" in tracepoint_fields(ctx.tracefs, "tcp:tcp_retransmit_skb"):
            defines["TCP_RETRANSMIT_HAS_ERR"] = 1  # 6.10+: skip retransmits that were not sent
        self._bpf = compile_program("tcp.c", ctx.btf, defines, hook_programs(self.hooks), ctx.tracefs)
        self._check_layout()
        view, resolver, host_netns = ctx.view, ctx.resolver, ctx.host_netns

        def label_fn(key: SockKey) -> tuple[str, ...]:
            return socket_labels(view, resolver, key.netns, key.local, key.remote, host_netns, client=key.client)

        self.accounting = TcpAccounting(label_fn, series_limit=getattr(settings, "max_series", 10000))

    def _check_layout(self) -> None:
        """The C structs and this module must agree (key layout, histogram width): fail at load, not at scrape."""
        nslots = len(DEFAULT_BOUNDS_S) + 1
        problems = []
        for name in AGG_MAPS:
            table = self._bpf[name]
            if ctypes.sizeof(table.Key) != KEY_LAYOUT.size:
                problems.append(f"{name} key is {ctypes.sizeof(table.Key)} bytes, expected {KEY_LAYOUT.size}")
            if name != "tcp_counts" and len(table.Leaf().slots) != nslots:
                problems.append(f"{name} has {len(table.Leaf().slots)} histogram slots, expected {nslots}")
        if len(self._bpf["tcp_counts"].Leaf().failed) != len(OUTCOMES):
            problems.append("tcp_counts.failed does not match OUTCOMES")
        if problems:
            self.detach()
            raise RuntimeError("bpf/tcp.c and netwatchd/probes/tcp.py disagree: " + "; ".join(problems))

    # -- reading the kernel maps ---------------------------------------------------------------------------

    def _key(self, raw: bytes) -> SockKey:
        key = self._decoded.get(raw)
        if key is None:
            key = self._decoded[raw] = decode_key(raw)
        return key

    def _read(self, name: str) -> tuple[list[tuple[SockKey, object]], list[bytes]]:
        """(key, value) of every entry of map `name`, and the raw keys whose value did not change."""
        seen = self._values[name]
        now: dict[bytes, bytes] = {}
        out, idle = [], []
        for k, v in self._bpf[name].items():
            raw, val = bytes(k), bytes(v)
            now[raw] = val
            if seen.get(raw) == val:
                idle.append(raw)
            out.append((self._key(raw), v))
        self._values[name] = now
        return out, idle

    def refresh(self) -> None:
        if self._bpf is None or self.accounting is None:
            return
        acc = self.accounting
        overflow = self._bpf["tcp_overflow"]
        idle_by_map = {}
        for i, name in enumerate(AGG_MAPS):
            entries, idle = self._read(name)
            if name == "tcp_counts":
                acc.update_counts((k, (*v.failed, v.retransmits)) for k, v in entries)
            else:
                hist = acc.connect if name == "tcp_connect" else acc.rtt
                hist.update((k, list(v.slots), int(v.sum_ns)) for k, v in entries)
            st = self.stats[name]
            st.entries = len(entries)
            st.overflow = int(overflow[overflow.Key(i)].value)
            if len(entries) >= EVICT_AT * self.max_entries:
                idle_by_map[name] = idle
        for name, idle in idle_by_map.items():
            self.stats[name].evictions += self.evict(name, idle)
        live = set().union(*self._values.values())
        for raw in [r for r in self._decoded if r not in live]:
            del self._decoded[raw]
        if self.clock() - self._counted_sockets_at >= SOCKET_COUNT_EVERY_S:
            self._counted_sockets_at = self.clock()
            self.stats[SOCKET_MAP].entries = len(self._bpf[SOCKET_MAP])

    def evict(self, name: str, raws: list[bytes]) -> int:
        """Delete idle entries of map `name` so it has room; the accounting keeps their totals. Returns count."""
        if self._bpf is None or not raws:
            return 0
        table = self._bpf[name]
        for raw in raws:
            with contextlib.suppress(KeyError):
                del table[table.Key.from_buffer_copy(raw)]
            self._values[name].pop(raw, None)
        if self.accounting is not None:
            self.accounting.forget_keys(name, [self._key(r) for r in raws])
        return len(raws)

    # -- probe protocol -----------------------------------------------------------------------------------

    def collect(self):
        return self.accounting.families() if self.accounting else []

    def forget_pod(self, namespace: str, pod: str) -> int:
        return self.accounting.forget_pod(namespace, pod) if self.accounting else 0

    def map_stats(self) -> dict[str, MapStats]:
        return dict(self.stats)

    def folded(self) -> dict[str, int]:
        return self.accounting.folded() if self.accounting else {}

    def detach(self) -> None:
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None

    @property
    def attached(self) -> bool:
        return self._bpf is not None
