"""Capture never lets audio wait in the device: a stalled reader gets fresh frames back, and says so.

A frame's age is (wall clock after read) - (its capture timestamp): one frame when the device hands it
over as soon as it is complete. A reader that stalls for 300 ms (a frozen process) finds 15-30 frames
queued; without Freshness it would go on reading them one per period, 300 ms late for good.
The stall itself is the thing under test, so it is a real sleep; nothing else waits on time.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from tests.helpers.soundcard import VirtualSoundCard
from tiality_cli.clock import SYSTEM_CLOCK
from tiality_cli.config import AudioFormat
from tiality_cli.io.base import Freshness, Source
from tiality_cli.io.sources import open_source

STALL_S = 0.3


def test_freshness_ignores_ordinary_bursts_and_drops_a_persistent_backlog() -> None:
    f = Freshness(period=960)
    # a device that hands over two periods at a time leaves one queued every other read: left alone
    assert [f.excess(b) for b in (960, 0, 960, 0, 1920, 960, 0)] == [0, 0, 0, 0, 0, 0, 0]
    # a backlog of 3 periods or more is stale at once: drop all but the newest period
    assert f.excess(5 * 960) == 4 * 960
    # more than a period for three reads in a row is stale too
    assert [f.excess(b) for b in (1000, 1100, 1200)] == [0, 0, 960]
    assert f.dropped == 5 * 960


@pytest.mark.soundcard
@pytest.mark.parametrize("frame_us", [10_000, 20_000])
@pytest.mark.parametrize("uri", ["alsa://tmic", "sd://tmic"])
def test_capture_is_fresh_after_a_stall(sound_card: VirtualSoundCard, uri: str, frame_us: int) -> None:
    fmt = AudioFormat(48_000, 2, frame_us)
    frame_ms = frame_us / 1000
    src = open_source(uri, fmt)
    buf = np.zeros((fmt.frame_samples, 2), dtype=np.int16)
    wall = SYSTEM_CLOCK.wall_ns
    try:
        src.open()
        opened = wall()
        steady = round(1e6 / frame_us)  # one second of frames
        ages = []
        for _ in range(steady):
            t = src.read(buf)
            assert t is not None
            ages.append((wall() - t) / 1e6)
        dropped_at_start = src.dropped_ns
        # after the first 0.2 s (any start-up burst is dropped there), every frame is one frame old
        settled = ages[round(0.2e6 / frame_us) :]
        assert max(settled) < frame_ms + 5, f"ages {np.round(ages, 1)}"
        time.sleep(STALL_S)  # the reader freezes
        after = []
        for _ in range(10):
            t = src.read(buf)
            assert t is not None
            after.append((wall() - t) / 1e6)
        dropped = (src.dropped_ns - dropped_at_start) / 1e6
        read = steady + 10
        elapsed = (wall() - opened) / 1e6
    finally:
        src.close()
    # within three reads the frames are fresh again; the stale ones were dropped and counted
    assert max(after[3:]) < frame_ms + 5, f"ages after the stall {np.round(after, 1)}"
    assert STALL_S * 1000 - 3 * frame_ms <= dropped <= STALL_S * 1000 + frame_ms
    # and nothing disappeared uncounted: audio read + dropped = the time the device ran
    accounted = read * frame_ms + (dropped + dropped_at_start / 1e6)
    assert abs(accounted - elapsed) < 3 * frame_ms + 5, (accounted, elapsed)


def close_while_reading(src: Source, buf: np.ndarray) -> tuple[bool, list[int | None]]:
    """Two threads close ``src`` while a third reads it, all released at once: (all returned, reads)."""
    got: list[int | None] = []
    start = threading.Barrier(3)

    def reader() -> None:
        start.wait()
        got.append(src.read(buf))
        got.append(src.read(buf))

    def closer() -> None:
        start.wait()
        src.close()

    threads = [threading.Thread(target=f, daemon=True) for f in (reader, closer, closer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return not any(t.is_alive() for t in threads), got


@pytest.mark.soundcard
@pytest.mark.parametrize("uri", ["alsa://tmic", "sd://tmic"])
def test_two_threads_closing_a_running_capture_both_return(sound_card: VirtualSoundCard, uri: str) -> None:
    """A sender's ``stop()`` (the CLI's thread) and the end of its ``run()`` close the source together,
    while the link's thread may be blocked in ``read()``. Every close and read returns, the read with
    None (``sd://`` hung at exit about once in ten ``send`` runs under load: PortAudio's stop and close
    ran on two threads at once)."""
    fmt = AudioFormat(48_000, 2, 20_000)
    buf = np.zeros((fmt.frame_samples, 2), dtype=np.int16)
    for attempt in range(10):
        src = open_source(uri, fmt)
        src.open()
        assert src.read(buf) is not None
        returned, got = close_while_reading(src, buf)
        assert returned, f"{uri}: a close or a read hung (attempt {attempt + 1})"
        assert got[-1] is None  # the reader ended with the source, not with an error
