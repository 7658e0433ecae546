"""Identity units that need no lab servers: kubelet client + PodList parsing (against a throwaway HTTPS server
made here with an openssl self-signed cert), netns mapping on the real kernel (throwaway namespaces only;
nothing is ever created in the test process's own netns), snapshot building from Service/Node models, a
ClusterWatcher run against a tiny in-test list/watch server, and the KubeResolver.
"""

from __future__ import annotations

import copy
import http.server
import ipaddress
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
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import structlog
from kubernetes import client as k8s

from netwatchd.classify import ClusterView, parse_cidrs
from netwatchd.identity import netns as nsmod
from netwatchd.identity.apiserver import (
    ClusterSnapshot,
    ClusterWatcher,
    build_snapshot,
    load_api_client,
    node_addresses,
    node_pod_cidrs,
    service_addresses,
    service_node_ports,
)
from netwatchd.identity.kubelet import IdentityError, KubeletClient, LocalPod, PodListParser, parse_pod_list
from netwatchd.identity.local import NODE, PodRef
from netwatchd.identity.netns import PodNetns, in_netns, list_netns, map_pods_to_netns
from netwatchd.identity.resolver import KubeResolver

ip = ipaddress.ip_address
needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2")


# --------------------------------------------------------------------------------------------------------
# PodList fixtures shaped like real kubelet /pods output
# --------------------------------------------------------------------------------------------------------

def _pod(name: str, namespace: str = "default", *, ips: list[str] | None = None, host_network: bool = False,
         owner: tuple[str, str] | None = None, labels: dict[str, str] | None = None, phase: str = "Running",
         containers: tuple[str, ...] = ("app",), legacy_pod_ip_only: bool = False) -> dict[str, Any]:
    uid = f"{secrets.token_hex(4)}-1111-2222-3333-{secrets.token_hex(6)}"
    meta: dict[str, Any] = {
        "name": name, "namespace": namespace, "uid": uid, "resourceVersion": "48213",
        "creationTimestamp": "2024-05-01T10:00:00Z", "labels": labels or {},
        "annotations": {"kubernetes.io/config.seen": "2024-05-01T10:00:01.5Z", "kubernetes.io/config.source": "api"},
    }
    if owner:
        meta["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": owner[0], "name": owner[1],
                                    "uid": "0b5c8a9e-aaaa-bbbb-cccc-000000000001", "controller": True,
                                    "blockOwnerDeletion": True}]
    status: dict[str, Any] = {
        "phase": phase,
        "conditions": [
            {"type": "PodReadyToStartContainers", "status": "True", "lastProbeTime": None,
             "lastTransitionTime": "2024-05-01T10:00:03Z"},
            {"type": "Ready", "status": "True", "lastProbeTime": None, "lastTransitionTime": "2024-05-01T10:00:05Z"},
        ],
        "hostIP": "192.168.100.11", "hostIPs": [{"ip": "192.168.100.11"}],
        "startTime": "2024-05-01T10:00:01Z", "qosClass": "BestEffort",
        "containerStatuses": [
            {"name": c, "state": {"running": {"startedAt": "2024-05-01T10:00:04Z"}}, "lastState": {},
             "ready": True, "restartCount": 0, "image": "registry.k8s.io/pause:3.9",
             "imageID": "registry.k8s.io/pause@sha256:7031c1b283388d2c2e09b57badb803c05ebed362dc88d84b480cc47f72a21097",
             "containerID": f"containerd://{secrets.token_hex(32)}", "started": True}
            for c in containers
        ],
    }
    if ips:
        status["podIP"] = ips[0]
        if not legacy_pod_ip_only:
            status["podIPs"] = [{"ip": a} for a in ips]
    return {
        "metadata": meta,
        "spec": {
            "volumes": [{"name": "kube-api-access-x", "projected": {"sources": [
                {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}}], "defaultMode": 420}}],
            "containers": [{"name": c, "image": "registry.k8s.io/pause:3.9", "resources": {},
                            "volumeMounts": [{"name": "kube-api-access-x", "readOnly": True,
                                              "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}],
                            "terminationMessagePath": "/dev/termination-log",
                            "terminationMessagePolicy": "File", "imagePullPolicy": "IfNotPresent"}
                           for c in containers],
            "restartPolicy": "Always", "terminationGracePeriodSeconds": 30, "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "default", "serviceAccount": "default", "nodeName": "node-1",
            "hostNetwork": host_network, "securityContext": {}, "schedulerName": "default-scheduler",
            "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute",
                             "tolerationSeconds": 300}],
            "priority": 0, "enableServiceLinks": True, "preemptionPolicy": "PreemptLowerPriority",
        },
        "status": status,
    }


