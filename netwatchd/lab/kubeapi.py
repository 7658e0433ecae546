"""Lab Kubernetes endpoints: a kubelet ``/pods`` server and a LIST/WATCH API server, speaking the real wire formats.

No control plane can run in the test environment, so these servers stand in for one. They are built so that
netwatchd's unmodified clients, and the unmodified ``kubernetes`` Python client, cannot tell them from a real
cluster for the requests netwatchd makes:

* :class:`LabCA` - a throwaway CA and server certificate (SANs 127.0.0.1, ::1, localhost).
* :class:`LabKubelet` - ``GET /pods`` returning a ``v1 PodList`` built from ``kubernetes.client`` models, bearer
  token auth, runtime fault injection (``mode``) and stop/start on the same port; plain HTTP for the read-only port.
* :class:`LabApiServer` - LIST, GET and WATCH of Services and Nodes with resourceVersion semantics: chunked
  newline-delimited watch events, replay after a resourceVersion, ``410 Gone`` for compacted history, bookmarks,
  ``timeoutSeconds`` and abrupt stream cuts.
* :func:`run_in_netns` / :func:`http_get` - create sockets inside a named network namespace. Servers given
  ``netns=`` create their listening socket there (a socket stays in the netns it was created in), so netwatchd
  running in a lab node netns reaches them on 127.0.0.1 while the test process stays in the host netns.

Timestamps are RFC 3339 with a ``Z`` suffix and false booleans / empty fields are omitted, as Go's encoder does.
"""

from __future__ import annotations

import _socket
import base64
import contextlib
import copy
import ctypes
import ctypes.util
import hashlib
import http.client
import ipaddress
import json
import logging
import os
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

from kubernetes import client as k8s

log = logging.getLogger(__name__)

T = TypeVar("T")

_CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"

#: Fault-injection modes of :class:`LabKubelet`.
KUBELET_MODES = ("ok", "unauthorized", "slow", "garbage", "error500")


# ----------------------------------------------------------------------------------------------------
# Network namespaces
# ----------------------------------------------------------------------------------------------------

_libc_handle: ctypes.CDLL | None = None


def _setns(fd: int) -> None:
    """setns(2) the calling thread into the network namespace behind ``fd`` (Python 3.11 has no os.setns)."""
    global _libc_handle
    if _libc_handle is None:
        _libc_handle = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    if _libc_handle.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def netns_path(netns: str) -> str:
    """The bind-mount path of a named netns (``/run/netns/<name>``); paths are returned unchanged."""
    return netns if "/" in netns else os.path.join(NETNS_DIR, netns)


def run_in_netns(netns: str | None, fn: Callable[[], T]) -> T:
    """Call ``fn`` in network namespace ``netns`` (a name under /run/netns or a path) and return its result.

    setns(CLONE_NEWNET) only moves the calling thread, so ``fn`` runs on a fresh short-lived thread: the caller's
    thread never changes namespace, even if something fails half-way. Sockets created by ``fn`` stay in
    ``netns`` for their whole life. ``netns=None`` calls ``fn`` directly.
    """
    if netns is None:
        return fn()
    path = netns_path(netns)
    box: dict[str, Any] = {}

    def worker() -> None:
        try:
            own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
            try:
                target = os.open(path, os.O_RDONLY)
                try:
                    _setns(target)
                finally:
                    os.close(target)
                try:
                    box["result"] = fn()
                finally:
                    _setns(own)  # switch back anyway: keeps the invariant if this thread is ever reused
            finally:
                os.close(own)
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=worker, name=f"netns-{os.path.basename(path)}", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


