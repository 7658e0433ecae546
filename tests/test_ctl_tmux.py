"""`netwatchctl top` as a person sees it: run in a real terminal (tmux) inside a lab node's network namespace
against a real netwatchd while the test drops packets; keys sent with send-keys, the screen read back with
capture-pane. Every tmux session has a unique name and is killed even when a test fails."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.test_ctl import REPO, ctl_lab

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module")
def env():
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (scripts/bootstrap.sh installs it)")
    with ctl_lab() as e:
        from netwatchd.lab.traffic import start_load

        # faults that keep happening while top watches: datagrams web -> db:7777 dropped by FORWARD
        # (NETFILTER_DROP, pod_to_pod_local) and connects to Service shop/gone, whose backend is blackholed
        loads = [start_load(e.web, [("udp", e.db.ip, 7777)], interval=0.1),
                 start_load(e.web, [("tcp", e.gone_vip, 80)], interval=0.2),
                 start_load(e.db, [("tcp", e.cart.ip, 8080)], interval=0.2)]
        try:
            yield e
        finally:
            for p in loads:
                p.kill()
                p.wait()


class Tmux:
    """One detached tmux session running a command, whose exit status is then written to `status_file`; the
    pane stays after it exits."""

    def __init__(self, cmd: list[str], width: int = 200, height: int = 45) -> None:
        self.name = f"nwctl-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.status_file = Path(tempfile.gettempdir()) / f"{self.name}.status"
        shell_cmd = " ".join(_quote(c) for c in cmd)
        self._tmux("new-session", "-d", "-s", self.name, "-x", str(width), "-y", str(height),
                   f"cd {_quote(str(REPO))} && {shell_cmd}; echo $? > {_quote(str(self.status_file))}")
        self._tmux("set-option", "-t", self.name, "remain-on-exit", "on")

    def _tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-u", *args], check=True, capture_output=True, text=True, timeout=10).stdout

    def keys(self, *keys: str, literal: bool = False) -> None:
        self._tmux("send-keys", "-t", self.name, *(["-l"] if literal else []), *keys)

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-t", self.name)

    def pane(self, fmt: str) -> str:
        return self._tmux("display-message", "-p", "-t", self.name, fmt).strip()

    def wait(self, pred: Callable[[str], bool], what: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            text = self.screen()
            if pred(text):
                return text
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}; screen:\n{text}")

    def exit_status(self, timeout: float = 10.0) -> int | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.status_file.exists() and self.status_file.read_text().strip():
                return int(self.status_file.read_text())
            time.sleep(0.1)
        return None

    def kill(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.name], capture_output=True, timeout=10)
        self.status_file.unlink(missing_ok=True)


def _quote(s: str) -> str:
    return s if re.fullmatch(r"[A-Za-z0-9_./:=@-]+", s) else "'" + s.replace("'", "'\\''") + "'"


@pytest.fixture
def top(env):
    # the environment may export a stale COLUMNS/LINES (pytest's does): top must follow the real terminal
    t = Tmux(["ip", "netns", "exec", env.n1.netns, sys.executable, "-m", "netwatchd.ctl", "top",
              "--endpoint", env.endpoint, "--interval", "1"])
    try:
        yield t
    finally:
        t.kill()


def rows(screen: str) -> list[list[str]]:
    """The table rows on screen, split into cells (between the header's rule and the footer)."""
    lines = screen.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("NAMESPACE")) + 2
    except StopIteration:
        return []
    out = []
    for line in lines[start:]:
        if not line.strip() or line.startswith(("q quit", "/", "...", "no rows", "(")):
            break
        out.append(line.split())
    return out


def has_fault(screen: str) -> bool:
    """Pod web, class pod_to_pod_local, dropping now, top reason NETFILTER_DROP."""
    for r in rows(screen):
        if r[:3] == ["shop", "web", "pod_to_pod_local"] and "NETFILTER_DROP" in r and r[4] not in ("0", "-"):
            return True
    return False


