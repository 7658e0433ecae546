"""Compiles netwatchd's BPF C sources with BCC, passing kernel struct offsets resolved from BTF.

The C sources live in the repository's top-level `bpf/` and ship inside the wheel as `netwatchd/bpf`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import netwatchd

# Every struct member a program may read: -D name -> (struct, member path). Resolved once per start from
# /sys/kernel/btf/vmlinux, because the headers BCC compiles with may describe another kernel.
KERNEL_OFFSETS: dict[str, tuple[str, str]] = {
    "SKB_HEAD_OFF": ("sk_buff", "head"),
    "SKB_NETWORK_HEADER_OFF": ("sk_buff", "network_header"),
    "SKB_TRANSPORT_HEADER_OFF": ("sk_buff", "transport_header"),
    "SKB_LEN_OFF": ("sk_buff", "len"),
    "SKB_DEV_OFF": ("sk_buff", "dev"),
    "SKB_SK_OFF": ("sk_buff", "sk"),
    "NETDEV_IFINDEX_OFF": ("net_device", "ifindex"),
    "NETDEV_ND_NET_OFF": ("net_device", "nd_net"),
    "NET_NS_INUM_OFF": ("net", "ns.inum"),
    "SK_NET_OFF": ("sock_common", "skc_net"),
    "SK_ERR_OFF": ("sock", "sk_err"),
}

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


def bpf_source_dir() -> Path:
    """The installed `netwatchd/bpf`, or the repository's `bpf/` in a development checkout."""
    pkg = Path(netwatchd.__file__).resolve().parent
    for cand in (pkg / "bpf", pkg.parent / "bpf"):
        if (cand / "include" / "netwatch.h").is_file():
            return cand
    raise FileNotFoundError(f"BPF sources not found next to {pkg} (expected netwatchd/bpf or ../bpf)")


def offset_cflags(btf) -> list[str]:
    """-D flags for KERNEL_OFFSETS (all required) and the OPTIONAL_OFFSETS this kernel has."""
    flags = btf.offsets_as_cflags(KERNEL_OFFSETS)
    for name, parts in OPTIONAL_OFFSETS.items():
        try:
            flags.append(f"-D{name}={sum(btf.member_offset(st, member) for st, member in parts)}")
        except Exception:  # noqa: BLE001 - member absent on this kernel: the feature is compiled out
            continue
    return flags


def compile_program(source: str, btf, defines: Mapping[str, int | str] | None = None):
    """Compile `bpf/<source>` with BCC; TRACEPOINT_PROBE programs attach as the module loads."""
    from bcc import BPF  # imported late: preflight reports a missing bcc with a clear message

    src_dir = bpf_source_dir()
    cflags = [f"-I{src_dir / 'include'}", "-Wno-macro-redefined", *offset_cflags(btf)]
    cflags += [f"-D{k}={v}" for k, v in (defines or {}).items()]
    return BPF(src_file=str(src_dir / source), cflags=cflags)