def http_get(
    url: str,
    netns: str | None = None,
    headers: dict[str, str] | None = None,
    ca_file: str | None = None,
    timeout: float = 5,
) -> tuple[int, bytes]:
    """GET ``url`` from inside ``netns`` (or the current netns) and return ``(status, body)``.

    For https, the server certificate is verified against ``ca_file`` when given, and not verified at all
    otherwise (lab use only). ``timeout`` applies to connect and to each read; it raises TimeoutError.
    """
    parts = urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host = parts.hostname or "127.0.0.1"

    def fetch() -> tuple[int, bytes]:
        conn: http.client.HTTPConnection
        if parts.scheme == "https":
            if ca_file:
                ctx = ssl.create_default_context(cafile=ca_file)
            else:
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            conn = http.client.HTTPSConnection(host, parts.port or 443, timeout=timeout, context=ctx)
        else:
            conn = http.client.HTTPConnection(host, parts.port or 80, timeout=timeout)
        try:
            conn.request("GET", target, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    return run_in_netns(netns, fetch)


# ----------------------------------------------------------------------------------------------------
# Certificates
# ----------------------------------------------------------------------------------------------------


class LabCA:
    """A throwaway CA plus one server certificate, written as PEM files to a private temp dir.

    The server certificate's SANs cover 127.0.0.1, ::1 and localhost (plus ``extra_sans``: IPs or DNS names).
    Uses the ``cryptography`` package when importable, else the ``openssl`` CLI (``backend`` forces one).
    """

    def __init__(self, extra_sans: Sequence[str] = (), days: int = 2, backend: str = "auto") -> None:
        if backend not in ("auto", "cryptography", "openssl"):
            raise ValueError(f"unknown backend {backend!r}")
        self.dir = tempfile.mkdtemp(prefix="netwatchd-labca-")
        self.ca_file = os.path.join(self.dir, "ca.crt")
        self.cert_file = os.path.join(self.dir, "server.crt")
        self.key_file = os.path.join(self.dir, "server.key")
        self.sans: list[str] = ["127.0.0.1", "::1", "localhost", *extra_sans]
        try:
            if backend == "auto":
                try:
                    import cryptography  # noqa: F401
                except ImportError:
                    backend = "openssl"
                else:
                    backend = "cryptography"
            self.backend = backend
            if backend == "cryptography":
                self._generate_cryptography(days)
            else:
                self._generate_openssl(days)
            os.chmod(self.key_file, 0o600)
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    @staticmethod
    def _is_ip(name: str) -> bool:
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return False
        return True

    def _generate_cryptography(self, days: int) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        now = datetime.now(UTC)

        def key_usage(**on: bool) -> x509.KeyUsage:
            names = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
                     "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only")
            return x509.KeyUsage(**{n: on.get(n, False) for n in names})

        def builder(subject: x509.Name, issuer: x509.Name, pub: Any) -> x509.CertificateBuilder:
            return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(pub)
                    .serial_number(x509.random_serial_number())
                    .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=days))
                    .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False))

        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "netwatchd-lab-ca")])
        ca_cert = (builder(ca_name, ca_name, ca_key.public_key())
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .add_extension(key_usage(digital_signature=True, key_cert_sign=True, crl_sign=True), critical=True)
                   .sign(ca_key, hashes.SHA256()))
        key = ec.generate_private_key(ec.SECP256R1())
        alt: list[x509.GeneralName] = [
            x509.IPAddress(ipaddress.ip_address(n)) if self._is_ip(n) else x509.DNSName(n) for n in self.sans
        ]
        cert = (builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]), ca_name, key.public_key())
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(key_usage(digital_signature=True), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .add_extension(x509.SubjectAlternativeName(alt), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
                .sign(ca_key, hashes.SHA256()))
        pem = serialization.Encoding.PEM
        with open(self.ca_file, "wb") as f:
            f.write(ca_cert.public_bytes(pem))
        with open(self.cert_file, "wb") as f:
            f.write(cert.public_bytes(pem))
        with open(os.open(self.key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            f.write(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))

    def _generate_openssl(self, days: int) -> None:
        ca_key = os.path.join(self.dir, "ca.key")
        csr = os.path.join(self.dir, "server.csr")
        ext = os.path.join(self.dir, "server.ext")
        alt = ",".join(f"IP:{n}" if self._is_ip(n) else f"DNS:{n}" for n in self.sans)
        with open(ext, "w") as f:
            f.write("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                    "extendedKeyUsage=serverAuth,clientAuth\nsubjectKeyIdentifier=hash\n"
                    f"authorityKeyIdentifier=keyid\nsubjectAltName={alt}\n")
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        cmds = [
            ["openssl", "req", "-x509", *ec, "-keyout", ca_key, "-out", self.ca_file, "-days", str(days),
             "-subj", "/CN=netwatchd-lab-ca", "-addext", "basicConstraints=critical,CA:TRUE,pathlen:0",
             "-addext", "keyUsage=critical,digitalSignature,keyCertSign,cRLSign"],
            ["openssl", "req", *ec, "-keyout", self.key_file, "-out", csr, "-subj", "/CN=localhost"],
            ["openssl", "x509", "-req", "-in", csr, "-CA", self.ca_file, "-CAkey", ca_key, "-days", str(days),
             "-set_serial", str(int.from_bytes(secrets.token_bytes(8), "big")), "-extfile", ext, "-out",
             self.cert_file],
        ]
        for cmd in cmds:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd[:3])} failed: {proc.stderr.strip()}")

    @property
    def ca_pem(self) -> bytes:
        """The CA certificate in PEM form (for kubeconfig ``certificate-authority-data``)."""
        with open(self.ca_file, "rb") as f:
            return f.read()

    def server_context(self) -> ssl.SSLContext:
        """A server-side TLS context presenting the server certificate."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """A client-side TLS context trusting only this CA (hostname checks on)."""
        return ssl.create_default_context(cafile=self.ca_file)

    def close(self) -> None:
        """Delete the temp dir and every file in it (idempotent)."""
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LabCA:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------------
# Serialisation helpers
# ----------------------------------------------------------------------------------------------------

_api_client: k8s.ApiClient | None = None
_TS_RE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.\d+)?\+00:00$")


def _to_wire(model: Any) -> Any:
    """Serialise a kubernetes model to the JSON-ready dict an apiserver/kubelet sends (camelCase keys, no nulls).

    ApiClient renders datetimes as ``...+00:00``; Go renders RFC 3339 ``...Z`` at second precision, so fix that.
    """
    global _api_client
    if _api_client is None:
        _api_client = k8s.ApiClient()
    return _fix_timestamps(_api_client.sanitize_for_serialization(model))


def _fix_timestamps(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _fix_timestamps(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_fix_timestamps(v) for v in obj]
    if isinstance(obj, str):
        m = _TS_RE.match(obj)
        return f"{m.group(1)}Z" if m else obj
    return obj


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _status(code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    """A ``v1 Status`` failure object, as the apiserver sends with error responses and ERROR watch events."""
    out: dict[str, Any] = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                           "message": message, "reason": reason}
    if details:
        out["details"] = details
    out["code"] = code
    return out


def _parse_bool(value: str | None) -> bool:
    """Go's strconv.ParseBool, which the apiserver uses for ``watch=``: the Python client sends ``watch=True``."""
    return value in ("1", "t", "T", "true", "TRUE", "True")


def _hard_shutdown(sock: socket.socket) -> None:
    """shutdown(2) the fd under ``sock`` (also for SSLSocket, without touching its SSL state): peers see EOF and
    any thread blocked reading or writing it wakes with an error."""
    with contextlib.suppress(OSError):
        _socket.socket.shutdown(sock, socket.SHUT_RDWR)


# ----------------------------------------------------------------------------------------------------
# Common server plumbing
# ----------------------------------------------------------------------------------------------------


