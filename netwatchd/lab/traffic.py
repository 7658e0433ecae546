"""Tiny, bounded traffic helpers for lab endpoints (pods, nodes, the internet host).

Each helper runs a short ``python3 -c`` snippet (``sys.executable``) inside the endpoint's netns, so no
extra tools (ping, nc, ...) are needed. IPv4 or IPv6 is chosen from the destination address. All of
them have timeouts; servers are started through ``endpoint.popen`` and so are killed by ``Lab.close()``.
"""

from __future__ import annotations

import select
import signal
import subprocess
import sys
import time

from netwatchd.lab.netns import NetnsEndpoint

_PING = r"""
import os, select, socket, struct, sys, time
dst, count, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
v6 = ":" in dst
s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_RAW,
                  socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP)
ident, req, rep = os.getpid() & 0xFFFF, (128 if v6 else 8), (129 if v6 else 0)
def csum(b):
    b += b"\0" * (len(b) % 2)
    t = sum(struct.unpack("!%dH" % (len(b) // 2), b)); t = (t >> 16) + (t & 0xFFFF); t += t >> 16
    return ~t & 0xFFFF
got = 0
for seq in range(count):
    body = struct.pack("!HH", ident, seq) + b"netwatchd-lab"
    pkt = struct.pack("!BBH", req, 0, 0) + body
    if not v6:  # the kernel computes the ICMPv6 checksum itself
        pkt = struct.pack("!BBH", req, 0, csum(pkt)) + body
    s.sendto(pkt, (dst, 0))
    end = time.monotonic() + timeout
    while (left := end - time.monotonic()) > 0 and select.select([s], [], [], left)[0]:
        buf = s.recv(4096)
        buf = buf if v6 else buf[(buf[0] & 0xF) * 4:]
        if len(buf) >= 8:
            typ, _, _, rid, rseq = struct.unpack("!BBHHH", buf[:8])
            if (typ, rid, rseq) == (rep, ident, seq):
                got += 1
                break
print(got)
"""

_SEND_UDP = r"""
import socket, sys
dst, port, count, payload = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), bytes.fromhex(sys.argv[4])
s = socket.socket(socket.AF_INET6 if ":" in dst else socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(count):
    s.sendto(payload, (dst, port))
"""

_TCP_CONNECT = r"""
import errno, socket, sys
dst, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET6 if ":" in dst else socket.AF_INET, socket.SOCK_STREAM)
s.settimeout(timeout)
try:
    s.connect((dst, port)); print("ok")
except ConnectionRefusedError:
    print("refused")
except TimeoutError:
    print("timeout")
except OSError as e:
    print("unreachable" if e.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH) else "error:%s" % e.errno)
"""

_TCP_REQUEST = r"""
import socket, sys
dst, port, timeout, data = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), bytes.fromhex(sys.argv[4])
s = socket.create_connection((dst, port), timeout=timeout)
s.sendall(data); s.shutdown(socket.SHUT_WR)
out = b""
while chunk := s.recv(65536):
    out += chunk
sys.stdout.write(out.hex())
"""

# Accepts forever; per connection: greet with "<peer-ip> <peer-port> <local-ip> <local-port>\n", then echo
# what the client sends until it closes its side (or 2 s of silence), then close.
_TCP_SERVER = r"""
import socket, sys, threading
ip, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
if ":" in ip:
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind((ip, port)); s.listen(128)
def plain(a):
    return a[7:] if a.startswith("::ffff:") else a
def serve(c, peer):
    try:
        c.settimeout(2.0)
        local = c.getsockname()
        c.sendall(("%s %d %s %d\n" % (plain(peer[0]), peer[1], plain(local[0]), local[1])).encode())
        while data := c.recv(65536):
            c.sendall(data)
    except OSError:
        pass
    finally:
        c.close()
print("ready", flush=True)
while True:
    c, peer = s.accept()
    threading.Thread(target=serve, args=(c, peer), daemon=True).start()
"""

# Counts datagrams until SIGTERM, then prints the count.
_UDP_SINK = r"""
import signal, socket, sys
ip, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_DGRAM)
if ":" in ip:
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind((ip, port)); s.settimeout(0.05)
stop, n = [], 0
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
print("ready", flush=True)
while not stop:
    try:
        s.recv(65536); n += 1
    except (TimeoutError, InterruptedError):
        pass
s.setblocking(False)
while True:
    try:
        s.recv(65536); n += 1
    except BlockingIOError:
        break
print(n, flush=True)
"""


def _py(ep: NetnsEndpoint, code: str, *args: object, timeout: float) -> str:
    return ep.run([sys.executable, "-c", code, *map(str, args)], timeout=timeout).stdout.strip()


