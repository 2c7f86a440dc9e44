"""An application-owned output on a simulated clock: real Opus packets in, ``Receiver.fill`` pulled out.

The only fake is the clock (a ManualClock). Packets of a known signal are encoded by real libopus and
handed to a real Receiver's session when the simulated network delivers them; the test's "audio engine"
pulls ``fill`` in blocks of any size at exactly known times. So every output sample has an exact pull
time, and two runs that differ in one thing (block size, a volume change) can be compared sample by
sample.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from tiality_cli.clock import ManualClock
from tiality_cli.codec import OpusEncoder
from tiality_cli.config import AudioFormat, CodecConfig
from tiality_cli.io.base import Source
from tiality_cli.link import ClockEstimate, StreamInfo
from tiality_cli.receiver import Receiver, ReceiverConfig, Session

NS = 1_000_000_000


def encode(
    signal: npt.NDArray[np.float32], fmt: AudioFormat, codec: CodecConfig | None = None
) -> list[bytes]:
    """Real Opus packets of ``signal`` (float, frames x channels), one per whole frame."""
    enc = OpusEncoder(fmt, codec or CodecConfig())
    n = fmt.frame_samples
    pcm = np.clip(np.rint(signal * 32768.0), -32768, 32767).astype(np.int16)
    packets = []
    for k in range(len(pcm) // n):
        enc.input[:] = pcm[k * n : (k + 1) * n]
        packets.append(enc.encode())
    enc.close()
    return packets


def lookahead(fmt: AudioFormat, codec: CodecConfig | None = None) -> int:
    enc = OpusEncoder(fmt, codec or CodecConfig())
    try:
        return enc.lookahead
    finally:
        enc.close()


@dataclass
class Stream:
    """One simulated sender: its packets, when its first sample was captured (its own wall clock)."""

    packets: list[bytes]
    fmt: AudioFormat
    capture0_ns: int  # sender wall clock
    delay_ns: int  # network delay, capture of a frame's last sample -> arrival
    offset_ns: int = 0  # receiver clock - sender clock
    name: str = "sim"
    session: Session | None = None
    sent: int = 0

    def capture_ns(self, k: int) -> int:
        return self.capture0_ns + k * self.fmt.frame_ns


@dataclass
class AppOutput:
    """A Receiver without a server, an app-owned output and a ManualClock; see the module doc."""

    config: ReceiverConfig
    clock: ManualClock = field(default_factory=ManualClock)
    streams: list[Stream] = field(default_factory=list)
    pulls: list[tuple[int, int]] = field(default_factory=list)  # (monotonic ns, first sample index)

    def __post_init__(self) -> None:
        self.rx = Receiver(None, self.config, self.clock)
        self.rx.start()
        fmt = self.rx.sink.format
        assert fmt is not None
        self.out_fmt = fmt
        self.t0 = self.clock.monotonic_ns()
        self.pos = 0

    def add(
        self,
        packets: list[bytes],
        fmt: AudioFormat,
        *,
        start_ns: int = 0,
        delay_ms: float = 5.0,
        offset_ns: int = 0,
        name: str = "sim",
    ) -> Stream:
        """A sender whose first frame is captured ``start_ns`` after now (its clock = ours - offset)."""
        wall = self.clock.wall_ns() + start_ns - offset_ns
        s = Stream(packets, fmt, wall, int(delay_ms * 1e6), offset_ns, name)
        self.streams.append(s)
        return s

    def _arrival(self, s: Stream, k: int) -> int:
        """Monotonic arrival time of packet k."""
        wall = s.capture_ns(k) + s.offset_ns + s.fmt.frame_ns + s.delay_ns
        return wall - self.clock.wall_offset_ns

    def run(
        self,
        seconds: float,
        block: int,
        before_pull: Callable[[int], None] | None = None,
        dtype: type[np.int16] | type[np.float32] = np.int16,
    ) -> npt.NDArray[np.float32]:
        """Pulls ``seconds`` of output in blocks of ``block`` samples (int16 or float32 buffers, as an audio
        engine would hand them); returns it as float in [-1, 1], n x channels.

        ``before_pull(sample_index)``, if given, is called before each pull (to change a control).
        """
        rate, ch = self.out_fmt.sample_rate, self.out_fmt.channels
        total = round(seconds * rate)
        out = np.zeros((total, ch), dtype=np.float32)
        buf: npt.NDArray[np.int16] | npt.NDArray[np.float32]
        if dtype is np.float32:
            buf = np.zeros((block, ch), dtype=np.float32)
        else:
            buf = np.zeros((block, ch), dtype=np.int16)
        scale = 1 / 32768 if dtype is np.int16 else 1.0
        events: list[tuple[int, int, int]] = []  # (time, order, stream index) of the next packet
        for i, s in enumerate(self.streams):
            if s.sent < len(s.packets):
                heapq.heappush(events, (self._arrival(s, s.sent), 1, i))
        done = 0
        while done < total:
            n = min(block, total - done)
            pull_at = self.t0 + (self.pos * NS) // rate
            while events and events[0][0] <= pull_at:
                t, _, i = heapq.heappop(events)
                self.clock.now_ns = max(self.clock.now_ns, t)
                self._deliver(self.streams[i])
                s = self.streams[i]
                if s.sent < len(s.packets):
                    heapq.heappush(events, (self._arrival(s, s.sent), 1, i))
            self.clock.now_ns = max(self.clock.now_ns, pull_at)
            if before_pull is not None:
                before_pull(done)
            view = buf[:n]
            self.pulls.append((self.clock.now_ns, done))
            self.rx.fill(view)
            out[done : done + n] = view * scale
            done += n
            self.pos += n
        return out

    def _deliver(self, s: Stream) -> None:
        if s.session is None:
            info = StreamInfo(s.fmt, algorithm_delay=lookahead(s.fmt), name=s.name)
            s.session = self.rx.open_stream(f"sim:{s.name}", info)
            s.session.clock(ClockEstimate(s.offset_ns, 0, 1))
        k = s.sent
        s.session.packet(k, s.capture_ns(k), s.packets[k], 0)
        s.sent += 1
        if s.sent == len(s.packets):
            s.session.playout.end()  # what close() does, without waiting for the audio to play out

    def pull_time_ns(self, sample: int) -> int:
        """Receiver wall clock at which output ``sample`` was pulled (its block's pull + its offset in it)."""
        t0, first = self.t0, 0
        for t, f in self.pulls:
            if f > sample:
                break
            t0, first = t, f
        return t0 + (sample - first) * NS // self.out_fmt.sample_rate + self.clock.wall_offset_ns

    def close(self) -> None:
        self.rx.stop()


class RealTimePull:
    """An application's audio engine in real time: a thread pulls ``rx.fill`` every ``block`` samples on an
    absolute schedule (a device's clock), keeps what it got, and calls ``hook(index)`` before each pull.

    ``scheduled_wall_ns(i)`` is when sample i was due on that schedule (the DAC's time, were this a
    device); ``called_wall_ns(i)`` when the pull that returned it actually ran (a late wake-up shows here).
    """

    def __init__(self, rx: Receiver, block: int = 240, hook: Callable[[int], None] | None = None) -> None:
        fmt = rx.sink.format
        assert fmt is not None
        self.rx, self.block, self.hook = rx, block, hook
        self.rate, self.channels = fmt.sample_rate, fmt.channels
        self.position = 0  # samples pulled so far
        self._chunks: list[npt.NDArray[np.int16]] = []
        self._called: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test-audio-engine", daemon=True)
        self.t0_wall = 0
        self.t0_mono = 0

    def __enter__(self) -> RealTimePull:
        self.t0_mono, self.t0_wall = time.monotonic_ns(), time.time_ns()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            due = self.t0_mono + self.position * NS // self.rate
            wait = due - time.monotonic_ns()
            if wait > 0 and self._stop.wait(wait / NS):
                return
            if self.hook is not None:
                self.hook(self.position)
            buf = np.zeros((self.block, self.channels), dtype=np.int16)
            self._called.append(time.time_ns())
            self.rx.fill(buf)
            self._chunks.append(buf)
            self.position += self.block

    def output(self) -> npt.NDArray[np.float32]:
        chunks = list(self._chunks)
        if not chunks:
            return np.zeros((0, self.channels), dtype=np.float32)
        return np.concatenate(chunks).astype(np.float32) / 32768.0

    def scheduled_wall_ns(self, sample: int) -> int:
        return self.t0_wall + sample * NS // self.rate

    def called_wall_ns(self, sample: int) -> int:
        k = sample // self.block
        return self._called[k] + (sample - k * self.block) * NS // self.rate

    def wait_for(self, samples: int, timeout: float = 10.0) -> None:
        """Returns once ``samples`` more have been pulled (polling, with a deadline)."""
        target = self.position + samples
        deadline = time.monotonic() + timeout
        while self.position < target:
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {samples} samples to be pulled")
            time.sleep(0.01)


class StampedSource:
    """A Source that remembers the capture time of every frame it hands over (the sender's clock)."""

    def __init__(self, inner: Source) -> None:
        self.inner = inner
        self.format = inner.format
        self.name = inner.name
        self.stamps: list[int] = []
        self.overruns = 0
        self.dropped_ns = 0  # a file source drops nothing

    def open(self) -> None:
        self.inner.open()

    def read(self, out: npt.NDArray[np.int16]) -> int | None:
        t = self.inner.read(out)
        if t is not None:
            self.stamps.append(t)
        return t

    def close(self) -> None:
        self.inner.close()
