"""Tests of the lab Kubernetes endpoints (netwatchd.lab.kubeapi), driven by the unmodified `kubernetes` client."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import queue
import secrets
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kubernetes import client as kclient
from kubernetes import config as kconfig
from kubernetes import watch as kwatch
from kubernetes.client.rest import ApiException

from netwatchd.lab.kubeapi import (
    LabApiServer,
    LabCA,
    LabKubelet,
    PodSpec,
    http_get,
    run_in_netns,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def ca() -> Iterator[LabCA]:
    """One CA for the module: key generation is the slowest part of a server's set-up."""
    with LabCA() as ca:
        yield ca


@pytest.fixture
def kubelet(ca: LabCA) -> Iterator[LabKubelet]:
    with LabKubelet(ca=ca) as k:
        yield k


@pytest.fixture
def api(ca: LabCA) -> Iterator[LabApiServer]:
    with LabApiServer(ca=ca) as a:
        yield a


def _core(kubeconfig: str) -> kclient.CoreV1Api:
    """A CoreV1Api configured from a kubeconfig without touching the client's global default configuration."""
    cfg = kclient.Configuration()
    kconfig.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    return kclient.CoreV1Api(kclient.ApiClient(cfg))


def _pods() -> list[PodSpec]:
    return [
        PodSpec("web-7d4b9c-x2x1z", "default", "3c5e8b1e-0000-4000-8000-000000000001", "node1",
                ["10.244.1.5", "fd00:10:244:1::5"], containers=["app", "sidecar"]),
        PodSpec("kube-proxy-abcde", "kube-system", "3c5e8b1e-0000-4000-8000-000000000002", "node1",
                ["192.168.100.11"], host_network=True, owner_kind="DaemonSet", owner_name="kube-proxy"),
        PodSpec("pending-0", "default", "3c5e8b1e-0000-4000-8000-000000000003", "node1", [],
                owner_kind="StatefulSet", owner_name="pending", phase="Pending"),
    ]


def _get(server: LabKubelet | LabApiServer, path: str, token: str | None = None, **kw: Any) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else server.headers
    return http_get(server.url + path, headers=headers, ca_file=server.ca_file, **kw)


def _watch_in_thread(func: Callable[..., Any], **kwargs: Any) -> tuple[kwatch.Watch, queue.Queue, threading.Thread]:
    """Run kubernetes.watch.Watch().stream(func, **kwargs) on a thread; events (or the exception) go to a queue."""
    w = kwatch.Watch()
    q: queue.Queue = queue.Queue()

    def run() -> None:
        try:
            for event in w.stream(func, **kwargs):
                q.put(event)
        except Exception as exc:  # handed to the test through the queue
            q.put(exc)
        q.put("END")

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return w, q, t


def _next(q: queue.Queue, timeout: float = 5) -> Any:
    item = q.get(timeout=timeout)
    if isinstance(item, Exception):
        raise item
    return item


# ----------------------------------------------------------------------------------------------------
# LabCA
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["cryptography", "openssl"])
def test_ca_certificate_sans_and_handshake(backend: str) -> None:
    if backend == "cryptography":
        pytest.importorskip("cryptography")
    elif not shutil.which("openssl"):
        pytest.skip("no openssl CLI")
    with LabCA(backend=backend) as ca:
        assert all(os.path.isfile(p) for p in (ca.ca_file, ca.cert_file, ca.key_file))
        assert os.stat(ca.key_file).st_mode & 0o077 == 0
        sans = ssl._ssl._test_decode_cert(ca.cert_file)["subjectAltName"]  # type: ignore[attr-defined]
        assert set(sans) >= {("IP Address", "127.0.0.1"), ("IP Address", "0:0:0:0:0:0:0:1"), ("DNS", "localhost")}
        with LabKubelet(ca=ca, token=None) as k:
            # Full verification (chain + hostname) for the IP and the DNS name.
            assert http_get(k.url + "/healthz", ca_file=ca.ca_file)[0] == 200
            assert http_get(f"https://localhost:{k.port}/healthz", ca_file=ca.ca_file)[0] == 200
            with LabCA(backend=backend) as other, pytest.raises(ssl.SSLCertVerificationError):
                http_get(k.url + "/healthz", ca_file=other.ca_file)
        directory = ca.dir
    assert not os.path.exists(directory)


