"""Latency histograms: the bucket scheme shared by the BPF programs and the Prometheus export.

The kernel bins each sample straight into the Prometheus bucket it belongs to (`NW_HIST_SLOT` in
`bpf/include/netwatch.h`, generated here from the bounds), so the exported histogram is exact — no
re-binning of log2 slots. Default bounds (seconds), documented in the README:

    5us 10us 20us 50us 100us 200us 500us 1ms 2ms 3ms 5ms 7.5ms 10ms 15ms 20ms 30ms 50ms 100ms 200ms
    500ms 1s 2s 5s 10s (+Inf)

enough to tell 10 us from 20 us and 1 ms from 2 ms, with a few extra bounds where pod RTTs live.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Iterable, Sequence

from prometheus_client.core import HistogramMetricFamily

DEFAULT_BOUNDS_S: tuple[float, ...] = (
    5e-6, 10e-6, 20e-6, 50e-6, 100e-6, 200e-6, 500e-6,
    1e-3, 2e-3, 3e-3, 5e-3, 7.5e-3, 10e-3, 15e-3, 20e-3, 30e-3, 50e-3,
    100e-3, 200e-3, 500e-3, 1.0, 2.0, 5.0, 10.0,
)


def bpf_defines(bounds_s: Sequence[float] = DEFAULT_BOUNDS_S) -> dict[str, str | int]:
    """-D definitions for compile_program: NW_HIST_NBOUNDS and the NW_HIST_SLOT(v) macro (bounds in ns)."""
    ns = [round(b * 1e9) for b in bounds_s]
    if ns != sorted(set(ns)) or not ns:
        raise ValueError(f"histogram bounds must be increasing and distinct: {bounds_s}")
    slot = "+".join(f"((v)>{b}ULL)" for b in ns)
    return {"NW_HIST_NBOUNDS": len(ns), "NW_HIST_SLOT(v)": f"({slot})"}


def slot_of(value_s: float, bounds_s: Sequence[float] = DEFAULT_BOUNDS_S) -> int:
    """Python mirror of NW_HIST_SLOT (for tests): index of the first bound >= value."""
    v = round(value_s * 1e9)
    return sum(1 for b in bounds_s if v > round(b * 1e9))


def quantile(buckets: Sequence[int], q: float, bounds_s: Sequence[float] = DEFAULT_BOUNDS_S) -> float | None:
    """histogram_quantile() as Prometheus computes it (linear within a bucket), from per-slot counts."""
    total = sum(buckets)
    if total == 0:
        return None
    rank, seen = q * total, 0
    for i, n in enumerate(buckets):
        if seen + n >= rank and n:
            lo = bounds_s[i - 1] if i > 0 else 0.0
            if i >= len(bounds_s):
                return bounds_s[-1]
            return lo + (bounds_s[i] - lo) * (rank - seen) / n
        seen += n
    return bounds_s[-1]


class HistogramAccounting:
    """Cumulative per-label histograms fed from per-key cumulative kernel histograms (growth since last read).

    `label_fn(key)` returns the label tuple for a raw key (or None to skip it); keys may disappear and
    reappear (socket/flow churn, eviction): a smaller value than last seen means a re-created entry.
    """

    def __init__(self, label_fn: Callable[[Hashable], tuple[str, ...] | None],
                 bounds_s: Sequence[float] = DEFAULT_BOUNDS_S) -> None:
        self.label_fn = label_fn
        self.bounds_s = tuple(bounds_s)
        self.nslots = len(self.bounds_s) + 1
        self.buckets: dict[tuple[str, ...], list[int]] = {}
        self.sums_ns: dict[tuple[str, ...], int] = {}
        self._last: dict[Hashable, tuple[tuple[int, ...], int]] = {}
        self.lock = threading.Lock()

    def update(self, entries: Iterable[tuple[Hashable, Sequence[int], int]]) -> None:
        """`entries`: (raw key, cumulative slot counts, cumulative sum in ns)."""
        with self.lock:
            for key, slots, sum_ns in entries:
                slots = tuple(int(x) for x in slots)
                last_slots, last_sum = self._last.get(key, ((0,) * self.nslots, 0))
                deltas = [a - b for a, b in zip(slots, last_slots, strict=True)]
                dsum = sum_ns - last_sum
                if any(d < 0 for d in deltas) or dsum < 0:  # re-created entry
                    deltas, dsum = list(slots), sum_ns
                self._last[key] = (slots, sum_ns)
                if not any(deltas):
                    continue
                labels = self.label_fn(key)
                if labels is None:
                    continue
                acc = self.buckets.setdefault(labels, [0] * self.nslots)
                for i, d in enumerate(deltas):
                    acc[i] += d
                self.sums_ns[labels] = self.sums_ns.get(labels, 0) + dsum

    def forget_keys(self, keys: Iterable[Hashable]) -> None:
        with self.lock:
            for k in keys:
                self._last.pop(k, None)

    def forget_labels(self, pred: Callable[[tuple[str, ...]], bool]) -> int:
        with self.lock:
            gone = [k for k in self.buckets if pred(k)]
            for k in gone:
                del self.buckets[k]
                self.sums_ns.pop(k, None)
            return len(gone)

    def family(self, name: str, help_text: str, labels: Sequence[str]) -> HistogramMetricFamily:
        """A Prometheus histogram family in seconds (cumulative `le` buckets, `_sum`, `_count`)."""
        fam = HistogramMetricFamily(name, help_text, labels=list(labels))
        with self.lock:
            items = sorted(self.buckets.items())
            sums = dict(self.sums_ns)
        for labels_t, slots in items:
            cum, out = 0, []
            for i, n in enumerate(slots):
                cum += n
                le = f"{self.bounds_s[i]:g}" if i < len(self.bounds_s) else "+Inf"
                out.append((le, cum))
            fam.add_metric(list(labels_t), out, sums.get(labels_t, 0) / 1e9)
        return fam
