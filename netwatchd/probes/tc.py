"""Probe `tc`: packets and bytes per traffic class and local pod, and node transit time, from tc programs.

Kernel side (`bpf/tc.c`; its header comment has the details): programs on the host end of every pod veth and on
the uplinks (attached, and kept attached as links come and go, by `tcattach.TcManager`) count each packet once
per node, where it enters the node's datapath (or, for the node's own packets, where it leaves), and time 1 in
`--tc-transit-sample` packets from the ingress hook to the egress hook.

Classification happens in the kernel, decided here: the cluster view becomes address *membership* bits in an
LPM trie (local pod, pod, service, node, node-local scope, loopback: each a ClusterView predicate that
`classify.classify` asks), and `classes` holds classify()'s answer (class, direction, local side) for every pair
of memberships, computed by calling classify() on representative addresses that have exactly those
memberships, so the tc probe cannot disagree with the classifier the other probes use. The kernel counts per
(pod veth slot, class, direction), slot 0 being the node, and records each slot's pod address(es); this side
names the pod from them with the resolver, like every other probe.

Metrics: netwatch_packets_total / netwatch_bytes_total {traffic_class, direction, namespace, pod},
netwatch_node_transit_seconds {traffic_class, path} (path: veth_to_veth, veth_to_uplink, uplink_to_veth,
uplink_to_uplink), netwatch_tc_interfaces {role}.
"""

from __future__ import annotations

import contextlib
import ipaddress
import struct
import threading
from array import array
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field

import structlog

from netwatchd.classify import (
    EGRESS,
    INGRESS,
    TRAFFIC_CLASSES,
    Attribution,
    ClusterView,
    IPAddress,
    IPNetwork,
    _node_local_scope,
    classify,
)
from netwatchd.export.histogram import DEFAULT_BOUNDS_S, HistogramAccounting, bpf_defines
from netwatchd.export.metrics import MetricSpec, exposed_name, family
from netwatchd.identity.local import NODE, PodRef
from netwatchd.pipeline import SeriesBudget, forget_pod_series
from netwatchd.probes.base import Hook, MapStats, ProbeContext
from netwatchd.probes.loader import compile_program, cpu_regions
from netwatchd.probes.module import ProgramSpec
from netwatchd.probes.tcattach import (
    DEFAULT_CLSACT_PRIO,
    ROLE_CODES,
    ROLE_POD,
    ROLE_UPLINK,
    ClsactAttacher,
    TcManager,
    TcxAttacher,
)

log = structlog.get_logger("netwatchd.tc")

# Membership bits (bpf/tc.c NW_M_*): each is one ClusterView predicate classify() uses.
M_LOCAL_POD, M_POD, M_SERVICE, M_NODE, M_SCOPE, M_LOOPBACK = 1, 2, 4, 8, 16, 32
K_SAME = 1  # key flag: source == destination
SCOPE_NETS = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/32", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4",
    "::/128", "::1/128", "fe80::/10", "ff00::/8",
))
PATHS = ("veth_to_veth", "veth_to_uplink", "uplink_to_veth", "uplink_to_uplink")  # bpf/tc.c NW_PATH_*
PROGRAMS = {ROLE_POD: ("nw_tc_pod_in", "nw_tc_pod_out"), ROLE_UPLINK: ("nw_tc_up_in", "nw_tc_up_out")}

DEFAULT_TRANSIT_SAMPLE = 16  # time 1 in N packets: a timed packet costs two clock reads (~60 ns each here)
DEFAULT_SLOTS = 513  # counter slots: the node + 512 pod veths (more pods on a node count for the node)
NETS_ENTRIES = 65536  # LPM entries: CIDRs + node, pod and service addresses (both families)
IFINDEX_ARRAY = 65536  # ifindexes below this are looked up in an array (cheaper), larger in a hash
NAT_ENTRIES = 65536  # masqueraded pod connections whose replies are expected
SLOT_VALUES = 16  # per slot: [class id * 2 + ingress] (bpf/tc.c NW_SLOT_VALUES)
UNKNOWN_CLASS = 7  # bpf/tc.c NW_CLASS_UNKNOWN: a membership pair the classes table does not know
LOCAL_SRC, LOCAL_DST = 1, 2

