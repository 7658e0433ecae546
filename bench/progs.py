"""Which BPF programs a running netwatchd has loaded, and where each one is attached — found, never assumed.

netwatchd's probes are code under development (program names, tracepoints vs raw tracepoints, tcx vs clsact
change), so the bench asks the kernel:

- the programs: loaded since the daemon started and referenced by one of its fds (``/proc/<pid>/fdinfo``
  ``prog_id``; a link fd names its program too);
- tcx and raw-tracepoint attachments: the daemon's BPF link fds (fdinfo ``link_type: tcx`` with ``ifindex`` and
  ``attach_type``, ``link_type: raw_tracepoint`` with ``tp_name``);
- classic tracepoints (perf events, no link): ``bpftool perf show`` (BPF_TASK_FD_QUERY on every fd of the
  daemon), the category from tracefs;
- classic tc (cls_bpf on clsact): ``tc filter show`` on every link of the node's netns, by program id.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

TRACEFS_EVENTS = Path("/sys/kernel/tracing/events")
TC_KIND, TP_KIND, RAW_KIND = "tc", "tracepoint", "raw_tracepoint"


@dataclass(frozen=True, order=True)
class Hook:
    """One attach point. tc: ``target`` is ``ingress``/``egress`` of ``ifindex`` (in the node's netns);
    tracepoint: ``category:event``; raw_tracepoint: ``event``."""

    kind: str
    target: str
    ifindex: int = 0

    @property
    def event(self) -> str:
        """The kernel event name without category (what a raw tracepoint attaches to)."""
        return self.target.rpartition(":")[2]


@dataclass(frozen=True)
class Program:
    id: int
    name: str
    type: str
    hooks: tuple[Hook, ...]

    @property
    def kind(self) -> str:
        """``tc``, ``tracepoint``, ``raw_tracepoint``, or ``?`` when no attachment was found."""
        kinds = {h.kind for h in self.hooks}
        return kinds.pop() if len(kinds) == 1 else "?"

    def hook_text(self, ifnames: dict[int, str] | None = None) -> str:
        """``tracepoint skb:kfree_skb``, or ``tc ingress of 5 interfaces`` (names when few)."""
        if self.kind != TC_KIND:
            return ", ".join(f"{h.kind} {h.target}" for h in self.hooks) or "not attached anywhere"
        dirs = sorted({h.target for h in self.hooks})
        names = sorted((ifnames or {}).get(h.ifindex, str(h.ifindex)) for h in self.hooks)
        where = ", ".join(names) if len(names) <= 3 else f"{len(names)} interfaces"
        return f"tc {'/'.join(dirs)} of {where}"


def bpftool(*args: str) -> object:
    res = subprocess.run(["bpftool", "-j", *args], capture_output=True, text=True, check=True, timeout=30)
    return json.loads(res.stdout or "[]")


def fdinfos(pid: int) -> list[dict[str, str]]:
    """Every ``/proc/<pid>/fdinfo/<fd>`` as a dict (the BPF ones carry prog_id, link_type, ...)."""
    out = []
    with contextlib.suppress(FileNotFoundError):
        for info in Path(f"/proc/{pid}/fdinfo").iterdir():
            with contextlib.suppress(OSError):
                fields = dict(line.split(":", 1) for line in info.read_text().splitlines() if ":" in line)
                out.append({k.strip(): v.strip() for k, v in fields.items()})
    return out


def held_program_ids(pid: int) -> set[int]:
    """Ids of the BPF programs ``pid`` holds a program or link fd to."""
    return {int(f["prog_id"]) for f in fdinfos(pid) if f.get("prog_id", "").isdigit()}


def tracepoint_category(event: str) -> str:
    """``kfree_skb`` -> ``skb:kfree_skb`` (bpftool perf show names only the event)."""
    matches = sorted(p.parent.parent.name for p in TRACEFS_EVENTS.glob(f"*/{event}/id"))
    return f"{matches[0]}:{event}" if matches else event


def link_hooks(pid: int) -> dict[int, set[Hook]]:
    """prog id -> hooks, from the tcx and raw-tracepoint link fds ``pid`` holds."""
    out: dict[int, set[Hook]] = {}
    for f in fdinfos(pid):
        prog = f.get("prog_id", "")
        if not prog.isdigit():
            continue
        if f.get("link_type") == "tcx":
            # "attach_type: 46 (ingress)" (6.18); older kernels may print the number only
            att = f.get("attach_type", "")
            direction = "ingress" if "ingress" in att or att.startswith("46") else "egress"
            out.setdefault(int(prog), set()).add(Hook(TC_KIND, direction, int(f.get("ifindex", 0))))
        elif f.get("link_type") == "raw_tracepoint" and f.get("tp_name"):
            out.setdefault(int(prog), set()).add(Hook(RAW_KIND, f["tp_name"]))
    return out


def perf_hooks(pid: int) -> dict[int, set[Hook]]:
    """prog id -> tracepoint / raw tracepoint hooks of ``pid``'s perf-event and raw-tracepoint fds."""
    out: dict[int, set[Hook]] = {}
    for e in bpftool("perf", "show"):
        if e.get("pid") != pid or "prog_id" not in e:
            continue
        if e.get("fd_type") == "tracepoint":
            hook = Hook(TP_KIND, tracepoint_category(e["tracepoint"]))
        elif e.get("fd_type") == "raw_tracepoint":
            hook = Hook(RAW_KIND, e["tracepoint"])
        else:
            continue
        out.setdefault(int(e["prog_id"]), set()).add(hook)
    return out


def clsact_hooks(netns: str, prog_ids: set[int]) -> dict[int, set[Hook]]:
    """prog id -> tc hooks, for those of ``prog_ids`` attached as cls_bpf filters on clsact in ``netns``."""
    out: dict[int, set[Hook]] = {}
    links = json.loads(subprocess.run(["ip", "-n", netns, "-j", "link", "show"], capture_output=True, text=True,
                                      check=True, timeout=30).stdout)
    for link in links:
        for direction in ("ingress", "egress"):
            res = subprocess.run(["ip", "netns", "exec", netns, "tc", "-j", "filter", "show", "dev", link["ifname"],
                                  direction], capture_output=True, text=True, check=False, timeout=30)
            with contextlib.suppress(ValueError):
                for flt in json.loads(res.stdout or "[]"):
                    pid_ = flt.get("options", {}).get("prog", {}).get("id")
                    if pid_ in prog_ids:
                        out.setdefault(pid_, set()).add(Hook(TC_KIND, direction, link["ifindex"]))
    return out


def discover(pid: int, netns: str, before: set[int]) -> list[Program]:
    """netwatchd's programs (loaded since ``before`` was taken and held by ``pid``) with their attachments."""
    loaded = {p["id"]: p for p in bpftool("prog", "show")}
    held = held_program_ids(pid)
    ids = {i for i in held if i in loaded and i not in before} or (held & set(loaded))
    hooks: dict[int, set[Hook]] = {}
    for found in (link_hooks(pid), perf_hooks(pid)):
        for k, v in found.items():
            hooks.setdefault(k, set()).update(v)
    unplaced_tc = {i for i in ids if loaded[i].get("type") == "sched_cls" and not hooks.get(i)}
    if unplaced_tc:  # no tcx links: the clsact fallback
        for k, v in clsact_hooks(netns, unplaced_tc).items():
            hooks.setdefault(k, set()).update(v)
    return [Program(i, loaded[i].get("name", "?"), loaded[i].get("type", "?"), tuple(sorted(hooks.get(i, ()))))
            for i in sorted(ids)]


def tc_attach_mode(pid: int) -> str:
    """``tcx`` when the daemon's tc programs hang on tcx links, else ``clsact``."""
    return "tcx" if any(h.kind == TC_KIND for hs in link_hooks(pid).values() for h in hs) else "clsact"


def ifnames(netns: str) -> dict[int, str]:
    """ifindex -> name in ``netns``."""
    links = json.loads(subprocess.run(["ip", "-n", netns, "-j", "link", "show"], capture_output=True, text=True,
                                      check=True, timeout=30).stdout)
    return {link["ifindex"]: link["ifname"] for link in links}


def run_stats(ids: set[int] | None = None) -> dict[int, tuple[int, int]]:
    """prog id -> (run_cnt, run_time_ns) now (kernel BPF stats; they only move while stats are enabled)."""
    return {p["id"]: (p.get("run_cnt", 0), p.get("run_time_ns", 0)) for p in bpftool("prog", "show")
            if ids is None or p["id"] in ids}
