"""The sender: capture -> Opus -> a bounded backlog -> one stream over a Link (gRPC unless told otherwise).

Usable from the robot's own code without the CLI::

    with Sender("alsa://hw:1,0", SenderConfig("gui-host:50052")) as tx:   # start(): returns at once
        ...                                                               # tx.snapshot() for figures
    result = Sender(source, SenderConfig(endpoint)).run()                 # or block until it ends

While streaming, the link's thread (gRPC's request iterator) reads each frame from the source itself
(the sound card's clock paces it), encodes it and hands it to gRPC: one thread wakes per packet, as in a
bare gRPC client stream. The capture thread only watches, waking every ``TAKEOVER_MS``: when the link
has not come back from gRPC for that long (flow control has blocked it), and while connecting or
reconnecting, it reads and encodes instead, into the backlog; the link sends the backlog first and then
reads for itself again. The oldest packets are dropped once the backlog exceeds ``max_backlog_ms``
(counted in ``dropped``): audio never piles up into latency. On a device, the audio of the first
``TAKEOVER_MS`` of a block is dropped by the source's own stale-audio rule instead (counted in
``capture_dropped_ms``): a link blocked that long could not have delivered it in time anyway.
``start()`` runs the whole of ``run()`` on a thread of its own; ``stop()`` ends it and joins them all.
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from tiality_cli.clock import SYSTEM_CLOCK, Clock, Wake
from tiality_cli.clocksync import ClockFilter
from tiality_cli.codec import OpusEncoder
from tiality_cli.config import AudioFormat, ClientSecurity, CodecConfig, Endpoint, parse_endpoint
from tiality_cli.errors import AuthError, ConfigError, ConnectError, RejectedError
from tiality_cli.io.base import CaptureOptions, Source, realtime_thread
from tiality_cli.link import ClockEstimate, Connector, Link, Outgoing, Packet, StreamInfo, StreamTotals
from tiality_cli.stats import METER_EVERY_MS, RateMeter, dbfs, frame_levels

BACKOFF_FIRST_S = 0.1  # first retry after an outage
BACKOFF_MAX_S = 0.5  # cap: a returning receiver gets audio again within about half a second
# The capture thread takes the source over from a link that has been inside gRPC this long. Longer
# costs nothing on a paced source (tone://, file: catch up) and, on a device, only audio that a blocked
# link could not have delivered in time anyway (the device's stale-audio rule drops it, counted in
# capture_dropped_ms); shorter wakes the watcher more often (each wake costs what the hand-off saved).
TAKEOVER_MS = 100.0


@dataclass(frozen=True, slots=True)
class SenderConfig:
    endpoint: Endpoint | str  # the receiver: an Endpoint or "HOST:PORT" (parsed here; ConfigError if bad)
    codec: CodecConfig = field(default_factory=CodecConfig)
    max_backlog_ms: float = (
        200.0  # older audio is dropped beyond this; keeps latency bounded on a blocked link
    )
    seconds: float | None = None  # stop after this much audio; None: until the source ends or stop()
    name: str = field(default_factory=socket.gethostname)
    connect_timeout_s: float = 5.0  # how long to wait for the receiver to answer at all
    clock_sync: bool = True  # estimate the receiver's clock offset, so it reports one-way latency
    clock_sync_every_s: float = 10.0  # re-estimate this often (clocks drift; NTP may step them)
    reconnect: bool = True  # keep trying when the receiver is down or the link breaks (--once: False)
    security: ClientSecurity = field(default_factory=ClientSecurity)
    format: AudioFormat | None = None  # for a source given as a URI (default 48 kHz stereo, 20 ms)
    capture: CaptureOptions | None = None  # for a device given as a URI: channels opened, map, downmix

    def __post_init__(self) -> None:
        if isinstance(self.endpoint, str):
            object.__setattr__(self, "endpoint", parse_endpoint(self.endpoint))

    @property
    def address(self) -> Endpoint:
        """The receiver's endpoint (``endpoint``, parsed)."""
        assert isinstance(self.endpoint, Endpoint)  # __post_init__ parsed a string
        return self.endpoint

    def validate(self) -> SenderConfig:
        """Raises ConfigError naming the option, for library callers as for the CLI."""
        self.codec.validate()
        self.security.validate()
        if not self.max_backlog_ms > 0:
            raise ConfigError(f"--max-backlog {self.max_backlog_ms:g}: must be positive")
        if self.seconds is not None and not self.seconds > 0:
            raise ConfigError(f"--seconds {self.seconds:g}: must be positive")
        if not self.connect_timeout_s > 0:
            raise ConfigError(f"connect timeout {self.connect_timeout_s:g} s: must be positive")
        return self


