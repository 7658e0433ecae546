"""The lab node every section runs in, and netwatchd as one of the datapath modes.

One node ``bench`` (a netns with the bridge ``cni0``), five pods on veths (``client``, ``server``, ``udpgen``,
``flowgen``, ``sink``) and a kube-proxy style ClusterIP ``VIP`` (ports 5201, 7000) DNATed to ``server``. The lab
is torn down by its context manager whatever happens (``netwatchd.lab``).
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import daemon, measure, progs, rr
from bench.config import (
    CLOSED_PORT,
    CLUSTER_CIDRS,
    DROPPED_PORT,
    FLOW_SOURCES,
    IPERF_PORT,
    RR_PORT,
    SERVICE_CIDRS,
    VIP,
    Config,
    log,
)
from netwatchd.lab.netns import Lab, Node, Pod


@dataclass
class Bench:
    """The lab node, its pods and the tools; built once, used by every section."""

    cfg: Config
    lab: Lab
    node: Node
    client: Pod  # runs iperf3 -c and rr client
    server: Pod  # iperf3 -s and rr server; the service's backend
    udpgen: Pod  # steady drops: paced UDP to a closed port of `sink`, refused and dropped connects
    flowgen: Pod  # many flows (spoofed sources) to `sink`
    sink: Pod
    rr_bin: Path
    daemon_args: list[str]  # CIDR (or --kube identity) flags only: everything else is netwatchd's default
    cluster: object | None = None  # LabCluster with --kube
    probes: dict[str, list[tuple[str, bool]]] = field(default_factory=dict)  # first start's netwatch_probe_attached
    starts: list[daemon.StartRecord] = field(default_factory=list)  # every netwatchd start of the run
    iperf: subprocess.Popen | None = None
    quiet: object | None = None  # run.QuietGate

    @property
    def pod_veths(self) -> list[str]:
        return [p.host_veth for p in self.node.pods.values() if p.host_veth]


def build_lab(cfg: Config, lab: Lab, stack: contextlib.ExitStack) -> Bench:
    """One node ``bench`` with five pods, the ClusterIP service, and the rr and iperf3 servers running."""
    node = lab.add_node("bench", pod_cidr="10.244.1.0/24", pod_cidr6="fd00:10:244:1::/64")
    pods = {name: node.add_pod(name) for name in ("client", "server", "udpgen", "flowgen", "sink")}
    server, sink = pods["server"], pods["sink"]
    # Replies (ICMP port unreachable) to the spoofed flow sources go nowhere: no extra drop per flow.
    sink.run(["ip", "route", "add", "blackhole", FLOW_SOURCES])
    sink.sysctls({"net.ipv4.conf.all.rp_filter": 0, "net.ipv4.conf.eth0.rp_filter": 0})
    # SYNs to this port vanish (NETFILTER_DROP): their connects retransmit, so tcp_retransmit_skb fires.
    sink.run(["iptables", "-w", "-A", "INPUT", "-p", "tcp", "--dport", str(DROPPED_PORT), "-j", "DROP"])
    daemon_args = ["--pod-cidr", f"{node.pod_cidr},{node.pod_cidr6}", "--cluster-cidr", CLUSTER_CIDRS,
                   "--service-cidr", SERVICE_CIDRS]
    cluster = None
    if cfg.kube:
        cluster = stack.enter_context(lab_cluster(lab, node, pods["server"]))
        daemon_args = cluster.netwatchd_args() + ["--cluster-cidr", CLUSTER_CIDRS]
    else:
        for port in (IPERF_PORT, RR_PORT):
            node.add_cluster_ip_service(VIP, port, [(server.ip, port)])
    b = Bench(cfg, lab, node, pods["client"], server, pods["udpgen"], pods["flowgen"], sink, rr.build(),
              daemon_args + cfg.netwatchd_args, cluster)
    rr.start_server(b.rr_bin, server, RR_PORT, cfg.cpu)
    start_iperf_server(b)
    assert CLOSED_PORT != DROPPED_PORT
    return b


def lab_cluster(lab: Lab, node: Node, server: Pod, dnat: bool = True):
    """The lab kubelet + apiserver for ``node``, with the bench's ClusterIP service (and its DNAT if ``dnat``)."""
    from netwatchd.lab.cluster import LabCluster

    cluster = LabCluster(lab, node)
    for port in (IPERF_PORT, RR_PORT):
        if dnat:
            cluster.add_service("default", f"bench-{port}", VIP, port, [(server, port)])
        else:  # the DNAT is already there (added without --kube): only publish the Service
            cluster.api.upsert_service("default", f"bench-{port}", [VIP], [(port, "TCP")])
    return cluster


