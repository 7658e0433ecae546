"""The tc probe end to end: real packets through lab nodes, counted (once) and timed by netwatchd's tc programs.

netwatchd runs inside lab node n1's netns (as a hostNetwork DaemonSet runs in the node's) with only the tc probe,
classifying by address from --pod-cidr/--cluster-cidr/--service-cidr. Every expected number is what the test
itself sent; counters are compared before/after (growth), and across *all* label sets where the claim is "this
traffic is counted once and nowhere else".
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from netwatchd.export.histogram import DEFAULT_BOUNDS_S, quantile
from netwatchd.lab.traffic import UdpSink, ping, send_udp, start_tcp_server, tcp_request
from tests.support import prog_ids_of, start_netwatchd, wait_until

pytestmark = pytest.mark.kernel

CLUSTER_CIDRS = ["10.244.0.0/16,fd00:10:244::/48"]
SERVICE_CIDRS = ["10.96.0.0/12,fd00:10:96::/108"]
PACKETS, BYTES = "netwatch_packets_total", "netwatch_bytes_total"
TRANSIT = "netwatch_node_transit_seconds"
LOCAL = dict(traffic_class="pod_to_pod_local")


def tc_args(node, *extra: str) -> list[str]:
    return ["--pod-cidr", f"{node.pod_cidr},{node.pod_cidr6}", "--cluster-cidr", *CLUSTER_CIDRS,
            "--service-cidr", *SERVICE_CIDRS, "--probes", "tc", *extra]


def hush(ep) -> None:
    """No more IPv6 router solicitations from this endpoint: the kernel keeps sending them (with backoff) on
    a new link, and they would land in the `host` series the tests compare exactly."""
    ep.run(["sh", "-c", "for f in /proc/sys/net/ipv6/conf/*/router_solicitations; do echo 0 > $f; done"])


def add_pod(node, name: str):
    pod = node.add_pod(name)
    hush(pod)
    return pod


@pytest.fixture
def node(lab):
    n = lab.add_node("n1", pod_cidr="10.244.1.0/24", pod_cidr6="fd00:10:244:1::/64")
    for name in ("a", "b"):
        add_pod(n, name)
    return n


@pytest.fixture
def daemon(node):
    d = start_netwatchd(tc_args(node), netns=node.netns)
    try:
        yield d
    finally:
        assert d.stop() == 0, "".join(d.stderr_lines)[-2000:]


def table(d, name: str) -> dict[tuple, float]:
    """Every series of a counter: (traffic_class, direction, namespace, pod) -> value."""
    return {(lab["traffic_class"], lab["direction"], lab["namespace"], lab["pod"]): v for lab, v in d.samples(name)}


def growth(d, before: dict[tuple, float], name: str = PACKETS) -> dict[tuple, float]:
    now = table(d, name)
    return {k: v - before.get(k, 0) for k, v in now.items() if v != before.get(k, 0)}


def quiet(d, timeout: float = 10.0) -> tuple[dict, dict]:
    """Counters once they stop moving (two reads 1 s apart agree): the baseline before a test's traffic."""
    deadline = time.monotonic() + timeout
    last = (table(d, PACKETS), table(d, BYTES))
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = (table(d, PACKETS), table(d, BYTES))
        if now == last:
            return now
        last = now
    return last


def settled_growth(d, before: dict, expected_total: float, name: str = PACKETS, timeout: float = 15.0) -> dict:
    """Growth of every series once the total reached `expected_total`, read again after a pause (a count that
    keeps growing is wrong too)."""
    deadline = time.monotonic() + timeout
    while sum(growth(d, before, name).values()) < expected_total and time.monotonic() < deadline:
        time.sleep(0.3)
    time.sleep(1.0)
    return growth(d, before, name)


def assert_counted_once(got: dict, expected: dict) -> None:
    """`expected` series grew by exactly their values; nothing else grew but a little `host` chatter (new
    interfaces' IPv6 router solicitations and MLD reports: link-local to multicast), so the test's traffic is
    nowhere counted twice."""
    assert {k: got.get(k, 0) for k in expected} == expected, got
    others = {k: v for k, v in got.items() if k not in expected}
    assert all(k[0] == "host" and v <= 6 for k, v in others.items()), got


