"""Type checkers' view of tiality_cli/__init__.py: the same names, which load lazily at run time."""

from tiality_cli.config import AudioFormat, ClientSecurity, CodecConfig, Endpoint, ServerSecurity
from tiality_cli.errors import AuthError, ConfigError, ConnectError, DeviceError, RejectedError, TialityError
from tiality_cli.io.base import CaptureOptions, Sink, Source
from tiality_cli.io.listing import DeviceList, list_devices
from tiality_cli.io.sinks import open_sink
from tiality_cli.io.sources import open_source
from tiality_cli.playout import PlayoutConfig
from tiality_cli.receiver import Receiver, ReceiverConfig, ReceiverEvent, Session, SessionView
from tiality_cli.sender import Sender, SenderConfig, SenderSnapshot, SendResult
from tiality_cli.stats import StatsSnapshot

__all__ = [
    "AudioFormat",
    "AuthError",
    "CaptureOptions",
    "ClientSecurity",
    "CodecConfig",
    "ConfigError",
    "ConnectError",
    "DeviceError",
    "DeviceList",
    "Endpoint",
    "PlayoutConfig",
    "Receiver",
    "ReceiverConfig",
    "ReceiverEvent",
    "RejectedError",
    "SendResult",
    "Sender",
    "SenderConfig",
    "SenderSnapshot",
    "ServerSecurity",
    "Session",
    "SessionView",
    "Sink",
    "Source",
    "StatsSnapshot",
    "TialityError",
    "list_devices",
    "open_sink",
    "open_source",
]
