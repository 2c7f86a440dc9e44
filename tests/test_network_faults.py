"""The link misbehaving between a real sender and a real receiver (a fault-injecting TCP proxy)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest

from helpers.proxy import FaultProxy
from tiality_cli.config import AudioFormat, Endpoint
from tiality_cli.receiver import Receiver, ReceiverConfig
from tiality_cli.sender import Sender, SenderConfig, SendResult
from tiality_cli.sinks import NullSink
from tiality_cli.sources import open_source


def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def link() -> Iterator[tuple[Receiver, FaultProxy]]:
    rx = Receiver(NullSink(), ReceiverConfig(port=0, bind="127.0.0.1"))
    port = rx.start()
    with FaultProxy("127.0.0.1", port) as proxy:
        yield rx, proxy
    rx.stop()


def start_sender(
    port: int, seconds: float, max_backlog_ms: float = 200.0
) -> tuple[Sender, threading.Thread, dict[str, SendResult]]:
    sender = Sender(
        open_source("tone://440", AudioFormat()),
        SenderConfig(Endpoint("127.0.0.1", port), max_backlog_ms=max_backlog_ms, seconds=seconds),
    )
    out: dict[str, SendResult] = {}
    thread = threading.Thread(target=lambda: out.setdefault("result", sender.run()), daemon=True)
    thread.start()
    return sender, thread, out


def test_a_stalled_link_makes_the_sender_drop_its_oldest_audio(link: tuple[Receiver, FaultProxy]) -> None:
    rx, proxy = link
    sender, thread, out = start_sender(proxy.port, seconds=4.0)
    wait_until(lambda: sender.stats.packets_sent >= 25, 10, "the stream to start")
    proxy.stall()
    # Flow control blocks the sender within a few hundred ms; its backlog then fills and overflows.
    wait_until(lambda: sender.stats.dropped >= 30, 10, "the sender to drop audio")
    assert sender.stats.backlog_peak <= 10  # --max-backlog 200 ms = 10 frames of 20 ms
    proxy.resume()
    thread.join(timeout=15)
    res = out["result"]
    assert res.frames_captured == 200  # capture never stopped
    assert res.packets_sent + res.dropped == 200
    assert rx.wait_for(streams_ended=1, timeout=5)
    snap = rx.snapshot()
    # Every dropped frame is a gap the receiver concealed and counted as lost; the packets that were
    # in flight during the stall arrived too late to play and were counted as late, not played late.
    assert snap.lost == res.dropped
    assert snap.packets == res.packets_sent
    assert snap.concealed >= res.dropped


def test_a_larger_backlog_allows_more_before_dropping(link: tuple[Receiver, FaultProxy]) -> None:
    _, proxy = link
    sender, thread, _ = start_sender(proxy.port, seconds=3.0, max_backlog_ms=600)
    wait_until(lambda: sender.stats.packets_sent >= 10, 10, "the stream to start")
    proxy.stall()
    wait_until(lambda: sender.stats.dropped >= 5, 10, "the sender to drop audio")
    assert 25 <= sender.stats.backlog_peak <= 30
    proxy.resume()
    thread.join(timeout=15)
    assert not thread.is_alive()
