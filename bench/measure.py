"""System counters the benchmark reads: CPU time (/proc/stat, /proc/<pid>/stat), memory, link packet
counters, and kernel BPF per-program statistics (bpftool, /proc/<pid>/fdinfo).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
BPF_STATS_SYSCTL = Path("/proc/sys/kernel/bpf_stats_enabled")


@dataclass(frozen=True)
class CpuTimes:
    """Busy and total CPU time in seconds, of all CPUs together or of one (a line of /proc/stat)."""

    busy: float
    total: float

    @classmethod
    def read(cls) -> dict[str, CpuTimes]:
        """Every line of /proc/stat about CPUs: ``"cpu"`` (all together), ``"cpu0"``, ``"cpu1"``, ..."""
        out = {}
        with open("/proc/stat") as f:
            for line in f:
                if not line.startswith("cpu"):
                    break
                name, *rest = line.split()
                fields = [int(x) for x in rest]
                # user nice system idle iowait irq softirq steal (guest time is already inside user/nice)
                idle = fields[3] + fields[4]
                total = sum(fields[:8])
                out[name] = cls(busy=(total - idle) / CLK_TCK, total=total / CLK_TCK)
        return out

    def __sub__(self, other: CpuTimes) -> CpuTimes:
        return CpuTimes(self.busy - other.busy, self.total - other.total)


def cpu_delta(before: dict[str, CpuTimes], after: dict[str, CpuTimes]) -> dict[str, CpuTimes]:
    """Per /proc/stat line, the CPU time spent between two :meth:`CpuTimes.read` calls."""
    return {k: after[k] - before[k] for k in after if k in before}


def process_cpu_seconds(pid: int, children: bool = False) -> float:
    """utime + stime of every thread of ``pid`` so far, in seconds; with ``children``, plus those of its
    children it has waited for (cutime + cstime: a short-lived compile child, for instance)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)
    if children:
        ticks += int(fields[13]) + int(fields[14])  # 16 and 17
    return ticks / CLK_TCK


def process_runtime_seconds(pid: int) -> float:
    """Time on CPU of every live thread of ``pid`` in seconds, nanosecond-precise (/proc/<pid>/task/*/schedstat),
    where utime+stime only moves in clock ticks (10 ms)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def process_memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak resident) of ``pid`` in KiB."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def child_pids(pid: int) -> list[int]:
    """Direct children of every thread of ``pid`` (/proc/<pid>/task/<tid>/children)."""
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError):
                out += [int(c) for c in (task / "children").read_text().split()]
    return out


def tree_rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` plus that of all its descendants, in KiB (0 for a process that is gone)."""
    total, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        with contextlib.suppress(OSError):
            total += process_memory_kib(p).get("VmRSS", 0)
            todo += child_pids(p)
    return total


def bpf_stats_holders() -> dict[int, str]:
    """Processes holding kernel BPF run-time statistics on (a ``BPF_ENABLE_STATS`` fd, ``anon_inode:bpf-stats``):
    pid -> command name. The sysctl ``kernel.bpf_stats_enabled`` only shows its own state, not these."""
    out: dict[int, str] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) == "anon_inode:bpf-stats":
                        out[int(proc.name)] = (proc / "comm").read_text().strip()
                        break
    return out


def link_rx_packets(netns: str, ifnames: list[str]) -> int:
    """Sum of rx packet counters of ``ifnames`` in ``netns``: on a pod's host-side veth, rx is what the
    pod sent, so summed over every pod veth it is the packets entering the node's datapath."""
    res = subprocess.run(["ip", "-n", netns, "-j", "-s", "link", "show"], capture_output=True, text=True,
                         check=True, timeout=10)
    wanted = set(ifnames)
    return sum(link["stats64"]["rx"]["packets"] for link in json.loads(res.stdout) if link["ifname"] in wanted)


def bpf_programs() -> dict[int, dict]:
    """Every loaded BPF program, id -> bpftool's JSON (name, type, and run_time_ns/run_cnt when stats are on)."""
    res = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True, timeout=30)
    return {p["id"]: p for p in json.loads(res.stdout or "[]")}


def bpf_prog_ids_of(pid: int) -> set[int]:
    """Ids of the BPF programs ``pid`` holds a file descriptor to (its /proc/<pid>/fdinfo ``prog_id``)."""
    ids: set[int] = set()
    fd_dir = Path(f"/proc/{pid}/fdinfo")
    with contextlib.suppress(FileNotFoundError):
        for info in fd_dir.iterdir():
            with contextlib.suppress(OSError):
                for line in info.read_text().splitlines():
                    if line.startswith("prog_id:"):
                        ids.add(int(line.split()[1]))
    return ids


@contextlib.contextmanager
def bpf_stats_enabled():
    """Turn on kernel BPF run-time statistics for the block (kernel.bpf_stats_enabled=1), then restore.

    Stats cost two clock reads per program run, so they are only on where per-program time is measured.
    """
    before = BPF_STATS_SYSCTL.read_text().strip()
    BPF_STATS_SYSCTL.write_text("1\n")
    try:
        yield
    finally:
        BPF_STATS_SYSCTL.write_text(before + "\n")
