"""Probe `drops`: packets the kernel dropped, with its own drop reason (tracepoint skb:kfree_skb).

Kernel side (`bpf/drops.c`) counts packets and bytes per (addresses, protocol, reason, netns, ifindex).
This side reads the map, decodes the raw keys, and evicts idle entries when the map fills up.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from dataclasses import dataclass

from netwatchd.classify import IPAddress
from netwatchd.kernel import dropreasons
from netwatchd.probes.base import Hook, ProbeContext
from netwatchd.probes.loader import compile_program

DEFAULT_MAX_ENTRIES = 16384
L4_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 132: "sctp"}
ETH_NAMES = {0x0806: "arp"}
CT_NATTED, CT_REPLY = 1, 2  # bpf/include/netwatch.h NW_CT_*


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
    hooks = (Hook("tracepoint", "skb:kfree_skb"),)

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES, ignore_reasons: tuple[str, ...] = ()) -> None:
        self.max_entries = max_entries
        self.ignore_reasons = ignore_reasons
        self._bpf = None
        self.reasons: dropreasons.DropReasons | None = None

    def attach(self, ctx: ProbeContext) -> None:
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
        )
        ignored = self._bpf["ignored_reasons"]
        for name in self.ignore_reasons:
            ignored[ignored.Key(self.reasons.number(name))] = ignored.Leaf(1)

    def detach(self) -> None:
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None

    @property
    def attached(self) -> bool:
        return self._bpf is not None

    def read(self) -> list[DropRecord]:
        """All entries of the kernel map, decoded."""
        if self._bpf is None:
            return []
        out = []
        for k, v in self._bpf["drops"].items():
            out.append(
                DropRecord(
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
            )
        return out

    def overflow(self) -> int:
        """Drops not counted per key because the map was full (cumulative)."""
        if self._bpf is None:
            return 0
        return int(self._bpf["drops_overflow"][0].value)

    def evict(self, keys: list[bytes]) -> None:
        """Delete entries (by raw key) so the map has room; the pipeline keeps their totals."""
        if self._bpf is None:
            return
        table = self._bpf["drops"]
        for raw in keys:
            with contextlib.suppress(KeyError):
                del table[table.Key.from_buffer_copy(raw)]
