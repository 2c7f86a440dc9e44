"""Sinks without a hardware clock (``null://``, ``file:``) pace ``fill`` in real time; when the receiver
falls behind, ``null://`` gives the time up as a sound card does after an underrun, and a file catches up
so that it keeps every sample. Measured on the real sink threads: one fill takes 300 ms (a receiver far
slower than real time for a moment), and the audio written over the run is compared with the wall time."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import numpy.typing as npt

from tiality_cli.config import AudioFormat
from tiality_cli.io.base import ClockedSink
from tiality_cli.io.files import NullSink, WavSink

STALL_S = 0.3
RATE = 48_000


def _run_with_one_slow_fill(sink: ClockedSink) -> tuple[float, float]:
    """Runs the sink for about 1 s with one 300 ms fill; returns (seconds of audio written, wall s)."""
    sink.open(AudioFormat(RATE, 2))
    calls = 0
    started: list[float] = []  # when the second fill ran: the schedule's start

    def fill(buf: npt.NDArray[np.int16]) -> bool:
        nonlocal calls
        calls += 1
        buf[:] = 0
        if calls == 20:
            time.sleep(STALL_S)  # the receiver, slower than real time for a moment
        if calls == 2:
            started.append(time.monotonic())
        return True

    sink.start(fill)
    time.sleep(1.0)
    stop = time.monotonic()
    sink.stop()
    sink.close()
    assert started
    return sink.frames_written / RATE, stop - started[0]


def test_null_gives_the_time_up_after_an_underrun() -> None:
    sink = NullSink()
    audio_s, wall_s = _run_with_one_slow_fill(sink)
    assert sink.underruns == 1  # the slow fill's, and no other
    # The 300 ms were not caught up: about that much less audio than wall time (a block or two of slack
    # at each end, and room for a host stall).
    assert abs((wall_s - audio_s) - STALL_S) < 0.06, (wall_s, audio_s)


def test_a_file_catches_up_and_keeps_every_sample(tmp_path: Path) -> None:
    sink = WavSink(str(tmp_path / "out.wav"))
    audio_s, wall_s = _run_with_one_slow_fill(sink)
    assert sink.underruns == 0
    assert abs(wall_s - audio_s) < 0.06, (wall_s, audio_s)
