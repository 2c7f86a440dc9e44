"""Authentication on the wire: the bearer token and TLS credentials (gRPC's side of config's security)."""

from __future__ import annotations

import hmac

import grpc

from tiality_cli.config import ClientSecurity, ServerSecurity

TOKEN_REQUIRED = "a token is required (--token / TIALITY_TOKEN)"


def token_metadata(sec: ClientSecurity) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries the sender's token (none without one)."""
    return (("authorization", f"Bearer {sec.token}"),) if sec.token else ()


class TokenCheck:
    """Compares a call's bearer token with the expected one, in constant time."""

    def __init__(self, token: str | None) -> None:
        self._expected = f"Bearer {token}".encode() if token else None

    def refusal(self, context: grpc.ServicerContext) -> str | None:
        """Why the call is refused, or None when it may go on."""
        if self._expected is None:
            return None
        given = ""
        for key, value in context.invocation_metadata():
            if key == "authorization":
                given = value if isinstance(value, str) else value.decode(errors="replace")
        if hmac.compare_digest(given.encode(), self._expected):
            return None
        return "wrong token" if given else TOKEN_REQUIRED


def server_credentials(sec: ServerSecurity) -> grpc.ServerCredentials:
    assert sec.cert_pem is not None and sec.key_pem is not None  # ServerSecurity.validate() checked it
    return grpc.ssl_server_credentials(
        [(sec.key_pem, sec.cert_pem)],
        root_certificates=sec.client_ca_pem,
        require_client_auth=sec.client_ca_pem is not None,
    )


def channel_credentials(sec: ClientSecurity) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=sec.ca_pem, private_key=sec.key_pem, certificate_chain=sec.cert_pem
    )
