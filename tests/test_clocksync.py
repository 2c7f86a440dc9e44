"""One-way latency across hosts: the sender estimates the receiver's clock offset over gRPC."""

from __future__ import annotations

import threading

import pytest

from tiality_cli.clock import SystemClock
from tiality_cli.clocksync import ClockFilter, ClockSample, sample
from tiality_cli.config import AudioFormat, Endpoint
from tiality_cli.io.files import NullSink, ToneSource
from tiality_cli.receiver import Receiver, ReceiverConfig
from tiality_cli.sender import Sender, SenderConfig


def test_four_timestamps_give_offset_and_round_trip() -> None:
    # Receiver 5 s ahead; 3 ms out, 1 ms of processing, 3 ms back.
    t0 = 1_000_000_000
    t1 = t0 + 5_000_000_000 + 3_000_000
    t2 = t1 + 1_000_000
    t3 = t0 + 7_000_000
    s = sample(t0, t1, t2, t3)
    assert s == ClockSample(offset_ns=5_000_000_000, round_trip_ns=6_000_000)


def test_the_filter_trusts_the_fastest_exchange() -> None:
    f = ClockFilter(window=4)
    for offset, rtt in [(110, 9000), (101, 1000), (130, 30000), (90, 4000)]:
        f.add(ClockSample(offset, rtt))
    assert f.best() == ClockSample(101, 1000)
    for _ in range(4):  # the window forgets old samples
        f.add(ClockSample(500, 2000))
    assert f.best() == ClockSample(500, 2000)


@pytest.mark.parametrize("skew_s", [-7.5, 3.0])
def test_latency_is_right_when_the_two_clocks_are_seconds_apart(skew_s: float) -> None:
    skew = round(skew_s * 1e9)
    sender_clock = SystemClock(wall_offset_ns=skew)  # the sender's wall clock is set wrong
    rx = Receiver(NullSink(), ReceiverConfig(port=0, bind="127.0.0.1"))
    port = rx.start()
    try:
        fmt = AudioFormat()
        sender = Sender(
            ToneSource(440, fmt, clock=sender_clock),
            SenderConfig(Endpoint("127.0.0.1", port), seconds=1.0),
            sender_clock,
        )
        threading.Thread(target=sender.run, daemon=True).start()
        assert rx.wait_for(streams_ended=1, timeout=15)
        session_offset = sender.clock_filter.best()
        snap = rx.snapshot()
    finally:
        rx.stop()
    assert session_offset is not None
    # The estimate is the true offset within 2 ms (loopback round trips are well under that).
    assert abs(session_offset.offset_ns + skew) < 2_000_000, session_offset
    # Latency in the receiver's clock: one frame (20 ms) plus buffering, not seconds.
    assert 20 < snap.latency_ms_p50 < 120
