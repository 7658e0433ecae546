"""Compiles netwatchd's BPF C sources with BCC in a short-lived child process, and loads the result by fd.

The daemon computes the compiler flags (kernel struct offsets resolved from BTF, the probe's -D defines),
starts `python -m netwatchd.probes.compiler` with one end of a unix socketpair, and gets back every map and
program as a file descriptor (SCM_RIGHTS) with the ctypes layouts of the maps' keys and values. The child
exits right after; only then are the tracepoint programs attached (by fd, `probes.module`). So the daemon
never imports bcc or maps libbcc/LLVM, and nothing is attached twice.

The C sources live in the repository's top-level `bpf/` and ship inside the wheel as `netwatchd/bpf`.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path

import structlog

import netwatchd
from netwatchd.kernel import bpfsys, ctlayout
from netwatchd.kernel.maps import map_for
from netwatchd.probes.module import PROGRAM_KINDS, Module, Program, ProgramSpec

log = structlog.get_logger("netwatchd.loader")

COMPILE_TIMEOUT_S = 300.0  # a big program under emulation (QEMU TCG) takes ~40 s; a real machine ~1 s
MAX_MESSAGE = 1 << 20
MAX_FDS = 250  # SCM_MAX_FD is 253

# Every struct member a program may read: -D name -> (struct, member path). Resolved once per start from
# /sys/kernel/btf/vmlinux, because the headers BCC compiles with may describe another kernel.
KERNEL_OFFSETS: dict[str, tuple[str, str]] = {
    "SKB_HEAD_OFF": ("sk_buff", "head"),
    "SKB_NETWORK_HEADER_OFF": ("sk_buff", "network_header"),
    "SKB_LEN_OFF": ("sk_buff", "len"),
    "SKB_PROTOCOL_OFF": ("sk_buff", "protocol"),
    "SKB_DEV_OFF": ("sk_buff", "dev"),
    "SKB_SK_OFF": ("sk_buff", "sk"),
    "NETDEV_IFINDEX_OFF": ("net_device", "ifindex"),
    "NETDEV_ND_NET_OFF": ("net_device", "nd_net"),
    "NET_NS_INUM_OFF": ("net", "ns.inum"),
    "SK_NET_OFF": ("sock_common", "skc_net"),
    "SK_ERR_OFF": ("sock", "sk_err"),
    "SK_PROTOCOL_OFF": ("sock", "sk_protocol"),
    "SKC_DADDR_OFF": ("sock_common", "skc_daddr"),
    "SKC_RCV_SADDR_OFF": ("sock_common", "skc_rcv_saddr"),
    "SKC_DPORT_OFF": ("sock_common", "skc_dport"),
    "SKC_NUM_OFF": ("sock_common", "skc_num"),
    "SKC_FAMILY_OFF": ("sock_common", "skc_family"),
    "SKC_STATE_OFF": ("sock_common", "skc_state"),
    "SKC_V6_DADDR_OFF": ("sock_common", "skc_v6_daddr"),
    "SKC_V6_RCV_SADDR_OFF": ("sock_common", "skc_v6_rcv_saddr"),
    "TCP_SRTT_US_OFF": ("tcp_sock", "srtt_us"),
}

# Members read together with one bpf_probe_read_kernel of the 8-byte aligned span that covers them:
# -D<NAME>_SPAN_START (bytes) and -D<NAME>_SPAN_WORDS (u64 words). Optional members join the span when the
# kernel has them. A span longer than MAX_SPAN_BYTES is refused (it lives on the 512-byte BPF stack).
SPANS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "SKB": ("sk_buff", ("dev", "sk", "len", "protocol", "network_header", "head"), ("_nfct",)),
    "DEV": ("net_device", ("ifindex", "nd_net"), ()),
    "SKC": ("sock_common", ("skc_daddr", "skc_rcv_saddr", "skc_dport", "skc_num", "skc_family", "skc_state",
                            "skc_net", "skc_v6_daddr", "skc_v6_rcv_saddr"), ()),
}
MAX_SPAN_BYTES = 256

# Members that only exist with some kernel options (conntrack): resolved when present, and the C code
# guards their use with #ifdef, so a kernel without them still loads the probe (without that feature).
# A list of (struct, member) pairs is summed: the offset of a member inside a nested array element.
OPTIONAL_OFFSETS: dict[str, list[tuple[str, str]]] = {
    "SKB_NFCT_OFF": [("sk_buff", "_nfct")],
    "NFCONN_TUPLE_ORIG_OFF": [("nf_conn", "tuplehash"), ("nf_conntrack_tuple_hash", "tuple")],
    "CT_TUPLE_DST_U3_OFF": [("nf_conntrack_tuple", "dst.u3")],
    "CT_TUPLE_DST_PORT_OFF": [("nf_conntrack_tuple", "dst.u")],
    "CT_TUPLE_SRC_U3_OFF": [("nf_conntrack_tuple", "src.u3")],
    "CT_TUPLE_SRC_PORT_OFF": [("nf_conntrack_tuple", "src.u")],
    "NFCONN_STATUS_OFF": [("nf_conn", "status")],
}


def possible_cpus(path: Path = Path("/sys/devices/system/cpu/possible")) -> int:
    """How many CPUs the kernel may ever run (per-CPU map values and CPU ids range over these): '0-3,6' -> 7."""
    try:
        text = path.read_text().strip()
    except OSError:
        return os.cpu_count() or 1
    top = 0
    for part in text.split(","):
        top = max(top, int(part.split("-")[-1]))
    return top + 1


def cpu_regions(path: Path = Path("/sys/devices/system/cpu/possible")) -> int:
    """A power of two >= possible_cpus(): the number of per-CPU regions in arrays indexed [cpu * N + i]."""
    n = possible_cpus(path)
    return 1 << (n - 1).bit_length()


class CompileError(RuntimeError):
    """The child could not compile or load a program; `log` has the compiler/verifier output."""

    def __init__(self, message: str, log_text: str = "") -> None:
        super().__init__(message)
        self.log = log_text


def bpf_source_dir() -> Path:
    """The installed `netwatchd/bpf`, or the repository's `bpf/` in a development checkout."""
    pkg = Path(netwatchd.__file__).resolve().parent
    for cand in (pkg / "bpf", pkg.parent / "bpf"):
        if (cand / "include" / "netwatch.h").is_file():
            return cand
    raise FileNotFoundError(f"BPF sources not found next to {pkg} (expected netwatchd/bpf or ../bpf)")


