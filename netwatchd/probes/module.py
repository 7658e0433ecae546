"""A compiled probe as the daemon holds it: map and program file descriptors, and the attachments it made.

`probes.loader` builds a `Module` from what the compiler child sent back. Its surface is the part of BCC's
`BPF` object the probes use — `module["map"]` (a `kernel.maps.Map`), `ring_buffer_poll()`, `cleanup()` —
plus `attach()`, which attaches the declared tracepoint and raw-tracepoint programs by fd (tc programs are
attached by `probes.tcattach`, from `program_fd()`). Every attachment is an fd we own; `detach()` and
`cleanup()` close them and are safe to call any number of times.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from netwatchd.kernel import bpfsys
from netwatchd.kernel.maps import Map

PROGRAM_KINDS = ("tracepoint", "raw_tracepoint", "sched_cls")


@dataclass(frozen=True)
class ProgramSpec:
    """One BPF function of a probe's C file: its name, its kind (PROGRAM_KINDS) and, for the tracepoint kinds,
    where it is attached (`category:event` for tracepoints, the event name for raw tracepoints)."""

    name: str
    kind: str
    target: str = ""


@dataclass
class Program:
    name: str
    kind: str
    target: str
    fd: int


class Module:
    """See module docstring."""

    def __init__(self, source: str, maps: dict[str, Map], programs: dict[str, Program],
                 poller: bpfsys.RingBufferPoller) -> None:
        self.source = source
        self.maps = maps
        self.programs = programs
        self._poller = poller
        self._links: list[tuple[str, int]] = []  # (program name, attachment fd)
        self._lock = threading.Lock()
        self.closed = False

    def __getitem__(self, name: str) -> Map:
        if self.closed:
            raise KeyError(f"{name} (module {self.source} was cleaned up)")
        return self.maps[name]

    def __contains__(self, name: str) -> bool:
        return name in self.maps

    def program_fd(self, name: str) -> int:
        return self.programs[name].fd

    def program_fds(self) -> dict[str, int]:
        """Program name -> fd (for kernel run-time stats)."""
        return {} if self.closed else {p.name: p.fd for p in self.programs.values()}

    def attach(self, tracefs: Path) -> None:
        """Attach every tracepoint and raw-tracepoint program; on any failure, detach what was attached."""
        try:
            for p in self.programs.values():
                if p.kind == "tracepoint":
                    fd = bpfsys.attach_tracepoint(p.fd, tracefs, p.target)
                elif p.kind == "raw_tracepoint":  # the event name; a `category:` prefix is for tracefs only
                    fd = bpfsys.attach_raw_tracepoint(p.fd, p.target.rpartition(":")[2])
                else:
                    continue
                with self._lock:
                    self._links.append((p.name, fd))
        except BaseException:
            self.detach()
            raise

    @property
    def attached(self) -> list[str]:
        with self._lock:
            return [name for name, _fd in self._links]

    def detach(self) -> None:
        """Close every attachment fd (the kernel detaches the program when its last fd closes)."""
        with self._lock:
            links, self._links = self._links, []
        for _name, fd in links:
            with contextlib.suppress(OSError):
                os.close(fd)

    def ring_buffer_poll(self, timeout_ms: int = -1) -> int:
        if self.closed:
            return 0
        return self._poller.poll(timeout_ms)

    def cleanup(self) -> None:
        """Detach, then close every program and map fd. Idempotent."""
        self.detach()
        with self._lock:
            if self.closed:
                return
            self.closed = True
        self._poller.close()
        for fd in [p.fd for p in self.programs.values()] + [m.fd for m in self.maps.values()]:
            with contextlib.suppress(OSError):
                os.close(fd)