def pod_list(*pods: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": list(pods)}


POD_LIST = pod_list(
    _pod("web-7d4b9c8f6d-x2x9k", ips=["10.244.1.5", "fd00:10:244:1::5"], owner=("ReplicaSet", "web-7d4b9c8f6d"),
         labels={"app": "web", "pod-template-hash": "7d4b9c8f6d"}, containers=("nginx", "sidecar")),
    _pod("kube-proxy-8kq2n", "kube-system", ips=["192.168.100.11"], host_network=True,
         owner=("DaemonSet", "kube-proxy"), labels={"k8s-app": "kube-proxy"}),
    _pod("db-0", ips=["10.244.1.6"], owner=("StatefulSet", "db"), legacy_pod_ip_only=True),
    _pod("manual-rs-abc", ips=["10.244.1.7"], owner=("ReplicaSet", "manual-rs")),  # no pod-template-hash
    _pod("bare", ips=["10.244.1.8"]),
    _pod("pending", phase="Pending"),
)


def test_parse_pod_list_real_shape() -> None:
    pods = {p.name: p for p in parse_pod_list(json.dumps(POD_LIST))}
    web = pods["web-7d4b9c8f6d-x2x9k"]
    assert (web.namespace, web.node_name, web.phase) == ("default", "node-1", "Running")
    assert web.ips == (ip("10.244.1.5"), ip("fd00:10:244:1::5"))
    assert (web.workload_kind, web.workload_name, web.workload) == ("Deployment", "web", "Deployment/web")
    assert len(web.container_ids) == 2 and all(c.startswith("containerd://") for c in web.container_ids)
    assert web.uid == POD_LIST["items"][0]["metadata"]["uid"] and not web.host_network
    kp = pods["kube-proxy-8kq2n"]
    assert kp.host_network and kp.ips == (ip("192.168.100.11"),)
    assert (kp.workload_kind, kp.workload_name) == ("DaemonSet", "kube-proxy")
    assert pods["db-0"].ips == (ip("10.244.1.6"),)  # status.podIP fallback
    assert (pods["manual-rs-abc"].workload_kind, pods["manual-rs-abc"].workload_name) == ("ReplicaSet", "manual-rs")
    assert pods["bare"].workload == "" and pods["pending"].ips == ()


@pytest.mark.parametrize("body,fragment", [
    ("<html>nope</html>", "not JSON"),
    ('{"kind": "Status", "status": "Failure"}', "Status instead of a PodList"),
    ("[]", "list instead of a PodList"),
    ('{"kind": "PodList", "items": {"a": 1}}', "not a list"),
    ('{"kind": "PodList", "items": [{"metadata": {"name": "x"}, "spec": {"containers": "zzz"}}]}', "Pod schema"),
])
def test_parse_pod_list_malformed(body: str, fragment: str) -> None:
    with pytest.raises(IdentityError) as ei:
        parse_pod_list(body)
    assert ei.value.kind == "malformed" and fragment in str(ei.value) and "\n" not in str(ei.value)


def test_pod_list_parser_parses_only_new_items() -> None:
    """Unchanged pods (same JSON, in any order) are not parsed through the models again; changed ones are."""
    parser = PodListParser()
    first = parser.parse(json.dumps(POD_LIST).encode())
    assert parser.parsed == 6 and len(first) == 6
    assert parser.parse(json.dumps(POD_LIST).encode()) == first and parser.parsed == 6  # byte-identical
    shuffled = pod_list(*reversed(POD_LIST["items"]))  # the real kubelet lists pods in no fixed order
    again = parser.parse(json.dumps(shuffled))
    assert [p.name for p in again] == [p.name for p in reversed(first)] and parser.parsed == 6
    assert all(a is b for a, b in zip(again, reversed(first), strict=True))  # the very same objects
    moved = copy.deepcopy(POD_LIST)
    moved["items"][4]["status"]["podIPs"] = [{"ip": "10.244.1.99"}]
    changed = {p.name: p for p in parser.parse(json.dumps(moved))}
    assert parser.parsed == 7 and changed["bare"].ips == (ip("10.244.1.99"),)
    with pytest.raises(IdentityError):
        parser.parse(b"garbage")
    assert parser.parse(json.dumps(moved)) and parser.parsed == 7  # a failure keeps the last good items
    parser.close()


def test_parse_empty_pod_list() -> None:
    assert parse_pod_list('{"kind":"PodList","apiVersion":"v1","metadata":{},"items":null}') == []
    assert parse_pod_list(json.dumps(pod_list())) == []


# --------------------------------------------------------------------------------------------------------
# A throwaway kubelet: HTTPS with a self-signed certificate from the openssl CLI, bearer-token auth
# --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not installed")
    d = tmp_path_factory.mktemp("tls")
    cert, key = str(d / "cert.pem"), str(d / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


class FakeKubelet(http.server.ThreadingHTTPServer):
    daemon_threads = True
    mode = "ok"
    token = "token-1"
    body = json.dumps(POD_LIST).encode()
    requests = 0

    def handle_error(self, request: Any, client_address: Any) -> None:  # clients hanging up early are expected
        pass


class KubeletHandler(http.server.BaseHTTPRequestHandler):
    server: FakeKubelet

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        srv = self.server
        srv.requests += 1
        if srv.mode == "slow":
            time.sleep(2)
        if self.path != "/pods":
            return self._send(404, b"404 page not found\n", "text/plain")
        if self.headers.get("Authorization") != f"Bearer {srv.token}":
            return self._send(401, b"Unauthorized\n", "text/plain")
        if srv.mode == "forbidden":
            return self._send(403, b"Forbidden (user=system:serviceaccount:x:y, verb=get, resource=nodes, "
                              b"subresource(s)=[proxy])\n", "text/plain")
        if srv.mode == "garbage":
            return self._send(200, b"\x00\x01garbage{{{")
        if srv.mode == "error":
            return self._send(500, b"internal error: runtime not ready\n", "text/plain")
        self._send(200, srv.body)


def _serve(server: http.server.HTTPServer) -> threading.Thread:
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    return t


@pytest.fixture
def kubelet(tls_files: tuple[str, str], tmp_path: Any) -> Iterator[tuple[FakeKubelet, dict[str, Any]]]:
    cert, key = tls_files
    srv = FakeKubelet(("127.0.0.1", 0), KubeletHandler)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    token_file = tmp_path / "token"
    token_file.write_text("token-1\n")
    t = _serve(srv)
    kw = {"url": f"https://127.0.0.1:{srv.server_address[1]}", "token_file": str(token_file), "ca_file": cert,
          "timeout": 1.0}
    try:
        yield srv, kw
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(2)


def test_kubelet_list_pods_https(kubelet: tuple[FakeKubelet, dict[str, Any]]) -> None:
    srv, kw = kubelet
    pods = KubeletClient(**kw).list_pods()
    assert sorted(p.name for p in pods)[:2] == ["bare", "db-0"] and len(pods) == 6
    assert {p.name: p for p in pods}["web-7d4b9c8f6d-x2x9k"].ips[1] == ip("fd00:10:244:1::5")


def test_kubelet_token_rotates(kubelet: tuple[FakeKubelet, dict[str, Any]]) -> None:
    srv, kw = kubelet
    c = KubeletClient(**kw)
    assert c.list_pods()
    srv.token = "token-2"  # the server now wants the new token; the file still has the old one
    with pytest.raises(IdentityError) as ei:
        c.list_pods()
    assert ei.value.kind == "unauthorized" and "rejected the token (401)" in str(ei.value)
    with open(kw["token_file"], "w") as f:
        f.write("token-2")
    assert c.list_pods()  # re-read on every call, no restart needed


@pytest.mark.parametrize("mode,kind,fragment", [
    ("forbidden", "unauthorized", "nodes/proxy"),
    ("garbage", "malformed", "not JSON"),
    ("error", "http_error", "HTTP 500"),
    ("slow", "timeout", "did not answer within 0.5s"),
])
def test_kubelet_failures(kubelet: tuple[FakeKubelet, dict[str, Any]], mode: str, kind: str, fragment: str) -> None:
    srv, kw = kubelet
    srv.mode = mode
    t0 = time.monotonic()
    with pytest.raises(IdentityError) as ei:
        KubeletClient(**{**kw, "timeout": 0.5}).list_pods()
    assert ei.value.kind == kind and fragment in str(ei.value), str(ei.value)
    assert "\n" not in str(ei.value) and kw["url"] in str(ei.value)
    assert time.monotonic() - t0 < 1.5


def test_kubelet_missing_token(kubelet: tuple[FakeKubelet, dict[str, Any]]) -> None:
    _, kw = kubelet
    with pytest.raises(IdentityError) as ei:
        KubeletClient(**{**kw, "token_file": "/nonexistent/token"}).list_pods()
    assert ei.value.kind == "unauthorized" and "none was read from /nonexistent/token" in str(ei.value)


def test_kubelet_tls_verification(kubelet: tuple[FakeKubelet, dict[str, Any]], tmp_path: Any) -> None:
    _, kw = kubelet
    other = tmp_path / "other.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(tmp_path / "k.pem"), "-out", str(other), "-days", "1",
                    "-subj", "/CN=other"], check=True, capture_output=True)
    with pytest.raises(IdentityError) as ei:
        KubeletClient(**{**kw, "ca_file": str(other)}).list_pods()
    assert ei.value.kind == "unreachable" and "--kubelet-ca-file" in str(ei.value)
    # insecure: no verification (the kubelet's self-signed serving cert rarely names 127.0.0.1)
    assert len(KubeletClient(**{**kw, "ca_file": str(other), "insecure": True}).list_pods()) == 6
    with pytest.raises(IdentityError) as ei:
        KubeletClient(**{**kw, "ca_file": str(tmp_path / "missing.crt")}).list_pods()
    assert ei.value.kind == "config"


