"""TCP probe, pure parts: key decoding, kernel facts it reads, accounting and map upkeep (no kernel, no root)."""

from __future__ import annotations

import ctypes
import gzip
import ipaddress
import socket
import struct

import pytest

from netwatchd.classify import ClusterView, parse_cidrs
from netwatchd.export.histogram import DEFAULT_BOUNDS_S
from netwatchd.identity.local import NODE, PodRef
from netwatchd.pipeline import OVERFLOW_POD, socket_labels
from netwatchd.probes.tcp import (
    FALLBACK_HZ,
    KEY_LAYOUT,
    ROLE_CLIENT,
    ROLE_SERVER,
    SockKey,
    TcpAccounting,
    TcpProbe,
    decode_key,
    interval_jiffies,
    kernel_hz,
    tracepoint_fields,
)

NSLOTS = len(DEFAULT_BOUNDS_S) + 1
POD_NETNS, HOST_NETNS = 4026532001, 4026531840
VIEW = ClusterView(node_pod_cidrs=parse_cidrs(["10.244.1.0/24"]), cluster_cidrs=parse_cidrs(["10.244.0.0/16"]),
                   service_cidrs=parse_cidrs(["10.96.0.0/12"]))


class Resolver:
    source = "test"
    unknown_pod = PodRef("", "unknown")

    def pod_for_ip(self, ip):
        return {"10.244.1.5": PodRef("shop", "a")}.get(str(ip), NODE)

    def pod_for_netns(self, netns):
        return {POD_NETNS: PodRef("shop", "a")}.get(netns, NODE)

    def service_for_ip(self, ip):
        return {"10.96.0.10": ("shop", "cart")}.get(str(ip))

    def service_for_nodeport(self, port, proto):
        return None


def raw_key(local: str, remote: str, netns: int = POD_NETNS, role: int = ROLE_CLIENT, v4mapped: bool = False) -> bytes:
    lo, re_ = ipaddress.ip_address(local), ipaddress.ip_address(remote)
    if v4mapped:
        lo, re_ = (ipaddress.IPv6Address(f"::ffff:{a}") for a in (lo, re_))
    fam = lo.version if not v4mapped else 6
    return KEY_LAYOUT.pack(lo.packed.ljust(16, b"\0"), re_.packed.ljust(16, b"\0"), netns, fam, role)


def labels_of(key: SockKey) -> tuple[str, ...]:
    return socket_labels(VIEW, Resolver(), key.netns, key.local, key.remote, HOST_NETNS, client=key.client)


# -- decoding ----------------------------------------------------------------------------------------------


def test_key_layout_is_the_c_struct():
    """struct tcp_key: u8 local[16], u8 remote[16], u32 netns, u8 family, u8 role, u8 pad[2] (40 bytes)."""
    assert KEY_LAYOUT.size == 40


@pytest.mark.parametrize(("local", "remote", "mapped", "want_local", "want_remote"), [
    ("10.244.1.5", "10.96.0.10", False, "10.244.1.5", "10.96.0.10"),
    ("fd00:10:244:1::5", "fd00:10:96::a", False, "fd00:10:244:1::5", "fd00:10:96::a"),
    # a dual-stack socket talking IPv4 reports v4-mapped addresses: pods and services are known by the v4 one
    ("10.244.1.5", "10.244.1.6", True, "10.244.1.5", "10.244.1.6"),
])
def test_decode_key(local, remote, mapped, want_local, want_remote):
    key = decode_key(raw_key(local, remote, role=ROLE_SERVER, v4mapped=mapped))
    assert (str(key.local), str(key.remote), key.netns, key.client) == (want_local, want_remote, POD_NETNS, False)
    assert decode_key(raw_key(local, remote)).client is True


def test_decode_key_refuses_a_bad_family():
    raw = bytearray(raw_key("10.0.0.1", "10.0.0.2"))
    raw[36] = 9
    with pytest.raises(ValueError):
        decode_key(bytes(raw))


# -- kernel facts ------------------------------------------------------------------------------------------


