"""CPU cost of the live views at their refresh rate (4 Hz), as a % of one core; writes docs/stats.md.

    .venv/bin/python -m benchmarks.view_cpu [--seconds 30] [--senders 1,4] [--width 120] [--no-write]
    .venv/bin/python -m benchmarks.view_cpu --e2e [--seconds 30]      # whole processes, see below

For each number of senders, two phases of ``--seconds`` each run in this process, one after the other,
on the same 4 Hz absolute schedule:

    baseline   the loop alone: it wakes 4 times a second and does nothing else
    view       each tick does what ``tiality recv`` does on a terminal: a realistic StatsSnapshot and
               SessionViews (changing every tick), RecvMonitor.frame (rates, trends, peak hold),
               recv_view, and a Rich Live refresh of a 120 x 40 terminal whose output is written to
               /dev/null (the ANSI text is produced in full, only the terminal is missing)
    send view  the same for ``tiality send``'s view (SendMonitor.frame, send_view)

CPU is ``time.process_time()`` (user + system, all threads of this process) over the phase, divided by
its wall time; the view's cost is view - baseline. What is not included: ``Receiver.snapshot()`` and
``session_views()`` (a numpy percentile over 500 latencies per sender, tens of microseconds) and the
terminal emulator's own work in drawing the text.

``--e2e`` measures whole processes instead, everything included: ``tiality recv -o null://`` playing one
``tiality send -i tone://440`` stream, once in a 120 x 40 pseudo-terminal (the live view) and once with
``--quiet`` and no terminal; the receiver's CPU time (/proc/PID/stat, all threads) over ``--seconds``
of streaming, after a second of warm-up. The difference is the view's cost, within the noise of
decoding and playing the stream (the audio path runs in both).
"""

from __future__ import annotations

import argparse as _argparse
import math as _math
import os as _os
import platform as _platform
import re as _re
import subprocess as _subprocess
import sys as _sys
import threading as _threading
import time as _time
from collections.abc import Callable
from pathlib import Path as _Path
from typing import Any

from rich.console import Console, RenderableType
from rich.live import Live

from benchmarks.machine import cpu_name
from tiality_cli.cli.view import RecvMonitor, SendMonitor, recv_view, send_view
from tiality_cli.receiver import SessionView
from tiality_cli.stats import StatsSnapshot

_ROOT = _Path(__file__).resolve().parent.parent

REFRESH_S = 0.25
_DOC = _ROOT / "docs" / "stats.md"
_BEGIN = "<!-- view_cpu:begin -->"
_END = "<!-- view_cpu:end -->"


def _snapshot(i: int, scale: int = 1) -> StatsSnapshot:
    """Figures that move every tick, the way a live stream's do."""
    return StatsSnapshot(
        packets=(1000 + 12 * i) * scale,
        bytes=(160_000 + 2000 * i) * scale,
        lost=3 + i // 40,
        late=i // 90,
        concealed=4 + i // 40,
        fec_recovered=0,
        duplicates=0,
        corrupt=0,
        skipped=i // 200,
        inserted=i // 150,
        frames_played=(1000 + 12 * i) * scale,
        jitter_ms=0.4 + 0.2 * _math.sin(i / 7),
        latency_ms_p50=39.0 + 3 * _math.sin(i / 11),
        latency_ms_p95=44.0 + 3 * _math.sin(i / 13),
        latency_ms_max=61.0,
        bitrate_kbps=64.0,
        packets_per_s=50.0,
        buffer_ms=12.0 + 2 * _math.sin(i / 5),
        target_ms=6.0,
        drift_ppm=3.0,
        level_dbfs=-18.0 + 8 * _math.sin(i / 3),
        peak_dbfs=-12.0 + 8 * _math.sin(i / 3),
        streams=scale,
        underruns=0,
    )


