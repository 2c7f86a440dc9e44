"""The audio threads ask for real-time scheduling (SCHED_FIFO, below the sound server), wherever the
system permits it: the playback thread of alsa:// and PortAudio's callback thread for sd://, and the
sender's threads that read the capture device. Real devices (the virtual sound card), real gRPC.

Whether a thread may take SCHED_FIFO depends on the machine (CAP_SYS_NICE, RLIMIT_RTPRIO), so each test
first asks for it on a scratch thread: the audio threads must end up exactly as that one did.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import numpy.typing as npt
import pytest

from tests.helpers.soundcard import VirtualSoundCard
from tiality_cli.config import AudioFormat
from tiality_cli.io.base import REALTIME_PRIORITY, Source, realtime_thread
from tiality_cli.io.files import ToneSource
from tiality_cli.io.sinks import open_sink
from tiality_cli.receiver import Receiver, ReceiverConfig
from tiality_cli.sender import Sender, SenderConfig

WAIT_S = 20.0


def scheduling() -> tuple[int, int]:
    """The calling thread's (policy, priority)."""
    return os.sched_getscheduler(0), os.sched_getparam(0).sched_priority


def permitted() -> tuple[int, int]:
    """What a thread that asks gets on this machine: (SCHED_FIFO, 4), or (SCHED_OTHER, 0) if refused."""
    got: list[tuple[int, int]] = []

    def ask() -> None:
        realtime_thread()
        got.append(scheduling())

    t = threading.Thread(target=ask)
    t.start()
    t.join()
    return got[0]


def test_asking_gives_fifo_below_the_sound_server_or_leaves_the_thread_as_it_was() -> None:
    expected = permitted()
    assert expected in ((os.SCHED_FIFO, REALTIME_PRIORITY), (os.SCHED_OTHER, 0))
    if os.geteuid() == 0:
        assert expected == (os.SCHED_FIFO, REALTIME_PRIORITY)  # root may: CI and this machine run as root
    got: list[object] = []

    def invalid() -> None:
        got.append(realtime_thread(priority=1000))  # beyond any policy's range: the OS refuses it
        got.append(scheduling())

    t = threading.Thread(target=invalid)
    t.start()
    t.join()
    assert got == [False, (os.SCHED_OTHER, 0)]
    assert scheduling() == (os.SCHED_OTHER, 0)  # the caller's own thread was never touched


def test_tiality_realtime_0_keeps_the_ordinary_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIALITY_REALTIME", "0")
    assert permitted() == (os.SCHED_OTHER, 0)


@pytest.mark.parametrize("uri", ["alsa://tspk", "sd://tspk"])
def test_the_playback_thread_runs_real_time(sound_card: VirtualSoundCard, uri: str) -> None:
    expected = permitted()
    seen: list[tuple[int, int]] = []
    enough = threading.Event()

    def fill(out: npt.NDArray[np.int16]) -> bool:
        out[:] = 0
        seen.append(scheduling())
        if len(seen) >= 20:
            enough.set()
        return True

    sink = open_sink(uri, AudioFormat())
    try:
        sink.start(fill)
        assert enough.wait(WAIT_S), f"{uri}: {len(seen)} fills"
    finally:
        sink.close()
    assert set(seen) == {expected}, (uri, set(seen))


class WatchedSource:
    """A tone source that notes the scheduling of every thread that reads it."""

    def __init__(self) -> None:
        self._tone = ToneSource(440.0, AudioFormat())
        self.format = self._tone.format
        self.name = "watched tone"
        self.overruns = 0
        self.dropped_ns = 0
        self.seen: set[tuple[str, int, int]] = set()

    def open(self) -> None:
        self._tone.open()

    def read(self, out: npt.NDArray[np.int16]) -> int | None:
        policy, priority = scheduling()
        self.seen.add((threading.current_thread().name, policy, priority))
        return self._tone.read(out)

    def close(self) -> None:
        self._tone.close()


def test_the_senders_reading_threads_run_real_time() -> None:
    expected = permitted()
    source = WatchedSource()
    _: Source = source  # it is one
    with Receiver("null://", ReceiverConfig(port=0, bind="127.0.0.1")) as rx:
        result = Sender(source, SenderConfig(f"127.0.0.1:{rx.port}", seconds=1.0, reconnect=False)).run()
    assert result.packets_sent == result.receiver_packets == 50
    assert source.seen and {(p, q) for _, p, q in source.seen} == {expected}, source.seen
