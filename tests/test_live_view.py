"""The live views as an operator sees them: real commands in a pseudo-terminal of a fixed size.

A small terminal emulator (``Screen``) replays what the command writes (text, cursor moves, erases),
so the tests read the screen as drawn, not the stream of escape codes. Figures on the screen are
compared with the counters of a stream with known loss (a stalled link makes the sender drop audio),
and the keys are pressed as a user would; what the volume keys do is measured in the audio played.
"""

from __future__ import annotations

import json
import math
import os
import queue
import re
import signal
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import pexpect
import pytest

from tests.helpers.proxy import FaultProxy
from tests.helpers.waiting import wait_until
from tiality_cli.cli.live import KeyReader
from tiality_cli.cli.view import (
    RECV_COLUMNS,
    RecvMonitor,
    level_meter,
    recv_lines,
    screen_text,
    sparkline,
    step_volume_db,
)
from tiality_cli.stats import StatsSnapshot
from tiality_cli.wavfile import WavWriter, read_wav

T = TypeVar("T")
ROWS, COLS = 40, 120
TIALITY = [sys.executable, "-m", "tiality_cli"]
# The terminal's size comes from the pty; COLUMNS/LINES from the test's own environment would override it.
ENV = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
ENV.update(TERM="xterm-256color")
PIPE_ENV = {**ENV, "NO_COLOR": "1"}

_TOKEN = re.compile(
    r"\x1b\[(?P<params>[0-9;?]*)(?P<final>[@-~])"  # CSI
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)"  # OSC (window title...)
    r"|\x1b[()][0-9A-Za-z]|\x1b[=>78DEHM]"  # charset selection, keypad modes, save/restore...
    r"|(?P<ctl>[\x00-\x1f])"
    r"|(?P<text>[^\x00-\x1f\x1b]+)"
)


class Screen:
    """Enough of a VT100 for Rich: text with deferred wrap, CR, LF with scrolling, cursor moves, erases."""

    def __init__(self, rows: int, cols: int) -> None:
        self.rows, self.cols = rows, cols
        self.cells = [[" "] * cols for _ in range(rows)]
        self.row = self.col = 0
        self._pending = ""

    def feed(self, data: str) -> None:
        data = self._pending + data
        pos = 0
        while pos < len(data):
            m = _TOKEN.match(data, pos)
            if m is None:  # an escape sequence cut in two by the read: finish it next time
                break
            pos = m.end()
            if m.group("text") is not None:
                self._text(m.group("text"))
            elif m.group("ctl") is not None:
                self._control(m.group("ctl"))
            elif m.group("final") is not None:
                self._csi(m.group("params"), m.group("final"))
        self._pending = data[pos:]

    def _text(self, text: str) -> None:
        for ch in text:
            if self.col >= self.cols:  # deferred wrap, as xterm does
                self.col = 0
                self._linefeed()
            self.cells[self.row][self.col] = ch
            self.col += 1

    def _linefeed(self) -> None:
        if self.row == self.rows - 1:
            self.cells.pop(0)
            self.cells.append([" "] * self.cols)
        else:
            self.row += 1

    def _control(self, ch: str) -> None:
        if ch == "\r":
            self.col = 0
        elif ch == "\n":
            self._linefeed()
        elif ch == "\b":
            self.col = max(0, self.col - 1)

    def _csi(self, params: str, final: str) -> None:
        if params.startswith("?"):
            return  # cursor visibility and other modes
        args = [int(p) if p else 0 for p in params.split(";")] if params else []
        n = max(1, args[0]) if args else 1
        if final == "A":
            self.row = max(0, self.row - n)
        elif final == "B":
            self.row = min(self.rows - 1, self.row + n)
        elif final == "C":
            self.col = min(self.cols - 1, self.col + n)
        elif final == "D":
            self.col = max(0, self.col - n)
        elif final == "G":
            self.col = min(self.cols - 1, n - 1)
        elif final == "H":
            self.row = min(self.rows - 1, (args[0] if args else 1) - 1 if args and args[0] else 0)
            self.col = min(self.cols - 1, args[1] - 1 if len(args) > 1 and args[1] else 0)
        elif final == "K":
            mode = args[0] if args else 0
            line = self.cells[self.row]
            lo, hi = {0: (self.col, self.cols), 1: (0, self.col + 1), 2: (0, self.cols)}[mode]
            line[lo:hi] = [" "] * (hi - lo)
        elif final == "J":
            mode = args[0] if args else 0
            if mode == 2:
                self.cells = [[" "] * self.cols for _ in range(self.rows)]
            elif mode == 0:
                self.cells[self.row][self.col :] = [" "] * (self.cols - self.col)
                for r in range(self.row + 1, self.rows):
                    self.cells[r] = [" "] * self.cols

    def text(self) -> str:
        return "\n".join("".join(line).rstrip() for line in self.cells).rstrip("\n")