def test_kubelet_connection_refused() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(IdentityError) as ei:
        KubeletClient(url=f"https://127.0.0.1:{port}", insecure=True, timeout=1).list_pods()
    assert ei.value.kind == "unreachable" and "refused" in str(ei.value)


def test_kubelet_https_client_against_plain_http() -> None:
    srv = FakeKubelet(("127.0.0.1", 0), KubeletHandler)
    t = _serve(srv)
    try:
        with pytest.raises(IdentityError) as ei:
            KubeletClient(url=f"https://127.0.0.1:{srv.server_address[1]}", insecure=True, timeout=1).list_pods()
        assert ei.value.kind == "unreachable" and "TLS" in str(ei.value)
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(2)


# --------------------------------------------------------------------------------------------------------
# Network namespaces on the real kernel (throwaway "node" + "pod" namespaces; nothing in our own netns)
# --------------------------------------------------------------------------------------------------------

def _sh(*cmds: str) -> None:
    for cmd in cmds:
        subprocess.run(cmd.split(), check=True, capture_output=True, timeout=20)


@pytest.fixture
def netns_factory() -> Iterator[Callable[[str], str]]:
    run = secrets.token_hex(3)
    made: list[str] = []

    def make(tag: str) -> str:
        name = f"nwid-{run}-{tag}"
        _sh(f"ip netns add {name}", f"ip -n {name} link set lo up")
        made.append(name)
        return name

    make.run = run  # type: ignore[attr-defined]
    try:
        yield make
    finally:
        for name in made:  # deleting a netns deletes every link in it, both ends of its veths included
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert f"nwid-{run}" not in left


