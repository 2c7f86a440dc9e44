"""End-to-end latency on the virtual sound card, against the devices' own floor; writes docs/performance.md.

    .venv/bin/python -m benchmarks.latency [--frames 10,20] [--runs 10] [--seconds 10] [--no-write]
    make bench

For each frame size a click train over a quiet pilot tone is played into the virtual mic and timed,
alternately, ``--runs`` times each way:

    e2e     tiality send 127.0.0.1:PORT --frame-ms F  ->  tiality recv --port 0: the commands as a user
            runs them, at their defaults (the default input and output are the card's mic and speaker)
    freeze  e2e, with the sender frozen for 300 ms (SIGSTOP, SIGCONT) mid-run: how fast it recovers
    floor   the same devices opened the same way (capture period F, the receiver's playback blocks), the
            captured samples handed straight to the output: no codec, no network, no jitter buffer.
            It starts playing with the first frame, drops any excess the devices' start-up left queued,
            and waits longer only when the output would otherwise run dry (class Passthrough): the
            least latency these devices allow.

The signal plays from before the programs start, so the first clicks measure the start-up; "missing"
counts only clicks that went in after the first one came out. A dropout is a 10 ms block in which the
pilot tone (300 Hz, -34 dBFS) falls 10 dB below its median in the speaker recording.

Clicks are timed where they enter the ``mic`` sink and where they leave the ``spk`` sink: both monitors
are recorded, and each recording is placed on the wall clock from when its blocks arrive (a null sink
hands a block to its monitor as it starts rendering it; the earliest arrival relative to a block's start
is the recording's first sample, to about half a millisecond). Each click is then matched by
cross-correlation. Per run: median and 95th percentile of the clicks' latencies, and clicks that never
came out; per configuration the median over runs (the machine is noisy), and overhead = e2e - floor.

The table goes between the markers in docs/performance.md (the rest of that file is prose and is kept).
``--passthrough`` runs the floor's passthrough itself (this module starts it as a subprocess).
"""

from __future__ import annotations

import argparse as _argparse
import datetime as _datetime
import json as _json
import os as _os
import platform as _platform
import signal as _signal
import sys as _sys
import threading as _threading
import time as _time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from benchmarks.machine import cpu_name, run_text, tiality_version
from tests.helpers.processes import WAIT_S, Proc, StampedRecorder
from tests.helpers.signals import click_train, detect_clicks
from tests.helpers.soundcard import RATE, VirtualSoundCard, start_sound_card

ROOT = Path(__file__).resolve().parent.parent

DOC = ROOT / "docs" / "performance.md"
BEGIN, END = "<!-- latency.py: begin -->", "<!-- latency.py: end -->"
CLICK_PERIOD_S = 0.3  # longer than any latency measured, so a click cannot be matched to its neighbour
CLICK_THRESHOLD = 0.15  # clicks peak at -6 dBFS (0.5); Opus keeps them well above this
MATCH_WINDOW_S = 0.25  # a click must come out within this long of going in, or it counts as missing
TAIL_S = 0.5  # speaker audio recorded after the last click before the programs are stopped
PILOT_HZ = 300.0  # under the clicks, so that a gap in the audio shows even between clicks
PILOT_DBFS = -34.0  # below the passthrough's QUIET level, so the floor can still trim
DROPOUT_DB = 10.0  # a 10 ms block this far below the pilot's median level is a dropout
STARTUP_S = 1.0  # "start-up": clicks within this long of the first one out; "steady": after STEADY_S
STEADY_S = 3.0
FREEZE_AT_S = 4.0  # the freeze run stops the sender this long after its first click came out ...
FREEZE_S = 0.3  # ... for this long
MAX_RUN_MS = 100.0  # no run's median may exceed this
QUIET_LOAD = 0.6  # per core: each run waits for the load average to fall below this ...
QUIET_WAIT_S = 60.0  # ... but no longer than this (the load is noted either way)
TARGET_EXTRA_MS = 15.0  # the target: e2e median <= floor median + one frame + 15 ms
RECEIVER_FIELDS = ("buffer_ms", "target_ms", "latency_ms_p50", "late", "concealed", "skipped", "inserted")
# Where the receiver's latency goes (its stats' stages, ms): printed with each run, and with a failed check.
STAGE_FIELDS = tuple(f"stage_{k}_ms" for k in ("capture", "frame", "network", "buffer", "output"))