def wait_listening(ep: Pod, port: int, timeout: float = 10.0) -> None:
    """Poll (bounded) until a TCP socket listens on ``port`` in ``ep``'s netns."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ep.run(["ss", "-Hltn", f"sport = :{port}"], check=False).stdout.strip():
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on :{port} in {ep.netns} after {timeout:g}s")


def start_iperf_server(b: Bench) -> None:
    """(Re)start the iperf3 server in the server pod, pinned to the load CPU."""
    if b.iperf is not None and b.iperf.poll() is None:
        b.iperf.kill()
        b.iperf.wait(timeout=5)
    b.iperf = b.server.popen(rr.pinned(b.cfg.cpu, ["iperf3", "-s", "-p", str(IPERF_PORT)]),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_listening(b.server, IPERF_PORT)


class Netwatchd:
    """netwatchd in the node netns with its default flags plus ``b.daemon_args`` (and ``extra``)."""

    name = "netwatchd"

    def __init__(self, b: Bench, where: str = "datapath", extra: list[str] | None = None,
                 args: list[str] | None = None) -> None:
        self.b, self.where = b, where
        self.args = (b.daemon_args if args is None else args) + (extra or [])
        self.d: daemon.Daemon | None = None
        self.probes: dict[str, list[tuple[str, bool]]] = {}  # this start's netwatch_probe_attached
        self.programs: list[progs.Program] = []
        self.tc_mode = "tcx"

    def start(self) -> None:
        before = set(progs.run_stats())
        self.d = daemon.start(self.b.node, self.args, self.where)
        assert self.d.start is not None
        self.b.starts.append(self.d.start)
        try:
            self.programs = self._discover(before)
            self.tc_mode = progs.tc_attach_mode(self.d.pid)
            self.probes = daemon.attached_probes(self.d.metrics())
        except BaseException:
            self.stop()
            raise
        if not self.b.probes:
            self.b.probes = self.probes
        elif self.probes != self.b.probes:  # the probes are code under development: say so if they changed
            log(f"WARNING: this netwatchd attached {daemon.describe_probes(self.probes)}, the first one "
                f"{daemon.describe_probes(self.b.probes)}")

    def _discover(self, before: set[int], settle: float = 3.0) -> list[progs.Program]:
        """The daemon's programs and hooks; re-read for up to ``settle`` s while a program has no hook yet (an
        attachment may land just after /readyz)."""
        assert self.d is not None
        deadline = time.monotonic() + settle
        while True:
            found = progs.discover(self.d.pid, self.b.node.netns, before)
            if all(p.hooks for p in found) or time.monotonic() > deadline:
                return found
            time.sleep(0.2)

    @property
    def pid(self) -> int:
        assert self.d is not None
        return self.d.pid

    def stop(self) -> dict[str, float]:
        if self.d is None:
            return {}
        d, self.d = self.d, None
        rc = d.stop()
        if rc != 0:
            log(f"WARNING: netwatchd exited {rc}; its last log lines:\n{d.last_log()}")
        leaked = {p.id for p in self.programs} & set(progs.run_stats())
        if leaked:
            # Program frees are RCU-deferred: give the kernel a moment before calling it a leak.
            time.sleep(1.0)
            leaked &= set(progs.run_stats())
        if leaked:
            log(f"WARNING: BPF programs {sorted(leaked)} are still loaded after netwatchd stopped")
        return {}


def stats_holders_note(daemon_pid: int | None) -> tuple[bool, dict[int, str]]:
    """(does the daemon hold BPF run-time stats on, which *other* processes do) — right now."""
    holders = measure.bpf_stats_holders()
    mine = daemon_pid in holders if daemon_pid else False
    return mine, {p: c for p, c in holders.items() if p != daemon_pid}