VOLUME_LABELS = ("traffic_class", "direction", "namespace", "pod")
_NS, _POD = 2, 3
PACKETS = MetricSpec(
    "netwatch_packets", "counter",
    "Packets through this node's datapath, counted once per node: where they enter it (the host end of a pod's "
    "veth, an uplink) or, for the node's own packets, where they leave it; by traffic class of the local side "
    "(GSO/GRO aggregates count as their segments).", VOLUME_LABELS)
BYTES = MetricSpec(
    "netwatch_bytes", "counter",
    "IP bytes (headers included, as on the wire without L2) of the packets counted in netwatch_packets_total.",
    VOLUME_LABELS)
TRANSIT = MetricSpec(
    "netwatch_node_transit_seconds", "histogram",
    "Time packets spend crossing this node's datapath (bridge, netfilter, routing; not the egress qdisc): from "
    "the tc ingress hook of the pod veth or uplink where they enter to the tc egress hook where they leave.",
    ("traffic_class", "path"))
INTERFACES = MetricSpec(
    "netwatch_tc_interfaces", "gauge", "Interfaces the tc probe's programs are attached to, by role.", ("role",))


# ---------------------------------------------------------------------------------------------------------
# Membership: the cluster view as LPM entries, and back from membership bits to classify()
# ---------------------------------------------------------------------------------------------------------


def membership(view: ClusterView, ip: IPAddress) -> int:
    """The membership bits of one address: exactly the predicates classify() asks about it."""
    bits = 0
    if view.is_local_pod(ip):
        bits |= M_LOCAL_POD
    if view.is_pod(ip):
        bits |= M_POD
    if view.is_service(ip):
        bits |= M_SERVICE
    if view.is_node(ip):
        bits |= M_NODE
    if _node_local_scope(ip):
        bits |= M_SCOPE
    if ip.is_loopback:
        bits |= M_LOOPBACK
    return bits


def view_prefixes(view: ClusterView) -> set[IPNetwork]:
    """Every prefix some predicate of `membership` depends on: each predicate is constant on the addresses
    whose longest matching prefix (in this set) is the same."""
    nets: set[IPNetwork] = set(SCOPE_NETS)
    nets.update(view.node_pod_cidrs, view.cluster_cidrs, view.service_cidrs)
    for ip in (*view.service_ips, *view.host_ips, *view.node_ips, *(view.local_pod_ips or ())):
        nets.add(ipaddress.ip_network(ip))
    return nets


def _uncovered(net: IPNetwork, inner: list[IPNetwork], want: int) -> list[IPAddress]:
    """Up to `want` addresses of `net` inside none of `inner` (all strictly inside `net`)."""
    inner = [n for n in inner if n.subnet_of(net) and n != net]  # type: ignore[arg-type]
    if not inner:
        first = net.network_address
        return [first + i for i in range(min(want, net.num_addresses))]
    if net.prefixlen == net.max_prefixlen:
        return []
    out: list[IPAddress] = []
    for half in net.subnets(1):
        if any(half.subnet_of(n) for n in inner):  # type: ignore[arg-type]
            continue
        out += _uncovered(half, inner, want - len(out))
        if len(out) >= want:
            break
    return out


