"""Property-based tests (hypothesis): mutated packets and streams never break the receiver."""

from __future__ import annotations

import time

import grpc
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tiality_cli.clock import ManualClock
from tiality_cli.codec import OpusEncoder
from tiality_cli.config import AudioFormat, Endpoint
from tiality_cli.io.files import NullSink
from tiality_cli.io.sources import open_source
from tiality_cli.net._proto import tiality_pb2 as pb
from tiality_cli.playout import PlayoutConfig, State, StreamPlayout
from tiality_cli.receiver import Receiver, ReceiverConfig
from tiality_cli.sender import Sender, SenderConfig

FMT = AudioFormat(48_000, 1, 20_000)
_enc = OpusEncoder(FMT)
PACKETS: list[bytes] = []
for _i in range(16):
    _enc.input[:, 0] = (np.sin(np.arange(960) * (0.01 + 0.003 * _i)) * 8000).astype(np.int16)
    PACKETS.append(_enc.encode())


def mutate(p: bytes, kind: int, data: bytes) -> bytes:
    if kind == 0:
        return p
    if kind == 1:
        return p[: max(1, len(p) // 3)]  # truncated
    if kind == 2:
        flipped = bytearray(p)
        for i, b in enumerate(data[:4]):
            flipped[(b * 7 + i) % len(flipped)] ^= 1 << (b % 8)
        return bytes(flipped)
    return data or b"\x00"  # arbitrary bytes


event = st.tuples(
    st.integers(
        min_value=-3, max_value=6
    ),  # sequence step from the previous packet (repeats, reorders, gaps)
    st.integers(min_value=0, max_value=3),  # mutation kind
    st.binary(min_size=0, max_size=40),
    st.integers(min_value=0, max_value=60),  # arrival jitter, ms
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    start=st.sampled_from([0, 2**32 - 5, 123_456]),
    events=st.lists(event, min_size=1, max_size=60),
)
def test_playout_survives_any_packet_sequence(start: int, events: list[tuple[int, int, bytes, int]]) -> None:
    clock = ManualClock()
    playout = StreamPlayout(FMT, FMT, PlayoutConfig(), clock)
    out = np.full((240, 1), 9.0, dtype=np.float32)
    seq = start
    pending: list[tuple[int, int, bytes]] = []
    t = 0
    for step, kind, data, jitter in events:
        seq = (seq + step) & 0xFFFFFFFF
        pending.append((t + jitter * 1_000_000, seq, mutate(PACKETS[seq % 16], kind, data)))
        t += 20_000_000
    pending.sort()
    end = t + 400_000_000
    now = 0
    i = 0
    while now < end:
        while i < len(pending) and pending[i][0] <= now:
            _, s, payload = pending[i]
            playout.push(s, time.time_ns(), payload)
            i += 1
        out[:] = 9.0
        playout.pull(out)
        # The whole block is written (no 9.0 left), finite and bounded; the mixer clips to full scale, and
        # resampling a near-full-scale decode may ring slightly past 1.0 before it does.
        assert np.isfinite(out).all() and np.abs(out).max() <= 2.0
        clock.advance(5_000_000)
        now += 5_000_000
    playout.end()
    for _ in range(400):  # a finished stream drains in bounded time
        playout.pull(out)
        clock.advance(5_000_000)
        if playout.state == State.FINISHED:
            break
    assert playout.state == State.FINISHED
    st_ = playout.stats
    assert st_.packets == len(events)
    assert st_.corrupt <= sum(1 for e in events if e[1] != 0)
    assert min(st_.lost, st_.late, st_.concealed, st_.duplicates, st_.skipped, st_.inserted) >= 0


_rx: Receiver | None = None


def receiver() -> Receiver:
    global _rx
    if _rx is None:
        _rx = Receiver(NullSink(), ReceiverConfig(port=0, bind="127.0.0.1"))
        _rx.start()
    return _rx


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(min_size=0, max_size=300), min_size=1, max_size=8))
def test_arbitrary_message_bytes_on_the_wire(blobs: list[bytes]) -> None:
    """Raw bytes where protobuf messages should be: refused or ignored, never fatal."""
    rx = receiver()
    good = pb.StreamMessage(
        format=pb.StreamFormat(
            protocol_version=1, codec=pb.CODEC_OPUS, sample_rate=48_000, channels=1, frame_duration_us=20_000
        )
    ).SerializeToString()
    with grpc.insecure_channel(f"127.0.0.1:{rx.port}") as ch:
        call = ch.stream_unary(
            "/tiality.v1.AudioStream/Stream",
            request_serializer=lambda b: b,
            response_deserializer=pb.StreamSummary.FromString,
        )
        try:
            call(iter([good, *blobs]), timeout=10)
        except grpc.RpcError as err:
            assert err.code() in (
                grpc.StatusCode.INTERNAL,
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.UNKNOWN,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
            )


def test_the_receiver_still_plays_after_the_fuzzing() -> None:
    rx = receiver()
    try:
        res = Sender(
            open_source("tone://440", AudioFormat()),
            SenderConfig(Endpoint("127.0.0.1", rx.port), seconds=0.4),
        ).run()
        assert res.receiver_packets == 20 and res.receiver_lost == 0
    finally:
        rx.stop()
