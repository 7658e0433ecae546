"""Minimal, dependency-free reader of the kernel's BTF (BPF Type Format).

netwatchd compiles its BPF C programs at start-up with BCC.  Kernel struct layouts (``sk_buff``,
``sock_common``, ...) move between kernel versions and configurations, so instead of hard-coding
offsets or shipping kernel headers we read them from ``/sys/kernel/btf/vmlinux`` and pass them to the
compiler as ``-D`` macros (see :meth:`Btf.offsets_as_cflags`).

Only what is needed for that job is implemented: the type section is walked once to record where each
type starts and to index struct/union/enum/typedef names; members are decoded lazily on lookup.
The format is described in the kernel's ``Documentation/bpf/btf.rst``.

Only base BTF (vmlinux) is supported: module BTF in ``/sys/kernel/btf/<module>`` is *split* BTF whose
type ids and string offsets continue those of vmlinux and cannot be read on its own.
"""

from __future__ import annotations

import re
import sys
from array import array
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Btf", "BtfError", "VMLINUX_BTF"]

VMLINUX_BTF = "/sys/kernel/btf/vmlinux"

_MAGIC = 0xEB9F
# Fixed part of struct btf_header: magic(2) version(1) flags(1) hdr_len(4) type_off type_len str_off str_len.
_HEADER_MIN_LEN = 24

# BTF_KIND_* values (include/uapi/linux/btf.h).
KIND_UNKN = 0
KIND_INT = 1
KIND_PTR = 2
KIND_ARRAY = 3
KIND_STRUCT = 4
KIND_UNION = 5
KIND_ENUM = 6
KIND_FWD = 7
KIND_TYPEDEF = 8
KIND_VOLATILE = 9
KIND_CONST = 10
KIND_RESTRICT = 11
KIND_FUNC = 12
KIND_FUNC_PROTO = 13
KIND_VAR = 14
KIND_DATASEC = 15
KIND_FLOAT = 16
KIND_DECL_TAG = 17
KIND_TYPE_TAG = 18
KIND_ENUM64 = 19

_KIND_NAMES = {
    KIND_UNKN: "void",
    KIND_INT: "int",
    KIND_PTR: "pointer",
    KIND_ARRAY: "array",
    KIND_STRUCT: "struct",
    KIND_UNION: "union",
    KIND_ENUM: "enum",
    KIND_FWD: "forward declaration",
    KIND_TYPEDEF: "typedef",
    KIND_VOLATILE: "volatile",
    KIND_CONST: "const",
    KIND_RESTRICT: "restrict",
    KIND_FUNC: "function",
    KIND_FUNC_PROTO: "function prototype",
    KIND_VAR: "variable",
    KIND_DATASEC: "datasec",
    KIND_FLOAT: "float",
    KIND_DECL_TAG: "decl tag",
    KIND_TYPE_TAG: "type tag",
    KIND_ENUM64: "enum64",
}

# Every btf_type is three u32 words (name_off, info, size_or_type) followed by kind-specific data.
# The trailing data is FIXED words plus PER_VLEN words for each of the vlen entries; all sizes are
# multiples of 4 bytes, which is why the type section can be walked as an array of u32.
_EXTRA_FIXED = {
    KIND_INT: 1,  # u32 encoding/offset/bits
    KIND_ARRAY: 3,  # struct btf_array {type, index_type, nelems}
    KIND_VAR: 1,  # struct btf_var {linkage}
    KIND_DECL_TAG: 1,  # struct btf_decl_tag {component_idx}
}
_EXTRA_PER_VLEN = {
    KIND_STRUCT: 3,  # struct btf_member {name_off, type, offset}
    KIND_UNION: 3,
    KIND_ENUM: 2,  # struct btf_enum {name_off, val}
    KIND_FUNC_PROTO: 2,  # struct btf_param {name_off, type}
    KIND_DATASEC: 3,  # struct btf_var_secinfo {type, offset, size}
    KIND_ENUM64: 3,  # struct btf_enum64 {name_off, val_lo32, val_hi32}
}
# Tables indexed by kind for the hot loop; kinds absent from both dicts carry no extra data.
_FIXED_WORDS = [_EXTRA_FIXED.get(k, 0) for k in range(KIND_ENUM64 + 1)]
_VLEN_WORDS = [_EXTRA_PER_VLEN.get(k, 0) for k in range(KIND_ENUM64 + 1)]

