"""The sender: capture -> Opus -> a bounded backlog -> one gRPC client stream.

Usable from the robot's own code without the CLI::

    src = open_source("alsa://hw:1,0", AudioFormat())
    result = Sender(src, SenderConfig(endpoint=parse_endpoint("gui-host:50052"))).run()

Two threads: the capture thread reads the source (the sound card's clock paces it), encodes each frame
and appends it to the backlog; gRPC's request thread takes packets from the backlog and writes them.
When the network blocks, capture carries on and the oldest packets are dropped once the backlog exceeds
``max_backlog_ms`` (counted): audio never piles up into latency.
"""

from __future__ import annotations

import random
import socket
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import numpy as np

from tiality_cli._proto import tiality_pb2 as pb
from tiality_cli._proto import tiality_pb2_grpc as pb_grpc
from tiality_cli.clock import SYSTEM_CLOCK, Clock
from tiality_cli.clocksync import ClockFilter, ClockSample, sample
from tiality_cli.codec import OpusEncoder
from tiality_cli.config import CodecConfig, Endpoint
from tiality_cli.errors import AuthError, ConnectError, RejectedError
from tiality_cli.sources import Source
from tiality_cli.stats import dbfs
from tiality_cli.transport import (
    PROTOCOL_VERSION,
    ClientSecurity,
    map_rpc_error,
    open_channel,
    stream_stub,
)

BACKOFF_FIRST_S = 0.1  # first retry after an outage
BACKOFF_MAX_S = 0.5  # cap: a returning receiver gets audio again within about half a second


@dataclass(frozen=True, slots=True)
class SenderConfig:
    endpoint: Endpoint
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

    @property
    def level_dbfs(self) -> float:
        return dbfs(self.rms)

    @property
    def peak_dbfs(self) -> float:
        return dbfs(float(self.peak))


