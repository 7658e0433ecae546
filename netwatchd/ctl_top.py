"""`netwatchctl top`: the live view, its keys, and its script-friendly modes.

Three ways to run, chosen from the flags and the terminal:
- `--once`: one window (two scrapes --interval apart, or one set of Prometheus queries), printed as a plain
  table or JSON, then exit;
- stdout not a terminal, or `-o json`: batch mode, one plain table (or one JSON line) per refresh, like
  `top -b`, until --iterations or Ctrl-C; never an escape sequence;
- otherwise the interactive view (rich Live on the alternate screen), keys read from the terminal in cbreak
  mode. A failed refresh keeps the last rows and says "reconnecting..." in the header until a scrape works
  again (a restarted daemon's counters start from zero: see ctl_model).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import select
import sys
import termios
import time
import tty
from collections.abc import Iterator

from rich import box
from rich.console import Console, Group, RenderableType
from rich.measure import Measurement
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from netwatchd.ctl_model import (
    COLUMNS,
    Column,
    Filter,
    NetwatchdSource,
    Problem,
    PrometheusSource,
    Row,
    Unreachable,
    Window,
    cell,
    columns_for,
    sort_rows,
)

EXIT_OK, EXIT_UNREACHABLE, EXIT_PROBLEM, EXIT_INTERRUPTED = 0, 3, 4, 130
NUMBER_KEYS = "1234567890"

HELP_TEXT = """\
q          quit
s / S      sort by the next / previous column
1-9, 0     sort by column 1-9, 10 (listed below)
r          reverse the sort order
/          filter: type words, Enter applies, Esc cancels, Backspace edits
             plain words must all appear in namespace, pod, class, services or reason
             ns:GLOB pod:GLOB class:GLOB svc:[NS/]GLOB node:GLOB match one label
c          clear the filter
space      refresh now
? or h     this help (any key closes it)

