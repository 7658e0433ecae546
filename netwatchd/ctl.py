"""`netwatchctl`: read what a running netwatchd sees.

Subcommands read the daemon's /metrics endpoint, so they work against any netwatchd the user can reach.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

import netwatchd
from netwatchd.export.metrics import all_metrics, exposed_name

EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE = 0, 3, 2


def fetch_metrics(endpoint: str, timeout: float = 5.0) -> str:
    url = endpoint.rstrip("/") + "/metrics"
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - user-given endpoint
        return resp.read().decode()


def drop_rows(text: str) -> list[dict]:
    """One row per netwatch_drops_total series, largest first."""
    rows = []
    for fam in text_string_to_metric_families(text):
        if fam.name != "netwatch_drops":
            continue
        for s in fam.samples:
            if s.name == "netwatch_drops_total":
                rows.append({**s.labels, "packets": int(s.value)})
    rows.sort(key=lambda r: (-r["packets"], r.get("reason", "")))
    return rows


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) if rows else len(c) for c in columns}
    print("  ".join(c.upper().ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns))


def cmd_drops(args) -> int:
    try:
        rows = drop_rows(fetch_metrics(args.endpoint))
    except (urllib.error.URLError, OSError) as exc:
        print(f"netwatchctl: cannot reach netwatchd at {args.endpoint}: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if args.output == "json":
        json.dump(rows, sys.stdout, indent=2)
        print()
    else:
        print_table(rows, ["namespace", "pod", "traffic_class", "direction", "reason", "protocol", "packets"])
    return EXIT_OK


def cmd_metrics(args) -> int:
    rows = [{"metric": exposed_name(m), "type": m.kind, "labels": ",".join(m.labels), "help": m.help}
            for m in all_metrics()]
    if args.output == "json":
        json.dump(rows, sys.stdout, indent=2)
        print()
    else:
        print_table(rows, ["metric", "type", "labels", "help"])
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="netwatchctl", description=__doc__)
    p.add_argument("--version", action="version", version=f"netwatchctl {netwatchd.__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("drops", help="drop counters by pod, traffic class and kernel reason")
    d.add_argument("--endpoint", default="http://127.0.0.1:9990", help="netwatchd URL (default %(default)s)")
    d.add_argument("-o", "--output", choices=["table", "json"], default="table")
    d.set_defaults(func=cmd_drops)
    m = sub.add_parser("metrics", help="the reference of every metric netwatchd exports")
    m.add_argument("-o", "--output", choices=["table", "json"], default="table")
    m.set_defaults(func=cmd_metrics)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
