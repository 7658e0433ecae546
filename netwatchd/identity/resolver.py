"""KubeResolver: the Resolver the pipeline asks "which local pod is this address / network namespace?".

It combines three sources, each replaced whole when it refreshes: the kubelet's local pods, the pod ->
netns map (identity.netnscache: re-scanned only where something changed), and the apiserver's
ClusterSnapshot (Services, Nodes). Every update builds new
immutable lookup tables and swaps them in with one assignment, so readers (the pipeline, on any thread)
never lock and never see a half-built table. A pod that disappears from the kubelet's list stops resolving
at the next update; the pipeline, not the resolver, decides how long to keep counting under its old name.
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from netwatchd.classify import ClusterView, IPAddress
from netwatchd.identity.apiserver import ClusterSnapshot, ServiceKey, normalize_proto
from netwatchd.identity.kubelet import KubeletClient, LocalPod
from netwatchd.identity.local import NODE, PodRef, own_netns_inode
from netwatchd.identity.netns import PodNetns
from netwatchd.identity.netnscache import NetnsCache

# A finished pod's IP goes back to the CNI pool and may already belong to a new pod.
_FINISHED = ("Succeeded", "Failed")
_PHASE_RANK = {"Running": 0, "Pending": 1}


def _as_ip(ip: Any) -> IPAddress | None:
    if not isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address):
        try:
            ip = ipaddress.ip_address(ip)
        except ValueError:
            return None
    # Dual-stack sockets report IPv4 peers as ::ffff:a.b.c.d; pods are known by the IPv4 address.
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@dataclass(frozen=True)
class _Pods:
    pods: tuple[LocalPod, ...] = ()
    by_ip: Mapping[IPAddress, PodRef] = field(default_factory=dict)
    by_netns: Mapping[int, PodRef] = field(default_factory=dict)
    netns: Mapping[tuple[str, str], PodNetns] = field(default_factory=dict)
    local_ips: frozenset[IPAddress] | None = None  # None until the kubelet answered once


def _build_pods(pods: Iterable[LocalPod], netns_map: Mapping[tuple[str, str], PodNetns], node_inode: int) -> _Pods:
    pods = tuple(pods)
    by_ip: dict[IPAddress, PodRef] = {}
    by_netns: dict[int, PodRef] = {}
    local_ips: set[IPAddress] = set()
    # hostNetwork pods share the node's addresses and netns: neither identifies them, so they stay NODE.
    live = [p for p in pods if not p.host_network and p.phase not in _FINISHED]
    # Two pods claiming one IP (a pod being replaced): the Running one wins, then a stable order.
    for p in sorted(live, key=lambda p: (_PHASE_RANK.get(p.phase, 2), p.namespace, p.name)):
        ref = PodRef(p.namespace, p.name, p.workload)
        for ip in p.ips:
            by_ip.setdefault(ip, ref)
            local_ips.add(ip)
        pn = netns_map.get((p.namespace, p.name))
        if pn is not None and pn.inode and pn.inode != node_inode:
            by_netns.setdefault(pn.inode, ref)
    return _Pods(pods, by_ip, by_netns, dict(netns_map), frozenset(local_ips))


class KubeResolver:
    """Resolver backed by the kubelet (local pods), netns scans, and the apiserver (Services, Nodes)."""

    source = "kubernetes"
    # A local pod address (in this node's pod CIDR) the kubelet has not listed (yet, or it is down).
    unknown_pod = PodRef("", "unknown")

    def __init__(self, node_netns_inode: int | None = None, netns_cache: NetnsCache | None = None) -> None:
        # The node's own netns: a socket there belongs to the node (or a hostNetwork pod: unattributable).
        self.node_netns_inode = node_netns_inode if node_netns_inode is not None else own_netns_inode()
        self.netns_cache = netns_cache or NetnsCache()
        self._pods = _Pods()
        self._cluster = ClusterSnapshot()
        self._lock = threading.Lock()  # serialises writers; readers use the swapped-in snapshots
        self._view_defaults: dict[int, tuple[Any, ...]] = {}

    # -- updates ------------------------------------------------------------------------------------------

    def update_pods(self, pods: Iterable[LocalPod], netns_map: Mapping[tuple[str, str], PodNetns] | None = None
                    ) -> None:
        """Replace the local pods (kubelet) and their netns map (map_pods_to_netns)."""
        built = _build_pods(pods, netns_map or {}, self.node_netns_inode)
        with self._lock:
            self._pods = built

    def update_cluster(self, snapshot: ClusterSnapshot) -> None:
        """Replace the cluster snapshot (usable directly as ClusterWatcher's on_change)."""
        with self._lock:
            self._cluster = snapshot

    def refresh_pods(self, kubelet: KubeletClient, map_netns: bool = True) -> list[LocalPod]:
        """List pods from the kubelet, map them to netns (from the calling thread's netns), update.

        Raises IdentityError when the kubelet fails; the last good pods are kept in that case.
        """
        pods = kubelet.list_pods()
        self.update_pods(pods, self.netns_cache.map(pods) if map_netns else {})
        return pods

    def close(self) -> None:
        """Close the netns cache's netlink sockets (a later refresh opens new ones)."""
        self.netns_cache.close()

    # -- Resolver protocol --------------------------------------------------------------------------------

    def pod_for_ip(self, ip: Any) -> PodRef:
        """The local (non-hostNetwork, not finished) pod with this IP, else NODE."""
        addr = _as_ip(ip)
        return self._pods.by_ip.get(addr, NODE) if addr is not None else NODE

    def pod_for_netns(self, netns: int) -> PodRef:
        """The local pod whose network namespace has this inode, else NODE."""
        return self._pods.by_netns.get(netns, NODE)

    # -- services -----------------------------------------------------------------------------------------

    def service_for_ip(self, ip: Any) -> ServiceKey | None:
        """(namespace, name) of the Service owning a ClusterIP / externalIP / LoadBalancer IP."""
        addr = _as_ip(ip)
        return self._cluster.service_by_ip.get(addr) if addr is not None else None

    def service_for_nodeport(self, port: int, proto: int | str = "TCP") -> ServiceKey | None:
        """(namespace, name) of the Service behind a node port; ``proto`` as a name or IP protocol number."""
        return self._cluster.node_ports.get((int(port), normalize_proto(proto)))

    # -- introspection ------------------------------------------------------------------------------------

    @property
    def pods(self) -> tuple[LocalPod, ...]:
        return self._pods.pods

    @property
    def netns_map(self) -> Mapping[tuple[str, str], PodNetns]:
        return self._pods.netns

    @property
    def cluster(self) -> ClusterSnapshot:
        return self._cluster

    # -- classification view ------------------------------------------------------------------------------

    def apply_to_view(self, view: ClusterView) -> None:
        """Fill ``view`` from what is known: exact local pod IPs; pod CIDRs, service IPs and node IPs from the
        apiserver. Where the apiserver gives nothing (not synced, or no podCIDRs allocated), the values the
        view had on the first call (the CLI flags) are used, not whatever a previous call left there; the
        cluster's pod CIDRs are always the flags' plus the Nodes' (routed CNIs allocate from pools no Node lists).
        """
        with self._lock:
            defaults = self._view_defaults.setdefault(
                id(view), (view.cluster_cidrs, view.node_pod_cidrs, view.node_ips, view.service_ips))
            pods, snap = self._pods, self._cluster
        flag_cluster, flag_node, flag_node_ips, flag_service_ips = defaults
        if pods.local_ips is not None:
            view.local_pod_ips = pods.local_ips
        # Both name pods: Node podCIDRs and --cluster-cidr (a Calico IP pool, Cilium's cluster pool, OVN's
        # cluster network are in no Node's spec.podCIDRs, or not all of them), so the view takes their union.
        view.cluster_cidrs = tuple(dict.fromkeys((*flag_cluster, *snap.cluster_pod_cidrs)))
        view.node_pod_cidrs = snap.node_pod_cidrs or flag_node
        view.node_ips = snap.node_ips or flag_node_ips
        view.service_ips = frozenset(snap.service_by_ip) if snap.services_synced else flag_service_ips