Rates are per second over the refresh window; latency quantiles are histogram_quantile()
over the histogram buckets that grew in the window. "-": netwatchd does not export that metric,
or no samples in the window. (node): traffic of the node itself, not of a pod."""


def doc(window: Window | None, rows: list[Row], source, flt: Filter, sort: str, reverse: bool) -> dict:
    """The JSON document of one refresh (see the README's netwatchctl reference)."""
    return {
        "source": source.kind,
        "endpoint": getattr(source, "endpoint", None) or getattr(source, "url", ""),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "window_seconds": round(window.seconds, 3) if window else None,
        "sort": sort,
        "reverse": reverse,
        "filter": flt.to_json(),
        "probes": window.probes if window else {},
        "rows": [r.to_json() for r in rows],
    }


def plain_table(rows: list[Row], cols: list[Column]) -> str:
    """The plain text table of --once and batch mode (no escapes)."""
    from io import StringIO

    from netwatchd.ctl import print_table

    buf = StringIO()
    dicts = [{c.id: cell(r, c) for c in cols} for r in rows]
    print_table(dicts, [c.id for c in cols], [c.header for c in cols],
                right=[c.id for c in cols if c.kind not in ("text", "list")], file=buf)
    return buf.getvalue()


class TopView:
    """State of the interactive view: rows, sort, filter, help, connection state; renders with rich."""

    def __init__(self, source, flt: Filter, sort: str, reverse: bool, wide: bool, interval: float) -> None:
        self.source = source
        self.base = flt
        self.sort, self.reverse, self.wide, self.interval = sort, reverse, wide, interval
        self.prometheus = isinstance(source, PrometheusSource)
        self.window: Window | None = None
        self.rows: list[Row] = []
        self.error: str | None = None
        self.text = ""  # the applied interactive filter
        self.editing: str | None = None  # the filter being typed (applied live), None when not typing
        self.help = False
        self.last_ok: float | None = None

    # -- data --------------------------------------------------------------------------------------

    @property
    def columns(self) -> list[Column]:
        return columns_for(self.wide, self.prometheus)

    def filter(self) -> Filter:
        return dataclasses.replace(self.base, text=self.editing if self.editing is not None else self.text)

    def refresh(self) -> None:
        try:
            w = self.source.refresh(self.filter())
        except (Unreachable, Problem) as exc:
            self.error = str(exc)
            return
        self.error = None
        self.last_ok = time.time()
        if w is not None:
            self.window, self.rows = w, w.rows

    def refilter(self) -> bool:
        """Apply a changed filter to the data at hand; False when the source must be asked again."""
        try:
            w = self.source.recompute(self.filter())
        except (Unreachable, Problem):
            return False
        if w is None:
            return False
        self.window, self.rows = w, w.rows
        return True

    def sorted_rows(self) -> list[Row]:
        return sort_rows(self.rows, self.sort, self.reverse)

    # -- keys --------------------------------------------------------------------------------------

    def handle_key(self, key: str) -> str | None:
        """One key; returns "quit", "refresh" (ask the source now), "refilter" or None (just redraw)."""
        if self.editing is not None:
            return self._edit_key(key)
        if key in ("q", "Q", "\x03"):
            return "quit"
        if self.help:
            self.help = False
            return None
        ids = [c.id for c in self.columns]
        if key in ("?", "h"):
            self.help = True
        elif key in ("s", "S", "right", "left"):
            i = ids.index(self.sort) if self.sort in ids else -1
            self.sort = ids[(i + (1 if key in ("s", "right") else -1)) % len(ids)]
        elif key in NUMBER_KEYS:
            n = NUMBER_KEYS.index(key)
            if n < len(ids):
                self.sort = ids[n]
        elif key == "r":
            self.reverse = not self.reverse
        elif key == "/":
            self.editing = self.text
        elif key == "c":
            self.text = ""
            return "refilter"
        elif key == " ":
            return "refresh"
        return None

    def _edit_key(self, key: str) -> str | None:
        assert self.editing is not None
        if key in ("\r", "\n"):
            self.text, self.editing = self.editing.strip(), None
        elif key == "esc":
            self.editing = None
        elif key in ("\x7f", "\x08"):
            self.editing = self.editing[:-1]
        elif key == "\x15":  # Ctrl-U
            self.editing = ""
        elif key == "\x03":
            return "quit"
        elif len(key) == 1 and key.isprintable():
            self.editing += key
        else:
            return None
        return "refilter"

    # -- rendering ---------------------------------------------------------------------------------

    def header(self) -> RenderableType:
        """Two lines, never wrapped: what is watched and how it is sorted/filtered; the connection state."""
        src = self.source
        where = getattr(src, "url", None) if self.prometheus else getattr(src, "endpoint", "")
        t = Text(no_wrap=True, overflow="ellipsis")
        t.append("netwatchctl top", style="bold")
        t.append(f"  {time.strftime('%H:%M:%S')}  {'prometheus ' if self.prometheus else ''}{where}")
        if self.window is not None:
            t.append(f"  window {self.window.seconds:.1f}s")
        t.append(f"  rows {len(self.rows)}")
        col = next((c for c in COLUMNS if c.id == self.sort), None)
        t.append(f"  sort {col.header if col else self.sort} {self._arrow(col)}")
        active = " ".join(x for x in (self._flags_text(), self.filter().text) if x)
        if active:
            t.append(f"  filter: {active}", style="cyan")
        status = Text(no_wrap=True, overflow="ellipsis")
        if self.error is not None:
            status.append(f"reconnecting... {self.error}", style="bold yellow")
        elif self.window is None:
            status.append("collecting the first window...", style="dim")
        else:
            down = sorted(p for p, ok in self.window.probes.items() if not ok)
            if down:
                status.append(f"probes not attached: {', '.join(down)} (netwatchctl probes)", style="yellow")
            else:
                status.append("ok", style="green")
        return Group(t, status)

    def _arrow(self, col: Column | None) -> str:
        """^ ascending, v descending: numbers sort largest first, text A-Z, `r` flips either."""
        return "^" if (col is not None and col.kind in ("text", "list")) != self.reverse else "v"

    def _flags_text(self) -> str:
        parts = []
        for name, globs in (("ns", self.base.namespace), ("pod", self.base.pod), ("class", self.base.traffic_class),
                            ("svc", self.base.service), ("node", self.base.node)):
            parts += [f"{name}:{g}" for g in globs]
        return " ".join(parts)

    def footer(self, hidden: int = 0) -> Text:
        t = Text(no_wrap=True, overflow="ellipsis")
        if self.editing is not None:
            t.append("/", style="bold")
            t.append(self.editing)
            t.append("_", style="blink")
            t.append("   Enter apply  Esc cancel  (words; ns: pod: class: svc: node:)", style="dim")
            return t
        if hidden:
            t.append(f"({hidden} columns do not fit: widen the terminal)  ", style="yellow")
        t.append("q quit  s/S sort  1-9 column  r reverse  / filter  c clear  space refresh  ? help", style="dim")
        return t

    def _table(self, cols: list[Column], rows: list[Row]) -> Table:
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, expand=False,
                      style="dim" if self.error else "")
        for c in cols:
            head = c.header + (f" {self._arrow(c)}" if c.id == self.sort else "")
            table.add_column(head, justify="left" if c.kind in ("text", "list") else "right", no_wrap=True,
                             header_style="bold reverse" if c.id == self.sort else "bold", overflow="ellipsis")
        for r in rows:
            cells = []
            for c in cols:
                v = cell(r, c)
                style = ""
                if c.id in ("drops", "reason", "connfail") and v not in ("-", "0"):
                    style = "red"
                elif c.id == "retrans" and v not in ("-", "0"):
                    style = "yellow"
                cells.append(Text(v, style=style))
            table.add_row(*cells)
        return table

    def table(self, console: Console, max_rows: int) -> tuple[RenderableType, int]:
        """The rows that fit the screen, with the columns that fit its width (dropped from the right, never
        namespace, pod, class or the sort column); returns it and how many columns were left out."""
        rows = self.sorted_rows()
        shown = rows[:max(max_rows, 0)]
        cols = list(self.columns)
        keep = {"node", "namespace", "pod", "class", self.sort}
        table = self._table(cols, shown)
        unbounded = console.options.update_width(100_000)  # measure what the table wants, not what it gets
        while Measurement.get(console, unbounded, table).maximum > console.width:
            drop = next((c for c in reversed(cols) if c.id not in keep), None)
            if drop is None:
                break
            cols.remove(drop)
            table = self._table(cols, shown)
        parts: list[RenderableType] = [table]
        if len(rows) > len(shown):
            parts.append(Text(f"... {len(rows) - len(shown)} more rows (/ to filter)", style="dim"))
        if not rows and self.window is not None:
            parts.append(Text("no rows" + (" match the filter" if self.filter().text or self._flags_text() else ""),
                              style="dim"))
        return Group(*parts), len(self.columns) - len(cols)

    def help_panel(self) -> RenderableType:
        names = [f"{NUMBER_KEYS[i] if i < len(NUMBER_KEYS) else 's'}  {c.header}" for i, c in enumerate(self.columns)]
        lines = ["  ".join(f"{n:<18}" for n in names[i:i + 4]).rstrip() for i in range(0, len(names), 4)]
        text = HELP_TEXT + "\n\nsort keys and columns:\n" + "\n".join(lines)
        return Panel(Text(text), title="netwatchctl top: help", expand=False)

    def render(self, console: Console) -> RenderableType:
        """The whole screen for `console`'s size: 2 header lines, the table (or the help), 1 footer line."""
        if self.help:
            return Group(self.header(), self.help_panel(), self.footer())
        body, hidden = self.table(console, console.height - 6)
        return Group(self.header(), body, self.footer(hidden))


