"""A receiver that cannot mix in real time says so and refuses new senders, over real gRPC (issue 11).

The receiver's capacity is set artificially low (``max_load_pct`` / ``--max-load``: a share of real time
that any mixing exceeds), so that one playing sender is all it carries: the second is refused with
RESOURCE_EXHAUSTED and a line naming the figure, while the first plays every one of its packets.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest

from tests.helpers.waiting import wait_until
from tiality_cli.errors import RejectedError
from tiality_cli.io.files import NullSink
from tiality_cli.link import DirectLink
from tiality_cli.receiver import Receiver, ReceiverConfig, ReceiverEvent
from tiality_cli.sender import Sender, SenderConfig, SendResult

TIALITY = [sys.executable, "-m", "tiality_cli"]
LOW_CAPACITY = ("--max-load", "0.01")  # any mixing takes more of real time than that
ENV = {**os.environ, "COLUMNS": "120", "NO_COLOR": "1"}
# In economy the capacity counts each stream as it costs with resampling, and the figures say so.
ECONOMY_CARRY = " with resampling for clock drift, now off to save CPU"
REFUSAL = (
    r"receiver overloaded: mixing 1 sender takes \d+ % of real time \(limit 0\.01 %, --max-load\); "
    rf"it carries about 0{ECONOMY_CARRY}: no more senders for now"
)


def test_overloaded_receiver_refuses_a_new_sender_and_keeps_playing_the_others() -> None:
    rx = Receiver(NullSink(), ReceiverConfig(port=0, bind="127.0.0.1", max_senders=8, max_load_pct=0.01))
    got: list[ReceiverEvent] = []
    rx.subscribe(got.append)
    port = rx.start()
    try:
        first = Sender("tone://440", SenderConfig(f"127.0.0.1:{port}", seconds=3.0, reconnect=False))
        first.start()
        wait_until(lambda: any(e.kind == "overload" for e in got), 15, "the overload event")
        assert rx.overloaded and rx.capacity == 0
        load = rx.load_pct
        assert load is not None and load > 0.01
        second = SenderConfig(f"127.0.0.1:{port}", seconds=1.0, reconnect=False)
        with pytest.raises(RejectedError, match=rf"^127\.0\.0\.1:{port} refused the stream: {REFUSAL}$"):
            Sender("tone://300", second).run()
        result = first.wait(20)
    finally:
        rx.stop()
    assert result is not None
    # The stream that was playing lost nothing to the refusal: every packet sent arrived and played.
    assert (result.packets_sent, result.receiver_packets, result.receiver_frames_played) == (150, 150, 150)
    assert result.receiver_lost == 0  # (a loaded test machine may still make a packet late at the start)
    kinds = [e.kind for e in got]
    # A quarter second into the first window the load so far turned resampling off (economy), which no
    # limit of 0.01 % can be met by: the window that followed reported the overload.
    assert kinds[:4] == ["stream_started", "economy", "overload", "sender_refused"]
    overload = got[2]
    assert re.fullmatch(
        r"receiver overloaded: mixing 1 sender takes \d+ % of real time \(limit 0\.01 %, --max-load\); "
        rf"it carries about 0{ECONOMY_CARRY}",
        overload.detail,
    )
    assert re.fullmatch(REFUSAL, got[3].detail) and overload.session_id == 0
    assert rx.streams_started == 1


def test_recv_warns_on_stderr_reports_its_load_and_the_sender_shows_one_line() -> None:
    recv = subprocess.Popen(
        [*TIALITY, "recv", "--port", "0", "--bind", "127.0.0.1", "-o", "null://", "--json", *LOW_CAPACITY],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        assert recv.stderr is not None and recv.stdout is not None
        m = re.search(r"listening on port (\d+)", recv.stderr.readline())
        assert m
        target = f"127.0.0.1:{m.group(1)}"
        first = subprocess.Popen(
            [*TIALITY, "send", target, "-i", "tone://440", "--seconds", "4", "-q"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        warning: list[str] = []
        err = recv.stderr
        reader = threading.Thread(target=lambda: warning.extend((err.readline(), err.readline())))
        reader.start()
        reader.join(20)
        # First the economy line (a quarter second in), then the overload's warning (the window after).
        assert len(warning) == 2 and re.fullmatch(
            r"tiality recv: mixing took \d+ % of real time \(limit 0\.01 %\): stopped resampling for clock "
            r"drift, which is now corrected in 2\.5 ms steps at quiet points \(--no-economy\)\n",
            warning[0],
        ), warning
        assert re.fullmatch(
            r"tiality recv: warning: receiver overloaded: mixing 1 sender takes \d+ % of real time "
            rf"\(limit 0\.01 %, --max-load\); it carries about 0{ECONOMY_CARRY}; new senders are refused\n",
            warning[1],
        ), warning
        refused = subprocess.run(
            [*TIALITY, "send", target, "-i", "tone://300", "--seconds", "1", "-q"],
            capture_output=True,
            text=True,
            timeout=60,
            env=ENV,
        )
        lines = [ln for ln in refused.stderr.splitlines() if ln.strip()]
        assert refused.returncode == 7 and "Traceback" not in refused.stderr
        assert len(lines) == 1 and re.fullmatch(rf"tiality: {target} refused the stream: {REFUSAL}", lines[0])
        first_err = first.communicate(timeout=60)[1]
        assert first.returncode == 0, first_err
        for _ in range(30):  # a line a second from the start: the first one that saw the overload
            stats = json.loads(recv.stdout.readline())
            if stats["overloaded"]:
                break
        recv.send_signal(2)
        summary = json.loads(recv.communicate(timeout=30)[0].splitlines()[-1])
    finally:
        if recv.poll() is None:
            recv.kill()
        recv.wait()
    assert stats["event"] == "stats" and stats["overloaded"] is True and stats["capacity"] == 0
    assert stats["load_pct"] > 0.01
    assert summary["streams_started"] == 1 and summary["frames_played"] == 200
    assert summary["lost"] == 0 and summary["packets"] == 200


def test_an_overload_ends_after_five_calm_seconds_in_a_row_and_a_busy_second_restarts_the_count() -> None:
    """The rule behind ``overload_ended``: the load must stay below 90 % of the limit for 5 one-second
    windows in a row, so that a load hovering at the limit warns once instead of every second.

    The windows are counted in audio pulled, not in wall time: the test drives ``fill`` itself (an app://
    receiver) a second of audio at a time, and moves the limit between windows (a limit of 0.0001 % makes
    any mixing an overload; 100 % makes it calm)."""
    rx = Receiver(None, ReceiverConfig(port=0, bind="127.0.0.1", max_load_pct=0.0001))
    got: list[ReceiverEvent] = []
    rx.subscribe(got.append)
    rx.start()
    block = np.zeros((240, 2), dtype=np.float32)  # 5 ms at 48 kHz

    def second(limit_pct: float) -> None:
        rx.config = dataclasses.replace(rx.config, max_load_pct=limit_pct)
        for _ in range(200):
            rx.fill(block)

    try:
        second(0.0001)
        wait_until(lambda: [e.kind for e in got] == ["overload"], 10, "the overload event")
        assert rx.overloaded
        calm_seen = []
        for _ in range(3):
            second(100.0)
            calm_seen.append(rx.overloaded)
        second(0.0001)  # busy again: the count starts over, and no second 'overload' event
        for _ in range(4):
            second(100.0)
            calm_seen.append(rx.overloaded)
        assert calm_seen == [True] * 7
        load = rx.load_pct
        assert load is not None and load < 90.0
        second(100.0)  # the fifth calm window in a row
        wait_until(lambda: len(got) == 2, 10, "the overload_ended event")
    finally:
        rx.stop()
    assert not rx.overloaded
    assert [e.kind for e in got] == ["overload", "overload_ended"]
    assert re.fullmatch(r"mixing takes \d+ % of real time", got[1].detail), got[1].detail


class _Pacer:
    """The test's own output: pulls ``fill`` a 5 ms block at a time in real time, so the load windows
    (a second of audio each) close only when the test pulls them, with the limit it sets for each."""

    def __init__(self, rx: Receiver) -> None:
        self.rx = rx
        self.block = np.zeros((240, 2), dtype=np.float32)
        self.next = time.monotonic()

    def pull(self, limit_pct: float, blocks: int = 200) -> None:
        self.rx.config = dataclasses.replace(self.rx.config, max_load_pct=limit_pct)
        self.next = max(self.next, time.monotonic())
        for _ in range(blocks):
            self.rx.fill(self.block)
            self.next += 0.005
            time.sleep(max(0.0, self.next - time.monotonic()))

    def drain(self, threads: list[threading.Thread]) -> None:
        """Pulls calm windows until the senders' threads have ended (their streams played out)."""
        while any(t.is_alive() for t in threads):
            self.pull(100.0)
        for t in threads:
            t.join()


