"""The microphone self-test: capture, an Opus round trip and playback, with the codec's figures.

    record(source, seconds, progress) -> Recording                capture (opens and closes the source)
    transcode(pcm, fmt, codec) -> Transcoded                      every frame through Opus, timed
    play(sink, pcm, fmt, progress) -> Playback                    an array through a sink, device-clocked
    run_loopback(source, sink, seconds, codec, ...) -> LoopbackResult     record, transcode, then play
    run_live(source, sink, seconds, codec, ...) -> LoopbackResult         source -> Opus -> sink, live
    levels(pcm) -> (peak_dbfs, rms_dbfs)

No typer or rich here: ``cli/devices.py`` shows progress through the ``progress`` callbacks, which get
(seconds done, peak dBFS, RMS dBFS of the latest frame) on the caller's thread, never on an audio one.
In live mode a capture thread encodes and decodes each frame into a small ring that the sink's ``fill``
drains, once a frame has waited LIVE_MARGIN_US (a margin for capture jitter); the latency is the
frame's capture time to the moment its first sample reaches the output (the time of ``fill`` plus the
device's reported output delay).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from tiality_cli.clock import SYSTEM_CLOCK, Clock
from tiality_cli.codec import OpusDecoder, OpusEncoder
from tiality_cli.config import AudioFormat, CodecConfig
from tiality_cli.errors import SinkError, SourceError
from tiality_cli.io.base import Sink, Source
from tiality_cli.levelcheck import ChannelLevel, LevelMeter, channel_levels

ProgressFn = Callable[[float, float, float], None]  # (seconds done, peak dBFS, RMS dBFS)
SILENCE_DBFS = -120.0  # the level reported for digital silence (JSON has no -inf)
LIVE_QUEUE_MAX = 3  # decoded frames waiting for the sink before the oldest is dropped (latency cap)
LIVE_MARGIN_US = 10_000  # live: a frame waits this long before playback starts, so capture jitter of
# up to 10 ms does not starve the sink (a 5 ms-period sink starved about once a second without it)
_PROGRESS_S = 0.1  # how often play() and run_live() report progress


def levels(pcm: npt.NDArray[np.int16]) -> tuple[float, float]:
    """(peak, RMS) of int16 audio in dBFS (full scale = 32768); SILENCE_DBFS for silence."""
    if pcm.size == 0:
        return SILENCE_DBFS, SILENCE_DBFS
    x = pcm.astype(np.float64)
    peak = float(np.max(np.abs(x)))
    rms = math.sqrt(float(np.mean(x * x)))
    return _dbfs(peak), _dbfs(rms)


def _dbfs(value: float) -> float:
    return max(SILENCE_DBFS, 20 * math.log10(value / 32768)) if value > 0 else SILENCE_DBFS


@dataclass(frozen=True, slots=True)
class Recording:
    pcm: npt.NDArray[np.int16] = field(repr=False)  # (frames x channels) int16, whole frames
    format: AudioFormat
    first_capture_ns: int  # wall time of the first sample
    overruns: int

    @property
    def seconds(self) -> float:
        return len(self.pcm) / self.format.sample_rate


def record(source: Source, seconds: float, progress: ProgressFn | None = None) -> Recording:
    """Captures ``seconds`` (rounded up to whole frames) from ``source``; opens and closes it."""
    fmt = source.format
    n = fmt.frame_samples
    frames = max(1, math.ceil(seconds * fmt.sample_rate / n))
    pcm = np.zeros((frames * n, fmt.channels), dtype=np.int16)
    first = 0
    got = 0
    source.open()
    try:
        for k in range(frames):
            frame = pcm[k * n : (k + 1) * n]
            t = source.read(frame)
            if t is None:
                break
            if k == 0:
                first = t
            got = k + 1
            if progress is not None:
                peak, rms = levels(frame)
                progress(got * n / fmt.sample_rate, peak, rms)
    finally:
        source.close()
    if got == 0:
        raise SourceError(f"{source.name}: the source ended before the first frame")
    return Recording(pcm[: got * n], fmt, first, source.overruns)


@dataclass(frozen=True, slots=True)
class CodecFigures:
    """What the Opus round trip cost and produced."""

    frames: int
    bitrate_kbps: float  # measured: payload bits / audio duration
    packet_bytes_min: int
    packet_bytes_mean: float
    packet_bytes_max: int
    encode_us_median: float
    encode_us_p95: float
    decode_us_median: float
    decode_us_p95: float


class _CodecMeter:
    """Per-frame packet sizes and encode/decode times, in arrays allocated up front."""

    def __init__(self, capacity: int) -> None:
        self.sizes = np.zeros(capacity, dtype=np.int32)
        self.enc_ns = np.zeros(capacity, dtype=np.int64)
        self.dec_ns = np.zeros(capacity, dtype=np.int64)
        self.count = 0

    def add(self, size: int, enc_ns: int, dec_ns: int) -> None:
        if self.count < len(self.sizes):
            self.sizes[self.count], self.enc_ns[self.count], self.dec_ns[self.count] = size, enc_ns, dec_ns
            self.count += 1

    def figures(self, fmt: AudioFormat) -> CodecFigures:
        k = self.count
        if k == 0:
            return CodecFigures(0, 0.0, 0, 0.0, 0, 0.0, 0.0, 0.0, 0.0)
        sizes, enc, dec = self.sizes[:k], self.enc_ns[:k] / 1000, self.dec_ns[:k] / 1000
        duration_s = k * fmt.frame_samples / fmt.sample_rate
        return CodecFigures(
            frames=k,
            bitrate_kbps=float(sizes.sum()) * 8 / duration_s / 1000,
            packet_bytes_min=int(sizes.min()),
            packet_bytes_mean=float(sizes.mean()),
            packet_bytes_max=int(sizes.max()),
            encode_us_median=float(np.median(enc)),
            encode_us_p95=float(np.percentile(enc, 95)),
            decode_us_median=float(np.median(dec)),
            decode_us_p95=float(np.percentile(dec, 95)),
        )


class _RoundTrip:
    """One OpusEncoder and OpusDecoder pair; ``run(frame)`` leaves the decoded frame in ``decoded``."""

    def __init__(self, fmt: AudioFormat, codec: CodecConfig, capacity: int) -> None:
        self.encoder = OpusEncoder(fmt, codec)
        self.decoder = OpusDecoder(fmt.sample_rate, fmt.channels, fmt.frame_samples)
        self.decoded = self.decoder.output[: fmt.frame_samples]
        self.meter = _CodecMeter(capacity)

    def run(self, frame: npt.NDArray[np.int16]) -> None:
        self.encoder.input[:] = frame
        t0 = time.perf_counter_ns()
        packet = self.encoder.encode()
        t1 = time.perf_counter_ns()
        n = self.decoder.decode(packet)
        t2 = time.perf_counter_ns()
        if n != len(frame):
            raise RuntimeError(f"Opus decoded {n} samples from a {len(frame)}-sample frame")
        self.meter.add(len(packet), t1 - t0, t2 - t1)

    def close(self) -> None:
        self.encoder.close()
        self.decoder.close()


@dataclass(frozen=True, slots=True)
class Transcoded:
    pcm: npt.NDArray[np.int16] = field(repr=False)  # decoded audio, same length as the input
    codec: CodecFigures
    lookahead: int  # encoder delay in samples: the decoded audio lags the input by this much


def transcode(pcm: npt.NDArray[np.int16], fmt: AudioFormat, codec: CodecConfig) -> Transcoded:
    """Encodes and decodes every frame of ``pcm`` (whole frames, fmt's channels), timing each."""
    n = fmt.frame_samples
    frames = len(pcm) // n
    out = np.zeros((frames * n, fmt.channels), dtype=np.int16)
    trip = _RoundTrip(fmt, codec, frames)
    try:
        for k in range(frames):
            trip.run(pcm[k * n : (k + 1) * n])
            out[k * n : (k + 1) * n] = trip.decoded
        return Transcoded(out, trip.meter.figures(fmt), trip.encoder.lookahead)
    finally:
        trip.close()


@dataclass(frozen=True, slots=True)
class Playback:
    frames: int  # samples per channel handed to the sink
    seconds: float
    underruns: int


def play(
    sink: Sink, pcm: npt.NDArray[np.int16], fmt: AudioFormat, progress: ProgressFn | None = None
) -> Playback:
    """Plays ``pcm`` through ``sink`` (opened at ``fmt``); returns once the device has played it all.

    The sink clocks the playback: after the last sample, ``fill`` waits for enough further periods
    to cover the device's output delay, so the tail is heard before the sink is stopped.
    """
    total = len(pcm)
    state = {"pos": 0, "tail": 0, "need": 0}
    done = threading.Event()
    under0 = sink.underruns

    def fill(buf: npt.NDArray[np.int16]) -> bool:
        pos, n = state["pos"], len(buf)
        take = min(n, total - pos)
        if take > 0:
            buf[:take] = pcm[pos : pos + take]
            buf[take:] = 0
            state["pos"] = pos + take
            return True
        buf.fill(0)
        if state["tail"] == 0:
            period_ns = max(1, n * 1_000_000_000 // fmt.sample_rate)
            state["need"] = -(-int(getattr(sink, "delay_ns", 0)) // period_ns) + 1
        state["tail"] += 1
        if state["tail"] >= state["need"]:
            done.set()
        return False

    sink.open(fmt)
    sink.start(fill)
    deadline = time.monotonic() + total / fmt.sample_rate + 5.0
    try:
        while not done.wait(_PROGRESS_S):
            _check_sink(sink)
            if time.monotonic() > deadline:
                raise SinkError(f"{sink.name}: the output stopped taking audio")
            if progress is not None:
                pos = state["pos"]
                peak, rms = levels(pcm[max(0, pos - fmt.frame_samples) : pos])
                progress(pos / fmt.sample_rate, peak, rms)
    finally:
        sink.stop()
    _check_sink(sink)
    if progress is not None:
        peak, rms = levels(pcm[-fmt.frame_samples :])
        progress(state["pos"] / fmt.sample_rate, peak, rms)
    return Playback(state["pos"], state["pos"] / fmt.sample_rate, sink.underruns - under0)


def _check_sink(sink: Sink) -> None:
    error = getattr(sink, "error", None)
    if isinstance(error, SinkError):
        raise error
    if error is not None:
        raise SinkError(f"{sink.name}: playback failed: {error}")


@dataclass(frozen=True, slots=True)
class LatencyFigures:
    """Capture of a frame's first sample to its playback (live mode), in ms."""

    frames: int
    min_ms: float
    median_ms: float
    p95_ms: float
    max_ms: float


@dataclass(frozen=True, slots=True)
class LoopbackResult:
    mode: str  # "record" (record, then play) or "live"
    source: str
    sink: str
    format: AudioFormat
    config: CodecConfig
    recorded_s: float
    played_s: float
    codec: CodecFigures
    input_peak_dbfs: float
    input_rms_dbfs: float
    overruns: int
    underruns: int
    latency: LatencyFigures | None = None  # live mode only
    starved_frames: int = 0  # live: sink periods that found no decoded frame ready
    dropped_frames: int = 0  # live: frames dropped to keep the queue short
    recording: npt.NDArray[np.int16] | None = field(default=None, repr=False, compare=False)
    decoded: npt.NDArray[np.int16] | None = field(default=None, repr=False, compare=False)
    channels: tuple[ChannelLevel, ...] = ()  # the input's level per encoded channel (levelcheck)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready figures (no audio)."""
        out: dict[str, Any] = {
            "mode": self.mode,
            "source": self.source,
            "sink": self.sink,
            "format": {
                "sample_rate": self.format.sample_rate,
                "channels": self.format.channels,
                "frame_ms": self.format.frame_ms,
            },
            "bitrate_kbps_configured": self.config.bitrate / 1000,
            "recorded_s": self.recorded_s,
            "played_s": self.played_s,
            "codec": _fields(self.codec),
            "input_peak_dbfs": self.input_peak_dbfs,
            "input_rms_dbfs": self.input_rms_dbfs,
            "overruns": self.overruns,
            "underruns": self.underruns,
            "latency": _fields(self.latency) if self.latency is not None else None,
            "starved_frames": self.starved_frames,
            "dropped_frames": self.dropped_frames,
            "input_channels": [c.as_dict() for c in self.channels],
        }
        return out


def _fields(obj: Any) -> dict[str, Any]:
    return {name: getattr(obj, name) for name in obj.__slots__}


def run_loopback(
    source: Source,
    sink: Sink,
    seconds: float,
    codec: CodecConfig | None = None,
    record_progress: ProgressFn | None = None,
    play_progress: ProgressFn | None = None,
) -> LoopbackResult:
    """Records ``seconds`` from ``source``, encodes and decodes it with Opus, plays it through ``sink``."""
    codec = (codec or CodecConfig()).validate()
    fmt = source.format.validate_opus()
    rec = record(source, seconds, record_progress)
    coded = transcode(rec.pcm, fmt, codec)
    played = play(sink, coded.pcm, fmt, play_progress)
    peak, rms = levels(rec.pcm)
    return LoopbackResult(
        mode="record",
        source=source.name,
        sink=sink.name,
        format=fmt,
        config=codec,
        recorded_s=rec.seconds,
        played_s=played.seconds,
        codec=coded.codec,
        input_peak_dbfs=peak,
        input_rms_dbfs=rms,
        overruns=rec.overruns,
        underruns=played.underruns,
        recording=rec.pcm,
        decoded=coded.pcm,
        channels=tuple(channel_levels(rec.pcm)),
    )


class _LevelMeter:
    """Peak and RMS of everything captured, and of the latest frame (for the progress display)."""

    def __init__(self) -> None:
        self.frames = 0
        self.peak = 0.0
        self.sum_sq = 0.0
        self.samples = 0
        self.last_peak = self.last_rms = SILENCE_DBFS

    def add(self, frame: npt.NDArray[np.int16]) -> None:
        x = frame.astype(np.float64)
        sq = float(np.dot(x.ravel(), x.ravel()))
        peak = float(np.max(np.abs(x))) if x.size else 0.0
        self.peak = max(self.peak, peak)
        self.sum_sq += sq
        self.samples += x.size
        self.frames += 1
        self.last_peak = _dbfs(peak)
        self.last_rms = _dbfs(math.sqrt(sq / max(1, x.size)))

    def totals(self) -> tuple[float, float]:
        return _dbfs(self.peak), _dbfs(math.sqrt(self.sum_sq / max(1, self.samples)))


class _LiveRing:
    """Decoded frames with their capture times, from the capture thread to the sink's fill()."""

    def __init__(self, fmt: AudioFormat, sink: Sink, clock: Clock, capacity_frames: int) -> None:
        n = fmt.frame_samples
        self.frames = np.zeros((LIVE_QUEUE_MAX + 1, n, fmt.channels), dtype=np.int16)
        self.times = np.zeros(LIVE_QUEUE_MAX + 1, dtype=np.int64)
        self.written = self.read = 0
        self.offset = 0  # samples of the current frame already played
        self.lock = threading.Lock()
        self.latency_ns = np.zeros(capacity_frames, dtype=np.int64)
        self.latencies = 0
        self.starved = self.dropped = 0
        self.finished = False  # the capture side has ended: an empty queue is no longer starvation
        self.drained = threading.Event()  # finished, and every queued frame handed to the sink
        self.played = 0  # samples of decoded audio handed to the sink
        self.primed = False  # playing; False: waiting until a frame has been queued for LIVE_MARGIN_US
        self._first_arrival = 0
        self._margin_ns = LIVE_MARGIN_US * 1000
        self._n = n
        self._rate = fmt.sample_rate
        self._sink = sink
        self._clock = clock

    def push(self, frame: npt.NDArray[np.int16], t_capture: int) -> None:
        with self.lock:
            if self.written - self.read > LIVE_QUEUE_MAX:
                self.read += 1  # the sink fell behind: keep the latency bounded
                self.offset = 0
                self.dropped += 1
            if self.read == self.written and not self.primed:
                self._first_arrival = self._clock.monotonic_ns()
            slot = self.written % len(self.frames)
            self.frames[slot] = frame
            self.times[slot] = t_capture
            self.written += 1

    def fill(self, buf: npt.NDArray[np.int16]) -> bool:
        """The sink's fill: copies queued audio into ``buf`` (any length), zeros where none is ready."""
        pos, n, kept = 0, len(buf), False
        with self.lock:
            if not self.primed:
                waited = self._clock.monotonic_ns() - self._first_arrival
                if self.read == self.written or not (self.finished or waited >= self._margin_ns):
                    if self.finished:
                        self.drained.set()
                    buf.fill(0)
                    return False
                self.primed = True
            while pos < n:
                if self.read == self.written:
                    if self.finished:
                        self.drained.set()
                    else:  # starved: count it, and build the margin up again
                        self.starved += 1
                        self.primed = False
                    buf[pos:] = 0
                    break
                slot = self.read % len(self.frames)
                if self.offset == 0 and self.latencies < len(self.latency_ns):
                    ahead = pos * 1_000_000_000 // self._rate + int(getattr(self._sink, "delay_ns", 0))
                    self.latency_ns[self.latencies] = self._clock.wall_ns() + ahead - int(self.times[slot])
                    self.latencies += 1
                take = min(n - pos, self._n - self.offset)
                buf[pos : pos + take] = self.frames[slot, self.offset : self.offset + take]
                pos += take
                self.offset += take
                kept = True
                if self.offset == self._n:
                    self.offset = 0
                    self.read += 1
            self.played += pos
        return kept


def run_live(
    source: Source,
    sink: Sink,
    seconds: float | None,
    codec: CodecConfig | None = None,
    progress: ProgressFn | None = None,
    stop: threading.Event | None = None,
    clock: Clock = SYSTEM_CLOCK,
) -> LoopbackResult:
    """Runs source -> Opus encode -> decode -> sink in real time for ``seconds`` (None: until ``stop``)."""
    codec = (codec or CodecConfig()).validate()
    fmt = source.format.validate_opus()
    n = fmt.frame_samples
    frames = math.ceil(seconds * fmt.sample_rate / n) if seconds is not None else None
    capacity = frames if frames is not None else 30 * 60 * fmt.sample_rate // n  # figures for 30 minutes
    stop = stop or threading.Event()
    trip = _RoundTrip(fmt, codec, capacity)
    ring = _LiveRing(fmt, sink, clock, capacity)
    frame = np.zeros((n, fmt.channels), dtype=np.int16)
    meter = _LevelMeter()
    per_channel = LevelMeter(fmt.channels, n)
    failure: list[BaseException] = []

    def capture() -> None:
        try:
            while not stop.is_set() and (frames is None or meter.frames < frames):
                t = source.read(frame)
                if t is None:
                    break
                trip.run(frame)
                ring.push(trip.decoded, t)
                meter.add(frame)
                per_channel.add(frame)
        except BaseException as exc:  # re-raised on the caller's thread
            failure.append(exc)
        finally:
            ring.finished = True

    sink.open(fmt)
    source.open()
    thread = threading.Thread(target=capture, name="loopback capture", daemon=True)
    under0 = sink.underruns
    sink.start(ring.fill)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(_PROGRESS_S)
            _check_sink(sink)
            if progress is not None:
                progress(meter.frames * n / fmt.sample_rate, meter.last_peak, meter.last_rms)
        ring.drained.wait((LIVE_QUEUE_MAX + 2) * fmt.frame_ns / 1e9)  # play what is queued
    except KeyboardInterrupt:
        stop.set()
        thread.join()
    finally:
        stop.set()
        source.close()
        thread.join()
        sink.stop()
        trip.close()
    if failure:
        raise failure[0]
    peak_db, rms_db = meter.totals()
    lat = ring.latency_ns[: ring.latencies] / 1e6
    latency = (
        LatencyFigures(
            len(lat),
            float(lat.min()),
            float(np.median(lat)),
            float(np.percentile(lat, 95)),
            float(lat.max()),
        )
        if len(lat)
        else None
    )
    return LoopbackResult(
        mode="live",
        source=source.name,
        sink=sink.name,
        format=fmt,
        config=codec,
        recorded_s=meter.frames * n / fmt.sample_rate,
        played_s=ring.played / fmt.sample_rate,
        codec=trip.meter.figures(fmt),
        input_peak_dbfs=peak_db,
        input_rms_dbfs=rms_db,
        overruns=source.overruns,
        underruns=sink.underruns - under0,
        latency=latency,
        starved_frames=ring.starved,
        dropped_frames=ring.dropped,
        channels=tuple(per_channel.levels()),
    )
