"""Receiver and sender statistics: O(1) updates on the audio path, frozen snapshots for readers.

Counters are plain ints written by one thread (the playout thread for the receiver, the capture and
network threads for the sender) and read by others; a snapshot copies them and computes the windowed
figures (percentiles, rates) on the reader's time, never on the audio path.

The one home of the level and rate arithmetic every command shows:

    gain_db, dbfs          amplitude ratio / int16 amplitude -> dB (SILENCE_DBFS for silence)
    frame_levels           peak and RMS of one int16 frame, in place (the audio path: no allocation)
    LevelMeter             the same for a stream of frames, with totals (loopback)
    levels                 peak and RMS dBFS of a whole recording (allocates: not for the audio path)
    RateMeter              a counter's per-second rate over the last 2 s, the same for every reader
"""

from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

METER_EVERY_MS = 100.0  # level figures (peak, RMS) are those of one frame in every 100 ms of audio
SILENCE_DBFS = -120.0  # the level reported for digital silence (JSON has no -inf)
FULL_SCALE = 32768.0  # int16 full scale: 0 dBFS


class Window:
    """A fixed ring of the most recent float samples (latency, jitter...); percentiles on demand."""

    def __init__(self, size: int) -> None:
        self._buf = np.zeros(size, dtype=np.float64)
        self._n = 0
        self._i = 0

    def add(self, value: float) -> None:
        self._buf[self._i] = value
        self._i = (self._i + 1) % len(self._buf)
        if self._n < len(self._buf):
            self._n += 1

    def clear(self) -> None:
        self._n = 0
        self._i = 0

    def __len__(self) -> int:
        return self._n

    def values(self) -> np.ndarray[Any, np.dtype[np.float64]]:
        """A copy of the samples held (oldest order is not preserved)."""
        return self._buf[: self._n].copy()

    def percentile(self, q: float) -> float:
        return self.quantiles(q)[0]

    def quantiles(self, *qs: float) -> list[float]:
        """Percentiles ``qs`` (0-100) of the samples held, as ``np.percentile`` gives them; nan if empty."""
        return quantiles(np.sort(self._buf[: self._n]), qs)

    def max(self) -> float:
        return float(self._buf[: self._n].max()) if self._n else math.nan


def quantiles(ordered: np.ndarray[Any, np.dtype[np.float64]], qs: tuple[float, ...]) -> list[float]:
    """Percentiles ``qs`` (0-100) of already sorted values, interpolated linearly between ranks (numpy's
    default method); nan for no values.

    ``np.percentile`` costs some 20 us of Python per call whatever the size; a receiver's stats line
    takes seven per sender (64 senders: ~450 calls a second on the presenter's thread, which the audio
    thread then waits for to release the GIL). One sort and a lookup per figure cost a fifth of that.
    """
    n = len(ordered)
    if n == 0:
        return [math.nan] * len(qs)
    out = []
    for q in qs:
        pos = (n - 1) * (q / 100.0)
        lo = int(pos)
        t = pos - lo
        a, b = float(ordered[lo]), float(ordered[min(lo + 1, n - 1)])
        out.append(b - (b - a) * (1.0 - t) if t >= 0.5 else a + (b - a) * t)  # numpy's _lerp, to the bit
    return out


def gain_db(gain: float) -> float:
    """An amplitude ratio in dB; SILENCE_DBFS (-120) at and below 1e-6, so silence stays a number."""
    return 20 * math.log10(gain) if gain > 1e-6 else SILENCE_DBFS


def dbfs(value: float) -> float:
    """An int16 amplitude (peak or RMS) in dBFS, full scale 32768; SILENCE_DBFS for silence."""
    return gain_db(value / FULL_SCALE)


def frame_levels(
    x: npt.NDArray[np.int16], scratch: npt.NDArray[np.float32] | npt.NDArray[np.float64]
) -> tuple[int, float]:
    """Peak and RMS of non-empty int16 audio, as int16 amplitudes (``dbfs`` turns them into dBFS).

    Allocates no array: ``scratch`` (float, ``x``'s shape) receives ``x / 32768``, which is what the
    playout engine plays, so it converts and measures in one pass. Squares are summed in the scratch's
    float type (int16 squares would overflow). The cast is a copy, then the scale is in place: a ufunc
    that casts as it goes (``np.multiply(x, k, out=scratch)``) allocates a 32 kB buffer on every call.
    """
    peak = max(int(x.max()), -int(x.min()))
    to_float(x, scratch)
    rms = math.sqrt(float(np.vdot(scratch, scratch)) / scratch.size) * FULL_SCALE
    return peak, rms


