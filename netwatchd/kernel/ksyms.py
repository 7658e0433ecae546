"""Kernel addresses to `symbol+0xoffset`, from /proc/kallsyms, without keeping the symbol table in memory.

Only the drop tail needs this, for a few distinct call sites. /proc/kallsyms has ~120k lines (5 MB): holding
it as Python objects would cost tens of MiB for the life of the daemon, so each lookup of addresses not seen
before scans it once (~0.1 s) for all of them, and the answers are cached (bounded).
"""

from __future__ import annotations

import threading

KALLSYMS = "/proc/kallsyms"
CACHE_MAX = 4096
_TEXT = frozenset(b"tTwW")  # function symbols (w/W: weak)

_cache: dict[int, str] = {}
_lock = threading.Lock()


def _scan(addrs: set[int], path: str) -> dict[int, str]:
    """For each address, the function symbol at or below it: (name, start) of the closest start."""
    best: dict[int, tuple[int, str]] = {}
    lo, hi = min(addrs), max(addrs)
    try:
        with open(path, "rb") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3 or parts[1][0] not in _TEXT:
                    continue
                start = int(parts[0], 16)
                if start == 0 or start > hi or start + (1 << 24) < lo:  # 0: addresses hidden (kptr_restrict)
                    continue
                name = parts[2].decode(errors="replace")
                if len(parts) > 3:  # a module symbol: "name [module]"
                    name += " " + parts[3].decode(errors="replace")
                for a in addrs:
                    if start <= a and (a not in best or start > best[a][0]):
                        best[a] = (start, name)
    except OSError:
        return {}
    out = {}
    for a, (start, name) in best.items():
        if " " in name:
            sym, mod = name.split(" ", 1)
            out[a] = f"{sym}+{a - start:#x} {mod}"
        else:
            out[a] = f"{name}+{a - start:#x}"
    return out


def resolve(addrs, path: str = KALLSYMS) -> dict[int, str]:
    """address -> `symbol+0xoff` (hex address when unknown) for every address in `addrs`."""
    wanted = {int(a) for a in addrs}
    with _lock:
        missing = {a for a in wanted if a not in _cache}
    if missing:
        found = _scan(missing, path)
        with _lock:
            if len(_cache) + len(missing) > CACHE_MAX:
                _cache.clear()
            for a in missing:
                _cache[a] = found.get(a, hex(a))
    with _lock:
        return {a: _cache.get(a, hex(a)) for a in wanted}