class _AutoToken:
    """Sentinel type for ``token=AUTO``."""

    def __repr__(self) -> str:
        return "AUTO"


#: Default ``token`` argument: a random token for TLS servers, no auth for the kubelet's plain-HTTP read-only port.
AUTO: Any = _AutoToken()


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart on the same port (stop/start)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


class _HTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer on a pre-made listening socket (made in some netns), with TLS done per connection."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, sock: socket.socket, handler: type[BaseHTTPRequestHandler], lab: _LabServer,
                 ssl_ctx: ssl.SSLContext | None) -> None:
        super().__init__(sock.getsockname()[:2], handler, bind_and_activate=False)
        self.socket.close()  # the unbound socket TCPServer made in *this* thread's netns
        self.socket = sock
        self.server_address = sock.getsockname()
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])
        self.lab = lab
        self.ssl_ctx = ssl_ctx

    def finish_request(self, request: Any, client_address: Any) -> None:
        conn = request
        if self.ssl_ctx is not None:
            # Handshake here, on the connection's own thread: a stalled client must not block accept().
            try:
                request.settimeout(10)
                conn = self.ssl_ctx.wrap_socket(request, server_side=True)
                conn.settimeout(None)
            except OSError as exc:
                log.debug("lab TLS handshake from %s failed: %s", client_address, exc)
                return
        self.lab._track(conn)
        try:
            self.RequestHandlerClass(conn, client_address, self)
        finally:
            self.lab._untrack(conn)
            if conn is not request:
                with contextlib.suppress(OSError):
                    conn.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("lab server: error serving %s", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive handler with JSON helpers; logs go to the module logger, not stderr."""

    protocol_version = "HTTP/1.1"
    server_version = "netwatchd-lab"
    sys_version = ""
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.server.lab.__class__.__name__, format % args)

    def _send(self, code: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _send_json(self, code: int, obj: Any) -> None:
        self._send(code, _dumps(obj), "application/json")

    def _token_ok(self, token: str | None) -> bool:
        if token is None:
            return True
        scheme, _, value = (self.headers.get("Authorization") or "").partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(value.strip().encode(), token.encode())


class _LabServer:
    """Lifecycle shared by the lab servers: listen in a netns, serve from a daemon thread, stop/start, close."""

    _handler_class: type[_Handler]
    _kind = "lab"

    def __init__(self, *, ca: LabCA | None, tls: bool, netns: str | None, host: str, port: int) -> None:
        self.netns = netns
        self.host = host
        self.tls = tls
        self._port = port
        self._own_ca = tls and ca is None
        self.ca: LabCA | None = LabCA() if self._own_ca else ca
        self._ssl_ctx = self.ca.server_context() if (tls and self.ca) else None
        self._cond = threading.Condition()
        self._conns: set[socket.socket] = set()
        self._server: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        #: ``"METHOD /path?query"`` of every request received, in order (lets tests assert re-lists etc.).
        self.requests: list[str] = []

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Start listening (again): after :meth:`stop`, on the same port."""
        if self._closed:
            raise RuntimeError(f"{self._kind} server is closed")
        if self._server is not None:
            return
        sock = run_in_netns(self.netns, lambda: _listen(self.host, self._port))
        self._port = sock.getsockname()[1]
        self._on_start()
        server = _HTTPServer(sock, self._handler_class, self, self._ssl_ctx)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True,
                                  name=f"{self._kind}-{self._port}")
        thread.start()
        self._server, self._thread = server, thread

    def stop(self) -> None:
        """Stop listening and drop every open connection (simulates the server going down). Idempotent."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        self._on_stop()
        with self._cond:
            conns = list(self._conns)
        for conn in conns:
            _hard_shutdown(conn)
        if thread is not None:
            thread.join(timeout=5)

    def close(self) -> None:
        """Stop and release everything (temp files, an owned CA). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.stop()
        self._cleanup()
        if self._own_ca and self.ca is not None:
            self.ca.close()

    def _on_start(self) -> None:
        """Hook: called before serving starts."""

    def _on_stop(self) -> None:
        """Hook: called after the listener closed, before connections are dropped."""

    def _cleanup(self) -> None:
        """Hook: release files on close."""

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- properties ----------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the server currently accepts connections."""
        return self._server is not None

    @property
    def port(self) -> int:
        """The TCP port (fixed after the first start, kept across stop/start)."""
        return self._port

    @property
    def url(self) -> str:
        """Base URL, e.g. ``https://127.0.0.1:PORT`` (reachable inside :attr:`netns` only)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self._port}"

    @property
    def ca_file(self) -> str | None:
        """CA bundle clients should trust (None for plain HTTP)."""
        return self.ca.ca_file if (self.tls and self.ca) else None

    # -- connection tracking -------------------------------------------------------------------------

    def _track(self, conn: socket.socket) -> None:
        with self._cond:
            self._conns.add(conn)

    def _untrack(self, conn: socket.socket) -> None:
        with self._cond:
            self._conns.discard(conn)

    def _record(self, method: str, path: str) -> None:
        with self._cond:
            self.requests.append(f"{method} {path}")


# ----------------------------------------------------------------------------------------------------
# Kubelet
# ----------------------------------------------------------------------------------------------------


@dataclass
class PodSpec:
    """What the lab knows about a pod; :class:`LabKubelet` turns it into a full ``v1 Pod``.

    ``owner_kind=""`` means no ownerReferences (a bare pod); ``owner_name=""`` derives one from the pod name
    (``web-7d4b9c-x2x1z`` -> ``web-7d4b9c`` for a ReplicaSet). ``host_ip`` defaults to ``ips[0]`` for
    host-network pods and is omitted otherwise.
    """

    name: str
    namespace: str
    uid: str
    node_name: str
    ips: list[str]  # v4 and/or v6, primary first
    host_network: bool = False
    owner_kind: str = "ReplicaSet"
    owner_name: str = ""
    containers: list[str] = field(default_factory=lambda: ["app"])
    phase: str = "Running"
    labels: dict[str, str] = field(default_factory=dict)
    host_ip: str = ""


