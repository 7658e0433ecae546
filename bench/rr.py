"""Build and drive ``bench/rr.c`` (request/response, paced UDP, many-flows generator) inside lab pods.

The C source is compiled with gcc on first use into a cache directory keyed by the source's hash, so a
changed ``rr.c`` is rebuilt and an unchanged one is not. Every helper here is bounded by a timeout.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from netwatchd.lab.netns import NetnsEndpoint

SOURCE = Path(__file__).with_name("rr.c")


def build() -> Path:
    """Compile rr.c (once per source version) and return the binary's path."""
    src = SOURCE.read_bytes()
    out_dir = Path(tempfile.gettempdir()) / "netwatchd-bench"
    out_dir.mkdir(mode=0o700, exist_ok=True)
    st = out_dir.stat()
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        out_dir = Path(tempfile.mkdtemp(prefix="netwatchd-bench-"))  # never run a binary others could replace
    binary = out_dir / f"rr-{hashlib.sha256(src).hexdigest()[:12]}"
    if binary.exists():
        return binary
    if shutil.which("gcc") is None:
        raise RuntimeError("gcc not found: it is needed to build bench/rr.c (apt-get install gcc)")
    tmp = binary.with_suffix(f".{os.getpid()}.tmp")
    res = subprocess.run(["gcc", "-O2", "-Wall", "-o", str(tmp), str(SOURCE)], capture_output=True, text=True,
                         timeout=120)
    if res.returncode != 0:
        raise RuntimeError(f"building {SOURCE} failed:\n{res.stderr}")
    tmp.replace(binary)  # atomic: a concurrent run never sees a half-written binary
    return binary


@dataclass(frozen=True)
class RrResult:
    """One request/response run: how many 1-byte transactions, and their latency percentiles."""

    transactions: int
    seconds: float
    rate: float
    p50_us: float
    p90_us: float
    p99_us: float
    max_us: float


def pinned(cpu: int | None, argv: list[str]) -> list[str]:
    """``argv`` under ``taskset -c cpu`` (or unchanged when cpu is None)."""
    return argv if cpu is None else ["taskset", "-c", str(cpu), *argv]


def wait_ready(proc: subprocess.Popen, what: str, timeout: float = 10.0) -> None:
    """Wait (bounded) for the "ready" line a server prints once it listens; kill it and raise otherwise."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0 and proc.poll() is None:
        if select.select([proc.stdout], [], [], min(left, 0.1))[0]:
            line = proc.stdout.readline()
            if line.strip() == "ready":
                return
            if not line:
                break
    proc.kill()
    proc.wait(timeout=5)
    err = proc.stderr.read() if proc.stderr else ""
    raise RuntimeError(f"{what} did not start: {err.strip() or 'timeout'}")


def start_server(binary: Path, ep: NetnsEndpoint, port: int, cpu: int | None) -> subprocess.Popen:
    """Start the echo server in ``ep`` (tracked by the lab: killed by ``Lab.close()``)."""
    proc = ep.popen(pinned(cpu, [str(binary), "server", str(port)]), stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, text=True)
    wait_ready(proc, f"rr server :{port} in {ep.netns}")
    return proc


def client(binary: Path, ep: NetnsEndpoint, dst: str, port: int, seconds: float, rate: float = 0,
           cpu: int | None = None) -> RrResult:
    """Run 1-byte request/response from ``ep`` to ``dst:port`` for ``seconds`` (``rate`` 0: back to back)."""
    argv = pinned(cpu, [str(binary), "client", dst, str(port), f"{seconds:g}", f"{rate:g}"])
    out = ep.run(argv, timeout=seconds + 15).stdout
    return RrResult(**json.loads(out.strip().splitlines()[-1]))


def start_client(binary: Path, ep: NetnsEndpoint, dst: str, port: int, seconds: float, rate: float,
                 cpu: int | None = None) -> subprocess.Popen:
    """Like :func:`client` but in the background; read the result with :func:`finish`."""
    argv = pinned(cpu, [str(binary), "client", dst, str(port), f"{seconds:g}", f"{rate:g}"])
    return ep.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float) -> dict:
    """Wait (bounded) for a background rr process and return its JSON line."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=5)
        raise RuntimeError(f"rr did not finish in {timeout:g}s: {proc.args}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"rr failed ({proc.returncode}): {err.strip()}")
    return json.loads(out.strip().splitlines()[-1])


def start_udp(binary: Path, ep: NetnsEndpoint, dst: str, port: int, seconds: float, rate: float) -> subprocess.Popen:
    """Paced UDP datagrams from ``ep`` to ``dst:port`` in the background (read with :func:`finish`)."""
    return ep.popen([str(binary), "udp", dst, str(port), f"{seconds:g}", f"{rate:g}"], stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, text=True)


def flows(binary: Path, ep: NetnsEndpoint, dst: str, port: int, count: int, first_src: str,
          rate: float = 0) -> int:
    """Send one UDP datagram per flow, ``count`` flows with sources ``first_src``, +1, ...; return sent.
    ``rate`` > 0 paces them (flows per second), 0 sends them in one burst."""
    argv = [str(binary), "flows", dst, str(port), str(count), first_src] + ([f"{rate:g}"] if rate > 0 else [])
    out = ep.run(argv, timeout=60 + (count / rate if rate > 0 else 0)).stdout
    return int(json.loads(out.strip().splitlines()[-1])["sent"])


def start_connects(binary: Path, ep: NetnsEndpoint, dst: str, port: int, seconds: float, rate: float,
                   hold_ms: int) -> subprocess.Popen:
    """Paced non-blocking TCP connects to ``dst:port`` in the background, each socket closed ``hold_ms`` after
    its connect (read the count with :func:`finish`): refused to a closed port, retransmitted SYNs to a port
    whose SYNs are dropped (``hold_ms`` > 1000: the first SYN retransmit comes after 1 s)."""
    return ep.popen([str(binary), "connect", dst, str(port), f"{seconds:g}", f"{rate:g}", str(hold_ms)],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
