"""StreamPlayout on a simulated clock: one named test per network pathology, tag and trace.

The harness encodes real Opus packets once, frame k carrying a tone whose frequency tags it
(``TAG_HZ[k % 16]``). A simulated ``Sender`` captures packet k at k*T on its own clock (optionally
fast or slow by some ppm), a simulated network delays, reorders, duplicates, drops or stalls the
packets (seeded RNG), and a ``Receiver`` advances a ManualClock through the events in time order: each
packet is pushed at its arrival time and the sink pulls one 5 ms block every 5 ms. No threads, no
sleeps: an hour of audio runs in seconds.

Frame identity is traced with drift compensation off (the engine then hands out exact samples, so
output chunk i is the i-th frame it produced); the latency and drift tests run it on, as it ships.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import math
import random
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import pytest

from tiality_cli.clock import ManualClock
from tiality_cli.codec import OpusEncoder
from tiality_cli.config import AudioFormat, CodecConfig
from tiality_cli.control import DEAD_BAND_NS, MAX_STEER, SLICE_NS
from tiality_cli.playout import PlayoutConfig, State, StreamPlayout

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]

MS = 1_000_000  # ns
S = 1_000_000_000
T0 = 10 * S  # the receiver's clock when the sender captures packet 0
BLOCK_MS = 5  # the sink's period (a WAV sink's block)
WALL = ManualClock().wall_offset_ns  # the ManualClock's wall clock is its monotonic one + this
TAG_HZ = tuple(400 + 200 * i for i in range(16))  # whole cycles in any Opus frame of 5 ms or more
STEREO_48K = AudioFormat()  # the field default: 48 kHz stereo, 20 ms frames
MONO_16K = AudioFormat(16_000, 1, 20_000)
CELT = CodecConfig(application="restricted-lowdelay")  # CELT only, no in-band FEC possible
EXACT = PlayoutConfig(drift_compensation=False)

# A packet as the receiver sees it: (arrival time, 32-bit sequence number, capture wall time, payload).
Arrival = tuple[int, int, int, bytes]


# ---- the sender --------------------------------------------------------------------------------------


@functools.cache
def tagged_payloads(fmt: AudioFormat, codec: CodecConfig = CELT) -> tuple[bytes, ...]:
    """16 Opus packets, packet i a tone of TAG_HZ[i]; packet k of a stream is payloads[k % 16].

    The encoder runs one cycle first, so that the decoder state at the cycle's seam is the one the
    encoder had: the cycle repeats for an hour without a glitch.
    """
    enc = OpusEncoder(fmt, codec)
    t = np.arange(fmt.frame_samples) / fmt.sample_rate
    out = []
    for i in range(32):
        enc.input[:] = (0.3 * 32767 * np.sin(2 * np.pi * TAG_HZ[i % 16] * t)).astype(np.int16)[:, None]
        out.append(enc.encode())
    enc.close()
    return tuple(out[16:])


def tags(frames: Iterable[int]) -> list[int]:
    """The tags the given frames carry."""
    return [k % 16 for k in frames]


@dataclass
class Sender:
    """Packet k is captured (and sent) at k*T on the sender's clock, which runs ``ppm`` fast against ours."""

    fmt: AudioFormat = STEREO_48K
    codec: CodecConfig = CELT
    ppm: float = 0.0
    seq0: int = 0  # the 32-bit sequence number of packet 0
    stamp_lead_ns: int = 0  # capture stamps this long before the packet leaves (ADC times: a frame + the
    # capture device's delay); 0 stamps the sending time

    def __post_init__(self) -> None:
        self.payloads = tagged_payloads(self.fmt, self.codec)

    def send_ns(self, k: int) -> int:
        """When packet k leaves, on the receiver's clock."""
        return T0 + round(k * self.fmt.frame_ns / (1.0 + self.ppm * 1e-6))

    def packet(self, k: int, arrival_ns: int, payload: bytes | None = None) -> Arrival:
        # Capture stamps are wall-clock (NTP-synced) times: it is the sample clock that drifts.
        seq = (self.seq0 + k) & 0xFFFF_FFFF
        return (
            arrival_ns,
            seq,
            self.send_ns(k) - self.stamp_lead_ns + WALL,
            self.payloads[k % 16] if payload is None else payload,
        )


# ---- the network -------------------------------------------------------------------------------------


@dataclass
class Network:
    """Per-packet one-way delay: ``base_ms`` plus jitter uniform in [0, ``jitter_ms``] (seeded)."""

    base_ms: float = 5.0
    jitter_ms: float = 2.0
    seed: int = 1

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def delay_ns(self) -> int:
        return round((self.base_ms + self.rng.uniform(0.0, self.jitter_ms)) * MS)


def transmit(
    sender: Sender,
    frames: Iterable[int],
    net: Network | None = None,
    *,
    extra_ms: Callable[[int], float] | None = None,
    copies_ms: Callable[[int], Sequence[float]] | None = None,
    payload: Callable[[int], bytes | None] | None = None,
) -> list[Arrival]:
    """Sends ``frames`` through ``net``: ``extra_ms(k)`` delays packet k more, ``copies_ms(k)`` delivers
    duplicates that many ms after it, ``payload(k)`` replaces its payload. Sorted by arrival (stable)."""
    net = net or Network()
    out: list[Arrival] = []
    for k in frames:
        t = sender.send_ns(k) + net.delay_ns() + round((extra_ms(k) if extra_ms else 0.0) * MS)
        p = payload(k) if payload else None
        out.append(sender.packet(k, t, p))
        for dup in copies_ms(k) if copies_ms else ():
            out.append(sender.packet(k, t + round(dup * MS), p))
    out.sort(key=lambda a: a[0])
    return out


def stream(sender: Sender, frames: range, net: Network) -> Iterator[Arrival]:
    """``transmit`` without extras, lazily (an hour is 180,000 packets): a heap holds the packets in
    flight and releases each once no packet sent later can arrive before it."""
    flight: list[Arrival] = []
    for k in frames:
        t = sender.send_ns(k)
        heapq.heappush(flight, sender.packet(k, t + net.delay_ns()))
        while flight[0][0] <= t + net.base_ms * MS:
            yield heapq.heappop(flight)
    while flight:
        yield heapq.heappop(flight)


def stall(arrivals: list[Arrival], start_s: float, stop_s: float) -> list[Arrival]:
    """Nothing arrives in [start, stop): what would have is held and arrives at ``stop`` in one burst."""
    a, b = T0 + round(start_s * S), T0 + round(stop_s * S)
    held = [(max(t, b) if a <= t < b else t, seq, c, p) for t, seq, c, p in arrivals]
    return sorted(held, key=lambda x: x[0])


def inversions(arrivals: Sequence[Arrival]) -> int:
    """Packets that arrived after a later-numbered one (seq distance < 2^31, so across the wrap too)."""
    n, top = 0, arrivals[0][1]
    for _, seq, _, _ in arrivals[1:]:
        if (top - seq) % 2**32 < 2**31 and seq != top:
            n += 1
        else:
            top = seq
    return n


# ---- the receiver ------------------------------------------------------------------------------------


@dataclass
class Trace:
    """What the sink saw, one entry per pull (compact arrays: an hour is 720,000 pulls)."""

    t_ns: array[int] = field(default_factory=lambda: array("q"))
    buffer_ms: array[float] = field(default_factory=lambda: array("d"))
    target_ms: array[float] = field(default_factory=lambda: array("d"))
    drift_ppm: array[float] = field(default_factory=lambda: array("d"))
    latency_ms: array[float] = field(default_factory=lambda: array("d"))  # the latest decoded frame's
    played: array[int] = field(default_factory=lambda: array("b"))  # pull() wrote stream audio

    def select(self, start_s: float = -math.inf, stop_s: float = math.inf) -> npt.NDArray[np.bool_]:
        """A mask of the pulls at stream time [start_s, stop_s)."""
        t = (np.frombuffer(self.t_ns, dtype=np.int64) - T0) / S
        return (t >= start_s) & (t < stop_s)

    def buffer(self, start_s: float = -math.inf, stop_s: float = math.inf) -> F64:
        return np.frombuffer(self.buffer_ms)[self.select(start_s, stop_s)]

    def times(self, start_s: float = -math.inf, stop_s: float = math.inf) -> F64:
        """The pulls' times (stream seconds)."""
        sel = self.select(start_s, stop_s)
        return ((np.frombuffer(self.t_ns, dtype=np.int64) - T0) / S)[sel]

    def target(self, start_s: float = -math.inf, stop_s: float = math.inf) -> F64:
        return np.frombuffer(self.target_ms)[self.select(start_s, stop_s)]

    def error(self, start_s: float = -math.inf, stop_s: float = math.inf) -> F64:
        """B - target (ms)."""
        sel = self.select(start_s, stop_s)
        return np.frombuffer(self.buffer_ms)[sel] - np.frombuffer(self.target_ms)[sel]

    def drift(self, start_s: float = -math.inf, stop_s: float = math.inf) -> F64:
        return np.frombuffer(self.drift_ppm)[self.select(start_s, stop_s)]

    def latency(self, start_s: float = -math.inf, stop_s: float = math.inf) -> F64:
        """ADC-to-DAC latency of the frame most recently handed out, per pull (NaN before the first)."""
        return np.frombuffer(self.latency_ms)[self.select(start_s, stop_s)]

    def first_at_or_above(self, target_ms: float, after_s: float) -> float:
        """Stream time of the first pull after ``after_s`` whose target is >= ``target_ms``."""
        sel = self.select(after_s) & (np.frombuffer(self.target_ms) >= target_ms)
        return float((np.frombuffer(self.t_ns, dtype=np.int64)[sel][0] - T0) / S)


