"""Every traffic class end to end: real packets through lab nodes, dropped by the real kernel, and the exact
pod, class, direction (and service) netwatchd reports for them.

One lab for the whole module (netwatchd's start-up compiles BPF, so it starts once): node n1, where
netwatchd runs with the lab kubelet and apiserver (LabCluster), node n2 behind a vxlan uplink, and an
"internet" netns behind n1's MASQUERADE uplink. Each test causes its own drops with its own addresses and
ports, and asserts the *growth* of the counters it caused: exact counts for UDP (send N, N dropped) and
single refused connects, ">= 1 and only in the expected labels" where TCP retransmits make counts vary.

Addresses are random per run (see node_addresses): the drops probe sees every netns of the kernel, so labs of
concurrent test runs must not look like this lab's pods.
"""

from __future__ import annotations

import sys
import time

import pytest

from netwatchd.lab.cluster import LabCluster
from netwatchd.lab.traffic import ping, send_udp, tcp_connect
from tests.support import RUN_A, RUN_B, LabWorld, build_world, node_addresses, start_netwatchd, vip

pytestmark = pytest.mark.kernel

NS = "shop"
LABELS = ("reason", "protocol", "traffic_class", "direction", "namespace", "pod", "service_namespace", "service")
CART_VIP, CART_PORT, CART_BACKEND_PORT = vip(10), 53, 5353  # UDP ClusterIP -> pod b
API_VIP, API_PORT, API_BACKEND_PORT = vip(11), 80, 8080  # TCP ClusterIP -> pods b, z
EMPTY_VIP, EMPTY_PORT = vip(12), 80  # a Service without endpoints (kube-proxy REJECTs)
WEB_NODE_PORT, WEB_BACKEND_PORT = 30081, 8081  # UDP NodePort on n1 -> pod web (local)
FAR_NODE_PORT, FAR_BACKEND_PORT = 30082, 8082  # UDP NodePort on n1 -> pod z (on n2)


class World(LabWorld):
    """The module's lab, cluster and daemon (see module docstring)."""

    def build(self) -> World:
        self.n1 = self.lab.add_node("n1", **node_addresses(0))
        self.n2 = self.lab.add_node("n2", **node_addresses(1))
        self.lab.add_uplink(self.n1, self.n2)
        self.inet = self.lab.add_internet(self.n1, cidr=f"172.{16 + RUN_B % 16}.{RUN_A}.0/24")
        # the internet reaches n1's pods directly too (a routed LoadBalancer / a flat network)
        self.inet.run(["ip", "route", "add", self.n1.pod_cidr, "via", self.n1.uplink_ip])
        self.a, self.b, self.web = (self.n1.add_pod(n, namespace=NS) for n in ("a", "b", "web"))
        self.hn = self.n1.add_pod("hn", namespace=NS, host_network=True)
        self.z = self.n2.add_pod("z", namespace=NS)
        self.cluster = LabCluster(self.lab, self.n1)
        c, n1 = self.cluster, self.n1
        c.add_service(NS, "cart", CART_VIP, CART_PORT, [(self.b, CART_BACKEND_PORT)], proto="udp")
        c.add_service(NS, "api", API_VIP, API_PORT, [(self.b, API_BACKEND_PORT), (self.z, API_BACKEND_PORT)])
        # No endpoints: kube-proxy (iptables) rejects new connections to the VIP in the filter table.
        c.api.upsert_service(NS, "empty", [EMPTY_VIP], [(EMPTY_PORT, "TCP")])
        n1.iptables("-N", "KUBE-SERVICES")
        for hook in ("INPUT", "FORWARD", "OUTPUT"):
            n1.iptables("-I", hook, "-m", "conntrack", "--ctstate", "NEW", "-j", "KUBE-SERVICES")
        n1.iptables("-A", "KUBE-SERVICES", "-d", EMPTY_VIP, "-p", "tcp", "--dport", str(EMPTY_PORT),
                    "-m", "comment", "--comment", f"{NS}/empty has no endpoints",
                    "-j", "REJECT", "--reject-with", "icmp-port-unreachable")
        # NodePorts on n1's uplink address, kube-proxy style (DNAT in PREROUTING, masquerade not needed here).
        for name, cluster_ip, node_port, backend, port in (
                ("web", vip(21), WEB_NODE_PORT, self.web, WEB_BACKEND_PORT),
                ("far", vip(22), FAR_NODE_PORT, self.z, FAR_BACKEND_PORT)):
            c.api.upsert_service(NS, name, [cluster_ip], [(port, "UDP")], type="NodePort", node_ports=[node_port])
            n1.iptables("-t", "nat", "-I", "PREROUTING", "-d", n1.uplink_ip, "-p", "udp", "--dport", str(node_port),
                        "-j", "DNAT", "--to-destination", f"{backend.ip}:{port}")
        # Neighbours resolved everywhere first: every datagram then reaches the hook that drops it.
        for src, dst in ((self.a, self.b.ip), (self.a, self.z.ip), (self.a, self.inet.ip), (self.inet, n1.uplink_ip),
                         (self.inet, self.a.ip), (self.inet, self.web.ip), (n1, self.a.ip), (n1, self.b.ip),
                         (self.z, self.a.ip), (self.a, self.b.ip6), (self.a, self.z.ip6)):
            assert ping(src, dst) == 1, f"{src} cannot reach {dst}"
        self.daemon = start_netwatchd(c.netwatchd_args() + ["--probes", "drops"], netns=n1.netns)
        deadline = time.monotonic() + 20
        while not (self.daemon.value("netwatch_identity_up", source="apiserver") == 1
                   and self.daemon.value("netwatch_identity_pods") == 4):  # a, b, web and hostNetwork hn
            assert time.monotonic() < deadline, self.daemon.samples("netwatch_identity_up")
            time.sleep(0.2)
        time.sleep(0.5)  # the apiserver snapshot reached the classifier
        return self



