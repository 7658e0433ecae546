"""Probe `drops`: packets the kernel dropped, with its own drop reason (tracepoint skb:kfree_skb).

Kernel side (`bpf/drops.c`) counts packets and bytes per (addresses, protocol, reason, netns, ifindex).
This side reads the map, decodes the raw keys, and evicts idle entries when the map fills up.
"""

from __future__ import annotations

import collections
import ctypes
import ipaddress
import socket
import threading
import time
from dataclasses import dataclass

from netwatchd.classify import IPAddress
from netwatchd.export.metrics import MetricSpec, exposed_name, family
from netwatchd.kernel import dropreasons, ksyms
from netwatchd.probes.base import Hook, MapStats, ProbeContext
from netwatchd.probes.loader import compile_program, hook_programs

DEFAULT_MAX_ENTRIES = 16384
L4_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 132: "sctp"}
ETH_NAMES = {0x0806: "arp"}
CT_NATTED, CT_REPLY = 1, 2  # bpf/include/netwatch.h NW_CT_*
EVICT_AT = 0.75  # evict idle entries once the map is this full
TAIL_IDLE_S = 15.0  # stop emitting individual drops this long after the last follower asked
TAIL_KEEP = 2000  # individual drops kept in user space for followers
DROP_LABELS = ("reason", "protocol", "traffic_class", "direction", "namespace", "pod", "service_namespace",
               "service")
DROPS = MetricSpec("netwatch_drops", "counter",
                   "Packets dropped by the kernel, by kernel drop reason and traffic class of the local side.",
                   DROP_LABELS)
DROPPED_BYTES = MetricSpec("netwatch_dropped_bytes", "counter",
                           "Bytes of the packets counted in netwatch_drops_total.", DROP_LABELS)


@dataclass(frozen=True)
class DropRecord:
    """One kernel map entry, decoded: cumulative packets/bytes for this key since it was created."""

    key: bytes  # raw key, identity of the entry across reads
    src: IPAddress | None
    dst: IPAddress | None
    protocol: str
    reason: int
    netns: int
    ifindex: int
    packets: int
    bytes: int
    # conntrack's original destination when NAT rewrote it (a service VIP or node port), else None
    orig_dst: IPAddress | None = None
    orig_dport: int = 0
    ct_reply: bool = False


@dataclass(frozen=True)
class _Counts:
    """A drop_val decoded from raw bytes (what `decode` reads from a value)."""

    packets: int
    bytes: int


def decode_addr(raw: bytes, family: int) -> IPAddress | None:
    """The kernel stores v4 in the first 4 of 16 bytes, v6 in all 16; family 0 means no IP header."""
    if family == 4:
        return ipaddress.IPv4Address(bytes(raw[:4]))
    if family == 6:
        return ipaddress.IPv6Address(bytes(raw[:16]))
    return None


def protocol_name(family: int, l4proto: int, eth_proto: int) -> str:
    """Bounded `protocol` label: the L4 protocol for IP, else the ethertype's name or `other`."""
    if family in (4, 6):
        return L4_NAMES.get(l4proto, "other")
    return ETH_NAMES.get(eth_proto, "other")


