"""Presenting a running sender or receiver: a Rich live view on terminals, log lines, or JSON lines.

The CLI calls these with an Event that its signal handlers set; a GUI would read
``Receiver.snapshot()`` / ``session_views()`` itself instead.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from tiality_cli.receiver import Receiver
from tiality_cli.sender import Sender
from tiality_cli.sinks import ClockedSink
from tiality_cli.view import json_line, plain_line, receiver_table, sender_table


def sender_fields(sender: Sender) -> dict[str, Any]:
    st = sender.stats
    return {
        "state": st.state,
        "source": sender.source.name,
        "format": sender.format.describe(),
        "packets_sent": st.packets_sent,
        "bytes_sent": st.bytes_sent,
        "backlog_ms": round(st.backlog * sender.format.frame_ms, 1),
        "dropped": st.dropped,
        "overruns": sender.source.overruns,
        "level_dbfs": round(st.level_dbfs, 1),
        "peak_dbfs": round(st.peak_dbfs, 1),
    }


def run_sender(sender: Sender, stop: threading.Event, *, json_: bool, quiet: bool) -> None:
    """Runs the sender on a thread and presents its figures until it ends; re-raises its error."""

    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["result"] = sender.run()
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=work, name="tiality-send", daemon=True)
    thread.start()
    present(
        lambda: not thread.is_alive(),
        stop,
        on_stop=sender.stop,
        table=lambda: sender_table(sender_fields(sender)),
        line=lambda: json_line(sender_fields(sender)) if json_ else None,
        json_=json_,
        quiet=quiet,
    )
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    res = outcome["result"]
    fields = sender_fields(sender)
    fields.update(
        receiver_packets=res.receiver_packets,
        receiver_lost=res.receiver_lost,
        receiver_concealed=res.receiver_concealed,
        receiver_frames_played=res.receiver_frames_played,
    )
    if json_:
        print(json_line(fields, event="summary"), flush=True)
    elif not quiet:
        from rich.console import Console

        Console().print(sender_table(fields, title="tiality send: summary"))


def present(
    finished: Callable[[], bool],
    stop: threading.Event,
    *,
    on_stop: Callable[[], None],
    table: Callable[[], Any],
    line: Callable[[], str | None],
    json_: bool,
    quiet: bool,
) -> None:
    """Shows live figures until ``finished()`` holds; a signal calls ``on_stop`` once."""
    stopped = False

    def poll(interval: float) -> bool:
        nonlocal stopped
        deadline = time.monotonic() + interval
        while time.monotonic() < deadline:
            if finished():
                return True
            if stop.wait(0.05) and not stopped:
                stopped = True
                on_stop()
        return finished()

    if json_:
        while not poll(1.0):
            text = line()
            if text:
                print(text, flush=True)
        return
    if quiet or not sys.stdout.isatty():
        last = time.monotonic()
        while not poll(0.25):
            if not quiet and time.monotonic() - last >= 5.0:
                last = time.monotonic()
                text = line()
                if text:
                    print(text, flush=True)
        return
    from rich.live import Live

    with Live(table(), refresh_per_second=4, transient=True) as live:
        while not poll(0.25):
            live.update(table())


def run_receiver(
    receiver: Receiver, stop: threading.Event, *, seconds: float | None, once: bool, json_: bool, quiet: bool
) -> None:
    """Starts the receiver and presents its figures until --seconds, --once or ``stop``; then the summary."""

    receiver.start()
    sink = receiver.sink
    # Always on stderr (also with --json): scripts read the bound port here when they pass --port 0.
    print(f"tiality recv: listening on port {receiver.port}, playing to {sink.name}", file=sys.stderr)

    def played_s() -> float:
        fmt = sink.format
        return sink.frames_written / fmt.sample_rate if fmt else 0.0

    def done() -> bool:
        if seconds is not None and played_s() >= seconds:
            return True
        return once and receiver.streams_ended >= 1

    if seconds is not None and isinstance(sink, ClockedSink):
        sink.limit_seconds = seconds  # a file gets exactly that much audio

    try:
        present(
            lambda: done() or stop.is_set(),
            stop,
            on_stop=lambda: None,
            table=lambda: receiver_table(receiver.snapshot()),
            line=lambda: (
                json_line(receiver.snapshot().as_dict()) if json_ else plain_line(receiver.snapshot())
            ),
            json_=json_,
            quiet=quiet,
        )
    finally:
        receiver.stop()
    snap = receiver.snapshot()
    if json_:
        print(json_line(snap.as_dict(), event="summary", played_s=round(played_s(), 3)), flush=True)
    elif not quiet:
        from rich.console import Console

        Console().print(receiver_table(snap, title="tiality recv: summary"))
    else:
        print(plain_line(snap), flush=True)
