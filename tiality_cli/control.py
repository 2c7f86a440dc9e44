"""Latency control for one stream: when to start, how far to steer, and the sender's clock rate.

Pure: it is told arrival times and pull times (receiver monotonic ns) and sample counts, and answers
with decisions (start here, this resampling ratio, insert or drop a 2.5 ms slice); it never touches
audio, a decoder or a clock, so it is tested on synthetic numbers (tests/test_control.py) and driven by
``tiality_cli.playout.StreamPlayout``, whose module docstring explains the control as a whole.

Vocabulary (all in receiver time, ns):
  * schedule: s_k, packet k's slot on the sender's schedule as the receiver sees it;
  * r_k = arrival_k - s_k; the floor m = min r over a sliding window; jitter j_k = r_k - m;
  * B, the buffer: (when the first sample of the next frame to decode plays) - (its s + m);
  * target: what B is steered to; err = B - target;
  * steer: the phase term added to the drift estimate in the resampling ratio;
  * a slice: 2.5 ms, the unit of every step correction (Opus conceals any multiple of it).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from tiality_cli.stats import Window

SLICE_NS = 2_500_000  # the shortest Opus frame: every inserted or dropped piece is at most this long
KP = 2.0  # per second: phase gain (1 ms beyond the dead band -> 0.2 % faster or slower; 0.5 s time constant)
DEAD_BAND_NS = 2e6  # B may wander this far over the target before the ratio is bent to steer it,
SHORT_BAND_NS = 1e6  # ... and this far short of it (short risks late packets; over only costs latency)
INSERT_BELOW_NS = 3e6  # B this far short: conceal a slice more at the next frame boundary
DROP_ABOVE_NS = DEAD_BAND_NS + SLICE_NS  # B this far over: drop a slice at the next quiet point
URGENT_ABOVE_NS = 10e6  # this far over (beyond what resampling drains in a second or two): quiet or not
ECONOMY_PATIENCE_NS = 1_000_000_000  # economy: B a step over for this long is cut, quiet or not
# This far over, the excess is a backlog no jitter explains (an output that fell behind, a connect burst
# that held the mixer up): it goes in one cut per frame, of up to all but a slice of it, not a slice a
# frame (which drains a 100 ms backlog in 0.8 s, searching every frame of every stream for where to cut).
CATCH_UP_ABOVE_NS = 20e6
MAX_DRIFT = 0.002  # clamp on the drift estimate: 0.2 % (2000 ppm) is far beyond any sound card
MAX_STEER = 0.005  # clamp on the phase term: 0.5 % (8.6 cents) drains 5 ms a second, inaudibly
FLL_BLOCK_NS = 2_000_000_000  # the drift estimator compares the lowest B in the halves of blocks this long
FLL_MIN_GAIN = 0.02  # its gain falls as 1/n to this floor: it averages, then tracks (a 100 s memory)
FLL_ACQUIRE_BLOCKS = 30  # blocks measured in a row once B first leaves the dead band (averaging the noise)
FLOOR_WINDOW_S = 2.0  # m's window: enough packets to find the floor, and a route change's new one in 2 s
SINK_WINDOW_S = 0.5  # how much of the sink's audio its timeline is fitted over (see SinkTimeline)
SINK_STEP_NS = 1e6  # the fitted offset moving this much at once is a step (an xrun), not the clock's drift
TARGET_EVERY = 8  # packets between two evaluations of the jitter percentile


class Floor:
    """m: the minimum of r_k = arrival_k - s_k over the last ``size`` packets that came in time.

    A sliding-window minimum (a monotone deque, O(1) amortised per packet) over r computed on the current
    schedule; the raw (k, arrival) pairs are kept in a ring too, so that when the schedule pivots to a new
    clock-rate estimate, the whole window is re-evaluated on it and m does not lag behind. The window
    counts arrivals, not sequence numbers: the burst after a stall (late, so left out) does not flush it.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._q: deque[tuple[int, int]] = deque()  # (arrival number, r), r increasing
        self._ring_k = [0] * size
        self._ring_arrival = [0] * size
        self._n = 0

    def add(self, k: int, arrival: int, r: int) -> None:
        n = self._n
        i = n % self.size
        self._ring_k[i], self._ring_arrival[i] = k, arrival
        self._n = n + 1
        q = self._q
        while q and q[-1][1] >= r:
            q.pop()
        q.append((n, r))
        if q[0][0] <= n - self.size:
            q.popleft()

    def rebuild(self, schedule: Schedule) -> None:
        """Re-evaluates the window on a new schedule."""
        q = self._q
        q.clear()
        for n in range(max(0, self._n - self.size), self._n):
            i = n % self.size
            r = int(self._ring_arrival[i] - schedule.at(self._ring_k[i]))
            while q and q[-1][1] >= r:
                q.pop()
            q.append((n, r))

    @property
    def value(self) -> int:
        return self._q[0][1]

    def __bool__(self) -> bool:
        return bool(self._q)


