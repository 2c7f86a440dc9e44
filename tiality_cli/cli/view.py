"""Presentation of statistics: live views for terminals, plain lines for logs, JSON lines for scripts.

Everything here is a function of plain data; the CLI (live.py) decides when to call it. Only the cli
package imports rich. The shape follows Rich's ``examples/top_lite_simulator.py``: the figures of one
refresh go into a frozen dataclass, a pure function lays them out, and a Live display shows each one.
The live views are laid out as lines of styled text and handed to Rich as segments rather than as a
Table: a Table of this size costs several times more CPU at 4 refreshes a second (docs/stats.md).

    RecvMonitor, SendMonitor     keep the short history between refreshes (rates, trends, peak hold)
                                 and turn figures into a RecvFrame / SendFrame
    recv_lines, send_lines       a frame -> screen lines for a given width (pure; the tests read them)
    recv_view, send_view         the same as a Rich renderable, laid out for the terminal's width
    recv_summary, send_summary   the final tables when a command ends (Rich Tables, printed once)
    recv_plain_line, send_plain_line, send_summary_line
                                 one log line of the same figures, for non-terminals
    sender_entry, json_line      JSON lines (field names: docs/stats.md)
    level_meter, markup, sparkline, grid, step_volume_db
                                 the small pieces (dB and rates come from tiality_cli.stats)
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tiality_cli.stats import SILENCE_DBFS, StatsSnapshot

# Rich is imported where a view is drawn, not here: ``send -q`` and ``--json`` print plain lines and
# start faster without it (docs/performance.md, start-up).
if TYPE_CHECKING:
    from rich.console import Console, ConsoleOptions
    from rich.segment import Segment
    from rich.table import Table

    from tiality_cli.receiver import SessionView

Frag = tuple[str, str]  # a run of text and its Rich style ("" for none)
Line = list[Frag]  # one screen line

HISTORY = 60  # refreshes kept for the trend sparklines (15 s at 4 Hz)
PEAK_HOLD = 8  # refreshes a level peak stays marked on the meter (2 s at 4 Hz)
VOLUME_STEP_DB = 3.0
VOLUME_MIN_DB = -60.0
VOLUME_MAX_DB = 12.0  # above 0 dB the soft limiter rounds off loud streams; allowed for quiet senders
SPARK_WIDTH = 14
METER_WIDTH = 8
RECV_KEYS = "keys: m mute · +/- volume (3 dB) · q quit"
SEND_KEYS = "keys: q quit"

_SPARKS = "▁▂▃▄▅▆▇█"
_EIGHTHS = " ▏▎▍▌▋▊▉"
_FLOOR_DB = -60.0  # the meters' and level sparklines' bottom


# ---------------------------------------------------------------------------------------------------------
# small pure pieces
# ---------------------------------------------------------------------------------------------------------
def _ms(v: float, digits: int = 1) -> str:
    return "-" if math.isnan(v) else f"{v:.{digits}f}"


def _lat(v: float) -> str:
    """Latency with the precision that matters: 0.35, 8.4, 41."""
    if math.isnan(v):
        return "-"
    return f"{v:.2f}" if v < 1 else f"{v:.1f}" if v < 100 else f"{v:.0f}"


def pct(part: int, whole: int) -> float:
    return 100.0 * part / whole if whole > 0 else 0.0


def _pct_text(part: int, whole: int) -> str:
    return f"{pct(part, whole):.1f}%"


def loss_base(s: StatsSnapshot) -> tuple[int, int, int]:
    """Denominators for lost %, late % and concealed %: frames the senders sent (received once, or
    lost), packets received once, frames played."""
    once = s.packets - s.duplicates
    return once + s.lost, once, s.frames_played


def uptime(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def compact_format(describe: str) -> str:
    """'48 kHz stereo, 20 ms frames' -> '48k stereo 20ms'."""
    return describe.replace(" kHz", "k").replace(", ", " ").replace(" ms frames", "ms").replace(" frames", "")


def compact_peer(peer: str) -> str:
    """gRPC peer strings without the transport prefix: 'ipv4:10.0.0.2:5123' -> '10.0.0.2:5123'."""
    for prefix in ("ipv4:", "ipv6:", "unix:"):
        if peer.startswith(prefix):
            return peer[len(prefix) :]
    return peer


def step_volume_db(current_db: float, steps: int) -> float:
    """``steps`` volume steps up (+) or down (-) from ``current_db``, on the 3 dB grid, within bounds."""
    grid = round(current_db / VOLUME_STEP_DB) * VOLUME_STEP_DB
    return min(VOLUME_MAX_DB, max(VOLUME_MIN_DB, grid + steps * VOLUME_STEP_DB))


def volume_label(volume_db: float, muted: bool) -> str:
    vol = "+0 dB" if abs(volume_db) < 0.05 else f"{volume_db:+.0f} dB"
    return f"MUTED (volume {vol})" if muted else f"volume {vol}"


def sparkline(
    values: Sequence[float],
    width: int = SPARK_WIDTH,
    lo: float | None = None,
    hi: float | None = None,
    min_span: float = 1.0,
) -> str:
    """The last values as block characters, right-aligned in ``width`` (older values share a cell: max).

    ``lo``/``hi`` fix the scale; otherwise it follows the values, spanning at least ``min_span`` so that
    noise on a flat line does not look like a trend. NaN shows as a blank.
    """
    if width <= 0:
        return ""
    vals = list(values)
    if len(vals) > width:  # bucket into ``width`` cells, the newest value always in the last one
        n = len(vals)
        vals = [_nanmax(vals[n * i // width : n * (i + 1) // width]) for i in range(width)]
    finite = [v for v in vals if not math.isnan(v)]
    if not finite:
        return " " * width
    low = min(finite) if lo is None else lo
    high = max(finite) if hi is None else hi
    if high - low < min_span:
        high = low + min_span
    top = len(_SPARKS) - 1
    cells = []
    for v in vals:
        if math.isnan(v):
            cells.append(" ")
        else:
            i = round((min(max(v, low), high) - low) / (high - low) * top)
            cells.append(_SPARKS[i])
    return "".join(cells).rjust(width)


def _nanmax(chunk: Sequence[float]) -> float:
    finite = [v for v in chunk if not math.isnan(v)]
    return max(finite) if finite else math.nan


def level_meter(level_dbfs: float, peak_dbfs: float | None = None, width: int = METER_WIDTH) -> Line:
    """A meter from -60 to 0 dBFS in eighth blocks, green/yellow/red, with a peak-hold tick and the
    level in figures: ``█████▎·│ -15.0``."""
    cells = max(0.0, min(1.0, (level_dbfs - _FLOOR_DB) / -_FLOOR_DB)) * width
    full = int(cells)
    part = int((cells - full) * 8)
    lit = "█" * full + (_EIGHTHS[part] if full < width and part else "")
    lit_style = "green" if level_dbfs < -12 else "yellow" if level_dbfs < -3 else "red"
    chars = list(lit.ljust(width, "·"))
    styles = [lit_style] * len(lit) + ["dim"] * (width - len(lit))
    if peak_dbfs is not None and peak_dbfs > _FLOOR_DB:
        p = min(width - 1, int((peak_dbfs - _FLOOR_DB) / -_FLOOR_DB * width))
        chars[p] = "│"
        styles[p] = "bold red" if peak_dbfs >= -3 else "bold"
    line: Line = []
    for ch, st in zip(chars, styles, strict=True):  # runs of one style
        if line and line[-1][1] == st:
            line[-1] = (line[-1][0] + ch, st)
        else:
            line.append((ch, st))
    line.append((f" {level_dbfs:5.1f}" if level_dbfs > SILENCE_DBFS else "     -", ""))
    return line


def markup(line: Line) -> str:
    """A screen line as Rich console markup, for what takes a string (a progress bar's column)."""
    from rich.markup import escape

    return "".join(f"[{style}]{escape(text)}[/]" if style else escape(text) for text, style in line)


# ---------------------------------------------------------------------------------------------------------
# receiver
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class SenderRow:
    """One connected sender, as one refresh of the receiver's view shows it."""

    id: int
    peer: str
    name: str
    format: str
    uptime_s: float
    state: str
    stats: StatsSnapshot
    packets_per_s: float
    bitrate_kbps: float
    peak_hold_dbfs: float
    latency_trend: tuple[float, ...]
    level_trend: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class RecvFrame:
    """Everything one refresh of ``tiality recv`` shows."""

    port: int
    output: str
    totals: StatsSnapshot
    packets_per_s: float
    bitrate_kbps: float
    streams_started: int
    volume_db: float
    muted: bool
    rows: tuple[SenderRow, ...] = ()
    keys: bool = False  # whether the key help is shown (keys are read)
    title: str = "tiality recv"


@dataclass(slots=True)
class _History:
    latency: deque[float] = field(default_factory=lambda: deque(maxlen=HISTORY))
    level: deque[float] = field(default_factory=lambda: deque(maxlen=HISTORY))
    peaks: deque[float] = field(default_factory=lambda: deque(maxlen=PEAK_HOLD))


class RecvMonitor:
    """Keeps what the receiver's view remembers between refreshes; ``frame()`` is called once per refresh.

    Time comes in as ``now_s`` (any monotonic seconds), so tests and benchmarks drive it directly.
    """

    def __init__(self, port: int, output: str, *, keys: bool = False, title: str = "tiality recv") -> None:
        self.port = port
        self.output = output
        self.keys = keys
        self.title = title
        self._senders: dict[int, _History] = {}

    def frame(
        self,
        totals: StatsSnapshot,
        sessions: Sequence[SessionView],
        *,
        streams_started: int,
        volume_db: float,
        muted: bool,
    ) -> RecvFrame:
        rows = []
        seen = set()
        for v in sessions:
            seen.add(v.id)
            h = self._senders.setdefault(v.id, _History())
            s = v.stats
            h.latency.append(s.latency_ms_p50)
            h.level.append(s.level_dbfs)
            h.peaks.append(s.peak_dbfs)
            rows.append(
                SenderRow(
                    id=v.id,
                    peer=compact_peer(v.peer),
                    name=v.name,
                    format=v.format,
                    uptime_s=v.uptime_s,
                    state=v.state,
                    stats=s,
                    packets_per_s=s.packets_per_s,
                    bitrate_kbps=s.bitrate_kbps,
                    peak_hold_dbfs=max(h.peaks),
                    latency_trend=tuple(h.latency),
                    level_trend=tuple(h.level),
                )
            )
        for gone in self._senders.keys() - seen:
            del self._senders[gone]
        return RecvFrame(
            port=self.port,
            output=self.output,
            totals=totals,
            packets_per_s=totals.packets_per_s,
            bitrate_kbps=totals.bitrate_kbps,
            streams_started=streams_started,
            volume_db=volume_db,
            muted=muted,
            rows=tuple(rows),
            keys=self.keys,
            title=self.title,
        )


_STATE_STYLE = {"playing": "green", "waiting": "yellow", "finished": "dim", "reconnecting": "yellow"}

Cell = tuple[Line, Line]  # the two lines of a cell in the senders table


@dataclass(frozen=True, slots=True)
class Column:
    title: tuple[str, str]  # two header lines
    right: bool  # right-justified (figures) or left (names, meters)
    drop: int  # on a narrow terminal the highest goes first; 0 never goes


RECV_COLUMNS = (
    Column(("", "sender"), False, 0),
    Column(("", "up"), True, 6),
    Column(("", "packets"), True, 1),
    Column(("", "kbit/s"), True, 5),
    Column(("", "lost"), True, 1),
    Column(("", "late"), True, 4),
    Column(("", "concealed"), True, 2),
    Column(("jitter", "ms"), True, 4),
    Column(("latency ms", "p50/p95/max"), True, 2),
    Column(("buffer ms", "now/tgt"), True, 5),
    Column(("drift", "ppm"), True, 7),
    Column(("level", "dBFS"), False, 3),
    Column(("", "state"), False, 3),
)
_SENDER_WIDTH = 21  # longer peer addresses end in an ellipsis


def _cell(top: str, bottom: str = "", style: str = "", bottom_style: str = "dim") -> Cell:
    return [(top, style)], [(bottom, bottom_style)]


def _width(line: Line) -> int:
    return sum(len(t) for t, _ in line)


def _fit(line: Line, width: int) -> Line:
    """Cuts a line to ``width`` cells, ending it with an ellipsis when something was cut."""
    if _width(line) <= width:
        return line
    out: Line = []
    left = width - 1
    for text, style in line:
        if left <= 0:
            break
        out.append((text[:left], style))
        left -= len(text[:left])
    out.append(("…", ""))
    return out


def grid(
    columns: Sequence[Column], rows: Sequence[Sequence[Cell]], footer: Sequence[Cell], width: int
) -> list[Line]:
    """A table as screen lines: two header lines, a rule, the rows, a rule and the footer.

    Columns are as wide as their widest line, two spaces apart (one if that does not fit); when even
    that is too wide for ``width``, the columns with the highest ``drop`` go first.
    """
    everything = [*rows, footer]
    widths = [
        max(len(c.title[0]), len(c.title[1]), *(max(_width(r[i][0]), _width(r[i][1])) for r in everything))
        for i, c in enumerate(columns)
    ]
    keep = list(range(len(columns)))

    def total(gap: int) -> int:
        return sum(widths[i] for i in keep) + gap * (len(keep) - 1)

    gap = 2 if total(2) <= width else 1
    while total(gap) > width:
        i = max(keep, key=lambda k: (columns[k].drop, k))
        if columns[i].drop == 0:
            break
        keep.remove(i)

    def line(cells: Sequence[Line], bold: bool = False) -> Line:
        out: Line = []
        for n, i in enumerate(keep):
            frags = cells[i]
            pad = " " * (widths[i] - _width(frags))
            if n:
                out.append((" " * gap, ""))
            if bold:
                frags = [(t, f"bold {st}".strip()) for t, st in frags]
            out.extend([(pad, ""), *frags] if columns[i].right else [*frags, (pad, "")])
        return out

    rule: Line = [("─" * min(width, total(gap)), "dim")]
    lines = [line([[(c.title[k], "bold cyan")] for c in columns]) for k in (0, 1)]
    lines.append(rule)
    for r in rows:
        lines += [line([c[0] for c in r]), line([c[1] for c in r])]
    lines.append(rule)
    lines += [line([c[0] for c in footer], bold=True), line([c[1] for c in footer], bold=True)]
    return [_fit(ln, width) for ln in lines]


class Screen:
    """Screen lines as a Rich renderable, laid out for the width Rich offers when it renders.

    Rendering goes straight to Segments: 4 refreshes a second of a Rich Table cost several times more
    CPU (see docs/stats.md, "Cost of the live view").
    """

    def __init__(self, lines: Callable[[int], list[Line]]) -> None:
        self.lines = lines

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> Iterator[Segment]:
        from rich.segment import Segment

        style = console.get_style
        for line in self.lines(options.max_width):
            for text, name in line:
                if text:
                    yield Segment(text, style(name) if name else None)
            yield Segment.line()


def screen_text(lines: Sequence[Line]) -> str:
    """The plain text of screen lines (for tests and logs)."""
    return "\n".join("".join(t for t, _ in ln).rstrip() for ln in lines)


def _latency(s: StatsSnapshot) -> str:
    return f"{_lat(s.latency_ms_p50)}/{_lat(s.latency_ms_p95)}/{_lat(s.latency_ms_max)}"


def _counts(n: int, of: int, alarm: str) -> Cell:
    return _cell(str(n), _pct_text(n, of), alarm if n else "")


def recv_lines(f: RecvFrame, width: int = 120) -> list[Line]:
    """The receiver's live view: a header, one two-line row per sender, a totals footer, key help."""
    n = len(f.rows)
    head: Line = [
        (f.title, "bold"),
        ("  ", ""),
        (volume_label(f.volume_db, f.muted), "bold reverse red" if f.muted else "bold"),
        (f"   {n} sender{'' if n == 1 else 's'} connected, {f.streams_started} so far", ""),
        (f"   port {f.port} → {f.output}", "dim"),  # last: a long file name may be cut
    ]
    rows = []
    for r in f.rows:
        s = r.stats
        exp, rcv, played = loss_base(s)
        peer = r.peer if len(r.peer) <= _SENDER_WIDTH else r.peer[: _SENDER_WIDTH - 1] + "…"
        rows.append(
            (
                _cell(peer, compact_format(r.format)[:_SENDER_WIDTH]),
                _cell(uptime(r.uptime_s)),
                _cell(str(s.packets), f"{r.packets_per_s:.0f}/s"),
                _cell(f"{r.bitrate_kbps:.1f}"),
                _counts(s.lost, exp, "red"),
                _counts(s.late, rcv, "yellow"),
                _counts(s.concealed, played, "yellow"),
                _cell(f"{s.jitter_ms:.2f}"),
                _cell(_latency(s), sparkline(r.latency_trend, min_span=5.0)),
                _cell(f"{s.buffer_ms:.1f}/{s.target_ms:.1f}"),
                _cell(f"{s.drift_ppm:+.0f}"),
                (
                    level_meter(s.level_dbfs, r.peak_hold_dbfs),
                    [(sparkline(r.level_trend, METER_WIDTH + 6, lo=_FLOOR_DB, hi=0.0), "dim")],
                ),
                _cell(r.state, "", _STATE_STYLE.get(r.state, "")),
            )
        )
    tot = f.totals
    exp, rcv, played = loss_base(tot)
    footer = (
        _cell("total", f"{tot.underruns} underruns", "", ""),
        _cell(""),
        _cell(str(tot.packets), f"{f.packets_per_s:.0f}/s", "", ""),
        _cell(f"{f.bitrate_kbps:.1f}"),
        _cell(str(tot.lost), _pct_text(tot.lost, exp), "", ""),
        _cell(str(tot.late), _pct_text(tot.late, rcv), "", ""),
        _cell(str(tot.concealed), _pct_text(tot.concealed, played), "", ""),
        _cell(f"{tot.jitter_ms:.2f}"),
        _cell(_latency(tot)),
        _cell(""),
        _cell(""),
        _cell(""),
        _cell(f"{n} live"),
    )
    lines = [_fit(head, width), *grid(RECV_COLUMNS, rows, footer, width)]
    if not f.rows:
        lines.append([(f"waiting for senders on port {f.port} …", "dim italic")])
    else:
        lines.append(_fit(stage_line(tot), width))
    if f.keys:
        lines.append([(RECV_KEYS, "dim")])
    return lines


_STAGE_NAMES = (
    ("capture", "stage_capture_ms"),
    ("frame", "stage_frame_ms"),
    ("network", "stage_network_ms"),
    ("buffer", "stage_buffer_ms"),
    ("output", "stage_output_ms"),
)


def stage_line(s: StatsSnapshot) -> Line:
    """Where the median latency goes, microphone to speaker: 'capture 0.1 + frame 26.5 + ... = 70.2 ms'."""
    parts = [f"{name} {_ms(getattr(s, key))}" for name, key in _STAGE_NAMES]
    return [
        ("latency by stage (p50): ", "bold cyan"),
        (" + ".join(parts), ""),
        (f" = {_ms(s.latency_ms_p50)} ms", "bold"),
    ]


def recv_view(f: RecvFrame) -> Screen:
    """``recv_lines`` as a renderable for Rich's Live, laid out for the terminal's width."""
    return Screen(lambda width: recv_lines(f, width))


def recv_summary(
    s: StatsSnapshot,
    *,
    title: str = "tiality recv: summary",
    played_s: float | None = None,
    streams_started: int | None = None,
) -> Table:
    """The final table: totals, loss and concealment rates, latency percentiles."""
    exp, rcv, played = loss_base(s)
    from rich import box
    from rich.table import Table

    t = Table(title=title, show_header=False, box=box.SIMPLE, padding=(0, 1), title_justify="left")
    t.add_column(style="bold cyan", no_wrap=True)
    t.add_column(no_wrap=True)
    if streams_started is not None:
        t.add_row("streams", f"{streams_started} served, {s.streams} still connected")
    if played_s is not None:
        t.add_row("audio played", f"{played_s:.2f} s ({s.frames_played} frames)")
    else:
        t.add_row("frames played", str(s.frames_played))
    t.add_row("packets", f"{s.packets} ({s.bytes / 1000:.1f} kB)")
    t.add_row("lost", f"{s.lost} ({_pct_text(s.lost, exp)} of {exp} expected)")
    t.add_row("late", f"{s.late} ({_pct_text(s.late, rcv)} of packets)")
    t.add_row("concealed", f"{s.concealed} ({_pct_text(s.concealed, played)} of frames played)")
    t.add_row("FEC recovered", str(s.fec_recovered))
    t.add_row("duplicates / corrupt", f"{s.duplicates} / {s.corrupt}")
    t.add_row("skipped / inserted", f"{s.skipped} / {s.inserted} (latency adjustments)")
    t.add_row(
        "latency p50 / p95 / max",
        f"{_lat(s.latency_ms_p50)} / {_lat(s.latency_ms_p95)} / {_lat(s.latency_ms_max)} ms",
    )
    t.add_row("jitter", f"{s.jitter_ms:.2f} ms")
    t.add_row("buffer / target", f"{s.buffer_ms:.1f} / {s.target_ms:.1f} ms")
    t.add_row("drift", f"{s.drift_ppm:+.0f} ppm")
    t.add_row("underruns", str(s.underruns))
    return t


def receiver_table(s: StatsSnapshot, title: str = "tiality recv") -> Table:
    """The receiver's totals as a table (``tiality demo`` shows this live and as its summary)."""
    return recv_summary(s, title=title)


def recv_plain_line(f: RecvFrame) -> str:
    """The same figures as one log line for non-terminals (systemd, pipes); names as in the JSON."""
    s = f.totals
    exp, rcv, played = loss_base(s)
    return (
        f"tiality recv: streams={s.streams} packets={s.packets} packets_per_s={f.packets_per_s:.1f} "
        f"bitrate_kbps={f.bitrate_kbps:.1f} lost={s.lost} lost_pct={pct(s.lost, exp):.1f} "
        f"late={s.late} late_pct={pct(s.late, rcv):.1f} "
        f"concealed={s.concealed} concealed_pct={pct(s.concealed, played):.1f} "
        f"jitter_ms={s.jitter_ms:.2f} latency_ms_p50={_ms(s.latency_ms_p50)} "
        f"latency_ms_p95={_ms(s.latency_ms_p95)} latency_ms_max={_ms(s.latency_ms_max)} "
        f"buffer_ms={s.buffer_ms:.1f} target_ms={s.target_ms:.1f} drift_ppm={s.drift_ppm:+.0f} "
        f"level_dbfs={s.level_dbfs:.1f} peak_dbfs={s.peak_dbfs:.1f} underruns={s.underruns} "
        f"volume_db={f.volume_db:+.0f}{' muted' if f.muted else ''}"
    )


def sender_entry(v: SessionView) -> dict[str, Any]:
    """One connected sender for the ``senders`` list of ``tiality recv --json`` (docs/stats.md)."""
    d: dict[str, Any] = {
        "id": v.id,
        "peer": v.peer,
        "name": v.name,
        "format": v.format,
        "uptime_s": round(v.uptime_s, 3),
        "state": v.state,
        "clock_offset_ms": round(v.clock_offset_ms, 3),
        "clock_round_trip_ms": round(v.clock_round_trip_ms, 3),
    }
    stats = v.stats.as_dict()
    for k in ("streams", "underruns"):  # receiver-wide figures, in the line itself
        stats.pop(k)
    d.update(stats)
    return d


# ---------------------------------------------------------------------------------------------------------
# sender
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class SendFrame:
    """Everything one refresh of ``tiality send`` shows; ``fields`` is its JSON stats line."""

    fields: Mapping[str, Any]
    peak_hold_dbfs: float
    level_trend: tuple[float, ...]
    backlog_trend: tuple[float, ...]
    max_backlog_ms: float
    keys: bool = False
    title: str = "tiality send"


class SendMonitor:
    """The sender's counterpart of RecvMonitor: peak hold and trends from the JSON stats fields."""

    def __init__(self, max_backlog_ms: float, *, keys: bool = False, title: str = "tiality send") -> None:
        self.max_backlog_ms = max_backlog_ms
        self.keys = keys
        self.title = title
        self._level: deque[float] = deque(maxlen=HISTORY)
        self._peaks: deque[float] = deque(maxlen=PEAK_HOLD)
        self._backlog: deque[float] = deque(maxlen=HISTORY)

    def frame(self, fields: Mapping[str, Any]) -> SendFrame:
        self._level.append(float(fields["level_dbfs"]))
        self._peaks.append(float(fields["peak_dbfs"]))
        self._backlog.append(float(fields["backlog_ms"]))
        return SendFrame(
            fields=fields,
            peak_hold_dbfs=max(self._peaks),
            level_trend=tuple(self._level),
            backlog_trend=tuple(self._backlog),
            max_backlog_ms=self.max_backlog_ms,
            keys=self.keys,
            title=self.title,
        )


_SEND_STATE_STYLE = {
    "streaming": "green",
    "connecting": "yellow",
    "reconnecting": "yellow",
    "starting": "yellow",
    "failed": "bold red",
}


def _rtt(fields: Mapping[str, Any]) -> str:
    rtt = fields.get("rtt_ms")
    if rtt is None:
        return "- (no clock exchange yet)"
    offset = fields.get("clock_offset_ms")
    tail = f"  (receiver clock {offset:+.1f} ms)" if offset is not None else ""
    return f"{rtt:.2f} ms{tail}"


def send_lines(f: SendFrame, width: int = 120) -> list[Line]:
    """The sender's live view: what is captured, how it leaves, and how the link to the receiver is."""
    d = f.fields
    head: Line = [(f.title, "bold"), (f"  {d['source']} → {d['target']}   ", ""), (str(d["format"]), "dim")]
    state = str(d["state"])
    state_line: Line = [(state, _SEND_STATE_STYLE.get(state, ""))]
    if d.get("last_error") and state != "streaming":
        attempt = int(d.get("attempt") or 0)
        tail = f"; attempt {attempt}" if attempt and state in ("reconnecting", "failed") else ""
        state_line.append((f"  ({d['last_error']}{tail})", "dim"))
    captured = int(d["frames_captured"])
    dropped = int(d["dropped"])
    level = level_meter(float(d["level_dbfs"]), f.peak_hold_dbfs)
    backlog = f"{d['backlog_ms']:.0f} ms (peak {d['backlog_peak_ms']:.0f}, limit {f.max_backlog_ms:.0f} ms)"
    rows: list[tuple[str, Line, str]] = [
        ("state", state_line, ""),
        ("level dBFS", level, sparkline(f.level_trend, lo=_FLOOR_DB, hi=0.0)),
        (
            "packets sent",
            [(f"{d['packets_sent']}  ({d['packets_per_s']:.0f}/s, {d['bitrate_kbps']:.1f} kbit/s)", "")],
            "",
        ),
        ("backlog", [(backlog, "")], sparkline(f.backlog_trend, lo=0.0, hi=max(1.0, f.max_backlog_ms))),
        (
            "dropped",
            [
                (
                    f"{dropped} ({_pct_text(dropped, captured)} of {captured} captured)",
                    "red" if dropped else "",
                )
            ],
            "",
        ),
        ("receiver RTT", [(_rtt(d), "")], ""),
        ("reconnects", [(str(d["reconnects"]), "")], ""),
    ]
    if d.get("overruns"):
        rows.append(("capture overruns", [(str(d["overruns"]), "red")], ""))
    if d.get("capture_dropped_ms"):
        stale = f"{d['capture_dropped_ms']:.0f} ms (queued in the device after a stall, dropped to stay live)"
        rows.append(("capture dropped", [(stale, "yellow")], ""))
    label_w = max(len(label) for label, _, _ in rows)
    value_w = max(_width(value) for _, value, _ in rows)
    lines = [_fit(head, width)]
    for label, value, trend in rows:
        line: Line = [(label.ljust(label_w + 2), "bold cyan"), *value]
        if trend:
            line += [(" " * (value_w - _width(value) + 3), ""), (trend, "dim")]
        lines.append(_fit(line, width))
    if f.keys:
        lines.append([(SEND_KEYS, "dim")])
    return lines


def send_view(f: SendFrame) -> Screen:
    """``send_lines`` as a renderable for Rich's Live."""
    return Screen(lambda width: send_lines(f, width))


def send_summary(fields: Mapping[str, Any], title: str = "tiality send: summary") -> Table:
    """The final table: what was sent and what the receiver says it got."""
    d = fields
    from rich import box
    from rich.table import Table

    t = Table(title=title, show_header=False, box=box.SIMPLE, padding=(0, 1), title_justify="left")
    t.add_column(style="bold cyan", no_wrap=True)
    t.add_column(no_wrap=True)
    captured = int(d["frames_captured"])
    t.add_row("source", f"{d['source']} → {d['target']} ({d['format']})")
    t.add_row("frames captured", str(captured))
    t.add_row("packets sent", f"{d['packets_sent']} ({int(d['bytes_sent']) / 1000:.1f} kB)")
    t.add_row("dropped (backlog full)", f"{d['dropped']} ({_pct_text(int(d['dropped']), captured)})")
    t.add_row("backlog peak", f"{d['backlog_peak_ms']:.0f} ms")
    t.add_row("reconnects", str(d["reconnects"]))
    t.add_row("receiver RTT", _rtt(d))
    if "receiver_packets" in d:
        got, lost = int(d["receiver_packets"]), int(d["receiver_lost"])
        concealed, played = int(d["receiver_concealed"]), int(d["receiver_frames_played"])
        t.add_row("receiver: packets", str(got))
        t.add_row("receiver: lost", f"{lost} ({_pct_text(lost, got + lost)})")
        t.add_row("receiver: concealed", f"{concealed} ({_pct_text(concealed, played)} of {played} played)")
    return t


def send_plain_line(f: SendFrame) -> str:
    d = f.fields
    rtt = d.get("rtt_ms")
    return (
        f"tiality send: state={d['state']} packets_sent={d['packets_sent']} "
        f"packets_per_s={d['packets_per_s']:.1f} bitrate_kbps={d['bitrate_kbps']:.1f} "
        f"backlog_ms={d['backlog_ms']:.0f} dropped={d['dropped']} level_dbfs={d['level_dbfs']:.1f} "
        f"peak_dbfs={d['peak_dbfs']:.1f} rtt_ms={'-' if rtt is None else f'{rtt:.2f}'} "
        f"reconnects={d['reconnects']}"
    )


def send_summary_line(fields: Mapping[str, Any]) -> str:
    """The summary as one log line (``tiality send --quiet``)."""
    d = fields
    got, lost = int(d["receiver_packets"]), int(d["receiver_lost"])
    return (
        f"tiality send: done packets_sent={d['packets_sent']} dropped={d['dropped']} "
        f"reconnects={d['reconnects']} receiver_packets={got} receiver_lost={lost} "
        f"lost_pct={pct(lost, got + lost):.1f} receiver_concealed={d['receiver_concealed']} "
        f"receiver_frames_played={d['receiver_frames_played']}"
    )


# ---------------------------------------------------------------------------------------------------------
# JSON
# ---------------------------------------------------------------------------------------------------------
def json_line(fields: Mapping[str, Any], event: str = "stats", **extra: Any) -> str:
    """One JSON object: ``event`` first, then ``extra``, then ``fields`` (names: docs/stats.md)."""
    d = {"event": event, **extra, **fields}
    import json  # here: send -q prints no JSON, and its start-up skips the import

    return json.dumps(d, separators=(",", ":"), allow_nan=False)
