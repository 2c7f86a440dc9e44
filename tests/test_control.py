"""LatencyController on synthetic numbers: arrival times, pull times and sample counts, no audio at all.

``Engine`` stands in for StreamPlayout's bookkeeping (exactly what the controller sees of it): a sink pulls
a 5 ms block every 5 ms; whenever fewer samples are queued than a pull takes, the next frame is "decoded"
and queued, resampled by the controller's ratio, with the slices it asks to insert or drop. Packets arrive
from a sender whose clock may run fast or slow, with seeded jitter.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from tiality_cli.control import (
    DEAD_BAND_NS,
    MAX_STEER,
    Floor,
    JitterWindow,
    LatencyController,
    Schedule,
    SinkTimeline,
    Start,
    TargetPolicy,
)

MS = 1_000_000
S = 1_000_000_000
T = 20 * MS  # frame
RATE = 48_000
FRAME = 960  # samples per frame
BLOCK = 240  # samples per pull
AUTO = TargetPolicy(
    fixed_ns=None,
    max_ns=200 * MS,
    start_ns=10 * MS,
    margin_ns=3 * MS,
    percentile=99.5,
    window=500,
    shrink_ns_per_s=5 * MS,
)


def controller(policy: TargetPolicy = AUTO, resampling: bool = True) -> LatencyController:
    return LatencyController(T, RATE, policy, resampling)


class Engine:
    """The playout engine's bookkeeping around a controller, on a simulated clock."""

    def __init__(self, ctl: LatencyController, ppm: float = 0.0, jitter_ms: float = 2.0, seed: int = 1):
        self.ctl = ctl
        self.ppm = ppm
        self.rng = random.Random(seed)
        self.jitter_ms = jitter_ms
        self.now = 2 * MS  # the sink's phase
        self.sent = 0  # packets sent so far
        self.arrivals: list[tuple[int, int]] = []  # (arrival, k) in flight
        self.highest = -1
        self.next_frame = 0
        self.queued = 0.0
        self.started = False
        self.inserted = self.dropped = 0

    def send_ns(self, k: int) -> int:
        return round(k * T / (1 + self.ppm * 1e-6))

    def step(self) -> None:
        """Delivers what has arrived by now, then pulls one block."""
        while self.send_ns(self.sent) <= self.now:
            delay = round((5 + self.rng.uniform(0, self.jitter_ms)) * MS)
            self.arrivals.append((self.send_ns(self.sent) + delay, self.sent))
            self.sent += 1
        self.arrivals.sort()
        while self.arrivals and self.arrivals[0][0] <= self.now:
            arrival, k = self.arrivals.pop(0)
            self.ctl.on_arrival(k, arrival, k >= self.next_frame)
            self.highest = max(self.highest, k)
        ctl = self.ctl
        if not self.started:
            start = ctl.start(self.now, BLOCK, 0, self.highest) if self.highest >= 0 else None
            if start is not None:
                self.started = True
                self.next_frame = start.frame
                self.queued = -start.offset
        if self.started:
            while self.queued < BLOCK:
                if ctl.insert:
                    self.queued += ctl.insert * ctl.ratio
                    ctl.resampled(ctl.insert, ctl.ratio)
                    ctl.inserted(ctl.insert)
                    self.inserted += 1
                    continue
                n = FRAME
                if ctl.drop and ctl.urgent:
                    ctl.dropped(ctl.drop)
                    n -= ctl.slice
                    self.dropped += 1
                self.queued += n * ctl.ratio
                ctl.resampled(n, ctl.ratio)
                self.next_frame += 1
            self.queued -= BLOCK
            ctl.update(self.now, BLOCK, self.queued, self.next_frame)
        self.now += 5 * MS

    def run(self, seconds: float) -> Engine:
        until = self.now + round(seconds * S)
        while self.now < until:
            self.step()
        return self


# ---- the parts ----------------------------------------------------------------------------------------


