"""The receiver's gRPC server: the AudioStream service, health and reflection, over an Acceptor.

Standard tools can probe a receiver: ``grpc_health_probe -addr=HOST:50052`` or
``grpcurl -plaintext HOST:50052 list``. The servicer is thin: it turns messages into calls on the
receiver's StreamHandler (tiality_cli.link) and the handler's refusals into status codes.

A receiver's own server (AudioServer) is a ``grpc.aio`` server: every stream is a coroutine on one
event-loop thread, so 64 senders cost one thread taking the GIL, not 64 workers and a poller waking for
each packet (issue 11: those took a third of a core and left the sink's thread queueing for the GIL).
``add_audio_service`` adds the same service to an application's synchronous ``grpc.Server`` instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any, NoReturn

import grpc
from google.protobuf.message import DecodeError

from tiality_cli.config import ServerSecurity
from tiality_cli.errors import AddressInUseError, BusyError, ConfigError, RejectedError
from tiality_cli.link import Acceptor, StreamHandler
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
REFUSAL_HEADROOM = 64  # calls beyond max_streams that the receiver itself answers (refusals, probes)

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
UNDECODABLE = "Exception deserializing request!"  # what a synchronous server answers to such a message


Refusal = tuple[grpc.StatusCode, str]  # how a call is refused: its status and the one-line reason


class _Service:
    """What both servicers keep (the receiver they serve, the calls open, whether it stopped) and decide
    (whether a call may go on, which handler takes a stream); they differ only in how they read."""

    def __init__(
        self, accept: Acceptor, wall_ns: WallClock, token: TokenCheck, on_refused: RefusalHook | None
    ) -> None:
        self._accept = accept
        self._wall_ns = wall_ns
        self._token = token
        self._on_refused = on_refused
        self._lock = threading.Lock()
        # Open Stream calls (a context or a task) -> still receiving (close() cancels those; the others are
        # answering already).
        self._calls: dict[Any, bool] = {}
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

    def _admission(self, context: Any) -> tuple[Refusal | None, bool]:
        """Why a call may not go on (stopped, or the token), and whether to tell the receiver of it."""
        if self.closed:
            return (grpc.StatusCode.UNAVAILABLE, STOPPED), False
        refusal = self._token.refusal(context)
        return (None if refusal is None else (grpc.StatusCode.UNAUTHENTICATED, refusal)), True

    def _open(self, peer: str, first: pb.StreamMessage) -> StreamHandler | Refusal:
        """The receiver's handler for a stream that starts with ``first``, or the status refusing it."""
        if first.WhichOneof("body") != "format":
            return grpc.StatusCode.INVALID_ARGUMENT, "the first message must be the stream format"
        try:
            return self._accept(peer, info_from_pb(first.format))
        except BusyError as exc:
            return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
        except (ConfigError, RejectedError) as exc:
            return grpc.StatusCode.INVALID_ARGUMENT, str(exc)

    def _cancel(self, call: Any) -> None:
        """Ends a call that is still receiving (its handler then returns)."""
        raise NotImplementedError

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
                    self._cancel(call)
            while self._calls:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True


def _deliver(msg: pb.StreamMessage, handler: StreamHandler) -> None:
    """One message after the format, to the stream's handler (every 20 ms: a packet)."""
    kind = msg.WhichOneof("body")
    if kind == "packet":
        p = msg.packet
        handler.packet(p.sequence, p.capture_time_ns, p.payload, p.capture_delay_us * 1000)
    elif kind == "clock":
        handler.clock(estimate_from_pb(msg.clock))


class _Servicer(_Service, pb_grpc.AudioStreamServicer):
    """The AudioStream service on a synchronous server (``add_audio_service``): a thread per call."""

    def _check(self, context: grpc.ServicerContext, report: bool = True) -> None:
        refusal, tell = self._admission(context)
        if refusal is not None:
            if tell and report:  # not for a clock probe: the stream that follows it is the refusal to report
                self._refuse(context, *refusal)
            context.abort(*refusal)

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
        handler = self._open(context.peer(), first)
        if isinstance(handler, tuple):
            self._refuse(context, *handler)
        evicted: str | None = None
        try:
            while True:
                try:
                    msg = next(request_iterator)
                except StopIteration:
                    break
                except Exception:  # the sender vanished mid-stream (cancelled, reset): play what arrived
                    break
                evicted = getattr(handler, "evicted", None)
                if evicted is not None:  # the receiver ended it to keep up with the others
                    break
                _deliver(msg, handler)
        finally:
            with self._lock:
                self._calls[context] = False  # the sender is done: let its answer go out
            totals = handler.close()
        if evicted is not None:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, evicted)
        return totals_to_pb(totals)

    def _cancel(self, call: Any) -> None:
        call.cancel()  # the call's context (grpc.RpcContext.cancel)


