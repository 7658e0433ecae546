"""Identity refreshes re-scan network namespaces only where something changed (netwatchd.identity.netnscache).

A lab node with N pods (netns + veth each) and the lab kubelet; the test thread plays the daemon's identity
thread, inside the node's netns. Every netns entry of the identity code goes through `netns.in_netns`, which
the test wraps to record the paths entered: the ground truth for "re-entered no pod netns". The cache's clock
is the test's, so the retry backoff and the periodic full re-scan are stepped, not waited for.
"""

from __future__ import annotations

import ipaddress
import subprocess
import time

import pytest

from netwatchd.identity import netns as nsmod
from netwatchd.identity import netnscache
from netwatchd.identity.kubelet import KubeletClient, LocalPod
from netwatchd.identity.netns import PodNetns
from netwatchd.identity.netnscache import FULL_RESCAN_S, RETRY_FIRST_S, NetnsCache
from netwatchd.identity.resolver import KubeResolver
from netwatchd.lab.cluster import LabCluster
from netwatchd.lab.netns import Node, Pod
from tests.support import node_addresses

N = 30
NS = "rescan"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def node(lab) -> Node:
    n1 = lab.add_node("n1", **node_addresses(0))
    for i in range(N):
        n1.add_pod(f"p{i:02d}", namespace=NS)
    n1.add_pod("hostnet", namespace=NS, host_network=True)
    return n1


@pytest.fixture
def cluster(lab, node):
    with LabCluster(lab, node) as c:
        yield c


@pytest.fixture
def entered(monkeypatch) -> list[str]:
    """Every netns path the identity code enters from now on (netns.in_netns, wrapped)."""
    paths: list[str] = []
    real = nsmod.in_netns

    def recording(path: str):
        paths.append(nsmod.netns_path(path))
        return real(path)

    monkeypatch.setattr(nsmod, "in_netns", recording)
    return paths


def expected(pod: Pod) -> PodNetns:
    if pod.host_network:
        return PodNetns(pod.node.netns_inode(), f"/run/netns/{pod.node.netns}")
    return PodNetns(pod.netns_inode(), f"/run/netns/{pod.netns}", pod.host_veth, pod.host_veth_ifindex)


def path_of(pod: Pod) -> str:
    return f"/run/netns/{pod.netns}"


def test_refresh_enters_only_namespaces_that_may_have_changed(node, cluster, entered):
    clock = Clock()
    kubelet = KubeletClient(cluster.kubelet.url, token_file=cluster.kubelet_token_file, ca_file=cluster.ca.ca_file)
    resolver = KubeResolver(node.netns_inode(), NetnsCache(clock=clock))
    cache = resolver.netns_cache
    pods = [p for p in node.pods.values() if not p.host_network]

    def refresh() -> float:
        """One refresh as the daemon's identity thread does it; its CPU seconds."""
        entered.clear()
        t0 = time.thread_time()
        resolver.refresh_pods(kubelet)
        return time.thread_time() - t0

    def assert_mapped() -> None:
        want = {(p.namespace, p.name): expected(p) for p in node.pods.values() if p.key not in cluster.hidden}
        assert dict(resolver.netns_map) == want

    with nsmod.in_netns(node.netns):  # this thread is the daemon's: in the node's netns
        try:
            # First refresh: a full scan, every pod netns entered (each once), all mapped.
            full_cpu = refresh()
            assert cache.last.full
            assert sorted(entered) == sorted(path_of(p) for p in pods)
            assert_mapped()
            assert kubelet._parser.parsed == N + 1

            # Nothing changed: no netns entered, no pod parsed again, same answer.
            idle_cpu = refresh()
            assert entered == [] and cache.last.scanned == () and not cache.last.full
            assert_mapped()
            assert kubelet._parser.parsed == N + 1

            # One new pod: only its netns is entered (its veth is a link change; no other mapping is lost).
            late = node.add_pod("late", namespace=NS)
            cluster.sync()
            refresh()
            assert cache.last.links_changed and cache.last.scanned == ((NS, "late"),)
            assert entered == [path_of(late)]
            assert_mapped()
            assert kubelet._parser.parsed == N + 2  # only the new pod went through the models

            # A pod deleted (netns and veth gone, no longer listed): forgotten, nothing entered.
            gone = node.pods.pop(f"{NS}/p03")
            subprocess.run(["ip", "netns", "del", gone.netns], check=True, capture_output=True)
            cluster.sync()
            refresh()
            assert entered == [] and (NS, "p03") not in resolver.netns_map
            assert_mapped()

            # Still listed but its netns is gone: looked up again (widely: no veth leads to it), unmapped;
            # then left alone until its backoff is over.
            vanished = node.pods[f"{NS}/p07"]
            subprocess.run(["ip", "netns", "del", vanished.netns], check=True, capture_output=True)
            refresh()
            assert cache.last.scanned == ((NS, "p07"),) and path_of(vanished) not in entered
            assert resolver.netns_map[(NS, "p07")].inode == 0
            assert not set(entered) & {path_of(p) for p in node.pods.values()}  # no mapped pod re-entered
            refresh()
            assert entered == [] and cache.last.scanned == ()
            clock.now += RETRY_FIRST_S
            refresh()
            assert cache.last.scanned == ((NS, "p07"),)
            assert resolver.netns_map[(NS, "p07")].inode == 0

            # The safety net: a full re-scan every FULL_RESCAN_S, whatever the cache says.
            clock.now += FULL_RESCAN_S
            refresh()
            assert cache.last.full
            assert {path_of(p) for p in node.pods.values() if p is not vanished and not p.host_network} <= set(entered)
            assert resolver.netns_map[(NS, "p07")].inode == 0
            node.pods.pop(vanished.key)  # the lab kubelet still lists it (cluster.sync() not called)
            others = {k: v for k, v in resolver.netns_map.items() if k != (NS, "p07")}
            assert others == {(p.namespace, p.name): expected(p) for p in node.pods.values()}
        finally:
            resolver.close()
            kubelet.close()
    print(f"\n{N} pods: full scan refresh {full_cpu * 1000:.1f} ms CPU, nothing-changed refresh "
          f"{idle_cpu * 1000:.1f} ms CPU")
    assert idle_cpu < full_cpu


def test_a_failed_netlink_dump_keeps_the_last_mappings_and_rescans_next(lab, monkeypatch):
    n1 = lab.add_node("n1", **node_addresses(0))
    a, b = n1.add_pod("a", namespace=NS), n1.add_pod("b", namespace=NS)
    pods = [LocalPod(NS, p.name, uid=p.uid, ips=(ipaddress.ip_address(p.ip),), phase="Running") for p in (a, b)]
    cache = NetnsCache()
    real = netnscache.veths_of
    with nsmod.in_netns(n1.netns):
        try:
            first = cache.map(pods)
            assert first == {(NS, "a"): expected(a), (NS, "b"): expected(b)}
            c = n1.add_pod("c", namespace=NS)  # a link change: the next map() lists the veths again...
            pods.append(LocalPod(NS, "c", uid=c.uid, ips=(ipaddress.ip_address(c.ip),), phase="Running"))

            def failing(rt):
                raise OSError(11, "rtnetlink dump kept changing under us")

            monkeypatch.setattr(netnscache, "veths_of", failing)  # ...and that dump fails
            assert cache.map(pods) == {**first, (NS, "c"): PodNetns(0)}  # last known; c not known yet
            monkeypatch.setattr(netnscache, "veths_of", real)
            assert cache.map(pods) == {**first, (NS, "c"): expected(c)} and cache.last.full
        finally:
            cache.close()