class JitterWindow(Window):
    """The last ``size`` jitter samples, and a percentile of them that ignores the single largest.

    The percentile is taken at the sample below the exact rank ("lower" interpolation): in a window that
    is still filling, interpolating toward the largest sample would let one outlier (the first packet
    after a freeze) lift the target by a large fraction of itself for the window's whole length.
    """

    def raise_last(self, value: float) -> None:
        """Raises the latest sample to ``value`` if that is larger."""
        i = (self._i - 1) % len(self._buf)
        self._buf[i] = max(self._buf[i], value)

    def percentile(self, q: float) -> float:
        n = self._n
        rank = min(n - 2, math.floor(q / 100.0 * (n - 1))) if n >= 2 else 0
        return float(np.partition(self._buf[:n], rank)[rank])


@dataclass(slots=True)
class Schedule:
    """The sender's schedule in receiver time: s_k = start + (k - first) * period."""

    first: int
    start: float
    period: float

    def at(self, k: float) -> float:
        return self.start + (k - self.first) * self.period

    def position(self, t: float) -> float:
        """The (fractional) frame whose slot is at t."""
        return self.first + (t - self.start) / self.period

    def pivot(self, k: int, period: float) -> None:
        """Keeps s_k and changes the period from k on."""
        self.start = self.at(k)
        self.first = k
        self.period = period


class SinkTimeline:
    """When each pull was due on the sink's own timeline: the clock reading, less any lateness.

    A sink thread may wake up late, or stall and then catch up with pulls in a row (a paced file or null
    sink does): ``now`` is then later than the sink's sample clock says, and B, measured from it, too
    large by as much, which would drop audio the catch-up is about to consume anyway. So the timeline is
    fitted from below: now - (samples pulled before) / rate is the sink's offset plus its lateness, and
    its minimum over the last SINK_WINDOW_S of pulled audio is the offset. A device that really slipped
    (an ALSA xrun, restarted later) shows its new offset once that window has passed.
    """

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.pulled = 0  # samples pulled since playout started
        self.offset = math.nan  # the fitted offset: due time - pulled / rate (nan before the first pull)
        self._q: deque[tuple[int, float]] = deque()  # (pulled, now - pulled / rate), increasing

    def due(self, now: int, n: int) -> float:
        """The due time of a pull of ``n`` samples made at ``now``."""
        pulled, q = self.pulled, self._q
        x = now - pulled * 1e9 / self.rate
        while q and q[-1][1] >= x:
            q.pop()
        q.append((pulled, x))
        while q[0][0] < pulled - SINK_WINDOW_S * self.rate:
            q.popleft()
        self.pulled = pulled + n
        self.offset = q[0][1]
        return pulled * 1e9 / self.rate + self.offset


@dataclass(slots=True)
class HalfBlock:
    """One half of a drift-loop block: the lowest output side of u seen in it, and m's mean."""

    lowest: float = math.inf
    floor_sum: float = 0.0
    pulls: int = 0

    def add(self, output_side: float, floor: float) -> None:
        self.lowest = min(self.lowest, output_side)
        self.floor_sum += floor
        self.pulls += 1

    @property
    def level(self) -> float:
        """u in this half: its lowest output side less the mean floor."""
        return self.lowest - self.floor_sum / self.pulls

    def clear(self) -> None:
        self.lowest, self.floor_sum, self.pulls = math.inf, 0.0, 0


