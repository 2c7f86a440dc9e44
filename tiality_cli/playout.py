"""The playout engine for one stream: jitter buffer, decode/FEC/PLC, latency control, drift compensation.

Clocked by its user: the sink calls ``pull(out)`` once per output period and gets exactly ``len(out)``
samples; the network thread only ``push()``es packets into a queue (the two share nothing else, so no
locks). Everything the engine decides is derived from two clocks it is given: arrival times and pull
times, both on the receiver's monotonic clock, so it runs unchanged on a simulated clock in tests.

How latency is controlled (all figures in receiver time):
  * s_k is packet k's slot on the sender's schedule as the receiver sees it: k * T / (1 + drift), drift
    being the estimate of how fast the sender's clock runs against ours. r_k = arrival_k - s_k is k's
    arrival relative to that schedule; m = min r over a sliding window (2 s) is the earliest any packet
    could have arrived, and j_k = r_k - m is k's network jitter. When the drift estimate changes, the
    schedule pivots at the playout position and the window is re-evaluated on it: r does not creep,
    and m does not lag behind a slow sender (whose r would rise, leaving the old minimum in place).
  * B = (when the first sample of frame ``next_seq`` plays) - (s_next + m) is the playout delay beyond
    the earliest arrivals: what the buffer holds. The frame is decoded at the pull that needs it, the
    one whose block holds that sample: a packet with j_k > B is late, one with j_k <= B - block is sure
    to be in time. Without resampling, frames of whole blocks start blocks, and j_k <= B is in time;
    with it, the frames slide across the sink's block grid, so an auto target adds a block. (Measuring
    at the decode pull instead would make B jump by a block at each slide, and the loop chase it.)
    Play times are read on the sink's own timeline, fitted from below to its pulls: a sink thread that
    wakes up late, or stalls and catches up, does not make B look larger than it is.
  * The target for B is a high percentile of j over the window plus a margin (``--latency auto``), or a
    fixed value; it rises as soon as the percentile does and falls by at most ``shrink_ms_per_s``. A
    stall is not jitter: packets that arrive in one clump behind a delayed one (head-of-line blocking,
    the burst after a stall) carry that one delay again, less a frame each, so only the first counts.
  * B is steered to the target three ways. The resampling ratio is 1 + drift + a phase term (100 ppm
    per ms that B is beyond a 2 ms dead band); drift comes from a frequency-locked loop on B's trend
    (see _track_drift) and is reported in ppm. A whole frame is skipped (a quiet one if possible) when
    B is over by a frame + 5 ms, and a concealed frame inserted when B is short by a quarter frame (at
    least 5 ms): small frames would otherwise skip and insert on mere jitter, and after either, B lands
    short of the other's threshold, so they never alternate.

Accounting: a packet that arrives after its frame's turn is ``late`` (dropped, counted once however many
copies come); a frame is ``lost`` when its packet never came at all (missing at its turn, not late
since); ``concealed`` counts frames Opus PLC made up for missing or corrupt packets, ``fec_recovered``
those rebuilt from the next packet's in-band FEC (only when that packet carries some).
"""

from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass, replace
from enum import IntEnum

import numpy as np
import numpy.typing as npt

from tiality_cli.clock import SYSTEM_CLOCK, Clock
from tiality_cli.codec import OpusDecoder
from tiality_cli.config import AudioFormat
from tiality_cli.errors import ConfigError, CorruptPacketError
from tiality_cli.jitter import JitterBuffer, Put, SeqUnwrapper
from tiality_cli.stats import ReceiverStats, Window

F32 = npt.NDArray[np.float32]
KP = 0.1  # per second: phase gain (1 ms beyond the dead band -> 100 ppm faster; a 10 s time constant)
DEAD_BAND_NS = 2e6  # B may wander this far from the target before the ratio is bent to steer it
FLL_BLOCK_NS = 2_000_000_000  # the drift estimator compares the lowest B in the halves of blocks this long
FLL_MIN_GAIN = 0.02  # its gain falls as 1/n to this floor: it averages, then tracks (a 100 s memory)
FLOOR_WINDOW_S = 2.0  # m's window: enough packets to find the floor, and a route change's new one in 2 s
MAX_RATIO_DEV = 0.002  # clamp on drift and on the P term: 0.2 % is 3.5 cents, inaudible
SINK_WINDOW_S = 0.5  # how much of the sink's audio its timeline is fitted over (see _sink_time)


