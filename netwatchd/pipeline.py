"""From raw kernel aggregates to labelled, cumulative Prometheus series.

The kernel map holds cumulative packet/byte counts per raw key. Each refresh turns the growth of every key
since the last read into label increments (class, direction, local pod, reason), so label totals only ever
grow — even when a map entry is evicted to make room, or a pod's identity changes between reads.
"""

from __future__ import annotations

import threading
import time
from array import array
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
from netwatchd.keytotals import KeyTotals, key_slices
from netwatchd.probes.drops import DropRecord

_NS, _POD = 4, 5  # positions of namespace and pod in every label tuple
L4_PROTO_NUMBERS = {"tcp": 6, "udp": 17, "sctp": 132}
OVERFLOW_POD = "__overflow__"
DECODE_BUDGET_S = 0.01  # labelling new keys per read or catch-up step: a scrape never waits much longer for them


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
        self._totals = KeyTotals(self.packets, self.bytes)
        self._label_cache: dict[bytes, tuple[str, ...]] = {}
        self._cache_gen = -1
        self._pending: list[bytes] = []  # new keys not labelled yet (over the decode budget)
        self._decode: Callable[[bytes], DropRecord] | None = None
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

    # -- reading the whole map ------------------------------------------------------------------------

    def _check_generation(self) -> None:
        gen = getattr(self.view, "generation", 0)
        if gen != self._cache_gen:  # identity changed: every cached label may be wrong now
            self._label_cache.clear()
            self._cache_gen = gen
            self._totals.relabel()

    def _label(self, raw: bytes, decode: Callable[[bytes], DropRecord]) -> tuple[str, ...]:
        labels = self.budget.admit(self.labels_for(decode(raw)), _POD, _NS)
        self._label_cache[raw] = labels
        return labels

    def update_table(self, keys: bytes, values: bytes, key_size: int, decode: Callable[[bytes], DropRecord],
                     budget_s: float | None = DECODE_BUDGET_S) -> int:
        """Fold one whole read of the map into the totals: `keys`/`values` are the concatenated raw keys and
        values (packets, bytes: two u64 each) as the batched lookup returns them; decode(raw key) gives the
        record of a key whose labels are not cached (labels depend only on the raw key and the identity
        generation). Returns how many new keys wait to be labelled.

        Labelling a key never seen costs ~30 us (classification); at most `budget_s` of that is spent per read
        (None: no limit). A key over the budget is not counted yet and its last value stays where it was, so
        `catch_up()` and the next read count all of its growth: totals may lag for a moment, nothing is lost.
        The arithmetic itself is done per label set at C speed (netwatchd.keytotals).
        """
        with self.lock:
            self._check_generation()
            self._decode = decode
            if self._totals.same_keys(keys):
                self._totals.advance(values)
                return 0
            key_list = key_slices(keys, key_size)
            labels = list(map(self._label_cache.get, key_list))
            deadline = None if budget_s is None else time.perf_counter() + budget_s
            pending = []
            for i in [i for i, lab in enumerate(labels) if lab is None]:
                if deadline is not None and time.perf_counter() > deadline:
                    pending.append(key_list[i])
                else:
                    labels[i] = self._label(key_list[i], decode)
            self._pending = pending
            self._totals.read(keys, values, key_size, key_list, labels)
            return len(pending)

    def catch_up(self, budget_s: float = DECODE_BUDGET_S) -> int:
        """Label keys left over by update_table's budget (they are counted at the next read). Returns how many
        are still waiting."""
        with self.lock:
            self._check_generation()
            deadline = time.perf_counter() + budget_s
            done = 0
            for raw in self._pending:
                if raw not in self._label_cache and self._decode is not None:
                    self._label(raw, self._decode)
                done += 1
                if time.perf_counter() > deadline:
                    break
            del self._pending[:done]
            return len(self._pending)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def update(self, records: Iterable[DropRecord]) -> None:
        """update_table() from decoded records (all keys of one read; keys of equal length), no budget."""
        records = list(records)
        if not records:
            self.update_table(b"", b"", 1, lambda raw: None, None)  # type: ignore[arg-type, return-value]
            return
        size = len(records[0].key)
        if any(len(r.key) != size for r in records):
            raise ValueError("all keys of one read have the same size")
        by_key = {r.key: r for r in records}
        values = array("Q", [x for r in records for x in (r.packets, r.bytes)]).tobytes()
        self.update_table(b"".join(r.key for r in records), values, size, by_key.__getitem__, None)

    def idle_keys(self) -> list[bytes]:
        """Keys that did not grow since the previous read: safe to evict (their totals are kept)."""
        with self.lock:
            return self._totals.idle_keys()

    def forget(self, keys: Iterable[bytes]) -> None:
        """Keys evicted from the map: if they come back they count from zero."""
        with self.lock:
            keys = set(keys)
            self._totals.forget(keys)
            self._pending = [k for k in self._pending if k not in keys]
            for k in keys:
                self._label_cache.pop(k, None)

    def forget_pod(self, namespace: str, pod: str) -> int:
        """Drop every series of a pod that went away (after the grace period); returns how many."""
        with self.lock:
            removed = forget_pod_series((self.packets, self.bytes), (self.budget,), namespace, pod)
            # cached label sets of keys that still point at the gone pod must be recomputed
            self._label_cache = {raw: lab for raw, lab in self._label_cache.items()
                                 if not (lab[_NS] == namespace and lab[_POD] == pod)}
            self._totals.relabel()
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
