"""From raw kernel aggregates to labelled, cumulative Prometheus series.

The kernel map holds cumulative packet/byte counts per raw key. Each refresh turns the growth of every key
since the last read into label increments (class, direction, local pod, reason), so label totals only ever
grow — even when a map entry is evicted to make room, or a pod's identity changes between reads.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from netwatchd.classify import (
    CONTAINER_TO_CONTAINER,
    EGRESS,
    EXTERNAL_TO_POD,
    HOST,
    INGRESS,
    POD_TO_SERVICE,
    Attribution,
    ClusterView,
    classify,
)
from netwatchd.identity.local import NODE, PodRef
from netwatchd.probes.drops import DropRecord

_NS, _POD = 4, 5  # positions of namespace and pod in every label tuple
L4_PROTO_NUMBERS = {"tcp": 6, "udp": 17, "sctp": 132}
OVERFLOW_POD = "__overflow__"


class Resolver(Protocol):
    source: str
    unknown_pod: PodRef  # label for a local pod address the resolver cannot name (yet)

    def pod_for_ip(self, ip) -> PodRef | None: ...

    def pod_for_netns(self, netns: int) -> PodRef | None: ...

    def service_for_ip(self, ip) -> tuple[str, str] | None: ...

    def service_for_nodeport(self, port: int, proto: int | str) -> tuple[str, str] | None: ...


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


def forget_pod_series(stores, budgets, namespace: str, pod: str, ns_index: int = _NS,
                      pod_index: int = _POD) -> int:
    """Remove every label set of a gone pod from `stores` (dicts keyed by label tuples) and from the series
    `budgets` (so its slots are free again); returns how many distinct label sets went."""
    def gone(labels: tuple[str, ...]) -> bool:
        return labels[ns_index] == namespace and labels[pod_index] == pod

    removed: set[tuple[str, ...]] = set()
    for store in stores:
        for k in [k for k in store if gone(k)]:
            del store[k]
            removed.add(k)
    for budget in budgets:
        budget.seen = {k for k in budget.seen if not gone(k)}
    return len(removed)


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
        self._label_cache: dict[bytes, tuple[str, ...]] = {}
        self._cache_gen = -1
        self.lock = threading.Lock()

    def _local_pod(self, ip) -> PodRef:
        pod = self.resolver.pod_for_ip(ip)
        return pod if pod is not None and pod != NODE else self.resolver.unknown_pod

    def _service(self, rec: DropRecord) -> tuple[tuple[str, str] | None, object]:
        """The service a packet was addressed to, and that address: conntrack's pre-DNAT destination if
        NAT rewrote it (kube-proxy), else the packet's own destination (a VIP before DNAT)."""
        target = rec.orig_dst if rec.orig_dst is not None else (rec.src if rec.ct_reply else rec.dst)
        svc = self.resolver.service_for_ip(target)
        if svc is None and rec.orig_dst is None and rec.src is not None:
            # A reply already un-DNATed (source = the VIP) carries no NAT mark any more: the VIP names it.
            svc = self.resolver.service_for_ip(rec.src)
        if svc is None and rec.orig_dst is not None and rec.orig_dport and self.view.is_node(rec.orig_dst):
            svc = self.resolver.service_for_nodeport(rec.orig_dport, L4_PROTO_NUMBERS.get(rec.protocol, 0))
        return svc, target

    def attribute(self, rec: DropRecord) -> tuple[Attribution, tuple[str, str] | None]:
        """Class, direction and local endpoint of an IP record, seen through conntrack's NAT if any."""
        src, dst = rec.src, rec.dst
        svc, target = self._service(rec)
        if rec.orig_dst is not None:
            # Classify the flow as the client addressed it: client -> VIP (replies: VIP -> client).
            src, dst = (rec.orig_dst, rec.dst) if rec.ct_reply else (rec.src, rec.orig_dst)
        att = classify(self.view, src, dst)
        client = rec.dst if rec.ct_reply else rec.src
        if att.local_ip is None and rec.orig_dst is not None and att.traffic_class != CONTAINER_TO_CONTAINER:
            # No local pod in the flow as the client addressed it, but NAT sent it to a local backend pod
            # (external -> node port -> pod; node -> ClusterIP -> pod): the event belongs to that pod, headed
            # to it (ingress) or, for its replies, sent by it (egress); the class says who the client is.
            backend = rec.src if rec.ct_reply else rec.dst
            if self.view.is_local_pod(backend):
                att = classify(self.view, client, backend)
                att = Attribution(att.traffic_class, EGRESS if rec.ct_reply else INGRESS, backend)
        if svc is not None and att.traffic_class not in (POD_TO_SERVICE, CONTAINER_TO_CONTAINER):
            # A node port (or an externalIP) is a service even though its address is a node's. The node's own
            # traffic to a service stays `host`; an external client's stays `external_to_pod`, also when it
            # is counted for the local backend pod.
            if self.view.is_node(client):
                pass
            elif att.local_ip is None or (att.local_ip != client and att.traffic_class == EXTERNAL_TO_POD):
                att = Attribution(EXTERNAL_TO_POD, att.direction, att.local_ip)
            else:
                att = Attribution(POD_TO_SERVICE, att.direction, att.local_ip)
        if att.traffic_class not in (POD_TO_SERVICE, EXTERNAL_TO_POD):
            svc = None
        return att, svc

    def labels_for(self, rec: DropRecord) -> tuple[str, ...]:
        """Attribute one record to (reason, protocol, class, direction, namespace, pod, service ns, service)."""
        reason = self.reason_name(rec.reason)
        if rec.src is None or rec.dst is None:
            # No IP header (ARP, or dropped before L3): the netns it died in is all we know.
            pod = self.resolver.pod_for_netns(rec.netns) or NODE
            return (reason, rec.protocol, HOST, INGRESS, pod.namespace, pod.pod, "", "")
        att, svc = self.attribute(rec)
        if att.traffic_class == CONTAINER_TO_CONTAINER:
            pod = self.resolver.pod_for_netns(rec.netns) or NODE
            cls = HOST if rec.netns == self.host_netns and pod == NODE else CONTAINER_TO_CONTAINER
            return (reason, rec.protocol, cls, att.direction, pod.namespace, pod.pod, "", "")
        pod = self._local_pod(att.local_ip) if att.local_ip is not None else NODE
        svc_ns, svc_name = svc or ("", "")
        return (reason, rec.protocol, att.traffic_class, att.direction, pod.namespace, pod.pod, svc_ns, svc_name)

    def seen_packets(self, key: bytes) -> int | None:
        """Packets of `key` at the previous read (None: never seen)."""
        last = self._last.get(key)
        return last[0] if last else None

    def update(self, records: Iterable[DropRecord], idle: Iterable[bytes] = ()) -> None:
        """Add each key's growth since the previous read to its label set's totals. `idle`: keys the caller
        already found unchanged (not decoded)."""
        self.update_raw(((r.key, r.packets, r.bytes, (lambda r=r: r)) for r in records), idle)

    def update_raw(self, entries: Iterable[tuple[bytes, int, int, Callable[[], DropRecord]]],
                   idle: Iterable[bytes] = ()) -> None:
        """Like update(), from (raw key, packets, bytes, decode) where decode() is only called when the key's
        labels are not cached: labels depend only on the raw key and the identity generation."""
        with self.lock:
            idle = set(idle)
            gen = getattr(self.view, "generation", 0)
            if gen != self._cache_gen:
                self._label_cache.clear()
                self._cache_gen = gen
            for raw, packets, nbytes, decode in entries:
                last_p, last_b = self._last.get(raw, (0, 0))
                dp, db = packets - last_p, nbytes - last_b
                if dp < 0:  # the entry was deleted and re-created since the last read
                    dp, db = packets, nbytes
                self._last[raw] = (packets, nbytes)
                if dp == 0:
                    idle.add(raw)
                    continue
                labels = self._label_cache.get(raw)
                if labels is None:
                    labels = self.budget.admit(self.labels_for(decode()), _POD, _NS)
                    self._label_cache[raw] = labels
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
                self._label_cache.pop(k, None)

    def forget_pod(self, namespace: str, pod: str) -> int:
        """Drop every series of a pod that went away (after the grace period); returns how many."""
        with self.lock:
            removed = forget_pod_series((self.packets, self.bytes), (self.budget,), namespace, pod)
            # cached label sets of keys that still point at the gone pod must be recomputed
            self._label_cache = {raw: lab for raw, lab in self._label_cache.items()
                                 if not (lab[_NS] == namespace and lab[_POD] == pod)}
            return removed

    def series(self) -> int:
        with self.lock:
            return len(self.packets)

    def snapshot(self) -> tuple[dict[tuple[str, ...], int], dict[tuple[str, ...], int]]:
        with self.lock:
            return dict(self.packets), dict(self.bytes)


