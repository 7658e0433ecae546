"""Pods -> network namespaces and host veths, re-scanned only where something may have changed.

:func:`netwatchd.identity.netns.map_pods_to_netns` answers from scratch: it enters every pod netns and
lists every link (about 30 ms of CPU per refresh on a full node of 110 pods; 400 ms when each netns read
used pyroute2). The answer rarely changes, so :class:`NetnsCache` keeps each pod's mapping with what it
was found from, checks it cheaply on every refresh, and enters a netns only when one of these says the
answer may have changed:

- the pod is new, or its UID or its IPs changed (the kubelet's list);
- its netns is gone: a ``stat`` of the path it was found at no longer gives the same nsfs inode;
- a link changed in our netns (rtnetlink ``RTMGRP_LINK``, drained without blocking at each refresh): the
  veths are listed again (one dump, no netns entered) and a pod keeps its mapping only if the same host
  veth is still the one leading to its netns;
- the pod is unmapped (its IP was in no netns): looked for again after 10 s, then 20 s, 40 s... up to
  5 min; a link change looks for it at once, but only in the newly veth-connected namespaces (reading
  every netns of the node is the expensive part, and the wide search waits for the backoff);
- every ``full_every`` seconds (5 min) everything is scanned from scratch, as a safety net for what none
  of the above sees (an address moved between namespaces without a kubelet or link change).

A re-scan enters only namespaces that hold no validly mapped pod, so one new pod costs one netns entry.
Sockets (one rtnetlink socket for queries, one subscribed to link changes) are bound to the netns of the
thread that first calls :meth:`NetnsCache.map`; called from a thread in another netns, the cache starts
over there.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog

from netwatchd.classify import IPAddress
from netwatchd.identity.netns import (
    RUN_DIRS,
    THREAD_NETNS,
    UNMAPPED,
    PodKey,
    PodNetns,
    VethInfo,
    current_netns_inode,
    list_netns,
    log_unmapped,
    nsid_via,
    owned_ips,
    peer_nsids,
    pick_veth,
    read_addresses,
    scan_for_ips,
    veths_of,
)
from netwatchd.identity.rtnl import Rtnl

if TYPE_CHECKING:
    from netwatchd.identity.kubelet import LocalPod

log = structlog.get_logger("netwatchd.identity")

FULL_RESCAN_S = 300.0
RETRY_FIRST_S = 10.0
RETRY_MAX_S = 300.0
Fingerprint = tuple[str, tuple[IPAddress, ...]]  # (pod UID, the IPs it is looked up by)
RTMGRP_LINK = 0x1
NETLINK_ROUTE = 0
_MAX_DRAIN = 10_000  # bound on messages read per refresh (a link flapping forever must not hold us here)


class LinkEvents:
    """Whether any link of the creating thread's netns changed since the last :meth:`changed` call."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                                   NETLINK_ROUTE)
        self._sock.bind((0, RTMGRP_LINK))

    def changed(self) -> bool:
        """Drain the queued notifications; True if there was any (or some were lost: ENOBUFS)."""
        seen = False
        for _ in range(_MAX_DRAIN):
            try:
                if not self._sock.recv(1 << 16):
                    return seen
            except BlockingIOError:
                return seen
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    return True  # unexpected: assume the worst, a re-check is cheap
            seen = True
        return True

    def close(self) -> None:
        self._sock.close()


@dataclass(frozen=True)
class _Entry:
    """A pod's cached mapping and what it was found from."""

    fingerprint: Fingerprint  # a change means a new answer is needed
    mapped: PodNetns
    nsid: int | None = None  # our nsid for its netns, to re-pick the host veth after link changes
    peer_ifindex: int = 0  # the interface holding its IP inside its netns
    retry_at: float = 0.0  # unmapped pods: when to search widely again
    backoff: float = 0.0


@dataclass
class ScanStats:
    """What the last :meth:`NetnsCache.map` call did (tests, debugging)."""

    full: bool = False
    links_changed: bool = False
    scanned: tuple[PodKey, ...] = ()  # pods looked up in namespaces (not answered from the cache)
    entered: list[str] = field(default_factory=list)  # netns paths entered to read addresses