class DropsProbe:
    """See module docstring."""

    name = "drops"
    hooks = (Hook("raw_tracepoint", "skb:kfree_skb", "nw_kfree_skb"),)
    metrics = (DROPS, DROPPED_BYTES)

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES, ignore_reasons: tuple[str, ...] = ()) -> None:
        self.max_entries = max_entries
        self.ignore_reasons = ignore_reasons
        self._bpf = None
        self.reasons: dropreasons.DropReasons | None = None
        self.accounting = None  # pipeline.DropAccounting, created on attach
        self.stats = MapStats(capacity=max_entries)

    def attach(self, ctx: ProbeContext) -> None:
        from netwatchd.pipeline import DropAccounting

        settings = ctx.settings
        if settings is not None:
            self.max_entries = settings.drops_map_entries
            self.ignore_reasons = tuple(r.strip() for r in settings.ignore_drop_reasons.split(",") if r.strip())
        self.stats = MapStats(capacity=self.max_entries)
        self.reasons = dropreasons.load(ctx.tracefs, ctx.btf)
        try:
            consumed = ctx.btf.enum_values("skb_drop_reason").get("SKB_CONSUMED", -1)
        except Exception:  # noqa: BLE001 - an old kernel without the enum has no SKB_CONSUMED either
            consumed = -1
        unknown = [r for r in self.ignore_reasons if self.reasons.number(r) is None]
        if unknown:
            raise ValueError(f"unknown drop reason(s) {', '.join(unknown)} on this kernel "
                             f"(known: {', '.join(sorted(self.reasons.values()))})")
        max_reasons = max(self.reasons) + 1
        self._bpf = compile_program(
            "drops.c", ctx.btf,
            {"DROPS_MAX_ENTRIES": self.max_entries, "REASON_CONSUMED": consumed, "MAX_REASONS": max_reasons},
            hook_programs(self.hooks), ctx.tracefs, attach=False,
        )
        self._check_value_layout()
        ignored = self._bpf["ignored_reasons"]
        for name in self.ignore_reasons:
            ignored[ignored.Key(self.reasons.number(name))] = ignored.Leaf(1)
        self._bpf.attach(ctx.tracefs)  # the filters are in place first
        self.accounting = DropAccounting(ctx.view, ctx.resolver, self.reasons.name,
                                         series_limit=getattr(settings, "max_series", 10000),
                                         host_netns=ctx.host_netns)
        self.tail = DropTail(self._bpf, self.accounting)

    def refresh(self) -> None:
        if self._bpf is None or self.accounting is None:
            return
        if self.tail is not None:
            self.tail.expire()
        # The accounting works on the raw batch buffers (no object per entry) and labels new keys within a time
        # budget, so a read of 10k keys stays short (pipeline.DropAccounting.update_table).
        keys, values, n = self._items_raw()
        self.accounting.update_table(keys, values, self._bpf["drops"].key_size, self.decode_key)
        self.stats.entries = n
        self.stats.overflow = self.overflow()
        if n >= EVICT_AT * self.max_entries:
            idle = self.accounting.idle_keys()
            self.evict(idle)
            self.accounting.forget(idle)
            self.stats.evictions += len(idle)

    def collect(self):
        packets, nbytes = self.accounting.snapshot() if self.accounting else ({}, {})
        drops, dbytes = family(DROPS), family(DROPPED_BYTES)
        for labels, value in sorted(packets.items()):
            drops.add_metric(list(labels), value)
            dbytes.add_metric(list(labels), nbytes.get(labels, 0))
        return [drops, dbytes]

    def forget_pod(self, namespace: str, pod: str) -> int:
        return self.accounting.forget_pod(namespace, pod) if self.accounting else 0

    def map_stats(self) -> dict[str, MapStats]:
        return {"drops": self.stats}

    def folded(self) -> dict[str, int]:
        return {exposed_name(DROPS): self.accounting.budget.folded} if self.accounting else {}

    def detach(self) -> None:
        if getattr(self, "tail", None) is not None:
            self.tail.close()
            self.tail = None
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None

    @property
    def attached(self) -> bool:
        return self._bpf is not None

    def _check_value_layout(self) -> None:
        """refresh() reads values as two u64 (packets, bytes): fail at load if bpf/drops.c says otherwise."""
        leaf = self._bpf["drops"].Leaf
        if ctypes.sizeof(leaf) != 16 or (leaf.packets.offset, leaf.bytes.offset) != (0, 8):
            self.detach()
            raise RuntimeError("bpf/drops.c struct drop_val is not {u64 packets; u64 bytes;} as drops.py reads it")

    def _items_raw(self) -> tuple[bytes, bytes, int]:
        """Every map entry as (concatenated raw keys, concatenated raw values, count): batched lookups in chunks
        where the kernel has them (kernel.maps), key by key otherwise."""
        return self._bpf["drops"].items_raw()

    def decode_key(self, raw: bytes) -> DropRecord:
        """The record of a raw key (counts 0: labels depend on the key only)."""
        return self.decode(self._bpf["drops"].Key.from_buffer_copy(raw), _Counts(0, 0))

    @property
    def pending(self) -> int:
        """New keys whose labels are not computed yet (they are counted once they are)."""
        return self.accounting.pending if self.accounting is not None else 0

    def catch_up(self) -> None:
        if self.accounting is not None:
            self.accounting.catch_up()

    @staticmethod
    def decode(k, v) -> DropRecord:
        return DropRecord(
            key=bytes(k),
            src=decode_addr(bytes(k.saddr), k.family),
            dst=decode_addr(bytes(k.daddr), k.family),
            protocol=protocol_name(k.family, k.l4proto, k.eth_proto),
            reason=k.reason,
            netns=k.netns,
            ifindex=k.ifindex,
            packets=v.packets,
            bytes=v.bytes,
            orig_dst=decode_addr(bytes(k.ct_daddr), k.family) if k.ct_flags & CT_NATTED else None,
            orig_dport=socket.ntohs(k.ct_dport),
            ct_reply=bool(k.ct_flags & CT_REPLY),
        )

    def read(self) -> list[DropRecord]:
        """All entries of the kernel map, decoded."""
        if self._bpf is None:
            return []
        return [self.decode(k, v) for k, v in self._bpf["drops"].items()]

    def overflow(self) -> int:
        """Drops not counted per key because the map was full (cumulative)."""
        if self._bpf is None:
            return 0
        return int(self._bpf["drops_overflow"][0].value)

    def evict(self, keys: list[bytes]) -> None:
        """Delete entries (by raw key) so the map has room; the pipeline keeps their totals."""
        if self._bpf is None:
            return
        self._bpf["drops"].delete_many(keys)  # batched: evicting thousands of keys is one syscall or a few


