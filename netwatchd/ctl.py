"""`netwatchctl`: read what a running netwatchd (or a Prometheus scraping every node's netwatchd) sees.

Read commands (top, drops, pods, probes) take -o table|json|wide and --once; they never print ANSI escapes
when stdout is not a terminal. `top` is interactive on a terminal (press ? for its keys) and prints plain
tables (or one JSON document per refresh) otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence

import netwatchd
from netwatchd.ctl_model import (
    COLUMN_IDS,
    DEFAULT_SORT,
    DROPS,
    Filter,
    Problem,
    Unreachable,
    http_get,
    key_of,
    normalize_url,
    parse_duration,
    parse_metrics,
    probes_attached,
)
from netwatchd.export.metrics import all_metrics, exposed_name

EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE, EXIT_PROBLEM, EXIT_INTERRUPTED = 0, 3, 2, 4, 130
DEFAULT_ENDPOINT = "http://127.0.0.1:9990"
DROPPED_BYTES = "netwatch_dropped_bytes_total"
DROP_LABELS = ("reason", "protocol", "traffic_class", "direction", "namespace", "pod", "service_namespace",
               "service")

EXIT_CODES_HELP = """exit codes:
  0  ok
  2  usage error (bad flags or arguments)
  3  cannot reach netwatchd or Prometheus (connection refused, timeout, HTTP error, not its API)
  4  the daemon answered but reports a problem: a probe not attached (probes; drops for the drops probe;
     top when no probe is attached), an identity source down (pods), a PromQL error (top --prometheus)
  130 interrupted (Ctrl-C)
"""


def fail(msg: str, code: int) -> int:
    print(f"netwatchctl: {msg}", file=sys.stderr)
    return code


# ----------------------------------------------------------------------------------------------------
# Output helpers: plain tables (never ANSI) and JSON
# ----------------------------------------------------------------------------------------------------


def print_table(rows: list[dict], columns: Sequence[str], headers: Sequence[str] | None = None,
                right: Sequence[str] = (), file=None) -> None:
    """A plain text table: upper-case headers, columns two spaces apart, `right` columns right-aligned."""
    file = file or sys.stdout
    headers = list(headers or [c.upper() for c in columns])
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]

    def line(values: list[str]) -> str:
        out = [v.rjust(w) if c in right else v.ljust(w) for v, w, c in zip(values, widths, columns, strict=True)]
        return "  ".join(out).rstrip()

    print(line(headers), file=file)
    for row in cells:
        print(line(row), file=file)


def print_json(doc, pretty: bool = True) -> None:
    json.dump(doc, sys.stdout, indent=2 if pretty else None, sort_keys=False)
    print()
    sys.stdout.flush()


def get_json(endpoint: str, path: str, timeout: float) -> tuple[int, object]:
    """GET an /api/v1 document: (status, parsed JSON); Unreachable when nothing usable answers."""
    url = normalize_url(endpoint) + path
    status, body = http_get(url, timeout)
    if status == 404:
        raise Unreachable(f"{url}: HTTP 404 (not a netwatchd with this API, or an older one)")
    try:
        return status, json.loads(body)
    except ValueError as exc:
        raise Unreachable(f"{url}: HTTP {status}, not JSON") from exc


def run_guarded(fn: Callable[[], int], what: str) -> int:
    """Map the model's errors to exit codes."""
    try:
        return fn()
    except Unreachable as exc:
        return fail(f"cannot reach {what}: {exc}", EXIT_UNREACHABLE)
    except Problem as exc:
        return fail(str(exc), EXIT_PROBLEM)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `netwatchctl ... | head`
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), sys.stdout.fileno())
        return EXIT_OK


# ----------------------------------------------------------------------------------------------------
# drops
# ----------------------------------------------------------------------------------------------------


