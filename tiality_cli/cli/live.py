"""Presenting a running sender or receiver: a Rich live view on terminals, log lines, or JSON lines.

    run_sender, run_receiver   run the object, present its figures until it ends, print the summary
    present                    the refresh loop shared by every command (demo included)
    KeyReader                  single keys from a terminal (cbreak mode, a thread, restored on exit)
    sender_fields, receiver_fields
                               the JSON stats fields (names and units: docs/stats.md)

Where the figures go depends on the terminal: a live view refreshed 4 times a second when stdout is a
terminal (keys too when stdin is one), a plain log line every 5 s otherwise, JSON lines once a second
with ``--json``, nothing but the summary with ``--quiet``. The CLI calls these with an Event that its
signal handlers set; a GUI would read ``Receiver.snapshot()`` / ``session_views()`` itself instead.
"""

from __future__ import annotations

import contextlib
import math
import os
import select
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

from tiality_cli.cli.view import (
    RecvFrame,
    RecvMonitor,
    SendMonitor,
    json_line,
    recv_plain_line,
    recv_summary,
    recv_view,
    send_plain_line,
    send_summary,
    send_summary_line,
    send_view,
    sender_entry,
    step_volume_db,
)
from tiality_cli.sender import Sender, StateChange

if TYPE_CHECKING:  # the receiver side is imported by recv only: send starts faster without it
    from tiality_cli.receiver import Receiver, ReceiverEvent
    from tiality_cli.stats import StatsSnapshot

REFRESH_S = 0.25  # the live view's period (4 Hz): smooth enough for a level meter, cheap to render
LOG_EVERY_S = 5.0  # plain log lines when stdout is not a terminal
JSON_EVERY_S = 1.0

Keys = Mapping[str, Callable[[], None]]


# ---------------------------------------------------------------------------------------------------------
# keys
# ---------------------------------------------------------------------------------------------------------
def keys_available() -> bool:
    """Keys are read only when stdin and stdout are terminals and this process is in the foreground
    (changing a terminal's mode from the background, ``tiality recv &``, would stop the process)."""
    try:
        import termios  # noqa: F401
    except ImportError:  # pragma: no cover - not on Linux
        return False
    try:
        if not (sys.stdin.isatty() and sys.stdout.isatty()):
            return False
        return os.tcgetpgrp(sys.stdin.fileno()) == os.getpgrp()
    except (AttributeError, ValueError, OSError):  # stdin closed or replaced, no controlling terminal
        return False


class KeyReader:
    """Reads single key presses from a terminal on a thread and calls ``on_key`` with each character.

    On enter the terminal goes into cbreak mode (keys arrive at once, unechoed; Ctrl-C still signals);
    on exit the thread stops and the terminal settings saved on enter are put back, whatever happened.
    """

    def __init__(self, on_key: Callable[[str], None], fd: int | None = None) -> None:
        self.on_key = on_key
        self.fd = sys.stdin.fileno() if fd is None else fd
        self._saved: list[Any] | None = None
        self._wake: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> KeyReader:
        import termios
        import tty

        self._saved = termios.tcgetattr(self.fd)
        try:
            tty.setcbreak(self.fd, termios.TCSANOW)
            self._wake = os.pipe()
            self._thread = threading.Thread(target=self._run, name="tiality-keys", daemon=True)
            self._thread.start()
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._restore()

    def _restore(self) -> None:
        import termios

        try:
            if self._wake is not None:
                os.write(self._wake[1], b"x")
                if self._thread is not None:
                    self._thread.join(timeout=1.0)
                for end in self._wake:
                    os.close(end)
                self._wake = None
        finally:
            saved, self._saved = self._saved, None
            if saved is not None:
                with contextlib.suppress(termios.error):  # the terminal is gone (hung up): nothing to restore
                    termios.tcsetattr(self.fd, termios.TCSADRAIN, saved)

    def _run(self) -> None:
        assert self._wake is not None
        wake = self._wake[0]
        while True:
            ready, _, _ = select.select([self.fd, wake], [], [])
            if wake in ready:
                return
            try:
                data = os.read(self.fd, 64)
            except OSError:  # the terminal went away
                return
            if not data:
                return
            for ch in data.decode(errors="ignore"):
                self.on_key(ch)


