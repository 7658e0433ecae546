"""The daemon's own footprint: ``sudo .venv/bin/python -m bench.lean [--pods 110] [--flows 10000]``.

Builds one lab node with ``--pods`` pods (the lab kubelet and apiserver name them, as on a real node) plus a
flow generator and a sink, and measures the real netwatchd on it:

- **start-to-ready**: from spawning the process to its first 200 on /readyz (compiles included);
- **RSS idle** (VmRSS a few seconds after ready, default flags) and the **peak during start** (VmHWM then);
- **RSS at N active drop keys**: ``--flows`` distinct UDP flows to a closed port re-sent every second, each one a
  key in the drops map, after the daemon's default 2 s refresh has read them a few times;
- **/metrics at N active keys**: with ``--interval 3600`` (only scrapes read the maps, so each scrape does the
  whole map read), the flows re-sent before every scrape, as ``bench.run``'s scrape section does;
- whether the daemon has libbcc/LLVM mapped (it must not: they are only in the short-lived compiler child).

Prints one markdown table (and ``--json`` a JSON line) on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import subprocess
import sys
import time
from pathlib import Path

from bench import measure, rr
from bench.report import median
from netwatchd.lab.netns import Lab, cleanup_stale
from tests.support import RunningDaemon, start_netwatchd

CLOSED_PORT = 9
FLOW_SOURCES = "10.250.0.0/16"
CLUSTER_CIDRS = "10.244.0.0/16,fd00:10:244::/48"
TARGETS = {"start_to_ready_s": 3.0, "rss_keys_mib": 80.0, "scrape_median_ms": 25.0, "scrape_max_ms": 60.0}


def log(msg: str) -> None:
    print(f"[lean {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def wait_ready(d: RunningDaemon, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if d.port and d.get("/readyz", timeout=2)[0] == 200:
            return
        time.sleep(0.02)
    raise RuntimeError("netwatchd never became ready")


def llvm_mapped(pid: int) -> list[str]:
    """Shared objects of libbcc / LLVM / clang mapped into `pid` (expected: none)."""
    libs = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        path = line.split()[-1] if len(line.split()) >= 6 else ""
        if any(s in path for s in ("libbcc", "LLVM", "libclang", "libllvm")):
            libs.add(path)
    return sorted(libs)


def send_flows(binary: Path, flowgen, sink_ip: str, n: int) -> None:
    first = str(ipaddress.ip_network(FLOW_SOURCES)[1])
    rr.flows(binary, flowgen, sink_ip, CLOSED_PORT, n, first)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.lean", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pods", type=int, default=110, help="pods on the node (default %(default)s)")
    p.add_argument("--flows", type=int, default=10000, help="active drop keys (default %(default)s)")
    p.add_argument("--scrapes", type=int, default=15, help="timed scrapes at --flows keys (default %(default)s)")
    p.add_argument("--no-kube", action="store_true", help="CIDR flags only, no lab kubelet/apiserver")
    p.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    a = p.parse_args(argv)
    cleanup_stale()
    res: dict[str, object] = {"pods": a.pods, "flows": a.flows}
    binary = rr.build()
    with Lab() as lab:
        node = lab.add_node("lean", pod_cidr="10.244.1.0/24", pod_cidr6="fd00:10:244:1::/64")
        log(f"building {a.pods} pods")
        flowgen, sink = node.add_pod("flowgen"), node.add_pod("sink")
        sink.run(["ip", "route", "add", "blackhole", FLOW_SOURCES])
        sink.sysctls({"net.ipv4.conf.all.rp_filter": 0, "net.ipv4.conf.eth0.rp_filter": 0})
        for i in range(max(0, a.pods - 2)):
            node.add_pod(f"p{i:03d}")
        args = ["--pod-cidr", f"{node.pod_cidr},{node.pod_cidr6}", "--cluster-cidr", CLUSTER_CIDRS]
        cluster = None
        if not a.no_kube:
            from netwatchd.lab.cluster import LabCluster

            cluster = LabCluster(lab, node)
            args = cluster.netwatchd_args() + ["--cluster-cidr", CLUSTER_CIDRS]
        try:
            # 1. default flags: start-to-ready, idle RSS, RSS at N keys
            t0 = time.monotonic()
            d = start_netwatchd(args, netns=node.netns)
            try:
                wait_ready(d)
                res["start_to_ready_s"] = round(time.monotonic() - t0, 2)
                res["hwm_start_mib"] = round(measure.process_memory_kib(d.proc.pid)["VmHWM"] / 1024, 1)
                time.sleep(8)
                res["rss_idle_mib"] = round(measure.process_memory_kib(d.proc.pid)["VmRSS"] / 1024, 1)
                log(f"ready in {res['start_to_ready_s']} s, idle RSS {res['rss_idle_mib']} MiB")
                for _ in range(6):
                    send_flows(binary, flowgen, sink.ip, a.flows)
                    time.sleep(1.0)
                time.sleep(2.5)
                mem = measure.process_memory_kib(d.proc.pid)
                res["rss_keys_mib"] = round(mem["VmRSS"] / 1024, 1)
                res["hwm_mib"] = round(mem["VmHWM"] / 1024, 1)
                entries = [ln for ln in d.metrics().splitlines()
                           if ln.startswith('netwatch_bpf_map_entries{map="drops"')]
                res["drop_keys"] = int(float(entries[0].split()[-1])) if entries else 0
                res["llvm_mapped"] = llvm_mapped(d.proc.pid)
                log(f"RSS at {res['drop_keys']} keys: {res['rss_keys_mib']} MiB; llvm mapped: {res['llvm_mapped']}")
            finally:
                rc = d.stop()
                if rc:
                    log(f"WARNING: netwatchd exited {rc}: {''.join(d.stderr_lines[-5:])}")
            # 2. scrapes at N keys with --interval 3600 (each scrape reads the maps)
            d = start_netwatchd(args + ["--interval", "3600"], netns=node.netns)
            try:
                wait_ready(d)
                times = []
                for i in range(a.scrapes + 1):
                    send_flows(binary, flowgen, sink.ip, a.flows)
                    time.sleep(0.3)
                    t = time.perf_counter()
                    status, _ = d.get("/metrics")
                    if i:  # the first scrape sees every key for the first time (decodes them all)
                        times.append((time.perf_counter() - t) * 1e3)
                    else:
                        res["scrape_first_ms"] = round((time.perf_counter() - t) * 1e3, 1)
                    assert status == 200
                res["scrape_times_ms"] = [round(t, 1) for t in times]
                res["scrape_median_ms"] = round(median(times), 1)
                res["scrape_max_ms"] = round(max(times), 1)
                log(f"scrapes: median {res['scrape_median_ms']} ms, max {res['scrape_max_ms']} ms")
            finally:
                d.stop()
        finally:
            if cluster is not None:
                cluster.close()
    rows = [("start-to-ready, s", "start_to_ready_s"), ("RSS peak during start, MiB", "hwm_start_mib"),
            ("RSS idle, MiB", "rss_idle_mib"), (f"RSS at {res.get('drop_keys')} drop keys, MiB", "rss_keys_mib"),
            ("RSS peak overall, MiB", "hwm_mib"), ("/metrics first scrape, ms", "scrape_first_ms"),
            ("/metrics median, ms", "scrape_median_ms"), ("/metrics max, ms", "scrape_max_ms")]
    git = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip()
    print(f"\nnetwatchd footprint ({a.pods} pods, {a.flows} flows, {git}); libbcc/LLVM mapped: "
          f"{res.get('llvm_mapped') or 'none'}\n")
    print("| what | value | target | verdict |\n|---|---|---|---|")
    for label, key in rows:
        target = TARGETS.get(key)
        val = res.get(key)
        verdict = "" if target is None or val is None else ("met" if float(val) <= target else "not met")
        print(f"| {label} | {val} | {'<= ' + str(target) if target else ''} | {verdict} |")
    if a.json:
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
