"""Audio sources: where the sender's frames come from, named by an ``-i`` URI.

    tone://440              a sine at 440 Hz, -12 dBFS
    file:speech.wav         any WAV (rate, channels, 8-32 bit or float), converted to the stream format
    alsa://DEVICE           ALSA capture (default, hw:1,0, plughw:CARD=Array,DEV=0 ...)   [devices]
    sd://NAME_OR_INDEX      PortAudio capture through sounddevice                          [devices]

Contract (the same for every source, so the sender never knows which it has): ``read(out)`` blocks until
one whole frame is available, writes it into ``out`` (int16, shape (frame_samples, channels)) and
returns the sender's wall-clock time of the frame's first sample in ns, or None when the source has
ended. Synthetic sources pace themselves from an absolute schedule (start + k frames), so they behave
like a microphone: a late reader catches up instead of drifting, and nothing sleeps a fixed 20 ms.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from tiality_cli.clock import SYSTEM_CLOCK, Clock
from tiality_cli.config import AudioFormat
from tiality_cli.errors import ConfigError, SourceError

INPUT_SCHEMES = ("tone://", "file:", "alsa://", "sd://")


class Source(Protocol):
    """A real-time stream of int16 frames in ``format`` (see the module doc for the contract)."""

    format: AudioFormat
    name: str
    overruns: int  # frames the source lost because nobody read them in time

    def open(self) -> None: ...

    def read(self, out: npt.NDArray[np.int16]) -> int | None: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class CaptureOptions:
    """Which device channels reach the encoder (devices only)."""

    capture_channels: int | None = None  # channels opened on the device; None: the stream's count
    channel_map: tuple[int, ...] | None = None  # device channel per stream channel; None: the first ones
    downmix: bool = False  # average all captured channels into each stream channel instead


def split_uri(uri: str) -> tuple[str, str]:
    """Returns (scheme, rest) for a source/sink URI, or raises ConfigError naming the known schemes."""
    for scheme in ("tone://", "file:", "alsa://", "sd://", "null://"):
        if uri.startswith(scheme):
            rest = uri[len(scheme) :]
            if scheme == "file:" and rest.startswith("//"):
                rest = rest[2:]  # file://path as well as file:path
            return scheme, rest
    raise ConfigError(
        f"{uri!r}: unknown scheme; use one of tone://FREQ, file:PATH.wav, alsa://DEVICE, sd://DEVICE"
    )


class Pacer:
    """Waits for frame k to be 'captured' at start + (k + 1) frames on the monotonic clock."""

    def __init__(self, frame_ns: int, clock: Clock) -> None:
        self._frame_ns = frame_ns
        self._clock = clock
        self._start_mono = 0
        self._start_wall = 0
        self.k = 0
        self._stop = threading.Event()

    def start(self) -> None:
        self._start_mono = self._clock.monotonic_ns()
        self._start_wall = self._clock.wall_ns()
        self.k = 0

    def wait_next(self) -> int | None:
        """Blocks until the next frame is due; returns its first sample's wall time, None if stopped."""
        due = self._start_mono + (self.k + 1) * self._frame_ns
        delay = due - self._clock.monotonic_ns()
        if delay > 0 and self._stop.wait(delay / 1e9):
            return None
        if self._stop.is_set():
            return None
        t = self._start_wall + self.k * self._frame_ns
        self.k += 1
        return t

    def stop(self) -> None:
        self._stop.set()


class ToneSource:
    """A sine wave, phase-continuous across frames, paced in real time."""

    def __init__(
        self, freq: float, fmt: AudioFormat, level_dbfs: float = -12.0, clock: Clock = SYSTEM_CLOCK
    ) -> None:
        if not 0 < freq < fmt.sample_rate / 2:
            raise ConfigError(f"tone://{freq:g}: frequency must be between 0 and {fmt.sample_rate // 2} Hz")
        self.format = fmt
        self.name = f"tone://{freq:g}"
        self.overruns = 0
        self.freq = freq
        self._amp = 32767 * 10 ** (level_dbfs / 20)
        self._pacer = Pacer(fmt.frame_ns, clock)
        n = fmt.frame_samples
        self._phase_step = 2 * math.pi * freq / fmt.sample_rate
        self._ramp = np.arange(n, dtype=np.float64) * self._phase_step
        self._buf = np.empty(n, dtype=np.float64)
        self._phase = 0.0

    def open(self) -> None:
        self._pacer.start()

    def read(self, out: npt.NDArray[np.int16]) -> int | None:
        t = self._pacer.wait_next()
        if t is None:
            return None
        np.add(self._ramp, self._phase, out=self._buf)
        np.sin(self._buf, out=self._buf)
        self._buf *= self._amp
        out[:] = self._buf[:, None]  # same signal on every channel
        self._phase = (self._phase + self._phase_step * len(self._buf)) % (2 * math.pi)
        return t

    def close(self) -> None:
        self._pacer.stop()