# ----------------------------------------------------------------------------------------------------
# The terminal
# ----------------------------------------------------------------------------------------------------


class Keys:
    """Keys from a terminal in cbreak mode (no echo, no line buffering; Ctrl-C still interrupts)."""

    SEQUENCES = {"\x1b[A": "up", "\x1b[B": "down", "\x1b[C": "right", "\x1b[D": "left"}

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.saved = None

    def __enter__(self) -> Keys:
        self.saved = termios.tcgetattr(self.fd)
        tty.setcbreak(self.fd)
        return self

    def __exit__(self, *exc) -> None:
        if self.saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)

    def read(self, timeout: float) -> list[str]:
        ready, _, _ = select.select([self.fd], [], [], max(timeout, 0))
        if not ready:
            return []
        data = os.read(self.fd, 1024).decode(errors="replace")
        return list(parse_keys(data))


def parse_keys(data: str) -> Iterator[str]:
    """Split terminal input into keys: single characters, "esc", arrows; other escape sequences dropped."""
    i = 0
    while i < len(data):
        ch = data[i]
        if ch == "\x1b":
            if i + 1 < len(data) and data[i + 1] in "[O":
                j = i + 2
                while j < len(data) and not (data[j].isalpha() or data[j] == "~"):
                    j += 1
                seq = "\x1b[" + data[i + 2:j + 1]
                if seq in Keys.SEQUENCES:
                    yield Keys.SEQUENCES[seq]
                i = j + 1
                continue
            yield "esc"
        else:
            yield ch
        i += 1


def terminal_size(console: Console) -> tuple[int, int]:
    try:
        return tuple(os.get_terminal_size(sys.stdout.fileno()))  # type: ignore[return-value]
    except OSError:
        return console.size.width, console.size.height


