"""The link misbehaving between a real sender and a real receiver (a fault-injecting TCP proxy)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.proxy import FaultProxy
from tests.helpers.waiting import wait_until
from tiality_cli.config import AudioFormat, Endpoint
from tiality_cli.io.files import NullSink
from tiality_cli.io.sources import open_source
from tiality_cli.receiver import Receiver, ReceiverConfig
from tiality_cli.sender import Sender, SenderConfig, SendResult


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


def test_a_reset_connection_is_re_established_by_the_sender(link: tuple[Receiver, FaultProxy]) -> None:
    rx, proxy = link
    sender, thread, out = start_sender(proxy.port, seconds=6.0)
    wait_until(lambda: rx.snapshot().packets >= 25, 10, "audio before the reset")
    assert proxy.cut() == 1
    wait_until(lambda: rx.streams_started >= 2, 10, "the sender to open a new stream")
    wait_until(
        lambda: len(rx.sessions()) == 1 and rx.sessions()[0].received >= 25, 10, "audio after the reset"
    )
    thread.join(timeout=15)
    assert out["result"].reconnects >= 1
    assert sender.stats.frames_captured == 300  # capture never stopped


def test_added_delay_raises_latency_without_losing_audio(link: tuple[Receiver, FaultProxy]) -> None:
    rx, proxy = link
    _, thread, out = start_sender(proxy.port, seconds=5.0)
    wait_until(lambda: rx.snapshot().packets >= 50, 10, "a steady stream")
    before = rx.snapshot().latency_ms_p50
    proxy.set_delay(60)  # one-way, constant: the whole stream shifts, nothing reorders
    thread.join(timeout=15)
    assert rx.wait_for(streams_ended=1, timeout=5)
    snap = rx.snapshot()
    assert out["result"].receiver_packets == 250 and snap.lost == 0
    assert snap.latency_ms_p95 > before + 40  # the added delay shows in the one-way latency


def test_two_senders_are_mixed(tmp_path: Path) -> None:
    from tiality_cli.io.sinks import open_sink
    from tiality_cli.wavfile import read_wav

    out_path = tmp_path / "mix.wav"
    rx = Receiver(open_sink(f"file:{out_path}", AudioFormat()), ReceiverConfig(port=0, bind="127.0.0.1"))
    port = rx.start()
    try:
        threads = []
        for freq in (500, 1300):
            s = Sender(
                open_source(f"tone://{freq}", AudioFormat()),
                SenderConfig(Endpoint("127.0.0.1", port), seconds=2),
            )
            t = threading.Thread(target=s.run, daemon=True)
            t.start()
            threads.append(t)
        for t in threads:
            t.join(timeout=15)
        assert rx.wait_for(streams_ended=2, timeout=10)
    finally:
        rx.stop()
    audio, _ = read_wav(out_path)
    mid = audio[len(audio) // 4 : 3 * len(audio) // 4, 0]
    spectrum = np.abs(np.fft.rfft(mid * np.hanning(len(mid))))
    freqs = np.fft.rfftfreq(len(mid), 1 / 48_000)
    peak = spectrum.max()
    for freq in (500, 1300):  # both tones are heard at once, at similar strength
        band = spectrum[(freqs > freq - 20) & (freqs < freq + 20)].max()
        assert band > 0.3 * peak