@needs_root
def test_in_netns_moves_only_this_thread_and_restores(netns_factory: Callable[[str], str]) -> None:
    ns = netns_factory("a")
    home = nsmod.current_netns_inode()
    target = os.stat(f"/run/netns/{ns}").st_ino
    seen_elsewhere: list[int] = []
    go, done = threading.Event(), threading.Event()

    def other() -> None:  # a thread that already exists stays where it is
        go.wait(5)
        seen_elsewhere.append(nsmod.current_netns_inode())
        done.set()

    t = threading.Thread(target=other)
    t.start()
    with in_netns(ns):
        assert nsmod.current_netns_inode() == target
        go.set()
        done.wait(5)
    t.join()
    assert nsmod.current_netns_inode() == home and seen_elsewhere == [home]
    with pytest.raises(FileNotFoundError), in_netns("nwid-does-not-exist"):
        pass
    assert nsmod.current_netns_inode() == home
    with pytest.raises(RuntimeError), in_netns(f"/run/netns/{ns}"):
        raise RuntimeError("boom")
    assert nsmod.current_netns_inode() == home


@needs_root
def test_list_netns_sees_bind_mounts_and_processes(netns_factory: Callable[[str], str], tmp_path: Any) -> None:
    ns = netns_factory("l")
    (tmp_path / "not-a-netns").write_text("")  # a leftover plain file must be ignored
    found = list_netns(run_dirs=("/run/netns", str(tmp_path)))
    assert found[os.stat(f"/run/netns/{ns}").st_ino] == f"/run/netns/{ns}"
    assert nsmod.current_netns_inode() in found
    assert all(p != str(tmp_path / "not-a-netns") for p in found.values())
    # a process whose netns has no bind mount is found through /proc
    proc = subprocess.Popen(["unshare", "--net", "sleep", "30"])
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                ino = os.stat(f"/proc/{proc.pid}/ns/net").st_ino
            except FileNotFoundError:
                ino = 0
            if ino and ino != nsmod.current_netns_inode():
                break
            time.sleep(0.02)
        assert list_netns(run_dirs=())[ino] == f"/proc/{proc.pid}/ns/net"
    finally:
        proc.kill()
        proc.wait()


@needs_root
def test_map_pods_to_netns_real_kernel(netns_factory: Callable[[str], str]) -> None:
    run = netns_factory.run  # type: ignore[attr-defined]
    node, p1, p2, decoy = (netns_factory(t) for t in ("node", "p1", "p2", "decoy"))
    # Host ends live in the throwaway "node" netns; pod ends are eth0 in each pod netns.
    _sh(f"ip -n {node} link add vh{run}a type veth peer name eth0 netns {p1}",
        f"ip -n {node} link add vh{run}b type veth peer name eth0 netns {p2}",
        f"ip -n {p1} addr add 10.244.9.2/24 dev eth0", f"ip -n {p1} addr add fd00:9::2/64 dev eth0 nodad",
        f"ip -n {p1} link set eth0 up",
        f"ip -n {p2} addr add 10.244.9.3/24 dev eth0", f"ip -n {p2} link set eth0 up",
        # the decoy holds p1's IPv4 too, but no veth connects it to the node: it must not win
        f"ip -n {decoy} link add d0 type veth peer name d1", f"ip -n {decoy} addr add 10.244.9.2/24 dev d0")
    pods = [
        LocalPod("default", "a", ips=(ip("10.244.9.2"), ip("fd00:9::2")), phase="Running"),
        LocalPod("default", "b", ips=(ip("fd00:9::99"), ip("10.244.9.3")), phase="Running"),
        LocalPod("kube-system", "kube-proxy-x", ips=(ip("192.168.100.11"),), host_network=True, phase="Running"),
        LocalPod("default", "ghost", ips=(ip("10.244.9.250"),), phase="Running"),
        LocalPod("default", "pending", phase="Pending"),
    ]
    ino = {n: os.stat(f"/run/netns/{n}").st_ino for n in (node, p1, p2)}
    with structlog.testing.capture_logs() as logs, in_netns(node):
        mapping = map_pods_to_netns(pods)
        veths = nsmod.host_veths()
        nsid_p1 = nsmod.netnsid_of(f"/run/netns/{p1}")
        again = map_pods_to_netns(pods)
    by_name = {v.name: v for v in veths.values()}
    assert mapping[("default", "a")] == PodNetns(ino[p1], f"/run/netns/{p1}", f"vh{run}a", by_name[f"vh{run}a"].ifindex)
    assert mapping[("default", "b")] == PodNetns(ino[p2], f"/run/netns/{p2}", f"vh{run}b", by_name[f"vh{run}b"].ifindex)
    assert mapping[("kube-system", "kube-proxy-x")] == PodNetns(ino[node], f"/run/netns/{node}")
    assert mapping[("default", "ghost")].inode == 0 and mapping[("default", "pending")].inode == 0
    assert again == mapping
    assert by_name[f"vh{run}a"].peer_netnsid == nsid_p1 is not None
    # "not found" is logged once per pod, not once per scan, and not for a pod that has no IP yet
    assert [(e["event"], e["pod"]) for e in logs] == [("pod_netns_not_found", "ghost")]
    assert nsmod.netns_addresses(p1) == {ip("10.244.9.2"), ip("fd00:9::2")}


