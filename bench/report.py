"""Turning measurements into verdicts and markdown: targets, medians with their confidence, tables, the summary.

A verdict on a noisy ratio is taken on the median of the per-repetition ratios, and it says whether the data
support it: the distribution-free ~95 % confidence interval of that median (order statistics of a binomial
sign test) either lies on one side of the target (``clear``) or straddles it (``inconclusive``, more pairs
needed). Nothing is rounded towards a target: a value that misses it is ``**not met**``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

MET, NOT_MET, NA = "met", "**not met**", "n/a"


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def meets(value: float, target: str) -> bool:
    """``target`` is ``>=x``, ``<=x``, ``<x`` or ``>x``."""
    for op in (">=", "<=", "<", ">"):
        if target.startswith(op):
            bound = float(target[len(op):])
            return {">=": value >= bound, "<=": value <= bound, "<": value < bound, ">": value > bound}[op]
    raise ValueError(f"bad target {target!r}")


def verdict(value: float, target: str) -> str:
    """``met`` / ``**not met**``; ``n/a`` for no target or no value (NaN)."""
    if not target or value != value:
        return NA
    return MET if meets(value, target) else NOT_MET


def target_text(target: str, unit: str = "") -> str:
    """``<=1.03`` -> ``≤ 1.03`` (+ unit)."""
    for op, sym in ((">=", "≥"), ("<=", "≤"), ("<", "<"), (">", ">")):
        if target.startswith(op):
            return f"{sym} {target[len(op):]}{unit}"
    return target


def median_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float] | None:
    """Distribution-free confidence interval of the median: (x_(k), x_(n+1-k)) with the largest k whose
    two-sided binomial tail stays within 1 - level. None when there are too few values (n < 6 at 95 %)."""
    xs, n = sorted(values), len(values)
    alpha, tail, k = (1 - level) / 2, 0.0, 0
    while k < n // 2:
        tail += math.comb(n, k) / 2 ** n  # now P(X <= k), X ~ Binomial(n, 1/2): may k + 1 be used?
        if tail > alpha:
            break
        k += 1
    return (xs[k - 1], xs[n - k]) if k >= 1 else None


@dataclass(frozen=True)
class Judgement:
    """A median against a target, and whether its confidence interval supports the verdict."""

    median: float
    lo: float
    hi: float
    ci: tuple[float, float] | None
    target: str
    n: int = 0

    @property
    def verdict(self) -> str:
        return verdict(self.median, self.target)

    @property
    def support(self) -> str:
        """``clear`` when the whole CI is on the verdict's side, ``inconclusive`` when it straddles the target."""
        if self.ci is None or not self.target or self.median != self.median:
            return "too few pairs for a CI"
        a, b = meets(self.ci[0], self.target), meets(self.ci[1], self.target)
        return "clear" if a == b else "inconclusive"

    def cell(self, fmt: str = ".3f") -> str:
        """``1.034 (0.93-1.18; CI 1.01-1.05)``."""
        if self.median != self.median:
            return "-"
        if self.n == 1:
            return f"{self.median:{fmt}}"
        ci = f"; 95% CI {self.ci[0]:.3f}-{self.ci[1]:.3f}" if self.ci else ""
        return f"{self.median:{fmt}} ({self.lo:.2f}-{self.hi:.2f}{ci})"


def judge(values: Sequence[float], target: str) -> Judgement:
    if not values:
        return Judgement(float("nan"), float("nan"), float("nan"), None, target)
    return Judgement(median(values), min(values), max(values), median_ci(values), target, len(values))


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# --- the summary at the top of results.md -------------------------------------------------------------------


@dataclass(frozen=True)
class SummaryRow:
    what: str
    measured: str
    target: str
    verdict: str  # MET / NOT_MET / NA
    note: str = ""


def summary_table(rows: Sequence[SummaryRow]) -> str:
    return table(["target", "measured", "target value", "verdict", "note"],
                 [[r.what, r.measured, r.target, r.verdict, r.note] for r in rows])


# --- datapath: stream and request/response, per mode, path and repetition --------------------------------


@dataclass(frozen=True)
class Row:
    """One datapath metric: which test produced it, how to print it and what netwatchd must reach."""

    test: str  # "stream" | "rr"
    key: str  # key in the per-run measurement dict
    label: str
    fmt: str  # format spec for the absolute values
    target: str = ""  # ">=0.97" or "<=1.03" (ratio vs baseline), empty when informational
    higher_is_better: bool = True


DATAPATH_ROWS = (
    Row("stream", "gbps", "TCP stream throughput, Gbit/s (1 CPU)", ".2f", ">=0.97"),
    Row("stream", "cpu_all", "TCP stream CPU s per GB, all CPUs", ".3f", higher_is_better=False),
    Row("stream", "cpu_load", "TCP stream CPU s per GB, load CPU only", ".3f", higher_is_better=False),
    Row("rr", "rate", "1-byte TCP RR rate, transactions/s", ",.0f", ">=0.97"),
    Row("rr", "p99_us", "1-byte TCP RR p99 latency, us", ".1f", higher_is_better=False),
    Row("rr", "cpu_all", "1-byte TCP RR CPU us per transaction, all CPUs", ".2f", "<=1.03", higher_is_better=False),
    Row("rr", "cpu_load", "1-byte TCP RR CPU us per transaction, load CPU only", ".2f", higher_is_better=False),
)


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

    def ratios(self, mode: str, path: str, row: Row, against: str = "baseline") -> list[float]:
        """mode / ``against`` of the same repetition: pairs run back to back, so slow drift cancels."""
        out = []
        for (mo, p, t, rep), m in sorted(self.runs.items()):
            if (mo, p, t) != (mode, path, row.test):
                continue
            other = self.runs.get((against, p, t, rep))
            if other and other[row.key]:
                out.append(m[row.key] / other[row.key])
        return out

    def judge(self, path: str, row: Row) -> Judgement:
        """netwatchd / baseline against the row's target."""
        return judge(self.ratios("netwatchd", path, row), row.target)

    def versus_tcpdump(self, path: str, row: Row) -> Judgement:
        """netwatchd / tcpdump of the same repetition: netwatchd must cost less (> 1 for rates, < 1 for CPU)."""
        return judge(self.ratios("netwatchd", path, row, against="tcpdump"), ">1" if row.higher_is_better else "<1")

    def render(self) -> str:
        others = [m for m in self.modes if m != "baseline"]
        header = ["path", "metric", "baseline"]
        for m in others:
            header += [m, f"{m} / baseline, median (min-max; 95% CI)"]
        header += ["target (netwatchd / baseline)", "netwatchd", "CI supports it"]
        rows = []
        for path in self.paths:
            for row in DATAPATH_ROWS:
                cells: list[object] = [path, row.label, format(median(self.values("baseline", path, row)), row.fmt)]
                for m in others:
                    cells += [format(median(self.values(m, path, row)), row.fmt),
                              judge(self.ratios(m, path, row), row.target).cell()]
                j = self.judge(path, row) if "netwatchd" in others else None
                cells += [target_text(row.target, "x") if row.target else "",
                          j.verdict if j and row.target else "", j.support if j and row.target else ""]
                rows.append(cells)
        return table(header, rows)
