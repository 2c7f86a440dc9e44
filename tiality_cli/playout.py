"""The playout engine for one stream: jitter buffer, decode/FEC/PLC, output FIFO, resampling.

Clocked by its user: the sink calls ``pull(out, output_delay_ns)`` once per output period and gets
exactly ``len(out)`` samples; the network thread only ``push()``es packets into a queue (the two share
nothing else, so no locks). Everything is derived from two clocks it is given: arrival times and pull
times, both on the receiver's monotonic clock, so it runs unchanged on a simulated clock in tests. What
to do about latency is decided by a ``tiality_cli.control.LatencyController``, which sees only times and
sample counts; this module does what it says to the audio.

How latency is controlled (all figures in receiver time):
  * s_k is packet k's slot on the sender's schedule as the receiver sees it: k * T / (1 + drift), drift
    being the estimate of how fast the sender's clock runs against ours. r_k = arrival_k - s_k is k's
    arrival relative to that schedule; m = min r over a sliding window (2 s) is the earliest any packet
    could have arrived, and j_k = r_k - m is k's network jitter. When the drift estimate changes, the
    schedule pivots at the playout position and the window is re-evaluated on it.
  * B = (when the first sample of frame ``next_seq`` plays) - (s_next + m) is the playout delay beyond
    the earliest arrivals: what the buffer holds, counting the samples still inside the resampler. Play
    times are read on the sink's own timeline, fitted from below to its pulls: a sink thread that wakes
    up late, or stalls and catches up, does not make B look larger than it is. With resampling, frames
    slide across the sink's block grid, so an auto target adds a block.
  * The target for B is a high percentile of j over the window plus a margin (``--latency auto``), or a
    fixed value; it rises as soon as a packet shows more jitter than the percentile (not 8 packets
    later) and falls by at most ``shrink_ms_per_s``. A stall is not jitter: packets that arrive in one
    clump (head-of-line blocking, the backlog after a freeze, in any order) were held up together, so
    the clump counts once, with its largest j; and the percentile never rests on the single largest
    sample, so one freeze does not lift the target for the window's length. Arrivals before playback
    starts do not count (the floor is still being found: a start-up burst would look like jitter).
  * The start: playback begins at the pull in whose block B reaches the target, and exactly there: with
    resampling, the first frame is preceded by the fraction of a block of silence that puts its first
    sample at arrival + target (exact mode starts on the next pull, frame-aligned). Frames already older
    than the target when playback begins (a sender's start-up burst) are dropped unplayed, and the frame
    the target falls in is entered part-way (``stale_ms``); the last dropped one is decoded unheard so
    that the first one heard joins on. So B starts on its target whatever came first.
  * Steering, by at most a 2.5 ms slice at a time (the shortest Opus frame; PLC conceals any multiple of
    it), never a whole frame. Raising latency is cheap: when B is 3 ms short, a slice of concealment
    goes in before the next frame, one per frame until B is back; and when the frame whose turn it is
    has no packet yet while B is short, it is waited for a slice at a time, up to the target (rather
    than concealed whole and its packet dropped as late: a delay that steps up costs a packet or two,
    not all of them until B has caught up). Lowering it is gradual: the resampling
    ratio is 1 + drift + a phase term (0.2 % per ms beyond a dead band of 2 ms over and 1 ms short of
    the target, at most 0.5 %, inaudible: 5 ms/s; inside the band the timeline is left exact), and
    when B is a slice over the band, a slice is dropped from the next decoded frame at its quietest
    2.5 ms if that is below -40 dBFS; when B is 10 ms over, from its quietest 5 ms anyway (a stretch of
    1.25-2.5 ms that ends as it began, for voiced sound whole pitch periods, crossfaded over a slice).
    At most one step per frame. Drift comes from a frequency-locked loop on B's trend
    (``tiality_cli.control.DriftLoop``), reported in ppm.
  * Freezes: a sender or a network that stops for a while and then delivers the backlog in a burst
    costs the frames of the gap (concealed at their turn) but not latency: the backlog is late, dropped
    and counted, nothing queues up behind it, and B is where it was as soon as packets flow again.

Accounting: a packet that arrives after its frame's turn is ``late`` (dropped, counted once however many
copies come); a frame is ``lost`` when its packet never came at all (missing at its turn, not late
since); ``concealed`` counts frames Opus PLC made up for missing or corrupt packets, ``fec_recovered``
those rebuilt from the next packet's in-band FEC (only when that packet carries some). ``frames_played``
counts each frame taken in its turn once (decoded, rebuilt or concealed). ``skipped`` and ``inserted``
count steps (each at most 2.5 ms; ``skipped_ms``/``inserted_ms`` say how much), ``resampled_ms`` what
the phase term moved.

Latency (``latency_ms``, per decoded frame) runs from the microphone's ADC to the speaker's DAC: the
capture time on the packet (the ADC time of the frame's first sample), less the encoder's look-ahead
(the decoded audio starts that much earlier in the signal), to when the frame's first sample is handed
to the sink, plus the output delay the sink reports for that block. It is split into the stages
``stage_capture_ms`` (the sender's capture-device delay), ``stage_frame_ms`` (the frame and look-ahead),
``stage_network_ms``, ``stage_buffer_ms`` (arrival to hand-off) and ``stage_output_ms``, which add up
to it frame by frame.
"""

