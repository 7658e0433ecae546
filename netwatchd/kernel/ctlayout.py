"""ctypes layouts as plain JSON data, and back: how map key/value types cross from the compiler child.

BCC describes each map's key and value as ctypes classes (`bpf[name].Key`, `.Leaf`), built from the C
declarations it compiled. The child serialises them with `describe()`; the daemon, which never imports
bcc, rebuilds equivalent classes with `build()`: same size, same field names and offsets, so probe code
that reads `key.saddr` or `leaf.v[i].packets` works unchanged. Covered: the simple C types, arrays,
structs, unions, packed structs, anonymous members and bitfields.

A layout is one of
  {"s": "<ctypes type code>"}                                 a simple type (c_uint32 is "I", ...)
  {"a": <layout>, "n": <length>}                              an array
  {"struct"|"union": [[name, <layout>] | [name, <layout>, bits], ...], "name": str, "pack": int, "anon": [...]}
"""

from __future__ import annotations

import ctypes
from typing import Any

# ctypes type code -> type (c_int32 is c_int, c_uint64 is c_ulong, ...: the code identifies the C type).
_SIMPLE = {t._type_: t for t in (
    ctypes.c_bool, ctypes.c_char, ctypes.c_wchar, ctypes.c_byte, ctypes.c_ubyte, ctypes.c_short, ctypes.c_ushort,
    ctypes.c_int, ctypes.c_uint, ctypes.c_long, ctypes.c_ulong, ctypes.c_longlong, ctypes.c_ulonglong,
    ctypes.c_float, ctypes.c_double, ctypes.c_longdouble, ctypes.c_void_p, ctypes.c_char_p,
)}

Layout = dict[str, Any]


def describe(ctype: type | None) -> Layout | None:
    """The JSON-able layout of a ctypes type (None for None: maps without keys, like queues)."""
    if ctype is None:
        return None
    if issubclass(ctype, ctypes.Array):
        return {"a": describe(ctype._type_), "n": ctype._length_}
    if issubclass(ctype, ctypes.Structure | ctypes.Union):
        kind = "union" if issubclass(ctype, ctypes.Union) else "struct"
        fields = []
        for f in ctype._fields_:
            entry: list[Any] = [f[0], describe(f[1])]
            if len(f) > 2:
                entry.append(f[2])  # bit width
            fields.append(entry)
        return {kind: fields, "name": ctype.__name__, "pack": getattr(ctype, "_pack_", 0),
                "anon": list(getattr(ctype, "_anonymous_", ()))}
    code = getattr(ctype, "_type_", None)
    if isinstance(code, str) and code in _SIMPLE:
        return {"s": code}
    raise TypeError(f"cannot describe ctypes type {ctype!r}")


def build(layout: Layout | None) -> type | None:
    """A ctypes type with the layout `describe()` produced."""
    if layout is None:
        return None
    if "s" in layout:
        return _SIMPLE[layout["s"]]
    if "a" in layout:
        return build(layout["a"]) * int(layout["n"])  # type: ignore[operator]
    kind = "union" if "union" in layout else "struct"
    fields = [(f[0], build(f[1]), *f[2:]) for f in layout[kind]]
    attrs: dict[str, Any] = {"_fields_": fields}
    if layout.get("pack"):
        attrs["_pack_"] = layout["pack"]
    if layout.get("anon"):
        attrs["_anonymous_"] = layout["anon"]
    base = ctypes.Union if kind == "union" else ctypes.Structure
    return type(str(layout.get("name") or kind), (base,), attrs)


def offsets(ctype: type, prefix: str = "") -> dict[str, tuple[int, int]]:
    """Every member path -> (offset, size), recursively (array elements as [i]): for comparing layouts."""
    out: dict[str, tuple[int, int]] = {}

    def walk(t: type, base: int, path: str) -> None:
        out[path or "."] = (base, ctypes.sizeof(t))
        if issubclass(t, ctypes.Array):
            esize = ctypes.sizeof(t._type_)
            for i in range(t._length_):
                walk(t._type_, base + i * esize, f"{path}[{i}]")
        elif issubclass(t, ctypes.Structure | ctypes.Union):
            for f in t._fields_:
                desc = getattr(t, f[0])
                if len(f) > 2:  # bitfield: ctypes encodes (bit offset, width) in the descriptor's size
                    out[f"{path}.{f[0]}"] = (base + desc.offset, desc.size)
                else:
                    walk(f[1], base + desc.offset, f"{path}.{f[0]}")

    walk(ctype, 0, prefix)
    return out
