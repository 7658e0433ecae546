"""Keeps pod identity current while the daemon counts.

- Local pods: the kubelet's `/pods`, every `interval` seconds and within about a second of any link change
  on the node (a new veth is a new pod), each mapped to its netns and host veth.
- Cluster facts: Services and Nodes from the apiserver (list+watch, `ClusterWatcher`), when configured.

Failures never stop counting: the last good pod list is kept, unlisted local addresses count as
pod="unknown", `up[source]` (exported as `netwatch_identity_up`) goes to 0 and one log line is written per
state change; the loops retry by themselves. A pod that leaves the kubelet's list keeps its series for
`grace` seconds (a scrape or two sees its final counts), then `on_pod_gone(namespace, name)` is called.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from collections.abc import Callable

import structlog

from netwatchd.classify import ClusterView
from netwatchd.identity.kubelet import IdentityError, KubeletClient
from netwatchd.identity.resolver import KubeResolver

log = structlog.get_logger("netwatchd.identity")

RTMGRP_LINK = 0x1
NETLINK_ROUTE = 0


class LinkMonitor:
    """Sets `changed` whenever a link appears, disappears or changes in our netns (rtnetlink RTMGRP_LINK)."""

    def __init__(self) -> None:
        self.changed = threading.Event()
        self._stop = threading.Event()
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        self._sock.bind((0, RTMGRP_LINK))
        self._thread = threading.Thread(target=self._run, name="netwatchd-links", daemon=True)

    def start(self) -> LinkMonitor:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self._sock], [], [], 0.5)
            if ready:
                try:
                    self._sock.recv(65536)
                except OSError:
                    return
                self.changed.set()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()


class IdentityManager:
    """See module docstring. `view` is updated in place (the classifier reads it)."""

    def __init__(self, resolver: KubeResolver, view: ClusterView, kubelet: KubeletClient | None,
                 interval: float = 10.0, grace: float = 60.0,
                 on_pod_gone: Callable[[str, str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.resolver = resolver
        self.view = view
        self.kubelet = kubelet
        self.interval = interval
        self.grace = grace
        self.on_pod_gone = on_pod_gone or (lambda ns, name: None)
        self.clock = clock
        self.up: dict[str, bool] = {}
        self.errors: dict[tuple[str, str], int] = {}  # (source, kind) -> count; replaced whole on each change
        self._errors_lock = threading.Lock()
        self.refreshes = 0
        self.watcher = None
        self._gone_since: dict[tuple[str, str], float] = {}
        self._known: set[tuple[str, str]] = set()
        self._stop = threading.Event()
        self._links: LinkMonitor | None = None
        self._thread = threading.Thread(target=self._run, name="netwatchd-identity", daemon=True)
        self._view_lock = threading.Lock()
        self._pods_seen: tuple = ()

    # -- lifecycle ------------------------------------------------------------------------------------

    def start(self, api_client=None, node_name: str = "") -> IdentityManager:
        if api_client is not None:
            self.watcher = _counting_watcher(self, api_client, node_name)
            self.up["apiserver"] = False
            self.watcher.start()
        if self.kubelet is not None:
            self.up["kubelet"] = False
            self._links = LinkMonitor().start()
            self.refresh_pods()  # first list before the daemon starts serving, when the kubelet answers
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._links:
            self._links.stop()
        if self._thread.is_alive():
            self._thread.join(5)
        if self.watcher is not None:
            self.watcher.stop()
        if not self._thread.is_alive():  # a refresh still running would reopen them
            self.resolver.close()

    # -- apiserver ------------------------------------------------------------------------------------

    def _on_cluster(self, snapshot) -> None:
        self.resolver.update_cluster(snapshot)
        self._apply_view()

    def sources_up(self) -> dict[str, bool]:
        up = dict(self.up)
        if self.watcher is not None:
            up["apiserver"] = bool(self.watcher.up.get("apiserver"))
        return up

    # -- kubelet --------------------------------------------------------------------------------------

    def _apply_view(self) -> None:
        with self._view_lock:
            before = self._signature()
            self.resolver.apply_to_view(self.view)
            if self._signature() != before or self.resolver.pods != self._pods_seen:
                self._pods_seen = self.resolver.pods
                self.view.generation += 1  # cached attributions are stale

    def _signature(self) -> tuple:
        v = self.view
        return (v.node_pod_cidrs, v.cluster_cidrs, v.service_cidrs, v.host_ips, v.node_ips, v.service_ips,
                v.local_pod_ips, self.resolver.cluster)

    def _set_up(self, source: str, ok: bool, error: IdentityError | None = None) -> None:
        was = self.up.get(source)
        self.up[source] = ok
        if ok and was is not True:
            log.info("identity_up", source=source, pods=len(self.resolver.pods))
        elif not ok and error is not None and (was is not False or self._last_kind != error.kind):
            log.warning("identity_down", source=source, kind=error.kind, error=str(error),
                        keeping=f"{len(self.resolver.pods)} pods from the last good list; unlisted pods count "
                                "as pod=unknown")
        self._last_kind = error.kind if error else ""

    _last_kind = ""

    def count_error(self, source: str, kind: str) -> None:
        """One failed refresh/list/watch of `source`. Copy-on-write: scrapes iterate `errors` on another thread
        while the kubelet and both watch threads add to it."""
        with self._errors_lock:
            self.errors = {**self.errors, (source, kind): self.errors.get((source, kind), 0) + 1}

    def refresh_pods(self) -> bool:
        """List local pods once; on failure keep the last good list. Returns whether it worked."""
        assert self.kubelet is not None
        try:
            pods = self.resolver.refresh_pods(self.kubelet)
        except IdentityError as exc:
            self.count_error("kubelet", exc.kind)
            self._set_up("kubelet", False, exc)
            return False
        self.refreshes += 1
        self._apply_view()
        self._set_up("kubelet", True)
        self._track_gone({(p.namespace, p.name) for p in pods})
        return True

    def _track_gone(self, current: set[tuple[str, str]]) -> None:
        now = self.clock()
        for key in self._known - current:
            self._gone_since.setdefault(key, now)
        for key in current:
            self._gone_since.pop(key, None)
        self._known = current | set(self._gone_since)
        self.expire()

    def expire(self) -> None:
        """Forget pods gone for longer than the grace period (their series disappear)."""
        now = self.clock()
        for key, since in list(self._gone_since.items()):
            if now - since >= self.grace:
                del self._gone_since[key]
                self._known.discard(key)
                self.on_pod_gone(*key)

    def _run(self) -> None:
        next_at = self.clock() + self.interval
        while not self._stop.is_set():
            links = self._links.changed if self._links else threading.Event()
            # wake up on a link change (debounced a little: a pod's veth comes with several messages)
            if links.wait(min(0.5, max(0.0, next_at - self.clock()))):
                time.sleep(0.2)
                links.clear()
                next_at = 0.0
            if self._stop.is_set():
                return
            if self.clock() >= next_at:
                self.refresh_pods()
                next_at = self.clock() + self.interval
            else:
                self.expire()


def api_error_kind(exc: BaseException, watching: bool = False) -> str:
    """The `kind` label of a failed apiserver list or watch (kubelet.ERROR_KINDS, plus `watch_interrupted`: an
    open watch stream broke, e.g. the apiserver restarted or a proxy cut it; the watcher re-lists at once)."""
    status = getattr(exc, "status", None)
    if isinstance(status, int) and status:
        return "unauthorized" if status in (401, 403) else "http_error"
    what = f"{type(exc).__name__} {getattr(exc, 'reason', '') or ''}".lower()
    if "timeout" in what or "timed out" in what:
        return "timeout"
    if isinstance(exc, ValueError):
        return "malformed"
    return "watch_interrupted" if watching else "unreachable"


def _counting_watcher(manager: IdentityManager, api_client, node_name: str):
    """A ClusterWatcher whose failed lists and watches are counted in `manager.errors` (source "apiserver")."""
    from netwatchd.identity.apiserver import ClusterWatcher, _Relist

    class CountingWatcher(ClusterWatcher):
        def _list(self, res: str) -> str:
            try:
                return super()._list(res)
            except Exception as exc:
                if not self._stop.is_set():
                    manager.count_error("apiserver", api_error_kind(exc))
                raise

        def _watch(self, res: str, rv: str):
            try:
                return super()._watch(res, rv)
            except _Relist:  # 410 Gone: the normal end of an old watch, not a failure
                raise
            except Exception as exc:
                if not self._stop.is_set():
                    manager.count_error("apiserver", api_error_kind(exc, watching=True))
                raise

    return CountingWatcher(api_client, node_name, manager._on_cluster)


def default_node_name() -> str:
    return os.environ.get("NODE_NAME") or socket.gethostname()
