"""The cluster-wide facts classification needs, from the apiserver: Services and Nodes, list + watch.

Only Services and Nodes are watched — never all pods (the kubelet gives this node's pods) — so the cost per
node stays flat as the cluster grows. Each resource has its own daemon thread running the usual informer
loop: list (state + resourceVersion), watch from that resourceVersion, re-watch from the last seen version
when the server ends the stream at its timeout, and re-list after any error or 410 Gone, with bounded
exponential backoff (0.5 s doubling to 10 s, +-20 % jitter so a fleet of DaemonSet pods does not reconnect
in lockstep after an apiserver outage). Per object, only the derived facts (addresses, node ports, pod
CIDRs) are kept; an update that does not change them (a Node status heartbeat) publishes nothing.
"""

from __future__ import annotations

import ipaddress
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from netwatchd.classify import IPAddress, IPNetwork
from netwatchd.identity.kubelet import IdentityError

log = structlog.get_logger("netwatchd.identity")

ServiceKey = tuple[str, str]  # (namespace, name)
NodePortKey = tuple[int, str]  # (port, "TCP" | "UDP" | "SCTP")
_PROTO_NUMBERS = {6: "TCP", 17: "UDP", 132: "SCTP"}


def normalize_proto(proto: int | str) -> str:
    """"TCP"/"UDP"/"SCTP" from an IP protocol number or any-case name (what node port keys use)."""
    if isinstance(proto, int):
        return _PROTO_NUMBERS.get(proto, str(proto))
    return proto.upper()


@dataclass(frozen=True)
class ClusterSnapshot:
    """An immutable view of the cluster's Services and Nodes (replace, never mutate: readers share it)."""

    service_by_ip: Mapping[IPAddress, ServiceKey] = field(default_factory=dict)
    node_ports: Mapping[NodePortKey, ServiceKey] = field(default_factory=dict)
    cluster_pod_cidrs: tuple[IPNetwork, ...] = ()  # every node's spec.podCIDRs
    node_pod_cidrs: tuple[IPNetwork, ...] = ()  # this node's
    node_ips: frozenset[IPAddress] = frozenset()  # every node's InternalIP / ExternalIP
    services_synced: bool = False  # a Service list succeeded (an empty service_by_ip is then the truth)
    nodes_synced: bool = False
    node_found: bool = False  # our node_name is among the Nodes


# -- pure extraction from kubernetes.client models ---------------------------------------------------------

def _ip(value: str | None) -> IPAddress | None:
    if not value or value == "None":  # headless Services have clusterIP "None"
        return None
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        return None


def _net(value: str | None) -> IPNetwork | None:
    try:
        return ipaddress.ip_network(value, strict=False) if value else None
    except ValueError:
        return None


def _uniq(items: Iterable[Any]) -> tuple[Any, ...]:
    return tuple(dict.fromkeys(i for i in items if i is not None))


def service_addresses(svc: Any) -> tuple[IPAddress, ...]:
    """ClusterIPs (dual stack), externalIPs and LoadBalancer ingress IPs of a V1Service."""
    spec, status = svc.spec, svc.status
    raw: list[str | None] = []
    if spec is not None:
        raw += [spec.cluster_ip, *(spec.cluster_ips or []), *(spec.external_ips or [])]
    lb = status.load_balancer if status is not None else None
    if lb is not None:
        raw += [ing.ip for ing in (lb.ingress or []) if ing is not None]  # hostname-only ingress: no IP
    return _uniq(_ip(r) for r in raw)


def service_node_ports(svc: Any) -> tuple[NodePortKey, ...]:
    """(nodePort, protocol) of every port of a NodePort / LoadBalancer V1Service."""
    ports = (svc.spec.ports if svc.spec is not None else None) or []
    return _uniq((p.node_port, normalize_proto(p.protocol or "TCP")) for p in ports if p is not None and p.node_port)


def node_pod_cidrs(node: Any) -> tuple[IPNetwork, ...]:
    """spec.podCIDRs of a V1Node (dual stack), falling back to spec.podCIDR."""
    spec = node.spec
    if spec is None:
        return ()
    return _uniq(_net(c) for c in (spec.pod_cidrs or [spec.pod_cidr]))


def node_addresses(node: Any) -> tuple[IPAddress, ...]:
    """InternalIP and ExternalIP addresses of a V1Node (Hostname / DNS entries are not addresses)."""
    addrs = (node.status.addresses if node.status is not None else None) or []
    return _uniq(_ip(a.address) for a in addrs if a is not None and a.type in ("InternalIP", "ExternalIP"))


