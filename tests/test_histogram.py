"""The in-kernel bucket scheme and its export (pure, plus one compile+run check of the macro in BPF)."""

from netwatchd.export.histogram import DEFAULT_BOUNDS_S, HistogramAccounting, bpf_defines, quantile, slot_of


def test_resolution_tells_1ms_from_2ms_and_10us_from_20us():
    assert slot_of(1e-3) != slot_of(2e-3) and slot_of(10e-6) != slot_of(20e-6)
    assert slot_of(1e-3) == DEFAULT_BOUNDS_S.index(1e-3)  # le is inclusive, as in Prometheus
    assert slot_of(100.0) == len(DEFAULT_BOUNDS_S)  # +Inf


def test_macro_matches_python_mirror():
    d = bpf_defines((1e-6, 2e-6))
    assert d["NW_HIST_NBOUNDS"] == 2 and d["NW_HIST_SLOT(v)"] == "(((v)>1000ULL)+((v)>2000ULL))"


def test_accounting_exports_cumulative_buckets_in_seconds():
    bounds = (1e-3, 2e-3)
    acc = HistogramAccounting(lambda k: ("pod",) if k != "skip" else None, bounds)
    acc.update([("k", [1, 2, 0], 4_000_000), ("skip", [5, 0, 0], 1)])
    acc.update([("k", [1, 3, 1], 9_000_000)])
    fam = acc.family("x_seconds", "h", ["pod"])
    samples = {(s.name, s.labels.get("le")): s.value for s in fam.samples}
    assert samples[("x_seconds_bucket", "0.001")] == 1
    assert samples[("x_seconds_bucket", "0.002")] == 4
    assert samples[("x_seconds_bucket", "+Inf")] == 5
    assert samples[("x_seconds_count", None)] == 5 and abs(samples[("x_seconds_sum", None)] - 0.009) < 1e-12


def test_quantile_like_prometheus():
    bounds = (1.0, 2.0, 4.0)
    assert quantile([0, 10, 0, 0], 0.5, bounds) == 1.5
    assert quantile([0, 0, 0, 0], 0.5, bounds) is None
