"""The playout engine for one stream: jitter buffer, decode/FEC/PLC, latency control, drift compensation.

Clocked by its user: the sink calls ``pull(out)`` once per output period and gets exactly ``len(out)``
samples; the network thread only ``push()``es packets into a queue (the two share nothing else, so no
locks). Everything the engine decides is derived from two clocks it is given: arrival times and pull
times, both on the receiver's monotonic clock, so it runs unchanged on a simulated clock in tests.

How latency is controlled (all figures in receiver time):
  * r_k = arrival_k - k * T is packet k's arrival relative to the nominal schedule; m = min r over a
    sliding window is the earliest any packet could have arrived. j_k = r_k - m is k's network jitter.
  * B = (time frame ``next_seq`` is due at the sink) - (next_seq * T + m) is the playout delay beyond the
    earliest arrivals: what the buffer holds. A packet with j_k > B misses its turn (late).
  * The target for B is a high percentile of j over the window plus a margin (``--latency auto``), or a
    fixed value; it rises as soon as the percentile does and falls by at most ``shrink_ms_per_s``.
  * B is steered to the target three ways: a small varying resampling ratio (a PI loop whose integral is
    the clock drift, reported in ppm), skipping whole frames (preferring quiet ones) when B is over by
    more than a frame and a half (at least a frame + 5 ms), and inserting a concealed frame when it is
    short by half a frame (at least 5 ms); small frames would otherwise skip and insert on mere jitter.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass
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
KP = 0.1  # per second: proportional gain of the ratio loop
KI = KP / 40.0  # per second^2: integral gain (the drift estimate)


@dataclass(frozen=True, slots=True)
class PlayoutConfig:
    """Receiver latency policy. Each field says what it does and when to change it."""

    latency_ms: float | None = None  # None = auto (follow jitter); a number fixes the target
    max_latency_ms: float = 200.0  # the target never exceeds this; raise it only for very bad links
    start_latency_ms: float = 10.0  # auto mode's first target, before any jitter has been seen
    margin_ms: float = 3.0  # added to the jitter percentile; covers scheduling noise on the receiver
    jitter_window_s: float = 10.0  # how far back the jitter percentile and the earliest arrival look
    jitter_percentile: float = 99.5  # high: on a quiet link, a late packet is a rare event
    shrink_ms_per_s: float = 5.0  # how fast an auto target may fall once the network calms down
    drift_compensation: bool = True  # resample to follow the sender's clock (off: exact samples out)
    fec: bool = True  # rebuild a lost frame from the next packet's in-band FEC when it has some
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


class _MinWindow:
    """Sliding-window minimum over the last ``size`` (index, value) samples, O(1) amortised."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._q: deque[tuple[int, int]] = deque()

    def add(self, index: int, value: int) -> None:
        q = self._q
        while q and q[-1][1] >= value:
            q.pop()
        q.append((index, value))
        while q[0][0] <= index - self._size:
            q.popleft()

    @property
    def value(self) -> int:
        return self._q[0][1]

    def __bool__(self) -> bool:
        return bool(self._q)


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
        self._rmin = _MinWindow(win)
        self._jit = Window(win)
        self._k0 = 0
        self._first_arrival = 0
        self._since_quantile = 0
        self._desired_ns = self._initial_target_ns()
        self.target_ns = self._desired_ns
        self.buffer_ns = 0.0
        self._drift = 0.0  # input samples consumed per output sample, minus one (integral term)
        self._adj = 0.0  # proportional term
        self._last_control_ns = 0
        self._skip_wanted = False
        self._skip_since_ns = 0
        self._insert_wanted = False
        self._missing = 0

    def _initial_target_ns(self) -> float:
        cfg = self.config
        ms = cfg.latency_ms if cfg.latency_ms is not None else min(cfg.start_latency_ms, cfg.max_latency_ms)
        return ms * 1e6

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
        self._drain()
        if self.state == State.WAITING:
            if not self._first_arrival or now - self._first_arrival < self.target_ns:
                if self._ended and not self._first_arrival:
                    self._finish()
                out[:] = 0
                return False
            self.state = State.PLAYING
        elif self.state == State.FINISHED:
            out[:] = 0
            return False
        n = len(out)
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
        self.stats.lost = max(0, self._missing - self.stats.late)
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
            res = jb.put(k, payload, capture)
            if res == Put.TOO_FAR:
                if k > jb.next_seq or self.state == State.WAITING:
                    # A jump the ring cannot span (the sender's sequence restarted): start over from k.
                    st.resyncs += 1
                    jb.reset(k)
                    self._k0 = k
                    self._rmin = _MinWindow(self._rmin._size)
                    jb.put(k, payload, capture)
                    res = Put.STORED
                else:
                    st.late += 1
                    continue
            elif res == Put.LATE and self.state == State.WAITING:
                jb.next_seq = k  # reordering before playout started: begin at the earlier packet
                res = jb.put(k, payload, capture)
            if res == Put.DUPLICATE:
                st.duplicates += 1
                continue
            if res == Put.LATE:
                st.late += 1
                st.lost = max(0, self._missing - st.late)
            self._track_arrival(k, arrival)

    def _track_arrival(self, k: int, arrival: int) -> None:
        r = arrival - (k - self._k0) * self._T
        self._rmin.add(k, r)
        j = r - self._rmin.value
        if j <= self.config.max_latency_ms * 1e6:  # a stall's burst is not jitter to buffer for
            self._jit.add(float(j))
        self._since_quantile += 1

    def _produce(self, now: int) -> None:
        """Appends one frame (decoded, FEC, concealed or skipped-over) to the FIFO."""
        jb, st, dec = self.jb, self.stats, self.decoder
        if self._insert_wanted:
            self._insert_wanted = False
            st.inserted += 1
            self._append(dec.conceal(self._frame_out), 0)
            return
        seq = jb.next_seq
        payload, capture = jb.pop()
        if payload is not None:
            try:
                n = dec.decode(payload)
            except CorruptPacketError:
                st.corrupt += 1
                n, capture = dec.conceal(self._frame_out), 0
                st.concealed += 1
            else:
                if self._skip_wanted and jb.count > 0 and self._is_quiet_or_urgent(n, now):
                    st.skipped += 1
                    self._skip_wanted = False
                    return
        else:
            self._missing += 1
            st.lost = max(0, self._missing - st.late)
            nxt = jb.peek(seq + 1) if self.fec else None
            if nxt is not None:
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
        if not self._rmin:
            return
        cfg, T = self.config, self._T
        dt = (now - self._last_control_ns) / 1e9 if self._last_control_ns else 0.0
        self._last_control_ns = now
        # Target: percentile of jitter + margin, fast up, slow down (auto mode only).
        if cfg.latency_ms is None and self._since_quantile >= 8 and len(self._jit) >= 8:
            self._since_quantile = 0
            desired = self._jit.percentile(cfg.jitter_percentile) + cfg.margin_ms * 1e6
            self._desired_ns = min(desired, cfg.max_latency_ms * 1e6)
        if self._desired_ns >= self.target_ns:
            self.target_ns = self._desired_ns
        else:
            self.target_ns = max(self._desired_ns, self.target_ns - cfg.shrink_ms_per_s * 1e6 * dt)
        # B: when is next_seq due at the sink, relative to its earliest possible arrival?
        block_ns = n * 1_000_000_000 / self._rate_out
        pending = self._fw - self._fr
        due = now + (pending // n + 1) * block_ns
        b = due - (self.jb.next_seq - self._k0) * T - self._rmin.value
        self.buffer_ns = b
        err = b - self.target_ns
        st = self.stats
        st.buffer_ms = b / 1e6
        st.target_ms = self.target_ns / 1e6
        if err > max(1.5 * T, T + 5e6) and self.jb.count > 0:
            if not self._skip_wanted:
                self._skip_wanted = True
                self._skip_since_ns = now
            self._adj = 0.0
        elif err < -max(0.5 * T, 5e6):
            self._skip_wanted = False
            self._insert_wanted = True
            self._adj = 0.0
        else:
            self._skip_wanted = False
            if self._resampler is not None:
                # Dead band: on a steady link B wanders by a millisecond or two with the jitter; leaving
                # the ratio alone then keeps the audio's timeline exact (no needless warping).
                dead = max(2e6, T / 8)
                e = math.copysign(max(0.0, abs(err) - dead), err) / 1e9  # seconds beyond the band
                # P: 1 ms beyond the band -> 100 ppm faster (a 10 s time constant, inaudible).
                # I: the clock drift, settling over about a minute; both clamped well inside audibility.
                self._adj = max(-0.002, min(0.002, KP * e))
                self._drift = max(-0.002, min(0.002, self._drift + KI * e * dt))
                st.drift_ppm = self._drift * 1e6
