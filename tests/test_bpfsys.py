"""The daemon's own BPF layer (no bcc in the daemon): the compiler child, attaching by fd, and map I/O.

- ctypes layouts described by the compiler child rebuild to types with BCC's sizes and field offsets;
- a classic tracepoint and a raw tracepoint program with plain names, attached by fd, count the same real
  drops exactly once each; detach is idempotent and stops counting; cleanup unloads everything;
- compile and verifier errors come back as CompileError with the compiler's / verifier's output;
- batched reads in chunks smaller than the map return every entry exactly once (hash, LRU, per-CPU, array),
  maps without batch ops fall back to key iteration (LPM trie), batched deletes skip missing keys.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import time
from pathlib import Path

import pytest

from netwatchd.kernel import bpfsys, ctlayout, maps
from netwatchd.kernel.btf import Btf
from netwatchd.lab.traffic import ping, send_udp
from netwatchd.probes import loader
from netwatchd.probes.module import ProgramSpec
from tests.support import bpf_programs

pytestmark = pytest.mark.kernel

TESTS_BPF = Path(__file__).resolve().parent / "bpf"
TRACEFS = Path("/sys/kernel/tracing")


@pytest.fixture(scope="module")
def btf() -> Btf:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    return Btf.load()


def _format_offset(event: str, field: str) -> int:
    text = (TRACEFS / "events" / event / "format").read_text()
    m = re.search(rf"field:[^;]*\b{field};\s*offset:(\d+);", text)
    assert m, f"{field} not in {event}'s format"
    return int(m.group(1))


def _open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


# ------------------------------------------------------------------------------------------------------
# Layouts: the child's description of real BCC maps rebuilds to the same ctypes layout
# ------------------------------------------------------------------------------------------------------


def test_layouts_of_bcc_compiled_maps_rebuild_identically(btf: Btf) -> None:
    from bcc import BPF  # this test compares against BCC itself, in the test process

    source = TESTS_BPF / "layouts.c"
    cflags = loader.build_cflags(btf)
    ref = BPF(src_file=str(source).encode(), cflags=cflags)
    module = loader.load(str(source), cflags, [ProgramSpec("use_them", "tracepoint", "skb:kfree_skb")])
    try:
        assert set(module.maps) == {"mix", "per_cpu", "prefixes", "events"}
        for name in ("mix", "per_cpu", "prefixes"):
            table = ref[name.encode()]
            bcc_key, bcc_leaf = table.Key, getattr(table, "sLeaf", table.Leaf)
            ours = module[name]
            for bcc_t, our_t, size in ((bcc_key, ours.Key, ours.key_size), (bcc_leaf, ours.Leaf, ours.value_size)):
                # through JSON, as it crosses the socket, and as the daemon actually got it
                rebuilt = ctlayout.build(json.loads(json.dumps(ctlayout.with_tail(ctlayout.describe(bcc_t), size))))
                assert ctypes.sizeof(rebuilt) == ctypes.sizeof(our_t) == size, name  # the kernel's size
                bcc_offsets = ctlayout.offsets(bcc_t)
                del bcc_offsets["."]  # BCC's own size may lack the tail padding after trailing bitfields
                ours_offsets = ctlayout.offsets(our_t)
                assert ctlayout.offsets(rebuilt) == ours_offsets, name
                assert {p: ours_offsets[p] for p in bcc_offsets} == bcc_offsets, name
        # the pieces the layouts were made to cover are there, where BCC put them
        mix = module["mix"]
        assert mix.Key.addr.offset == ref[b"mix"].Key.addr.offset and mix.Key.flags.size == ref[b"mix"].Key.flags.size
        assert ctypes.sizeof(ref[b"mix"].Key) == 68 and mix.key_size == 72  # BCC's own type lacks the tail
        assert ctypes.sizeof(mix.Leaf) == 11  # packed: 1 + 8 + 2
        k = mix.Key()
        k.kind, k.rest = 17, 12345
        assert (k.kind, k.rest) == (17, 12345)
        assert module["per_cpu"].percpu and module["per_cpu"].Leaf().hi == 0
        ev = module["events"].event_type
        assert [f[0] for f in ev._fields_] == ["ts", "pid", "comm"]
    finally:
        module.cleanup()
        ref.cleanup()


def test_a_map_bcc_describes_wrongly_is_refused(btf: Btf) -> None:
    fds_before = _open_fds()
    with pytest.raises(ValueError, match=r"key type is \d+ bytes, the kernel says \d+"):
        loader.load(str(TESTS_BPF / "misdescribed.c"), loader.build_cflags(btf), [])
    assert _open_fds() == fds_before


def test_drops_map_layout_matches_bcc(btf: Btf) -> None:
    """The real drops.c key (addresses, conntrack fields, padding) through the child, compared with BCC."""
    from bcc import BPF

    defines = {"DROPS_MAX_ENTRIES": 64, "REASON_CONSUMED": -1, "MAX_REASONS": 256}
    cflags = loader.build_cflags(btf, defines)
    source = loader.bpf_source_dir() / "drops.c"
    ref = BPF(src_file=str(source).encode(), cflags=cflags)
    module = loader.load(str(source), cflags, [])
    try:
        for name in ("drops", "tail_state", "drops_overflow"):
            table = ref[name.encode()]
            for bcc_t, our_t in ((table.Key, module[name].Key), (table.Leaf, module[name].Leaf)):
                assert ctlayout.offsets(our_t) == ctlayout.offsets(bcc_t), name
        assert module["drop_tail"].event_type is not None
    finally:
        module.cleanup()
        ref.cleanup()


# ------------------------------------------------------------------------------------------------------
# Attaching by fd: tracepoint and raw tracepoint, real drops
# ------------------------------------------------------------------------------------------------------


def test_tracepoint_and_raw_tracepoint_count_the_same_real_drops(lab, btf: Btf) -> None:
    node = lab.add_node("n1")
    a, c = node.add_pod("a"), node.add_pod("c")
    assert ping(a, c.ip) == 1  # neighbours resolved: every datagram below reaches c
    defines = {
        "TARGET_NETNS": c.netns_inode(),
        "REASON_NO_SOCKET": btf.enum_values("skb_drop_reason")["SKB_DROP_REASON_NO_SOCKET"],
        "TP_SKBADDR_OFF": _format_offset("skb/kfree_skb", "skbaddr"),
        "TP_REASON_OFF": _format_offset("skb/kfree_skb", "reason"),
    }
    fds_before = _open_fds()
    module = loader.load(str(TESTS_BPF / "attach_test.c"), loader.build_cflags(btf, defines), [
        ProgramSpec("count_tp", "tracepoint", "skb:kfree_skb"),
        ProgramSpec("count_raw", "raw_tracepoint", "kfree_skb"),
    ])
    prog_ids = set()
    try:
        for fd in module.program_fds().values():
            prog_ids.add(int(re.search(r"prog_id:\s*(\d+)", Path(f"/proc/self/fdinfo/{fd}").read_text()).group(1)))
        module.attach(TRACEFS)
        assert sorted(module.attached) == ["count_raw", "count_tp"]
        counts = module["counts"]
        send_udp(a, c.ip, 6100, 25)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and [counts[i].value for i in range(2)] != [25, 25]:
            time.sleep(0.1)
        time.sleep(0.5)
        assert [counts[i].value for i in range(2)] == [25, 25]  # each drop once per program: no double attach
        lengths = module["by_len"].items()
        assert sum(v.value for _k, v in lengths) == 25 and all(k.value > 32 for k, _v in lengths)
        module.detach()
        module.detach()  # idempotent
        assert module.attached == []
        send_udp(a, c.ip, 6100, 10)
        time.sleep(1.0)
        assert [counts[i].value for i in range(2)] == [25, 25]  # detached: nothing counts any more
    finally:
        module.cleanup()
        module.cleanup()
    assert _open_fds() == fds_before  # every map, program and attachment fd closed
    deadline = time.monotonic() + 10  # program frees are RCU-deferred
    while time.monotonic() < deadline and prog_ids & set(bpf_programs()):
        time.sleep(0.2)
    assert not prog_ids & set(bpf_programs())


def test_compile_and_verifier_errors_come_back_with_their_log(btf: Btf) -> None:
    fds_before = _open_fds()
    with pytest.raises(loader.CompileError) as err:
        loader.load(str(TESTS_BPF / "broken.c"), loader.build_cflags(btf),
                    [ProgramSpec("does_not_compile", "tracepoint", "skb:kfree_skb")])
    assert "undeclared_thing" in err.value.log
    with pytest.raises(loader.CompileError) as err:
        loader.load(str(TESTS_BPF / "rejected.c"), loader.build_cflags(btf),
                    [ProgramSpec("rejected", "raw_tracepoint", "kfree_skb")])
    assert "rejected" in str(err.value) and "\n" not in str(err.value)
    assert "invalid bpf_context access" in err.value.log, err.value.log[-2000:]
    assert _open_fds() == fds_before
    with pytest.raises(ValueError, match="unknown kind"):
        loader.load(str(TESTS_BPF / "rejected.c"), [], [ProgramSpec("rejected", "kprobe", "x")])


# ------------------------------------------------------------------------------------------------------
# Map I/O: chunked batch reads, per-CPU values, fallbacks, batched deletes
# ------------------------------------------------------------------------------------------------------


class _CreateOpts(ctypes.Structure):
    """libbpf 1.1's struct bpf_map_create_opts."""

    _fields_ = [("sz", ctypes.c_size_t), ("btf_fd", ctypes.c_uint32), ("btf_key_type_id", ctypes.c_uint32),
                ("btf_value_type_id", ctypes.c_uint32), ("btf_vmlinux_value_type_id", ctypes.c_uint32),
                ("inner_map_fd", ctypes.c_uint32), ("map_flags", ctypes.c_uint32), ("map_extra", ctypes.c_uint64),
                ("numa_node", ctypes.c_uint32), ("map_ifindex", ctypes.c_uint32)]