def test_floor_is_a_sliding_minimum_reevaluated_on_a_new_schedule() -> None:
    schedule = Schedule(0, 0.0, float(T))
    floor = Floor(4)
    for k, r in enumerate([5, 3, 7, 6, 8, 9]):
        floor.add(k, round(schedule.at(k)) + r * MS, r * MS)
    assert floor.value == 6 * MS  # the last four: 7, 6, 8, 9
    # The sender's clock turns out 1 % slow: its slots are further apart, so every r shrinks, the later
    # ones most (by 0.2 ms a frame); the window is evaluated afresh on the new schedule: 6.6, 5.4, ...
    schedule.pivot(0, T * 1.01)
    floor.rebuild(schedule)
    assert floor.value == round(6 * MS - 3 * T * 0.01)


def test_the_jitter_percentile_never_rests_on_the_single_largest_sample() -> None:
    rng = random.Random(2)
    window = JitterWindow(500)
    for _ in range(100):
        window.add(rng.uniform(0, 4 * MS))
    plain = window.percentile(99.5)
    window.add(150 * MS)  # the first packet after a freeze
    assert plain <= window.percentile(99.5) <= 4 * MS
    for _ in range(3):  # four such delays in 104 samples: that is jitter, and it counts
        window.add(150 * MS)
    assert window.percentile(99.5) == 150 * MS


def test_the_sink_timeline_ignores_late_wakeups() -> None:
    rng = random.Random(3)
    timeline = SinkTimeline(RATE)
    worst = 0.0
    for i in range(1000):
        due = 1_000 * MS + i * 5 * MS
        late = rng.uniform(0, 3 * MS) if i % 50 != 25 else 40 * MS  # now and then a 40 ms stall
        error = timeline.due(round(due + late), BLOCK) - due
        worst = max(worst, error) if i >= 100 else worst  # once it has seen half a second of pulls
    assert worst < 0.2 * MS  # the lower envelope: the sink's own sample clock, not its wake-ups


# ---- the start ------------------------------------------------------------------------------------


