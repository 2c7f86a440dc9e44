"""Sources and sinks without hardware: a tone, WAV files and the null sink."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from tiality_cli.clock import SYSTEM_CLOCK, Clock
from tiality_cli.config import AudioFormat
from tiality_cli.errors import ConfigError, SourceError
from tiality_cli.io.base import ClockedSink, Pacer

TONE_TABLE_MAX_S = 1.0  # a tone whose whole periods fill at most this much audio plays from a table


def whole_period_samples(freq: float, rate: int, limit: int) -> int | None:
    """The fewest samples that hold whole periods of ``freq`` at ``rate`` (440 Hz at 48 kHz: 1200, 11
    periods), or None when that exceeds ``limit`` (or ``freq`` is no simple fraction)."""
    from fractions import Fraction  # here: a capture device's start-up (the Pi's) needs none of it

    f = Fraction(freq).limit_denominator(1000)
    if float(f) != freq:
        return None
    n = (f / rate).denominator
    return n if n <= limit else None


class ToneSource:
    """A sine wave, phase-continuous across frames, paced in real time.

    Sample k is ``int(amp * sin(2 pi freq k / rate))`` on every channel. When a whole number of
    periods fits in a second or less (any integer frequency) the samples come from a table of them,
    computed once, and each frame is one slice copy; otherwise each frame is computed as it is read.
    """

    def __init__(
        self, freq: float, fmt: AudioFormat, level_dbfs: float = -12.0, clock: Clock = SYSTEM_CLOCK
    ) -> None:
        if not 0 < freq < fmt.sample_rate / 2:
            raise ConfigError(f"tone://{freq:g}: frequency must be between 0 and {fmt.sample_rate // 2} Hz")
        self.format = fmt
        self.name = f"tone://{freq:g}"
        self.overruns = 0
        self.dropped_ns = 0
        self.freq = freq
        self._amp = 32767 * 10 ** (level_dbfs / 20)
        self._pacer = Pacer(fmt.frame_ns, clock)
        n = fmt.frame_samples
        self._phase_step = 2 * math.pi * freq / fmt.sample_rate
        self._ramp = np.arange(n, dtype=np.float64) * self._phase_step
        self._buf = np.empty(n, dtype=np.float64)
        self._phase = 0.0
        self._pos = 0  # the next sample's index in the table
        self._period = whole_period_samples(freq, fmt.sample_rate, round(TONE_TABLE_MAX_S * fmt.sample_rate))
        self._table: npt.NDArray[np.int16] | None = None
        if self._period is not None:
            # One period plus a frame, so that every frame is one contiguous slice.
            k = np.arange(self._period + n, dtype=np.float64) % self._period
            wave = np.sin(k * (2 * math.pi * freq / fmt.sample_rate)) * self._amp
            self._table = np.repeat(wave.astype(np.int16)[:, None], fmt.channels, axis=1)

    def open(self) -> None:
        self._pacer.start()

    def read(self, out: npt.NDArray[np.int16]) -> int | None:
        t = self._pacer.wait_next()
        if t is None:
            return None
        table = self._table
        if table is not None and self._period is not None:
            n = len(out)
            out[:] = table[self._pos : self._pos + n]
            self._pos = (self._pos + n) % self._period
            return t
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
        self.dropped_ns = 0
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


class NullSink(ClockedSink):
    """Discards audio, at real-time pace, so statistics and latency are those of a real output: one that
    falls 200 ms behind (a receiver slower than real time) gives the time up, as a sound card would."""

    max_lag_ns = 200_000_000

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
