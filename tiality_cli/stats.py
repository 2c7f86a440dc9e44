"""Receiver and sender statistics: O(1) updates on the audio path, frozen snapshots for readers.

Counters are plain ints written by one thread (the playout thread for the receiver, the capture and
network threads for the sender) and read by others; a snapshot copies them and computes the windowed
figures (percentiles, rates) on the reader's time, never on the audio path.
"""

from __future__ import annotations

import math
import threading
from collections import deque
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
        self.skipped = 0  # frames dropped to bring latency back to target
        self.inserted = 0  # frames of concealment added to raise latency to target
        self.frames_played = 0  # frames handed to the output (decoded + FEC + concealed + inserted)
        self.resyncs = 0  # large sequence jumps that restarted the playout position
        self.jitter_ns = 0.0  # RFC 3550 interarrival jitter
        self.buffer_ms = 0.0  # playout delay beyond the earliest arrivals (what the buffer holds)
        self.target_ms = 0.0
        self.drift_ppm = 0.0
        self.peak = 0.0  # int16 amplitude, current frame
        self.rms = 0.0
        self.latency_ms = Window(latency_window)
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
