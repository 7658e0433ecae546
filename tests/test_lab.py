"""Tests of the lab itself (netwatchd.lab): real namespaces, bridges, iptables and vxlan; needs root."""

from __future__ import annotations

import collections
import contextlib
import ipaddress
import json
import os
import select
import signal
import subprocess
import sys
import uuid

import pytest

from netwatchd.lab import netns as labmod
from netwatchd.lab.netns import Lab, Node, cleanup_stale
from netwatchd.lab.traffic import UdpSink, ping, send_udp, start_tcp_server, tcp_connect, tcp_request

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="lab namespaces need root"),
    pytest.mark.timeout(60),
]


def _net_inodes_in_use() -> set[int]:
    """Inodes of the network namespaces of every process on the machine."""
    inodes = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            inodes.add(os.stat(f"/proc/{pid}/ns/net").st_ino)
    return inodes


def _root_links() -> list[str]:
    out = subprocess.run(["ip", "-j", "link", "show"], check=True, capture_output=True, text=True).stdout
    return [link["ifname"] for link in json.loads(out)]


def _assert_gone(lab: Lab, inodes: set[int], pids: list[int]) -> None:
    assert not [n for n in os.listdir(labmod.NETNS_DIR) if n.startswith(lab.prefix)]
    assert not [n for n in _root_links() if lab.id in n]
    assert not inodes & _net_inodes_in_use()
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}")  # killed and reaped
    assert not os.path.exists(labmod._marker(lab.id))


def _two_pods(lab: Lab) -> tuple[Node, labmod.Pod, labmod.Pod]:
    node = lab.add_node("node1")
    return node, node.add_pod("a"), node.add_pod("b")


# ----------------------------------------------------------------------------------------------------
# Phase 1: one node
# ----------------------------------------------------------------------------------------------------


def test_node_and_pod_layout(lab: Lab) -> None:
    node, a, b = _two_pods(lab)
    assert lab.nodes == {"node1": node} and node.pods == {"default/a": a, "default/b": b}
    assert (node.gateway, node.gateway6, node.bridge) == ("10.244.1.1", "fd00:10:244:1::1", "cni0")
    assert (a.ip, a.ip6, b.ip, b.ip6) == ("10.244.1.2", "fd00:10:244:1::2", "10.244.1.3", "fd00:10:244:1::3")
    assert node.netns.startswith(f"nwlab-{lab.id}-") and a.netns.startswith(lab.prefix)
    assert len({node.netns_inode(), a.netns_inode(), b.netns_inode()}) == 3
    assert uuid.UUID(a.uid) and a.uid != b.uid
    assert a.host_veth != b.host_veth and all(len(v) <= 15 for v in (a.host_veth, b.host_veth))
    links = {x["ifname"]: x for x in json.loads(node.run(["ip", "-j", "-d", "link"]).stdout)}
    assert links[a.host_veth]["ifindex"] == a.host_veth_ifindex
    assert links[a.host_veth]["master"] == "cni0"
    assert json.loads(a.run(["ip", "-j", "link", "show", "eth0"]).stdout)[0]["address"] == a.mac
    for key in ("net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding",
                "net.bridge.bridge-nf-call-iptables", "net.bridge.bridge-nf-call-ip6tables"):
        assert node.read_sysctl(key) == "1", key
    host = node.add_pod("hostnet", namespace="kube-system", host_network=True)
    assert host.netns == node.netns and host.ip == node.node_ip and not host.host_veth


def test_pods_ping_each_other_v4_v6(lab: Lab) -> None:
    node, a, b = _two_pods(lab)
    assert ping(a, b.ip) == 1
    assert ping(a, b.ip6) == 1
    assert ping(b, node.gateway) == 1 and ping(b, node.gateway6) == 1


def test_tcp_ok_refused_and_echo(lab: Lab) -> None:
    _, a, b = _two_pods(lab)
    start_tcp_server(b, 8080)
    assert tcp_connect(a, b.ip, 8080) == "ok"
    assert tcp_connect(a, b.ip6, 8080) == "ok"
    assert tcp_connect(a, b.ip, 8081) == "refused"
    assert tcp_request(a, b.ip, 8080, b"hello").split(b"\n", 1)[1] == b"hello"
    peer, _, local, lport = tcp_request(a, b.ip6, 8080).decode().split()
    assert (peer, local, lport) == (a.ip6, b.ip6, "8080")


