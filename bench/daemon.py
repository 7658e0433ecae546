"""netwatchd as the benchmark runs it: its default flags (only what the lab needs), in the node's netns.

Only what the brief of the benchmark needs from a running daemon: start it and time how long it takes to
answer ``/readyz`` with 200, its peak memory at that moment, HTTP GETs inside the node's netns, and a clean
stop. The bench never passes ``--listen`` or ``--interval``: the daemon listens on its default
``0.0.0.0:9990``, which is free in the lab node's own netns.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import measure
from netwatchd.lab.kubeapi import run_in_netns
from netwatchd.lab.netns import NetnsEndpoint

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PORT = 9990  # netwatchd's default --listen 0.0.0.0:9990
READY_POLL_S = 0.02


@dataclass(frozen=True)
class StartRecord:
    """One start of netwatchd: where, how long until /readyz said 200, and its memory right then."""

    where: str
    ready_s: float
    hwm_kib: int  # VmHWM of the daemon process right after ready: its peak RSS during start
    rss_kib: int  # VmRSS right after ready
    tree_peak_kib: int  # peak summed RSS of the daemon and its children, sampled while it started


@dataclass
class Daemon:
    """A running netwatchd (``python -m netwatchd.daemon``) inside ``netns``."""

    proc: subprocess.Popen
    netns: str
    args: list[str]
    stderr_lines: list[str] = field(default_factory=list)
    start: StartRecord | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr_lines.append(line)
            del self.stderr_lines[:-200]  # the last lines are enough to explain an exit

    def get(self, path: str, timeout: float = 10.0) -> tuple[int, str, float]:
        """GET ``path`` from inside the node's netns: (status, body, milliseconds from connect to last byte)."""
        def fetch() -> tuple[int, str, float]:
            t0 = time.perf_counter()
            conn = http.client.HTTPConnection("127.0.0.1", DEFAULT_PORT, timeout=timeout)
            try:
                conn.request("GET", path)
                resp = conn.getresponse()
                body = resp.read().decode()
                return resp.status, body, (time.perf_counter() - t0) * 1e3
            finally:
                conn.close()

        return run_in_netns(self.netns, fetch)

    def metrics(self) -> str:
        status, body, _ = self.get("/metrics")
        if status != 200:
            raise RuntimeError(f"/metrics answered {status}: {body[:200]}")
        return body

    def last_log(self, n: int = 5) -> str:
        return "".join(self.stderr_lines[-n:])

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM (the daemon detaches everything), SIGKILL after ``timeout``; the exit code."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


def start(ep: NetnsEndpoint, args: list[str], where: str, timeout: float = 90.0) -> Daemon:
    """Start netwatchd with ``args`` in ``ep``'s netns (through the lab, which kills it if we die) and return
    once /readyz answers 200, with the start-to-ready time and memory in ``.start``."""
    t0 = time.monotonic()
    proc = ep.popen([sys.executable, "-m", "netwatchd.daemon", *args], stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    d = Daemon(proc, ep.netns, list(args))
    threading.Thread(target=d._pump, daemon=True).start()
    try:
        d.start = _wait_ready(d, t0, where, timeout)
    except BaseException:
        d.stop()
        raise
    return d


def _wait_ready(d: Daemon, t0: float, where: str, timeout: float) -> StartRecord:
    """Poll /readyz every 20 ms until 200; sample the process tree's RSS meanwhile (a compile child's too)."""
    tree_peak = 0
    while time.monotonic() - t0 < timeout:
        if d.proc.poll() is not None:
            time.sleep(0.2)  # let the pump thread collect the last lines
            raise RuntimeError(f"netwatchd exited {d.proc.returncode} while starting:\n{d.last_log(20)}")
        tree_peak = max(tree_peak, measure.tree_rss_kib(d.pid))
        with contextlib.suppress(OSError, http.client.HTTPException):
            if d.get("/readyz", timeout=1.0)[0] == 200:
                ready_s = time.monotonic() - t0
                mem = measure.process_memory_kib(d.pid)
                return StartRecord(where, ready_s, mem.get("VmHWM", 0), mem.get("VmRSS", 0),
                                   max(tree_peak, mem.get("VmRSS", 0)))
        time.sleep(READY_POLL_S)
    raise RuntimeError(f"netwatchd was not ready after {timeout:g} s:\n{d.last_log(20)}")


# --- reading a /metrics body ------------------------------------------------------------------------------


def samples(body: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample of metric ``name`` in a Prometheus text body, as (labels, value)."""
    out = []
    for m in re.finditer(rf"^{re.escape(name)}(?:\{{([^}}]*)\}})? (\S+)$", body, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        with contextlib.suppress(ValueError):
            out.append((labels, float(m.group(2))))
    return out


def map_gauge(body: str, name: str) -> dict[str, int]:
    """A per-map gauge/counter (``netwatch_bpf_map_entries`` ...) by map name."""
    return {labels.get("map", "?"): int(v) for labels, v in samples(body, name)}


def attached_probes(body: str) -> dict[str, list[tuple[str, bool]]]:
    """``probe -> [(hook, attached), ...]`` from netwatch_probe_attached."""
    out: dict[str, list[tuple[str, bool]]] = {}
    for labels, v in samples(body, "netwatch_probe_attached"):
        out.setdefault(labels.get("probe", "?"), []).append((labels.get("hook", "?"), v == 1.0))
    return out


def describe_probes(probes: dict[str, list[tuple[str, bool]]]) -> str:
    """``**drops** (tracepoint:skb:kfree_skb); ...``, hooks that did not attach marked."""
    if not probes:
        return "none found"
    return "; ".join(f"**{name}** (" + ", ".join(h if ok else f"{h} **NOT attached**" for h, ok in hooks) + ")"
                     for name, hooks in sorted(probes.items()))


def api_json(d: Daemon, path: str) -> object:
    """A JSON API answer (``/api/v1/...``), or None when it is not 200."""
    status, body, _ = d.get(path)
    return json.loads(body) if status == 200 else None
