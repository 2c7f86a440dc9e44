"""The jitter buffer and sequence unwrapping, one packet at a time (pure: no clock, no codec)."""

from __future__ import annotations

import pytest

from tiality_cli.jitter import JitterBuffer, Put, SeqUnwrapper


def test_unwrap_continues_across_the_32_bit_wrap() -> None:
    u = SeqUnwrapper()
    seqs = [2**32 - 3, 2**32 - 2, 2**32 - 1, 0, 1, 2]
    assert [u.unwrap(s) for s in seqs] == [2**32 - 3, 2**32 - 2, 2**32 - 1, 2**32, 2**32 + 1, 2**32 + 2]


def test_unwrap_handles_reordering_around_the_wrap() -> None:
    u = SeqUnwrapper()
    assert [u.unwrap(s) for s in [2**32 - 1, 1, 0, 2**32 - 2]] == [2**32 - 1, 2**32 + 1, 2**32, 2**32 - 2]
    assert u.highest == 2**32 + 1


def test_reordered_packets_come_out_in_sequence() -> None:
    jb = JitterBuffer(16)
    jb.reset(100)
    for seq in (102, 100, 101, 103):
        assert jb.put(seq, bytes([seq]), seq * 10) is Put.STORED
    assert jb.depth == 4
    out = [jb.pop() for _ in range(4)]
    assert out == [(bytes([s]), s * 10) for s in (100, 101, 102, 103)]
    assert jb.count == 0


def test_missing_frame_pops_as_none_and_a_later_arrival_is_late() -> None:
    jb = JitterBuffer(16)
    jb.reset(0)
    jb.put(1, b"b", 1)
    assert jb.pop() == (None, 0)  # frame 0 missing at its turn
    assert jb.put(0, b"a", 0) is Put.LATE
    assert jb.pop() == (b"b", 1)


def test_the_frame_before_the_first_is_late_not_a_duplicate() -> None:
    # Unwrapped, the packet before sequence 0 (2**32 - 1, reordered) is -1: the empty slots' marker.
    jb = JitterBuffer(16)
    jb.reset(0)
    assert jb.put(0, b"a", 0) is Put.STORED
    assert jb.pop() == (b"a", 0)
    assert jb.put(-1, b"z", 0) is Put.LATE


def test_duplicates_are_detected_before_and_after_playout() -> None:
    jb = JitterBuffer(16)
    jb.reset(5)
    assert jb.put(5, b"x", 0) is Put.STORED
    assert jb.put(5, b"x", 0) is Put.DUPLICATE
    jb.pop()
    assert jb.put(5, b"x", 0) is Put.DUPLICATE


def test_packets_beyond_the_ring_are_refused() -> None:
    jb = JitterBuffer(16)
    jb.reset(0)
    assert jb.put(16, b"far", 0) is Put.TOO_FAR
    assert jb.put(15, b"edge", 0) is Put.STORED
    for _ in range(20):
        jb.pop()
    assert jb.put(2, b"ancient", 0) is Put.TOO_FAR


def test_capacity_must_be_a_power_of_two() -> None:
    with pytest.raises(ValueError, match="power of two"):
        JitterBuffer(12)