def buckets(d, **labels: str) -> list[int]:
    """Per-bucket counts (not cumulative) of the transit histogram series matching `labels`."""
    cum: dict[float, float] = {}
    for lab, v in d.samples(f"{TRANSIT}_bucket"):
        if all(lab.get(k) == x for k, x in labels.items()):
            le = float(lab["le"])
            cum[le] = cum.get(le, 0) + v
    edges = sorted(cum)
    out, prev = [], 0.0
    for le in edges:
        out.append(int(cum[le] - prev))
        prev = cum[le]
    return out or [0] * (len(DEFAULT_BOUNDS_S) + 1)


def udp_burst(src, dst_ep, dst_ip: str, port: int, count: int, payload: bytes = b"x" * 32) -> int:
    """`count` datagrams into a listening socket, so no ICMP port unreachable comes back to pollute the counts
    (a burst may overflow its receive buffer: the datagrams still crossed the node). Returns how many it read."""
    sink = UdpSink(dst_ep, port)
    send_udp(src, dst_ip, port, count, payload=payload)
    time.sleep(0.2)
    return sink.stop()


# ------------------------------------------------------------------------------------------------------
# Volume: counted once, right class and direction, exact bytes
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_pod_to_pod_local_is_counted_once_with_exact_bytes(node, daemon, family):
    a, b = node.pods["default/a"], node.pods["default/b"]
    dst = b.ip if family == "ipv4" else b.ip6
    assert ping(a, dst) == 1  # neighbours resolved: no ND/ARP in the measured window
    before_p, before_b = quiet(daemon)
    sent = 200
    udp_burst(a, b, dst, 7001, sent)
    got = settled_growth(daemon, before_p, sent)
    # one packet per datagram, in one series only: the sender's egress (not again at b's veth or cni0)
    assert_counted_once(got, {("pod_to_pod_local", "egress", "", ""): sent})
    ip_header = 40 if family == "ipv6" else 20
    assert growth(daemon, before_b, BYTES)[("pod_to_pod_local", "egress", "", "")] == sent * (ip_header + 8 + 32)


def test_tcp_segments_not_gso_aggregates_are_counted(node, daemon):
    """Veths pass TSO aggregates of up to 64 KiB as one skb: the counter has the segments on the wire."""
    a, b = node.pods["default/a"], node.pods["default/b"]
    start_tcp_server(b, 9000)
    before_p, before_b = quiet(daemon)
    payload = 60000  # (passed on a command line)
    assert len(tcp_request(a, b.ip, 9000, b"y" * payload, timeout=10)) > payload  # echoed back
    time.sleep(1.5)
    packets = growth(daemon, before_p)[("pod_to_pod_local", "egress", "", "")]
    nbytes = growth(daemon, before_b, BYTES)[("pod_to_pod_local", "egress", "", "")]
    mss = 1448  # 1500 - 20 - 20 - 12 (timestamps)
    assert packets >= 2 * payload / mss  # both directions' data segments, plus ACKs
    assert 2 * payload < nbytes < 2 * payload + packets * 60  # payload + 52-byte headers per segment


def test_pod_to_remote_pod_over_vxlan_both_directions(lab, node):
    n2 = lab.add_node("n2", pod_cidr="10.244.2.0/24", pod_cidr6="fd00:10:244:2::/64")
    z = add_pod(n2, "z")
    a = node.pods["default/a"]
    d = start_netwatchd(tc_args(node, "--tc-transit-sample", "1"), netns=node.netns)
    try:
        lab.add_uplink(node, n2)  # while netwatchd runs: the link watcher picks the devices up
        deadline = time.monotonic() + 5
        while d.value("netwatch_tc_interfaces", role="uplink") < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert d.value("netwatch_tc_interfaces", role="uplink") == 2  # underlay veth + vxlan device
        assert ping(a, z.ip) == 1
        before, _ = quiet(d)
        out_before = sum(buckets(d, traffic_class="pod_to_pod_remote", path="veth_to_uplink"))
        in_before = sum(buckets(d, traffic_class="pod_to_pod_remote", path="uplink_to_veth"))
        udp_burst(a, z, z.ip, 7002, 50)
        udp_burst(z, a, a.ip, 7003, 30)
        got = settled_growth(d, before, 80)
        # the encapsulated outer packets on the underlay are not counted again (as the node's)
        expected = {("pod_to_pod_remote", "egress", "", ""): 50, ("pod_to_pod_remote", "ingress", "", ""): 30}
        assert_counted_once(got, expected)
        # timed from a's veth to the vxlan device, and from the vxlan device to a's veth
        assert sum(buckets(d, traffic_class="pod_to_pod_remote", path="veth_to_uplink")) - out_before == 50
        assert sum(buckets(d, traffic_class="pod_to_pod_remote", path="uplink_to_veth")) - in_before == 30
    finally:
        assert d.stop() == 0


