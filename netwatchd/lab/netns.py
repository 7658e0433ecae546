"""Lab nodes: Kubernetes-like nodes and pods built from network namespaces, with guaranteed teardown.

A :class:`Lab` owns everything it creates. Every namespace it makes is named ``nwlab-<id>-...``, where
``<id>`` is a short run id (``"nw"`` + 5 hex digits by default). No link is ever created in the root
namespace: veth pairs are created directly between lab namespaces, so deleting the namespaces removes
every link of the run. Interface names are ``<kind><id><counter>`` (at most 15 characters).

Layout, modelled on a node running a bridge CNI plugin plus kube-proxy in iptables mode::

    pod netns  eth0 ──veth── vethXXXX ─┐
    pod netns  eth0 ──veth── vethYYYY ─┤ cni0 (10.244.1.1/24, fd00:10:244:1::1/64)   node netns
                                       └─ routed: ip_forward, iptables, br_netfilter (FORWARD sees
                                          bridged pod-to-pod traffic), vxlan uplink, masquerade

Teardown is guaranteed by, in order of preference: ``with Lab() as lab`` / the pytest fixture; an
``atexit`` hook and a SIGTERM handler installed with the first lab; and :func:`cleanup_stale`, which
removes namespaces left behind by a run whose creating process is dead (each run writes its owner
PID and process start time to ``/run/netwatchd-lab/<id>.pid``).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import re
import secrets
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)

NETNS_PREFIX = "nwlab-"
NETNS_DIR = "/run/netns"
MARKER_DIR = "/run/netwatchd-lab"
BRIDGE = "cni0"
VXLAN_PORT = 8472  # flannel's port
UNDERLAY = ipaddress.ip_network("192.168.100.0/24")
_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,40}[a-z0-9])?$")
_TAG_RE = re.compile(r"^[a-z0-9]{1,7}$")


class LabCommandError(subprocess.CalledProcessError):
    """A failed command; unlike CalledProcessError, its message includes stderr."""

    def __str__(self) -> str:
        err = (self.stderr or "").strip() if isinstance(self.stderr, str) else self.stderr
        return f"{super().__str__()}: {err}" if err else super().__str__()


def _run(argv: Sequence[str], check: bool = True, timeout: float = 30, **kw: Any) -> subprocess.CompletedProcess:
    """subprocess.run with captured text output by default and a readable error."""
    if "stdout" not in kw and "stderr" not in kw:
        kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    res = subprocess.run(list(argv), check=False, timeout=timeout, **kw)
    if check and res.returncode != 0:
        raise LabCommandError(res.returncode, res.args, res.stdout, res.stderr)
    return res


def _ip_batch(netns: str, lines: Sequence[str]) -> None:
    """Run several ``ip`` commands inside ``netns`` with a single process (``ip -n NS -batch -``)."""
    _run(["ip", "-n", netns, "-batch", "-"], input="\n".join(lines) + "\n")


def _ip_json(netns: str, *args: str) -> list[dict[str, Any]]:
    return json.loads(_run(["ip", "-n", netns, "-j", *args]).stdout or "[]")


# ---------------------------------------------------------------------------------------------------
# Namespaces in general: every endpoint (node, pod, internet host) is a netns with run/popen.
# ---------------------------------------------------------------------------------------------------


class NetnsEndpoint:
    """Something living in a named network namespace: commands run there via ``ip netns exec``."""

    lab: Lab
    netns: str

    def run(
        self, cmd: Sequence[str], check: bool = True, timeout: float = 30, **kw: Any
    ) -> subprocess.CompletedProcess:
        """Run ``cmd`` to completion in this netns (output captured as text unless overridden)."""
        return _run(["ip", "netns", "exec", self.netns, *cmd], check=check, timeout=timeout, **kw)

    def popen(self, cmd: Sequence[str], **kw: Any) -> subprocess.Popen:
        """Start ``cmd`` in this netns in its own process group; it is killed by ``Lab.close()``."""
        return self.lab._popen(["ip", "netns", "exec", self.netns, *cmd], **kw)

    def netns_inode(self) -> int:
        """Inode of the network namespace (what ``/proc/<pid>/ns/net`` and BPF helpers report)."""
        return os.stat(f"{NETNS_DIR}/{self.netns}").st_ino

    def sysctls(self, settings: dict[str, str | int]) -> None:
        """Set sysctls (``{"net.ipv4.ip_forward": 1}``) inside this netns."""
        self.run(["sysctl", "-q", "-w", *(f"{k}={v}" for k, v in settings.items())])

    def read_sysctl(self, key: str) -> str:
        """Value of sysctl ``key`` as seen inside this netns."""
        return self.run(["sysctl", "-n", key]).stdout.strip()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.netns}>"


class Pod(NetnsEndpoint):
    """A pod: its own netns with ``eth0`` (one end of a veth) plugged into the node's bridge.

    A host-network pod shares the node netns: ``netns`` is the node's, ``ip`` is the node IP and the
    veth attributes are empty.
    """

    def __init__(self, node: Node, name: str, namespace: str, host_network: bool) -> None:
        self.lab, self.node, self.name, self.namespace = node.lab, node, name, namespace
        self.uid = str(uuid.uuid4())
        self.host_network = host_network
        self.ifname = "eth0"
        self.host_veth, self.host_veth_ifindex, self.mac = "", 0, ""
        if host_network:
            self.netns, self.ip, self.ip6 = node.netns, node.node_ip, None
            return
        self.ip, self.ip6 = node._allocate()
        self.netns = self.lab._add_netns(f"{node.name}-{namespace}-{name}")
        self.host_veth = self.lab._ifname("veth")
        self.sysctls({"net.ipv6.conf.all.accept_dad": 0, "net.ipv6.conf.default.accept_dad": 0})
        _ip_batch(node.netns, [
            f"link add {self.host_veth} type veth peer name eth0 netns {self.netns}",
            f"link set {self.host_veth} master {BRIDGE}",
            f"link set {self.host_veth} type bridge_slave hairpin on",  # like CNI hairpinMode
            f"link set {self.host_veth} up",
        ])
        _ip_batch(self.netns, [
            f"addr add {self.ip}/{node._net.prefixlen} dev eth0",
            f"addr add {self.ip6}/{node._net6.prefixlen} dev eth0 nodad",
            "link set eth0 up",
            f"route add default via {node.gateway} dev eth0",
            f"route add ::/0 via {node.gateway6} dev eth0",
        ])
        self.mac = _ip_json(self.netns, "link", "show", "eth0")[0]["address"]
        self.host_veth_ifindex = _ip_json(node.netns, "link", "show", self.host_veth)[0]["ifindex"]

    @property
    def key(self) -> str:
        """``namespace/name``, as Kubernetes names pods."""
        return f"{self.namespace}/{self.name}"


class Node(NetnsEndpoint):
    """A netns playing a Kubernetes node: bridge ``cni0`` holding the pod CIDRs' gateways, forwarding on,
    and ``bridge-nf-call-ip(6)tables=1`` inside the netns so iptables FORWARD sees bridged pod traffic.
    """

    def __init__(self, lab: Lab, name: str, index: int, pod_cidr: str, pod_cidr6: str, node_ip: str) -> None:
        self.lab, self.name, self.index = lab, name, index
        self._net, self._net6 = ipaddress.ip_network(pod_cidr), ipaddress.ip_network(pod_cidr6)
        self.pod_cidr, self.pod_cidr6 = str(self._net), str(self._net6)
        self.node_ip = node_ip
        self.bridge = BRIDGE
        self.gateway, self.gateway6 = str(self._net[1]), str(self._net6[1])
        self.pods: dict[str, Pod] = {}
        self.vtep: str | None = None  # vxlan device, once an uplink exists
        self._vtep_mac = ""
        self.uplink: str | None = None  # veth to the "internet", once added
        self.uplink_ip: str | None = None
        self._next_host = 2
        self._nat_chains: set[tuple[bool, str]] = set()
        self.netns = lab._add_netns(name)
        self.sysctls({
            "net.ipv4.ip_forward": 1,
            "net.ipv6.conf.all.forwarding": 1,
            "net.ipv6.conf.all.accept_dad": 0,
            "net.ipv6.conf.default.accept_dad": 0,
            "net.bridge.bridge-nf-call-iptables": 1,
            "net.bridge.bridge-nf-call-ip6tables": 1,
        })
        _ip_batch(self.netns, [
            f"link add {BRIDGE} type bridge stp_state 0 mcast_snooping 0",
            f"addr add {self.gateway}/{self._net.prefixlen} dev {BRIDGE}",
            f"addr add {self.gateway6}/{self._net6.prefixlen} dev {BRIDGE} nodad",
            f"link set {BRIDGE} up",
        ])

    def _allocate(self) -> tuple[str, str]:
        n = self._next_host
        if n >= self._net.num_addresses - 1:
            raise RuntimeError(f"{self.name}: pod CIDR {self.pod_cidr} exhausted")
        self._next_host += 1
        return str(self._net[n]), str(self._net6[n])

    def add_pod(self, name: str, namespace: str = "default", host_network: bool = False) -> Pod:
        """Create a pod on this node (next free IPv4/IPv6 from the pod CIDRs, default routes via cni0)."""
        for part in (name, namespace):
            if not _NAME_RE.match(part):
                raise ValueError(f"invalid pod name or namespace {part!r} (lowercase DNS label)")
        key = f"{namespace}/{name}"
        if key in self.pods:
            raise ValueError(f"{self.name}: pod {key} already exists")
        pod = Pod(self, name, namespace, host_network)
        self.pods[key] = pod
        return pod

    def iptables(self, *args: str, v6: bool = False) -> None:
        """Run ``iptables`` (or ``ip6tables``) with ``args`` inside the node netns."""
        self.run(["ip6tables" if v6 else "iptables", "-w", *args])

    def _nat_chain(self, v6: bool, chain: str, *hooks: str) -> None:
        """Create a nat chain once, jumped to from the given built-in ``hooks``."""
        if (v6, chain) in self._nat_chains:
            return
        self.iptables("-t", "nat", "-N", chain, v6=v6)
        for hook in hooks:
            self.iptables("-t", "nat", "-A", hook, "-j", chain, v6=v6)
        self._nat_chains.add((v6, chain))

    def add_cluster_ip_service(
        self, vip: str, port: int, backends: Sequence[tuple[str, int]], proto: str = "tcp"
    ) -> str:
        """kube-proxy (iptables mode) style ClusterIP: ``vip:port`` DNATed to ``backends``, balanced with
        ``-m statistic --mode random`` as kube-proxy does, hairpin traffic (a backend reaching itself)
        masqueraded. IPv4 or IPv6 by ``vip``. Pods reach the VIP through their default route (the cni0
        gateway); node-local clients through a ``vip dev cni0`` route. Only this node's netns gets the
        rules, so call it on every node whose pods use the service. Returns the ``KUBE-SVC-...`` chain.
        """
        if not backends:
            raise ValueError("a ClusterIP service needs at least one backend")
        v6 = ipaddress.ip_address(vip).version == 6
        ipt = self.iptables
        self._nat_chain(v6, "KUBE-SERVICES", "PREROUTING", "OUTPUT")
        if (v6, "KUBE-MARK-MASQ") not in self._nat_chains:
            self._nat_chain(v6, "KUBE-MARK-MASQ")
            ipt("-t", "nat", "-A", "KUBE-MARK-MASQ", "-j", "MARK", "--set-xmark", "0x4000/0x4000", v6=v6)
            self._nat_chain(v6, "KUBE-POSTROUTING", "POSTROUTING")
            ipt("-t", "nat", "-A", "KUBE-POSTROUTING", "-m", "mark", "--mark", "0x4000/0x4000",
                "-j", "MASQUERADE", v6=v6)

        def chain(kind: str, *parts: object) -> str:
            digest = hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:16].upper()
            return f"KUBE-{kind}-{digest}"

        svc = chain("SVC", vip, port, proto)
        self._nat_chain(v6, svc)
        for i, (ip, bport) in enumerate(backends):
            sep = chain("SEP", vip, port, proto, ip, bport)
            self._nat_chain(v6, sep)
            dest = f"[{ip}]:{bport}" if v6 else f"{ip}:{bport}"
            ipt("-t", "nat", "-A", sep, "-s", ip, "-j", "KUBE-MARK-MASQ", v6=v6)  # hairpin
            ipt("-t", "nat", "-A", sep, "-p", proto, "-j", "DNAT", "--to-destination", dest, v6=v6)
            left = len(backends) - i
            rnd = ["-m", "statistic", "--mode", "random", "--probability", f"{1 / left:.10f}"] if left > 1 else []
            ipt("-t", "nat", "-A", svc, *rnd, "-j", sep, v6=v6)
        ipt("-t", "nat", "-A", "KUBE-SERVICES", "-d", vip, "-p", proto, "-m", proto, "--dport", str(port),
            "-j", svc, v6=v6)
        # Node-local (host-network) clients need a route to the VIP for OUTPUT DNAT to apply; real nodes
        # have a default route, lab nodes may not.
        _ip_batch(self.netns, [f"route replace {vip} dev {BRIDGE}"])
        return svc


class Internet(NetnsEndpoint):
    """An "internet" host: a netns with a bridge ``br0`` holding ``ip``; nodes attach through veths."""

    def __init__(self, lab: Lab, cidr: str) -> None:
        self.lab, self.name = lab, "internet"
        self._net = ipaddress.ip_network(cidr)
        self.cidr, self.ip = str(self._net), str(self._net[1])
        self._next_host = 2
        self.netns = lab._add_netns("internet")
        _ip_batch(self.netns, [
            "link add br0 type bridge stp_state 0",
            f"addr add {self.ip}/{self._net.prefixlen} dev br0",
            "link set br0 up",
        ])


# ---------------------------------------------------------------------------------------------------
# The lab
# ---------------------------------------------------------------------------------------------------


class Lab:
    """A set of lab nodes, pods and links owned by one run; a context manager.

    ``tag`` fixes the run id (1-7 of ``[a-z0-9]``); by default a random ``"nw" + 5 hex`` id is used.
    """

    def __init__(self, tag: str | None = None) -> None:
        if tag is not None and not _TAG_RE.match(tag):
            raise ValueError(f"invalid lab tag {tag!r}: 1-7 characters of [a-z0-9]")
        self.nodes: dict[str, Node] = {}
        self.internet: Internet | None = None
        self._netns: list[str] = []
        self._procs: list[subprocess.Popen] = []
        self._counter = 0
        self._closed = False
        self._owner_pid = os.getpid()
        self._lock = threading.RLock()
        for _ in range(20):
            self.id = tag or "nw" + secrets.token_hex(3)[:5]
            if _claim_id(self.id):
                break
            if tag:
                raise RuntimeError(f"lab id {tag!r} is in use (marker {MARKER_DIR}/{tag}.pid)")
        else:
            raise RuntimeError("could not allocate a unique lab id")
        _register(self)

    # -- naming ------------------------------------------------------------------------------------
    @property
    def prefix(self) -> str:
        """Every netns of this run starts with this prefix."""
        return f"{NETNS_PREFIX}{self.id}-"

    def _ifname(self, kind: str) -> str:
        self._counter += 1
        name = f"{kind}{self.id}{self._counter}"
        if len(name) > 15:
            raise RuntimeError(f"interface name {name!r} too long")
        return name

    def _add_netns(self, suffix: str) -> str:
        if self._closed:
            raise RuntimeError("lab is closed")
        name = self.prefix + suffix
        if os.path.exists(f"{NETNS_DIR}/{name}"):
            raise ValueError(f"netns {name} already exists")
        self._netns.append(name)  # before creating: close() must see partial state
        _run(["ip", "netns", "add", name])
        _ip_batch(name, ["link set lo up"])
        return name

    def _popen(self, argv: list[str], **kw: Any) -> subprocess.Popen:
        kw.setdefault("start_new_session", True)  # its own process group: close() kills children too
        with self._lock:
            if self._closed:
                raise RuntimeError("lab is closed")
            proc = subprocess.Popen(argv, **kw)
            self._procs.append(proc)
        return proc

    # -- building ----------------------------------------------------------------------------------
    def add_node(
        self, name: str, pod_cidr: str | None = None, pod_cidr6: str | None = None, node_ip: str | None = None
    ) -> Node:
        """Add a node. CIDRs default to ``10.244.<n>.0/24`` and ``fd00:10:244:<n>::/64``, the node IP to
        ``192.168.100.<n>`` (its underlay address once uplinked), ``n`` being the node's 1-based index.
        """
        if not _NAME_RE.match(name):
            raise ValueError(f"invalid node name {name!r} (lowercase DNS label)")
        if name in self.nodes:
            raise ValueError(f"node {name} already exists")
        n = len(self.nodes) + 1
        node = Node(
            self, name, n,
            pod_cidr or f"10.244.{n}.0/24",
            pod_cidr6 or f"fd00:10:244:{n:x}::/64",
            node_ip or str(UNDERLAY[n]),
        )
        self.nodes[name] = node
        return node

    def add_uplink(self, node_a: Node, node_b: Node, vxlan_id: int = 42) -> None:
        """Connect two nodes like flannel's vxlan backend: an underlay veth pair between the node netns
        (node IPs as /32 peers), a vxlan device per node (``local`` = node IP, one per node, shared by
        all its uplinks) and, for each peer, a route to its pod CIDRs via its VTEP with static ARP/ND
        and FDB entries. IPv4 and IPv6 pod CIDRs are both routed.
        """
        ul_a, ul_b = self._ifname("ul"), self._ifname("ul")
        _ip_batch(node_a.netns, [
            f"link add {ul_a} mtu 1600 type veth peer name {ul_b} mtu 1600 netns {node_b.netns}",
            f"addr add {node_a.node_ip}/32 peer {node_b.node_ip}/32 dev {ul_a}",
            f"link set {ul_a} up",
        ])
        _ip_batch(node_b.netns, [
            f"addr add {node_b.node_ip}/32 peer {node_a.node_ip}/32 dev {ul_b}",
            f"link set {ul_b} up",
        ])
        for node in (node_a, node_b):
            self._ensure_vtep(node, vxlan_id)
        self._vxlan_peer(node_a, node_b)
        self._vxlan_peer(node_b, node_a)

    def _ensure_vtep(self, node: Node, vxlan_id: int) -> None:
        if node.vtep:
            return
        node.vtep = self._ifname("vx")
        _ip_batch(node.netns, [
            f"link add {node.vtep} mtu 1500 type vxlan id {vxlan_id} local {node.node_ip} "
            f"dstport {VXLAN_PORT} nolearning",
            f"addr add {node._net[0]}/32 dev {node.vtep}",  # flannel: the pod CIDR's .0 is the VTEP
            f"addr add fe80::{node.index:x}/64 dev {node.vtep} nodad",
            f"link set {node.vtep} up",
        ])
        node._vtep_mac = _ip_json(node.netns, "link", "show", node.vtep)[0]["address"]

    @staticmethod
    def _vxlan_peer(node: Node, peer: Node) -> None:
        vtep, mac, ll6 = node.vtep, peer._vtep_mac, f"fe80::{peer.index:x}"
        _ip_batch(node.netns, [
            f"neigh replace {peer._net[0]} lladdr {mac} dev {vtep} nud permanent",
            f"neigh replace {ll6} lladdr {mac} dev {vtep} nud permanent",
            f"route replace {peer.pod_cidr} via {peer._net[0]} dev {vtep} onlink",
            f"route replace {peer.pod_cidr6} via {ll6} dev {vtep}",
        ])
        _run(["bridge", "-n", node.netns, "fdb", "append", mac, "dev", vtep, "dst", peer.node_ip,
              "self", "permanent"])

    def add_internet(self, node: Node, cidr: str = "203.0.113.0/24") -> Internet:
        """Give ``node`` an uplink to the lab's "internet" netns (created on first use, ``.ip`` = first
        host of ``cidr``): a veth with the next address of ``cidr`` (``node.uplink_ip``), a default route
        via the internet host and MASQUERADE for pod traffic leaving through it.
        """
        if self.internet is None:
            self.internet = Internet(self, cidr)
        inet = self.internet
        if ipaddress.ip_network(cidr) != inet._net:
            raise ValueError(f"the lab's internet is {inet.cidr}, not {cidr}")
        if node.uplink:
            return inet
        node.uplink, peer = self._ifname("up"), self._ifname("up")
        node.uplink_ip = str(inet._net[inet._next_host])
        inet._next_host += 1
        _ip_batch(node.netns, [
            f"link add {node.uplink} type veth peer name {peer} netns {inet.netns}",
            f"addr add {node.uplink_ip}/{inet._net.prefixlen} dev {node.uplink}",
            f"link set {node.uplink} up",
            f"route replace default via {inet.ip} dev {node.uplink}",
        ])
        _ip_batch(inet.netns, [f"link set {peer} master br0", f"link set {peer} up"])
        node.iptables("-t", "nat", "-A", "POSTROUTING", "-s", node.pod_cidr, "-o", node.uplink, "-j", "MASQUERADE")
        return inet

    # -- teardown ----------------------------------------------------------------------------------
    def netns_names(self) -> list[str]:
        """Namespaces of this run that currently exist (from ``/run/netns``)."""
        return sorted(n for n in _list_netns() if n.startswith(self.prefix))

    def close(self) -> None:
        """Kill every process started through the lab and delete every netns (and so every link) of the
        run. Idempotent; logs and continues on errors, never raises.
        """
        with self._lock:
            self._closed = True
            procs, self._procs = self._procs, []
        try:
            _kill_procs(procs)
        except Exception:  # teardown must go on
            log.exception("lab %s: killing processes failed", self.id)
        names = list(dict.fromkeys([*reversed(self._netns), *self.netns_names()]))
        for name in names:
            try:
                _delete_netns(name)
            except Exception:
                log.exception("lab %s: deleting netns %s failed", self.id, name)
        with contextlib.suppress(OSError):
            os.unlink(_marker(self.id))
        _LIVE.discard(self)

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Lab {self.id} nodes={list(self.nodes)}{' closed' if self._closed else ''}>"


# ---------------------------------------------------------------------------------------------------
# Process and namespace helpers, markers, stale clean-up, exit hooks
# ---------------------------------------------------------------------------------------------------


def _kill_procs(procs: Sequence[subprocess.Popen], grace: float = 1.0) -> None:
    """SIGTERM each process group, wait up to ``grace`` seconds overall, then SIGKILL what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = [p for p in procs if p.poll() is None]
        for p in alive:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, sig)
        deadline = time.monotonic() + grace
        for p in alive:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        for f in (p.stdin, p.stdout, p.stderr):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()


