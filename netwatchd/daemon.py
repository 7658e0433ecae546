"""`netwatchd`: load the probes, attribute what they count, serve it to Prometheus, detach on exit."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.registry import CollectorRegistry

import netwatchd
from netwatchd import logging as nwlog
from netwatchd.classify import ClusterView, parse_cidrs
from netwatchd.export import api
from netwatchd.export.http import MetricsServer, parse_listen
from netwatchd.export.metrics import NetwatchCollector
from netwatchd.identity.kubelet import IdentityError, KubeletClient
from netwatchd.identity.local import StandaloneResolver, host_addresses, own_netns_inode
from netwatchd.identity.manager import IdentityManager, default_node_name
from netwatchd.identity.resolver import KubeResolver
from netwatchd.kernel import env, hooks
from netwatchd.kernel.bpfstats import StatsSampler
from netwatchd.kernel.hooks import HookStatus
from netwatchd.probes import loader, registry
from netwatchd.probes.base import ProbeContext, program_fds

HOST_ADDRESSES_EVERY_S = 5.0  # how often the node's own addresses are re-read
CATCH_UP_EVERY_S = 0.02  # pause between steps of labelling a burst of new keys (scrapes get the lock in between)


@dataclass
class DaemonState:
    """Everything the collectors and the JSON API read; written by the refresh loop."""

    hooks: list[HookStatus] = field(default_factory=list)
    probes: list = field(default_factory=list)
    probe_status: dict[tuple[str, str], bool] = field(default_factory=dict)
    probe_errors: dict[str, str] = field(default_factory=dict)
    identity_source: str = "standalone"
    identity: object | None = None  # IdentityManager when Kubernetes sources are configured
    bpf_stats: StatsSampler | None = None  # None with --no-bpf-stats
    ready: bool = False


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="netwatchd", description=__doc__)
    p.add_argument("--version", action="version", version=f"netwatchd {netwatchd.__version__}")
    p.add_argument("--listen", default=os.environ.get("NETWATCHD_LISTEN", "0.0.0.0:9990"),
                   help="HOST:PORT for /metrics, /healthz, /readyz (default %(default)s)")
    p.add_argument("--pod-cidr", action="append", default=[],
                   help="this node's pod CIDR(s); repeat or comma-separate (v4 and v6)")
    p.add_argument("--cluster-cidr", action="append", default=[], help="all pods' CIDR(s) in the cluster")
    p.add_argument("--service-cidr", action="append", default=[], help="the service (ClusterIP) CIDR(s)")
    k = p.add_argument_group("pod identity (kubelet) and cluster view (apiserver)")
    k.add_argument("--kubelet-url", default=os.environ.get("NETWATCHD_KUBELET_URL"),
                   help="kubelet base URL, e.g. https://$(NODE_IP):10250; unset: standalone (no pod names)")
    k.add_argument("--kubelet-token-file", default="/var/run/secrets/kubernetes.io/serviceaccount/token",
                   help="bearer token file (re-read on every request) (default %(default)s)")
    k.add_argument("--kubelet-ca-file", default="/var/run/secrets/kubernetes.io/serviceaccount/ca.crt",
                   help="CA bundle that signed the kubelet's serving certificate (default %(default)s)")
    k.add_argument("--kubelet-timeout", type=float, default=5.0,
                   help="seconds a kubelet /pods request may take (default %(default)s)")
    k.add_argument("--kubelet-insecure", action="store_true",
                   help="do not verify the kubelet's certificate (or use the plain-HTTP read-only port)")
    k.add_argument("--kubeconfig", default=None,
                   help="kubeconfig for the apiserver; default: in-cluster config when running in a pod")
    k.add_argument("--no-apiserver", action="store_true", help="do not watch Services/Nodes")
    k.add_argument("--node-name", default=None, help="this node's name (default $NODE_NAME or the hostname)")
    k.add_argument("--identity-interval", type=float, default=10.0,
                   help="seconds between kubelet pod lists (link changes trigger one sooner) (default %(default)s)")
    k.add_argument("--pod-series-grace", type=float, default=60.0,
                   help="seconds a gone pod's series are kept before they disappear (default %(default)s)")
    t = p.add_argument_group("tcp probe")
    t.add_argument("--tcp-map-entries", type=int, default=16384,
                   help="capacity of each TCP aggregation BPF map (keys: socket netns x peer) (default %(default)s)")
    t.add_argument("--tcp-socket-entries", type=int, default=65536,
                   help="capacity of the per-socket LRU BPF map (connects in flight, RTT sampling) "
                        "(default %(default)s)")
    t.add_argument("--tcp-rtt-interval", type=float, default=1.0,
                   help="seconds between two RTT samples of one socket (compiled into the probe) "
                        "(default %(default)s)")
    c = p.add_argument_group("tc probe (packets/bytes per class, node transit time)")
    c.add_argument("--tc-uplinks", default="auto",
                   help="uplink interfaces: 'auto' (default route, overlay and addressed devices) and/or "
                        "comma-separated fnmatch patterns, e.g. 'auto,bond*' or 'eth0,flannel.1' (default %(default)s)")
    c.add_argument("--tc-attach", choices=("auto", "tcx", "clsact"), default="auto",
                   help="tcx links (kernel 6.6+) or cls_bpf filters on clsact; auto: tcx when the kernel has it "
                        "(default %(default)s)")
    c.add_argument("--tc-clsact-prio", type=int, default=0x4E57,
                   help="priority of our cls_bpf filters in clsact mode (default %(default)s)")
    c.add_argument("--tc-transit-sample", type=int, default=16,
                   help="time the node transit of 1 in N packets, at random; 1: every packet, which costs two "
                        "clock reads each (default %(default)s)")
    c.add_argument("--tc-max-pods", type=int, default=512,
                   help="pod veths with their own packet/byte counters; more count for the node (default %(default)s)")
    p.add_argument("--probes", default=",".join(registry.PROBES),
                   help="comma-separated probes to load (default: all: %(default)s)")
    p.add_argument("--interval", type=float, default=2.0,
                   help="seconds between map reads (scrapes also read them) (default %(default)s)")
    p.add_argument("--max-series", type=int, default=10000,
                   help="series budget per metric family; beyond it pods fold into pod=__overflow__")
    p.add_argument("--drops-map-entries", type=int, default=16384, help="capacity of the drops BPF map")
    p.add_argument("--ignore-drop-reasons", default="",
                   help="comma-separated kernel drop reasons not to count (e.g. NOT_SPECIFIED); default none")
    p.add_argument("--no-bpf-stats", action="store_true",
                   help="never enable kernel BPF run-time stats (netwatch_bpf_program_* and `netwatchctl probes`)")
    p.add_argument("--bpf-stats-window", type=float, default=1.0,
                   help="seconds kernel BPF run-time stats stay on in each measuring window (default %(default)s)")
    p.add_argument("--bpf-stats-every", type=float, default=60.0,
                   help="seconds from one measuring window to the next; stats cost two clock reads per run of "
                        "every BPF program on the node while on (default %(default)s)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


class Daemon:
    def __init__(self, args: argparse.Namespace, tracefs: Path) -> None:
        from netwatchd.kernel.btf import Btf

        self.args = args
        self.log = nwlog.get()
        self.tracefs = tracefs
        self.btf = Btf.load(env.HostPaths.from_env().btf)
        self.state = DaemonState()
        self.view = ClusterView(
            node_pod_cidrs=parse_cidrs(args.pod_cidr),
            cluster_cidrs=parse_cidrs(args.cluster_cidr),
            service_cidrs=parse_cidrs(args.service_cidr),
            host_ips=host_addresses(),
        )
        self.resolver = StandaloneResolver()
        self.identity: IdentityManager | None = None
        self.probes = registry.build([n.strip() for n in args.probes.split(",") if n.strip()])
        self.state.probes = self.probes
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.wake = threading.Event()  # set by stop and by a read that left new keys unlabelled
        self._last_refresh = 0.0
        self._hosts_read_at = time.monotonic()
        self._fentry_done = False
        self._identity_error: BaseException | None = None

    def start_identity(self) -> threading.Thread | None:
        """Use the kubelet (and the apiserver) when configured; standalone otherwise. The first lists (kubelet
        pods and their network namespaces, apiserver Services and Nodes) take a while with many pods: they run
        on the returned thread, alongside the probes' compiles; join it before serving."""
        a = self.args
        wants_api = not a.no_apiserver and (a.kubeconfig or os.environ.get("KUBERNETES_SERVICE_HOST"))
        node_name = a.node_name or default_node_name()
        if not a.kubelet_url:
            # Only the apiserver: whether there is any identity at all depends on its client, so decide now.
            api_client = self._api_client() if wants_api else None
            if api_client is None:
                return None
            self._make_identity(None)
            return self._in_thread(lambda: self.identity.start(api_client, node_name))
        self._make_identity(KubeletClient(a.kubelet_url, token_file=a.kubelet_token_file,
                                          ca_file=None if a.kubelet_insecure else a.kubelet_ca_file,
                                          insecure=a.kubelet_insecure, timeout=a.kubelet_timeout))
        return self._in_thread(lambda: self.identity.start(self._api_client() if wants_api else None, node_name))

    def _api_client(self):
        from netwatchd.identity.apiserver import load_api_client

        try:
            return load_api_client(self.args.kubeconfig)
        except IdentityError as exc:
            self.log.warning("apiserver_unavailable", error=str(exc), fallback="--pod-cidr/--cluster-cidr/"
                             "--service-cidr flags")
            return None

    def _make_identity(self, kubelet: KubeletClient | None) -> None:
        a = self.args
        resolver = KubeResolver(own_netns_inode())
        self.resolver = resolver
        self.state.identity_source = "kubernetes"
        self.identity = IdentityManager(resolver, self.view, kubelet, interval=a.identity_interval,
                                        grace=a.pod_series_grace, on_pod_gone=self._pod_gone)
        self.state.identity = self.identity

    def _in_thread(self, fn: Callable[[], object]) -> threading.Thread:
        """Run fn on a thread; an exception it raises is re-raised by `join_identity`."""
        def run() -> None:
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the starting thread
                self._identity_error = exc

        t = threading.Thread(target=run, name="identity-start", daemon=True)
        t.start()
        return t

    def join_identity(self, thread: threading.Thread | None) -> None:
        if thread is not None:
            thread.join()
        if self._identity_error is not None:
            raise self._identity_error

    def _pod_gone(self, namespace: str, name: str) -> None:
        with self.lock:
            removed = sum(p.forget_pod(namespace, name) for p in self.probes if p.name not in self.state.probe_errors)
        self.log.info("pod_series_removed", namespace=namespace, pod=name, series=removed)

    def detect_hooks(self) -> None:
        """Every hook kind from tracefs and BTF; fentry stays "not tried" until `detect_fentry()`."""
        def btf_has(name: str) -> bool:
            try:
                self.btf.struct_size(name)
                return True
            except Exception:  # noqa: BLE001 - absent type
                return False

        self.state.hooks = hooks.detect(self.tracefs, btf_has)
        for h in self.state.hooks:
            if h.kind != "fentry":
                self.log.info("hook_detected", hook=h.kind, available=h.available, detail=h.detail)

    def detect_fentry(self) -> None:
        """Only a real attach tells whether fentry works, and that takes a compiler child (~0.5 s of CPU):
        done before the probes only if one of them needs fentry, else in the background once serving."""
        if self._fentry_done:
            return
        self._fentry_done = True
        h = hooks.fentry_status(loader.probe_fentry())
        self.state.hooks = [h if x.kind == "fentry" else x for x in self.state.hooks]
        self.log.info("hook_detected", hook=h.kind, available=h.available, detail=h.detail)

    def attach_probes(self) -> None:
        """Attach every probe whose hooks this kernel has, in parallel: each compiles in its own compiler
        child, and on 2 CPUs the compiles overlap (start-to-ready is about the slowest one, not the sum)."""
        ctx = ProbeContext(btf=self.btf, tracefs=self.tracefs, settings=self.args, view=self.view,
                           resolver=self.resolver, host_netns=own_netns_inode())
        if any(h.kind == "fentry" for p in self.probes for h in p.hooks):
            self.detect_fentry()
        available = {h.kind for h in self.state.hooks if h.available}
        results: dict[str, tuple[bool, str]] = {}
        attaching: dict[str, Future] = {}
        with ThreadPoolExecutor(max_workers=max(1, len(self.probes)), thread_name_prefix="attach") as pool:
            for probe in self.probes:
                missing = [f"{h.kind} {h.target}" for h in probe.hooks
                           if h.kind not in available
                           or (h.kind in ("tracepoint", "raw_tracepoint")
                               and not hooks.tracepoint_exists(self.tracefs, h.target))]
                if missing:
                    results[probe.name] = (False, f"missing hook: {', '.join(missing)}")
                else:
                    attaching[probe.name] = pool.submit(probe.attach, ctx)
            for probe in self.probes:
                fut = attaching.get(probe.name)
                if fut is None:
                    continue
                exc = fut.exception()
                if exc is None:
                    results[probe.name] = (True, "")
                    continue
                probe.detach()  # a failed probe degrades, never stops the daemon
                lines = str(exc).strip().splitlines()
                results[probe.name] = (False, f"{type(exc).__name__}: {lines[-1] if lines else ''}")
        for probe in self.probes:
            ok, why = results[probe.name]
            for h in probe.hooks:
                self.state.probe_status[(probe.name, f"{h.kind}:{h.target}")] = ok
            if ok:
                self.log.info("probe_attached", probe=probe.name, hooks=[f"{h.kind}:{h.target}" for h in probe.hooks])
            else:
                self.state.probe_errors[probe.name] = why
                self.log.warning("probe_not_attached", probe=probe.name, reason=why)

    def refresh(self) -> None:
        """Read every probe's maps once and fold them into label totals (serialised; scrapes share it)."""
        with self.lock:
            now = time.monotonic()
            if now - self._last_refresh < 0.05:
                return
            self._last_refresh = now
            for probe in self.probes:
                if probe.name not in self.state.probe_errors:
                    probe.refresh()
        if self.backlog():
            self.wake.set()

    def refresh_loop(self) -> None:
        """A full read every --interval; in between, while a probe has new keys left unlabelled by a read's
        time budget (a burst of thousands of new flows), label them in short steps and read again when done,
        so the next scrape is both short and complete."""
        next_read = time.monotonic() + self.args.interval
        while not self.stop.is_set():
            backlog = self.backlog()
            wait = next_read - time.monotonic()
            self.wake.wait(max(0.0, min(wait, CATCH_UP_EVERY_S) if backlog else wait))
            self.wake.clear()
            if self.stop.is_set():
                return
            try:
                if time.monotonic() >= next_read:
                    next_read = time.monotonic() + self.args.interval
                    self.refresh_host_addresses()
                    self.refresh()
                elif backlog:
                    self.catch_up()
            except Exception:  # noqa: BLE001 - log and keep counting; next interval retries
                self.log.exception("refresh_failed")

    def backlog(self) -> bool:
        return any(getattr(p, "pending", 0) for p in self.probes if p.name not in self.state.probe_errors)

    def catch_up(self) -> None:
        """One budgeted step of labelling new keys; a full read once none are left."""
        with self.lock:
            for probe in self.probes:
                if probe.name not in self.state.probe_errors and getattr(probe, "pending", 0):
                    probe.catch_up()
        if not self.backlog():
            self.refresh()

    def refresh_host_addresses(self) -> None:
        """The node's own addresses change (an uplink configured late, a VIP on the node): re-read them."""
        now = time.monotonic()
        if now - self._hosts_read_at < HOST_ADDRESSES_EVERY_S:
            return
        self._hosts_read_at = now
        addrs = host_addresses()
        if addrs != self.view.host_ips:
            self.log.info("node_addresses_changed", added=sorted(map(str, addrs - self.view.host_ips)),
                          removed=sorted(map(str, self.view.host_ips - addrs)))
            self.view.host_ips = addrs
            self.view.generation += 1

    def ready(self) -> tuple[bool, str]:
        if not self.state.ready:
            return False, "starting"
        attached = [p for p, ok in self.state.probe_status.items() if ok]
        return (True, "ready") if attached else (False, "no probe attached")

    def run(self) -> int:
        self.detect_hooks()
        registry_ = CollectorRegistry(auto_describe=False)
        registry_.register(NetwatchCollector(self.state, self.refresh))
        started = time.monotonic()
        server = MetricsServer(self.args.listen, registry_, self.ready,
                               api=lambda path, query: api.handle(path, self.state, started, query))
        try:
            identity = self.start_identity()
            self.attach_probes()
            loader.discard_prestarted()  # a probe whose hook is missing did not need its child
            self.join_identity(identity)
            self.release_start_up_memory()
            server.start()
            self.start_bpf_stats()
            self.state.ready = True
            threading.Thread(target=self.detect_fentry, name="detect-fentry", daemon=True).start()
            host, port = server.address
            self.log.info("serving", listen=f"{host}:{port}", probes=[p.name for p in self.probes],
                          identity=self.state.identity_source)
            self.refresh_loop()
        finally:
            server.close()
            if self.identity:
                self.identity.stop()
            self.stop.set()  # ends the stats windows (one in progress closes its fd)
            self.detach_all()
        return 0

    def attached_programs(self) -> dict[tuple[str, str], int]:
        """(probe, program) -> fd of every attached probe's BPF programs."""
        with self.lock:
            probes = [p for p in self.probes if p.name not in self.state.probe_errors]
        return {(p.name, name): fd for p in probes for name, fd in program_fds(p).items()}

    def start_bpf_stats(self) -> None:
        """Measure our programs' cost in short windows (StatsSampler), unless --no-bpf-stats."""
        a = self.args
        if a.no_bpf_stats or a.bpf_stats_window <= 0:
            return
        sampler = StatsSampler(self.attached_programs, window_s=a.bpf_stats_window, every_s=a.bpf_stats_every)
        self.state.bpf_stats = sampler
        sampler.start(self.stop, first_after_s=min(5.0, a.bpf_stats_every))

    def release_start_up_memory(self) -> None:
        """Start-up needed the parsed kernel BTF (~10 MiB) and built many short-lived objects; the daemon runs
        for months without either. Drop the BTF, collect, hand freed heap pages back to the kernel, and move
        what is left out of the collector's way (gc.freeze: fewer objects to walk on every full collection)."""
        self.btf = None
        gc.collect()
        with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
            ctypes.CDLL(None).malloc_trim(0)
        gc.freeze()

    def detach_all(self) -> None:
        for probe in self.probes:
            try:
                probe.detach()
            except Exception:  # noqa: BLE001 - keep detaching the others
                self.log.exception("detach_failed", probe=probe.name)
        self.log.info("detached", probes=[p.name for p in self.probes])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    nwlog.configure(args.log_level)
    log = nwlog.get()
    try:
        parse_listen(args.listen)
        parse_cidrs(args.pod_cidr + args.cluster_cidr + args.service_cidr)
        registry.build([n.strip() for n in args.probes.split(",") if n.strip()])
    except ValueError as exc:
        print(f"netwatchd: {exc}", file=sys.stderr)
        return 2
    try:
        tracefs = env.preflight()
    except env.EnvironmentProblem as exc:
        log.error("environment_problem", error=str(exc))
        print(f"netwatchd: {exc}", file=sys.stderr)
        return 3
    # One compiler child per probe, started now: they load bcc while we read BTF and the node's addresses.
    with contextlib.suppress(OSError):
        loader.prestart(len(registry.build([n.strip() for n in args.probes.split(",") if n.strip()])))
    daemon = Daemon(args, tracefs)

    def on_signal(signum, _frame):
        log.info("stopping", signal=signal.Signals(signum).name)
        daemon.stop.set()
        daemon.wake.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        return daemon.run()
    except OSError as exc:  # e.g. the listen address is taken
        daemon.detach_all()
        print(f"netwatchd: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
