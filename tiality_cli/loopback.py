"""The microphone self-test: capture, an Opus round trip and playback, with the codec's figures.

    record(source, seconds, progress) -> Recording                capture (opens and closes the source)
    transcode(pcm, fmt, codec) -> Transcoded                      every frame through Opus, timed
    play(sink, pcm, fmt, progress) -> Playback                    an array through a sink, device-clocked
    run_loopback(source, sink, seconds, codec, ...) -> LoopbackResult     record, transcode, then play
    run_live(source, sink, seconds, codec, ...) -> LoopbackResult         source -> Opus -> sink, live

No typer or rich here: ``cli/devices.py`` shows progress through the ``progress`` callbacks, which get
(seconds done, peak dBFS, RMS dBFS of the latest frame) on the caller's thread, never on an audio one.
Levels come from ``tiality_cli.stats``.

Live mode is the receiver's playout on one machine: a capture thread encodes each frame and pushes the
packet into a ``StreamPlayout``, which the sink's ``fill`` pulls as ``Receiver.fill`` does. So the
microphone and the speaker may run on different clocks (they do, unless they are one card): the engine
measures the drift and resamples for it, and holds its buffer at the capture jitter it sees. The
latency is a frame's capture time to the moment its first sample reaches the output (when the engine
hands it to ``fill``, plus the device's reported output delay).
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
from tiality_cli.io.base import STALL_S, Sink, Source, to_int16
from tiality_cli.levelcheck import ChannelLevel, channel_levels
from tiality_cli.levelcheck import LevelMeter as ChannelMeter
from tiality_cli.playout import PlayoutConfig, StreamPlayout
from tiality_cli.stats import LevelMeter, ReceiverStats, Window, levels

ProgressFn = Callable[[float, float, float], None]  # (seconds done, peak dBFS, RMS dBFS)
_PROGRESS_S = 0.1  # how often play() and run_live() report progress
LIVE_FIGURES_S = 30 * 60  # live mode keeps per-frame figures (latency, codec) for up to 30 minutes
LIVE_FLUSH_NS = 500_000_000  # live: at most this much audio that a device held before capture began
# (a first read returns it at once, frames already 20, 40, 60 ms old) is dropped rather than played late


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
    meter = LevelMeter((n, fmt.channels))
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
                meter.add(frame)
                progress(got * n / fmt.sample_rate, *meter.latest_dbfs())
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

    def run(self, frame: npt.NDArray[np.int16]) -> bytes:
        """Encodes and decodes ``frame`` (timing both); returns the packet."""
        self.encoder.input[:] = frame
        t0 = time.perf_counter_ns()
        packet = self.encoder.encode()
        t1 = time.perf_counter_ns()
        n = self.decoder.decode(packet)
        t2 = time.perf_counter_ns()
        if n != len(frame):
            raise RuntimeError(f"Opus decoded {n} samples from a {len(frame)}-sample frame")
        self.meter.add(len(packet), t1 - t0, t2 - t1)
        return packet

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

    @staticmethod
    def of(ms: npt.NDArray[np.float64]) -> LatencyFigures | None:
        """The figures of per-frame latencies in ms (None when there are none)."""
        if not len(ms):
            return None
        p50, p95 = np.percentile(ms, [50, 95])
        return LatencyFigures(len(ms), float(ms.min()), float(p50), float(p95), float(ms.max()))


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
    starved_frames: int = 0  # live: frames made up (concealed) because the mic's was not there in time
    dropped_frames: int = 0  # live: frames of the mic's that came too late to play (the engine's 2.5 ms
    # latency steps are not losses: they are in the engine's stats, not here)
    drift_ppm: float = 0.0  # live: how fast the mic's clock runs against the speaker's, as measured
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
            "drift_ppm": self.drift_ppm,
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


class _HeardLatency(Window):
    """The playout's latency samples (capture to hand-off) plus the output's delay at that moment.

    So the figures say when a frame is heard, which is what a listener (and the echo test) measures.
    The engine adds the samples on the sink's thread, from ``pull``, where reading the delay is safe.
    """

    def __init__(self, size: int, sink: Sink) -> None:
        super().__init__(size)
        self._sink = sink

    def add(self, value: float) -> None:
        super().add(value + int(getattr(self._sink, "delay_ns", 0)) / 1e6)


class _LiveOutput:
    """The sink's side of live mode: pulls the engine into float32, hands the sink int16 (no allocation)."""

    def __init__(self, engine: StreamPlayout, fmt: AudioFormat) -> None:
        self.engine = engine
        self.running = threading.Event()  # the sink has pulled once: its clock runs
        self._started = False
        self._block = np.zeros((max(4096, fmt.frame_samples), fmt.channels), dtype=np.float32)

    def fill(self, out: npt.NDArray[np.int16]) -> bool:
        if not self._started:
            self._started = True
            self.running.set()
        n = len(out)
        if n > len(self._block):  # a device asking for an unusually large block: grow once
            self._block = np.zeros((n, out.shape[1]), dtype=np.float32)
        block = self._block[:n]
        playing = self.engine.pull(block)
        to_int16(block, out)
        return playing


