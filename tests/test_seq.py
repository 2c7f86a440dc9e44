"""32-bit sequence arithmetic at the wrap, and its two users: the unwrapper and the Ogg Opus tap."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_oggopus import packets_of
from tiality_cli.config import AudioFormat
from tiality_cli.recording import OpusTap
from tiality_cli.seq import SEQ_MASK, SeqUnwrapper, seq_add, seq_delta

TOP = 0xFFFFFFFF
HALF = 1 << 31


@pytest.mark.parametrize(
    ("seq", "ref", "delta"),
    [
        (0, TOP, 1),  # forwards across the wrap
        (TOP, 0, -1),  # backwards across the wrap
        (5, TOP - 2, 8),
        (TOP - 2, 5, -8),
        (HALF - 1, 0, HALF - 1),  # the furthest that is still ahead
        (HALF, 0, -HALF),  # half the circle: behind, so a-b and b-a are never both ahead
        (0, HALF, -HALF),
        (TOP, HALF, HALF - 1),
        (7, 7, 0),
    ],
)
def test_delta_is_the_shorter_way_round(seq: int, ref: int, delta: int) -> None:
    assert seq_delta(seq, ref) == delta
    assert seq_add(ref, delta) == seq


def test_add_wraps_both_ways() -> None:
    assert seq_add(TOP, 1) == 0
    assert seq_add(0, -1) == TOP
    assert seq_add(TOP - 1, 3) == 1
    assert seq_add(3, HALF) == 3 + HALF and seq_add(HALF + 3, HALF) == 3
    assert SEQ_MASK == TOP


def test_unwrap_steps_from_the_top_to_zero() -> None:
    u = SeqUnwrapper()
    assert [u.unwrap(s) for s in (TOP - 1, TOP, 0, 1)] == [TOP - 1, TOP, TOP + 1, TOP + 2]
    assert u.highest == TOP + 2


def test_unwrap_goes_backwards_across_the_wrap() -> None:
    u = SeqUnwrapper()
    assert u.unwrap(2) == 2
    assert [u.unwrap(s) for s in (0, TOP, TOP - 5)] == [0, -1, -6]  # reordered packets from before 0
    assert u.highest == 2
    assert u.unwrap(3) == 3


def test_unwrap_treats_a_half_range_jump_as_behind() -> None:
    u = SeqUnwrapper()
    u.unwrap(100)
    assert u.unwrap(100 + HALF - 1) == 100 + HALF - 1  # just under half ahead: ahead
    assert u.highest == 100 + HALF - 1
    assert u.unwrap(seq_add(100 + HALF - 1, HALF)) == 100 - 1  # exactly half away: behind
    assert u.highest == 100 + HALF - 1


def _packet(tag: int) -> bytes:
    return bytes((0xF8, tag))  # TOC: CELT fullband 20 ms, one frame; the second byte names it


def test_opus_tap_orders_packets_across_the_wrap(tmp_path: Path) -> None:
    path = tmp_path / "wrap.opus"
    tap = OpusTap(path, AudioFormat(48_000, 1, 20_000), lookahead=0)
    for seq in (TOP - 1, 0, TOP, 1, TOP - 2, 3):  # reordered across the wrap, one late, 2 missing
        tap.push(seq, _packet(seq & 0xFF))
    tap.close()
    payloads = packets_of(path)[2:]  # after OpusHead and OpusTags
    # TOP - 2 came after TOP - 1 had been written: late, dropped. Frame 2 never came: a TOC-only gap.
    assert payloads == [_packet(0xFE), _packet(0xFF), _packet(0), _packet(1), b"\xf8", _packet(3)]