def drop_rows(text: str, flt: Filter | None = None, reasons: Sequence[str] = ()) -> list[dict]:
    """One row per netwatch_drops_total series (its labels, packets, bytes), largest first."""
    snap = parse_metrics(text, 0.0)
    flt = flt or Filter()
    nbytes = snap.counters.get(DROPPED_BYTES, {})
    rows = []
    for k, v in snap.counters.get(DROPS, {}).items():
        labels = dict(k)
        if not flt.row_labels_match("", labels.get("namespace", ""), labels.get("pod", ""),
                                    labels.get("traffic_class", "")) or not flt.service_match(labels):
            continue
        if reasons and labels.get("reason") not in reasons:
            continue
        rows.append({**labels, "packets": int(v), "bytes": int(nbytes.get(key_of(labels), 0))})
    rows.sort(key=lambda r: (-r["packets"], r.get("reason", ""), r.get("namespace", ""), r.get("pod", ""),
                             r.get("traffic_class", ""), r.get("direction", "")))
    return rows


def cmd_drops(args) -> int:
    if args.follow:
        return run_guarded(lambda: follow_drops(args), "netwatchd")

    def run() -> int:
        status, body = http_get(normalize_url(args.endpoint) + "/metrics", args.timeout)
        if status != 200:
            raise Unreachable(f"{args.endpoint}/metrics answered HTTP {status}")
        text = body.decode()
        rows = drop_rows(text, filter_from(args), split(args.reason))
        if args.output == "json":
            print_json(rows)
        else:
            for r in rows:
                r["pod"] = r.get("pod") or "(node)"
                r["namespace"] = r.get("namespace") or "-"
                r["service"] = f"{r.get('service_namespace')}/{r['service']}" if r.get("service") else "-"
            cols = ["namespace", "pod", "traffic_class", "direction", "reason", "protocol", "packets"]
            if args.output == "wide":
                cols += ["bytes", "service"]
            print_table(rows, cols, [c.upper() if c != "traffic_class" else "CLASS" for c in cols],
                        right=("packets", "bytes"))
        attached = probes_attached(parse_metrics(text, 0.0))
        if attached.get("drops") is False:
            return fail("the drops probe is not attached (see `netwatchctl probes`)", EXIT_PROBLEM)
        return EXIT_OK

    return run_guarded(run, "netwatchd")


TAIL_COLUMNS = ["time", "namespace", "pod", "traffic_class", "direction", "reason", "protocol", "src", "dst",
                "location"]


def follow_drops(args) -> int:
    """Stream individual drops (GET /api/v1/drops/recent, rate-limited in the kernel) until interrupted."""
    since, first, printed = 0, True, 0
    flt, reasons = filter_from(args), split(args.reason)
    if args.output != "json":
        print_table([], TAIL_COLUMNS, [c.upper() if c != "traffic_class" else "CLASS" for c in TAIL_COLUMNS])
    while True:
        status, doc = get_json(args.endpoint, f"/api/v1/drops/recent?since={since}&rate={args.rate}", args.timeout)
        if status == 503:
            raise Problem(doc.get("error", "the drops probe is not attached") if isinstance(doc, dict) else "503")
        if status != 200 or not isinstance(doc, dict):
            raise Unreachable(f"{args.endpoint}/api/v1/drops/recent answered HTTP {status}")
        events = doc.get("events", [])
        if first and not args.all:
            events = []  # what happened before we started is history, not a tail
        first = False
        since = doc.get("seq", since)
        for ev in events:
            if not flt.row_labels_match("", ev.get("namespace", ""), ev.get("pod", ""),
                                        ev.get("traffic_class", "")) or not flt.service_match(ev):
                continue
            if reasons and ev.get("reason") not in reasons:
                continue
            if args.output == "json":
                print_json(ev, pretty=False)
            else:
                row = {**ev, "time": time.strftime("%H:%M:%S", time.localtime(ev.get("time", 0))),
                       "pod": ev.get("pod") or "(node)",
                       "src": f"{ev.get('src', '')}:{ev.get('sport', '')}" if ev.get("sport") else ev.get("src", ""),
                       "dst": f"{ev.get('dst', '')}:{ev.get('dport', '')}" if ev.get("dport") else ev.get("dst", "")}
                line = "  ".join(str(row.get(c, "")) for c in TAIL_COLUMNS)
                print(line, flush=True)
            printed += 1
            if args.count and printed >= args.count:
                return EXIT_OK
        if args.once:
            return EXIT_OK
        time.sleep(0.5)


