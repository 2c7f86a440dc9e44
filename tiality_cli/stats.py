"""Receiver and sender statistics: O(1) updates on the audio path, frozen snapshots for readers.

Counters are plain ints written by one thread (the playout thread for the receiver, the capture and
network threads for the sender) and read by others; a snapshot copies them and computes the windowed
figures (percentiles, rates) on the reader's time, never on the audio path.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


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
        if self._n == 0:
            return math.nan
        return float(np.percentile(self._buf[: self._n], q))

    def max(self) -> float:
        return float(self._buf[: self._n].max()) if self._n else math.nan


def dbfs(value: float) -> float:
    """Full-scale int16 amplitude to dBFS (-inf for silence, clamped at -120)."""
    return 20 * math.log10(value / 32768.0) if value > 32768e-6 else -120.0


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

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, float):
                d[k] = None if math.isnan(v) else round(v, 3)
        return d


class RateMeter:
    """Turns a cumulative counter into a per-second rate between two snapshots."""

    def __init__(self) -> None:
        self._t = 0
        self._v = 0

    def rate(self, value: int, now_ns: int) -> float:
        dt = now_ns - self._t
        r = (value - self._v) * 1e9 / dt if self._t and dt > 0 else 0.0
        self._t, self._v = now_ns, value
        return r
