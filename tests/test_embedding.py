"""tiality_cli as the operator GUI embeds it, over real gRPC on loopback (docs/embedding.md).

The package's lazy names, the events a GUI subscribes to, the audio service on the GUI's own gRPC server,
the sender's life cycle (start, stop while connecting or reconnecting), shutdown that leaves no threads or
file descriptors behind, and, with an application-owned output pulled in real time, the mix of two real
senders and play_time_ns against the pull of a click.
"""

from __future__ import annotations

import ast
import gc
import itertools
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import numpy.typing as npt
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import tiality_cli
import tiality_cli as tiality
from tests.helpers.appout import RealTimePull, StampedSource
from tests.helpers.signals import click_train, detect_clicks
from tests.helpers.waiting import wait_until
from tiality_cli.clock import SystemClock
from tiality_cli.config import AudioFormat, ClientSecurity, ServerSecurity
from tiality_cli.errors import AuthError, ConnectError, DeviceError, RejectedError
from tiality_cli.io.files import NullSink
from tiality_cli.io.sources import open_source
from tiality_cli.receiver import Receiver, ReceiverConfig, ReceiverEvent
from tiality_cli.sender import Sender, SenderConfig
from tiality_cli.wavfile import write_wav

PACKAGE = Path(tiality_cli.__file__).parent
RATE = 48_000


def once(port: int, security: ClientSecurity) -> SenderConfig:
    return SenderConfig(f"127.0.0.1:{port}", seconds=0.2, reconnect=False, security=security)


def local(**kw: object) -> ReceiverConfig:
    return ReceiverConfig(port=0, bind="127.0.0.1", **kw)  # type: ignore[arg-type]


# ---- the package ------------------------------------------------------------------------------------------