# ---------------------------------------------------------------------------------------------------------
# the refresh loop
# ---------------------------------------------------------------------------------------------------------
def present(
    finished: Callable[[], bool],
    stop: threading.Event,
    *,
    on_stop: Callable[[], None],
    table: Callable[[], Any],
    line: Callable[[], str | None],
    json_: bool,
    quiet: bool,
    keys: Keys | None = None,
    events: Callable[[], list[str]] | None = None,
    wake: threading.Event | None = None,
) -> None:
    """Shows figures until ``finished()`` holds; ``stop`` being set (a signal, or ``q``) calls ``on_stop``
    once.

    ``table`` builds the live view (called once per refresh, on terminals), ``line`` one JSON or log line.
    ``keys`` maps characters to actions while the live view shows; ``q`` always stops. ``events`` returns
    the log lines that happened since its last call (state changes): printed at once without a terminal.

    ``wake``: an event the caller sets whenever ``finished()`` or ``stop`` may have changed (the end of the
    run, a signal). Given it, the loop sleeps from one refresh to the next (with ``quiet``, until the end);
    without it, it looks at them every 50 ms.
    """
    # A key was pressed (refresh now), or the caller's wake-up.
    slice_s = 0.05 if wake is None else math.inf
    wake = threading.Event() if wake is None else wake
    stopped = False

    def poll(until: float) -> bool:
        """Waits until the monotonic time ``until`` or a key press; True once finished. Handles ``stop``."""
        nonlocal stopped
        while True:
            if finished():
                return True
            if stop.is_set() and not stopped:
                stopped = True
                on_stop()
            left = until - time.monotonic()
            if left <= 0:
                return False
            if wake.wait(min(left, slice_s)):
                wake.clear()
                return finished()

    def ticks(period: float) -> Iterator[None]:
        """Yields on an absolute schedule, every ``period`` (and at once after a key), until finished.
        A slow refresh skips the ticks it missed instead of bunching them up."""
        t0 = time.monotonic()
        k = 1
        while not poll(t0 + k * period):
            yield
            k = max(k, int((time.monotonic() - t0) / period) + 1)

    if json_:
        for _ in ticks(JSON_EVERY_S):
            text = line()
            if text:
                print(text, flush=True)
        return
    if quiet or not sys.stdout.isatty():
        last = time.monotonic()

        def log_events() -> None:
            for text in events() if events is not None and not quiet else ():
                print(text, flush=True)

        # With --quiet nothing is printed until the end: wake up only for it (or a stop), or rarely.
        for _ in ticks(LOG_EVERY_S if quiet and slice_s > LOG_EVERY_S else REFRESH_S):
            log_events()
            if not quiet and time.monotonic() - last >= LOG_EVERY_S:
                last = time.monotonic()
                text = line()
                if text:
                    print(text, flush=True)
        log_events()  # the last changes (done, failed) before the summary or the error line
        return

    from rich.console import Console
    from rich.live import Live

    actions: dict[str, Callable[[], None]] = {"q": stop.set, "Q": stop.set}
    actions.update(keys or {})

    def on_key(ch: str) -> None:
        act = actions.get(ch)
        if act is not None:
            act()
            wake.set()

    reader = KeyReader(on_key) if keys_available() else contextlib.nullcontext()
    console = Console()
    with reader, Live(table(), console=console, auto_refresh=False, transient=True) as live:
        for _ in ticks(REFRESH_S):
            live.update(table(), refresh=True)


