"""The model behind `netwatchctl top`: rows of rates and latency quantiles over a window, one per local pod and
traffic class, from two scrapes of a netwatchd's /metrics or from a Prometheus server's instant queries.

No terminal here (that is `netwatchd.ctl_top`); HTTP goes through an injectable `get(url, timeout)` so tests
feed synthetic /metrics text and canned Prometheus answers.

Window arithmetic follows Prometheus:
- a counter's increase over the window is `cur - prev`, or `cur` when it went down (the daemon restarted,
  or the series was deleted and re-created); a series absent from the previous scrape started in the window;
- a latency quantile is `histogram_quantile()` (linear interpolation inside the bucket, the upper bound of
  the highest finite bucket when the rank falls in +Inf) over the increase of the cumulative `_bucket`
  counters, summed over every series of the row (direction, service);
- the daemon's restart (its /api/v1/status uptime went backwards) zeroes every previous value, which also
  catches a counter that grew past its old value after the restart.

Columns are absent (None, shown "-") when netwatchd does not export the metric at all; present metrics give
0 for rows without a series and None for a quantile without samples in the window.
"""

from __future__ import annotations

import fnmatch
import json
import math
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

PACKETS = "netwatch_packets_total"
BYTES = "netwatch_bytes_total"
DROPS = "netwatch_drops_total"
CONNECT = "netwatch_tcp_connect_seconds"
CONNECT_FAILURES = "netwatch_tcp_connect_failures_total"
RTT = "netwatch_tcp_rtt_seconds"
RETRANSMITS = "netwatch_tcp_retransmits_total"
TRANSIT = "netwatch_node_transit_seconds"
PROBE_ATTACHED = "netwatch_probe_attached"

ROW_LABELS = ("namespace", "pod", "traffic_class")
NODE_POD = ""  # pod label of the node itself

LabelKey = tuple[tuple[str, str], ...]
HttpGet = Callable[[str, float], tuple[int, bytes]]


class Unreachable(Exception):
    """No usable answer: connection refused, timeout, HTTP error, not the expected format (exit 3)."""


class Problem(Exception):
    """The server answered but reports a problem, e.g. a probe not attached, a PromQL error (exit 4)."""


def http_get(url: str, timeout: float) -> tuple[int, bytes]:
    """GET `url`: (status, body); raises Unreachable when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - user-given endpoint
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise Unreachable(f"{url}: {reason}") from exc


def normalize_url(url: str) -> str:
    url = url.strip().rstrip("/")
    return url if "://" in url else f"http://{url}"


def key_of(labels: dict[str, str]) -> LabelKey:
    return tuple(sorted(labels.items()))


# ----------------------------------------------------------------------------------------------------
# Scrapes
# ----------------------------------------------------------------------------------------------------


@dataclass
class Histogram:
    buckets: dict[float, float] = field(default_factory=dict)  # le -> cumulative count
    count: float = 0.0
    sum: float = 0.0


@dataclass
class Snapshot:
    """One scrape of /metrics: counters by exposed name (`..._total`), histograms by base name, gauges."""

    time: float  # monotonic seconds at the scrape
    counters: dict[str, dict[LabelKey, float]] = field(default_factory=dict)
    histograms: dict[str, dict[LabelKey, Histogram]] = field(default_factory=dict)
    gauges: dict[str, dict[LabelKey, float]] = field(default_factory=dict)
    present: set[str] = field(default_factory=set)  # every family netwatchd exported, even without samples
    uptime: float | None = None  # the daemon's uptime (seconds) from /api/v1/status, when known


def parse_metrics(text: str, at: float, uptime: float | None = None) -> Snapshot:
    """Parse Prometheus text exposition into a Snapshot taken at monotonic time `at`."""
    snap = Snapshot(time=at, uptime=uptime)
    for fam in text_string_to_metric_families(text):
        if fam.type == "counter":
            name = fam.name + "_total"
            snap.present.add(name)
            series = snap.counters.setdefault(name, {})
            for s in fam.samples:
                if s.name == name:
                    series[key_of(s.labels)] = s.value
        elif fam.type == "histogram":
            snap.present.add(fam.name)
            hists = snap.histograms.setdefault(fam.name, {})
            for s in fam.samples:
                labels = {k: v for k, v in s.labels.items() if k != "le"}
                h = hists.setdefault(key_of(labels), Histogram())
                if s.name == fam.name + "_bucket":
                    h.buckets[float(s.labels["le"])] = s.value
                elif s.name == fam.name + "_count":
                    h.count = s.value
                elif s.name == fam.name + "_sum":
                    h.sum = s.value
        elif fam.type == "gauge":
            snap.present.add(fam.name)
            gauges = snap.gauges.setdefault(fam.name, {})
            for s in fam.samples:
                if s.name == fam.name:
                    gauges[key_of(s.labels)] = s.value
    return snap


def restarted(prev: Snapshot, cur: Snapshot, slack: float = 1.0) -> bool:
    """The daemon restarted between the scrapes: its uptime grew less than the time between them."""
    if prev.uptime is None or cur.uptime is None:
        return False
    return cur.uptime + slack < prev.uptime + (cur.time - prev.time)


def counter_increase(prev: float | None, cur: float) -> float:
    """Prometheus' rule: a counter that went down was reset, so all of its current value is new."""
    if prev is None or cur < prev:
        return cur
    return cur - prev


