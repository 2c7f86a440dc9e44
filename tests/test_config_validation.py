"""A library caller gets the CLI's one-line ConfigError for a bad configuration, never an assertion."""

from __future__ import annotations

import pytest

from tiality_cli.config import AudioFormat, ClientSecurity, Endpoint, ServerSecurity
from tiality_cli.errors import ConfigError
from tiality_cli.io.files import NullSink, ToneSource
from tiality_cli.playout import PlayoutConfig
from tiality_cli.receiver import Receiver, ReceiverConfig
from tiality_cli.sender import Sender, SenderConfig

PEM = b"-----BEGIN CERTIFICATE-----\n..."


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (ReceiverConfig(max_senders=0), "--max-senders 0: must be at least 1"),
        (ReceiverConfig(security=ServerSecurity(cert_pem=PEM)), "--tls-cert and --tls-key go together"),
        (
            ReceiverConfig(security=ServerSecurity(client_ca_pem=PEM)),
            "--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)",
        ),
        (ReceiverConfig(port=70_000), "--port 70000: out of range (expected 1-65535)"),
        (ReceiverConfig(playout=PlayoutConfig(max_latency_ms=0)), "--max-latency 0: must be positive"),
        (
            ReceiverConfig(playout=PlayoutConfig(resampler="zero_order_hold")),
            "--resampler zero_order_hold: one of sinc_fastest, linear, sinc_medium, sinc_best",
        ),
        (ReceiverConfig(record="x.mp3"), "--record x.mp3"),
        (ReceiverConfig(max_load_pct=0), "--max-load 0: must be above 0 and at most 100 (%)"),
        (ReceiverConfig(max_load_pct=120), "--max-load 120: must be above 0 and at most 100 (%)"),
    ],
)
def test_receiver_config_is_checked_with_the_clis_words(config: ReceiverConfig, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        Receiver(NullSink(), config)
    assert str(err.value).startswith(message)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (SenderConfig(Endpoint("h", 1), max_backlog_ms=0), "--max-backlog 0: must be positive"),
        (SenderConfig(Endpoint("h", 1), seconds=-1), "--seconds -1: must be positive"),
        (
            SenderConfig(Endpoint("h", 1), security=ClientSecurity(tls=True, cert_pem=PEM)),
            "--tls-cert and --tls-key go together (mutual TLS needs both)",
        ),
        (SenderConfig(Endpoint("h", 1), security=ClientSecurity(token="")), "--token: empty"),
    ],
)
def test_sender_config_is_checked_with_the_clis_words(config: SenderConfig, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        Sender(ToneSource(440, AudioFormat()), config)
    assert str(err.value) == message