def test_tracepoint_fields_from_the_format_file(tmp_path):
    fmt = tmp_path / "events" / "tcp" / "tcp_retransmit_skb"
    fmt.mkdir(parents=True)
    (fmt / "format").write_text(
        "name: tcp_retransmit_skb\nID: 1\nformat:\n"
        "\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n"
        "\tfield:const void * skaddr;\toffset:16;\tsize:8;\tsigned:0;\n"
        "\tfield:__u8 saddr_v6[16];\toffset:42;\tsize:16;\tsigned:0;\n"
        "\tfield:int err;\toffset:76;\tsize:4;\tsigned:1;\n\nprint fmt: \"...\"\n")
    assert tracepoint_fields(tmp_path, "tcp:tcp_retransmit_skb") == {"common_type", "skaddr", "saddr_v6", "err"}
    assert tracepoint_fields(tmp_path, "tcp:nope") == set()


def test_kernel_hz_from_config_gz_then_boot_config(tmp_path):
    proc, boot = tmp_path / "proc", tmp_path / "boot"
    proc.mkdir()
    boot.mkdir()
    assert kernel_hz(proc, boot, "6.1.0") is None
    (boot / "config-6.1.0").write_text("CONFIG_HZ_300=y\nCONFIG_HZ=300\n")
    assert kernel_hz(proc, boot, "6.1.0") == 300
    (proc / "config.gz").write_bytes(gzip.compress(b"# CONFIG_HZ_1000 is not set\nCONFIG_HZ=250\n"))
    assert kernel_hz(proc, boot, "6.1.0") == 250


def test_interval_jiffies():
    assert interval_jiffies(1.0, 250) == 250
    assert interval_jiffies(0.001, 100) == 1  # never 0 for a positive interval
    assert interval_jiffies(0, 250) == 0  # 0: sample every segment
    assert interval_jiffies(1.0, None) == FALLBACK_HZ  # unknown HZ: the interval may only get longer


# -- accounting --------------------------------------------------------------------------------------------


def hist(*samples_s: float) -> list[int]:
    from netwatchd.export.histogram import slot_of

    slots = [0] * NSLOTS
    for s in samples_s:
        slots[slot_of(s)] += 1
    return slots


def test_connect_to_a_service_vip_is_pod_to_service_with_the_service_named():
    key = decode_key(raw_key("10.244.1.5", "10.96.0.10"))
    assert labels_of(key) == ("pod_to_service", "egress", "shop", "a", "shop", "cart")
    acct = TcpAccounting(labels_of)
    acct.update_counts([(key, (0, 2, 0, 2))])
    acct.update_counts([(key, (1, 3, 0, 4))])
    assert acct.failures == {("pod_to_service", "egress", "shop", "a", "shop", "cart", "refused"): 1,
                        ("pod_to_service", "egress", "shop", "a", "shop", "cart", "timeout"): 3}
    assert acct.retransmits == {("pod_to_service", "egress", "shop", "a", "shop", "cart"): 4}


def test_accepted_socket_is_ingress_of_the_server_pod():
    key = decode_key(raw_key("10.244.1.5", "10.244.2.9", role=ROLE_SERVER))
    assert labels_of(key) == ("pod_to_pod_remote", "ingress", "shop", "a", "", "")


def test_histograms_export_growth_and_survive_recreated_entries():
    key = decode_key(raw_key("10.244.1.5", "10.244.1.6"))
    acct = TcpAccounting(labels_of)
    acct.connect.update([(key, hist(0.010, 0.012), 22_000_000)])
    acct.connect.update([(key, hist(0.010, 0.012, 0.040), 62_000_000)])
    acct.forget_keys("tcp_connect", [key])  # evicted from the kernel map
    acct.connect.update([(key, hist(0.0001), 100_000)])  # re-created from zero
    labels = ("pod_to_pod_local", "egress", "shop", "a", "", "")
    assert acct.connect.buckets[labels] == hist(0.010, 0.012, 0.040, 0.0001)
    assert acct.connect.sums_ns[labels] == 62_100_000
    fams = {f.name: f for f in acct.families()}
    assert set(fams) == {"netwatch_tcp_connect_seconds", "netwatch_tcp_connect_failures", "netwatch_tcp_rtt_seconds",
                         "netwatch_tcp_retransmits"}
    count = [s for s in fams["netwatch_tcp_connect_seconds"].samples if s.name.endswith("_count")]
    assert [s.value for s in count] == [4]


def test_counts_recreated_between_reads_count_the_new_value():
    key = decode_key(raw_key("10.244.1.5", "10.244.1.6"))
    acct = TcpAccounting(labels_of)
    acct.update_counts([(key, (0, 0, 0, 10))])
    acct.update_counts([(key, (0, 0, 0, 3))])  # deleted and re-created since: 3 new
    assert sum(acct.retransmits.values()) == 13