_OWNER_API = {"ReplicaSet": "apps/v1", "DaemonSet": "apps/v1", "StatefulSet": "apps/v1", "Deployment": "apps/v1",
              "Job": "batch/v1", "CronJob": "batch/v1", "Node": "v1", "ReplicationController": "v1"}


def _sha(*parts: str) -> str:
    return hashlib.sha256("/".join(parts).encode()).hexdigest()


def _pod_model(spec: PodSpec, started: datetime) -> k8s.V1Pod:
    """A ``v1 Pod`` as the kubelet reports it (status, container IDs, config annotations) for ``spec``."""
    owners = None
    if spec.owner_kind:
        owner_name = spec.owner_name or (spec.name.rsplit("-", 1)[0] if "-" in spec.name else spec.name)
        owners = [k8s.V1OwnerReference(
            api_version=_OWNER_API.get(spec.owner_kind, "apps/v1"), kind=spec.owner_kind, name=owner_name,
            uid=str(uuid.UUID(_sha("owner", spec.namespace, spec.owner_kind, owner_name)[:32])),
            controller=True, block_owner_deletion=True)]
    running = spec.phase == "Running"
    finished = spec.phase in ("Succeeded", "Failed")
    statuses = []
    for name in spec.containers:
        image = f"registry.k8s.io/lab/{name}:1.0"
        if running:
            state = k8s.V1ContainerState(running=k8s.V1ContainerStateRunning(started_at=started))
        elif finished:
            code = 0 if spec.phase == "Succeeded" else 1
            state = k8s.V1ContainerState(terminated=k8s.V1ContainerStateTerminated(
                exit_code=code, reason="Completed" if code == 0 else "Error", started_at=started, finished_at=started))
        else:
            state = k8s.V1ContainerState(waiting=k8s.V1ContainerStateWaiting(reason="ContainerCreating"))
        statuses.append(k8s.V1ContainerStatus(
            name=name, image=image, image_id=f"{image.rsplit(':', 1)[0]}@sha256:{_sha('image', image)}",
            # Pending containers have no runtime ID yet, exactly like the real kubelet.
            container_id=f"containerd://{_sha(spec.uid, name)}" if (running or finished) else None,
            ready=running, restart_count=0, started=running, state=state))
    host_ip = spec.host_ip or (spec.ips[0] if spec.host_network and spec.ips else "")
    return k8s.V1Pod(
        metadata=k8s.V1ObjectMeta(
            name=spec.name, namespace=spec.namespace, uid=spec.uid,
            resource_version=str(int(_sha("rv", spec.uid)[:6], 16)), creation_timestamp=started,
            labels=spec.labels or None, owner_references=owners,
            annotations={"kubernetes.io/config.source": "api", "kubernetes.io/config.seen": started.isoformat()}),
        spec=k8s.V1PodSpec(
            node_name=spec.node_name, host_network=True if spec.host_network else None,  # Go omits false
            containers=[k8s.V1Container(name=n, image=f"registry.k8s.io/lab/{n}:1.0") for n in spec.containers],
            restart_policy="Always", dns_policy="ClusterFirstWithHostNet" if spec.host_network else "ClusterFirst",
            service_account_name="default", scheduler_name="default-scheduler", termination_grace_period_seconds=30),
        status=k8s.V1PodStatus(
            phase=spec.phase, qos_class="BestEffort", start_time=started,
            host_ip=host_ip or None, host_ips=[k8s.V1HostIP(ip=host_ip)] if host_ip else None,
            pod_ip=spec.ips[0] if spec.ips else None,
            pod_ips=[k8s.V1PodIP(ip=ip) for ip in spec.ips] or None,
            container_statuses=statuses or None),
    )


def pod_list_json(pods: Iterable[PodSpec], started: datetime | None = None) -> dict[str, Any]:
    """The ``v1 PodList`` document the kubelet's ``GET /pods`` returns for ``pods``."""
    started = started or _now()
    return {"kind": "PodList", "apiVersion": "v1", "metadata": {},
            "items": [_to_wire(_pod_model(p, started)) for p in pods]}