@dataclass(frozen=True)
class _SvcFacts:
    ips: tuple[IPAddress, ...]
    node_ports: tuple[NodePortKey, ...]


@dataclass(frozen=True)
class _NodeFacts:
    pod_cidrs: tuple[IPNetwork, ...]
    ips: tuple[IPAddress, ...]


def _svc_facts(svc: Any) -> _SvcFacts:
    return _SvcFacts(service_addresses(svc), service_node_ports(svc))


def _node_facts(node: Any) -> _NodeFacts:
    return _NodeFacts(node_pod_cidrs(node), node_addresses(node))


def _assemble(services: Mapping[ServiceKey, _SvcFacts], nodes: Mapping[str, _NodeFacts], node_name: str,
              services_synced: bool, nodes_synced: bool) -> ClusterSnapshot:
    by_ip: dict[IPAddress, ServiceKey] = {}
    ports: dict[NodePortKey, ServiceKey] = {}
    for key in sorted(services):  # sorted: an address claimed twice resolves the same way every time
        facts = services[key]
        for ip in facts.ips:
            by_ip.setdefault(ip, key)
        for np in facts.node_ports:
            ports.setdefault(np, key)
    cidrs: dict[IPNetwork, None] = {}
    ips: set[IPAddress] = set()
    for name in sorted(nodes):
        cidrs.update(dict.fromkeys(nodes[name].pod_cidrs))
        ips.update(nodes[name].ips)
    own = nodes.get(node_name)
    return ClusterSnapshot(
        service_by_ip=by_ip, node_ports=ports, cluster_pod_cidrs=tuple(cidrs),
        node_pod_cidrs=own.pod_cidrs if own else (), node_ips=frozenset(ips),
        services_synced=services_synced, nodes_synced=nodes_synced, node_found=own is not None,
    )


def build_snapshot(services: Iterable[Any], nodes: Iterable[Any], node_name: str) -> ClusterSnapshot:
    """A ClusterSnapshot from V1Service and V1Node objects (what one list of each gives)."""
    svcs = {(s.metadata.namespace or "", s.metadata.name or ""): _svc_facts(s) for s in services}
    nds = {n.metadata.name or "": _node_facts(n) for n in nodes}
    return _assemble(svcs, nds, node_name, True, True)


# -- client configuration ----------------------------------------------------------------------------------

def load_api_client(kubeconfig: str | None = None) -> Any:
    """A kubernetes ApiClient: in-cluster config when ``kubeconfig`` is None and KUBERNETES_SERVICE_HOST is
    set, else the kubeconfig file (default $KUBECONFIG or ~/.kube/config). IdentityError("config") if neither.
    The global default client configuration is left alone.
    """
    from kubernetes import client, config

    problems: list[str] = []
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        cfg = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=cfg)
            return client.ApiClient(cfg)
        except Exception as e:  # ConfigException, unreadable token/CA: fall through to a kubeconfig
            problems.append(f"in-cluster config: {_one_line(e)}")
    cfg = client.Configuration()
    # Resolved per call: the client reads $KUBECONFIG once, at import. It may list several files (a:b).
    where = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
    try:
        config.load_kube_config(config_file=os.path.expanduser(where), client_configuration=cfg,
                                persist_config=False)
        return client.ApiClient(cfg)
    except Exception as e:  # missing file, bad YAML, no current context ... all mean "not configured"
        problems.append(f"kubeconfig {where}: {_one_line(e)}")
    raise IdentityError("config", "no usable Kubernetes API configuration (" + "; ".join(problems)
                        + "): run in a pod with a ServiceAccount or pass --kubeconfig")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:200]


def describe_api_error(e: BaseException) -> str:
    """One human line for a failed list/watch."""
    status = getattr(e, "status", None)
    if isinstance(status, int) and status:
        if status == 401:
            return "apiserver rejected netwatchd's credentials (401)"
        if status == 403:
            return "forbidden (403): netwatchd's ServiceAccount needs list and watch on services and nodes"
        return f"apiserver answered HTTP {status} {getattr(e, 'reason', '') or ''}".strip()
    reason = getattr(e, "reason", None)  # urllib3 MaxRetryError wraps the real cause
    if reason is not None and not isinstance(reason, str):
        return f"cannot reach apiserver: {_one_line(reason)}"
    return f"{type(e).__name__}: {_one_line(e)}"


class _Relist(Exception):
    """The watch cannot resume (410 Gone / expired): list again, immediately."""


# -- the watcher ---------------------------------------------------------------------------------------------

