"""Unit tests of the lean daemon's pure parts: ctypes layouts as JSON, per-label totals from whole map reads
(against a per-key reference model), the labelling budget, and the cached /metrics exposition."""

from __future__ import annotations

import ctypes
import ipaddress
import json
import random
from array import array

from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.openmetrics.exposition import generate_latest as om_generate_latest
from prometheus_client.registry import CollectorRegistry

from netwatchd.classify import ClusterView, parse_cidrs
from netwatchd.export.http import ExpositionCache
from netwatchd.identity.local import StandaloneResolver
from netwatchd.kernel import ctlayout
from netwatchd.keytotals import KeyTotals, key_slices
from netwatchd.pipeline import DropAccounting
from netwatchd.probes.drops import DropRecord

# ---------------------------------------------------------------------------------------------------------
# ctypes layouts
# ---------------------------------------------------------------------------------------------------------


class Inner(ctypes.Structure):
    _fields_ = [("a", ctypes.c_uint16), ("b", ctypes.c_uint64), ("c", ctypes.c_ubyte * 3)]


class Addr(ctypes.Union):
    _fields_ = [("v4", ctypes.c_uint32), ("v6", ctypes.c_ubyte * 16)]


class Packed(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("tag", ctypes.c_ubyte), ("counter", ctypes.c_uint64), ("small", ctypes.c_int16)]


class WithAnon(ctypes.Structure):
    class _U(ctypes.Union):
        class _S(ctypes.Structure):
            _fields_ = [("lo", ctypes.c_uint32), ("hi", ctypes.c_uint32)]

        _anonymous_ = ("s",)
        _fields_ = [("whole", ctypes.c_uint64), ("s", _S)]

    _anonymous_ = ("u",)
    _fields_ = [("u", _U), ("total", ctypes.c_int64)]


class Everything(ctypes.Structure):
    _fields_ = [("family", ctypes.c_ubyte), ("addr", Addr), ("inner", Inner * 2), ("grid", (ctypes.c_uint32 * 3) * 2),
                ("packed", Packed), ("anon", WithAnon), ("flags", ctypes.c_uint32, 3), ("kind", ctypes.c_uint32, 5),
                ("rest", ctypes.c_uint32, 24), ("ptr", ctypes.c_void_p), ("ch", ctypes.c_char * 4)]


def test_layout_round_trip_keeps_size_offsets_and_behaviour():
    layout = json.loads(json.dumps(ctlayout.describe(Everything)))
    rebuilt = ctlayout.build(layout)
    assert ctypes.sizeof(rebuilt) == ctypes.sizeof(Everything)
    assert ctlayout.offsets(rebuilt) == ctlayout.offsets(Everything)
    assert ctlayout.offsets(rebuilt)[".anon.u.s.lo"] == (Everything.anon.offset, 4)
    # same bytes decode to the same values, bitfields and anonymous members included
    src = Everything(family=6, flags=5, kind=19, rest=123456)
    src.addr.v4 = 0x0A0B0C0D
    src.inner[1].b = 2**40 + 3
    src.grid[1][2] = 77
    src.packed.counter = 2**63
    src.anon.hi = 9
    got = rebuilt.from_buffer_copy(bytes(src))
    assert (got.family, got.flags, got.kind, got.rest) == (6, 5, 19, 123456)
    assert (got.addr.v4, got.inner[1].b, got.grid[1][2], got.packed.counter) == (0x0A0B0C0D, 2**40 + 3, 77, 2**63)
    assert got.anon.hi == 9 and got.anon.whole == 9 << 32  # through the anonymous union and struct
    assert ctlayout.build(ctlayout.describe(ctypes.c_uint32)) is ctypes.c_uint32
    assert ctlayout.describe(None) is None and ctlayout.build(None) is None


def test_tail_padding_after_trailing_bitfields_only():
    class Bits(ctypes.Structure):
        _fields_ = [("a", ctypes.c_uint8), ("f", ctypes.c_uint8, 3)]

    fixed = ctlayout.build(ctlayout.with_tail(ctlayout.describe(Bits), 8))
    assert ctypes.sizeof(fixed) == 8 and fixed.f.offset == Bits.f.offset
    # not a trailing bitfield: left alone (the daemon refuses a map whose sizes disagree)
    assert ctlayout.with_tail(ctlayout.describe(Inner), 64) == ctlayout.describe(Inner)


# ---------------------------------------------------------------------------------------------------------
# KeyTotals against a per-key reference
# ---------------------------------------------------------------------------------------------------------


class Reference:
    """The obvious per-key computation KeyTotals must agree with."""

    def __init__(self):
        self.last, self.totals = {}, {}

    def read(self, entries, labels):
        new_last = {}
        for (k, p, b), lab in zip(entries, labels, strict=True):
            if lab is None:
                if k in self.last:
                    new_last[k] = self.last[k]
                continue
            lp, lb = self.last.get(k, (0, 0))
            dp, db = (p - lp, b - lb) if p >= lp else (p, b)
            new_last[k] = (p, b)
            if dp:
                t = self.totals.get(lab, (0, 0))
                self.totals[lab] = (t[0] + dp, t[1] + db)
        self.last = new_last

    def forget(self, keys):
        for k in keys:
            self.last.pop(k, None)


def _buffers(entries, size=4):
    keys = b"".join(k for k, _p, _b in entries)
    values = array("Q", [x for _k, p, b in entries for x in (p, b)]).tobytes()
    return keys, values, key_slices(keys, size)


