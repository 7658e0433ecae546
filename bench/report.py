"""Turn the benchmark's measurements into the markdown tables printed and written to bench/results.md."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Row:
    """One datapath metric: which test produced it, how to print it and what netwatchd must reach."""

    test: str  # "stream" | "rr"
    key: str  # key in the per-run measurement dict
    label: str
    fmt: str  # format spec for the absolute values
    target: str = ""  # ">=0.97" or "<=1.03" (ratio vs baseline), empty when informational


DATAPATH_ROWS = (
    Row("stream", "gbps", "TCP stream throughput, Gbit/s (1 CPU)", ".2f", ">=0.97"),
    Row("stream", "cpu_all", "TCP stream CPU s per GB, all CPUs", ".3f"),
    Row("stream", "cpu_load", "TCP stream CPU s per GB, load CPU only", ".3f"),
    Row("rr", "rate", "1-byte TCP RR rate, transactions/s", ",.0f", ">=0.97"),
    Row("rr", "p99_us", "1-byte TCP RR p99 latency, us", ".1f"),
    Row("rr", "cpu_all", "1-byte TCP RR CPU us per transaction, all CPUs", ".2f", "<=1.03"),
    Row("rr", "cpu_load", "1-byte TCP RR CPU us per transaction, load CPU only", ".2f"),
)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def meets(value: float, target: str) -> bool:
    """``target`` is ``>=x`` or ``<=x`` (or ``<x``)."""
    for op in (">=", "<=", "<"):
        if target.startswith(op):
            bound = float(target[len(op):])
            return {">=": value >= bound, "<=": value <= bound, "<": value < bound}[op]
    raise ValueError(f"bad target {target!r}")


def verdict(value: float, target: str) -> str:
    if not target or value != value:  # no target, or NaN
        return ""
    return "yes" if meets(value, target) else "**NO**"


def ratio_cell(ratios: Sequence[float]) -> str:
    """Median of the per-repetition ratios, with their range when there is more than one."""
    if not ratios:
        return "-"
    med = f"{median(ratios):.3f}"
    return med if len(ratios) == 1 else f"{med} ({min(ratios):.2f}-{max(ratios):.2f})"


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class DatapathResults:
    """Per (mode, path, test, repetition): the measurement dict of one run."""

    modes: list[str]
    paths: list[str]
    runs: dict[tuple[str, str, str, int], dict[str, float]] = field(default_factory=dict)

    def values(self, mode: str, path: str, row: Row) -> list[float]:
        return [m[row.key] for (mo, p, t, _), m in sorted(self.runs.items()) if (mo, p, t) == (mode, path, row.test)]

    def all_values(self, mode: str, key: str) -> list[float]:
        """``key`` of every run of ``mode``, whatever the path and test."""
        return [m[key] for (mo, *_), m in self.runs.items() if mo == mode and key in m]

    def ratios(self, mode: str, path: str, row: Row) -> list[float]:
        """mode / baseline of the same repetition: pairs run back to back, so slow drift cancels."""
        out = []
        for (mo, p, t, rep), m in sorted(self.runs.items()):
            if (mo, p, t) != (mode, path, row.test):
                continue
            base = self.runs.get(("baseline", p, t, rep))
            if base and base[row.key]:
                out.append(m[row.key] / base[row.key])
        return out

    def render(self) -> str:
        others = [m for m in self.modes if m != "baseline"]
        header = ["path", "metric", "baseline"]
        for m in others:
            header += [m, f"{m} / baseline"]
        header += ["target (netwatchd / baseline)", "netwatchd meets it"]
        rows = []
        for path in self.paths:
            for row in DATAPATH_ROWS:
                cells: list[object] = [path, row.label, format(median(self.values("baseline", path, row)), row.fmt)]
                for m in others:
                    cells += [format(median(self.values(m, path, row)), row.fmt), ratio_cell(self.ratios(m, path, row))]
                nw = median(self.ratios("netwatchd", path, row)) if "netwatchd" in others else float("nan")
                target = (f"{row.target[:2]} {row.target[2:]}" + ("x" if row.target.startswith("<") else "")
                          if row.target else "")
                cells += [target, verdict(nw, row.target)]
                rows.append(cells)
        return table(header, rows)
