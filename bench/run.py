"""netwatchd's overhead benchmark: ``sudo .venv/bin/python -m bench.run [--quick]``.

Builds one lab node (a bridge ``cni0`` with veth pods and a kube-proxy style ClusterIP DNAT, all in network
namespaces) and measures, on its real kernel datapath, with netwatchd running on its default flags (only the
address or identity flags the lab needs):

1. **Datapath overhead** (``bench.datapath``): TCP stream and 1-byte request/response, pod->pod and
   pod->service, baseline vs netwatchd vs ``tcpdump -w``, in interleaved repetitions pinned to one CPU.
2. **Per-program cost against floors** (``bench.steady``): at ~10k packets/s, every netwatchd BPF program's
   ns/event next to an empty program on exactly the same hooks in the same window; kfree_skb per drop for an
   existing key and for a new key.
3. **/metrics scrape time** (``bench.scrape``) at 0, 1k and 10k active drop keys.
4. **The process** (``bench.fullnode``): idle CPU and RSS on a node with 110 pods and pod identity from the lab
   kubelet/apiserver, RSS with 10k active drop keys, start-to-ready and peak RSS during start.

Prints a summary of every target (met / not met) and the tables, and writes them to ``bench/results.md``
(``--quick``: a smoke run of every section at small sizes in < 3 minutes, written to /tmp instead).
Everything the run creates (namespaces, veths, programs, tc attachments, processes) is removed at the end, also
on errors, Ctrl-C and SIGTERM; ``kernel.bpf_stats_enabled`` is restored.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator

from bench import datapath, fullnode, measure, scrape, steady
from bench.config import BUSY_WARNING_PCT, REPO, REQUIRED_TOOLS, Config, log, parse_args
from bench.daemon import describe_probes
from bench.report import NA, SummaryRow, summary_table
from bench.world import Bench, build_lab
from netwatchd.lab.netns import Lab, cleanup_stale


class QuietGate:
    """Waits, from a total budget of ``seconds`` for the whole run, until the machine is quiet.

    This VM may be shared: other work on it makes the datapath ratios noise. Waiting before the run and before
    each repetition lets every repetition start in a quiet moment, without ever waiting more than the budget.
    """

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds
        self.waited = 0.0

    def wait(self, what: str) -> float:
        """Wait (bounded by what is left of the budget) for < BUSY_WARNING_PCT busy; return the last reading."""
        busy, last_said, t0 = machine_busy_pct(), 0.0, time.monotonic()
        while busy > BUSY_WARNING_PCT and time.monotonic() < self.deadline:
            if time.monotonic() - last_said > 60:
                left = self.deadline - time.monotonic()
                log(f"machine {busy:.0f}% busy before {what}; waiting (up to {left:.0f} s more) for < "
                    f"{BUSY_WARNING_PCT}%")
                last_said = time.monotonic()
            time.sleep(3)
            busy = machine_busy_pct()
        self.waited += time.monotonic() - t0
        if busy > BUSY_WARNING_PCT:
            log(f"WARNING: the machine is {busy:.0f}% busy before {what}: expect noisy ratios")
        return busy


def machine_busy_pct(seconds: float = 2.0) -> float:
    """How busy all CPUs together are over ``seconds`` (before we add anything), in percent."""
    before = measure.CpuTimes.read()
    time.sleep(seconds)
    d = measure.cpu_delta(before, measure.CpuTimes.read())["cpu"]
    return 100 * d.busy / d.total if d.total else 0.0


def preflight() -> str | None:
    """A reason the bench cannot run here, or None."""
    if os.geteuid() != 0:
        return "must run as root (network namespaces, BPF, tcpdump): sudo .venv/bin/python -m bench.run"
    missing = [f"{tool} (Debian package {pkg})" for tool, pkg in REQUIRED_TOOLS.items() if not shutil.which(tool)]
    if missing:
        return ("missing tools: " + ", ".join(missing)
                + "; install with apt-get install -y --no-install-recommends <packages>")
    if not measure.BPF_STATS_SYSCTL.exists():
        return f"{measure.BPF_STATS_SYSCTL} is missing: this kernel cannot report per-program BPF run time"
    return None


@contextlib.contextmanager
def terminate_cleanly() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into SystemExit so every ``finally`` (daemon, helpers, lab, sysctl) runs."""
    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class Sections:
    """Runs each section; a section that fails is reported (with its error) instead of ending the run, since the
    daemon under test is under development. Ctrl-C and signals still stop everything."""

    def __init__(self) -> None:
        self.errors: dict[str, str] = {}

    def run(self, name: str, fn: Callable[[], object]) -> object | None:
        log(f"section: {name}")
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - reported in the results, the other sections still run
            log(f"section {name} FAILED: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
            lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
            why = lines[0] + (f" ... {lines[-1]}" if len(lines) > 1 else "") if lines else ""
            self.errors[name] = f"{type(exc).__name__}: {why}"  # e.g. the daemon's first and last log line
            return None


def run_all(cfg: Config, quiet: QuietGate, started: float, load_avg: str) -> str:
    """Build the lab, run the four sections, tear everything down; return the report."""
    with contextlib.ExitStack() as stack:
        lab = stack.enter_context(Lab())
        # After Lab() (which installs its own SIGTERM hook on first use), so ours runs first and unwinds.
        stack.enter_context(terminate_cleanly())
        log(f"lab {lab.id}: building node and pods")
        b = build_lab(cfg, lab, stack)
        b.quiet = quiet
        s = Sections()
        dp = s.run("datapath", lambda: datapath.datapath(b))
        st = s.run("steady load and floors", lambda: steady.steady(b))
        sc = s.run("scrapes", lambda: scrape.scrapes(b))
        fn = s.run("full node", lambda: fullnode.full_node(b))  # last: it adds ~100 pods to the node
        return render(b, dp, st, sc, fn, s.errors, started, load_avg)


def git_describe() -> str:
    res = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True,
                         text=True, check=False)
    return res.stdout.strip() or "unknown"


