"""Protobuf <-> domain: the only place that knows the messages of proto/tiality.proto.

A sender's StreamFormat is checked here (protocol version, codec, and the Opus format through
``AudioFormat.validate_opus``), so a receiver never sees a format it could not play.
"""

from __future__ import annotations

from tiality_cli.config import AudioFormat
from tiality_cli.errors import ConfigError
from tiality_cli.link import PROTOCOL_VERSION, ClockEstimate, Outgoing, StreamInfo, StreamTotals
from tiality_cli.net._proto import tiality_pb2 as pb
from tiality_cli.seq import SEQ_MASK

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["AudioStream"].full_name  # "tiality.v1.AudioStream"
# A 60 ms stereo Opus packet at 510 kbit/s is under 4 kB; 64 KiB leaves room and bounds what a
# hostile peer can make the receiver allocate per message. (Here, not in server.py: a sender does
# not import the server.)
MAX_MESSAGE_BYTES = 64 * 1024


def info_from_pb(f: pb.StreamFormat) -> StreamInfo:
    """Validates a sender's StreamFormat; raises ConfigError with the reason to send back."""
    if f.protocol_version != PROTOCOL_VERSION:
        raise ConfigError(
            f"protocol version {f.protocol_version} not supported (this receiver speaks {PROTOCOL_VERSION})"
        )
    if f.codec != pb.CODEC_OPUS:
        raise ConfigError(f"codec {f.codec} not supported (only Opus)")
    fmt = AudioFormat(f.sample_rate, f.channels, f.frame_duration_us).validate_opus(wire=True)
    return StreamInfo(
        format=fmt,
        algorithm_delay=f.algorithm_delay_samples,
        bitrate=f.bitrate_bps,
        fec=f.inband_fec,
        dtx=f.dtx,
        name=f.sender_name,
        first_sequence=f.first_sequence,
    )


def info_to_pb(info: StreamInfo) -> pb.StreamFormat:
    fmt = info.format
    return pb.StreamFormat(
        protocol_version=PROTOCOL_VERSION,
        codec=pb.CODEC_OPUS,
        sample_rate=fmt.sample_rate,
        channels=fmt.channels,
        frame_duration_us=fmt.frame_us,
        algorithm_delay_samples=info.algorithm_delay,
        bitrate_bps=info.bitrate,
        inband_fec=info.fec,
        dtx=info.dtx,
        sender_name=info.name[:200],
        first_sequence=info.first_sequence & SEQ_MASK,
    )


def estimate_from_pb(c: pb.ClockEstimate) -> ClockEstimate:
    return ClockEstimate(c.offset_ns, c.round_trip_ns, c.samples)


def totals_to_pb(t: StreamTotals) -> pb.StreamSummary:
    return pb.StreamSummary(
        packets=t.packets,
        bytes=t.bytes,
        lost=t.lost,
        late=t.late,
        concealed=t.concealed,
        duplicates=t.duplicates,
        frames_played=t.frames_played,
    )


def totals_from_pb(s: pb.StreamSummary) -> StreamTotals:
    return StreamTotals(s.packets, s.bytes, s.lost, s.late, s.concealed, s.duplicates, s.frames_played)


def message(item: Outgoing) -> pb.StreamMessage:
    """One outgoing item as the message that carries it (a packet is the common case: tested first)."""
    if type(item) is tuple:
        seq, t, payload, delay_ns = item
        return pb.StreamMessage(
            packet=pb.AudioPacket(
                sequence=seq & SEQ_MASK,
                capture_time_ns=t,
                payload=payload,
                capture_delay_us=min(0xFFFFFFFF, max(0, delay_ns // 1000)),
            )
        )
    if isinstance(item, ClockEstimate):
        return pb.StreamMessage(
            clock=pb.ClockEstimate(
                offset_ns=item.offset_ns, round_trip_ns=item.round_trip_ns, samples=item.samples
            )
        )
    if isinstance(item, StreamInfo):
        return pb.StreamMessage(format=info_to_pb(item))
    raise TypeError(f"not a stream item: {item!r}")