# ---------------------------------------------------------------------------------------------------------
# send
# ---------------------------------------------------------------------------------------------------------
def sender_fields(sender: Sender) -> dict[str, Any]:
    """The sender's JSON stats fields (docs/stats.md); its rates are the snapshot's (the last 2 s)."""
    st = sender.stats
    fmt = sender.format
    snap = sender.snapshot()
    pps, kbps = snap.packets_per_s, snap.bitrate_kbps
    best = sender.clock_filter.best()
    return {
        "state": st.state,
        "source": sender.source.name,
        "target": sender.config.address.target,
        "format": fmt.describe(),
        "frames_captured": st.frames_captured,
        "packets_sent": st.packets_sent,
        "bytes_sent": st.bytes_sent,
        "packets_per_s": round(pps, 3),
        "bitrate_kbps": round(kbps, 3),
        "backlog_ms": round(st.backlog * fmt.frame_ms, 1),
        "backlog_peak_ms": round(st.backlog_peak * fmt.frame_ms, 1),
        "dropped": st.dropped,
        "overruns": sender.source.overruns,
        "capture_dropped_ms": round(st.capture_dropped_ms, 1),
        "level_dbfs": round(st.level_dbfs, 1),
        "peak_dbfs": round(st.peak_dbfs, 1),
        "rtt_ms": None if best is None else round(best.round_trip_ns / 1e6, 3),
        "clock_offset_ms": None if best is None else round(best.offset_ns / 1e6, 3),
        "reconnects": st.reconnects,
        "last_error": st.last_error,
        "attempt": st.attempt,
    }


class StateLog:
    """Turns the sender's state changes into log lines, with the reason and the attempt number.

    Every change of state is logged (connecting, streaming, reconnecting, done, failed). During an outage
    the sender retries about twice a second, so the failed attempts themselves are logged the first
    ``FIRST_ATTEMPTS`` times, whenever the reason changes, and otherwise at most once every ``EVERY_S``:
    a robot left without its receiver for a night writes a line per 5 s, not 170,000.

    ``add`` runs on the sender's threads (a deque append); ``lines`` on the presenter's.
    """

    FIRST_ATTEMPTS = 3
    EVERY_S = LOG_EVERY_S

    def __init__(self, prefix: str = "tiality send", clock: Callable[[], float] = time.monotonic) -> None:
        self._prefix = prefix
        self._clock = clock
        self._pending: deque[tuple[float, StateChange]] = deque(maxlen=256)
        self._last: StateChange | None = None
        self._last_logged_s = -math.inf
        self._outage_start_s = 0.0

    def add(self, change: StateChange) -> None:
        self._pending.append((self._clock(), change))

    def lines(self) -> list[str]:
        out: list[str] = []
        while self._pending:
            t, change = self._pending.popleft()
            text = self._line(t, change)
            if text is not None:
                out.append(f"{self._prefix}: {text}")
        return out

    def _line(self, t: float, c: StateChange) -> str | None:
        prev, self._last = self._last, c
        if c.state == "reconnecting":
            new = prev is None or prev.state != "reconnecting"
            if new:
                self._outage_start_s = t
            elif (
                prev is not None
                and c.attempt > self.FIRST_ATTEMPTS
                and c.reason == prev.reason
                and t - self._last_logged_s < self.EVERY_S
            ):
                return None
            self._last_logged_s = t
            return f"reconnecting: {c.reason} (attempt {c.attempt})"
        self._last_logged_s = t
        if c.state == "connecting":
            return f"connecting to {c.target}"
        if c.state == "streaming":
            if prev is not None and prev.state == "reconnecting":
                down = t - self._outage_start_s
                return f"streaming to {c.target} again (after {c.attempt} failed attempt(s), {down:.1f} s)"
            return f"streaming to {c.target}"
        if c.state == "failed":
            return f"failed: {c.reason} (attempt {c.attempt})"
        return c.state


class OutageLines:
    """With ``--quiet`` or ``--json`` (no state log shown), a sender that cannot reach its receiver says so
    on stderr once per outage, and once when it streams again: a robot's journal shows why nothing was
    heard, not a silent retry loop. Wraps the state listener it is given (the sender's threads)."""

    def __init__(self, then: Callable[[StateChange], None], prefix: str = "tiality send") -> None:
        self._then = then
        self._prefix = prefix
        self._down = False  # an outage is in progress (its first line said so)

    def __call__(self, change: StateChange) -> None:
        self._then(change)
        if change.state == "reconnecting" and not self._down:
            self._down = True
            self._say(f"warning: {change.reason}; retrying until it answers")  # the reason names the target
        elif change.state == "streaming" and self._down:
            self._down = False
            self._say(f"streaming to {change.target} again (after {change.attempt} failed attempt(s))")

    def _say(self, text: str) -> None:
        print(f"{self._prefix}: {text}", file=sys.stderr, flush=True)


