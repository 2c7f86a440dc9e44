"""gRPC only: channel and server options, the servicer shell, and RpcError -> TialityError mapping.

Everything else in tiality is transport-agnostic: the receiver hands this module a callback per stream,
the sender hands it an iterator of messages.
"""

from __future__ import annotations

import hmac
import re
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc

from tiality_cli._proto import tiality_pb2 as pb
from tiality_cli._proto import tiality_pb2_grpc as pb_grpc
from tiality_cli.config import Endpoint
from tiality_cli.errors import (
    AddressInUseError,
    AuthError,
    ConfigError,
    ConnectError,
    RejectedError,
    TialityError,
)

PROTOCOL_VERSION = 1
# A 60 ms stereo Opus packet at 510 kbit/s is under 4 kB; 64 KiB leaves room and bounds what a
# hostile peer can make the receiver allocate per message.
MAX_MESSAGE_BYTES = 64 * 1024
FLOW_WINDOW_BYTES = 4096  # ~0.5 s at 64 kbit/s; still ~20x the bandwidth-delay product of Wi-Fi

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

StreamHandler = Callable[[Iterator[pb.StreamMessage], grpc.ServicerContext], pb.StreamSummary]
WallClock = Callable[[], int]


class _Servicer(pb_grpc.AudioStreamServicer):
    def __init__(self, handler: StreamHandler, wall_ns: WallClock) -> None:
        self._handler = handler
        self._wall_ns = wall_ns

    def Clock(self, request: pb.ClockProbe, context: grpc.ServicerContext) -> pb.ClockReply:
        t1 = self._wall_ns()
        return pb.ClockReply(
            sender_send_ns=request.sender_send_ns, receiver_receive_ns=t1, receiver_send_ns=self._wall_ns()
        )

    def Stream(
        self, request_iterator: Iterator[pb.StreamMessage], context: grpc.ServicerContext
    ) -> pb.StreamSummary:
        return self._handler(request_iterator, context)


def bind_address(host: str, port: int) -> str:
    h = host.strip("[]")
    return f"[{h}]:{port}" if ":" in h else f"{h}:{port}"


SERVICE_NAME = pb.DESCRIPTOR.services_by_name["AudioStream"].full_name  # "tiality.v1.AudioStream"


class Health:
    """The standard gRPC health service (grpc.health.v1): SERVING while the audio output runs."""

    def __init__(self, server: grpc.Server) -> None:
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc

        self._serving = health_pb2.HealthCheckResponse.SERVING
        self._not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        self._servicer = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._servicer, server)
        self.set(False)

    def set(self, serving: bool) -> None:
        for name in ("", SERVICE_NAME):
            self._servicer.set(name, self._serving if serving else self._not_serving)

    def shutdown(self) -> None:
        self._servicer.enter_graceful_shutdown()


@dataclass(frozen=True, slots=True)
class ServerSecurity:
    """What the receiver demands: a shared token, TLS, and client certificates (mutual TLS)."""

    token: str | None = field(default=None, repr=False)
    cert_pem: bytes | None = field(default=None, repr=False)
    key_pem: bytes | None = field(default=None, repr=False)
    client_ca_pem: bytes | None = field(default=None, repr=False)

    @property
    def tls(self) -> bool:
        return self.cert_pem is not None


@dataclass(frozen=True, slots=True)
class ClientSecurity:
    """What the sender presents: the token, and TLS trust (CA) plus its own certificate for mutual TLS."""

    token: str | None = field(default=None, repr=False)
    tls: bool = False
    ca_pem: bytes | None = field(default=None, repr=False)  # None with tls: the system's roots
    cert_pem: bytes | None = field(default=None, repr=False)
    key_pem: bytes | None = field(default=None, repr=False)
    server_name: str | None = None  # the name to expect in the receiver's certificate

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()


class _TokenCheck(grpc.ServerInterceptor):  # type: ignore[type-arg]
    """Refuses AudioStream calls without the right bearer token; compared in constant time."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        if not details.method.startswith(f"/{SERVICE_NAME}/"):
            return continuation(details)  # health and reflection stay open to probes
        given = dict(details.invocation_metadata).get("authorization", "")
        if hmac.compare_digest(given.encode(), self._expected):
            return continuation(details)
        reason = "wrong token" if given else "a token is required (--token / TIALITY_TOKEN)"

        def deny(request: Any, context: grpc.ServicerContext) -> Any:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

        if details.method.endswith("/Stream"):
            return grpc.stream_unary_rpc_method_handler(deny)
        return grpc.unary_unary_rpc_method_handler(deny)


def start_server(
    handler: StreamHandler,
    host: str,
    port: int,
    max_streams: int = 16,
    wall_ns: WallClock = time.time_ns,
    security: ServerSecurity | None = None,
) -> tuple[grpc.Server, int, Health]:
    """Starts the receiver's gRPC server with health and reflection; returns it, its port and health.

    Standard tools can then probe a receiver: ``grpc_health_probe -addr=HOST:50052`` or
    ``grpcurl -plaintext HOST:50052 list``.
    """
    from grpc_reflection.v1alpha import reflection

    sec = security or ServerSecurity()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_streams + 4, thread_name_prefix="tiality-rpc"),
        interceptors=[_TokenCheck(sec.token)] if sec.token else None,
        options=SERVER_OPTIONS,
        maximum_concurrent_rpcs=max_streams + 4,
    )
    pb_grpc.add_AudioStreamServicer_to_server(_Servicer(handler, wall_ns), server)
    health = Health(server)
    services = (SERVICE_NAME, "grpc.health.v1.Health", reflection.SERVICE_NAME)
    reflection.enable_server_reflection(services, server)
    address = bind_address(host, port)
    try:
        if sec.tls:
            assert sec.cert_pem is not None and sec.key_pem is not None
            creds = grpc.ssl_server_credentials(
                [(sec.key_pem, sec.cert_pem)],
                root_certificates=sec.client_ca_pem,
                require_client_auth=sec.client_ca_pem is not None,
            )
            bound = server.add_secure_port(address, creds)
        else:
            bound = server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if not bound:
        server.stop(None)
        if port:
            raise AddressInUseError(
                f"cannot listen on {address}: port {port} is already in use (another tiality recv?); "
                "pick another with --port"
            )
        raise ConfigError(f"cannot listen on {address}: no such local address")
    server.start()
    return server, bound, health


def open_channel(endpoint: Endpoint, security: ClientSecurity | None = None) -> grpc.Channel:
    sec = security or ClientSecurity()
    if not sec.tls:
        return grpc.insecure_channel(endpoint.target, options=CHANNEL_OPTIONS)
    creds = grpc.ssl_channel_credentials(
        root_certificates=sec.ca_pem, private_key=sec.key_pem, certificate_chain=sec.cert_pem
    )
    options = list(CHANNEL_OPTIONS)
    if sec.server_name:
        options.append(("grpc.ssl_target_name_override", sec.server_name))
    return grpc.secure_channel(endpoint.target, creds, options=options)


def stream_stub(channel: grpc.Channel) -> pb_grpc.AudioStreamStub:
    return pb_grpc.AudioStreamStub(channel)


_TLS_FAILED = "TLS handshake failed (check --tls-ca and the certificates)"
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
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ConnectError(f"cannot reach {target}: no answer (timed out)")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return AuthError(f"{target} refused the stream: {details or 'authentication required'}")
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return AuthError(f"{target} refused the stream: {details or 'permission denied'}")
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