def to_float(x: npt.NDArray[np.int16], out: npt.NDArray[np.float32] | npt.NDArray[np.float64]) -> None:
    """``out`` = ``x`` / 32768 without allocating (``frame_levels`` less the measuring)."""
    np.copyto(out, x, casting="unsafe")
    np.multiply(out, 1.0 / FULL_SCALE, out=out)


def levels(pcm: npt.NDArray[np.int16]) -> tuple[float, float]:
    """(peak, RMS) of int16 audio in dBFS; SILENCE_DBFS for silence or no audio.

    Allocates a float64 copy: for whole recordings and progress displays, not for the audio path.
    """
    if pcm.size == 0:
        return SILENCE_DBFS, SILENCE_DBFS
    peak, rms = frame_levels(pcm, np.empty(pcm.shape, dtype=np.float64))
    return dbfs(peak), dbfs(rms)


class LevelMeter:
    """Peak and RMS of the frames that pass: the latest frame's and all of them so far.

    ``add`` runs on a capture thread every frame and allocates no array; readers on other threads
    take ``latest_dbfs()`` / ``total_dbfs()`` whenever they like.
    """

    def __init__(self, frame_shape: tuple[int, ...]) -> None:
        self._scratch = np.zeros(frame_shape, dtype=np.float32)
        self.frames = 0
        self.peak = 0  # latest frame, int16 amplitude
        self.rms = 0.0
        self.max_peak = 0
        self._sum_sq = 0.0
        self._samples = 0

    def add(self, frame: npt.NDArray[np.int16]) -> None:
        peak, rms = frame_levels(frame, self._scratch)
        self.peak, self.rms = peak, rms
        self.max_peak = max(self.max_peak, peak)
        self._sum_sq += rms * rms * frame.size
        self._samples += frame.size
        self.frames += 1

    def latest_dbfs(self) -> tuple[float, float]:
        """(peak, RMS) of the latest frame in dBFS."""
        return dbfs(self.peak), dbfs(self.rms)

    def total_dbfs(self) -> tuple[float, float]:
        """(peak, RMS) of every frame so far in dBFS."""
        return dbfs(self.max_peak), dbfs(math.sqrt(self._sum_sq / max(1, self._samples)))


class ReceiverStats:
    """Counters for one stream, updated on the playout thread."""

    def __init__(self, frame_ms: float, latency_window: int = 500) -> None:
        self.frame_ms = frame_ms
        self.packets = 0
        self.bytes = 0
        self.lost = 0  # frames never received by their playout time and never afterwards
        self.late = 0  # packets that arrived after their frame had been played (dropped)
        self.concealed = 0  # frames synthesised by Opus PLC
        self.fec_recovered = 0  # frames rebuilt from the next packet's in-band FEC
        self.duplicates = 0
        self.corrupt = 0  # packets libopus could not decode (concealed instead)
        # Latency steps (playout.py): each drops or inserts at most 2.5 ms, never a whole frame.
        self.skipped = 0  # steps that dropped audio to bring latency down to the target
        self.inserted = 0  # steps that inserted concealment (2.5 ms) to raise latency to the target
        self.skipped_ms = 0.0  # audio those steps dropped, in all
        self.inserted_ms = 0.0  # concealment those steps inserted, in all
        self.resampled_ms = 0.0  # latency removed (+) or added (-) by resampling faster or slower than drift
        self.stale = 0  # frames dropped unplayed for that reason
        self.stale_ms = 0.0  # start-up audio already older than the target when playback began, unplayed
        self.frames_played = 0  # frames taken in their turn: decoded, rebuilt by FEC or concealed
        self.resyncs = 0  # large sequence jumps that restarted the playout position
        self.jitter_ns = 0.0  # RFC 3550 interarrival jitter
        self.buffer_ms = 0.0  # playout delay beyond the earliest arrivals (what the buffer holds)
        self.target_ms = 0.0
        self.drift_ppm = 0.0
        self.peak = 0.0  # int16 amplitude, current frame
        self.rms = 0.0
        self.latency_ms = Window(latency_window)  # microphone ADC -> speaker DAC, per decoded frame
        # Where that latency goes, per decoded frame; the five add up to latency_ms frame by frame:
        self.stage_capture_ms = Window(latency_window)  # the capture device's delay (sender-reported)
        self.stage_frame_ms = Window(latency_window)  # the frame filling up, plus the encoder look-ahead
        self.stage_network_ms = Window(latency_window)  # sender read -> arrival (encode, send, network)
        self.stage_buffer_ms = Window(latency_window)  # arrival -> hand-off to the sink (jitter buffer)
        self.stage_output_ms = Window(latency_window)  # hand-off -> DAC (the sink's reported delay)
        self._last_arrival = 0
        self._last_capture = 0

    def on_packet(self, size: int, capture_ns: int, arrival_ns: int) -> None:
        """Counts a packet and updates RFC 3550 jitter (transit difference, smoothed by 1/16)."""
        self.packets += 1
        self.bytes += size
        if self._last_arrival:
            d = (arrival_ns - self._last_arrival) - (capture_ns - self._last_capture)
            self.jitter_ns += (abs(d) - self.jitter_ns) / 16.0
        self._last_arrival = arrival_ns
        self._last_capture = capture_ns