class ClusterWatcher:
    """Keeps a ClusterSnapshot of Services and Nodes current; calls ``on_change(snapshot)`` on each change.

    Call :meth:`start` to begin; :meth:`stop` ends both threads promptly (it closes the open watch streams).
    ``up["apiserver"]`` is True while both list/watch loops are healthy; one log line is written per state
    change, not per retry. ``on_change`` runs on the watcher's threads, serialised, newest snapshot last.
    """

    RESOURCES = ("services", "nodes")

    def __init__(
        self,
        api_client: Any,
        node_name: str,
        on_change: Callable[[ClusterSnapshot], None],
        *,
        watch_timeout: int = 300,
        request_timeout: float = 30.0,
        backoff_initial: float = 0.5,
        backoff_max: float = 10.0,
    ) -> None:
        from kubernetes import client

        self._core = client.CoreV1Api(api_client)
        self.node_name = node_name
        self.on_change = on_change
        self.watch_timeout = watch_timeout  # server-side watch length; we then re-watch (no re-list)
        self.request_timeout = request_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.up: dict[str, bool] = {"apiserver": False}
        self.snapshot = ClusterSnapshot()
        self.list_count = {r: 0 for r in self.RESOURCES}  # how many times each resource was (re)listed
        self._stop = threading.Event()
        self._lock = threading.Lock()  # store + health state
        self._publish_lock = threading.Lock()  # serialises on_change calls
        self._services: dict[ServiceKey, _SvcFacts] = {}
        self._nodes: dict[str, _NodeFacts] = {}
        self._synced = {r: False for r in self.RESOURCES}
        self._synced_event = threading.Event()
        self._healthy: dict[str, bool | None] = {r: None for r in self.RESOURCES}
        self._state: bool | None = None  # None until the first success or failure
        self._watches: dict[str, Any] = {}
        self._watch_error: dict[str, str | None] = {r: None for r in self.RESOURCES}
        self._threads: list[threading.Thread] = []
        self._warned_node = False  # "our Node is missing" is logged once

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> ClusterWatcher:
        """Start the Service and Node threads (idempotent). Returns self."""
        if not self._threads:
            for res in self.RESOURCES:
                t = threading.Thread(target=self._run, args=(res,), name=f"netwatchd-watch-{res}", daemon=True)
                self._threads.append(t)
                t.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop both threads, closing open watch streams so they do not wait for the server's timeout."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            while t.is_alive() and time.monotonic() < deadline:
                # Repeat: a watch started just after the first stop() call would otherwise run to its timeout.
                for w in list(self._watches.values()):
                    w.stop()
                t.join(0.1)

    def __enter__(self) -> ClusterWatcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_synced(self, timeout: float | None = None) -> bool:
        """Wait until both Services and Nodes were listed once."""
        return self._synced_event.wait(timeout)

    # -- state --------------------------------------------------------------------------------------------

    def _store(self, res: str) -> dict:
        return self._services if res == "services" else self._nodes

    @staticmethod
    def _key(res: str, obj: Any) -> Any:
        meta = obj.metadata
        return (meta.namespace or "", meta.name or "") if res == "services" else (meta.name or "")

    @staticmethod
    def _facts(res: str, obj: Any) -> Any:
        return _svc_facts(obj) if res == "services" else _node_facts(obj)

    def _replace(self, res: str, items: Iterable[Any]) -> None:
        new = {self._key(res, o): self._facts(res, o) for o in items}
        with self._lock:
            store = self._store(res)
            changed = store != new or not self._synced[res]
            store.clear()
            store.update(new)
            self._synced[res] = True
            if all(self._synced.values()):
                self._synced_event.set()
        if changed:
            self._publish()

    def _apply(self, res: str, event_type: str, obj: Any) -> bool:
        """Apply one watch event; True when the derived facts changed (and a snapshot was published)."""
        key = self._key(res, obj)
        with self._lock:
            store = self._store(res)
            if event_type == "DELETED":
                changed = store.pop(key, None) is not None
            elif event_type in ("ADDED", "MODIFIED"):
                facts = self._facts(res, obj)
                changed = store.get(key) != facts
                store[key] = facts
            else:
                return False
        if changed:
            self._publish()
        return changed

    def _publish(self) -> None:
        with self._publish_lock:
            with self._lock:
                snap = _assemble(self._services, self._nodes, self.node_name,
                                 self._synced["services"], self._synced["nodes"])
                self.snapshot = snap
            if snap.nodes_synced and not snap.node_found and not self._warned_node:
                self._warned_node = True
                log.warning("node_not_found", node=self.node_name,
                            hint="no Node object has this name: check NODE_NAME (spec.nodeName downward API)")
            try:
                self.on_change(snap)
            except Exception as e:  # a consumer bug must not kill the watch thread
                log.error("cluster_snapshot_consumer_failed", error=_one_line(e))

    def _health(self, res: str, ok: bool, error: str = "") -> None:
        with self._lock:
            self._healthy[res] = ok
            states = set(self._healthy.values())
            new = False if False in states else (True if states == {True} else self._state)
            if new is None or new == self._state:
                return
            self._state = new
            self.up["apiserver"] = new
        if new:
            log.info("apiserver_up", services=len(self._services), nodes=len(self._nodes))
        else:
            log.warning("apiserver_down", resource=res, error=error,
                        hint="retrying with backoff; last known Services/Nodes are kept")

    # -- informer loop -----------------------------------------------------------------------------------

    def _list_func(self, res: str) -> Callable[..., Any]:
        return self._core.list_service_for_all_namespaces if res == "services" else self._core.list_node

    def _run(self, res: str) -> None:
        from kubernetes.client.exceptions import ApiException

        delay = self.backoff_initial

        def backoff() -> None:
            nonlocal delay
            self._stop.wait(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, self.backoff_max)

        while not self._stop.is_set():
            try:
                rv = self._list(res)
            except Exception as e:
                if self._stop.is_set():
                    break
                # Health follows the list: it is what a restart would need, and its error says why.
                self._health(res, False, describe_api_error(e))
                log.debug("apiserver_retry", resource=res, error=describe_api_error(e), delay=round(delay, 2))
                backoff()
                continue
            if self._watch_error[res] is None:  # after a refused watch, only a working watch means "up"
                self._health(res, True)
            try:
                while not self._stop.is_set():
                    started = time.monotonic()
                    rv, events = self._watch(res, rv)
                    if events or time.monotonic() - started >= 1.0:
                        delay = self.backoff_initial  # a watch that worked: the next failure starts small
                        self._watch_works(res)
                    elif not self._stop.is_set():
                        raise ConnectionError("watch stream ended at once")  # not a server timeout
            except _Relist:
                continue  # the usual way a watch gets too old (410 Gone): list again now
            except Exception as e:
                if self._stop.is_set():
                    break
                if isinstance(e, ApiException) and e.status:
                    # The server answered the watch with an error (e.g. RBAC allows list but not watch).
                    self._watch_error[res] = describe_api_error(e)
                    self._health(res, False, self._watch_error[res])
                # A dropped connection is re-listed after the backoff; if that list fails, health says so.
                log.debug("apiserver_watch_failed", resource=res, error=describe_api_error(e), delay=round(delay, 2))
                backoff()

    def _watch_works(self, res: str) -> None:
        if self._watch_error[res] is not None:
            self._watch_error[res] = None
            self._health(res, True)

    def _list(self, res: str) -> str:
        # resourceVersion "0": served from the apiserver's watch cache, not etcd (what client-go's reflector
        # does) — matters when every node's DaemonSet pod re-lists at once after an outage.
        resp = self._list_func(res)(resource_version="0", _request_timeout=self.request_timeout)
        self.list_count[res] += 1
        self._replace(res, resp.items or [])
        return (resp.metadata.resource_version if resp.metadata else None) or ""

    def _watch(self, res: str, rv: str) -> tuple[str, int]:
        """One watch request from ``rv`` until the server's timeout; returns (last resourceVersion, events)."""
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        list_func = self._list_func(res)

        def connect(*args: Any, **kwargs: Any) -> Any:
            resp = list_func(*args, **kwargs)
            if 200 <= (getattr(resp, "status", None) or 0) < 300:
                self._watch_works(res)  # the server accepted the watch: we will hear about changes
            return resp

        w = watch.Watch(return_type="V1Service" if res == "services" else "V1Node")
        self._watches[res] = w
        if self._stop.is_set():
            return rv, 0
        events = 0
        try:
            for ev in w.stream(connect, resource_version=rv, timeout_seconds=self.watch_timeout,
                               allow_watch_bookmarks=True,
                               _request_timeout=(self.request_timeout, self.watch_timeout + self.request_timeout)):
                events += 1
                if ev.get("type") in ("ADDED", "MODIFIED", "DELETED"):
                    self._apply(res, ev["type"], ev["object"])
                if self._stop.is_set():
                    break
        except ApiException as e:
            if e.status == 410:
                raise _Relist from None
            raise
        finally:
            self._watches.pop(res, None)
        return w.resource_version or rv, events