@needs_root
def test_kubelet_client_connects_from_another_netns(netns_factory: Callable[[str], str], tmp_path: Any) -> None:
    ns = netns_factory("k")
    with in_netns(ns):  # the listening socket is bound inside the throwaway netns
        srv = FakeKubelet(("127.0.0.1", 0), KubeletHandler)
    srv.token = "ro"
    t = _serve(srv)
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    tf = tmp_path / "token"
    tf.write_text("ro")
    try:
        assert len(KubeletClient(url=url, token_file=str(tf), netns=ns).list_pods()) == 6
        assert len(KubeletClient(url=url, token_file=str(tf), netns=f"/run/netns/{ns}").list_pods()) == 6
        with pytest.raises(IdentityError) as ei:  # from our own netns nothing listens on that port
            KubeletClient(url=url, token_file=str(tf), timeout=1).list_pods()
        assert ei.value.kind == "unreachable"
        with pytest.raises(IdentityError) as ei:
            KubeletClient(url=url, token_file=str(tf), netns="nwid-missing-ns").list_pods()
        assert ei.value.kind == "config"
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(2)


# --------------------------------------------------------------------------------------------------------
# Services and Nodes -> ClusterSnapshot
# --------------------------------------------------------------------------------------------------------

def _svc(ns: str, name: str, *, type_: str = "ClusterIP", cluster_ips: list[str] | None = None,
         external_ips: list[str] | None = None, lb: list[dict[str, str]] | None = None,
         ports: list[tuple[int, str, int | None]] = ()) -> k8s.V1Service:
    cips = cluster_ips or []
    return k8s.V1Service(
        metadata=k8s.V1ObjectMeta(namespace=ns, name=name, resource_version="1"),
        spec=k8s.V1ServiceSpec(type=type_, cluster_ip=cips[0] if cips else None, cluster_ips=cips or None,
                               external_ips=external_ips,
                               ports=[k8s.V1ServicePort(port=p, protocol=proto, node_port=np) for p, proto, np in ports]
                               or None),
        status=k8s.V1ServiceStatus(load_balancer=k8s.V1LoadBalancerStatus(
            ingress=[k8s.V1LoadBalancerIngress(**i) for i in lb] if lb else None)),
    )


def _node(name: str, cidrs: list[str] | None = None, cidr: str | None = None,
          addrs: list[tuple[str, str]] = ()) -> k8s.V1Node:
    return k8s.V1Node(
        metadata=k8s.V1ObjectMeta(name=name, resource_version="1"),
        spec=k8s.V1NodeSpec(pod_cidrs=cidrs, pod_cidr=cidr),
        status=k8s.V1NodeStatus(addresses=[k8s.V1NodeAddress(type=t, address=a) for t, a in addrs] or None),
    )


SERVICES = [
    _svc("default", "kubernetes", cluster_ips=["10.96.0.1"], ports=[(443, "TCP", None)]),
    _svc("default", "web", cluster_ips=["10.96.0.20", "fd00:96::20"], ports=[(80, "TCP", None)]),
    _svc("default", "headless", cluster_ips=["None"]),
    _svc("shop", "front", type_="NodePort", cluster_ips=["10.96.0.30"],
         ports=[(80, "TCP", 30080), (53, "UDP", 30053)]),
    _svc("shop", "lb", type_="LoadBalancer", cluster_ips=["10.96.0.40"], external_ips=["203.0.113.7"],
         lb=[{"ip": "198.51.100.10"}, {"hostname": "lb.example.com"}], ports=[(443, "TCP", 31443)]),
    _svc("shop", "ext", type_="ExternalName"),
]
NODES = [
    _node("node-1", cidrs=["10.244.1.0/24", "fd00:10:244:1::/64"],
          addrs=[("InternalIP", "192.168.100.11"), ("InternalIP", "fd00:100::11"), ("Hostname", "node-1")]),
    _node("node-2", cidr="10.244.2.0/24", addrs=[("InternalIP", "192.168.100.12"), ("ExternalIP", "203.0.113.2")]),
]


def test_snapshot_extraction() -> None:
    assert service_addresses(SERVICES[1]) == (ip("10.96.0.20"), ip("fd00:96::20"))
    assert service_addresses(SERVICES[2]) == ()
    assert service_addresses(SERVICES[4]) == (ip("10.96.0.40"), ip("203.0.113.7"), ip("198.51.100.10"))
    assert service_node_ports(SERVICES[3]) == ((30080, "TCP"), (30053, "UDP"))
    assert node_pod_cidrs(NODES[1]) == (ipaddress.ip_network("10.244.2.0/24"),)
    assert node_addresses(NODES[0]) == (ip("192.168.100.11"), ip("fd00:100::11"))


def test_build_snapshot() -> None:
    snap = build_snapshot(SERVICES, NODES, "node-1")
    assert snap.service_by_ip[ip("fd00:96::20")] == ("default", "web")
    assert snap.service_by_ip[ip("198.51.100.10")] == ("shop", "lb")
    assert snap.service_by_ip[ip("203.0.113.7")] == ("shop", "lb")
    assert len(snap.service_by_ip) == 7
    assert snap.node_ports == {(30080, "TCP"): ("shop", "front"), (30053, "UDP"): ("shop", "front"),
                               (31443, "TCP"): ("shop", "lb")}
    assert snap.cluster_pod_cidrs == parse_cidrs(["10.244.1.0/24,fd00:10:244:1::/64,10.244.2.0/24"])
    assert snap.node_pod_cidrs == parse_cidrs(["10.244.1.0/24,fd00:10:244:1::/64"])
    assert snap.node_ips == {ip("192.168.100.11"), ip("fd00:100::11"), ip("192.168.100.12"), ip("203.0.113.2")}
    assert snap.node_found and snap.services_synced and snap.nodes_synced
    assert not build_snapshot([], NODES, "node-9").node_found