def histogram_increase(prev: Histogram | None, cur: Histogram) -> dict[float, float]:
    """Increase of each cumulative bucket; the whole histogram when any of it went down (a reset)."""
    if prev is None or cur.count < prev.count or any(cur.buckets.get(le, 0.0) < v for le, v in prev.buckets.items()):
        return dict(cur.buckets)
    return {le: v - prev.buckets.get(le, 0.0) for le, v in cur.buckets.items()}


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' histogram_quantile over cumulative buckets {le: count}; None where it returns NaN."""
    if not buckets or math.isnan(q):
        return None
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    bs = sorted(buckets.items())
    if not math.isinf(bs[-1][0]) or len(bs) < 2:
        return None
    # ensureMonotonic: float noise in summed rates must not make the cumulative counts go down
    mono, top = [], 0.0
    for le, n in bs:
        top = max(top, n)
        mono.append((le, top))
    total = mono[-1][1]
    if total <= 0:
        return None
    rank = q * total
    b = next((i for i in range(len(mono) - 1) if mono[i][1] >= rank), len(mono) - 1)
    if b == len(mono) - 1:
        return mono[-2][0]
    if b == 0 and mono[0][0] <= 0:
        return mono[0][0]
    start, end, count = 0.0, mono[b][0], mono[b][1]
    if b > 0:
        start = mono[b - 1][0]
        count -= mono[b - 1][1]
        rank -= mono[b - 1][1]
    return start + (end - start) * (rank / count)


# ----------------------------------------------------------------------------------------------------
# Rows, filters
# ----------------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One local pod (pod "" = the node itself) and traffic class, over one window. JSON: `asdict`."""

    node: str
    namespace: str
    pod: str
    traffic_class: str
    packets_per_second: float | None = None
    bytes_per_second: float | None = None
    drops_per_second: float | None = None
    drops_total: float | None = None
    top_reason: str = ""
    drop_reasons: dict[str, float] = field(default_factory=dict)
    connect_p50_seconds: float | None = None
    connect_p99_seconds: float | None = None
    rtt_p99_seconds: float | None = None
    transit_p99_seconds: float | None = None
    retransmits_per_second: float | None = None
    connect_failures_per_second: float | None = None
    connect_failures: dict[str, float] = field(default_factory=dict)
    services: list[str] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.node, self.namespace, self.pod, self.traffic_class)

    def to_json(self) -> dict:
        def num(v):
            return None if v is None or math.isnan(v) else round(v, 9)

        doc = {}
        for k, v in self.__dict__.items():
            if isinstance(v, float) or v is None:
                doc[k] = num(v)
            elif isinstance(v, dict):
                doc[k] = {kk: num(vv) for kk, vv in sorted(v.items())}
            elif isinstance(v, list):
                doc[k] = list(v)
            else:
                doc[k] = v
        return doc

    def text(self) -> str:
        """What the interactive `/` filter searches: every label of the row, its services and top reason."""
        pod = self.pod or "(node)"
        return " ".join([self.node, self.namespace, pod, f"{self.namespace}/{pod}", self.traffic_class,
                         self.top_reason, *self.services]).lower()