I16 = npt.NDArray[np.int16]
F64 = npt.NDArray[np.float64]


# ----------------------------------------------------------------------------------------------------
# One run


@dataclass
class RunResult:
    mode: str  # "e2e" or "floor"
    frame_ms: float
    latencies_ms: F64  # one per click that came out
    clicks: int  # clicks that went in
    details: dict[str, Any] = field(default_factory=dict)  # the programs' own figures
    load: float = 0.0  # 1-minute load average when the run started
    times_s: F64 = field(
        default_factory=lambda: np.zeros(0)
    )  # when each timed click went in (s from first out)
    dropouts: int = 0  # pilot-tone dropout events after the stream started
    dropout_ms: float = 0.0
    recovery_s: float = float("nan")  # freeze runs: from SIGCONT to the first click within 10 ms of steady

    def startup_excess(self) -> float:
        """Median latency of the first second's clicks minus the steady median."""
        first = self.latencies_ms[self.times_s < STARTUP_S]
        return float(np.median(first)) - self.steady() if len(first) else float("nan")

    def steady(self) -> float:
        later = self.latencies_ms[self.times_s >= STEADY_S]
        return float(np.median(later)) if len(later) else self.median()

    def worst_after_first_second(self) -> float:
        """The largest |latency - steady| of the clicks from the first second on."""
        later = self.latencies_ms[self.times_s >= STARTUP_S]
        return float(np.max(np.abs(later - self.steady()))) if len(later) else float("nan")

    @property
    def missing(self) -> int:
        return self.clicks - len(self.latencies_ms)

    def median(self) -> float:
        return float(np.median(self.latencies_ms)) if len(self.latencies_ms) else float("nan")

    def p95(self) -> float:
        return float(np.percentile(self.latencies_ms, 95)) if len(self.latencies_ms) else float("nan")


def start_e2e(env: Mapping[str, str], frame_ms: float, input_uri: str, output_uri: str) -> list[Proc]:
    """tiality recv, then tiality send to its port (at their default devices unless told otherwise)."""
    out = ["-o", output_uri] if output_uri else []
    rx = Proc.tiality(["recv", "--port", "0", "--bind", "127.0.0.1", *out, "--once", "--json"], env)
    procs = [rx]
    try:
        inp = ["-i", input_uri] if input_uri else []
        send = ["send", f"127.0.0.1:{rx.port()}", *inp, "--frame-ms", f"{frame_ms:g}", "--json"]
        procs.insert(0, Proc.tiality(send, env))
    except BaseException as exc:
        for p in procs:
            p.kill()
        if isinstance(exc, RuntimeError):
            raise RuntimeError(f"{exc}; {procs[0].name}: {procs[0].describe()}") from None
        raise
    return procs


def start_floor(env: Mapping[str, str], frame_ms: float, input_uri: str, output_uri: str) -> list[Proc]:
    """This module's --passthrough (run from the repository root); returns once it has settled."""
    cmd = [_sys.executable, "-m", "benchmarks.latency", "--passthrough"]
    cmd += ["-i", input_uri or "alsa://default", "-o", output_uri or "sd://default"]
    p = Proc("passthrough", [*cmd, "--frame-ms", f"{frame_ms:g}"], env, cwd=ROOT)
    try:
        p.wait_for("'playing' line", lambda: p.stderr_match(r"passthrough: playing"))
    except BaseException:
        p.kill()
        raise
    return [p]