@pytest.fixture(scope="module")
def world():
    yield from build_world(World)


def key(reason: str, protocol: str, cls: str, direction: str, pod: str, namespace: str = NS,
        service: str = "") -> tuple[str, ...]:
    return (reason, protocol, cls, direction, namespace, pod, NS if service else "", service)


def counts(d) -> dict[tuple[str, ...], float]:
    return {tuple(lab[k] for k in LABELS): v for lab, v in d.samples("netwatch_drops_total")}


def caused(d, before: dict, expected: dict[tuple[str, ...], int], exact: bool = True, timeout: float = 15.0
           ) -> dict[tuple[str, ...], float]:
    """Wait until every expected series grew by its count (then a little longer: a count that keeps growing is
    wrong too) and return the growth of every series of the same reasons/protocols that belongs to this lab's
    pods (namespace shop, or pod="unknown") or is expected: drops the test caused, wherever they landed."""
    def growth() -> dict[tuple[str, ...], float]:
        now = counts(d)
        kinds = {(k[0], k[1]) for k in expected}
        return {k: v - before.get(k, 0) for k, v in now.items()
                if v > before.get(k, 0) and (k[0], k[1]) in kinds
                and (k[4] == NS or k[5] == "unknown" or k in expected)}

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(growth().get(k, 0) >= n for k, n in expected.items()):
        time.sleep(0.3)
    time.sleep(1.0)
    return growth()


_SEND_UDP_EPERM = r"""
import socket, sys
dst, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s, refused = socket.socket(socket.AF_INET, socket.SOCK_DGRAM), 0
for _ in range(count):
    try:
        s.sendto(b"x" * 32, (dst, port))
    except PermissionError:  # netfilter dropped it in OUTPUT: sendto() says EPERM
        refused += 1
print(refused)
"""


def send_udp_refused_locally(ep, dst: str, port: int, count: int) -> int:
    """send_udp for a sender whose own OUTPUT chain drops the datagrams; returns how many sendto() refused."""
    return int(ep.run([sys.executable, "-c", _SEND_UDP_EPERM, dst, str(port), str(count)]).stdout)


def assert_only(got: dict, expected: dict[tuple[str, ...], int]) -> None:
    assert got == expected, f"\n got: {got}\nwant: {expected}"


# ---------------------------------------------------------------------------------------------------------
# container_to_container
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("loopback", ["127.0.0.1", "::1"])
def test_container_to_container_udp_is_the_pod_of_the_netns(world, loopback):
    """Loopback has no pod address: the pod is the one whose netns the packet died in (kubelet + netns map)."""
    d, before = world.daemon, counts(world.daemon)
    send_udp(world.a, loopback, 9101, 9)
    want = {key("NO_SOCKET", "udp", "container_to_container", "egress", "a"): 9}
    assert_only(caused(d, before, want), want)


def test_container_to_container_refused_tcp_connect(world):
    d, before = world.daemon, counts(world.daemon)
    assert tcp_connect(world.b, "127.0.0.1", 9102) == "refused"
    want = {key("NO_SOCKET", "tcp", "container_to_container", "egress", "b"): 1}
    assert_only(caused(d, before, want), want)


