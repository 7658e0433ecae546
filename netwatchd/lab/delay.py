"""A lab delay line: a known, constant one-way delay on a pod's link, at the packet level (there is no netem).

Why packets and not a TCP relay: connect latency is SYN -> SYN-ACK, which a userspace TCP proxy answers
immediately, so only a delay applied to every frame shows up in the handshake (and in the RTT the kernel
measures). :class:`DelayLine` cuts a pod's cable in two and splices a *delay netns* in between::

    pod netns   eth0 ──veth── <old host veth>  [delay netns: wire process]  <inner> ──veth── <new port> ─ cni0
                                     frames pod -> bridge wait `egress_s`, bridge -> pod wait `ingress_s`

The delay netns has no addresses (IPv6 disabled, so it sends nothing of its own). One process in it (started
with the lab's popen, so ``Lab.close()`` kills it and deleting the netns removes every link) reads each frame
from one side with an ``AF_PACKET`` socket, holds it for the side's delay and writes it to the other side.
Both sockets use ``PACKET_VNET_HDR``: frames carry their virtio-net header (checksum-offload and GSO
metadata) across, so TSO super-frames and partially checksummed packets from the veths pass unchanged.
The delay is constant per direction, so frames keep their order; each direction's queue is bounded
(`max_queue` frames and `max_queue_bytes`; overflow is dropped and counted, like a real link's queue).

Why not a TUN device in the node netns: pod-to-pod traffic on one node is bridged, never routed, so steering
it through a TUN needs policy routing (and accept_local for the pod's own source address) in every pod;
a spliced wire delays everything the pod sends or receives (pods, services, the node) with no routing change.

Every frame is delayed, ARP/ND included: warm the neighbour caches (one ping) before measuring.
Accuracy: the hold starts at the kernel's receive timestamp of the frame (SO_TIMESTAMPNS) and the process
runs SCHED_FIFO when allowed, so the added delay is ``delay`` plus the wake-up latency of one process
(typically 0.05-0.3 ms; more on a machine busy with other real-time work), never less than ``delay``.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from dataclasses import dataclass

from netwatchd.lab.netns import BRIDGE, Pod, _ip_batch, _ip_json, _run
from netwatchd.lab.traffic import _wait_ready

# argv: side-a ifname, side-b ifname, delay a->b (s), delay b->a (s), max frames and bytes queued per direction.
# Prints "ready" once both sockets are bound; on SIGTERM prints "<forwarded> <dropped>" and exits.
_WIRE = r"""
import collections, os, select, signal, socket, struct, sys, time
a_if, b_if, d_ab, d_ba = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
cap, cap_bytes = int(sys.argv[5]), int(sys.argv[6])
ETH_P_ALL, SOL_PACKET, PACKET_VNET_HDR, PACKET_OUTGOING = 3, 263, 15, 4
SO_TIMESTAMPNS = SCM_TIMESTAMPNS = 35
try:  # best effort: wake up on time even when the machine is busy
    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
except (OSError, AttributeError):
    pass
def bind(ifname):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind((ifname, 0))
    s.setblocking(False)
    return s
def arrival(anc):
    # the kernel's receive timestamp (CLOCK_REALTIME), so the hold starts when the frame arrived, not when
    # this process got to read it
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == SCM_TIMESTAMPNS and len(data) >= 16:
            sec, nsec = struct.unpack("qq", data[:16])
            return sec + nsec * 1e-9
    return time.time()
