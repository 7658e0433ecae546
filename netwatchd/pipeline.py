"""From raw kernel aggregates to labelled, cumulative Prometheus series.

The kernel map holds cumulative packet/byte counts per raw key. Each refresh turns the growth of every key
since the last read into label increments (class, direction, local pod, reason), so label totals only ever
grow — even when a map entry is evicted to make room, or a pod's identity changes between reads.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from netwatchd.classify import CONTAINER_TO_CONTAINER, HOST, INGRESS, ClusterView, classify
from netwatchd.identity.local import NODE, PodRef
from netwatchd.probes.drops import DropRecord

DROP_LABELS = ("reason", "protocol", "traffic_class", "direction", "namespace", "pod")
OVERFLOW_POD = "__overflow__"


class Resolver(Protocol):
    source: str

    def pod_for_ip(self, ip) -> PodRef: ...

    def pod_for_netns(self, netns: int) -> PodRef: ...


@dataclass
class SeriesBudget:
    """An explicit cap on label sets per metric family; past it, new pods fold into pod="__overflow__"."""

    limit: int
    seen: set[tuple[str, ...]] = field(default_factory=set)
    folded: int = 0

    def admit(self, labels: tuple[str, ...], pod_index: int, ns_index: int) -> tuple[str, ...]:
        if labels in self.seen or len(self.seen) < self.limit:
            self.seen.add(labels)
            return labels
        self.folded += 1
        folded = list(labels)
        folded[pod_index], folded[ns_index] = OVERFLOW_POD, ""
        folded_t = tuple(folded)
        self.seen.add(folded_t)  # overflow series are few: one per (reason, class, ...) combination
        return folded_t


class DropAccounting:
    """Cumulative drop counters per label set, fed from the drops probe's map."""

    def __init__(self, view: ClusterView, resolver: Resolver, reason_name, series_limit: int = 10000,
                 host_netns: int = 0) -> None:
        self.view = view
        self.resolver = resolver
        self.reason_name = reason_name
        self.host_netns = host_netns
        self.budget = SeriesBudget(series_limit)
        self.packets: dict[tuple[str, ...], int] = {}
        self.bytes: dict[tuple[str, ...], int] = {}
        self._last: dict[bytes, tuple[int, int]] = {}
        self._idle: set[bytes] = set()
        self.lock = threading.Lock()

    def labels_for(self, rec: DropRecord) -> tuple[str, ...]:
        """Attribute one record to (reason, protocol, class, direction, namespace, pod)."""
        reason = self.reason_name(rec.reason)
        if rec.src is None or rec.dst is None:
            # No IP header (ARP, or dropped before L3): the netns it died in is all we know.
            pod = self.resolver.pod_for_netns(rec.netns)
            return (reason, rec.protocol, HOST, INGRESS, pod.namespace, pod.pod)
        att = classify(self.view, rec.src, rec.dst)
        if att.traffic_class == CONTAINER_TO_CONTAINER:
            pod = self.resolver.pod_for_netns(rec.netns)
            cls = HOST if rec.netns == self.host_netns and pod == NODE else CONTAINER_TO_CONTAINER
            return (reason, rec.protocol, cls, att.direction, pod.namespace, pod.pod)
        pod = self.resolver.pod_for_ip(att.local_ip) if att.local_ip is not None else NODE
        return (reason, rec.protocol, att.traffic_class, att.direction, pod.namespace, pod.pod)

    def update(self, records: Iterable[DropRecord]) -> None:
        """Add each key's growth since the previous read to its label set's totals."""
        with self.lock:
            idle: set[bytes] = set()
            for rec in records:
                last_p, last_b = self._last.get(rec.key, (0, 0))
                dp, db = rec.packets - last_p, rec.bytes - last_b
                if dp < 0:  # the entry was deleted and re-created since the last read
                    dp, db = rec.packets, rec.bytes
                self._last[rec.key] = (rec.packets, rec.bytes)
                if dp == 0:
                    idle.add(rec.key)
                    continue
                labels = self.budget.admit(self.labels_for(rec), 5, 4)
                self.packets[labels] = self.packets.get(labels, 0) + dp
                self.bytes[labels] = self.bytes.get(labels, 0) + db
            self._idle = idle

    def idle_keys(self) -> list[bytes]:
        """Keys that did not grow since the previous read: safe to evict (their totals are kept)."""
        return list(self._idle)

    def forget(self, keys: Iterable[bytes]) -> None:
        with self.lock:
            for k in keys:
                self._last.pop(k, None)
                self._idle.discard(k)

    def snapshot(self) -> tuple[dict[tuple[str, ...], int], dict[tuple[str, ...], int]]:
        with self.lock:
            return dict(self.packets), dict(self.bytes)