def _globs(patterns: str | Sequence[str] | None) -> tuple[str, ...]:
    """'a,b*' or ['a', 'b*'] -> ('a', 'b*'); empty -> () (matches everything)."""
    if not patterns:
        return ()
    if isinstance(patterns, str):
        patterns = [patterns]
    return tuple(p.strip() for item in patterns for p in item.split(",") if p.strip())


def _match(value: str, globs: tuple[str, ...]) -> bool:
    return not globs or any(fnmatch.fnmatchcase(value, g) for g in globs)


FILTER_KEYS = {"ns": "namespace", "namespace": "namespace", "pod": "pod", "class": "traffic_class",
               "traffic_class": "traffic_class", "svc": "service", "service": "service", "node": "node"}


@dataclass
class Filter:
    """Which rows to show. Flags hold shell-style globs (comma-separated alternatives); `text` is the
    interactive filter: `key:glob` words (ns:, pod:, class:, svc:, node:) and plain words that must all
    appear (case-insensitive substrings) in the row's labels, services or top reason."""

    namespace: tuple[str, ...] = ()
    pod: tuple[str, ...] = ()
    traffic_class: tuple[str, ...] = ()
    service: tuple[str, ...] = ()  # "name" or "namespace/name"
    node: tuple[str, ...] = ()
    text: str = ""

    @classmethod
    def build(cls, namespace=None, pod=None, traffic_class=None, service=None, node=None, text="") -> Filter:
        return cls(_globs(namespace), _globs(pod), _globs(traffic_class), _globs(service), _globs(node), text)

    def _text_terms(self) -> tuple[dict[str, tuple[str, ...]], list[str]]:
        keyed: dict[str, list[str]] = {}
        words = []
        for word in self.text.split():
            k, sep, v = word.partition(":")
            if sep and k.lower() in FILTER_KEYS and v:
                keyed.setdefault(FILTER_KEYS[k.lower()], []).append(v)
            else:
                words.append(word.lower())
        return {k: tuple(v) for k, v in keyed.items()}, words

    def services(self) -> tuple[str, ...]:
        keyed, _ = self._text_terms()
        return self.service + keyed.get("service", ())

    def row_labels_match(self, node: str, namespace: str, pod: str, traffic_class: str) -> bool:
        """The label part of the filter (flags and `key:` words; not services, not plain words)."""
        keyed, _ = self._text_terms()
        for attr, value in (("node", node), ("namespace", namespace), ("pod", pod),
                            ("traffic_class", traffic_class)):
            if not _match(value, getattr(self, attr)):
                return False
            if attr in keyed and not _match(value, keyed[attr]):
                return False
        return True

    def service_match(self, labels: dict[str, str]) -> bool:
        """A series matches the service filter when it names any of its services ("ns/name" or "name" globs,
        from the flags and the `svc:` words alike)."""
        globs = self.services()
        if not globs:
            return True
        svc, ns = labels.get("service", ""), labels.get("service_namespace", "")
        if not svc:
            return False
        return any(_match(f"{ns}/{svc}", (g,)) if "/" in g else _match(svc, (g,)) for g in globs)

    @property
    def has_service(self) -> bool:
        return bool(self.services())

    def row_text_match(self, row: Row) -> bool:
        _, words = self._text_terms()
        text = row.text()
        return all(w in text for w in words)

    def to_json(self) -> dict:
        return {"namespace": list(self.namespace), "pod": list(self.pod), "traffic_class": list(self.traffic_class),
                "service": list(self.service), "node": list(self.node), "text": self.text}