def _wait_ready(proc: subprocess.Popen, what: str, timeout: float = 5.0) -> None:
    """Wait (bounded) for the "ready" line a server prints once it is listening."""
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while (left := deadline - time.monotonic()) > 0:
        if select.select([proc.stdout], [], [], min(left, 0.1))[0]:
            line = proc.stdout.readline()
            if line.strip() == "ready":
                return
            if not line:  # EOF: the server died
                break
        if proc.poll() is not None:
            break
    err = proc.stderr.read() if proc.poll() is not None and proc.stderr else ""
    proc.kill()
    raise RuntimeError(f"{what} did not start: {err.strip() or 'timeout'}")


def ping(ep: NetnsEndpoint, dst_ip: str, count: int = 1, timeout: float = 1.0) -> int:
    """Send ``count`` ICMP(v6) echo requests (``timeout`` s each); return how many were answered."""
    return int(_py(ep, _PING, dst_ip, count, timeout, timeout=count * timeout + 10))


def send_udp(ep: NetnsEndpoint, dst_ip: str, port: int, count: int, payload: bytes = b"x" * 32) -> None:
    """Send exactly ``count`` UDP datagrams to ``dst_ip:port``; does not wait for anything."""
    _py(ep, _SEND_UDP, dst_ip, port, count, payload.hex(), timeout=30)


def tcp_connect(ep: NetnsEndpoint, dst_ip: str, port: int, timeout: float = 2.0) -> str:
    """One TCP connect attempt: ``"ok"``, ``"refused"`` (RST), ``"timeout"``, or ``"unreachable"``
    (ICMP host/net unreachable).
    """
    return _py(ep, _TCP_CONNECT, dst_ip, port, timeout, timeout=timeout + 10)


def tcp_request(ep: NetnsEndpoint, dst_ip: str, port: int, data: bytes = b"", timeout: float = 2.0) -> bytes:
    """Connect, send ``data``, half-close and return everything the server sent back. Against
    :func:`start_tcp_server` that is ``b"<peer-ip> <peer-port> <local-ip> <local-port>\\n" + data``: what
    the server saw as client and server address (NAT, load balancing) and the echo.
    """
    return bytes.fromhex(_py(ep, _TCP_REQUEST, dst_ip, port, timeout, data.hex(), timeout=timeout + 10))


def start_tcp_server(ep: NetnsEndpoint, port: int, ip: str = "::") -> subprocess.Popen:
    """Start a TCP server on ``ip:port`` (``"::"``: dual stack) that greets each client with the
    addresses it sees (see :func:`tcp_request`) and echoes. Returns once the port is listening; the
    process is tracked and killed by ``Lab.close()``.
    """
    proc = ep.popen([sys.executable, "-c", _TCP_SERVER, ip, str(port)],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_ready(proc, f"tcp server {ip}:{port} in {ep.netns}")
    return proc


class UdpSink:
    """Counts UDP datagrams received on ``ip:port`` (``"::"``: dual stack) in ``ep``'s netns."""

    def __init__(self, ep: NetnsEndpoint, port: int, ip: str = "::") -> None:
        self.proc = ep.popen([sys.executable, "-c", _UDP_SINK, ip, str(port)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _wait_ready(self.proc, f"udp sink {ip}:{port} in {ep.netns}")

    def stop(self) -> int:
        """Stop the sink and return how many datagrams it received."""
        self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=5)
        if self.proc.returncode != 0:
            raise RuntimeError(f"udp sink failed: {err.strip()}")
        return int(out.split()[-1])


_LOAD = r"""
import socket, sys, time
interval, duration = float(sys.argv[1]), float(sys.argv[2])
targets = [t.split(",") for t in sys.argv[3:]]  # proto,ip,port
end = time.monotonic() + duration
while time.monotonic() < end:
    for proto, ip, port in targets:
        fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
        try:
            if proto == "udp":
                s = socket.socket(fam, socket.SOCK_DGRAM); s.sendto(b"x" * 64, (ip, int(port)))
            else:
                s = socket.socket(fam, socket.SOCK_STREAM); s.settimeout(1.0); s.connect((ip, int(port)))
                s.sendall(b"ping\n"); s.recv(256)
            s.close()
        except OSError:
            pass
    time.sleep(interval)
"""


def start_load(ep: NetnsEndpoint, targets: list[tuple[str, str, int]], interval: float = 0.5,
               duration: float = 3600.0) -> subprocess.Popen:
    """Loop over ``targets`` ((``"tcp"|"udp"``, ip, port)) every ``interval`` s for at most ``duration`` s:
    a TCP connect + one request, or one UDP datagram, each bounded by a 1 s timeout. Tracked by the lab."""
    args = [f"{p},{ip},{port}" for p, ip, port in targets]
    return ep.popen([sys.executable, "-c", _LOAD, str(interval), str(duration), *args],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
