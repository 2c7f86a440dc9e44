"""The sender's gRPC client: one channel per connection attempt, and RpcError -> one-line TialityError."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from tiality_cli.clocksync import ClockSample, sample
from tiality_cli.config import ClientSecurity, Endpoint
from tiality_cli.errors import AuthError, ConnectError, RejectedError, TialityError
from tiality_cli.link import Outgoing, StreamTotals
from tiality_cli.net._proto import tiality_pb2 as pb
from tiality_cli.net._proto import tiality_pb2_grpc as pb_grpc
from tiality_cli.net.security import channel_credentials, token_metadata
from tiality_cli.net.wire import MAX_MESSAGE_BYTES, message, totals_from_pb

# Keepalive: a dead Wi-Fi link is noticed within ~15 s instead of the TCP default of hours.
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.enable_retries", 0),  # a live stream is never replayed
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 500),  # back within 1 s of the receiver's return
]


def open_channel(endpoint: Endpoint, security: ClientSecurity | None = None) -> grpc.Channel:
    sec = security or ClientSecurity()
    if not sec.tls:
        return grpc.insecure_channel(endpoint.target, options=CHANNEL_OPTIONS)
    options = list(CHANNEL_OPTIONS)
    if sec.server_name:
        options.append(("grpc.ssl_target_name_override", sec.server_name))
    return grpc.secure_channel(endpoint.target, channel_credentials(sec), options=options)


class GrpcLink:
    """A tiality_cli.link.Link over one gRPC channel (opened here, closed by close())."""

    def __init__(self, endpoint: Endpoint, security: ClientSecurity | None = None) -> None:
        sec = (security or ClientSecurity()).validate()
        self.target = endpoint.target
        self._channel = open_channel(endpoint, sec)
        self._stub = pb_grpc.AudioStreamStub(self._channel)
        self._metadata = token_metadata(sec)
        self._closed = False

    def wait_ready(self, timeout_s: float) -> None:
        """Returns once the receiver answers; fails fast (refused, unknown host, TLS) or after ``timeout_s``.

        One fail-fast call (a clock probe) rather than a connectivity subscription: it waits while the
        channel connects, fails at once when the connection does, and ``close()`` cancels it. A
        subscription's polling thread would outlive a channel closed under it (and fail there).
        """
        if self._closed:
            raise ConnectError(f"cannot reach {self.target}: stopped while connecting")
        try:
            self._stub.Clock(
                pb.ClockProbe(sender_send_ns=0),
                timeout=timeout_s,
                metadata=self._metadata,
                wait_for_ready=False,
            )
        except grpc.RpcError as err:
            code = err.code() if hasattr(err, "code") else None
            if code in _ANSWERED:
                return  # connected; the stream itself tells why it is refused, or the receiver is older
            if self._closed:
                raise ConnectError(f"cannot reach {self.target}: stopped while connecting") from None
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise ConnectError(f"cannot reach {self.target}: no answer within {timeout_s:g} s") from None
            raise map_rpc_error(err, self.target) from None
        except ValueError:  # closed under us
            raise ConnectError(f"cannot reach {self.target}: stopped while connecting") from None

    def probe_clock(self, wall_ns: Callable[[], int]) -> ClockSample | None:
        if self._closed:
            return None
        t0 = wall_ns()
        try:
            reply = self._stub.Clock(pb.ClockProbe(sender_send_ns=t0), timeout=2.0, metadata=self._metadata)
        except (grpc.RpcError, ValueError):  # an older receiver, a hiccup, or the channel closed under us
            return None
        return sample(t0, reply.receiver_receive_ns, reply.receiver_send_ns, wall_ns())

    def probe_clock_checked(self, wall_ns: Callable[[], int], timeout_s: float = 2.0) -> ClockSample:
        """One clock exchange that says why it failed: AuthError when the receiver refuses the token
        (``tiality doctor`` tells "wrong token" apart from "unreachable"), RejectedError when it has no
        Clock method (an older receiver), ConnectError otherwise."""
        t0 = wall_ns()
        try:
            reply = self._stub.Clock(
                pb.ClockProbe(sender_send_ns=t0), timeout=timeout_s, metadata=self._metadata
            )
        except grpc.RpcError as err:
            code = err.code() if hasattr(err, "code") else None
            details = (err.details() if hasattr(err, "details") else "") or ""
            if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                raise AuthError(f"{self.target} refused: {details or code.name.lower()}") from None
            raise map_rpc_error(err, self.target) from None
        return sample(t0, reply.receiver_receive_ns, reply.receiver_send_ns, wall_ns())

    def stream(self, items: Iterator[Outgoing]) -> StreamTotals:
        try:
            summary = self._stub.Stream(map(message, items), metadata=self._metadata, wait_for_ready=False)
        except grpc.RpcError as err:
            raise map_rpc_error(err, self.target) from None
        except ValueError:  # the channel was closed under us (a sender stopping)
            if not self._closed:
                raise
            raise ConnectError(f"stream to {self.target} closed") from None
        return totals_from_pb(summary)

    def check(self, timeout_s: float = 2.0) -> str:
        """The receiver's health (SERVING, NOT_SERVING...); raises ConnectError when unreachable."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        try:
            reply = health_pb2_grpc.HealthStub(self._channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s
            )
        except grpc.RpcError as err:
            raise map_rpc_error(err, self.target) from None
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

    def close(self) -> None:
        """Closes the channel: an open stream is cancelled and a wait_ready() in progress returns."""
        self._closed = True
        self._channel.close()