# ---------------------------------------------------------------------------------------------------------
# pod_to_pod_local / pod_to_pod_remote
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_pod_to_pod_local_forward_drop(world, family):
    a, b, v6 = world.a, world.b, family == "ipv6"
    src, dst = (a.ip6, b.ip6) if v6 else (a.ip, b.ip)
    world.n1.iptables("-I", "FORWARD", "-s", src, "-d", dst, "-p", "udp", "--dport", "9103", "-j", "DROP", v6=v6)
    d, before = world.daemon, counts(world.daemon)
    send_udp(a, dst, 9103, 11)
    want = {key("NETFILTER_DROP", "udp", "pod_to_pod_local", "egress", "a"): 11}
    assert_only(caused(d, before, want), want)


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_pod_to_pod_remote_egress_dropped_on_this_node(world, family):
    """a (n1) -> z (n2): dropped in n1's FORWARD before the vxlan encapsulation; a's egress."""
    a, z, v6 = world.a, world.z, family == "ipv6"
    src, dst = (a.ip6, z.ip6) if v6 else (a.ip, z.ip)
    world.n1.iptables("-I", "FORWARD", "-s", src, "-d", dst, "-p", "udp", "--dport", "9104", "-j", "DROP", v6=v6)
    d, before = world.daemon, counts(world.daemon)
    send_udp(a, dst, 9104, 7)
    want = {key("NETFILTER_DROP", "udp", "pod_to_pod_remote", "egress", "a"): 7}
    assert_only(caused(d, before, want), want)


def test_pod_to_pod_remote_ingress_dropped_on_this_node(world):
    """z (n2) -> a (n1): arrives over vxlan, dropped in n1's FORWARD; the local pod it was headed to, ingress."""
    a, z = world.a, world.z
    world.n1.iptables("-I", "FORWARD", "-s", z.ip, "-d", a.ip, "-p", "udp", "--dport", "9105", "-j", "DROP")
    d, before = world.daemon, counts(world.daemon)
    send_udp(z, a.ip, 9105, 6)
    want = {key("NETFILTER_DROP", "udp", "pod_to_pod_remote", "ingress", "a"): 6}
    assert_only(caused(d, before, want), want)


def test_pod_to_pod_remote_ingress_closed_port_in_the_pod(world):
    """z -> a's closed UDP port: NO_SOCKET inside a's netns, still a's ingress from a remote pod."""
    d, before = world.daemon, counts(world.daemon)
    send_udp(world.z, world.a.ip, 9106, 5)
    want = {key("NO_SOCKET", "udp", "pod_to_pod_remote", "ingress", "a"): 5}
    assert_only(caused(d, before, want), want)


# ---------------------------------------------------------------------------------------------------------
# pod_to_service
# ---------------------------------------------------------------------------------------------------------

def test_pod_to_service_udp_dropped_on_the_backend_port(world):
    """a -> ClusterIP cart, DNATed to b:5353, dropped there (a NetworkPolicy-like rule on the backend port):
    the client pod's egress, class pod_to_service, the Service named through conntrack's original destination."""
    world.n1.iptables("-I", "FORWARD", "-s", world.a.ip, "-p", "udp", "--dport", str(CART_BACKEND_PORT), "-j", "DROP")
    d, before = world.daemon, counts(world.daemon)
    send_udp(world.a, CART_VIP, CART_PORT, 13)
    want = {key("NETFILTER_DROP", "udp", "pod_to_service", "egress", "a", service="cart"): 13}
    assert_only(caused(d, before, want), want)


def test_pod_to_service_tcp_connect_dropped_on_the_backend_port(world):
    """TCP to ClusterIP api (backends b local, z remote): the SYN and its retransmits, whichever backend
    kube-proxy picked, are the client's pod_to_service drops of Service api."""
    world.n1.iptables("-I", "FORWARD", "-s", world.web.ip, "-p", "tcp", "--dport", str(API_BACKEND_PORT), "-j", "DROP")
    d, before = world.daemon, counts(world.daemon)
    assert tcp_connect(world.web, API_VIP, API_PORT, timeout=1.5) == "timeout"
    want = key("NETFILTER_DROP", "tcp", "pod_to_service", "egress", "web", service="api")
    got = caused(d, before, {want: 1})
    assert set(got) == {want} and got[want] >= 1, got


def test_pod_to_service_without_endpoints_is_rejected(world):
    """kube-proxy REJECTs connects to a Service with no endpoints: one refused SYN, the Service named by its
    VIP (no DNAT happened)."""
    d, before = world.daemon, counts(world.daemon)
    assert tcp_connect(world.b, EMPTY_VIP, EMPTY_PORT) == "refused"
    want = {key("NETFILTER_DROP", "tcp", "pod_to_service", "egress", "b", service="empty"): 1}
    assert_only(caused(d, before, want), want)


# ---------------------------------------------------------------------------------------------------------
# pod_to_external / external_to_pod
# ---------------------------------------------------------------------------------------------------------

