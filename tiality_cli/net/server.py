"""The receiver's gRPC server: the AudioStream service, health and reflection, over an Acceptor.

Standard tools can probe a receiver: ``grpc_health_probe -addr=HOST:50052`` or
``grpcurl -plaintext HOST:50052 list``. The servicer is thin: it turns messages into calls on the
receiver's StreamHandler (tiality_cli.link) and the handler's refusals into status codes.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any, NoReturn

import grpc

from tiality_cli.config import ServerSecurity
from tiality_cli.errors import AddressInUseError, BusyError, ConfigError, RejectedError
from tiality_cli.link import Acceptor
from tiality_cli.net._proto import tiality_pb2 as pb
from tiality_cli.net._proto import tiality_pb2_grpc as pb_grpc
from tiality_cli.net.security import TokenCheck, server_credentials
from tiality_cli.net.wire import (
    MAX_MESSAGE_BYTES,
    SERVICE_NAME,
    estimate_from_pb,
    info_from_pb,
    totals_to_pb,
)

FLOW_WINDOW_BYTES = 4096  # ~0.5 s at 64 kbit/s; still ~20x the bandwidth-delay product of Wi-Fi

SERVER_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.so_reuseport", 0),  # otherwise a second receiver silently shares the port
    # Flow control: a small fixed window, so that a stalled link blocks the sender after ~0.5 s of
    # audio instead of letting seconds pile up in HTTP/2 and TCP buffers. The sender's own backlog
    # (--max-backlog) then decides what to drop, and no stale audio is in flight when the link recovers.
    ("grpc.http2.lookahead_bytes", FLOW_WINDOW_BYTES),
    ("grpc.http2.bdp_probe", 0),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.keepalive_permit_without_calls", 1),
]

WallClock = Callable[[], int]
# The servicer each gRPC server carries (a server cannot drop a service, so a later receiver reuses it).
_SERVED: weakref.WeakKeyDictionary[grpc.Server, _Servicer] = weakref.WeakKeyDictionary()
_SERVED_LOCK = threading.Lock()
RefusalHook = Callable[[str, str], None]  # (peer, reason): a stream refused before it reached the acceptor
STOPPED = "the receiver has stopped"


class _Servicer(pb_grpc.AudioStreamServicer):
    def __init__(
        self, accept: Acceptor, wall_ns: WallClock, token: TokenCheck, on_refused: RefusalHook | None
    ) -> None:
        self._accept = accept
        self._wall_ns = wall_ns
        self._token = token
        self._on_refused = on_refused
        self._lock = threading.Lock()
        # Open Stream calls -> still receiving (close() cancels those; the others are answering already).
        self._calls: dict[grpc.ServicerContext, bool] = {}
        self._idle = threading.Condition(self._lock)
        self.closed = False
        self.generation = 0  # bumped by reopen(): a handle from before cannot close the new service

    def reopen(
        self, accept: Acceptor, wall_ns: WallClock, token: TokenCheck, on_refused: RefusalHook | None
    ) -> int | None:
        """Serves a new receiver on a server that keeps this servicer; None while the old one still runs."""
        with self._lock:
            if not self.closed:
                return None
            self._accept, self._wall_ns, self._token, self._on_refused = accept, wall_ns, token, on_refused
            self.generation += 1
            self.closed = False
            return self.generation

    def _check(self, context: grpc.ServicerContext, report: bool = True) -> None:
        if self.closed:
            context.abort(grpc.StatusCode.UNAVAILABLE, STOPPED)
        refusal = self._token.refusal(context)
        if refusal is not None:
            if not report:  # a clock probe: the stream that follows it is the refusal worth reporting
                context.abort(grpc.StatusCode.UNAUTHENTICATED, refusal)
            self._refuse(context, grpc.StatusCode.UNAUTHENTICATED, refusal)

    def _refuse(self, context: grpc.ServicerContext, code: grpc.StatusCode, reason: str) -> NoReturn:
        """Tells the receiver (``on_refused``), then the sender (the status), why its call is refused."""
        if self._on_refused is not None:
            self._on_refused(context.peer(), reason)
        context.abort(code, reason)

    def Clock(self, request: pb.ClockProbe, context: grpc.ServicerContext) -> pb.ClockReply:
        t1 = self._wall_ns()
        self._check(context, report=False)
        return pb.ClockReply(
            sender_send_ns=request.sender_send_ns, receiver_receive_ns=t1, receiver_send_ns=self._wall_ns()
        )

    def Stream(
        self, request_iterator: Iterator[pb.StreamMessage], context: grpc.ServicerContext
    ) -> pb.StreamSummary:
        self._check(context)
        with self._lock:
            if self.closed:
                context.abort(grpc.StatusCode.UNAVAILABLE, STOPPED)
            self._calls[context] = True
        try:
            return self._stream(request_iterator, context)
        finally:
            with self._lock:
                self._calls.pop(context, None)
                self._idle.notify_all()

    def _stream(
        self, request_iterator: Iterator[pb.StreamMessage], context: grpc.ServicerContext
    ) -> pb.StreamSummary:
        try:
            first = next(request_iterator)
        except StopIteration:
            return pb.StreamSummary()
        except Exception:  # cancelled before it said anything (the receiver stopping, the sender gone)
            return pb.StreamSummary()
        if first.WhichOneof("body") != "format":
            self._refuse(
                context, grpc.StatusCode.INVALID_ARGUMENT, "the first message must be the stream format"
            )
        try:
            handler = self._accept(context.peer(), info_from_pb(first.format))
        except BusyError as exc:
            self._refuse(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except (ConfigError, RejectedError) as exc:
            self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        packet, clock = handler.packet, handler.clock
        try:
            while True:
                try:
                    msg = next(request_iterator)
                except StopIteration:
                    break
                except Exception:  # the sender vanished mid-stream (cancelled, reset): play what arrived
                    break
                kind = msg.WhichOneof("body")
                if kind == "packet":
                    p = msg.packet
                    packet(p.sequence, p.capture_time_ns, p.payload, p.capture_delay_us * 1000)
                elif kind == "clock":
                    clock(estimate_from_pb(msg.clock))
        finally:
            with self._lock:
                self._calls[context] = False  # the sender is done: let its answer go out
            totals = handler.close()
        return totals_to_pb(totals)

    def close(self, timeout_s: float, generation: int) -> bool:
        """Refuses new calls, cancels the streams still receiving and waits for every handler to return
        (bounded): a stream whose sender has finished gets its answer first."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            if generation != self.generation:
                return True  # that service was closed, and the servicer reopened for another receiver
            self.closed = True
            for call, receiving in self._calls.items():
                if receiving:
                    call.cancel()  # type: ignore[no-untyped-call]
            while self._calls:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True


