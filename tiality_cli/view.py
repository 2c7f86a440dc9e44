"""Presentation of statistics: Rich tables for terminals, plain lines for logs, JSON lines for scripts.

Pure functions of snapshots; the CLI decides when to call them. Only this module and cli.py import rich.
"""

from __future__ import annotations

import json
import math
from typing import Any

from rich.table import Table
from rich.text import Text

from tiality_cli.stats import StatsSnapshot


def _ms(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.1f}"


def _pct(part: int, whole: int) -> str:
    return f"{part} ({100 * part / whole:.1f}%)" if whole else str(part)


def level_bar(dbfs: float, width: int = 20) -> Text:
    """A level meter from -60 to 0 dBFS, green/yellow/red."""
    filled = 0 if dbfs <= -60 else min(width, round((dbfs + 60) / 60 * width))
    style = "green" if dbfs < -12 else "yellow" if dbfs < -3 else "red"
    t = Text("█" * filled, style=style)
    t.append("·" * (width - filled), style="dim")
    t.append(f" {dbfs:6.1f} dBFS" if dbfs > -120 else "   silent")
    return t


def receiver_table(s: StatsSnapshot, title: str = "tiality recv") -> Table:
    """The receiver's live view: one row per figure, grouped by what an operator asks first."""
    t = Table(title=title, show_header=False, box=None, padding=(0, 2))
    t.add_column(style="bold cyan", no_wrap=True)
    t.add_column(no_wrap=True)
    expected = s.frames_played or s.packets
    t.add_row("streams", str(s.streams))
    t.add_row(
        "latency p50 / p95 / max",
        f"{_ms(s.latency_ms_p50)} / {_ms(s.latency_ms_p95)} / {_ms(s.latency_ms_max)} ms",
    )
    t.add_row("buffer / target", f"{s.buffer_ms:.1f} / {s.target_ms:.1f} ms")
    t.add_row("jitter", f"{s.jitter_ms:.2f} ms")
    t.add_row("packets", f"{s.packets}  ({s.packets_per_s:.0f}/s, {s.bitrate_kbps:.1f} kbit/s)")
    t.add_row("lost / late", f"{_pct(s.lost, expected)} / {_pct(s.late, expected)}")
    t.add_row("concealed / FEC", f"{_pct(s.concealed, expected)} / {s.fec_recovered}")
    t.add_row("duplicates / corrupt", f"{s.duplicates} / {s.corrupt}")
    t.add_row("skipped / inserted", f"{s.skipped} / {s.inserted}")
    t.add_row("drift", f"{s.drift_ppm:+.0f} ppm")
    t.add_row("underruns", str(s.underruns))
    t.add_row("level", level_bar(s.level_dbfs))
    return t


def sender_table(fields: dict[str, Any], title: str = "tiality send") -> Table:
    t = Table(title=title, show_header=False, box=None, padding=(0, 2))
    t.add_column(style="bold cyan", no_wrap=True)
    t.add_column(no_wrap=True)
    for k, v in fields.items():
        if k == "level_dbfs":
            t.add_row("level", level_bar(float(v)))
        elif k != "peak_dbfs":
            t.add_row(k.replace("_", " "), str(v))
    return t


def plain_line(s: StatsSnapshot) -> str:
    """One log line for non-terminals (systemd, pipes)."""
    return (
        f"packets={s.packets} lost={s.lost} late={s.late} concealed={s.concealed} "
        f"latency_p50={_ms(s.latency_ms_p50)}ms p95={_ms(s.latency_ms_p95)}ms buffer={s.buffer_ms:.1f}ms "
        f"jitter={s.jitter_ms:.2f}ms bitrate={s.bitrate_kbps:.1f}kbit/s level={s.level_dbfs:.1f}dBFS"
    )


def json_line(fields: dict[str, Any], event: str = "stats", **extra: Any) -> str:
    d = {"event": event, **extra, **fields}
    return json.dumps(d, separators=(",", ":"))