def test_series_budget_folds_new_pods_and_forget_pod_removes_series():
    pods = {POD_NETNS + i: PodRef("shop", f"p{i}") for i in range(3)}

    def label_fn(key: SockKey) -> tuple[str, ...]:
        pod = pods[key.netns]
        return ("pod_to_pod_local", "egress", pod.namespace, pod.pod, "", "")

    acct = TcpAccounting(label_fn, series_limit=2)
    keys = [decode_key(raw_key("10.244.1.5", "10.244.1.6", netns=POD_NETNS + i)) for i in range(3)]
    acct.update_counts([(k, (1, 0, 0, 1)) for k in keys])
    assert sorted(k[3] for k in acct.retransmits) == [OVERFLOW_POD, "p0", "p1"]
    assert acct.folded()["netwatch_tcp_retransmits_total"] == 1
    assert acct.forget_pod("shop", "p0") == 2  # its failures and retransmits series
    assert all(k[3] != "p0" for k in (*acct.failures, *acct.retransmits))


# -- map upkeep (a fake BCC module) -----------------------------------------------------------------------


class Hist(ctypes.Structure):
    _fields_ = [("slots", ctypes.c_uint64 * NSLOTS), ("sum_ns", ctypes.c_uint64)]


class Counts(ctypes.Structure):
    _fields_ = [("failed", ctypes.c_uint64 * 3), ("retransmits", ctypes.c_uint64)]


class Key(ctypes.Structure):
    _fields_ = [("raw", ctypes.c_uint8 * 40)]


class Table(dict):
    """A BCC table stand-in: raw key bytes -> ctypes leaf; items() yields (Key, Leaf) as BCC does."""

    Key = Key

    def __init__(self, leaf=None):
        super().__init__()
        self.Leaf = leaf

    def items(self):
        return [(Key.from_buffer_copy(k), v) for k, v in dict.items(self)]

    def __delitem__(self, key):
        super().__delitem__(bytes(key))


class Overflow:
    class Key(ctypes.c_int):
        pass

    def __init__(self, values):
        self.values = values

    def __getitem__(self, key):
        return ctypes.c_uint64(self.values[key.value])


class FakeBpf(dict):
    def cleanup(self):
        pass


def fake_probe(max_entries: int) -> tuple[TcpProbe, FakeBpf]:
    probe = TcpProbe(max_entries=max_entries, clock=lambda: 0.0)
    bpf = FakeBpf(tcp_connect=Table(Hist), tcp_rtt=Table(Hist), tcp_counts=Table(Counts),
                  tcp_socks=Table(), tcp_overflow=Overflow([0, 0, 7]))
    probe._bpf = bpf
    probe.accounting = TcpAccounting(labels_of)
    return probe, bpf


def put_counts(table: Table, raw: bytes, retransmits: int) -> None:
    table[raw] = Counts((0, 0, 0), retransmits)


def test_refresh_counts_and_evicts_only_idle_keys_when_full():
    probe, bpf = fake_probe(max_entries=4)
    counts = bpf["tcp_counts"]
    keys = [raw_key(f"10.244.1.{i}", "10.244.1.200") for i in range(2, 5)]
    for raw in keys:
        put_counts(counts, raw, 1)
    probe.refresh()  # 3 entries >= 0.75 * 4, but none idle yet (all new)
    assert len(counts) == 3 and probe.stats["tcp_counts"].overflow == 7
    put_counts(counts, keys[0], 5)  # keys[0] grows, the others are idle
    probe.refresh()
    assert set(counts) == {keys[0]}
    assert probe.stats["tcp_counts"].evictions == 2
    put_counts(counts, keys[1], 2)  # an evicted key comes back from zero
    probe.refresh()
    assert sum(probe.accounting.retransmits.values()) == 5 + 1 + 1 + 2
    assert probe.map_stats()["tcp_socks"].capacity == probe.socket_entries


def test_hooks_are_raw_tracepoints_only():
    # raw: a classic tracepoint fills its whole record on every received segment (tcp_probe) before we run
    assert {h.kind for h in TcpProbe.hooks} == {"raw_tracepoint"}
    assert "tcp:tcp_send_reset" not in {h.target for h in TcpProbe.hooks}  # enum sk_rst_reason: not in 6.1 headers


def test_addresses_in_keys_are_network_order():
    raw = raw_key("10.244.1.5", "10.96.0.10")
    assert raw[:4] == socket.inet_aton("10.244.1.5") and struct.unpack_from("=I", raw, 32)[0] == POD_NETNS