def test_key_totals_match_the_per_key_reference_over_random_histories():
    rng = random.Random(7)
    for _run in range(30):
        packets, nbytes = {}, {}
        kt, ref = KeyTotals(packets, nbytes), Reference()
        universe = [i.to_bytes(4, "little") for i in range(40)]
        values = {}
        order = list(universe[:20])
        label_of = {k: ("lab", str(rng.randrange(4))) for k in universe}
        unlabelled: set[bytes] = set()
        for _step in range(25):
            op = rng.random()
            if op < 0.15:  # new keys appear (at random positions: a hash map's order)
                absent = [u for u in universe if u not in order]
                for k in rng.sample(absent, min(3, len(absent))):
                    order.insert(rng.randrange(len(order) + 1), k)
                    if rng.random() < 0.3:
                        unlabelled.add(k)
            elif op < 0.25 and order:  # we evict some keys (and forget them); some come back later
                gone = rng.sample(order, min(3, len(order)))
                order = [k for k in order if k not in gone]
                for k in gone:
                    values.pop(k, None)
                kt.forget(gone)
                ref.forget(gone)
            elif op < 0.3 and order:  # someone else deletes and re-creates a key: it restarts low
                values[rng.choice(order)] = 0
            elif op < 0.35:
                unlabelled.clear()  # the labelling caught up
            for k in order:
                if rng.random() < 0.6:
                    values[k] = values.get(k, 0) + rng.randrange(1, 5)
            entries = [(k, values.get(k, 0), 60 * values.get(k, 0)) for k in order]
            labels = [None if k in unlabelled else label_of[k] for k in order]
            keys, vals, key_list = _buffers(entries)
            if kt.same_keys(keys) and not unlabelled:
                kt.advance(vals)
            else:
                kt.read(keys, vals, 4, key_list, labels)
            ref.read(entries, labels)
            assert {lab: (packets[lab], nbytes[lab]) for lab in packets} == ref.totals


def test_key_totals_fast_path_and_idle_keys():
    packets, nbytes = {}, {}
    kt = KeyTotals(packets, nbytes)
    entries = [(i.to_bytes(4, "little"), i, i) for i in range(1, 6)]
    keys, vals, key_list = _buffers(entries)
    kt.read(keys, vals, 4, key_list, [("a",)] * 3 + [("b",)] * 2)
    assert kt.same_keys(keys) and packets == {("a",): 6, ("b",): 9}
    grown = [(k, p + (1 if p == 2 else 0), b) for k, p, b in entries]
    kt.advance(_buffers(grown)[1])
    assert packets == {("a",): 7, ("b",): 9}
    assert kt.idle_keys() == [k for k, p, _b in entries if p != 2]
    kt.relabel()
    assert not kt.same_keys(keys)


# ---------------------------------------------------------------------------------------------------------
# DropAccounting: labelling budget and catch-up
# ---------------------------------------------------------------------------------------------------------


def test_new_keys_over_the_budget_are_counted_once_labelled():
    view = ClusterView(node_pod_cidrs=parse_cidrs(["10.244.1.0/24"]))
    acct = DropAccounting(view, StandaloneResolver(), lambda n: "NO_SOCKET")
    recs = {}
    for i in range(50):
        key = i.to_bytes(4, "little")
        recs[key] = DropRecord(key=key, src=ipaddress.ip_address(f"10.250.0.{i + 1}"),
                               dst=ipaddress.ip_address("10.244.1.5"), protocol="udp", reason=3, netns=1,
                               ifindex=2, packets=0, bytes=0)
    keys = b"".join(recs)
    vals = array("Q", [x for _ in recs for x in (2, 120)]).tobytes()
    assert acct.update_table(keys, vals, 4, recs.__getitem__, budget_s=0.0) == 50  # nothing labelled yet
    assert acct.snapshot()[0] == {} and acct.pending == 50
    while acct.catch_up(budget_s=0.0):
        pass
    vals = array("Q", [x for _ in recs for x in (3, 180)]).tobytes()
    assert acct.update_table(keys, vals, 4, recs.__getitem__) == 0
    assert sum(acct.snapshot()[0].values()) == 50 * 3 and sum(acct.snapshot()[1].values()) == 50 * 180
    vals = array("Q", [x for _ in recs for x in (4, 240)]).tobytes()
    acct.update_table(keys, vals, 4, recs.__getitem__)  # same keys: the fast path
    assert sum(acct.snapshot()[0].values()) == 50 * 4


# ---------------------------------------------------------------------------------------------------------
# The cached exposition renders exactly what prometheus_client renders
# ---------------------------------------------------------------------------------------------------------


class Changing:
    def __init__(self):
        self.n = 0

    def collect(self):
        c = CounterMetricFamily("nw_test_drops", "Drops.", labels=["pod"])
        c.add_metric(["a"], 5)
        c.add_metric(["b"], self.n)
        yield c
        g = GaugeMetricFamily("nw_test_static", "Never changes.", labels=["x"])
        g.add_metric(["y"], 1)
        yield g
        h = HistogramMetricFamily("nw_test_seconds", "A histogram.", labels=["c"])
        h.add_metric(["k"], [("0.1", 1), ("1", 2 + self.n), ("+Inf", 3 + self.n)], sum_value=1.5)
        yield h


def test_exposition_cache_renders_like_prometheus_client():
    reg = CollectorRegistry(auto_describe=False)
    src = Changing()
    reg.register(src)
    cache = ExpositionCache(reg)
    for n in (0, 0, 3, 3, 7):
        src.n = n
        assert cache.render(generate_latest, "text/plain; version=0.0.4") == generate_latest(reg)
        om = cache.render(om_generate_latest, "application/openmetrics-text; version=1.0.0")
        assert om == om_generate_latest(reg) and om.count(b"# EOF") == 1