# A call that ends with one of these reached a receiver: the connection works.
_ANSWERED = (
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNIMPLEMENTED,
)

_REASONS = (
    (re.compile(r"connection refused", re.I), "connection refused (is `tiality recv` running there?)"),
    (re.compile(r"DNS resolution failed|name or service not known|resolv", re.I), "host name not found"),
    (re.compile(r"no route to host|network is unreachable", re.I), "no route to host"),
    (re.compile(r"deadline|timed out|timeout", re.I), "no answer (timed out)"),
    (
        re.compile(r"ssl|handshake|certificate|tls", re.I),
        "TLS handshake failed (check --tls-ca / certificates)",
    ),
    (re.compile(r"Socket closed|Connection reset|broken pipe|GOAWAY|EOF", re.I), "connection lost"),
)


def describe_unavailable(details: str) -> str:
    for pattern, text in _REASONS:
        if pattern.search(details):
            return text
    first = details.splitlines()[0] if details else "unavailable"
    return first[:160]


def map_rpc_error(err: grpc.RpcError, target: str) -> TialityError:
    """One clear line for what went wrong with a stream to ``target``."""
    code = err.code() if hasattr(err, "code") else None
    details = (err.details() if hasattr(err, "details") else "") or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        return ConnectError(f"cannot reach {target}: {describe_unavailable(details)}")
    if code == grpc.StatusCode.CANCELLED:
        return ConnectError(f"cannot reach {target}: connection lost (the stream was cancelled)")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ConnectError(f"cannot reach {target}: no answer (timed out)")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return AuthError(f"{target} refused the stream: {details or 'authentication required'}")
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return AuthError(f"{target} refused the stream: {details or 'permission denied'}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "Concurrent RPC limit" in details:
        # gRPC's own cap, hit by a flood of calls beyond what the receiver answers itself
        return RejectedError(
            f"{target} refused the stream: receiver busy: more senders at once than it takes"
        )
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and details.startswith("ended this stream"):
        return RejectedError(f"{target} {details}")  # mid-stream: the receiver shed it to keep up
    if code in (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.OUT_OF_RANGE,
    ):
        return RejectedError(f"{target} refused the stream: {details or code.name}")
    name = code.name if code is not None else "error"
    return ConnectError(f"stream to {target} failed: {name}: {details}".rstrip(": "))