# ----------------------------------------------------------------------------------------------------
# LabKubelet
# ----------------------------------------------------------------------------------------------------


def test_kubelet_podlist_is_a_real_v1_podlist(kubelet: LabKubelet) -> None:
    kubelet.set_pods(_pods())
    status, body = _get(kubelet, "/pods")
    assert status == 200
    doc = json.loads(body)
    assert (doc["kind"], doc["apiVersion"]) == ("PodList", "v1")
    web, proxy, pending = doc["items"]
    # Wire format: camelCase, Go-style omissions, RFC 3339 'Z' timestamps.
    assert web["status"]["podIPs"] == [{"ip": "10.244.1.5"}, {"ip": "fd00:10:244:1::5"}]
    assert "hostNetwork" not in web["spec"] and proxy["spec"]["hostNetwork"] is True
    assert web["metadata"]["creationTimestamp"].endswith("Z")
    assert "podIP" not in pending["status"] and "containerID" not in pending["status"]["containerStatuses"][0]

    pods = kclient.ApiClient().deserialize(body.decode(), "V1PodList", "application/json")
    assert isinstance(pods, kclient.V1PodList)
    web_m, proxy_m, pending_m = pods.items
    assert [ip.ip for ip in web_m.status.pod_ips] == ["10.244.1.5", "fd00:10:244:1::5"]
    assert web_m.status.pod_ip == "10.244.1.5" and web_m.metadata.uid.endswith("0001")
    assert web_m.spec.host_network is None and web_m.spec.node_name == "node1"
    owner = web_m.metadata.owner_references[0]
    assert (owner.kind, owner.name, owner.api_version) == ("ReplicaSet", "web-7d4b9c", "apps/v1")
    assert owner.controller is True
    ids = [c.container_id for c in web_m.status.container_statuses]
    assert [c.name for c in web_m.status.container_statuses] == ["app", "sidecar"]
    assert all(i.startswith("containerd://") and len(i) == len("containerd://") + 64 for i in ids)
    assert len(set(ids)) == 2
    assert proxy_m.spec.host_network is True and proxy_m.status.host_ip == "192.168.100.11"
    assert (proxy_m.metadata.owner_references[0].kind, proxy_m.metadata.owner_references[0].name) == (
        "DaemonSet", "kube-proxy")
    assert pending_m.status.phase == "Pending" and pending_m.status.pod_ips is None
    assert pending_m.status.container_statuses[0].state.waiting.reason == "ContainerCreating"

    kubelet.set_pods(_pods()[:1])  # the list is live
    assert len(json.loads(_get(kubelet, "/pods")[1])["items"]) == 1


def test_kubelet_rejects_bad_tokens(kubelet: LabKubelet) -> None:
    assert http_get(kubelet.url + "/pods", ca_file=kubelet.ca_file) == (401, b"Unauthorized")
    assert _get(kubelet, "/pods", token="wrong")[0] == 401
    assert http_get(kubelet.url + "/pods", ca_file=kubelet.ca_file,
                    headers={"Authorization": f"Basic {kubelet.token}"})[0] == 401
    kubelet.unauthorized_body = "status"
    status, body = _get(kubelet, "/pods", token="wrong")
    assert status == 401
    assert json.loads(body) | {"metadata": {}} == {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": "Unauthorized",
        "reason": "Unauthorized", "code": 401}
    assert _get(kubelet, "/pods")[0] == 200


def test_kubelet_fault_modes(kubelet: LabKubelet) -> None:
    kubelet.set_pods(_pods())
    kubelet.mode = "unauthorized"
    assert _get(kubelet, "/pods")[0] == 401  # even with the right token
    kubelet.mode = "error500"
    assert _get(kubelet, "/pods")[0] == 500
    kubelet.mode = "garbage"
    status, body = _get(kubelet, "/pods")
    assert status == 200 and body
    with pytest.raises(json.JSONDecodeError):
        json.loads(body)
    kubelet.mode = "slow"
    kubelet.slow_seconds = 10
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        _get(kubelet, "/pods", timeout=0.3)
    assert time.monotonic() - start < 2
    kubelet.mode = "ok"
    assert _get(kubelet, "/pods")[0] == 200
    with pytest.raises(ValueError):
        kubelet.mode = "bogus"