@dataclass(frozen=True, slots=True)
class StatsSnapshot:
    """What the live view, JSON lines and the GUI read; field names are stable (docs/stats.md)."""

    packets: int
    bytes: int
    lost: int
    late: int
    concealed: int
    fec_recovered: int
    duplicates: int
    corrupt: int
    skipped: int
    inserted: int
    frames_played: int
    jitter_ms: float
    latency_ms_p50: float
    latency_ms_p95: float
    latency_ms_max: float
    bitrate_kbps: float
    packets_per_s: float
    buffer_ms: float
    target_ms: float
    drift_ppm: float
    level_dbfs: float
    peak_dbfs: float
    streams: int
    underruns: int
    skipped_ms: float = 0.0  # audio the latency steps dropped, in all (each step at most 2.5 ms)
    inserted_ms: float = 0.0  # concealment the latency steps inserted, in all
    stale: int = 0  # frames already older than the target when playback (re)started: never played
    stale_ms: float = 0.0  # that start-up audio, in all (whole frames and the start's trim)
    # Where latency_ms_p50 goes, microphone to speaker (medians over the last frames; they add up to it):
    stage_capture_ms: float = math.nan  # the capture device held the frame (sender-measured)
    stage_frame_ms: float = math.nan  # the frame filling up, plus the encoder's look-ahead
    stage_network_ms: float = math.nan  # sender's read -> arrival here (encoding, gRPC, the network)
    stage_buffer_ms: float = math.nan  # arrival -> hand-off to the output (the jitter buffer)
    stage_output_ms: float = math.nan  # hand-off -> the speaker's DAC (the output device's delay)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, float):
                d[k] = None if math.isnan(v) else round(v, 3)
        return d


class RateMeter:
    """A cumulative counter as a per-second rate over the last ``window_s``, for any number of readers.

    Each reading records (time, value) at most every ``resolution_s`` and answers with the rate since the
    oldest sample still inside the window (or just before it): readers polling at 20 ms and at 1 s see the
    same figure, where a meter that measured "since my last call" would give each the other's interval.
    ``start_ns`` seeds a zero reading, so the first rate counts from when the counter started.
    """

    def __init__(self, start_ns: int = 0, window_s: float = 2.0, resolution_s: float = 0.1) -> None:
        self._window = int(window_s * 1e9)
        self._resolution = int(resolution_s * 1e9)
        self._q: deque[tuple[int, int]] = deque([(start_ns, 0)] if start_ns else [])
        self._lock = threading.Lock()

    def rate(self, value: int, now_ns: int) -> float:
        with self._lock:
            q = self._q
            if not q or now_ns - q[-1][0] >= self._resolution:
                q.append((now_ns, value))
            while len(q) > 2 and q[1][0] <= now_ns - self._window:
                q.popleft()
            t0, v0 = q[0]
            dt = now_ns - t0
            return (value - v0) * 1e9 / dt if dt > 0 else 0.0