@dataclass(frozen=True, slots=True)
class PlayoutConfig:
    """Receiver latency policy. Each field says what it does and when to change it."""

    latency_ms: float | None = None  # None = auto (follow jitter); a number fixes the target
    max_latency_ms: float = 200.0  # the target never exceeds this; raise it only for very bad links
    start_latency_ms: float = 10.0  # auto mode's first target, before any jitter has been seen
    margin_ms: float = 3.0  # added to the jitter percentile; covers scheduling noise on the receiver
    jitter_window_s: float = 10.0  # how far back the jitter percentile looks (the earliest arrival: 2 s)
    jitter_percentile: float = 99.5  # high: on a quiet link, a late packet is a rare event
    shrink_ms_per_s: float = 5.0  # how fast an auto target may fall once the network calms down
    drift_compensation: bool = True  # resample to follow the sender's clock (off: exact samples out)
    fec: bool = True  # rebuild a lost frame from the next packet's in-band FEC when it has some; the next
    # packet must be in hand by then, so an auto target holds one frame more for a stream with FEC
    resampler: str = "sinc_fastest"  # libsamplerate converter used for drift compensation

    def validate(self) -> PlayoutConfig:
        if self.max_latency_ms <= 0:
            raise ConfigError(f"--max-latency {self.max_latency_ms:g}: must be positive")
        if self.latency_ms is not None and not 0 <= self.latency_ms <= self.max_latency_ms:
            raise ConfigError(
                f"--latency {self.latency_ms:g}: must be 0 to --max-latency ({self.max_latency_ms:g} ms)"
            )
        return self


class State(IntEnum):
    WAITING = 0  # no packet yet, or holding the first ones until the start delay has passed
    PLAYING = 1
    FINISHED = 2  # the sender closed and every frame has been played


class _Floor:
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
        self._ring_a = [0] * size
        self._n = 0

    def add(self, k: int, arrival: int, r: int) -> None:
        n = self._n
        i = n % self.size
        self._ring_k[i], self._ring_a[i] = k, arrival
        self._n = n + 1
        q = self._q
        while q and q[-1][1] >= r:
            q.pop()
        q.append((n, r))
        if q[0][0] <= n - self.size:
            q.popleft()

    def rebuild(self, sched_t: float, sched_k: int, period: float) -> None:
        """Re-evaluates the window on the schedule s_k = sched_t + (k - sched_k) * period."""
        q = self._q
        q.clear()
        for n in range(max(0, self._n - self.size), self._n):
            i = n % self.size
            r = int(self._ring_a[i] - sched_t - (self._ring_k[i] - sched_k) * period)
            while q and q[-1][1] >= r:
                q.pop()
            q.append((n, r))

    @property
    def value(self) -> int:
        return self._q[0][1]

    def __bool__(self) -> bool:
        return bool(self._q)


def _has_fec(packet: bytes) -> bool:
    """Whether an Opus packet carries in-band FEC (LBRR) for the frame before it (RFC 6716 s3, 4.2.3).

    What libopus >= 1.5 calls opus_packet_has_lbrr: CELT-only packets never do; for SILK and hybrid ones
    the LBRR flag follows each channel's VAD flags at the start of the first frame. Without this check
    the decoder's "FEC" output for a packet without any is plain concealment, counted as a recovery.
    """
    n = len(packet)
    if n < 2:
        return False
    toc = packet[0]
    config = toc >> 3
    if config >= 16:  # CELT only
        return False
    silk_frames = (1, 1, 2, 3)[config & 3] if config < 12 else 1  # 20 ms SILK frames per frame
    code = toc & 3
    i = 1
    if code == 2:  # two frames, the first one's length in 1 or 2 bytes
        i += 1 if packet[1] < 252 else 2
    elif code == 3:  # count byte, optional padding length, VBR frame lengths
        count, vbr, pad = packet[1] & 0x3F, packet[1] & 0x80, packet[1] & 0x40
        i = 2
        while pad and i < n:
            pad = packet[i] == 255
            i += 1
        for _ in range(count - 1 if vbr else 0):
            if i >= n:
                return False
            i += 1 if packet[i] < 252 else 2
    if i >= n:
        return False
    first = packet[i]
    if first >> (7 - silk_frames) & 1:
        return True
    return bool(toc & 4) and bool(first >> (6 - 2 * silk_frames) & 1)  # stereo: the side channel's flag


