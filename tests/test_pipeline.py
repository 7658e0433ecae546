"""Drop accounting: kernel map growth becomes labelled cumulative counters (pure: no kernel)."""

import ipaddress

from netwatchd.classify import ClusterView, parse_cidrs
from netwatchd.identity.local import NODE, PodRef
from netwatchd.pipeline import OVERFLOW_POD, DropAccounting
from netwatchd.probes.drops import DropRecord, decode_addr, protocol_name

VIEW = ClusterView(node_pod_cidrs=parse_cidrs(["10.244.1.0/24"]), cluster_cidrs=parse_cidrs(["10.244.0.0/16"]))


class PodsByIp:
    source = "test"
    unknown_pod = PodRef("", "unknown")
    services: dict = {}

    def service_for_ip(self, ip):
        return self.services.get(str(ip))

    def service_for_nodeport(self, port, proto):
        return None

    def __init__(self, pods):
        self.pods = pods

    def pod_for_ip(self, ip):
        return self.pods.get(str(ip), NODE)

    def pod_for_netns(self, netns):
        return NODE


def rec(src, dst, packets, key=b"k1", reason=3):
    return DropRecord(key=key, src=ipaddress.ip_address(src), dst=ipaddress.ip_address(dst), protocol="tcp",
                      reason=reason, netns=1, ifindex=2, packets=packets, bytes=packets * 60)


def names(n):
    return {3: "NO_SOCKET", 12: "NETFILTER_DROP"}.get(n, f"UNKNOWN_{n}")


def test_growth_is_counted_once_and_survives_eviction():
    acct = DropAccounting(VIEW, PodsByIp({"10.244.1.5": PodRef("default", "a")}), names)
    acct.update([rec("10.244.1.5", "10.244.1.6", 3)])
    acct.update([rec("10.244.1.5", "10.244.1.6", 5)])
    labels = ("NO_SOCKET", "tcp", "pod_to_pod_local", "egress", "default", "a", "", "")
    assert acct.snapshot()[0] == {labels: 5}
    # the entry is idle, evicted, then re-created by the kernel from zero: totals keep growing
    acct.update([rec("10.244.1.5", "10.244.1.6", 5)])
    assert acct.idle_keys() == [b"k1"]
    acct.forget(acct.idle_keys())
    acct.update([rec("10.244.1.5", "10.244.1.6", 2)])
    assert acct.snapshot()[0] == {labels: 7}
    assert acct.snapshot()[1] == {labels: 7 * 60}


def test_entry_recreated_between_reads_counts_new_value():
    acct = DropAccounting(VIEW, PodsByIp({}), names)
    acct.update([rec("10.244.1.5", "10.244.1.6", 10)])
    acct.update([rec("10.244.1.5", "10.244.1.6", 4)])  # smaller: deleted and re-created
    assert sum(acct.snapshot()[0].values()) == 14


def test_series_budget_folds_new_pods():
    pods = {f"10.244.1.{i}": PodRef("ns", f"p{i}") for i in range(1, 6)}
    acct = DropAccounting(VIEW, PodsByIp(pods), names, series_limit=2)
    acct.update([rec(f"10.244.1.{i}", "10.244.2.1", 1, key=bytes([i])) for i in range(1, 6)])
    pods_seen = sorted(labels[5] for labels in acct.snapshot()[0])
    assert pods_seen == [OVERFLOW_POD, "p1", "p2"]
    assert acct.snapshot()[0][("NO_SOCKET", "tcp", "pod_to_pod_remote", "egress", "", OVERFLOW_POD, "", "")] == 3
    assert acct.budget.folded == 3


def test_decoders():
    assert str(decode_addr(bytes([10, 0, 0, 1] + [0] * 12), 4)) == "10.0.0.1"
    assert str(decode_addr(ipaddress.IPv6Address("fd00::1").packed, 6)) == "fd00::1"
    assert decode_addr(bytes(16), 0) is None
    assert protocol_name(4, 6, 0x800) == "tcp" and protocol_name(6, 58, 0x86DD) == "icmpv6"
    assert protocol_name(0, 0, 0x0806) == "arp" and protocol_name(4, 200, 0x800) == "other"


