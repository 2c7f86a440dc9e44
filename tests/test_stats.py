"""Levels, dB and rates: the arithmetic every command's figures come from (tiality_cli.stats)."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers.signals import tone
from tiality_cli.cli.view import level_meter, markup
from tiality_cli.stats import (
    SILENCE_DBFS,
    LevelMeter,
    RateMeter,
    Window,
    dbfs,
    frame_levels,
    gain_db,
    levels,
    quantiles,
)

RATE = 48_000


def to_int16(x: npt.NDArray[np.float32]) -> npt.NDArray[np.int16]:
    return np.clip(np.round(x * 32767), -32768, 32767).astype(np.int16)


def test_db_conversions_share_one_floor() -> None:
    assert gain_db(1.0) == 0.0 and gain_db(10.0) == pytest.approx(20.0)
    assert gain_db(0.5) == pytest.approx(-6.0206, abs=1e-4)
    assert gain_db(0.0) == gain_db(1e-6) == SILENCE_DBFS == -120.0
    assert dbfs(32768.0) == 0.0 and dbfs(16384.0) == pytest.approx(-6.0206, abs=1e-4)
    assert dbfs(0.0) == SILENCE_DBFS


def test_levels_in_dbfs() -> None:
    sine = to_int16(tone(1000, 0.1, RATE, level_dbfs=-6.0))
    peak, rms = levels(sine)
    assert peak == pytest.approx(-6.0, abs=0.01)
    assert rms == pytest.approx(-9.01, abs=0.02)  # a sine's RMS is 3 dB below its peak
    assert levels(np.zeros((960, 2), dtype=np.int16)) == (SILENCE_DBFS, SILENCE_DBFS)
    assert levels(np.zeros((0, 2), dtype=np.int16)) == (SILENCE_DBFS, SILENCE_DBFS)
    # The progress meter beside `tiality loopback`'s bars is the live views' meter, as markup.
    assert markup(level_meter(rms, peak, width=10)) == "[yellow]████████[/][bold]│[/][dim]·[/]  -9.0"
    assert markup([("[x]", "bold"), (" y", "")]) == "[bold]\\[x][/] y"  # text is escaped


def test_frame_levels_measure_in_place() -> None:
    frame = np.zeros((960, 2), dtype=np.int16)
    frame[::2, 0] = -32768  # int16's most negative value: a peak of 32768, not an overflow
    frame[1::2, 1] = 16384
    scratch = np.zeros(frame.shape, dtype=np.float32)
    peak, rms = frame_levels(frame, scratch)
    assert peak == 32768
    assert rms == pytest.approx(math.sqrt((32768**2 + 16384**2) / 4), rel=1e-6)
    assert np.array_equal(scratch, frame / 32768.0)  # what the playout engine plays


ALLOCATIONS = """
import tracemalloc
import numpy as np
from tiality_cli.stats import frame_levels
frame = np.ones((960, 2), dtype=np.int16)
scratch = np.zeros(frame.shape, dtype=np.float32)
frame_levels(frame, scratch)
tracemalloc.start()
base = tracemalloc.get_traced_memory()[0]
for _ in range(200):
    frame_levels(frame, scratch)
print(tracemalloc.get_traced_memory()[1] - base)
"""


def test_frame_levels_allocate_no_array() -> None:
    """The audio path's meter: no frame-sized array, no ufunc cast buffer, on any of 200 frames.

    In a fresh interpreter, since tracemalloc counts every thread's allocations (a test session has
    sound-card reader threads). A float32 copy of the frame is 7.7 kB, a ufunc's cast buffer 32 kB.
    """
    done = subprocess.run([sys.executable, "-c", ALLOCATIONS], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) < 4096  # measured: 1.1 kB (Python floats and numpy scalars)


def test_level_meter_keeps_the_latest_frame_and_the_totals() -> None:
    meter = LevelMeter((960, 1))
    loud = to_int16(tone(1000, 0.02, RATE, level_dbfs=-6.0))
    meter.add(loud)
    meter.add(np.zeros((960, 1), dtype=np.int16))
    assert meter.frames == 2
    assert meter.latest_dbfs() == (SILENCE_DBFS, SILENCE_DBFS)
    peak, rms = meter.total_dbfs()
    assert peak == pytest.approx(-6.0, abs=0.01)
    assert rms == pytest.approx(-9.01 - 3.01, abs=0.02)  # half the frames silent: half the power


def test_rates_over_the_last_window_are_the_same_for_every_reader() -> None:
    s = 1_000_000_000
    fast, slow = RateMeter(start_ns=10 * s), RateMeter(start_ns=10 * s)
    # one reader every 20 ms, another once a second, of the same counter: 50 packets a second
    for k in range(1, 151):
        now = 10 * s + k * 20_000_000
        fast_rate = fast.rate(k, now)
        if k % 50 == 0:
            slow_rate = slow.rate(k, now)
            assert fast_rate == pytest.approx(50.0) and slow_rate == pytest.approx(50.0)
    m = RateMeter(window_s=2.0)  # accelerating: 50, 150, 250... per second; the last 2 s count
    for t in range(6):
        rate = m.rate(50 * t * t, t * s)
    assert rate == pytest.approx((50 * 25 - 50 * 9) / 2)  # from t=3 to t=5
    assert RateMeter().rate(5, s) == 0.0  # one reading: no interval yet


@settings(max_examples=300, deadline=None)
@given(
    values=st.lists(
        st.floats(min_value=-1e9, max_value=1e9, allow_nan=False, allow_subnormal=False),
        min_size=1,
        max_size=600,
    ),
    qs=st.lists(st.floats(min_value=0.0, max_value=100.0), min_size=1, max_size=4),
)
def test_quantiles_equal_numpys_percentile_to_the_bit(values: list[float], qs: list[float]) -> None:
    """The stats line's percentiles (one sort, a lookup per figure) are numpy's linear ones exactly."""
    x = np.array(values)
    window = Window(len(values))
    for v in values:
        window.add(v)
    want = [float(np.percentile(x, q)) for q in qs]
    assert quantiles(np.sort(x), tuple(qs)) == want
    assert window.quantiles(*qs) == want


def test_quantiles_of_nothing_are_nan() -> None:
    assert all(math.isnan(v) for v in quantiles(np.zeros(0), (50.0, 95.0)))
    assert all(math.isnan(v) for v in Window(8).quantiles(50.0, 95.0))
