"""Start-up checks of the host: each failure is one line naming what is missing and how to fix it.

The daemon calls `preflight()` before it touches BPF; a failed check exits non-zero with that line, never a
traceback. Every path is injectable (`HostPaths`) so tests can point the checks at a fake root.
"""

from __future__ import annotations

import ctypes
import errno
import importlib.util
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

from netwatchd.kernel import bpfsys

# Capability bits (linux/capability.h) netwatchd needs when it does not run as uid 0.
CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 12, 21, 38, 39
_SYS_BPF = 321  # x86_64 __NR_bpf
_BPF_MAP_CREATE = 0
_BPF_MAP_TYPE_ARRAY = 2


class EnvironmentProblem(RuntimeError):
    """A host problem that stops netwatchd; str() is the one-line message shown to the user."""


@dataclass(frozen=True)
class HostPaths:
    """Where the host's kernel interfaces live (overridable for tests and for containers)."""

    proc: Path = Path("/proc")
    btf: Path = Path("/sys/kernel/btf/vmlinux")
    tracefs_candidates: tuple[Path, ...] = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))
    modules: Path = Path("/lib/modules")
    kernel_release: str = field(default_factory=lambda: platform.release())

    @classmethod
    def from_env(cls) -> HostPaths:
        """Paths with `NETWATCHD_HOST_ROOT` prepended when set (e.g. a DaemonSet mounting the host at /host)."""
        root = os.environ.get("NETWATCHD_HOST_ROOT")
        if not root:
            return cls()
        r = Path(root)
        return cls(
            proc=r / "proc",
            btf=r / "sys/kernel/btf/vmlinux",
            tracefs_candidates=(r / "sys/kernel/tracing", r / "sys/kernel/debug/tracing"),
            modules=r / "lib/modules",
        )


def effective_caps(proc: Path) -> int:
    """The CapEff bitmask of this process."""
    for line in (proc / "self" / "status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def check_privileges(paths: HostPaths) -> None:
    caps = effective_caps(paths.proc)
    has = lambda bit: bool(caps & (1 << bit))  # noqa: E731
    if has(CAP_SYS_ADMIN) or (has(CAP_BPF) and has(CAP_PERFMON) and has(CAP_NET_ADMIN)):
        return
    raise EnvironmentProblem(
        "not enough privilege: netwatchd needs root (or CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN); "
        "run it with sudo, or as a privileged DaemonSet"
    )


def check_bpf_syscall() -> None:
    """Create (and close) a one-element array map: proves the bpf() syscall exists and is allowed."""
    libc = ctypes.CDLL(None, use_errno=True)
    attr = (ctypes.c_uint32 * 5)(_BPF_MAP_TYPE_ARRAY, 4, 4, 1, 0)
    fd = libc.syscall(_SYS_BPF, _BPF_MAP_CREATE, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd >= 0:
        os.close(fd)
        return
    err = ctypes.get_errno()
    if err == errno.ENOSYS:
        raise EnvironmentProblem("BPF is disabled: this kernel has no bpf() syscall (needs CONFIG_BPF_SYSCALL=y)")
    raise EnvironmentProblem(
        f"BPF is not usable: bpf(BPF_MAP_CREATE) failed with {errno.errorcode.get(err, err)} "
        "(run as root; check kernel.unprivileged_bpf_disabled, seccomp or LSM policy of the container)"
    )


def check_btf(paths: HostPaths) -> None:
    if not paths.btf.is_file():
        raise EnvironmentProblem(
            f"no kernel BTF at {paths.btf}: netwatchd reads struct offsets from it "
            "(needs a kernel built with CONFIG_DEBUG_INFO_BTF=y; mount /sys from the host in containers)"
        )


def find_tracefs(paths: HostPaths, mount: bool = True) -> Path:
    """Return a mounted tracefs, mounting it at the first candidate if needed."""
    for cand in paths.tracefs_candidates:
        if (cand / "events").is_dir():
            return cand
    first = paths.tracefs_candidates[0]
    if mount and first.is_dir():
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mount(b"nodev", str(first).encode(), b"tracefs", 0, None) == 0 and (first / "events").is_dir():
            return first
    raise EnvironmentProblem(
        f"tracefs is not mounted and could not be mounted at {first}: "
        f"run 'mount -t tracefs nodev {first}' (in a container, mount the host's /sys/kernel/tracing)"
    )


def check_kernel_headers(paths: HostPaths) -> Path:
    """BCC compiles against a headers tree; any tree will do because offsets come from BTF."""
    env = os.environ.get("BCC_KERNEL_SOURCE")
    build = Path(env) if env else paths.modules / paths.kernel_release / "build"
    if (build / "include").is_dir():
        return build
    raise EnvironmentProblem(
        f"no kernel headers tree at {build}: run scripts/bootstrap.sh, or install linux-headers-amd64 and "
        f"'ln -s /usr/src/linux-headers-<ver>-amd64 {build}' (struct offsets come from BTF, any version works)"
    )


def check_bcc() -> None:
    """bcc must be importable by the compiler child; found without importing it (importing it maps LLVM)."""
    try:
        found = importlib.util.find_spec("bcc") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise EnvironmentProblem(
            "the Python module 'bcc' is missing: apt-get install python3-bpfcc and use a "
            "virtualenv created with --system-site-packages (scripts/bootstrap.sh does both)"
        )


def check_libbpf() -> None:
    """The daemon reads maps and attaches programs through libbpf (ctypes), never through bcc."""
    why = bpfsys.available()
    if why is not None:
        raise EnvironmentProblem(f"{bpfsys.LIBBPF} cannot be loaded ({why}): apt-get install libbpf1")


def preflight(paths: HostPaths | None = None) -> Path:
    """Run every check in the order a user should fix them; return the tracefs path."""
    paths = paths or HostPaths.from_env()
    check_privileges(paths)
    check_bpf_syscall()
    check_btf(paths)
    tracefs = find_tracefs(paths)
    check_kernel_headers(paths)
    check_bcc()
    check_libbpf()
    return tracefs
