"""Running the real netwatchd binary in tests: start it (optionally inside a lab node's netns), scrape it,
stop it with SIGTERM and check it exited cleanly."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import random
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

NETWATCHD = [sys.executable, "-m", "netwatchd.daemon"]


@dataclass
class RunningDaemon:
    proc: subprocess.Popen
    netns: str | None
    logs: list[dict] = field(default_factory=list)
    stderr_lines: list[str] = field(default_factory=list)
    port: int = 0

    def _pump(self) -> None:
        for line in self.proc.stderr:
            self.stderr_lines.append(line)
            with contextlib.suppress(ValueError):
                self.logs.append(json.loads(line))

    def get(self, path: str, timeout: float = 10.0, headers: dict | None = None) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.port}{path}"
        ctx = _in_netns(f"/run/netns/{self.netns}") if self.netns else _nullctx()
        with ctx:
            try:
                req = urllib.request.Request(url, headers=headers or {})
                with urllib.request.urlopen(req, timeout=timeout) as resp:
                    return resp.status, resp.read().decode()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read().decode()

    def metrics(self) -> str:
        status, body = self.get("/metrics")
        assert status == 200, body
        return body

    def samples(self, name: str) -> list[tuple[dict, float]]:
        """All samples of metric `name` (e.g. 'netwatch_drops_total') as (labels, value)."""
        out = []
        for fam in text_string_to_metric_families(self.metrics()):
            for s in fam.samples:
                if s.name == name:
                    out.append((s.labels, s.value))
        return out

    def value(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels`."""
        return sum(v for lab, v in self.samples(name) if all(lab.get(k) == x for k, x in labels.items()))

    def wait_for(self, name: str, expected: float, timeout: float = 15.0, **labels: str) -> float:
        """Poll until the summed value reaches `expected`; return the last value (callers assert equality)."""
        deadline = time.monotonic() + timeout
        val = self.value(name, **labels)
        while val < expected and time.monotonic() < deadline:
            time.sleep(0.3)
            val = self.value(name, **labels)
        return val

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


@contextlib.contextmanager
def _in_netns(path: str):
    """Run the block's socket creation inside the netns at `path` (this thread only), then switch back."""
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(target, 0x40000000) != 0:
            raise OSError(ctypes.get_errno(), f"setns {path}")
        try:
            yield
        finally:
            libc.setns(own, 0x40000000)
    finally:
        os.close(own)
        os.close(target)


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def start_netwatchd(args: list[str], netns: str | None = None, env: dict | None = None,
                    timeout: float = 60.0) -> RunningDaemon:
    """Start netwatchd (in `netns` if given) listening on a free port; return once it serves."""
    cmd = NETWATCHD + ["--listen", "127.0.0.1:0", "--interval", "0.5", *args]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=full_env,
                            cwd=Path(__file__).resolve().parent.parent)
    d = RunningDaemon(proc, netns)
    threading.Thread(target=d._pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in list(d.logs):
            if entry.get("event") == "serving":
                d.port = int(entry["listen"].rsplit(":", 1)[1])
                return d
        if proc.poll() is not None:
            time.sleep(0.2)
            raise AssertionError(f"netwatchd exited {proc.returncode}: {''.join(d.stderr_lines)[-3000:]}")
        time.sleep(0.1)
    d.stop()
    raise AssertionError(f"netwatchd did not start in {timeout}s: {''.join(d.stderr_lines)[-3000:]}")


def prog_ids_of(pid: int) -> set[int]:
    """IDs of the BPF programs a process holds open (its fds' /proc/<pid>/fdinfo carry `prog_id:`)."""
    ids: set[int] = set()
    fdinfo = Path(f"/proc/{pid}/fdinfo")
    for entry in fdinfo.iterdir() if fdinfo.exists() else ():
        try:
            for line in entry.read_text().splitlines():
                if line.startswith("prog_id:"):
                    ids.add(int(line.split()[1]))
        except OSError:
            continue
    return ids


def bpf_programs() -> dict[int, str]:
    """Every loaded BPF program: id -> name (bpftool prog show)."""
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True).stdout
    return {p["id"]: p.get("name", "") for p in json.loads(out)}



# --- shared by the module-scoped lab "worlds" of the kernel tests ------------------------------------------

# This run's addresses, random: the drops probe sees every netns of the kernel, so a concurrent lab using the same
# pod addresses (another test file, or the suite run twice at once) would be counted as this lab's pods.
RUN_A, RUN_B = random.SystemRandom().randrange(200, 255), random.SystemRandom().randrange(0, 250, 2)


def node_addresses(i: int) -> dict[str, str]:
    """Pod CIDRs (v4, v6) and node IP of this run's node number i (0, 1) for Lab.add_node(**...)."""
    return dict(pod_cidr=f"10.{RUN_A}.{RUN_B + i}.0/24", pod_cidr6=f"fd00:{RUN_A:x}:{RUN_B + i:x}::/64",
                node_ip=f"192.168.{RUN_A}.{RUN_B + 1 + i}")


def vip(host: int) -> str:
    """A ClusterIP of this run (in LabCluster's service CIDR 10.96.0.0/12)."""
    return f"10.96.{RUN_B}.{host}"


def wait_until(cond: Callable[[], bool], timeout: float = 20.0, step: float = 0.2) -> bool:
    """Poll `cond` until it holds or `timeout` passes; returns whether it held (callers assert)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True


class LabWorld:
    """A lab with a LabCluster and a netwatchd, built once per test module (subclasses define build())."""

    port = 9200  # first port next_port() hands out (a test's closed ports, so drops are its own)

    def __init__(self, lab) -> None:
        self.lab, self.cluster, self.daemon = lab, None, None

    def build(self) -> LabWorld:
        raise NotImplementedError

    def next_port(self) -> int:
        self.port += 1
        return self.port

    def close(self) -> None:
        try:
            if self.daemon is not None:
                assert self.daemon.stop() == 0, "".join(self.daemon.stderr_lines)[-2000:]
        finally:
            if self.cluster is not None:
                self.cluster.close()


def build_world(cls: type[LabWorld]):
    """Generator for a module-scoped fixture: a fresh Lab, `cls(lab).build()`, always torn down."""
    import pytest

    from netwatchd.lab.netns import Lab

    if os.geteuid() != 0:
        pytest.skip("lab namespaces need root")
    lab = Lab()
    w = cls(lab)
    try:
        yield w.build()
    finally:
        try:
            w.close()
        finally:
            lab.close()
