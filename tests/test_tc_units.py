"""The tc probe's pure parts, no kernel: interface roles, the membership table against classify(), the class
table encoding, accounting of kernel slots, LPM key layout, the tcx attr layout, and the attach manager's
reconcile logic with a fake attacher."""

from __future__ import annotations

import ctypes
import ipaddress
import itertools

import pytest

from netwatchd.classify import EGRESS, INGRESS, TRAFFIC_CLASSES, ClusterView, classify, parse_cidrs
from netwatchd.identity.local import NODE, PodRef
from netwatchd.probes import tc
from netwatchd.probes.tcattach import (
    ROLE_BRIDGE,
    ROLE_POD,
    ROLE_UPLINK,
    Link,
    TcManager,
    _LinkCreateAttr,
    overlay_ports,
    parse_uplinks,
    plan_roles,
)

ip = ipaddress.ip_address

# ------------------------------------------------------------------------------------------------------
# Interface roles
# ------------------------------------------------------------------------------------------------------

LAB_NODE = [
    Link(1, "lo", loopback=True, global_address=True),
    Link(2, "cni0", kind="bridge", global_address=True),
    Link(3, "vethaaa", kind="veth", master=2, peer_netnsid=0),
    Link(4, "vethbbb", kind="veth", master=2, peer_netnsid=1),
    Link(5, "ul1", kind="veth", peer_netnsid=2, global_address=True),  # underlay to node 2
    Link(6, "vx1", kind="vxlan", global_address=True, overlay_port=8472),
    Link(7, "up1", kind="veth", peer_netnsid=3, global_address=True, default_route=True),
    Link(8, "kube-ipvs0", kind="dummy", global_address=True),
    Link(9, "cali123", kind="veth", peer_netnsid=4),  # routed CNI: no bridge, no address
    Link(10, "tmpveth", kind="veth"),  # both ends still in our netns (a CNI mid-setup)
    Link(11, "docker0", kind="bridge"),
]


@pytest.mark.parametrize("spec, expected", [
    ("auto", {2: ROLE_BRIDGE, 3: ROLE_POD, 4: ROLE_POD, 5: ROLE_UPLINK, 6: ROLE_UPLINK, 7: ROLE_UPLINK,
              9: ROLE_POD, 11: ROLE_BRIDGE}),
    ("up1", {2: ROLE_BRIDGE, 3: ROLE_POD, 4: ROLE_POD, 5: ROLE_POD, 7: ROLE_UPLINK, 9: ROLE_POD, 11: ROLE_BRIDGE}),
    ("auto,cali*", {2: ROLE_BRIDGE, 3: ROLE_POD, 4: ROLE_POD, 5: ROLE_UPLINK, 6: ROLE_UPLINK, 7: ROLE_UPLINK,
                    9: ROLE_UPLINK, 11: ROLE_BRIDGE}),
    ("", {2: ROLE_BRIDGE, 3: ROLE_POD, 4: ROLE_POD, 5: ROLE_POD, 7: ROLE_POD, 9: ROLE_POD, 11: ROLE_BRIDGE}),
])
def test_plan_roles(spec, expected):
    assert plan_roles(LAB_NODE, spec) == expected


def test_physical_nic_in_a_bridge_is_the_uplink_not_the_bridge():
    links = [Link(2, "br0", kind="bridge", global_address=True, default_route=True),
             Link(3, "eth0", kind="", master=2),
             Link(4, "veth1", kind="veth", master=2, peer_netnsid=0)]
    assert plan_roles(links) == {2: ROLE_BRIDGE, 3: ROLE_UPLINK, 4: ROLE_POD}


def test_parse_uplinks_and_overlay_ports():
    assert parse_uplinks("auto") == (True, ())
    assert parse_uplinks(" eth0 , auto,bond* ") == (True, ("eth0", "bond*"))
    assert parse_uplinks("") == (False, ())
    assert overlay_ports(LAB_NODE) == {8472}


def test_tcx_link_create_attr_layout():
    """union bpf_attr.link_create: prog_fd, target_ifindex, attach_type, flags, then tcx.relative_fd and the
    8-aligned expected_revision (include/uapi/linux/bpf.h)."""
    f = {name: getattr(_LinkCreateAttr, name).offset for name, *_ in _LinkCreateAttr._fields_}
    assert (f["prog_fd"], f["target_ifindex"], f["attach_type"], f["flags"]) == (0, 4, 8, 12)
    assert (f["relative_fd"], f["expected_revision"]) == (16, 24)
    assert ctypes.sizeof(_LinkCreateAttr) >= 32


# ------------------------------------------------------------------------------------------------------
# Membership table: the kernel's view of classify()
# ------------------------------------------------------------------------------------------------------