@dataclass(frozen=True, slots=True)
class SendResult:
    packets_sent: int
    bytes_sent: int
    dropped: int
    frames_captured: int
    receiver_packets: int  # what the receiver said it got (its StreamSummary)
    receiver_lost: int
    receiver_concealed: int
    receiver_frames_played: int
    reconnects: int = 0


@dataclass(frozen=True, slots=True)
class StateChange:
    """One change of ``SenderStats.state``, handed to ``Sender.on_state`` (a log, a GUI's status line).

    ``attempt`` counts the connection attempts of the current outage: on ``reconnecting`` and ``failed``
    the number of the attempt that just failed, on ``streaming`` how many failed before it (0: none).
    """

    state: str  # connecting, streaming, reconnecting, done, failed
    reason: str  # why: the error of the failed attempt ("" for connecting, streaming, done)
    attempt: int
    target: str  # the receiver, HOST:PORT


StateListener = Callable[[StateChange], None]


@dataclass(frozen=True, slots=True)
class SenderSnapshot:
    """The sender's figures at one moment (``Sender.snapshot()``); rates are over the last 2 s."""

    state: str  # starting, connecting, streaming, reconnecting, done, failed
    frames_captured: int
    packets_sent: int
    bytes_sent: int
    packets_per_s: float
    bitrate_kbps: float
    backlog_ms: float
    backlog_peak_ms: float
    dropped: int  # packets dropped from the backlog while the network could not keep up
    overruns: int
    capture_dropped_ms: float
    level_dbfs: float
    peak_dbfs: float
    rtt_ms: float | None  # round trip of the best clock exchange (None before one)
    clock_offset_ms: float | None  # receiver clock - sender clock
    reconnects: int
    last_error: str


class SenderStats:
    """Live counters (written by the capture and network threads; read by presenters)."""

    def __init__(self) -> None:
        self.frames_captured = 0
        self.packets_sent = 0
        self.bytes_sent = 0
        self.dropped = 0  # packets dropped from the backlog because the network could not keep up
        self.backlog = 0  # packets waiting to be sent
        self.backlog_peak = 0  # the most packets that ever waited (bounded by --max-backlog)
        self.peak = 0
        self.rms = 0.0
        self.state = "starting"  # starting, connecting, streaming, reconnecting, done, failed
        self.reconnects = 0  # streams re-opened after the receiver went away or the link broke
        self.last_error = ""  # why the last attempt failed (shown while reconnecting)
        self.capture_dropped_ms = 0.0  # stale audio the capture device had queued, dropped to stay fresh
        self.attempt = 0  # failed connection attempts in a row (0 while streaming)

    @property
    def level_dbfs(self) -> float:
        return dbfs(self.rms)

    @property
    def peak_dbfs(self) -> float:
        return dbfs(float(self.peak))