def run_sender(
    sender: Sender,
    stop: threading.Event,
    *,
    json_: bool,
    quiet: bool,
    wake: threading.Event | None = None,
) -> None:
    """Starts the sender and presents its figures until it ends; re-raises its error.

    ``wake``: set by whatever sets ``stop`` (``stop_on_signals(wake)``), so that the presenter sleeps
    between refreshes instead of polling (see ``present``).
    """
    log = StateLog()
    # With --quiet or --json the log is not shown: an outage still gets one line on stderr each way.
    sender.on_state = OutageLines(log.add) if quiet or json_ else log.add
    ended = threading.Event()

    def on_end() -> None:
        ended.set()
        if wake is not None:
            wake.set()

    sender.on_end = on_end
    monitor = SendMonitor(sender.config.max_backlog_ms, keys=keys_available())

    def fields() -> dict[str, Any]:
        return sender_fields(sender)

    sender.start()
    present(
        ended.is_set,
        stop,
        on_stop=lambda: sender.stop(wait=False),
        table=lambda: send_view(monitor.frame(fields())),
        line=lambda: json_line(fields()) if json_ else send_plain_line(monitor.frame(fields())),
        json_=json_,
        quiet=quiet,
        events=log.lines,
        wake=wake,
    )
    res = sender.wait()
    assert res is not None  # wait() without a timeout returns the totals or raises
    summary = fields()
    audio_s = sender.stats.frames_captured * sender.format.frame_ms / 1000
    if audio_s > 0:  # the summary's rates are averages over the whole stream
        summary["packets_per_s"] = round(res.packets_sent / audio_s, 3)
        summary["bitrate_kbps"] = round(res.bytes_sent * 8 / 1000 / audio_s, 3)
    summary.update(
        receiver_packets=res.receiver_packets,
        receiver_lost=res.receiver_lost,
        receiver_concealed=res.receiver_concealed,
        receiver_frames_played=res.receiver_frames_played,
    )
    if json_:
        print(json_line(summary, event="summary"), flush=True)
    elif quiet:
        print(send_summary_line(summary), flush=True)
    else:
        from tiality_cli.cli.common import out_console

        out_console().print(send_summary(summary))


# ---------------------------------------------------------------------------------------------------------
# recv
# ---------------------------------------------------------------------------------------------------------
def receiver_fields(receiver: Receiver, snap: StatsSnapshot, played_s: float) -> dict[str, Any]:
    """The receiver's JSON fields besides the snapshot's own (docs/stats.md)."""
    return {
        "played_s": round(played_s, 3),
        **snap.as_dict(),
        "volume_db": round(receiver.volume_db, 1),
        "muted": receiver.muted,
        "streams_started": receiver.streams_started,
        "streams_shed": receiver.streams_shed,
        "streams_refused": receiver.streams_refused,
        "load_pct": None if receiver.load_pct is None else round(receiver.load_pct, 1),
        "capacity": receiver.capacity,
        "overloaded": receiver.overloaded,
        "economy": receiver.economy,
    }


def volume_keys(receiver: Receiver) -> dict[str, Callable[[], None]]:
    """``m`` toggles mute, ``+``/``-`` change the volume in 3 dB steps (``=``/``_`` too: no shift)."""

    def toggle() -> None:
        receiver.muted = not receiver.muted

    def step(steps: int) -> Callable[[], None]:
        def change() -> None:
            receiver.volume_db = step_volume_db(receiver.volume_db, steps)

        return change

    up, down = step(+1), step(-1)
    return {"m": toggle, "M": toggle, "+": up, "=": up, "-": down, "_": down}