def test_importing_the_package_loads_nothing_heavy_and_every_name_resolves() -> None:
    code = (
        "import sys, tiality_cli as t\n"
        "heavy = ('grpc', 'numpy', 'opuslib', 'sounddevice', 'alsaaudio', 'samplerate', 'typer', 'rich')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
        "t.Receiver\n"
        "print('grpc' in sys.modules, 'numpy' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["[]", "False True"]  # the receiver needs numpy, and grpc only to listen
    for name in tiality.__all__:
        value = getattr(tiality, name)
        assert getattr(value, "__name__", name) == name
    assert set(tiality.__all__) <= set(dir(tiality))
    with pytest.raises(AttributeError, match="module 'tiality_cli' has no attribute 'Nope'"):
        getattr(tiality, "Nope")  # noqa: B009


def test_the_type_stub_declares_exactly_the_lazy_names() -> None:
    tree = ast.parse((PACKAGE / "__init__.pyi").read_text())
    imported = {(n.module, a.name) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    table = tiality._EXPORTS  # type: ignore[attr-defined]
    assert imported == {(module, name) for name, module in table.items()}
    stub_all = next(
        ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign) and n.value is not None
    )
    assert sorted(stub_all) == sorted(table) == tiality.__all__


# ---- events ----------------------------------------------------------------------------------------------


class BreakableSink(NullSink):
    """A null sink whose ``error`` the test sets, as a device sink sets its own when unplugged."""

    error: BaseException | None = None


def test_events_arrive_in_order_off_the_audio_and_network_threads() -> None:
    sink = BreakableSink()
    rx = Receiver(sink, local(max_senders=1, security=ServerSecurity(token="s3cret")))
    got: list[ReceiverEvent] = []
    threads: set[str] = set()

    def on_event(ev: ReceiverEvent) -> None:
        got.append(ev)
        threads.add(threading.current_thread().name)

    unsubscribe = rx.subscribe(on_event)
    port = rx.start()
    key = ClientSecurity(token="s3cret")
    try:
        first = Sender("tone://440", SenderConfig(f"127.0.0.1:{port}", seconds=1.0, security=key))
        first.start()
        wait_until(lambda: len(rx.sessions()) == 1, 10, "the first sender")
        busy = SenderConfig(f"127.0.0.1:{port}", seconds=1.0, security=key, reconnect=False)
        with pytest.raises(RejectedError, match="receiver busy"):
            Sender("tone://300", busy).run()
        with pytest.raises(AuthError, match="a token is required"):
            Sender("tone://300", SenderConfig(f"127.0.0.1:{port}", seconds=1.0, reconnect=False)).run()
        result = first.wait(10)
        assert result is not None and result.receiver_frames_played == 50
        wait_until(lambda: any(e.kind == "stream_ended" for e in got), 10, "stream_ended")
        sink.error = DeviceError("sd://0: device unplugged")
        wait_until(lambda: any(e.kind == "output_error" for e in got), 5, "output_error")
        unsubscribe()
        sink.error = None
        rx.subscribe(lambda ev: None)
    finally:
        rx.stop()
    assert [(e.kind, e.session_id, e.detail) for e in got] == [
        ("stream_started", 1, "48 kHz stereo, 20 ms frames"),
        ("sender_refused", 0, "receiver busy: it takes 1 sender at a time (--max-senders)"),
        ("sender_refused", 0, "a token is required (--token / TIALITY_TOKEN)"),
        ("stream_ended", 1, "ended"),
        ("output_error", 0, "sd://0: device unplugged"),
    ]
    assert got[0].name.endswith("tone://440") and got[0].peer.startswith("ipv4:127.0.0.1:")
    assert [e.time_ns for e in got] == sorted(e.time_ns for e in got)
    assert threads == {"tiality-events"}


def test_a_receiver_stopping_ends_its_live_streams_with_an_event() -> None:
    rx = Receiver("null://", local())
    got: list[tuple[str, int, str]] = []
    rx.subscribe(lambda e: got.append((e.kind, e.session_id, e.detail)))
    port = rx.start()
    tx = Sender("tone://440", SenderConfig(f"127.0.0.1:{port}"))
    tx.start()
    try:
        wait_until(lambda: rx.snapshot().frames_played >= 10, 10, "audio")
        rx.stop()
        assert got == [
            ("stream_started", 1, "48 kHz stereo, 20 ms frames"),
            ("stream_ended", 1, "receiver stopped"),
        ]
        wait_until(lambda: tx.stats.state == "reconnecting", 10, "the sender to notice")
    finally:
        tx.stop()
        rx.stop()
    assert tx.error is None and tx.stats.state == "done"


# ---- one gRPC server for video and audio -------------------------------------------------------------------


@pytest.mark.parametrize("started", [False, True], ids=["before-start", "after-start"])
def test_the_audio_service_shares_the_guis_own_grpc_server(started: bool) -> None:
    pool = futures.ThreadPoolExecutor(max_workers=8)
    server = grpc.server(pool)
    video = health.HealthServicer()  # stands for the GUI's own (video) service on the same server
    health_pb2_grpc.add_HealthServicer_to_server(video, server)
    video.set("video", health_pb2.HealthCheckResponse.SERVING)
    port = server.add_insecure_port("127.0.0.1:0")
    if started:
        server.start()
    rx = Receiver(None, ReceiverConfig(security=ServerSecurity(token="t0k")), server=server)
    refused: list[str] = []
    rx.subscribe(lambda e: refused.append(e.detail) if e.kind == "sender_refused" else None)
    assert rx.start() == 0  # the port is the server's
    if not started:
        server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        with RealTimePull(rx):
            res = Sender(
                "tone://440",
                SenderConfig(f"127.0.0.1:{port}", seconds=1.0, security=ClientSecurity(token="t0k")),
            ).run()
            assert (res.receiver_packets, res.receiver_lost) == (50, 0) and res.receiver_frames_played >= 50
            with pytest.raises(AuthError, match="wrong token"):
                Sender(
                    "tone://440",
                    SenderConfig(
                        f"127.0.0.1:{port}", seconds=0.2, reconnect=False, security=ClientSecurity("x")
                    ),
                ).run()
        rx.stop()
        with pytest.raises(ConnectError, match="the receiver has stopped"):
            Sender(
                "tone://440",
                SenderConfig(
                    f"127.0.0.1:{port}", seconds=0.2, reconnect=False, security=ClientSecurity("t0k")
                ),
            ).run()
        # A server carries one receiver at a time; once stopped, the next one takes the service over.
        again = Receiver(None, ReceiverConfig(), server=server)
        again.start()
        with pytest.raises(tiality.ConfigError, match="already carries a receiver's audio"):
            Receiver(None, ReceiverConfig(), server=server).start()
        with RealTimePull(again):
            res = Sender("tone://440", SenderConfig(f"127.0.0.1:{port}", seconds=0.5)).run()
        again.stop()
        assert res.receiver_packets == 25
        # The GUI's own service went on all along, on the same port.
        status = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="video"), timeout=5
        )
        assert status.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        channel.close()
        rx.stop()
        server.stop(None).wait()
        pool.shutdown()
    assert refused == ["wrong token"]


def test_a_shared_server_cannot_be_given_tls_settings() -> None:
    pool = futures.ThreadPoolExecutor(max_workers=2)
    server = grpc.server(pool)
    sec = ServerSecurity(cert_pem=b"cert", key_pem=b"key")
    with pytest.raises(tiality.ConfigError, match="TLS on a shared gRPC server is the server's own"):
        Receiver(None, ReceiverConfig(security=sec), server=server)
    server.stop(None)
    pool.shutdown()


