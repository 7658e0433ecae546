"""Which kinds of BPF hook this kernel offers, detected once at start-up.

netwatchd is built on tracepoints and tc (stable, and what works everywhere we run); kprobes and fentry are
detected so the logs and `netwatch_hook_available` say plainly what the node lacks. A probe whose hook is
missing is reported as not attached; the daemon carries on with the others.

Everything here is read from tracefs and BTF, except fentry: only a real attach tells (BCC's support_kfunc()
can say yes while the kernel refuses), and that needs the compiler, so the daemon asks a compiler child
(`probes.loader.probe_fentry`, in parallel with the probes' compiles) and passes the answer in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HOOK_KINDS = ("tracepoint", "raw_tracepoint", "tc", "tcx", "kprobe", "fentry")


@dataclass(frozen=True)
class HookStatus:
    kind: str
    available: bool
    detail: str


def _tracefs_has(tracefs: Path, name: str) -> bool:
    category, _, event = name.partition(":")
    return (tracefs / "events" / category / event / "id").is_file()


def tracepoint_exists(tracefs: Path, name: str) -> bool:
    """True when `category:event` is a tracepoint of the running kernel."""
    return _tracefs_has(tracefs, name)


def detect(tracefs: Path, btf_has_type: Callable[[str], bool],
           fentry: tuple[bool, str] | None = None) -> list[HookStatus]:
    """Detect every hook kind. `btf_has_type(name)` answers whether the kernel's BTF defines a type; `fentry`
    is (available, detail) from a test attach, None when not tried."""
    out: list[HookStatus] = []
    tp_ok = (tracefs / "events").is_dir()
    out.append(HookStatus("tracepoint", tp_ok, f"tracefs at {tracefs}" if tp_ok else "no tracefs events"))
    raw_ok = tp_ok and btf_has_type("bpf_raw_tracepoint_args")
    out.append(HookStatus("raw_tracepoint", raw_ok, "bpf_raw_tracepoint_args in BTF" if raw_ok else "missing"))
    tc_ok = btf_has_type("tcf_proto") and btf_has_type("mini_Qdisc")
    out.append(HookStatus("tc", tc_ok, "clsact qdisc and cls_bpf" if tc_ok else "no clsact/cls_bpf in BTF"))
    tcx_ok = btf_has_type("tcx_entry")
    out.append(HookStatus("tcx", tcx_ok, "tcx_entry in BTF" if tcx_ok else "kernel older than 6.6 or no tcx"))
    kprobe_ok = (tracefs / "kprobe_events").exists() or Path("/sys/bus/event_source/devices/kprobe").exists()
    out.append(HookStatus("kprobe", kprobe_ok, "kprobe_events present" if kprobe_ok else "CONFIG_KPROBES is off"))
    out.append(fentry_status(fentry))
    return out


def fentry_status(fentry: tuple[bool, str] | None) -> HookStatus:
    if fentry is None:
        return HookStatus("fentry", False, "not tried (yet)")
    return HookStatus("fentry", fentry[0], fentry[1])
