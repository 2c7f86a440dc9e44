"""32-bit wire sequence numbers: they wrap, so they are compared and stepped modulo 2**32.

A difference is read the shorter way round the circle (serial number arithmetic, RFC 1982, as RTP
receivers do): up to 2**31 - 1 ahead is ahead, anything further is behind. The one home of this
arithmetic: the jitter buffer unwraps with it (``SeqUnwrapper``) and ``--record`` orders Ogg pages by it.
"""

from __future__ import annotations

SEQ_BITS = 32
SEQ_MOD = 1 << SEQ_BITS
SEQ_MASK = SEQ_MOD - 1
SEQ_HALF = 1 << (SEQ_BITS - 1)


def seq_delta(seq: int, ref: int) -> int:
    """How far ``seq`` is ahead of ``ref`` (negative: behind), the shorter way: -2**31 to 2**31 - 1.

    Exactly half the circle away counts as behind, so that a - b and b - a never both look ahead.
    """
    d = (seq - ref) & SEQ_MASK
    return d - SEQ_MOD if d >= SEQ_HALF else d


def seq_add(seq: int, n: int) -> int:
    """The sequence number ``n`` after ``seq`` (before it for negative ``n``), wrapped to 32 bits."""
    return (seq + n) & SEQ_MASK


class SeqUnwrapper:
    """Extends wrapping 32-bit sequence numbers to ints that keep increasing across the wrap.

    Each number is placed relative to the highest seen so far, so reordered packets land behind it
    and everything past it compares plainly.
    """

    def __init__(self) -> None:
        self.highest: int | None = None

    def unwrap(self, seq: int) -> int:
        if self.highest is None:
            self.highest = seq
            return seq
        ext = self.highest + seq_delta(seq, self.highest)
        if ext > self.highest:
            self.highest = ext
        return ext
