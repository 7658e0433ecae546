"""Identity sources failing while netwatchd runs: it keeps counting, says so once, and recovers by itself.

One lab node with pods shop/a and shop/b, the lab kubelet and apiserver (LabCluster), and one netwatchd for
the module (--identity-interval 0.5 s: a kubelet fault shows within one client timeout, 5 s). For each fault:

- counting goes on: a drop caused during the fault is counted, under the last good pod list for pods that were
  listed, and as pod="unknown" for a pod created during the fault (never listed);
- `netwatch_identity_up{source}` goes to 0 and `netwatch_identity_errors_total{source,kind}` counts the kind;
- exactly one log line per state change (one `*_down`, one `*_up`), however many retries failed in between;
- once the fault is removed it recovers by itself: up is 1 again and a new drop carries the right pod (or the
  Service learnt meanwhile).
"""

from __future__ import annotations

import time

import pytest

from netwatchd.lab.cluster import LabCluster
from netwatchd.lab.traffic import ping, send_udp
from tests.support import LabWorld, RunningDaemon, build_world, node_addresses, start_netwatchd, vip, wait_until

pytestmark = pytest.mark.kernel

NS = "shop"
DROPS = "netwatch_drops_total"
ERRORS = "netwatch_identity_errors_total"
UP = "netwatch_identity_up"

class World(LabWorld):
    def build(self) -> World:
        self.node = self.lab.add_node("n1", **node_addresses(0))
        self.a = self.node.add_pod("a", namespace=NS)
        self.b = self.node.add_pod("b", namespace=NS)
        self.cluster = LabCluster(self.lab, self.node)
        self.daemon = start_netwatchd(self.cluster.netwatchd_args()
                                      + ["--identity-interval", "0.5", "--probes", "drops"], netns=self.node.netns)
        assert wait_until(lambda: self.daemon.value(UP, source="apiserver") == 1
                          and self.daemon.value(UP, source="kubelet") == 1), self.daemon.samples(UP)
        return self




@pytest.fixture(scope="module")
def world():
    yield from build_world(World)


def errors(d: RunningDaemon, source: str) -> dict[str, float]:
    return {lab["kind"]: v for lab, v in d.samples(ERRORS) if lab["source"] == source}


def state_lines(d: RunningDaemon, since: int, source: str) -> list[tuple[str, str]]:
    """(event, kind) of every identity state-change log line of `source` since log index `since`."""
    out = []
    for e in d.logs[since:]:
        ev = e.get("event", "")
        if source == "apiserver" and ev in ("apiserver_down", "apiserver_up"):
            out.append((ev, ""))
        elif ev in ("identity_down", "identity_up") and e.get("source") == source:
            out.append((ev, e.get("kind", "")))
    return out


def drops(d: RunningDaemon, **labels: str) -> float:
    return d.value(DROPS, **labels)


def udp_no_socket(world: World, src, count: int) -> None:
    """`count` datagrams from `src` to a closed port of pod b: `count` NO_SOCKET drops in b, src's egress."""
    send_udp(src, world.b.ip, world.next_port(), count)


def local_drop(pod: str, namespace: str = NS) -> dict[str, str]:
    return dict(reason="NO_SOCKET", protocol="udp", traffic_class="pod_to_pod_local", direction="egress",
                namespace=namespace, pod=pod)


def settled(d: RunningDaemon, expected: float, **labels: str) -> float:
    d.wait_for(DROPS, expected, timeout=15, **labels)
    time.sleep(0.8)
    return drops(d, **labels)


# ---------------------------------------------------------------------------------------------------------
# kubelet
# ---------------------------------------------------------------------------------------------------------

KUBELET_FAULTS = [
    # fault, kind, failed refreshes to see before lifting it (more than one: still one log line)
    ("stopped", "unreachable", 3),
    ("slow", "timeout", 2),  # every refresh costs the client's 5 s timeout
    ("unauthorized", "unauthorized", 3),
    ("garbage", "malformed", 3),
]


@pytest.mark.parametrize(("fault", "kind", "failures"), KUBELET_FAULTS)
def test_kubelet_fault_keeps_counting_and_recovers(world, fault, kind, failures):
    d, c, node = world.daemon, world.cluster, world.node
    since, err0 = len(d.logs), errors(d, "kubelet")
    unknown0, a0 = drops(d, **local_drop("unknown", "")), drops(d, **local_drop("a"))
    pods0 = d.value("netwatch_identity_pods")
    if fault == "stopped":
        c.kubelet.stop()
    else:
        c.kubelet.mode = fault
    try:
        assert wait_until(lambda: d.value(UP, source="kubelet") == 0), "kubelet never reported down"
        # A pod that starts during the fault: the kubelet would list it, but cannot answer.
        new = node.add_pod(f"new-{fault}", namespace=NS)
        c.sync()
        assert ping(new, world.b.ip) == 1
        udp_no_socket(world, new, 4)
        udp_no_socket(world, world.a, 3)
        assert settled(d, unknown0 + 4, **local_drop("unknown", "")) == unknown0 + 4  # never listed: unknown
        assert settled(d, a0 + 3, **local_drop("a")) == a0 + 3  # listed before the fault: still named
        assert drops(d, **local_drop(new.name)) == 0
        assert wait_until(lambda: errors(d, "kubelet").get(kind, 0) >= err0.get(kind, 0) + failures, timeout=30)
        assert d.value(UP, source="kubelet") == 0
        assert d.value(UP, source="apiserver") == 1  # the other source is unaffected
        assert d.value("netwatch_identity_pods") == pods0  # the last good list is kept
    finally:
        if fault == "stopped":
            c.kubelet.start()
        else:
            c.kubelet.mode = "ok"
    assert wait_until(lambda: d.value(UP, source="kubelet") == 1), "kubelet never reported up again"
    assert wait_until(lambda: len(state_lines(d, since, "kubelet")) >= 2, timeout=5)
    assert state_lines(d, since, "kubelet") == [("identity_down", kind), ("identity_up", "")]
    grown = {k: v - err0.get(k, 0) for k, v in errors(d, "kubelet").items() if v != err0.get(k, 0)}
    assert set(grown) == {kind} and grown[kind] >= failures, grown
    # Recovered: the new pod is listed and named from now on.
    assert d.value("netwatch_identity_pods") == len(node.pods)
    udp_no_socket(world, new, 5)
    assert settled(d, 5, **local_drop(new.name)) == 5
    assert drops(d, **local_drop("unknown", "")) == unknown0 + 4