def test_a_clean_start_waits_for_the_target_then_puts_the_first_sample_on_it() -> None:
    ctl = controller()
    ctl.on_arrival(0, 6 * MS, True)  # frame 0 (sent at 0) arrives after 6 ms; the target is 10 ms
    assert ctl.start(10 * MS, BLOCK, 0, 0) is None  # its moment (16 ms) is beyond this block
    start = ctl.start(12 * MS, BLOCK, 0, 0)  # ... and within this one: 4 ms of silence first
    assert start == Start(0, -4 * RATE // 1000)
    # Exact mode starts at the first pull past the moment, on a frame.
    exact = controller(resampling=False)
    exact.on_arrival(0, 6 * MS, True)
    assert exact.start(12 * MS, BLOCK, 0, 0) is None
    assert exact.start(17 * MS, BLOCK, 0, 0) == Start(0, 0)


def test_a_start_burst_enters_the_frame_that_has_waited_the_target() -> None:
    # Frames 0-7 (sent every 20 ms) all arrive at 145 ms: the capture device's start-up.
    ctl = controller()
    for k in range(8):
        ctl.on_arrival(k, 145 * MS, True)
    # Frame 7 arrived 5 ms after it was sent: that is the floor. At the next pull (147.5 ms), what
    # would play on target (10 ms) is 62.5 % into frame 6: playback starts there, frames 0-5 and the
    # first 12.5 ms of frame 6 are stale.
    assert ctl.start(int(147.5 * MS), BLOCK, 0, 7) == Start(6, 600)
    assert len(ctl.jitter) == 0  # the burst was not taken for jitter


# ---- steering -------------------------------------------------------------------------------------


def test_steps_and_the_phase_term_answer_the_error() -> None:
    e = Engine(controller(), jitter_ms=0.01).run(3.0)
    ctl = e.ctl
    assert abs(ctl.error_ns) <= DEAD_BAND_NS and ctl.steer == 0.0  # B at rest, within the band
    base, now = e.queued - ctl.error_ns * RATE / S, e.now - 5 * MS  # the last update's, B on target

    def at(err_ms: float) -> None:  # the same pull again, with more or fewer samples queued
        ctl.update(now, BLOCK, base + err_ms * RATE / 1000, e.next_frame)
        assert ctl.error_ns == pytest.approx(err_ms * MS, abs=0.1 * MS)

    at(1.5)  # in the dead band (2 ms over, 1 ms short): nothing moves
    assert (ctl.insert, ctl.drop, ctl.steer) == (0, 0, 0.0)
    at(-0.8)
    assert (ctl.insert, ctl.drop, ctl.steer) == (0, 0, 0.0)
    at(-2.0)  # short beyond the band: slower, 0.2 % per ms beyond it
    assert ctl.insert == 0 and ctl.steer == pytest.approx(-0.002)
    at(-3.5)  # 3 ms short: a slice of concealment at the next frame boundary as well
    assert ctl.insert == ctl.slice == 120 and ctl.steer == -MAX_STEER
    at(3.0)  # over beyond the band: faster
    assert (ctl.insert, ctl.drop) == (0, 0) and ctl.steer == pytest.approx(0.002)
    at(5.0)  # a slice over the band: drop one at the next quiet point
    assert (ctl.drop, ctl.urgent) == (120, False) and ctl.steer == MAX_STEER
    at(11.0)  # far over: drop even where it is not quiet
    assert (ctl.drop, ctl.urgent) == (120, True)
    ctl.dropped(120)
    assert (ctl.drop, ctl.urgent) == (0, False)


def test_b_is_brought_back_to_the_band_not_beyond() -> None:
    # B starts on the start target (10 ms); the first jitter figures (0-6 ms) move the target to about
    # 6 + 3 + 5 ms, B is short by more than the band, and the phase term brings it back to the band's
    # short edge, where the ratio is left alone again.
    e = Engine(controller(), jitter_ms=6.0).run(0.5)
    assert e.ctl.error_ns < -2 * MS and e.ctl.steer < 0
    e.run(4.5)
    assert -1.1 * MS < e.ctl.error_ns < -0.9 * MS and abs(e.ctl.steer) < 0.0002
    assert e.inserted == e.dropped == 0


@pytest.mark.parametrize("ppm", [300.0, -500.0])
def test_the_drift_loop_finds_the_sender_clock_from_arrivals_alone(ppm: float) -> None:
    e = Engine(controller(), ppm=ppm, jitter_ms=4.0).run(90.0)
    estimate = e.ctl.drift.estimate * 1e6
    assert abs(estimate - ppm) < 5.0
    assert abs(e.ctl.error_ns) < DEAD_BAND_NS + 0.5 * MS
    assert e.inserted == e.dropped == 0


def test_without_drift_the_ratio_stays_exactly_one() -> None:
    # A link whose jitter the start target already covers: B never leaves the band, nothing is measured,
    # and the audio's timeline is exact.
    e = Engine(controller(), jitter_ms=2.0).run(60.0)
    assert e.ctl.drift.estimate == 0.0 and e.ctl.steer == 0.0 and e.ctl.ratio == 1.0
    assert e.ctl.drift.measurements == 0


def test_a_freeze_backlog_counts_once_as_jitter_in_any_order() -> None:
    ctl = controller()
    ctl.on_arrival(0, 5 * MS, True)
    ctl.start(15 * MS, BLOCK, 0, 0)
    for k in range(1, 50):
        ctl.on_arrival(k, k * T + 5 * MS, True)
    n = len(ctl.jitter)
    # Nothing for 150 ms, then the 8 packets held arrive together, shuffled.
    held = list(range(50, 58))
    random.Random(4).shuffle(held)
    for i, k in enumerate(held):
        ctl.on_arrival(k, 58 * T + 5 * MS + i * 10_000, True)
    assert len(ctl.jitter) == n + 1
    assert ctl.jitter.percentile(100.0) <= 4 * MS  # the single largest is never the percentile
    assert np.isclose(max(ctl.jitter._buf[: len(ctl.jitter)]), 8 * T, atol=0.1 * MS)
