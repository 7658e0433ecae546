"""What the node knows about itself without Kubernetes: its own addresses and network namespace.

Standalone mode (no kubelet) labels the local side of an event as the node or an unknown pod; the identity
work adds pods on top of this through the same `Resolver` interface.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

from netwatchd.classify import IPAddress


@dataclass(frozen=True)
class PodRef:
    """The local endpoint of an event: a pod, or the node itself (namespace "", pod "")."""

    namespace: str = ""
    pod: str = ""
    workload: str = ""


NODE = PodRef()


def own_netns_inode() -> int:
    """Inode of the network namespace netwatchd runs in (the node's, for a hostNetwork DaemonSet)."""
    return os.stat("/proc/self/ns/net").st_ino


def host_addresses() -> frozenset[IPAddress]:
    """Every address configured in our network namespace (rtnetlink), loopback included."""
    from netwatchd.identity.rtnl import IFA_ADDRESS, IFA_LOCAL, Rtnl

    out: set[IPAddress] = set()
    with Rtnl() as rt:
        for _, _, attrs in rt.addresses():
            raw = attrs.get(IFA_ADDRESS) or attrs.get(IFA_LOCAL)
            if raw and len(raw) in (4, 16):
                out.add(ipaddress.ip_address(raw))
    return frozenset(out)


class StandaloneResolver:
    """Resolver without Kubernetes: no pod names; local pods are known only by address (CIDR)."""

    source = "standalone"
    unknown_pod = NODE

    def pod_for_ip(self, ip: IPAddress) -> PodRef:
        return NODE

    def pod_for_netns(self, netns: int) -> PodRef:
        return NODE

    def service_for_ip(self, ip: IPAddress) -> None:
        return None

    def service_for_nodeport(self, port: int, proto: int | str) -> None:
        return None