def test_load_api_client(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    with pytest.raises(IdentityError) as ei:
        load_api_client(None)
    assert ei.value.kind == "config" and "--kubeconfig" in str(ei.value)
    kc = tmp_path / "kubeconfig"
    kc.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "lab",
        "clusters": [{"name": "lab",
                      "cluster": {"server": "https://127.0.0.1:6443", "insecure-skip-tls-verify": True}}],
        "users": [{"name": "u", "user": {"token": "abc"}}],
        "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": "u"}}],
    }))
    assert load_api_client(str(kc)).configuration.host == "https://127.0.0.1:6443"
    # "in cluster" without a mounted ServiceAccount falls back to the kubeconfig
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    monkeypatch.setenv("KUBECONFIG", str(kc))
    assert load_api_client(None).configuration.host == "https://127.0.0.1:6443"


# --------------------------------------------------------------------------------------------------------
# ClusterWatcher against a tiny list/watch server (the lab apiserver's e2e tests live elsewhere)
# --------------------------------------------------------------------------------------------------------

class FakeApi(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), ApiHandler)
        self.rv = 100
        self.state: dict[str, dict[str, dict[str, Any]]] = {"services": {}, "nodes": {}}
        self.events: dict[str, queue.Queue] = {"services": queue.Queue(), "nodes": queue.Queue()}
        self.lists = {"services": 0, "nodes": 0}
        self.down = False
        self.lock = threading.Lock()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass

    def put(self, res: str, type_: str, obj: dict[str, Any]) -> None:
        with self.lock:
            self.rv += 1
            obj = copy.deepcopy(obj)
            obj["metadata"]["resourceVersion"] = str(self.rv)
            key = f"{obj['metadata'].get('namespace', '')}/{obj['metadata']['name']}"
            if type_ == "DELETED":
                self.state[res].pop(key, None)
            elif type_ in ("ADDED", "MODIFIED"):
                self.state[res][key] = obj
            self.events[res].put({"type": type_, "object": obj})

    def cut(self, res: str) -> None:
        self.events[res].put(None)  # end the open watch stream


class ApiHandler(http.server.BaseHTTPRequestHandler):
    server: FakeApi
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        srv = self.server
        url = urllib.parse.urlsplit(self.path)
        q = urllib.parse.parse_qs(url.query)
        res = {"/api/v1/services": "services", "/api/v1/nodes": "nodes"}.get(url.path)
        if res is None or srv.down:
            body = json.dumps({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 503,
                               "message": "unavailable"}).encode() if res else b"{}"
            self.send_response(503 if res else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if q.get("watch") == ["true"]:  # chunked, like the apiserver: the client reads events as they come
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.close_connection = True
            end = time.monotonic() + int(q.get("timeoutSeconds", ["30"])[0])
            while time.monotonic() < end and not srv.down:
                try:
                    ev = srv.events[res].get(timeout=0.05)
                except queue.Empty:
                    continue
                if ev is None:
                    break
                line = json.dumps(ev).encode() + b"\n"
                self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            return
        with srv.lock:
            srv.lists[res] += 1
            kind = "ServiceList" if res == "services" else "NodeList"
            body = json.dumps({"kind": kind, "apiVersion": "v1", "metadata": {"resourceVersion": str(srv.rv)},
                               "items": list(srv.state[res].values())}).encode()
            while not srv.events[res].empty():  # a list supersedes queued events
                srv.events[res].get_nowait()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _wait(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def _svc_json(ns: str, name: str, ips: list[str], node_port: int | None = None) -> dict[str, Any]:
    port: dict[str, Any] = {"port": 80, "protocol": "TCP", "targetPort": 8080}
    if node_port:
        port["nodePort"] = node_port
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": ns, "name": name},
            "spec": {"type": "NodePort" if node_port else "ClusterIP", "clusterIP": ips[0], "clusterIPs": ips,
                     "ports": [port]}, "status": {"loadBalancer": {}}}


def _node_json(name: str, cidrs: list[str], addr: str, heartbeat: str = "2024-05-01T10:00:00Z") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
            "spec": {"podCIDR": cidrs[0], "podCIDRs": cidrs},
            "status": {"addresses": [{"type": "InternalIP", "address": addr}, {"type": "Hostname", "address": name}],
                       "conditions": [{"type": "Ready", "status": "True", "lastHeartbeatTime": heartbeat,
                                       "lastTransitionTime": "2024-05-01T09:00:00Z"}]}}