@dataclass
class MembershipTable:
    """The LPM entries for a view (prefix -> bits) and two representative addresses per (family, bits)."""

    entries: dict[IPNetwork, int] = field(default_factory=dict)
    reps: dict[tuple[int, int], list[IPAddress]] = field(default_factory=dict)

    @classmethod
    def build(cls, view: ClusterView) -> MembershipTable:
        table = cls()
        nets = view_prefixes(view)
        for version, top in ((4, ipaddress.ip_network("0.0.0.0/0")), (6, ipaddress.ip_network("::/0"))):
            fam = [n for n in nets if n.version == version]
            for net in [top, *fam]:
                if net.prefixlen == net.max_prefixlen:
                    addrs = [net.network_address]
                else:
                    addrs = _uncovered(net, fam if net is top else
                                       [n for n in fam if n.prefixlen > net.prefixlen and n.subnet_of(net)], 2)
                if not addrs:  # wholly covered by longer prefixes: its own bits never decide anything
                    continue
                bits = membership(view, addrs[0])
                if net != top:
                    table.entries[net] = bits
                table.add_reps(version, bits, addrs)
        return table

    def add_reps(self, version: int, bits: int, addrs: Iterable[IPAddress]) -> None:
        reps = self.reps.setdefault((version, bits), [])
        for a in addrs:
            if len(reps) < 2 and a not in reps:
                reps.append(a)

    def merge_reps(self, other: MembershipTable) -> None:
        """Keep representatives of bit combinations a previous view had (old kernel keys may carry them)."""
        for (version, bits), addrs in other.reps.items():
            self.add_reps(version, bits, addrs)

    def lookup(self, ip: IPAddress) -> int:
        """Longest-prefix match, as the kernel's LPM trie does it (for tests)."""
        best: IPNetwork | None = None
        for net in self.entries:
            if net.version == ip.version and ip in net and (best is None or net.prefixlen > best.prefixlen):
                best = net
        return self.entries[best] if best is not None else 0

    def attribution(self, view: ClusterView, version: int, src_m: int, dst_m: int, same: bool
                    ) -> tuple[Attribution, bool] | None:
        """classify() of a packet whose addresses have these memberships; the bool says the local side is the
        source (else the destination). None when no representative is known (cannot happen for kernel keys)."""
        src_reps, dst_reps = self.reps.get((version, src_m)), self.reps.get((version, dst_m))
        if not src_reps or not dst_reps:
            return None
        src = src_reps[0]
        if same:
            dst = src
        else:
            dst = next((a for a in dst_reps if a != src), None)
            if dst is None:
                return None
        att = classify(view, src, dst)
        return att, att.local_ip == src


def view_key(view: ClusterView) -> tuple:
    return (view.node_pod_cidrs, view.cluster_cidrs, view.service_cidrs, view.host_ips, view.node_ips,
            view.service_ips, view.local_pod_ips)


def encode_class(att: Attribution, local_is_src: bool) -> int:
    """A `classes` value (bpf/tc.c NW_C_*): class id, ingress bit, local side (0 none, 1 source, 2 destination)."""
    local = 0 if att.local_ip is None else (LOCAL_SRC if local_is_src else LOCAL_DST)
    return TRAFFIC_CLASSES.index(att.traffic_class) | (8 if att.direction == INGRESS else 0) | (local << 4)


def class_table(view: ClusterView, table: MembershipTable) -> dict[int, int]:
    """`classes` index ([same][src bits][dst bits]) -> value, for every membership pair the table can produce
    (and, through merged representatives, every pair an earlier view produced)."""
    out: dict[int, int] = {}
    masks = sorted({bits for (_v, bits) in table.reps})
    for same in (0, 1):
        for src_m in masks:
            for dst_m in masks if not same else (src_m,):
                for version in (4, 6):
                    res = table.attribution(view, version, src_m, dst_m, bool(same))
                    if res is not None:
                        out[(same << 12) | (src_m << 6) | dst_m] = encode_class(*res)
                        break
    return out


# ---------------------------------------------------------------------------------------------------------
# Accounting: kernel counters per (slot, class, direction) -> cumulative labelled series
# ---------------------------------------------------------------------------------------------------------


