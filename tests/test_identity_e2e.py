"""Pod identity end to end: a lab node with a lab kubelet and apiserver; drops carry the pod and service."""

from __future__ import annotations

import time

import pytest

from netwatchd.lab.cluster import LabCluster
from netwatchd.lab.traffic import tcp_connect
from tests.support import start_netwatchd

pytestmark = pytest.mark.kernel


@pytest.fixture
def two_nodes(lab):
    n1 = lab.add_node("n1")
    n2 = lab.add_node("n2")
    lab.add_uplink(n1, n2)
    for name in ("a", "b"):
        n1.add_pod(name, namespace="shop")
    n2.add_pod("z", namespace="shop")
    return n1, n2


@pytest.fixture
def cluster(lab, two_nodes):
    with LabCluster(lab, two_nodes[0]) as c:
        yield c


@pytest.fixture
def daemon(cluster, two_nodes):
    d = start_netwatchd(cluster.netwatchd_args(), netns=two_nodes[0].netns)
    try:
        yield d
    finally:
        assert d.stop() == 0, "".join(d.stderr_lines)[-2000:]


def test_refused_connect_is_attributed_to_the_client_pod(two_nodes, daemon):
    n1, _ = two_nodes
    a, b = n1.pods["shop/a"], n1.pods["shop/b"]
    labels = dict(reason="NO_SOCKET", traffic_class="pod_to_pod_local", direction="egress", namespace="shop",
                  pod="a")
    assert tcp_connect(a, b.ip, 9) == "refused"
    assert daemon.wait_for("netwatch_drops_total", 1, **labels) == 1
    assert daemon.value("netwatch_identity_up", source="kubelet") == 1
    assert daemon.value("netwatch_identity_pods") == 2


def test_drop_after_dnat_names_the_service(cluster, two_nodes, daemon):
    """A NetworkPolicy-like DROP on the backend port: pod_to_service drops for the client, service named."""
    n1, n2 = two_nodes
    a, b, z = n1.pods["shop/a"], n1.pods["shop/b"], n2.pods["shop/z"]
    cluster.add_service("shop", "cart", "10.96.0.10", 80, [(b, 8080), (z, 8080)])
    n1.iptables("-I", "FORWARD", "-p", "tcp", "--dport", "8080", "-j", "DROP")
    deadline = time.monotonic() + 10
    while daemon.value("netwatch_identity_up", source="apiserver") < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # the Service reached the watcher
    assert tcp_connect(a, "10.96.0.10", 80, timeout=1.5) == "timeout"
    labels = dict(reason="NETFILTER_DROP", protocol="tcp", namespace="shop", pod="a")
    assert daemon.wait_for("netwatch_drops_total", 1, **labels) >= 1
    by_class = {(lab["traffic_class"], lab["direction"], lab["service_namespace"], lab["service"])
                for lab, v in daemon.samples("netwatch_drops_total")
                if v and lab["pod"] == "a" and lab["reason"] == "NETFILTER_DROP"}
    assert by_class == {("pod_to_service", "egress", "shop", "cart")}
