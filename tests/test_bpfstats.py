"""StatsSampler: kernel BPF run-time stats measured in short windows and scaled (pure, no kernel needed)."""

from __future__ import annotations

from netwatchd.kernel.bpfstats import ProgStats, StatsSampler


class FakeKernel:
    """A program that runs `rate` times per second at `ns` each; stats count only while enabled."""

    def __init__(self, rate: float, ns: float) -> None:
        self.rate, self.ns, self.now = rate, ns, 0.0
        self.enabled_fds: set[int] = set()
        self.counted = 0.0  # runs counted by the kernel (only while enabled)
        self.closed: list[int] = []

    def enable(self) -> int:
        self.enabled_fds.add(99)
        return 99

    def read(self, fd: int) -> ProgStats:
        return ProgStats(prog_id=7, run_time_ns=int(self.counted * self.ns), run_cnt=int(self.counted))

    def sleep(self, seconds: float) -> None:
        if self.enabled_fds:
            self.counted += self.rate * seconds
        self.now += seconds

    def clock(self) -> float:
        return self.now


def test_windows_are_scaled_to_the_whole_time(monkeypatch):
    k = FakeKernel(rate=1000, ns=150)
    closed = []
    monkeypatch.setattr("netwatchd.kernel.bpfstats.os.close", lambda fd: (closed.append(fd), k.enabled_fds.clear()))
    s = StatsSampler(lambda: {("drops", "nw_kfree_skb"): 5}, window_s=1.0, every_s=60.0,
                     enable=k.enable, read=k.read, clock=k.clock)
    s._last_end = k.clock()
    for _ in range(3):
        k.sleep(59.0)  # stats off: the kernel counts nothing
        assert s.sample(k.sleep)
    est = s.snapshot()[("drops", "nw_kfree_skb")]
    assert closed == [99, 99, 99]  # every window turned stats off again
    assert k.counted == 3000  # the kernel counted 3 s of runs out of 180 s
    assert abs(est.runs - 180 * 1000) < 1  # scaled to the whole 180 s
    assert abs(est.run_time_ns - 180 * 1000 * 150) < 150
    assert est.last_ns_per_run == 150 and est.last_runs_per_s == 1000


def test_refused_stats_stop_the_windows():
    s = StatsSampler(lambda: {}, enable=lambda: None)
    assert s.sample(lambda _s: None) is False and s.available is False and s.snapshot() == {}


def test_a_reloaded_program_starts_a_new_estimate(monkeypatch):
    monkeypatch.setattr("netwatchd.kernel.bpfstats.os.close", lambda fd: None)
    reads = iter([ProgStats(1, 0, 0), ProgStats(1, 1000, 10), ProgStats(2, 0, 0), ProgStats(2, 500, 1)])
    t = iter([0.0, 1.0, 2.0, 3.0])
    s = StatsSampler(lambda: {("tc", "p"): 3}, window_s=1.0, every_s=1.0, enable=lambda: 1,
                     read=lambda fd: next(reads), clock=lambda: next(t))
    s.sample(lambda _s: None)
    s.sample(lambda _s: None)
    est = s.snapshot()[("tc", "p")]
    assert est.prog_id == 2 and est.last_ns_per_run == 500
    assert est.runs == 2  # 1 run in a 1 s window, 2 s since the previous window: a new program, a new total