# ---- the sender's life cycle -------------------------------------------------------------------------------


def test_a_sender_stopped_while_connecting_or_reconnecting_ends_at_once_and_quietly() -> None:
    with socket.socket() as mute:  # accepts TCP, never speaks HTTP/2: gRPC stays connecting
        mute.bind(("127.0.0.1", 0))
        mute.listen()
        tx = Sender("tone://440", SenderConfig(f"127.0.0.1:{mute.getsockname()[1]}", connect_timeout_s=30))
        tx.start()
        wait_until(lambda: tx.stats.state == "connecting", 10, "connecting")
        t = time.monotonic()
        tx.stop()
        assert time.monotonic() - t < 1.0
    assert not tx.running and tx.error is None and tx.stats.state == "done"
    assert tx.wait() is not None

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]  # nothing listens there once this closes
    tx = Sender("tone://440", SenderConfig(f"127.0.0.1:{free}"))
    tx.start()
    wait_until(lambda: tx.stats.reconnects >= 2, 10, "a couple of reconnection attempts")
    t = time.monotonic()
    tx.stop()
    assert time.monotonic() - t < 1.0
    assert tx.error is None and tx.stats.state == "done" and "connection refused" in tx.stats.last_error


def test_sender_snapshot_is_typed_and_readers_share_its_rates() -> None:
    rx = Receiver("null://", local())
    port = rx.start()
    try:
        with Sender("tone://440", SenderConfig(f"127.0.0.1:{port}")) as tx:
            wait_until(lambda: tx.snapshot().packets_sent >= 120, 10, "2.4 s of audio")
            for _ in range(20):
                tx.snapshot()  # another reader, polling fast
            snap = tx.snapshot()
        assert isinstance(snap, tiality.SenderSnapshot) and snap.state == "streaming"
        assert snap.packets_per_s == pytest.approx(50, rel=0.1)
        assert snap.bitrate_kbps == pytest.approx(64, rel=0.15)
    finally:
        rx.stop()


# ---- clean shutdown ----------------------------------------------------------------------------------------


def counts() -> tuple[int, int]:
    gc.collect()  # what earlier tests left for the collector is not this test's
    return len(threading.enumerate()), len(os.listdir("/proc/self/fd"))


def test_fifty_start_stop_cycles_leave_no_threads_or_descriptors_behind() -> None:
    def cycle(k: int) -> None:
        rx = Receiver("null://", local())
        port = rx.start()
        tx = Sender("tone://440", SenderConfig(f"127.0.0.1:{port}"))
        tx.start()
        wait_until(lambda: rx.snapshot().frames_played >= 3, 10, "audio")
        if k % 2:
            tx.stop()
            rx.stop()
            assert tx.result is not None and tx.result.receiver_packets == tx.stats.packets_sent
        else:  # the receiver goes first: the sender reconnects until stopped
            rx.stop()
            wait_until(lambda: tx.stats.state == "reconnecting", 10, "reconnecting")
            tx.stop()
        assert tx.error is None and not tx.running

    # gRPC shuts its core down (two epoll and two eventfd descriptors) whenever no gRPC object is left,
    # and starts it again with the next one: an idle channel held meanwhile keeps that out of the count.
    keep_grpc_up = grpc.insecure_channel("127.0.0.1:9")
    try:
        cycle(0)  # warm-up: the codec and sound libraries load once
        cycle(1)
        before = counts()
        names = [t.name for t in threading.enumerate()]
        for k in range(50):
            cycle(k)
        after = counts()
    finally:
        keep_grpc_up.close()
    assert after == before, (before, after, names, [t.name for t in threading.enumerate()])


# ---- the mix and A/V sync, in real time --------------------------------------------------------------------


def level_db(x: npt.NDArray[np.float32], freq: float) -> float:
    """A tone's level: the median over 50 ms pieces, so that one concealed frame (a late packet on a loaded
    machine, which this test is not about) does not pass for a change of gain. Each piece is Hann-windowed:
    the other sender's tone, once drift compensation bends it by 0.1 % (1.5 Hz), leaked -66 to -74 dBFS
    into a rectangular 500 Hz bin, over the -70 dB a silenced stream is held to (seen once in CI);
    through the window, -139 dBFS, and a tone on its bin still reads its level."""
    piece = RATE // 20
    window = np.hanning(piece)
    basis = window * np.exp(-2j * np.pi * freq * np.arange(piece) / RATE)
    levels = []
    for a in range(0, len(x) - piece + 1, piece):
        v = x[a : a + piece, 0].astype(np.float64)
        amp = 2 * abs(np.dot(v, basis)) / window.sum()
        levels.append(20 * float(np.log10(max(amp, 1e-9))))
    return float(np.median(levels))


