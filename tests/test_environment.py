"""A bad environment gives one clear line and a non-zero exit, never a traceback; a missing hook degrades
one probe, never the daemon. Each case runs the real netwatchd binary."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import start_netwatchd

NETWATCHD = [sys.executable, "-m", "netwatchd.daemon", "--listen", "127.0.0.1:0"]


def run(cmd, env=None, timeout=60):
    env = {k: v for k, v in os.environ.items() if k != "BCC_KERNEL_SOURCE"} | (env or {})
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=Path(__file__).resolve().parent.parent)


def assert_clear_failure(res, *needles):
    assert res.returncode != 0, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    last = [ln for ln in res.stderr.splitlines() if ln.startswith("netwatchd: ")]
    assert len(last) == 1, res.stderr
    for n in needles:
        assert n in last[0], last[0]


def fake_root(tmp_path: Path, btf=True, tracefs=True, headers=True) -> Path:
    """A host root where only the named parts are real (symlinks to this host's)."""
    (tmp_path / "sys/kernel/btf").mkdir(parents=True)
    (tmp_path / "proc").symlink_to("/proc")
    if btf:
        (tmp_path / "sys/kernel/btf/vmlinux").symlink_to("/sys/kernel/btf/vmlinux")
    if tracefs:
        (tmp_path / "sys/kernel/tracing").symlink_to("/sys/kernel/tracing")
    (tmp_path / "lib/modules").mkdir(parents=True)
    if headers:
        rel = os.uname().release
        (tmp_path / f"lib/modules/{rel}").symlink_to(f"/lib/modules/{rel}")
    return tmp_path


def test_not_root():
    res = run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", *NETWATCHD])
    assert_clear_failure(res, "not enough privilege", "sudo")


def test_bpf_denied():
    """In a user namespace we look like root, but bpf() needs CAP_BPF in the initial namespace."""
    res = run(["unshare", "--user", "--map-root-user", *NETWATCHD])
    assert_clear_failure(res, "BPF is not usable", "EPERM")


def test_no_btf(tmp_path):
    res = run(NETWATCHD, env={"NETWATCHD_HOST_ROOT": str(fake_root(tmp_path, btf=False))})
    assert_clear_failure(res, "no kernel BTF", "CONFIG_DEBUG_INFO_BTF")


def test_tracefs_not_mountable(tmp_path):
    res = run(NETWATCHD, env={"NETWATCHD_HOST_ROOT": str(fake_root(tmp_path, tracefs=False))})
    assert_clear_failure(res, "tracefs is not mounted", "mount -t tracefs")


def test_no_kernel_headers(tmp_path):
    res = run(NETWATCHD, env={"NETWATCHD_HOST_ROOT": str(fake_root(tmp_path, headers=False))})
    assert_clear_failure(res, "no kernel headers tree", "linux-headers")


def test_bad_flags_are_usage_errors():
    res = run([*NETWATCHD, "--probes", "drops,nope"])
    assert_clear_failure(res, "unknown probe 'nope'", "valid probes: drops")
    res = run([*NETWATCHD, "--pod-cidr", "10.0.0.0/33"])
    assert_clear_failure(res, "10.0.0.0/33")


@pytest.mark.kernel
def test_missing_tracepoint_degrades_probe_not_daemon(tmp_path):
    """A tracefs without skb:kfree_skb: the drops probe is reported unattached, the daemon still serves."""
    root = fake_root(tmp_path, tracefs=False)
    (root / "sys/kernel/tracing/events/sched").mkdir(parents=True)
    d = start_netwatchd(["--probes", "drops"], env={"NETWATCHD_HOST_ROOT": str(root)})
    try:
        assert d.value("netwatch_probe_attached", probe="drops") == 0
        assert d.value("netwatch_hook_available", hook="tracepoint") == 1
        status, body = d.get("/readyz")
        assert status == 503 and "no probe attached" in body
        assert d.get("/healthz")[0] == 200
        lines = [e for e in d.logs if e.get("event") == "probe_not_attached"]
        assert lines and "tracepoint skb:kfree_skb" in lines[0]["reason"]
    finally:
        assert d.stop() == 0
