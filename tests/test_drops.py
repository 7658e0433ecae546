"""Drops end to end: real packets through a lab node, dropped by the real kernel, counted by netwatchd.

netwatchd runs inside the lab node's network namespace (as a hostNetwork DaemonSet runs in the node's),
classifying by address from --pod-cidr/--cluster-cidr/--service-cidr (no pod identity yet: pod="").
Every expected number is what the test itself caused.
"""

from __future__ import annotations

import time

import pytest

from netwatchd.lab.traffic import ping, send_udp, tcp_connect
from tests.support import bpf_programs, prog_ids_of, start_netwatchd

pytestmark = pytest.mark.kernel

CLUSTER_CIDRS = ["10.244.0.0/16,fd00:10:244::/48"]
SERVICE_CIDRS = ["10.96.0.0/12,fd00:10:96::/108"]


@pytest.fixture
def node(lab):
    n = lab.add_node("n1", pod_cidr="10.244.1.0/24", pod_cidr6="fd00:10:244:1::/64")
    for name in ("a", "b", "c"):
        n.add_pod(name)
    return n


@pytest.fixture
def daemon(node):
    d = start_netwatchd(
        ["--pod-cidr", f"{node.pod_cidr},{node.pod_cidr6}", "--cluster-cidr", *CLUSTER_CIDRS,
         "--service-cidr", *SERVICE_CIDRS],
        netns=node.netns,
    )
    try:
        yield d
    finally:
        assert d.stop() == 0, "".join(d.stderr_lines)[-2000:]


def settled(d, expected, **labels):
    """Wait for `expected`, then once more after a pause: a count that keeps growing is wrong too."""
    d.wait_for("netwatch_drops_total", expected, **labels)
    time.sleep(1.0)
    return d.value("netwatch_drops_total", **labels)


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_connect_to_closed_port_is_no_socket(node, daemon, family):
    a, b = node.pods["default/a"], node.pods["default/b"]
    dst = b.ip if family == "ipv4" else b.ip6
    labels = dict(reason="NO_SOCKET", protocol="tcp", traffic_class="pod_to_pod_local", direction="egress",
                  namespace="", pod="")
    before = daemon.value("netwatch_drops_total", **labels)
    assert tcp_connect(a, dst, 9, timeout=2) == "refused"
    assert settled(daemon, before + 1, **labels) == before + 1


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_forward_drop_rule_is_netfilter_drop_with_exact_count(node, daemon, family):
    a, c = node.pods["default/a"], node.pods["default/c"]
    v6 = family == "ipv6"
    src, dst = (a.ip6, c.ip6) if v6 else (a.ip, c.ip)
    assert ping(a, dst, count=1) == 1  # neighbours resolved: every datagram reaches the FORWARD hook
    node.iptables("-I", "FORWARD", "-s", src, "-d", dst, "-p", "udp", "--dport", "7777", "-j", "DROP", v6=v6)
    labels = dict(reason="NETFILTER_DROP", protocol="udp", traffic_class="pod_to_pod_local", direction="egress")
    before = daemon.value("netwatch_drops_total", **labels)
    before_bytes = daemon.value("netwatch_dropped_bytes_total", **labels)
    sent = 37
    send_udp(a, dst, 7777, sent, payload=b"x" * 32)
    assert settled(daemon, before + sent, **labels) == before + sent
    ip_header = 40 if v6 else 20
    assert daemon.value("netwatch_dropped_bytes_total", **labels) - before_bytes == sent * (ip_header + 8 + 32)


def test_drop_towards_local_pod_from_a_remote_pod_is_ingress(lab, node, daemon):
    """The source is no local pod: the drop belongs to the local pod it was headed to (ingress)."""
    node2 = lab.add_node("n2", pod_cidr="10.244.2.0/24", pod_cidr6="fd00:10:244:2::/64")
    z = node2.add_pod("z")
    lab.add_uplink(node, node2)
    a = node.pods["default/a"]
    assert ping(z, a.ip, count=1) == 1
    node.iptables("-I", "FORWARD", "-s", z.ip, "-d", a.ip, "-p", "udp", "--dport", "5353", "-j", "DROP")
    labels = dict(reason="NETFILTER_DROP", protocol="udp", traffic_class="pod_to_pod_remote", direction="ingress")
    before = daemon.value("netwatch_drops_total", **labels)
    send_udp(z, a.ip, 5353, 5)
    assert settled(daemon, before + 5, **labels) == before + 5


def test_clean_exit_detaches_everything(node):
    d = start_netwatchd(["--pod-cidr", node.pod_cidr], netns=node.netns)
    try:
        ours = prog_ids_of(d.proc.pid)
        loaded = bpf_programs()
        assert ours and any("kfree_skb" in loaded.get(i, "") for i in ours), (ours, loaded)
    finally:
        code = d.stop()
    assert code == 0
    assert not ours & set(bpf_programs()), "netwatchd left BPF programs attached after SIGTERM"
    assert any(e.get("event") == "detached" for e in d.logs)


def test_sigint_also_exits_cleanly(node):
    import signal

    d = start_netwatchd([], netns=node.netns)
    ours = prog_ids_of(d.proc.pid)
    d.proc.send_signal(signal.SIGINT)
    assert d.proc.wait(20) == 0
    assert ours and not ours & set(bpf_programs())


def test_ignored_reason_is_filtered_in_the_kernel(node):
    a, b = node.pods["default/a"], node.pods["default/b"]
    d = start_netwatchd(["--pod-cidr", node.pod_cidr, "--ignore-drop-reasons", "NO_SOCKET"], netns=node.netns)
    try:
        assert tcp_connect(a, b.ip, 9, timeout=2) == "refused"
        a_drop = dict(reason="NETFILTER_DROP", protocol="udp", traffic_class="pod_to_pod_local")
        node.iptables("-I", "FORWARD", "-s", a.ip, "-d", b.ip, "-p", "udp", "-j", "DROP")
        send_udp(a, b.ip, 7777, 3)
        assert settled(d, 3, **a_drop) == 3  # the probe is running and counting other reasons
        assert d.value("netwatch_drops_total", reason="NO_SOCKET") == 0
    finally:
        assert d.stop() == 0


def test_endpoints(daemon):
    status, text = daemon.get("/metrics")
    assert status == 200 and "# TYPE netwatch_drops_total counter" in text
    status, om = daemon.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert status == 200 and om.rstrip().endswith("# EOF") and "# TYPE netwatch_drops counter" in om
    assert daemon.get("/healthz") == (200, "ok\n")
    assert daemon.get("/readyz") == (200, "ready\n")
    assert daemon.get("/nope")[0] == 404
