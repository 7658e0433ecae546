"""TCP probe end to end: real connections between lab pods, a known injected delay, real drops; netwatchd counts.

One lab node (an unusual pod CIDR, so concurrent labs on this machine never share our pod addresses), a lab
kubelet + apiserver (pod and service names), and netwatchd (probe `tcp` only) in the node's netns, shared by
the module's tests; each test drives its own client pod, so its series are its own. Delays come from
netwatchd.lab.delay.DelayLine: every frame a pod sends or receives waits D ms, so a round trip is 2*D.

Ground truth is the wire: tcpdump in the client pod (inside the delay line) timestamps every SYN and SYN-ACK,
so each connection's handshake RTT h is known independently of netwatchd. The kernel's SYN_SENT ->
ESTABLISHED and its handshake srtt sample enclose the same two packets, so each netwatchd value must lie in
[h, h + 0.3 ms] (srtt: [h - 0.05 ms, h + 0.3 ms], whole microseconds): checked bucket by bucket, that is
"every cumulative bucket count of netwatchd is between the wire's at le - 0.3 ms and at le (+ 0.05 ms)"; and
the mean (_sum/_count) within 2% + 0.2 ms of the wire's. Against the injected delay D (one way, both
directions, so the round trip is 2*D): no handshake faster than 2*D, and the p50 that histogram_quantile
computes from the exported buckets within [2*D, 1.5 * 2*D] — the bucket resolution: (10, 15] ms for D=5 ms,
(30, 50] ms for D=20 ms; finer is not possible from a Prometheus histogram. Quantiles are also checked to
land in the bucket holding the wire's exact quantile.
"""

from __future__ import annotations

import math
import os
import signal
import struct
import subprocess
import sys
import tempfile
import time

import pytest

from netwatchd.export.histogram import DEFAULT_BOUNDS_S, quantile, slot_of
from netwatchd.lab.cluster import LabCluster
from netwatchd.lab.delay import DelayLine
from netwatchd.lab.netns import Lab
from netwatchd.lab.traffic import ping, start_tcp_server, tcp_connect, tcp_request
from tests.support import start_netwatchd

pytestmark = pytest.mark.kernel

NS = "tcpt"
PORT = 8080
SVC_DEAD = ("10.96.71.10", 80)  # backend blackholed by a DROP rule
SVC_CLOSED = ("10.96.71.11", 80)  # backend port closed (nothing listens on 9)
N_CONNECTS = 20

# Connects N times; per connection: connect, read the server's greeting, one 1-byte request/response, close.
_CLIENT = r"""
import socket, sys
dst, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
for _ in range(n):
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.settimeout(5)
    s.connect((dst, port)); s.recv(200); s.sendall(b"x"); s.recv(10); s.close()
"""

# One connection kept open for `secs`, a 1-byte request/response every 50 ms.
_CHATTY = r"""
import socket, sys, time
dst, port, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.create_connection((dst, port), timeout=5)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
s.recv(200)
end, n = time.monotonic() + secs, 0
while time.monotonic() < end:
    s.sendall(b"x"); s.recv(10); n += 1; time.sleep(0.05)
s.close()
print(n)
"""

# Connect, exchange once, then send `size` bytes once (a command on stdin says when) and wait for the echo.
_ONE_SEGMENT = r"""
import socket, sys
dst, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.create_connection((dst, port), timeout=20)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
s.recv(200)
s.sendall(b"x"); s.recv(10)
# ACK the echo now: a delayed ACK would ride on the data segment the test drops, and the server, its echo
# unacknowledged, would then retransmit it (a real retransmit, but not one this test means to cause).
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
import time; time.sleep(0.05)
print("ready", flush=True)
sys.stdin.readline()
s.sendall(b"y" * size)
got = 0
while got < size:
    got += len(s.recv(65536))
print(got, flush=True)
"""