class Receiver:
    """A StreamPlayout on a ManualClock: each packet pushed at its arrival, a block pulled every 5 ms."""

    def __init__(
        self,
        fmt: AudioFormat = STEREO_48K,
        config: PlayoutConfig = EXACT,
        *,
        fec: bool = False,
        record: bool = True,
        wake_ms: float = 0.0,
        sink_stall: tuple[float, float] | None = None,
        sink_slip: tuple[float, float] | None = None,
        lookahead: int = 0,
        capture_delay_ns: int = 0,
        output_delay_ns: int = 0,
        mixed_before_ns: int = 0,
    ) -> None:
        self.clock = ManualClock(start_ns=T0)
        self.playout = StreamPlayout(fmt, fmt, config, self.clock, fec=fec, lookahead_samples=lookahead)
        self.capture_delay_ns = capture_delay_ns  # what the sender reports with every packet
        self.output_delay_ns = output_delay_ns  # what the sink reports with every pull
        # A mixer's other streams, pulled first in each block, take this long: the pull then runs that much
        # after the block's time and is given the block's DAC time (as Receiver.fill does).
        self.mixed_before_ns = mixed_before_ns
        self.fmt = fmt
        self.block = np.zeros((fmt.sample_rate * BLOCK_MS // 1000, fmt.channels), dtype=np.float32)
        self.next_pull = T0 + BLOCK_MS * MS // 2  # the sink's phase is unrelated to the sender's
        self.record = record
        self.wake_ms = wake_ms  # the sink's thread wakes up to this late (seeded); its period is exact
        # (start, stop) in stream seconds: the sink's thread stalls, then catches up with pulls in a row
        # (20 us apart), as a paced file or null sink does.
        self.stall_ns = (T0 + round(sink_stall[0] * S), T0 + round(sink_stall[1] * S)) if sink_stall else None
        # (at, ms): at stream second ``at`` the output device underruns and restarts ``ms`` later (an
        # xrun): its pulls, and the sample clock behind them, move that much later for good.
        self.slip = (T0 + round(sink_slip[0] * S), round(sink_slip[1] * MS)) if sink_slip else None
        self._rng = random.Random(7)
        self._late_ns = 0
        self._arrivals: Iterator[Arrival] = iter(())
        self._next: Arrival | None = None
        self._end = False
        self.first_arrival_ns = 0
        self.first_audio_ns = 0
        self.audio: list[F32] = []  # every block that carried stream audio
        self.trace = Trace()

    def send(self, arrivals: Iterable[Arrival], *, end: bool = True) -> Receiver:
        """What the network will deliver; with ``end`` the sender closes the stream after the last one."""
        self._arrivals = iter(arrivals)
        self._next = next(self._arrivals, None)
        self._end = end
        return self

    def run(self, until_s: float) -> Receiver:
        """Runs the clock to stream time ``until_s``: pushes packets as they arrive, pulls every 5 ms."""
        pb, clock, tr = self.playout, self.clock, self.trace
        until = T0 + round(until_s * S)
        while self.next_pull < until:
            if self.slip and self.next_pull >= self.slip[0]:
                self.next_pull += self.slip[1]
                self.slip = None
            wake = self.next_pull + self._late_ns
            if self.stall_ns and self.stall_ns[0] <= wake < self.stall_ns[1]:
                wake = max(self.stall_ns[1], clock.now_ns + 20_000)
            nxt = self._next
            if nxt is not None and nxt[0] <= wake:
                clock.now_ns = max(clock.now_ns, nxt[0])
                pb.push(nxt[1], nxt[2], nxt[3], self.capture_delay_ns)
                self.first_arrival_ns = self.first_arrival_ns or clock.now_ns
                self._next = next(self._arrivals, None)
                if self._next is None and self._end:
                    pb.end()
                continue
            clock.now_ns = wake + self.mixed_before_ns
            if self.mixed_before_ns:
                played = pb.pull(self.block, 0, wake + self.output_delay_ns)
            else:
                played = pb.pull(self.block, self.output_delay_ns)
            if played:
                self.first_audio_ns = self.first_audio_ns or wake
                if self.record:
                    self.audio.append(self.block.copy())
            tr.t_ns.append(self.next_pull)
            tr.buffer_ms.append(pb.buffer_ns / MS)
            tr.target_ms.append(pb.target_ns / MS)
            tr.drift_ppm.append(pb.stats.drift_ppm)
            tr.latency_ms.append(pb.latency_ns / MS)
            tr.played.append(played)
            self.next_pull += BLOCK_MS * MS
            if self.wake_ms:
                self._late_ns = round(self._rng.uniform(0.0, self.wake_ms) * MS)
        return self

    def run_to_end(self, limit_s: float = 600.0) -> Receiver:
        """Runs until the stream has finished (the test fails if it has not by ``limit_s``)."""
        while self.playout.state != State.FINISHED:
            assert (self.next_pull - T0) / S < limit_s, "the stream never finished"
            self.run((self.next_pull - T0) / S + 1.0)
        return self

    def first_sample_ns(self) -> int:
        """When the first non-zero sample of stream audio was handed out (after any leading silence)."""
        first = np.flatnonzero(np.abs(self.audio[0]).max(axis=1) > 0)[0]
        return self.first_audio_ns + int(first) * S // self.fmt.sample_rate

    def output(self) -> F32:
        """The stream audio handed to the sink, from its first sample."""
        return np.concatenate(self.audio) if self.audio else np.zeros((0, self.fmt.channels), np.float32)

    def played_tags(self) -> list[int]:
        """The tag of each frame handed out, in order (exact-samples mode: output chunk i is frame i)."""
        n, x = self.fmt.frame_samples, self.output()
        return [identify(x[i * n : (i + 1) * n], self.fmt.sample_rate) for i in range(len(x) // n)]


def identify(chunk: F32, rate: int) -> int:
    """The tag whose tone dominates a frame of output (-1 for silence)."""
    x = chunk.mean(axis=1).astype(np.float64)[len(chunk) // 4 :]  # past the codec delay and overlap
    if float(np.sqrt(np.mean(x**2))) < 1e-3:
        return -1
    hz = float(np.argmax(np.abs(np.fft.rfft(x * np.hanning(len(x)), n=rate // 10)))) * 10.0  # 10 Hz bins
    return int(np.argmin([abs(hz - f) for f in TAG_HZ]))


def mismatches(played: Sequence[int], expected: Sequence[int]) -> list[int]:
    """Positions where the played frames' tags differ from the expected ones."""
    assert len(played) >= len(expected)
    return [i for i, (p, e) in enumerate(zip(played, expected, strict=False)) if p != e]


# ---- one test per pathology ---------------------------------------------------------------------------


def test_clean_stream_plays_every_frame_once_in_order() -> None:
    rx = Receiver().send(transmit(Sender(), range(250))).run_to_end()
    st = rx.playout.stats
    assert mismatches(rx.played_tags(), tags(range(250))) == []
    assert (st.packets, st.frames_played, st.concealed, st.late, st.lost) == (250, 250, 0, 0, 0)
    assert (st.duplicates, st.skipped, st.inserted, st.corrupt, st.resyncs) == (0, 0, 0, 0, 0)


def test_reordered_packets_play_in_sequence() -> None:
    # Every 7th packet is held back 30 ms, behind the next one (20 ms later); the start target covers it.
    arrivals = transmit(Sender(), range(300), extra_ms=lambda k: 30.0 if k % 7 == 3 else 0.0)
    assert inversions(arrivals) == 43
    rx = Receiver(config=PlayoutConfig(drift_compensation=False, start_latency_ms=40)).send(arrivals)
    st = rx.run_to_end().playout.stats
    assert mismatches(rx.played_tags(), tags(range(300))) == []
    assert (st.frames_played, st.late, st.concealed, st.duplicates, st.lost) == (300, 0, 0, 0, 0)
    assert rx.trace.target(1.0).min() > 30.0  # the target learnt the reordering delay


def test_duplicates_are_dropped_and_counted() -> None:
    # Every 5th packet comes twice 1 ms apart (before its turn), every 9th once more 150 ms later (after
    # it has played; none so late at the end, where the stream would close after it).
    def copies(k: int) -> list[float]:
        return ([1.0] if k % 5 == 0 else []) + ([150.0] if k % 9 == 0 and k < 290 else [])

    rx = Receiver().send(transmit(Sender(), range(300), copies_ms=copies))
    st = rx.run_to_end().playout.stats
    assert st.duplicates == 60 + 33
    assert (st.packets, st.late, st.lost, st.concealed, st.frames_played) == (393, 0, 0, 0, 300)
    assert mismatches(rx.played_tags(), tags(range(300))) == []


def test_sequence_numbers_wrap_at_2_32() -> None:
    # Packet 150 is numbered 0; 149 (numbered 2^32 - 1) is held back behind it, within the 40 ms buffer.
    sender = Sender(seq0=2**32 - 150)
    arrivals = transmit(sender, range(300), extra_ms=lambda k: 30.0 if k == 149 else 0.0)
    assert [a[1] for a in arrivals[148:152]] == [2**32 - 2, 0, 2**32 - 1, 1]
    rx = Receiver(config=PlayoutConfig(latency_ms=40, drift_compensation=False)).send(arrivals)
    st = rx.run_to_end().playout.stats
    assert mismatches(rx.played_tags(), tags(range(300))) == []
    assert (st.frames_played, st.late, st.lost, st.concealed, st.resyncs) == (300, 0, 0, 0, 0)


def test_late_packets_are_dropped_counted_and_concealed() -> None:
    # 30 ms of buffer; packets 50, 51 and 120 come 100 ms late, and 120's late copy comes twice.
    late = {50, 51, 120}
    arrivals = transmit(
        Sender(),
        range(200),
        extra_ms=lambda k: 100.0 if k in late else 0.0,
        copies_ms=lambda k: [5.0] if k == 120 else [],
    )
    rx = Receiver(config=PlayoutConfig(latency_ms=30, drift_compensation=False)).send(arrivals)
    st = rx.run_to_end().playout.stats
    assert (st.late, st.duplicates, st.concealed, st.lost, st.frames_played) == (3, 1, 3, 0, 200)
    assert mismatches(rx.played_tags(), tags(range(200))) == sorted(late)  # concealment at their turns


def test_loss_bursts_are_concealed_counted_and_the_output_stays_continuous() -> None:
    lost = set(range(40, 50)) | {90, 91, 92}  # 200 ms, then 60 ms
    rx = Receiver().send(transmit(Sender(), (k for k in range(200) if k not in lost)))
    st = rx.run_to_end().playout.stats
    assert (st.concealed, st.lost, st.late, st.frames_played, st.inserted) == (13, 13, 0, 200, 0)
    # One block per pull from the first frame to the last, and the frames after a gap stay in place.
    played = np.frombuffer(rx.trace.played, dtype=np.int8)
    first = int(np.argmax(played))
    assert played[first : first + 200 * 4].all()
    assert len(rx.output()) == 200 * STEREO_48K.frame_samples
    assert mismatches(rx.played_tags(), tags(range(200))) == sorted(lost)


@pytest.mark.parametrize("jump", [1_000_000, -1_100], ids=["forward", "backward"])
def test_large_sequence_jump_resynchronises(jump: int) -> None:
    # The sender's sequence jumps at packet 100 (restarted from 0 when backward); capture times go on.
    sender = Sender(seq0=1_000)
    arrivals = transmit(sender, range(200))
    arrivals = [
        (t, (seq + jump if i >= 100 else seq) & 0xFFFF_FFFF, c, p)
        for i, (t, seq, c, p) in enumerate(arrivals)
    ]
    rx = Receiver().send(arrivals)
    st = rx.run_to_end().playout.stats
    # Playout restarts at the new number: every frame plays once, in order, none counted late or lost
    # (without the resynchronisation, every packet after a backward jump would be late).
    assert st.resyncs == 1
    assert (st.late, st.lost, st.concealed, st.skipped, st.inserted, st.frames_played) == (0, 0, 0, 0, 0, 200)
    assert mismatches(rx.played_tags(), tags(range(200))) == []


def test_stall_then_burst_drops_the_stale_audio_and_keeps_latency() -> None:
    # 10 s at 48 kHz stereo, drift compensation on; nothing arrives from 3 s to 5 s, then all at once.
    arrivals = stall(transmit(Sender(), range(500), Network(jitter_ms=4.0)), 3.0, 5.0)
    rx = Receiver(config=PlayoutConfig(), record=False).send(arrivals)
    st = rx.playout.stats
    rx.run(3.0)
    latency_before = st.latency_ms.max()
    target_before = rx.trace.target(1.0, 3.0).max()
    st.latency_ms.clear()
    rx.run(6.0)
    st.latency_ms.clear()
    rx.run(9.8)
    # The 100 frames of the stall were concealed at their turns; their packets came late and were
    # dropped (not lost: they came); no frame was skipped or inserted, nothing had to be caught up.
    assert (st.concealed, st.late, st.lost, st.skipped, st.inserted) == (100, 100, 0, 0, 0)
    assert st.resyncs == 0  # the burst's packets are behind the playout position, but not a restart
    # The burst was not taken for jitter: the target did not rise. B did not move either: it rests at
    # the short edge of the dead band (1 ms; measured: 0.9-1.2 ms short): it started on the start
    # target (10 ms), the jitter then set the target 1.5-1.9 ms higher, and the phase term brought B
    # back to the band, not onto the target, so the timeline stays exact. (The old bound, 0.5 ms, held
    # by where the old start fell on the 5 ms pull grid: B began 0-5 ms over the start target.)
    assert rx.trace.target(3.0).max() <= target_before + 0.5
    assert np.abs(rx.trace.error(1.0)).max() < 1.25
    assert np.abs(np.diff(rx.trace.buffer(4.9, 5.5))).max() < 0.1
    # A second after the burst, capture-to-sink latency is what it was before the stall.
    assert len(st.latency_ms) > 100
    assert st.latency_ms.max() <= latency_before + 0.5


@pytest.mark.parametrize("drift_compensation", [False, True], ids=["exact", "resampled"])
def test_sink_stall_and_catch_up_drop_nothing(drift_compensation: bool) -> None:
    # The receiver's own sink thread stalls for 300 ms at 4 s (a busy machine), then catches up with 60
    # pulls in a row. Its clock reading is 300 ms late at first, but its sample clock is not: nothing
    # is skipped (then inserted back) to chase a latency that the catch-up itself takes away.
    config = PlayoutConfig(drift_compensation=drift_compensation)
    rx = Receiver(config=config, sink_stall=(4.0, 4.3))
    st = rx.send(transmit(Sender(), range(500), Network(jitter_ms=4.0))).run_to_end().playout.stats
    assert (st.skipped, st.inserted, st.late, st.concealed, st.frames_played) == (0, 0, 0, 0, 500)
    assert np.abs(np.diff(rx.trace.buffer(3.9, 4.5))).max() < 0.1  # B never saw the stall
    if not drift_compensation:
        assert mismatches(rx.played_tags(), tags(range(500))) == []


@pytest.mark.parametrize(("slip_ms", "wake_ms"), [(20.0, 1.0), (60.0, 3.0)], ids=["20ms", "60ms"])
def test_an_output_underrun_is_not_taken_for_drift(slip_ms: float, wake_ms: float) -> None:
    # The output device underruns at 4 s and restarts ``slip_ms`` later (an xrun: a busy machine, an
    # ALSA buffer of 20 ms), on a link without drift: every later sample plays that much later. The
    # playout brings the latency back (dropping at quiet points, resampling the rest) and the drift
    # estimate stays near 0. Before: the timeline's re-fit 0.5 s later moved B by the slip inside one
    # drift-loop block, which the loop took for a clock running fast (20 ms: 300-800 ppm; seen on the
    # virtual card: 2,000 ppm, the clamp) and steered and dropped by for many seconds.
    rx = Receiver(config=PlayoutConfig(), sink_slip=(4.0, slip_ms), wake_ms=wake_ms)
    st = rx.send(transmit(Sender(), range(1000), Network(jitter_ms=2.0))).run_to_end().playout.stats
    assert np.abs(rx.trace.drift()).max() < 20.0
    assert (st.late, st.concealed, st.frames_played) == (0, 0, 1000)
    # Back in the dead band above the target (B may sit up to 2 ms over it with the ratio at 1).
    before, after = steady_latency(rx, 2.0, 4.0), steady_latency(rx, 15.0, 20.0)
    assert -0.5 < after - before < DEAD_BAND_NS / 1e6 + 0.5, (before, after)
    assert st.skipped_ms <= slip_ms + 2 * SLICE_NS / 1e6


def test_a_backlog_goes_in_a_few_cuts_not_a_slice_a_frame() -> None:
    # The output falls 100 ms behind at 4 s (a connect burst held the mixer up; an xrun) and plays on
    # from there: every stream then holds 100 ms more than its target. Beyond 20 ms over, the excess
    # goes in one cut per frame (up to all but a slice of it), not a 2.5 ms slice per frame: measured,
    # 6 cuts and back within 4.5 ms of the target by 5.7 s, where a slice a frame took 46 cuts (each a
    # search for where to cut, in every stream of a mixer that is already behind) and until 6.5 s.
    rx = Receiver(config=PlayoutConfig(), sink_slip=(4.0, 100.0), wake_ms=3.0)
    st = rx.send(transmit(Sender(), range(1000), Network(jitter_ms=2.0))).run_to_end().playout.stats
    assert (st.late, st.concealed, st.frames_played) == (0, 0, 1000)
    assert st.skipped <= 8 and 80.0 < st.skipped_ms <= 100.0, (st.skipped, st.skipped_ms)
    t, err = rx.trace.times(4.0), rx.trace.error(4.0)
    assert err.max() > 90.0 and t[err > 4.5].max() < 5.8
    assert np.abs(rx.trace.drift()).max() < 20.0  # a step, not a clock running fast
    before, after = steady_latency(rx, 2.0, 4.0), steady_latency(rx, 15.0, 20.0)
    assert -0.5 < after - before < DEAD_BAND_NS / 1e6 + 0.5, (before, after)


def _jittery(rng: random.Random, schedule: Callable[[float], float]) -> Callable[[int], float]:
    """Extra delay for packet k: uniform in [0, schedule(stream time of k)] ms."""
    return lambda k: rng.uniform(0.0, schedule(k * STEREO_48K.frame_ms / 1000))


def test_target_rises_quickly_when_jitter_rises() -> None:
    # 10 s of 0-4 ms jitter, then 0-40 ms.
    extra = _jittery(random.Random(3), lambda t: 40.0 if t >= 10.0 else 4.0)
    arrivals = transmit(Sender(), range(1000), Network(jitter_ms=0.0), extra_ms=extra)
    rx = Receiver(config=PlayoutConfig(), record=False).send(arrivals).run(10.0)
    st = rx.playout.stats
    # 4 ms of jitter + 3 ms margin + a sink block (the resampler slides frames across the blocks).
    assert rx.trace.target(5.0, 10.0).min() > 11.5 and rx.trace.target(5.0, 10.0).max() < 12.5
    rx.run(11.5)
    # Within half a second the target covers the new jitter's bulk, all of it within 1.5 s (as soon as
    # 0.5 % of the window, 3 packets, have shown it); B follows at once, inserting a 2.5 ms slice of
    # concealment per frame (12 slices, 30 ms; the old whole-frame inserts: 2 frames, 40 ms).
    assert rx.trace.first_at_or_above(40.0, 10.0) < 10.5
    assert rx.trace.first_at_or_above(45.0, 10.0) < 11.5
    assert st.inserted == 12
    assert st.late == 11  # the packets that came before the target had risen (whole-frame inserts: 15)
    rx.run(19.8)
    assert st.late == 11  # and none after
    assert (st.inserted, st.skipped) == (12, 0)
    assert rx.trace.target(12.0).max() < 48.0 + 0.5  # 40 ms of jitter + 3 ms margin + a block
    # As the target creeps up, the phase term keeps B within 1 ms short of it (measured: -1.8 to -0.6;
    # before, the last whole-frame insert overshot it: 2.4 to 5.7 ms over).
    err = rx.trace.error(12.0)
    assert err.min() > -2.5 and err.max() < 6.0


def test_target_falls_slowly_and_never_exceeds_max_latency() -> None:
    # 10 s of 0-300 ms jitter (beyond --max-latency 200), then 0-4 ms for 80 s.
    extra = _jittery(random.Random(4), lambda t: 300.0 if t < 10.0 else 4.0)
    arrivals = transmit(Sender(), range(4500), Network(jitter_ms=0.0), extra_ms=extra)
    rx = Receiver(config=PlayoutConfig(), record=False).send(arrivals).run(89.8)
    st, tr = rx.playout.stats, rx.trace
    assert tr.target().max() == 200.0  # reached, and capped
    assert tr.buffer(1.0).max() < 200.0 + 25.0  # B at most the cap + the skip threshold (a frame + 5 ms)
    assert st.inserted == 70  # B rose with the target, by 2.5 ms slices (175 ms)
    # Once the jitter has calmed down the target holds while the 10 s window remembers it, then falls by
    # at most 5 ms per second, to the quiet link's 4 ms of jitter + 3 ms margin + a sink block. (The
    # controller runs once per decoded frame: each fall is at most 5 ms/s times the time since the last.)
    assert tr.target(10.0, 15.0).min() == 200.0
    target, t_s = tr.target(10.0), tr.times(10.0)
    changed = np.flatnonzero(np.diff(target)) + 1
    falls = target[changed] - target[changed - 1]
    since_ms = (t_s[changed] - t_s[np.concatenate(([0], changed[:-1]))]) * 1000
    assert (falls >= -5.0 * since_ms / 1000 - 1e-9).all() and falls.min() < 0
    assert tr.target(25.0, 25.1).min() > 150.0
    assert tr.target(60.0).min() > 11.5 and tr.target(60.0).max() < 12.5
    # B follows it down by resampling alone (at most 0.5 %: 5 ms/s, as fast as the target may fall),
    # 3.6-4.5 ms over it (whole-frame skips left it up to 26.5 ms over); then it settles into the dead
    # band (the phase term's time constant is 0.5 s). The two drops (3.3 ms) were in the first two
    # seconds, while the floor and the target were still being found.
    falling = tr.error(20.0, 55.0)
    assert falling.min() > 0.0 and falling.max() < 20.0 + 5.0 + 2.0
    assert st.skipped == 2
    assert np.abs(tr.error(85.0)).max() < 2.5


@pytest.mark.parametrize(("frame_us", "inserts"), [(2_500, 9), (60_000, 9)], ids=["2.5ms", "60ms"])
def test_skip_and_insert_thresholds_suit_small_and_large_frames(frame_us: int, inserts: int) -> None:
    # 15 s of 0-4 ms jitter, then 10 s of 0-30 ms; 16 kHz mono.
    fmt = AudioFormat(16_000, 1, frame_us)
    rng = random.Random(5)

    def extra(k: int) -> float:
        return rng.uniform(0.0, 30.0 if k * fmt.frame_ms / 1000 >= 15.0 else 4.0)

    arrivals = transmit(
        Sender(fmt), range(round(25 * S / fmt.frame_ns)), Network(jitter_ms=0.0), extra_ms=extra
    )
    rx = Receiver(fmt, PlayoutConfig(), record=False).send(arrivals).run(15.0)
    st = rx.playout.stats
    # Mere jitter never skips or inserts, be the frames 2.5 ms or 60 ms (the thresholds do not depend on
    # the frame: 3 ms short, 4.5 ms over; every step is a 2.5 ms slice).
    assert (st.skipped, st.inserted, st.late) == (0, 0, 0)
    assert np.abs(rx.trace.error(2.0)).max() < 2.0
    rx.run(24.9)
    # When the target jumps by 25 ms, B follows by inserting slices (22.5 ms), and no skip undoes them:
    # after an insert, B stays short of the skip threshold.
    assert (st.skipped, st.inserted) == (0, inserts)
    err = rx.trace.error(17.0)
    assert err.min() > -max(5.0, fmt.frame_ms / 4) and err.max() < fmt.frame_ms + 5.0


def test_fixed_latency_mode_holds_its_target() -> None:
    arrivals = transmit(Sender(), range(2000), Network(jitter_ms=20.0))
    rx = Receiver(config=PlayoutConfig(latency_ms=40)).send(arrivals).run_to_end()
    st = rx.playout.stats
    assert set(rx.trace.target()) == {40.0}
    # The first frame's first sample plays once its packet has waited 40 ms, to the sample: the pull
    # whose block spans that moment starts with as much silence (here 9 samples).
    assert 40 * MS <= rx.first_sample_ns() - rx.first_arrival_ns < 40 * MS + 100_000
    # B starts above the target by the first packet's own jitter (B counts from the earliest arrival,
    # which takes a few packets to see), then the phase term brings it back to the target in the first 2
    # s, gently (at most 0.5 %: inaudible, and the waveform barely slides).
    assert np.abs(rx.trace.error(0.1)).max() < 7.0
    assert np.abs(rx.trace.error(30.0, 39.9)).max() < 3.0
    assert (st.late, st.concealed, st.skipped, st.inserted, st.frames_played) == (0, 0, 0, 0, 2000)


FEC_16K = CodecConfig(application="voip", bitrate=32_000, inband_fec=True, packet_loss_perc=20)


@pytest.mark.parametrize(
    ("codec", "fec", "recovered"),
    [(FEC_16K, True, True), (FEC_16K, False, False), (CELT, True, False)],
    ids=["fec", "fec-off", "celt-has-none"],
)
def test_fec_rebuilds_a_lost_frame_from_the_next_packet(
    codec: CodecConfig, fec: bool, recovered: bool
) -> None:
    sender = Sender(MONO_16K, codec)
    rx = Receiver(MONO_16K, PlayoutConfig(drift_compensation=False), fec=fec)
    st = rx.send(transmit(sender, (k for k in range(100) if k != 40))).run_to_end().playout.stats
    assert (st.lost, st.frames_played, st.late) == (1, 100, 0)
    # With FEC the rebuilt frame carries frame 40's own tone; concealment only carries 39's on.
    assert (st.fec_recovered, st.concealed) == ((1, 0) if recovered else (0, 1))
    assert mismatches(rx.played_tags(), tags(range(100))) == ([] if recovered else [40])
    if fec and recovered:
        assert rx.trace.target(1.0).min() > 20.0  # an auto target holds the next packet: a frame more


def test_corrupt_payloads_are_concealed_and_counted() -> None:
    bad = {
        30: b"",  # libopus would conceal 120 ms for it, silently
        31: b"\xff",  # code 3 without its frame count
        60: b"\x0b\x00",  # a frame length beyond the packet
        90: tagged_payloads(AudioFormat(48_000, 2, 10_000))[0],  # valid Opus, but 10 ms, not 20
    }
    rx = Receiver().send(transmit(Sender(), range(150), payload=bad.get))
    st = rx.run_to_end().playout.stats
    assert (st.corrupt, st.concealed, st.lost, st.late, st.frames_played) == (4, 4, 0, 0, 150)
    assert mismatches(rx.played_tags(), tags(range(150))) == sorted(bad)


@pytest.mark.parametrize("drift_compensation", [False, True], ids=["exact", "resampled"])
def test_end_of_stream_drains_and_finishes(drift_compensation: bool) -> None:
    rx = Receiver(config=PlayoutConfig(drift_compensation=drift_compensation))
    rx.send(transmit(Sender(), range(137))).run_to_end()
    pb = rx.playout
    assert pb.state == State.FINISHED and pb.finished.is_set()
    assert (pb.stats.frames_played, pb.stats.lost, pb.stats.concealed) == (137, 0, 0)
    n = 137 * STEREO_48K.frame_samples
    out = rx.output()
    if drift_compensation:  # the resampler keeps its filter's few samples when the input ends
        assert n - 64 <= len(out) <= n + len(rx.block)
    else:
        assert len(out) == n
        assert mismatches(rx.played_tags(), tags(range(137))) == []
    # Finished streams hand out silence and say so.
    block = np.ones_like(rx.block)
    assert pb.pull(block) is False and not block.any()


def test_end_before_any_packet_finishes_at_once() -> None:
    rx = Receiver().send([], end=False)
    rx.playout.end()
    rx.run(0.01)
    assert rx.playout.state == State.FINISHED and rx.playout.stats.frames_played == 0


# ---- the link under real conditions (issue 10) -------------------------------------------------------


def burst_start(sender: Sender, frames: range, n: int) -> list[Arrival]:
    """A capture device's start-up: the first ``n`` frames leave together when frame n - 1 does, and
    arrive in order, 20 us apart (one TCP stream); their capture times are their own, so the first n - 1
    are already old when they arrive."""
    arrivals = transmit(sender, frames)
    burst = [(arrivals[n - 1][0] + i * 20_000, *a[1:]) for i, a in enumerate(arrivals[:n])]
    assert [a[1] for a in burst] == list(range(n))
    return sorted(burst + arrivals[n:], key=lambda a: a[0])


def steady_latency(rx: Receiver, start_s: float, stop_s: float) -> float:
    return float(np.median(rx.trace.latency(start_s, stop_s)))


@pytest.mark.parametrize("frame_us", [10_000, 20_000], ids=["10ms", "20ms"])
def test_clean_start_plays_on_target_with_no_step(frame_us: int) -> None:
    # 20 s of a clean link (5-7 ms one way), 48 kHz stereo, as it ships (auto latency, resampling).
    fmt = AudioFormat(48_000, 2, frame_us)
    arrivals = transmit(Sender(fmt), range(round(20 * S / fmt.frame_ns)))
    rx = Receiver(fmt, PlayoutConfig()).send(arrivals)
    st = rx.playout.stats
    rx.run(0.1)
    # The first frame's first sample plays once its packet has waited the start target (10 ms), to the
    # sample: the first block begins with the silence that puts it there.
    assert 10 * MS <= rx.first_sample_ns() - rx.first_arrival_ns < 10 * MS + 100_000
    first_s = (rx.first_audio_ns - T0) / S
    rx.run(first_s + 1.0)
    assert (st.skipped, st.inserted, st.concealed, st.late) == (0, 0, 0, 0)  # nothing in the first second
    rx.run(19.8)
    assert (st.skipped, st.inserted, st.concealed, st.late, st.stale_ms) == (0, 0, 0, 0, 0.0)
    # From the first second on, latency is within 2 ms of the steady one (the last 10 s); in fact from
    # the first frame on (measured: 0.3 ms at most; before: up to 5 ms, the start waited a whole pull).
    steady = steady_latency(rx, 10.0, 19.8)
    assert np.abs(rx.trace.latency(first_s + 1.0) - steady).max() <= 2.0
    assert np.nanmax(np.abs(rx.trace.latency(first_s) - steady)) <= 0.5


@pytest.mark.parametrize(("frame_us", "old"), [(20_000, 3), (10_000, 8)], ids=["20ms-3", "10ms-8"])
def test_start_burst_of_old_frames_is_dropped_unplayed(frame_us: int, old: int) -> None:
    # The sender's first frames come in one burst (AlsaCapture through the pulse plugin hands over 3
    # at 20 ms, 8 at 10 ms), then steady arrivals. Before: B started 35 ms (20 ms frames) to 135 ms over
    # its steady value, skipped whole frames, and drained the rest for 11 s by resampling.
    fmt = AudioFormat(48_000, 2, frame_us)
    frames = range(round(20 * S / fmt.frame_ns))
    rx = Receiver(fmt, PlayoutConfig(), record=False).send(burst_start(Sender(fmt), frames, old))
    st = rx.playout.stats
    rx.run(0.5)
    first_s = (rx.first_audio_ns - T0) / S
    rx.run(first_s + 1.0)
    assert (st.skipped, st.inserted, st.concealed, st.late) == (0, 0, 0, 0)
    # Playback began in the frame that had waited the target: all but its last part of the burst's
    # audio was already older than that, and went unplayed.
    frame_ms = fmt.frame_ms
    assert (old - 2) * frame_ms < st.stale_ms < old * frame_ms
    # Whole frames counted in stale, the start's part-frame only in stale_ms.
    assert st.stale * frame_ms <= st.stale_ms < (st.stale + 1) * frame_ms and st.stale >= old - 2
    rx.run(19.8)
    assert (st.skipped, st.inserted, st.concealed, st.late) == (0, 0, 0, 0)
    steady = steady_latency(rx, 10.0, 19.8)
    assert np.nanmax(np.abs(rx.trace.latency(first_s) - steady)) <= 2.0
    assert np.abs(rx.trace.latency(first_s + 1.0) - steady).max() <= 2.0


@functools.cache
def gapped_payloads(fmt: AudioFormat) -> tuple[bytes, ...]:
    """Like tagged_payloads, but every 4th frame is digital silence (a pause, where a drop is unheard)."""
    enc = OpusEncoder(fmt, CELT)
    t = np.arange(fmt.frame_samples) / fmt.sample_rate
    out = []
    for i in range(32):
        level = 0.0 if i % 4 == 0 else 0.3 * 32767
        enc.input[:] = (level * np.sin(2 * np.pi * TAG_HZ[i % 16] * t)).astype(np.int16)[:, None]
        out.append(enc.encode())
    enc.close()
    return tuple(out[16:])


def test_latency_steps_are_at_most_a_slice() -> None:
    # 0-2 ms of jitter, 0-30 ms from 2 s to 8 s, then 0-2 ms again, with a target allowed to fall at
    # 100 ms/s (twenty times what the ratio may drain: 5 ms/s), and every 4th frame silent: B rises
    # with the jitter by inserts, then falls with drops at quiet points and, where those do not keep up,
    # in the tone. Before, each of these was a whole 20 ms frame.
    rng = random.Random(8)
    arrivals = transmit(
        Sender(),
        range(1500),
        Network(jitter_ms=0.0),
        extra_ms=lambda k: rng.uniform(0.0, 30.0 if 100 <= k < 400 else 2.0),
        payload=lambda k: gapped_payloads(STEREO_48K)[k % 16],
    )
    rx = Receiver(config=PlayoutConfig(shrink_ms_per_s=100.0), record=False).send(arrivals)
    pb, st = rx.playout, rx.playout.stats
    steps: list[tuple[int, int, bool]] = []  # (frames taken so far, + inserted / - dropped, waiting)
    inserted, dropped = pb.control.inserted, pb.control.dropped

    def on_insert(samples: int) -> None:
        steps.append((st.frames_played, samples, pb.jb.peek(pb.jb.next_seq) is None))
        inserted(samples)

    def on_drop(samples: int) -> None:
        steps.append((st.frames_played, -samples, False))
        dropped(samples)

    pb.control.inserted, pb.control.dropped = on_insert, on_drop  # type: ignore[method-assign]
    rx.run(29.8)
    assert st.inserted >= 5 and st.skipped >= 5
    # Every step is one 2.5 ms slice: concealment in, or at most a slice out (in a pause a whole one, in
    # the tone a stretch of half a slice or more that ends as it began).
    assert st.inserted_ms == 2.5 * st.inserted and len(steps) == st.inserted + st.skipped
    assert 1.25 * st.skipped <= st.skipped_ms < 2.5 * st.skipped
    assert max(abs(n) for _, n, _ in steps) == 120  # 2.5 ms at 48 kHz
    # With the frame's packet in hand, one step per frame boundary at most; more slices go in only
    # while a late packet is awaited (the alternative: concealing its frame whole, dropping the packet).
    steering = [f for f, _, waiting in steps if not waiting]
    assert all(a < b for a, b in itertools.pairwise(steering))
    waits = {f for f, _, waiting in steps if waiting}
    assert 0 < len(waits) <= 20
    # Latency from one decoded frame to the next never moves by more than a slice and the ratio's share
    # (0.5 % of a frame), except after a wait or a frame concealed in between (late packets).
    lat = rx.trace.latency()
    moves = np.abs(np.diff(lat[~np.isnan(lat)]))
    assert np.sort(moves)[-len(waits) - st.late - 1] <= 2.5 + 0.005 * 20.0 + 0.02
    # The quiet frames took drops while they could: B came down as fast as the target did.
    assert rx.trace.error(26.0).max() < 2.5


@pytest.mark.parametrize("where", ["sender", "network"])
@pytest.mark.parametrize("freeze_ms", [300, 150])
def test_freeze_recovers_within_a_second_and_queues_nothing(where: str, freeze_ms: int) -> None:
    # A clean link; at 5 s nothing arrives for freeze_ms, then the backlog comes in one burst. A frozen
    # sender sends the backlog when it wakes (each packet then crosses the network: its own delay); a
    # frozen network delivers what it held (all at once, in order).
    sender, frames = Sender(), range(750)
    a, b = T0 + 5 * S, T0 + 5 * S + freeze_ms * MS
    if where == "sender":
        net = Network()
        sent = [(b if a <= sender.send_ns(k) < b else sender.send_ns(k)) for k in frames]
        arrivals = sorted((sender.packet(k, sent[k] + net.delay_ns()) for k in frames), key=lambda x: x[0])
    else:
        arrivals = stall(transmit(sender, frames), 5.0, 5.0 + freeze_ms / 1000)
    rx = Receiver(config=PlayoutConfig(), record=False).send(arrivals)
    st = rx.playout.stats
    rx.run(4.9)
    steady, target = steady_latency(rx, 1.0, 4.9), rx.trace.target(1.0, 4.9).max()
    rx.run(14.8)
    # The frames of the gap were concealed at their turns, their packets dropped as they came (late),
    # and nothing else: no step, and no frame of the backlog left to play.
    gap = freeze_ms // 20
    assert gap - 1 <= st.concealed == st.late <= gap + 1
    assert (st.lost, st.skipped, st.inserted) == (0, 0, 0)
    assert rx.playout.jb.count <= math.ceil(rx.playout.target_ns / STEREO_48K.frame_ns) + 1
    # Within a second of the burst, latency is back within 10 ms of what it was (in fact it never left:
    # measured 0.1 ms), and one freeze did not lift the target (the percentile skips its outlier).
    assert np.abs(rx.trace.latency((b - T0) / S + 1.0) - steady).max() <= 10.0
    assert np.abs(rx.trace.latency((a - T0) / S) - steady).max() <= 0.5
    assert rx.trace.target(5.0).max() <= target + 0.5


CLICKS = {100: 100, 180: 700, 260: 431}  # frame: sample of an impulse in it
CAPTURE_DELAY_NS = 3 * MS  # how long the sender's capture device holds a frame after it fills
OUTPUT_DELAY_NS = 7 * MS  # how long the sink's device takes from a pull to playing its first sample


@functools.cache
def clicked_stream(mixed_before_ns: int = 0) -> tuple[Receiver, int]:
    """A stream of silence with an impulse in a few frames (one encoder: a real codec delay), capture
    times stamped at the ADC (a frame and the capture delay before sending), a sink reporting its
    output delay; played to the end, as it ships. Returns the receiver and the encoder's look-ahead."""
    fmt = STEREO_48K
    enc = OpusEncoder(fmt, CELT)
    payloads = []
    for k in range(300):
        enc.input[:] = 0
        if k in CLICKS:
            enc.input[CLICKS[k]] = 16384
        payloads.append(enc.encode())
    lookahead = enc.lookahead
    enc.close()
    sender = Sender(fmt, stamp_lead_ns=fmt.frame_ns + CAPTURE_DELAY_NS)
    arrivals = transmit(sender, range(300), payload=lambda k: payloads[k])
    rx = Receiver(
        fmt,
        PlayoutConfig(),
        lookahead=lookahead,
        capture_delay_ns=CAPTURE_DELAY_NS,
        output_delay_ns=OUTPUT_DELAY_NS,
        mixed_before_ns=mixed_before_ns,
    )
    return rx.send(arrivals).run_to_end(), lookahead


@pytest.mark.parametrize("mixed_before_ms", [0, 4])
def test_latency_runs_from_adc_to_dac(mixed_before_ms: int) -> None:
    # Each click is found in the output and timed: from its ADC time (the capture stamp of its frame, plus
    # its place in the frame) to when the sink's device plays it (the pull that handed it out, plus its
    # place in the block, plus the output delay). The engine's figure is that, to the sample. With 4 ms
    # of other streams mixed before this one in every block, it still is: the pull is given the block's
    # DAC time (before, a stream pulled late in a block of many counted the others' mixing as latency).
    rx, lookahead = clicked_stream(mixed_before_ms * MS)
    fmt, out = rx.fmt, rx.output().mean(axis=1)
    played_pulls = np.frombuffer(rx.trace.t_ns, dtype=np.int64)[np.frombuffer(rx.trace.played, np.int8) > 0]
    block = len(rx.block)
    measured = []
    for frame, at in CLICKS.items():
        adc_ns = T0 + frame * fmt.frame_ns - fmt.frame_ns - CAPTURE_DELAY_NS + at * S // fmt.sample_rate
        lo = (frame - 2) * fmt.frame_samples  # the output runs about a frame behind the input: search there
        i = lo + int(np.argmax(np.abs(out[lo : lo + 4 * fmt.frame_samples])))
        dac_ns = played_pulls[i // block] + (i % block) * S // fmt.sample_rate + OUTPUT_DELAY_NS
        measured.append((dac_ns - adc_ns) / MS)
    reported = float(np.median(rx.playout.stats.latency_ms.values()))
    assert np.abs(np.array(measured) - reported).max() < 0.05  # a couple of samples (measured: < 1)
    # The look-ahead (2.5 ms) and the output delay (7 ms) are in it: before, the figure stopped at the
    # hand-off to the sink and began at the frame's capture time, 9.5 ms short here.
    assert lookahead == 120
    assert reported == pytest.approx(float(np.median(measured)), abs=0.05)


def test_latency_stages_add_up_to_the_total() -> None:
    rx, _ = clicked_stream()
    st = rx.playout.stats
    total = st.latency_ms.values()
    stages = [
        st.stage_capture_ms,
        st.stage_frame_ms,
        st.stage_network_ms,
        st.stage_buffer_ms,
        st.stage_output_ms,
    ]
    values = [w.values() for w in stages]
    assert all(len(v) == len(total) > 100 for v in values)
    # Frame by frame, exactly (each window holds the same frames in the same slots).
    assert np.abs(sum(values) - total).max() < 1e-6
    # And as the p50s a live view shows, within a millisecond.
    p50 = [float(np.median(v)) for v in values]
    assert abs(sum(p50) - float(np.median(total))) < 1.0
    # Each stage is what the simulation put there: the sender's 3 ms, a 20 ms frame and 2.5 ms of look-
    # ahead, 5-7 ms of network, the buffer (B, on its target, less each packet's own 0-2 ms of jitter),
    # and the sink's 7 ms.
    assert set(values[0]) == {3.0} and set(values[1]) == {22.5} and set(values[4]) == {7.0}
    assert values[2].min() >= 5.0 and values[2].max() <= 7.0
    assert st.target_ms - 2.0 <= p50[3] <= st.target_ms


# ---- clock drift ---------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("ppm", [500.0, -500.0], ids=["fast", "slow"])
def test_sender_clock_drift_over_an_hour(ppm: float) -> None:
    """An hour at +-500 ppm: B stays on target, no frame is lost, the drift estimate is the truth.

    16 kHz mono: an hour is 720,000 pulls, and the engine's timing does not depend on the rate, but
    decoding and resampling at 16 kHz mono cost a sixth of 48 kHz stereo (the test runs in ~20 s).
    The sink wakes up to 1 ms late at each pull (a real thread's scheduling), which is B's noise.
    """
    sender = Sender(MONO_16K, ppm=ppm)
    frames = range(round(3600 * S * (1 + ppm * 1e-6) / MONO_16K.frame_ns))
    rx = Receiver(MONO_16K, PlayoutConfig(), record=False, wake_ms=1.0)
    rx.send(stream(sender, frames, Network(jitter_ms=4.0))).run(3599.0)
    st, tr = rx.playout.stats, rx.trace
    assert (st.late, st.concealed, st.lost, st.skipped, st.inserted) == (0, 0, 0, 0, 0)
    # B: within 5 ms of the target from the start, then within 3 ms: the loop's dead band (2 ms over,
    # 1 ms short), which the phase term enforces from outside. The target: 4 ms of jitter + 3 ms margin
    # + a 5 ms sink block.
    assert np.abs(tr.error(1.0)).max() < 5.0  # measured: 1.1 and 2.2 (whole-frame steps: 2.5 and 3.5)
    assert np.abs(tr.error(60.0)).max() < 3.0  # measured: 1.1 (2.3)
    assert tr.target(60.0).min() > 11.5 and tr.target(60.0).max() < 12.5
    # The drift estimate: within 25 ppm of the truth after a minute (measured: 2.3 and 2.2; before the
    # 30-block acquisition, 19 and 4), and over the last half hour within 2 ppm on average and 5 ppm at
    # worst (measured: 0.1 and 0.3, 2.3 and 2.2). Once acquired, it only moves when B leaves the dead
    # band (otherwise the timeline is left exact), so it is as good as B needs to stay inside the band:
    # an error of 5 ppm moves B by 5 us per second (the 3 ms band takes 10 minutes to cross) and is
    # 0.01 cents of pitch; 25 ppm, 2 minutes and 0.04 cents.
    assert np.abs(tr.drift(60.0) - ppm).max() < 25.0
    assert abs(float(tr.drift(1800.0).mean()) - ppm) < 2.0
    assert np.abs(tr.drift(1800.0) - ppm).max() < 5.0


@pytest.mark.slow
@pytest.mark.parametrize("resampler", ["sinc_fastest", "linear"])
def test_sender_300_ppm_fast_for_ten_minutes(resampler: str) -> None:
    """The field default (48 kHz stereo, 20 ms): after the first second no frame is concealed and B
    stays within 10 ms of its target; in fact within 3 ms (the dead band, enforced from outside;
    measured: 1.1 ms, and the drift estimate within 0.7 ppm after a minute). The same with the cheap
    converter (``recv --resampler linear``): the loop does not depend on the filter."""
    sender = Sender(ppm=300.0)
    frames = range(round(600 * S * (1 + 300e-6) / STEREO_48K.frame_ns))
    rx = Receiver(config=PlayoutConfig(resampler=resampler), record=False, wake_ms=1.0)
    rx.send(stream(sender, frames, Network(jitter_ms=4.0))).run(1.0)
    st = rx.playout.stats
    concealed_at_1s = st.concealed
    rx.run(599.0)
    assert st.concealed == concealed_at_1s == 0
    assert (st.late, st.lost, st.skipped, st.inserted) == (0, 0, 0, 0)
    assert np.abs(rx.trace.error(1.0)).max() < 3.0
    assert np.abs(rx.trace.drift(60.0) - 300.0).max() < 10.0


# ---- the resampler's bypass (issue 11) ---------------------------------------------------------------


@pytest.mark.parametrize("resampler", ["sinc_fastest", "linear"])
def test_resampler_is_bypassed_at_ratio_one_and_engages_seamlessly(resampler: str) -> None:
    """At ratio 1 the decoded samples go out exact (no converter: it would cost twice the decode); the
    first other ratio engages the converter, primed with what was written, so a continuous 7 kHz sine
    stays continuous across the switch: its largest second difference is the ideal sine's."""
    pb = StreamPlayout(STEREO_48K, STEREO_48K, PlayoutConfig(resampler=resampler), ManualClock(start_ns=T0))
    pb._engage_after = 0  # as past the stream's first second (see the test below)
    n = STEREO_48K.frame_samples
    t = np.arange(12 * n) / 48_000
    sine = (0.5 * np.sin(2 * np.pi * 7000 * t)).astype(np.float32)
    out = []
    for k in range(12):
        if k == 6:
            pb.control.steer = 2e-4  # as the phase term sets it, once B leaves the dead band
        pb.decoder.output[:n] = np.round(sine[k * n : (k + 1) * n] * 32768)[:, None].astype(np.int16)
        pb._append(n)
        out.append(pb._fifo[pb._head : pb._tail, 0].copy())
        pb._head = pb._tail
        if k == 5:
            assert not pb._resampling
            exact = np.concatenate(out)
            assert np.array_equal(exact, np.round(sine[: 6 * n] * 32768) / 32768)
    assert pb._resampling
    y = np.concatenate(out)
    ideal = float(np.abs(np.diff(sine, 2)).max())
    join = float(np.abs(np.diff(y[6 * n - 40 : 6 * n + 40], 2)).max())
    assert join <= ideal * 1.01 + 2 / 32768
    # About 1 / 1.0002 as many samples out from the switch on (the converter keeps ~20 back).
    assert abs(len(y) - 6 * n - 6 * n / 1.0002) <= 40


def test_a_streams_first_second_does_not_engage_the_converter() -> None:
    """The phase term alone does not engage the converter while the stream has played less than a second
    (a burst of senders would engage every one at once): its samples go out exact, and the drift loop
    is told nothing moved. From the first second on, the same ratio engages it."""
    pb = StreamPlayout(STEREO_48K, STEREO_48K, PlayoutConfig(), ManualClock(start_ns=T0))
    n = STEREO_48K.frame_samples
    pb.control.steer = 2e-4
    pb.decoder.output[:n] = 1000
    moved = pb.control.drift.moved_ns
    pb._handed = pb._engage_after - 1
    pb._append(n)
    assert not pb._resampling and pb._tail == n and pb._due == n
    assert pb.control.drift.moved_ns == moved and pb.control.steered_ns == 0.0
    pb._handed = pb._engage_after
    pb._append(n)
    assert pb._resampling and pb.control.steered_ns > 0.0  # fewer samples out: B lower


@pytest.mark.parametrize(
    ("resampler", "hz", "steer"),
    [
        *[("sinc_fastest", hz, s) for hz in (7000, 12000) for s in (2e-4, MAX_STEER, -MAX_STEER)],
        ("linear", 7000, 2e-4),  # at steep ratios its own filter, not the switch, sets the highs' level
    ],
)
def test_resampling_turns_off_and_on_seamlessly(resampler: str, hz: int, steer: float) -> None:
    """The receiver short of CPU turns a stream's resampling off (set_resampling): a frame goes through
    the converter at ratio 1, then what it held comes out and its output fades into the exact samples,
    which then go out bit for bit; turned on again, it engages primed as before. A continuous sine (7 and 12
    kHz, at a gentle and at the steepest ratio the loop uses, with a drift estimate) stays continuous at
    every switch (its largest second difference is the ideal sine's, or the converter's own output's),
    its level steady across the fade, and no sample is lost or repeated. The fade joins two copies aligned
    within the half sample the switch to whole samples rounds: two sines that far apart sum, halfway,
    to cos(pi f / 2 fs) of one, so no 1 ms window may dip below the quieter side by more than that
    (7 kHz: 0.23 dB, 12 kHz: 0.69 dB; measured at the steepest ratio 0.18 and 0.56 dB, and without the
    frame at ratio 1 first, 5-10 dB)."""
    pb = StreamPlayout(STEREO_48K, STEREO_48K, PlayoutConfig(resampler=resampler), ManualClock(start_ns=T0))
    pb._engage_after = 0  # as past the stream's first second
    n = STEREO_48K.frame_samples
    frames = 24
    t = np.arange(frames * n) / 48_000
    sine = (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)
    pb.control.drift.estimate = 1e-4
    out = []
    for k in range(frames):
        if k == 2:
            pb.control.steer = steer  # B left the dead band: the converter engages
        if k == 8:
            pb.set_resampling(False)
            pb._apply_resampling(False)  # as the sink thread's next pull does
            assert not pb.resampling and not pb.resampling_allowed
        if k == 16:
            pb.set_resampling(True)
            pb._apply_resampling(True)
            pb.control.steer = -steer
        pb.decoder.output[:n] = np.round(sine[k * n : (k + 1) * n] * 32768)[:, None].astype(np.int16)
        pb._append(n)
        got = pb._fifo[pb._head : pb._tail, 0].copy()
        pb._handed += len(got)
        pb._head = pb._tail
        out.append(got)
        if k == 8:
            assert pb._resampling  # a frame through the converter at ratio 1 first
        if k == 9:
            assert not pb._resampling
        if k == 15:  # exact since the fade: the input's own samples, each frame whole
            exact = np.concatenate(out[10:16])
            assert np.array_equal(exact, np.round(sine[10 * n : 16 * n] * 32768) / 32768)
            assert pb._due == pb._handed
    assert pb._resampling and pb.resampling
    y = np.concatenate(out)
    ideal = float(np.abs(np.diff(sine, 2)).max())
    dips: list[float] = []
    for k in (2, 8, 9, 16):
        at = sum(len(o) for o in out[:k])
        join = float(np.abs(np.diff(y[at - 60 : at + 240], 2)).max())
        own = float(np.abs(np.diff(y[at - 600 : at - 60], 2)).max())  # the converter's, before the switch
        assert join <= max(ideal, own) * 1.01 + 2 / 32768, k
        seg = y[at - 96 : at + 240].reshape(-1, 48)  # 1 ms windows, from 2 ms before
        rms = 20 * np.log10(np.sqrt((seg.astype(np.float64) ** 2).mean(axis=1)))
        dips.append(float(min(rms[0], rms[-1]) - rms.min()))
    bound = -20 * np.log10(np.cos(np.pi * hz / (2 * 48_000)))
    assert max(dips) < bound + 0.05, (dips, bound)
    # Samples: the ratio 1 / (1 + 1e-4 + steer) on frames 2-7 and 1 / (1 + 1e-4 - steer) on 16-23, exact
    # otherwise; those the converter still holds at the end count. libsamplerate ramps each new ratio in
    # over a call, which the count does not model: at the end that is half a frame at the last change.
    r1, r2 = 1 / (1 + 1e-4 + steer), 1 / (1 + 1e-4 - steer)
    expected = 10 * n + 6 * n * r1 + 8 * n * r2
    assert abs(len(y) + (pb._due - pb._handed) - expected) <= 1.0 + n / 2 * abs(r2 - 1), len(y) - expected


@pytest.mark.slow
def test_a_drifting_stream_stays_on_target_with_resampling_off_and_on_again() -> None:
    """300 ppm fast: a minute resampled, a minute in exact mode (the receiver short of CPU), a minute
    resampled again. In exact mode the drift (18 ms in the minute) is taken back by dropping slices of
    up to 2.5 ms once B has been 4.5 ms over the target for a second, at a quiet point or, as in the
    test's CELT tone which has none, pitch-matched (before, a cut waited for a quiet point up to 10 ms
    over: B rode up to 10.0 ms over, where it now peaks at 4.5).
    The switches leave the target alone; turned back on, the loop brings B back into its dead band with
    the estimate it kept, and drops nothing more. Nothing is concealed or inserted throughout."""
    sender = Sender(ppm=300.0)
    frames = range(round(181 * S * (1 + 300e-6) / STEREO_48K.frame_ns))
    rx = Receiver(config=PlayoutConfig(), record=False, wake_ms=1.0)
    rx.send(stream(sender, frames, Network(jitter_ms=4.0))).run(60.0)
    st, pb, tr = rx.playout.stats, rx.playout, rx.trace
    assert pb._resampling and st.skipped == 0
    pb.set_resampling(False)
    rx.run(120.0)
    assert not pb._resampling
    drops, dropped_ms = st.skipped, st.skipped_ms
    pb.set_resampling(True)
    rx.run(180.0)
    assert pb._resampling
    assert (st.concealed, st.inserted, st.late, st.lost) == (0, 0, 0, 0)
    assert drops >= 3 and st.skipped == drops  # none once resampling again
    # Where the minute's drift went in exact mode: the audio dropped (pitch-matched cuts are 1.25-2.5 ms)
    # plus B's rise; measured: 8 cuts (5 when B waited for 10 ms over).
    rise = float(tr.buffer(119.0, 120.0).mean() - tr.buffer(59.0, 60.0).mean())
    assert abs(dropped_ms + rise - 60.0 * 300e-3) < 1.0, (drops, dropped_ms, rise)
    assert np.abs(tr.target(1.0) - tr.target(59.0, 60.0).mean()).max() < 0.5  # the switches left it
    assert np.abs(tr.error(1.0, 60.0)).max() < 3.0
    exact = tr.error(60.0, 120.0)
    assert exact.max() < (DEAD_BAND_NS + SLICE_NS) / 1e6 + 1.0 and exact.min() > -3.0, (
        exact.min(),
        exact.max(),
    )
    assert np.abs(tr.error(130.0)).max() < 3.0  # measured: B back in the band within 2 s
    assert np.abs(tr.drift(120.0) - 300.0).max() < 10.0