def measure(
    card: VirtualSoundCard, mode: str, frame_ms: float, seconds: float, input_uri: str, output_uri: str
) -> RunResult:
    """Plays clicks over a pilot tone into the mic through ``mode``'s programs; times every click."""
    env = card.process_env()
    lead_s = 1.0  # the signal starts before the programs, so the first clicks time the start-up
    n_clicks = max(1, round((seconds + lead_s) / CLICK_PERIOD_S))
    clicks = click_train(RATE, CLICK_PERIOD_S, n_clicks, start_s=0.1)
    x = clicks.signal[:, 0].astype(np.float64)
    x += 10 ** (PILOT_DBFS / 20) * np.sin(2 * np.pi * PILOT_HZ * np.arange(len(x)) / RATE)
    pcm = np.round(x * 32767).astype(np.int16)
    mic = StampedRecorder(env, "mic.monitor", channels=1, latency_ms=2).wait_frames(1)
    spk = StampedRecorder(env, "spk.monitor", channels=1, latency_ms=2).wait_frames(1)
    procs: list[Proc] = []
    resumed_ns = 0
    try:
        player = card.play_into_mic(pcm)
        procs = (start_floor if mode == "floor" else start_e2e)(env, frame_ms, input_uri, output_uri)
        if mode == "freeze":
            sender = procs[0]
            sender.wait_for("packets", lambda: any(d["packets_sent"] > 0 for d in sender.json_lines("stats")))
            _time.sleep(FREEZE_AT_S)  # the freeze is the event under test: it happens at a chosen time
            sender.proc.send_signal(_signal.SIGSTOP)
            _time.sleep(FREEZE_S)
            sender.proc.send_signal(_signal.SIGCONT)
            resumed_ns = _time.monotonic_ns()
        if player.wait(WAIT_S + seconds + lead_s) != 0:
            raise RuntimeError("pacat failed to play the clicks into the mic")
        spk.wait_frames(spk.frames + round(TAIL_S * RATE))
        for p in procs:
            p.interrupt()
        summaries = [p.finish() for p in procs]
    finally:
        for p in procs:
            p.kill()
        heard_in, heard_out = mic.stop()[:, 0], spk.stop()[:, 0]
    edges_in, edges_out = np.diff(heard_in.astype(np.float64)), np.diff(heard_out.astype(np.float64))
    went_in = detect_clicks(edges_in / 32768, RATE, CLICK_THRESHOLD, min_gap_s=CLICK_PERIOD_S / 2)
    came_out = detect_clicks(edges_out / 32768, RATE, CLICK_THRESHOLD, min_gap_s=CLICK_PERIOD_S / 2)
    if len(went_in) != len(clicks.onsets):
        raise RuntimeError(f"{len(went_in)} of {len(clicks.onsets)} clicks found in the mic recording")
    offset_ms = (spk.start_ns() - mic.start_ns()) / 1e6
    matched: list[tuple[int, float]] = []
    for onset in went_in:
        later = came_out[(came_out - onset) / RATE * 1000 + offset_ms >= 0]
        if len(later) == 0:
            continue
        lag = click_lag(edges_in, int(onset), edges_out, int(later[0]))
        latency = offset_ms + lag / RATE * 1000
        if 0 <= latency <= MATCH_WINDOW_S * 1000:
            matched.append((int(onset), latency))
    if not matched:
        return RunResult(mode, frame_ms, np.zeros(0), len(went_in))
    first_in = matched[0][0]  # the stream's start: clicks before it never had a chance
    timed = [o for o in went_in if o >= first_in]
    times = np.array([(o - first_in) / RATE for o, _ in matched], dtype=np.float64)
    r = RunResult(mode, frame_ms, np.array([v for _, v in matched], dtype=np.float64), len(timed))
    r.times_s = times
    # Dropouts: the pilot in 10 ms blocks of the speaker recording, from the first click out to the end.
    start = max(0, int(first_in + matched[0][1] * RATE / 1000 - offset_ms * RATE / 1000))
    # ... to where the signal ends in the speaker: a period after the last click, less a margin (the pilot
    # stops with the signal; that is no dropout)
    last_in, last_ms = matched[-1]
    end = int(last_in + (last_ms - offset_ms) * RATE / 1000 + (CLICK_PERIOD_S - 0.05) * RATE)
    end = min(end, len(heard_out) - round(TAIL_S * RATE))
    r.dropouts, r.dropout_ms = pilot_dropouts(heard_out[start:end])
    if mode == "freeze":
        wall_resume_s = (resumed_ns - mic.start_ns()) / 1e9 - first_in / RATE
        base = float(np.median(r.latencies_ms[(times > 1.0) & (times < FREEZE_AT_S)]))
        ok = (times > wall_resume_s) & (np.abs(r.latencies_ms - base) <= 10.0)
        r.recovery_s = float(times[ok][0] - wall_resume_s) if ok.any() else float("inf")
    if mode != "floor":
        sent, received = summaries
        r.details = {k: received[k] for k in (*RECEIVER_FIELDS, *STAGE_FIELDS)} | {
            "backlog_ms": sent["backlog_ms"],
            "capture_dropped_ms": sent.get("capture_dropped_ms", 0.0),
        }
    else:
        r.details = {k: v for k, v in summaries[0].items() if k != "event"}
    return r