def test_cluster_watcher_list_watch_relist_health_stop() -> None:
    api = FakeApi()
    api.put("services", "ADDED", _svc_json("default", "web", ["10.96.0.20", "fd00:96::20"]))
    api.put("nodes", "ADDED", _node_json("node-1", ["10.244.1.0/24"], "192.168.100.11"))
    for res in api.events:  # the initial state comes from the list, not from queued events
        while not api.events[res].empty():
            api.events[res].get_nowait()
    t = _serve(api)
    snaps: list[ClusterSnapshot] = []
    cfg = k8s.Configuration(host=f"http://127.0.0.1:{api.server_address[1]}")
    w = ClusterWatcher(k8s.ApiClient(cfg), "node-1", snaps.append, backoff_initial=0.05, backoff_max=0.2,
                       request_timeout=3)
    try:
        with structlog.testing.capture_logs() as logs:
            w.start()
            assert w.wait_synced(5)
            assert _wait(lambda: w.up["apiserver"])
            snap = w.snapshot
            assert snap.service_by_ip[ip("fd00:96::20")] == ("default", "web") and snap.node_found
            assert snap.node_pod_cidrs == parse_cidrs(["10.244.1.0/24"])

            # watch events: a heartbeat-only Node update publishes nothing; a real change publishes once
            assert _wait(lambda: all(x._watches.get(r) for x in [w] for r in w.RESOURCES))
            n0 = len(snaps)
            api.put("nodes", "MODIFIED", _node_json("node-1", ["10.244.1.0/24"], "192.168.100.11",
                                                    "2024-05-01T10:05:00Z"))
            api.put("services", "ADDED", _svc_json("shop", "front", ["10.96.0.30"], node_port=30080))
            assert _wait(lambda: w.snapshot.node_ports.get((30080, "TCP")) == ("shop", "front"))
            assert len(snaps) == n0 + 1
            api.put("services", "DELETED", _svc_json("default", "web", ["10.96.0.20", "fd00:96::20"]))
            assert _wait(lambda: ip("10.96.0.20") not in w.snapshot.service_by_ip)

            # 410 Gone in the stream -> re-list (state comes back from the list)
            lists = api.lists["services"]
            api.events["services"].put({"type": "ERROR", "object": {
                "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 410, "reason": "Expired",
                "message": "too old resource version: 101 (150)"}})
            assert _wait(lambda: api.lists["services"] > lists)

            # server ends the stream cleanly -> re-watch, no re-list
            lists = api.lists["nodes"]
            assert _wait(lambda: w._watches.get("nodes") is not None)
            api.cut("nodes")
            time.sleep(0.3)
            assert api.lists["nodes"] == lists and w.up["apiserver"]

            # outage: many failed retries, one log line; recovery: one log line
            api.down = True
            assert _wait(lambda: not w.up["apiserver"])
            before = api.lists["services"] + api.lists["nodes"]
            time.sleep(0.8)
            assert not w.up["apiserver"]
            api.down = False
            assert _wait(lambda: w.up["apiserver"])
            assert api.lists["services"] + api.lists["nodes"] >= before
            assert w.snapshot.node_ports.get((30080, "TCP")) == ("shop", "front")

            # stop is prompt even with watches open (server timeout is 300 s)
            assert _wait(lambda: all(w._watches.get(r) for r in w.RESOURCES))
            t0 = time.monotonic()
            w.stop()
            assert time.monotonic() - t0 < 3
            assert not any(th.is_alive() for th in w._threads)
        health = [e["event"] for e in logs if e["event"] in ("apiserver_up", "apiserver_down")]
        assert health == ["apiserver_up", "apiserver_down", "apiserver_up"], logs
    finally:
        w.stop()
        api.down = True
        api.shutdown()
        api.server_close()
        t.join(2)


class WatchForbiddenHandler(ApiHandler):
    def do_GET(self) -> None:  # noqa: N802
        if "watch=true" in self.path and getattr(self.server, "forbid_watch", False):
            body = json.dumps({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 403,
                               "reason": "Forbidden", "message": "services is forbidden: cannot watch"}).encode()
            self.send_response(403)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        super().do_GET()


def test_cluster_watcher_list_allowed_watch_forbidden() -> None:
    """RBAC with list but not watch: down (once, with the reason), not flapping with every successful re-list."""
    api = FakeApi()
    api.RequestHandlerClass = WatchForbiddenHandler
    api.forbid_watch = True  # type: ignore[attr-defined]
    t = _serve(api)
    cfg = k8s.Configuration(host=f"http://127.0.0.1:{api.server_address[1]}")
    w = ClusterWatcher(k8s.ApiClient(cfg), "node-1", lambda s: None, backoff_initial=0.05, backoff_max=0.1)
    try:
        with structlog.testing.capture_logs() as logs:
            w.start()
            time.sleep(1.0)
            assert not w.up["apiserver"] and api.lists["services"] >= 3
            api.forbid_watch = False  # type: ignore[attr-defined]
            assert _wait(lambda: w.up["apiserver"])
            w.stop()
        health = [(e["event"], e.get("error", "")) for e in logs if e["event"] in ("apiserver_up", "apiserver_down")]
        # Up is only logged once BOTH Services and Nodes are healthy: whether the first lists both land before
        # the first forbidden watch is timing; what matters is one down (with the reason), one recovery.
        if health and health[0][0] == "apiserver_up":
            health = health[1:]
        assert [h[0] for h in health] == ["apiserver_down", "apiserver_up"], health
        assert "needs list and watch" in health[0][1]
    finally:
        w.stop()
        api.shutdown()
        api.server_close()
        t.join(2)