class RowBuilder:
    """Accumulates per-series window values into rows, applying the filter (see Filter)."""

    def __init__(self, flt: Filter, node_label: str | None = None) -> None:
        self.flt = flt
        self.node_label = node_label
        self.rows: dict[tuple[str, str, str, str], Row] = {}
        self.matched: set[tuple[str, str, str, str]] = set()  # rows with a series of a matching service
        self.present: set[str] = set()  # fields whose metric exists
        self._hists: dict[tuple[tuple[str, str, str, str], str], dict[float, float]] = {}
        self._services: dict[tuple[str, str, str, str], set[str]] = {}

    def row(self, labels: dict[str, str], service_matched: bool = False) -> Row | None:
        """The row of a series (created on first use); None when the filter leaves the series out.
        `service_matched`: the series was already narrowed to the service filter (a PromQL selector)."""
        node = labels.get(self.node_label, "") if self.node_label else ""
        ns, pod, cls = (labels.get(k, "") for k in ROW_LABELS)
        if not cls or not self.flt.row_labels_match(node, ns, pod, cls):
            return None
        if service_matched and self.flt.has_service:
            self.matched.add((node, ns, pod, cls))
        elif "service" in labels:
            if not self.flt.service_match(labels):
                return None
            if self.flt.has_service:
                self.matched.add((node, ns, pod, cls))
            if labels["service"]:
                self._services.setdefault((node, ns, pod, cls), set()).add(
                    f"{labels.get('service_namespace', '')}/{labels['service']}")
        r = self.rows.get((node, ns, pod, cls))
        if r is None:
            r = self.rows[(node, ns, pod, cls)] = Row(node, ns, pod, cls)
        return r

    def metric_present(self, *fields: str) -> None:
        self.present.update(fields)

    def add(self, fld: str, labels: dict[str, str], value: float) -> None:
        r = self.row(labels)
        if r is not None:
            setattr(r, fld, (getattr(r, fld) or 0.0) + value)

    def add_drops(self, labels: dict[str, str], per_second: float | None, total: float | None) -> None:
        r = self.row(labels)
        if r is None:
            return
        if per_second is not None:
            r.drops_per_second = (r.drops_per_second or 0.0) + per_second
            reason = labels.get("reason", "")
            if per_second > 0:
                r.drop_reasons[reason] = r.drop_reasons.get(reason, 0.0) + per_second
        if total is not None:
            r.drops_total = (r.drops_total or 0.0) + total

    def add_connect_failures(self, labels: dict[str, str], per_second: float) -> None:
        r = self.row(labels)
        if r is None:
            return
        r.connect_failures_per_second = (r.connect_failures_per_second or 0.0) + per_second
        outcome = labels.get("outcome", "")
        if per_second > 0:
            r.connect_failures[outcome] = r.connect_failures.get(outcome, 0.0) + per_second

    def add_histogram(self, metric: str, labels: dict[str, str], increase: dict[float, float]) -> None:
        r = self.row(labels)
        if r is None:
            return
        acc = self._hists.setdefault((r.key, metric), {})
        for le, n in increase.items():
            acc[le] = acc.get(le, 0.0) + n

    def set_value(self, fld: str, labels: dict[str, str], value: float | None, service_matched: bool = False) -> None:
        r = self.row(labels, service_matched)
        if r is not None and value is not None and not math.isnan(value):
            setattr(r, fld, value)

    def finish(self, transit_p99: dict[tuple[str, str], float | None] | None = None) -> list[Row]:
        """Rows with quantiles computed, zeros for present metrics, the service filter applied."""
        for (key, metric), buckets in self._hists.items():
            r = self.rows[key]
            if metric == CONNECT:
                r.connect_p50_seconds = histogram_quantile(0.5, buckets)
                r.connect_p99_seconds = histogram_quantile(0.99, buckets)
            elif metric == RTT:
                r.rtt_p99_seconds = histogram_quantile(0.99, buckets)
        out = []
        for key, r in self.rows.items():
            if self.flt.has_service and key not in self.matched:
                continue
            for fld in ("packets_per_second", "bytes_per_second", "drops_per_second", "drops_total",
                        "retransmits_per_second", "connect_failures_per_second"):
                if fld in self.present and getattr(r, fld) is None:
                    setattr(r, fld, 0.0)
            if r.drop_reasons:
                r.top_reason = max(sorted(r.drop_reasons), key=lambda k: r.drop_reasons[k])
            r.services = sorted(self._services.get(key, ()))
            if transit_p99 is not None:
                r.transit_p99_seconds = transit_p99.get((r.node, r.traffic_class))
            if self.flt.row_text_match(r):
                out.append(r)
        return out