class AudioService:
    """The AudioStream service added to a gRPC server; ``close()`` takes it out of service.

    A gRPC server cannot remove a service, so on a shared server (the operator GUI's own, which also
    carries its video) a closed service stays registered and answers UNAVAILABLE until another receiver
    is added to the server: that one takes it over.
    """

    def __init__(self, servicer: _Servicer, generation: int) -> None:
        self._servicer = servicer
        self._generation = generation

    @property
    def streams(self) -> int:
        """Stream calls open right now."""
        with self._servicer._lock:
            return len(self._servicer._calls)

    def close(self, timeout_s: float = 3.0) -> bool:
        """Ends the open streams (their handlers return) and refuses new ones; False if one would not end."""
        return self._servicer.close(timeout_s, self._generation)


def add_audio_service(
    server: grpc.Server,
    accept: Acceptor,
    wall_ns: WallClock = time.time_ns,
    security: ServerSecurity | None = None,
    on_refused: RefusalHook | None = None,
) -> AudioService:
    """Adds the AudioStream service to ``server`` (started or not), with the bearer token check.

    Only the service: the server's ports, and so TLS, are its owner's, as are health and reflection.
    ``on_refused(peer, reason)`` hears of every call refused (token, format, busy), on the call's thread.
    A server carries one receiver at a time: once that one's service is closed, the next takes it over.
    """
    sec = (security or ServerSecurity()).validate()
    token = TokenCheck(sec.token)
    with _SERVED_LOCK:
        servicer = _SERVED.get(server)
        if servicer is None:
            servicer = _SERVED[server] = _Servicer(accept, wall_ns, token, on_refused)
            pb_grpc.add_AudioStreamServicer_to_server(servicer, server)
            return AudioService(servicer, servicer.generation)
        generation = servicer.reopen(accept, wall_ns, token, on_refused)
    if generation is None:
        raise ConfigError("this gRPC server already carries a receiver's audio: stop that receiver first")
    return AudioService(servicer, generation)


def bind_address(host: str, port: int) -> str:
    h = host.strip("[]")
    return f"[{h}]:{port}" if ":" in h else f"{h}:{port}"


class AudioServer:
    """A started gRPC server carrying the audio service, health (SERVING while audio plays) and reflection."""

    def __init__(
        self,
        accept: Acceptor,
        host: str,
        port: int,
        max_streams: int = 16,
        wall_ns: WallClock = time.time_ns,
        security: ServerSecurity | None = None,
        on_refused: RefusalHook | None = None,
    ) -> None:
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc
        from grpc_reflection.v1alpha import reflection

        sec = (security or ServerSecurity()).validate()
        self._pool = futures.ThreadPoolExecutor(max_workers=max_streams + 4, thread_name_prefix="tiality-rpc")
        server = grpc.server(self._pool, options=SERVER_OPTIONS, maximum_concurrent_rpcs=max_streams + 4)
        self.service = add_audio_service(server, accept, wall_ns, sec, on_refused)
        self._serving = health_pb2.HealthCheckResponse.SERVING
        self._not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        self._health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        self.set_serving(False)
        services = (SERVICE_NAME, "grpc.health.v1.Health", reflection.SERVICE_NAME)
        reflection.enable_server_reflection(services, server)
        address = bind_address(host, port)
        try:
            bound = (
                server.add_secure_port(address, server_credentials(sec))
                if sec.tls
                else server.add_insecure_port(address)
            )
        except RuntimeError:
            bound = 0
        if not bound:
            server.stop(None)
            self._pool.shutdown(wait=True)
            if port:
                raise AddressInUseError(
                    f"cannot listen on {address}: port {port} is already in use (another tiality recv?); "
                    "pick another with --port"
                )
            raise ConfigError(f"cannot listen on {address}: no such local address")
        server.start()
        self._server: grpc.Server | None = server
        self.port = bound

    def set_serving(self, serving: bool) -> None:
        for name in ("", SERVICE_NAME):
            self._health.set(name, self._serving if serving else self._not_serving)

    def stop(self, grace_s: float = 0.5, timeout_s: float = 3.0) -> None:
        """Stops accepting, lets streams end for ``grace_s``, and never waits beyond ``timeout_s``.

        Then joins the worker threads, so that a stopped receiver leaves none behind.
        """
        self._health.enter_graceful_shutdown()
        if self._server is not None:
            self.service.close(timeout_s)
            deadline = time.monotonic() + timeout_s
            # A handler stuck on a broken peer must not hang shutdown: wait a bounded time, then go.
            self._server.stop(grace=grace_s).wait(timeout=timeout_s)
            self._server = None
            self._pool.shutdown(wait=False, cancel_futures=True)
            for t in list(self._pool._threads):
                t.join(max(0.0, deadline - time.monotonic()))
