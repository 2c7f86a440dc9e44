"""Estimating the offset between the sender's and the receiver's wall clocks (NTP's four timestamps).

One exchange: the sender sends at t0 (its clock), the receiver stamps arrival t1 and reply t2 (its
clock), the sender gets the reply at t3. If the network delay is the same both ways,
offset = ((t1 - t0) + (t2 - t3)) / 2 is (receiver clock - sender clock), uncertain by at most half the
round trip (t3 - t0) - (t2 - t1). Queueing inflates the round trip of some exchanges, so only the
lowest-round-trip exchanges of a recent window are trusted, as NTP's clock filter does. Pure: the
caller supplies the four timestamps.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ClockSample:
    offset_ns: int
    round_trip_ns: int


def sample(t0: int, t1: int, t2: int, t3: int) -> ClockSample:
    """One exchange's offset (receiver - sender) and round trip."""
    return ClockSample(((t1 - t0) + (t2 - t3)) // 2, max(0, (t3 - t0) - (t2 - t1)))


class ClockFilter:
    """Keeps the last ``window`` samples; the estimate is the one with the smallest round trip."""

    def __init__(self, window: int = 16) -> None:
        self._samples: deque[ClockSample] = deque(maxlen=window)
        self.count = 0

    def add(self, s: ClockSample) -> None:
        self._samples.append(s)
        self.count += 1

    def best(self) -> ClockSample | None:
        return min(self._samples, key=lambda s: s.round_trip_ns, default=None)