# ----------------------------------------------------------------------------------------------------
# pods
# ----------------------------------------------------------------------------------------------------


def cmd_pods(args) -> int:
    def run() -> int:
        status, doc = get_json(args.endpoint, "/api/v1/pods", args.timeout)
        if status != 200 or not isinstance(doc, dict) or not isinstance(doc.get("pods"), list):
            raise Unreachable(f"{args.endpoint}/api/v1/pods answered HTTP {status}")
        flt = Filter.build(namespace=args.namespace, pod=args.pod)
        pods = [p for p in doc["pods"] if flt.row_labels_match("", p.get("namespace", ""), p.get("pod", ""), "-")]
        pods.sort(key=lambda p: (p.get("namespace", ""), p.get("pod", "")))
        if args.output == "json":
            print_json(pods)
        else:
            rows = [{**p, "ips": ",".join(p.get("ips", [])) or "-", "netns_inode": p.get("netns_inode") or "-",
                     "host_veth": p.get("host_veth") or "-", "host_network": "yes" if p.get("host_network") else "no",
                     "workload": p.get("workload") or "-", "host_veth_ifindex": p.get("host_veth_ifindex") or "-"}
                    for p in pods]
            cols = ["namespace", "pod", "ips", "netns_inode", "host_veth", "host_network", "source"]
            headers = ["NAMESPACE", "POD", "IPS", "NETNS", "HOST-VETH", "HOSTNET", "SOURCE"]
            if args.output == "wide":
                cols += ["host_veth_ifindex", "phase", "workload", "uid"]
                headers += ["IFINDEX", "PHASE", "WORKLOAD", "UID"]
            print_table(rows, cols, headers)
        # the daemon's view of its identity sources: a source that does not answer means stale pods
        try:
            st_status, status_doc = get_json(args.endpoint, "/api/v1/status", args.timeout)
        except Unreachable:
            return EXIT_OK
        up = status_doc.get("identity", {}).get("up", {}) if isinstance(status_doc, dict) else {}
        down = sorted(src for src, ok in up.items() if not ok)
        if st_status == 200 and down:
            return fail(f"identity source(s) not answering: {', '.join(down)} (pods may be stale)", EXIT_PROBLEM)
        return EXIT_OK

    return run_guarded(run, "netwatchd")


# ----------------------------------------------------------------------------------------------------
# probes
# ----------------------------------------------------------------------------------------------------