def test_pod_to_external_dropped_on_this_node(world):
    """a -> the internet host, dropped in n1's FORWARD (before MASQUERADE): a's egress, pod_to_external."""
    world.n1.iptables("-I", "FORWARD", "-s", world.a.ip, "-d", world.inet.ip, "-p", "udp", "--dport", "9107",
                      "-j", "DROP")
    d, before = world.daemon, counts(world.daemon)
    send_udp(world.a, world.inet.ip, 9107, 8)
    want = {key("NETFILTER_DROP", "udp", "pod_to_external", "egress", "a"): 8}
    assert_only(caused(d, before, want), want)


def test_external_to_pod_address_dropped_on_this_node(world):
    """The internet host -> a's pod IP (routed), dropped in n1's FORWARD: a's ingress, external_to_pod."""
    world.n1.iptables("-I", "FORWARD", "-s", world.inet.ip, "-d", world.a.ip, "-p", "udp", "--dport", "9108",
                      "-j", "DROP")
    d, before = world.daemon, counts(world.daemon)
    send_udp(world.inet, world.a.ip, 9108, 10)
    want = {key("NETFILTER_DROP", "udp", "external_to_pod", "ingress", "a"): 10}
    assert_only(caused(d, before, want), want)


def test_external_to_node_port_with_a_local_backend(world):
    """The internet host -> n1's NodePort 30081, DNATed to the local pod web, dropped on the backend port:
    web's ingress (the local pod it was headed to), external_to_pod, Service web named by its node port."""
    world.n1.iptables("-I", "FORWARD", "-d", world.web.ip, "-p", "udp", "--dport", str(WEB_BACKEND_PORT), "-j", "DROP")
    d, before = world.daemon, counts(world.daemon)
    send_udp(world.inet, world.n1.uplink_ip, WEB_NODE_PORT, 12)
    want = {key("NETFILTER_DROP", "udp", "external_to_pod", "ingress", "web", service="web"): 12}
    assert_only(caused(d, before, want), want)


def test_external_to_node_port_with_a_remote_backend_is_the_nodes(world):
    """The internet host -> NodePort 30082, DNATed to z on n2, dropped on n1: no local pod is involved, so it is
    the node's (pod=""), external_to_pod, Service far."""
    world.n1.iptables("-I", "FORWARD", "-d", world.z.ip, "-p", "udp", "--dport", str(FAR_BACKEND_PORT), "-j", "DROP")
    d, before = world.daemon, counts(world.daemon)
    send_udp(world.inet, world.n1.uplink_ip, FAR_NODE_PORT, 4)
    want = {key("NETFILTER_DROP", "udp", "external_to_pod", "ingress", "", namespace="", service="far"): 4}
    assert_only(caused(d, before, want), want)


# ---------------------------------------------------------------------------------------------------------
# host
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sender", ["node", "hostNetwork pod"])
def test_host_to_pod_is_the_pods_ingress(world, sender):
    """The node netns (or a hostNetwork pod, which shares it) -> a's closed port: a's ingress, class host. The
    node's source address is cni0's gateway, inside the pod CIDR: it must not pass for a local pod."""
    ep = world.n1 if sender == "node" else world.hn
    d, before = world.daemon, counts(world.daemon)
    send_udp(ep, world.a.ip, 9109, 6)
    want = {key("NO_SOCKET", "udp", "host", "ingress", "a"): 6}
    assert_only(caused(d, before, want), want)


@pytest.mark.parametrize("target", ["node ip", "gateway"])
def test_pod_to_host_is_the_pods_egress(world, target):
    """a -> a closed port of the node (its node IP, or cni0's gateway address): a's egress, class host."""
    dst = world.n1.node_ip if target == "node ip" else world.n1.gateway
    d, before = world.daemon, counts(world.daemon)
    send_udp(world.a, dst, 9110, 5)
    want = {key("NO_SOCKET", "udp", "host", "egress", "a"): 5}
    assert_only(caused(d, before, want), want)


def test_node_loopback_is_the_nodes_own(world):
    """The node's own loopback traffic: pod="", class host (not container_to_container)."""
    d, before = world.daemon, counts(world.daemon)
    send_udp(world.n1, "127.0.0.1", 9111, 3)
    want = {key("NO_SOCKET", "udp", "host", "egress", "", namespace=""): 3}
    assert_only(caused(d, before, want), want)


def test_node_to_cluster_ip_with_a_local_backend_is_host(world):
    """The node -> ClusterIP cart, DNATed (OUTPUT) to b and dropped on the node: b's ingress, class host — the
    node's own traffic to a Service is neither pod_to_service nor external_to_pod."""
    world.n1.iptables("-I", "OUTPUT", "-d", world.b.ip, "-p", "udp", "--dport", str(CART_BACKEND_PORT), "-j", "DROP")
    d, before = world.daemon, counts(world.daemon)
    assert send_udp_refused_locally(world.n1, CART_VIP, CART_PORT, 5) == 5
    want = {key("NETFILTER_DROP", "udp", "host", "ingress", "b"): 5}
    assert_only(caused(d, before, want), want)