def make_console(color: str, file=None) -> Console:
    if color == "never":
        return Console(file=file, color_system=None)
    if color == "always":
        return Console(file=file, force_terminal=True)
    return Console(file=file)  # rich: colours only on a terminal that has them; honours NO_COLOR and TERM=dumb


def interactive(view: TopView, console: Console, iterations: int) -> int:
    from rich.live import Live

    stdin_tty = sys.stdin.isatty()
    keys_ctx = Keys(sys.stdin.fileno()) if stdin_tty else contextlib.nullcontext()
    done = 0
    with keys_ctx as keys, Live(console=console, screen=True, auto_refresh=False, redirect_stdout=False,
                                redirect_stderr=False) as live:
        next_at, size, dirty = 0.0, None, True
        while True:
            now = time.monotonic()
            if now >= next_at:
                view.refresh()
                done += 1
                next_at = time.monotonic() + view.interval
                dirty = True
            real = terminal_size(console)
            if real != size:  # the terminal itself, not a stale exported COLUMNS/LINES
                size, dirty = real, True
                console.size = real
            if dirty:
                live.update(view.render(console), refresh=True)
                dirty = False
            if iterations and done >= iterations:
                return EXIT_OK
            wait = min(0.25, max(next_at - time.monotonic(), 0))
            pressed = keys.read(wait) if keys is not None else (time.sleep(wait) or [])
            for key in pressed:
                action = view.handle_key(key)
                dirty = True
                if action == "quit":
                    return EXIT_OK
                if action == "refresh" or (action == "refilter" and not view.refilter()):
                    next_at = 0.0


def once(view: TopView, output: str) -> int:
    """One window, printed; exit 3 when the source cannot be read, 4 when nothing is measured."""
    src = view.source
    w = src.refresh(view.filter())
    if w is None:  # a netwatchd: the first scrape is the start of the window
        time.sleep(view.interval)
        w = src.refresh(view.filter())
    rows = sort_rows(w.rows, view.sort, view.reverse)
    if output == "json":
        json.dump(doc(w, rows, src, view.filter(), view.sort, view.reverse), sys.stdout, indent=2)
        print()
    else:
        sys.stdout.write(plain_table(rows, view.columns))
    sys.stdout.flush()
    if w.probes and not any(w.probes.values()):
        print("netwatchctl: no probe is attached: nothing is measured (netwatchctl probes)", file=sys.stderr)
        return EXIT_PROBLEM
    return EXIT_OK


def batch(view: TopView, output: str, iterations: int) -> int:
    """A refresh every --interval, each printed whole (plain table or one JSON line), until --iterations."""
    done = 0
    while True:
        started = time.monotonic()
        try:
            w = view.source.refresh(view.filter())
        except (Unreachable, Problem) as exc:
            print(f"netwatchctl: reconnecting... {exc}", file=sys.stderr, flush=True)
            w = None
        else:
            if w is not None:
                rows = sort_rows(w.rows, view.sort, view.reverse)
                if output == "json":
                    print(json.dumps(doc(w, rows, view.source, view.filter(), view.sort, view.reverse)))
                else:
                    print(f"# {time.strftime('%H:%M:%S')} window {w.seconds:.1f}s rows {len(rows)}")
                    sys.stdout.write(plain_table(rows, view.columns) + "\n")
                sys.stdout.flush()
                done += 1
        if iterations and done >= iterations:
            return EXIT_OK
        time.sleep(max(view.interval - (time.monotonic() - started), 0.05))


def run(args) -> int:
    from netwatchd.ctl import filter_from

    flt = filter_from(args)
    if args.prometheus:
        interval = args.interval or 5.0
        source = PrometheusSource(args.prometheus, window=args.window or 120.0, node_label=args.node_label,
                                  timeout=args.timeout)
    else:
        interval = args.interval or 2.0
        source = NetwatchdSource(args.endpoint, timeout=args.timeout)
    view = TopView(source, flt, args.sort, args.reverse, args.output == "wide", interval)
    what = "Prometheus" if args.prometheus else "netwatchd"
    try:
        if args.once:
            return once(view, args.output)
        if args.output == "json" or not sys.stdout.isatty():
            return batch(view, args.output, args.iterations)
        return interactive(view, make_console(args.color), args.iterations)
    except Unreachable as exc:
        print(f"netwatchctl: cannot reach {what}: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except Problem as exc:
        print(f"netwatchctl: {exc}", file=sys.stderr)
        return EXIT_PROBLEM
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), sys.stdout.fileno())
        return EXIT_OK