class DriftLoop:
    """Frequency-locked loop: estimates the sender's clock rate from B's trend, steering aside.

    B changes at (sender's rate - our consumption) = drift - estimate - steer, so u = B + ``moved_ns``
    (the integral of the steer, + the audio dropped, - the audio inserted) changes at drift - estimate
    only. Each block, the estimate moves by a gain times u's slope between the block's two halves, u
    being taken in each half as the lowest output side o = B + m + moved (a sink thread that wakes up
    late only ever raises it, so its lower envelope ignores scheduling noise, however large) minus the
    mean m (the floor steps both ways as the window slides: a mean does not bias it). The gain is 1/n at
    first (a running average of the measurements), then FLL_MIN_GAIN (an exponential one). Target
    changes and step corrections do not disturb the estimate, unlike an integral of B's error, which
    winds up on each of them. Measuring starts once B first leaves the dead band (so that the phase
    term acts): until then the estimate, and so the ratio, stays put, and on a link without drift the
    audio's timeline is exact. Then FLL_ACQUIRE_BLOCKS blocks in a row count, whatever B does: one
    measurement is noisy (on a link with 4 ms of jitter, m's mean moves by some 20-30 us between the
    halves, 20-30 ppm), and the phase term brings B back inside far sooner than that averages out.
    After that, only blocks in which B left the band count: the estimate holds still while it is good
    enough to keep B inside, and a residual error drives B to the band's edge, where it is measured.
    """

    def __init__(self) -> None:
        self.estimate = 0.0  # the sender's clock rate over ours, minus one
        self.moved_ns = 0.0  # what steering and step corrections did to B
        self.first = HalfBlock()
        self.second = HalfBlock()
        self.block_start = 0  # when the current block began (0: at the next update)
        self.left_band = False  # B left the dead band in the current block
        self.acquiring = -1  # blocks still to be measured in a row (-1: B has not left the band yet)
        self.blocks = 0  # blocks seen since the start or the last restart
        self.measurements = 0  # slopes taken into the estimate

    def restart(self) -> None:
        """Forgets the current block (the schedule restarted); keeps the estimate."""
        self.blocks = 0
        self.block_start = 0
        self.first.clear()
        self.second.clear()
        self.left_band = False

    def update(self, now: int, buffer: float, floor: int, outside: bool) -> float | None:
        """Feeds one pull's B; returns a new estimate when a block ends with a measurement."""
        if self.block_start == 0:
            self.block_start = now
        t = now - self.block_start
        (self.first if t < FLL_BLOCK_NS // 2 else self.second).add(buffer + floor + self.moved_ns, floor)
        self.left_band = self.left_band or outside
        if t < FLL_BLOCK_NS:
            return None
        first, second = self.first, self.second
        complete = first.pulls > 0 and second.pulls > 0
        slope = (second.level - first.level) / (FLL_BLOCK_NS / 2) if complete else 0.0
        # A slope beyond any clock's drift is a step that nothing accounted for (a stall of the sender's
        # capture, say), not a rate: such a block is not measured.
        complete = complete and abs(slope) <= MAX_DRIFT
        if self.left_band and self.acquiring < 0:
            self.acquiring = FLL_ACQUIRE_BLOCKS
        measured, self.left_band = (self.left_band or self.acquiring > 0) and complete, False
        if self.acquiring > 0:
            self.acquiring -= 1
        self.block_start = now
        first.clear()
        second.clear()
        self.blocks += 1
        if self.blocks < 2 or not measured:
            return None  # the first block sees m settle; while B stays in the dead band, nothing needs fixing
        self.measurements += 1
        gain = max(FLL_MIN_GAIN, 1.0 / self.measurements)
        return max(-MAX_DRIFT, min(MAX_DRIFT, self.estimate + gain * slope))


@dataclass(frozen=True, slots=True)
class Start:
    """Where playback starts: at frame ``frame``, ``offset`` samples into it (negative: that many samples
    of silence before it, so that it starts between two pulls)."""

    frame: int
    offset: int


@dataclass(frozen=True, slots=True)
class TargetPolicy:
    """How the target for B is chosen (built from PlayoutConfig by the playout engine)."""

    fixed_ns: float | None  # None: auto, from the jitter percentile
    max_ns: float
    start_ns: float  # auto mode's target before any jitter has been seen
    margin_ns: float  # added to the percentile (the FEC frame included)
    percentile: float
    window: int  # jitter samples the percentile looks at
    shrink_ns_per_s: float


class LatencyController:
    """Turns arrivals and pulls into a target for B, B itself, and what to do about the difference.

    ``on_arrival`` per packet, ``start`` at each pull until playback starts, ``update`` after each pull
    that decoded and ``tick`` after each other one that played; between updates the engine reads
    ``ratio``, ``insert`` and ``drop`` and reports what it did with ``inserted``/``dropped``.
    ``resampling`` False: no ratio to bend (exact samples out), so the start is frame-aligned and only
    step corrections steer.
    """

    def __init__(self, frame_ns: int, rate: int, policy: TargetPolicy, resampling: bool) -> None:
        self.frame_ns = frame_ns
        self.rate = rate
        self.policy = policy
        self.resampling = resampling
        # The target holds a block more when playback starts mid-frame (resampling); kept when the stream
        # turns to exact mode later (StreamPlayout.set_resampling), whose frames stay where they were.
        self.block_margin = resampling
        self.frame_samples = rate * frame_ns // 1_000_000_000
        self.slice = rate * SLICE_NS // 1_000_000_000  # samples at the output rate
        floor_size = max(8, min(policy.window, int(FLOOR_WINDOW_S * 1e9 / frame_ns)))
        self.floor = Floor(floor_size)
        self.jitter = JitterWindow(policy.window)
        self.schedule = Schedule(0, 0.0, float(frame_ns))
        self.sink = SinkTimeline(rate)
        self._offset_seen = math.nan  # the sink's fitted offset at the last update
        self._floor_seen = 0.0  # ... and the floor, B's state beyond it, and the frame it was measured to
        self._outside = False
        self._next_frame = -1
        self.drift = DriftLoop()
        self._last_arrival = 0
        self._clump_sampled = False  # the current clump of arrivals has its jitter sample
        self._since_percentile = 0
        self._percentile_ns = 0.0  # the jitter percentile, as last evaluated
        self._last_update: int | None = None
        self._started: int | None = None  # when playback started
        fixed = policy.fixed_ns
        self.desired_ns = fixed if fixed is not None else min(policy.start_ns, policy.max_ns)
        self.target_ns = self.desired_ns
        self.buffer_ns = 0.0
        self.error_ns = 0.0
        self.steer = 0.0  # the phase term in the ratio
        self.steered_ns = 0.0  # what the phase term has moved B by (+: lowered it)
        # Decisions for the next frame boundary (each taken at most once per update):
        self.insert = 0  # samples of concealment to add before the next frame
        self.drop = 0  # samples to drop from the next frame: a slice at a quiet point, or more (a catch-up)
        self.urgent = False  # drop even if the frame has no quiet point
        self.economy = False  # resampling turned off to save CPU (StreamPlayout.set_resampling)
        self._over_since = 0  # economy: since when B has been a step over (0: it is not)

    # ---- arrivals -------------------------------------------------------------------------------------
    def on_arrival(self, k: int, arrival: int, in_time: bool) -> None:
        """Packet k arrived at ``arrival``; a late one (``in_time`` False) cannot be the earliest."""
        r = int(arrival - self.schedule.at(k))
        if in_time:
            self.floor.add(k, arrival, r)
        j = r - self.floor.value
        # A clump (packets arriving on each other's heels, less than a quarter frame apart) was held up
        # together: head-of-line blocking behind a delayed packet, or a backlog sent at once after a
        # freeze, in any order. Their delays are one event, the longest of them: one sample, which the
        # clump's later packets raise rather than add to. Before playback starts, the floor is still
        # being found (a start-up burst would look like jitter of its own length): it does not count.
        clump = arrival - self._last_arrival < self.frame_ns // 4
        self._last_arrival = arrival
        if self._started is None or j > self.policy.max_ns:  # longer: an outage, not jitter
            return
        if clump and self._clump_sampled:
            self.jitter.raise_last(float(j))
        else:
            self.jitter.add(float(j))
            self._since_percentile += 1
        self._clump_sampled = True
        if j > self._percentile_ns:  # it may raise the target: look again at the next update, not later
            self._since_percentile = max(self._since_percentile, TARGET_EVERY)

    def refresh_target(self) -> None:
        """Re-evaluates the jitter percentile at the next update (after a policy change)."""
        self._since_percentile = max(self._since_percentile, TARGET_EVERY)

    def resync(self, k: int, arrival: int) -> None:
        """The sequence restarted at k, arriving at ``arrival``: a new schedule and floor."""
        self.floor = Floor(self.floor.size)
        self.schedule = Schedule(k, float(arrival), self.schedule.period)
        self._last_arrival = 0
        self._clump_sampled = False
        self.drift.restart()

    # ---- the start ------------------------------------------------------------------------------------
    def start(self, now: int, block: int, first: int, last: int) -> Start | None:
        """Whether to start playing now, and where: None to wait.

        The position to play now is the one for which B would be the target. Before it reaches the first
        frame held, wait; when it falls within this block, start with as much silence as puts the first
        frame's first sample exactly there (resampling only: exact mode starts on the nearest pull). Past
        the first frame (a start-up burst of old frames, or a sink that began late), start inside the
        frame it falls in: what comes before is stale, and would only have to be drained.
        """
        if not self.floor:
            return None
        x = self.schedule.position(now - self.floor.value - self.target_ns)
        if x < first:
            ahead = round((first - x) * self.frame_samples)
            if not self.resampling:
                # Exact mode starts on a pull, with no silence before the first frame: on this one when
                # that leaves B less than half a block short of the target, else on the next (less than
                # half a block over). Either way no 2.5 ms step follows.
                if 2 * ahead >= block:
                    return None
                self._started = now
                return Start(first, 0)
            if ahead >= block:
                return None
            self._started = now
            return Start(first, -ahead)
        self._started = now
        if x >= last + 1:  # nothing newer than the last frame held: start at it
            return Start(last, 0)
        k = math.floor(x)
        offset = round((x - k) * self.frame_samples) if self.resampling else 0
        return Start(k, min(offset, self.frame_samples - 1))

    # ---- steering -------------------------------------------------------------------------------------
    def update(self, now: int, block: int, queued: float, next_frame: int) -> None:
        """After a pull of ``block`` samples made at ``now``: ``queued`` output samples (a float: those
        still in the resampler count as fractions) come before the first sample of ``next_frame``."""
        if not self.floor:
            return
        policy = self.policy
        dt = (now - self._last_update) / 1e9 if self._last_update is not None else 0.0
        self._last_update = now
        # Target: percentile of jitter + margin, fast up, slow down (auto mode only).
        if policy.fixed_ns is None and self._since_percentile >= TARGET_EVERY and len(self.jitter) >= 8:
            self._since_percentile = 0
            self._percentile_ns = self.jitter.percentile(policy.percentile)
            desired = self._percentile_ns + policy.margin_ns
            if self.block_margin:  # a frame's decode deadline may fall a block before its play
                desired += block * 1e9 / self.rate
            self.desired_ns = min(desired, policy.max_ns)
        if self.desired_ns >= self.target_ns:
            self.target_ns = self.desired_ns
        else:
            self.target_ns = max(self.desired_ns, self.target_ns - policy.shrink_ns_per_s * dt)
        # B: when does next_frame's first sample play (after this block and the queue), relative to its
        # earliest possible arrival?
        t = self.sink.due(now, block)
        offset, self._offset_seen = self._offset_seen, self.sink.offset
        step = self.sink.offset - offset  # since the last update: pulls in between feed the sink's fit
        if abs(step) > SINK_STEP_NS:
            # The output slipped (an underrun, a device restarted later) and the fit has caught up with it
            # now: B moves by the step at once, which the step corrections take back, but it is no trend
            # of the sender's clock, so the drift loop must not see it (as with the floor's rebuild). Its
            # current block goes too: the fit rose toward the step as the old pulls left its window.
            self.drift.moved_ns -= step
            self.drift.restart()
        b = t + (queued + block) * 1e9 / self.rate - self.schedule.at(next_frame) - self.floor.value
        err = b - self.target_ns
        self.buffer_ns, self.error_ns = b, err
        # Steps: raise B at once, a slice per frame; lower it at quiet points, or anywhere when far over.
        self.insert = self.slice if err < -INSERT_BELOW_NS else 0
        if err > CATCH_UP_ABOVE_NS:
            self.drop = int((err - DEAD_BAND_NS) * self.rate / 1e9)  # back to the dead band's edge
        else:
            self.drop = self.slice if err > DROP_ABOVE_NS else 0
        self.urgent = err > URGENT_ABOVE_NS
        if self.economy and self.drop:
            # Economy (resampling turned off to save CPU): the steps are the only correction of drift.
            # B a step over for a second is no transient (a stall and its catch-up pass within it) but
            # drift or the start's offset: it is cut, pitch-matched where no quiet point comes. Waiting
            # for one let B ride up to 10 ms over the target on sound without one, searching every
            # frame. (Without drift compensation at all, as for a file, B is left where it starts.)
            self._over_since = self._over_since or now
            self.urgent = self.urgent or now - self._over_since >= ECONOMY_PATIENCE_NS
        else:
            self._over_since = 0
        if not self.resampling:
            return
        # The phase term: nothing within the dead band (on a steady link B wanders by a millisecond or so
        # with the receiver's timing, and the target by as much while the jitter gets known; leaving the
        # ratio alone then keeps the timeline exact), beyond it in proportion to the excess, up to
        # MAX_STEER: B is brought back to the band's edge, gently when it has just crossed it (drift),
        # at 5 ms/s when it is far out.
        over, short = err - DEAD_BAND_NS, err + SHORT_BAND_NS
        beyond = (over if over > 0 else short if short < 0 else 0.0) / 1e9  # seconds
        self.steer = max(-MAX_STEER, min(MAX_STEER, KP * beyond))
        self._outside = beyond != 0.0
        self._floor_seen = self.floor.value
        self._next_frame = next_frame
        self._track(now, b)

    def tick(self, now: int, block: int) -> None:
        """After a pull that decoded nothing (three in four with 20 ms frames and 5 ms pulls): B is as
        ``update`` left it but for the sink's fit, which takes every pull, and the drift loop, whose lower
        envelope of B is only as good as the pulls it sees, gets this one's. The rest waits for the next
        ``update``: nothing acts on it before the next decode."""
        self.sink.due(now, block)
        if not self.resampling or not self.floor or self._next_frame < 0:
            return
        moved = self.sink.offset - self._offset_seen  # u's output side moved with the sink's fit only
        if abs(moved) > SINK_STEP_NS:
            return  # the output slipped: the next update sees the step, and restarts the loop
        self._track(now, self.buffer_ns + moved + (self._floor_seen - self.floor.value))

    def _track(self, now: int, b: float) -> None:
        """Feeds the drift loop B; on a new estimate, re-times the sender's schedule at the new rate."""
        estimate = self.drift.update(now, b, self.floor.value, self._outside)
        if estimate is not None:
            next_frame = self._next_frame
            # Pivot the sender's schedule at the playout position to the new clock rate, re-evaluate m
            # on it, and carry B's resulting step into u (it is not a trend).
            self.schedule.pivot(next_frame, self.frame_ns / (1.0 + estimate))
            self.drift.estimate = estimate
            m = self.floor.value
            self.floor.rebuild(self.schedule)
            self.drift.moved_ns += self.floor.value - m
            self._next_frame = -1  # B is measured again on the new schedule before the loop takes more

    @property
    def ratio(self) -> float:
        """Output samples per decoded sample: below 1 plays faster (the sender's clock is fast, or B is
        over its target), above 1 slower."""
        return 1.0 / (1.0 + self.drift.estimate + self.steer)

    def resampled(self, samples: int, ratio: float) -> None:
        """The engine resampled ``samples`` decoded samples by ``ratio``: the phase term's share of the
        difference moved B (exactly: B counts the output samples the same way)."""
        moved = samples * (1.0 / (1.0 + self.drift.estimate) - ratio) * 1e9 / self.rate
        self.steered_ns += moved
        self.drift.moved_ns += moved

    def inserted(self, samples: int) -> None:
        """The engine concealed ``samples`` more before the next frame (raising B)."""
        self.insert = 0
        self.drift.moved_ns -= samples * 1e9 / self.rate / (1.0 + self.drift.estimate)

    def dropped(self, samples: int) -> None:
        """The engine dropped ``samples`` of a decoded frame (lowering B)."""
        self.drop = 0
        self.urgent = False
        self.drift.moved_ns += samples * 1e9 / self.rate / (1.0 + self.drift.estimate)
