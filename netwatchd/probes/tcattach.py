"""Keeping the tc probe's programs attached to the right interfaces, and only there, as interfaces come and go.

Roles (decided by :func:`plan_roles`, a pure function over what netlink says about each link):

- ``pod``: the host end of a pod's veth (a veth whose peer lives in another network namespace) that is not an
  uplink. Programs on ingress (what the pod sends) and egress (what it receives).
- ``uplink``: how the node reaches the network. ``--tc-uplinks auto`` (default): devices holding a default
  route, overlay devices (vxlan, geneve, ipip, gre, wireguard, ...), devices with a global address that are not
  bridges or dummies, and physical/bond/vlan ports of a bridge; extra fnmatch patterns may be listed
  (``auto,eth*``) or replace auto detection (``eth0,flannel.1``). Programs on ingress and egress.
- ``bridge``: a bridge (cni0). No program (every frame crossing it crosses one of its ports, which have
  them); its ifindex is in the kernel's role map because routed pod traffic carries it as skb_iif.

How programs are attached (`--tc-attach`):

- ``tcx`` (default where the kernel has it, 6.6+): one BPF link per (interface, direction) through
  ``BPF_LINK_CREATE`` (BCC 0.26 has no helper, so :func:`bpf_link_create` calls bpf(2) with ctypes). tcx
  programs and links of other components (a CNI) coexist with ours and classic tc filters are not touched at
  all; ingress goes first (``BPF_F_BEFORE``, to stamp packets before anyone else runs), egress last. The kernel
  detaches a link when its last fd closes, so nothing of ours survives netwatchd, even after SIGKILL.
- ``clsact`` (fallback): a cls_bpf filter with our own priority and handle (``--tc-clsact-prio``, handle
  0x4e57) on the clsact qdisc, created if missing. Other filters are never touched; on exit we delete exactly
  our filters, and the clsact qdisc only if we created it and nothing else uses it. Filters left by a netwatchd
  that was killed are recognised (our prio, handle and a program name starting ``nw_tc_``) and replaced.
  Limitation: a foreign filter with a lower priority that returns a verdict hides packets from ours.

:class:`TcManager` reconciles attachments with :func:`plan_roles` at start, within about 50 ms of any
rtnetlink link/address/route notification (a veth created by a CNI, an uplink getting its address), and every
``resync`` seconds (5 min) in case a notification was lost. A device that disappears takes its tcx links / filters
with it; we just forget it.
"""

from __future__ import annotations

import contextlib
import ctypes
import fnmatch
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import structlog

log = structlog.get_logger("netwatchd.tc")

ROLE_POD, ROLE_BRIDGE, ROLE_UPLINK = "pod", "bridge", "uplink"
ROLE_CODES = {ROLE_POD: 1, ROLE_BRIDGE: 2, ROLE_UPLINK: 3}  # bpf/tc.c NW_ROLE_*
ATTACHED_ROLES = (ROLE_POD, ROLE_UPLINK)
OVERLAY_KINDS = frozenset({"vxlan", "geneve", "ipip", "sit", "ip6tnl", "gre", "ip6gre", "gretap", "ip6gretap",
                           "erspan", "ip6erspan", "wireguard", "bareudp"})
PORT_KINDS = frozenset({"", "bond", "team", "vlan"})  # bridge ports that connect a bridge to the network
NOT_UPLINK_KINDS = frozenset({"bridge", "dummy", "ifb", "nlmon", "vrf"})

_SYS_BPF = 321  # x86_64
_BPF_F_BEFORE = 1 << 3
_TC_H_INGRESS, _TC_H_EGRESS = 0xFFFFFFF2, 0xFFFFFFF3  # clsact's ffff:fff2 / ffff:fff3
CLSACT_HANDLE = 0x4E57  # "NW"
DEFAULT_CLSACT_PRIO = 0x4E57
_IFF_LOOPBACK = 0x8
_RTMGRP = 0x1 | 0x10 | 0x40 | 0x100 | 0x400  # LINK, IPV4_IFADDR, IPV4_ROUTE, IPV6_IFADDR, IPV6_ROUTE
# Changes arrive as rtnetlink notifications (and an overrun socket, ENOBUFS, is drained and answered with a
# rescan), so the periodic rescan is only a safety net: a full link/address/route dump every 10 s cost ~1-2 %
# of a core on an idle 110-pod node.
RESYNC_S = 300.0


@dataclass(frozen=True)
class Link:
    """What :func:`plan_roles` needs to know about one interface of our netns."""

    ifindex: int
    name: str
    kind: str = ""  # IFLA_INFO_KIND; "" for a physical device
    master: int = 0  # ifindex of the bridge (or bond) it is enslaved to
    peer_netnsid: int | None = None  # veth: the nsid of the peer's netns, None when the peer is in ours
    global_address: bool = False
    default_route: bool = False
    loopback: bool = False
    overlay_port: int = 0  # vxlan/geneve UDP destination port (host order)


