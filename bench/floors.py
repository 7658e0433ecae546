"""Floors: empty BPF programs on exactly the hooks netwatchd uses, so its per-event cost has a reference.

An empty program's run time per event is what the kernel charges for running *any* program there (dispatch,
the context, and the two clock reads of the stats themselves). netwatchd's ns/event divided by that is its own
work, as a multiple of the unavoidable part, measured in the same window on the same events.

- tc: ``return TC_ACT_UNSPEC`` (-1, = TCX_NEXT): the packet's fate never changes and the next program (netwatchd's)
  runs. Attached the way netwatchd attaches (tcx links, or cls_bpf on clsact), first in line, on the same
  interfaces and directions as the netwatchd program it is the floor of.
- classic tracepoint and raw tracepoint: ``return 0``.

The floors are loaded by a short-lived helper process (``python -m bench.floors`` inside the node's netns, where
the tc ifindexes are), which reads a JSON spec on stdin, prints ``{key: prog_id}`` and holds everything until
its stdin closes or it gets SIGTERM. tcx links, tracepoint perf events and raw-tracepoint links go away with
its fds, so nothing survives it even after SIGKILL; clsact filters (fallback only) are deleted on exit, and
the lab's netns deletion removes them in any case. The parent's death sends it SIGTERM (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from bench.progs import RAW_KIND, TC_KIND, TP_KIND, Hook, Program

_SYS_BPF, _BPF_LINK_CREATE = 321, 28  # x86_64; include/uapi/linux/bpf.h (stable ABI)
_TCX_TYPES = {"ingress": 46, "egress": 47}  # BPF_TCX_INGRESS / BPF_TCX_EGRESS
_BPF_F_BEFORE = 1 << 3
_CLSACT_PARENTS = {"ingress": 0xFFFFFFF2, "egress": 0xFFFFFFF3}
FLOOR_CLSACT_PRIO, FLOOR_CLSACT_HANDLE = 1, 0xB0  # prio 1: before netwatchd's filter (default prio 0x4E57)
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Floor:
    """An empty program of ``kind`` attached to ``hooks``; ``key`` names it in the spec and the results."""

    key: str
    kind: str
    hooks: tuple[Hook, ...]


def plan(programs: list[Program]) -> tuple[list[Floor], dict[int, str], dict[str, str]]:
    """The floors for netwatchd's ``programs``: one per distinct (kind, hooks) of a program, plus an empty raw
    tracepoint on every classic tracepoint's event, so there always is a raw-tracepoint floor.

    Returns (floors, netwatchd prog id -> its floor's key, event -> key of the raw floor on that event).
    """
    floors: dict[tuple[str, tuple[Hook, ...]], Floor] = {}

    def floor_for(kind: str, hooks: tuple[Hook, ...]) -> Floor:
        k = (kind, hooks)
        if k not in floors:
            floors[k] = Floor(f"{kind[:3]}{len(floors)}", kind, hooks)
        return floors[k]

    of_program, raw_by_event = {}, {}
    for p in programs:
        if p.kind in (TC_KIND, TP_KIND, RAW_KIND):
            of_program[p.id] = floor_for(p.kind, p.hooks).key
        for h in p.hooks:
            if h.kind in (TP_KIND, RAW_KIND):
                raw_by_event[h.event] = floor_for(RAW_KIND, (Hook(RAW_KIND, h.event),)).key
    return list(floors.values()), of_program, raw_by_event


# --- the bench side: run the helper -------------------------------------------------------------------------


class FloorSet:
    """The helper process holding ``floors``; ``ids`` maps each floor key to its program id once started."""

    def __init__(self, ep, floors: list[Floor], tc_mode: str) -> None:
        self.ep, self.floors, self.tc_mode = ep, floors, tc_mode
        self.proc: subprocess.Popen | None = None
        self.ids: dict[str, int] = {}

    def start(self, timeout: float = 120.0) -> FloorSet:
        if not self.floors:
            return self
        spec = {"tc_mode": self.tc_mode,
                "floors": [{"key": f.key, "kind": f.kind, "hooks": [[h.target, h.ifindex] for h in f.hooks]}
                           for f in self.floors]}
        self.proc = self.ep.popen([sys.executable, "-m", "bench.floors"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(spec) + "\n")
        self.proc.stdin.flush()
        line = _readline(self.proc, timeout)
        try:
            self.ids = {k: int(v) for k, v in json.loads(line).items()}
        except ValueError:
            err = self.stop()
            raise RuntimeError(f"floor helper failed: {line.strip() or err}") from None
        return self

    def stop(self) -> str:
        """Close its stdin (it detaches and exits), SIGKILL if it does not; returns its stderr."""
        proc, self.proc = self.proc, None
        if proc is None:
            return ""
        try:
            _, err = proc.communicate(input="", timeout=20)  # closes its stdin: it detaches and exits
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate(timeout=5)
        return err or ""

    def __enter__(self) -> FloorSet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _readline(proc: subprocess.Popen, timeout: float) -> str:
    """The helper's first stdout line, bounded by ``timeout`` (BCC compiles in there)."""
    import select

    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 0.2)[0]:
            return proc.stdout.readline()
        if proc.poll() is not None:
            return ""
    return ""


# --- the helper process -------------------------------------------------------------------------------------


def _source(floors: list[dict]) -> str:
    """One empty function per floor: distinct programs, so the kernel keeps separate stats for each."""
    body = {TC_KIND: "int {n}(struct __sk_buff *skb) {{ return -1; /* TC_ACT_UNSPEC */ }}",
            TP_KIND: "int {n}(void *ctx) {{ return 0; }}",
            RAW_KIND: "int {n}(void *ctx) {{ return 0; }}"}
    return "\n".join(body[f["kind"]].format(n=_fn(f)) for f in floors) + "\n"


