"""The explicit list of probes netwatchd knows; a wrong name fails at start-up naming the valid ones."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from netwatchd.probes.base import Probe
from netwatchd.probes.drops import DropsProbe
from netwatchd.probes.tc import TcProbe
from netwatchd.probes.tcp import TcpProbe

PROBES: dict[str, Callable[[], Probe]] = {
    "drops": DropsProbe,
    "tc": TcProbe,
    "tcp": TcpProbe,
}


def build(names: Iterable[str]) -> list[Probe]:
    """Instantiate the named probes, refusing unknown names and duplicates."""
    seen: set[str] = set()
    out: list[Probe] = []
    for name in names:
        if name not in PROBES:
            raise ValueError(f"unknown probe {name!r}; valid probes: {', '.join(sorted(PROBES))}")
        if name in seen:
            raise ValueError(f"probe {name!r} listed twice")
        seen.add(name)
        out.append(PROBES[name]())
    return out