class Sender:
    """Streams one source to one receiver; ``run()`` blocks until the stream ends."""

    def __init__(self, source: Source, config: SenderConfig, clock: Clock = SYSTEM_CLOCK) -> None:
        self.source = source
        self.config = config
        self.clock = clock
        self.format = source.format
        self.encoder = OpusEncoder(self.format, config.codec)
        self.stats = SenderStats()
        self._backlog: deque[tuple[int, int, bytes]] = deque()
        self._max_backlog = max(1, int(config.max_backlog_ms * 1000 // self.format.frame_us))
        self._ready = threading.Event()
        self._captured_all = threading.Event()
        self._stop = threading.Event()
        self._capture_error: BaseException | None = None
        self._capture_thread: threading.Thread | None = None
        self.clock_filter = ClockFilter()
        self._clock_pending: ClockSample | None = None

    def stop(self) -> None:
        """Ends the stream cleanly: what is captured so far is sent, then the stream closes."""
        self._stop.set()
        self.source.close()
        self._ready.set()

    # ---- capture thread -------------------------------------------------------------------------------
    def _capture(self) -> None:
        fmt, enc, st = self.format, self.encoder, self.stats
        limit = None if self.config.seconds is None else round(self.config.seconds * 1e6 / fmt.frame_us)
        seq = 0
        buf = enc.input
        flat = np.zeros(buf.size, dtype=np.float32)  # for the level meter: int16 squares overflow
        try:
            while not self._stop.is_set() and (limit is None or seq < limit):
                t = self.source.read(buf)
                if t is None:
                    break
                st.peak = max(int(buf.max()), -int(buf.min()))
                np.copyto(flat, buf.reshape(-1))
                st.rms = float(np.sqrt(np.dot(flat, flat) / flat.size))
                payload = enc.encode()
                self._backlog.append((seq, t, payload))
                if len(self._backlog) > self._max_backlog:
                    self._backlog.popleft()
                    st.dropped += 1
                st.backlog = n = len(self._backlog)
                if n > st.backlog_peak:
                    st.backlog_peak = n
                seq += 1
                st.frames_captured = seq
                self._ready.set()
        except BaseException as exc:  # surfaced by run() on the caller's thread
            self._capture_error = exc
        finally:
            self._captured_all.set()
            self._ready.set()

    # ---- network side ---------------------------------------------------------------------------------
    def _messages(self) -> Iterator[pb.StreamMessage]:
        fmt, st, cfg = self.format, self.stats, self.config
        # Capture starts when gRPC starts pulling this iterator, i.e. once the call is open: audio
        # captured while connecting would reach the receiver as a burst of already-old packets.
        if self._capture_thread is None:
            self.source.open()
            self._capture_thread = threading.Thread(target=self._capture, name="tiality-capture", daemon=True)
            self._capture_thread.start()
        else:
            # A new stream after an outage: what waited in the backlog is stale; start from the newest.
            while len(self._backlog) > 1:
                self._backlog.popleft()
                st.dropped += 1
        yield pb.StreamMessage(
            format=pb.StreamFormat(
                protocol_version=PROTOCOL_VERSION,
                codec=pb.CODEC_OPUS,
                sample_rate=fmt.sample_rate,
                channels=fmt.channels,
                frame_duration_us=fmt.frame_us,
                algorithm_delay_samples=self.encoder.lookahead,
                bitrate_bps=cfg.codec.bitrate,
                inband_fec=cfg.codec.inband_fec,
                dtx=cfg.codec.dtx,
                sender_name=f"{cfg.name} {self.source.name}"[:200],
                first_sequence=self._backlog[0][0] & 0xFFFFFFFF
                if self._backlog
                else self.stats.frames_captured,
            )
        )
        st.state = "streaming"
        backlog, ready = self._backlog, self._ready
        while True:
            est = self._clock_pending
            if est is not None:
                self._clock_pending = None
                yield pb.StreamMessage(
                    clock=pb.ClockEstimate(
                        offset_ns=est.offset_ns,
                        round_trip_ns=est.round_trip_ns,
                        samples=self.clock_filter.count,
                    )
                )
            try:
                seq, t, payload = backlog.popleft()
            except IndexError:
                if self._captured_all.is_set():
                    return
                ready.wait(0.5)
                ready.clear()
                continue
            st.backlog = len(backlog)
            st.packets_sent += 1
            st.bytes_sent += len(payload)
            yield pb.StreamMessage(
                packet=pb.AudioPacket(sequence=seq & 0xFFFFFFFF, capture_time_ns=t, payload=payload)
            )

    def run(self) -> SendResult:
        """Streams until the source ends (or ``seconds``, or ``stop()``); returns the totals.

        While the receiver is down or the link is broken, capture carries on and the stream is re-opened
        with capped, jittered backoff (unless ``reconnect`` is off). A wrong token or a refused format
        is final: retrying would not change the answer.
        """
        target = self.config.endpoint.target
        st = self.stats
        delay = BACKOFF_FIRST_S
        try:
            while True:
                try:
                    summary = self._stream_once(target)
                    break
                except (AuthError, RejectedError):
                    st.state = "failed"
                    raise
                except ConnectError as exc:
                    if not self.config.reconnect or self._stop.is_set() or self._captured_all.is_set():
                        st.state = "failed"
                        raise
                    st.state = "reconnecting"
                    st.last_error = str(exc)
                    if self._stop.wait(delay * random.uniform(0.8, 1.2)):
                        raise
                    delay = min(BACKOFF_MAX_S, delay * 2)
                    st.reconnects += 1
            if self._capture_error is not None:
                raise self._capture_error
            st.state = "done"
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
            if self._capture_thread is not None:
                self._capture_thread.join(timeout=2.0)
            self.source.close()

    def _stream_once(self, target: str) -> pb.StreamSummary:
        """One connection and one stream; raises a TialityError when either fails."""
        st = self.stats
        channel = open_channel(self.config.endpoint, self.config.security)
        metadata = self.config.security.metadata()
        try:
            st.state = "connecting"
            self._wait_ready(channel, target)
            stub = stream_stub(channel)
            if self.config.clock_sync:
                self._probe_clock(stub, 8, metadata)
                sync = threading.Thread(
                    target=self._clock_loop, args=(stub, metadata), name="tiality-clock", daemon=True
                )
                sync.start()
            try:
                summary: pb.StreamSummary = stub.Stream(
                    self._messages(), metadata=metadata, wait_for_ready=False
                )
            except grpc.RpcError as err:
                raise map_rpc_error(err, target) from None
            return summary
        finally:
            channel.close()

    def _probe_clock(
        self, stub: pb_grpc.AudioStreamStub, exchanges: int, metadata: tuple[tuple[str, str], ...]
    ) -> None:
        """A few NTP-style exchanges; the best one becomes the estimate sent in-band."""
        wall = self.clock.wall_ns
        for _ in range(exchanges):
            t0 = wall()
            try:
                reply = stub.Clock(pb.ClockProbe(sender_send_ns=t0), timeout=2.0, metadata=metadata)
            except grpc.RpcError:
                return  # an older receiver, or a hiccup: latency then assumes synchronised clocks
            self.clock_filter.add(sample(t0, reply.receiver_receive_ns, reply.receiver_send_ns, wall()))
        self._clock_pending = self.clock_filter.best()
        self._ready.set()

    def _clock_loop(self, stub: pb_grpc.AudioStreamStub, metadata: tuple[tuple[str, str], ...]) -> None:
        while not self._stop.wait(self.config.clock_sync_every_s):
            try:
                self._probe_clock(stub, 4, metadata)
            except ValueError:  # the channel was closed under us (a reconnect): this loop is done
                return

    def _wait_ready(self, channel: grpc.Channel, target: str) -> None:
        """Returns once connected; fails fast (refused, unknown host) or after ``connect_timeout_s``."""
        settled = threading.Event()
        last: list[grpc.ChannelConnectivity] = []

        def watch(state: grpc.ChannelConnectivity) -> None:
            last.append(state)
            if state in (grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.TRANSIENT_FAILURE):
                settled.set()

        channel.subscribe(watch, try_to_connect=True)
        try:
            settled.wait(self.config.connect_timeout_s)
        finally:
            channel.unsubscribe(watch)
        if last and last[-1] == grpc.ChannelConnectivity.READY:
            return
        if settled.is_set():  # TRANSIENT_FAILURE: a short RPC tells why, in gRPC's words
            try:
                stream_stub(channel).Stream(iter(()), timeout=2.0, wait_for_ready=False)
            except grpc.RpcError as err:
                raise map_rpc_error(err, target) from None
        raise ConnectError(f"cannot reach {target}: no answer within {self.config.connect_timeout_s:g} s")