def span_cflags(btf, name: str, struct: str, members: tuple[str, ...], optional: tuple[str, ...] = ()) -> list[str]:
    """-D<name>_SPAN_START/-D<name>_SPAN_WORDS: the 8-byte aligned span of `struct` covering `members`."""
    ranges = [(btf.member_offset(struct, m), btf.member_size(struct, m)) for m in members]
    for m in optional:
        try:
            ranges.append((btf.member_offset(struct, m), btf.member_size(struct, m)))
        except Exception:  # noqa: BLE001 - absent on this kernel
            continue
    start = min(off for off, _ in ranges) // 8 * 8
    end = max(off + size for off, size in ranges)
    words = (end - start + 7) // 8
    if words * 8 > MAX_SPAN_BYTES:
        raise ValueError(f"{struct} members {', '.join(members)} span {words * 8} bytes on this kernel "
                         f"(more than {MAX_SPAN_BYTES}): cannot read them in one go")
    return [f"-D{name}_SPAN_START={start}", f"-D{name}_SPAN_WORDS={words}"]


def offset_cflags(btf) -> list[str]:
    """-D flags for KERNEL_OFFSETS (all required), the OPTIONAL_OFFSETS this kernel has, and the SPANS."""
    flags = btf.offsets_as_cflags(KERNEL_OFFSETS)
    for name, parts in OPTIONAL_OFFSETS.items():
        try:
            flags.append(f"-D{name}={sum(btf.member_offset(st, member) for st, member in parts)}")
        except Exception:  # noqa: BLE001 - member absent on this kernel: the feature is compiled out
            continue
    for name, (struct, members, optional) in SPANS.items():
        flags += span_cflags(btf, name, struct, members, optional)
    return flags


def build_cflags(btf, defines: Mapping[str, int | str] | None = None) -> list[str]:
    """Compiler flags for any of our sources: netwatch.h's directory, the BTF offsets, then `defines`."""
    cflags = [f"-I{bpf_source_dir() / 'include'}", "-Wno-macro-redefined", *offset_cflags(btf)]
    return cflags + [f"-D{k}={v}" for k, v in (defines or {}).items()]


def hook_programs(hooks: Iterable) -> list[ProgramSpec]:
    """The programs a probe's `hooks` name (Hook.program), attached by the loader at each hook's target."""
    return [ProgramSpec(h.program, h.kind, h.target) for h in hooks if getattr(h, "program", "")]


def child_command(fd: int) -> list[str]:
    return [sys.executable, "-m", "netwatchd.probes.compiler", "--fd", str(fd)]


def _spawn() -> tuple[subprocess.Popen, socket.socket]:
    """Start a compiler child (exec'd, never forked from this threaded process) that imports bcc and waits for
    one request on its end of a socketpair. It imports the same netwatchd as we do (our package's parent
    directory goes first on its PYTHONPATH)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    env = dict(os.environ)
    root = str(Path(netwatchd.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    try:
        with theirs:
            proc = subprocess.Popen(child_command(theirs.fileno()), pass_fds=(theirs.fileno(),), env=env,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    except BaseException:
        ours.close()
        raise
    return proc, ours


_warm: list[tuple[subprocess.Popen, socket.socket]] = []
_warm_lock = threading.Lock()


def prestart(n: int) -> None:
    """Start `n` compiler children now, so that their interpreter start and bcc import (~0.2 s of CPU each)
    overlap the daemon's own start-up instead of following it."""
    for _ in range(n):
        child = _spawn()
        with _warm_lock:
            _warm.append(child)