class Terminal:
    """A command in a ``ROWS`` x ``COLS`` pseudo-terminal; a thread keeps reading it into a Screen."""

    def __init__(self, argv: list[str], env: dict[str, str] = ENV) -> None:
        self.child = pexpect.spawn(
            argv[0], argv[1:], env=env, dimensions=(ROWS, COLS), encoding="utf-8", codec_errors="replace"
        )
        self.screen = Screen(ROWS, COLS)
        self.eof = False
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        while True:
            try:
                data = self.child.read_nonblocking(65536, timeout=0.5)
            except pexpect.TIMEOUT:
                continue
            except (pexpect.EOF, OSError):
                with self._cond:
                    self.eof = True
                    self._cond.notify_all()
                return
            with self._cond:
                self.screen.feed(data)
                self._cond.notify_all()

    def wait_for(self, find: Callable[[str], T | None], timeout: float, what: str) -> T:
        """Waits until ``find(screen text)`` returns something; returns it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                text = self.screen.text()
                found = find(text)
                if found is not None and found is not False:
                    return found
                left = deadline - time.monotonic()
                if self.eof or left <= 0:
                    why = "the program ended" if self.eof else f"timed out after {timeout:g} s"
                    raise AssertionError(f"waiting for {what}: {why}; the screen:\n{text}")
                self._cond.wait(left)

    def text(self) -> str:
        with self._cond:
            return self.screen.text()

    def press(self, key: str) -> None:
        self.child.send(key)

    def exit_status(self, timeout: float) -> int:
        """Waits for the command to end (its output read to the end); returns its exit status."""
        self.wait_for(lambda _: self.eof, timeout, "the program to end")
        self._reader.join(timeout)
        self.child.wait()
        status = self.child.exitstatus
        assert status is not None, f"ended by signal {self.child.signalstatus}"
        return int(status)

    def close(self) -> None:
        if self.child.isalive():
            self.child.terminate(force=True)
        self.child.close(force=True)


@pytest.fixture
def terminals() -> Iterator[Callable[[list[str]], Terminal]]:
    opened: list[Terminal] = []

    def open_(argv: list[str]) -> Terminal:
        term = Terminal(argv)
        opened.append(term)
        return term

    yield open_
    for term in opened:
        term.close()


class JsonLines:
    """A subprocess printing JSON lines; a thread queues them so the test can wait with a timeout."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=PIPE_ENV
        )
        self.lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))
        self.lines.put(None)

    def until(self, cond: Callable[[dict[str, Any]], bool], timeout: float, what: str) -> dict[str, Any]:
        """The first line for which ``cond`` holds (the lines before it are consumed)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"timed out waiting for {what}") from None
            if line is None:
                raise AssertionError(f"waiting for {what}: the sender ended ({self.stderr()})")
            if cond(line):
                return line

    def stderr(self) -> str:
        if self.proc.poll() is None:
            return ""
        assert self.proc.stderr is not None
        return self.proc.stderr.read()

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def sender(port: int, seconds: float) -> JsonLines:
    return JsonLines(
        [*TIALITY, "send", f"127.0.0.1:{port}", "-i", "tone://440", "--seconds", str(seconds), "--json"]
    )


def recv_argv(output: str = "null://") -> list[str]:
    return [*TIALITY, "recv", "--port", "0", "--bind", "127.0.0.1", "-o", output]


def listening_port(term: Terminal) -> int:
    def find(text: str) -> int | None:
        m = re.search(r"listening on port (\d+)", text)
        return int(m.group(1)) if m else None

    return term.wait_for(find, 15, "the receiver to listen")


# ---- reading the receiver's screen -----------------------------------------------------------------------
def table_figures(text: str, first_cell: str) -> dict[str, str] | None:
    """The first line of the row whose first cell starts with ``first_cell``, by column (right-justified
    columns end where their header ends), or None while there is no such row."""
    lines = text.splitlines()
    header = next((ln for ln in lines if re.match(r"sender\s+up\s+packets", ln)), None)
    row = next((ln for ln in lines if ln.startswith(first_cell)), None)
    if header is None or row is None:
        return None
    figures = {"first": row.split()[0]}
    for name in ("packets", "kbit/s", "lost", "late", "concealed"):
        m = re.search(rf"(?<!\S){re.escape(name)}(?!\S)", header)
        assert m, header
        cell = row[: m.end()].split()
        figures[name] = cell[-1] if cell else ""
    return figures


def row_below(text: str, first_cell: str) -> str:
    """The second line of the row whose first cell starts with ``first_cell`` ("" if there is none)."""
    lines = text.splitlines()
    i = next((i for i, ln in enumerate(lines) if ln.startswith(first_cell)), None)
    return lines[i + 1] if i is not None and i + 1 < len(lines) else ""


def test_recv_view_shows_the_figures_of_a_stream_with_known_loss(
    terminals: Callable[[list[str]], Terminal],
) -> None:
    term = terminals(recv_argv())
    port = listening_port(term)
    term.wait_for(lambda s: "waiting for senders" in s and "keys: m mute" in s, 10, "the empty view")
    with FaultProxy("127.0.0.1", port) as proxy:
        tx = sender(proxy.port, 5)
        try:
            # One row for the sender: its address, format and state, and about 50 packets a second.
            term.wait_for(
                lambda s: (
                    "127.0.0.1:" in s
                    and re.search(r"\b(4[6-9]|5[0-4])/s", row_below(s, "127.0.0.1:"))
                    and "48k stereo 20ms" in row_below(s, "127.0.0.1:")
                    and "playing" in s
                ),
                10,
                "the sender's row at 50 packets/s",
            )
            tx.until(lambda d: d["packets_sent"] >= 25, 10, "the stream to run")
            proxy.stall()  # flow control blocks the sender, its backlog overflows: it drops audio
            tx.until(lambda d: d["dropped"] >= 30, 10, "the sender to drop audio")
            proxy.resume()
            summary = tx.until(lambda d: d["event"] == "summary", 15, "the sender's summary")
            assert tx.wait(15) == 0
        finally:
            tx.kill()
    assert summary["dropped"] >= 30 and summary["receiver_lost"] == summary["dropped"]
    want = {
        "packets": str(summary["receiver_packets"]),
        "lost": str(summary["receiver_lost"]),
        "concealed": str(summary["receiver_concealed"]),
    }

    def totals_match(text: str) -> dict[str, str] | None:
        fig = table_figures(text, "total")
        return fig if fig and all(fig[k] == v for k, v in want.items()) else None

    fig = term.wait_for(totals_match, 10, f"the totals row to show {want}")
    # Lost % is of the frames sent: packets received once + lost.
    pct = 100 * summary["receiver_lost"] / (summary["receiver_packets"] + summary["receiver_lost"])
    assert f"{pct:.1f}%" in row_below(term.text(), "total")
    assert fig["kbit/s"]  # shown; its value depends on timing
    term.press("q")
    assert term.exit_status(15) == 0
    screen = term.text()
    assert "tiality recv: summary" in screen
    assert re.search(rf"packets\s+{want['packets']} \(", screen), screen
    assert re.search(rf"lost\s+{want['lost']} \({pct:.1f}% of", screen), screen
    assert "keys:" not in screen  # the live view is gone (transient), the summary replaced it


BLOCK = 1200  # 25 ms at 48 kHz: exactly 11 periods of 440 Hz, so a steady tone's block RMS is constant
STEADY_BLOCKS = 3  # a level change counts once it lasts this long (a concealed frame spans 1 or 2 blocks)


def block_levels_db(audio: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    """RMS level of each whole BLOCK of ``audio`` (channels averaged), dBFS; -inf for digital silence."""
    mono = audio.astype(np.float64).mean(axis=1)
    blocks = mono[: len(mono) // BLOCK * BLOCK].reshape(-1, BLOCK)
    rms = np.sqrt(np.mean(blocks**2, axis=1))
    with np.errstate(divide="ignore"):
        db: npt.NDArray[np.float64] = 20 * np.log10(rms * math.sqrt(2))  # a full-scale sine is 0 dBFS
    return db


def first_steady(db: npt.NDArray[np.float64], cond: npt.NDArray[np.bool_], start: int, what: str) -> int:
    """The first block from ``start`` where ``cond`` holds for STEADY_BLOCKS blocks in a row."""
    for i in range(start, len(cond) - STEADY_BLOCKS + 1):
        if cond[i : i + STEADY_BLOCKS].all():
            return i
    levels = " ".join(f"{x:.1f}" for x in db[start:])
    raise AssertionError(f"{what}: not found from block {start} on; the levels (dBFS) there: {levels}")


def test_keys_mute_and_change_the_volume_and_q_quits(
    terminals: Callable[[list[str]], Terminal], tmp_path: Path
) -> None:
    wav = tmp_path / "heard.wav"
    # Through a shell, to see the terminal settings the receiver leaves behind.
    shell = f"{' '.join(recv_argv(f'file:{wav}'))}; echo tiality exited $?; stty -a"
    term = terminals(["/bin/sh", "-c", shell])
    port = listening_port(term)
    term.wait_for(lambda s: "volume +0 dB" in s, 10, "the view")
    tx = sender(port, 60)  # stopped (SIGINT) once every step has been heard; 60 s is a safety net

    def heard_s() -> float:
        """Seconds of audio in the file so far (its write buffer may hold back up to ~40 ms more)."""
        size = wav.stat().st_size if wav.exists() else 0
        return max(0, size - WavWriter.HEADER_BYTES) / (48_000 * 2 * 2)

    def play_on(what: str, seconds: float = 0.5) -> None:
        """Waits until ``seconds`` more of the stream have been played (written) at the present setting.

        Played, not received: on a busy machine the file sink falls behind and catches up in a burst.
        """
        until = heard_s() + seconds
        wait_until(lambda: heard_s() >= until, 10, f"{seconds:g} s more of the stream at {what}")

    try:
        play_on("+0 dB", 1.0)
        term.press("+")
        term.wait_for(lambda s: "volume +3 dB" in s, 5, "+3 dB")
        play_on("+3 dB")
        term.press("---")
        term.wait_for(lambda s: "volume -6 dB" in s and "MUTED" not in s, 5, "-6 dB")
        play_on("-6 dB")
        term.press("m")
        term.wait_for(lambda s: "MUTED (volume -6 dB)" in s, 5, "MUTED")
        play_on("muted")
        tx.proc.send_signal(signal.SIGINT)
        summary = tx.until(lambda d: d["event"] == "summary", 15, "the sender's summary")
    finally:
        tx.kill()
    packets = str(summary["receiver_packets"])
    term.wait_for(
        lambda s: (table_figures(s, "total") or {}).get("packets") == packets and re.search(r"\b0 live", s),
        10,
        "the stream to end, played to the last frame",
    )
    term.press("q")
    screen = term.wait_for(lambda s: s if "tiality exited" in s and "icanon" in s else None, 15, "stty -a")
    assert "tiality exited 0" in screen
    assert "tiality recv: summary" in screen
    # cbreak mode is undone: the shell's terminal is back to line editing with echo.
    assert re.search(r"(?<![-\w])icanon\b", screen) and re.search(r"(?<![-\w])echo\b", screen), screen
    term.exit_status(10)

    audio, info = read_wav(wav)
    # The whole stream, including what was played muted (the file sink may keep one 5 ms block more
    # or less than whole frames, as test_cli's back-to-back streams show).
    assert abs(info.frames - int(summary["receiver_frames_played"]) * 960) <= 240
    # Where each key took effect, found by level: the tone at +0 dB (after the decoder's first blocks),
    # up 3 dB, down to -6 dB, then digital silence to the end of the file.
    db = block_levels_db(audio)
    start = 4
    base = float(np.median(db[start : start + 8]))
    assert -13.0 < base < -11.0, f"the tone at -12 dBFS, not {base:.1f} dBFS"
    # Thresholds halfway between the settings.
    up = first_steady(db, db > base + 1.5, start, "the tone 3 dB louder (+)")
    down = first_steady(db, db < base - 4.5, up + STEADY_BLOCKS, "the tone at -6 dB (---)")
    mute = first_steady(db, db < -80.0, down + STEADY_BLOCKS, "silence (m)")
    levels = {  # each step's median level, leaving out the block on either side of each change
        "+0 dB": np.median(db[start : up - 1]) - base,
        "+3 dB": np.median(db[up + 1 : down - 1]) - base,
        "-6 dB": np.median(db[down + 1 : mute - 1]) - base,
    }
    found = ", ".join(f"{k} at {v:+.2f} dB" for k, v in levels.items())
    found += f"; changes at blocks {up}, {down}, {mute} of {len(db)} ({BLOCK} samples each)"
    assert min(up - start, down - up, mute - down) >= 16, found  # each setting was heard for 0.4 s or more
    assert abs(levels["+3 dB"] - 3.0) <= 0.5 and abs(levels["-6 dB"] + 6.0) <= 0.5, found
    # Muted: exact zeros from the block after the one the mute fell in to the end (half a second or
    # more was played muted before the sender stopped).
    muted = audio[(mute + 1) * BLOCK :]
    assert len(muted) >= info.sample_rate // 4 and not muted.any(), found


def test_without_a_keyboard_the_view_runs_and_stdin_is_left_alone(
    terminals: Callable[[list[str]], Terminal],
) -> None:
    # stdout is a terminal (live view), stdin is not: no keys are read, no key help is shown.
    term = terminals(["/bin/sh", "-c", f"exec {' '.join(recv_argv())} < /dev/null"])
    listening_port(term)
    term.wait_for(lambda s: "waiting for senders" in s, 10, "the view")
    assert "keys:" not in term.text()
    term.child.kill(signal.SIGINT)
    assert term.exit_status(15) == 0
    assert "tiality recv: summary" in term.text()


def test_send_view_shows_the_link_and_q_stops_with_the_summary(
    terminals: Callable[[list[str]], Terminal],
) -> None:
    rx = subprocess.Popen(
        [*recv_argv(), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=PIPE_ENV
    )
    try:
        assert rx.stderr is not None
        port = int(re.findall(r"port (\d+)", rx.stderr.readline())[0])
        term = terminals([*TIALITY, "send", f"127.0.0.1:{port}", "-i", "tone://440", "--seconds", "20"])

        def link_up(text: str) -> re.Match[str] | None:
            if f"tone://440 → 127.0.0.1:{port}" not in text or not re.search(r"state\s+streaming", text):
                return None
            return re.search(r"receiver RTT\s+(\d+\.\d+) ms", text)

        rtt = term.wait_for(link_up, 15, "the sender's view with the receiver's RTT")
        assert 0 < float(rtt.group(1)) < 100
        term.wait_for(lambda s: re.search(r"packets sent\s+\d{2,}\s+\((4[6-9]|5[0-4])/s", s), 10, "50/s")
        view = term.text()
        assert re.search(r"level dBFS\s+[█▏▎▍▌▋▊▉]+.*-1[2-6]\.\d", view), view  # the tone, -15 dBFS RMS
        assert re.search(r"backlog\s+\d+ ms \(peak \d+, limit 200 ms\)", view), view
        assert "keys: q quit" in view
        term.press("q")
        assert term.exit_status(15) == 0
        screen = term.text()
        sent = int(re.findall(r"packets sent\s+(\d+) \(", screen)[0])
        assert 10 < sent < 20 * 50  # stopped early, by the key
        assert re.search(rf"receiver: packets\s+{sent}\b", screen), screen
        assert re.search(r"receiver: lost\s+0 \(0\.0%\)", screen), screen
    finally:
        rx.send_signal(signal.SIGINT)
        try:
            rx.communicate(timeout=15)
        finally:
            if rx.poll() is None:
                rx.kill()
                rx.wait()


def test_key_reader_delivers_keys_in_cbreak_mode_and_restores_the_terminal() -> None:
    master, slave = os.openpty()
    try:
        before = termios.tcgetattr(slave)
        got: queue.Queue[str] = queue.Queue()
        with KeyReader(got.put, fd=slave):
            during = termios.tcgetattr(slave)
            assert not during[3] & (termios.ICANON | termios.ECHO)  # keys at once, not echoed
            assert during[3] & termios.ISIG  # Ctrl-C still signals
            os.write(master, b"m+q")
            assert [got.get(timeout=5) for _ in range(3)] == ["m", "+", "q"]
        assert termios.tcgetattr(slave) == before
    finally:
        os.close(master)
        os.close(slave)


# ---- the pure pieces ---------------------------------------------------------------------------------------
def _snap(**kw: Any) -> StatsSnapshot:
    base: dict[str, Any] = {f: 0 for f in StatsSnapshot.__dataclass_fields__}
    base.update(jitter_ms=0.5, latency_ms_p50=40.0, latency_ms_p95=45.0, latency_ms_max=60.0)
    base.update(level_dbfs=-20.0, peak_dbfs=-14.0, drift_ppm=0.0, buffer_ms=10.0, target_ms=8.0)
    base.update(kw)
    return StatsSnapshot(**base)


def test_sparkline_scales_buckets_and_keeps_the_newest_last() -> None:
    assert sparkline([0, 1, 2, 3, 4, 5, 6, 7], 8, lo=0, hi=7) == "▁▂▃▄▅▆▇█"
    assert sparkline([1.0, 1.0], 4) == "  ▁▁"  # right-aligned, a flat line sits at the bottom
    assert sparkline([0, 7, 0, 0], 2, lo=0, hi=7) == "█▁"  # buckets show their max
    assert sparkline([math.nan, 3.0], 2, lo=0, hi=3) == " █"
    assert sparkline([], 3) == "   "


def test_level_meter_fills_with_the_level_and_marks_the_peak() -> None:
    text = "".join(t for t, _ in level_meter(-30.0, -6.0, width=8))
    assert text == "████···│ -30.0"  # -30 dBFS: half of -60..0; the peak at -6 dBFS, in the last cell
    styles = {t: s for t, s in level_meter(-1.0, -0.5, width=8)}
    assert "red" in styles.values() and "bold red" in styles.values()
    assert "".join(t for t, _ in level_meter(-120.0, None, width=4)) == "····     -"


def test_volume_steps_are_3_db_and_bounded() -> None:
    assert step_volume_db(0.0, 1) == 3.0
    assert step_volume_db(-1.0, -1) == -3.0  # back on the 3 dB grid
    assert step_volume_db(12.0, 1) == 12.0
    assert step_volume_db(-60.0, -1) == -60.0


def test_narrow_terminals_drop_the_least_important_columns_first() -> None:
    monitor = RecvMonitor(50052, "null://")
    frame = monitor.frame(_snap(packets=10, streams=0), [], streams_started=0, volume_db=0.0, muted=False)
    wide = screen_text(recv_lines(frame, 200)).splitlines()[2]
    assert all(c.title[1] in wide for c in RECV_COLUMNS)
    narrow = screen_text(recv_lines(frame, 80)).splitlines()
    assert all(len(line) <= 80 for line in narrow)
    header = narrow[2]
    assert "drift" not in narrow[1] and "up" not in header.split()  # dropped first
    assert all(name in header for name in ("sender", "packets", "lost", "concealed"))  # kept