def header(b: Bench, started: float, load_avg: str) -> list[str]:
    cfg = b.cfg
    waited = b.quiet.waited if b.quiet else 0.0
    flags = (f"**Not the defaults: extra flags `{' '.join(cfg.netwatchd_args)}`.** " if cfg.netwatchd_args else
             "Only these flags (everything else is netwatchd's default): ")
    kind = "quick smoke run: small sizes, short windows; verdicts are not meaningful" if cfg.quick else "full run"
    return [
        f"## netwatchd benchmark ({kind})",
        "",
        f"{dt.datetime.now().strftime('%Y-%m-%d %H:%M')}, commit {git_describe()}, Linux {platform.release()}, "
        f"{os.cpu_count()} CPUs, load average at start {load_avg}; took {(time.monotonic() - started) / 60:.1f} min"
        + (f" ({waited:.0f} s of it waiting for a quiet machine)" if waited >= 1 else "")
        + f". Command: `{' '.join(['python -m bench.run', *cfg.argv])}`.",
        "",
        f"Probes (netwatch_probe_attached): {describe_probes(b.probes)}. netwatchd ran in the lab node's netns. "
        f"{flags}`{' '.join(b.daemon_args)}`; on the full node the lab kubelet/apiserver flags instead.",
    ]


def render(b: Bench, dp, st, sc, fn, errors: dict[str, str], started: float, load_avg: str) -> str:
    """The whole report: header, summary of every target, then each section's tables."""
    rows: list[SummaryRow] = []
    rows += datapath.summary(dp) if dp else [SummaryRow("datapath targets", "section failed", "", NA)]
    rows += steady.summary(st) if st else [SummaryRow("per-program targets", "section failed", "", NA)]
    rows += fullnode.summary(fn, b.starts, b.cfg.quick)
    scraped = (sc or []) + ([fn.scrape] if fn else [])  # the scrape section's rows, then the full node's
    rows += scrape.summary(scraped) if scraped else [SummaryRow("/metrics at 10k keys", "section failed", "", NA)]
    out = header(b, started, load_avg) + ["", "### Summary: every target", "", summary_table(rows)]
    if errors:
        out += ["", "**Sections that failed:** " + "; ".join(f"{k}: `{v}`" for k, v in errors.items())]
    for text in (datapath.render(dp, b.cfg) if dp else None, steady.render(st) if st else None,
                 scrape.render(scraped, b.cfg.scrapes) if scraped else None, fullnode.render(fn, b.starts)):
        if text:
            out += ["", text]
    out += ["", "Noise: baseline-to-baseline spread on this 2-vCPU VM can reach +-20% for raw throughput and ~+-5% "
            "for request/response even with interleaving (FIELD-NOTES); read the ratio ranges and confidence "
            "intervals, and CPU per transaction, before a single median."]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv, __doc__ or "")
    problem = preflight()
    if problem:
        print(f"bench: {problem}", file=sys.stderr)
        return 2
    started = time.monotonic()
    quiet = QuietGate(cfg.wait_quiet)
    busy = quiet.wait("starting")
    with open("/proc/loadavg") as f:
        load_avg = " ".join(f.read().split()[:3]) + f", {busy:.0f}% CPU busy"
    cleanup_stale()  # namespaces left by dead runs (never a live run's)
    try:
        text = run_all(cfg, quiet, started, load_avg)
    except (SystemExit, KeyboardInterrupt):
        log("stopped by a signal; processes killed, lab torn down")
        raise
    print(text)
    cfg.output.parent.mkdir(parents=True, exist_ok=True)
    cfg.output.write_text(text)
    log(f"written to {cfg.output}; took {(time.monotonic() - started) / 60:.1f} min")
    return 0  # a benchmark reports; a missed target is in the table, not the exit code


if __name__ == "__main__":
    sys.exit(main())