def _recv_tick(senders: int) -> Callable[[int], RenderableType]:
    monitor = RecvMonitor(50052, "sd://default", keys=True)

    def tick(i: int) -> RenderableType:
        views = [
            SessionView(
                id=k + 1,
                peer=f"ipv4:192.168.1.{20 + k}:5123{k}",
                name=f"robot{k} alsa://hw:1,0",
                format="48 kHz stereo, 20 ms frames",
                uptime_s=60 + i * REFRESH_S,
                state="playing",
                clock_offset_ms=0.1,
                clock_round_trip_ms=0.5,
                stats=_snapshot(i + 7 * k),
            )
            for k in range(senders)
        ]
        frame = monitor.frame(
            _snapshot(i, senders),
            views,
            streams_started=senders,
            volume_db=-3.0,
            muted=False,
        )
        return recv_view(frame)

    return tick


def _send_tick() -> Callable[[int], RenderableType]:
    monitor = SendMonitor(200.0, keys=True)

    def tick(i: int) -> RenderableType:
        s = _snapshot(i)
        fields: dict[str, Any] = {
            "state": "streaming",
            "source": "alsa://hw:1,0",
            "target": "gui-host:50052",
            "format": "48 kHz stereo, 20 ms frames",
            "frames_captured": s.packets,
            "packets_sent": s.packets,
            "bytes_sent": s.bytes,
            "packets_per_s": 50.0,
            "bitrate_kbps": 64.0,
            "backlog_ms": 20.0 * (i % 3),
            "backlog_peak_ms": 60.0,
            "dropped": 0,
            "overruns": 0,
            "level_dbfs": s.level_dbfs,
            "peak_dbfs": s.peak_dbfs,
            "rtt_ms": 0.5,
            "clock_offset_ms": 0.1,
            "reconnects": 0,
            "last_error": "",
        }
        return send_view(monitor.frame(fields))

    return tick


def _phase(seconds: float, tick: Callable[[int], RenderableType] | None, width: int) -> float:
    """Runs the 4 Hz loop for ``seconds``; returns the process CPU used as a % of one core."""
    with open(_os.devnull, "w", encoding="utf-8") as sink:
        console = Console(file=sink, force_terminal=True, width=width, height=40, color_system="truecolor")
        live = Live(console=console, auto_refresh=False, transient=True) if tick else None
        if live is not None:
            live.start()
        try:
            t0, c0 = _time.monotonic(), _time.process_time()
            k = 0
            while True:
                k += 1
                due = t0 + k * REFRESH_S
                if due > t0 + seconds:
                    break
                _time.sleep(max(0.0, due - _time.monotonic()))
                if tick is not None and live is not None:
                    live.update(tick(k), refresh=True)
            wall, cpu = _time.monotonic() - t0, _time.process_time() - c0
        finally:
            if live is not None:
                live.stop()
    return 100.0 * cpu / wall


def _render_ms(tick: Callable[[int], RenderableType], width: int, n: int = 200) -> float:
    """The mean time of one refresh, measured back to back (no sleeping)."""
    with open(_os.devnull, "w", encoding="utf-8") as sink:
        console = Console(file=sink, force_terminal=True, width=width, height=40, color_system="truecolor")
        with Live(console=console, auto_refresh=False, transient=True) as live:
            c0 = _time.process_time()
            for i in range(n):
                live.update(tick(i), refresh=True)
            return (_time.process_time() - c0) / n * 1000


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (Linux)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _os.sysconf("SC_CLK_TCK")


