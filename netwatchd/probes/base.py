"""The small protocol every probe follows: declare hooks, attach, read, detach.

A probe owns one BPF program (`bpf/<name>.c`) and hands user space its raw, kernel-side aggregates; it never
knows about pods or classes (that is `netwatchd.pipeline`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol


@dataclass(frozen=True)
class Hook:
    """A kernel attach point: kind (see kernel.hooks.HOOK_KINDS) and target, e.g. tracepoint skb:kfree_skb."""

    kind: str
    target: str


@dataclass
class ProbeContext:
    """What a probe needs to load: BTF for offsets, tracefs, and per-probe settings."""

    btf: Any
    tracefs: Path
    settings: dict[str, Any]


class Probe(Protocol):
    name: str
    hooks: tuple[Hook, ...]

    def attach(self, ctx: ProbeContext) -> None:
        """Compile and attach; raise on failure (the caller records it and carries on)."""

    def detach(self) -> None:
        """Detach everything attached; must be safe to call twice or after a failed attach."""