def probe_rates(first: list[dict], second: list[dict], seconds: float) -> list[dict]:
    """Each probe of the second read, with events/s and ns per event over the window between the reads
    (per program, and summed over the probe's programs). A program absent from the first read, or whose
    counters went down (reloaded), counts from zero."""
    before = {(p.get("probe"), g.get("program"), g.get("prog_id")): g
              for p in first for g in p.get("programs", [])}
    out = []
    for p in second:
        progs, runs, ns, any_stats = [], 0, 0, False
        for g in p.get("programs", []):
            old = before.get((p.get("probe"), g.get("program"), g.get("prog_id")), {})
            cnt, t = g.get("run_cnt", 0), g.get("run_time_ns", 0)
            o_cnt, o_t = old.get("run_cnt", 0), old.get("run_time_ns", 0)
            if cnt < o_cnt or t < o_t:
                o_cnt, o_t = 0, 0
            d_cnt, d_t = cnt - o_cnt, t - o_t
            measured = g.get("events_per_second_measured")
            if measured is not None and g.get("ns_per_run") is not None:
                # the daemon measures in short stats windows: its last window is the freshest figure
                rate, per = float(measured), float(g["ns_per_run"])
                d_cnt, d_t = rate * seconds, rate * seconds * per
            else:
                rate = d_cnt / seconds if seconds > 0 else None
                per = round(d_t / d_cnt, 1) if d_cnt else g.get("ns_per_run")
            runs, ns = runs + d_cnt, ns + d_t
            any_stats = any_stats or t > 0 or cnt > 0 or measured is not None
            progs.append({**g, "events_per_second": round(rate, 3) if rate is not None else None,
                          "ns_per_event": per})
        cum_cnt = sum(g.get("run_cnt", 0) for g in p.get("programs", []))
        cum_t = sum(g.get("run_time_ns", 0) for g in p.get("programs", []))
        out.append({
            "probe": p.get("probe", ""), "attached": bool(p.get("attached")), "reason": p.get("reason", ""),
            "hooks": p.get("hooks", []),
            "events_per_second": round(runs / seconds, 3) if p.get("attached") and seconds > 0 else None,
            "ns_per_event": round(ns / runs, 1) if runs else (round(cum_t / cum_cnt, 1) if cum_cnt else None),
            "bpf_stats": any_stats,
            "programs": progs,
        })
    return out


def cmd_probes(args) -> int:
    def read() -> list[dict]:
        status, doc = get_json(args.endpoint, "/api/v1/probes", args.timeout)
        if status != 200 or not isinstance(doc, dict) or not isinstance(doc.get("probes"), list):
            raise Unreachable(f"{args.endpoint}/api/v1/probes answered HTTP {status}")
        return doc["probes"]

    def run() -> int:
        t0, first = time.monotonic(), read()
        time.sleep(args.interval)
        second = read()
        probes = probe_rates(first, second, time.monotonic() - t0)
        if args.output == "json":
            print_json(probes)
        elif args.output == "wide":
            rows = []
            for p in probes:
                for g in p["programs"] or [{}]:
                    rows.append({"probe": p["probe"], "attached": "yes" if p["attached"] else "no",
                                 "program": g.get("program", "-"), "prog_id": g.get("prog_id", "-"),
                                 "events_per_second": fmt_num(g.get("events_per_second")),
                                 "ns_per_event": fmt_num(g.get("ns_per_event")), "run_cnt": g.get("run_cnt", "-"),
                                 "reason": p["reason"] or "-"})
            cols = ["probe", "attached", "program", "prog_id", "events_per_second", "ns_per_event", "run_cnt",
                    "reason"]
            print_table(rows, cols, ["PROBE", "ATTACHED", "PROGRAM", "PROG-ID", "EVENTS/S", "NS/EVENT", "RUNS",
                                     "REASON"], right=("prog_id", "events_per_second", "ns_per_event", "run_cnt"))
        else:
            rows = [{"probe": p["probe"], "attached": "yes" if p["attached"] else "no",
                     "events_per_second": fmt_num(p["events_per_second"]), "ns_per_event": fmt_num(p["ns_per_event"]),
                     "hooks": hooks_summary(p["hooks"]), "reason": p["reason"] or "-"} for p in probes]
            cols = ["probe", "attached", "events_per_second", "ns_per_event", "hooks", "reason"]
            print_table(rows, cols, ["PROBE", "ATTACHED", "EVENTS/S", "NS/EVENT", "HOOKS", "REASON"],
                        right=("events_per_second", "ns_per_event"))
        missing = [p["probe"] for p in probes if not p["attached"]]
        if missing:
            return fail(f"probe(s) not attached: {', '.join(missing)}", EXIT_PROBLEM)
        return EXIT_OK

    return run_guarded(run, "netwatchd")