def test_kubelet_slow_mode_answers_after_delay(kubelet: LabKubelet) -> None:
    kubelet.mode, kubelet.slow_seconds = "slow", 0.3
    start = time.monotonic()
    assert _get(kubelet, "/pods", timeout=5)[0] == 200
    assert time.monotonic() - start >= 0.3


def test_kubelet_stop_start_same_port(kubelet: LabKubelet) -> None:
    port = kubelet.port
    kubelet.mode, kubelet.slow_seconds = "slow", 30
    results: queue.Queue = queue.Queue()
    t = threading.Thread(target=lambda: results.put(_safe(lambda: _get(kubelet, "/pods", timeout=10))))
    t.start()
    time.sleep(0.2)  # let the slow request arrive
    kubelet.stop()
    assert not kubelet.running
    t.join(timeout=5)
    assert isinstance(results.get_nowait(), OSError)  # in-flight request dropped, not answered
    with pytest.raises(ConnectionRefusedError):
        _get(kubelet, "/pods")
    kubelet.mode = "ok"
    kubelet.start()
    assert kubelet.port == port and kubelet.running
    assert _get(kubelet, "/pods")[0] == 200


def _safe(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as exc:
        return exc


def test_kubelet_read_only_port_is_plain_http_without_auth() -> None:
    with LabKubelet(tls=False, pods=_pods()) as k:
        assert k.url.startswith("http://") and k.token is None and k.ca_file is None
        status, body = http_get(k.url + "/pods/")
        assert status == 200 and len(json.loads(body)["items"]) == 3
        assert http_get(k.url + "/stats/summary")[0] == 404


# ----------------------------------------------------------------------------------------------------
# LabApiServer: LIST / GET
# ----------------------------------------------------------------------------------------------------


def test_apiserver_list_and_get_with_kubernetes_client(api: LabApiServer) -> None:
    api.upsert_service("default", "web", ["10.96.0.20"], [(80, "TCP")])
    api.upsert_service("kube-system", "kube-dns", ["10.96.0.10", "fd00:96::a"], [(53, "UDP"), (53, "TCP")])
    api.upsert_service("default", "lb", ["10.96.0.30"], [(443, "TCP")], type="LoadBalancer",
                       node_ports=[31443], lb_ips=["203.0.113.7"])
    api.upsert_service("default", "np", ["10.96.0.40"], [(8080, "TCP")], type="NodePort")
    api.upsert_node("node1", ["10.244.1.0/24", "fd00:10:244:1::/64"], ["192.168.100.11"])
    core = _core(api.kubeconfig_path)

    services = core.list_service_for_all_namespaces()
    assert services.metadata.resource_version == api.resource_version
    by_name = {s.metadata.name: s for s in services.items}
    assert set(by_name) == {"web", "kube-dns", "lb", "np"}
    dns = by_name["kube-dns"]
    assert dns.spec.cluster_ip == "10.96.0.10" and dns.spec.cluster_ips == ["10.96.0.10", "fd00:96::a"]
    assert dns.spec.ip_families == ["IPv4", "IPv6"]
    assert [(p.port, p.protocol) for p in dns.spec.ports] == [(53, "UDP"), (53, "TCP")]
    lb = by_name["lb"]
    assert lb.spec.type == "LoadBalancer" and lb.spec.ports[0].node_port == 31443
    assert [i.ip for i in lb.status.load_balancer.ingress] == ["203.0.113.7"]
    assert by_name["np"].spec.ports[0].node_port >= 30000  # allocated like the apiserver does
    assert by_name["web"].spec.ports[0].node_port is None

    assert [s.metadata.name for s in core.list_namespaced_service("kube-system").items] == ["kube-dns"]
    assert core.read_namespaced_service("web", "default").spec.cluster_ip == "10.96.0.20"
    with pytest.raises(ApiException) as err:
        core.read_namespaced_service("nope", "default")
    assert err.value.status == 404

    (node,) = core.list_node().items
    assert node.spec.pod_cidr == "10.244.1.0/24" and node.spec.pod_cidrs == ["10.244.1.0/24", "fd00:10:244:1::/64"]
    assert [(a.type, a.address) for a in node.status.addresses] == [("InternalIP", "192.168.100.11"),
                                                                    ("Hostname", "node1")]

    # Updates keep uid and allocated node ports, bump the resourceVersion.
    before = by_name["np"]
    api.upsert_service("default", "np", ["10.96.0.40"], [(8080, "TCP")], type="NodePort")
    after = core.read_namespaced_service("np", "default")
    assert after.metadata.uid == before.metadata.uid
    assert after.spec.ports[0].node_port == before.spec.ports[0].node_port
    assert int(after.metadata.resource_version) > int(before.metadata.resource_version)
    api.delete_node("node1")
    assert core.list_node().items == []
    with pytest.raises(KeyError):
        api.delete_node("node1")


def test_apiserver_rejects_bad_tokens(api: LabApiServer, tmp_path: Any) -> None:
    status, body = http_get(api.url + "/api/v1/services", ca_file=api.ca_file)
    assert status == 401
    assert json.loads(body) == {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                "message": "Unauthorized", "reason": "Unauthorized", "code": 401}
    core = _core(api.write_kubeconfig(str(tmp_path / "bad"), token="wrong"))
    with pytest.raises(ApiException) as err:
        core.list_node()
    assert err.value.status == 401
    assert _get(api, "/api/v1/nodes")[0] == 200
    assert _get(api, "/api/v1/pods")[0] == 404


def test_apiserver_plain_http() -> None:
    with LabApiServer(tls=False) as api:
        api.upsert_node("n", ["10.244.0.0/24"], ["192.168.100.10"])
        assert api.url.startswith("http://")
        assert [n.metadata.name for n in _core(api.kubeconfig_path).list_node().items] == ["n"]


# ----------------------------------------------------------------------------------------------------
# LabApiServer: WATCH
# ----------------------------------------------------------------------------------------------------


def test_watch_streams_changes_made_from_another_thread(api: LabApiServer) -> None:
    api.upsert_service("default", "old", ["10.96.0.5"], [(80, "TCP")])
    core = _core(api.kubeconfig_path)
    rv = core.list_service_for_all_namespaces().metadata.resource_version
    w, q, t = _watch_in_thread(core.list_service_for_all_namespaces, resource_version=rv, timeout_seconds=30)
    try:
        _wait(lambda: api.active_watches == 1)

        def mutate() -> None:
            api.upsert_service("default", "web", ["10.96.0.20"], [(80, "TCP")])
            api.upsert_service("default", "web", ["10.96.0.20"], [(80, "TCP"), (443, "TCP")], type="NodePort")
            api.delete_service("default", "web")
            api.upsert_node("node1", ["10.244.1.0/24"], ["192.168.100.11"])  # another resource: not streamed
            api.upsert_service("other", "last", ["10.96.0.99"], [(53, "UDP")])

        threading.Thread(target=mutate).start()
        events = [_next(q) for _ in range(4)]
        assert [(e["type"], e["object"].metadata.name) for e in events] == [
            ("ADDED", "web"), ("MODIFIED", "web"), ("DELETED", "web"), ("ADDED", "last")]
        modified = events[1]["object"]
        assert isinstance(modified, kclient.V1Service)
        assert [(p.port, p.node_port is not None) for p in modified.spec.ports] == [(80, True), (443, True)]
        assert events[2]["raw_object"]["metadata"]["resourceVersion"] == str(int(rv) + 3)
        assert w.resource_version == api.resource_version
    finally:
        w.stop()
        api.cut_watches()
        t.join(timeout=5)


def test_watch_replays_after_resource_version_and_namespaces(api: LabApiServer) -> None:
    rv = api.resource_version
    api.upsert_service("a", "s1", ["10.96.0.1"], [(80, "TCP")])
    api.upsert_service("b", "s2", ["10.96.0.2"], [(80, "TCP")])
    api.delete_service("a", "s1")
    # Namespaced watch, timeoutSeconds ends the stream: the replay is all there is.
    status, body = _get(api, f"/api/v1/namespaces/a/services?watch=1&resourceVersion={rv}&timeoutSeconds=1")
    assert status == 200
    events = [json.loads(line) for line in body.splitlines()]
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "s1"), ("DELETED", "s1")]
    assert events[0]["object"]["kind"] == "Service" and events[0]["object"]["apiVersion"] == "v1"
    # No resourceVersion: synthetic ADDED for the current state.
    core = _core(api.kubeconfig_path)
    events = list(kwatch.Watch().stream(core.list_service_for_all_namespaces, timeout_seconds=1))
    assert [(e["type"], e["object"].metadata.name) for e in events] == [("ADDED", "s2")]


