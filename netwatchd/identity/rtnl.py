"""A minimal rtnetlink client for the three questions pod identity asks the kernel: addresses, links, nsids.

Why not pyroute2 here: an ``IPRoute`` (0.9) brings its own asyncio event loop, costs about 1.5 ms to open
and dump a netns's few addresses, and leaves cyclic garbage behind that makes every later garbage
collection of the process slower (measured: a refresh that costs 8 ms costs 42 ms after 1000 IPRoutes, until
``gc.collect()``). A netns scan opens one socket per namespace, so that cost is paid per pod. This is one
``socket.socket(AF_NETLINK)`` and ``struct`` unpacking: ~0.1 ms per netns, no garbage.

A socket is bound to the network namespace of the thread that creates it, for its whole life.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass

NETLINK_ROUTE = 0
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_DUMP_INTR, NLM_F_DUMP = 0x1, 0x2, 0x10, 0x300
RTM_NEWLINK, RTM_GETLINK, RTM_NEWADDR, RTM_GETADDR, RTM_NEWNSID, RTM_GETNSID = 16, 18, 20, 22, 88, 90
IFLA_IFNAME, IFLA_LINK, IFLA_LINKINFO, IFLA_EXT_MASK, IFLA_LINK_NETNSID = 3, 5, 18, 29, 37
IFLA_INFO_KIND = 1
RTEXT_FILTER_SKIP_STATS = 1 << 3  # link dumps without counters: a third of the bytes (ignored by old kernels)
IFA_ADDRESS, IFA_LOCAL = 1, 2
NETNSA_NSID, NETNSA_FD = 1, 3
NSID_NOT_ASSIGNED = -1

_HDR = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
_RTA = struct.Struct("=HH")  # rtattr: len, type
_IFINFO = struct.Struct("=BxHiII")  # ifinfomsg: family, type, index, flags, change
_IFADDR = struct.Struct("=BBBBI")  # ifaddrmsg: family, prefixlen, flags, scope, index
_RTGEN = struct.Struct("=B3x")  # rtgenmsg, padded to 4
_TRIES = 3  # a dump interrupted by a concurrent change (NLM_F_DUMP_INTR) is asked again


def _align(n: int) -> int:
    return (n + 3) & ~3


def _attr(kind: int, value: bytes) -> bytes:
    return _RTA.pack(_RTA.size + len(value), kind) + value + b"\0" * (_align(len(value)) - len(value))


def parse_attrs(buf: bytes, offset: int = 0) -> dict[int, bytes]:
    """{type: payload} of the rtattrs in ``buf`` from ``offset`` (first one wins; nested/byte-order flags off)."""
    out: dict[int, bytes] = {}
    while offset + _RTA.size <= len(buf):
        length, kind = _RTA.unpack_from(buf, offset)
        if length < _RTA.size:
            break
        out.setdefault(kind & 0x3FFF, buf[offset + _RTA.size:offset + length])
        offset += _align(length)
    return out


class _Interrupted(Exception):
    """The kernel flagged a dump inconsistent: something changed while it was being sent."""


class Rtnl:
    """An rtnetlink socket in the calling thread's netns; a context manager. Raises OSError on failures."""

    def __init__(self, timeout: float = 5.0) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
        self._sock.settimeout(timeout)  # the kernel answers at once; never hang on a socket gone wrong
        self._sock.bind((0, 0))
        self._seq = 0

    def __enter__(self) -> Rtnl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def request(self, msg_type: int, payload: bytes, dump: bool = False) -> list[tuple[int, bytes]]:
        """Send one request; the answer's (type, body) messages. Dumps interrupted by a change are retried."""
        for _ in range(_TRIES):
            try:
                return self._transact(msg_type, payload, NLM_F_DUMP if dump else 0)
            except _Interrupted:
                continue
        raise OSError(errno.EAGAIN, f"rtnetlink dump {msg_type} kept changing under us")

    def _transact(self, msg_type: int, payload: bytes, flags: int) -> list[tuple[int, bytes]]:
        self._seq += 1
        self._sock.send(_HDR.pack(_HDR.size + len(payload), msg_type, NLM_F_REQUEST | flags, self._seq, 0) + payload)
        out: list[tuple[int, bytes]] = []
        interrupted = False
        while True:
            data = self._sock.recv(1 << 17)
            offset, multi = 0, False
            while offset + _HDR.size <= len(data):
                length, kind, mflags, seq, _ = _HDR.unpack_from(data, offset)
                if length < _HDR.size:
                    break
                body = data[offset + _HDR.size:offset + length]
                offset += _align(length)
                if seq != self._seq:
                    continue  # a late answer to an earlier request
                interrupted |= bool(mflags & NLM_F_DUMP_INTR)
                multi |= bool(mflags & NLM_F_MULTI)
                if kind in (NLMSG_ERROR, NLMSG_DONE):
                    code = -struct.unpack_from("=i", body)[0] if len(body) >= 4 else 0
                    if code:
                        raise OSError(code, f"rtnetlink: {os.strerror(code)}")
                    if interrupted:
                        raise _Interrupted
                    return out
                out.append((kind, body))
            if out and not multi:
                return out  # a single answer (not a dump) has no NLMSG_DONE

    # -- the three questions ------------------------------------------------------------------------------

    def addresses(self) -> list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int, dict[int, bytes]]]:
        """(address, ifindex, attributes) of every address in this netns: IFA_LOCAL, else IFA_ADDRESS."""
        out = []
        for kind, body in self.request(RTM_GETADDR, _IFADDR.pack(socket.AF_UNSPEC, 0, 0, 0, 0), dump=True):
            if kind != RTM_NEWADDR or len(body) < _IFADDR.size:
                continue
            index = _IFADDR.unpack_from(body)[4]
            attrs = parse_attrs(body, _IFADDR.size)
            raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
            if raw and len(raw) in (4, 16):
                out.append((ipaddress.ip_address(raw), index, attrs))
        return out

    def links(self) -> list[Link]:
        """Every link of this netns: index, name, kind (IFLA_INFO_KIND), IFLA_LINK and IFLA_LINK_NETNSID."""
        skip_stats = _attr(IFLA_EXT_MASK, struct.pack("=I", RTEXT_FILTER_SKIP_STATS))
        req = _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + skip_stats
        out = []
        for kind, body in self.request(RTM_GETLINK, req, dump=True):
            if kind != RTM_NEWLINK or len(body) < _IFINFO.size:
                continue
            attrs = parse_attrs(body, _IFINFO.size)
            info = parse_attrs(attrs.get(IFLA_LINKINFO, b""))
            nsid = attrs.get(IFLA_LINK_NETNSID)
            out.append(Link(
                index=_IFINFO.unpack_from(body)[2],
                name=_cstr(attrs.get(IFLA_IFNAME, b"")),
                kind=_cstr(info.get(IFLA_INFO_KIND, b"")),
                link=struct.unpack("=I", attrs[IFLA_LINK])[0] if len(attrs.get(IFLA_LINK, b"")) == 4 else 0,
                link_netnsid=struct.unpack("=i", nsid)[0] if nsid is not None and len(nsid) == 4 else None,
            ))
        return out

    def nsid(self, fd: int) -> int | None:
        """The nsid this netns assigned to the netns open at ``fd`` (RTM_GETNSID); None when none is."""
        answer = self.request(RTM_GETNSID, _RTGEN.pack(socket.AF_UNSPEC) + _attr(NETNSA_FD, struct.pack("=I", fd)))
        for kind, body in answer:
            raw = parse_attrs(body, _RTGEN.size).get(NETNSA_NSID) if kind == RTM_NEWNSID else None
            if raw is not None and len(raw) == 4:
                value = struct.unpack("=i", raw)[0]
                return None if value == NSID_NOT_ASSIGNED else value
        return None


@dataclass(frozen=True)
class Link:
    """One link as :meth:`Rtnl.links` reports it (link_netnsid None: its peer is in this netns)."""

    index: int
    name: str
    kind: str
    link: int
    link_netnsid: int | None


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")
