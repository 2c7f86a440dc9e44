"""The receiver: gRPC streams in, one playout engine per sender, mixed and pulled by the sink.

Usable from the operator's GUI without the CLI::

    sink = open_sink("sd://default")                 # or any object with the Sink protocol
    with Receiver(sink, ReceiverConfig(port=50052)) as rx:
        ...                                          # rx.snapshot() for figures, rx.sessions for senders

Threads: one gRPC worker per connected sender only parses messages and queues packets on its session;
the sink's thread (an audio callback, or a paced thread for files) pulls every session, which decodes,
conceals and resamples, then mixes them. Sessions are swapped in and out as immutable tuples, so the
audio path takes no lock.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from tiality_cli.clock import SYSTEM_CLOCK, Clock
from tiality_cli.config import DEFAULT_PORT, AudioFormat, ServerSecurity
from tiality_cli.errors import BusyError, ConfigError
from tiality_cli.io.base import Sink, to_int16
from tiality_cli.link import ClockEstimate, StreamInfo, StreamTotals
from tiality_cli.playout import PlayoutConfig, State, StreamPlayout
from tiality_cli.recording import OpusRecorder, OpusTap, WavRecorder, check_record_path
from tiality_cli.stats import Rates, ReceiverStats, StatsSnapshot, dbfs

if TYPE_CHECKING:
    from tiality_cli.net.server import AudioServer


@dataclass(frozen=True, slots=True)
class ReceiverConfig:
    port: int = DEFAULT_PORT
    bind: str = "::"  # all interfaces, IPv4 and IPv6
    playout: PlayoutConfig = field(default_factory=PlayoutConfig)
    max_senders: int = 8  # more are refused with RESOURCE_EXHAUSTED; 1 = --exclusive
    security: ServerSecurity = field(default_factory=ServerSecurity)
    record: str | None = None  # PATH.wav: what was played; PATH.opus: the packets received
    listen: bool = True  # serve gRPC on bind:port; False: streams come only through open_stream()

    def validate(self) -> ReceiverConfig:
        """Raises ConfigError naming the option, for library callers as for the CLI."""
        self.playout.validate()
        self.security.validate()
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port {self.port}: out of range (expected 1-65535)")
        if self.max_senders < 1:
            raise ConfigError(f"--max-senders {self.max_senders}: must be at least 1")
        if self.record is not None:
            check_record_path(self.record)
        return self


@dataclass(slots=True)
class Session:
    """One connected sender; the transport feeds it as the stream's StreamHandler (tiality_cli.link)."""

    id: int
    peer: str
    name: str
    format: AudioFormat
    playout: StreamPlayout
    started_ns: int
    algorithm_delay: int = 0
    clock_offset_ns: int = 0  # receiver clock - sender clock, as the sender last estimated it
    clock_round_trip_ns: int = 0  # the round trip that estimate came from (its uncertainty is half)
    rates: Rates = field(default_factory=Rates)  # the snapshot's packets/s and kbit/s
    received: int = 0  # packets taken off the wire (the playout counts them when it next runs)
    tap: OpusTap | None = None  # --record PATH.opus: the packets as received
    capture_delay_ns: int = 0  # the capture-device delay of the last packet, as the sender measured it
    drain_s: float = 2.2  # how long close() waits for the buffered audio to play out

    @property
    def stats(self) -> ReceiverStats:
        return self.playout.stats

    # ---- StreamHandler (the transport's thread) -------------------------------------------------------
    def packet(self, seq: int, capture_ns: int, payload: bytes, capture_delay_ns: int = 0) -> None:
        self.capture_delay_ns = capture_delay_ns
        self.playout.push(seq, capture_ns + self.clock_offset_ns, payload, capture_delay_ns)
        self.received += 1
        if self.tap is not None:
            self.tap.push(seq, payload)

    def clock(self, estimate: ClockEstimate) -> None:
        self.clock_offset_ns = estimate.offset_ns
        self.clock_round_trip_ns = estimate.round_trip_ns

    def close(self) -> StreamTotals:
        """The sender closed (or vanished): play what arrived, then answer with the totals."""
        self.playout.end()
        if self.tap is not None:
            self.tap.close()
            self.tap = None
        # Answer once the buffered audio has been played, so the summary counts all of it.
        self.playout.finished.wait(timeout=self.drain_s)
        st = self.playout.stats
        return StreamTotals(
            packets=st.packets,
            bytes=st.bytes,
            lost=st.lost,
            late=st.late,
            concealed=st.concealed,
            duplicates=st.duplicates,
            frames_played=st.frames_played,
        )


