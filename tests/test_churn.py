"""Labels and churn: series belong to local pods, and go away with them.

One lab (n1 where netwatchd runs with the lab kubelet/apiserver, n2 behind vxlan) and one netwatchd for the
module, with a short --pod-series-grace (2 s) and --identity-interval (1 s). The tests prove that

- a pod that leaves the kubelet's list keeps its series for the grace period, then they disappear;
- after 50 pods come (each with its own drop series) and go, the number of netwatch_drops_total series is
  back where it was: nothing is left behind per pod (no leak, no pod="unknown" leftovers);
- series grow with local pods, not with pairs: many remote peers of one pod, or every pair among local pods,
  give one series per (local pod, class, reason), never one per peer.
"""

from __future__ import annotations

import socket
import subprocess
import time

import pytest

from netwatchd.identity.netns import in_netns
from netwatchd.lab.cluster import LabCluster
from netwatchd.lab.netns import Pod
from netwatchd.lab.traffic import ping, send_udp
from tests.support import LabWorld, RunningDaemon, build_world, node_addresses, start_netwatchd, wait_until

pytestmark = pytest.mark.kernel

NS = "churn"
GRACE = 2.0
INTERVAL = 1.0

LABELS = ("reason", "protocol", "traffic_class", "direction", "namespace", "pod", "service_namespace", "service")


class World(LabWorld):
    def build(self) -> World:
        self.n1 = self.lab.add_node("n1", **node_addresses(0))
        self.n2 = self.lab.add_node("n2", **node_addresses(1))
        self.lab.add_uplink(self.n1, self.n2)
        self.sink = self.n1.add_pod("sink", namespace=NS)  # every test's drops: NO_SOCKET on its closed ports
        self.cluster = LabCluster(self.lab, self.n1)
        self.daemon = start_netwatchd(
            self.cluster.netwatchd_args() + ["--pod-series-grace", str(GRACE), "--identity-interval", str(INTERVAL),
                                             "--probes", "drops"], netns=self.n1.netns)
        assert wait_until(lambda: self.daemon.value("netwatch_identity_up", source="apiserver") == 1)
        self.port = 9300
        return self




@pytest.fixture(scope="module")
def world():
    yield from build_world(World)


def series(d: RunningDaemon) -> dict[tuple[str, ...], float]:
    return {tuple(lab[k] for k in LABELS): v for lab, v in d.samples("netwatch_drops_total")}


def pod_series(d: RunningDaemon, namespace: str = NS) -> dict[tuple[str, ...], float]:
    return {k: v for k, v in series(d).items() if k[4] == namespace}


def listed(world: World) -> int:
    """How many pods the lab kubelet lists now."""
    return len([k for k in world.n1.pods if k not in world.cluster.hidden])


def datagram_from_each(pods: list[Pod], dst: str, port: int) -> None:
    """One UDP datagram from each pod (socket made in the pod's netns by this process: no process per pod)."""
    for p in pods:
        with in_netns(p.netns):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with s:
            s.sendto(b"churn", (dst, port))


def remove_pods(world: World, pods: list[Pod]) -> None:
    """Pods deleted: gone from the kubelet's list, their netns (and veths) deleted."""
    for p in pods:
        del p.node.pods[p.key]
        subprocess.run(["ip", "netns", "del", p.netns], check=True, capture_output=True)
    world.cluster.sync()


def test_gone_pod_series_disappear_after_the_grace_period(world):
    d, c = world.daemon, world.cluster
    p = world.n1.add_pod("short-lived", namespace=NS)
    c.sync()
    assert wait_until(lambda: d.value("netwatch_identity_pods") == listed(world))
    send_udp(p, world.sink.ip, world.next_port(), 3)
    mine = dict(namespace=NS, pod="short-lived")
    assert d.wait_for("netwatch_drops_total", 3, **mine) == 3
    since = len(d.logs)
    c.hidden.add(p.key)  # the kubelet stops listing it
    c.sync()
    hidden_at = time.monotonic()
    assert wait_until(lambda: d.value("netwatch_drops_total", **mine) == 0, timeout=GRACE + INTERVAL + 10, step=0.1)
    gone_after = time.monotonic() - hidden_at
    # Kept for the grace period (scrapes see the final counts), gone soon after (next refresh past the grace).
    assert GRACE <= gone_after <= GRACE + INTERVAL + 3, gone_after
    assert not [k for k in series(d) if k[5] == "short-lived"]
    removed = [e for e in d.logs[since:] if e.get("event") == "pod_series_removed"]
    assert [(e["namespace"], e["pod"], e["series"]) for e in removed] == [(NS, "short-lived", 1)]