def pilot_dropouts(x: I16) -> tuple[int, float]:
    """Dropout events (runs of 10 ms blocks whose pilot level falls DROPOUT_DB below its median) and ms."""
    block = RATE // 100
    n = len(x) // block
    if n < 10:
        return 0, 0.0
    blocks = x[: n * block].astype(np.float64).reshape(n, block)
    t = np.arange(block) / RATE
    ref = np.exp(-2j * np.pi * PILOT_HZ * t)
    level = np.abs(blocks @ ref) / block
    low = level < np.median(level) * 10 ** (-DROPOUT_DB / 20)
    events = int(np.count_nonzero(low[1:] & ~low[:-1]) + int(low[0]))
    return events, float(np.count_nonzero(low) * 10)


def click_lag(went_in: F64, onset_in: int, came_out: F64, onset_out: int) -> float:
    """Samples from a click in the mic recording to its copy in the speaker recording (parabolic peak).

    The detected onsets are within a millisecond or two (Opus smears the first sample of a click); a
    cross-correlation of 10 ms around them settles where the copy really is.
    """
    ms = RATE // 1000
    a = went_in[max(0, onset_in - 2 * ms) : onset_in + 8 * ms].astype(np.float64)
    start = max(0, onset_out - 5 * ms)
    b = came_out[start : onset_out + 15 * ms].astype(np.float64)
    if len(a) == 0 or len(b) < len(a):
        return float(onset_out - onset_in)
    xc = np.correlate(b, a, mode="valid")  # xc[k] = sum a[n] * b[n + k]
    k = int(np.argmax(xc))
    frac = 0.0
    if 0 < k < len(xc) - 1:
        y0, y1, y2 = xc[k - 1], xc[k], xc[k + 1]
        if y0 - 2 * y1 + y2 < 0:
            frac = float(0.5 * (y0 - y2) / (y0 - 2 * y1 + y2))
    return start + k + frac - max(0, onset_in - 2 * ms)


# ----------------------------------------------------------------------------------------------------
# The floor: capture handed straight to playback


