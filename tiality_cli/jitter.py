"""The jitter buffer: packets placed by sequence number, reordered, de-duplicated. Pure: no clock, no I/O.

Wire sequence numbers are 32-bit and wrap; ``SeqUnwrapper`` (from ``tiality_cli.seq``, the one home of
that arithmetic) extends them to unbounded ints relative to the highest seen, so everything here
compares plainly. The buffer is a power-of-two ring indexed by ``seq % capacity``; each slot remembers
which sequence it last held and whether that frame was played or concealed, which is how a late packet
is told from a duplicate.
"""

from __future__ import annotations

from enum import IntEnum

from tiality_cli.seq import SeqUnwrapper as SeqUnwrapper  # re-exported: the buffer's users unwrap with it


class Put(IntEnum):
    STORED = 0
    DUPLICATE = 1  # the same sequence is already buffered, was already played, or already came late
    LATE = 2  # its frame's turn has passed (it was concealed): dropped
    TOO_FAR = 3  # beyond the ring: the caller decides (resynchronise)


_EMPTY, _FILLED, _PLAYED, _MISSED, _LATE = 0, 1, 2, 3, 4


class JitterBuffer:
    """Holds packets from ``next_seq`` (the next frame to play) up to ``next_seq + capacity - 1``."""

    def __init__(self, capacity: int) -> None:
        if capacity < 2 or capacity & (capacity - 1):
            raise ValueError("capacity must be a power of two >= 2")
        self.capacity = capacity
        self._mask = capacity - 1
        self._seq = [-1] * capacity
        self._state = [_EMPTY] * capacity
        self._payload: list[bytes | None] = [None] * capacity
        self._capture = [0] * capacity
        self.next_seq = 0
        self.highest = -1  # highest sequence stored since the last reset
        self.count = 0  # packets currently buffered

    def reset(self, next_seq: int) -> None:
        """Empties the buffer and sets the playout position."""
        for i in range(self.capacity):
            self._seq[i] = -1
            self._state[i] = _EMPTY
            self._payload[i] = None
        self.next_seq = next_seq
        self.highest = next_seq - 1
        self.count = 0

    def put(self, seq: int, payload: bytes, capture_ns: int) -> Put:
        i = seq & self._mask
        if seq < self.next_seq:
            if seq <= self.next_seq - self.capacity:
                return Put.TOO_FAR
            if self._seq[i] == seq and self._state[i] != _EMPTY:  # (an empty slot's -1 is no sequence)
                if self._state[i] != _MISSED:
                    return Put.DUPLICATE  # played, or a copy of a packet that already came late
                self._state[i] = _LATE
            return Put.LATE
        if seq >= self.next_seq + self.capacity:
            return Put.TOO_FAR
        if self._seq[i] == seq and self._state[i] == _FILLED:
            return Put.DUPLICATE
        self._seq[i] = seq
        self._state[i] = _FILLED
        self._payload[i] = payload
        self._capture[i] = capture_ns
        self.count += 1
        if seq > self.highest:
            self.highest = seq
        return Put.STORED

    def peek(self, seq: int) -> bytes | None:
        i = seq & self._mask
        return self._payload[i] if self._seq[i] == seq and self._state[i] == _FILLED else None

    def capture_ns(self, seq: int) -> int:
        """Capture time of a buffered packet (0 when absent)."""
        i = seq & self._mask
        return self._capture[i] if self._seq[i] == seq and self._state[i] == _FILLED else 0

    def pop(self) -> tuple[bytes | None, int]:
        """Takes the frame at ``next_seq`` (payload or None when missing, capture time) and advances."""
        seq = self.next_seq
        i = seq & self._mask
        if self._seq[i] == seq and self._state[i] == _FILLED:
            payload, capture = self._payload[i], self._capture[i]
            self._state[i] = _PLAYED
            self._payload[i] = None
            self.count -= 1
        else:
            payload, capture = None, 0
            self._seq[i] = seq
            self._state[i] = _MISSED
            self._payload[i] = None
        self.next_seq = seq + 1
        return payload, capture

    @property
    def depth(self) -> int:
        """Frames from the playout position through the newest packet (gaps included)."""
        return max(0, self.highest - self.next_seq + 1)
