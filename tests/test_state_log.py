"""Why the sender is not streaming, in its logs and its live view: every state change with its reason.

A real ``tiality send`` to a host that does not resolve, off a terminal (pipes) and in a pseudo-terminal;
the log's thinning during a long outage is checked on a manual clock.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading

import pexpect

from tests.helpers.waiting import wait_until
from tiality_cli.cli.live import StateLog
from tiality_cli.cli.view import SendMonitor, screen_text, send_lines
from tiality_cli.config import AudioFormat, Endpoint
from tiality_cli.io.files import NullSink
from tiality_cli.io.sources import open_source
from tiality_cli.receiver import Receiver, ReceiverConfig
from tiality_cli.sender import Sender, SenderConfig, StateChange

TIALITY = [sys.executable, "-m", "tiality_cli"]
ENV = {**os.environ, "COLUMNS": "120", "NO_COLOR": "1"}
HOST = "nosuchhost.invalid:50052"
REASON = f"cannot reach {HOST}: host name not found"


def test_off_a_terminal_send_logs_each_state_change_with_reason_and_attempt() -> None:
    proc = subprocess.Popen(
        [*TIALITY, "send", HOST, "-i", "tone://440"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    lines: queue.Queue[str] = queue.Queue()
    seen: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))

    threading.Thread(target=pump, daemon=True).start()

    def has_attempt_3() -> bool:
        while not lines.empty():
            seen.append(lines.get())
        return any(line.endswith("(attempt 3)") for line in seen)

    try:
        wait_until(has_attempt_3, 20, "the third failed attempt in the log")
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=15)
    assert seen[0] == f"tiality send: connecting to {HOST}"
    failures = [line for line in seen if "reconnecting:" in line]
    assert failures[:3] == [f"tiality send: reconnecting: {REASON} (attempt {n})" for n in (1, 2, 3)]
    assert "Traceback" not in err


def test_a_terminal_shows_the_reason_and_the_attempt_in_the_live_view() -> None:
    child = pexpect.spawn(
        TIALITY[0],
        [*TIALITY[1:], "send", HOST, "-i", "tone://440"],
        env={**ENV, "TERM": "xterm"},
        dimensions=(30, 140),
        encoding="utf-8",
        timeout=20,
    )
    try:
        esc = r"(?:\x1b\[[0-9;]*m|\s)+"  # spaces and the styles between the words
        child.expect(rf"reconnecting{esc}\({re.escape(REASON)}; attempt (\d+)\)")
        assert int(child.match.group(1)) >= 1
    finally:
        child.kill(signal.SIGINT)
        child.expect(pexpect.EOF, timeout=15)
        child.close()


def test_send_view_state_line_carries_reason_and_attempt() -> None:
    fields = {
        "state": "reconnecting", "source": "tone://440", "target": HOST, "format": "48 kHz stereo",
        "frames_captured": 0, "packets_sent": 0, "packets_per_s": 0.0, "bitrate_kbps": 0.0,
        "backlog_ms": 0.0, "backlog_peak_ms": 0.0, "dropped": 0, "overruns": 0, "level_dbfs": -120.0,
        "peak_dbfs": -120.0, "rtt_ms": None, "clock_offset_ms": None, "reconnects": 6,
        "last_error": REASON, "attempt": 7,
    }  # fmt: skip
    text = screen_text(send_lines(SendMonitor(200.0).frame(fields), width=140))
    assert re.search(rf"state\s+reconnecting  \({re.escape(REASON)}; attempt 7\)", text), text


def test_a_long_outage_logs_its_first_attempts_each_new_reason_and_then_one_line_per_5_s() -> None:
    now = [0.0]
    log = StateLog(clock=lambda: now[0])

    def at(t: float, state: str, reason: str = "", attempt: int = 0) -> None:
        now[0] = t
        log.add(StateChange(state, reason, attempt, HOST))

    at(0.0, "connecting")
    at(0.1, "streaming")
    for k in range(1, 31):  # 30 failures, 0.5 s apart: 15 s without the receiver
        reason = "connection refused" if k < 25 else "no route to host"
        at(0.5 * k, "reconnecting", reason, k)
    at(15.8, "streaming", attempt=30)
    got = log.lines()
    attempts = [int(m.group(1)) for line in got if (m := re.search(r"\(attempt (\d+)\)$", line))]
    # 1-3 in full; then every 5 s (t=6.5: 13, t=11.5: 23); the new reason at 25; then nothing before 30
    assert attempts == [1, 2, 3, 13, 23, 25]
    assert got[0] == f"tiality send: connecting to {HOST}"
    assert got[1] == f"tiality send: streaming to {HOST}"
    assert got[-1] == f"tiality send: streaming to {HOST} again (after 30 failed attempt(s), 15.3 s)"
    assert "tiality send: reconnecting: no route to host (attempt 25)" in got


def test_the_sender_reports_each_change_with_reason_and_attempt_until_the_receiver_comes() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    changes: list[StateChange] = []
    sender = Sender(
        open_source("tone://440", AudioFormat()), SenderConfig(Endpoint("127.0.0.1", port), seconds=1.0)
    )
    sender.on_state = changes.append
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(sender.run()), daemon=True)
    thread.start()
    rx: Receiver | None = None
    try:
        wait_until(lambda: sender.stats.attempt >= 2, 15, "two failed attempts")
        rx = Receiver(NullSink(), ReceiverConfig(port=port, bind="127.0.0.1"))
        rx.start()
        thread.join(30)
    finally:
        sender.stop()
        if rx is not None:
            rx.stop()
    assert result, "the sender did not finish"
    target = f"127.0.0.1:{port}"
    assert changes[0] == StateChange("connecting", "", 0, target)
    failed = [c for c in changes if c.state == "reconnecting"]
    assert [c.attempt for c in failed] == list(range(1, len(failed) + 1)) and len(failed) >= 2
    assert {c.reason for c in failed} == {
        f"cannot reach {target}: connection refused (is `tiality recv` running there?)"
    }
    assert changes[-2:] == [
        StateChange("streaming", "", len(failed), target),
        StateChange("done", "", 0, target),
    ]
    assert sender.stats.attempt == 0 and sender.stats.state == "done"