class _KubeletHandler(_Handler):
    server: _HTTPServer

    def do_GET(self) -> None:
        kubelet: LabKubelet = self.server.lab  # type: ignore[assignment]
        kubelet._record("GET", self.path)
        path = urlsplit(self.path).path
        wake = kubelet._wake
        if path in ("/healthz", "/healthz/"):
            self._send(200, b"ok", "text/plain; charset=utf-8")
            return
        if path not in ("/pods", "/pods/"):
            self._send(404, b"404 page not found\n", "text/plain; charset=utf-8")
            return
        mode = kubelet.mode
        if mode == "unauthorized" or not self._token_ok(kubelet.token):
            if kubelet.unauthorized_body == "status":
                self._send_json(401, _status(401, "Unauthorized", "Unauthorized"))
            else:  # the real kubelet: go-restful WriteErrorString(401, "Unauthorized")
                self._send(401, b"Unauthorized", "text/plain; charset=utf-8")
            return
        if mode == "error500":
            self._send(500, b"Internal Error: lab fault injection", "text/plain; charset=utf-8")
            return
        # "slow": longer than any sane client timeout; stop()/close() wake it early so threads don't linger.
        if mode == "slow" and wake.wait(kubelet.slow_seconds):
            self.close_connection = True
            return
        body = _dumps(kubelet.pod_list())
        if mode == "garbage":
            body = body[: max(1, len(body) // 2)] + b',"items":[{{{'  # 200 + truncated, invalid JSON
        self._send(200, body, "application/json")


class LabKubelet(_LabServer):
    """A kubelet's ``GET /pods`` endpoint (10250 with TLS + bearer token, or the plain read-only port).

    Pods come from :meth:`set_pods`. Faults are switched at runtime with :attr:`mode` (one of
    :data:`KUBELET_MODES`): ``"unauthorized"`` answers 401 even to the right token, ``"slow"`` waits
    :attr:`slow_seconds` before answering, ``"garbage"`` answers 200 with truncated JSON, ``"error500"``
    answers 500. :meth:`stop` / :meth:`start` take it down and back up on the same port.

    ``token=AUTO`` makes a random token for TLS and disables auth for ``tls=False`` (like ``--read-only-port``);
    ``token=None`` disables auth. A 401 body is the real kubelet's plain-text ``Unauthorized``; set
    :attr:`unauthorized_body` to ``"status"`` for an apiserver-style Status JSON instead.
    """

    _handler_class = _KubeletHandler
    _kind = "kubelet"

    def __init__(
        self,
        ca: LabCA | None = None,
        token: str | None = AUTO,
        tls: bool = True,
        netns: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        pods: Iterable[PodSpec] = (),
        start: bool = True,
    ) -> None:
        super().__init__(ca=ca, tls=tls, netns=netns, host=host, port=port)
        self.token: str | None = (secrets.token_urlsafe(24) if tls else None) if token is AUTO else token
        self.mode: str = "ok"
        self.slow_seconds: float = 30.0
        self.unauthorized_body: str = "text"
        self.started_at = _now()
        self._pods: list[PodSpec] = list(pods)
        self._wake = threading.Event()
        if start:
            self.start()

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "mode" and value not in KUBELET_MODES:
            raise ValueError(f"mode must be one of {KUBELET_MODES}, not {value!r}")
        super().__setattr__(name, value)

    def set_pods(self, pods: Iterable[PodSpec]) -> None:
        """Replace the pods the kubelet reports (takes effect on the next request)."""
        pods = list(pods)
        with self._cond:
            self._pods = pods

    @property
    def pods(self) -> list[PodSpec]:
        """A copy of the current pod specs."""
        with self._cond:
            return list(self._pods)

    def pod_list(self) -> dict[str, Any]:
        """The PodList JSON document currently served."""
        return pod_list_json(self.pods, self.started_at)

    @property
    def headers(self) -> dict[str, str]:
        """Request headers carrying the right bearer token (empty when auth is off)."""
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def _on_start(self) -> None:
        self._wake = threading.Event()

    def _on_stop(self) -> None:
        self._wake.set()

    def __enter__(self) -> LabKubelet:
        return self


# ----------------------------------------------------------------------------------------------------
# API server
# ----------------------------------------------------------------------------------------------------

_KINDS = {"services": "Service", "nodes": "Node"}
_NAMESPACED = {"services": True, "nodes": False}
_PATH_RE = re.compile(
    r"^/api/v1(?P<watch>/watch)?(?:/namespaces/(?P<ns>[^/]+))?/(?P<resource>services|nodes)(?:/(?P<name>[^/]+))?/?$"
)


@dataclass
class _Event:
    rv: int
    type: str
    resource: str
    namespace: str
    name: str
    obj: dict[str, Any]


@dataclass(eq=False)  # identity semantics: watchers live in a set
class _Watcher:
    conn: socket.socket
    cut: bool = False
    graceful: bool = False


class _ApiHandler(_Handler):
    server: _HTTPServer

    def do_GET(self) -> None:
        api: LabApiServer = self.server.lab  # type: ignore[assignment]
        api._record("GET", self.path)
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        path = parts.path
        if path in ("/healthz", "/livez", "/readyz"):
            self._send(200, b"ok", "text/plain; charset=utf-8")
            return
        if not self._token_ok(api.token):
            self._send_json(401, _status(401, "Unauthorized", "Unauthorized"))
            return
        if path == "/version":
            self._send_json(200, {"major": "1", "minor": "31", "gitVersion": "v1.31.0-netwatchd-lab",
                                  "platform": "linux/amd64"})
            return
        m = _PATH_RE.match(path)
        if not m or (m["ns"] and not _NAMESPACED[m["resource"]]):
            self._send_json(404, _status(404, "NotFound", "the server could not find the requested resource"))
            return
        resource, ns, name = m["resource"], m["ns"], m["name"]
        selector = _field_selector(query.get("fieldSelector", ""))
        if selector is None:
            self._send_json(400, _status(400, "BadRequest", f"unsupported fieldSelector {query['fieldSelector']!r}"))
            return
        if name is not None and not m["watch"]:
            obj = api._get(resource, ns or "", name)
            if obj is None:
                self._send_json(404, _status(404, "NotFound", f'{resource} "{name}" not found',
                                             {"name": name, "kind": resource}))
            else:
                self._send_json(200, obj)
            return
        if name is not None:
            selector["metadata.name"] = name
        if ns:
            selector["metadata.namespace"] = ns
        if m["watch"] or _parse_bool(query.get("watch")):
            self._watch(api, resource, selector, query)
        else:
            self._send_json(200, api._list(resource, selector))

    def _refuse(self) -> None:
        self._send_json(405, _status(405, "MethodNotAllowed", "the lab apiserver only serves GET"))

    do_POST = do_PUT = do_PATCH = do_DELETE = _refuse

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))  # wfile is unbuffered: each event leaves now

    def _event(self, etype: str, obj: dict[str, Any]) -> None:
        self._chunk(_dumps({"type": etype, "object": obj}) + b"\n")

    def _watch(self, api: LabApiServer, resource: str, selector: dict[str, str], query: dict[str, str]) -> None:
        rv_param = query.get("resourceVersion", "")
        try:
            timeout = float(query["timeoutSeconds"]) if query.get("timeoutSeconds") else api.watch_timeout
            since = int(rv_param) if rv_param not in ("", "0") else None
        except ValueError:
            self._send_json(400, _status(400, "BadRequest", f"invalid parameters in {self.path!r}"))
            return
        bookmarks = _parse_bool(query.get("allowWatchBookmarks"))
        watcher = _Watcher(self.connection)
        with api._cond:
            initial: list[tuple[str, dict[str, Any]]] = []
            gone = since is not None and since < api._compacted_rv
            if since is None:
                # No/"0" resourceVersion: synthetic ADDED for the current state, then changes (like the apiserver).
                initial = [("ADDED", copy.deepcopy(o)) for o in api._select(resource, selector)]
                last = api._rv
            else:
                last = since
            current_rv = api._rv
            bookmark_gen = api._bookmark_gen
            api._watchers.add(watcher)
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Cache-Control", "no-cache, private")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if gone:
                # The real apiserver answers 200 and then one ERROR event carrying a 410 Status.
                self._event("ERROR", _status(410, "Expired", f"too old resource version: {since} ({current_rv})"))
                self._chunk(b"")
                return
            for etype, obj in initial:
                self._event(etype, obj)
            now = time.monotonic()
            deadline = now + timeout if timeout else None
            next_bookmark = now + api.bookmark_interval
            while True:
                pending: list[_Event] = []
                bookmark_rv = None
                with api._cond:
                    while True:
                        if watcher.cut and watcher.graceful:
                            break
                        if watcher.cut:
                            self.close_connection = True
                            _hard_shutdown(self.connection)  # abrupt: no terminating chunk
                            return
                        if last < api._compacted_rv:  # history trimmed past what this watch has sent
                            pending, gone = [], True
                            break
                        pending = [e for e in api._events_after(last)
                                   if e.resource == resource and _matches(e.obj, selector)]
                        if api._events and api._events[-1].rv > last:
                            last = api._events[-1].rv  # skip events of other resources too
                        now = time.monotonic()
                        if bookmarks and (now >= next_bookmark or api._bookmark_gen != bookmark_gen):
                            bookmark_rv, bookmark_gen = api._rv, api._bookmark_gen
                            next_bookmark = now + api.bookmark_interval
                        if pending or bookmark_rv is not None or (deadline is not None and now >= deadline):
                            break
                        waits = [next_bookmark - now] if bookmarks else []
                        if deadline is not None:
                            waits.append(deadline - now)
                        api._cond.wait(timeout=max(0.0, min(waits, default=1.0)))
                if gone:
                    self._event("ERROR", _status(410, "Expired", f"too old resource version: {last} ({api._rv})"))
                    self._chunk(b"")
                    return
                for ev in pending:
                    self._event(ev.type, ev.obj)
                if bookmark_rv is not None:
                    self._event("BOOKMARK", api._bookmark_obj(resource, bookmark_rv))
                if watcher.cut:  # graceful cut: end like a timeout, the client resumes from its resourceVersion
                    self._chunk(b"")
                    return
                if deadline is not None and time.monotonic() >= deadline:
                    if bookmarks:  # the watch cache sends a last bookmark as a watch times out
                        self._event("BOOKMARK", api._bookmark_obj(resource, api._rv))
                    self._chunk(b"")  # graceful end: clients resume from their last resourceVersion
                    return
        except OSError:
            self.close_connection = True  # client went away, or the stream was cut
        finally:
            with api._cond:
                api._watchers.discard(watcher)
                api._cond.notify_all()