sa, sb = bind(a_if), bind(b_if)
# socket read -> (queue, delay, socket to write to)
route = {sa: (collections.deque(), d_ab, sb), sb: (collections.deque(), d_ba, sa)}
queues = [(q, out) for q, _, out in route.values()]
held = {id(q): 0 for q, _ in queues}  # bytes queued per direction
stop, forwarded, dropped = [], 0, 0
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
print("ready", flush=True)
while not stop:
    now = time.time()
    due = [q[0][0] for q, _ in queues if q]
    try:
        readable = select.select(list(route), [], [], max(0.0, min(due) - now) if due else 0.5)[0]
    except InterruptedError:
        continue
    for s in readable:
        q, delay, _ = route[s]
        for _ in range(256):
            try:
                data, anc, _flags, addr = s.recvmsg(1 << 18, 64)
            except (BlockingIOError, InterruptedError):
                break
            if addr[2] == PACKET_OUTGOING:
                continue
            if len(q) >= cap or held[id(q)] + len(data) > cap_bytes:
                dropped += 1
                continue
            q.append((arrival(anc) + delay, data))
            held[id(q)] += len(data)
    now = time.time()
    for q, out in queues:
        while q and q[0][0] <= now:
            data = q.popleft()[1]
            held[id(q)] -= len(data)
            try:
                out.send(data)
                forwarded += 1
            except OSError:
                dropped += 1
print(forwarded, dropped, flush=True)
"""


@dataclass
class WireStats:
    forwarded: int
    dropped: int


class DelayLine:
    """Adds `egress_s` to every frame a pod sends and `ingress_s` (default: the same) to every frame it
    receives, by splicing a delay netns into its link (see module docstring). The pod keeps its netns,
    addresses and MAC; ``pod.host_veth``/``host_veth_ifindex`` are updated to the new bridge port.
    Torn down with the lab (process killed, netns deleted); :meth:`stop` ends the process earlier.
    """

    def __init__(self, pod: Pod, egress_s: float, ingress_s: float | None = None, max_queue: int = 4096,
                 max_queue_bytes: int = 16 << 20) -> None:
        if pod.host_network:
            raise ValueError("a hostNetwork pod has no link of its own to delay")
        if egress_s < 0 or (ingress_s is not None and ingress_s < 0):
            raise ValueError("delays must be >= 0")
        self.pod, self.egress_s = pod, egress_s
        self.ingress_s = egress_s if ingress_s is None else ingress_s
        lab, node = pod.lab, pod.node
        self.netns = lab._add_netns(f"{node.name}-delay-{pod.namespace}-{pod.name}")
        # Set before any link arrives: a device moved in gets the netns' defaults, so no IPv6 link-local
        # address, router solicitation or MLD report of our own ever leaves the wire.
        self._sysctls({"net.ipv6.conf.all.disable_ipv6": 1, "net.ipv6.conf.default.disable_ipv6": 1})
        self.pod_side = pod.host_veth  # the pod's old host end moves into the delay netns
        self.bridge_side = lab._ifname("dly")  # inner end of the new veth, in the delay netns
        new_port = lab._ifname("veth")
        _ip_batch(node.netns, [
            f"link set {self.pod_side} netns {self.netns}",
            f"link add {new_port} type veth peer name {self.bridge_side} netns {self.netns}",
            f"link set {new_port} master {BRIDGE}",
            f"link set {new_port} type bridge_slave hairpin on",
            f"link set {new_port} up",
        ])
        _ip_batch(self.netns, [f"link set {self.pod_side} up", f"link set {self.bridge_side} up"])
        pod.host_veth = new_port
        pod.host_veth_ifindex = _ip_json(node.netns, "link", "show", new_port)[0]["ifindex"]
        self.proc = lab._popen(
            ["ip", "netns", "exec", self.netns, sys.executable, "-c", _WIRE, self.pod_side, self.bridge_side,
             repr(self.egress_s), repr(self.ingress_s), str(max_queue), str(max_queue_bytes)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _wait_ready(self.proc, f"delay line for {pod.key}")

    def _sysctls(self, settings: dict[str, int]) -> None:
        _run(["ip", "netns", "exec", self.netns, "sysctl", "-q", "-w", *(f"{k}={v}" for k, v in settings.items())])

    def stop(self) -> WireStats:
        """Stop forwarding (the pod is cut off from then on) and return what the wire did."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=5)
        fields = out.split()
        if len(fields) < 2:
            raise RuntimeError(f"delay line for {self.pod.key} failed: {err.strip()}")
        return WireStats(int(fields[-2]), int(fields[-1]))

    def __repr__(self) -> str:
        return f"<DelayLine {self.pod.key} egress={self.egress_s * 1e3:g}ms ingress={self.ingress_s * 1e3:g}ms>"