def test_watch_too_old_resource_version_gets_410(api: LabApiServer) -> None:
    rv = api.resource_version
    api.upsert_node("node1", ["10.244.1.0/24"], ["192.168.100.11"])
    api.compact()
    status, body = _get(api, f"/api/v1/nodes?watch=true&resourceVersion={rv}")
    assert status == 200
    (event,) = [json.loads(line) for line in body.splitlines()]
    assert event["type"] == "ERROR"
    assert event["object"]["kind"] == "Status" and event["object"]["code"] == 410
    assert event["object"]["reason"] == "Expired" and "too old resource version" in event["object"]["message"]
    core = _core(api.kubeconfig_path)
    with pytest.raises(ApiException) as err:
        list(kwatch.Watch().stream(core.list_node, resource_version=rv, timeout_seconds=5))
    assert err.value.status == 410
    # Watching from the current resourceVersion is fine after a compaction.
    assert _get(api, f"/api/v1/nodes?watch=1&resourceVersion={api.resource_version}&timeoutSeconds=0.2") == (200, b"")


def test_watch_history_limit_expires_old_versions(ca: LabCA) -> None:
    with LabApiServer(ca=ca, history_limit=2) as api:
        rv = api.resource_version
        for i in range(3):
            api.upsert_node(f"n{i}", [], [f"192.168.100.{i + 1}"])
        body = _get(api, f"/api/v1/nodes?watch=1&resourceVersion={rv}")[1]
        assert json.loads(body)["object"]["code"] == 410
        body = _get(api, f"/api/v1/nodes?watch=1&resourceVersion={int(rv) + 1}&timeoutSeconds=0.2")[1]
        assert [json.loads(x)["object"]["metadata"]["name"] for x in body.splitlines()] == ["n1", "n2"]