def _fn(floor: dict) -> str:
    return f"nwb_floor_{floor['key']}"  # <= 15 characters: the kernel's program name keeps it whole


def _prog_id(fd: int) -> int:
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("prog_id:"):
                return int(line.split()[1])
    raise RuntimeError(f"fd {fd} is not a BPF program")


def _tcx_attach(prog_fd: int, ifindex: int, direction: str) -> int:
    """A tcx link placing the program first (BPF_F_BEFORE, no anchor) on ``ifindex``/``direction``."""
    class LinkCreate(ctypes.Structure):
        _fields_ = [("prog_fd", ctypes.c_uint32), ("target_ifindex", ctypes.c_uint32),
                    ("attach_type", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("relative_fd", ctypes.c_uint32),
                    ("_pad", ctypes.c_uint32), ("expected_revision", ctypes.c_uint64), ("_rest", ctypes.c_uint8 * 32)]

    libc = ctypes.CDLL(None, use_errno=True)
    attr = LinkCreate(prog_fd=prog_fd, target_ifindex=ifindex, attach_type=_TCX_TYPES[direction], flags=_BPF_F_BEFORE)
    fd = libc.syscall(_SYS_BPF, _BPF_LINK_CREATE, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"tcx attach to ifindex {ifindex} {direction}: {os.strerror(err)}")
    return fd


class _Clsact:
    """cls_bpf floor filters (prio 1, handle 0xb0) on clsact; deletes them, and qdiscs it created, on close."""

    def __init__(self) -> None:
        from pyroute2 import IPRoute

        self.ipr = IPRoute()
        self.filters: list[tuple[int, int]] = []
        self.created: set[int] = set()

    def attach(self, prog_fd: int, name: str, ifindex: int, direction: str) -> None:
        if not any(q.get_attr("TCA_KIND") == "clsact" for q in self.ipr.get_qdiscs(index=ifindex)):
            self.ipr.tc("add", "clsact", ifindex)
            self.created.add(ifindex)
        parent = _CLSACT_PARENTS[direction]
        self.ipr.tc("add-filter", "bpf", ifindex, FLOOR_CLSACT_HANDLE, fd=prog_fd, name=name, parent=parent,
                    prio=FLOOR_CLSACT_PRIO, classid=1, direct_action=True)
        self.filters.append((ifindex, parent))

    def close(self) -> None:
        for ifindex, parent in self.filters:
            with contextlib.suppress(Exception):
                self.ipr.tc("del-filter", "bpf", ifindex, FLOOR_CLSACT_HANDLE, parent=parent, prio=FLOOR_CLSACT_PRIO)
        for ifindex in self.created:
            with contextlib.suppress(Exception):
                if not any(f["handle"] for p in _CLSACT_PARENTS.values()
                           for f in self.ipr.get_filters(index=ifindex, parent=p)):
                    self.ipr.tc("del", "clsact", ifindex)
        self.ipr.close()


def _mount_tracefs() -> None:
    """``ip netns exec`` gives us a fresh /sys without tracefs (BCC attaches tracepoints through it): mount it,
    in our private mount namespace only, as netwatchd does in the same situation."""
    target = "/sys/kernel/tracing"
    if os.path.isdir(f"{target}/events") or not os.path.isdir(target):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"nodev", target.encode(), b"tracefs", 0, None) != 0:
        raise OSError(ctypes.get_errno(), f"mounting tracefs at {target}: {os.strerror(ctypes.get_errno())}")


def _load(spec: dict, keep: list) -> dict[str, int]:
    """Compile and attach every floor of ``spec``; ``keep`` collects what must stay open."""
    from bcc import BPF

    _mount_tracefs()

    b = BPF(text=_source(spec["floors"]))
    keep.append(b)
    clsact = _Clsact() if spec["tc_mode"] == "clsact" else None
    if clsact:
        keep.append(clsact)
    ids = {}
    for f in spec["floors"]:
        name = _fn(f)
        if f["kind"] == TC_KIND:
            fn = b.load_func(name, BPF.SCHED_CLS)
            for direction, ifindex in f["hooks"]:
                if clsact:
                    clsact.attach(fn.fd, name, ifindex, direction)
                else:
                    keep.append(_tcx_attach(fn.fd, ifindex, direction))
        elif f["kind"] == TP_KIND:
            for tp, _ in f["hooks"]:
                b.attach_tracepoint(tp=tp, fn_name=name)
            fn = b.load_func(name, BPF.TRACEPOINT)
        else:
            for tp, _ in f["hooks"]:
                b.attach_raw_tracepoint(tp=tp, fn_name=name)
            fn = b.load_func(name, BPF.RAW_TRACEPOINT)
        ids[f["key"]] = _prog_id(fn.fd)
    return ids


def main() -> int:
    """The helper: spec on stdin, ``{key: prog_id}`` on stdout, hold until stdin closes or SIGTERM."""
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # unwind: the finally below removes clsact filters
    keep: list = []
    try:
        spec = json.loads(sys.stdin.readline())
        try:
            ids = _load(spec, keep)
        except Exception as exc:  # noqa: BLE001 - the bench prints the reason
            print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
            return 1
        print(json.dumps(ids), flush=True)
        sys.stdin.read()  # until the bench closes our stdin (or dies: PDEATHSIG)
        return 0
    finally:
        for obj in reversed(keep):
            with contextlib.suppress(Exception):
                if isinstance(obj, int):  # a tcx link: closing it detaches
                    os.close(obj)
                elif isinstance(obj, _Clsact):
                    obj.close()
                else:  # the BCC module: detaches tracepoints, unloads the programs
                    obj.cleanup()


if __name__ == "__main__":
    sys.exit(main())
