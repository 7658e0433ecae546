"""Traffic classes: which path through the node a packet or socket took, seen from the local side.

Pure functions over addresses plus what the node knows (its pod CIDRs, the cluster's, the service CIDRs,
its own addresses, and — once identity is known — its local pods). No kernel, no Kubernetes client here.

Attribution rule (BRIEF.md): an event belongs to the local pod that sent it (`egress`) when the source is
a pod on this node; else to the local pod it was headed to (`ingress`); else to the node itself (pod "").
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

CONTAINER_TO_CONTAINER = "container_to_container"
POD_TO_POD_LOCAL = "pod_to_pod_local"
POD_TO_POD_REMOTE = "pod_to_pod_remote"
POD_TO_SERVICE = "pod_to_service"
POD_TO_EXTERNAL = "pod_to_external"
EXTERNAL_TO_POD = "external_to_pod"
HOST = "host"
TRAFFIC_CLASSES = (
    CONTAINER_TO_CONTAINER, POD_TO_POD_LOCAL, POD_TO_POD_REMOTE, POD_TO_SERVICE,
    POD_TO_EXTERNAL, EXTERNAL_TO_POD, HOST,
)
EGRESS, INGRESS = "egress", "ingress"


def parse_cidrs(values: Iterable[str]) -> tuple[IPNetwork, ...]:
    """Parse CIDRs given as repeated and/or comma-separated flag values."""
    nets: list[IPNetwork] = []
    for value in values:
        for part in value.split(","):
            if part.strip():
                nets.append(ipaddress.ip_network(part.strip(), strict=False))
    return tuple(nets)


def _in(ip: IPAddress, nets: Iterable[IPNetwork]) -> bool:
    return any(ip.version == n.version and ip in n for n in nets)


def _node_local_scope(ip: IPAddress) -> bool:
    """Loopback, link-local and multicast never leave the node as pod traffic."""
    return ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified


@dataclass(frozen=True)
class Attribution:
    """Who an event belongs to: the class, the direction, and the local endpoint's address (None: node)."""

    traffic_class: str
    direction: str
    local_ip: IPAddress | None


@dataclass
class ClusterView:
    """What the classifier knows about the cluster; identity sources update it in place."""

    node_pod_cidrs: tuple[IPNetwork, ...] = ()
    cluster_cidrs: tuple[IPNetwork, ...] = ()
    service_cidrs: tuple[IPNetwork, ...] = ()
    host_ips: frozenset[IPAddress] = frozenset()
    node_ips: frozenset[IPAddress] = frozenset()  # every node of the cluster, when known
    service_ips: frozenset[IPAddress] = frozenset()
    # Exact local pod IPs from the kubelet (pods whose CIDR is not known, e.g. no IPAM ranges per node).
    local_pod_ips: frozenset[IPAddress] | None = None
    # Bumped by identity whenever anything above or the pods/services behind the resolver change, so
    # consumers may cache per-key attributions until it moves.
    generation: int = 0

    def is_local_pod(self, ip: IPAddress) -> bool:
        """A pod the kubelet listed, or any address of this node's pod CIDR (a pod not listed yet) that is not
        the node's own (the bridge gateway, e.g. cni0's 10.244.1.1, and the VTEP live in the pod CIDR)."""
        if self.local_pod_ips is not None and ip in self.local_pod_ips:
            return True
        return _in(ip, self.node_pod_cidrs) and ip not in self.host_ips

    def is_pod(self, ip: IPAddress) -> bool:
        return (_in(ip, self.cluster_cidrs) or _in(ip, self.node_pod_cidrs)) and ip not in self.host_ips

    def is_service(self, ip: IPAddress) -> bool:
        return ip in self.service_ips or _in(ip, self.service_cidrs)

    def is_node(self, ip: IPAddress) -> bool:
        return ip in self.host_ips or ip in self.node_ips


def classify(view: ClusterView, src: IPAddress, dst: IPAddress) -> Attribution:
    """Classify one (source, destination) pair into exactly one traffic class (see module docstring)."""
    if src == dst or src.is_loopback or dst.is_loopback:
        # Loopback inside a pod's netns is container-to-container; the netns says which pod (caller).
        return Attribution(CONTAINER_TO_CONTAINER, EGRESS, src if view.is_local_pod(src) else None)
    if view.is_local_pod(src):
        return Attribution(_egress_class(view, dst), EGRESS, src)
    if view.is_local_pod(dst):
        return Attribution(_ingress_class(view, src), INGRESS, dst)
    # Neither side is a local pod: the node's own traffic, or traffic passing through to pods/services.
    direction = EGRESS if view.is_node(src) else INGRESS
    if not view.is_node(src) and (view.is_pod(dst) or view.is_service(dst)):
        return Attribution(EXTERNAL_TO_POD, direction, None)
    return Attribution(HOST, direction, None)


def _egress_class(view: ClusterView, dst: IPAddress) -> str:
    if view.is_local_pod(dst):
        return POD_TO_POD_LOCAL
    if view.is_service(dst):
        return POD_TO_SERVICE
    if view.is_pod(dst):
        return POD_TO_POD_REMOTE
    if view.is_node(dst) or _node_local_scope(dst):
        return HOST
    return POD_TO_EXTERNAL


def _ingress_class(view: ClusterView, src: IPAddress) -> str:
    if view.is_service(src):
        return POD_TO_SERVICE
    if view.is_pod(src):
        return POD_TO_POD_REMOTE
    if view.is_node(src) or _node_local_scope(src):
        return HOST
    return EXTERNAL_TO_POD