def _transport(kind: str, rx_cfg: ReceiverConfig) -> tuple[Receiver, grpc.Server | None, int]:
    """The receiver's own grpc.aio server, a shared synchronous one (as a GUI's), or no sockets at all
    (a DirectLink in the same process); the port its senders use (0: direct)."""
    server = None
    if kind == "shared-sync":
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
    elif kind == "direct":
        rx_cfg = dataclasses.replace(rx_cfg, listen=False)
    rx = Receiver(None, rx_cfg, server=server)
    own = rx.start()
    return rx, server, own or (port if server is not None else 0)


FIGURES = (
    r"receiver overloaded: mixing 4 senders takes \d+ % of real time \(limit 0\.0001 %, --max-load\); "
    r"it carries about 0"
)
SHED_REASON = (
    rf"ended this stream to keep its other 1 sender playing: it joined in a burst beyond what the "
    rf"receiver can mix \({FIGURES}\)"
)


@pytest.mark.parametrize("transport", ["own", "shared-sync", "direct"])
@pytest.mark.parametrize("shed", [True, False], ids=["shed", "no-shed"])
def test_a_burst_beyond_capacity_ends_the_newest_senders_and_the_others_play_on(
    shed: bool, transport: str
) -> None:
    """Senders that join during a window, before their cost is known (a burst: here in the middle of a
    window that kept up), are ended newest first once the mixer has been overloaded for two windows,
    down to what it carries (at least one stays); a sender that was playing through a whole window
    that kept up is never ended. With shed off, every sender stays. (Economy off: with it, the first
    overloaded window turns resampling off and two more are needed; see the economy test.)"""
    cfg = ReceiverConfig(port=0, bind="127.0.0.1", max_senders=8, shed=shed, economy=False)
    rx, server, port = _transport(transport, cfg)
    got: list[ReceiverEvent] = []
    rx.subscribe(got.append)
    pacer = _Pacer(rx)
    results: dict[str, object] = {}

    def send(name: str, hz: int) -> None:
        scfg = SenderConfig(f"127.0.0.1:{port or 1}", seconds=6.0, reconnect=False, name=name)
        direct = (lambda: DirectLink(rx.open_stream, "direct")) if transport == "direct" else None
        try:
            results[name] = Sender(f"tone://{hz}", scfg, connector=direct).run()
        except RejectedError as exc:
            results[name] = exc

    threads = [threading.Thread(target=send, args=("old", 300))]
    try:
        threads[0].start()
        wait_until(lambda: len(rx.sessions()) == 1, 20, "the first sender")
        pacer.pull(100.0)  # a whole window that kept up, with the first sender in it: it is not new
        pacer.pull(100.0, 100)  # half of the next window...
        for name, hz in (("new1", 350), ("new2", 400), ("new3", 450)):
            threads.append(threading.Thread(target=send, args=(name, hz)))
            threads[-1].start()
        wait_until(lambda: len(rx.sessions()) == 4, 20, "the burst of three")
        pacer.pull(100.0, 100)  # ... which keeps up, with the burst in its second half: still new
        pacer.pull(0.0001)  # overloaded: the warning, nobody ended yet
        assert len(rx.sessions()) == 4 and rx.overloaded
        pacer.pull(0.0001)  # the second overloaded window in a row
        kept = [s.name.split()[0] for s in rx.sessions()]  # "old tone://300": the name, then the input
        pacer.drain(threads)
    finally:
        rx.stop()
        if server is not None:
            server.stop(None)
    old = results["old"]
    assert isinstance(old, SendResult), old
    assert (old.packets_sent, old.receiver_packets, old.receiver_lost) == (300, 300, 0)
    kinds = [e.kind for e in got]
    if not shed:
        assert kept[0] == "old" and sorted(kept[1:]) == ["new1", "new2", "new3"] and "shed" not in kinds
        assert all(isinstance(results[n], SendResult) for n in ("new1", "new2", "new3"))
        assert rx.streams_shed == 0
        return
    assert kept == ["old"] and rx.streams_shed == 3
    peer = "direct" if transport == "direct" else rf"127\.0\.0\.1:{port}"
    for name in ("new1", "new2", "new3"):
        err = results[name]
        assert isinstance(err, RejectedError), err
        assert re.fullmatch(rf"{peer} {SHED_REASON}", str(err)), str(err)
        assert err.__class__ is RejectedError  # send exits 7, as when refused
    assert kinds.count("shed") == 1
    (shed_event,) = [e for e in got if e.kind == "shed"]
    assert re.fullmatch(
        rf"ended the 3 newest senders \((new\d, ){{2}}new\d\) to keep the other 1 playing: {FIGURES}",
        shed_event.detail,
    ), shed_event.detail
    ended = [e for e in got if e.kind == "stream_ended" and e.detail.startswith("shed: ")]
    assert sorted(e.name.split()[0] for e in ended) == ["new1", "new2", "new3"]
    assert rx.streams_started == 4 and rx.streams_ended == 4