class NetnsCache:
    """:func:`map_pods_to_netns` with memory (see module docstring). Thread-safe; one instance per resolver.

    ``read`` enters a netns and returns {address: ifindex} (tests wrap it to count entries);
    ``clock`` drives the full re-scan and the retry backoff.
    """

    def __init__(self, full_every: float = FULL_RESCAN_S, clock: Callable[[], float] = time.monotonic,
                 read: Callable[[str], dict[IPAddress, int]] = read_addresses,
                 proc: str = "/proc", run_dirs: Iterable[str] = RUN_DIRS) -> None:
        self.full_every = full_every
        self.clock = clock
        self.proc, self.run_dirs = proc, tuple(run_dirs)
        self._read = read
        self._lock = threading.Lock()
        self._home = 0  # inode of the netns our sockets live in (0: none yet)
        self._home_path = ""
        self._nsfs_dev = 0
        self._rt: Rtnl | None = None  # long-lived: nsid queries and veth dumps in our netns
        self._links: LinkEvents | None = None
        self._veths: list[VethInfo] = []
        self._entries: dict[PodKey, _Entry] = {}
        self._full_at = 0.0
        self.last = ScanStats()

    # -- public -------------------------------------------------------------------------------------------

    def map(self, pods: Iterable[LocalPod]) -> dict[PodKey, PodNetns]:
        """{(namespace, name): PodNetns} for ``pods``, as :func:`map_pods_to_netns` would answer."""
        pods = list(pods)
        with self._lock:
            try:
                result = self._map(pods)
            except OSError as e:  # rtnetlink failed (e.g. a dump kept being interrupted by churn)
                log.warning("netns_scan_failed", error=str(e), fallback="last known mappings; full scan next")
                result = {(p.namespace, p.name): self._last_known(p) for p in pods}
                self._full_at = 0.0
        log_unmapped(pods, result)
        return result

    def _map(self, pods: list[LocalPod]) -> dict[PodKey, PodNetns]:
        self._bind()
        now = self.clock()
        stats = self.last = ScanStats(full=now >= self._full_at)
        self._check_links(stats)
        if stats.full:
            self._entries = {}
            self._full_at = now + self.full_every
        prints = _fingerprints(pods)
        result, todo = self._reuse(prints, now, stats.links_changed)
        if todo or stats.full:
            namespaces = list_netns(self.proc, self.run_dirs)
            self._home_path = namespaces.get(self._home, "")
            if todo:
                result.update(self._scan(todo, prints, namespaces, result, now, stats))
        for p in pods:
            if p.host_network:
                result[(p.namespace, p.name)] = PodNetns(self._home, self._home_path)
        self._entries = {k: e for k, e in self._entries.items() if k in prints}  # forget pods gone
        return result

    def _last_known(self, pod: LocalPod) -> PodNetns:
        if pod.host_network:
            return PodNetns(self._home, self._home_path)
        e = self._entries.get((pod.namespace, pod.name))
        return e.mapped if e is not None else UNMAPPED

    def close(self) -> None:
        with self._lock:
            self._unbind()

    # -- sockets ------------------------------------------------------------------------------------------

    def _bind(self) -> None:
        """Sockets in the calling thread's netns; everything cached elsewhere is dropped."""
        home = current_netns_inode()
        if home == self._home:
            return
        self._unbind()
        self._links = LinkEvents()  # subscribed before the first dump: no change falls in between
        self._rt = Rtnl()
        self._home, self._full_at = home, 0.0
        self._nsfs_dev = os.stat(THREAD_NETNS).st_dev  # every namespace file lives on the one nsfs device

    def _unbind(self) -> None:
        if self._links is not None:
            self._links.close()
        if self._rt is not None:
            self._rt.close()
        self._links, self._rt, self._home, self._entries, self._veths = None, None, 0, {}, []

    def _check_links(self, stats: ScanStats) -> None:
        """Re-list our veths after a link change (or for a full scan), and drop mappings it invalidated."""
        assert self._links is not None
        stats.links_changed = self._links.changed()
        if not (stats.links_changed or stats.full):
            return
        self._veths = list(veths_of(self._rt).values())
        if not stats.full:
            self._entries = {k: e for k, e in self._entries.items() if self._same_veth(e)}

    def _same_veth(self, e: _Entry) -> bool:
        """Whether a cached mapping still has the host veth it had (or still none), with the new veth list."""
        if not e.mapped.inode:
            return True  # unmapped: nothing to keep apart; _reuse decides when to look again
        nsid = e.nsid if e.nsid is not None else nsid_via(self._rt, e.mapped.path)  # a new veth assigns one
        veth = pick_veth(self._veths, nsid, e.peer_ifindex)
        return (veth.ifindex if veth else 0) == e.mapped.host_veth_ifindex and (
            veth.name if veth else "") == e.mapped.host_veth_name

    # -- the cache ----------------------------------------------------------------------------------------

    def _reuse(self, prints: dict[PodKey, Fingerprint], now: float, links_changed: bool
               ) -> tuple[dict[PodKey, PodNetns], dict[PodKey, bool]]:
        """Answers still valid from the cache, and the pods to look up: {pod: may search every netns}."""
        result: dict[PodKey, PodNetns] = {}
        todo: dict[PodKey, bool] = {}
        for key, fingerprint in prints.items():
            result[key] = UNMAPPED
            if not fingerprint[1]:
                continue  # no IP yet (or all taken by another pod): nothing to look for
            e = self._entries.get(key)
            if e is None or e.fingerprint != fingerprint:
                todo[key] = True
            elif e.mapped.inode:
                if self._alive(e.mapped):
                    result[key] = e.mapped
                else:
                    todo[key] = True  # netns gone (or replaced): look again
            elif now >= e.retry_at:
                todo[key] = True
            elif links_changed:
                todo[key] = False  # a new veth may be its own: look in newly connected namespaces only
        return result, todo

    def _alive(self, pn: PodNetns) -> bool:
        """Whether ``pn.path`` still is the netns it was found as (same nsfs inode)."""
        try:
            st = os.stat(pn.path)
        except OSError:
            return False
        return st.st_ino == pn.inode and st.st_dev == self._nsfs_dev

    def _scan(self, todo: dict[PodKey, bool], prints: dict[PodKey, Fingerprint],
              namespaces: dict[int, str], answered: dict[PodKey, PodNetns], now: float,
              stats: ScanStats) -> dict[PodKey, PodNetns]:
        """Look the ``todo`` pods up in the namespaces no validly mapped pod holds; update their entries."""
        claimed = {pn.inode for key, pn in answered.items() if key not in todo and pn.inode}
        candidates = {ino: path for ino, path in namespaces.items() if ino != self._home and ino not in claimed}
        wanted = {ip: key for key in todo for ip in prints[key][1]}

        def read(path: str) -> dict[IPAddress, int]:
            stats.entered.append(path)
            return self._read(path)

        hits = scan_for_ips(self._rt, candidates, wanted, peer_nsids(self._veths),
                            wide=[k for k, wide in todo.items() if wide], read=read)
        stats.scanned = tuple(todo)
        out: dict[PodKey, PodNetns] = {}
        for key, wide in todo.items():
            fingerprint = prints[key]
            hit = hits.get(key)
            if hit is not None:
                e = _Entry(fingerprint, hit.mapping(self._veths), hit.nsid, hit.ifindex)
            elif wide:
                e = self._backed_off(key, fingerprint, now)
            else:
                continue  # a narrow look found nothing: the wide search keeps its schedule
            self._entries[key] = e
            out[key] = e.mapped
        return out

    def _backed_off(self, key: PodKey, fingerprint: Fingerprint, now: float) -> _Entry:
        """An unmapped entry whose next wide search is twice as far away as the last one (10 s ... 5 min)."""
        old = self._entries.get(key)
        same = old is not None and old.fingerprint == fingerprint and not old.mapped.inode
        backoff = min(RETRY_MAX_S, old.backoff * 2) if same and old.backoff else RETRY_FIRST_S
        return _Entry(fingerprint, UNMAPPED, retry_at=now + backoff, backoff=backoff)


def _fingerprints(pods: list[LocalPod]) -> dict[PodKey, Fingerprint]:
    """{pod: (UID, the IPs it is looked up by)} for every non-hostNetwork pod: what its mapping depends on.

    The UID is in it because a pod re-created under the same name is another pod, in another netns.
    """
    owned = owned_ips(pods)
    return {(p.namespace, p.name): (p.uid, owned[(p.namespace, p.name)]) for p in pods if not p.host_network}