class DropTail:
    """Individual drops for `netwatchctl drops --follow`, rate-limited in the kernel (see bpf/drops.c).

    The kernel emits nothing until someone follows; `follow()` turns it on (at most `rate` events per second
    for the node) and `expire()` turns it off TAIL_IDLE_S after the last follower asked.
    """

    def __init__(self, bpf, accounting) -> None:
        self._bpf = bpf
        self.accounting = accounting
        self.events: collections.deque[dict] = collections.deque(maxlen=TAIL_KEEP)
        self.seq = 0
        self.last_follow = 0.0
        self.enabled = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ring = bpf["drop_tail"]
        self._ring.open_ring_buffer(self._on_event)
        self._thread = threading.Thread(target=self._poll, name="netwatchd-drop-tail", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._bpf.ring_buffer_poll(200)

    def _on_event(self, _ctx, data, _size) -> None:
        ev = self._ring.event(data)
        rec = DropRecord(key=b"", src=decode_addr(bytes(ev.saddr), ev.family),
                         dst=decode_addr(bytes(ev.daddr), ev.family),
                         protocol=protocol_name(ev.family, ev.l4proto, ev.eth_proto), reason=ev.reason,
                         netns=ev.netns, ifindex=ev.ifindex, packets=1, bytes=0,
                         orig_dst=decode_addr(bytes(ev.ct_daddr), ev.family) if ev.ct_flags & CT_NATTED else None,
                         orig_dport=socket.ntohs(ev.ct_dport), ct_reply=bool(ev.ct_flags & CT_REPLY))
        labels = dict(zip(DROP_LABELS, self.accounting.labels_for(rec), strict=True))
        doc = {
            **labels,
            # the kernel address for now: follow() names the call sites of what it returns (kernel.ksyms)
            "time": time.time(), "ktime_ns": ev.ts_ns, "location": int(ev.location),
            "src": str(rec.src) if rec.src else "", "dst": str(rec.dst) if rec.dst else "",
            "sport": socket.ntohs(ev.sport), "dport": socket.ntohs(ev.dport),
            "service_vip": str(rec.orig_dst) if rec.orig_dst else "",
            "netns": ev.netns, "ifindex": ev.ifindex,
        }
        with self._lock:
            self.seq += 1
            doc["seq"] = self.seq
            self.events.append(doc)

    def _set(self, enabled: bool, rate: int) -> None:
        table = self._bpf["tail_state"]
        st = table[0]
        st.enabled, st.rate = int(enabled), rate
        table[0] = st
        self.enabled = enabled

    def follow(self, since: int, rate: int) -> dict:
        """Turn the tail on (or keep it on) and return the drops after sequence number `since`."""
        self.last_follow = time.monotonic()
        if not self.enabled or self._bpf["tail_state"][0].rate != rate:
            self._set(True, rate)
        with self._lock:
            events = [e for e in self.events if e["seq"] > since]
            seq = self.seq
        addrs = {e["location"] for e in events if isinstance(e["location"], int)}
        if addrs:
            names = ksyms.resolve(addrs)
            for e in events:
                if isinstance(e["location"], int):
                    e["location"] = names[e["location"]]
        return {"seq": seq, "rate_limit": rate, "suppressed": int(self._bpf["tail_state"][0].suppressed),
                "events": events}

    def expire(self) -> None:
        if self.enabled and time.monotonic() - self.last_follow > TAIL_IDLE_S:
            self._set(False, 0)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