def _e2e(seconds: float, tty: bool) -> float:
    """The receiver's CPU as a % of one core while it plays one stream, with or without the live view."""
    import pexpect

    tiality = [_sys.executable, "-m", "tiality_cli"]
    recv_args = ["recv", "--port", "0", "--bind", "127.0.0.1", "-o", "null://"]
    env = {k: v for k, v in _os.environ.items() if k not in ("COLUMNS", "LINES")}
    if tty:
        child = pexpect.spawn(
            tiality[0], [*tiality[1:], *recv_args], env=env, dimensions=(40, 120), encoding="utf-8"
        )
        child.expect(r"listening on port (\d+)", timeout=20)
        port, pid = int(child.match.group(1)), child.pid

        def drain() -> None:  # like a terminal, read everything it draws
            while True:
                try:
                    child.read_nonblocking(65536, timeout=1)
                except pexpect.TIMEOUT:
                    continue
                except (pexpect.EOF, OSError):
                    return

        _threading.Thread(target=drain, daemon=True).start()
    else:
        proc = _subprocess.Popen(
            [*tiality, *recv_args, "--quiet"], stderr=_subprocess.PIPE, stdout=_subprocess.DEVNULL, text=True
        )
        assert proc.stderr is not None
        port, pid = int(_re.findall(r"port (\d+)", proc.stderr.readline())[0]), proc.pid
    send = _subprocess.Popen(
        [*tiality, "send", f"127.0.0.1:{port}", "-i", "tone://440", "--seconds", str(seconds + 3), "-q"],
        stdout=_subprocess.DEVNULL,
        stderr=_subprocess.DEVNULL,
    )
    try:
        _time.sleep(1.0)  # connected and playing
        t0, c0 = _time.monotonic(), _cpu_s(pid)
        _time.sleep(seconds)
        return 100 * (_cpu_s(pid) - c0) / (_time.monotonic() - t0)
    finally:
        send.kill()
        send.wait()
        if tty:
            child.terminate(force=True)
            child.close(force=True)
        else:
            proc.kill()
            proc.wait()


def main() -> None:
    ap = _argparse.ArgumentParser(description=__doc__, formatter_class=_argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=30.0, help="length of each phase")
    ap.add_argument("--senders", default="1,4", help="rows in the receiver's view, comma-separated")
    ap.add_argument("--width", type=int, default=120, help="terminal columns")
    ap.add_argument("--no-write", action="store_true", help="print the table only, leave docs/stats.md")
    ap.add_argument("--e2e", action="store_true", help="whole processes: recv with and without the view")
    args = ap.parse_args()
    if args.e2e:
        quiet = _e2e(args.seconds, tty=False)
        view = _e2e(args.seconds, tty=True)
        print(f"tiality recv, one stream, {args.seconds:g} s: --quiet {quiet:.2f}%, live view {view:.2f}%, ")
        print(f"difference {view - quiet:.2f}% of one core")
        return

    rows = []
    for n in (int(v) for v in args.senders.split(",")):
        base = _phase(args.seconds, None, args.width)
        view = _phase(args.seconds, _recv_tick(n), args.width)
        ms = _render_ms(_recv_tick(n), args.width)
        rows.append((f"`tiality recv`, {n} sender{'s' if n != 1 else ''}", base, view, ms))
        print(f"recv {n}: baseline {base:.2f}%  view {view:.2f}%  one refresh {ms:.2f} ms", flush=True)
    base = _phase(args.seconds, None, args.width)
    view = _phase(args.seconds, _send_tick(), args.width)
    ms = _render_ms(_send_tick(), args.width)
    rows.append(("`tiality send`", base, view, ms))
    print(f"send: baseline {base:.2f}%  view {view:.2f}%  one refresh {ms:.2f} ms", flush=True)

    table = [
        _BEGIN,
        f"Measured with `python -m benchmarks.view_cpu --seconds {args.seconds:g} --width {args.width}` on "
        f"{_platform.machine()}, Python {_platform.python_version()}, {cpu_name()}:",
        "",
        "| view | baseline (loop only) | with the view | view's cost | one refresh |",
        "|---|---|---|---|---|",
        *(
            f"| {name} | {b:.2f} % | {v:.2f} % | **{v - b:.2f} % of one core** | {m:.2f} ms |"
            for name, b, v, m in rows
        ),
        _END,
    ]
    text = "\n".join(table)
    print(text)
    if not args.no_write:
        doc = _DOC.read_text(encoding="utf-8")
        if _BEGIN not in doc:
            raise SystemExit(f"{_DOC}: no {_BEGIN} marker")
        doc = _re.sub(f"{_re.escape(_BEGIN)}.*?{_re.escape(_END)}", lambda _: text, doc, flags=_re.S)
        _DOC.write_text(doc, encoding="utf-8")
        print(f"wrote {_DOC}")


if __name__ == "__main__":
    main()
