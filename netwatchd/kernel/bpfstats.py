"""netwatchd measuring its own BPF cost: per-program run count and kernel run time.

The kernel keeps these per program while run-time statistics are enabled. BPF_ENABLE_STATS hands back an
fd that keeps them enabled for as long as it is open (no global sysctl left flipped when we exit); each
program's totals are then in /proc/self/fdinfo/<prog fd> (`prog_id`, `run_time_ns`, `run_cnt`).
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

_SYS_BPF = 321  # x86_64
_BPF_ENABLE_STATS = 32
_BPF_STATS_RUN_TIME = 0


@dataclass(frozen=True)
class ProgStats:
    prog_id: int
    run_time_ns: int
    run_cnt: int

    @property
    def ns_per_run(self) -> float | None:
        return self.run_time_ns / self.run_cnt if self.run_cnt else None


def enable_run_time_stats() -> int | None:
    """Enable kernel run-time stats while the returned fd stays open; None if the kernel refuses."""
    libc = ctypes.CDLL(None, use_errno=True)
    attr = (ctypes.c_uint32 * 2)(_BPF_STATS_RUN_TIME, 0)
    fd = libc.syscall(_SYS_BPF, _BPF_ENABLE_STATS, ctypes.byref(attr), ctypes.sizeof(attr))
    return fd if fd >= 0 else None


def prog_stats(fd: int, proc_self: str = "/proc/self") -> ProgStats | None:
    """Stats of the program behind our fd `fd` (None when the fd is not a BPF program)."""
    fields: dict[str, int] = {}
    try:
        with open(os.path.join(proc_self, "fdinfo", str(fd))) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("prog_id", "run_time_ns", "run_cnt"):
                    fields[key] = int(value.strip())
    except OSError:
        return None
    if "prog_id" not in fields:
        return None
    return ProgStats(fields["prog_id"], fields.get("run_time_ns", 0), fields.get("run_cnt", 0))