STANDALONE = ClusterView(
    node_pod_cidrs=parse_cidrs(["10.244.1.0/24,fd00:10:244:1::/64"]),
    cluster_cidrs=parse_cidrs(["10.244.0.0/16,fd00:10:244::/48"]),
    service_cidrs=parse_cidrs(["10.96.0.0/12,fd00:10:96::/108"]),
    host_ips=frozenset(map(ip, ["10.244.1.1", "192.168.100.1", "203.0.113.2", "127.0.0.1", "::1",
                                "fd00:10:244:1::1", "fe80::1"])),
)
KUBE = ClusterView(
    node_pod_cidrs=(),  # no per-node ranges: local pods are the kubelet's list
    cluster_cidrs=parse_cidrs(["10.244.0.0/16"]),
    service_cidrs=(),
    host_ips=frozenset(map(ip, ["10.244.1.1", "192.168.100.1", "127.0.0.1"])),
    node_ips=frozenset(map(ip, ["192.168.100.1", "192.168.100.2"])),
    service_ips=frozenset(map(ip, ["10.96.0.10", "10.96.5.5"])),
    local_pod_ips=frozenset(map(ip, ["10.244.1.2", "10.244.1.3", "192.168.100.1"])),  # + a hostNetwork pod
)
GRID = [ip(a) for a in (
    "10.244.1.0", "10.244.1.1", "10.244.1.2", "10.244.1.3", "10.244.1.200", "10.244.2.7", "10.245.0.1",
    "10.96.0.1", "10.96.0.10", "10.96.5.5", "10.111.0.1", "192.168.100.1", "192.168.100.2", "203.0.113.2",
    "8.8.8.8", "127.0.0.1", "127.1.2.3", "169.254.1.1", "224.0.0.251", "0.0.0.0", "255.255.255.255",
    "fd00:10:244:1::1", "fd00:10:244:1::2", "fd00:10:244:1::abcd", "fd00:10:244:2::5", "fd00:10:96::1",
    "2001:db8::1", "::1", "fe80::1", "fe80::2", "ff02::1", "::",
)]


@pytest.mark.parametrize("view", [STANDALONE, KUBE], ids=["standalone", "kubelet"])
def test_membership_lookup_equals_the_predicates(view):
    table = tc.MembershipTable.build(view)
    for a in GRID:
        assert table.lookup(a) == tc.membership(view, a), a


@pytest.mark.parametrize("view", [STANDALONE, KUBE], ids=["standalone", "kubelet"])
def test_memberships_classify_exactly_like_classify(view):
    """What the kernel computes (LPM -> bits -> classes table) must be classify() for every address pair."""
    table = tc.MembershipTable.build(view)
    classes = tc.class_table(view, table)
    for src, dst in itertools.product(GRID, GRID):
        if src.version != dst.version:
            continue
        want = classify(view, src, dst)
        same = src == dst
        idx = (int(same) << 12) | (table.lookup(src) << 6) | table.lookup(dst)
        value = classes[idx]
        cls, ingress, local = value & 7, (value >> 3) & 1, (value >> 4) & 3
        assert TRAFFIC_CLASSES[cls] == want.traffic_class, (src, dst)
        assert (INGRESS if ingress else EGRESS) == want.direction, (src, dst)
        expected_local = 0 if want.local_ip is None else (tc.LOCAL_SRC if want.local_ip == src else tc.LOCAL_DST)
        assert local == expected_local, (src, dst)


def test_lpm_entries_are_the_view_prefixes_with_their_memberships():
    table = tc.MembershipTable.build(STANDALONE)
    net = ipaddress.ip_network
    assert table.entries[net("10.244.1.0/24")] == tc.M_LOCAL_POD | tc.M_POD
    assert table.entries[net("10.244.1.1/32")] == tc.M_NODE  # the bridge gateway is the node's, no pod
    assert table.entries[net("10.96.0.0/12")] == tc.M_SERVICE
    assert table.entries[net("127.0.0.1/32")] == tc.M_NODE | tc.M_SCOPE | tc.M_LOOPBACK
    assert table.lookup(ip("8.8.8.8")) == 0


def test_representatives_survive_a_view_change():
    """Kernel counters keyed by memberships of an earlier view still get labels."""
    old = tc.MembershipTable.build(STANDALONE)
    new = tc.MembershipTable.build(ClusterView())
    assert (4, tc.M_LOCAL_POD | tc.M_POD) not in new.reps
    new.merge_reps(old)
    att, local_is_src = new.attribution(STANDALONE, 4, tc.M_LOCAL_POD | tc.M_POD, 0, False)
    assert (att.traffic_class, att.direction, local_is_src) == ("pod_to_external", EGRESS, True)


class _LpmKey(ctypes.Structure):
    """struct lpm_key of bpf/tc.c (packed)."""

    _pack_ = 1
    _fields_ = [("prefixlen", ctypes.c_uint32), ("family", ctypes.c_uint8), ("addr", ctypes.c_uint32 * 4)]


class _Lpm:
    Key = _LpmKey


def test_lpm_key_layout():
    Lpm = _Lpm

    k = tc._lpm_key(Lpm, ipaddress.ip_network("10.244.1.0/24"))
    assert (k.prefixlen, k.family) == (8 + 24, 4)
    assert bytes(k)[5:] == bytes([10, 244, 1, 0]) + b"\0" * 12
    k6 = tc._lpm_key(Lpm, ipaddress.ip_network("fd00:10:244:1::/64"))
    assert (k6.prefixlen, k6.family) == (8 + 64, 6)
    assert bytes(k6)[5:] == ipaddress.ip_address("fd00:10:244:1::").packed


