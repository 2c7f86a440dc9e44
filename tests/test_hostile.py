"""The receiver keeps serving through whatever a sender or the network does (real gRPC, real sockets)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from tests.helpers.proxy import FaultProxy
from tests.helpers.waiting import wait_until
from tiality_cli.codec import OpusEncoder
from tiality_cli.config import AudioFormat, Endpoint
from tiality_cli.errors import ConnectError, RejectedError
from tiality_cli.io.sources import open_source
from tiality_cli.net._proto import tiality_pb2 as pb
from tiality_cli.net._proto import tiality_pb2_grpc as pb_grpc
from tiality_cli.net.client import map_rpc_error
from tiality_cli.receiver import Receiver
from tiality_cli.sender import Sender, SenderConfig

FMT = AudioFormat()


@pytest.fixture(scope="module")
def opus_packets() -> list[bytes]:
    enc = OpusEncoder(FMT)
    out = []
    for i in range(60):
        enc.input[:] = 1000 * ((i % 7) - 3)  # a step signal: non-silent, distinct frames
        out.append(enc.encode())
    return out


def format_msg(**changes: int) -> pb.StreamMessage:
    f = pb.StreamFormat(
        protocol_version=1, codec=pb.CODEC_OPUS, sample_rate=48_000, channels=2, frame_duration_us=20_000
    )
    for k, v in changes.items():
        setattr(f, k, v)
    return pb.StreamMessage(format=f)


def packet(seq: int, payload: bytes, capture_ns: int | None = None) -> pb.StreamMessage:
    t = time.time_ns() if capture_ns is None else capture_ns
    return pb.StreamMessage(
        packet=pb.AudioPacket(sequence=seq & 0xFFFFFFFF, capture_time_ns=t, payload=payload)
    )


def paced(messages: list[pb.StreamMessage], frame_s: float = 0.02) -> Iterator[pb.StreamMessage]:
    """Yields messages at the frame rate (the first, the format, at once)."""
    start = time.monotonic()
    for i, m in enumerate(messages):
        delay = start + (i - 1) * frame_s - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        yield m


def stream(port: int, messages: Iterator[pb.StreamMessage]) -> pb.StreamSummary:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        result: pb.StreamSummary = pb_grpc.AudioStreamStub(ch).Stream(messages, timeout=30)
        return result


def a_good_stream_still_plays(port: int) -> None:
    src = open_source("tone://440", FMT)
    res = Sender(src, SenderConfig(Endpoint("127.0.0.1", port), seconds=0.4, reconnect=False)).run()
    assert res.receiver_packets == 20 and res.receiver_lost == 0


def test_garbage_bytes_on_the_port(rx: Receiver) -> None:
    for blob in (
        os.urandom(4096),
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + os.urandom(512),
    ):
        with socket.create_connection(("127.0.0.1", rx.port)) as s:
            s.sendall(blob)
    a_good_stream_still_plays(rx.port)


def test_a_stream_cut_mid_packet_keeps_what_arrived(rx: Receiver) -> None:
    with FaultProxy("127.0.0.1", rx.port) as proxy:
        sender = Sender(
            open_source("tone://440", FMT),
            SenderConfig(Endpoint("127.0.0.1", proxy.port), seconds=5, reconnect=False),
        )
        failures: list[Exception] = []

        def run() -> None:
            try:
                sender.run()
            except ConnectError as exc:  # the link broke under it: expected
                failures.append(exc)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        wait_until(lambda: rx.snapshot().packets >= 30, 10, "audio to flow")
        proxy.inject_garbage(37)  # corrupts the HTTP/2 framing mid-stream
        assert rx.wait_for(streams_ended=1, timeout=10)
        t.join(timeout=10)
    assert len(failures) == 1  # the sender saw the broken link (and, with --once, gave up)
    snap = rx.snapshot()
    assert snap.packets >= 30 and snap.frames_played >= snap.packets - 1  # what arrived was played
    a_good_stream_still_plays(rx.port)


def test_a_sender_killed_outright_is_retired_every_time(rx: Receiver) -> None:
    """A robot whose process dies (SIGKILL: no goodbye, the kernel closes its socket) leaves no stream
    behind, however the death falls against the receiver's read: its audio plays out, the stream ends.
    Before the fix, 3 to 5 of 6 such deaths left a stream concealing for good (gRPC cancels the call as
    its end is being handled, which cancelled the hand-off that ends the stream)."""
    for k in range(1, 6):
        sender = subprocess.Popen(
            [sys.executable, "-m", "tiality_cli", "send", f"127.0.0.1:{rx.port}", "-i", "tone://440", "-q"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            before = rx.snapshot().packets
            wait_until(lambda: rx.snapshot().packets >= before + 25, 15, "audio to flow")  # noqa: B023
        finally:
            sender.send_signal(signal.SIGKILL)
            sender.wait(10)
            assert sender.stderr is not None
            sender.stderr.close()
        assert rx.wait_for(streams_ended=k, timeout=5), f"death {k}: the stream was not retired"
        assert rx.snapshot().streams == 0
        ended = rx.finished[-1]
        assert ended.packets >= 25 and ended.frames_played >= ended.packets - 1  # what arrived was played
    a_good_stream_still_plays(rx.port)


def test_streams_ending_together_are_answered_once_played_without_a_thread_each(
    rx: Receiver, opus_packets: list[bytes]
) -> None:
    """Each stream's answer still waits for its audio to play (its totals count every frame), but no
    thread waits for it: 8 streams ending together started 8 executor threads (64 senders, 64 threads,
    while the others' last packets arrived)."""

    def rpc_threads() -> int:
        return sum(t.name.startswith("tiality-rpc") for t in threading.enumerate())

    before = rpc_threads()
    msgs = [format_msg()] + [packet(i, opus_packets[i]) for i in range(25)]
    with ThreadPoolExecutor(8) as pool:
        summaries = list(pool.map(lambda _: stream(rx.port, paced(msgs)), range(8)))
    assert [(s.packets, s.frames_played, s.lost) for s in summaries] == [(25, 25, 0)] * 8
    assert rx.streams_ended == 8 and rpc_threads() == before


def test_a_first_message_that_is_not_the_format_is_refused(rx: Receiver, opus_packets: list[bytes]) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stream(rx.port, iter([packet(0, opus_packets[0])]))
    err = map_rpc_error(info.value, "rx")
    assert isinstance(err, RejectedError) and "the first message must be the stream format" in str(err)
    a_good_stream_still_plays(rx.port)


def test_grpcs_own_concurrency_cap_reads_as_a_busy_receiver() -> None:
    """A flood beyond the calls a receiver answers itself meets gRPC's cap ("Concurrent RPC limit
    exceeded!"); the sender says what it means instead: a real server capped at one call, one held."""
    held, release = threading.Event(), threading.Event()

    class Holding(pb_grpc.AudioStreamServicer):
        def Clock(self, request: pb.ClockProbe, context: object) -> pb.ClockReply:
            raise NotImplementedError  # the test opens streams only

        def Stream(self, request_iterator: Iterator[pb.StreamMessage], context: object) -> pb.StreamSummary:
            held.set()
            release.wait(10)
            return pb.StreamSummary()

    server = grpc.server(ThreadPoolExecutor(2), maximum_concurrent_rpcs=1)
    pb_grpc.add_AudioStreamServicer_to_server(Holding(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.AudioStreamStub(channel)
            first = stub.Stream.future(iter([format_msg()]))
            assert held.wait(10)
            with pytest.raises(grpc.RpcError) as info:
                stub.Stream(iter([format_msg()]), timeout=10)
            release.set()
            first.result(10)
    finally:
        release.set()
        server.stop(None)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    err = map_rpc_error(info.value, "rx")
    assert isinstance(err, RejectedError)
    assert str(err) == "rx refused the stream: receiver busy: more senders at once than it takes"


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"sample_rate": 44_100}, "sample rate 44100 Hz not supported by Opus"),
        ({"channels": 6}, "6 channels not supported"),
        ({"frame_duration_us": 30_000}, "frame duration 30000 us not supported"),
        ({"codec": 0}, "codec 0 not supported"),
        ({"protocol_version": 9}, "protocol version 9 not supported"),
    ],
)
def test_an_unplayable_format_gets_a_clear_status(rx: Receiver, changes: dict[str, int], reason: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stream(rx.port, iter([format_msg(**changes)]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason in str(map_rpc_error(info.value, "rx"))


def test_an_oversized_message_is_refused_and_the_receiver_goes_on(rx: Receiver) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stream(rx.port, iter([format_msg(), packet(0, os.urandom(70_000))]))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    a_good_stream_still_plays(rx.port)


def test_undecodable_payloads_are_concealed_and_counted(rx: Receiver, opus_packets: list[bytes]) -> None:
    msgs = [format_msg()] + [
        packet(i, b"\xff\xfe\xfd" if i in (10, 11, 30) else opus_packets[i]) for i in range(50)
    ]
    summary = stream(rx.port, paced(msgs))
    snap = rx.snapshot()
    assert snap.corrupt == 3 and summary.packets == 50
    assert summary.frames_played == 50  # every frame played once: continuous output


def test_sequence_numbers_that_repeat_wrap_and_jump(rx: Receiver, opus_packets: list[bytes]) -> None:
    base = 2**32 - 10
    seqs = [base + i for i in range(20)]  # wraps through 0
    seqs[5:5] = [base + 3, base + 4]  # two repeats
    msgs = [format_msg()] + [packet(s, opus_packets[i % 60]) for i, s in enumerate(seqs)]
    summary = stream(rx.port, paced(msgs))
    assert summary.duplicates == 2 and summary.lost == 0
    assert summary.frames_played == 20
    # A jump of a million frames restarts the playout position instead of concealing a million frames.
    jump = [format_msg()] + [packet(s, opus_packets[0]) for s in (*range(10), *range(1_000_000, 1_000_010))]
    before = rx.streams_ended
    stream(rx.port, paced(jump))
    assert rx.wait_for(streams_ended=before + 1, timeout=10)
    last = rx.finished[-1]
    assert last.resyncs == 1 and last.frames_played < 100


def test_capture_times_from_the_future_do_not_break_playout(rx: Receiver, opus_packets: list[bytes]) -> None:
    future = time.time_ns() + 3600 * 10**9
    msgs = [format_msg()] + [packet(i, opus_packets[i], future + i * 20_000_000) for i in range(25)]
    summary = stream(rx.port, paced(msgs))
    assert summary.frames_played >= 25 and summary.lost == 0