def parse_uplinks(spec: str) -> tuple[bool, tuple[str, ...]]:
    """``--tc-uplinks``: (auto detection on?, fnmatch patterns). "auto" alone is the default; "" means none."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    return "auto" in parts, tuple(p for p in parts if p != "auto")


def is_auto_uplink(link: Link, links: Mapping[int, Link]) -> bool:
    """`--tc-uplinks auto`: does this link connect the node to the network? (A bridge never: its NIC port does.)"""
    if link.loopback or link.kind in NOT_UPLINK_KINDS:
        return False
    if link.kind in OVERLAY_KINDS or link.default_route:
        return True
    master = links.get(link.master)
    if master is not None and master.kind == "bridge":
        return link.kind in PORT_KINDS  # a NIC in a bridge; a pod veth in a bridge is not an uplink
    return link.global_address


def plan_roles(links: Iterable[Link], uplinks: str = "auto") -> dict[int, str]:
    """ifindex -> role (:data:`ROLE_POD`, :data:`ROLE_UPLINK`, :data:`ROLE_BRIDGE`) for the links that have one."""
    by_index = {link.ifindex: link for link in links}
    auto, patterns = parse_uplinks(uplinks)
    out: dict[int, str] = {}
    for link in by_index.values():
        if link.loopback:
            continue
        if any(fnmatch.fnmatchcase(link.name, p) for p in patterns) or (auto and is_auto_uplink(link, by_index)):
            out[link.ifindex] = ROLE_UPLINK
        elif link.kind == "bridge":
            out[link.ifindex] = ROLE_BRIDGE
        elif link.kind in ("veth", "netkit") and link.peer_netnsid is not None:
            out[link.ifindex] = ROLE_POD
    return out


def overlay_ports(links: Iterable[Link]) -> set[int]:
    """UDP ports of the overlay devices (their encapsulated traffic is counted on the overlay device)."""
    return {link.overlay_port for link in links if link.overlay_port}


def discover(ipr) -> list[Link]:
    """Every link of the netns `ipr` talks to, with addresses and default routes (pyroute2 IPRoute)."""
    global_addr: set[int] = set()
    for msg in ipr.get_addr():
        if msg.get("scope", 0) == 0:  # RT_SCOPE_UNIVERSE
            global_addr.add(msg["index"])
    default: set[int] = set()
    for family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(Exception):
            for route in ipr.get_default_routes(family=family):
                oif = route.get_attr("RTA_OIF")
                if oif:
                    default.add(oif)
                for hop in route.get_attr("RTA_MULTIPATH") or ():
                    default.add(hop["oif"])
    out = []
    for msg in ipr.get_links():
        info = msg.get_attr("IFLA_LINKINFO")
        kind = (info.get_attr("IFLA_INFO_KIND") if info is not None else None) or ""
        port = 0
        data = info.get_attr("IFLA_INFO_DATA") if info is not None else None
        if data is not None and kind in ("vxlan", "geneve"):
            port = int(data.get_attr("IFLA_VXLAN_PORT" if kind == "vxlan" else "IFLA_GENEVE_PORT") or 0)
        nsid = msg.get_attr("IFLA_LINK_NETNSID")
        out.append(Link(
            ifindex=msg["index"],
            name=msg.get_attr("IFLA_IFNAME") or "",
            kind=kind,
            master=int(msg.get_attr("IFLA_MASTER") or 0),
            peer_netnsid=None if nsid is None or nsid in (-1, 0xFFFFFFFF) else int(nsid),
            global_address=msg["index"] in global_addr,
            default_route=msg["index"] in default,
            loopback=bool(msg["flags"] & _IFF_LOOPBACK),
            overlay_port=port,
        ))
    return out


# --------------------------------------------------------------------------------------------------------
# Attachers
# --------------------------------------------------------------------------------------------------------


class _LinkCreateAttr(ctypes.Structure):
    """union bpf_attr's link_create member, tcx variant (include/uapi/linux/bpf.h)."""

    _fields_ = [
        ("prog_fd", ctypes.c_uint32),
        ("target_ifindex", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("relative_fd", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("expected_revision", ctypes.c_uint64),
        ("_rest", ctypes.c_uint8 * 32),
    ]


def bpf_link_create(cmd: int, prog_fd: int, ifindex: int, attach_type: int, flags: int = 0) -> int:
    """bpf(BPF_LINK_CREATE) for a tcx attach point; returns the link fd (closing it detaches)."""
    libc = ctypes.CDLL(None, use_errno=True)
    attr = _LinkCreateAttr(prog_fd=prog_fd, target_ifindex=ifindex, attach_type=attach_type, flags=flags)
    fd = libc.syscall(_SYS_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"BPF_LINK_CREATE on ifindex {ifindex}: {os.strerror(err)}")
    return fd


class TcxAttacher:
    """tcx links: coexist with everything else; the kernel drops them when netwatchd's fds close."""

    mode = "tcx"

    def __init__(self, link_create_cmd: int, ingress_type: int, egress_type: int) -> None:
        self.cmd, self.types = link_create_cmd, {True: ingress_type, False: egress_type}

    def attach(self, ifindex: int, ingress: bool, prog_fd: int, name: str) -> int:
        return bpf_link_create(self.cmd, prog_fd, ifindex, self.types[ingress], _BPF_F_BEFORE if ingress else 0)

    def detach(self, ifindex: int, ingress: bool, handle: int, gone: bool = False) -> None:
        os.close(handle)

    def close(self) -> None:
        pass

    @classmethod
    def from_btf(cls, btf) -> TcxAttacher:
        types = btf.enum_values("bpf_attach_type")
        cmds = btf.enum_values("bpf_cmd")
        return cls(cmds["BPF_LINK_CREATE"], types["BPF_TCX_INGRESS"], types["BPF_TCX_EGRESS"])


class ClsactAttacher:
    """cls_bpf filters with our own prio/handle on clsact; other filters and a pre-existing qdisc untouched."""

    mode = "clsact"

    def __init__(self, prio: int = DEFAULT_CLSACT_PRIO) -> None:
        from pyroute2 import IPRoute

        if not 0 < prio <= 0xFFFF:
            raise ValueError(f"clsact filter priority must be 1..65535, not {prio}")
        self.prio = prio
        self.ipr = IPRoute()
        self.created: set[int] = set()  # ifindexes whose clsact qdisc we added
        self.lock = threading.Lock()

    def _has_clsact(self, ifindex: int) -> bool:
        return any(q.get_attr("TCA_KIND") == "clsact" for q in self.ipr.get_qdiscs(index=ifindex))

    def _ours(self, ifindex: int, parent: int) -> bool:
        for flt in self.ipr.get_filters(index=ifindex, parent=parent):
            if flt["info"] >> 16 == self.prio and flt["handle"] == CLSACT_HANDLE:
                opts = flt.get_attr("TCA_OPTIONS")
                name = (opts.get_attr("TCA_BPF_NAME") if opts is not None else None) or ""
                return name.startswith("nw_tc_")
        return False

    def _others(self, ifindex: int) -> bool:
        return any(flt["handle"] for parent in (_TC_H_INGRESS, _TC_H_EGRESS)
                   for flt in self.ipr.get_filters(index=ifindex, parent=parent))

    def attach(self, ifindex: int, ingress: bool, prog_fd: int, name: str) -> int:
        parent = _TC_H_INGRESS if ingress else _TC_H_EGRESS
        with self.lock:
            if not self._has_clsact(ifindex):
                self.ipr.tc("add", "clsact", ifindex)
                self.created.add(ifindex)
            elif self._ours(ifindex, parent):  # left by a netwatchd that did not exit cleanly
                self.ipr.tc("del-filter", "bpf", ifindex, CLSACT_HANDLE, parent=parent, prio=self.prio)
            self.ipr.tc("add-filter", "bpf", ifindex, CLSACT_HANDLE, fd=prog_fd, name=name, parent=parent,
                        prio=self.prio, classid=1, direct_action=True)
        return parent

    def detach(self, ifindex: int, ingress: bool, handle: int, gone: bool = False) -> None:
        if gone:
            self.created.discard(ifindex)
            return
        with self.lock:
            try:
                self.ipr.tc("del-filter", "bpf", ifindex, CLSACT_HANDLE, parent=handle, prio=self.prio)
            except Exception as exc:  # noqa: BLE001 - device or filter gone meanwhile
                log.debug("tc_filter_delete_failed", ifindex=ifindex, error=str(exc))

    def release_qdisc(self, ifindex: int) -> None:
        """Delete the clsact qdisc if we created it and no filter of anyone else is left on it."""
        with self.lock:
            if ifindex not in self.created:
                return
            self.created.discard(ifindex)
            try:
                if not self._others(ifindex):
                    self.ipr.tc("del", "clsact", ifindex)
            except Exception as exc:  # noqa: BLE001 - device gone meanwhile
                log.debug("tc_clsact_delete_failed", ifindex=ifindex, error=str(exc))

    def close(self) -> None:
        self.ipr.close()


# --------------------------------------------------------------------------------------------------------
# Manager
# --------------------------------------------------------------------------------------------------------


@dataclass
class Attachment:
    ifindex: int
    name: str
    role: str
    handles: dict[bool, int] = field(default_factory=dict)  # ingress? -> attacher handle


class TcManager:
    """Attaches `programs[role] = (ingress prog fd, egress prog fd, ingress name, egress name)` to every link
    :func:`plan_roles` gives that role, keeps it so while links change, and detaches all on `stop()`.

    `on_plan(roles, overlay_ports)` is called before any attach with the full plan (the kernel's role map
    must know a device before packets from it are seen at an egress hook).
    """

    def __init__(self, attacher, programs: Mapping[str, tuple[int, int, str, str]],
                 on_plan: Callable[[dict[int, str], set[int]], None], uplinks: str = "auto",
                 resync: float = RESYNC_S, debounce: float = 0.05, discover_fn: Callable[[], list[Link]] | None = None
                 ) -> None:
        self.attacher = attacher
        self.programs = dict(programs)
        self.on_plan = on_plan
        self.uplinks = uplinks
        self.resync = resync
        self.debounce = debounce
        self._discover = discover_fn or self._discover_default
        self.attached: dict[int, Attachment] = {}
        self.errors = 0
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    @staticmethod
    def _discover_default() -> list[Link]:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            return discover(ipr)

    def start(self) -> TcManager:
        """Subscribe to rtnetlink first (no change slips between the first scan and the watch), attach, watch."""
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self._sock.bind((0, _RTMGRP))
        self.reconcile()
        self._thread = threading.Thread(target=self._run, name="netwatchd-tc-links", daemon=True)
        self._thread.start()
        return self

    def counts(self) -> dict[str, int]:
        """Attached interfaces per role."""
        with self.lock:
            out = dict.fromkeys(ATTACHED_ROLES, 0)
            for att in self.attached.values():
                out[att.role] += 1
            return out

    def reconcile(self) -> None:
        links = self._discover()
        plan = plan_roles(links, self.uplinks)
        names = {link.ifindex: link.name for link in links}
        self.on_plan(plan, overlay_ports(links))
        with self.lock:
            for ifindex, att in list(self.attached.items()):
                if plan.get(ifindex) != att.role or names.get(ifindex) is None:
                    self._detach(att, gone=ifindex not in names)
            for ifindex, role in sorted(plan.items()):
                if role in self.programs and ifindex not in self.attached:
                    self._attach(ifindex, names[ifindex], role)

    def _attach(self, ifindex: int, name: str, role: str) -> None:
        in_fd, out_fd, in_name, out_name = self.programs[role]
        att = Attachment(ifindex, name, role)
        try:
            att.handles[True] = self.attacher.attach(ifindex, True, in_fd, in_name)
            att.handles[False] = self.attacher.attach(ifindex, False, out_fd, out_name)
        except Exception as exc:  # noqa: BLE001 - e.g. the device vanished meanwhile; next event retries
            self.errors += 1
            log.warning("tc_attach_failed", interface=name, ifindex=ifindex, role=role, error=str(exc))
            self._detach(att, gone=False)
            return
        self.attached[ifindex] = att
        log.info("tc_attached", interface=name, ifindex=ifindex, role=role, mode=self.attacher.mode)

    def _detach(self, att: Attachment, gone: bool) -> None:
        for ingress, handle in att.handles.items():
            try:
                self.attacher.detach(att.ifindex, ingress, handle, gone=gone)
            except Exception as exc:  # noqa: BLE001 - keep detaching the rest
                log.warning("tc_detach_failed", interface=att.name, ifindex=att.ifindex, error=str(exc))
        release = getattr(self.attacher, "release_qdisc", None)
        if release is not None and not gone:
            release(att.ifindex)
        self.attached.pop(att.ifindex, None)
        if att.handles:
            log.info("tc_detached", interface=att.name, ifindex=att.ifindex, role=att.role, gone=gone)

    def _drain(self) -> None:
        assert self._sock is not None
        while select.select([self._sock], [], [], 0)[0]:
            with contextlib.suppress(OSError):  # ENOBUFS: notifications lost; the reconcile rescans anyway
                self._sock.recv(1 << 16)

    def _run(self) -> None:
        assert self._sock is not None
        last = time.monotonic()
        while not self._stop.is_set():
            ready = select.select([self._sock], [], [], 0.5)[0]
            due = time.monotonic() - last >= self.resync
            if not ready and not due:
                continue
            if ready:
                time.sleep(self.debounce)  # a CNI sets a veth up in several steps: one rescan for all
                self._drain()
            if self._stop.is_set():
                return
            try:
                self.reconcile()
            except Exception:  # noqa: BLE001 - keep watching; the next event or resync retries
                self.errors += 1
                log.exception("tc_reconcile_failed")
            last = time.monotonic()

    def stop(self) -> None:
        """Stop watching and detach everything we attached (and only that)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        with self.lock:
            for att in list(self.attached.values()):
                self._detach(att, gone=False)
        self.attacher.close()