def hooks_summary(hooks: Sequence[str]) -> str:
    """'tracepoint:skb:kfree_skb' for one hook; 'tracepoint x5' (by kind) for several."""
    if len(hooks) <= 1:
        return ",".join(hooks) or "-"
    kinds: dict[str, int] = {}
    for h in hooks:
        kind = h.split(":", 1)[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    return ",".join(f"{k} x{n}" for k, n in kinds.items())


def fmt_num(v) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}" if isinstance(v, float) and v < 100 else f"{v:.0f}"


# ----------------------------------------------------------------------------------------------------
# metrics, top, demo
# ----------------------------------------------------------------------------------------------------


def cmd_metrics(args) -> int:
    rows = [{"metric": exposed_name(m), "type": m.kind, "labels": ",".join(m.labels), "help": m.help}
            for m in all_metrics()]
    if args.output == "json":
        print_json(rows)
    else:
        print_table(rows, ["metric", "type", "labels", "help"])
    return EXIT_OK


def cmd_top(args) -> int:
    from netwatchd import ctl_top

    return ctl_top.run(args)


def cmd_demo(top_args: list[str]) -> int:
    from netwatchd import demo

    return demo.run(top_args)


def split(values: Sequence[str] | None) -> list[str]:
    return [v.strip() for item in values or () for v in item.split(",") if v.strip()]


def filter_from(args) -> Filter:
    return Filter.build(namespace=getattr(args, "namespace", None), pod=getattr(args, "pod", None),
                        traffic_class=getattr(args, "traffic_class", None), service=getattr(args, "service", None),
                        node=getattr(args, "node", None))


def positive(text: str) -> float:
    v = float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text}")
    return v


def duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


