"""Section 1, datapath overhead: baseline vs netwatchd vs ``tcpdump -w`` in interleaved, pinned pairs.

Pod->pod and pod->service (ClusterIP DNAT) through the bridge: TCP stream throughput (iperf3, client and
server pinned to one CPU: single-CPU runs are much steadier on this VM than 2-CPU ones) and 1-byte TCP
request/response (``bench/rr.c``: rate, p99, CPU per transaction from /proc/stat). Every repetition runs every
mode back to back, order alternating (ABC, CBA, ...), and a ratio is taken against the baseline of the same
repetition, so slow drift of a shared VM cancels out.

netwatchd runs with its defaults, whatever they cost: if it holds kernel BPF run-time statistics on (two clock
reads per run of every BPF program on the node), that is part of what is measured. Which processes held them
during the runs is recorded (``bpf_stats``), because one held by anyone else would slow the baseline too.
"""

from __future__ import annotations

import json
import re
import select
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bench import measure, rr
from bench.config import BUSY_WARNING_PCT, IPERF_PORT, RR_PORT, VIP, log
from bench.report import DATAPATH_ROWS, NA, DatapathResults, SummaryRow, median, target_text
from bench.world import Bench, Netwatchd, start_iperf_server, stats_holders_note


class Baseline:
    name = "baseline"
    pid = None

    def start(self) -> None:
        pass

    def stop(self) -> dict[str, float]:
        return {}