def status_ok(screen: str) -> bool:
    """The status line says the data is live: "ok", or which probes this kernel/tree could not attach."""
    line = screen.splitlines()[1].strip()
    return line == "ok" or line.startswith("probes not attached:")


def test_rows_show_the_injected_faults(top):
    screen = top.wait(has_fault, "the NETFILTER_DROP row of shop/web")
    header = screen.splitlines()[0]
    assert header.startswith("netwatchctl top") and "sort DROPS/S v" in header
    assert status_ok(screen), screen.splitlines()[1]
    cols = screen.splitlines()[2].split()
    assert cols[:6] == ["NAMESPACE", "POD", "CLASS", "PKTS/S", "DROPS/S", "v"]  # "v": the sort column, descending
    svc = top.wait(lambda s: any(r[:3] == ["shop", "web", "pod_to_service"] and "NETFILTER_DROP" in r
                                 for r in rows(s)), "drops towards the blackholed service")
    assert "\x1b" not in svc


def test_sort_keys_change_the_order(top):
    top.wait(lambda s: len({r[1] for r in rows(s)} & {"web", "db", "cart"}) >= 2, "rows of several pods")
    top.keys("2")  # column 2: POD, A-Z
    screen = top.wait(lambda s: "sort POD ^" in s.splitlines()[0], "sort by POD")
    pods = [r[1] for r in rows(screen)]
    assert pods == sorted(pods) and len(set(pods)) >= 2, screen
    top.keys("r")
    screen = top.wait(lambda s: "sort POD v" in s.splitlines()[0], "reversed sort")
    pods = [r[1] for r in rows(screen)]
    assert pods == sorted(pods, reverse=True), screen
    top.keys("s")  # next column: CLASS, reversed still
    screen = top.wait(lambda s: "sort CLASS v" in s.splitlines()[0], "sort by CLASS")
    classes = [r[2] for r in rows(screen)]
    assert classes == sorted(classes, reverse=True), screen


def test_filter_leaves_only_matching_rows(top):
    top.wait(has_fault, "rows")
    top.keys("/")
    top.keys("db", literal=True)
    screen = top.wait(lambda s: "/db_" in s, "the filter prompt")
    top.keys("Enter")
    screen = top.wait(lambda s: "filter: db" in s.splitlines()[0] and rows(s), "filtered rows")
    assert {r[1] for r in rows(screen)} == {"db"}, screen
    top.keys("/")
    top.keys("C-u")
    top.keys("pod:web class:pod_to_service", literal=True)
    top.keys("Enter")
    screen = top.wait(lambda s: "filter: pod:web class:pod_to_service" in s.splitlines()[0] and rows(s),
                      "key:glob filter")
    assert [r[:3] for r in rows(screen)] == [["shop", "web", "pod_to_service"]], screen
    top.keys("c")
    top.wait(lambda s: "filter:" not in s.splitlines()[0] and len(rows(s)) > 1, "the filter cleared")


def test_help_overlay(top):
    top.wait(lambda s: rows(s), "rows")
    top.keys("?")
    screen = top.wait(lambda s: "netwatchctl top: help" in s, "the help overlay")
    assert "sort by the next / previous column" in screen and "filter:" in screen
    assert not rows(screen)
    top.keys("x")  # any key closes it
    top.wait(lambda s: "netwatchctl top: help" not in s and rows(s), "the table again")


def test_daemon_restart_shows_reconnecting_then_rows(env, top):
    top.wait(has_fault, "rows")
    env.daemon.stop()
    screen = top.wait(lambda s: "reconnecting..." in s.splitlines()[1], "reconnecting", timeout=15)
    assert rows(screen), "the last rows stay on screen while reconnecting"
    env.restart_daemon()
    # the new daemon's counters start at zero: rates carry on without a negative or a huge spike
    screen = top.wait(lambda s: status_ok(s) and has_fault(s), "rows after the restart",
                      timeout=30)
    for r in rows(screen):
        assert not r[4].startswith("-") or r[4] == "-", r


def test_q_quits_with_status_0(top):
    top.wait(lambda s: rows(s), "rows")
    top.keys("q")
    assert top.exit_status() == 0
