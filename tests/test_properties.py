"""Property-based tests (hypothesis): mutated packets and streams never break the receiver, and every
counter agrees with what was sent. Each test starts its own receiver, so they pass in any order.
"""

from __future__ import annotations

import time

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tiality_cli.clock import ManualClock
from tiality_cli.codec import OpusEncoder
from tiality_cli.config import AudioFormat, Endpoint
from tiality_cli.io.sources import open_source
from tiality_cli.net._proto import tiality_pb2 as pb
from tiality_cli.playout import PlayoutConfig, State, StreamPlayout
from tiality_cli.receiver import Receiver
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
    seqs = [(start + sum(e[0] for e in events[: i + 1])) & 0xFFFFFFFF for i in range(len(events))]
    assert st_.packets == len(events)
    assert st_.corrupt <= sum(1 for e in events if e[1] != 0)  # only a mutated packet can be corrupt
    assert st_.duplicates <= len(seqs) - len(set(seqs))  # only a repeated number can be a duplicate
    assert st_.fec_recovered == 0  # no FEC asked for
    # Without FEC every frame is played once, in its turn: decoded from its packet or concealed (missing
    # or corrupt). Latency steps are 2.5 ms slices inside frames, so they change no frame count.
    decoded = st_.frames_played - st_.concealed
    assert decoded >= 0 and st_.lost <= st_.concealed - st_.corrupt
    # Each packet that arrived is a duplicate, late, or stored; a stored one is played (decoded or
    # corrupt), unless it was already stale when playback began (``stale``, dropped unplayed) or a restart
    # of the playout position (a sequence jump) dropped it.
    accounted = decoded + st_.corrupt + st_.duplicates + st_.late
    if st_.resyncs == 0:
        assert st_.packets - st_.stale <= accounted <= st_.packets
    else:
        assert accounted <= st_.packets


# What a stream of messages must get back. gRPC itself refuses bytes that are not a StreamMessage, with
# this status, before the servicer sees them (a servicer that raised would give UNKNOWN, "Exception
# calling application: ..."); everything that parses reaches the servicer and must get its summary.
UNDECODABLE = (grpc.StatusCode.INTERNAL, "Exception deserializing request!")
FORMAT = pb.StreamMessage(
    format=pb.StreamFormat(
        protocol_version=1, codec=pb.CODEC_OPUS, sample_rate=48_000, channels=1, frame_duration_us=20_000
    )
).SerializeToString()

int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
# Anything, and well-formed messages with arbitrary values: they reach the servicer and the playout.
wire_message = st.one_of(
    st.binary(min_size=0, max_size=300),
    st.builds(
        lambda seq, t, payload: pb.StreamMessage(
            packet=pb.AudioPacket(sequence=seq, capture_time_ns=t, payload=payload)
        ).SerializeToString(),
        st.integers(min_value=0, max_value=2**32 - 1),
        int64,
        st.one_of(st.sampled_from(PACKETS), st.binary(max_size=300)),
    ),
    st.builds(
        lambda offset, rtt, n: pb.StreamMessage(
            clock=pb.ClockEstimate(offset_ns=offset, round_trip_ns=rtt, samples=n)
        ).SerializeToString(),
        int64,
        int64,
        st.integers(min_value=0, max_value=2**32 - 1),
    ),
    st.just(FORMAT),  # a second format mid-stream
)


def packet_msg(seq: int, capture_ns: int) -> bytes:
    return pb.StreamMessage(
        packet=pb.AudioPacket(sequence=seq, capture_time_ns=capture_ns, payload=PACKETS[seq % 16])
    ).SerializeToString()


def clock_msg(offset_ns: int) -> bytes:
    return pb.StreamMessage(clock=pb.ClockEstimate(offset_ns=offset_ns, round_trip_ns=1)).SerializeToString()


# Clock offsets and capture times at the ends of int64: their sum is beyond it.
EXTREME_TIMES = [
    [clock_msg(2**63 - 1), *(packet_msg(i, 2**62) for i in range(5))],
    [clock_msg(-(2**63)), *(packet_msg(i, -(2**63)) for i in range(5))],
]


def expected_outcome(blobs: list[bytes]) -> tuple[grpc.StatusCode, str] | int:
    """UNDECODABLE if any blob is not a StreamMessage, else the packets the summary must count."""
    packets = 0
    for blob in blobs:
        try:
            msg = pb.StreamMessage.FromString(blob)
        except DecodeError:
            return UNDECODABLE
        packets += msg.WhichOneof("body") == "packet"
    return packets


def send_raw(port: int, blobs: list[bytes]) -> tuple[grpc.StatusCode, str] | int:
    """The format, then ``blobs`` as they are; the status the stream ended with, or its packet count."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = ch.stream_unary(
            "/tiality.v1.AudioStream/Stream",
            request_serializer=lambda b: b,
            response_deserializer=pb.StreamSummary.FromString,
        )
        try:
            summary: pb.StreamSummary = call(iter([FORMAT, *blobs]), timeout=10)
        except grpc.RpcError as err:
            return err.code(), err.details() or ""
    return summary.packets


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(st.lists(wire_message, min_size=1, max_size=8))
@example(EXTREME_TIMES[0])
@example(EXTREME_TIMES[1])
def test_arbitrary_message_bytes_on_the_wire(rx: Receiver, blobs: list[bytes]) -> None:
    """Raw bytes and odd values where messages should be: refused by gRPC or counted, never fatal."""
    assert send_raw(rx.port, blobs) == expected_outcome(blobs)
    assert rx.output_error is None


def test_the_receiver_still_plays_after_hostile_streams(rx: Receiver) -> None:
    hostile = [
        [b"\xff\xff\xff"],  # not a message
        *EXTREME_TIMES,
        [pb.StreamMessage(packet=pb.AudioPacket(sequence=2**32 - 1, payload=b"")).SerializeToString()],
        [FORMAT, b""],
    ]
    for blobs in hostile:
        assert send_raw(rx.port, blobs) == expected_outcome(blobs), blobs
    res = Sender(
        open_source("tone://440", AudioFormat()),
        SenderConfig(Endpoint("127.0.0.1", rx.port), seconds=0.4),
    ).run()
    assert res.receiver_packets == 20 and res.receiver_lost == 0
    assert rx.output_error is None
