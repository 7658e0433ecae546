"""Which kinds of BPF hook this kernel offers, detected once at start-up.

netwatchd is built on tracepoints and tc (stable, and what works everywhere we run); kprobes and fentry are
detected so the logs and `netwatch_hook_available` say plainly what the node lacks. A probe whose hook is
missing is reported as not attached; the daemon carries on with the others.
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


def _try_fentry() -> str | None:
    """Load and attach a minimal fentry program; None when it works, else why not.

    BCC's `support_kfunc()` can say yes while the kernel still refuses the attach (seen on our CI
    kernels), so only a real attach counts.
    """
    try:
        from bcc import BPF

        if not BPF.support_kfunc():
            return "BCC reports no kfunc support in this kernel"
        prog = BPF(text="KFUNC_PROBE(tcp_v4_connect) { return 0; }")
        prog.cleanup()
        return None
    except Exception as exc:  # noqa: BLE001 - any failure means "not available"
        return f"attach refused: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"


def detect(tracefs: Path, btf_has_type: Callable[[str], bool], try_fentry: bool = True) -> list[HookStatus]:
    """Detect every hook kind. `btf_has_type(name)` answers whether the kernel's BTF defines a type."""
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
    if try_fentry:
        why = _try_fentry()
        out.append(HookStatus("fentry", why is None, why or "attached a test program"))
    else:
        out.append(HookStatus("fentry", False, "not tried"))
    return out
