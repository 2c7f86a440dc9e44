"""Audio sinks: where the receiver's audio goes, named by an ``-o`` URI.

    file:heard.wav       a WAV file of exactly the stream's audio (concealed frames included)
    null://              discards the audio (statistics only)
    sd://NAME_OR_INDEX   PortAudio playback, one continuous callback stream   [devices]
    alsa://DEVICE        ALSA playback, for headless Pis                      [devices]

The sink is the clock. It pulls audio from the receiver by calling ``fill(buf)``, which must write the
whole buffer (int16, shape (n, channels)) in place and return True when it holds stream audio, False
when no stream is playing (the buffer is then silence). A device sink calls ``fill`` from its audio
callback; a file or null sink calls it from its own thread paced in real time, one 5 ms block at a
time, and keeps only the frames for which it returned True, so a file holds the streams back to back
and its length is exactly the streams' duration.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol

import numpy as np
import numpy.typing as npt

from tiality_cli.clock import SYSTEM_CLOCK, Clock
from tiality_cli.config import AudioFormat
from tiality_cli.errors import ConfigError

BLOCK_US = 5_000  # the paced sinks' pull period
FillFn = Callable[[npt.NDArray[np.int16]], bool]


class Sink(Protocol):
    """Real-time consumer of audio; see the module doc for the ``fill`` contract."""

    name: str
    format: AudioFormat | None  # None until opened: file sinks take the first stream's format
    underruns: int  # device periods that found no data ready in time (device sinks)
    frames_written: int  # samples per channel kept (stream audio only)

    def open(self, fmt: AudioFormat) -> None: ...

    def start(self, fill: FillFn) -> None: ...

    def stop(self) -> None: ...

    def close(self) -> None: ...


class ClockedSink:
    """Base for sinks with no hardware clock: a thread calls ``fill`` once per frame period."""

    fixed_format: AudioFormat | None = None

    def __init__(self, name: str, clock: Clock = SYSTEM_CLOCK) -> None:
        self.name = name
        self.format: AudioFormat | None = None
        self.underruns = 0
        self.frames_written = 0
        self.late_ticks = 0  # ticks that ran more than one period behind schedule (a busy machine)
        self.limit_seconds: float | None = None  # keep no more than this much audio (recv --seconds)
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def open(self, fmt: AudioFormat) -> None:
        self.format = fmt

    def start(self, fill: FillFn) -> None:
        if self.format is None:
            raise RuntimeError("open() the sink before start()")
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, args=(fill, self.format), name=self.name, daemon=True
        )
        self._thread.start()

    def _run(self, fill: FillFn, fmt: AudioFormat) -> None:
        # Pull in blocks of at most 5 ms, as a sound card with a small period would: a frame decoded
        # at a block boundary then waits at most one block before it goes out.
        block = min(fmt.frame_samples, fmt.sample_rate * BLOCK_US // 1_000_000)
        buf = np.zeros((block, fmt.channels), dtype=np.int16)
        period = block * 1_000_000_000 // fmt.sample_rate
        due = self._clock.monotonic_ns()
        while not self._stop.is_set():
            due += period
            delay = due - self._clock.monotonic_ns()
            if delay > 0:
                if self._stop.wait(delay / 1e9):
                    break
            elif delay < -period:
                self.late_ticks += 1
            if fill(buf):
                keep = len(buf)
                if self.limit_seconds is not None:
                    keep = max(
                        0, min(keep, round(self.limit_seconds * fmt.sample_rate) - self.frames_written)
                    )
                if keep:
                    with self._lock:
                        self.consume(buf[:keep])
                        self.frames_written += keep

    def consume(self, buf: npt.NDArray[np.int16]) -> None:
        """Takes one frame of stream audio (called on the sink's thread)."""

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        self.stop()


class NullSink(ClockedSink):
    """Discards audio, at real-time pace, so statistics and latency are those of a real output."""

    def __init__(self, clock: Clock = SYSTEM_CLOCK) -> None:
        super().__init__("null://", clock)


class WavSink(ClockedSink):
    """Writes the stream's audio to a WAV file in the stream's (or the given) format."""

    def __init__(self, path: str, clock: Clock = SYSTEM_CLOCK) -> None:
        super().__init__(f"file:{path}", clock)
        self.path = path
        self._writer: object | None = None
        self._check_writable()

    def _check_writable(self) -> None:
        """Fails early (before listening) when the file cannot be created."""
        from tiality_cli.wavfile import WavWriter

        WavWriter(self.path, 48000, 1).close()

    def open(self, fmt: AudioFormat) -> None:
        from tiality_cli.wavfile import WavWriter

        super().open(fmt)
        self._writer = WavWriter(self.path, fmt.sample_rate, fmt.channels)

    def consume(self, buf: npt.NDArray[np.int16]) -> None:
        from tiality_cli.wavfile import WavWriter

        w = self._writer
        if isinstance(w, WavWriter):
            w.write(buf)

    def close(self) -> None:
        from tiality_cli.wavfile import WavWriter

        super().close()
        with self._lock:
            if isinstance(self._writer, WavWriter):
                self._writer.close()
            self._writer = None


def open_sink(uri: str, fmt: AudioFormat | None = None, clock: Clock = SYSTEM_CLOCK) -> Sink:
    """Builds the sink a URI names. Device sinks open (and fail) here, before the port is bound.

    ``fmt`` fixes a device's format (default 48 kHz stereo); file and null sinks take the stream's format
    unless one is given.
    """
    from tiality_cli.sources import split_uri

    scheme, rest = split_uri(uri)
    if scheme == "null://":
        sink: Sink = NullSink(clock)
    elif scheme == "file:":
        if not rest:
            raise ConfigError(f"{uri!r}: expected file:PATH.wav")
        sink = WavSink(rest, clock)
    elif scheme in ("alsa://", "sd://"):
        from tiality_cli import devices

        return devices.open_playback(scheme, rest, fmt or AudioFormat(), clock)
    else:
        raise ConfigError(f"{uri!r}: {scheme} is an input, not an output")
    if fmt is not None:
        sink.open(fmt)
    return sink