def test_a_window_closes_after_1_5_s_of_wall_time_when_the_output_falls_behind() -> None:
    """The load is measured over a second of audio; an output playing slower than real time closes its
    window after 1.5 s of wall time instead (with at least 0.25 s of audio in it), so that an overload
    shows within seconds. Driven by hand: 5 ms blocks at half speed, and at full speed for comparison."""
    rx = Receiver(None, ReceiverConfig(port=0, bind="127.0.0.1"))
    rx.start()
    block = np.zeros((240, 2), dtype=np.float32)
    try:
        t0 = time.monotonic()
        pulled = 0
        while rx.load_pct is None and time.monotonic() - t0 < 5:
            rx.fill(block)
            pulled += 1
            time.sleep(max(0.0, t0 + pulled * 0.010 - time.monotonic()))  # 5 ms of audio every 10 ms
        wall = time.monotonic() - t0
        assert rx.load_pct is not None
        # 1.5 s of wall time holds about 0.75 s of audio: the window closed on time, not on audio.
        assert 1.5 <= wall < 1.9 and 140 <= pulled < 190, (wall, pulled)
        # At full speed the same window needs a whole second of audio: 200 blocks.
        fast = Receiver(None, ReceiverConfig(port=0, bind="127.0.0.1", listen=False))
        fast.start()
        try:
            for _ in range(199):
                fast.fill(block)
            assert fast.load_pct is None
            fast.fill(block)
            assert fast.load_pct is not None
        finally:
            fast.stop()
    finally:
        rx.stop()


