"""Tests for netwatchd.kernel.btf.

Two halves:
* synthetic BTF blobs built here byte by byte, so the parser is exercised without a kernel
  (every BTF kind, anonymous unions, both bitfield encodings, both byte orders, malformed input);
* the running kernel's /sys/kernel/btf/vmlinux, checked against an independent decoder
  (`bpftool btf dump ... format raw`) and against the kfree_skb tracepoint's drop-reason symbols.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from netwatchd.kernel.btf import Btf, BtfError

VMLINUX = Path("/sys/kernel/btf/vmlinux")

# ---------------------------------------------------------------------------------------------------
# Synthetic BTF builder
# ---------------------------------------------------------------------------------------------------

K_INT, K_PTR, K_ARRAY, K_STRUCT, K_UNION, K_ENUM, K_FWD, K_TYPEDEF = 1, 2, 3, 4, 5, 6, 7, 8
K_VOLATILE, K_CONST, K_RESTRICT, K_FUNC, K_FUNC_PROTO, K_VAR, K_DATASEC = 9, 10, 11, 12, 13, 14, 15
K_FLOAT, K_DECL_TAG, K_TYPE_TAG, K_ENUM64 = 16, 17, 18, 19


@dataclass
class BtfBuilder:
    """Assembles a BTF blob: each add_* call appends one type and returns its id (ids start at 1)."""

    order: str = "<"
    _types: list[bytes] = field(default_factory=list)
    _strings: bytearray = field(default_factory=lambda: bytearray(b"\0"))

    def _str(self, s: str) -> int:
        if not s:
            return 0
        off = len(self._strings)
        self._strings += s.encode() + b"\0"
        return off

    def _add(
        self, name: str, kind: int, vlen: int, size_or_type: int, extra: list[int], kflag: int = 0
    ) -> int:
        info = (kflag << 31) | (kind << 24) | vlen
        words = [self._str(name), info, size_or_type, *extra]
        self._types.append(struct.pack(f"{self.order}{len(words)}I", *words))
        return len(self._types)

    def int_(
        self, name: str, size: int, bits: int | None = None, bit_off: int = 0, signed: bool = True
    ) -> int:
        enc = (1 if signed else 0) << 24 | bit_off << 16 | (size * 8 if bits is None else bits)
        return self._add(name, K_INT, 0, size, [enc])

    def ptr(self, target: int) -> int:
        return self._add("", K_PTR, 0, target, [])

    def array(self, elem: int, index: int, n: int) -> int:
        return self._add("", K_ARRAY, 0, 0, [elem, index, n])

    def aggregate(self, kind: int, name: str, size: int, members: list[tuple[str, int, int, int]]) -> int:
        """members: (name, type_id, bit_offset, bitfield_size); any bitfield_size switches on kind_flag."""
        kflag = int(any(m[3] for m in members))
        extra: list[int] = []
        for mname, mtype, bit_off, bf in members:
            extra += [self._str(mname), mtype, (bf << 24 | bit_off) if kflag else bit_off]
        return self._add(name, kind, len(members), size, extra, kflag)

    def struct(self, name: str, size: int, members: list[tuple[str, int, int, int]]) -> int:
        return self.aggregate(K_STRUCT, name, size, members)

    def union(self, name: str, size: int, members: list[tuple[str, int, int, int]]) -> int:
        return self.aggregate(K_UNION, name, size, members)

    def enum(self, name: str, size: int, values: dict[str, int], signed: bool = False) -> int:
        extra: list[int] = []
        for n, v in values.items():
            extra += [self._str(n), v & 0xFFFFFFFF]
        return self._add(name, K_ENUM, len(values), size, extra, int(signed))

    def enum64(self, name: str, values: dict[str, int], signed: bool = False) -> int:
        extra: list[int] = []
        for n, v in values.items():
            v &= (1 << 64) - 1
            extra += [self._str(n), v & 0xFFFFFFFF, v >> 32]
        return self._add(name, K_ENUM64, len(values), 8, extra, int(signed))

    def simple(
        self, kind: int, name: str, size_or_type: int, extra: list[int] | None = None, vlen: int = 0
    ) -> int:
        return self._add(name, kind, vlen, size_or_type, extra or [])

    def blob(self) -> bytes:
        types = b"".join(self._types)
        strings = bytes(self._strings)
        # Header: magic, version, flags, hdr_len, type_off, type_len, str_off, str_len.
        header = struct.pack(
            f"{self.order}HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings)
        )
        return header + types + strings


def build_sample(order: str = "<") -> bytes:
    """A small type graph with one of every kind placed *before* the structs under test, so a wrong
    record length for any kind would shift every later type id and break the lookups."""
    b = BtfBuilder(order=order)
    t_int = b.int_("int", 4)  # 1
    t_u8 = b.int_("unsigned char", 1, signed=False)  # 2
    t_long = b.int_("long int", 8)  # 3
    t_u16 = b.int_("short unsigned int", 2, signed=False)  # 4
    t_ptr = b.ptr(t_u8)  # 5
    t_arr = b.array(t_u8, t_int, 16)  # 6: unsigned char[16]
    # Kinds with trailing data that the parser must skip correctly.
    t_proto = b.simple(K_FUNC_PROTO, "", t_int, [b._str("a"), t_int, 0, t_long], vlen=2)  # 7
    b.simple(K_FUNC, "do_thing", t_proto)  # 8
    t_var = b.simple(K_VAR, "some_var", t_int, [1])  # 9
    b.simple(K_DATASEC, ".data", 4, [t_var, 0, 4], vlen=1)  # 10
    b.simple(K_FLOAT, "double", 8)  # 11
    b.simple(K_DECL_TAG, "bpf_kfunc", 8, [0xFFFFFFFF])  # 12
    t_tag = b.simple(K_TYPE_TAG, "address_space(1)", t_u8)  # 13
    b.simple(K_RESTRICT, "", t_ptr)  # 14
    b.simple(K_FWD, "opaque", 0)  # 15: forward declaration only
    b.simple(K_FWD, "inner", 0)  # 16: forward decl that precedes the full definition
    b.enum("color", 4, {"RED": 0, "GREEN": 1, "BLUE": 0xFFFFFFFF})  # 17 unsigned
    b.enum("sign", 4, {"NEG": -2, "POS": 3}, signed=True)  # 18 signed
    b.enum64("big", {"HUGE": 1 << 40, "TOP": (1 << 64) - 1})  # 19 unsigned 64-bit
    b.enum64("sbig", {"MINUS": -(1 << 40)}, signed=True)  # 20

    # struct inner { int a; short unsigned b; }  (named, reached through dotted paths)
    t_inner = b.struct("inner", 8, [("a", t_int, 0, 0), ("b", t_u16, 32, 0)])  # 21
    t_inner_td = b.simple(K_TYPEDEF, "inner_t", t_inner)  # 22
    t_inner_c = b.simple(K_CONST, "", t_inner_td)  # 23: const inner_t
    t_inner_v = b.simple(K_VOLATILE, "", t_inner_c)  # 24: volatile const inner_t
    # Anonymous struct nested in an anonymous union: union { long whole; struct { u16 lo; u16 hi; }; }
    t_anon_s = b.struct("", 4, [("lo", t_u16, 0, 0), ("hi", t_u16, 16, 0)])  # 25
    t_anon_u = b.union("", 8, [("whole", t_long, 0, 0), ("", t_anon_s, 0, 0)])  # 26
    # An empty duplicate of "outer" before the real one: the one with members must win.
    b.struct("outer", 0, [])  # 27
    # struct outer (kind_flag=1 because of the bitfields):
    #   unsigned char *p @0; union {...} @8; u8 flags:3 @16.0; u8 mode:5 @16.3; u8 byte @17;
    #   volatile const inner_t in @20; unsigned char name[16] @28; u8 tagged @44; u8 odd @45.4(bits 8)
    t_outer = b.struct(  # 28
        "outer",
        48,
        [
            ("p", t_ptr, 0, 0),
            ("", t_anon_u, 64, 0),
            ("flags", t_u8, 128, 3),
            ("mode", t_u8, 131, 5),
            ("byte", t_u8, 136, 0),
            ("in", t_inner_v, 160, 0),
            ("name", t_arr, 224, 0),
            ("tagged", t_tag, 352, 0),
            ("odd", t_u8, 364, 8),
        ],
    )
    # Old-style (kind_flag=0) bitfield: the width lives in the member's INT type encoding.
    t_bits3 = b.int_("unsigned int", 4, bits=3, signed=False)  # 29
    b.struct("legacy", 8, [("x", t_bits3, 0, 0), ("y", t_int, 32, 0)])  # 30
    # A later duplicate full definition of "inner" with a different layout must NOT override the first.
    b.struct("inner", 16, [("a", t_long, 64, 0)])  # 31
    b.union("number", 8, [("i", t_int, 0, 0), ("l", t_long, 0, 0)])  # 32
    b.simple(K_TYPEDEF, "outer_t", t_outer)  # 33
    b.simple(K_TYPEDEF, "color_t", 17)  # 34
    return b.blob()


@pytest.fixture(scope="module")
def sample() -> Btf:
    return Btf.from_bytes(build_sample())


def test_synthetic_every_kind_is_skipped_correctly(sample: Btf) -> None:
    assert sample.type_count == 34
    assert sample.struct_size("outer") == 48  # the member-less duplicate (id 27) lost
    assert sample.struct_size("inner") == 8  # first full definition wins over the later one
    assert sample.struct_size("number") == 8  # unions are found too
    assert sample.struct_size("outer_t") == 48  # typedef of a struct


def test_synthetic_offsets_and_sizes(sample: Btf) -> None:
    assert (sample.member_offset("outer", "p"), sample.member_size("outer", "p")) == (0, 8)
    # Members of the anonymous union and of the anonymous struct inside it are found transparently.
    assert (sample.member_offset("outer", "whole"), sample.member_size("outer", "whole")) == (8, 8)
    assert (sample.member_offset("outer", "lo"), sample.member_size("outer", "lo")) == (8, 2)
    assert (sample.member_offset("outer", "hi"), sample.member_size("outer", "hi")) == (10, 2)
    # kind_flag=1 struct: a plain member after bitfields still decodes its 24-bit offset correctly.
    assert sample.member_offset("outer", "byte") == 17
    # Dotted path through volatile/const/typedef into a named struct.
    assert sample.member_offset("outer", "in") == 20
    assert sample.member_size("outer", "in") == 8
    assert sample.member_offset("outer", "in.b") == 24
    assert sample.member_size("outer", "in.b") == 2
    assert sample.member_size("outer", "name") == 16
    assert sample.member_size("outer", "tagged") == 1  # TYPE_TAG is resolved like a modifier
    assert sample.member_offset("legacy", "y") == 4


@pytest.mark.parametrize(
    ("struct_name", "path", "needle"),
    [
        ("outer", "flags", "bitfield"),
        ("outer", "mode", "bitfield"),
        ("outer", "odd", "bitfield"),
        ("legacy", "x", "bitfield"),  # kind_flag=0: width from the INT encoding
    ],
)
def test_synthetic_bitfields_raise(sample: Btf, struct_name: str, path: str, needle: str) -> None:
    with pytest.raises(BtfError, match=needle):
        sample.member_offset(struct_name, path)
    with pytest.raises(BtfError, match=needle):
        sample.member_size(struct_name, path)


def test_synthetic_errors_name_struct_and_member(sample: Btf) -> None:
    with pytest.raises(BtfError, match=r"no struct or union named 'nope'"):
        sample.struct_size("nope")
    with pytest.raises(BtfError, match=r"no struct or union named 'nope'"):
        sample.member_offset("nope", "x")
    with pytest.raises(BtfError, match=r"'opaque' is only forward-declared"):
        sample.struct_size("opaque")
    with pytest.raises(BtfError, match=r"struct 'outer' has no member 'missing'"):
        sample.member_offset("outer", "missing")
    with pytest.raises(BtfError, match=r"struct 'outer' has no member 'in\.zz'.*'zz' not found.*inner"):
        sample.member_offset("outer", "in.zz")
    # Pointers are not followed by dotted paths.
    with pytest.raises(BtfError, match=r"cannot descend into outer\.p"):
        sample.member_offset("outer", "p.x")
    with pytest.raises(BtfError, match=r"no enum named 'nope'"):
        sample.enum_values("nope")


def test_synthetic_enums(sample: Btf) -> None:
    assert sample.enum_values("color") == {"RED": 0, "GREEN": 1, "BLUE": 0xFFFFFFFF}
    assert sample.enum_values("color_t") == sample.enum_values("color")
    assert sample.enum_values("sign") == {"NEG": -2, "POS": 3}
    assert sample.enum_values("big") == {"HUGE": 1 << 40, "TOP": (1 << 64) - 1}
    assert sample.enum_values("sbig") == {"MINUS": -(1 << 40)}


def test_synthetic_cflags(sample: Btf) -> None:
    flags = sample.offsets_as_cflags({"OUTER_HI": ("outer", "hi"), "OUTER_IN_B": ("outer", "in.b")})
    assert flags == ["-DOUTER_HI=10", "-DOUTER_IN_B=24"]
    with pytest.raises(BtfError, match="not a valid C macro name"):
        sample.offsets_as_cflags({"1BAD": ("outer", "hi")})
    with pytest.raises(BtfError, match="missing"):
        sample.offsets_as_cflags({"X": ("outer", "missing")})


def test_synthetic_big_endian_blob() -> None:
    btf = Btf.from_bytes(build_sample(order=">"))
    assert btf.member_offset("outer", "hi") == 10
    assert btf.member_offset("outer", "in.b") == 24
    assert btf.enum_values("sign") == {"NEG": -2, "POS": 3}


def test_synthetic_malformed() -> None:
    good = build_sample()
    with pytest.raises(BtfError, match="magic"):
        Btf.from_bytes(b"\0\0" + good[2:])
    with pytest.raises(BtfError, match="too short"):
        Btf.from_bytes(good[:10])
    with pytest.raises(BtfError, match="beyond the end"):
        Btf.from_bytes(good[:-5])
    # A type record with kind 31 cannot be skipped: parsing must stop with a clear error.
    b = BtfBuilder()
    b.int_("int", 4)
    b.simple(31, "", 0)
    with pytest.raises(BtfError, match="unknown BTF kind 31 at type id 2"):
        Btf.from_bytes(b.blob())
    # A struct whose vlen claims more members than the section holds.
    b = BtfBuilder()
    b._add("s", K_STRUCT, 5, 4, [])
    with pytest.raises(BtfError, match="runs past the end"):
        Btf.from_bytes(b.blob())


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BtfError, match="cannot read BTF"):
        Btf.load(tmp_path / "absent")
    path = tmp_path / "vmlinux"
    path.write_bytes(build_sample())
    assert Btf.load(path).member_offset("outer", "lo") == 8


# ---------------------------------------------------------------------------------------------------
# Running kernel, checked against bpftool's decoding of the same BTF
# ---------------------------------------------------------------------------------------------------

needs_vmlinux = pytest.mark.skipif(not VMLINUX.is_file(), reason="kernel has no /sys/kernel/btf/vmlinux")

_TYPE_LINE = re.compile(r"^\[(\d+)\] (\w+) '([^']*)'(.*)$")
_MEMBER_LINE = re.compile(r"^\t'([^']*)' type_id=(\d+) bits_offset=(\d+)(?: bitfield_size=(\d+))?$")
_ATTR = re.compile(r"(\w+)=(\S+)")


@dataclass
class RawType:
    kind: str
    name: str
    attrs: dict[str, str]
    members: list[tuple[str, int, int, int]] = field(default_factory=list)  # name, type, bits, bitfield


class RawBtf:
    """Ground truth decoded from `bpftool btf dump file ... format raw` (an independent BTF parser)."""

    def __init__(self, text: str) -> None:
        self.types: dict[int, RawType] = {}
        self.by_name: dict[str, int] = {}
        current: RawType | None = None
        for line in text.splitlines():
            if m := _TYPE_LINE.match(line):
                tid, kind, name, rest = int(m[1]), m[2], m[3], m[4]
                current = RawType(kind, name, dict(_ATTR.findall(rest)))
                self.types[tid] = current
                if kind in ("STRUCT", "UNION") and name != "(anon)":
                    prev = self.by_name.get(name)
                    if prev is None or (
                        int(current.attrs["vlen"]) and not int(self.types[prev].attrs["vlen"])
                    ):
                        self.by_name[name] = tid
            elif (
                current is not None
                and current.kind in ("STRUCT", "UNION")
                and (m := _MEMBER_LINE.match(line))
            ):
                current.members.append((m[1], int(m[2]), int(m[3]), int(m[4] or 0)))

    def strip(self, tid: int) -> int:
        while tid and self.types[tid].kind in ("TYPEDEF", "CONST", "VOLATILE", "RESTRICT", "TYPE_TAG"):
            tid = int(self.types[tid].attrs["type_id"])
        return tid

    def size(self, tid: int) -> int:
        t = self.types[self.strip(tid)]
        if t.kind == "PTR":
            return 8
        if t.kind == "ARRAY":
            return int(t.attrs["nr_elems"]) * self.size(int(t.attrs["type_id"]))
        return int(t.attrs["size"])

    def _find(self, tid: int, name: str, base: int) -> tuple[int, int, int] | None:
        for mname, mtype, bits, bf in self.types[tid].members:
            if mname == name:
                return base + bits, mtype, bf
            if mname == "(anon)":
                inner = self.strip(mtype)
                if self.types[inner].kind in ("STRUCT", "UNION"):
                    found = self._find(inner, name, base + bits)
                    if found:
                        return found
        return None

    def member(self, struct_name: str, path: str) -> tuple[int, int, int]:
        """(bit offset, type id, bitfield size) of a dotted member path."""
        tid, bits, found = self.by_name[struct_name], 0, None
        for part in path.split("."):
            if found is not None:
                tid = self.strip(found[1])
            found = self._find(tid, part, bits)
            assert found is not None, f"ground truth: {struct_name}.{path} not found"
            bits = found[0]
        assert found is not None
        return found


@pytest.fixture(scope="module")
def kbtf() -> Btf:
    if not VMLINUX.is_file():
        pytest.skip("kernel has no /sys/kernel/btf/vmlinux")
    return Btf.load(VMLINUX)


@pytest.fixture(scope="module")
def raw() -> RawBtf:
    bpftool = shutil.which("bpftool") or next(
        (p for p in ("/usr/sbin/bpftool", "/sbin/bpftool") if os.access(p, os.X_OK)), None
    )
    if bpftool is None or not VMLINUX.is_file():
        pytest.skip("bpftool or /sys/kernel/btf/vmlinux not available")
    out = subprocess.run(
        [bpftool, "btf", "dump", "file", str(VMLINUX), "format", "raw"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    return RawBtf(out)


KERNEL_MEMBERS = [
    ("sk_buff", "head"),
    ("sk_buff", "data"),
    ("sk_buff", "network_header"),
    ("sk_buff", "transport_header"),
    ("sk_buff", "mac_header"),
    ("sk_buff", "dev"),
    ("sk_buff", "len"),
    ("sk_buff", "protocol"),
    ("sk_buff", "sk"),
    ("sock_common", "skc_family"),
    ("sock_common", "skc_daddr"),
    ("sock_common", "skc_rcv_saddr"),
    ("sock_common", "skc_dport"),
    ("sock_common", "skc_num"),
    ("sock_common", "skc_net"),
    ("sock_common", "skc_v6_daddr"),
    ("sock", "__sk_common"),
    ("sock", "__sk_common.skc_net"),
    ("sock", "__sk_common.skc_family"),
    ("sock", "sk_protocol"),
    ("net_device", "ifindex"),
    ("net_device", "nd_net"),
    ("net_device", "name"),
    ("net", "ns.inum"),
]


@needs_vmlinux
def test_kernel_load_time() -> None:
    start = time.perf_counter()
    btf = Btf.load(VMLINUX)
    elapsed = time.perf_counter() - start
    assert btf.type_count > 1000
    # The daemon loads BTF on every start; keep it cheap (typically well under 0.2 s).
    assert elapsed < 2.0, f"loading vmlinux BTF took {elapsed:.2f}s"


@pytest.mark.parametrize(("struct_name", "path"), KERNEL_MEMBERS, ids=[f"{s}.{p}" for s, p in KERNEL_MEMBERS])
def test_kernel_member_matches_bpftool(kbtf: Btf, raw: RawBtf, struct_name: str, path: str) -> None:
    bits, type_id, bitfield = raw.member(struct_name, path)
    if bitfield or bits % 8:
        # e.g. sock.sk_protocol was a bitfield before 5.6; the reader must refuse it, not guess.
        with pytest.raises(BtfError):
            kbtf.member_offset(struct_name, path)
        pytest.skip(f"{struct_name}.{path} is a bitfield on this kernel")
    assert kbtf.member_offset(struct_name, path) == bits // 8
    assert kbtf.member_size(struct_name, path) == raw.size(type_id)


@pytest.mark.parametrize("name", ["sk_buff", "sock_common", "sock", "net_device", "net", "ns_common"])
def test_kernel_struct_size_matches_bpftool(kbtf: Btf, raw: RawBtf, name: str) -> None:
    assert kbtf.struct_size(name) == int(raw.types[raw.by_name[name]].attrs["size"])


@needs_vmlinux
def test_kernel_known_618_layout(kbtf: Btf) -> None:
    if not os.uname().release.startswith("6.18."):
        pytest.skip("hard-coded offsets are for the 6.18 lab kernel")
    assert kbtf.member_offset("sk_buff", "head") == 192
    assert kbtf.member_offset("sk_buff", "network_header") == 180
    assert kbtf.member_offset("sk_buff", "transport_header") == 178
    assert kbtf.member_offset("sk_buff", "dev") == 16
    assert kbtf.member_offset("sk_buff", "len") == 112
    assert kbtf.offsets_as_cflags(
        {"SKB_HEAD_OFF": ("sk_buff", "head"), "SKB_LEN_OFF": ("sk_buff", "len")}
    ) == [
        "-DSKB_HEAD_OFF=192",
        "-DSKB_LEN_OFF=112",
    ]


@needs_vmlinux
def test_kernel_error_messages(kbtf: Btf) -> None:
    with pytest.raises(BtfError, match=r"no struct or union named 'no_such_struct_xyz'"):
        kbtf.member_offset("no_such_struct_xyz", "head")
    with pytest.raises(BtfError, match=r"struct 'sk_buff' has no member 'no_such_member'"):
        kbtf.member_offset("sk_buff", "no_such_member")
    with pytest.raises(BtfError, match=r"struct 'sock' has no member '__sk_common\.nope'"):
        kbtf.member_offset("sock", "__sk_common.nope")
    with pytest.raises(BtfError, match=r"sk_buff\.cloned is a bitfield"):
        kbtf.member_offset("sk_buff", "cloned")


def _tracefs() -> Path | None:
    for root in (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing")):
        if (root / "events").is_dir():
            return root
    root = Path("/sys/kernel/tracing")
    if os.geteuid() == 0 and root.is_dir():
        subprocess.run(["mount", "-t", "tracefs", "nodev", str(root)], capture_output=True, check=False)
        if (root / "events").is_dir():
            return root
    return None


@needs_vmlinux
def test_kernel_skb_drop_reason_matches_tracepoint(kbtf: Btf) -> None:
    values = kbtf.enum_values("skb_drop_reason")
    assert values["SKB_DROP_REASON_NOT_SPECIFIED"] >= 0
    assert "SKB_DROP_REASON_NO_SOCKET" in values

    root = _tracefs()
    fmt_path = root / "events/skb/kfree_skb/format" if root else None
    if fmt_path is None or not os.access(fmt_path, os.R_OK):
        pytest.skip("tracefs kfree_skb format not readable")
    fmt = fmt_path.read_text()
    assert "__print_symbolic(REC->reason" in fmt
    symbolic = fmt.split("__print_symbolic(REC->reason", 1)[1]
    symbols = {name: int(val) for val, name in re.findall(r'\{\s*(-?\d+),\s*"(\w+)"\s*\}', symbolic)}
    assert {"NOT_SPECIFIED", "NO_SOCKET"} <= symbols.keys()
    # The tracepoint prints reasons without the SKB_DROP_REASON_ prefix; every one must agree with BTF.
    mismatched = {
        n: (v, values.get(f"SKB_DROP_REASON_{n}"))
        for n, v in symbols.items()
        if values.get(f"SKB_DROP_REASON_{n}") != v
    }
    assert not mismatched, f"tracepoint vs BTF (symbol: (trace, btf)): {mismatched}"