class StreamPlayout:
    """Turns one stream's packets into a continuous signal at the output's rate and channels."""

    def __init__(
        self,
        stream: AudioFormat,
        output: AudioFormat,
        config: PlayoutConfig | None = None,
        clock: Clock = SYSTEM_CLOCK,
        fec: bool = False,
        stats: ReceiverStats | None = None,
    ) -> None:
        self.config = cfg = (config or PlayoutConfig()).validate()
        self.stream = stream
        self.output = output
        self.clock = clock
        self.fec = fec and cfg.fec
        self.stats = stats or ReceiverStats(stream.frame_ms)
        self.state = State.WAITING
        self.finished = threading.Event()
        self._inbox: deque[tuple[int, int, bytes, int] | None] = deque()
        self._ended = False

        self._T = stream.frame_ns
        self._frame_out = output.sample_rate * stream.frame_us // 1_000_000
        self._rate_out = output.sample_rate
        frames_max = max(1, math.ceil(cfg.max_latency_ms * 1e6 / self._T))
        cap = 16
        while cap < 4 * frames_max + 8:
            cap *= 2
        self.jb = JitterBuffer(cap)
        self._unwrap = SeqUnwrapper()
        self.decoder = OpusDecoder(output.sample_rate, output.channels, self._frame_out)

        # Output FIFO (float32 at the output rate), filled a frame at a time, emptied by pull().
        self._fifo = np.zeros((self._frame_out * 8 + 4096, output.channels), dtype=np.float32)
        self._fr = 0
        self._fw = 0
        self._f32 = np.zeros((self.decoder.output.shape[0], output.channels), dtype=np.float32)
        self._resampler = None
        if cfg.drift_compensation:
            import samplerate

            self._resampler = samplerate.Resampler(cfg.resampler, channels=output.channels)
        # Latency markers: output sample position of a decoded frame's first sample, and its capture time.
        self._mk_pos = np.zeros(64, dtype=np.int64)
        self._mk_cap = np.zeros(64, dtype=np.int64)
        self._mk_r = 0
        self._mk_w = 0
        self._out_pos = 0  # samples handed to the sink so far
        self._written_pos = 0  # samples appended to the FIFO so far

        # Latency control state.
        win = max(8, int(cfg.jitter_window_s * 1e9 / self._T))
        self._floor = _Floor(max(8, min(win, int(FLOOR_WINDOW_S * 1e9 / self._T))))
        self._jit = Window(win)
        self._k0 = 0  # where playout started (or last resynchronised)
        self._first_arrival = 0
        # The sender's schedule in receiver time: s_k = _sched_t + (k - _sched_k) * _period.
        self._sched_k = 0
        self._sched_t = 0.0
        self._period = float(self._T)
        self._last_arrival = 0
        self._last_j = 0  # jitter of the previous arrival, to spot clumps
        self._newest_k = 0  # the highest sequence seen since the last resync, and its capture time
        self._newest_capture = 0
        self._since_quantile = 0
        self._fec_ns = self._T if self.fec else 0  # FEC needs the next packet in hand: a frame more
        self._desired_ns = self._initial_target_ns()
        self.target_ns = self._desired_ns
        self.buffer_ns = 0.0
        self._drift = 0.0  # the sender's clock rate over ours, minus one (the frequency estimate)
        self._adj = 0.0  # the phase term, steering B to its target
        # Frequency-locked loop (see _track_drift): u = B + what the phase term, skips and inserts did to B.
        self._u_acc = 0.0
        self._blk_start = 0  # when the current block began (0: at the next pull)
        # Per half of the block: the lowest output side of u, the sum of m, the number of pulls.
        self._blk_half = [math.inf, 0.0, 0.0, math.inf, 0.0, 0.0]
        self._blk_out = False  # B left the dead band in it
        self._fll_blocks = 0  # blocks seen since the start or the last resync
        self._fll_n = 0  # slope measurements taken
        self._last_control_ns = 0
        self._pulled = 0  # samples pulled since playout started (the sink's own clock)
        self._sink_q: deque[tuple[int, float]] = deque()  # (pulled, now - pulled / rate), increasing
        self._skip_wanted = False
        self._skip_since_ns = 0
        self._insert_wanted = False
        self._missing = 0  # frames missing at their turn
        self._late_missed = 0  # ... whose packet came afterwards
        self._policy: PlayoutConfig | None = None  # set_policy() hands a new policy to the sink thread

    def _initial_target_ns(self) -> float:
        cfg = self.config
        if cfg.latency_ms is not None:
            return cfg.latency_ms * 1e6
        return min(cfg.start_latency_ms * 1e6 + self._fec_ns, cfg.max_latency_ms * 1e6)

    # ---- network thread -------------------------------------------------------------------------------
    def push(self, seq: int, capture_ns: int, payload: bytes) -> None:
        """Queues a packet as it arrives (any thread; stamps its arrival time now)."""
        self._inbox.append((seq, capture_ns, payload, self.clock.monotonic_ns()))

    def end(self) -> None:
        """The sender closed the stream: play what is buffered, then finish."""
        self._inbox.append(None)

    # ---- sink thread ----------------------------------------------------------------------------------
    def pull(self, out: F32) -> bool:
        """Writes exactly ``len(out)`` samples; returns False when no stream audio was written."""
        now = self.clock.monotonic_ns()
        if self._policy is not None:
            self._apply_policy(self._policy)
        self._drain()
        n = len(out)
        if self.state == State.WAITING:
            # Start once the first packet has waited the target: B starts there (see _control).
            if not self._first_arrival or now - self._first_arrival < self.target_ns:
                if self._ended and not self._first_arrival:
                    self._finish()
                out[:] = 0
                return False
            self.state = State.PLAYING
        elif self.state == State.FINISHED:
            out[:] = 0
            return False
        while self._fw - self._fr < n and self.state == State.PLAYING:
            if self._ended and self.jb.next_seq > self.jb.highest:
                break
            self._produce(now)
        avail = min(n, self._fw - self._fr)
        out[:avail] = self._fifo[self._fr : self._fr + avail]
        if avail < n:
            out[avail:] = 0
        self._mark_latency(avail)
        self._fr += avail
        self._out_pos += avail
        if self._ended and self.jb.next_seq > self.jb.highest and self._fw == self._fr:
            self._finish()
            return avail > 0
        self._control(now, n)
        return avail > 0

    def _finish(self) -> None:
        self.state = State.FINISHED
        self.stats.lost = max(0, self._missing - self._late_missed)
        self.finished.set()

    def _drain(self) -> None:
        inbox, jb, st = self._inbox, self.jb, self.stats
        while inbox:
            item = inbox.popleft()
            if item is None:
                self._ended = True
                continue
            seq32, capture, payload, arrival = item
            k = self._unwrap.unwrap(seq32)
            st.on_packet(len(payload), capture, arrival)
            if not self._first_arrival:
                jb.reset(k)
                self._k0 = k
                self._first_arrival = arrival
            if (
                k < jb.next_seq
                and capture
                and self._newest_capture
                and capture - self._newest_capture - (k - self._newest_k) * self._T > 1_000_000_000
                and self.state == State.PLAYING
            ):
                # Behind the playout position, yet captured over a second later than its number says
                # (counting from the newest packet): not a late packet but a sender whose sequence
                # restarted lower. A stall's burst is late, but its capture times match its numbers.
                self._resync(k, arrival)
            res = jb.put(k, payload, capture)
            if res == Put.TOO_FAR:
                if k > jb.next_seq or self.state == State.WAITING:
                    # A jump the ring cannot span (the sender skipped ahead or restarted): start over at k.
                    self._resync(k, arrival)
                    res = jb.put(k, payload, capture)
                else:
                    self._count_late(k)  # beyond the ring's memory: a duplicate would look the same
                    continue
            elif res == Put.LATE and self.state == State.WAITING:
                jb.next_seq = k  # reordering before playout started: begin at the earlier packet
                res = jb.put(k, payload, capture)
            if k >= self._newest_k:
                self._newest_k, self._newest_capture = k, capture
            if res == Put.DUPLICATE:
                st.duplicates += 1
                continue
            if res == Put.LATE:
                self._count_late(k)
            self._track_arrival(k, arrival, res != Put.LATE)

    def _count_late(self, k: int) -> None:
        st = self.stats
        st.late += 1
        if k >= self._k0:  # its frame was concealed at its turn (not before the start): not lost after all
            self._late_missed += 1
            st.lost = max(0, self._missing - self._late_missed)

    def _resync(self, k: int, arrival: int) -> None:
        """Restarts the playout position at k (a sequence jump the ring cannot span)."""
        self.stats.resyncs += 1
        self.jb.reset(k)
        self._k0 = self._newest_k = k
        self._floor = _Floor(self._floor.size)
        self._sched_k, self._sched_t = k, float(arrival)
        self._last_arrival = 0
        self._fll_blocks = 0
        self._blk_start = 0
        self._blk_half[:] = [math.inf, 0.0, 0.0, math.inf, 0.0, 0.0]
        self._blk_out = False

    def _track_arrival(self, k: int, arrival: int, in_time: bool) -> None:
        r = int(arrival - self._sched_t - (k - self._sched_k) * self._period)
        if in_time:  # (a late packet cannot be the earliest)
            self._floor.add(k, arrival, r)
        j = r - self._floor.value
        # Head-of-line blocking: a packet arriving on the heels of the previous one with less jitter is in
        # its shadow (a stall's burst has j falling by T per packet): that delay was counted once already.
        shadow = arrival - self._last_arrival < self._T // 4 and j < self._last_j
        self._last_arrival, self._last_j = arrival, j
        if not shadow and j <= self.config.max_latency_ms * 1e6:  # longer: an outage, not jitter
            self._jit.add(float(j))
            self._since_quantile += 1

    def _produce(self, now: int) -> None:
        """Appends one frame (decoded, FEC, concealed or skipped-over) to the FIFO."""
        jb, st, dec = self.jb, self.stats, self.decoder
        if self._insert_wanted:
            self._insert_wanted = False
            st.inserted += 1
            self._u_acc -= self._period
            self._append(dec.conceal(self._frame_out), 0)
            return
        seq = jb.next_seq
        payload, capture = jb.pop()
        if payload is not None:
            try:
                n = dec.decode(payload) if payload else -1  # libopus would conceal an empty packet silently
            except CorruptPacketError:
                n = -1
            if n != self._frame_out:  # undecodable, or not one frame: conceal, keep the timeline exact
                st.corrupt += 1
                n, capture = dec.conceal(self._frame_out), 0
                st.concealed += 1
            else:
                if self._skip_wanted and jb.count > 0 and self._is_quiet_or_urgent(n, now):
                    st.skipped += 1
                    self._u_acc += self._period
                    self._skip_wanted = False
                    return
        else:
            self._missing += 1
            st.lost = max(0, self._missing - self._late_missed)
            nxt = jb.peek(seq + 1) if self.fec else None
            if nxt is not None and _has_fec(nxt):
                try:
                    n = dec.decode_fec(nxt, self._frame_out)
                    st.fec_recovered += 1
                except CorruptPacketError:
                    n = dec.conceal(self._frame_out)
                    st.concealed += 1
            else:
                n = dec.conceal(self._frame_out)
                st.concealed += 1
        self._append(n, capture)

    def _is_quiet_or_urgent(self, n: int, now: int) -> bool:
        """Skip a frame now if it is quiet, the excess is large, or we have waited long enough for quiet."""
        x = self.decoder.output[:n]
        quiet = max(int(x.max()), -int(x.min())) < 328  # below -40 dBFS
        excess = self.buffer_ns - self.target_ns
        return quiet or excess > 3 * self._T or now - self._skip_since_ns > 300_000_000

    def _append(self, n: int, capture: int) -> None:
        st = self.stats
        st.frames_played += 1
        x = self.decoder.output[:n]
        st.peak = max(int(x.max()), -int(x.min()))
        f = self._f32[:n]
        np.multiply(x, 1.0 / 32768.0, out=f, casting="unsafe")
        st.rms = math.sqrt(float(np.vdot(f, f)) / max(1, f.size)) * 32768.0
        if capture:
            i = self._mk_w & 63
            self._mk_pos[i] = self._written_pos
            self._mk_cap[i] = capture
            self._mk_w += 1
        if self._resampler is not None:
            ratio = 1.0 / (1.0 + self._drift + self._adj)
            y = self._resampler.process(f, ratio, end_of_input=False)
            self._fifo_write(np.asarray(y, dtype=np.float32).reshape(-1, self.output.channels))
        else:
            self._fifo_write(f)

    def _fifo_write(self, y: F32) -> None:
        m = len(y)
        if self._fw + m > len(self._fifo):
            live = self._fw - self._fr
            self._fifo[:live] = self._fifo[self._fr : self._fw]
            self._fr, self._fw = 0, live
            if live + m > len(self._fifo):
                grown = np.zeros((live + m + 4096, self.output.channels), dtype=np.float32)
                grown[:live] = self._fifo[:live]
                self._fifo = grown
        self._fifo[self._fw : self._fw + m] = y
        self._fw += m
        self._written_pos += m

    def _mark_latency(self, avail: int) -> None:
        """Records capture -> hand-off latency for decoded frames whose first sample goes out now."""
        end = self._out_pos + avail
        if self._mk_r == self._mk_w:
            return
        wall = self.clock.wall_ns()
        while self._mk_r < self._mk_w:
            i = self._mk_r & 63
            pos = int(self._mk_pos[i])
            if pos >= end:
                break
            offset_ns = (pos - self._out_pos) * 1_000_000_000 // self._rate_out
            self.stats.latency_ms.add((wall + offset_ns - int(self._mk_cap[i])) / 1e6)
            self._mk_r += 1

    def _control(self, now: int, n: int) -> None:
        """Updates the target, measures B and steers it (ratio, skip, insert)."""
        if not self._floor:
            return
        cfg, T = self.config, self._T
        dt = (now - self._last_control_ns) / 1e9 if self._last_control_ns else 0.0
        self._last_control_ns = now
        # Target: percentile of jitter + margin, fast up, slow down (auto mode only).
        if cfg.latency_ms is None and self._since_quantile >= 8 and len(self._jit) >= 8:
            self._since_quantile = 0
            desired = self._jit.percentile(cfg.jitter_percentile) + cfg.margin_ms * 1e6 + self._fec_ns
            if self._resampler is not None:  # a frame's decode deadline may fall a block before its play
                desired += n * 1e9 / self._rate_out
            self._desired_ns = min(desired, cfg.max_latency_ms * 1e6)
        if self._desired_ns >= self.target_ns:
            self.target_ns = self._desired_ns
        else:
            self.target_ns = max(self._desired_ns, self.target_ns - cfg.shrink_ms_per_s * 1e6 * dt)
        # B: when does next_seq's first sample play (after those pending and the next block's worth),
        # relative to its earliest possible arrival?
        nxt = self.jb.next_seq
        s_next = self._sched_t + (nxt - self._sched_k) * self._period
        t = self._sink_time(now, n)
        b = t + (self._fw - self._fr + n) * 1e9 / self._rate_out - s_next - self._floor.value
        self.buffer_ns = b
        err = b - self.target_ns
        st = self.stats
        st.buffer_ms = b / 1e6
        st.target_ms = self.target_ns / 1e6
        if err > T + 5e6 and self.jb.count > 0:
            if not self._skip_wanted:
                self._skip_wanted = True
                self._skip_since_ns = now
            self._adj = 0.0
        elif err < -max(0.25 * T, 5e6):
            self._skip_wanted = False
            self._insert_wanted = True
            self._adj = 0.0
        else:
            self._skip_wanted = False
            if self._resampler is not None:
                # Dead band: on a steady link B wanders by a millisecond or so with the receiver's timing;
                # leaving the ratio alone then keeps the audio's timeline exact (no needless warping).
                e = math.copysign(max(0.0, abs(err) - DEAD_BAND_NS), err) / 1e9  # seconds beyond it
                self._adj = max(-MAX_RATIO_DEV, min(MAX_RATIO_DEV, KP * e))
        if self._resampler is not None:
            self._track_drift(now, b, err, dt)

    def _sink_time(self, now: int, n: int) -> float:
        """When this pull was due on the sink's own timeline: the clock reading, less any lateness.

        A sink thread may wake up late, or stall and then catch up with pulls in a row (a paced file or
        null sink does): ``now`` is then later than the sink's sample clock says, and B, measured from it,
        too large by as much, which would skip frames the catch-up is about to consume anyway. So the
        timeline is fitted from below: now - (samples pulled before) / rate is the sink's offset plus its
        lateness, and its minimum over the last SINK_WINDOW_S of pulled audio is the offset. A device that
        really slipped (an ALSA xrun, restarted later) shows its new offset once that window has passed.
        """
        pulled, q = self._pulled, self._sink_q
        x = now - pulled * 1e9 / self._rate_out
        while q and q[-1][1] >= x:
            q.pop()
        q.append((pulled, x))
        while q[0][0] < pulled - SINK_WINDOW_S * self._rate_out:
            q.popleft()
        self._pulled = pulled + n
        return pulled * 1e9 / self._rate_out + q[0][1]

    def _track_drift(self, now: int, b: float, err: float, dt: float) -> None:
        """Frequency-locked loop: estimates the sender's clock rate from B's trend, steering aside.

        B changes at (sender's rate - our consumption) = drift - estimate - adj, so u = B + the integral
        of adj (+ the frames skipped, - those inserted) changes at drift - estimate only. Each block, the
        estimate moves by a gain times u's slope between the block's two halves, u = o - m being taken
        in each half as the lowest o (the output side: a sink thread that wakes up late only ever raises
        it, so its lower envelope ignores scheduling noise, however large) minus the mean m (the floor
        steps both ways as the window slides: a mean does not bias it). The gain is 1/n at first (a running
        average of the measurements), then FLL_MIN_GAIN (an exponential one). Target changes, skips and
        inserts do not disturb the estimate, unlike an integral of B's error, which winds up on each of
        them. The schedule then pivots at the playout position and m is re-evaluated on it, so the next
        block measures the new estimate only. Only blocks in which B left the dead band (so that the
        phase term acted) count: while B stays inside, the estimate, and so the ratio, stays put, and on
        a link without drift the audio's timeline is exact; a residual error drives B to the band's
        edge, where it is measured and corrected.
        """
        self._u_acc += self._adj * dt * 1e9
        m = self._floor.value
        o = b + m + self._u_acc  # the output side of u (late wake-ups only ever raise it)
        if self._blk_start == 0:
            self._blk_start = now
        t = now - self._blk_start
        h = self._blk_half
        if t < FLL_BLOCK_NS // 2:
            h[0] = min(h[0], o)
            h[1] += m
            h[2] += 1.0
        else:
            h[3] = min(h[3], o)
            h[4] += m
            h[5] += 1.0
        if abs(err) > DEAD_BAND_NS:
            self._blk_out = True
        if t < FLL_BLOCK_NS:
            return
        ok = h[2] > 0 and h[5] > 0
        slope = (h[3] - h[4] / h[5] - h[0] + h[1] / h[2]) / (FLL_BLOCK_NS / 2) if ok else 0.0
        out, self._blk_out = self._blk_out and ok, False
        self._blk_start = now
        h[0] = h[3] = math.inf
        h[1] = h[2] = h[4] = h[5] = 0.0
        self._fll_blocks += 1
        if self._fll_blocks < 2 or not out:
            return  # the first block sees m settle; while B stays in the dead band, nothing needs fixing
        self._fll_n += 1
        gain = max(FLL_MIN_GAIN, 1.0 / self._fll_n)
        drift = max(-MAX_RATIO_DEV, min(MAX_RATIO_DEV, self._drift + gain * slope))
        # Pivot the sender's schedule at the playout position to the new clock rate, re-evaluate m on it,
        # and carry B's resulting step into u (it is not a trend).
        nxt = self.jb.next_seq
        self._sched_t += (nxt - self._sched_k) * self._period
        self._sched_k = nxt
        self._period = self._T / (1.0 + drift)
        self._drift = drift
        m = self._floor.value
        self._floor.rebuild(self._sched_t, nxt, self._period)
        self._u_acc += self._floor.value - m
        self.stats.drift_ppm = drift * 1e6

    # ---- runtime policy and A/V sync, for the receiver (any thread) ---------------------------------------
    def set_policy(self, latency_ms: float | None, max_latency_ms: float) -> None:
        """Changes the target policy of a running stream; the sink thread applies it at its next pull.

        The jitter buffer was sized for the max latency the stream started with: a higher one counts up to
        half its span (a resync would follow beyond). A fixed target applies at once (skipping or inserting
        frames to get there), an auto one follows the jitter from where it is.
        """
        span_ms = self.jb.capacity // 2 * self._T / 1e6
        cfg = replace(self.config, latency_ms=latency_ms, max_latency_ms=min(max_latency_ms, span_ms))
        if cfg.latency_ms is not None and cfg.latency_ms > cfg.max_latency_ms:
            cfg = replace(cfg, latency_ms=cfg.max_latency_ms)
        self._policy = cfg.validate()

    def _apply_policy(self, cfg: PlayoutConfig) -> None:
        self._policy = None
        self.config = cfg
        ceiling = cfg.max_latency_ms * 1e6
        if cfg.latency_ms is not None:
            self._desired_ns = self.target_ns = cfg.latency_ms * 1e6
        else:
            self._desired_ns = min(self._desired_ns, ceiling)
            self.target_ns = min(self.target_ns, ceiling)
            self._since_quantile = max(self._since_quantile, 8)  # re-evaluate the percentile at once

    def capture_to_output_ns(self, capture_ns: int) -> int | None:
        """Where the sample captured at ``capture_ns`` (receiver clock, as pushed) lies in the output, in ns
        after the next sample the sink will pull (negative: already pulled); None before the first decoded
        frame.

        From the latency markers: the decoded frame captured last at or before ``capture_ns`` (or the oldest
        kept), extrapolated at the output rate, so a capture time whose audio is still in the jitter buffer
        maps to where it will play if nothing is skipped or inserted meanwhile.
        """
        w = self._mk_w
        if w == 0:
            return None
        best, best_cap, oldest, oldest_cap = -1, 0, -1, 0
        for j in range(max(0, w - len(self._mk_cap)), w):
            i = j & 63
            cap = int(self._mk_cap[i])
            if cap <= capture_ns and (best < 0 or cap >= best_cap):
                best, best_cap = i, cap
            if oldest < 0 or cap < oldest_cap:
                oldest, oldest_cap = i, cap
        i = best if best >= 0 else oldest
        ahead = int(self._mk_pos[i]) - self._out_pos
        return ahead * 1_000_000_000 // self._rate_out + capture_ns - int(self._mk_cap[i])