# Kinds that only qualify another type; followed transparently when resolving a member's type.
_MODIFIERS = frozenset({KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG})
_AGGREGATES = (KIND_STRUCT, KIND_UNION)
_ENUMS = (KIND_ENUM, KIND_ENUM64)
# Guard against malformed (cyclic) type chains; real chains are a handful of links long.
_MAX_RESOLVE_DEPTH = 64

_C_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class BtfError(Exception):
    """Raised for unreadable/malformed BTF and for failed lookups (missing struct, member, enum...)."""


@dataclass(frozen=True, slots=True)
class _Member:
    """A resolved struct/union member: absolute bit offset from the outermost struct, and its type."""

    bit_offset: int
    type_id: int
    bitfield_size: int  # 0 when the member is not a bitfield


class Btf:
    """Parsed BTF blob with name indexes for struct/union/enum lookups.

    Build one with :meth:`load` (a file, normally ``/sys/kernel/btf/vmlinux``) or :meth:`from_bytes`.
    Instances are immutable after construction and safe to share between threads.
    """

    def __init__(self, data: bytes, *, source: str = "<bytes>") -> None:
        """Parse ``data`` (a complete BTF blob).  Prefer :meth:`load` / :meth:`from_bytes`."""
        self._source = source
        self._parse(data)

    # ------------------------------------------------------------------ construction

    @classmethod
    def load(cls, path: str | Path = VMLINUX_BTF) -> Btf:
        """Read and index the BTF file at ``path`` (default: the running kernel's vmlinux BTF)."""
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise BtfError(
                f"cannot read BTF from {path}: {exc.strerror or exc}"
                " (kernel built without CONFIG_DEBUG_INFO_BTF, or /sys not mounted?)"
            ) from exc
        return cls(data, source=str(path))

    @classmethod
    def from_bytes(cls, data: bytes) -> Btf:
        """Parse an in-memory BTF blob (used by tests and for BTF extracted from other sources)."""
        return cls(data)

    def _parse(self, data: bytes) -> None:
        if len(data) < _HEADER_MIN_LEN:
            raise BtfError(f"{self._source}: too short for a BTF header ({len(data)} bytes)")
        # The magic is stored in the producer's byte order; 0xeB9F read as little endian means LE.
        if data[0:2] == b"\x9f\xeb":
            order = "little"
        elif data[0:2] == b"\xeb\x9f":
            order = "big"
        else:
            raise BtfError(f"{self._source}: bad BTF magic {data[0:2].hex()} (expected 0xeb9f)")

        def u32(off: int) -> int:
            return int.from_bytes(data[off : off + 4], order)

        version = data[2]
        if version != 1:
            raise BtfError(f"{self._source}: unsupported BTF version {version}")
        hdr_len = u32(4)
        type_off, type_len, str_off, str_len = (u32(8), u32(12), u32(16), u32(20))
        # Section offsets are relative to the end of the header; hdr_len may grow in future versions.
        type_start = hdr_len + type_off
        str_start = hdr_len + str_off
        if hdr_len < _HEADER_MIN_LEN or type_start + type_len > len(data) or str_start + str_len > len(data):
            raise BtfError(f"{self._source}: BTF header describes sections beyond the end of the data")
        if type_len % 4 or type_start % 4:
            raise BtfError(f"{self._source}: BTF type section is not 4-byte aligned")

        # Decode the whole type section as u32 words in one C-level call: far faster than struct.unpack
        # per record, and every field we need is a u32.
        words = array("I")
        if words.itemsize != 4:  # pragma: no cover - 'I' is 4 bytes on every platform CPython supports
            words = array("L")
        words.frombytes(data[type_start : type_start + type_len])
        if order != sys.byteorder:
            words.byteswap()
        self._words = words
        self._strings = data[str_start : str_start + str_len]

        # starts[type_id] = index in `words` of that type's btf_type; id 0 is the implicit void type.
        starts = array("l", [-1])
        aggregates: dict[str, int] = {}
        enums: dict[str, int] = {}
        typedefs: dict[str, int] = {}
        fwds: dict[str, int] = {}
        long_size = 0
        name_of = self._name
        fixed_words, vlen_words = _FIXED_WORDS, _VLEN_WORDS
        n = len(words)
        i = 0
        while i < n:
            if i + 3 > n:
                raise BtfError(f"{self._source}: truncated BTF type record at type id {len(starts)}")
            info = words[i + 1]
            kind = (info >> 24) & 0x1F
            vlen = info & 0xFFFF
            if kind > KIND_ENUM64 or kind == KIND_UNKN:
                # An unknown kind has an unknown length, so nothing after it can be located.
                raise BtfError(f"{self._source}: unknown BTF kind {kind} at type id {len(starts)}")
            starts.append(i)
            name_off = words[i]
            if name_off:
                if kind in _AGGREGATES:
                    name = name_of(name_off)
                    prev = aggregates.get(name)
                    # First definition wins, except that a member-less duplicate yields to a full one.
                    if prev is None or (vlen and not words[starts[prev] + 1] & 0xFFFF):
                        aggregates[name] = len(starts) - 1
                elif kind in _ENUMS:
                    enums.setdefault(name_of(name_off), len(starts) - 1)
                elif kind == KIND_TYPEDEF:
                    typedefs.setdefault(name_of(name_off), len(starts) - 1)
                elif kind == KIND_FWD:
                    fwds.setdefault(name_of(name_off), len(starts) - 1)
                elif kind == KIND_INT and name_of(name_off) in ("long int", "long unsigned int", "long"):
                    # BTF has no pointer size; like libbpf, infer it from the size of `long`.
                    long_size = words[i + 2]
            i += 3 + fixed_words[kind] + vlen_words[kind] * vlen
        if i != n:
            raise BtfError(f"{self._source}: last BTF type record runs past the end of the type section")

        self._starts = starts
        self._aggregates = aggregates
        self._enums = enums
        self._typedefs = typedefs
        self._fwds = fwds
        self._ptr_size = long_size if long_size in (4, 8) else 8

    # ------------------------------------------------------------------ low-level accessors

    @property
    def type_count(self) -> int:
        """Number of types in the blob (type ids run from 1 to ``type_count``)."""
        return len(self._starts) - 1

    def _name(self, off: int) -> str:
        if off >= len(self._strings):
            raise BtfError(f"{self._source}: string offset {off} outside the string section")
        end = self._strings.find(b"\0", off)
        if end < 0:
            end = len(self._strings)
        return self._strings[off:end].decode("utf-8", "replace")

    def _kind(self, type_id: int) -> int:
        if type_id == 0:
            return KIND_UNKN
        return (self._words[self._start(type_id) + 1] >> 24) & 0x1F

    def _start(self, type_id: int) -> int:
        if not 0 < type_id < len(self._starts):
            raise BtfError(f"{self._source}: reference to nonexistent type id {type_id}")
        return self._starts[type_id]

    def _strip(self, type_id: int) -> int:
        """Follow typedef/const/volatile/restrict/type_tag links to the underlying type id."""
        for _ in range(_MAX_RESOLVE_DEPTH):
            if type_id == 0 or self._kind(type_id) not in _MODIFIERS:
                return type_id
            type_id = self._words[self._start(type_id) + 2]
        raise BtfError(f"{self._source}: type chain too deep (cycle?) near type id {type_id}")

    def _type_size(self, type_id: int) -> int:
        """Size in bytes of a (resolved) type, as the C compiler would compute ``sizeof``."""
        tid = self._strip(type_id)
        kind = self._kind(tid)
        if kind in (KIND_INT, KIND_STRUCT, KIND_UNION, KIND_ENUM, KIND_ENUM64, KIND_FLOAT, KIND_DATASEC):
            return self._words[self._start(tid) + 2]
        if kind == KIND_PTR:
            return self._ptr_size
        if kind == KIND_ARRAY:
            w = self._start(tid)
            elem_type, nelems = self._words[w + 3], self._words[w + 5]
            return nelems * self._type_size(elem_type)
        raise BtfError(f"{self._source}: type id {tid} ({_KIND_NAMES.get(kind, kind)}) has no size")

    def _describe(self, type_id: int) -> str:
        kind = self._kind(type_id)
        kind_name = _KIND_NAMES.get(kind, str(kind))
        if type_id == 0:
            return kind_name
        name_off = self._words[self._start(type_id)]
        return f"{kind_name} {self._name(name_off)}" if name_off else f"anonymous {kind_name}"

    def _aggregate_id(self, name: str) -> int:
        """Type id of the struct/union called ``name`` (or of a typedef naming one)."""
        tid = self._aggregates.get(name)
        if tid is not None:
            return tid
        alias = self._typedefs.get(name)
        if alias is not None and self._kind(self._strip(alias)) in _AGGREGATES:
            return self._strip(alias)
        if name in self._fwds:
            raise BtfError(f"struct/union {name!r} is only forward-declared in {self._source} (no layout)")
        raise BtfError(f"no struct or union named {name!r} in {self._source}")

    def _find_in(self, agg_id: int, name: str, base_bits: int) -> _Member | None:
        """Find member ``name`` of aggregate ``agg_id``, descending into anonymous struct/union members.

        The kernel wraps many fields in anonymous unions/structs (e.g. ``sk_buff.dev`` and
        ``sk_buff.head``), which C code addresses as if they were direct members; we do the same.
        """
        words = self._words
        w = self._start(agg_id)
        info = words[w + 1]
        vlen = info & 0xFFFF
        kind_flag = info >> 31
        for k in range(vlen):
            m = w + 3 + 3 * k
            name_off, mtype, moff = words[m], words[m + 1], words[m + 2]
            # With kind_flag set the offset word packs bitfield_size:8 | bit_offset:24.
            if kind_flag:
                bits, bitfield = moff & 0xFFFFFF, moff >> 24
            else:
                bits, bitfield = moff, 0
            if name_off:
                if self._name(name_off) == name:
                    if not kind_flag:
                        bitfield = self._legacy_bitfield_size(mtype)
                    return _Member(base_bits + bits, mtype, bitfield)
            else:
                inner = self._strip(mtype)
                if self._kind(inner) in _AGGREGATES:
                    found = self._find_in(inner, name, base_bits + bits)
                    if found is not None:
                        return found
        return None

    def _legacy_bitfield_size(self, type_id: int) -> int:
        """Bitfield width for kind_flag=0 structs, where it is encoded in the member's INT type."""
        tid = self._strip(type_id)
        if self._kind(tid) != KIND_INT:
            return 0
        w = self._start(tid)
        encoding = self._words[w + 3]
        nr_bits, int_offset = encoding & 0xFF, (encoding >> 16) & 0xFF
        if int_offset or nr_bits != self._words[w + 2] * 8:
            return nr_bits
        return 0

    def _resolve(self, struct: str, path: str) -> _Member:
        """Walk a dotted member path from ``struct``; returns the final member with its absolute offset."""
        if not path:
            raise BtfError(f"empty member path for struct {struct!r}")
        current = self._aggregate_id(struct)
        bits = 0
        member: _Member | None = None
        parts = path.split(".")
        for idx, part in enumerate(parts):
            if idx:
                assert member is not None
                inner = self._strip(member.type_id)
                if self._kind(inner) not in _AGGREGATES:
                    walked = ".".join(parts[:idx])
                    raise BtfError(
                        f"cannot descend into {struct}.{walked} to find {part!r}: it is a "
                        f"{self._describe(inner)}, not a struct or union (pointers are not followed)"
                    )
                current = inner
            member = self._find_in(current, part, bits)
            if member is None:
                where = "" if idx == 0 else f" (looked in {self._describe(current)})"
                raise BtfError(f"struct {struct!r} has no member {path!r}: {part!r} not found{where}")
            bits = member.bit_offset
        assert member is not None
        return member

    # ------------------------------------------------------------------ public API

    def struct_size(self, name: str) -> int:
        """``sizeof(struct name)`` (or union) in bytes.  Raises :class:`BtfError` if unknown."""
        return self._type_size(self._aggregate_id(name))

    def member_offset(self, struct: str, path: str) -> int:
        """Byte offset of ``path`` within ``struct`` (``offsetof``), e.g. ``("sock", "__sk_common.skc_net")``.

        Members of anonymous nested structs/unions are found directly by name; named nested members
        are reached through dotted paths.  Bitfields and non-byte-aligned members raise
        :class:`BtfError`, as do missing structs or members.
        """
        member = self._resolve(struct, path)
        if member.bitfield_size:
            raise BtfError(
                f"{struct}.{path} is a bitfield ({member.bitfield_size} bits at bit offset "
                f"{member.bit_offset}); it has no byte offset"
            )
        if member.bit_offset % 8:
            raise BtfError(f"{struct}.{path} is not byte-aligned (bit offset {member.bit_offset})")
        return member.bit_offset // 8

    def member_size(self, struct: str, path: str) -> int:
        """``sizeof`` the member at ``path`` in ``struct`` (same path rules as :meth:`member_offset`)."""
        member = self._resolve(struct, path)
        if member.bitfield_size:
            raise BtfError(
                f"{struct}.{path} is a bitfield ({member.bitfield_size} bits); it has no byte size"
            )
        return self._type_size(member.type_id)

    def enum_values(self, name: str) -> dict[str, int]:
        """Enumerators of ``enum name`` (BTF ENUM or ENUM64) as ``{NAME: value}`` in declaration order."""
        tid = self._enums.get(name)
        if tid is None:
            alias = self._typedefs.get(name)
            if alias is not None and self._kind(self._strip(alias)) in _ENUMS:
                tid = self._strip(alias)
            else:
                raise BtfError(f"no enum named {name!r} in {self._source}")
        words = self._words
        w = self._start(tid)
        info = words[w + 1]
        kind, vlen, signed = (info >> 24) & 0x1F, info & 0xFFFF, bool(info >> 31)
        values: dict[str, int] = {}
        if kind == KIND_ENUM:
            for k in range(vlen):
                name_off, val = words[w + 3 + 2 * k], words[w + 4 + 2 * k]
                # kind_flag marks a signed enum; values are stored as raw 32-bit patterns.
                if signed and val & 0x80000000:
                    val -= 1 << 32
                values[self._name(name_off)] = val
        else:
            for k in range(vlen):
                e = w + 3 + 3 * k
                val = words[e + 1] | (words[e + 2] << 32)
                if signed and val & (1 << 63):
                    val -= 1 << 64
                values[self._name(words[e])] = val
        return values

    def offsets_as_cflags(self, wanted: dict[str, tuple[str, str]]) -> list[str]:
        """Turn ``{"MACRO": (struct, member_path)}`` into ``["-DMACRO=<byte offset>", ...]`` for BCC.

        Order follows ``wanted``.  Any failed lookup raises :class:`BtfError` (better to refuse to
        start than to compile a probe that reads the wrong field).
        """
        flags = []
        for macro, (struct, path) in wanted.items():
            if not _C_IDENT.match(macro):
                raise BtfError(f"{macro!r} is not a valid C macro name")
            flags.append(f"-D{macro}={self.member_offset(struct, path)}")
        return flags

    def __repr__(self) -> str:
        return f"<Btf {self._source}: {self.type_count} types>"
