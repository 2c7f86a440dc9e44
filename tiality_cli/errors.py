"""The TialityError tree: every failure a user can cause, each with a one-line message and an exit code.

The library raises these; ``tiality_cli/cli/`` is the one place that prints ``str(error)`` on stderr and exits
with ``error.exit_code``. Messages name the bad value and, where it helps, what would work instead.
"""

from __future__ import annotations


class TialityError(Exception):
    """Base class; ``str()`` is the whole one-line message shown to the user."""

    exit_code = 1


class ConfigError(TialityError):
    """A bad option value (frame size, bitrate, address syntax, URI scheme...)."""

    exit_code = 2


class SourceError(TialityError):
    """An input (file or device) that cannot be opened or read."""

    exit_code = 3


class SinkError(TialityError):
    """An output (file or device) that cannot be opened or written."""

    exit_code = 3


class DeviceError(SourceError, SinkError):
    """A sound device that does not exist, is busy, or cannot do the asked format."""


class ConnectError(TialityError):
    """The receiver cannot be reached, or the connection broke."""

    exit_code = 4


class AddressInUseError(TialityError):
    """The receiver's port is already taken."""

    exit_code = 5


class AuthError(TialityError):
    """Missing or wrong token, or a TLS failure."""

    exit_code = 6


class RejectedError(TialityError):
    """The receiver refused the stream (format it cannot play, too many senders...)."""

    exit_code = 7


class BusyError(RejectedError):
    """The receiver takes no more senders (--max-senders / --exclusive); sent back to the sender."""


class CorruptPacketError(TialityError):
    """A packet or message that cannot be parsed or decoded."""

    exit_code = 8