def test_two_real_senders_gain_solo_and_mute_act_on_the_right_one() -> None:
    rx = Receiver(None, local())
    port = rx.start()
    marks: list[int] = []
    try:
        with (
            RealTimePull(rx) as engine,
            Sender("tone://500", SenderConfig(f"127.0.0.1:{port}")),
            Sender("tone://1500", SenderConfig(f"127.0.0.1:{port}")),
        ):
            wait_until(lambda: len(rx.session_views()) == 2, 10, "two senders")
            wait_until(lambda: all(v.state == "playing" for v in rx.session_views()), 10, "both playing")
            low, high = sorted(rx.sessions(), key=lambda s: "1500" in s.name)

            def unsolo_and_turn_down() -> None:
                rx.volume_db = -6.0
                high.solo = False

            changes: list[Callable[[], object]] = [
                lambda: None,
                lambda: setattr(low, "gain_db", -10.0),
                lambda: setattr(high, "solo", True),
                lambda: setattr(high, "muted", True),
                lambda: unsolo_and_turn_down(),
            ]
            for change in changes:
                change()
                marks.append(engine.position)
                engine.wait_for(RATE * 4 // 10)
            marks.append(engine.position)
            out = engine.output()
    finally:
        rx.stop()
    levels = []
    for a, b in itertools.pairwise(marks):
        w = out[a + RATE // 20 : b]  # past the ramp and the block it started in
        levels.append((level_db(w, 500), level_db(w, 1500)))
    (a0, b0), (a1, b1), (a2, b2), (a3, b3), (a4, b4) = levels
    assert a0 == pytest.approx(-12.0, abs=1.0) and b0 == pytest.approx(-12.0, abs=1.0)  # tone:// is -12 dBFS
    assert a1 - a0 == pytest.approx(-10.0, abs=0.5) and b1 - b0 == pytest.approx(0.0, abs=0.5)
    assert a2 < -70 and b2 - b0 == pytest.approx(0.0, abs=0.5)
    assert a3 < -70 and b3 < -70
    assert a4 - a0 == pytest.approx(-16.0, abs=0.5) and b4 < -70


def test_play_time_ns_over_grpc_matches_the_pull_of_each_click(tmp_path: Path) -> None:
    """The Pi's clock is 2.3 s behind ours; each click's capture time (its frame's ADC stamp plus its
    offset in the frame) is asked of play_time_ns before it is pulled, and compared with when the test's
    engine pulled it on its schedule (a device's clock: a late thread wake-up is not the DAC's time)."""
    clicks = click_train(RATE, 0.3, 8, start_s=0.5, level_dbfs=-6.0, channels=2)
    wav = tmp_path / "clicks.wav"
    write_wav(wav, np.rint(clicks.signal * 32767).astype(np.int16), RATE)
    pi_clock = SystemClock(wall_offset_ns=-2_345_678_901)
    src = StampedSource(open_source(f"file:{wav}", AudioFormat(), clock=pi_clock))
    rx = Receiver(None, local())
    port = rx.start()
    frame = AudioFormat().frame_samples
    asked: dict[int, int] = {}

    def capture_ns(k: int) -> int | None:
        onset = int(clicks.onsets[k])
        if len(src.stamps) <= onset // frame:
            return None
        return src.stamps[onset // frame] + (onset % frame) * 1_000_000_000 // RATE

    def ask(position: int) -> None:
        sessions = rx.sessions()
        if not sessions:
            return
        for k in range(len(clicks.onsets)):
            t = capture_ns(k)
            if t is not None:
                p = rx.play_time_ns(sessions[0].id, t)
                if p is not None and (k not in asked or p > time.time_ns()):
                    asked[k] = p  # the last answer before the click was pulled

    try:
        with RealTimePull(rx, hook=ask) as engine:
            tx = Sender(src, SenderConfig(f"127.0.0.1:{port}"), clock=pi_clock)
            result = tx.run()
            wait_until(lambda: not rx.sessions(), 10, "the stream to play out")
            out = engine.output()
    finally:
        rx.stop()
    assert result.receiver_lost == 0
    heard = detect_clicks(out, RATE, 0.1, min_gap_s=0.1)
    assert len(heard) == len(clicks.onsets)
    errors_ms = [(asked[k] - engine.scheduled_wall_ns(int(i))) / 1e6 for k, i in enumerate(heard)]
    late_ms = [(engine.called_wall_ns(int(i)) - engine.scheduled_wall_ns(int(i))) / 1e6 for i in heard]
    assert max(abs(e) for e in errors_ms) < 2.0, (errors_ms, late_ms)
