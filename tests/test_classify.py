"""Table-driven tests of the traffic-class rules (pure: no kernel)."""

import ipaddress

import pytest

from netwatchd.classify import ClusterView, classify, parse_cidrs

VIEW = ClusterView(
    node_pod_cidrs=parse_cidrs(["10.244.1.0/24,fd00:10:244:1::/64"]),
    cluster_cidrs=parse_cidrs(["10.244.0.0/16", "fd00:10:244::/48"]),
    service_cidrs=parse_cidrs(["10.96.0.0/12"]),
    host_ips=frozenset({ipaddress.ip_address("192.168.100.1"), ipaddress.ip_address("127.0.0.1")}),
)

CASES = [
    # src, dst, class, direction, local side
    ("10.244.1.5", "10.244.1.6", "pod_to_pod_local", "egress", "10.244.1.5"),
    ("10.244.1.5", "10.244.2.9", "pod_to_pod_remote", "egress", "10.244.1.5"),
    ("10.244.1.5", "10.96.0.10", "pod_to_service", "egress", "10.244.1.5"),
    ("10.244.1.5", "8.8.8.8", "pod_to_external", "egress", "10.244.1.5"),
    ("10.244.1.5", "192.168.100.1", "host", "egress", "10.244.1.5"),
    ("10.244.2.9", "10.244.1.5", "pod_to_pod_remote", "ingress", "10.244.1.5"),
    ("8.8.8.8", "10.244.1.5", "external_to_pod", "ingress", "10.244.1.5"),
    ("192.168.100.1", "10.244.1.5", "host", "ingress", "10.244.1.5"),
    ("10.96.0.10", "10.244.1.5", "pod_to_service", "ingress", "10.244.1.5"),
    ("8.8.8.8", "10.96.0.10", "external_to_pod", "ingress", None),
    ("8.8.8.8", "10.244.2.9", "external_to_pod", "ingress", None),
    ("192.168.100.1", "8.8.8.8", "host", "egress", None),
    ("8.8.8.8", "192.168.100.1", "host", "ingress", None),
    ("127.0.0.1", "127.0.0.1", "container_to_container", "egress", None),
    ("10.244.1.5", "10.244.1.5", "container_to_container", "egress", "10.244.1.5"),
    ("fd00:10:244:1::5", "fd00:10:244:1::6", "pod_to_pod_local", "egress", "fd00:10:244:1::5"),
    ("fd00:10:244:1::5", "fd00:10:244:2::6", "pod_to_pod_remote", "egress", "fd00:10:244:1::5"),
    ("fd00:10:244:1::5", "ff02::1", "host", "egress", "fd00:10:244:1::5"),
    ("2001:db8::1", "fd00:10:244:1::5", "external_to_pod", "ingress", "fd00:10:244:1::5"),
]


@pytest.mark.parametrize(("src", "dst", "cls", "direction", "local"), CASES)
def test_classify(src, dst, cls, direction, local):
    att = classify(VIEW, ipaddress.ip_address(src), ipaddress.ip_address(dst))
    assert (att.traffic_class, att.direction) == (cls, direction)
    assert att.local_ip == (ipaddress.ip_address(local) if local else None)


def test_kubelet_pod_ips_add_to_the_node_cidr():
    """Pods the kubelet lists are local even outside the node's CIDR; unlisted CIDR addresses stay local."""
    view = ClusterView(**{**VIEW.__dict__, "local_pod_ips": frozenset({ipaddress.ip_address("10.250.0.5")})})
    att = classify(view, ipaddress.ip_address("10.250.0.5"), ipaddress.ip_address("10.244.1.7"))
    assert (att.traffic_class, att.direction, str(att.local_ip)) == ("pod_to_pod_local", "egress", "10.250.0.5")


def test_parse_cidrs_accepts_repeats_and_commas():
    nets = parse_cidrs(["10.0.0.0/8, fd00::/8", "192.168.0.1/24"])
    assert [str(n) for n in nets] == ["10.0.0.0/8", "fd00::/8", "192.168.0.0/24"]
    with pytest.raises(ValueError):
        parse_cidrs(["not-a-cidr"])


def test_node_addresses_inside_the_pod_cidr_are_the_node():
    """cni0's gateway and the VTEP sit in the pod CIDR but belong to the node, not to a pod."""
    view = ClusterView(**{**VIEW.__dict__, "host_ips": VIEW.host_ips | {ipaddress.ip_address("10.244.1.1")}})
    to_gw = classify(view, ipaddress.ip_address("10.244.1.5"), ipaddress.ip_address("10.244.1.1"))
    from_gw = classify(view, ipaddress.ip_address("10.244.1.1"), ipaddress.ip_address("10.244.1.5"))
    assert (to_gw.traffic_class, to_gw.direction) == ("host", "egress")
    assert (from_gw.traffic_class, from_gw.direction, str(from_gw.local_ip)) == ("host", "ingress", "10.244.1.5")
