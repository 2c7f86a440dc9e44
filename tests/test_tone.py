"""tone:// plays from a table of whole periods: the same samples as computing each frame, and cheap."""

from __future__ import annotations

import math
import threading
import time

import numpy as np
import pytest

from tiality_cli.clock import ManualClock, Wake
from tiality_cli.config import AudioFormat
from tiality_cli.io.base import Pacer
from tiality_cli.io.files import ToneSource, whole_period_samples


def frames(src: ToneSource, clock: ManualClock, n: int) -> np.ndarray:
    """``n`` frames read back to back, the manual clock one frame on before each (no waits)."""
    fmt = src.format
    out = np.empty((n * fmt.frame_samples, fmt.channels), np.int16)
    buf = np.empty((fmt.frame_samples, fmt.channels), np.int16)
    src.open()
    for i in range(n):
        clock.advance(fmt.frame_ns)
        assert src.read(buf) is not None
        out[i * fmt.frame_samples : (i + 1) * fmt.frame_samples] = buf
    return out


def test_whole_periods() -> None:
    assert whole_period_samples(440, 48_000, 48_000) == 1200  # 11 periods
    assert whole_period_samples(1000, 48_000, 48_000) == 48
    assert whole_period_samples(997, 48_000, 48_000) == 48_000  # prime: one second
    assert whole_period_samples(997, 48_000, 47_999) is None
    assert whole_period_samples(440.5, 48_000, 48_000) is None  # 2 s of audio


@pytest.mark.parametrize(
    ("freq", "fmt"),
    [
        (440, AudioFormat()),  # 48 kHz stereo, 20 ms
        (997, AudioFormat(16_000, 1, 10_000)),
        (1000, AudioFormat(48_000, 2, 60_000)),  # a frame longer than the period
    ],
)
def test_table_is_sample_exact_with_computing_each_frame(freq: float, fmt: AudioFormat) -> None:
    clocks = ManualClock(), ManualClock()
    table = ToneSource(freq, fmt, clock=clocks[0])
    computed = ToneSource(freq, fmt, clock=clocks[1])
    assert table._table is not None
    computed._table = None  # the per-frame path (frequencies without a short whole period)
    n = round(3.0 * 1e6 / fmt.frame_us)  # 3 s: the table wraps many times
    a, b = frames(table, clocks[0], n), frames(computed, clocks[1], n)
    assert np.array_equal(a, b), int(np.abs(a.astype(int) - b).max())
    k = np.arange(len(a))
    ideal = (np.sin(2 * math.pi * freq * k / fmt.sample_rate) * table._amp).astype(np.int16)
    assert np.array_equal(a[:, 0], ideal)
    assert np.array_equal(a[:, -1], a[:, 0])  # every channel the same


def test_a_frequency_without_a_short_period_is_computed_per_frame_continuously() -> None:
    fmt = AudioFormat()
    clock = ManualClock()
    src = ToneSource(440.5, fmt, clock=clock)
    assert src._table is None
    x = frames(src, clock, 100)[:, 0].astype(float)
    ideal = np.sin(2 * math.pi * 440.5 * np.arange(len(x)) / fmt.sample_rate) * src._amp
    assert np.abs(x - ideal).max() <= 1.0  # truncation to int16 only: no phase jump at frame edges


def test_wake_posts_collapse_and_any_thread_wakes_the_waiter() -> None:
    w = Wake()
    assert w.wait(0.0) is False
    w.post()
    w.post()  # a second post while nobody waits: still one wake-up
    assert w.wait(0.0) is True
    assert w.wait(0.0) is False
    threading.Timer(0.05, w.post).start()
    t0 = time.monotonic()
    assert w.wait(5.0) is True
    assert time.monotonic() - t0 < 2.0


def test_a_stopped_pacer_returns_none_at_once_and_for_every_later_wait() -> None:
    clock = ManualClock()
    p = Pacer(10_000_000_000, clock)  # 10 s frames: only stop() ends the wait
    p.start()
    threading.Timer(0.05, p.stop).start()
    t0 = time.monotonic()
    assert p.wait_next() is None  # woken by stop(), not by the 10 s
    assert time.monotonic() - t0 < 2.0
    p.stop()  # twice: harmless
    for _ in range(3):
        assert p.wait_next() is None