def rows_from_scrapes(prev: Snapshot, cur: Snapshot, flt: Filter | None = None) -> list[Row]:
    """Rows over the window between two scrapes of one netwatchd (see module docstring)."""
    flt = flt or Filter()
    dt = cur.time - prev.time
    if dt <= 0:
        raise ValueError("scrapes must be in time order")
    base = Snapshot(time=prev.time) if restarted(prev, cur) else prev
    b = RowBuilder(flt)

    def increases(name: str) -> Iterable[tuple[dict[str, str], float, float]]:
        old = base.counters.get(name, {})
        for k, v in cur.counters.get(name, {}).items():
            yield dict(k), counter_increase(old.get(k, 0.0), v), v

    for name, fld in ((PACKETS, "packets_per_second"), (BYTES, "bytes_per_second"),
                      (RETRANSMITS, "retransmits_per_second")):
        if name in cur.present:
            b.metric_present(fld)
            for labels, inc, _ in increases(name):
                b.add(fld, labels, inc / dt)
    if DROPS in cur.present:
        b.metric_present("drops_per_second", "drops_total")
        for labels, inc, total in increases(DROPS):
            b.add_drops(labels, inc / dt, total)
    if CONNECT_FAILURES in cur.present:
        b.metric_present("connect_failures_per_second")
        for labels, inc, _ in increases(CONNECT_FAILURES):
            b.add_connect_failures(labels, inc / dt)
    for name in (CONNECT, RTT):
        old = base.histograms.get(name, {})
        for k, h in cur.histograms.get(name, {}).items():
            b.add_histogram(name, dict(k), histogram_increase(old.get(k), h))

    transit = None
    if TRANSIT in cur.present:
        per_class: dict[tuple[str, str], dict[float, float]] = {}
        old = base.histograms.get(TRANSIT, {})
        for k, h in cur.histograms.get(TRANSIT, {}).items():
            cls = dict(k).get("traffic_class", "")
            acc = per_class.setdefault(("", cls), {})
            for le, n in histogram_increase(old.get(k), h).items():
                acc[le] = acc.get(le, 0.0) + n
        transit = {k: histogram_quantile(0.99, v) for k, v in per_class.items()}
    return b.finish(transit)


def probes_attached(snap: Snapshot) -> dict[str, bool]:
    """probe -> attached, from netwatch_probe_attached (a probe is attached when all its hooks are)."""
    out: dict[str, bool] = {}
    for k, v in snap.gauges.get(PROBE_ATTACHED, {}).items():
        probe = dict(k).get("probe", "")
        out[probe] = out.get(probe, True) and v >= 1
    return out


# ----------------------------------------------------------------------------------------------------
# Columns, sorting, formatting
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    id: str
    header: str
    field: str
    kind: str  # text | rate | bytes | seconds | count | list
    wide: bool = False  # only in -o wide
    prometheus: bool = False  # only with --prometheus (the node column)


COLUMNS: tuple[Column, ...] = (
    Column("node", "NODE", "node", "text", prometheus=True),
    Column("namespace", "NAMESPACE", "namespace", "text"),
    Column("pod", "POD", "pod", "text"),
    Column("class", "CLASS", "traffic_class", "text"),
    Column("pkts", "PKTS/S", "packets_per_second", "rate"),
    Column("bytes", "BYTES/S", "bytes_per_second", "bytes", wide=True),
    Column("drops", "DROPS/S", "drops_per_second", "rate"),
    Column("drops_total", "DROPS", "drops_total", "count", wide=True),
    Column("reason", "TOP-REASON", "top_reason", "text"),
    Column("conn_p50", "CONN-P50", "connect_p50_seconds", "seconds"),
    Column("conn_p99", "CONN-P99", "connect_p99_seconds", "seconds"),
    Column("rtt_p99", "RTT-P99", "rtt_p99_seconds", "seconds"),
    Column("transit_p99", "TRANSIT-P99", "transit_p99_seconds", "seconds"),
    Column("retrans", "RETRANS/S", "retransmits_per_second", "rate"),
    Column("connfail", "CONNFAIL/S", "connect_failures_per_second", "rate"),
    Column("services", "SERVICES", "services", "list", wide=True),
)
COLUMN_IDS = tuple(c.id for c in COLUMNS)
DEFAULT_SORT = "drops"


def columns_for(wide: bool, prometheus: bool) -> list[Column]:
    return [c for c in COLUMNS if (wide or not c.wide) and (prometheus or not c.prometheus)]


