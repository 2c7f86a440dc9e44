"""tiality: live audio from a robot to its operator, as a library (the ``tiality`` command is one user).

    import tiality_cli as tiality
    rx = tiality.Receiver("sd://default", tiality.ReceiverConfig(port=50052))
    tx = tiality.Sender("alsa://hw:1,0", tiality.SenderConfig("gui-host:50052"))

Names are loaded on first use (PEP 562), so ``import tiality_cli`` stays cheap and ``tiality --help``
imports neither grpc nor numpy. The table below is the public API; ``__init__.pyi`` says the same to type
checkers (tests/test_embedding.py keeps the two in step). See docs/embedding.md.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "Receiver": "tiality_cli.receiver",
    "ReceiverConfig": "tiality_cli.receiver",
    "ReceiverEvent": "tiality_cli.receiver",
    "Session": "tiality_cli.receiver",
    "SessionView": "tiality_cli.receiver",
    "Sender": "tiality_cli.sender",
    "SenderConfig": "tiality_cli.sender",
    "SenderSnapshot": "tiality_cli.sender",
    "SendResult": "tiality_cli.sender",
    "StatsSnapshot": "tiality_cli.stats",
    "AudioFormat": "tiality_cli.config",
    "CodecConfig": "tiality_cli.config",
    "Endpoint": "tiality_cli.config",
    "ServerSecurity": "tiality_cli.config",
    "ClientSecurity": "tiality_cli.config",
    "PlayoutConfig": "tiality_cli.playout",
    "CaptureOptions": "tiality_cli.io.base",
    "Sink": "tiality_cli.io.base",
    "Source": "tiality_cli.io.base",
    "open_source": "tiality_cli.io.sources",
    "open_sink": "tiality_cli.io.sinks",
    "list_devices": "tiality_cli.io.listing",
    "DeviceList": "tiality_cli.io.listing",
    "TialityError": "tiality_cli.errors",
    "ConfigError": "tiality_cli.errors",
    "ConnectError": "tiality_cli.errors",
    "AuthError": "tiality_cli.errors",
    "RejectedError": "tiality_cli.errors",
    "DeviceError": "tiality_cli.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tiality_cli' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
