"""The small protocol every probe follows: declare hooks and metrics, attach, refresh, collect, detach.

A probe owns one BPF program (`bpf/<name>.c`) that aggregates in kernel maps. `refresh()` reads the maps
and hands the raw keys to its accounting (`netwatchd.pipeline`: classes, pods, services come from
`ctx.view`/`ctx.resolver`, never from the probe); `collect()` yields its Prometheus metric families.
Adding a probe = `bpf/<name>.c` + `netwatchd/probes/<name>.py` + one line in `registry.py`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol


@dataclass(frozen=True)
class Hook:
    """A kernel attach point: kind (see kernel.hooks.HOOK_KINDS) and target, e.g. tracepoint skb:kfree_skb;
    `program`, when set, is the C function of the probe's source that the loader attaches there (by name:
    nothing depends on BCC's tracepoint__* naming)."""

    kind: str
    target: str
    program: str = ""


@dataclass
class ProbeContext:
    """What a probe needs: BTF for offsets, tracefs, the daemon's flags, and the attribution inputs."""

    btf: Any
    tracefs: Path
    settings: Any  # the daemon's argparse namespace (each probe reads its own flags)
    view: Any = None  # classify.ClusterView, updated in place by identity
    resolver: Any = None  # pipeline.Resolver
    host_netns: int = 0


@dataclass
class MapStats:
    entries: int = 0
    capacity: int = 0
    overflow: int = 0
    evictions: int = 0


class Probe(Protocol):
    name: str
    hooks: tuple[Hook, ...]
    metrics: tuple[Any, ...]  # export.metrics.MetricSpec of every family collect() yields

    def attach(self, ctx: ProbeContext) -> None:
        """Compile and attach; raise on failure (the caller records it and carries on)."""

    def detach(self) -> None:
        """Detach everything attached; must be safe to call twice or after a failed attach."""

    def refresh(self) -> None:
        """Read the kernel maps and fold them into cumulative, labelled totals."""

    def collect(self) -> Iterable[Any]:
        """Yield prometheus_client metric families (called at scrape time, after refresh)."""

    def forget_pod(self, namespace: str, pod: str) -> int:
        """Remove a gone pod's series; return how many were removed."""

    def map_stats(self) -> dict[str, MapStats]:
        """Fill level of each aggregation map."""

    def folded(self) -> dict[str, int]:
        """Per exported metric name: increments folded by the series budget."""


def program_fds(probe: Any) -> dict[str, int]:
    """Program name -> fd of a probe's loaded BPF programs (`programs()` if it has one, else its module's)."""
    if hasattr(probe, "programs"):
        return dict(probe.programs())
    module = getattr(probe, "_bpf", None)
    return module.program_fds() if module is not None and hasattr(module, "program_fds") else {}
