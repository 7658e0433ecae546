"""The compiler child: `python -m netwatchd.probes.compiler --fd N`, started by `probes.loader` for one job.

Only this short-lived process imports bcc (libbcc links LLVM and clang: ~60 MiB mapped on import, ~100 MiB
more per compile), so the daemon that runs for months never holds them. It reads one JSON request from the
unix socket (SOCK_SEQPACKET) it inherited as fd N, answers with one message, and exits:

- ``{"op": "compile", "source": path, "cflags": [...], "programs": [[name, kind], ...]}``: compile the C
  file, load each named function as a program of `kind` (tracepoint, raw_tracepoint, sched_cls), and send
  back ``{"ok": true, "maps": [...], "programs": [...]}`` with every map's and program's file descriptor
  attached (SCM_RIGHTS, in that order). A map entry has its name and the ctypes layouts of its key and value
  (and, for a ring buffer, of the records the C code outputs), see `kernel.ctlayout`.
- ``{"op": "fentry"}``: can this kernel attach an fentry program? ``{"ok": true, "available": bool, "detail"}``.

Failures answer ``{"ok": false, "error": one line, "log": compiler/verifier output}``. Nothing is attached
here: the daemon attaches by fd once this process has exited.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import socket
import sys
import tempfile
import traceback

from netwatchd.kernel import ctlayout

MAX_MESSAGE = 1 << 20
LOG_TAIL = 16000  # characters of compiler/verifier output sent back with an error


@contextlib.contextmanager
def captured_stderr():
    """Collect what BCC, clang and the verifier print on fd 2 (C level) into `log[0]`."""
    log = [""]
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield log
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            log[0] = tmp.read().decode(errors="replace")[-LOG_TAIL:]


def _table_names(bpf) -> list[str]:
    from bcc.libbcc import lib

    lib.bpf_num_tables.restype, lib.bpf_num_tables.argtypes = ctypes.c_ulonglong, [ctypes.c_void_p]
    lib.bpf_table_name.restype = ctypes.c_char_p
    lib.bpf_table_name.argtypes = [ctypes.c_void_p, ctypes.c_ulonglong]
    return [lib.bpf_table_name(bpf.module, i).decode() for i in range(lib.bpf_num_tables(bpf.module))]


def _event_layout(table):
    """Layout of the struct a ring buffer's C code outputs (BCC learns it from the output call), or None."""
    try:
        from bcc.table import _get_event_class

        return ctlayout.describe(_get_event_class(table))
    except Exception:  # noqa: BLE001 - no output call seen for this map
        return None


def compile_job(req: dict) -> tuple[dict, list[int], object]:
    """(reply, fds, the BCC module to keep alive until the reply is sent)."""
    from bcc import BPF

    kinds = {"tracepoint": BPF.TRACEPOINT, "raw_tracepoint": BPF.RAW_TRACEPOINT, "sched_cls": BPF.SCHED_CLS}
    # BCC attaches functions named tracepoint__*/raw_tracepoint__* as the module loads. The daemon attaches
    # every program itself, after this process is gone: never here, so nothing is ever counted twice.
    BPF._trace_autoload = lambda self: None
    with captured_stderr() as log:
        try:
            bpf = BPF(src_file=req["source"].encode(), cflags=list(req["cflags"]))
            progs = []
            for name, kind in req["programs"]:
                if kind not in kinds:
                    raise ValueError(f"unknown program kind {kind!r} for {name}")
                progs.append((name, kind, bpf.load_func(name.encode(), kinds[kind])))
        except Exception as exc:  # noqa: BLE001 - every failure is an answer, not a crash
            err = exc
        else:
            err = None
    if err is not None:
        return {"ok": False, "error": " ".join(str(err).split()) or type(err).__name__, "log": log[0]}, [], None
    maps, fds = [], []
    for name in _table_names(bpf):
        table = bpf[name]
        leaf = getattr(table, "sLeaf", table.Leaf)  # per-CPU tables: BCC's Leaf is an array of the element
        maps.append({"name": name, "key": ctlayout.describe(table.Key), "leaf": ctlayout.describe(leaf),
                     "event": _event_layout(table) if table.ttype == 27 else None})  # 27: BPF_MAP_TYPE_RINGBUF
        fds.append(table.map_fd)
    fds += [fn.fd for _name, _kind, fn in progs]
    reply = {"ok": True, "maps": maps, "programs": [{"name": n, "kind": k} for n, k, _ in progs],
             "warnings": log[0][-2000:]}
    return reply, fds, bpf


def fentry_job() -> dict:
    """Load and attach a minimal fentry program: BCC's support_kfunc() can say yes while the kernel still
    refuses the attach, so only a real attach counts."""
    from bcc import BPF

    with captured_stderr():
        try:
            if not BPF.support_kfunc():
                return {"ok": True, "available": False, "detail": "BCC reports no kfunc support in this kernel"}
            prog = BPF(text="KFUNC_PROBE(tcp_v4_connect) { return 0; }")
            prog.cleanup()
            return {"ok": True, "available": True, "detail": "attached a test program"}
        except Exception as exc:  # noqa: BLE001 - any failure means "not available"
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            return {"ok": True, "available": False, "detail": f"attach refused: {first}"}


def serve(sock: socket.socket) -> None:
    msg = sock.recv(MAX_MESSAGE)
    if not msg:
        return
    keep = None
    try:
        req = json.loads(msg)
        try:
            import bcc  # noqa: F401
        except ImportError as exc:
            reply, fds = {"ok": False, "error": f"the Python module 'bcc' is missing ({exc})", "log": ""}, []
        else:
            if req.get("op") == "compile":
                reply, fds, keep = compile_job(req)
            elif req.get("op") == "fentry":
                reply, fds = fentry_job(), []
            else:
                reply, fds = {"ok": False, "error": f"unknown op {req.get('op')!r}", "log": ""}, []
    except Exception as exc:  # noqa: BLE001 - report, never leave the parent waiting
        reply, fds = {"ok": False, "error": f"compiler child failed: {exc}", "log": traceback.format_exc()}, []
    socket.send_fds(sock, [json.dumps(reply).encode()], fds)
    del keep  # the module (and its fds) may go now: the parent holds its own copies


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "--fd":
        print("usage: python -m netwatchd.probes.compiler --fd N (started by netwatchd)", file=sys.stderr)
        return 2
    with socket.socket(fileno=int(argv[1])) as sock:
        serve(sock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
