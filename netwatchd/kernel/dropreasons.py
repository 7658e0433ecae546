"""Drop reason names, read from the running kernel.

Reason numbers change between kernels (new reasons are inserted in the middle of the enum), so a table
copied from one kernel's headers is wrong on the next. We read the `__print_symbolic` list of the
`skb:kfree_skb` tracepoint's format file first (it is exactly what the tracepoint reports) and fall back to
the BTF enum `skb_drop_reason` (its names carry a `SKB_DROP_REASON_` prefix that we strip).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

_SYMBOL = re.compile(r'\{\s*(\d+)\s*,\s*"([A-Za-z0-9_]+)"\s*\}')
BTF_ENUM = "skb_drop_reason"
BTF_PREFIX = "SKB_DROP_REASON_"


class DropReasons(Mapping[int, str]):
    """Read-only map from reason number to kernel name; unknown numbers decode as `UNKNOWN_<n>`."""

    def __init__(self, names: dict[int, str], source: str) -> None:
        self._names = dict(names)
        self.source = source

    def __getitem__(self, number: int) -> str:
        return self._names[number]

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def name(self, number: int) -> str:
        """The kernel's name for `number`, or `UNKNOWN_<n>` if this kernel does not list it."""
        return self._names.get(number, f"UNKNOWN_{number}")

    def number(self, name: str) -> int | None:
        """The number of a reason name on this kernel, or None when the kernel does not have it."""
        for num, known in self._names.items():
            if known == name:
                return num
        return None


def parse_format_file(text: str) -> dict[int, str]:
    """Parse the `{ n, "NAME" }` pairs of a tracepoint format file's print fmt."""
    return {int(num): name for num, name in _SYMBOL.findall(text)}


def from_btf_enum(values: Mapping[str, int]) -> dict[int, str]:
    """Turn BTF's `SKB_DROP_REASON_*` enumerators into {number: short name}."""
    names: dict[int, str] = {}
    for full, num in values.items():
        if full.startswith(BTF_PREFIX):
            names.setdefault(num, full.removeprefix(BTF_PREFIX))
    return names


def load(tracefs: str | Path = "/sys/kernel/tracing", btf=None) -> DropReasons:
    """Load reason names from the tracepoint format file, else from BTF (`btf` is a `Btf` or None).

    Raises LookupError when neither source is readable: a drop probe without names would export numbers
    that mean different things on different kernels.
    """
    fmt = Path(tracefs) / "events" / "skb" / "kfree_skb" / "format"
    try:
        names = parse_format_file(fmt.read_text())
        if names:
            return DropReasons(names, source=str(fmt))
    except OSError:
        pass
    if btf is not None:
        try:
            names = from_btf_enum(btf.enum_values(BTF_ENUM))
        except Exception:  # noqa: BLE001 - any BTF failure just means "no names from BTF"
            names = {}
        if names:
            return DropReasons(names, source=f"btf:enum {BTF_ENUM}")
    raise LookupError(f"no drop reason names: neither {fmt} nor BTF enum {BTF_ENUM} is readable")