class Sender:
    """Streams one source to one receiver: ``start()``/``stop()`` (or ``with``), or ``run()`` to block.

    ``source``: an input URI (``alsa://hw:1,0``, ``tone://440``, ``file:x.wav``...) opened with
    ``config.format`` and ``config.capture``, or any object with the Source protocol.
    """

    def __init__(
        self,
        source: Source | str,
        config: SenderConfig,
        clock: Clock = SYSTEM_CLOCK,
        connector: Connector | None = None,
    ) -> None:
        self.config = config.validate()
        if isinstance(source, str):
            from tiality_cli.io.sources import open_source

            source = open_source(source, config.format or AudioFormat(), config.capture, clock)
        self.source = source
        self._connect = connector or self._grpc_link
        self.clock = clock
        self.format = source.format
        self.encoder = OpusEncoder(self.format, config.codec)
        self.stats = SenderStats()
        self._backlog: deque[Packet] = deque()
        self._max_backlog = max(1, int(config.max_backlog_ms * 1000 // self.format.frame_us))
        # Who reads the source: the link's thread while it keeps up (``_inline``), else the capture
        # thread. ``_reader`` is held for each read + encode, by whichever thread does it.
        self._reader = threading.Lock()
        self._inline = False
        self._yields = 0  # items the link's thread has handed to gRPC (the watcher sees it move)
        self._stream_id = 0  # bumped when a stream ends: its request iterator must not read any more
        self._watch = Wake()  # wakes the capture thread early: the link let go of the source, or the end
        fmt = self.format
        self._frame_ns = fmt.frame_ns
        self._limit = None if config.seconds is None else round(config.seconds * 1e6 / fmt.frame_us)
        self._dropped_ns = 0  # the source's dropped_ns as last seen
        # The level is read a few times a second (live view 4 Hz, JSON 1 Hz): measure one frame in
        # every METER_EVERY_MS of audio, not every frame (its numpy calls cost as much as the tone).
        self._meter_every = max(1, round(METER_EVERY_MS * 1000 / fmt.frame_us))
        self._meter_in = 0
        self._scratch = np.zeros(self.encoder.input.shape, dtype=np.float32)  # the meter's, allocated once
        self._captured_all = threading.Event()
        self._stop = threading.Event()
        self._capture_error: BaseException | None = None
        self._capture_thread: threading.Thread | None = None
        self._capture_lock = threading.Lock()
        self._source_lock = threading.Lock()  # the source is closed once: stop() and run()'s end may race
        self._source_closed = False
        self.clock_filter = ClockFilter()
        self._clock_pending: ClockEstimate | None = None
        self._next_seq = 0  # the sequence number of the next frame captured
        # Called on the sender's threads at each state change (a few times per connection, never per
        # packet); it must return quickly. The CLI logs them; a GUI can show them.
        self.on_state: StateListener | None = None
        # Called once on start()'s thread when run() has ended there (``result`` or ``error`` is set).
        self.on_end: Callable[[], None] | None = None
        self._link: Link | None = None  # the connection being made or used (stop() closes it)
        self._streaming = False
        self._thread: threading.Thread | None = None
        self.result: SendResult | None = None  # once start()ed and ended: the totals, or
        self.error: BaseException | None = None  # ... why it failed
        now = clock.monotonic_ns()
        self._rates = (RateMeter(now), RateMeter(now))

    def _set_state(self, state: str, reason: str = "") -> None:
        st = self.stats
        if state == st.state and state not in ("reconnecting", "failed"):
            return
        st.state = state
        listener = self.on_state
        if listener is not None:
            listener(StateChange(state, reason, st.attempt, self.config.address.target))

    def _grpc_link(self) -> Link:
        from tiality_cli.net.client import GrpcLink

        return GrpcLink(self.config.address, self.config.security)

    # ---- life cycle -----------------------------------------------------------------------------------
    def start(self) -> None:
        """Runs the sender on a thread of its own and returns at once; ``result``/``error`` when it ends."""
        if self._thread is not None:
            if self._thread.is_alive():
                return
            raise RuntimeError("a Sender runs once (its source is closed): make a new one")
        self._thread = threading.Thread(target=self._run_thread, name="tiality-send", daemon=True)
        self._thread.start()

    def _run_thread(self) -> None:
        try:
            self.result = self.run()
        except BaseException as exc:
            self.error = exc
        finally:
            if self.on_end is not None:
                self.on_end()

    @property
    def running(self) -> bool:
        """True from start() until the stream has ended (or failed)."""
        return self._thread is not None and self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> SendResult | None:
        """Waits for a start()ed sender to end; returns its totals (None on timeout), re-raises its error."""
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return None
        if self.error is not None:
            raise self.error
        return self.result

    def stop(self, timeout: float = 5.0, *, wait: bool = True) -> None:
        """Ends the stream cleanly: what is captured so far is sent, the receiver answers, the stream closes.

        Returns once every thread the sender started has ended (``wait``): normally as soon as the
        receiver has played its buffer; after ``timeout`` s the connection is cut instead. Stopping while
        connecting or reconnecting ends at once and quietly (no error). ``wait=False`` only asks.
        """
        self._stop.set()
        self._close_source()
        self._watch.post()
        link = self._link
        if link is not None and not self._streaming:
            link.close()  # wakes a wait_ready() in progress
        if not wait or self._thread is None or self._thread is threading.current_thread():
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            link = self._link
            if link is not None:
                link.close()  # cancels a stream the receiver does not answer
            self._thread.join(timeout)

    def _close_source(self) -> None:
        """Closes the source (a blocked read returns None) exactly once, whichever threads get here:
        ``stop()`` on the caller's thread and the end of ``run()`` often do, at the same moment, and a
        device closed on two threads at once can hang (PortAudio's stop and close did)."""
        with self._source_lock:
            if not self._source_closed:
                self._source_closed = True
                self.source.close()

    def __enter__(self) -> Sender:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def snapshot(self) -> SenderSnapshot:
        """The figures now (any thread; readers do not disturb each other's rates)."""
        st, fmt = self.stats, self.format
        now = self.clock.monotonic_ns()
        best = self.clock_filter.best()
        return SenderSnapshot(
            state=st.state,
            frames_captured=st.frames_captured,
            packets_sent=st.packets_sent,
            bytes_sent=st.bytes_sent,
            packets_per_s=self._rates[0].rate(st.packets_sent, now),
            bitrate_kbps=self._rates[1].rate(st.bytes_sent, now) * 8 / 1000,
            backlog_ms=st.backlog * fmt.frame_ms,
            backlog_peak_ms=st.backlog_peak * fmt.frame_ms,
            dropped=st.dropped,
            overruns=self.source.overruns,
            capture_dropped_ms=st.capture_dropped_ms,
            level_dbfs=st.level_dbfs,
            peak_dbfs=st.peak_dbfs,
            rtt_ms=None if best is None else best.round_trip_ns / 1e6,
            clock_offset_ms=None if best is None else best.offset_ns / 1e6,
            reconnects=st.reconnects,
            last_error=st.last_error,
        )

    # ---- capture ------------------------------------------------------------------------------------
    def _read_frame(self) -> Packet | None:
        """Reads, meters and encodes the next frame (the caller holds ``_reader``); None at the end."""
        seq = self._next_seq
        if self._stop.is_set() or (self._limit is not None and seq >= self._limit):
            return None
        src, st, enc = self.source, self.stats, self.encoder
        t = src.read(enc.input)
        if t is None:
            return None
        delay = self.clock.wall_ns() - t - self._frame_ns  # waited in the device once complete
        if src.dropped_ns != self._dropped_ns:
            # The source dropped stale frames: the sequence counts audio time, so it skips them too,
            # and the receiver plays this frame at its true place instead of late.
            seq += round((src.dropped_ns - self._dropped_ns) / self._frame_ns)
            self._dropped_ns = src.dropped_ns
            st.capture_dropped_ms = self._dropped_ns / 1e6
        if self._meter_in == 0:
            st.peak, st.rms = frame_levels(enc.input, self._scratch)
            self._meter_in = self._meter_every
        self._meter_in -= 1
        payload = enc.encode()
        self._next_seq = seq + 1
        st.frames_captured += 1
        return (seq, t, payload, delay if delay > 0 else 0)

    def _read_or_end(self) -> Packet | None:
        """``_read_frame``; at the end (or on an error, kept for run() to raise) capture is over."""
        try:
            item = self._read_frame()
        except BaseException as exc:  # surfaced by run() on the caller's thread
            self._capture_error = exc
            item = None
        if item is None:
            self._captured_all.set()
            self._watch.post()
        return item

    def _capture(self) -> None:
        """The capture thread: watches the link, and reads into the backlog while the link cannot."""
        backlog, st, reader, watch = self._backlog, self.stats, self._reader, self._watch
        takeover_s = TAKEOVER_MS / 1000
        realtime_thread()
        try:
            while not self._captured_all.is_set():
                if self._inline:
                    seen = self._yields
                    if watch.wait(takeover_s) or not self._inline or self._yields != seen or reader.locked():
                        continue  # woken early, or the link is reading or has sent something since
                    self._inline = False  # inside gRPC for TAKEOVER_MS: flow control holds it; read here
                with reader:  # the frame is in the backlog before the link can read the next one
                    if self._inline or self._captured_all.is_set():
                        continue  # the link took the source back while this thread waited for it
                    item = self._read_or_end()
                    if item is None:
                        return
                    backlog.append(item)
                    if len(backlog) > self._max_backlog:
                        with contextlib.suppress(IndexError):  # unless the link has just sent them all
                            backlog.popleft()
                            st.dropped += 1
                    st.backlog = n = len(backlog)
                    if n > st.backlog_peak:
                        st.backlog_peak = n
        except BaseException as exc:  # surfaced by run() on the caller's thread
            if self._capture_error is None:
                self._capture_error = exc
        finally:
            self._captured_all.set()  # however this thread ends, the link sends what is left and ends
            watch.post()

    # ---- network side ---------------------------------------------------------------------------------
    def _messages(self, stream_id: int) -> Iterator[Outgoing]:
        """The items of the stream ``stream_id``. Once that stream has ended (``_stream_once`` moves the
        id on), gRPC may still call its iterator; it then ends without touching the source or backlog."""
        fmt, st, cfg = self.format, self.stats, self.config
        # Capture starts when the link starts pulling this iterator, i.e. once the call is open: audio
        # captured while connecting would reach the receiver as a burst of already-old packets.
        with self._capture_lock:  # run() may be ending on another thread (the stream refused at once)
            if self._stop.is_set() or stream_id != self._stream_id:
                return
            fresh = self._capture_thread is None
            realtime_thread()  # gRPC's thread for this stream reads the device (a thread per stream)
            if fresh:
                self.source.open()
                self._inline = True  # this thread reads from the first frame on
                t = threading.Thread(target=self._capture, name="tiality-capture", daemon=True)
                t.start()
                self._capture_thread = t
        if not fresh:
            # A new stream after an outage: what waited in the backlog is stale; start from the newest.
            while len(self._backlog) > 1:
                self._backlog.popleft()
                st.dropped += 1
        yield StreamInfo(
            format=fmt,
            algorithm_delay=self.encoder.lookahead,
            bitrate=cfg.codec.bitrate,
            fec=cfg.codec.inband_fec,
            dtx=cfg.codec.dtx,
            name=f"{cfg.name} {self.source.name}",
            first_sequence=self._backlog[0][0] if self._backlog else self._next_seq,
        )
        self._set_state("streaming")
        st.attempt = 0
        backlog, reader, captured_all = self._backlog, self._reader, self._captured_all
        while True:
            if stream_id != self._stream_id:
                return  # this stream has ended: what the backlog holds goes to the next one
            est = self._clock_pending
            if est is not None:
                self._clock_pending = None
                self._yields += 1
                yield est
            if backlog:  # what the capture thread read while this one could not: it goes first
                try:
                    item = backlog.popleft()
                except IndexError:  # the capture thread dropped it (backlog full) meanwhile
                    continue
            else:
                if captured_all.is_set():
                    return  # the end of the audio
                self._inline = True
                with reader:  # the capture thread may be finishing a read into the backlog
                    if backlog:
                        continue
                    read = self._read_or_end()
                if read is None:
                    continue  # sends what the backlog still holds, then ends
                item = read
            st.backlog = len(backlog)
            st.packets_sent += 1
            st.bytes_sent += len(item[2])
            self._yields += 1
            yield item

    def run(self) -> SendResult:
        """Streams until the source ends (or ``seconds``, or ``stop()``); returns the totals.

        While the receiver is down or the link is broken, capture carries on and the stream is re-opened
        with capped, jittered backoff (unless ``reconnect`` is off). A wrong token or a refused format
        is final: retrying would not change the answer.
        """
        st = self.stats
        delay = BACKOFF_FIRST_S
        try:
            while True:
                try:
                    summary = self._stream_once()
                    break
                except (AuthError, RejectedError) as exc:
                    st.attempt += 1
                    st.last_error = str(exc)
                    self._set_state("failed", str(exc))
                    raise
                except ConnectError as exc:
                    if self._stop.is_set():
                        summary = StreamTotals()  # stopped while connecting (or cut off): end quietly
                        break
                    st.attempt += 1
                    st.last_error = str(exc)
                    if not self.config.reconnect or self._stop.is_set() or self._captured_all.is_set():
                        self._set_state("failed", str(exc))
                        raise
                    self._set_state("reconnecting", str(exc))
                    if self._stop.wait(delay * random.uniform(0.8, 1.2)):
                        summary = StreamTotals()  # stopped while waiting to reconnect: end quietly
                        break
                    delay = min(BACKOFF_MAX_S, delay * 2)
                    st.reconnects += 1
            if self._capture_error is not None:
                self._set_state("failed", str(self._capture_error))
                raise self._capture_error
            self._set_state("done")
            return SendResult(
                packets_sent=st.packets_sent,
                bytes_sent=st.bytes_sent,
                dropped=st.dropped,
                frames_captured=st.frames_captured,
                receiver_packets=summary.packets,
                receiver_lost=summary.lost,
                receiver_concealed=summary.concealed,
                receiver_frames_played=summary.frames_played,
                reconnects=st.reconnects,
            )
        finally:
            self.stop()
            with self._capture_lock:  # no capture thread starts after this
                capture = self._capture_thread
            if capture is not None:
                capture.join(timeout=2.0)
            self._close_source()

    def _stream_once(self) -> StreamTotals:
        """One connection and one stream; raises a TialityError when either fails."""
        st = self.stats
        if self._stop.is_set():
            raise ConnectError("stopped")
        link = self._link = self._connect()
        done = threading.Event()
        clock_thread = None
        try:
            if self._stop.is_set():
                raise ConnectError("stopped")
            if st.state == "starting":
                self._set_state("connecting")  # later attempts stay "reconnecting", with the last reason
            link.wait_ready(self.config.connect_timeout_s)
            if self.config.clock_sync:
                # Two exchanges before the first packet (an offset good to a round trip, so that even
                # clocks seconds apart give sane latencies from the start); the clock thread refines it
                # with more once the stream is open, which gets the first packet out sooner.
                self._probe_clock(link, 2)
                clock_thread = threading.Thread(
                    target=self._clock_loop, args=(link, done), name="tiality-clock", daemon=True
                )
                clock_thread.start()
            if self._stop.is_set():
                raise ConnectError("stopped")
            self._streaming = True
            return link.stream(self._messages(self._stream_id))
        finally:
            self._streaming = False
            self._stream_id += 1  # its request iterator takes nothing more (gRPC may call it again)
            self._inline = False  # the capture thread reads until the next stream opens
            self._watch.post()
            done.set()
            link.close()
            self._link = None
            if clock_thread is not None:
                clock_thread.join()

    def _probe_clock(self, link: Link, exchanges: int) -> None:
        """A few NTP-style exchanges; the best one becomes the estimate sent in-band."""
        for _ in range(exchanges):
            s = link.probe_clock(self.clock.wall_ns)
            if s is None:
                return  # an older receiver, or a hiccup: latency then assumes synchronised clocks
            self.clock_filter.add(s)
        best = self.clock_filter.best()
        if best is not None:  # sent before the next packet (within a frame)
            self._clock_pending = ClockEstimate(best.offset_ns, best.round_trip_ns, self.clock_filter.count)

    def _clock_loop(self, link: Link, done: threading.Event) -> None:
        if not done.wait(0.05) and not self._stop.is_set():  # the stream has opened meanwhile
            self._probe_clock(link, 6)
        while not done.wait(self.config.clock_sync_every_s) and not self._stop.is_set():
            self._probe_clock(link, 4)