def test_masqueraded_pod_to_external_and_its_replies_belong_to_the_pod(lab, node):
    """The replies reach the uplink addressed to the node (MASQUERADE), yet they are the pod's: the uplink
    ingress defers them to the pod's veth, where they are counted (and timed)."""
    inet = lab.add_internet(node)  # before netwatchd starts: the node's uplink address is the node's
    hush(inet)
    a = node.pods["default/a"]
    assert ping(a, inet.ip) == 1
    d = start_netwatchd(tc_args(node, "--tc-transit-sample", "1"), netns=node.netns)
    try:
        assert d.value("netwatch_tc_interfaces", role="uplink") == 1
        before, _ = quiet(d)
        assert ping(a, inet.ip, count=20, timeout=1.0) == 20
        got = settled_growth(d, before, 40)
        expected = {("pod_to_external", "egress", "", ""): 20, ("external_to_pod", "ingress", "", ""): 20}
        assert_counted_once(got, expected)
        assert sum(buckets(d, traffic_class="pod_to_external", path="veth_to_uplink")) == 20
        assert sum(buckets(d, traffic_class="external_to_pod", path="uplink_to_veth")) == 20
    finally:
        assert d.stop() == 0


def test_pod_to_cluster_ip_is_pod_to_service_where_it_enters(node, daemon):
    """Counted at the client's veth before kube-proxy's DNAT: the class is pod_to_service, and the backend's
    veth does not count it again."""
    a, b = node.pods["default/a"], node.pods["default/b"]
    node.add_cluster_ip_service("10.96.0.50", 53, [(b.ip, 5353)], proto="udp")
    assert ping(a, b.ip) == 1
    before, _ = quiet(daemon)
    sink = UdpSink(b, 5353)  # the backend port: no ICMP port unreachable comes back
    send_udp(a, "10.96.0.50", 53, 40)
    time.sleep(0.2)
    assert sink.stop() == 40
    got = settled_growth(daemon, before, 40)
    assert_counted_once(got, {("pod_to_service", "egress", "", ""): 40})


def test_node_own_traffic_is_counted_where_it_leaves(node, daemon):
    a = node.pods["default/a"]
    assert ping(node, a.ip) == 1
    before, _ = quiet(daemon)
    assert ping(node, a.ip, count=10) == 10
    got = settled_growth(daemon, before, 20)
    # requests: created by the node's stack, counted at a's veth egress; replies: sent by a, at its ingress.
    # The node's address on cni0 is in the pod CIDR, but it is the node's (classify: host), not a pod.
    assert {k: got.get(k, 0) for k in (("host", "ingress", "", ""), ("host", "egress", "", ""))} == {
        ("host", "ingress", "", ""): 10, ("host", "egress", "", ""): 10}
    assert set(got) <= {("host", "ingress", "", ""), ("host", "egress", "", "")}, got


# ------------------------------------------------------------------------------------------------------
# Node transit time
# ------------------------------------------------------------------------------------------------------


def test_every_pod_to_pod_packet_is_timed_once_when_sampling_is_off(node):
    a, b = node.pods["default/a"], node.pods["default/b"]
    d = start_netwatchd(tc_args(node, "--tc-transit-sample", "1"), netns=node.netns)
    try:
        assert ping(a, b.ip) == 1
        quiet(d)
        labels = dict(traffic_class="pod_to_pod_local", path="veth_to_veth")
        before = sum(buckets(d, **labels))
        udp_burst(a, b, b.ip, 7004, 300)
        time.sleep(1.5)
        after = buckets(d, **labels)
        assert sum(after) - before == 300  # each datagram, once (its ICMP-free way a -> cni0 -> b)
        # an idle lab bridges a packet in microseconds: well under a millisecond
        assert quantile(after, 0.99) < 1e-3
    finally:
        assert d.stop() == 0