def _create_map(map_type: int, key_size: int, value_size: int, max_entries: int, flags: int = 0) -> int:
    lb = bpfsys.lib()
    lb.bpf_map_create.restype = ctypes.c_int
    lb.bpf_map_create.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32, ctypes.c_uint32,
                                  ctypes.c_uint32, ctypes.c_void_p]
    opts = _CreateOpts(sz=ctypes.sizeof(_CreateOpts), map_flags=flags)
    fd = lb.bpf_map_create(map_type, b"nwtest", key_size, value_size, max_entries, ctypes.addressof(opts))
    assert fd >= 0, os.strerror(-fd)
    return fd


class Key(ctypes.Structure):
    _fields_ = [("a", ctypes.c_uint32), ("b", ctypes.c_uint64)]  # 16 bytes with padding


class Val(ctypes.Structure):
    _fields_ = [("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64)]


@pytest.mark.parametrize("map_type", [bpfsys.MAP_HASH, bpfsys.MAP_LRU_HASH])
def test_chunked_batch_read_returns_every_entry_once(map_type: int, monkeypatch) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    n = 5000
    fd = _create_map(map_type, ctypes.sizeof(Key), ctypes.sizeof(Val), 8192)
    m = maps.map_for("t", fd, Key, Val)
    try:
        for i in range(n):
            m[Key(i, i * 7)] = Val(i, i * 60)
        # the raw call, in chunks of 64 (the resume token is what the kernel returned, not a count)
        keys, values, count = bpfsys.lookup_batch(fd, ctypes.sizeof(Key), ctypes.sizeof(Val), chunk=64)
        assert count == n == len(keys) // ctypes.sizeof(Key)
        got = {(k.a, k.b): (v.packets, v.bytes) for k, v in (
            (Key.from_buffer_copy(keys, i * 16), Val.from_buffer_copy(values, i * 16)) for i in range(count))}
        assert got == {(i, i * 7): (i, i * 60) for i in range(n)}
        # through the Map wrapper with small chunks: same entries
        monkeypatch.setattr(maps, "BATCH_CHUNK", 100)
        items = m.items()
        assert len(items) == n and sorted(v.packets for _k, v in items) == list(range(n))
        assert len(m) == n and m[Key(42, 294)].bytes == 42 * 60
        # batched delete, with keys that are not there among them
        gone = [bytes(Key(i, i * 7)) for i in range(0, n, 2)] + [bytes(Key(10**6, 1))]
        assert m.delete_many(gone[:10] + gone[-1:] + gone[10:]) == n // 2
        assert len(m) == n // 2 and m.get(Key(0, 0)) is None and m[Key(1, 7)].packets == 1
        with pytest.raises(KeyError):
            del m[Key(0, 0)]
    finally:
        os.close(fd)


def test_per_cpu_and_array_maps(monkeypatch) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    ncpu = bpfsys.possible_cpus()
    monkeypatch.setattr(maps, "BATCH_CHUNK", 3)
    # per-CPU hash with a 12-byte value: each CPU's slot is rounded up to 16 bytes
    class V12(ctypes.Structure):
        _fields_ = [("x", ctypes.c_uint32), ("y", ctypes.c_uint64)]
        _pack_ = 4

    assert ctypes.sizeof(V12) == 12
    fd = _create_map(bpfsys.MAP_PERCPU_HASH, 4, 12, 64)
    m = maps.map_for("pc", fd, ctypes.c_uint32, V12)
    try:
        assert m.percpu and m.stride == 16
        for k in range(10):
            m[ctypes.c_uint32(k)] = [V12(k, cpu * 100 + k) for cpu in range(ncpu)]
        items = m.items()
        assert len(items) == 10
        for k, per_cpu in items:
            assert [v.y for v in per_cpu] == [cpu * 100 + k.value for cpu in range(ncpu)]
        m.clearitem(ctypes.c_uint32(3))
        assert [v.y for v in m[ctypes.c_uint32(3)]] == [0] * ncpu
    finally:
        os.close(fd)
    # per-CPU array: int keys, every index present; batch in chunks of 3 over 7 entries
    fd = _create_map(bpfsys.MAP_PERCPU_ARRAY, 4, 8, 7)
    m = maps.map_for("pa", fd, ctypes.c_uint32, ctypes.c_uint64)
    try:
        m[5] = [ctypes.c_uint64(cpu + 1) for cpu in range(ncpu)]
        assert len(m) == 7 and sum(v.value for v in m[5]) == sum(range(1, ncpu + 1))
        items = m.items()
        assert [k.value for k, _v in items] == list(range(7))
        del m[5]  # arrays: zeroed, like BCC
        assert all(v.value == 0 for v in m[5])
        with pytest.raises(IndexError):
            m[7]
    finally:
        os.close(fd)


def test_batched_update_of_an_array() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    fd = _create_map(bpfsys.MAP_ARRAY, 4, 1, 8192)
    m = maps.map_for("classes", fd, ctypes.c_int, ctypes.c_ubyte)
    try:
        m.update_many([(i, ctypes.c_ubyte(i % 7)) for i in range(len(m))])
        assert [v.value for _k, v in m.items()] == [i % 7 for i in range(8192)]
    finally:
        os.close(fd)


def test_lpm_trie_falls_back_to_key_iteration() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")

    class LpmKey(ctypes.Structure):
        _fields_ = [("prefixlen", ctypes.c_uint32), ("addr", ctypes.c_uint8 * 4)]

    fd = _create_map(bpfsys.MAP_LPM_TRIE, 8, 1, 16, flags=1)  # BPF_F_NO_PREALLOC, required for LPM tries
    m = maps.map_for("lpm", fd, LpmKey, ctypes.c_uint8)
    try:
        for plen, last, bits in ((24, 0, 1), (32, 7, 2), (16, 0, 4)):
            k = LpmKey(plen)
            k.addr[:] = [10, 244, 1 if plen > 16 else 0, last]
            m[k] = ctypes.c_uint8(bits)
        probe = LpmKey(32)
        probe.addr[:] = [10, 244, 1, 9]
        assert m[probe].value == 1  # longest prefix: the /24
        assert sorted(v.value for _k, v in m.items()) == [1, 2, 4] and len(m) == 3
    finally:
        os.close(fd)