def test_forward_drop_in_node_netns_sees_bridged_traffic(lab: Lab) -> None:
    """br_netfilter is active *inside* the node netns: FORWARD rules there filter bridged pod traffic."""
    node, a, b = _two_pods(lab)
    start_tcp_server(b, 8080)
    sink = UdpSink(b, 9000)
    send_udp(a, b.ip, 9000, 5)
    send_udp(a, b.ip6, 9000, 3)
    assert sink.stop() == 8

    node.iptables("-I", "FORWARD", "-s", a.ip, "-d", b.ip, "-j", "DROP")
    node.iptables("-I", "FORWARD", "-s", a.ip6, "-d", b.ip6, "-j", "DROP", v6=True)
    sink = UdpSink(b, 9000)
    send_udp(a, b.ip, 9000, 5)
    send_udp(a, b.ip6, 9000, 3)
    assert sink.stop() == 0
    assert tcp_connect(a, b.ip, 8080, timeout=0.5) == "timeout"
    assert tcp_connect(a, b.ip6, 8080, timeout=0.5) == "timeout"

    # Control: with bridge-nf-call-iptables off in the node netns, the bridge bypasses iptables, and the
    # host's own setting is untouched (the sysctl is per netns).
    with open("/proc/sys/net/bridge/bridge-nf-call-iptables") as f:
        host_before = f.read()
    node.sysctls({"net.bridge.bridge-nf-call-iptables": 0})
    assert tcp_connect(a, b.ip, 8080, timeout=0.5) == "ok"
    with open("/proc/sys/net/bridge/bridge-nf-call-iptables") as f:
        assert f.read() == host_before


def test_close_leaves_nothing_and_is_idempotent() -> None:
    lab = Lab()
    try:
        node, a, b = _two_pods(lab)
        start_tcp_server(b, 8080)
        sleeper = a.popen(["sleep", "60"])
        # a process the lab did not start, still inside one of its namespaces
        stray = subprocess.Popen(["ip", "netns", "exec", node.netns, "sleep", "60"], start_new_session=True)
        inodes = {node.netns_inode(), a.netns_inode(), b.netns_inode()}
        names = lab.netns_names()
        assert len(names) == 3
    finally:
        lab.close()
    stray.wait(timeout=5)
    assert sleeper.poll() is not None
    _assert_gone(lab, inodes, [sleeper.pid, stray.pid])
    lab.close()  # idempotent
    with pytest.raises(RuntimeError):
        lab.add_node("again")


def test_close_on_partial_state() -> None:
    lab = Lab()
    node = lab.add_node("node1")
    with pytest.raises(subprocess.CalledProcessError):
        node.iptables("-A", "NO-SUCH-CHAIN", "-j", "DROP")
    lab._netns.append(lab.prefix + "never-created")  # as if creation had been interrupted
    lab.close()
    _assert_gone(lab, set(), [])


def test_two_labs_do_not_collide() -> None:
    with Lab() as one, Lab() as two:
        assert one.id != two.id
        pods = []
        for lab in (one, two):
            node = lab.add_node("node1")
            pods.append((node.add_pod("a"), node.add_pod("b")))
        (a1, b1), (a2, b2) = pods
        assert a1.ip == a2.ip and a1.netns != a2.netns and a1.host_veth != a2.host_veth
        assert not set(one.netns_names()) & set(two.netns_names())
        with pytest.raises(RuntimeError, match="in use"):
            Lab(tag=one.id)
        one.close()
        assert ping(a2, b2.ip) == 1 and not one.netns_names() and len(two.netns_names()) == 3


_CHILD = """
import sys, time
from netwatchd.lab.netns import Lab
lab = Lab()
node = lab.add_node("node1")
node.add_pod("a")
p = node.popen(["sleep", "60"])
print(lab.id, p.pid, flush=True)
time.sleep(60)
"""


def _child_lab() -> tuple[subprocess.Popen, str, int]:
    """Start a process that builds a lab and hangs; return it, its lab id and its tracked sleeper pid."""
    child = subprocess.Popen([sys.executable, "-c", _CHILD], stdout=subprocess.PIPE, text=True)
    assert select.select([child.stdout], [], [], 20)[0], "child lab did not start"
    run_id, pid = child.stdout.readline().split()
    return child, run_id, int(pid)


def test_sigterm_cleans_up() -> None:
    child, run_id, sleeper = _child_lab()
    assert [n for n in os.listdir(labmod.NETNS_DIR) if n.startswith(f"nwlab-{run_id}-")]
    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=20) == -signal.SIGTERM
    assert not [n for n in os.listdir(labmod.NETNS_DIR) if n.startswith(f"nwlab-{run_id}-")]
    assert not os.path.exists(f"/proc/{sleeper}") and not os.path.exists(labmod._marker(run_id))