def _list_netns() -> list[str]:
    try:
        return os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []


def _delete_netns(name: str) -> None:
    """Kill every process still inside netns ``name``, then delete it."""
    if not os.path.exists(f"{NETNS_DIR}/{name}"):
        return
    pids = _run(["ip", "netns", "pids", name], check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    res = _run(["ip", "netns", "del", name], check=False)
    if res.returncode != 0:
        log.warning("ip netns del %s: %s", name, res.stderr.strip())
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{NETNS_DIR}/{name}")


def _marker(run_id: str) -> str:
    return f"{MARKER_DIR}/{run_id}.pid"


def _proc_starttime(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks (field 22 of /proc/PID/stat), None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _claim_id(run_id: str) -> bool:
    """Atomically create the run's marker file; False if the id is already used (marker or netns)."""
    if any(n.startswith(f"{NETNS_PREFIX}{run_id}-") for n in _list_netns()):
        return False
    os.makedirs(MARKER_DIR, exist_ok=True)
    try:
        fd = os.open(_marker(run_id), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()} {_proc_starttime(os.getpid())}\n")
    return True


def _owner_alive(run_id: str) -> bool:
    try:
        with open(_marker(run_id)) as f:
            pid, start = f.read().split()
    except (OSError, ValueError):
        return False
    return _proc_starttime(int(pid)) == start


def cleanup_stale() -> list[str]:
    """Delete ``nwlab-*`` namespaces (and markers) of runs whose creating process is gone.

    Runs whose owner is still alive (including this process) are left alone. Returns the deleted
    namespace names.
    """
    by_id: dict[str, list[str]] = {}
    for name in _list_netns():
        m = re.match(rf"^{NETNS_PREFIX}([a-z0-9]+)-", name)
        if m:
            by_id.setdefault(m.group(1), []).append(name)
    with contextlib.suppress(FileNotFoundError):
        for fname in os.listdir(MARKER_DIR):
            if fname.endswith(".pid"):
                by_id.setdefault(fname[:-4], [])
    removed: list[str] = []
    for run_id, names in by_id.items():
        if _owner_alive(run_id):
            continue
        for name in names:
            try:
                _delete_netns(name)
                removed.append(name)
            except Exception:
                log.exception("cleanup_stale: deleting %s failed", name)
        with contextlib.suppress(OSError):
            os.unlink(_marker(run_id))
    if removed:
        log.warning("cleanup_stale: removed %d stale lab namespaces", len(removed))
    return removed


_LIVE: set[Lab] = set()
_hooks_installed = False
_prev_sigterm: Any = None


def _close_all() -> None:
    """Close every live lab created by this process (not by a forked parent)."""
    for lab in list(_LIVE):
        if lab._owner_pid == os.getpid():
            lab.close()


def _on_sigterm(signum: int, frame: Any) -> None:
    _close_all()
    prev = _prev_sigterm
    if callable(prev):
        prev(signum, frame)
        return
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # die of SIGTERM as if we had not been here
    os.kill(os.getpid(), signal.SIGTERM)


def _register(lab: Lab) -> None:
    """Track a live lab; on first use install the atexit hook and (main thread only) SIGTERM handler."""
    global _hooks_installed, _prev_sigterm
    _LIVE.add(lab)
    if _hooks_installed:
        return
    _hooks_installed = True
    atexit.register(_close_all)
    if threading.current_thread() is threading.main_thread():
        prev = signal.getsignal(signal.SIGTERM)
        if prev is not signal.SIG_IGN:
            _prev_sigterm = prev
            signal.signal(signal.SIGTERM, _on_sigterm)
