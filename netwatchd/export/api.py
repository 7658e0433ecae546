"""A small read-only JSON API behind `netwatchctl pods` and `netwatchctl probes` (see README).

GET /api/v1/status   version, identity source and health, probes attached
GET /api/v1/pods     what the node knows: pod, namespace, IPs, netns inode, host veth, hostNetwork, source
GET /api/v1/probes   each probe's hooks, attached or why not, events and kernel ns per event (BPF stats)
GET /api/v1/drops/recent?since=SEQ&rate=N
                     individual drops after sequence number SEQ (the kernel starts emitting them on the first
                     call, at most N per second for the node, default 100, and stops 15 s after the last call)
"""

from __future__ import annotations

import json
import time
import urllib.parse

import netwatchd
from netwatchd.kernel.bpfstats import prog_stats
from netwatchd.probes.base import program_fds


def probe_programs(probe, sampler=None) -> list[dict]:
    """Each loaded program of a probe with its cost as the stats windows estimated it (see StatsSampler):
    run_cnt / run_time_ns are scaled estimates since load, ns_per_run is the last window's cost per event."""
    estimates = sampler.snapshot() if sampler is not None else {}
    out = []
    for name, fd in sorted(program_fds(probe).items()):
        st = prog_stats(fd)
        if st is None:
            continue
        est = estimates.get((probe.name, name))
        if est is None or est.prog_id != st.prog_id:
            out.append({"program": name, "prog_id": st.prog_id, "run_cnt": 0, "run_time_ns": 0, "ns_per_run": None,
                        "events_per_second_measured": None})
            continue
        out.append({"program": name, "prog_id": st.prog_id, "run_cnt": round(est.runs),
                    "run_time_ns": round(est.run_time_ns),
                    "ns_per_run": round(est.last_ns_per_run, 1) if est.last_ns_per_run is not None else None,
                    "events_per_second_measured": round(est.last_runs_per_s, 3)})
    return out


def probes_doc(state) -> list[dict]:
    docs = []
    for probe in state.probes:
        attached = probe.name not in state.probe_errors
        docs.append({
            "probe": probe.name,
            "attached": attached,
            "reason": state.probe_errors.get(probe.name, ""),
            "hooks": [f"{h.kind}:{h.target}" for h in probe.hooks],
            "programs": probe_programs(probe, getattr(state, "bpf_stats", None)) if attached else [],
        })
    return docs


def pods_doc(state) -> list[dict]:
    ident = state.identity
    if ident is None:
        return []
    resolver = ident.resolver
    netns_map = resolver.netns_map
    rows = []
    for p in sorted(resolver.pods, key=lambda p: (p.namespace, p.name)):
        pn = netns_map.get((p.namespace, p.name))
        rows.append({
            "namespace": p.namespace, "pod": p.name, "uid": p.uid, "ips": [str(ip) for ip in p.ips],
            "host_network": p.host_network, "phase": p.phase, "workload": p.workload,
            "netns_inode": pn.inode if pn else 0, "host_veth": pn.host_veth_name if pn else "",
            "host_veth_ifindex": pn.host_veth_ifindex if pn else 0, "source": "kubelet",
        })
    return rows


def status_doc(state, started: float) -> dict:
    ident = state.identity
    return {
        "version": netwatchd.__version__,
        "uptime_seconds": round(time.monotonic() - started, 1),
        "identity": {"source": state.identity_source,
                     "up": ident.sources_up() if ident is not None else {}},
        "probes": {p.name: p.name not in state.probe_errors for p in state.probes},
        "hooks": {h.kind: h.available for h in state.hooks},
    }


def drops_recent_doc(state, query: str) -> tuple[int, dict]:
    params = urllib.parse.parse_qs(query)
    try:
        since = int(params.get("since", ["0"])[0])
        rate = max(1, min(int(params.get("rate", [str(DEFAULT_TAIL_RATE)])[0]), MAX_TAIL_RATE))
    except ValueError:
        return 400, {"error": "since and rate must be integers"}
    probe = next((p for p in state.probes if p.name == "drops" and p.name not in state.probe_errors), None)
    if probe is None or getattr(probe, "tail", None) is None:
        return 503, {"error": "the drops probe is not attached"}
    return 200, probe.tail.follow(since, rate)


DEFAULT_TAIL_RATE, MAX_TAIL_RATE = 100, 1000


def handle(path: str, state, started: float, query: str = "") -> tuple[int, bytes] | None:
    """Serve an /api/v1 path; None when the path is not ours."""
    if path == "/api/v1/drops/recent":
        code, doc = drops_recent_doc(state, query)
        return code, (json.dumps(doc) + "\n").encode()
    docs = {
        "/api/v1/status": lambda: status_doc(state, started),
        "/api/v1/pods": lambda: {"pods": pods_doc(state)},
        "/api/v1/probes": lambda: {"probes": probes_doc(state)},
    }
    if path not in docs:
        return None
    return 200, (json.dumps(docs[path](), indent=1) + "\n").encode()