class Receiver:
    """Listens for senders and plays what they send to ``sink``."""

    def __init__(self, sink: Sink, config: ReceiverConfig | None = None, clock: Clock = SYSTEM_CLOCK) -> None:
        self.sink = sink
        self.config = (config or ReceiverConfig()).validate()
        self.clock = clock
        self.sessions: tuple[Session, ...] = ()
        self.finished: list[ReceiverStats] = []  # stats of ended streams, for the summary
        self.streams_started = 0
        self.streams_ended = 0
        self.port = 0
        self.volume = 1.0
        self.muted = False
        self._server: AudioServer | None = None
        self._watchdog: threading.Thread | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # guards session changes only, never the audio path
        self._changed = threading.Condition(self._lock)
        self._acc = np.zeros((4096, 2), dtype=np.float32)
        self._tmp = np.zeros((4096, 2), dtype=np.float32)
        self._sink_started = False
        self._next_id = 1
        self._rates = Rates()
        self._wav_rec: WavRecorder | None = None
        self._opus_rec: OpusRecorder | None = None
        rec = self.config.record
        if rec is not None and rec.lower().endswith(".opus"):
            self._opus_rec = OpusRecorder(rec)

    # ---- life cycle -----------------------------------------------------------------------------------
    def start(self) -> int:
        """Binds the port (unless ``listen`` is off) and, for a sink with a fixed format (a device),
        starts playing silence. Returns the bound port (0 without a server)."""
        if self.config.listen:
            from tiality_cli.net.server import AudioServer

            self._server = AudioServer(
                self.open_stream,
                self.config.bind,
                self.config.port,
                max_streams=self.config.max_senders,
                wall_ns=self.clock.wall_ns,
                security=self.config.security,
            )
            self.port = self._server.port
        if self.sink.format is not None:
            self._start_sink(self.sink.format)
        self._stopping.clear()
        self._watchdog = threading.Thread(target=self._watch, name="tiality-health", daemon=True)
        self._watchdog.start()
        return self.port

    @property
    def output_error(self) -> BaseException | None:
        """What stopped the audio output (a device unplugged...), or None while it works."""
        err = getattr(self.sink, "error", None)
        return err if isinstance(err, BaseException) else None

    def _watch(self) -> None:
        """Keeps the gRPC health status in step with the audio output, once a second."""
        while True:
            if self._server is not None:
                self._server.set_serving(self.output_error is None)
            if self._stopping.wait(1.0):
                return

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.stop(grace_s=0.5, timeout_s=3.0)
            self._server = None
        self.sink.close()
        if self._wav_rec is not None:
            self._wav_rec.close()
            self._wav_rec = None

    def __enter__(self) -> Receiver:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _start_sink(self, fmt: AudioFormat) -> None:
        if self._sink_started:
            return
        if self.sink.format is None:
            self.sink.open(fmt)
        out = self.sink.format or fmt
        self._acc = np.zeros((max(4096, out.frame_samples), out.channels), dtype=np.float32)
        self._tmp = np.zeros_like(self._acc)
        rec = self.config.record
        if rec is not None and rec.lower().endswith(".wav"):
            self._wav_rec = WavRecorder(rec, out)
        self.sink.start(self.fill)
        self._sink_started = True

    # ---- the sink's clock -----------------------------------------------------------------------------
    def fill(self, out: npt.NDArray[np.int16]) -> bool:
        """Sink callback: mixes every session into ``out`` (int16, n x channels). Never blocks."""
        sessions = self.sessions
        n = len(out)
        if not sessions:
            out[:] = 0
            return False
        if n > len(self._acc):  # a device asking for an unusually large block: grow once
            self._acc = np.zeros((n, out.shape[1]), dtype=np.float32)
            self._tmp = np.zeros_like(self._acc)
        acc = self._acc[:n]
        delay = int(getattr(self.sink, "delay_ns", 0))  # this block's time to the DAC, for latency_ms
        playing = sessions[0].playout.pull(acc, delay)
        done = sessions[0].playout.state == State.FINISHED
        if len(sessions) > 1:
            tmp = self._tmp[:n]
            for s in sessions[1:]:
                if s.playout.pull(tmp, delay):
                    playing = True
                    acc += tmp
                done = done or s.playout.state == State.FINISHED
        if done:
            self._retire()
        to_int16(acc, out, 0.0 if self.muted else self.volume)
        if playing and self._wav_rec is not None:
            self._wav_rec.push(out)
        return playing

    def _retire(self) -> None:
        with self._lock:
            keep = []
            for s in self.sessions:
                if s.playout.state == State.FINISHED:
                    self.finished.append(s.stats)
                    self.streams_ended += 1
                else:
                    keep.append(s)
            self.sessions = tuple(keep)
            self._changed.notify_all()

    # ---- the transport's side -----------------------------------------------------------------------
    def open_stream(self, peer: str, info: StreamInfo) -> Session:
        """Accepts a new sender (tiality_cli.link.Acceptor); BusyError when --max-senders are playing."""
        fmt = info.format
        with self._lock:
            n = self.config.max_senders
            if len(self.sessions) >= n:
                raise BusyError(
                    f"receiver busy: it takes {n} sender{'s' if n != 1 else ''} at a time (--max-senders)"
                )
            if not self._sink_started:
                self._start_sink(fmt)
            out = self.sink.format or fmt
            playout = StreamPlayout(
                fmt,
                out,
                self.config.playout,
                self.clock,
                fec=info.fec,
                lookahead_samples=info.algorithm_delay,
            )
            s = Session(
                id=self._next_id,
                peer=peer,
                name=info.name,
                format=fmt,
                playout=playout,
                started_ns=self.clock.monotonic_ns(),
                algorithm_delay=info.algorithm_delay,
                tap=self._opus_rec.open_stream(fmt, info.algorithm_delay) if self._opus_rec else None,
                drain_s=self.config.playout.max_latency_ms / 1000 + 2.0,
            )
            self._next_id += 1
            self.streams_started += 1
            self.sessions = (*self.sessions, s)
            self._changed.notify_all()
            return s

    # ---- for presenters -------------------------------------------------------------------------------
    def wait_for(self, *, streams_ended: int, timeout: float | None = None) -> bool:
        """Blocks until at least ``streams_ended`` streams have finished playing."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self.streams_ended < streams_ended:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._changed.wait(left if left is None else min(left, 0.5))
        return True

    def all_stats(self) -> list[ReceiverStats]:
        with self._lock:
            return [*self.finished, *(s.stats for s in self.sessions)]

    def snapshot(self) -> StatsSnapshot:
        """Totals over every stream so far; windowed figures from the live ones (or the last one)."""
        stats = self.all_stats()
        live = [s.stats for s in self.sessions] or stats[-1:]
        return self._summarise(stats, live, self._rates, streams=len(self.sessions))

    def session_views(self) -> list[SessionView]:
        """One entry per connected sender, for per-sender rows in a live view or a GUI."""
        now = self.clock.monotonic_ns()
        views = []
        for s in self.sessions:
            snap = self._summarise([s.stats], [s.stats], s.rates, streams=1)
            views.append(
                SessionView(
                    id=s.id,
                    peer=s.peer,
                    name=s.name,
                    format=s.format.describe(),
                    uptime_s=(now - s.started_ns) / 1e9,
                    state=s.playout.state.name.lower(),
                    clock_offset_ms=s.clock_offset_ns / 1e6,
                    clock_round_trip_ms=s.clock_round_trip_ns / 1e6,
                    stats=snap,
                )
            )
        return views

    def _summarise(
        self,
        stats: list[ReceiverStats],
        live: list[ReceiverStats],
        rates: Rates,
        streams: int,
    ) -> StatsSnapshot:
        now = self.clock.monotonic_ns()
        total = {k: sum(getattr(s, k) for s in stats) for k in _COUNTERS}
        lat = np.concatenate([s.latency_ms.values() for s in live]) if live else np.zeros(0)
        peak = max((s.peak for s in live), default=0.0)
        rms = max((s.rms for s in live), default=0.0)
        packets_per_s, kbps = rates.update(now / 1e9, total["packets"], total["bytes"])
        return StatsSnapshot(
            packets=total["packets"],
            bytes=total["bytes"],
            lost=total["lost"],
            late=total["late"],
            concealed=total["concealed"],
            fec_recovered=total["fec_recovered"],
            duplicates=total["duplicates"],
            corrupt=total["corrupt"],
            skipped=total["skipped"],
            inserted=total["inserted"],
            frames_played=total["frames_played"],
            jitter_ms=max((s.jitter_ns for s in live), default=0.0) / 1e6,
            latency_ms_p50=float(np.percentile(lat, 50)) if len(lat) else math.nan,
            latency_ms_p95=float(np.percentile(lat, 95)) if len(lat) else math.nan,
            latency_ms_max=float(lat.max()) if len(lat) else math.nan,
            bitrate_kbps=kbps,
            packets_per_s=packets_per_s,
            buffer_ms=max((s.buffer_ms for s in live), default=0.0),
            target_ms=max((s.target_ms for s in live), default=0.0),
            drift_ppm=live[0].drift_ppm if live else 0.0,
            level_dbfs=dbfs(rms),
            peak_dbfs=dbfs(peak),
            streams=streams,
            underruns=int(getattr(self.sink, "underruns", 0)),
            skipped_ms=sum(s.skipped_ms for s in stats),
            inserted_ms=sum(s.inserted_ms for s in stats),
            **{name: _median(live, name) for name in _STAGES},
        )


@dataclass(frozen=True, slots=True)
class SessionView:
    """A connected sender as a presenter sees it."""

    id: int
    peer: str  # gRPC peer string, e.g. 'ipv4:192.168.1.20:51234'
    name: str  # what the sender calls itself (host name and input)
    format: str  # e.g. '48 kHz stereo, 20 ms frames'
    uptime_s: float
    state: str  # waiting, playing, finished
    clock_offset_ms: float  # receiver clock - sender clock
    clock_round_trip_ms: float
    stats: StatsSnapshot


_COUNTERS = (
    "packets",
    "lost",
    "bytes",
    "late",
    "concealed",
    "fec_recovered",
    "duplicates",
    "corrupt",
    "skipped",
    "inserted",
    "frames_played",
)

_STAGES = ("stage_capture_ms", "stage_frame_ms", "stage_network_ms", "stage_buffer_ms", "stage_output_ms")


def _median(live: list[ReceiverStats], name: str) -> float:
    """The median of one latency stage over the live streams' recent frames (nan before the first)."""
    values = np.concatenate([getattr(s, name).values() for s in live]) if live else np.zeros(0)
    return float(np.median(values)) if len(values) else math.nan