TOP_HELP = f"""keys (interactive): q quit, s/S next/previous sort column, 1-9 and 0 sort by that column, r reverse,
/ filter (words: substrings; ns: pod: class: svc: node: globs; Enter applies, Esc cancels), c clear
the filter, space refresh now, ? or h help.

columns: {', '.join(COLUMN_IDS)} (--sort); per second and latency quantiles are over the
refresh window (--interval) for a netwatchd, over --window through Prometheus.

{EXIT_CODES_HELP}"""


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="netwatchctl", description=__doc__, epilog=EXIT_CODES_HELP, formatter_class=fmt)
    p.add_argument("--version", action="version", version=f"netwatchctl {netwatchd.__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    conn = argparse.ArgumentParser(add_help=False)
    conn.add_argument("--endpoint", default=os.environ.get("NETWATCHD_ENDPOINT", DEFAULT_ENDPOINT),
                      help="netwatchd URL (default $NETWATCHD_ENDPOINT or %(default)s)")
    conn.add_argument("--timeout", type=positive, default=5.0, help="seconds per HTTP request (default %(default)s)")
    out = argparse.ArgumentParser(add_help=False)
    out.add_argument("-o", "--output", choices=["table", "json", "wide"], default="table",
                     help="table (default), json, or wide (a table with more columns)")
    out.add_argument("--once", action="store_true", help="print once and exit (what drops/pods/probes always do)")
    flt = argparse.ArgumentParser(add_help=False)
    flt.add_argument("--namespace", "-n", action="append", metavar="GLOB", help="only these namespaces (globs, "
                     "comma-separated or repeated)")
    flt.add_argument("--pod", action="append", metavar="GLOB", help="only these pods; (node) rows have pod \"\"")
    flt.add_argument("--class", dest="traffic_class", action="append", metavar="GLOB", help="only these traffic "
                     "classes")
    flt.add_argument("--service", action="append", metavar="[NS/]NAME", help="only series naming these services "
                     "(drops, connects, retransmits carry the service); rows without one are hidden")

    t = sub.add_parser("top", parents=[conn, out, flt], formatter_class=fmt, epilog=TOP_HELP,
                       help="live per-pod, per-class rates, drops and latency (interactive on a terminal)")
    t.add_argument("--prometheus", metavar="URL", help="read the whole cluster from Prometheus instead of one "
                   "netwatchd; rows gain a NODE column")
    t.add_argument("--window", type=duration, default=None, metavar="DURATION",
                   help="rate()/histogram_quantile() range with --prometheus (default 2m)")
    t.add_argument("--node-label", default="node", help="the Prometheus label naming the node (default %(default)s)")
    t.add_argument("--node", action="append", metavar="GLOB", help="only these nodes (--prometheus)")
    t.add_argument("--interval", type=positive, default=None, metavar="SECONDS",
                   help="refresh interval = rate window for a netwatchd (default 2; 5 with --prometheus)")
    t.add_argument("--iterations", type=int, default=0, metavar="N",
                   help="stop after N refreshes (0 = until q or Ctrl-C)")
    t.add_argument("--sort", choices=COLUMN_IDS, default=DEFAULT_SORT, help="sort column (default %(default)s)")
    t.add_argument("--reverse", action="store_true", help="reverse the sort order")
    t.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                   help="colours in the interactive view (auto: when the terminal has them and NO_COLOR is unset)")
    t.set_defaults(func=cmd_top)

    d = sub.add_parser("drops", parents=[conn, out, flt], formatter_class=fmt, epilog=EXIT_CODES_HELP,
                       help="drop counters by pod, traffic class and kernel reason")
    d.add_argument("--reason", action="append", metavar="REASON", help="only these kernel drop reasons")
    d.add_argument("-f", "--follow", action="store_true",
                   help="stream individual drops as they happen (rate-limited in the kernel; Ctrl-C stops)")
    d.add_argument("--rate", type=int, default=100, help="--follow: at most this many drops per second from the "
                   "kernel (default %(default)s)")
    d.add_argument("--count", type=int, default=0, help="--follow: stop after this many drops")
    d.add_argument("--all", action="store_true", help="--follow: also print the recent drops the daemon kept")
    d.set_defaults(func=cmd_drops)

    pods = sub.add_parser("pods", parents=[conn, out], formatter_class=fmt, epilog=EXIT_CODES_HELP,
                          help="the local pods netwatchd knows (kubelet): IPs, netns, host veth")
    pods.add_argument("--namespace", "-n", action="append", metavar="GLOB", help="only these namespaces")
    pods.add_argument("--pod", action="append", metavar="GLOB", help="only these pods")
    pods.set_defaults(func=cmd_pods)

    pr = sub.add_parser("probes", parents=[conn, out], formatter_class=fmt, epilog=EXIT_CODES_HELP,
                        help="each probe: hooks, attached or why not, events/s and kernel ns per event")
    pr.add_argument("--interval", type=positive, default=1.0, metavar="SECONDS",
                    help="seconds between the two reads of the BPF run counters (default %(default)s)")
    pr.set_defaults(func=cmd_probes)

    m = sub.add_parser("metrics", help="the reference of every metric netwatchd exports")
    m.add_argument("-o", "--output", choices=["table", "json", "wide"], default="table")
    m.set_defaults(func=cmd_metrics)

    sub.add_parser("demo", help="a lab node with pods, services and faults, netwatchd, and top (root); "
                   "arguments after `demo` go to top", add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if argv[:1] == ["demo"]:  # everything after `demo` belongs to the top it runs
        if any(a in ("-h", "--help") for a in argv[1:]):
            from netwatchd import demo

            print("usage: netwatchctl demo [TOP ARGS ...]\n\n" + (demo.__doc__ or ""))
            return EXIT_OK
        return cmd_demo(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "top":
        if args.node and not args.prometheus:
            parser.error("--node needs --prometheus (one netwatchd is one node)")
        if args.window is not None and not args.prometheus:
            parser.error("--window needs --prometheus (with one netwatchd the window is --interval)")
        if args.iterations < 0:
            parser.error("--iterations must be >= 0")
    try:
        return args.func(args)
    except BrokenPipeError:
        # `netwatchctl ... | head`: the reader went away; that is not an error worth a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