def test_cluster_watcher_unreachable_never_crashes() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    cfg = k8s.Configuration(host=f"http://127.0.0.1:{port}")
    cfg.retries = 0
    w = ClusterWatcher(k8s.ApiClient(cfg), "node-1", lambda s: None, backoff_initial=0.05, backoff_max=0.1)
    with structlog.testing.capture_logs() as logs:
        w.start()
        time.sleep(0.8)
        assert not w.up["apiserver"] and all(th.is_alive() for th in w._threads)
        t0 = time.monotonic()
        w.stop()
        assert time.monotonic() - t0 < 2
    downs = [e for e in logs if e["event"] == "apiserver_down"]
    assert len(downs) == 1 and "cannot reach apiserver" in downs[0]["error"], logs


# --------------------------------------------------------------------------------------------------------
# KubeResolver
# --------------------------------------------------------------------------------------------------------

def _resolver() -> tuple[KubeResolver, list[LocalPod]]:
    pods = parse_pod_list(json.dumps(pod_list(
        *POD_LIST["items"],
        _pod("job-done", ips=["10.244.1.5"], phase="Succeeded", owner=("Job", "j")),  # IP reused by web now
    )))
    netns_map = {("default", "web-7d4b9c8f6d-x2x9k"): PodNetns(4026532001, "/run/netns/cni-1", "veth1", 7),
                 ("default", "db-0"): PodNetns(4026532002, "/run/netns/cni-2", "veth2", 8),
                 ("kube-system", "kube-proxy-8kq2n"): PodNetns(4026531840)}
    r = KubeResolver(node_netns_inode=4026531840)
    r.update_pods(pods, netns_map)
    r.update_cluster(build_snapshot(SERVICES, NODES, "node-1"))
    return r, pods


def test_resolver_pods() -> None:
    r, pods = _resolver()
    web = PodRef("default", "web-7d4b9c8f6d-x2x9k", "Deployment/web")
    assert r.pod_for_ip(ip("10.244.1.5")) == web
    assert r.pod_for_ip("fd00:10:244:1::5") == web and r.pod_for_ip("::ffff:10.244.1.5") == web
    assert r.pod_for_ip(ip("192.168.100.11")) == NODE  # hostNetwork pods share the node's IP
    assert r.pod_for_ip("not-an-ip") == NODE and r.pod_for_ip(ip("10.244.1.200")) == NODE
    assert r.pod_for_netns(4026532002) == PodRef("default", "db-0", "StatefulSet/db")
    assert r.pod_for_netns(4026531840) == NODE and r.pod_for_netns(0) == NODE
    r.update_pods([p for p in pods if p.name != "web-7d4b9c8f6d-x2x9k"], {})
    assert r.pod_for_ip(ip("10.244.1.5")) == NODE and r.pod_for_netns(4026532001) == NODE


def test_resolver_services() -> None:
    r, _ = _resolver()
    assert r.service_for_ip("10.96.0.20") == ("default", "web")
    assert r.service_for_ip(ip("10.96.0.99")) is None
    assert r.service_for_nodeport(30053, "udp") == ("shop", "front")
    assert r.service_for_nodeport(30080, 6) == ("shop", "front") and r.service_for_nodeport(30080, 17) is None


def test_a_pod_pool_outside_every_node_podcidr_stays_a_pod_address() -> None:
    """Calico-style node: --cluster-cidr is the IP pool; the Nodes' podCIDRs (if any) do not cover it."""
    from netwatchd.classify import classify

    view = ClusterView(cluster_cidrs=parse_cidrs(["192.168.0.0/16"]), service_cidrs=parse_cidrs(["10.96.0.0/12"]))
    r, _ = _resolver()  # its Nodes list 10.244.x podCIDRs
    r.apply_to_view(view)
    att = classify(view, ip("10.244.1.5"), ip("192.168.7.9"))  # local pod to a pod from the pool on another node
    assert att.traffic_class == "pod_to_pod_remote"


def test_resolver_apply_to_view() -> None:
    flags = parse_cidrs(["10.244.0.0/16"])
    view = ClusterView(cluster_cidrs=flags, node_pod_cidrs=parse_cidrs(["10.244.1.0/24"]),
                       service_cidrs=parse_cidrs(["10.96.0.0/12"]))
    r = KubeResolver(node_netns_inode=1)
    r.apply_to_view(view)  # nothing known yet: the flags stay, CIDR fallback for local pods
    assert view.local_pod_ips is None and view.cluster_cidrs == flags and view.service_ips == frozenset()
    r2, _ = _resolver()
    r2.apply_to_view(view)
    assert view.local_pod_ips == {ip("10.244.1.5"), ip("fd00:10:244:1::5"), ip("10.244.1.6"), ip("10.244.1.7"),
                                  ip("10.244.1.8")}
    # the flag's pool stays next to the Nodes' podCIDRs (a Calico IP pool is in no Node's spec.podCIDRs)
    assert view.cluster_cidrs == parse_cidrs(["10.244.0.0/16,10.244.1.0/24,fd00:10:244:1::/64,10.244.2.0/24"])
    assert ip("198.51.100.10") in view.service_ips and ip("203.0.113.2") in view.node_ips
    assert view.service_cidrs == parse_cidrs(["10.96.0.0/12"])
    # the apiserver later reports no podCIDRs: back to the flag values, not the previous API values
    r2.update_cluster(ClusterSnapshot(services_synced=True, nodes_synced=True))
    r2.apply_to_view(view)
    assert view.cluster_cidrs == flags and view.node_pod_cidrs == parse_cidrs(["10.244.1.0/24"])
    assert view.service_ips == frozenset() and view.node_ips == frozenset()