def test_transit_time_grows_with_the_forward_ruleset(node, daemon):
    """A long iptables FORWARD chain of non-matching rules (br_netfilter: bridged pod traffic walks it) slows
    the node's datapath; the transit histogram must show it."""
    a, b = node.pods["default/a"], node.pods["default/b"]
    labels = dict(traffic_class="pod_to_pod_local", path="veth_to_veth")
    assert ping(a, b.ip) == 1

    def median_of_burst(port: int) -> float:
        before = buckets(daemon, **labels)
        udp_burst(a, b, b.ip, port, 3000)
        time.sleep(1.5)
        after = buckets(daemon, **labels)
        delta = [x - y for x, y in zip(after, before + [0] * (len(after) - len(before)), strict=True)]
        assert sum(delta) >= 50, f"too few transit samples: {delta}"  # 1 in 16 of 3000, at random
        q = quantile(delta, 0.5)
        assert q is not None
        return q

    idle = median_of_burst(7005)
    rules = "\n".join(f"-A FORWARD -s 198.18.{i // 250}.{i % 250 + 1}/32 -p udp --dport 9 -j DROP"
                      for i in range(5000))
    node.run(["iptables-restore", "--noflush"], input=f"*filter\n{rules}\nCOMMIT\n")
    slow = median_of_burst(7006)
    assert idle < 1e-3
    assert slow > 2 * idle, (idle, slow)


# ------------------------------------------------------------------------------------------------------
# Attach / detach lifecycle
# ------------------------------------------------------------------------------------------------------


def tc_filters(node, dev: str, direction: str) -> str:
    return node.run(["tc", "filter", "show", "dev", dev, direction]).stdout


def clsact_present(node, dev: str) -> bool:
    return "clsact" in node.run(["tc", "qdisc", "show", "dev", dev]).stdout


def our_links(prog_ids: set[int]) -> list[dict]:
    out = subprocess.run(["bpftool", "-j", "link", "show"], capture_output=True, text=True, check=True).stdout
    return [link for link in json.loads(out or "[]") if link.get("prog_id") in prog_ids]


def loaded_programs() -> set[int]:
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True).stdout
    return {p["id"] for p in json.loads(out or "[]")}


@pytest.mark.parametrize("mode", ["tcx", "clsact"])
def test_foreign_tc_filter_survives_and_nothing_of_ours_is_left(node, mode):
    """A CNI's filter (here a classic-BPF cls_bpf filter that never matches, prio 10) on pod a's veth before
    netwatchd starts: it is still there, alone, after netwatchd stopped, and so is the clsact qdisc it hangs on.
    Pod b's veth had no clsact: in clsact mode netwatchd adds one and takes it away again."""
    a, b = node.pods["default/a"], node.pods["default/b"]
    node.run(["tc", "qdisc", "add", "dev", a.host_veth, "clsact"])
    node.run(["tc", "filter", "add", "dev", a.host_veth, "ingress", "prio", "10", "handle", "7", "bpf", "bytecode",
              "1,6 0 0 0,", "classid", "1"])
    foreign = tc_filters(node, a.host_veth, "ingress")
    assert "bytecode" in foreign
    d = start_netwatchd(tc_args(node, "--tc-attach", mode), netns=node.netns)
    try:
        ours = prog_ids_of(d.proc.pid)
        assert len(ours) >= 4
        if mode == "clsact":
            assert "nw_tc_pod_in" in tc_filters(node, a.host_veth, "ingress")
            assert "pref 10 " in tc_filters(node, a.host_veth, "ingress")
            assert clsact_present(node, b.host_veth)
        else:
            assert len(our_links(ours)) == 4  # ingress + egress on each pod veth
            assert "nw_tc" not in tc_filters(node, a.host_veth, "ingress")
            assert not clsact_present(node, b.host_veth)
        # counting works next to the foreign filter
        assert ping(a, b.ip) == 1
        before, _ = quiet(d)
        udp_burst(a, b, b.ip, 7007, 25)
        assert_counted_once(settled_growth(d, before, 25), {("pod_to_pod_local", "egress", "", ""): 25})
    finally:
        assert d.stop() == 0, "".join(d.stderr_lines)[-2000:]
    assert tc_filters(node, a.host_veth, "ingress") == foreign
    for dev in (a.host_veth, b.host_veth):
        for direction in ("ingress", "egress"):
            assert "nw_tc" not in tc_filters(node, dev, direction)
    assert clsact_present(node, a.host_veth)
    assert not clsact_present(node, b.host_veth)
    assert not ours & loaded_programs(), "netwatchd left BPF programs loaded after SIGTERM"
    assert not our_links(ours)