class TcAccounting:
    """Cumulative packets/bytes per (class, direction, namespace, pod) and transit histograms per (class, path).

    Raw keys are (slot, slot generation, value index); a slot's pod comes from the addresses the kernel saw
    on it (`addresses[slot]`), named by the resolver like every other probe's local addresses.
    """

    def __init__(self, resolver, series_limit: int = 10000) -> None:
        self.resolver = resolver
        self.budget = SeriesBudget(series_limit)
        self.packets: dict[tuple[str, ...], int] = {}
        self.bytes: dict[tuple[str, ...], int] = {}
        self._last: dict[Hashable, tuple[int, int]] = {}
        self.transit = HistogramAccounting(self._transit_labels, DEFAULT_BOUNDS_S)
        self.lock = threading.Lock()

    def pod_of(self, addresses: Iterable[IPAddress]) -> PodRef:
        """The pod behind a pod veth, from the addresses the kernel recorded for it."""
        addrs = [a for a in addresses if a is not None and int(a)]
        if not addrs:
            return self.resolver.unknown_pod
        for a in addrs:
            pod = self.resolver.pod_for_ip(a)
            if pod is not None and pod != NODE:
                return pod
        return self.resolver.unknown_pod

    @staticmethod
    def _transit_labels(raw: Hashable) -> tuple[str, ...] | None:
        path, cls = divmod(int(raw), 8)  # type: ignore[call-overload]
        if cls >= len(TRAFFIC_CLASSES) or path >= len(PATHS):
            return None
        return (TRAFFIC_CLASSES[cls], PATHS[path])

    def update(self, slots: Iterable[tuple[int, int, list[IPAddress], list[tuple[int, int]]]]) -> None:
        """`slots`: (slot, generation, recorded addresses, cumulative (packets, bytes) per value index)."""
        with self.lock:
            for slot, gen, addrs, values in slots:
                pod: PodRef | None = None
                for idx, (packets, nbytes) in enumerate(values):
                    key = (slot, gen, idx)
                    last_p, last_b = self._last.get(key, (0, 0))
                    dp, db = packets - last_p, nbytes - last_b
                    if dp < 0:  # zeroed for reuse since the last read
                        dp, db = packets, nbytes
                    self._last[key] = (packets, nbytes)
                    cls, ingress = divmod(idx, 2)
                    if dp == 0 or cls >= len(TRAFFIC_CLASSES):
                        continue
                    if pod is None:
                        pod = NODE if slot == 0 else self.pod_of(addrs)
                    labels = (TRAFFIC_CLASSES[cls], INGRESS if ingress else EGRESS, pod.namespace, pod.pod)
                    labels = self.budget.admit(labels, _POD, _NS)
                    self.packets[labels] = self.packets.get(labels, 0) + dp
                    self.bytes[labels] = self.bytes.get(labels, 0) + db

    def forget_slot(self, slot: int, gen: int) -> None:
        with self.lock:
            for k in [k for k in self._last if k[0] == slot and k[1] == gen]:  # type: ignore[index]
                del self._last[k]

    def forget_pod(self, namespace: str, pod: str) -> int:
        with self.lock:
            return forget_pod_series((self.packets, self.bytes), (self.budget,), namespace, pod, _NS, _POD)

    def snapshot(self) -> tuple[dict[tuple[str, ...], int], dict[tuple[str, ...], int]]:
        with self.lock:
            return dict(self.packets), dict(self.bytes)


# ---------------------------------------------------------------------------------------------------------
# The probe
# ---------------------------------------------------------------------------------------------------------


def make_attacher(mode: str, btf, clsact_prio: int = DEFAULT_CLSACT_PRIO):
    """`--tc-attach`: tcx when asked, or when `auto` and the kernel has it (tcx_entry in BTF); else clsact."""
    if mode == "auto":
        try:
            btf.struct_size("tcx_entry")
            mode = "tcx"
        except Exception:  # noqa: BLE001 - no tcx on this kernel
            mode = "clsact"
    if mode == "tcx":
        return TcxAttacher.from_btf(btf)
    if mode == "clsact":
        return ClsactAttacher(clsact_prio)
    raise ValueError(f"unknown tc attach mode {mode!r}")


@dataclass
class _Slots:
    """Counter slots of pod veths (slot 0 is the node). A gone veth's slot is read once more, then zeroed and
    reused with a new generation."""

    capacity: int
    by_ifindex: dict[int, int] = field(default_factory=dict)
    gen: dict[int, int] = field(default_factory=dict)
    retiring: dict[int, int] = field(default_factory=dict)  # slot -> reads left before reuse
    free: list[int] = field(default_factory=list)
    missing: int = 0  # pod veths without a slot (capacity reached): counted for the node

    def __post_init__(self) -> None:
        self.free = list(range(self.capacity - 1, 0, -1))

    def in_use(self) -> list[int]:
        return [0, *sorted(self.by_ifindex.values()), *sorted(self.retiring)]