@pytest.fixture(scope="module")
def env():
    """The module's lab: node n1, pods, services, delay lines, lab kubelet/apiserver, netwatchd -p tcp."""
    lab = Lab()
    try:
        node = lab.add_node("n1", pod_cidr="10.244.171.0/24", pod_cidr6="fd00:10:244:ab::/64")
        pods = {name: node.add_pod(name, namespace=NS)
                for name in ("srv", "slow5", "slow20", "slow5v6", "fast", "dead", "retx", "chatty")}
        delays = {name: DelayLine(pods[name], d) for name, d in (("slow5", 0.005), ("slow20", 0.020),
                                                                 ("slow5v6", 0.005))}
        start_tcp_server(pods["srv"], PORT)
        with LabCluster(lab, node) as cluster:
            cluster.add_service(NS, "dead", SVC_DEAD[0], SVC_DEAD[1], [(pods["srv"], PORT)])
            cluster.add_service(NS, "closed", SVC_CLOSED[0], SVC_CLOSED[1], [(pods["srv"], 9)])
            node.iptables("-I", "FORWARD", "-d", pods["srv"].ip, "-p", "tcp", "--dport", str(PORT),
                          "-s", pods["dead"].ip, "-j", "DROP")
            d = start_netwatchd([*cluster.netwatchd_args(), "--probes", "tcp"], netns=node.netns)
            try:
                _wait_identity(d, len(pods))
                yield {"lab": lab, "node": node, "pods": pods, "delays": delays, "daemon": d}
            finally:
                assert d.stop() == 0, "".join(d.stderr_lines)[-2000:]
    finally:
        lab.close()