class _AioServicer(_Service, pb_grpc.AudioStreamServicer):
    """The AudioStream service as coroutines on the server's event loop (AudioServer).

    Each packet is handed to its stream's handler as it is read (a queue append: nothing blocks the
    loop); only a stream's end, which waits for its audio to play out, runs on an executor thread.
    """

    loop: asyncio.AbstractEventLoop | None = None  # set by AudioServer: where close() cancels the calls

    async def _refuse(
        self, context: grpc.aio.ServicerContext[Any, Any], code: grpc.StatusCode, reason: str
    ) -> NoReturn:
        if self._on_refused is not None:
            self._on_refused(context.peer(), reason)
        await context.abort(code, reason)
        raise AssertionError("unreachable")  # pragma: no cover - abort raises

    async def Clock(
        self, request: pb.ClockProbe, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ClockReply:
        t1 = self._wall_ns()
        refusal, _ = self._admission(context)
        if refusal is not None:  # a clock probe: the stream that follows it is the refusal worth reporting
            await context.abort(*refusal)
        return pb.ClockReply(
            sender_send_ns=request.sender_send_ns, receiver_receive_ns=t1, receiver_send_ns=self._wall_ns()
        )

    async def Stream(
        self, request_iterator: object, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.StreamSummary:
        refusal, tell = self._admission(context)
        if refusal is not None:
            if tell:
                await self._refuse(context, *refusal)
            await context.abort(*refusal)
        task = asyncio.current_task()
        assert task is not None
        with self._lock:
            if self.closed:
                await context.abort(grpc.StatusCode.UNAVAILABLE, STOPPED)
            self._calls[task] = True
        try:
            return await self._stream(context, task)
        finally:
            with self._lock:
                self._calls.pop(task, None)
                self._idle.notify_all()

    async def _stream(
        self, context: grpc.aio.ServicerContext[Any, Any], task: asyncio.Task[Any]
    ) -> pb.StreamSummary:
        eof = grpc.aio.EOF  # type: ignore[attr-defined]  # (the stubs predate it)
        try:
            first = await context.read()
        except asyncio.CancelledError:  # close(): the receiver is stopping
            await context.abort(grpc.StatusCode.CANCELLED, STOPPED)
        except DecodeError:
            await context.abort(grpc.StatusCode.INTERNAL, UNDECODABLE)
        except Exception:  # the sender gone before it said anything
            return pb.StreamSummary()
        if first is eof:
            return pb.StreamSummary()
        assert isinstance(first, pb.StreamMessage)
        handler = self._open(context.peer(), first)
        if isinstance(handler, tuple):
            await self._refuse(context, *handler)
        ended: tuple[grpc.StatusCode, str] | None = None  # how the call ends, if not with the totals
        while True:
            try:
                msg = await context.read()
            except asyncio.CancelledError:  # close(): the receiver is stopping
                ended = (grpc.StatusCode.CANCELLED, STOPPED)
                break
            except DecodeError:  # not a message: what came before it plays, the call fails
                ended = (grpc.StatusCode.INTERNAL, UNDECODABLE)
                break
            except Exception:  # the sender vanished mid-stream (reset): play what arrived
                break
            if msg is eof:
                break
            assert isinstance(msg, pb.StreamMessage)
            evicted = getattr(handler, "evicted", None)
            if evicted is not None:  # the receiver ended it to keep up with the others
                ended = (grpc.StatusCode.RESOURCE_EXHAUSTED, evicted)
                break
            _deliver(msg, handler)
        with self._lock:
            self._calls[task] = False  # the sender is done: let its answer go out
        # close() waits for the stream's audio to play out, which must not block the loop. The receiver's
        # Session says when it has played (end()): no thread per ending stream, where 64 senders ending
        # together would start 64 threads while the others' last packets arrive. Another handler's
        # close() runs on an executor thread. When the receiver stops, it has released its streams
        # already, and the call ends as cancelled (as a synchronous server's cancel() ends it) rather
        # than waiting for the server's grace period.
        # Shielded: a sender that vanished has its call cancelled by gRPC about now, and a cancelled
        # executor future that has not started never runs: the stream would play on (concealing) for good
        # (end() has queued the end before any wait, so the Session finishes either way).
        loop = asyncio.get_running_loop()
        end = getattr(handler, "end", None)
        played: asyncio.Future[None] = loop.create_future()
        if end is not None:
            end(lambda: _resolve_threadsafe(loop, played))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(played), getattr(handler, "drain_s", 2.2))
        if played.done():
            totals = handler.close()  # at once: its audio has played
        else:
            totals = await asyncio.shield(loop.run_in_executor(None, handler.close))
        if ended is not None:
            await context.abort(*ended)
        return totals_to_pb(totals)

    def _cancel(self, call: asyncio.Task[Any]) -> None:
        loop = self.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(call.cancel)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _resolve_threadsafe(loop: asyncio.AbstractEventLoop, future: asyncio.Future[None]) -> None:
    """Resolves ``future`` from any thread (the mixer's); nothing once the loop has closed."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(_resolve, future)


class AudioService:
    """The AudioStream service added to a gRPC server; ``close()`` takes it out of service.

    A gRPC server cannot remove a service, so on a shared server (the operator GUI's own, which also
    carries its video) a closed service stays registered and answers UNAVAILABLE until another receiver
    is added to the server: that one takes it over.
    """

    def __init__(self, servicer: _Service, generation: int) -> None:
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
    """A started gRPC server carrying the audio service, health (SERVING while audio plays) and reflection.

    A ``grpc.aio`` server on an event loop of its own (thread ``tiality-grpc``); the methods here may be
    called from any thread.
    """

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
        sec = (security or ServerSecurity()).validate()
        self._servicer = _AioServicer(accept, wall_ns, TokenCheck(sec.token), on_refused)
        self.service = AudioService(self._servicer, 0)
        self._loop = asyncio.new_event_loop()
        self._servicer.loop = self._loop
        # A stream's end waits for its audio to play out (seconds): a pool for those, one per stream.
        self._pool = futures.ThreadPoolExecutor(max_workers=max_streams + 4, thread_name_prefix="tiality-rpc")
        self._loop.set_default_executor(self._pool)
        self._thread = threading.Thread(target=self._loop.run_forever, name="tiality-grpc", daemon=True)
        self._thread.start()
        self._server: grpc.aio.Server | None = None
        try:
            self.port = self._call(self._start(host, port, max_streams, sec))
        except BaseException:
            self._shutdown_loop(3.0)
            raise

    def _call(self, coro: Any, timeout_s: float | None = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    async def _start(self, host: str, port: int, max_streams: int, sec: ServerSecurity) -> int:
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc
        from grpc_reflection.v1alpha import reflection

        # The cap only bounds a flood. Its headroom lets a burst of senders beyond max_streams reach the
        # receiver's own refusal ("receiver busy: ... --max-senders"), which ends each call at once,
        # instead of gRPC's "Concurrent RPC limit exceeded!".
        server = grpc.aio.server(
            options=SERVER_OPTIONS, maximum_concurrent_rpcs=max_streams + REFUSAL_HEADROOM
        )
        pb_grpc.add_AudioStreamServicer_to_server(self._servicer, server)
        self._serving = health_pb2.HealthCheckResponse.SERVING
        self._not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        self._health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        await self._set_serving(False)
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
            await server.stop(None)
            if port:
                raise AddressInUseError(
                    f"cannot listen on {address}: port {port} is already in use (another tiality recv?); "
                    "pick another with --port"
                )
            raise ConfigError(f"cannot listen on {address}: no such local address")
        await server.start()
        self._server = server
        return int(bound)

    async def _set_serving(self, serving: bool) -> None:
        for name in ("", SERVICE_NAME):
            await self._health.set(name, self._serving if serving else self._not_serving)

    def set_serving(self, serving: bool) -> None:
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._set_serving(serving), self._loop)

    def stop(self, grace_s: float = 0.5, timeout_s: float = 3.0) -> None:
        """Stops accepting, lets streams end for ``grace_s``, and never waits beyond ``timeout_s``.

        Then ends the event loop and joins its thread and the workers, so that a stopped receiver leaves
        no thread behind.
        """
        if self._server is None:
            return
        deadline = time.monotonic() + timeout_s
        with contextlib.suppress(Exception):  # the loop is gone already
            self._call(self._health.enter_graceful_shutdown(), timeout_s)
        self.service.close(timeout_s)
        server, self._server = self._server, None
        # A handler stuck on a broken peer must not hang shutdown: wait a bounded time, then go.
        with contextlib.suppress(Exception):
            self._call(server.stop(grace_s), max(0.1, deadline - time.monotonic()))
        self._shutdown_loop(max(0.1, deadline - time.monotonic()))

    def _shutdown_loop(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout_s)
        if not self._thread.is_alive() and not self._loop.is_closed():
            self._loop.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        for t in list(self._pool._threads):
            t.join(max(0.0, deadline - time.monotonic()))
