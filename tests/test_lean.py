"""The long-running daemon holds no compiler: BCC compiles in a short-lived child, the daemon keeps file
descriptors. Runs the real netwatchd; the precise memory and start-time targets live in bench/lean.py."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from netwatchd.lab.traffic import ping, send_udp
from netwatchd.probes.drops import DropsProbe
from netwatchd.probes.tc import PROGRAMS as TC_PROGRAMS
from netwatchd.probes.tcp import TcpProbe
from tests.support import bpf_programs, prog_ids_of, start_netwatchd

pytestmark = pytest.mark.kernel

RSS_BOUND_MIB = 150  # generous: the bench measures ~50 MiB here; with bcc imported it was ~220
COMPILER_LIBS = ("libbcc", "LLVM", "libclang", "libllvm")


def _status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) // 1024
    return out


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(c) for c in (task / "children").read_text().split()]
    return kids


def test_daemon_runs_without_bcc_or_llvm_and_counts_by_fd(lab):
    node = lab.add_node("n1")
    a, c = node.add_pod("a"), node.add_pod("c")
    d = start_netwatchd(["--pod-cidr", node.pod_cidr], netns=node.netns)
    try:
        pid = d.proc.pid
        assert Path(f"/proc/{pid}/cwd").resolve() == Path(__file__).resolve().parent.parent  # this checkout
        mapped = [ln for ln in Path(f"/proc/{pid}/maps").read_text().splitlines()
                  if any(lib in ln for lib in COMPILER_LIBS)]
        assert mapped == []
        assert "libbpf.so.1" in Path(f"/proc/{pid}/maps").read_text()
        # every compiler child (the probes', then the fentry test's) has exited
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (_children(pid) or not any(
                e.get("event") == "hook_detected" and e.get("hook") == "fentry" for e in d.logs)):
            time.sleep(0.2)
        assert _children(pid) == []
        mem = _status(pid)
        assert mem["VmRSS"] < RSS_BOUND_MIB and mem["VmHWM"] < RSS_BOUND_MIB, mem
        # counting through the fds: drops attached by fd count these drops, and the program stats read from
        # the program fds move
        assert ping(a, c.ip) == 1
        before = d.value("netwatch_drops_total", reason="NO_SOCKET", protocol="udp")
        send_udp(a, c.ip, 6200, 15)
        assert d.wait_for("netwatch_drops_total", before + 15, reason="NO_SOCKET", protocol="udp") == before + 15
        # the daemon's program fds (run-time stats are read through them): every declared program is there
        status, body = d.get("/api/v1/probes")
        progs = {p["program"]: p["prog_id"] for doc in json.loads(body)["probes"] for p in doc["programs"]}
        declared = {h.program for probe in (DropsProbe, TcpProbe) for h in probe.hooks} | {
            n for names in TC_PROGRAMS.values() for n in names}
        assert status == 200 and set(progs) == declared
        ids = prog_ids_of(pid)
        assert set(progs.values()) <= ids
    finally:
        assert d.stop() == 0, "".join(d.stderr_lines)[-2000:]
    deadline = time.monotonic() + 15  # program frees are RCU-deferred
    while time.monotonic() < deadline and ids & set(bpf_programs()):
        time.sleep(0.2)
    assert not ids & set(bpf_programs())


def test_a_probe_that_fails_to_compile_is_not_attached_and_the_daemon_serves(lab):
    node = lab.add_node("n1")
    d = start_netwatchd(["--probes", "drops,tcp", "--drops-map-entries", "0"], netns=node.netns)
    try:
        assert d.value("netwatch_probe_attached", probe="drops") == 0
        assert d.value("netwatch_probe_attached", probe="tcp") == 4
        assert d.get("/readyz")[0] == 200
        lines = [e for e in d.logs if e.get("event") == "probe_not_attached"]
        assert lines and lines[0]["probe"] == "drops" and "could not open bpf map: drops" in lines[0]["reason"]
        failed = [e for e in d.logs if e.get("event") == "bpf_compile_failed"]
        assert failed and "drops" in failed[0]["log"]
    finally:
        assert d.stop() == 0