def column(col_id: str) -> Column:
    for c in COLUMNS:
        if c.id == col_id:
            return c
    raise KeyError(col_id)


def sort_rows(rows: Iterable[Row], col_id: str = DEFAULT_SORT, reverse: bool = False) -> list[Row]:
    """Numbers largest first, text A-Z (`reverse` flips either); missing values ("-") always last; ties by
    node, namespace, pod, class."""
    col = column(col_id)
    rows = sorted(rows, key=lambda r: r.key)  # stable tie-break
    numeric = col.kind in ("rate", "bytes", "seconds", "count")

    def value(r: Row):
        v = getattr(r, col.field)
        if col.kind == "list":
            v = ",".join(v)
        if col.field == "pod" and v == NODE_POD:
            v = "(node)"
        return v

    present = [r for r in rows if value(r) not in (None, "")]
    missing = [r for r in rows if value(r) in (None, "")]
    descending = numeric != reverse
    present.sort(key=value, reverse=descending)
    return present + missing


def fmt_rate(v: float | None) -> str:
    if v is None:
        return "-"
    if v == 0:
        return "0"
    if v < 0.01:
        return "<0.01"
    if v < 10:
        return f"{v:.2f}"
    if v < 1000:
        return f"{v:.1f}"
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if v >= div:
            return f"{v / div:.1f}{unit}"
    return f"{v:.0f}"


def fmt_bytes(v: float | None) -> str:
    if v is None:
        return "-"
    for div, unit in ((2**30, "Gi"), (2**20, "Mi"), (2**10, "Ki")):
        if v >= div:
            return f"{v / div:.1f}{unit}"
    return f"{v:.0f}"


def fmt_seconds(v: float | None) -> str:
    if v is None:
        return "-"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if v < 1e-3:
        return f"{v * 1e6:.0f}us"
    if v < 1:
        return f"{v * 1e3:.1f}ms" if v < 0.1 else f"{v * 1e3:.0f}ms"
    return f"{v:.2f}s"


