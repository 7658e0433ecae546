"""netwatchd measuring its own BPF cost: per-program run count and kernel run time.

The kernel keeps these per program while run-time statistics are enabled. BPF_ENABLE_STATS hands back an
fd that keeps them enabled for as long as it is open (no global sysctl left flipped when we exit); each
program's totals are then in /proc/self/fdinfo/<prog fd> (`prog_id`, `run_time_ns`, `run_cnt`). They are
costly to keep on, so StatsSampler turns them on in short windows and scales what it saw.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
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


@dataclass
class ProgEstimate:
    """One program's cost as the windows measured it: totals scaled to all the time, and the last window."""

    prog_id: int
    runs: float = 0.0  # estimated runs since netwatchd attached it (windowed counts, scaled)
    run_time_ns: float = 0.0  # estimated kernel time in it, same scaling
    last_ns_per_run: float | None = None  # the last window's cost per event
    last_runs_per_s: float = 0.0


class StatsSampler:
    """netwatchd's own BPF cost, measured in short windows so that measuring costs less than it reports.

    Kernel run-time stats cost two clock reads on every run of every BPF program on the node (the CNI's too):
    on our VMs a clock read costs ~130 ns, more than most of our programs. So they are on only for `window_s`
    out of every `every_s` (BPF_ENABLE_STATS; the fd turns them off again when closed). Each window's run count
    and run time are scaled by (time since the previous window) / (window length) into estimated totals: the
    exported counters are estimates whose rate is right over periods longer than `every_s`.
    """

    def __init__(self, programs, window_s: float = 1.0, every_s: float = 60.0,
                 enable=enable_run_time_stats, read=prog_stats, clock=time.monotonic) -> None:
        self.programs = programs  # () -> {(probe, program): prog fd}
        self.window_s, self.every_s = window_s, max(every_s, window_s)
        self.enable, self.read, self.clock = enable, read, clock
        self.estimates: dict[tuple[str, str], ProgEstimate] = {}
        self.available: bool | None = None  # None until the first window was tried
        self.windows = 0
        self._last_end: float | None = None
        self._lock = threading.Lock()

    def start(self, stop: threading.Event, first_after_s: float = 5.0) -> threading.Thread:
        self._last_end = self.clock()
        t = threading.Thread(target=self._loop, args=(stop, first_after_s), name="bpf-stats", daemon=True)
        t.start()
        return t

    def _loop(self, stop: threading.Event, first_after_s: float) -> None:
        wait = first_after_s
        while not stop.wait(wait):
            if not self.sample(stop.wait):
                return
            wait = self.every_s - self.window_s

    def sample(self, sleep=time.sleep) -> bool:
        """Measure one window; False when the kernel refuses run-time stats (then no more windows)."""
        fd = self.enable()
        self.available = fd is not None
        if fd is None:
            return False
        try:
            progs = self.programs()
            before = {k: self.read(f) for k, f in progs.items()}
            t0 = self.clock()
            sleep(self.window_s)
            after = {k: self.read(f) for k, f in progs.items()}
            t1 = self.clock()
        finally:
            os.close(fd)
        self._account(before, after, t0, t1)
        return True

    def _account(self, before: dict, after: dict, t0: float, t1: float) -> None:
        window = max(t1 - t0, 1e-6)
        scale = max(t1 - (self._last_end if self._last_end is not None else t0), window) / window
        self._last_end = t1
        with self._lock:
            self.windows += 1
            for key, a in after.items():
                b = before.get(key)
                if a is None or b is None or a.prog_id != b.prog_id:
                    continue
                runs, ns = a.run_cnt - b.run_cnt, a.run_time_ns - b.run_time_ns
                est = self.estimates.get(key)
                if est is None or est.prog_id != a.prog_id:
                    est = self.estimates[key] = ProgEstimate(a.prog_id)
                est.runs += runs * scale
                est.run_time_ns += ns * scale
                est.last_ns_per_run = ns / runs if runs > 0 else None
                est.last_runs_per_s = runs / window

    def snapshot(self) -> dict[tuple[str, str], ProgEstimate]:
        with self._lock:
            return {k: ProgEstimate(**vars(v)) for k, v in self.estimates.items()}