def _field_selector(raw: str) -> dict[str, str] | None:
    """Parse the equality field selectors clients use (``metadata.name=x,metadata.namespace=y``); None if other."""
    out: dict[str, str] = {}
    for term in filter(None, raw.split(",")):
        key, sep, value = term.partition("=")
        key = key.rstrip("=")
        value = value.lstrip("=")
        if not sep or key not in ("metadata.name", "metadata.namespace"):
            return None
        out[key] = value
    return out


def _matches(obj: dict[str, Any], selector: dict[str, str]) -> bool:
    meta = obj.get("metadata", {})
    return all(meta.get(k.split(".", 1)[1], "") == v for k, v in selector.items())


class LabApiServer(_LabServer):
    """A Kubernetes API server for LIST, GET and WATCH of Services and Nodes (``/api/v1/...``).

    Objects are built from ``kubernetes.client`` models. Every change bumps a global resourceVersion and is
    kept in a history of :attr:`history_limit` events; a watch from a resourceVersion older than the history
    (or than :meth:`compact`) gets the apiserver's ``ERROR`` event with a 410 ``Expired`` Status. Watches
    stream chunked newline-delimited JSON, honour ``timeoutSeconds`` and ``allowWatchBookmarks`` (a BOOKMARK
    every :attr:`bookmark_interval` seconds, on :meth:`send_bookmarks` and when the watch times out), and
    :meth:`cut_watches` drops them abruptly. ``labelSelector``, ``limit`` and ``continue`` are ignored (the
    whole list is one page); ``fieldSelector`` supports ``metadata.name``/``metadata.namespace`` equality.
    """

    _handler_class = _ApiHandler
    _kind = "apiserver"

    def __init__(
        self,
        ca: LabCA | None = None,
        token: str | None = AUTO,
        tls: bool = True,
        netns: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        history_limit: int = 1000,
        bookmark_interval: float = 60.0,
        watch_timeout: float | None = None,
        start: bool = True,
    ) -> None:
        super().__init__(ca=ca, tls=tls, netns=netns, host=host, port=port)
        self.token: str | None = secrets.token_urlsafe(24) if token is AUTO else token
        self.history_limit = history_limit
        self.bookmark_interval = bookmark_interval
        self.watch_timeout = watch_timeout
        self._rv = 100  # like etcd revisions, never starts at 0 or 1
        self._compacted_rv = self._rv
        self._objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self._events: deque[_Event] = deque()
        self._watchers: set[_Watcher] = set()
        self._bookmark_gen = 0
        self._next_node_port = 30000
        self._dir = tempfile.mkdtemp(prefix="netwatchd-labapi-")
        self.kubeconfig_path = os.path.join(self._dir, "kubeconfig")
        self.token_file = os.path.join(self._dir, "token")
        if start:
            self.start()

    def __enter__(self) -> LabApiServer:
        return self

    # -- test API ------------------------------------------------------------------------------------

    @property
    def resource_version(self) -> str:
        """The current (latest) resourceVersion."""
        with self._cond:
            return str(self._rv)

    @property
    def active_watches(self) -> int:
        """Number of watch streams currently open."""
        with self._cond:
            return len(self._watchers)

    @property
    def headers(self) -> dict[str, str]:
        """Request headers carrying the right bearer token (empty when auth is off)."""
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def upsert_service(
        self,
        namespace: str,
        name: str,
        cluster_ips: Sequence[str],
        ports: Sequence[tuple[int, str]],
        type: str = "ClusterIP",  # mirrors spec.type
        node_ports: Sequence[int | None] | None = None,
        lb_ips: Sequence[str] | None = None,
    ) -> str:
        """Create or replace a Service (ADDED or MODIFIED event); returns the new resourceVersion.

        ``cluster_ips`` may be ``["None"]`` (headless) or empty (ExternalName). For NodePort/LoadBalancer
        services, missing ``node_ports`` are allocated from 30000 up, and kept across updates of the same port.
        """
        key = ("services", namespace, name)
        with self._cond:
            old = self._objects.get(key)
            old_ports = {(p["port"], p["protocol"]): p.get("nodePort") for p in (old or {}).get("spec", {})
                         .get("ports", [])}
            allocated: list[int | None] = []
            for i, (port, proto) in enumerate(ports):
                given = node_ports[i] if node_ports is not None and i < len(node_ports) else None
                if given is None and type in ("NodePort", "LoadBalancer"):
                    given = old_ports.get((port, proto.upper()))
                    if given is None:
                        given, self._next_node_port = self._next_node_port, self._next_node_port + 1
                allocated.append(given)
        families = ["IPv6" if ":" in ip else "IPv4" for ip in cluster_ips if ip != "None"] or (
            ["IPv4"] if cluster_ips else None)
        ingress = [k8s.V1LoadBalancerIngress(ip=ip, ip_mode="VIP") for ip in lb_ips or ()]
        model = k8s.V1Service(
            api_version="v1", kind="Service",
            metadata=k8s.V1ObjectMeta(name=name, namespace=namespace),
            spec=k8s.V1ServiceSpec(
                type=type,
                cluster_ip=cluster_ips[0] if cluster_ips else None,
                cluster_ips=list(cluster_ips) or None,
                ip_families=families,
                ip_family_policy=None if not families else (
                    "RequireDualStack" if len(families) > 1 else "SingleStack"),
                ports=[k8s.V1ServicePort(name=f"{proto.lower()}-{port}", port=port, protocol=proto.upper(),
                                         target_port=port, node_port=np)
                       for (port, proto), np in zip(ports, allocated, strict=True)] or None,
                session_affinity="None",
                internal_traffic_policy="Cluster" if type != "ExternalName" else None,
                external_traffic_policy="Cluster" if type in ("NodePort", "LoadBalancer") else None,
            ),
            status=k8s.V1ServiceStatus(load_balancer=k8s.V1LoadBalancerStatus(ingress=ingress or None)),
        )
        return self._put(key, _to_wire(model))

    def delete_service(self, namespace: str, name: str) -> str:
        """Delete a Service (DELETED event); returns the new resourceVersion. KeyError if absent."""
        return self._delete(("services", namespace, name))

    def upsert_node(self, name: str, pod_cidrs: Sequence[str], internal_ips: Sequence[str]) -> str:
        """Create or replace a Node with these pod CIDRs and InternalIP addresses; returns the resourceVersion."""
        uname = os.uname()
        model = k8s.V1Node(
            api_version="v1", kind="Node",
            metadata=k8s.V1ObjectMeta(name=name, labels={
                "kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64"}),
            spec=k8s.V1NodeSpec(pod_cidr=pod_cidrs[0] if pod_cidrs else None, pod_cidrs=list(pod_cidrs) or None),
            status=k8s.V1NodeStatus(
                addresses=[k8s.V1NodeAddress(type="InternalIP", address=ip) for ip in internal_ips]
                + [k8s.V1NodeAddress(type="Hostname", address=name)],
                conditions=[k8s.V1NodeCondition(type="Ready", status="True", reason="KubeletReady",
                                                message="kubelet is posting ready status")],
                node_info=k8s.V1NodeSystemInfo(
                    architecture="amd64", boot_id=str(uuid.UUID(_sha("boot", name)[:32])),
                    container_runtime_version="containerd://1.7.0", kernel_version=uname.release,
                    kube_proxy_version="", kubelet_version="v1.31.0", machine_id=_sha("machine", name)[:32],
                    operating_system="linux", os_image="netwatchd lab",
                    system_uuid=str(uuid.UUID(_sha("system", name)[:32])))),
        )
        return self._put(("nodes", "", name), _to_wire(model))

    def delete_node(self, name: str) -> str:
        """Delete a Node (DELETED event); returns the new resourceVersion. KeyError if absent."""
        return self._delete(("nodes", "", name))

    def cut_watches(self, graceful: bool = False, wait: float = 2.0) -> int:
        """Close every open watch stream and return how many there were.

        Abrupt by default (the socket is shut down mid-stream, no terminating chunk: clients see a broken
        stream and must re-list/re-watch); ``graceful=True`` ends them like a ``timeoutSeconds`` expiry does.
        Waits up to ``wait`` seconds for the streams to be gone.
        """
        with self._cond:
            watchers = list(self._watchers)
            for w in watchers:
                w.cut, w.graceful = True, graceful
            self._cond.notify_all()
        if not graceful:
            for w in watchers:
                _hard_shutdown(w.conn)  # also wakes a handler blocked writing to a client that stopped reading
        deadline = time.monotonic() + wait
        with self._cond:
            while any(w in self._watchers for w in watchers) and time.monotonic() < deadline:
                self._cond.wait(timeout=max(0.0, deadline - time.monotonic()))
        return len(watchers)

    def send_bookmarks(self) -> None:
        """Make every watch that allowed bookmarks send a BOOKMARK with the current resourceVersion now."""
        with self._cond:
            self._bookmark_gen += 1
            self._cond.notify_all()

    def compact(self) -> None:
        """Forget all history (like etcd compaction): watches from any older resourceVersion get 410 Gone."""
        with self._cond:
            self._events.clear()
            self._compacted_rv = self._rv
            self._cond.notify_all()

    def write_kubeconfig(self, path: str | None = None, token: str | None = None, url: str | None = None) -> str:
        """Write a kubeconfig for this server (embedded CA data, bearer token) and return its path.

        Defaults rewrite :attr:`kubeconfig_path`; ``token``/``url`` override the credentials or server URL.
        """
        path = path or self.kubeconfig_path
        cluster: dict[str, Any] = {"server": url or self.url}
        if self.tls and self.ca is not None:
            cluster["certificate-authority-data"] = base64.b64encode(self.ca.ca_pem).decode()
        user: dict[str, Any] = {}
        if token or self.token:
            user["token"] = token or self.token
        doc = {
            "apiVersion": "v1", "kind": "Config", "preferences": {},
            "clusters": [{"name": "lab", "cluster": cluster}],
            "users": [{"name": "lab", "user": user}],
            "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": "lab"}}],
            "current-context": "lab",
        }
        tmp = f"{path}.tmp"
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            json.dump(doc, f, indent=2)  # JSON is YAML: load_kube_config reads it as is
        os.replace(tmp, path)
        return path

    # -- store ---------------------------------------------------------------------------------------

    def _put(self, key: tuple[str, str, str], obj: dict[str, Any]) -> str:
        resource, namespace, name = key
        with self._cond:
            old = self._objects.get(key)
            meta = obj["metadata"]
            if old is None:
                meta["uid"] = str(uuid.uuid4())
                meta["creationTimestamp"] = _to_wire(_now())
            else:
                meta["uid"] = old["metadata"]["uid"]
                meta["creationTimestamp"] = old["metadata"]["creationTimestamp"]
            self._rv += 1
            meta["resourceVersion"] = str(self._rv)
            self._objects[key] = obj
            self._append(_Event(self._rv, "MODIFIED" if old else "ADDED", resource, namespace, name,
                                copy.deepcopy(obj)))
            return str(self._rv)

    def _delete(self, key: tuple[str, str, str]) -> str:
        resource, namespace, name = key
        with self._cond:
            obj = self._objects.pop(key)  # KeyError when absent
            self._rv += 1
            obj["metadata"]["resourceVersion"] = str(self._rv)  # DELETED carries the deletion revision
            self._append(_Event(self._rv, "DELETED", resource, namespace, name, obj))
            return str(self._rv)

    def _append(self, event: _Event) -> None:
        self._events.append(event)
        while len(self._events) > self.history_limit:
            self._compacted_rv = self._events.popleft().rv
        self._cond.notify_all()

    def _events_after(self, rv: int) -> list[_Event]:
        out = []
        for ev in reversed(self._events):
            if ev.rv <= rv:
                break
            out.append(ev)
        out.reverse()
        return out

    def _select(self, resource: str, selector: dict[str, str]) -> list[dict[str, Any]]:
        keys = sorted(k for k in self._objects if k[0] == resource)
        return [o for o in (self._objects[k] for k in keys) if _matches(o, selector)]

    def _get(self, resource: str, namespace: str, name: str) -> dict[str, Any] | None:
        with self._cond:
            obj = self._objects.get((resource, namespace, name))
            return copy.deepcopy(obj) if obj else None

    def _list(self, resource: str, selector: dict[str, str]) -> dict[str, Any]:
        with self._cond:
            items = copy.deepcopy(self._select(resource, selector))
            rv = str(self._rv)
        for item in items:  # list items carry no TypeMeta on the wire
            item.pop("kind", None)
            item.pop("apiVersion", None)
        return {"kind": f"{_KINDS[resource]}List", "apiVersion": "v1", "metadata": {"resourceVersion": rv},
                "items": items}

    def _bookmark_obj(self, resource: str, rv: int) -> dict[str, Any]:
        return {"kind": _KINDS[resource], "apiVersion": "v1", "metadata": {"resourceVersion": str(rv)}}

    # -- lifecycle hooks -----------------------------------------------------------------------------

    def _on_start(self) -> None:
        self.write_kubeconfig()  # the port is known now (and kept across stop/start)
        with open(os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(self.token or "")

    def _on_stop(self) -> None:
        with self._cond:
            for w in self._watchers:
                w.cut = True
            self._cond.notify_all()

    def _cleanup(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)