def test_a_paused_output_does_not_close_a_window_on_a_few_blocks() -> None:
    """An app-owned output that pulled 0.1 s and then paused for 1.6 s: the window needs 0.25 s of audio
    before wall time may close it (a few blocks say nothing about the load)."""
    rx = Receiver(None, ReceiverConfig(port=0, bind="127.0.0.1", listen=False))
    rx.start()
    block = np.zeros((240, 2), dtype=np.float32)
    try:
        for _ in range(20):
            rx.fill(block)
        time.sleep(1.6)  # the pause being tested, not a wait for something
        rx.fill(block)
        assert rx.load_pct is None
        for _ in range(30):  # 0.25 s of audio in all, the window older than 1.5 s: it closes
            rx.fill(block)
        assert rx.load_pct is not None
    finally:
        rx.stop()


@dataclasses.dataclass
class _Burst:
    target: str  # HOST:PORT the senders used
    results: list[object]  # each sender's SendResult or RejectedError
    out: str  # recv's stdout (JSON lines) and stderr, once stopped by SIGINT
    err: str
    returncode: int


def _burst_into_recv(args: list[str], tones: tuple[int, ...], seconds: float) -> _Burst:
    """``tiality recv -o null:// --json ARGS`` and one sender per tone, released together by a barrier;
    then recv is stopped (SIGINT) once every sender has ended."""
    recv = subprocess.Popen(
        [*TIALITY, "recv", "--port", "0", "--bind", "127.0.0.1", "-o", "null://", "--json", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    results: list[object] = []
    lock = threading.Lock()
    try:
        assert recv.stderr is not None and recv.stdout is not None
        m = re.search(r"listening on port (\d+)", recv.stderr.readline())
        assert m
        target = f"127.0.0.1:{m.group(1)}"
        go = threading.Barrier(len(tones))

        def send(hz: int) -> None:
            sender = Sender(f"tone://{hz}", SenderConfig(target, seconds=seconds, reconnect=False))
            go.wait()
            try:
                result: object = sender.run()
            except RejectedError as exc:
                result = exc
            with lock:
                results.append(result)

        threads = [threading.Thread(target=send, args=(hz,)) for hz in tones]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        recv.send_signal(2)
        out, err = recv.communicate(timeout=30)
    finally:
        if recv.poll() is None:
            recv.kill()
        recv.wait()
    return _Burst(target, results, out, err, recv.returncode)


@pytest.mark.parametrize("shed", [True, False], ids=["shed", "no-shed"])
def test_recv_ends_a_bursts_newest_senders_with_a_line_each_side_unless_no_shed(shed: bool) -> None:
    """Three senders open their streams at once, within the receiver's first second (before its load is
    known); with a capacity of 0 (``--max-load 0.01``) recv first stops resampling (one line), then ends
    the two newest after two more overloaded seconds and says so once on stderr, the senders get the
    figures, and the summary counts them."""
    burst = _burst_into_recv(
        [*LOW_CAPACITY, "--max-senders", "8", "--shed" if shed else "--no-shed"], (300, 400, 500), 5.0
    )
    target, results, out, err = burst.target, burst.results, burst.out, burst.err
    summary = json.loads(out.splitlines()[-1])
    assert burst.returncode == 0 and summary["streams_started"] == 3, err
    played = [r for r in results if isinstance(r, SendResult)]
    ended = [r for r in results if isinstance(r, RejectedError)]
    lines = [ln for ln in err.splitlines() if "ended the" in ln]
    economy = [ln for ln in err.splitlines() if "stopped resampling" in ln]
    assert len(economy) == 1 and re.fullmatch(
        r"tiality recv: mixing took \d+ % of real time \(limit 0\.01 %\): stopped resampling for clock "
        r"drift, which is now corrected in 2\.5 ms steps at quiet points \(--no-economy\)",
        economy[0],
    ), economy
    if not shed:
        assert len(played) == 3 and summary["streams_shed"] == 0 and not lines
        return
    assert len(played) == 1 and len(ended) == 2 and summary["streams_shed"] == 2
    assert played[0].receiver_packets == played[0].packets_sent == 250 and played[0].receiver_lost == 0
    figures = (
        r"receiver overloaded: mixing 3 senders takes \d+ % of real time \(limit 0\.01 %, --max-load\); "
        rf"it carries about 0{ECONOMY_CARRY}"
    )
    reason = (
        rf"ended this stream to keep its other 1 sender playing: it joined in a burst beyond what the "
        rf"receiver can mix \({figures}\)"
    )
    for exc in ended:
        assert re.fullmatch(rf"{target} {reason}", str(exc)), str(exc)
    assert len(lines) == 1 and re.fullmatch(
        rf"tiality recv: warning: ended the 2 newest senders \([^,()]+, [^,()]+\) to keep the other 1 "
        rf"playing: {figures}",
        lines[0],
    ), lines


def test_an_overload_first_turns_resampling_off_then_on_again_once_it_would_fit() -> None:
    """Economy: a load over the limit turns every stream's drift resampling off (one ``economy`` event)
    as soon as a window holds a quarter second of it, before the window closes (the window starts again,
    measured without resampling), and a sender joining meanwhile starts without it; once resampling
    again would keep the load under 90 % of the limit for 5 windows in a row (the per-stream cost times
    the gain measured at the switch), it comes back on (``economy_ended``). Nobody is shed meanwhile,
    and the stream that played through both switches played every packet it sent."""
    rx = Receiver(None, ReceiverConfig(port=0, bind="127.0.0.1", max_senders=8))
    got: list[ReceiverEvent] = []
    rx.subscribe(got.append)
    port = rx.start()
    pacer = _Pacer(rx)
    results: dict[str, object] = {}

    def send(name: str, hz: int, seconds: float) -> None:
        scfg = SenderConfig(f"127.0.0.1:{port}", seconds=seconds, reconnect=False, name=name)
        results[name] = Sender(f"tone://{hz}", scfg).run()

    threads = [threading.Thread(target=send, args=("old", 300, 11.0))]

    def resampling() -> list[bool]:
        return [s.playout.resampling_allowed for s in rx.sessions()]

    try:
        threads[0].start()
        wait_until(lambda: len(rx.sessions()) == 1, 20, "the first sender")
        pacer.pull(100.0)
        assert resampling() == [True] and not rx.economy
        pacer.pull(0.0001, 49)  # overloaded, but not a quarter second of it yet
        assert not rx.economy
        pacer.pull(0.0001, 1)  # 0.25 s into the window: economy, before the window closes
        assert rx.economy and got[-1].kind == "economy" and not rx.overloaded
        pacer.pull(100.0, 2)  # the sink's next pull applies it
        assert resampling() == [False] and all(s.playout._exact for s in rx.sessions())
        threads.append(threading.Thread(target=send, args=("late", 400, 3.0)))
        threads[-1].start()
        wait_until(lambda: len(rx.sessions()) == 2, 20, "the second sender")
        assert resampling() == [False, False]
        for _ in range(4):
            pacer.pull(100.0)
            assert rx.economy
        pacer.pull(100.0)  # the fifth window in a row in which resampling would fit
        assert not rx.economy and got[-1].kind == "economy_ended"
        pacer.pull(100.0, 2)
        assert all(resampling()) and resampling() and not any(s.playout._exact for s in rx.sessions())
        pacer.drain(threads)
    finally:
        rx.stop()
    kinds = [e.kind for e in got]
    assert kinds.count("economy") == 1 and kinds.count("economy_ended") == 1
    assert "shed" not in kinds and "overload" not in kinds  # economy was enough: no window was over
    (on,) = [e for e in got if e.kind == "economy"]
    (off,) = [e for e in got if e.kind == "economy_ended"]
    assert re.fullmatch(
        r"mixing took \d+ % of real time \(limit 0\.0001 %\): stopped resampling for clock drift, which is "
        r"now corrected in 2\.5 ms steps at quiet points \(--no-economy\)",
        on.detail,
    ), on.detail
    assert re.fullmatch(
        r"mixing would take about \d+ % of real time with resampling \(limit 100 %\): resampling for "
        r"clock drift again",
        off.detail,
    ), off.detail
    for name, packets in (("old", 550), ("late", 150)):
        r = results[name]
        assert isinstance(r, SendResult), r
        assert (r.packets_sent, r.receiver_packets, r.receiver_lost) == (packets, packets, 0), name
        assert r.receiver_frames_played == packets, name


def test_a_burst_beyond_max_senders_is_refused_in_the_receivers_words_and_told_in_two_lines() -> None:
    """Twelve senders at once into ``recv --max-senders 1``: the one accepted plays every packet; each of
    the eleven others gets the receiver's own refusal (not gRPC's "Concurrent RPC limit exceeded!",
    which a cap of max-senders + 4 calls gave part of such a burst); recv's stderr tells the first
    refusal at once and the rest of the burst in one more line, and its summary counts all eleven."""
    burst = _burst_into_recv(["--max-senders", "1"], tuple(200 + 50 * i for i in range(12)), 2.0)
    target, results, out, err = burst.target, burst.results, burst.out, burst.err
    played = [r for r in results if isinstance(r, SendResult)]
    refused = [r for r in results if isinstance(r, RejectedError)]
    assert len(played) == 1 and len(refused) == 11, results
    assert (played[0].packets_sent, played[0].receiver_frames_played) == (100, 100)
    busy = "receiver busy: it takes 1 sender at a time (--max-senders)"
    assert {str(r) for r in refused} == {f"{target} refused the stream: {busy}"}
    summary = json.loads(out.splitlines()[-1])
    assert burst.returncode == 0 and (summary["streams_started"], summary["streams_refused"]) == (1, 11), err
    lines = [ln for ln in err.splitlines() if "refused" in ln]
    assert len(lines) == 2, err
    assert re.fullmatch(
        rf"tiality recv: refused a sender \(ipv4:127\.0\.0\.1:\d+\): {re.escape(busy)}", lines[0]
    )
    assert lines[1] == f"tiality recv: refused 10 more senders in that burst (the last: {busy})"
