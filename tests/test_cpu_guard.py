"""A loose guard on the sender's CPU: at most 2.5 x that of a bare gRPC client stream of the same packets.

Both are measured in the same run, one after the other against one ``tiality recv -o null://``, by the
benchmark's own code (benchmarks/cpu.py), so machine load weighs on both sides of the ratio. The issue's
target is 1.3 x (docs/performance.md, "CPU and scale"); this only catches a large regression.
"""

from __future__ import annotations

import pytest

from benchmarks.cpu import Plan, sender_vs_bare, us_per_packet

GUARD_RATIO = 2.5


@pytest.mark.slow
def test_sender_cpu_within_2_5x_of_a_bare_grpc_stream() -> None:
    r = sender_vs_bare(Plan(runs=1, warmup_s=1.0, window_s=5.0))
    assert r.ratio <= GUARD_RATIO, (
        f"sender {us_per_packet(r.sender):.0f} µs/packet vs bare gRPC stream {us_per_packet(r.bare):.0f} "
        f"µs/packet: {r.ratio:.2f} x (guard {GUARD_RATIO} x)"
    )