def test_fifty_pods_come_and_go_and_the_series_count_returns(world):
    d, c, n1 = world.daemon, world.cluster, world.n1
    time.sleep(1.0)
    baseline = series(d)
    t0 = time.monotonic()
    pods = [n1.add_pod(f"p{i:02d}", namespace=NS) for i in range(50)]
    c.sync()
    # Listed before they send anything: a drop of a pod not listed yet would be pod="unknown" (by design).
    assert wait_until(lambda: d.value("netwatch_identity_pods") == listed(world))
    datagram_from_each(pods, world.sink.ip, world.next_port())
    names = {p.name for p in pods}
    want = {("NO_SOCKET", "udp", "pod_to_pod_local", "egress", NS, name, "", ""): 1.0 for name in names}
    assert wait_until(lambda: all(pod_series(d).get(k) == 1.0 for k in want))
    time.sleep(1.0)
    peak = series(d)
    assert {k: v for k, v in peak.items() if k[5] in names} == want  # one series per pod, exact counts
    assert len(peak) >= len(baseline) + 50
    came = time.monotonic() - t0
    t1 = time.monotonic()
    remove_pods(world, pods)
    assert wait_until(lambda: not names & {k[5] for k in series(d)}, timeout=GRACE + INTERVAL + 15, step=0.1)
    drained = time.monotonic() - t1
    assert drained >= GRACE
    time.sleep(INTERVAL + 0.5)
    after = series(d)
    # Back where it was: every series with a pod label (a named pod or pod="unknown") exactly as before, the
    # same label sets with the same values: nothing is left per pod that came and went.
    assert per_pod(after) == per_pod(baseline)
    # Nothing else is gone and all that is new is the node's own (pod=""): reasons first seen meanwhile on this
    # kernel (bridge ports in learning state, IPv6 neighbour discovery, concurrent labs' traffic): a set bounded
    # by reasons x classes x protocols, whatever the number of pods.
    new = set(after) - set(baseline)
    assert set(baseline) <= set(after) and all(k[4:6] == ("", "") for k in new), new
    assert len(after) == len(baseline) + len(new)
    print(f"\n50 pods: came (created, listed, one drop each) in {came:.1f}s; series gone {drained:.1f}s after "
          f"deletion (grace {GRACE}s); series {len(baseline)} -> {len(peak)} -> {len(after)} "
          f"({len(new)} new node-level)")


def per_pod(s: dict[tuple[str, ...], float]) -> dict[tuple[str, ...], float]:
    return {k: v for k, v in s.items() if k[5] != ""}


def test_series_grow_with_local_pods_not_with_pairs(world):
    d, c, n1, n2 = world.daemon, world.cluster, world.n1, world.n2
    local = [n1.add_pod(f"l{i}", namespace=NS) for i in range(6)]
    remote = [n2.add_pod(f"r{i:02d}", namespace="far") for i in range(20)]
    c.sync()
    assert wait_until(lambda: d.value("netwatch_identity_pods") == listed(world))
    target = local[0]
    assert ping(remote[0], target.ip) == 1  # the vxlan path works (neighbours resolved)
    before = series(d)
    # 20 remote peers -> one local pod's closed port: 20 kernel map entries, ONE series (ingress of l0).
    datagram_from_each(remote, target.ip, world.next_port())
    # Every local pod -> every other local pod's closed port: 6 x 5 = 30 pairs, 6 series (one per sender).
    port = world.next_port()
    for p in local:
        for q in local:
            if q is not p:
                datagram_from_each([p], q.ip, port)
    ingress = ("NO_SOCKET", "udp", "pod_to_pod_remote", "ingress", NS, "l0", "", "")
    pairs = {("NO_SOCKET", "udp", "pod_to_pod_local", "egress", NS, p.name, "", ""): 5.0 for p in local}
    assert wait_until(lambda: (g := grown(d, before)).get(ingress) == 20 and all(g.get(k) == 5 for k in pairs))
    time.sleep(1.0)
    g = grown(d, before)
    # UDP only: a port-unreachable ICMP sent back to a sender whose socket already closed is dropped there
    # (NO_SOCKET, icmp) and, correctly, counted for the local pod that sent it; its timing varies.
    mine = {k: v for k, v in g.items() if k[1] == "udp" and (k[4] in (NS, "far") or k[5] == "unknown")}
    assert mine == {ingress: 20.0, **pairs}, mine  # 7 series for 50 peer pairs; no remote pod is ever a label
    assert not [k for k in series(d) if k[4] == "far"]


def grown(d: RunningDaemon, before: dict[tuple[str, ...], float]) -> dict[tuple[str, ...], float]:
    return {k: v - before.get(k, 0) for k, v in series(d).items() if v != before.get(k, 0)}