def run_live(
    source: Source,
    sink: Sink,
    seconds: float | None,
    codec: CodecConfig | None = None,
    progress: ProgressFn | None = None,
    stop: threading.Event | None = None,
    clock: Clock = SYSTEM_CLOCK,
    playout: PlayoutConfig | None = None,
) -> LoopbackResult:
    """Runs source -> Opus -> playout engine -> sink in real time for ``seconds`` (None: until ``stop``).

    ``playout`` is the engine's latency policy (default: the receiver's, adaptive with drift
    compensation). The capture thread also decodes each packet once more, only to time the decoder
    for the codec figures (the engine decodes what is played, on the sink's thread).
    """
    codec = (codec or CodecConfig()).validate()
    fmt = source.format.validate_opus()
    n = fmt.frame_samples
    frames = math.ceil(seconds * fmt.sample_rate / n) if seconds is not None else None
    capacity = frames if frames is not None else LIVE_FIGURES_S * fmt.sample_rate // n
    stop = stop or threading.Event()
    sink.open(fmt)
    stats = ReceiverStats(fmt.frame_ms, latency_window=1)
    stats.latency_ms = _HeardLatency(capacity, sink)
    engine = StreamPlayout(fmt, sink.format or fmt, playout, clock, fec=codec.inband_fec, stats=stats)
    output = _LiveOutput(engine, sink.format or fmt)
    trip = _RoundTrip(fmt, codec, capacity)
    frame = np.zeros((n, fmt.channels), dtype=np.int16)
    meter = LevelMeter(frame.shape)
    per_channel = ChannelMeter(fmt.channels, n)
    failure: list[BaseException] = []

    def capture() -> None:
        seq = 0
        flush = LIVE_FLUSH_NS // fmt.frame_ns  # stale frames that may still be dropped at the start
        stale_ns = fmt.frame_ns + max(fmt.frame_ns // 2, 5_000_000)
        try:
            while not stop.is_set() and (frames is None or seq < frames):
                t = source.read(frame)
                if t is None:
                    break
                if seq == 0 and flush > 0 and clock.wall_ns() - t > stale_ns:
                    flush -= 1  # held by the device before the loop ran: a frame would be ~T old
                    continue
                meter.add(frame)
                per_channel.add(frame)
                engine.push(seq, t, trip.run(frame))
                seq += 1
        except BaseException as exc:  # re-raised on the caller's thread
            failure.append(exc)
        finally:
            engine.end()  # the engine plays what it holds, then finishes

    thread = threading.Thread(target=capture, name="loopback capture", daemon=True)
    under0 = sink.underruns
    sink.start(output.fill)
    try:
        # Capture starts once the output runs: a device's first callbacks may come tens of ms after
        # start(), and audio captured meanwhile would reach the engine as a backlog of old frames.
        deadline = time.monotonic() + STALL_S
        while not output.running.wait(_PROGRESS_S):
            _check_sink(sink)
            if time.monotonic() > deadline:
                raise SinkError(f"{sink.name}: the output did not start within {STALL_S:g} s")
        source.open()
        thread.start()
        while thread.is_alive():
            thread.join(_PROGRESS_S)
            _check_sink(sink)
            if progress is not None:
                progress(meter.frames * n / fmt.sample_rate, *meter.latest_dbfs())
        # Play what the engine holds (its buffer never exceeds max_latency_ms), then stop the sink.
        engine.finished.wait(engine.config.max_latency_ms / 1000 + 4 * fmt.frame_ns / 1e9)
    except KeyboardInterrupt:
        stop.set()
    finally:
        stop.set()
        source.close()
        if thread.ident is not None:
            thread.join()
        sink.stop()
        trip.close()
    if failure:
        raise failure[0]
    peak_db, rms_db = meter.total_dbfs()
    return LoopbackResult(
        mode="live",
        source=source.name,
        sink=sink.name,
        format=fmt,
        config=codec,
        recorded_s=meter.frames * n / fmt.sample_rate,
        played_s=stats.frames_played * fmt.frame_ms / 1000,
        codec=trip.meter.figures(fmt),
        input_peak_dbfs=peak_db,
        input_rms_dbfs=rms_db,
        overruns=source.overruns,
        underruns=sink.underruns - under0,
        latency=LatencyFigures.of(stats.latency_ms.values()),
        starved_frames=stats.concealed,
        dropped_frames=stats.late,
        drift_ppm=stats.drift_ppm,
        channels=tuple(per_channel.levels()),
    )
