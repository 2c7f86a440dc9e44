"""Figures for a GUI embedding the receiver: A/V sync error, the mixer's cost per block, shutdown time.

    .venv/bin/python benchmarks/embedding.py [--runs 5] [--clicks 10]

A/V sync: a sender whose clock is 2.3 s behind streams a click train over loopback gRPC to a receiver
with an application-owned output, which a thread of this process pulls in 5 ms blocks on an absolute
schedule (a device's clock). Before each pull, ``play_time_ns`` is asked for every click whose capture
time is known; its last answer before the click is pulled is compared with (a) the time the click's
sample was due on the schedule (the DAC's time, were the engine a device) and (b) the time the pull that
returned it actually ran (a late thread wake-up shows in b, not in a).

Mixer: ``Receiver.fill`` with 1 or 4 live senders on a simulated clock (real Opus decoding, the mix,
gains, limiter), in microseconds of CPU per call and per second of audio, for several block sizes.

Shutdown: wall time of ``Sender.stop()`` (a stream open, the receiver answering) and ``Receiver.stop()``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tests.helpers.appout import AppOutput, RealTimePull, StampedSource, encode
from tests.helpers.signals import click_train, detect_clicks, tone
from tiality_cli.clock import SystemClock
from tiality_cli.config import AudioFormat
from tiality_cli.io.sources import open_source
from tiality_cli.receiver import Receiver, ReceiverConfig
from tiality_cli.sender import Sender, SenderConfig
from tiality_cli.wavfile import write_wav

RATE = 48_000


def av_sync_run(clicks_n: int, wav: Path) -> tuple[list[float], list[float]]:
    clicks = click_train(RATE, 0.3, clicks_n, start_s=0.5, level_dbfs=-6.0, channels=2)
    write_wav(wav, np.rint(clicks.signal * 32767).astype(np.int16), RATE)
    pi = SystemClock(wall_offset_ns=-2_345_678_901)
    src = StampedSource(open_source(f"file:{wav}", AudioFormat(), clock=pi))
    rx = Receiver(None, ReceiverConfig(port=0, bind="127.0.0.1"))
    port = rx.start()
    frame = AudioFormat().frame_samples
    asked: dict[int, int] = {}

    def ask(_: int) -> None:
        sessions = rx.sessions()
        for k, onset in enumerate(clicks.onsets.tolist()):
            if not sessions or len(src.stamps) <= onset // frame:
                continue
            t = src.stamps[onset // frame] + (onset % frame) * 1_000_000_000 // RATE
            p = rx.play_time_ns(sessions[0].id, t)
            if p is not None and (k not in asked or p > time.time_ns()):
                asked[k] = p

    try:
        with RealTimePull(rx, hook=ask) as engine:
            Sender(src, SenderConfig(f"127.0.0.1:{port}"), clock=pi).run()
            deadline = time.monotonic() + 10
            while rx.sessions() and time.monotonic() < deadline:
                time.sleep(0.01)
            out = engine.output()
    finally:
        rx.stop()
    heard = detect_clicks(out, RATE, 0.1, min_gap_s=0.1).tolist()
    sched = [(asked[k] - engine.scheduled_wall_ns(i)) / 1e6 for k, i in enumerate(heard) if k in asked]
    called = [(asked[k] - engine.called_wall_ns(i)) / 1e6 for k, i in enumerate(heard) if k in asked]
    return sched, called


def mixer_cost(senders: int, block: int, seconds: float = 3.0) -> tuple[float, float]:
    fmt = AudioFormat()
    app = AppOutput(ReceiverConfig(listen=False))
    for i in range(senders):
        sig = tone(300 + 200 * i, seconds + 0.5, RATE, 2, -18.0)
        app.add(encode(sig, fmt), fmt, name=f"s{i}")
    t0 = time.process_time()
    app.run(seconds, block)
    cpu = time.process_time() - t0
    app.close()
    calls = round(seconds * RATE) / block
    return cpu / calls * 1e6, cpu / seconds * 100


def shutdown_times(n: int) -> tuple[list[float], list[float]]:
    tx_s, rx_s = [], []
    for _ in range(n):
        rx = Receiver("null://", ReceiverConfig(port=0, bind="127.0.0.1"))
        port = rx.start()
        tx = Sender("tone://440", SenderConfig(f"127.0.0.1:{port}"))
        tx.start()
        deadline = time.monotonic() + 10
        while rx.snapshot().frames_played < 10 and time.monotonic() < deadline:
            time.sleep(0.01)
        t = time.monotonic()
        tx.stop()
        tx_s.append((time.monotonic() - t) * 1000)
        t = time.monotonic()
        rx.stop()
        rx_s.append((time.monotonic() - t) * 1000)
    return tx_s, rx_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--clicks", type=int, default=10)
    args = ap.parse_args()
    sched: list[float] = []
    called: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.runs):
            s, c = av_sync_run(args.clicks, Path(tmp) / "clicks.wav")
            sched += s
            called += c
    absd = [abs(x) for x in sched]
    print(f"A/V sync, play_time_ns - due time ({len(sched)} clicks, {args.runs} runs over gRPC):")
    print(f"  vs the schedule:  median {statistics.median(sched):+.3f} ms, max |error| {max(absd):.3f} ms")
    absc = [abs(x) for x in called]
    print(f"  vs the pull call: median {statistics.median(called):+.3f} ms, max |error| {max(absc):.3f} ms")
    print("Receiver.fill CPU (simulated clock, real decoding and mixing):")
    for senders in (1, 4):
        for block in (64, 240, 1024, 4096):
            per_call, pct = mixer_cost(senders, block)
            print(
                f"  {senders} sender(s), {block:4d}-sample blocks: "
                f"{per_call:8.1f} us/call, {pct:5.2f} % of a core"
            )
    tx_s, rx_s = shutdown_times(10)
    print(
        f"Shutdown (10 runs): Sender.stop median {statistics.median(tx_s):.0f} ms (max {max(tx_s):.0f}), "
        f"Receiver.stop median {statistics.median(rx_s):.0f} ms (max {max(rx_s):.0f})"
    )


if __name__ == "__main__":
    main()