class Passthrough:
    """A sample FIFO from the capture loop to the output's ``fill``, kept as short as the devices allow.

    Playback starts with the first captured frame. A capture device can start with a burst (the pulse
    plugin hands over 60-80 ms at once), which would stay in the FIFO as latency for good: so every
    TRIM_S the smallest fill level an output block found is measured, and all but one block of it is
    dropped (while the audio there is quiet, so no click is cut). When the output finds too few samples
    it plays what there is, then silence (counted as starved), and the delay grows by that much.
    """

    TRIM_S = 0.5
    QUIET = 1000  # int16: the clicks peak at 16384, the silence between them is 0

    def __init__(self, channels: int) -> None:
        self.ring = np.zeros((RATE, channels), dtype=np.int16)  # one second: far more than is ever queued
        self.written = self.read = 0
        self.playing = False
        self.starved = 0
        self.trimmed = 0  # samples dropped
        self.trims = 0  # trim windows completed
        self.block = 0  # the output's block, as last seen
        self._lowest = len(self.ring)  # fewest samples an output block found in this window
        self._lock = _threading.Lock()

    def fill(self, buf: I16) -> bool:
        n = len(buf)
        with self._lock:
            avail = self.written - self.read
            if not self.playing:
                if avail == 0:
                    buf.fill(0)
                    return False
                self.playing = True
            self.block = n
            self._lowest = min(self._lowest, avail)
            take = min(n, avail)
            self._copy_out(buf, take)
            buf[take:] = 0
            if take < n:
                self.starved += 1
        return take > 0

    def push(self, frame: I16) -> None:
        n, size = len(frame), len(self.ring)
        with self._lock:
            pos = self.written % size
            first = min(n, size - pos)
            self.ring[pos : pos + first] = frame[:first]
            self.ring[: n - first] = frame[first:]
            self.written += n

    def trim(self) -> None:
        """Drops the excess this window showed, if the audio to drop is quiet; starts a new window."""
        with self._lock:
            excess = self._lowest - self.block
            if self.playing and excess > 0:
                dropped = np.zeros((excess, self.ring.shape[1]), dtype=np.int16)
                self._copy_out(dropped, excess, advance=False)
                if int(np.abs(dropped.astype(np.int32)).max()) < self.QUIET:
                    self.read += excess
                    self.trimmed += excess
            if self.playing:
                self.trims += 1
            self._lowest = len(self.ring)

    def _copy_out(self, out: I16, count: int, advance: bool = True) -> None:
        pos = self.read % len(self.ring)
        first = min(count, len(self.ring) - pos)
        out[:first] = self.ring[pos : pos + first]
        out[first:count] = self.ring[: count - first]
        if advance:
            self.read += count


def passthrough(input_uri: str, output_uri: str, frame_ms: float, seconds: float) -> int:
    """Runs input -> output through a Passthrough until SIGINT/SIGTERM; prints a JSON summary.

    The source is opened as ``tiality send`` opens it (frames of ``frame_ms``), the sink as ``tiality
    recv`` opens it (its default device format). "playing" goes to stderr after the first trim.
    """
    from tiality_cli.config import AudioFormat, frame_us_from_ms
    from tiality_cli.io.sinks import open_sink
    from tiality_cli.io.sources import open_source

    source = open_source(input_uri, AudioFormat(frame_us=frame_us_from_ms(frame_ms)))
    sink = open_sink(output_uri, AudioFormat())
    fifo = Passthrough(source.format.channels)
    frame = np.zeros((source.format.frame_samples, source.format.channels), dtype=np.int16)
    stop = _threading.Event()
    for signum in (_signal.SIGINT, _signal.SIGTERM):
        _signal.signal(signum, lambda *_: stop.set())
    source.open()
    sink.start(fifo.fill)
    deadline = _time.monotonic() + seconds
    next_trim = _time.monotonic() + Passthrough.TRIM_S
    try:
        while not stop.is_set() and _time.monotonic() < deadline:
            if source.read(frame) is None:
                break
            fifo.push(frame)
            if _time.monotonic() >= next_trim:
                next_trim += Passthrough.TRIM_S
                fifo.trim()
                if fifo.trims == 1:
                    print(f"passthrough: playing {input_uri} -> {output_uri}", file=_sys.stderr, flush=True)
    finally:
        source.close()
        sink.close()
    summary = {
        "event": "summary",
        "starved": fifo.starved,
        "trimmed_ms": round(fifo.trimmed / RATE * 1000, 1),
        "queued_ms": round((fifo.written - fifo.read) / RATE * 1000, 1),
        "underruns": sink.underruns,
        "overruns": source.overruns,
    }
    print(_json.dumps(summary), flush=True)
    return 0


# ----------------------------------------------------------------------------------------------------
# Many runs, the table, the document