def test_veth_created_while_running_is_counted_within_two_seconds(node, daemon):
    a = node.pods["default/a"]
    t0 = time.monotonic()
    c = add_pod(node, "c")
    created = time.monotonic()
    deadline = created + 5
    attached_at = None
    while time.monotonic() < deadline and attached_at is None:
        if any(e.get("event") == "tc_attached" and e.get("interface") == c.host_veth for e in daemon.logs):
            attached_at = time.monotonic()
        time.sleep(0.05)
    assert attached_at is not None, "the new pod veth was not attached"
    assert attached_at - created < 2.0, f"attached {attached_at - created:.2f}s after the pod's veth appeared"
    assert ping(c, a.ip) == 1
    before, _ = quiet(daemon)
    udp_burst(c, a, a.ip, 7008, 40)
    assert_counted_once(settled_growth(daemon, before, 40), {("pod_to_pod_local", "egress", "", ""): 40})
    assert daemon.value("netwatch_tc_interfaces", role="pod") == 3
    # and a veth that goes away is forgotten, without errors
    node.run(["ip", "link", "del", c.host_veth])
    deadline = time.monotonic() + 5
    while daemon.value("netwatch_tc_interfaces", role="pod") != 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert daemon.value("netwatch_tc_interfaces", role="pod") == 2
    assert time.monotonic() - t0 < 30
    assert not [e for e in daemon.logs if e.get("level") in ("warning", "error") and "tc" in e.get("event", "")]


@pytest.mark.parametrize("mode", ["tcx", "clsact"])
def test_after_sigkill_a_restart_leaves_nothing_behind(node, mode):
    """tcx links die with netwatchd's fds; clsact filters outlive a SIGKILL, and the next start replaces them
    (recognised by our prio, handle and program name) instead of stacking a second copy."""
    a = node.pods["default/a"]
    d = start_netwatchd(tc_args(node, "--tc-attach", mode), netns=node.netns)
    first = prog_ids_of(d.proc.pid)
    d.proc.kill()
    d.proc.wait(10)
    left = tc_filters(node, a.host_veth, "ingress")
    assert ("nw_tc_pod_in" in left) == (mode == "clsact")
    d = start_netwatchd(tc_args(node, "--tc-attach", mode), netns=node.netns)
    try:
        assert tc_filters(node, a.host_veth, "ingress").count("handle 0x4e57") == (mode == "clsact")
        # programs are freed after an RCU grace period once their last filter is gone: poll briefly; a filter
        # left behind would keep them loaded for good and fail this
        assert wait_until(lambda: not first & loaded_programs(), timeout=5), "the killed run left programs"
    finally:
        second = prog_ids_of(d.proc.pid)
        assert d.stop() == 0
    assert "nw_tc" not in tc_filters(node, a.host_veth, "ingress") + tc_filters(node, a.host_veth, "egress")
    assert wait_until(lambda: not second & loaded_programs(), timeout=5)


def test_pods_are_named_with_kubelet_identity(lab):
    """With the (lab) kubelet, each pod veth's counters carry the pod's namespace and name, in every direction
    and for the node's traffic to a pod too."""
    from netwatchd.lab.cluster import LabCluster

    n1 = lab.add_node("n1")
    n2 = lab.add_node("n2")
    lab.add_uplink(n1, n2)
    a, b = (n1.add_pod(name, namespace="shop") for name in ("a", "b"))
    z = n2.add_pod("z", namespace="shop")
    for ep in (a, b, z):
        hush(ep)
    with LabCluster(lab, n1) as cluster:
        d = start_netwatchd(cluster.netwatchd_args() + ["--probes", "tc"], netns=n1.netns)
        try:
            deadline = time.monotonic() + 15
            while d.value("netwatch_identity_pods") < 2 and time.monotonic() < deadline:
                time.sleep(0.2)
            for src, dst in ((a, b.ip), (z, a.ip), (n1, b.ip)):
                assert ping(src, dst) == 1
            before, _ = quiet(d)
            udp_burst(a, b, b.ip, 7010, 30)
            udp_burst(z, a, a.ip, 7011, 20)
            assert ping(n1, b.ip, count=5) == 5
            got = settled_growth(d, before, 60)
            assert_counted_once(got, {
                ("pod_to_pod_local", "egress", "shop", "a"): 30,
                ("pod_to_pod_remote", "ingress", "shop", "a"): 20,
                ("host", "ingress", "shop", "b"): 5,  # the node's echo requests, delivered to b
                ("host", "egress", "shop", "b"): 5,  # b's replies
            })
        finally:
            assert d.stop() == 0