class RefusalLines:
    """Refused senders on stderr, one line per burst: the first at once, with its peer and reason; the
    rest of the burst (QUIET_S after that line) counted, in one more line when it is over. A
    flood of senders must not flood the operator's terminal, yet every refusal is told."""

    QUIET_S = 5.0

    def __init__(self, write: Callable[[str], None], quiet_s: float = QUIET_S) -> None:
        self._write = write
        self._quiet_s = quiet_s
        self._lock = threading.Lock()
        self._held = 0  # refusals since the last line
        self._reason = ""  # the last of them
        self._timer: threading.Timer | None = None

    def refused(self, peer: str, reason: str) -> None:
        with self._lock:
            if self._timer is not None:  # within a burst: told when it is over
                self._held += 1
                self._reason = reason
                return
            self._timer = threading.Timer(self._quiet_s, self.flush)
            self._timer.daemon = True
            self._timer.start()
        self._write(f"tiality recv: refused a sender ({peer}): {reason}")

    def flush(self) -> None:
        """Tells the burst's count (the timer, or the receiver's end) and starts a new burst."""
        with self._lock:
            held, reason, timer = self._held, self._reason, self._timer
            self._held, self._timer = 0, None
        if timer is not None:
            timer.cancel()
        if held:
            s = "s" if held != 1 else ""
            self._write(f"tiality recv: refused {held} more sender{s} in that burst (the last: {reason})")


def run_receiver(
    receiver: Receiver, stop: threading.Event, *, seconds: float | None, once: bool, json_: bool, quiet: bool
) -> None:
    """Starts the receiver and presents its figures until --seconds, --once or ``stop``; then the summary."""
    from tiality_cli.io.base import ClockedSink

    refusals = RefusalLines(lambda text: print(text, file=sys.stderr, flush=True))

    def warn(event: ReceiverEvent) -> None:
        """An overload (and what the receiver does about it), and refused senders, on stderr whatever the
        output mode."""
        if event.kind == "sender_refused":
            refusals.refused(event.peer, event.detail)
        elif event.kind == "overload":
            text = f"tiality recv: warning: {event.detail}; new senders are refused"
            print(text, file=sys.stderr, flush=True)
        elif event.kind == "overload_ended":
            print(f"tiality recv: overload ended: {event.detail}", file=sys.stderr, flush=True)
        elif event.kind == "shed":
            print(f"tiality recv: warning: {event.detail}", file=sys.stderr, flush=True)
        elif event.kind in ("economy", "economy_ended"):
            print(f"tiality recv: {event.detail}", file=sys.stderr, flush=True)

    receiver.subscribe(warn)
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

    monitor = RecvMonitor(receiver.port, sink.name, keys=keys_available())

    def frame() -> RecvFrame:
        return monitor.frame(
            receiver.snapshot(),
            receiver.session_views(),
            streams_started=receiver.streams_started,
            volume_db=receiver.volume_db,
            muted=receiver.muted,
        )

    def line() -> str:
        if not json_:
            return recv_plain_line(frame())
        fields = receiver_fields(receiver, receiver.snapshot(), played_s())
        fields["senders"] = [sender_entry(v) for v in receiver.session_views()]
        return json_line(fields)

    try:
        present(
            lambda: done() or stop.is_set(),
            stop,
            on_stop=lambda: None,
            table=lambda: recv_view(frame()),
            line=line,
            json_=json_,
            quiet=quiet,
            keys=volume_keys(receiver),
        )
    finally:
        receiver.stop()
        refusals.flush()
    snap = receiver.snapshot()
    fields = receiver_fields(receiver, snap, played_s())
    if fields["played_s"] > 0:  # the summary's rates are averages over the audio played
        fields["packets_per_s"] = round(snap.packets / fields["played_s"], 3)
        fields["bitrate_kbps"] = round(snap.bytes * 8 / 1000 / fields["played_s"], 3)
    if json_:
        print(json_line(fields, event="summary"), flush=True)
    elif not quiet:
        from tiality_cli.cli.common import out_console

        out_console().print(recv_summary(snap, played_s=played_s(), streams_started=receiver.streams_started))
    else:
        print(recv_plain_line(frame()), flush=True)