# ---------------------------------------------------------------------------------------------------------
# apiserver
# ---------------------------------------------------------------------------------------------------------

def service_drop(pod: str, service: str) -> dict[str, str]:
    return dict(reason="NETFILTER_DROP", protocol="udp", traffic_class="pod_to_service", direction="egress",
                namespace=NS, pod=pod, service_namespace=NS if service else "", service=service)


def add_dropped_service(world: World, name: str, vip: str, backend_port: int) -> None:
    """A UDP ClusterIP Service vip:53 -> b:backend_port, and a DROP on that backend port (after the DNAT)."""
    world.cluster.add_service(NS, name, vip, 53, [(world.b, backend_port)], proto="udp")
    world.node.iptables("-I", "FORWARD", "-p", "udp", "--dport", str(backend_port), "-j", "DROP")


def test_apiserver_watch_cut_relists_and_learns_later_services(world):
    """Both watch streams cut mid-stream (no terminating chunk): the watcher re-lists at once and watches again.
    That is no outage (the apiserver answers the re-list), so `up` stays 1 and no state-change line is logged;
    each broken stream is counted as kind="watch_interrupted". A Service created after the cut is learnt."""
    d, api = world.daemon, world.cluster.api
    since, err0 = len(d.logs), errors(d, "apiserver")
    assert wait_until(lambda: api.active_watches == 2, timeout=10)
    assert api.cut_watches() == 2
    ups = []
    assert wait_until(lambda: ups.append(d.value(UP, source="apiserver")) or api.active_watches == 2, timeout=15)
    assert set(ups) == {1.0}, ups
    grown = {k: v - err0.get(k, 0) for k, v in errors(d, "apiserver").items() if v != err0.get(k, 0)}
    assert grown == {"watch_interrupted": 2}
    add_dropped_service(world, "after-cut", vip(10), 5301)
    time.sleep(1.0)  # the ADDED event reaches the watcher over the new stream
    before = drops(d, **service_drop("a", "after-cut"))
    send_udp(world.a, vip(10), 53, 6)
    assert settled(d, before + 6, **service_drop("a", "after-cut")) == before + 6
    assert state_lines(d, since, "apiserver") == []
    assert d.value(UP, source="apiserver") == 1


def test_apiserver_down_keeps_counting_and_recovers(world):
    d, api = world.daemon, world.cluster.api
    since, err0 = len(d.logs), errors(d, "apiserver")
    api.stop()
    try:
        assert wait_until(lambda: d.value(UP, source="apiserver") == 0), "apiserver never reported down"
        # A Service created while netwatchd cannot hear about it: its drops are still counted for the client pod,
        # as pod_to_service (the VIP is in --service-cidr) but without a name yet.
        add_dropped_service(world, "during-outage", vip(11), 5302)
        send_udp(world.a, vip(11), 53, 7)
        assert settled(d, 7, **service_drop("a", "")) == 7
        assert drops(d, service="during-outage") == 0
        assert d.value(UP, source="kubelet") == 1
        assert wait_until(lambda: errors(d, "apiserver").get("unreachable", 0) >= err0.get("unreachable", 0) + 2)
        assert d.value(UP, source="apiserver") == 0
    finally:
        api.start()
    assert wait_until(lambda: d.value(UP, source="apiserver") == 1, timeout=30), "apiserver never up again"
    assert wait_until(lambda: len(state_lines(d, since, "apiserver")) >= 2, timeout=5)
    assert state_lines(d, since, "apiserver") == [("apiserver_down", ""), ("apiserver_up", "")]
    grown = {k: v - err0.get(k, 0) for k, v in errors(d, "apiserver").items() if v != err0.get(k, 0)}
    assert set(grown) <= {"unreachable", "watch_interrupted"} and grown["unreachable"] >= 2, grown
    # Recovered: the Service created during the outage was learnt by the re-list.
    time.sleep(0.5)
    send_udp(world.a, vip(11), 53, 3)
    assert settled(d, 3, **service_drop("a", "during-outage")) == 3
    assert drops(d, **service_drop("a", "")) == 7