def fmt_count(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def cell(row: Row, col: Column) -> str:
    v = getattr(row, col.field)
    if col.kind == "rate":
        return fmt_rate(v)
    if col.kind == "bytes":
        return fmt_bytes(v)
    if col.kind == "seconds":
        return fmt_seconds(v)
    if col.kind == "count":
        return fmt_count(v)
    if col.kind == "list":
        return ",".join(v) or "-"
    if col.field == "pod" and v == NODE_POD:
        return "(node)"
    return v or "-"


# ----------------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------------


@dataclass
class Window:
    """What one refresh produced."""

    rows: list[Row]
    seconds: float  # window length
    probes: dict[str, bool] = field(default_factory=dict)  # probe -> attached (netwatchd source only)


class NetwatchdSource:
    """One netwatchd: consecutive scrapes of /metrics (and /api/v1/status for its uptime)."""

    kind = "netwatchd"

    def __init__(self, endpoint: str, timeout: float = 5.0, get: HttpGet = http_get,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.endpoint = normalize_url(endpoint)
        self.timeout, self.get, self.clock = timeout, get, clock
        self.prev: Snapshot | None = None
        self.cur: Snapshot | None = None

    def scrape(self) -> Snapshot:
        at = self.clock()
        status, body = self.get(self.endpoint + "/metrics", self.timeout)
        if status != 200:
            raise Unreachable(f"{self.endpoint}/metrics answered HTTP {status}")
        try:
            snap = parse_metrics(body.decode(), at)
        except (ValueError, UnicodeDecodeError) as exc:
            raise Unreachable(f"{self.endpoint}/metrics is not Prometheus text: {exc}") from exc
        try:  # the daemon's uptime tells a restart apart from a counter that just grew
            status, body = self.get(self.endpoint + "/api/v1/status", self.timeout)
            if status == 200:
                snap.uptime = float(json.loads(body)["uptime_seconds"])
        except (Unreachable, ValueError, TypeError, KeyError):
            pass
        return snap

    def refresh(self, flt: Filter) -> Window | None:
        """Scrape; rows over the window since the previous successful scrape (None on the first one)."""
        cur = self.scrape()
        self.prev, self.cur = self.cur, cur
        return self.recompute(flt)

    def recompute(self, flt: Filter) -> Window | None:
        """The last window's rows under another filter, without scraping again."""
        if self.prev is None or self.cur is None:
            return None
        prev, cur = self.prev, self.cur
        return Window(rows_from_scrapes(prev, cur, flt), cur.time - prev.time, probes_attached(cur))


def glob_to_regex(glob: str) -> str:
    """A shell glob as an RE2 regex for a PromQL =~ matcher (anchored by Prometheus)."""
    out = []
    for ch in glob:
        if ch == "*":
            out.append(".*")
        elif ch == "?":
            out.append(".")
        elif ch.isalnum() or ch in "_-/":
            out.append(ch)
        else:
            out.append("\\" + ch)
    return "".join(out)


def promql_string(s: str) -> str:
    return json.dumps(s)


def parse_duration(text: str) -> float:
    """'90s', '2m', '1h', '1m30s' or plain seconds -> seconds."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    total, num = 0.0, ""
    i = 0
    while i < len(text):
        ch = text[i]
        if ch.isdigit() or ch == ".":
            num += ch
            i += 1
            continue
        unit = "ms" if text[i:i + 2] == "ms" else ch
        if unit not in units or not num:
            raise ValueError(f"bad duration {text!r} (e.g. 30s, 2m, 1h)")
        total += float(num) * units[unit]
        num = ""
        i += len(unit)
    if num or total <= 0:
        raise ValueError(f"bad duration {text!r} (e.g. 30s, 2m, 1h)")
    return total


def promql_duration(seconds: float) -> str:
    return f"{int(seconds)}s" if seconds >= 1 else f"{int(seconds * 1000)}ms"


class PrometheusSource:
    """A whole cluster through Prometheus: instant queries of rate() and histogram_quantile() over `window`,
    by (node, namespace, pod, traffic_class). Label filters are pushed into the selectors; services too
    (one selector per service pattern, joined with `or`)."""

    kind = "prometheus"

    def __init__(self, url: str, window: float = 120.0, node_label: str = "node", timeout: float = 10.0,
                 get: HttpGet = http_get) -> None:
        self.url = normalize_url(url)
        self.window, self.node_label, self.timeout, self.get = window, node_label, timeout, get
        self.queries: list[str] = []  # the last refresh's PromQL, for tests and --debug
        self._last: tuple[dict, Filter] | None = None  # the last answers and the filter they were asked with

    def query(self, promql: str) -> list[tuple[dict[str, str], float]]:
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        status, body = self.get(url, self.timeout)
        try:
            doc = json.loads(body)
        except ValueError as exc:
            raise Unreachable(f"{self.url}: HTTP {status}, not a Prometheus API answer") from exc
        if not isinstance(doc, dict) or "status" not in doc:
            raise Unreachable(f"{self.url}: HTTP {status}, not a Prometheus API answer")
        if doc["status"] != "success":
            raise Problem(f"Prometheus: {doc.get('errorType', 'error')}: {doc.get('error', '')} (query {promql})")
        data = doc.get("data", {})
        if data.get("resultType") != "vector":
            raise Problem(f"Prometheus: expected a vector, got {data.get('resultType')} (query {promql})")
        out = []
        for item in data.get("result", []):
            try:
                value = float(item["value"][1])
            except (KeyError, IndexError, ValueError):
                continue
            out.append((item.get("metric", {}), value))
        return out

    def _matchers(self, flt: Filter, per_pod: bool = True) -> list[str]:
        m = []
        pairs = [("traffic_class", flt.traffic_class)]
        if per_pod:
            pairs += [("namespace", flt.namespace), ("pod", flt.pod)]
        if flt.node:
            pairs.append((self.node_label, flt.node))
        for label, globs in pairs:
            if globs:
                m.append(f"{label}=~{promql_string('|'.join(glob_to_regex(g) for g in globs))}")
        return m

    def _selectors(self, metric: str, flt: Filter, with_service: bool) -> list[str]:
        base = self._matchers(flt)
        services = flt.services() if with_service else ()
        if not services:
            return [f"{metric}{{{','.join(base)}}}"]
        out = []
        for g in services:
            m = list(base)
            if "/" in g:
                ns, _, name = g.partition("/")
                m.append(f"service_namespace=~{promql_string(glob_to_regex(ns))}")
                m.append(f"service=~{promql_string(glob_to_regex(name))}")
            else:
                m.append(f"service=~{promql_string(glob_to_regex(g))}")
            out.append(f"{metric}{{{','.join(m)}}}")
        return out

    def _rate(self, metric: str, flt: Filter, with_service: bool) -> str:
        w = promql_duration(self.window)
        return " or ".join(f"rate({s}[{w}])" for s in self._selectors(metric, flt, with_service))

    def build_queries(self, flt: Filter) -> dict[str, str]:
        g = f"{self.node_label}, namespace, pod, traffic_class"
        svc = "service_namespace, service"
        q = {
            "packets": f"sum by ({g}) ({self._rate(PACKETS, flt, False)})",
            "bytes": f"sum by ({g}) ({self._rate(BYTES, flt, False)})",
            "drops": f"sum by ({g}, reason, {svc}) ({self._rate(DROPS, flt, True)})",
            "drops_total": f"sum by ({g}, {svc}) ("
                           + " or ".join(self._selectors(DROPS, flt, True)) + ")",
            "retransmits": f"sum by ({g}, {svc}) ({self._rate(RETRANSMITS, flt, True)})",
            "connect_failures": f"sum by ({g}, outcome, {svc}) ({self._rate(CONNECT_FAILURES, flt, True)})",
        }
        for name, metric, qs in (("connect", CONNECT, (0.5, 0.99)), ("rtt", RTT, (0.99,))):
            inner = f"sum by ({g}, le) ({self._rate(metric + '_bucket', flt, True)})"
            for qq in qs:
                q[f"{name}_p{round(qq * 100)}"] = f"histogram_quantile({qq}, {inner})"
        w = promql_duration(self.window)
        tm = ",".join(self._matchers(flt, per_pod=False))
        q["transit_p99"] = (f"histogram_quantile(0.99, sum by ({self.node_label}, traffic_class, le) "
                            f"(rate({TRANSIT}_bucket{{{tm}}}[{w}])))")
        return q

    def recompute(self, flt: Filter) -> Window | None:
        """The last answers under another filter, when it needs no other queries (same label flags and
        services: the interactive words are applied here, not in PromQL); None otherwise."""
        if self._last is None:
            return None
        results, asked = self._last
        if self.build_queries(flt) != self.build_queries(asked):
            return None
        return self.build(results, flt)

    def refresh(self, flt: Filter) -> Window:
        queries = self.build_queries(flt)
        self.queries = list(queries.values())
        with ThreadPoolExecutor(max_workers=6) as pool:
            futures = {name: pool.submit(self.query, promql) for name, promql in queries.items()}
            results = {name: f.result() for name, f in futures.items()}
        self._last = (results, flt)
        return self.build(results, flt)

    def build(self, results: dict[str, list[tuple[dict[str, str], float]]], flt: Filter) -> Window:
        b = RowBuilder(flt, self.node_label)
        for name, fld in (("packets", "packets_per_second"), ("bytes", "bytes_per_second"),
                          ("retransmits", "retransmits_per_second")):
            if results[name]:
                b.metric_present(fld)
            for labels, v in results[name]:
                b.add(fld, labels, v)
        if results["drops"] or results["drops_total"]:
            b.metric_present("drops_per_second", "drops_total")
        for labels, v in results["drops"]:
            b.add_drops(labels, v, None)
        for labels, v in results["drops_total"]:
            b.add_drops(labels, None, v)
        if results["connect_failures"]:
            b.metric_present("connect_failures_per_second")
        for labels, v in results["connect_failures"]:
            b.add_connect_failures(labels, v)
        for name, fld in (("connect_p50", "connect_p50_seconds"), ("connect_p99", "connect_p99_seconds"),
                          ("rtt_p99", "rtt_p99_seconds")):
            for labels, v in results[name]:  # the selectors kept only the service's series
                b.set_value(fld, labels, v, service_matched=True)
        transit = {(labels.get(self.node_label, ""), labels.get("traffic_class", "")): (None if math.isnan(v) else v)
                   for labels, v in results["transit_p99"]}
        return Window(b.finish(transit), self.window)
