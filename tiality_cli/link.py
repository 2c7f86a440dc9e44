"""The link between a Sender and a Receiver, in domain types: what crosses it, and who calls whom.

    StreamInfo, ClockEstimate, StreamTotals   what a stream announces, carries and ends with
    StreamHandler, Acceptor                   the receiver's side: one handler per accepted stream
    Link, Connector                           the sender's side: one connection attempt to a receiver
    DirectLink                                both sides in one process, no sockets (tests, embedding)

``tiality_cli.net`` implements Link and serves Acceptors over gRPC; nothing here knows protobuf or gRPC,
so Sender and Receiver are tested with a DirectLink and used over the network with the same code.

A stream is: one StreamInfo, then packets ``(sequence, capture_time_ns, payload, capture_delay_ns)`` and a
ClockEstimate, then the end, answered by the receiver's StreamTotals once it has played what it got.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from tiality_cli.clocksync import ClockSample, sample
from tiality_cli.config import AudioFormat
from tiality_cli.errors import ConnectError, RejectedError

PROTOCOL_VERSION = 1


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """The first thing a sender says: its format and how to play it."""

    format: AudioFormat
    algorithm_delay: int = 0  # encoder look-ahead in samples at the stream's rate (for A/V sync, files)
    bitrate: int = 0  # bits/s the encoder aims for (informative)
    fec: bool = False  # packets carry in-band FEC for the frame before them
    dtx: bool = False  # silence may be sent as short comfort-noise packets
    name: str = ""  # how the sender calls itself (host name and input)
    first_sequence: int = 0  # the first packet's sequence number (32-bit)


@dataclass(frozen=True, slots=True)
class ClockEstimate:
    """The sender's estimate of receiver clock - sender clock (NTP-style), sent in-band."""

    offset_ns: int
    round_trip_ns: int
    samples: int


@dataclass(frozen=True, slots=True)
class StreamTotals:
    """The receiver's account of one stream, once it has been played out."""

    packets: int = 0
    bytes: int = 0
    lost: int = 0
    late: int = 0
    concealed: int = 0
    duplicates: int = 0
    frames_played: int = 0


# (sequence, capture_time_ns: ADC time on the sender's wall clock, Opus payload, capture-device delay ns)
Packet = tuple[int, int, bytes, int]
Outgoing = StreamInfo | ClockEstimate | Packet


class StreamHandler(Protocol):
    """The receiver's side of one accepted stream; the transport calls it from that stream's thread.

    A handler may also have ``evicted``: set (to the reason) when the receiver ends the stream itself to
    keep up with the others; the transport then ends the call with RESOURCE_EXHAUSTED and that reason
    at the next message. (An application's own handler without it is never ended that way.) And it may
    have ``end(on_done)``: the stream ended, ``on_done()`` (any thread) once its audio has played, after
    which ``close()`` answers at once; an asynchronous transport then waits without a thread."""

    def packet(self, seq: int, capture_ns: int, payload: bytes, capture_delay_ns: int) -> None: ...

    def clock(self, estimate: ClockEstimate) -> None: ...

    def close(self) -> StreamTotals:
        """The stream ended (cleanly or not): blocks until its audio has played, returns the totals."""
        ...


# Called once per new stream with the peer's address and its StreamInfo. Raises ConfigError for a format
# it cannot play and BusyError when it takes no more senders: the transport sends the reason back.
Acceptor = Callable[[str, StreamInfo], StreamHandler]


class Link(Protocol):
    """One connection from a sender to a receiver (net.client.GrpcLink over the network)."""

    def wait_ready(self, timeout_s: float) -> None:
        """Returns once connected; raises ConnectError (or AuthError) saying why not."""
        ...

    def probe_clock(self, wall_ns: Callable[[], int]) -> ClockSample | None:
        """One NTP-style exchange on the sender's wall clock; None when the receiver does not answer."""
        ...

    def stream(self, items: Iterator[Outgoing]) -> StreamTotals:
        """Sends a StreamInfo then packets and estimates until ``items`` ends; raises TialityError."""
        ...

    def close(self) -> None: ...


Connector = Callable[[], Link]


class DirectLink:
    """A Link straight into a receiver's Acceptor in the same process: no sockets, no serialisation.

    The receiver's clock is the sender's (one process), so clock probes read zero offset.
    """

    def __init__(self, accept: Acceptor, peer: str = "direct") -> None:
        self._accept = accept
        self._peer = peer
        self._closed = threading.Event()

    def wait_ready(self, timeout_s: float) -> None:
        if self._closed.is_set():
            raise ConnectError(f"{self._peer}: link closed")

    def probe_clock(self, wall_ns: Callable[[], int]) -> ClockSample | None:
        t0 = wall_ns()
        t1 = wall_ns()
        return sample(t0, t1, t1, wall_ns())

    def stream(self, items: Iterator[Outgoing]) -> StreamTotals:
        first = next(items, None)
        if first is None:
            return StreamTotals()
        if not isinstance(first, StreamInfo):
            raise RejectedError(f"{self._peer} refused the stream: the first message must be the format")
        handler = self._accept(self._peer, first)
        evicted: str | None = None
        try:
            for item in items:
                evicted = getattr(handler, "evicted", None)
                if evicted is not None:  # the receiver ended it to keep up with the others
                    break
                if type(item) is tuple:
                    handler.packet(*item)
                elif isinstance(item, ClockEstimate):
                    handler.clock(item)
                if self._closed.is_set():
                    break
        finally:
            totals = handler.close()
        if evicted is not None:
            raise RejectedError(f"{self._peer} {evicted}")
        return totals

    def close(self) -> None:
        self._closed.set()