def _wait_identity(d, npods: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if (d.value("netwatch_identity_up", source="apiserver") == 1
                and d.value("netwatch_identity_pods") == npods):
            time.sleep(1.0)  # the Services reached the watcher
            return
        time.sleep(0.2)
    raise AssertionError(f"identity not ready: {''.join(d.stderr_lines)[-2000:]}")


def _labels(pod: str, cls: str = "pod_to_pod_local", direction: str = "egress", svc: str = "") -> dict[str, str]:
    return dict(traffic_class=cls, direction=direction, namespace=NS, pod=pod,
                service_namespace=NS if svc else "", service=svc)


def histogram(d, name: str, **labels: str) -> tuple[list[int], float, int]:
    """(per-bucket counts in DEFAULT_BOUNDS_S order + Inf, sum, count) of the one series matching `labels`."""
    cumulative: dict[float, float] = {}
    total_sum = count = 0.0
    for lab, v in d.samples(f"{name}_bucket"):
        if all(lab.get(k) == x for k, x in labels.items()):
            le = float(lab["le"])
            cumulative[le] = cumulative.get(le, 0) + v
    total_sum = d.value(f"{name}_sum", **labels)
    count = d.value(f"{name}_count", **labels)
    if not cumulative:
        return [0] * (len(DEFAULT_BOUNDS_S) + 1), 0.0, 0
    bounds = [*DEFAULT_BOUNDS_S, float("inf")]
    assert sorted(cumulative) == bounds, f"unexpected buckets {sorted(cumulative)}"
    cum = [int(cumulative[b]) for b in bounds]
    return [c - p for c, p in zip(cum, [0, *cum[:-1]], strict=True)], total_sum, int(count)


def wait_count(d, name: str, expected: int, timeout: float = 15.0, **labels: str) -> int:
    deadline = time.monotonic() + timeout
    n = histogram(d, name, **labels)[2]
    while n < expected and time.monotonic() < deadline:
        time.sleep(0.3)
        n = histogram(d, name, **labels)[2]
    return n


def bucket_of(value_s: float) -> tuple[float, float]:
    i = slot_of(value_s)
    return (DEFAULT_BOUNDS_S[i - 1] if i else 0.0, DEFAULT_BOUNDS_S[i] if i < len(DEFAULT_BOUNDS_S) else float("inf"))


def exact_quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


class HandshakeCapture:
    """tcpdump on a pod's eth0 (nanosecond timestamps); `handshakes()` pairs each SYN the pod sent with the
    SYN-ACK it got back: the handshake RTT on the wire, per connection."""

    def __init__(self, pod) -> None:
        self.pod = pod
        fd, self.path = tempfile.mkstemp(prefix="nwtcp-", suffix=".pcap")
        os.close(fd)
        self.proc = pod.popen(["tcpdump", "-i", "eth0", "-n", "-U", "--immediate-mode", "-s", "128",
                               "--time-stamp-precision=nano", "-w", self.path, "tcp"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        line = self.proc.stderr.readline()
        assert "listening on" in line, line + self.proc.stderr.read()

    def handshakes(self) -> list[float]:
        time.sleep(0.2)
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=10)
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        finally:
            os.unlink(self.path)
        magic, = struct.unpack_from("<I", data)
        assert magic == 0xA1B23C4D, "not a nanosecond pcap"
        syn: dict[tuple, float] = {}
        out: list[float] = []
        off = 24
        while off + 16 <= len(data):
            sec, nsec, caplen, _ = struct.unpack_from("<IIII", data, off)
            pkt, off = data[off + 16:off + 16 + caplen], off + 16 + caplen
            t = sec + nsec * 1e-9
            ethertype = struct.unpack_from("!H", pkt, 12)[0]
            if ethertype == 0x0800:
                ihl = (pkt[14] & 0xF) * 4
                src, dst, tcp = pkt[26:30], pkt[30:34], 14 + ihl
            elif ethertype == 0x86DD:
                src, dst, tcp = pkt[22:38], pkt[38:54], 54
            else:
                continue
            sport, dport = struct.unpack_from("!HH", pkt, tcp)
            flags = pkt[tcp + 13]
            if flags & 0x12 == 0x02:  # SYN: keep the first one (a retransmitted SYN is no new connect)
                syn.setdefault((src, sport, dst, dport), t)
            elif flags & 0x12 == 0x12 and (dst, dport, src, sport) in syn:  # SYN-ACK for it
                out.append(t - syn.pop((dst, dport, src, sport)))
        return out


def check_against_wire(slots: list[int], total: float, wire: list[float], early: float, late: float) -> None:
    """Every netwatchd value within [h - early, h + late] of its wire value h, checked on the buckets (see the
    module docstring), and the mean within 2% + 0.2 ms."""
    cum_nw = 0
    for i, le in enumerate(DEFAULT_BOUNDS_S):
        cum_nw += slots[i]
        at_least = sum(1 for h in wire if h + late <= le)
        at_most = sum(1 for h in wire if h - early <= le)
        assert at_least <= cum_nw <= at_most, (le, cum_nw, at_least, at_most, sorted(wire))
    wire_mean = sum(wire) / len(wire)
    assert abs(total / sum(slots) - wire_mean) <= 0.02 * wire_mean + 0.2e-3


@pytest.mark.parametrize(("pod", "delay", "family"), [("slow5", 0.005, "ipv4"), ("slow20", 0.020, "ipv4"),
                                                        ("slow5v6", 0.005, "ipv6")])
def test_connect_latency_and_rtt_match_the_injected_delay(env, pod, delay, family):
    d, client, srv = env["daemon"], env["pods"][pod], env["pods"]["srv"]
    dst = srv.ip6 if family == "ipv6" else srv.ip
    assert ping(client, dst, count=2, timeout=1.0) == 2  # neighbour caches warm: ARP/ND is delayed too
    capture = HandshakeCapture(client)
    client.run([sys.executable, "-c", _CLIENT, dst, str(PORT), str(N_CONNECTS)], timeout=60)
    wire = capture.handshakes()
    assert len(wire) == N_CONNECTS
    rt = 2 * delay
    assert min(wire) >= rt, f"the delay line did not delay: {wire}"
    labels = _labels(pod)
    report = [f"\n{pod}: injected {delay * 1e3:g} ms each way, round trip {rt * 1e3:g} ms; wire handshake "
              f"p50 {exact_quantile(wire, 0.5) * 1e3:.2f} p90 {exact_quantile(wire, 0.9) * 1e3:.2f} "
              f"mean {sum(wire) / len(wire) * 1e3:.2f} ms"]

    for metric, early in (("netwatch_tcp_connect_seconds", 0.0), ("netwatch_tcp_rtt_seconds", 0.05e-3)):
        # srtt: one sample per socket (the first segment the client receives; --tcp-rtt-interval 1 s).
        assert wait_count(d, metric, N_CONNECTS, **labels) == N_CONNECTS
        slots, total, count = histogram(d, metric, **labels)
        p50, p90 = quantile(slots, 0.5), quantile(slots, 0.9)
        report.append(f"{pod}: {metric}: netwatchd p50 {p50 * 1e3:.2f} p90 {p90 * 1e3:.2f} "
                      f"mean {total / count * 1e3:.2f} ms")
        check_against_wire(slots, total, wire, early=early, late=0.3e-3)
        for q, value in ((0.5, p50), (0.9, p90)):
            lo, hi = bucket_of(exact_quantile(wire, q))
            assert lo <= value <= hi, (metric, q, value, lo, hi)
        assert rt <= p50 <= 1.5 * rt, (metric, p50)
    print("\n".join(report))

    # The server's accepted sockets are the server pod's, ingress (its series sums every client's).
    assert histogram(d, "netwatch_tcp_rtt_seconds", **_labels("srv", direction="ingress"))[2] >= N_CONNECTS


def test_rtt_is_sampled_once_per_socket_per_interval(env):
    """A 3 s connection with a request/response every 50 ms: ~60 segments received, 3-4 srtt samples."""
    d, client, srv = env["daemon"], env["pods"]["chatty"], env["pods"]["srv"]
    n = int(client.run([sys.executable, "-c", _CHATTY, srv.ip, str(PORT), "3.0"], timeout=30).stdout)
    assert n >= 40
    time.sleep(1.0)
    count = histogram(d, "netwatch_tcp_rtt_seconds", **_labels("chatty"))[2]
    assert 3 <= count <= 4, count


def test_blackholed_service_backend_is_a_timeout_naming_the_service(env):
    """A pod connecting to a VIP whose only backend is dropped: `timeout` failures, service named, and one
    SYN retransmit per attempt (initial RTO 1 s, the client gives up at 1.5 s)."""
    d, client = env["daemon"], env["pods"]["dead"]
    attempts = 3
    for _ in range(attempts):
        assert tcp_connect(client, SVC_DEAD[0], SVC_DEAD[1], timeout=1.5) == "timeout"
    labels = _labels("dead", cls="pod_to_service", svc="dead")
    name = "netwatch_tcp_connect_failures_total"
    assert d.wait_for(name, attempts, outcome="timeout", **labels) == attempts
    time.sleep(1.0)
    failures = {(lab["outcome"], lab["traffic_class"], lab["service"]): v
                for lab, v in d.samples(name) if lab["pod"] == "dead" and v}
    assert failures == {("timeout", "pod_to_service", "dead"): attempts}
    assert d.value("netwatch_tcp_retransmits_total", **labels) == attempts
    assert histogram(d, "netwatch_tcp_connect_seconds", pod="dead")[2] == 0


def test_closed_service_backend_port_is_refused_naming_the_service(env):
    d, client, srv = env["daemon"], env["pods"]["fast"], env["pods"]["srv"]
    for _ in range(2):
        assert tcp_connect(client, SVC_CLOSED[0], SVC_CLOSED[1], timeout=2) == "refused"
    assert tcp_connect(client, srv.ip, 9, timeout=2) == "refused"
    name = "netwatch_tcp_connect_failures_total"
    svc_labels = _labels("fast", cls="pod_to_service", svc="closed")
    assert d.wait_for(name, 2, outcome="refused", **svc_labels) == 2
    assert d.wait_for(name, 1, outcome="refused", **_labels("fast")) == 1
    time.sleep(1.0)
    failures = {(lab["outcome"], lab["traffic_class"], lab["service"]): v
                for lab, v in d.samples(name) if lab["pod"] == "fast" and v}
    assert failures == {("refused", "pod_to_service", "closed"): 2, ("refused", "pod_to_pod_local", ""): 1}


def test_dropped_data_segments_are_counted_as_retransmits_of_the_sender(env):
    """Drop exactly N copies of one data segment (iptables quota: N x its IP length), so TCP retransmits it
    exactly N times before a copy gets through; the server echoes it back."""
    d, node, client, srv = env["daemon"], env["node"], env["pods"]["retx"], env["pods"]["srv"]
    drops, size = 3, 300
    ip_len = 20 + 32 + size  # IPv4 header + TCP header with the timestamp option + payload
    proc = client.popen([sys.executable, "-c", _ONE_SEGMENT, srv.ip, str(PORT), str(size)],
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    labels = _labels("retx")
    before = d.value("netwatch_tcp_retransmits_total", **labels)
    srv_before = d.value("netwatch_tcp_retransmits_total", pod="srv")
    node.iptables("-I", "FORWARD", "1", "-s", client.ip, "-d", srv.ip, "-p", "tcp", "--dport", str(PORT),
                  "-m", "length", "--length", str(ip_len), "-m", "quota", "--quota", str(drops * ip_len),
                  "-j", "DROP")
    try:
        proc.stdin.write("go\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=20)
        assert out.split()[-1] == str(size), err
    finally:
        node.iptables("-D", "FORWARD", "1")  # (a spent quota no longer matches its own rule spec)
    assert d.wait_for("netwatch_tcp_retransmits_total", before + drops, **labels) == before + drops
    time.sleep(1.0)
    assert d.value("netwatch_tcp_retransmits_total", **labels) == before + drops
    # The sender retransmitted, not the server (whose echo got through at once).
    assert d.value("netwatch_tcp_retransmits_total", pod="srv") == srv_before


def test_full_maps_count_overflow_and_evict_idle_keys(env):
    """A second netwatchd with 4-entry aggregation maps: refused connects to 6 different pods need 6 keys, so
    at least 2 are counted as overflow, the map never holds more than 4, and idle keys get evicted."""
    node, client = env["node"], env["pods"]["fast"]
    small = start_netwatchd(["--probes", "tcp", "--tcp-map-entries", "4"], netns=node.netns)
    try:
        peers = [p for name, p in env["pods"].items() if name != "fast"][:6]
        for p in peers:
            assert tcp_connect(client, p.ip, 9, timeout=2) == "refused"
        assert small.wait_for("netwatch_bpf_map_overflow_total", 2, map="tcp_counts") >= 2
        assert small.value("netwatch_bpf_map_capacity", map="tcp_counts") == 4
        assert small.value("netwatch_bpf_map_entries", map="tcp_counts") <= 4
        assert small.wait_for("netwatch_bpf_map_evictions_total", 1, map="tcp_counts") >= 1
    finally:
        assert small.stop() == 0, "".join(small.stderr_lines)[-2000:]


def test_delay_line_delays_both_ways_passes_bulk_and_goes_with_the_lab(lab):
    """The delay line alone (no netwatchd): a 3 ms / 7 ms asymmetric line gives round trips >= 10 ms, a 60 kB
    exchange (TSO super-frames, offloaded checksums) arrives intact, and closing the lab removes it all."""
    node = lab.add_node("n1", pod_cidr="10.244.172.0/24", pod_cidr6="fd00:10:244:ac::/64")
    a, b = node.add_pod("a"), node.add_pod("b")
    line = DelayLine(a, 0.003, 0.007)
    start_tcp_server(b, PORT)
    assert ping(a, b.ip, count=1, timeout=1.0) == 1
    capture = HandshakeCapture(a)
    payload = bytes(range(256)) * 240
    assert tcp_request(a, b.ip, PORT, payload, timeout=10).endswith(payload)
    wire = capture.handshakes()
    assert len(wire) == 1 and 0.010 <= wire[0] < 0.030, wire
    stats = line.stop()
    assert stats.forwarded > 20 and stats.dropped == 0
    assert ping(a, b.ip, count=1, timeout=0.5) == 0  # stopped: the pod's cable is cut
    delay_ns, pid = line.netns, line.proc.pid
    lab.close()
    assert delay_ns not in lab.netns_names() and not os.path.exists(f"/proc/{pid}")
