"""Network namespaces: entering them, listing them, and finding which one (and which host veth) is a pod's.

CNI-agnostic: nothing here reads CNI state files or container-runtime APIs. A pod is matched to a network
namespace by the one fact every CNI leaves in the kernel — the pod's IP is configured on an interface inside
the pod's netns — and to its host-side veth by the kernel's own veth peer link (``IFLA_LINK_NETNSID`` +
``IFLA_LINK``).

How :func:`map_pods_to_netns` finds the mapping, for the netns the calling thread is in (the node's):

1. :func:`list_netns` collects every distinct netns (by inode) reachable from the bind mounts in
   ``/run/netns`` and ``/var/run/netns`` (where containerd / CRI-O / ``ip netns`` pin pod sandboxes) and
   from ``/proc/<pid>/ns/net`` (any process's netns, e.g. a pause container's). The first path found for
   an inode wins; the bind mounts are scanned first because their paths outlive any one process.
2. :func:`host_veths` lists our veths with the *nsid* our netns assigned to each peer's netns, and
   :func:`netnsid_of` gives the nsid of each listed netns, so "connected to us by a veth" is known for
   every netns with one ``RTM_GETNSID`` each (no need to enter it).
3. Addresses are read (entering each netns on this thread only, :func:`in_netns`) from the connected
   namespaces first, then — only while some pod IP is still unfound (CNIs without veths: ipvlan, macvlan;
   or netwatchd not in the node's netns) — from the others. A pod maps to the netns holding one of its
   IPs; when several do (lab nodes share one kernel; stale sandboxes), one connected to us by a veth wins.
   The host veth is the one whose peer is the interface holding the pod IP, else any veth into that netns.
4. hostNetwork pods map to the netns netwatchd runs in (the node's); no host veth.

That is a full scan, every call. The daemon maps through :class:`netwatchd.identity.netnscache.NetnsCache`,
which gives the same answers from the same steps (:func:`scan_for_ips`) but re-scans only the pods and
namespaces that may have changed. The kernel is asked through :mod:`netwatchd.identity.rtnl` (raw
rtnetlink), one socket per netns read.

How it fails: a Running pod whose IP is in no netns maps to inode 0 (logged once per pod, until it maps
again); a pod without IPs yet, or already finished, maps to inode 0 silently; a netns that vanishes
mid-scan (pod deleted, process exited) is skipped; a pod netns with no veth into our netns has no host veth
(name "", ifindex 0). Reading ``/run/netns`` and ``/proc`` of the host needs the DaemonSet's hostPID and a
hostPath mount of ``/run/netns`` (mountPropagation: HostToContainer); entering a netns needs CAP_SYS_ADMIN.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from netwatchd.classify import IPAddress
from netwatchd.identity.rtnl import Rtnl

if TYPE_CHECKING:
    from netwatchd.identity.kubelet import LocalPod

CLONE_NEWNET = 0x40000000
RUN_DIRS = ("/run/netns", "/var/run/netns")
# The calling thread's own netns: setns() moves one thread, so /proc/self (the main thread) can be wrong.
THREAD_NETNS = "/proc/thread-self/ns/net"

log = structlog.get_logger("netwatchd.identity")
_libc = ctypes.CDLL(None, use_errno=True)
_warned_lock = threading.Lock()
_warned: set[tuple[str, str]] = set()  # pods already logged as "no netns found" (pruned every scan)


def netns_path(name_or_path: str) -> str:
    """A netns path: absolute paths are kept; a bare name is looked up in /run/netns then /var/run/netns."""
    if "/" in name_or_path:
        return name_or_path
    for d in RUN_DIRS:
        candidate = os.path.join(d, name_or_path)
        if os.path.exists(candidate):
            return candidate
    return os.path.join(RUN_DIRS[0], name_or_path)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns(CLONE_NEWNET): {os.strerror(err)}")


@contextlib.contextmanager
def in_netns(path: str) -> Iterator[None]:
    """Run the ``with`` block with the *calling thread* in network namespace ``path`` (a path or a name).

    Only this OS thread moves (setns(2) on a thread), so other threads keep working in their netns; sockets
    created inside the block stay bound to ``path``'s netns after it ends. Keep the block short; do not
    await inside it, and do not start threads in it (a new thread inherits its creator's netns). Raises
    OSError (FileNotFoundError when the netns is gone) without moving the thread; on exit the thread is
    always put back where it was.
    """
    target = os.open(netns_path(path), os.O_RDONLY | os.O_CLOEXEC)
    try:
        home = os.open(THREAD_NETNS, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(home)  # cannot fail short of losing CAP_SYS_ADMIN; then raising is right
        finally:
            os.close(home)
    finally:
        os.close(target)


def current_netns_inode() -> int:
    """Inode of the calling thread's network namespace."""
    return os.stat(THREAD_NETNS).st_ino


def list_netns(proc: str = "/proc", run_dirs: Iterable[str] = RUN_DIRS) -> dict[int, str]:
    """Every distinct network namespace reachable from bind mounts in ``run_dirs`` and ``proc/<pid>/ns/net``.

    Returns {inode: path}; the first path seen for an inode wins (bind mounts first: they are stable).
    Files in ``run_dirs`` that are not mounted namespaces (left over after a failed ``ip netns add``) and
    processes that exit while we look are skipped.
    """
    nsfs_dev = os.stat(THREAD_NETNS).st_dev  # every namespace file lives on the one nsfs device
    out: dict[int, str] = {}

    def add(path: str) -> None:
        try:
            st = os.stat(path)
        except OSError:  # vanished pid, unmounted file, permission: skip (races are normal here)
            return
        if st.st_dev == nsfs_dev:
            out.setdefault(st.st_ino, path)

    for d in run_dirs:
        try:
            names = sorted(os.listdir(d))
        except OSError:
            continue
        for name in names:
            add(os.path.join(d, name))
    try:
        pids = [p for p in os.listdir(proc) if p.isdigit()]
    except OSError:
        pids = []
    for pid in sorted(pids, key=int):
        add(f"{proc}/{pid}/ns/net")
    return out


def read_addresses(path: str) -> dict[IPAddress, int]:
    """{address: ifindex} of netns ``path``, without loopback and link-local (never pod IPs). OSError if gone."""
    out: dict[IPAddress, int] = {}
    with in_netns(path), Rtnl() as rt:  # the socket is created inside the netns, so it asks that one
        # IFA_LOCAL is the local end on point-to-point links; IPv6 only carries IFA_ADDRESS.
        for ip, ifindex, _ in rt.addresses():
            if not (ip.is_loopback or ip.is_link_local):
                out.setdefault(ip, ifindex)
    return out


def netns_addresses(path: str) -> set[IPAddress]:
    """Addresses configured in netns ``path`` (loopback and link-local skipped). OSError if it is gone."""
    return set(read_addresses(path))


@dataclass(frozen=True)
class VethInfo:
    """A veth in our netns and where its peer lives (peer_netnsid None: the peer is in our netns too)."""

    name: str
    ifindex: int
    peer_netnsid: int | None
    peer_ifindex: int


def veths_of(rt: Rtnl) -> dict[int, VethInfo]:
    """{ifindex: VethInfo} for every veth of the netns ``rt`` talks to."""
    return {
        link.index: VethInfo(link.name, link.index, link.link_netnsid if (link.link_netnsid or 0) >= 0 else None,
                             link.link)
        for link in rt.links() if link.kind == "veth"
    }


def host_veths() -> dict[int, VethInfo]:
    """{ifindex: VethInfo} for every veth in the calling thread's netns (the node's: the "host" ends)."""
    with Rtnl() as rt:
        return veths_of(rt)


def nsid_via(rt: Rtnl, path: str) -> int | None:
    """The nsid the netns of ``rt`` assigned to netns ``path``; None when none is, or ``path`` is gone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return rt.nsid(fd)
    except OSError:  # not a netns (any more), or it died between open and query: treat as unknown
        return None
    finally:
        os.close(fd)


def netnsid_of(path: str) -> int | None:
    """The nsid our netns assigned to netns ``path`` (RTM_GETNSID, NETNSA_FD), None when none is assigned.

    The kernel assigns one when a veth (or other cross-netns link) connects the two, so a veth's
    ``peer_netnsid`` can be matched to a netns inode this way. Querying never allocates an id.
    """
    with Rtnl() as rt:
        return nsid_via(rt, path)


@dataclass(frozen=True)
class PodNetns:
    """Where a local pod lives: its netns (inode 0: not found) and the host end of its veth ("" / 0: none)."""

    inode: int
    path: str = ""
    host_veth_name: str = ""
    host_veth_ifindex: int = 0


UNMAPPED = PodNetns(0)


def pick_veth(veths: Iterable[VethInfo], nsid: int | None, peer_ifindex: int) -> VethInfo | None:
    if nsid is None:
        return None
    into = sorted((v for v in veths if v.peer_netnsid == nsid), key=lambda v: v.ifindex)
    for v in into:
        if v.peer_ifindex == peer_ifindex:
            return v
    return into[0] if into else None


PodKey = tuple[str, str]  # (namespace, name)


@dataclass(frozen=True)
class Hit:
    """Where a wanted pod IP was found: a netns, the interface holding the IP there, and how we reach it."""

    inode: int
    path: str
    ifindex: int  # inside that netns: the pod end of its veth, when it has one
    connected: bool  # a veth of our netns has its peer there
    nsid: int | None  # the id our netns assigned to that netns (None: none assigned)

    def mapping(self, veths: Iterable[VethInfo]) -> PodNetns:
        """The PodNetns of this hit, with the host veth picked among ``veths`` (our netns' veths)."""
        veth = pick_veth(veths, self.nsid, self.ifindex)
        return PodNetns(self.inode, self.path, veth.name if veth else "", veth.ifindex if veth else 0)


def owned_ips(pods: Iterable[LocalPod]) -> dict[PodKey, tuple[IPAddress, ...]]:
    """The IPs each non-hostNetwork pod is looked up by: an IP listed by two pods belongs to the first."""
    owner: dict[IPAddress, PodKey] = {}
    out: dict[PodKey, tuple[IPAddress, ...]] = {}
    for pod in pods:
        if pod.host_network:
            continue
        key = (pod.namespace, pod.name)
        out[key] = tuple(ip for ip in pod.ips if owner.setdefault(ip, key) == key)
    return out


def peer_nsids(veths: Iterable[VethInfo]) -> set[int]:
    """The nsids of the namespaces our veths lead to."""
    return {v.peer_netnsid for v in veths if v.peer_netnsid is not None}


def scan_for_ips(rt: Rtnl, namespaces: Mapping[int, str], wanted: Mapping[IPAddress, PodKey], connected_nsids: set[int],
                 wide: Collection[PodKey] | None = None,
                 read: Callable[[str], dict[IPAddress, int]] = read_addresses) -> dict[PodKey, Hit]:
    """Enter ``namespaces`` ({inode: path}) and find which one holds each ``wanted`` IP.

    Namespaces connected to ours by a veth (nsid in ``connected_nsids``) are read first and win over others
    holding the same IP. The others are read only while some pod of ``wide`` (default: every wanted pod) is
    not found in a connected one: reading every netns of the node is the expensive part. ``rt`` (our netns)
    answers the nsid queries; ``read`` enters a netns and returns {address: ifindex} (OSError: it is gone).
    """
    wide = set(wanted.values()) if wide is None else set(wide)
    nsids = {ino: nsid_via(rt, path) for ino, path in namespaces.items()}
    connected = [ino for ino, nsid in nsids.items() if nsid in connected_nsids]
    others = [ino for ino, nsid in nsids.items() if nsid not in connected_nsids]
    best: dict[PodKey, Hit] = {}
    for is_connected, group in ((True, connected), (False, others)):
        if not is_connected and all(k in best and best[k].connected for k in wide):
            break  # every pod that may be searched for widely is already found in a veth-connected netns
        for ino in group:
            try:
                addrs = read(namespaces[ino])
            except OSError:
                continue  # vanished mid-scan
            for ip, ifindex in addrs.items():
                key = wanted.get(ip)
                if key is not None and (key not in best or (is_connected and not best[key].connected)):
                    best[key] = Hit(ino, namespaces[ino], ifindex, is_connected, nsids[ino])
    return best


def map_pods_to_netns(
    pods: Iterable[LocalPod], proc: str = "/proc", run_dirs: Iterable[str] = RUN_DIRS
) -> dict[PodKey, PodNetns]:
    """{(namespace, name): PodNetns} for ``pods``, seen from the calling thread's netns (see module doc).

    A full scan every call; :class:`netwatchd.identity.netnscache.NetnsCache` gives the same answers and
    re-scans only what may have changed.
    """
    pods = list(pods)
    own = current_netns_inode()
    namespaces = list_netns(proc, run_dirs)
    owned = owned_ips(pods)
    result = {(p.namespace, p.name): PodNetns(own, namespaces.get(own, "")) if p.host_network else UNMAPPED
              for p in pods}
    wanted = {ip: key for key, ips in owned.items() for ip in ips}
    if wanted:
        with Rtnl() as rt:
            veths = list(veths_of(rt).values())
            others = {ino: path for ino, path in namespaces.items() if ino != own}
            hits = scan_for_ips(rt, others, wanted, peer_nsids(veths))
        for key, hit in hits.items():
            result[key] = hit.mapping(veths)
    log_unmapped(pods, result)
    return result


def log_unmapped(pods: list[LocalPod], result: Mapping[PodKey, PodNetns]) -> None:
    """Log each Running pod whose IP is in no netns once (until it maps again), not once per scan."""
    missing = {
        (p.namespace, p.name): p
        for p in pods
        if not p.host_network and p.ips and p.phase == "Running" and result[(p.namespace, p.name)].inode == 0
    }
    with _warned_lock:
        new = [missing[k] for k in missing if k not in _warned]
        _warned.intersection_update(missing)
        _warned.update(missing)
    for p in new:
        log.warning("pod_netns_not_found", namespace=p.namespace, pod=p.name, ips=[str(i) for i in p.ips],
                    hint="no network namespace visible to netwatchd holds the pod's IP (hostPID and /run/netns?)")