class TcProbe:
    """See module docstring."""

    name = "tc"
    hooks = (Hook("tc", "pod veths and uplinks"),)
    metrics = (PACKETS, BYTES, TRANSIT, INTERFACES)

    def __init__(self, slots: int = DEFAULT_SLOTS) -> None:
        self.slots = _Slots(slots)
        self._bpf = None
        self.manager: TcManager | None = None
        self.accounting: TcAccounting | None = None
        self.view: ClusterView | None = None
        self.table = MembershipTable()
        self._view_key: tuple | None = None
        self._nets: dict[IPNetwork, int] = {}
        self._classes: dict[int, int] = {}
        self._gen = 0
        self._ifaces: dict[int, tuple[int, int]] = {}
        self._ports: set[int] = set()
        self.lock = threading.Lock()  # kernel map updates from the link watcher and the refresh loop
        self.ncpus = cpu_regions()  # `volume` holds one value per (slot, CPU region)

    def attach(self, ctx: ProbeContext) -> None:
        s = ctx.settings
        self.slots = _Slots(max(2, int(getattr(s, "tc_max_pods", self.slots.capacity - 1))) + 1)
        sample = max(1, int(getattr(s, "tc_transit_sample", DEFAULT_TRANSIT_SAMPLE)))
        self.view = ctx.view if ctx.view is not None else ClusterView()
        resolver = ctx.resolver
        if resolver is None:
            from netwatchd.identity.local import StandaloneResolver

            resolver = StandaloneResolver()
        self.accounting = TcAccounting(resolver, getattr(s, "max_series", 10000))
        btf = ctx.btf
        defines: dict[str, int | str] = {
            "TC_SLOTS": self.slots.capacity, "TC_NETS_ENTRIES": NETS_ENTRIES, "TC_IFINDEX_MAX": IFINDEX_ARRAY,
            "TC_NAT_ENTRIES": NAT_ENTRIES, "TC_TRANSIT_SAMPLE": sample, "TC_NCPUS": self.ncpus,
            **bpf_defines(DEFAULT_BOUNDS_S),
        }
        with contextlib.suppress(Exception):  # no conntrack: uplink traffic NATed to pods is taken as it leaves
            defines["TC_CT_HASH_SIZE"] = btf.struct_size("nf_conntrack_tuple_hash")
            defines["TC_IPS_NAT_MASK"] = btf.enum_values("ip_conntrack_status")["IPS_NAT_MASK"]
        self._bpf = compile_program("tc.c", btf, defines,
                                    [ProgramSpec(n, "sched_cls") for names in PROGRAMS.values() for n in names])
        classes = self._bpf["classes"]
        classes.update_many([(i, classes.Leaf(UNKNOWN_CLASS)) for i in range(len(classes))])  # one syscall
        self.sync_view()
        fd = self._bpf.program_fd
        programs = {role: (fd(i), fd(o), i, o) for role, (i, o) in PROGRAMS.items()}
        attacher = make_attacher(getattr(s, "tc_attach", "auto"), btf,
                                 getattr(s, "tc_clsact_prio", DEFAULT_CLSACT_PRIO))
        self.manager = TcManager(attacher, programs, self._on_plan, getattr(s, "tc_uplinks", "auto")).start()
        log.info("tc_probe_ready", mode=attacher.mode, transit_sample=sample, **self.manager.counts())

    # -- kernel maps kept in sync with the world -------------------------------------------------------
    def _on_plan(self, plan: dict[int, str], ports: set[int]) -> None:
        """Interface roles and pod slots, and overlay ports, before the manager attaches anything new."""
        if self._bpf is None:
            return
        with self.lock:
            sl = self.slots
            for ifindex in [i for i in sl.by_ifindex if plan.get(i) != ROLE_POD]:
                sl.retiring[sl.by_ifindex.pop(ifindex)] = 2
            wanted: dict[int, tuple[int, int]] = {}
            for ifindex, role in plan.items():
                slot = 0
                if role == ROLE_POD:
                    slot = sl.by_ifindex.get(ifindex, 0)
                    if not slot and sl.free:
                        slot = sl.by_ifindex[ifindex] = sl.free.pop()
                        sl.gen[slot] = sl.gen.get(slot, 0) + 1
                wanted[ifindex] = (ROLE_CODES[role], slot)
            sl.missing = sum(1 for i, r in plan.items() if r == ROLE_POD and i not in sl.by_ifindex)
            for ifindex in set(self._ifaces) - set(wanted):
                self._set_iface(ifindex, None)
            for ifindex, val in wanted.items():
                if self._ifaces.get(ifindex) != val:
                    self._set_iface(ifindex, val)
            self._ifaces = wanted
            if ports != self._ports:
                table = self._bpf["overlay_ports"]
                words: dict[int, int] = {}
                for port in ports:
                    words[port >> 6] = words.get(port >> 6, 0) | 1 << (port & 63)
                for word in {port >> 6 for port in self._ports | ports}:
                    table[table.Key(word)] = table.Leaf(words.get(word, 0))
                self._ports = set(ports)

    def _set_iface(self, ifindex: int, val: tuple[int, int] | None) -> None:
        role, slot = val or (0, 0)
        if ifindex < IFINDEX_ARRAY:
            t = self._bpf["ifaces"]
            leaf = t.Leaf()
            leaf.slot, leaf.role = slot, role
            t[t.Key(ifindex)] = leaf
            return
        t = self._bpf["ifaces_big"]
        if val is None:
            with contextlib.suppress(KeyError):
                del t[t.Key(ifindex)]
        else:
            leaf = t.Leaf()
            leaf.slot, leaf.role = slot, role
            t[t.Key(ifindex)] = leaf

    def sync_view(self) -> None:
        """Load the cluster view into the kernel when it changed (identity updates it in place): the class
        of every membership pair first, then the LPM trie, then a new generation for the lookup caches."""
        if self._bpf is None or self.view is None:
            return
        key = view_key(self.view)
        if key == self._view_key:
            return
        table = MembershipTable.build(self.view)
        table.merge_reps(self.table)
        classes = class_table(self.view, table)
        with self.lock:
            ct = self._bpf["classes"]
            for idx, val in classes.items():
                if self._classes.get(idx) != val:
                    ct[ct.Key(idx)] = ct.Leaf(val)
            self._classes = classes
            lpm = self._bpf["nets"]
            for net in set(self._nets) - set(table.entries):
                with contextlib.suppress(KeyError):
                    del lpm[_lpm_key(lpm, net)]
            for net, bits in table.entries.items():
                if self._nets.get(net) != bits:
                    lpm[_lpm_key(lpm, net)] = lpm.Leaf(bits)
            self._nets = dict(table.entries)
            self._gen += 1
            cfg = self._bpf["config"]
            cfg[cfg.Key(0)] = cfg.Leaf(self._gen)
        self.table = table
        self._view_key = key

    # -- probe protocol ------------------------------------------------------------------------------
    def refresh(self) -> None:
        if self._bpf is None or self.accounting is None:
            return
        self.sync_view()
        with self.lock:
            slots = self.slots.in_use()
            gens = dict(self.slots.gen)
        rows = []
        vol, addr_raw = self._read_array("volume"), self._read_array("slot_addr")
        addr_type, addr_size = self._bpf["slot_addr"].Leaf, self._bpf["slot_addr"].value_size
        ncpus, width = self.ncpus, 2 * SLOT_VALUES  # a slot_vals is SLOT_VALUES x (packets, bytes) u64
        for slot in slots:
            base = slot * ncpus * width
            # every CPU region's values of this slot, summed element-wise (C loops: map/zip/sum)
            regions = [vol[base + c * width: base + (c + 1) * width] for c in range(ncpus)]
            summed = list(map(sum, zip(*regions, strict=True)))
            values = list(zip(summed[0::2], summed[1::2], strict=True))
            leaf = addr_type.from_buffer_copy(addr_raw, slot * addr_size)
            rows.append((slot, gens.get(slot, 0), _slot_addresses(leaf), values))
        self.accounting.update(rows)
        self.accounting.transit.update(self.read_transit())
        self._recycle()

    def _read_array(self, name: str):
        """A whole array map in one batched read: its values as array('Q') for `volume`, raw bytes otherwise
        (in index order: an array's batch order). At 110 pods this replaces a few hundred single lookups."""
        table = self._bpf[name]
        _keys, values, _n = table.items_raw()
        if name != "volume":
            return values
        if table.value_size != 16 * SLOT_VALUES:
            raise RuntimeError(f"bpf/tc.c struct slot_vals is {table.value_size} bytes, tc.py reads "
                               f"{SLOT_VALUES} x (u64 packets, u64 bytes)")
        vals = array("Q")
        vals.frombytes(values)
        return vals

    def _recycle(self) -> None:
        """Zero and free the slots of gone pod veths once their final counts were read."""
        with self.lock:
            done = []
            for slot, left in self.slots.retiring.items():
                if left <= 1:
                    done.append(slot)
                else:
                    self.slots.retiring[slot] = left - 1
            for slot in done:
                del self.slots.retiring[slot]
                for cpu in range(self.ncpus):
                    self._bpf["volume"].clearitem(slot * self.ncpus + cpu)
                self._bpf["slot_addr"].clearitem(slot)
                if self.accounting is not None:
                    self.accounting.forget_slot(slot, self.slots.gen.get(slot, 0))
                self.slots.free.insert(0, slot)

    def read_transit(self) -> list[tuple[int, list[int], int]]:
        out: list[tuple[int, list[int], int]] = []
        if self._bpf is None:
            return out
        for key, per_cpu in self._bpf["transit"].items():  # one batched read of the whole array
            idx = key.value
            if idx >= len(PATHS) * 8:
                continue
            slots = [sum(h.slots[i] for h in per_cpu) for i in range(len(per_cpu[0].slots))]
            if any(slots):
                out.append((idx, slots, sum(h.sum_ns for h in per_cpu)))
        return out

    def collect(self):
        packets, nbytes = self.accounting.snapshot() if self.accounting else ({}, {})
        pk, by = family(PACKETS), family(BYTES)
        for labels, value in sorted(packets.items()):
            pk.add_metric(list(labels), value)
            by.add_metric(list(labels), nbytes.get(labels, 0))
        out = [pk, by]
        if self.accounting is not None:
            out.append(self.accounting.transit.family(TRANSIT.name, TRANSIT.help, TRANSIT.labels))
        ifs = family(INTERFACES)
        for role, n in sorted((self.manager.counts() if self.manager else {}).items()):
            ifs.add_metric([role], n)
        out.append(ifs)
        return out

    def forget_pod(self, namespace: str, pod: str) -> int:
        return self.accounting.forget_pod(namespace, pod) if self.accounting else 0

    def map_stats(self) -> dict[str, MapStats]:
        with self.lock:
            used = len(self.slots.by_ifindex) + len(self.slots.retiring)
            return {"tc_pod_slots": MapStats(entries=used, capacity=self.slots.capacity - 1,
                                             overflow=self.slots.missing)}

    def folded(self) -> dict[str, int]:
        return {exposed_name(PACKETS): self.accounting.budget.folded} if self.accounting else {}

    def programs(self) -> dict[str, int]:
        if self._bpf is None:
            return {}
        return self._bpf.program_fds()

    def detach(self) -> None:
        if self.manager is not None:
            self.manager.stop()
            self.manager = None
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None

    @property
    def attached(self) -> bool:
        return self._bpf is not None


def _slot_addresses(leaf) -> list[IPAddress]:
    out: list[IPAddress] = []
    if leaf.addr4:
        out.append(ipaddress.IPv4Address(struct.pack("=I", leaf.addr4)))
    raw6 = struct.pack("=4I", *leaf.addr6)
    if any(raw6):
        out.append(ipaddress.IPv6Address(raw6))
    return out


def _lpm_key(lpm, net: IPNetwork):
    """struct lpm_key: the family byte, then the address as 32-bit words holding its bytes in network order
    (v4 zero padded); the prefix length counts the family byte."""
    key = lpm.Key()
    key.prefixlen = 8 + net.prefixlen
    key.family = net.version
    raw = net.network_address.packed.ljust(16, b"\0")
    for i, w in enumerate(struct.unpack("=4I", raw)):
        key.addr[i] = w
    return key
