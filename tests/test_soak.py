"""A compressed soak: 100,000 packets through one receiver over real gRPC; memory must stay flat.

Real time would take 33 minutes, so the test is the sound card: it owns the receiver's clock (a
ManualClock, the one thing faked) and pulls the output itself, one 20 ms period per packet sent.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import numpy.typing as npt

from tiality_cli.clock import ManualClock
from tiality_cli.codec import OpusEncoder
from tiality_cli.config import AudioFormat
from tiality_cli.io.base import FillFn
from tiality_cli.net._proto import tiality_pb2 as pb
from tiality_cli.net._proto import tiality_pb2_grpc as pb_grpc
from tiality_cli.receiver import Receiver, ReceiverConfig

TOTAL = 100_000
FMT = AudioFormat(16_000, 1, 20_000)  # small frames keep the decode cost of 100k packets down


class ManualCard:
    """A sink whose periods the test pulls by hand."""

    name = "test-card"

    def __init__(self) -> None:
        self.format: AudioFormat | None = FMT
        self.underruns = 0
        self.frames_written = 0
        self.fill: FillFn | None = None

    def open(self, fmt: AudioFormat) -> None:
        self.format = fmt

    def start(self, fill: FillFn) -> None:
        self.fill = fill

    def stop(self) -> None:
        pass

    def close(self) -> None:
        pass


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_100k_packets_through_one_receiver_keep_memory_flat() -> None:
    enc = OpusEncoder(FMT)
    enc.input[:, 0] = (np.sin(np.arange(320) * 0.05) * 6000).astype(np.int16)
    payload = enc.encode()
    clock = ManualClock()
    card = ManualCard()
    rx = Receiver(card, ReceiverConfig(port=0, bind="127.0.0.1"), clock=clock)
    port = rx.start()
    outbox: queue.SimpleQueue[pb.StreamMessage | None] = queue.SimpleQueue()

    def messages() -> Iterator[pb.StreamMessage]:
        yield pb.StreamMessage(
            format=pb.StreamFormat(
                protocol_version=1,
                codec=pb.CODEC_OPUS,
                sample_rate=16_000,
                channels=1,
                frame_duration_us=20_000,
            )
        )
        while (m := outbox.get()) is not None:
            yield m

    result: dict[str, pb.StreamSummary] = {}
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = pb_grpc.AudioStreamStub(ch)
        t = threading.Thread(target=lambda: result.setdefault("s", stub.Stream(messages())), daemon=True)
        t.start()
        block: npt.NDArray[np.int16] = np.zeros((80, 1), dtype=np.int16)  # 5 ms periods
        marks: dict[int, int] = {}
        for seq in range(TOTAL):
            outbox.put(
                pb.StreamMessage(
                    packet=pb.AudioPacket(sequence=seq, capture_time_ns=clock.wall_ns(), payload=payload)
                )
            )
            session = rx.sessions()[0] if rx.sessions() else None
            deadline = time.monotonic() + 10
            while session is None or session.received < seq + 1:  # queued by the network thread
                assert time.monotonic() < deadline, f"packet {seq} never reached the receiver"
                time.sleep(0)
                session = rx.sessions()[0] if rx.sessions() else None
            assert card.fill is not None
            for _ in range(4):  # then 20 ms of playout, in 5 ms periods
                clock.advance(5_000_000)
                card.fill(block)
            if seq in (20_000, TOTAL - 1):
                marks[seq] = rss_bytes()
        outbox.put(None)
        t.join(timeout=30)
    rx.stop()
    snap = rx.snapshot()
    assert result["s"].packets == TOTAL and snap.packets == TOTAL
    assert snap.lost == 0
    growth = marks[TOTAL - 1] - marks[20_000]
    assert growth < 4 * 1024 * 1024, f"resident memory grew by {growth / 1e6:.1f} MB over 80,000 packets"