# ------------------------------------------------------------------------------------------------------
# Accounting
# ------------------------------------------------------------------------------------------------------


class FakeResolver:
    source = "test"
    unknown_pod = PodRef("", "unknown")

    def __init__(self, pods):
        self.pods = {ip(k): PodRef(*v) for k, v in pods.items()}

    def pod_for_ip(self, addr):
        return self.pods.get(addr, NODE)


def _values(**by_index):
    out = [(0, 0)] * tc.SLOT_VALUES
    for name, v in by_index.items():
        cls, direction = name.rsplit("_", 1)
        out[TRAFFIC_CLASSES.index(cls) * 2 + (direction == "in")] = v
    return out


def test_accounting_names_pods_from_slot_addresses_and_adds_growth():
    acc = tc.TcAccounting(FakeResolver({"10.244.1.2": ("default", "a")}))
    pod_a = [ip("10.244.1.2"), ip("fd00:10:244:1::2")]
    acc.update([(0, 0, [], _values(host_in=(2, 112))),
                (1, 1, pod_a, _values(pod_to_pod_local_out=(10, 600)))])
    acc.update([(0, 0, [], _values(host_in=(2, 112))),
                (1, 1, pod_a, _values(pod_to_pod_local_out=(15, 900), pod_to_pod_remote_in=(1, 60)))])
    packets, nbytes = acc.snapshot()
    assert packets == {("host", "ingress", "", ""): 2,
                       ("pod_to_pod_local", "egress", "default", "a"): 15,
                       ("pod_to_pod_remote", "ingress", "default", "a"): 1}
    assert nbytes[("pod_to_pod_local", "egress", "default", "a")] == 900


def test_accounting_unnamed_pod_and_reused_slot():
    acc = tc.TcAccounting(FakeResolver({}))
    acc.update([(3, 1, [ip("10.244.1.9")], _values(pod_to_external_out=(5, 500)))])
    assert acc.snapshot()[0] == {("pod_to_external", "egress", "", "unknown"): 5}
    acc.forget_slot(3, 1)
    acc.update([(3, 2, [ip("10.244.1.9")], _values(pod_to_external_out=(2, 200)))])  # zeroed, new generation
    assert acc.snapshot()[0] == {("pod_to_external", "egress", "", "unknown"): 7}


def test_transit_labels_and_pod_forgetting():
    assert tc.TcAccounting._transit_labels(0 * 8 + 1) == ("pod_to_pod_local", "veth_to_veth")
    assert tc.TcAccounting._transit_labels(2 * 8 + 5) == ("external_to_pod", "uplink_to_veth")
    assert tc.TcAccounting._transit_labels(1 * 8 + 7) is None  # unknown class
    acc = tc.TcAccounting(FakeResolver({"10.244.1.2": ("default", "a")}))
    acc.update([(1, 1, [ip("10.244.1.2")], _values(pod_to_pod_local_out=(1, 60)))])
    assert acc.forget_pod("default", "a") == 1
    assert acc.snapshot()[0] == {}


# ------------------------------------------------------------------------------------------------------
# Attach manager
# ------------------------------------------------------------------------------------------------------


class FakeAttacher:
    mode = "fake"

    def __init__(self, fail=()):
        self.live: dict[tuple[int, bool], str] = {}
        self.fail = set(fail)
        self.closed = False

    def attach(self, ifindex, ingress, prog_fd, name):
        if ifindex in self.fail:
            raise OSError(19, "No such device")
        self.live[(ifindex, ingress)] = name
        return ifindex * 10 + ingress

    def detach(self, ifindex, ingress, handle, gone=False):
        self.live.pop((ifindex, ingress), None)

    def close(self):
        self.closed = True


def test_manager_follows_links_and_detaches_only_its_own():
    links = list(LAB_NODE)
    plans = []
    att = FakeAttacher(fail={9})
    progs = {ROLE_POD: (1, 2, "nw_tc_pod_in", "nw_tc_pod_out"), ROLE_UPLINK: (3, 4, "nw_tc_up_in", "nw_tc_up_out")}

    def on_plan(plan, ports):
        plans.append((dict(plan), set(att.live)))

    m = TcManager(att, progs, on_plan, discover_fn=lambda: links)
    m.reconcile()
    assert plans[0][1] == set()  # the kernel learns every role before the first attach
    assert att.live[(3, True)] == "nw_tc_pod_in" and att.live[(3, False)] == "nw_tc_pod_out"
    assert att.live[(7, True)] == "nw_tc_up_in"
    assert (2, True) not in att.live and (9, True) not in att.live  # bridge: no program; 9: attach failed
    assert m.counts() == {ROLE_POD: 2, ROLE_UPLINK: 3}
    assert m.errors == 1

    att.fail.clear()
    links = [link for link in links if link.ifindex != 3] + [Link(12, "vethnew", kind="veth", peer_netnsid=5)]
    m.reconcile()
    assert (3, True) not in att.live and att.live[(12, True)] == "nw_tc_pod_in" and (9, True) in att.live
    m.stop()
    assert att.live == {} and att.closed
