"""The receiver: gRPC streams in, one playout engine per sender, mixed and pulled by the sink.

Usable from the operator's GUI without the CLI (docs/embedding.md)::

    with Receiver("sd://default", ReceiverConfig(port=50052)) as rx:   # or any Sink, or None: app-owned
        rx.volume_db = -6.0                                            # ramped, no click
        for s in rx.sessions():                                        # one per connected sender
            s.gain_db, s.solo = -3.0, True
        rx.subscribe(print)                                            # stream_started, stream_ended...

Threads: one gRPC worker per connected sender only parses messages and queues packets on its session;
the sink's thread (an audio callback, a paced thread for files, or the application's own audio callback
calling ``fill``) pulls every session, which decodes, conceals and resamples, then mixes them with their
gains and a soft limiter. Sessions are swapped in and out as immutable tuples and controls are plain
attributes read once per block, so the audio path takes no lock. Events go to subscribers from a thread
of their own, never from the audio or gRPC threads.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, cast

import numpy as np
import numpy.typing as npt

from tiality_cli.clock import SYSTEM_CLOCK, Clock
from tiality_cli.config import DEFAULT_PORT, OPUS_RATES, AudioFormat, ServerSecurity
from tiality_cli.errors import BusyError, ConfigError
from tiality_cli.io.base import BLOCK_US, AppSink, Sink, to_int16
from tiality_cli.link import ClockEstimate, StreamInfo, StreamTotals
from tiality_cli.playout import PlayoutConfig, State, StreamPlayout
from tiality_cli.recording import OpusRecorder, OpusTap, WavRecorder, check_record_path
from tiality_cli.stats import RateMeter, ReceiverStats, StatsSnapshot, dbfs, quantiles

if TYPE_CHECKING:
    from tiality_cli.net.server import AudioServer, AudioService

F32 = npt.NDArray[np.float32]
I16 = npt.NDArray[np.int16]
LIMIT_KNEE = 10 ** (-1 / 20)  # -1 dBFS: the soft limiter leaves everything below alone
_REDUCE_MAX, _REDUCE_MIN = np.maximum.reduce, np.minimum.reduce
MAX_GAIN_DB = 24.0  # volume and per-sender gain ceiling
SILENT_DB = -120.0  # at or below: silence (0.0 linear)
METER_FALL_DB_PER_S = 20.0  # the output level meter's peak hold falls this fast
TIMELINE_WINDOW_S = 0.5  # how much pulled audio the output timeline (A/V sync) is fitted over
EVENT_KINDS = (
    "stream_started",
    "stream_ended",
    "output_error",
    "sender_refused",
    "overload",
    "overload_ended",
    "economy",
    "economy_ended",
    "shed",
)
LOAD_WINDOW_S = 1.0  # the mixer's load is measured over this much audio...
LOAD_WINDOW_WALL_NS = 1_500_000_000  # ... or this much wall time, when it plays slower than real time,
LOAD_WINDOW_MIN_S = 0.25  # ... once it holds this much audio (an output that paused says little)
LOAD_CLEAR = 0.9  # an overload ends when the load stays below this share of the limit...
LOAD_CALM = 5  # ... for this many windows in a row (a load hovering at the limit warns once)
SHED_AFTER = 2  # overloaded windows in a row before the newest senders are ended (one may be a host stall)
ECONOMY_GAIN = 1.3  # what resampling multiplies a stream's cost by, until measured at a switch (1.2-1.5)
ECONOMY_GAIN_MAX = 2.0  # ... at most (a host stall in the window that started economy inflates it)
ECONOMY_PEEK_S = 0.25  # economy may start once a window holds this much audio, before it closes

log = logging.getLogger("tiality")


@dataclass(frozen=True, slots=True)
class ReceiverConfig:
    port: int = DEFAULT_PORT
    bind: str = "::"  # all interfaces, IPv4 and IPv6
    playout: PlayoutConfig = field(default_factory=PlayoutConfig)
    max_senders: int = 8  # more are refused with RESOURCE_EXHAUSTED; 1 = --exclusive
    security: ServerSecurity = field(default_factory=ServerSecurity)
    record: str | None = None  # PATH.wav: what was played; PATH.opus: the packets received
    listen: bool = True  # serve gRPC on bind:port; False: streams come only through open_stream()
    # The output's format when the sink has none of its own (a file: else the first stream's; an app-owned
    # output, sink None or "app://": else 48 kHz stereo). Opus decodes to 8, 12, 16, 24 or 48 kHz.
    output_rate: int | None = None
    output_channels: int | None = None
    ramp_ms: float = 10.0  # volume, gain, mute and solo changes fade over this long: no click
    # The share of real time the mixer (decoding, resampling, mixing every stream) may take: beyond it the
    # receiver reports an overload, and refuses new senders once as many as it can carry are playing.
    max_load_pct: float = 80.0
    # Overloaded for SHED_AFTER windows with senders that joined since it last kept up (a burst of them
    # before the load was known): end the newest of those until it carries no more than it can. False:
    # keep every sender, all degraded.
    shed: bool = True
    # Overloaded: first stop resampling for clock drift (the streams' drift is then corrected by 2.5 ms
    # steps at quiet points; see StreamPlayout.set_resampling), which takes a quarter or more off each
    # stream's cost, and resample again once the load would stay under 90 % of the limit with it.
    economy: bool = True

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
        if self.output_rate is not None and self.output_rate not in OPUS_RATES:
            rates = ", ".join(str(r) for r in OPUS_RATES)
            raise ConfigError(f"output rate {self.output_rate} Hz: Opus decodes to {rates} Hz")
        if self.output_channels is not None and self.output_channels not in (1, 2):
            raise ConfigError(f"output channels {self.output_channels}: must be 1 or 2")
        if not 1.0 <= self.ramp_ms <= 50.0:
            raise ConfigError(f"ramp {self.ramp_ms:g} ms: must be 1 to 50 ms")
        if not 0.0 < self.max_load_pct <= 100.0:
            raise ConfigError(f"--max-load {self.max_load_pct:g}: must be above 0 and at most 100 (%)")
        return self

    @property
    def output_format(self) -> AudioFormat | None:
        """The output format asked for, or None to take the sink's (or the first stream's)."""
        if self.output_rate is None and self.output_channels is None:
            return None
        return AudioFormat(self.output_rate or 48_000, self.output_channels or 2)


def gain_from_db(db: float, what: str = "gain") -> float:
    """dB to a linear gain: silence at or below -120 dB (or -inf), ConfigError above +24 dB or for NaN."""
    if math.isnan(db) or db > MAX_GAIN_DB:
        raise ConfigError(f"{what} {db:g} dB: must be at most {MAX_GAIN_DB:g} dB")
    return 0.0 if db <= SILENT_DB else 10 ** (db / 20)


@dataclass(frozen=True, slots=True)
class ReceiverEvent:
    """Something that happened to the receiver, delivered to subscribers in order, off the audio thread."""

    kind: str  # stream_started, stream_ended, output_error, sender_refused, overload, overload_ended, shed
    session_id: int  # the sender's session (0 for output_error, sender_refused and the overload events)
    time_ns: int  # receiver wall clock
    peer: str = ""  # gRPC peer, e.g. 'ipv4:192.168.1.20:51234'
    name: str = ""  # what the sender calls itself
    detail: str = ""  # why: the refusal, the output's error, how a stream ended


class _Fader:
    """A gain that moves to each new target in a straight line over ``ramp`` samples, applied in place.

    Every change, however large, takes the same time: a step in gain is a click, a 10 ms ramp is not.
    """

    __slots__ = ("_left", "_step", "_to", "gain", "ramp")

    def __init__(self, ramp: int, gain: float = 1.0) -> None:
        self.ramp = max(1, ramp)
        self.gain = gain  # the gain applied to the last sample
        self._to = gain
        self._step = 0.0
        self._left = 0

    def apply(self, x: F32, target: float, g: F32, idx: F32) -> None:
        """Multiplies ``x`` (n x channels) by the gain, ramping towards ``target``; ``g``, ``idx`` scratch."""
        if target != self._to:
            self._to = target
            self._left = self.ramp
            self._step = (target - self.gain) / self.ramp
        if self._left == 0:
            if self.gain != 1.0:
                np.multiply(x, self.gain, out=x)
            return
        n = len(x)
        m = min(n, self._left)
        gm = g[:m]
        np.multiply(idx[:m], self._step, out=gm)
        gm += self.gain
        head = x[:m]
        np.multiply(head, gm[:, None], out=head)
        self._left -= m
        if self._left:
            self.gain = float(gm[-1])
            return
        self.gain = self._to
        if m < n and self.gain != 1.0:
            tail = x[m:]
            np.multiply(tail, self.gain, out=tail)


def soft_limit(x: F32, s1: F32, s2: F32) -> float:
    """In place: unchanged up to -1 dBFS (1.0 = full scale), above it a tanh knee that approaches full scale.

    Returns the block's peak (largest magnitude) after limiting, for the meter and the int16 conversion.
    Continuous with slope 1 at the knee, so an overload is rounded off instead of squared (no hard-clip
    harmonics), and memoryless (no delay). Vectorised into the scratch buffers ``s1``, ``s2`` (x's shape):
    nothing is allocated, and a block below the knee costs two reductions (the ufuncs' own: ``x.max()``
    goes through a Python wrapper, which a mixer waking 200 times a second pays cold every time).
    """
    k = LIMIT_KNEE
    hi = float(_REDUCE_MAX(x, axis=None))
    lo = -float(_REDUCE_MIN(x, axis=None))
    peak = hi if hi > lo else lo
    if peak <= k:
        return peak
    r = 1.0 - k
    np.abs(x, out=s1)
    np.subtract(s1, k, out=s1)
    np.maximum(s1, 0.0, out=s1)  # how far over the knee
    np.multiply(s1, 1.0 / r, out=s2)
    np.tanh(s2, out=s2)
    np.multiply(s2, r, out=s2)  # that excess squeezed into the headroom left
    np.subtract(s1, s2, out=s1)  # what comes off (>= 0)
    np.copysign(s1, x, out=s1)
    np.subtract(x, s1, out=x)
    return k + r * math.tanh((peak - k) / r)  # the curve is monotonic: the peak maps to the new peak


@dataclass(slots=True, eq=False)
class Session:
    """One connected sender; the transport feeds it as the stream's StreamHandler (tiality_cli.link).

    A GUI gets these from ``Receiver.sessions()`` and sets ``gain_db``, ``muted`` and ``solo`` (any thread;
    the mixer ramps to them). When any session is soloed, only soloed sessions are heard.
    """

    id: int
    peer: str
    name: str
    format: AudioFormat
    playout: StreamPlayout
    started_ns: int
    algorithm_delay: int = 0
    clock_offset_ns: int = 0  # receiver clock - sender clock, as the sender last estimated it
    clock_round_trip_ns: int = 0  # the round trip that estimate came from (its uncertainty is half)
    # the snapshot's kbit/s and packets/s, over the last 2 s whoever reads them
    rates: tuple[RateMeter, RateMeter] = field(default_factory=lambda: (RateMeter(), RateMeter()))
    received: int = 0  # packets taken off the wire (the playout counts them when it next runs)
    tap: OpusTap | None = None  # --record PATH.opus: the packets as received
    drain_s: float = 2.2  # how long close() waits for the buffered audio to play out
    fader: _Fader = field(default_factory=lambda: _Fader(480))
    _gain_db: float = 0.0
    _gain: float = 1.0
    _muted: bool = False
    _solo: bool = False
    _done: threading.Event = field(default_factory=threading.Event)  # played out, or the receiver stopped
    _on_done: list[Callable[[], None]] = field(default_factory=list)  # end()'s callbacks, until _done
    _done_lock: threading.Lock = field(default_factory=threading.Lock)
    # Why the receiver ended this stream to keep up with the others (the transport ends the call with it).
    evicted: str | None = None
    closing: bool = False  # the sender has closed the stream (its buffered audio is playing out)
    _tap_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def stats(self) -> ReceiverStats:
        return self.playout.stats

    # ---- controls (any thread) ------------------------------------------------------------------------
    @property
    def gain_db(self) -> float:
        """This sender's gain in the mix (dB; -120 or -inf: silent; at most +24)."""
        return self._gain_db

    @gain_db.setter
    def gain_db(self, db: float) -> None:
        self._gain = gain_from_db(db)
        self._gain_db = float(db)

    @property
    def muted(self) -> bool:
        return self._muted

    @muted.setter
    def muted(self, value: bool) -> None:
        self._muted = bool(value)

    @property
    def solo(self) -> bool:
        return self._solo

    @solo.setter
    def solo(self, value: bool) -> None:
        self._solo = bool(value)

    # ---- StreamHandler (the transport's thread) -------------------------------------------------------
    def packet(self, seq: int, capture_ns: int, payload: bytes, capture_delay_ns: int = 0) -> None:
        self.playout.push(seq, capture_ns + self.clock_offset_ns, payload, capture_delay_ns)
        self.received += 1
        if self.tap is not None:
            with self._tap_lock:
                if self.tap is not None:
                    self.tap.push(seq, payload)

    def clock(self, estimate: ClockEstimate) -> None:
        self.clock_offset_ns = estimate.offset_ns
        self.clock_round_trip_ns = estimate.round_trip_ns

    def end(self, on_done: Callable[[], None]) -> None:
        """The sender closed (or vanished): play what arrived, and call ``on_done`` (from the mixer's
        thread, or at once) when it has played, or nothing will play it. close() then answers at once:
        an asynchronous transport waits without a thread per ending stream."""
        with self._done_lock:
            done = self._done.is_set()
            if not done:
                self._on_done.append(on_done)
        if done:
            on_done()
        self._end()

    def _end(self) -> None:
        if not self.closing:
            self.closing = True
            self.playout.end()
            self.set_tap(None)

    def _finished(self) -> None:
        """Played out, ended by the receiver, or the receiver stopped: close() may answer."""
        with self._done_lock:
            self._done.set()
            callbacks, self._on_done = self._on_done, []
        for fn in callbacks:
            fn()

    def close(self) -> StreamTotals:
        """The sender closed (or vanished): play what arrived, then answer with the totals."""
        self._end()
        # Answer once the buffered audio has been played, so the summary counts all of it.
        self._done.wait(timeout=self.drain_s)
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

    def set_tap(self, tap: OpusTap | None) -> None:
        """Starts (or with None, ends) recording this stream's packets; the old tap is closed."""
        with self._tap_lock:
            old, self.tap = self.tap, tap
        if old is not None:
            old.close()


class _BurstClock:
    """The playouts' clock: the receiver's, except on the thread pulling a large block in device-sized
    pieces, where each piece reads ``back_ns`` earlier (see Receiver.fill)."""

    def __init__(self, base: Clock) -> None:
        self.base = base
        self.back_ns = 0
        self.thread = 0

    def monotonic_ns(self) -> int:
        t = self.base.monotonic_ns()
        if self.back_ns and threading.get_ident() == self.thread:
            return t - self.back_ns
        return t

    def wall_ns(self) -> int:
        return self.base.wall_ns()


class _Events:
    """Subscribers and the thread that calls them, in the order events were emitted."""

    def __init__(self) -> None:
        self._subscribers: tuple[Callable[[ReceiverEvent], None], ...] = ()
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[ReceiverEvent | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def subscribe(self, callback: Callable[[ReceiverEvent], None]) -> Callable[[], None]:
        with self._lock:
            self._subscribers = (*self._subscribers, callback)

        def unsubscribe() -> None:
            with self._lock:
                subs = list(self._subscribers)
                if callback in subs:
                    subs.remove(callback)
                self._subscribers = tuple(subs)

        return unsubscribe

    def emit(self, event: ReceiverEvent) -> None:
        """Any thread, the audio one included: a non-blocking put."""
        self._queue.put(event)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tiality-events", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Delivers what was emitted so far, then ends the thread."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._queue.put(None)
        if thread is not threading.current_thread():  # a subscriber stopping the receiver
            thread.join()

    def _run(self) -> None:
        while True:
            event = self._queue.get()
            if event is None:
                return
            for callback in self._subscribers:
                try:
                    callback(event)
                except Exception:  # one broken subscriber must not silence the others
                    log.exception("tiality: event subscriber %r failed on %s", callback, event.kind)


class Receiver:
    """Listens for senders and plays what they send to ``sink`` (see the module doc).

    ``sink``: an output URI (``sd://default``, ``file:x.wav``, ``null://``, ``app://``), any object with the
    Sink protocol, or None for an output the application pulls itself through ``fill()``. ``server``: a
    ``grpc.Server`` of the application's (the GUI's video server) to add the audio service to, instead of
    serving on a port of the receiver's own.
    """

    def __init__(
        self,
        sink: Sink | str | None = None,
        config: ReceiverConfig | None = None,
        clock: Clock = SYSTEM_CLOCK,
        *,
        server: object | None = None,
    ) -> None:
        self.config = cfg = (config or ReceiverConfig()).validate()
        if server is not None and cfg.security.tls:
            raise ConfigError("TLS on a shared gRPC server is the server's own: add a secure port to it")
        self.sink = _resolve_sink(sink, cfg)
        self.clock = clock
        self._burst_clock = _BurstClock(clock)  # the playouts' clock (see fill)
        self.finished: list[ReceiverStats] = []  # stats of ended streams, for the summary
        self.streams_started = 0
        self.streams_shed = 0  # ended by the receiver to keep up with the others (see ReceiverConfig.shed)
        self.streams_refused = 0  # senders turned away before playing (busy, over capacity, a bad token...)
        self.streams_ended = 0
        self.port = 0
        self._sessions: tuple[Session, ...] = ()
        self._playout_cfg = cfg.playout
        self._shared_server = server
        self._server: AudioServer | None = None
        self._service: AudioService | None = None
        self._watchdog: threading.Thread | None = None
        self._stopping = threading.Event()
        self._running = False
        self._lock = threading.Lock()  # guards session changes only, never the audio path
        self._changed = threading.Condition(self._lock)
        self._events = _Events()
        self._sink_started = False
        self._next_id = 1
        self._rates = (RateMeter(), RateMeter())
        # Mixer state (the sink's thread): controls are read once per block.
        self._volume_db = 0.0
        self._volume = 1.0
        self._muted = False
        self._out_rate = 48_000
        self._chunk = 240  # the most a session is pulled at once (5 ms, as a device's period)
        self._master = _Fader(480)
        self._meter = 0.0  # output peak hold (1.0 = full scale)
        # The mixer's load: wall time spent in fill() over the audio it produced (see _measure_load).
        self._busy_ns = 0
        self._mix_ns = 0  # of which in the per-stream loop (pull, gain, sum): what one more sender adds to
        self._load_samples = 0
        self._load_t0 = 0  # perf_counter_ns() of the window's first fill
        self._load_start_ns = 0  # ... and the receiver's monotonic clock then
        self._load_streams = 0  # sessions x samples, for the mean number of streams over the window
        self._load: float | None = None  # the last window's load (1.0: all of real time)
        self._stream_load = 0.0  # the last window's per-stream part of it, per stream
        self._load_mean_streams = 0.0
        self._overloaded = False
        self._calm = 0  # windows in a row below the overload's end
        self._over = 0  # windows in a row above the limit
        self._kept_up_ns = 0  # start of the last load window within the limit (senders since then are new)
        self._economy = False  # resampling is off for every stream (ReceiverConfig.economy)
        self._economy_gain = ECONOMY_GAIN  # a stream's cost with resampling / without, once measured
        self._cost_before = 0.0  # the per-stream cost in the window that turned economy on
        self._economy_calm = 0  # windows in a row in which resampling again would fit
        self._alloc(4096, 2)
        # The output timeline: mixer sample position -> monotonic time it was pulled (fitted from below).
        self._pos = 0
        self._fills = 0
        self._timeline: deque[tuple[int, float]] = deque()
        self._app_delay_ns: int | None = None
        # Recording.
        self._wav_rec: WavRecorder | None = None
        self._wav_pending: str | None = None
        self._opus_rec: OpusRecorder | None = None
        self._recording: str | None = None
        rec = cfg.record
        if rec is not None and rec.lower().endswith(".opus"):
            self._opus_rec = OpusRecorder(rec)  # fails now, before the port is bound
            self._recording = rec
        elif rec is not None:
            self._wav_pending = self._recording = rec

    def _alloc(self, n: int, channels: int) -> None:
        self._acc = np.zeros((n, channels), dtype=np.float32)
        self._tmp = np.zeros_like(self._acc)
        self._s1 = np.zeros_like(self._acc)
        self._s2 = np.zeros_like(self._acc)
        self._i16 = np.zeros((n, channels), dtype=np.int16)
        self._g = np.zeros(n, dtype=np.float32)
        self._idx = np.arange(1, n + 1, dtype=np.float32)

    # ---- life cycle -----------------------------------------------------------------------------------
    def start(self) -> int:
        """Binds the port (or joins the shared server) and, for a sink with a fixed format (a device, an
        app-owned output), starts playing silence. Returns the bound port (0 without a server of its own)."""
        if self._running:
            return self.port
        if self._stopping.is_set():
            raise RuntimeError("a stopped Receiver cannot start again (its output is closed): make a new one")
        now = self.clock.monotonic_ns()
        self._rates = (RateMeter(now), RateMeter(now))
        self._events.start()
        try:
            if self._shared_server is not None:
                from tiality_cli.net.server import add_audio_service

                self._service = add_audio_service(
                    self._shared_server,  # type: ignore[arg-type]  # a grpc.Server; grpc stays in net/
                    self.open_stream,
                    self.clock.wall_ns,
                    self.config.security,
                    self._refused,
                )
            elif self.config.listen:
                from tiality_cli.net.server import AudioServer

                self._server = AudioServer(
                    self.open_stream,
                    self.config.bind,
                    self.config.port,
                    max_streams=self.config.max_senders,
                    wall_ns=self.clock.wall_ns,
                    security=self.config.security,
                    on_refused=self._refused,
                )
                self.port = self._server.port
            self._running = True
            if self.sink.format is not None:
                self._start_sink(self.sink.format)
        except BaseException:
            self.stop()
            raise
        self._watchdog = threading.Thread(target=self._watch, name="tiality-health", daemon=True)
        self._watchdog.start()
        return self.port

    @property
    def output_error(self) -> BaseException | None:
        """What stopped the audio output (a device unplugged...), or None while it works."""
        err = getattr(self.sink, "error", None)
        return err if isinstance(err, BaseException) else None

    def _watch(self) -> None:
        """Keeps the gRPC health status in step with the audio output, and reports its failure once."""
        reported: BaseException | None = None
        tick = 0
        while True:
            err = self.output_error
            if err is not None and err is not reported:
                reported = err
                self._emit("output_error", detail=str(err) or type(err).__name__)
            if self._server is not None and tick % 4 == 0:
                self._server.set_serving(err is None)
            tick += 1
            if self._stopping.wait(0.25):
                return

    def stop(self) -> None:
        """Stops serving, ends every stream, the output and the recording; joins every thread it started."""
        self._stopping.set()
        with self._lock:
            live = self._sessions
        for s in live:
            s._finished()  # their close() answers at once: nothing will play them any more
        if self._service is not None:
            self._service.close(timeout_s=3.0)
            self._service = None
        if self._server is not None:
            self._server.stop(grace_s=0.5, timeout_s=3.0)
            self._server = None
        if self._watchdog is not None:
            self._watchdog.join()
            self._watchdog = None
        self._running = False
        self.sink.close()
        with self._lock:
            for s in self._sessions:
                self.finished.append(s.stats)
                self.streams_ended += 1
                self._emit("stream_ended", s, detail="receiver stopped")
                s.set_tap(None)
            self._sessions = ()
            self._changed.notify_all()
        self.stop_recording()
        self._events.stop()

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
        self._out_rate = out.sample_rate
        self._chunk = out.sample_rate * BLOCK_US // 1_000_000
        ramp = round(self.config.ramp_ms * out.sample_rate / 1000)
        self._master = _Fader(ramp, self._master.gain)
        self._alloc(max(4096, out.frame_samples), out.channels)
        if self._wav_pending is not None:
            self._wav_rec = WavRecorder(self._wav_pending, out)
            self._wav_pending = None
        self.sink.start(self.fill)
        self._sink_started = True

    # ---- controls (any thread) ------------------------------------------------------------------------
    @property
    def volume_db(self) -> float:
        """The output volume in dB (-120 or -inf: silent; at most +24); changes are ramped."""
        return self._volume_db

    @volume_db.setter
    def volume_db(self, db: float) -> None:
        self._volume = gain_from_db(db, "volume")
        self._volume_db = float(db)

    @property
    def muted(self) -> bool:
        return self._muted

    @muted.setter
    def muted(self, value: bool) -> None:
        self._muted = bool(value)

    def sessions(self) -> tuple[Session, ...]:
        """The connected senders, oldest first (a snapshot: it does not change when senders come or go)."""
        return self._sessions

    def session(self, session_id: int) -> Session | None:
        for s in self._sessions:
            if s.id == session_id:
                return s
        return None

    def subscribe(self, callback: Callable[[ReceiverEvent], None]) -> Callable[[], None]:
        """Calls ``callback(event)`` for every event, in order, from the receiver's event thread (never the
        audio or network threads; a GUI hands it to its own loop). Returns the function that unsubscribes."""
        return self._events.subscribe(callback)

    @property
    def latency_ms(self) -> float | None:
        """The fixed target latency, or None for auto (following the jitter)."""
        return self._playout_cfg.latency_ms

    def set_latency(self, ms: float | None) -> None:
        """Fixes the target latency (ms), or None for auto; live streams follow at their next block."""
        self._set_policy(replace(self._playout_cfg, latency_ms=ms))

    @property
    def max_latency_ms(self) -> float:
        return self._playout_cfg.max_latency_ms

    @max_latency_ms.setter
    def max_latency_ms(self, ms: float) -> None:
        self._set_policy(replace(self._playout_cfg, max_latency_ms=ms))

    def _set_policy(self, cfg: PlayoutConfig) -> None:
        self._playout_cfg = cfg.validate()
        for s in self._sessions:
            s.playout.set_policy(cfg.latency_ms, cfg.max_latency_ms)

    @property
    def recording(self) -> str | None:
        """The path being recorded to, or None."""
        return self._recording

    def start_recording(self, path: str) -> None:
        """Records what plays (PATH.wav) or the packets of every stream as received (PATH.opus, then
        PATH-2.opus... per stream); a recording already running is finished first."""
        check_record_path(path)
        opus = OpusRecorder(path) if path.lower().endswith(".opus") else None
        self.stop_recording()
        if opus is not None:
            self._opus_rec = opus
            for s in self._sessions:
                s.set_tap(opus.open_stream(s.format, s.algorithm_delay))
        elif self._sink_started and self.sink.format is not None:
            self._wav_rec = WavRecorder(path, self.sink.format)
        else:
            self._wav_pending = path  # the format is the first stream's: opened with the output
        self._recording = path

    def stop_recording(self) -> str | None:
        """Finishes the recording (the files are complete when this returns); returns its path."""
        path, self._recording = self._recording, None
        self._wav_pending = None
        wav, self._wav_rec = self._wav_rec, None
        if wav is not None:
            wav.close()
        if self._opus_rec is not None:
            self._opus_rec = None
            for s in self._sessions:
                s.set_tap(None)
        return path

    # ---- the sink's clock -----------------------------------------------------------------------------
    def fill(self, out: I16 | F32, delay_ns: int | None = None) -> bool:
        """Mixes every session into ``out`` (n x channels, int16 or float32 in [-1, 1]); never blocks.

        The sink's callback, or an application's own audio callback (any block size). ``delay_ns``: how
        long until this block's first sample reaches the DAC, when the caller knows (for play_time_ns).
        Returns False when no stream audio was written (``out`` is silence).
        """
        n = len(out)
        if delay_ns is not None:
            self._app_delay_ns = delay_ns
        if not self._running or n == 0:
            out[:] = 0
            return False
        t0 = time.perf_counter_ns()
        if out.ndim != 2 or out.shape[1] != self._acc.shape[1]:
            raise ValueError(f"fill: expected an (n, {self._acc.shape[1]}) buffer, got {out.shape}")
        self._track_timeline(n)
        sessions = self._sessions
        if n > len(self._acc):  # an unusually large block: grow once
            self._alloc(n, out.shape[1])
        acc, g, idx = self._acc[:n], self._g, self._idx
        playing = False
        done = False
        if sessions:
            t_mix = time.perf_counter_ns()
            solo = False
            for s in sessions:
                if s._solo:
                    solo = True
                    break
            tmp, chunk = self._tmp[:n], self._chunk
            dac = self._dac_ns()
            for i, s in enumerate(sessions):
                buf = acc if i == 0 else tmp
                if n <= chunk:
                    playing = s.playout.pull(buf, 0, dac) or playing
                else:
                    playing = self._pull_burst(s.playout, buf, chunk, dac) or playing
                heard = not s._muted and (s._solo or not solo)
                s.fader.apply(buf, s._gain if heard else 0.0, g, idx)
                if i:
                    acc += tmp
                done = done or s.playout.state == State.FINISHED
            self._mix_ns += time.perf_counter_ns() - t_mix
        else:
            acc[:] = 0
        if done:
            self._retire()
        self._master.apply(acc, 0.0 if self._muted else self._volume, g, idx)
        peak = soft_limit(acc, self._s1[:n], self._s2[:n])
        self._meter = max(peak, self._meter * 10 ** (-METER_FALL_DB_PER_S * n / self._out_rate / 20))
        if out.dtype == np.float32:
            out[:] = acc
            pcm = self._i16[:n]
            if playing and self._wav_rec is not None:
                to_int16(acc, pcm, peak=peak)
        else:
            pcm = cast(I16, out)
            to_int16(acc, pcm, peak=peak)
        if playing and self._wav_rec is not None:
            self._wav_rec.push(pcm)
        self._fills += 1
        self._busy_ns += time.perf_counter_ns() - t0
        if not self._load_samples:
            self._load_t0 = t0
            self._load_start_ns = self.clock.monotonic_ns()
        self._load_samples += n
        self._load_streams += len(sessions) * n
        rate = self._out_rate
        if self._load_samples >= LOAD_WINDOW_S * rate or (
            t0 - self._load_t0 >= LOAD_WINDOW_WALL_NS and self._load_samples >= LOAD_WINDOW_MIN_S * rate
        ):
            self._measure_load()
        elif self._load_samples >= ECONOMY_PEEK_S * rate and not self._economy and self.config.economy:
            self._peek()
        return playing

    def _peek(self) -> None:
        """Starts economy before the window closes when the load so far is over the limit: turning
        resampling off is cheap to undo, and a burst of senders that saturates the mixer makes every
        stream skip audio until then. The window starts again, so that shedding still waits for two
        windows measured without resampling."""
        audio_ns = self._load_samples * 1e9 / self._out_rate
        load = self._busy_ns / audio_ns
        if load <= self.config.max_load_pct / 100 or not self._may_economize():
            return
        streams = self._load_streams / self._load_samples
        self._set_economy(True, load)
        if streams >= 0.5:
            self._cost_before = self._mix_ns / audio_ns / streams
        self._busy_ns = self._mix_ns = self._load_samples = self._load_streams = 0

    def _measure_load(self) -> None:
        """Closes a load window (the sink's thread, after a second of audio, or 1.5 s of wall time when the
        output falls behind, so that an overload shows within seconds): the share of real time fill() took,
        GIL waits and preemption included (what decides whether the output keeps up), and the overload
        events when it crosses the limit (ended: below 90 % of it for 5 s)."""
        audio_ns = self._load_samples * 1e9 / self._out_rate
        load = self._busy_ns / audio_ns
        self._load, self._load_mean_streams = load, self._load_streams / self._load_samples
        if self._load_mean_streams >= 0.5:
            self._stream_load = self._mix_ns / audio_ns / self._load_mean_streams
            if self._cost_before and self._stream_load > 0:  # the first window since economy began
                self._economy_gain = min(ECONOMY_GAIN_MAX, max(1.0, self._cost_before / self._stream_load))
                self._cost_before = 0.0
        else:
            self._cost_before = 0.0  # nothing to measure the gain on: the last one (or the default) holds
        self._busy_ns = self._mix_ns = self._load_samples = self._load_streams = 0
        limit = self.config.max_load_pct / 100
        if load > limit:
            self._calm = self._economy_calm = 0
            self._over += 1
            if not self._overloaded:
                self._overloaded = True
                self._emit("overload", detail=self.overload_text())
            if self._may_economize():
                self._set_economy(True, load)
                return
            if self.config.shed and self._over >= SHED_AFTER:
                self._shed()
            return
        if self._economy and not self._cost_before:
            # Resampling again would multiply the per-stream part of the load by the gain measured
            self._economy_calm += 1
            per = self._stream_load * self._load_mean_streams
            projected = (load - per) + per * self._economy_gain
            if projected >= limit * LOAD_CLEAR:
                self._economy_calm = 0
            elif self._economy_calm >= LOAD_CALM:
                self._set_economy(False, projected)
        self._over = 0
        # Those that joined during this window were not measured over all of it: still new.
        self._kept_up_ns = self._load_start_ns
        if self._overloaded:
            self._calm = self._calm + 1 if load < limit * LOAD_CLEAR else 0
            if self._calm >= LOAD_CALM:
                self._overloaded = False
                self._emit("overload_ended", detail=f"mixing takes {load * 100:.0f} % of real time")

    def _may_economize(self) -> bool:
        """Whether economy may start: on in the config, off now, and a stream that may resample (a
        converter at ratio 1, not engaged yet, would be as soon as its drift shows: then the gain
        measured is about 1 and economy ends as the overload does)."""
        return (
            self.config.economy
            and not self._economy
            and any(s.playout.resampling_allowed for s in self._sessions)
        )

    def _set_economy(self, on: bool, load: float) -> None:
        """Turns every stream's resampling off (``on``: the mixer is overloaded, ``load``) or back on
        (``load``: what it would be with resampling); the sink's thread, closing a load window. New
        streams follow."""
        with self._lock:  # open_stream reads the flag under it: a sender joining now follows it
            self._economy = on
            for s in self._sessions:
                s.playout.set_resampling(not on)
        self._economy_calm = 0
        self._cost_before = self._stream_load if on else 0.0
        limit = self.config.max_load_pct
        if on:
            self._over = 0  # the next windows show the load without resampling before any sender is shed
            self._emit(
                "economy",
                detail=f"mixing took {load * 100:.0f} % of real time (limit {limit:g} %): stopped resampling "
                "for clock drift, which is now corrected in 2.5 ms steps at quiet points (--no-economy)",
            )
        else:
            self._emit(
                "economy_ended",
                detail=f"mixing would take about {load * 100:.0f} % of real time with resampling (limit "
                f"{limit:g} %): resampling for clock drift again",
            )

    @property
    def economy(self) -> bool:
        """Whether resampling for clock drift is off to save CPU (since an ``economy`` event)."""
        return self._economy

    def _shed(self) -> None:
        """Ends the newest senders that joined since the mixer last kept up, until it carries no more
        than its capacity (at least one stays): a burst of senders beyond capacity, admitted before the
        load was known, would otherwise degrade every stream for good. Their calls end with the reason.
        A stream whose sender has already closed it is left to finish."""
        cap = self.capacity
        if cap is None:
            return
        sessions = self._sessions  # immutable: the lock is taken only when someone is ended
        excess = len(sessions) - max(1, cap)
        if excess <= 0:
            return
        new = [s for s in sessions if s.started_ns > self._kept_up_ns and not s.closing]
        victims = new[len(new) - min(excess, len(new)) :]
        if not victims:
            return
        kept = len(sessions) - len(victims)
        text = self.overload_text()
        reason = (
            f"ended this stream to keep its other {kept} sender{'s' if kept != 1 else ''} playing: it "
            f"joined in a burst beyond what the receiver can mix ({text})"
        )
        n = len(victims)
        names = ", ".join(s.name.split()[0] if s.name else s.peer for s in victims[:3])
        more = f" and {n - 3} more" if n > 3 else ""
        with self._lock:
            gone = set(map(id, victims))
            self._sessions = tuple(s for s in self._sessions if id(s) not in gone)
            for s in victims:
                s.evicted = reason
                self.finished.append(s.stats)
                self.streams_ended += 1
                s._finished()  # its close() answers at once: its buffered audio is not played
                self._emit("stream_ended", s, detail=f"shed: {text}")
            self.streams_shed += n
            self._emit(
                "shed",
                detail=f"ended the {n} newest sender{'s' if n != 1 else ''} ({names}{more}) to keep the "
                f"other {kept} playing: {text}",
            )
            self._changed.notify_all()
        self._over = 0  # the next windows show the load without them

    @property
    def load_pct(self) -> float | None:
        """The share of real time the mixer took over the last second (decoding, resampling and mixing every
        stream; above 100 it cannot keep up), or None before its first second."""
        return None if self._load is None else self._load * 100

    @property
    def capacity(self) -> int | None:
        """How many senders the mixer can carry within ``max_load_pct``, from its last second: what each
        stream cost it (its pull, gain and sum) on top of the fixed part (limiter, conversion, timeline),
        which one more sender does not add to. None until it has mixed a stream for a second. In economy
        (resampling off) a stream is counted at what it costs with resampling: economy carries a burst
        through, it does not admit more senders than fit once it ends."""
        load, per = self._load, self._stream_load
        if load is None or per <= 0:
            return None
        fixed = max(0.0, load - per * self._load_mean_streams)
        if self._economy:
            per *= self._economy_gain
        return max(0, int((self.config.max_load_pct / 100 - fixed) / per))

    @property
    def overloaded(self) -> bool:
        """Whether the mixer's load is over ``max_load_pct`` (since an ``overload`` event)."""
        return self._overloaded

    def overload_text(self) -> str:
        """One line: the load, the limit, what the receiver carries (for the event, the refusal, the CLI)."""
        load, cap, limit = self.load_pct or 0.0, self.capacity, self.config.max_load_pct
        streams = round(self._load_mean_streams)
        state = "overloaded" if load > limit else "at capacity"
        carry = f"; it carries about {cap}" if cap is not None else ""
        if carry and self._economy:  # capacity counts each stream as it costs resampling: say so
            carry += " with resampling for clock drift, now off to save CPU"
        return (
            f"receiver {state}: mixing {streams} sender{'s' if streams != 1 else ''} takes {load:.0f} % "
            f"of real time (limit {limit:g} %, --max-load){carry}"
        )

    def _output_delay_ns(self) -> int:
        """How long the block being filled takes to reach the DAC: what the application gave ``fill``, or
        else the sink's ``delay_ns``."""
        delay = self._app_delay_ns
        return int(getattr(self.sink, "delay_ns", 0) or 0) if delay is None else delay

    def _dac_ns(self) -> int:
        """When this block's first sample reaches the DAC (monotonic), for every stream's latency: the
        output delay from the time it was measured (the sink's ``delay_at_ns``; the application's figure,
        and a sink without one, from now)."""
        at = int(getattr(self.sink, "delay_at_ns", 0) or 0) if self._app_delay_ns is None else 0
        return (at or self.clock.monotonic_ns()) + self._output_delay_ns()

    def _pull_burst(self, playout: StreamPlayout, buf: F32, chunk: int, dac_ns: int) -> bool:
        """Pulls a large block as a burst of device-sized pulls, each stamped with the time its samples
        would have been pulled by a device ending its last pull now (the timeline the playout fits to its
        pulls anyway): its latency control then sees a steady device from the first block on."""
        bc, n = self._burst_clock, len(buf)
        last = (n - 1) // chunk * chunk
        bc.thread = threading.get_ident()
        playing = False
        for a in range(0, n, chunk):
            bc.back_ns = (last - a) * 1_000_000_000 // self._out_rate
            dac = dac_ns + a * 1_000_000_000 // self._out_rate  # when this piece reaches the DAC
            playing = playout.pull(buf[a : a + chunk], 0, dac) or playing
        bc.back_ns = 0
        return playing

    def _track_timeline(self, n: int) -> None:
        """Fits the output's sample clock from below: a late callback does not move it (for A/V sync)."""
        pos, q = self._pos, self._timeline
        x = self.clock.monotonic_ns() - pos * 1e9 / self._out_rate
        while q and q[-1][1] >= x:
            q.pop()
        q.append((pos, x))
        while q[0][0] < pos - TIMELINE_WINDOW_S * self._out_rate:
            q.popleft()
        self._pos = pos + n

    def _retire(self) -> None:
        # A stream that finishes while the receiver stops was ended by the stop (its call cancelled,
        # the buffer played out before the output closed): say so, as stop() does for the others.
        detail = "receiver stopped" if self._stopping.is_set() else "ended"
        with self._lock:
            keep = []
            for s in self._sessions:
                if s.playout.state == State.FINISHED:
                    self.finished.append(s.stats)
                    self.streams_ended += 1
                    s._finished()
                    self._emit("stream_ended", s, detail=detail)
                else:
                    keep.append(s)
            self._sessions = tuple(keep)
            self._changed.notify_all()

    def _emit(self, kind: str, s: Session | None = None, *, peer: str = "", detail: str = "") -> None:
        self._events.emit(
            ReceiverEvent(
                kind,
                s.id if s else 0,
                self.clock.wall_ns(),
                s.peer if s else peer,
                s.name if s else "",
                detail,
            )
        )

    def _refused(self, peer: str, reason: str) -> None:
        with self._lock:  # a shared synchronous server refuses on its pool's threads
            self.streams_refused += 1
        self._emit("sender_refused", peer=peer, detail=reason)

    # ---- the transport's side -----------------------------------------------------------------------
    def open_stream(self, peer: str, info: StreamInfo) -> Session:
        """Accepts a new sender (tiality_cli.link.Acceptor); BusyError when --max-senders are playing."""
        fmt = info.format
        with self._lock:
            n = self.config.max_senders
            if self._stopping.is_set():
                raise BusyError("receiver stopping")
            if len(self._sessions) >= n:
                raise BusyError(
                    f"receiver busy: it takes {n} sender{'s' if n != 1 else ''} at a time (--max-senders)"
                )
            cap = self.capacity
            if cap is not None and self._sessions and len(self._sessions) >= cap:
                # Beyond what it can mix in real time: a new sender would degrade every stream.
                raise BusyError(f"{self.overload_text()}: no more senders for now")
            if not self._sink_started:
                self._start_sink(self.config.output_format or fmt)
            out = self.sink.format or fmt
            cfg = self._playout_cfg
            playout = StreamPlayout(
                fmt, out, cfg, self._burst_clock, fec=info.fec, lookahead_samples=info.algorithm_delay
            )
            if self._economy:
                playout.set_resampling(False)
            now = self.clock.monotonic_ns()
            soloed = any(s.solo for s in self._sessions)  # then a new sender starts silent, not with a blip
            s = Session(
                id=self._next_id,
                peer=peer,
                name=info.name,
                format=fmt,
                playout=playout,
                started_ns=now,
                algorithm_delay=info.algorithm_delay,
                rates=(RateMeter(now), RateMeter(now)),
                tap=self._opus_rec.open_stream(fmt, info.algorithm_delay) if self._opus_rec else None,
                drain_s=cfg.max_latency_ms / 1000 + 2.0,
                fader=_Fader(round(self.config.ramp_ms * out.sample_rate / 1000), 0.0 if soloed else 1.0),
            )
            self._next_id += 1
            self.streams_started += 1
            self._sessions = (*self._sessions, s)
            self._emit("stream_started", s, detail=fmt.describe())
            self._changed.notify_all()
            return s

    # ---- for presenters -------------------------------------------------------------------------------
    def play_time_ns(self, session_id: int, capture_time_ns: int) -> int | None:
        """The receiver wall-clock time (ns) at which the sample captured at ``capture_time_ns`` (the sender's
        wall clock, as a video frame from the same host is stamped) reaches the DAC.

        From the sender's clock-offset estimate, the playout's mapping of capture times to output samples,
        the encoder's look-ahead, the output's timeline and its device delay. None while that sender has
        played nothing yet, or is gone. A capture time whose audio has not arrived yet maps to where it will
        play if the playout neither skips nor inserts meanwhile.
        """
        s = self.session(session_id)
        if s is None:
            return None
        for _ in range(8):  # the sink's thread may pull meanwhile: retry until a consistent reading
            fills = self._fills
            try:
                origin = self._timeline[0][1]
            except IndexError:
                return None
            pos = self._pos
            ahead = s.playout.capture_to_output_ns(capture_time_ns + s.clock_offset_ns)
            if fills == self._fills:
                break
        if ahead is None:
            return None
        codec_ns = s.algorithm_delay * 1_000_000_000 // s.format.sample_rate
        mono = origin + pos * 1e9 / self._out_rate + ahead + codec_ns + self._output_delay_ns()
        return round(mono) + self.clock.wall_ns() - self.clock.monotonic_ns()

    @property
    def output_level_dbfs(self) -> float:
        """The output's peak level after volume and limiter, held and falling 20 dB/s (a GUI's meter)."""
        return dbfs(self._meter * 32768.0)

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
            return [*self.finished, *(s.stats for s in self._sessions)]

    def snapshot(self) -> StatsSnapshot:
        """Totals over every stream so far; windowed figures from the live ones (or the last one)."""
        stats = self.all_stats()
        live = [s.stats for s in self._sessions] or stats[-1:]
        return self._summarise(stats, live, self._rates, streams=len(self._sessions))

    def session_views(self) -> list[SessionView]:
        """One entry per connected sender, for per-sender rows in a live view or a GUI."""
        now = self.clock.monotonic_ns()
        views = []
        for s in self._sessions:
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
                    gain_db=s.gain_db,
                    muted=s.muted,
                    solo=s.solo,
                )
            )
        return views

    def _summarise(
        self,
        stats: list[ReceiverStats],
        live: list[ReceiverStats],
        rates: tuple[RateMeter, RateMeter],
        streams: int,
    ) -> StatsSnapshot:
        now = self.clock.monotonic_ns()
        total = {k: sum(getattr(s, k) for s in stats) for k in _COUNTERS}
        p50, p95, p100 = _pooled(live, "latency_ms", (50, 95, 100))
        peak = max((s.peak for s in live), default=0.0)
        rms = max((s.rms for s in live), default=0.0)
        kbps = rates[0].rate(total["bytes"], now) * 8 / 1000
        packets_per_s = rates[1].rate(total["packets"], now)
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
            latency_ms_p50=p50,
            latency_ms_p95=p95,
            latency_ms_max=p100,
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
            stale=total["stale"],
            stale_ms=sum(s.stale_ms for s in stats),
            **{name: _pooled(live, name, (50,))[0] for name in _STAGES},
        )


def _resolve_sink(sink: Sink | str | None, cfg: ReceiverConfig) -> Sink:
    if sink is None:
        return AppSink(cfg.output_format or AudioFormat())
    if isinstance(sink, str):
        from tiality_cli.io.sinks import open_sink

        return open_sink(sink, cfg.output_format)
    return sink


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
    gain_db: float = 0.0  # the mixer's controls for this sender
    muted: bool = False
    solo: bool = False


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
    "stale",
)

_STAGES = ("stage_capture_ms", "stage_frame_ms", "stage_network_ms", "stage_buffer_ms", "stage_output_ms")


def _pooled(live: list[ReceiverStats], window: str, qs: tuple[float, ...]) -> list[float]:
    """Percentiles of one window (latency, a stage) over the live streams' recent frames, pooled (nan
    before the first frame)."""
    values = np.concatenate([getattr(s, window).values() for s in live]) if live else np.zeros(0)
    values.sort()
    return quantiles(values, qs)
