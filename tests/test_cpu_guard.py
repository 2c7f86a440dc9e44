"""Loose guards on the sender's CPU, against two references measured in the same run.

The sender, a bare gRPC client stream of the same packets, and that bare client encoding each packet
with the sender's Opus encoder first run one after the other against one ``tiality recv -o null://``,
by the benchmark's own code (benchmarks/cpu.py), so machine load weighs on every side of the ratios.
The issue's target is 1.3 x the bare stream (docs/performance.md, "CPU and scale"); these only catch a
large regression: of the whole sender (2.5 x the bare stream; measured 1.5-1.8 x here, the Opus encode
alone being 1.45 x), and of what tiality adds to encoding and streaming (1.6 x; measured 1.08-1.21 x).
"""

from __future__ import annotations

import pytest

from benchmarks.cpu import Plan, sender_vs_bare, us_per_packet

GUARD_RATIO = 2.5
GUARD_OWN_RATIO = 1.6


@pytest.mark.slow
def test_sender_cpu_within_guards_of_a_bare_grpc_stream_with_and_without_the_encode() -> None:
    r = sender_vs_bare(Plan(runs=1, warmup_s=1.0, window_s=5.0, explain=False))
    figures = (
        f"sender {us_per_packet(r.sender):.0f} µs/packet, bare gRPC stream {us_per_packet(r.bare):.0f}, "
        f"bare + Opus encode {us_per_packet(r.bare_encode):.0f}: {r.ratio:.2f} x and {r.own_ratio:.2f} x"
    )
    assert r.ratio <= GUARD_RATIO, f"{figures} (guard {GUARD_RATIO} x the bare stream)"
    assert r.own_ratio <= GUARD_OWN_RATIO, f"{figures} (guard {GUARD_OWN_RATIO} x bare + encode)"