def test_watch_wire_format_chunked_flushed_bookmarks(api: LabApiServer) -> None:
    api.upsert_service("default", "web", ["10.96.0.20"], [(80, "TCP")])
    host, port = api.url.removeprefix("https://").split(":")
    conn = http.client.HTTPSConnection(host, int(port), timeout=5, context=api.ca.client_context())
    try:
        conn.request("GET", f"/api/v1/services?watch=1&resourceVersion={api.resource_version}"
                     "&allowWatchBookmarks=true&timeoutSeconds=3", headers=api.headers)
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.getheader("Transfer-Encoding") == "chunked"
        assert resp.getheader("Content-Type") == "application/json"
        api.upsert_service("default", "web2", ["10.96.0.21"], [(80, "TCP")])
        line = resp.readline()  # arrives while the stream is still open: each event is flushed
        assert json.loads(line)["type"] == "ADDED" and line.endswith(b"\n")
        api.send_bookmarks()
        bookmark = json.loads(resp.readline())
        assert bookmark == {"type": "BOOKMARK", "object": {
            "kind": "Service", "apiVersion": "v1", "metadata": {"resourceVersion": api.resource_version}}}
        api.cut_watches(graceful=True)
        assert resp.read() == b""  # terminating chunk: a clean end of stream
    finally:
        conn.close()


def test_cut_watches_forces_relist(api: LabApiServer) -> None:
    api.upsert_service("default", "web", ["10.96.0.20"], [(80, "TCP")])
    core = _core(api.kubeconfig_path)
    rv = core.list_service_for_all_namespaces().metadata.resource_version
    w, q, t = _watch_in_thread(core.list_service_for_all_namespaces, resource_version=rv)
    _wait(lambda: api.active_watches == 1)
    api.upsert_service("default", "web2", ["10.96.0.21"], [(80, "TCP")])
    assert _next(q)["object"].metadata.name == "web2"
    assert api.cut_watches() == 1
    item = q.get(timeout=5)
    assert isinstance(item, Exception)  # abrupt: a broken chunked stream, not a clean end
    t.join(timeout=5)
    assert api.active_watches == 0
    # The client recovers the way informers do: re-list, then re-watch from the list's resourceVersion.
    api.delete_service("default", "web")
    relist = core.list_service_for_all_namespaces()
    assert [s.metadata.name for s in relist.items] == ["web2"]
    w, q, t = _watch_in_thread(core.list_service_for_all_namespaces,
                               resource_version=relist.metadata.resource_version, timeout_seconds=10)
    try:
        _wait(lambda: api.active_watches == 1)
        api.delete_service("default", "web2")
        event = _next(q)
        assert (event["type"], event["object"].metadata.name) == ("DELETED", "web2")
    finally:
        w.stop()
        api.cut_watches()
        t.join(timeout=5)
    assert sum(r.startswith("GET /api/v1/services?") and "watch=" in r for r in api.requests) == 2