def discard_prestarted() -> None:
    """Let unused children go (they exit when their socket closes)."""
    with _warm_lock:
        children = list(_warm)
        _warm.clear()
    for proc, sock in children:
        sock.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)


def run_child(request: dict, timeout: float = COMPILE_TIMEOUT_S) -> tuple[dict, list[int]]:
    """Send `request` to a compiler child (a prestarted one if any); return (reply, received fds) once the
    child has exited."""
    with _warm_lock:
        proc, ours = _warm.pop() if _warm else (None, None)
    if proc is None or ours is None:
        proc, ours = _spawn()
    fds: list[int] = []
    try:
        ours.settimeout(timeout)
        ours.send(json.dumps(request).encode())
        try:
            msg, fds, flags, _ = socket.recv_fds(ours, MAX_MESSAGE, MAX_FDS)
        except TimeoutError:
            raise CompileError(f"the compiler child did not answer within {timeout:g} s") from None
        if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
            raise CompileError("the compiler child's answer was truncated")
        if not msg:
            proc.wait(10)
            raise CompileError(f"the compiler child exited with code {proc.returncode} without answering")
        reply = json.loads(msg)
        proc.wait(30)  # attach nothing while the child (and anything it holds) is alive
        return reply, fds
    except BaseException:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        raise
    finally:
        ours.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def load(source: str, cflags: list[str], programs: Iterable[ProgramSpec]) -> Module:
    """Compile `source` in a child and build a Module from the fds it sends back (nothing attached yet)."""
    programs = list(programs)
    for p in programs:
        if p.kind not in PROGRAM_KINDS:
            raise ValueError(f"program {p.name}: unknown kind {p.kind!r} (one of {', '.join(PROGRAM_KINDS)})")
    reply, fds = run_child({"op": "compile", "source": source, "cflags": cflags,
                            "programs": [[p.name, p.kind] for p in programs]})
    try:
        if not reply.get("ok"):
            log_text = reply.get("log", "")
            last = next((ln.strip() for ln in reversed(log_text.splitlines()) if ln.strip()), "")
            message = reply.get("error", "compile failed") + (f" ({last[:200]})" if last else "")
            raise CompileError(message, log_text)
        metas, progs = reply["maps"], reply["programs"]
        if len(fds) != len(metas) + len(progs):
            raise CompileError(f"the compiler child sent {len(fds)} fds for {len(metas)} maps and {len(progs)} "
                               "programs")
        poller = bpfsys.RingBufferPoller()
        maps = {}
        for meta, fd in zip(metas, fds, strict=False):
            maps[meta["name"]] = map_for(meta["name"], fd, ctlayout.build(meta["key"]), ctlayout.build(meta["leaf"]),
                                         ctlayout.build(meta.get("event")), poller)
        by_name = {p.name: p for p in programs}
        loaded = {}
        for meta, fd in zip(progs, fds[len(metas):], strict=True):
            spec = by_name[meta["name"]]
            loaded[spec.name] = Program(spec.name, spec.kind, spec.target, fd)
        return Module(source, maps, loaded, poller)
    except BaseException:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        raise


def compile_program(source: str, btf, defines: Mapping[str, int | str] | None = None,
                    programs: Iterable[ProgramSpec] = (), tracefs: Path | None = None,
                    attach: bool = True) -> Module:
    """Compile `bpf/<source>` with the BTF offsets and `defines`, load `programs`, and (unless `attach` is
    False) attach the tracepoint and raw-tracepoint ones. Raises CompileError with the log on failure."""
    try:
        module = load(str(bpf_source_dir() / source), build_cflags(btf, defines), programs)
    except CompileError as exc:
        log.warning("bpf_compile_failed", source=source, error=str(exc), log=exc.log)
        raise
    if attach:
        try:
            module.attach(tracefs or Path("/sys/kernel/tracing"))
        except BaseException:
            module.cleanup()
            raise
    return module


def probe_fentry() -> tuple[bool, str]:
    """Ask a compiler child whether an fentry program attaches on this kernel: (available, detail)."""
    try:
        reply, fds = run_child({"op": "fentry"}, timeout=120)
    except (OSError, CompileError, ValueError) as exc:
        return False, f"not tried: {exc}"
    for fd in fds:
        os.close(fd)
    if not reply.get("ok"):
        return False, reply.get("error", "compiler child failed")
    return bool(reply.get("available")), str(reply.get("detail", ""))
