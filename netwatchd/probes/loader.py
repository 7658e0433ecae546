"""Compiles netwatchd's BPF C sources with BCC, passing kernel struct offsets resolved from BTF.

The C sources live in the repository's top-level `bpf/` and ship inside the wheel as `netwatchd/bpf`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import netwatchd

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


def compile_program(source: str, btf, defines: Mapping[str, int | str] | None = None):
    """Compile `bpf/<source>` with BCC; TRACEPOINT_PROBE programs attach as the module loads."""
    from bcc import BPF  # imported late: preflight reports a missing bcc with a clear message

    src_dir = bpf_source_dir()
    cflags = [f"-I{src_dir / 'include'}", "-Wno-macro-redefined", *offset_cflags(btf)]
    cflags += [f"-D{k}={v}" for k, v in (defines or {}).items()]
    return BPF(src_file=str(src_dir / source), cflags=cflags)


def attach_raw_tracepoints(bpf, programs: Mapping[str, str]) -> None:
    """Attach each function `name` of a compiled module to raw tracepoint `event` ({name: event}).

    Raw tracepoints hand the program the tracepoint's arguments as they are; a classic tracepoint first fills
    its whole trace record, on every event, whether or not the program wants it.
    """
    for fn_name, event in programs.items():
        bpf.attach_raw_tracepoint(tp=event, fn_name=fn_name)
