"""The kubelet's view of this node's pods: GET /pods, parsed through the kubernetes package's models.

The kubelet is the cheapest source of local pods (no apiserver load, works when the apiserver is down) and
answers with the real PodList JSON. We talk to it with http.client rather than the kubernetes ApiClient
because the TCP socket may have to be created inside another network namespace (``netns``: the daemon can
run in a different netns than the kubelet it watches, as in lab tests), and because every failure has to
become one clear :class:`IdentityError` instead of a traceback.
"""

from __future__ import annotations

import http.client
import inspect
import ipaddress
import json
import os
import socket
import ssl
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

from netwatchd.classify import IPAddress
from netwatchd.identity.netns import in_netns, netns_path

DEFAULT_TOKEN_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/token"
DEFAULT_CA_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
MAX_BODY = 64 << 20  # a PodList of a full node (110 pods) is ~1-2 MiB; anything this big is not one
ERROR_KINDS = ("unreachable", "timeout", "unauthorized", "malformed", "http_error", "config")


class IdentityError(Exception):
    """An expected failure of an identity source: ``kind`` (one of ERROR_KINDS) and a one-line message."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class LocalPod:
    """One pod the kubelet runs, reduced to what attribution needs."""

    namespace: str
    name: str
    uid: str = ""
    node_name: str = ""
    ips: tuple[IPAddress, ...] = ()  # status.podIPs (dual stack), else status.podIP
    host_network: bool = False
    phase: str = ""
    workload_kind: str = ""  # controller owner; ReplicaSet of a Deployment is reported as the Deployment
    workload_name: str = ""
    container_ids: tuple[str, ...] = ()  # "<runtime>://<id>" as the kubelet reports them (init + ephemeral too)

    @property
    def workload(self) -> str:
        """"Kind/name" of the controlling workload ("" for a bare pod)."""
        return f"{self.workload_kind}/{self.workload_name}" if self.workload_kind else ""

    @classmethod
    def from_model(cls, pod: Any) -> LocalPod:
        """Build from a kubernetes.client.V1Pod."""
        meta, spec, status = pod.metadata, pod.spec, pod.status
        kind, name = _workload(meta)
        return cls(
            namespace=meta.namespace or "",
            name=meta.name or "",
            uid=meta.uid or "",
            node_name=(spec.node_name if spec else None) or "",
            ips=_pod_ips(status),
            host_network=bool(spec and spec.host_network),
            phase=(status.phase if status else None) or "",
            workload_kind=kind,
            workload_name=name,
            container_ids=_container_ids(status),
        )


def _pod_ips(status: Any) -> tuple[IPAddress, ...]:
    if status is None:
        return ()
    raw = [p.ip for p in (status.pod_ips or []) if p is not None and p.ip] or ([status.pod_ip] if status.pod_ip else [])
    out: list[IPAddress] = []
    for value in raw:
        try:
            ip = ipaddress.ip_address(value)
        except ValueError:
            continue  # a bad address must not cost us the whole pod
        if ip not in out:
            out.append(ip)
    return tuple(out)


def _workload(meta: Any) -> tuple[str, str]:
    owners = meta.owner_references or []
    owner = next((o for o in owners if o.controller), None)
    if owner is None:
        return "", ""
    kind, name = owner.kind or "", owner.name or ""
    # A Deployment names its ReplicaSets "<deployment>-<pod-template-hash>" and labels their pods with the
    # hash; users think in Deployments, and reading the ReplicaSet object would cost an apiserver call.
    pth = (meta.labels or {}).get("pod-template-hash")
    if kind == "ReplicaSet" and pth and name.endswith("-" + pth) and len(name) > len(pth) + 1:
        return "Deployment", name[: -len(pth) - 1]
    return kind, name


def _container_ids(status: Any) -> tuple[str, ...]:
    if status is None:
        return ()
    ids: list[str] = []
    for statuses in (status.init_container_statuses, status.container_statuses, status.ephemeral_container_statuses):
        ids.extend(s.container_id for s in (statuses or []) if s is not None and s.container_id)
    return tuple(ids)


class _Resp:
    """Stand-in for a urllib3 response: older kubernetes clients deserialise ``resp.data``."""

    def __init__(self, data: str) -> None:
        self.data = data


def deserialize(api_client: Any, text: str, type_name: str) -> Any:
    """ApiClient.deserialize across client versions (text + content type since v33, a response before)."""
    params = inspect.signature(api_client.deserialize).parameters
    if "content_type" in params or "response_text" in params:
        return api_client.deserialize(text, type_name, "application/json")
    return api_client.deserialize(_Resp(text), type_name)


def _pod_items(text: str, source: str) -> list[Any]:
    """The ``items`` of PodList JSON, shape-checked (the client's deserializer accepts non-JSON as a string)."""
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise IdentityError("malformed", f"{source} answered something that is not JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("kind", "PodList") != "PodList":
        what = doc.get("kind") if isinstance(doc, dict) else type(doc).__name__
        raise IdentityError("malformed", f"{source} answered {what!s} instead of a PodList") from None
    if doc.get("items") is None:
        return []
    if not isinstance(doc["items"], list):
        raise IdentityError("malformed", f"{source} answered a PodList whose items is not a list") from None
    return doc["items"]


def _from_models(items: list[Any], api: Any, source: str) -> list[LocalPod]:
    """``items`` (Pod JSON objects) through the kubernetes models, in order; IdentityError("malformed")."""
    text = json.dumps({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})
    try:
        pod_list = deserialize(api, text, "V1PodList")
        return [LocalPod.from_model(p) for p in pod_list.items or []]
    except (ValueError, TypeError, AttributeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise IdentityError("malformed", f"{source} PodList does not match the Pod schema: {first}") from None


class PodListParser:
    """:func:`parse_pod_list` with memory of the last answer, for a client that lists the same pods again and again.

    The kubernetes models cost about 0.2-0.3 ms per pod (30 ms for a full node of 110, every refresh), a
    hundred times the JSON decode. An answer byte-identical to the last one is not parsed at all; otherwise
    only the items whose JSON text is new go through the models. Per item, not per body, because the real
    kubelet lists its pods in no fixed order (they come from a Go map). Only the last answer's items are
    kept. ``parsed`` counts the items that went through the models (tests).
    """

    def __init__(self, api_client: Any = None) -> None:
        self._api = api_client
        self._own_api = api_client is None  # close() closes only a client this parser made
        self._body: bytes | str | None = None
        self._pods: list[LocalPod] = []
        self._by_item: dict[str, LocalPod] = {}
        self.parsed = 0

    def close(self) -> None:
        """Close the ApiClient this parser made (its thread pool); the next parse makes a new one."""
        if self._api is not None and self._own_api:
            self._api.close()
            self._api = None

    def parse(self, text: str | bytes, source: str = "kubelet") -> list[LocalPod]:
        """Parse PodList JSON into LocalPods (see the class docstring); IdentityError("malformed")."""
        if text == self._body:
            return list(self._pods)
        raw = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
        items = _pod_items(raw, source)
        keys = [json.dumps(item, separators=(",", ":")) for item in items]
        new = {k: item for k, item in zip(keys, items, strict=True) if k not in self._by_item}
        if new:
            if self._api is None:
                from kubernetes.client import ApiClient

                self._api = ApiClient()
            fresh = _from_models(list(new.values()), self._api, source)
            if len(fresh) != len(new):
                raise IdentityError("malformed", f"{source} PodList has items that are not pods")
            self.parsed += len(fresh)
            self._by_item.update(zip(new, fresh, strict=True))
        self._by_item = {k: self._by_item[k] for k in keys}
        self._body, self._pods = text, [self._by_item[k] for k in keys]
        return list(self._pods)


def parse_pod_list(text: str | bytes, api_client: Any = None, source: str = "kubelet") -> list[LocalPod]:
    """Parse PodList JSON (as served by the kubelet's /pods) into LocalPods; IdentityError("malformed")."""
    return PodListParser(api_client).parse(text, source)


class KubeletClient:
    """Reads the local pods from the kubelet's authenticated API (10250) or read-only port (10255, plain HTTP).

    ``timeout`` bounds the whole request. ``insecure`` skips TLS verification (https) — the kubelet's
    self-signed serving certificate often names the node, not 127.0.0.1. The bearer token is re-read from
    ``token_file`` on every call because projected service-account tokens rotate; a missing token file
    means "send no token" (the read-only port needs none). ``netns`` (a path or a name under /run/netns):
    create the TCP socket inside that network namespace.
    """

    def __init__(
        self,
        url: str = "https://127.0.0.1:10250",
        token_file: str | None = DEFAULT_TOKEN_FILE,
        ca_file: str | None = DEFAULT_CA_FILE,
        insecure: bool = False,
        timeout: float = 5.0,
        netns: str | None = None,
    ) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"kubelet URL must be http(s)://host[:port], not {url!r}")
        self.url = url.rstrip("/")
        self.https = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (10250 if self.https else 10255)
        self.base_path = parts.path.rstrip("/")
        self.token_file = token_file
        self.ca_file = ca_file
        self.insecure = insecure
        self.timeout = timeout
        self.netns = netns
        self._parser = PodListParser()  # kubernetes models, re-used for pods listed unchanged

    # -- plumbing -------------------------------------------------------------------------------------------

    def _read_token(self) -> str | None:
        if not self.token_file:
            return None
        try:
            with open(self.token_file, encoding="utf-8") as f:
                return f.read().strip() or None
        except OSError:
            return None

    def _ssl_context(self) -> ssl.SSLContext:
        if self.insecure:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            return ctx
        try:  # built per call: cheap next to a PodList, and picks up a rotated CA bundle
            return ssl.create_default_context(cafile=self.ca_file) if self.ca_file else ssl.create_default_context()
        except (OSError, ssl.SSLError) as e:
            raise IdentityError(
                "config", f"cannot load kubelet CA file {self.ca_file}: {getattr(e, 'strerror', None) or e}; "
                "check --kubelet-ca-file or use --kubelet-insecure") from None

    def _connect(self, address: tuple[str, int], timeout: Any = None, source_address: Any = None) -> socket.socket:
        """socket.create_connection, but the socket is created inside ``self.netns`` (connect happens after)."""
        if self.netns is None:
            return socket.create_connection(address, timeout, source_address)
        err: OSError | None = None
        for family, type_, proto, _, sockaddr in socket.getaddrinfo(*address, type=socket.SOCK_STREAM):
            with in_netns(self.netns):  # the netns is bound at socket creation; connect() can run outside
                sock = socket.socket(family, type_, proto)
            try:
                if timeout is not None:
                    sock.settimeout(timeout)
                sock.connect(sockaddr)
                return sock
            except OSError as e:
                sock.close()
                err = e
        raise err or OSError(f"no address for {address[0]}")

    def _get(self, path: str) -> tuple[int, str, bytes]:
        if self.netns is not None and not os.path.exists(netns_path(self.netns)):
            raise IdentityError("config", f"network namespace {self.netns} given for the kubelet does not exist")
        ctx = self._ssl_context() if self.https else None
        headers = {"Accept": "application/json", "User-Agent": "netwatchd"}
        token = self._read_token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if ctx is not None:
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                self.host, self.port, timeout=self.timeout, context=ctx)
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        conn._create_connection = self._connect  # type: ignore[attr-defined]  # http.client's socket hook
        deadline = time.monotonic() + self.timeout
        try:
            conn.request("GET", self.base_path + path, headers=headers)
            resp = conn.getresponse()
            chunks: list[bytes] = []
            size = 0
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                if conn.sock is not None:  # a server trickling bytes must not stretch the whole-request limit
                    conn.sock.settimeout(left)
                chunk = resp.read(1 << 16)
                if not chunk:
                    break
                size += len(chunk)
                if size > MAX_BODY:
                    raise IdentityError("malformed", f"kubelet at {self.url} sent more than {MAX_BODY >> 20} MiB")
                chunks.append(chunk)
            return resp.status, resp.reason or "", b"".join(chunks)
        except TimeoutError:  # socket.timeout is TimeoutError; includes the TLS handshake timing out
            raise IdentityError("timeout", f"kubelet at {self.url} did not answer within {self.timeout:g}s") from None
        except ssl.SSLCertVerificationError as e:
            raise IdentityError("unreachable", f"kubelet at {self.url} has a certificate we do not trust "
                                f"({e.verify_message}): check --kubelet-ca-file or use --kubelet-insecure") from None
        except ssl.SSLError as e:
            raise IdentityError("unreachable", f"TLS with kubelet at {self.url} failed ({e.reason or e}): "
                                "is it plain HTTP (read-only port 10255)?") from None
        except http.client.RemoteDisconnected:
            raise IdentityError("unreachable", f"kubelet at {self.url} closed the connection without "
                                "answering") from None
        except http.client.HTTPException as e:
            raise IdentityError("malformed", f"kubelet at {self.url} did not answer HTTP "
                                f"({type(e).__name__})") from None
        except ConnectionRefusedError:
            raise IdentityError("unreachable", f"kubelet at {self.url} refused the connection: check "
                                "--kubelet-url (is the kubelet listening there?)") from None
        except OSError as e:
            raise IdentityError("unreachable", f"cannot reach kubelet at {self.url}: "
                                f"{e.strerror or e}") from None
        finally:
            conn.close()

    # -- API ------------------------------------------------------------------------------------------------

    def list_pods(self) -> list[LocalPod]:
        """GET /pods: the pods this kubelet runs. Raises IdentityError on any expected failure."""
        status, reason, body = self._get("/pods")
        if status == 401:
            if self._read_token() is None:
                raise IdentityError("unauthorized", f"kubelet at {self.url} requires a token (401) and none was "
                                    f"read from {self.token_file}: check --kubelet-token-file")
            raise IdentityError("unauthorized", f"kubelet at {self.url} rejected the token (401): check "
                                "--kubelet-token-file")
        if status == 403:
            raise IdentityError("unauthorized", f"kubelet at {self.url} forbids /pods (403): netwatchd's "
                                "ServiceAccount needs get on nodes/proxy")
        if status != 200:
            snippet = " ".join(body[:120].decode("utf-8", "replace").split())
            raise IdentityError("http_error", f"kubelet at {self.url} answered HTTP {status} {reason}"
                                + (f": {snippet}" if snippet else ""))
        return self._parser.parse(body, source=f"kubelet at {self.url}")

    def close(self) -> None:
        self._parser.close()