from __future__ import annotations

import contextlib
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
from tiality_cli.control import LatencyController, Start, TargetPolicy
from tiality_cli.errors import ConfigError, CorruptPacketError
from tiality_cli.jitter import JitterBuffer, Put, SeqUnwrapper
from tiality_cli.stats import METER_EVERY_MS, ReceiverStats, frame_levels, to_float

F32 = npt.NDArray[np.float32]
QUIET = 328  # int16 peak below -40 dBFS: a slice this quiet is dropped unheard
MARKS = 64  # latency markers in flight (decoded frames in the FIFO): far more than a pull ever needs
PRIME = 256  # samples of history the resampler is primed with when it engages (its filter needs ~20)
# A stream's first second is steered by the steps alone: the phase term does not engage the converter
# (no drift estimate exists that early, and B settles by steps as well). Engaged, it stays engaged, so a
# burst of senders connecting at once would otherwise engage nearly every stream's converter while the
# mixer is busiest (64 at once: 15-20 % of a core more for that burst, before economy can turn it off).
ENGAGE_AFTER_S = 1.0
# Output samples by which a libsamplerate converter lags its input (the sinc ones hold samples back
# instead: those are counted when it engages; see StreamPlayout._engage).
LAG = {"linear": 1, "zero_order_hold": 1}
CAPTURE_LIMIT = 2**63  # capture times are kept in int64: one beyond it (a hostile clock) counts as unknown


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
        from tiality_cli.resample import DRIFT_CONVERTERS

        if self.resampler not in DRIFT_CONVERTERS:
            raise ConfigError(f"--resampler {self.resampler}: one of {', '.join(DRIFT_CONVERTERS)}")
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
        lookahead_samples: int = 0,
    ) -> None:
        """``lookahead_samples``: the encoder's look-ahead (StreamInfo.algorithm_delay), at the stream's
        rate; the decoded audio of packet k starts that long before frame k's capture time."""
        self.config = cfg = (config or PlayoutConfig()).validate()
        self.stream = stream
        self.output = output
        self.clock = clock
        self.fec = fec and cfg.fec
        self.stats = stats or ReceiverStats(stream.frame_ms)
        self.state = State.WAITING
        self.finished = threading.Event()
        # (sequence, capture time, payload, arrival time, capture-device delay); None: the end
        self._inbox: deque[tuple[int, int, bytes, int, int] | None] = deque()
        self._ended = False

        self._frame_ns = frame_ns = stream.frame_ns
        self._frame_out = output.sample_rate * stream.frame_us // 1_000_000
        self._rate = output.sample_rate
        self._lookahead_ns = lookahead_samples * 1_000_000_000 // stream.sample_rate
        frames_max = max(1, math.ceil(cfg.max_latency_ms * 1e6 / frame_ns))
        cap = 16
        while cap < 4 * frames_max + 8:
            cap *= 2
        self.jb = JitterBuffer(cap)
        self._mask = cap - 1
        self._arrival = [0] * cap  # per buffered frame (at seq & mask): when its packet arrived
        self._capture_delay = [0] * cap  # ... and the capture-device delay the sender reported for it
        self._unwrap = SeqUnwrapper()
        self.decoder = OpusDecoder(output.sample_rate, output.channels, self._frame_out)

        fec_ns = frame_ns if self.fec else 0  # FEC needs the next packet in hand: a frame more
        policy = TargetPolicy(
            fixed_ns=None if cfg.latency_ms is None else cfg.latency_ms * 1e6,
            max_ns=cfg.max_latency_ms * 1e6,
            start_ns=cfg.start_latency_ms * 1e6 + fec_ns,
            margin_ns=cfg.margin_ms * 1e6 + fec_ns,
            percentile=cfg.jitter_percentile,
            window=max(8, int(cfg.jitter_window_s * 1e9 / frame_ns)),
            shrink_ns_per_s=cfg.shrink_ms_per_s * 1e6,
        )
        self.control = LatencyController(frame_ns, output.sample_rate, policy, cfg.drift_compensation)
        self._slice = self.control.slice

        # Output FIFO (float32 at the output rate), filled a frame at a time, emptied by pull().
        channels = output.channels
        self._fifo = np.zeros((self._frame_out * 8 + 4096, channels), dtype=np.float32)
        self._head = 0  # the next sample to hand out
        self._tail = 0  # where the next one is written
        self._frame = np.zeros((self.decoder.output.shape[0], channels), dtype=np.float32)
        self._spliced = np.zeros_like(self._frame)  # a frame with a slice cut out
        self._fade = ((np.arange(self._slice, dtype=np.float32) + 0.5) / self._slice)[:, None]
        self._meter_every = round(METER_EVERY_MS * output.sample_rate / 1000)  # samples between measurements
        self._meter_in = 0
        self._resampler = None
        # The resampler is bypassed while the ratio is exactly 1 (no drift estimate, B inside the dead
        # band: the timeline is exact) and the stream has never been resampled: at ratio 1 it would only
        # cost (sinc_fastest: twice the Opus decode). The first ratio other than 1 engages it for good,
        # primed with the audio already written, so that the switch is seamless (see _engage).
        self._resampling = False
        self._engage_after = round(ENGAGE_AFTER_S * output.sample_rate)  # samples handed (see ENGAGE_AFTER_S)
        # Exact mode (set_resampling(False): the receiver is short of CPU): drift is corrected by the step
        # corrections alone, the resampler left out; switching either way is seamless (see _disengage).
        self._exact = False
        # set_resampling()'s request: the state wanted, kept (not a one-shot flag another thread's write
        # could race with); the sink thread applies it while it differs from the state.
        self._resampling_wanted = True
        self._settle = 0  # frames still to go through the converter before it is left (see _disengage)
        self._xfade: F32 | None = None  # the crossfade out of the converter, allocated at the first
        if cfg.drift_compensation:
            from tiality_cli.resample import Resampler

            self._resampler = Resampler(cfg.resampler, channels, self._frame.shape[0])
        # Positions on the output timeline, in samples since the start.
        self._handed = 0  # handed to the sink
        self._due = 0.0  # where the next decoded sample comes out (those still in the resampler count)
        # Latency markers, a ring: per decoded frame, where its first sample comes out, and its times.
        self._mark_pos = np.zeros(MARKS, dtype=np.float64)
        self._mark_capture = np.zeros(MARKS, dtype=np.int64)
        self._mark_arrival = np.zeros(MARKS, dtype=np.int64)
        self._mark_capture_delay = np.zeros(MARKS, dtype=np.int64)
        self._mark_read = 0
        self._mark_write = 0
        self._trim = 0  # samples to cut from the front of the next decoded frame (entering it at the start)
        self._inserted = False  # a slice was inserted since the last frame
        self._wait_budget = 0  # samples by which B may rise waiting for a late packet (up to the target)
        self.latency_ns = math.nan  # the latest decoded frame's ADC-to-DAC latency

        self._k0 = 0  # where playout started (or last resynchronised)
        self._first_arrival = 0
        self._newest_k = 0  # the highest sequence seen since the last resync, and its capture time
        self._newest_capture = 0
        self._missing = 0  # frames missing at their turn
        self._late_missed = 0  # ... whose packet came afterwards
        self._policy: PlayoutConfig | None = None  # set_policy() hands a new policy to the sink thread

    @property
    def buffer_ns(self) -> float:
        """B at the last pull: the playout delay beyond the earliest arrivals."""
        return self.control.buffer_ns

    @property
    def target_ns(self) -> float:
        return self.control.target_ns

    # ---- network thread -------------------------------------------------------------------------------
    def push(self, seq: int, capture_ns: int, payload: bytes, capture_delay_ns: int = 0) -> None:
        """Queues a packet as it arrives (any thread; stamps its arrival time now). ``capture_ns``: the
        ADC time of the frame's first sample on the receiver's wall clock; ``capture_delay_ns``: how long
        the sender's capture device held the frame before handing it over, as the sender measured it."""
        if not -CAPTURE_LIMIT <= capture_ns < CAPTURE_LIMIT:
            capture_ns = 0  # unknown: no latency figure from it
        self._inbox.append((seq, capture_ns, payload, self.clock.monotonic_ns(), capture_delay_ns))

    def end(self) -> None:
        """The sender closed the stream: play what is buffered, then finish."""
        self._inbox.append(None)

    # ---- sink thread ----------------------------------------------------------------------------------
    def pull(self, out: F32, output_delay_ns: int = 0, dac_ns: int | None = None) -> bool:
        """Writes exactly ``len(out)`` samples; returns False when no stream audio was written.

        ``output_delay_ns``: the time from this call to the DAC playing ``out[0]`` (the sink's
        ``delay_ns``), so that ``latency_ms`` reaches the speaker. ``dac_ns``, when the caller knows it:
        the monotonic time ``out[0]`` reaches the DAC, which then wins. A mixer pulling many streams in
        one device block passes it, so that a stream pulled late in the block is not counted late by
        the time the streams before it took."""
        now = self.clock.monotonic_ns()
        if dac_ns is not None:
            output_delay_ns = dac_ns - now
        if self._policy is not None:
            self._apply_policy(self._policy)
        if self._resampling_wanted == self._exact:
            self._apply_resampling(self._resampling_wanted)
        self._drain()
        n = len(out)
        if self.state == State.WAITING:
            jb = self.jb
            start = self.control.start(now, n, jb.next_seq, jb.highest) if self._first_arrival else None
            if start is None:
                if self._ended and not self._first_arrival:
                    self._finish()
                out[:] = 0
                return False
            self._start(start)
            self.state = State.PLAYING
        elif self.state == State.FINISHED:
            out[:] = 0
            return False
        due = self._due
        while self._tail - self._head < n and self.state == State.PLAYING:
            if self._ended and self.jb.next_seq > self.jb.highest:
                break
            self._produce()
        avail = min(n, self._tail - self._head)
        out[:avail] = self._fifo[self._head : self._head + avail]
        if avail < n:
            out[avail:] = 0
        self._mark_latency(avail, now, output_delay_ns)
        self._head += avail
        self._handed += avail
        if self._ended and self.jb.next_seq > self.jb.highest and self._tail == self._head:
            self._finish()
            return avail > 0
        if self._due != due:
            self._control(now, n)
        else:  # nothing decoded: B is as the last control left it (the pull's time and the queue moved
            self.control.tick(now, n)  # alike): the sink's fit and the drift loop take it, no more
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
            seq32, capture, payload, arrival, capture_delay = item
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
                and capture - self._newest_capture - (k - self._newest_k) * self._frame_ns > 1_000_000_000
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
            else:
                i = k & self._mask
                self._arrival[i], self._capture_delay[i] = arrival, capture_delay
            self.control.on_arrival(k, arrival, res != Put.LATE)

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
        self.control.resync(k, arrival)

    def _start(self, start: Start) -> None:
        """Begins playback where the controller said: stale frames before it go unplayed."""
        jb = self.jb
        stale = start.frame - jb.next_seq
        last = None
        while jb.next_seq < start.frame:
            last, _ = jb.pop()
        if last:  # decoded unheard, so that the first frame heard continues it (decoder state, overlap)
            with contextlib.suppress(CorruptPacketError):
                self.decoder.decode(last)
        self._k0 = start.frame
        if start.offset < 0:  # silence first, so that the frame's first sample plays on its target
            self._fifo_write(np.zeros((-start.offset, self.output.channels), dtype=np.float32))
            self._due -= start.offset
        else:
            self._trim = start.offset
        self.stats.stale += stale
        self.stats.stale_ms += (stale * self._frame_out + max(0, start.offset)) * 1000 / self._rate

    def _produce(self) -> None:
        """Appends one frame (decoded, FEC, concealed) or an inserted slice to the FIFO."""
        jb, st, dec, ctl = self.jb, self.stats, self.decoder, self.control
        seq = jb.next_seq
        # Raising B is cheap while the frame whose turn it is has not come: concealing it whole and
        # dropping its packet when it comes is the alternative. So as long as B is short of the target,
        # wait for it a slice at a time (unless the next packet can rebuild it from its FEC).
        waiting = self._wait_budget >= self._slice and jb.peek(seq) is None
        if waiting and self.fec:
            nxt = jb.peek(seq + 1)
            waiting = nxt is None or not _has_fec(nxt)
        if waiting or (ctl.insert and not self._inserted):  # else one slice per frame boundary at most
            self._inserted = True
            self._wait_budget -= self._slice
            n = dec.conceal(self._slice)
            ctl.inserted(n)
            st.inserted += 1
            st.inserted_ms += n * 1000 / self._rate
            self._append(n)
            return
        self._inserted = False
        payload, capture = jb.pop()
        cut = None
        if payload is not None:
            try:
                n = dec.decode(payload) if payload else -1  # libopus would conceal an empty packet silently
            except CorruptPacketError:
                n = -1
            if n != self._frame_out:  # undecodable, or not one frame: conceal, keep the timeline exact
                st.corrupt += 1
                n, capture = dec.conceal(self._frame_out), 0
                st.concealed += 1
            elif ctl.drop and not self._trim:
                cut = self._find_cut(n, ctl.urgent, ctl.drop)
                if cut is not None:
                    ctl.dropped(cut[1])
                    st.skipped += 1
                    st.skipped_ms += cut[1] * 1000 / self._rate
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
        st.frames_played += 1
        i = seq & self._mask
        self._append(n, capture, self._arrival[i], self._capture_delay[i], cut)

    def _find_cut(self, n: int, urgent: bool, want: int = 0) -> tuple[int, int] | None:
        """Where to drop a slice from the decoded frame: (start, length), or None to wait for quiet.

        The quietest pair of adjacent slices is where: if it is below QUIET, its first slice goes; if
        not (and ``urgent``), a stretch of half a slice to a slice whose end best matches its start
        (normalised cross-correlation: for voiced sound, a whole number of pitch periods), so that the
        crossfade over the following slice joins like with like. A frame of one slice goes whole.
        ``want`` more than a slice (a catch-up): that much, up to all but a slice of the frame, from its
        start, crossfaded over the slice after the cut; no search, which would cost every stream of an
        overloaded mixer a search per frame.
        """
        size = self._slice
        if want > size and n >= 2 * size:
            return (0, min(want, n - size))
        x = self.decoder.output[:n]
        if n < 2 * size:
            return (0, n) if urgent or max(int(x.max()), -int(x.min())) < QUIET else None
        slices = x[: n - n % size].reshape(n // size, -1)
        peaks = np.maximum(slices.max(axis=1).astype(np.int32), -slices.min(axis=1).astype(np.int32))
        pairs = np.maximum(peaks[:-1], peaks[1:])
        i = int(np.argmin(pairs))
        at = i * size
        if pairs[i] < QUIET:
            return (at, size)
        if not urgent:
            return None
        mono = x[at : at + 2 * size].mean(axis=1, dtype=np.float64)
        head = mono[:size]
        shortest = size // 2
        corr = np.correlate(mono[shortest:], head, mode="valid")  # lags shortest .. size
        energy = np.convolve(mono[shortest:] ** 2, np.ones(size), mode="valid")
        lag = shortest + int(np.argmax(corr / np.sqrt(energy + 1e-9)))
        return (at, lag)

    def _append(
        self,
        n: int,
        capture: int = 0,
        arrival: int = 0,
        capture_delay: int = 0,
        cut: tuple[int, int] | None = None,
    ) -> None:
        """Appends the decoder's ``n`` samples to the FIFO (less a cut slice or a trimmed start),
        resampled; a decoded frame (``capture`` set) gets a latency marker on its first sample."""
        st = self.stats
        x = self.decoder.output[:n]
        f = self._frame[:n]
        if self._meter_in <= 0:  # one frame in every METER_EVERY_MS is measured (the level is read
            st.peak, st.rms = frame_levels(x, f)  # a few times a second); f receives x / 32768
            self._meter_in = self._meter_every
        else:
            to_float(x, f)
        self._meter_in -= n
        if cut is not None:
            at, length = cut
            if length >= n:
                return  # a one-slice frame dropped whole
            fade = min(self._slice, n - at - length)
            g = self._spliced
            g[:at] = f[:at]
            w = self._fade[:fade]
            g[at : at + fade] = f[at : at + fade] * (1.0 - w) + f[at + length : at + length + fade] * w
            g[at + fade : n - length] = f[at + length + fade : n]
            f = g[: n - length]
        if self._trim:
            capture += self._trim * 1_000_000_000 // self._rate if capture else 0
            f = f[self._trim :]
            self._trim = 0
        if capture:
            i = self._mark_write % MARKS
            self._mark_pos[i] = self._due
            self._mark_capture[i] = capture
            self._mark_arrival[i] = arrival
            self._mark_capture_delay[i] = capture_delay
            self._mark_write += 1
        if self._exact and self._resampling:
            self._disengage(f)
        elif self._resampler is not None and not self._exact:
            ratio = self.control.ratio
            if not self._resampling and self._handed < self._engage_after:
                ratio = 1.0  # exact samples until the converter may engage (ENGAGE_AFTER_S)
            if self._resampling or ratio != 1.0:
                skip = 0 if self._resampling else self._engage()
                m = self._resampler.process(f, ratio)
                self._fifo_write(self._resampler.output[skip:m])
            else:
                self._fifo_write(f)
            self._due += len(f) * ratio
            self.control.resampled(len(f), ratio)
        else:
            self._fifo_write(f)
            self._due += len(f)

    def _engage(self) -> int:
        """Starts resampling after a stretch of exact samples; returns how many samples of its next output
        repeat audio already written (to be dropped).

        The resampler is reset and fed the last samples written, at ratio 1, so that its filter holds the
        signal's history instead of silence; what it outputs for them is discarded, and what it keeps back
        (a sinc filter's half length; linear and zero-order hold lag by one sample instead) comes out again
        at the head of the next call: that many samples go.
        """
        assert self._resampler is not None
        self._resampling = True
        self._resampler.reset()
        history = self._fifo[max(0, self._tail - PRIME) : self._tail]
        if not len(history):
            return 0
        return len(history) - self._resampler.process(history, 1.0) + LAG.get(self.config.resampler, 0)

    def _disengage(self, f: F32) -> None:
        """Leaves the converter without a click, over two decoded frames: ``f`` goes through it at ratio
        1 (``_settle``); at the next, what it holds back comes out first, then its output fades into the
        exact samples over a slice.

        ``f[0]`` is due ``_due - written`` samples into the resampler's output (what it held back, a sinc
        filter's half length); fed at ratio 1, its output from there on is ``f`` delayed by less than a
        sample, so the two are faded across and the timeline continues from whole samples. The frame
        before goes through at ratio 1 because libsamplerate ramps a new ratio in over a call's
        output, which ``_due`` does not model, and the ramps' errors cancel once the ratio is back at 1
        (misaligned by the ramp, the fade dipped the level 5-10 dB at 7-12 kHz at the steer's 0.5 %).
        What remains is the rounding to a whole sample: at most half a sample, a dip of at most 0.7 dB
        at 12 kHz (0.2 dB at 7 kHz) for a millisecond.
        """
        rs = self._resampler
        assert rs is not None
        if self._settle:
            self._settle = 0
            self._fifo_write(rs.output[: rs.process(f, 1.0)])
            self._due += len(f)
            return
        self._resampling = False
        n = len(f)
        m = rs.process(f, 1.0)
        r = rs.output[:m]
        written = self._handed + self._tail - self._head
        held = max(0, min(round(self._due - written), m))
        fade = min(self._slice, n, m - held)
        self._fifo_write(r[:held])
        if fade > 0:
            if self._xfade is None:
                self._xfade = np.zeros((self._slice, self.output.channels), dtype=np.float32)
            w = self._fade if fade == self._slice else ((np.arange(fade) + 0.5) / fade)[:, None]
            g = self._xfade[:fade]
            np.multiply(r[held : held + fade], 1.0 - w, out=g)
            g += f[:fade] * w
            self._fifo_write(g)
        self._fifo_write(f[fade:])
        self._due = float(self._handed + self._tail - self._head)
        rs.reset()

    def _fifo_write(self, y: F32) -> None:
        m = len(y)
        if self._tail + m > len(self._fifo):
            live = self._tail - self._head
            self._fifo[:live] = self._fifo[self._head : self._tail]
            self._head, self._tail = 0, live
            if live + m > len(self._fifo):
                grown = np.zeros((live + m + 4096, self.output.channels), dtype=np.float32)
                grown[:live] = self._fifo[:live]
                self._fifo = grown
        self._fifo[self._tail : self._tail + m] = y
        self._tail += m

    def _mark_latency(self, avail: int, now: int, output_delay_ns: int) -> None:
        """Records the latency, and its stages, of decoded frames whose first sample goes out now."""
        end = self._handed + avail
        if self._mark_read == self._mark_write:
            return
        to_wall = self.clock.wall_ns() - now  # this clock's wall time - its monotonic time
        st = self.stats
        frame_ns = self._frame_ns + self._lookahead_ns
        while self._mark_read < self._mark_write:
            i = self._mark_read % MARKS
            pos = float(self._mark_pos[i])
            if pos >= end:
                break
            handoff = now + (pos - self._handed) * 1e9 / self._rate
            capture = int(self._mark_capture[i]) - to_wall  # on the monotonic clock (exact: both ints)
            arrival = int(self._mark_arrival[i])
            capture_delay = int(self._mark_capture_delay[i])
            total = handoff + output_delay_ns - capture + self._lookahead_ns
            self.latency_ns = total
            st.latency_ms.add(total / 1e6)
            st.stage_capture_ms.add(capture_delay / 1e6)
            st.stage_frame_ms.add(frame_ns / 1e6)
            st.stage_network_ms.add((arrival - capture - self._frame_ns - capture_delay) / 1e6)
            st.stage_buffer_ms.add((handoff - arrival) / 1e6)
            st.stage_output_ms.add(output_delay_ns / 1e6)
            self._mark_read += 1

    def _control(self, now: int, n: int) -> None:
        """Asks the controller what to do next, and publishes its figures: after each pull that decoded
        (once a frame, not on every 5 ms pull: 40 % less control per frame, benchmarks/control_cost.py),
        as only a decode moves B, and only the next decode acts on what the controller says."""
        ctl, st = self.control, self.stats
        ctl.update(now, n, self._due - self._handed, self.jb.next_seq)
        self._wait_budget = max(0, round(-ctl.error_ns * self._rate / 1e9))
        st.buffer_ms = ctl.buffer_ns / 1e6
        st.target_ms = ctl.target_ns / 1e6
        st.drift_ppm = ctl.drift.estimate * 1e6
        st.resampled_ms = ctl.steered_ns / 1e6

    # ---- runtime policy and A/V sync, for the receiver (any thread) ---------------------------------------
    def set_policy(self, latency_ms: float | None, max_latency_ms: float) -> None:
        """Changes the target policy of a running stream; the sink thread applies it at its next pull.

        The jitter buffer was sized for the max latency the stream started with: a higher one counts up to
        half its span (a resync would follow beyond). A fixed target applies at once (in 2.5 ms steps), an
        auto one follows the jitter from where it is.
        """
        span_ms = self.jb.capacity // 2 * self._frame_ns / 1e6
        cfg = replace(self.config, latency_ms=latency_ms, max_latency_ms=min(max_latency_ms, span_ms))
        if cfg.latency_ms is not None and cfg.latency_ms > cfg.max_latency_ms:
            cfg = replace(cfg, latency_ms=cfg.max_latency_ms)
        self._policy = cfg.validate()

    def set_resampling(self, on: bool) -> None:
        """Turns drift compensation's resampling off (exact samples out; the drift is then corrected by
        2.5 ms steps at quiet points, as with ``drift_compensation`` False) or back on, at the sink
        thread's next pull, seamlessly. The receiver turns it off when it runs short of CPU: resampling
        is about a quarter of what a stream costs. A stream without drift compensation ignores it. The
        receiver's economy (ReceiverConfig.economy) sets it for every stream, over what was set here.
        """
        if self._resampler is not None:
            self._resampling_wanted = on

    @property
    def resampling_allowed(self) -> bool:
        """Whether drift compensation may resample (False: exact mode, after set_resampling(False), also
        while the sink thread has yet to apply it)."""
        return self._resampler is not None and self._resampling_wanted

    @property
    def resampling(self) -> bool:
        """Whether the converter is in use (engaged by a ratio other than 1, and not turned off)."""
        return self._resampling and not self._exact

    def _apply_resampling(self, on: bool) -> None:
        ctl = self.control
        self._exact = not on
        self._settle = 0 if on else 1
        ctl.resampling = on
        ctl.economy = not on
        ctl.steer = 0.0
        if on:  # the drift loop missed B's course meanwhile: it starts again (the estimate is kept)
            ctl.drift.restart()

    def _apply_policy(self, cfg: PlayoutConfig) -> None:
        self._policy = None
        self.config = cfg
        ctl = self.control
        fixed = None if cfg.latency_ms is None else cfg.latency_ms * 1e6
        ctl.policy = replace(ctl.policy, fixed_ns=fixed, max_ns=cfg.max_latency_ms * 1e6)
        if fixed is not None:
            ctl.desired_ns = ctl.target_ns = fixed
        else:
            ctl.desired_ns = min(ctl.desired_ns, ctl.policy.max_ns)
            ctl.target_ns = min(ctl.target_ns, ctl.policy.max_ns)
            ctl.refresh_target()

    def capture_to_output_ns(self, capture_ns: int) -> int | None:
        """Where the sample captured at ``capture_ns`` (receiver clock, as pushed) lies in the output, in ns
        after the next sample the sink will pull (negative: already pulled); None before the first decoded
        frame.

        From the latency markers: the decoded frame captured last at or before ``capture_ns`` (or the oldest
        kept), extrapolated at the output rate, so a capture time whose audio is still in the jitter buffer
        maps to where it will play if nothing is skipped or inserted meanwhile. The encoder's look-ahead is
        not included (the receiver adds it, with the output's delay).
        """
        w = self._mark_write
        if w == 0:
            return None
        best, best_cap, oldest, oldest_cap = -1, 0, -1, 0
        for j in range(max(0, w - MARKS), w):
            i = j % MARKS
            cap = int(self._mark_capture[i])
            if cap <= capture_ns and (best < 0 or cap >= best_cap):
                best, best_cap = i, cap
            if oldest < 0 or cap < oldest_cap:
                oldest, oldest_cap = i, cap
        i = best if best >= 0 else oldest
        ahead_ns = (float(self._mark_pos[i]) - self._handed) * 1e9 / self._rate
        return int(ahead_ns) + capture_ns - int(self._mark_capture[i])