def convert_audio(x: npt.NDArray[np.float32], rate: int, fmt: AudioFormat) -> npt.NDArray[np.int16]:
    """Converts float audio (frames x channels) at ``rate`` to int16 in ``fmt``'s rate and channels."""
    ch_in = x.shape[1]
    if ch_in != fmt.channels:
        if fmt.channels == 1:
            x = x.mean(axis=1, keepdims=True)  # downmix: every channel contributes
        elif ch_in == 1:
            x = np.repeat(x, fmt.channels, axis=1)
        elif ch_in > fmt.channels:
            x = x[:, : fmt.channels]
        else:
            x = np.concatenate([x, np.repeat(x[:, -1:], fmt.channels - ch_in, axis=1)], axis=1)
    if rate != fmt.sample_rate and len(x):
        import samplerate

        x = samplerate.resample(np.ascontiguousarray(x), fmt.sample_rate / rate, "sinc_best")
        x = np.asarray(x, dtype=np.float32).reshape(-1, fmt.channels)
    return np.clip(np.round(x * 32768.0), -32768, 32767).astype(np.int16)


class WavSource:
    """A WAV file played as if it were being captured now; the last frame is padded with silence."""

    def __init__(self, path: str, fmt: AudioFormat, clock: Clock = SYSTEM_CLOCK) -> None:
        self.format = fmt
        self.name = f"file:{path}"
        self.overruns = 0
        self.path = path
        self._pacer = Pacer(fmt.frame_ns, clock)
        self._pcm: npt.NDArray[np.int16] = np.zeros((0, fmt.channels), np.int16)
        self._pos = 0
        self.load()

    def load(self) -> None:
        """Reads and converts the file up front, so errors show before any connection is made."""
        from tiality_cli.wavfile import read_wav

        x, info = read_wav(self.path)
        if info.frames == 0:
            raise SourceError(f"file:{self.path}: the WAV file holds no audio")
        self.info = info
        self._pcm = convert_audio(x, info.sample_rate, self.format)

    @property
    def duration_s(self) -> float:
        return len(self._pcm) / self.format.sample_rate

    def open(self) -> None:
        self._pos = 0
        self._pacer.start()

    def read(self, out: npt.NDArray[np.int16]) -> int | None:
        if self._pos >= len(self._pcm):
            return None
        t = self._pacer.wait_next()
        if t is None:
            return None
        n = out.shape[0]
        chunk = self._pcm[self._pos : self._pos + n]
        out[: len(chunk)] = chunk
        if len(chunk) < n:
            out[len(chunk) :] = 0
        self._pos += n
        return t

    def close(self) -> None:
        self._pacer.stop()


def open_source(
    uri: str, fmt: AudioFormat, capture: CaptureOptions | None = None, clock: Clock = SYSTEM_CLOCK
) -> Source:
    """Builds the source a URI names; file and device errors are raised here, before any network."""
    scheme, rest = split_uri(uri)
    if scheme == "tone://":
        try:
            freq = float(rest)
        except ValueError:
            raise ConfigError(f"{uri!r}: expected tone://FREQUENCY_HZ, e.g. tone://440") from None
        return ToneSource(freq, fmt, clock=clock)
    if scheme == "file:":
        if not rest:
            raise ConfigError(f"{uri!r}: expected file:PATH.wav")
        return WavSource(rest, fmt, clock=clock)
    if scheme in ("alsa://", "sd://"):
        from tiality_cli import devices

        return devices.open_capture(scheme, rest, fmt, capture or CaptureOptions(), clock)
    raise ConfigError(f"{uri!r}: {scheme} is an output, not an input")