SOCKET_LABELS = ("traffic_class", "direction", "namespace", "pod", "service_namespace", "service")


def socket_labels(view: ClusterView, resolver: Resolver, netns: int, local, remote, host_netns: int,
                  client: bool = True) -> tuple[str, str, str, str, str, str]:
    """Labels of a socket event (traffic_class, direction, namespace, pod, service_namespace, service).

    A socket belongs to the pod whose network namespace owns it (BRIEF's rule), whatever its addresses;
    sockets keep the service VIP as their peer even after DNAT, so the service comes from the peer address.
    `client`: the local side opened the connection (egress) rather than accepted it (ingress).
    """
    direction = EGRESS if client else INGRESS
    pod = resolver.pod_for_netns(netns) if netns else None
    if pod is None or pod == NODE:
        by_ip = resolver.pod_for_ip(local)
        pod = by_ip if by_ip is not None and by_ip != NODE else NODE
    svc = resolver.service_for_ip(remote)
    if local == remote or local.is_loopback or remote.is_loopback:
        cls = HOST if pod == NODE and netns in (0, host_netns) else CONTAINER_TO_CONTAINER
    elif svc is not None or view.is_service(remote):
        # a socket is never external: one that no pod owns is the node's (or a hostNetwork pod's)
        cls = POD_TO_SERVICE if pod != NODE or view.is_local_pod(local) else HOST
    else:
        src, dst = (local, remote) if client else (remote, local)
        att = classify(view, src, dst)
        cls = att.traffic_class
        if pod == NODE and att.local_ip is not None:
            pod = resolver.unknown_pod  # a local pod address, not named (yet)
    if cls not in (POD_TO_SERVICE, EXTERNAL_TO_POD):
        svc = None
    svc_ns, svc_name = svc or ("", "")
    return (cls, direction, pod.namespace, pod.pod, svc_ns, svc_name)