class Tcpdump:
    """``tcpdump -i <client's host veth> -w /dev/null`` in the node netns, as a user would run it."""

    name = "tcpdump"

    def __init__(self, b: Bench) -> None:
        self.b = b
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> None:
        self.proc = self.b.node.popen(["tcpdump", "-i", self.b.client.host_veth, "-w", "/dev/null"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.proc.poll() is None:
            ready = select.select([self.proc.stderr], [], [], 0.1)[0]
            if ready and "listening on" in self.proc.stderr.readline():
                return
        self.stop()
        raise RuntimeError("tcpdump did not start listening within 10 s")

    def stop(self) -> dict[str, float]:
        """SIGINT (tcpdump prints its counters then) and return captured/dropped packet counts."""
        if self.proc is None:
            return {}
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate(timeout=5)
        counts = {m.group(2): float(m.group(1)) for m in re.finditer(r"(\d+) packets? ([a-z ]+?)\s*$", err, re.M)}
        return {"captured": counts.get("captured", 0), "received": counts.get("received by filter", 0),
                "dropped": counts.get("dropped by kernel", 0)}


def cpu_fields(before: dict[str, measure.CpuTimes], cpu: int, work: float) -> dict[str, float]:
    """CPU spent since ``before`` per unit of ``work``: over all CPUs (the target's measure), on the pinned
    load CPU alone (the datapath, where the BPF programs run; less noisy), and how busy the other CPUs were
    (the daemon's or tcpdump's user space, and anything else running on this VM)."""
    d = measure.cpu_delta(before, measure.CpuTimes.read())
    others = [v for k, v in d.items() if k not in ("cpu", f"cpu{cpu}")]
    other_total = sum(v.total for v in others)
    return {"cpu_all": d["cpu"].busy / work, "cpu_load": d[f"cpu{cpu}"].busy / work,
            "other_busy_pct": 100 * sum(v.busy for v in others) / other_total if other_total else 0.0}


def run_stream(b: Bench, dst: str) -> dict[str, float]:
    """One pinned iperf3 run: throughput and CPU seconds per GB received."""
    argv = rr.pinned(b.cfg.cpu, ["iperf3", "-c", dst, "-p", str(IPERF_PORT), "-t", f"{b.cfg.seconds:g}", "-J"])
    for attempt in (1, 2):
        cpu0 = measure.CpuTimes.read()
        res = b.client.run(argv, check=False, timeout=b.cfg.seconds + 30)
        try:
            out = json.loads(res.stdout)
        except json.JSONDecodeError:
            out = {"error": res.stderr.strip() or "no JSON output"}
        if "error" not in out:
            recv = out["end"]["sum_received"]
            return {"gbps": recv["bits_per_second"] / 1e9, **cpu_fields(cpu0, b.cfg.cpu, recv["bytes"] / 1e9)}
        log(f"iperf3 to {dst} failed (attempt {attempt}): {out['error']}; restarting the server")
        start_iperf_server(b)
    raise RuntimeError(f"iperf3 to {dst} failed twice: {out['error']}")


def run_rr(b: Bench, dst: str) -> dict[str, float]:
    """One back-to-back 1-byte request/response run: rate, p99 and CPU microseconds per transaction."""
    for attempt in (1, 2):
        cpu0 = measure.CpuTimes.read()
        try:
            res = rr.client(b.rr_bin, b.client, dst, RR_PORT, b.cfg.seconds, cpu=b.cfg.cpu)
        except (subprocess.SubprocessError, ValueError, KeyError) as exc:
            if attempt == 2:
                raise
            log(f"rr to {dst} failed (attempt 1): {exc}")
            continue
        cpu = cpu_fields(cpu0, b.cfg.cpu, max(res.transactions, 1) / 1e6)
        return {"rate": res.rate, "p99_us": res.p99_us, **cpu}
    raise AssertionError("unreachable")


@dataclass
class DatapathRun:
    """Section 1's results: the runs, tcpdump's counters, and who held BPF stats on during each mode."""

    results: DatapathResults
    tcpdump_stats: list[dict[str, float]] = field(default_factory=list)
    daemon_held_stats: list[bool] = field(default_factory=list)  # per netwatchd block
    others_held_stats: dict[str, set[str]] = field(default_factory=dict)  # mode -> "comm[pid]" seen


def datapath(b: Bench) -> DatapathRun:
    """Every mode in every repetition, order alternating."""
    modes: list = [Baseline(), Netwatchd(b)] + ([Tcpdump(b)] if b.cfg.tcpdump else [])
    paths = {"pod->pod": b.server.ip, "pod->service": VIP}
    tests: dict[str, Callable[[Bench, str], dict[str, float]]] = {"stream": run_stream, "rr": run_rr}
    out = DatapathRun(DatapathResults([m.name for m in modes], list(paths)))
    for rep in range(b.cfg.reps):
        order = modes if rep % 2 == 0 else modes[::-1]
        if b.quiet:
            b.quiet.wait(f"repetition {rep + 1}")
        for mode in order:
            mode.start()
            try:
                _note_stats(out, mode)
                for test, fn in tests.items():
                    for path, dst in paths.items():
                        m = fn(b, dst)
                        out.results.runs[(mode.name, path, test, rep)] = m
                        log(f"rep {rep + 1}/{b.cfg.reps} {mode.name:9} {test:6} {path:12} "
                            + " ".join(f"{k}={v:.4g}" for k, v in m.items()))
            finally:
                stats = mode.stop()
            if mode.name == "tcpdump":
                out.tcpdump_stats.append(stats)
    return out


def _note_stats(out: DatapathRun, mode) -> None:
    """Record whether the daemon (netwatchd mode) and anything else hold BPF run-time stats on right now."""
    mine, others = stats_holders_note(mode.pid)
    if mode.name == "netwatchd":
        out.daemon_held_stats.append(mine)
    out.others_held_stats.setdefault(mode.name, set()).update(f"{c}[{p}]" for p, c in others.items())


# --- results ------------------------------------------------------------------------------------------------


def render(run: DatapathRun, cfg) -> str:
    """The datapath table and what may have disturbed it."""
    dp = run.results
    out = [
        f"### Datapath overhead: {cfg.reps} interleaved repetition(s) of {cfg.seconds:g} s runs",
        "",
        "Lab node: pods on a bridge (cni0) through veths; pod->service goes through a kube-proxy style ClusterIP "
        f"DNAT. Load pinned to CPU {cfg.cpu} (iperf3 client and server together; rr client and server together). "
        "Ratio = value / baseline of the same repetition: median (min-max; distribution-free 95% confidence "
        "interval of the median, from 6 pairs on). `clear` = the whole interval is on the verdict's side of the "
        "target, `inconclusive` = it straddles the target (more pairs needed). CPU = busy time of all CPUs from "
        "/proc/stat over the run (includes netwatchd's or tcpdump's own user-space work).",
        "",
        dp.render(),
        "",
        "Other CPU(s) busy during the runs (median; the daemon's or tcpdump's user space plus anything else on "
        "this VM): " + ", ".join(f"{m} {median(dp.all_values(m, 'other_busy_pct')):.0f}%" for m in dp.modes) + ".",
        "",
        _stats_note(run),
    ]
    background = median(dp.all_values("baseline", "other_busy_pct"))
    if background > BUSY_WARNING_PCT:
        out += ["", f"**Warning: other work ran on this VM during the benchmark (the CPU(s) not running the load "
                f"were {background:.0f}% busy in baseline runs, where nothing of ours runs there). Throughput and "
                "CPU ratios are unreliable; rerun on an idle machine.**"]
    lost = [s["dropped"] / s["received"] * 100 for s in run.tcpdump_stats if s.get("received")]
    if run.tcpdump_stats:
        out += ["", f"tcpdump lost {median(lost):.1f}% of the packets it saw (dropped by kernel / received by "
                f"filter, median of {len(lost)} block(s))." if lost else "tcpdump reported no counters."]
    return "\n".join(out)


def _stats_note(run: DatapathRun) -> str:
    held = sum(run.daemon_held_stats)
    text = (f"Kernel BPF run-time statistics: netwatchd (defaults) held them on in {held} of its "
            f"{len(run.daemon_held_stats)} block(s) (a BPF_ENABLE_STATS fd at the start of the block).")
    others = sorted(set().union(*run.others_held_stats.values())) if run.others_held_stats else []
    if others:
        text += (f" **Other processes on this machine held them on during the runs ({', '.join(others[:6])}): "
                 "every BPF program on the node, in every mode, paid two clock reads per run then.**")
    return text


def summary(run: DatapathRun) -> list[SummaryRow]:
    dp, rows = run.results, []
    targets = [r for r in DATAPATH_ROWS if r.target]
    for row in targets:
        for path in dp.paths:
            j = dp.judge(path, row)
            rows.append(SummaryRow(f"{row.label.split(',')[0]}, netwatchd / baseline, {path}", j.cell(),
                                   target_text(row.target, "x"), j.verdict, j.support))
    if "tcpdump" not in dp.modes:
        return rows + [SummaryRow("netwatchd below tcpdump", "tcpdump mode skipped", "", NA)]
    for row in targets:
        for path in dp.paths:
            j = dp.versus_tcpdump(path, row)
            better = "higher" if row.higher_is_better else "lower"
            rows.append(SummaryRow(f"netwatchd below tcpdump: {row.label.split(',')[0]}, {path}",
                                   f"netwatchd / tcpdump {j.cell()}", f"{target_text(j.target)} ({better} is better)",
                                   j.verdict, j.support))
    return rows