def test_cleanup_stale_removes_dead_runs_only(lab: Lab) -> None:
    live = lab.add_node("node1")
    child, run_id, sleeper = _child_lab()
    assert not [n for n in cleanup_stale() if n.startswith(f"nwlab-{run_id}-")]  # owner alive: kept
    child.kill()  # SIGKILL: no chance to clean
    child.wait(timeout=10)
    stale = [n for n in os.listdir(labmod.NETNS_DIR) if n.startswith(f"nwlab-{run_id}-")]
    assert len(stale) == 2 and os.path.exists(f"/proc/{sleeper}")
    assert sorted(cleanup_stale()) == sorted(stale)
    assert not [n for n in os.listdir(labmod.NETNS_DIR) if n.startswith(f"nwlab-{run_id}-")]
    assert not os.path.exists(labmod._marker(run_id))
    for _ in range(100):  # the sleeper was SIGKILLed; it is reaped by init
        if not os.path.exists(f"/proc/{sleeper}"):
            break
        select.select([], [], [], 0.02)
    assert not os.path.exists(f"/proc/{sleeper}")
    assert live.netns in lab.netns_names()  # our own live lab untouched


# ----------------------------------------------------------------------------------------------------
# Phase 2: two nodes over vxlan, ClusterIP services, internet with masquerade
# ----------------------------------------------------------------------------------------------------


@pytest.fixture
def two_nodes(lab: Lab) -> tuple[Node, Node]:
    n1, n2 = lab.add_node("node1"), lab.add_node("node2")
    lab.add_uplink(n1, n2)
    return n1, n2


def test_cross_node_over_vxlan(lab: Lab, two_nodes: tuple[Node, Node]) -> None:
    n1, n2 = two_nodes
    assert (n2.pod_cidr, n2.pod_cidr6, n2.node_ip) == ("10.244.2.0/24", "fd00:10:244:2::/64", "192.168.100.2")
    a, b = n1.add_pod("a"), n2.add_pod("b")
    assert ping(a, b.ip) == 1 and ping(b, a.ip) == 1
    assert ping(a, b.ip6) == 1
    start_tcp_server(b, 8080)
    assert tcp_request(a, b.ip, 8080).split()[0].decode() == a.ip  # routed, not NATed
    assert tcp_request(a, b.ip6, 8080, b"x" * 3000).endswith(b"x" * 3000)  # multi-segment payload
    # the traffic really is vxlan-encapsulated on the underlay
    stats = json.loads(n1.run(["ip", "-j", "-s", "link", "show", n1.vtep]).stdout)[0]["stats64"]
    assert stats["tx"]["packets"] > 0 and stats["rx"]["packets"] > 0


def test_cluster_ip_service(lab: Lab, two_nodes: tuple[Node, Node]) -> None:
    n1, n2 = two_nodes
    client, local_be, remote_be = n1.add_pod("client"), n1.add_pod("web-1"), n2.add_pod("web-2")
    for be in (local_be, remote_be):
        start_tcp_server(be, 8080)
    n1.add_cluster_ip_service("10.96.0.10", 80, [(local_be.ip, 8080), (remote_be.ip, 8080)])
    n1.add_cluster_ip_service("fd00:10:96::10", 80, [(local_be.ip6, 8080), (remote_be.ip6, 8080)])
    served = collections.Counter()
    for _ in range(16):  # both backends chosen: fails with probability 2 * 0.5**16
        peer, _, local, lport = tcp_request(client, "10.96.0.10", 80).decode().split()
        assert peer == client.ip and lport == "8080"  # DNAT only, client address preserved
        served[local] += 1
    assert set(served) == {local_be.ip, remote_be.ip}
    peer, _, local, _ = tcp_request(client, "fd00:10:96::10", 80).decode().split()
    assert peer == client.ip6 and local in (local_be.ip6, remote_be.ip6)
    # hairpin: a backend reaching the service (possibly itself) and the node itself
    assert tcp_connect(local_be, "10.96.0.10", 80) == "ok"
    assert tcp_connect(n1, "10.96.0.10", 80) == "ok"


def test_internet_with_masquerade(lab: Lab, two_nodes: tuple[Node, Node]) -> None:
    n1, n2 = two_nodes
    a, b = n1.add_pod("a"), n2.add_pod("b")
    inet = lab.add_internet(n1)
    assert lab.add_internet(n2) is inet
    assert ipaddress.ip_address(inet.ip) in ipaddress.ip_network("203.0.113.0/24")
    start_tcp_server(inet, 80)
    assert ping(a, inet.ip) == 1
    assert tcp_request(a, inet.ip, 80).split()[0].decode() == n1.uplink_ip
    assert tcp_request(b, inet.ip, 80).split()[0].decode() == n2.uplink_ip
    assert n1.uplink_ip != n2.uplink_ip