@dataclass
class Row:
    frame_ms: float
    e2e: list[RunResult]
    floor: list[RunResult]
    freeze: list[RunResult] = field(default_factory=list)

    @staticmethod
    def _median_of(runs: list[RunResult], what: Callable[[RunResult], float]) -> float:
        # A run in which no click came out (a device that never started) has no latency to count.
        values = [v for v in (what(r) for r in runs) if not np.isnan(v)]
        return float(np.median(values)) if values else float("nan")

    @property
    def e2e_median(self) -> float:
        return self._median_of(self.e2e, RunResult.median)

    @property
    def e2e_p95(self) -> float:
        return self._median_of(self.e2e, RunResult.p95)

    @property
    def floor_median(self) -> float:
        return self._median_of(self.floor, RunResult.median)

    @property
    def floor_p95(self) -> float:
        return self._median_of(self.floor, RunResult.p95)

    @property
    def overhead(self) -> float:
        return self.e2e_median - self.floor_median

    @property
    def budget(self) -> float:
        return self.frame_ms + TARGET_EXTRA_MS

    def missing(self, runs: list[RunResult]) -> str:
        return f"{sum(r.missing for r in runs)} of {sum(r.clicks for r in runs)}"

    def receiver(self, key: str) -> float:
        return float(np.median([float(r.details[key]) for r in self.e2e]))