def _wait(cond: Callable[[], bool], timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def test_close_is_idempotent_and_ends_open_requests(ca: LabCA) -> None:
    api = LabApiServer(ca=ca)
    kubelet = LabKubelet(ca=ca)
    kubelet.mode = "slow"
    results: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: results.put(_safe(lambda: _get(api, "/api/v1/nodes?watch=1", timeout=10)))).start()
    threading.Thread(target=lambda: results.put(_safe(lambda: _get(kubelet, "/pods", timeout=10)))).start()
    _wait(lambda: api.active_watches == 1 and len(kubelet.requests) == 1)
    start = time.monotonic()
    for server in (api, kubelet):
        server.close()
        server.close()
    assert not os.path.exists(api.kubeconfig_path)
    assert [type(results.get(timeout=5)).__name__ for _ in range(2)]  # both requests ended
    assert time.monotonic() - start < 5
    with pytest.raises(RuntimeError):
        kubelet.start()


# ----------------------------------------------------------------------------------------------------
# Network namespaces
# ----------------------------------------------------------------------------------------------------


@pytest.fixture
def netns() -> Iterator[str]:
    """A throwaway network namespace with lo up, always deleted."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("needs root and iproute2")
    name = f"nwtest-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
        assert not os.path.exists(f"/run/netns/{name}")


def _own_netns() -> str:
    return os.readlink("/proc/thread-self/ns/net")


def test_servers_listen_inside_a_netns(ca: LabCA, netns: str) -> None:
    before = _own_netns()
    inside = run_in_netns(netns, _own_netns)
    assert inside != before and _own_netns() == before  # the caller's thread never moved
    with LabKubelet(ca=ca, netns=netns, pods=_pods()) as k, LabApiServer(ca=ca, netns=netns) as api:
        api.upsert_node("node1", ["10.244.1.0/24"], ["192.168.100.11"])
        status, body = http_get(k.url + "/pods", netns=netns, headers=k.headers, ca_file=ca.ca_file)
        assert status == 200 and len(json.loads(body)["items"]) == 3
        status, body = http_get(api.url + "/api/v1/nodes", netns=netns, headers=api.headers, ca_file=ca.ca_file)
        assert status == 200 and json.loads(body)["items"][0]["metadata"]["name"] == "node1"
        for server in (k, api):
            with pytest.raises(OSError):  # nothing listens on that port in the host netns
                http_get(server.url + "/healthz", ca_file=ca.ca_file, timeout=1)
        # A restart re-creates the listener in the same netns.
        k.stop()
        k.start()
        assert http_get(k.url + "/pods", netns=netns, headers=k.headers, ca_file=ca.ca_file)[0] == 200
        with pytest.raises(OSError):
            http_get(k.url + "/pods", headers=k.headers, ca_file=ca.ca_file, timeout=1)
    assert _own_netns() == before


def test_ipv6_loopback_listener(ca: LabCA, netns: str) -> None:
    try:
        with LabKubelet(ca=ca, netns=netns, host="::1", pods=_pods()) as k:
            assert k.url == f"https://[::1]:{k.port}"
            assert http_get(k.url + "/pods", netns=netns, headers=k.headers, ca_file=ca.ca_file)[0] == 200
    except OSError as exc:
        if "Cannot assign requested address" in str(exc):
            pytest.skip("no IPv6 loopback in the lab netns")
        raise


def test_run_in_netns_propagates_errors(netns: str) -> None:
    with pytest.raises(ZeroDivisionError):
        run_in_netns(netns, lambda: 1 / 0)
    with pytest.raises(FileNotFoundError):
        run_in_netns("nwtest-does-not-exist", lambda: None)
    with contextlib.closing(run_in_netns(netns, lambda: socket.socket())) as s:
        assert s.fileno() >= 0