def test_drop_after_dnat_belongs_to_the_service_and_client():
    """conntrack's original destination (the VIP) names the service; the client pod owns the drop."""
    resolver = PodsByIp({"10.244.1.5": PodRef("default", "client")})
    resolver.services = {"10.96.0.10": ("shop", "cart")}
    acct = DropAccounting(VIEW, resolver, names)
    after_dnat = DropRecord(key=b"x", src=ipaddress.ip_address("10.244.1.5"), dst=ipaddress.ip_address("10.244.2.7"),
                            protocol="tcp", reason=12, netns=1, ifindex=2, packets=2, bytes=120,
                            orig_dst=ipaddress.ip_address("10.96.0.10"), orig_dport=80)
    reply = DropRecord(key=b"y", src=ipaddress.ip_address("10.244.2.7"), dst=ipaddress.ip_address("10.244.1.5"),
                       protocol="tcp", reason=12, netns=1, ifindex=2, packets=1, bytes=60,
                       orig_dst=ipaddress.ip_address("10.96.0.10"), orig_dport=80, ct_reply=True)
    acct.update([after_dnat, reply])
    assert acct.snapshot()[0] == {
        ("NETFILTER_DROP", "tcp", "pod_to_service", "egress", "default", "client", "shop", "cart"): 2,
        ("NETFILTER_DROP", "tcp", "pod_to_service", "ingress", "default", "client", "shop", "cart"): 1,
    }


def test_unlisted_local_pod_is_unknown_and_gone_pods_are_forgotten():
    acct = DropAccounting(VIEW, PodsByIp({"10.244.1.5": PodRef("default", "a")}), names)
    acct.update([rec("10.244.1.9", "10.244.2.1", 1, key=b"u"), rec("10.244.1.5", "10.244.2.1", 1, key=b"a")])
    pods = {(k[4], k[5]) for k in acct.snapshot()[0]}
    assert pods == {("", "unknown"), ("default", "a")}
    assert acct.forget_pod("default", "a") == 1 and acct.series() == 1


def test_unnatted_reply_from_a_vip_names_the_service():
    resolver = PodsByIp({"10.244.1.5": PodRef("default", "client")})
    resolver.services = {"10.96.0.10": ("shop", "cart")}
    view = ClusterView(node_pod_cidrs=parse_cidrs(["10.244.1.0/24"]), service_cidrs=parse_cidrs(["10.96.0.0/12"]))
    acct = DropAccounting(view, resolver, names)
    acct.update([rec("10.96.0.10", "10.244.1.5", 2, key=b"r", reason=12)])
    assert acct.snapshot()[0] == {
        ("NETFILTER_DROP", "tcp", "pod_to_service", "ingress", "default", "client", "shop", "cart"): 2}


def test_external_client_dnatted_to_a_local_backend_belongs_to_the_backend():
    """external -> NodePort -> local pod: the drop is the backend pod's ingress, class external_to_pod."""
    resolver = PodsByIp({"10.244.1.7": PodRef("shop", "backend")})
    resolver.services = {}
    view = ClusterView(node_pod_cidrs=parse_cidrs(["10.244.1.0/24"]),
                       host_ips=frozenset({ipaddress.ip_address("192.168.100.1")}))
    acct = DropAccounting(view, resolver, names)
    r = DropRecord(key=b"n", src=ipaddress.ip_address("203.0.113.9"), dst=ipaddress.ip_address("10.244.1.7"),
                   protocol="tcp", reason=12, netns=1, ifindex=2, packets=1, bytes=60,
                   orig_dst=ipaddress.ip_address("192.168.100.1"), orig_dport=30080)
    acct.update([r])
    assert acct.snapshot()[0] == {
        ("NETFILTER_DROP", "tcp", "external_to_pod", "ingress", "shop", "backend", "", ""): 1}