def table(rows: list[Row]) -> list[str]:
    lines = [
        "| frame | floor median | e2e: median of run medians | e2e p95 | worst run median | budget: floor + "
        "frame + 15 ms | runs within budget | runs over 100 ms | missing clicks | dropouts |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        limit = r.floor_median + r.budget
        medians = [x.median() for x in r.e2e]
        within = sum(m <= limit for m in medians)
        over = sum(m > MAX_RUN_MS for m in medians)
        lines.append(
            f"| {r.frame_ms:g} ms | {r.floor_median:.1f} ms | {r.e2e_median:.1f} ms | {r.e2e_p95:.1f} ms "
            f"| {max(medians):.1f} ms | {limit:.1f} ms | {within} of {len(medians)} | {over} "
            f"| {r.missing(r.e2e)} | {sum(x.dropouts for x in r.e2e)} "
            f"({sum(x.dropout_ms for x in r.e2e):g} ms) |"
        )
    lines += [
        "",
        "Every e2e run, sorted by its median click latency (ms), and the floor's runs:",
        "",
        "| frame | e2e run medians | floor run medians |",
        "|---:|---|---|",
    ]
    for r in rows:
        e = ", ".join(f"{m:.1f}" for m in sorted(x.median() for x in r.e2e))
        f = ", ".join(f"{m:.1f}" for m in sorted(x.median() for x in r.floor))
        lines.append(f"| {r.frame_ms:g} ms | {e} | {f} |")
    lines += [
        "",
        "Start-up (median over runs): the first second's clicks against the steady latency (clicks after "
        f"{STEADY_S:g} s), the largest deviation from steady after the first second, and the receiver's "
        "corrections. The receiver's latency estimate (capture ADC to speaker DAC, device delays included) "
        "is compared with the clicks' median of the same run.",
        "",
        "| frame | first second - steady | worst after 1 s | receiver's estimate - clicks (range) "
        "| buffer | target "
        "| late | concealed | skipped | inserted | capture dropped |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        deltas = [float(x.details["latency_ms_p50"]) - x.median() for x in r.e2e]
        est = float(np.median(deltas))
        lines.append(
            f"| {r.frame_ms:g} ms | {_med(x.startup_excess() for x in r.e2e):+.1f} ms "
            f"| {_med(x.worst_after_first_second() for x in r.e2e):.1f} ms "
            f"| {est:+.1f} ms ({min(deltas):+.1f} to {max(deltas):+.1f}) "
            f"| {r.receiver('buffer_ms'):.1f} ms | {r.receiver('target_ms'):.1f} ms | {r.receiver('late'):g} "
            f"| {r.receiver('concealed'):g} | {r.receiver('skipped'):g} | {r.receiver('inserted'):g} "
            f"| {r.receiver('capture_dropped_ms'):g} ms |"
        )
    if any(r.freeze for r in rows):
        lines += [
            "",
            f"Freeze: the sender stopped (SIGSTOP) for {FREEZE_S * 1000:g} ms, {FREEZE_AT_S:g} s into the "
            "stream. Recovery: from SIGCONT to the first click within 10 ms of the latency before the "
            "freeze.",
            "",
            "| frame | runs | recovery (each run) | clicks lost | latency after, median | capture dropped |",
            "|---:|---:|---|---:|---:|---:|",
        ]
        for r in rows:
            if not r.freeze:
                continue
            rec = ", ".join(f"{x.recovery_s:.2f} s" for x in r.freeze)
            after = _med(float(np.median(x.latencies_ms[x.times_s > FREEZE_AT_S + 1.5])) for x in r.freeze)
            lost = sum(x.missing for x in r.freeze)
            dropped = _med(float(x.details["capture_dropped_ms"]) for x in r.freeze)
            lines.append(
                f"| {r.frame_ms:g} ms | {len(r.freeze)} | {rec} | {lost} | {after:.1f} ms | {dropped:g} ms |"
            )
    return lines


def _med(values: Iterable[float]) -> float:
    v = [x for x in values if not np.isnan(x)]
    return float(np.median(v)) if v else float("nan")


def _spread(runs: list[RunResult]) -> str:
    medians = [r.median() for r in runs]
    return f"{min(medians):.1f}-{max(medians):.1f}"


def machine_notes() -> list[str]:
    pulse = run_text(["pulseaudio", "--version"])
    load = ", ".join(f"{x:.2f}" for x in _os.getloadavg())
    return [
        f"{cpu_name()}, {_os.cpu_count()} cores, load average {load} at the start (shared with other work); "
        f"Linux {_platform.release()}; "
        f"Python {_platform.python_version()}; {pulse or 'pulseaudio ?'} (private server, null sinks); "
        f"tiality {tiality_version(ROOT)}.",
    ]


def report(rows: list[Row], argv: list[str], seconds: float, runs: int, notes: list[str]) -> list[str]:
    command = " ".join([".venv/bin/python -m benchmarks.latency", *argv]).strip()
    date = _datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return [
        f"Measured {date} with `{command}`: {runs} run(s) of each configuration, {seconds:g} s of clicks "
        f"every {CLICK_PERIOD_S:g} s per run over a {PILOT_HZ:g} Hz pilot tone. `tiality send` and "
        "`tiality recv` at their defaults (default devices, 64 kbit/s, voip, `--latency auto`), as a user "
        "runs them; the signal starts before the programs, so the first clicks time the start-up.",
        "",
        *table(rows),
        "",
        "Machine: " + " ".join(notes),
    ]


def write_doc(block: list[str]) -> None:
    text = DOC.read_text() if DOC.exists() else SKELETON
    if BEGIN not in text or END not in text:
        text = text.rstrip("\n") + f"\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    DOC.write_text(head + BEGIN + "\n" + "\n".join(block) + "\n" + END + tail)


SKELETON = f"""# Performance

## End-to-end latency

Written by `python -m benchmarks.latency` (`make bench`); see its docstring for the method.

{BEGIN}
{END}
"""


def measure_retrying(
    card: VirtualSoundCard, mode: str, frame_ms: float, args: _argparse.Namespace, failures: list[str]
) -> RunResult:
    """measure(), tried up to three times: a program that fails to start on a loaded machine is noted."""
    for attempt in range(3):
        load = wait_for_quiet()
        try:
            r = measure(card, mode, frame_ms, args.seconds, args.input, args.output)
            r.load = load
            return r
        except RuntimeError as exc:
            failures.append(f"{mode} {frame_ms:g} ms: {str(exc)[:200]}")
            print(f"{mode} {frame_ms:g} ms attempt {attempt + 1} failed: {exc}", file=_sys.stderr, flush=True)
    raise RuntimeError(f"{mode} {frame_ms:g} ms failed three times; see above")


def wait_for_quiet() -> float:
    """Waits (up to QUIET_WAIT_S) for the 1-minute load average to fall below QUIET_LOAD per core.

    The machine is shared: a test suite started next to the benchmark stalls both programs for tens of
    milliseconds, which the receiver rightly answers with a larger buffer. Returns the load at the start.
    """
    limit = QUIET_LOAD * (_os.cpu_count() or 1)
    deadline = _time.monotonic() + QUIET_WAIT_S
    while _os.getloadavg()[0] > limit and _time.monotonic() < deadline:
        _time.sleep(1.0)
    return _os.getloadavg()[0]


def run_benchmark(args: _argparse.Namespace, argv: list[str]) -> int:
    frames = [float(f) for f in args.frames.split(",")]
    notes = machine_notes()
    card = start_sound_card()
    # The used-by commands take the default devices: make them the card's mic and speaker.
    card.pactl("set-default-source", "mic.monitor")
    card.pactl("set-default-sink", "spk")
    rows = []
    failures: list[str] = []
    try:
        _os.environ.update(card.env)
        for frame_ms in frames:
            row = Row(frame_ms, [], [])
            plan = [
                (k, m, runs) for k in range(args.runs) for m, runs in (("floor", row.floor), ("e2e", row.e2e))
            ]
            plan += [(k, "freeze", row.freeze) for k in range(args.freeze_runs)]
            for k, mode, runs in plan:
                r = measure_retrying(card, mode, frame_ms, args, failures)
                runs.append(r)
                print(
                    f"{frame_ms:g} ms run {k + 1} {mode:6}: median {r.median():6.1f} ms, "
                    f"p95 {r.p95():6.1f} ms, min {r.latencies_ms.min(initial=np.inf):6.1f}, "
                    f"max {r.latencies_ms.max(initial=-np.inf):6.1f}, missing {r.missing}/{r.clicks}, "
                    f"load {r.load:.2f}  "
                    f"{_json.dumps(r.details)}",
                    flush=True,
                )
            rows.append(row)
    finally:
        card.stop()
    loads = [r.load for row in rows for r in (*row.e2e, *row.floor)]
    notes.append(f"Load average at the start of each run: {min(loads):.2f}-{max(loads):.2f}.")
    if failures:
        notes.append(f"{len(failures)} run(s) failed and were repeated: {'; '.join(failures)}.")
    block = report(rows, argv, args.seconds, args.runs, notes)
    print("\n".join(block))
    if args.write:
        write_doc(block)
        print(f"wrote {DOC.relative_to(ROOT)}")
    ok = all(
        max(x.median() for x in r.e2e) <= min(r.floor_median + r.budget, MAX_RUN_MS)
        and sum(x.missing + x.dropouts for x in r.e2e) == 0
        for r in rows
    )
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    argv = _sys.argv[1:] if argv is None else argv
    parser = _argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--frames", default="10,20", help="frame sizes in ms, comma-separated")
    parser.add_argument("--runs", type=int, default=10, help="runs of each configuration")
    parser.add_argument("--freeze-runs", type=int, default=3, help="runs with a 300 ms sender freeze")
    parser.add_argument("--seconds", type=float, default=10.0, help="clicks per run, in seconds")
    parser.add_argument("-i", "--input", default="", help="capture device (default: send's own default)")
    parser.add_argument("-o", "--output", default="", help="playback device (default: recv's own default)")
    parser.add_argument("--no-write", dest="write", action="store_false", help="leave docs/ alone")
    parser.add_argument("--passthrough", action="store_true", help=_argparse.SUPPRESS)
    parser.add_argument("--frame-ms", type=float, default=20.0, help=_argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.passthrough:
        return passthrough(args.input, args.output, args.frame_ms, 600.0)
    return run_benchmark(args, argv)


if __name__ == "__main__":
    _sys.exit(main())
