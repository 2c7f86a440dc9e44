"""Frozen configuration records and their validation.

Defaults come from the field: the Pi's mic array is captured at 48 kHz, 16-bit, and two of its channels
are encoded as 20 ms Opus packets sent to port 50052. Validation raises ConfigError with the option name
and the values that would work.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from tiality_cli.errors import ConfigError

DEFAULT_PORT = 50052  # the prototype's audio port (video used 50051)
DEFAULT_RATE = 48_000  # Opus's native rate: no resampling anywhere on the default path
DEFAULT_CHANNELS = 2  # two of the Pi's four mic channels reach the encoder
DEFAULT_FRAME_US = 20_000  # 20 ms: Opus's sweet spot of overhead vs latency
DEFAULT_BITRATE = 64_000  # transparent for speech and ambience in stereo; ~8 kB/s
# 'voip' is within 0.04 PESQ-WB of the best mode at every bitrate, mono and stereo, 10 and 20 ms
# (docs/codec-quality.md); 'restricted-lowdelay' saves 4 ms of look-ahead but, CELT-only, loses up to
# 2 PESQ points on speech below 64 kbit/s per channel. Choose it only for high bitrates.
DEFAULT_APPLICATION = "voip"
OPUS_RATES = (8_000, 12_000, 16_000, 24_000, 48_000)
OPUS_FRAME_US = (2_500, 5_000, 10_000, 20_000, 40_000, 60_000)
OPUS_APPLICATIONS = ("voip", "audio", "restricted-lowdelay")


@dataclass(frozen=True, slots=True)
class AudioFormat:
    """A PCM stream: rate, channels and the frame (packet) duration; samples are int16."""

    sample_rate: int = DEFAULT_RATE
    channels: int = DEFAULT_CHANNELS
    frame_us: int = DEFAULT_FRAME_US

    @property
    def frame_samples(self) -> int:
        """Samples per channel in one frame."""
        return self.sample_rate * self.frame_us // 1_000_000

    @property
    def frame_ns(self) -> int:
        return self.frame_us * 1000

    @property
    def frame_ms(self) -> float:
        return self.frame_us / 1000

    def with_(self, **changes: int) -> AudioFormat:
        """A copy with some fields replaced."""
        values = {"sample_rate": self.sample_rate, "channels": self.channels, "frame_us": self.frame_us}
        values.update(changes)
        return AudioFormat(**values)

    def describe(self) -> str:
        """E.g. '48 kHz stereo, 20 ms frames'."""
        ch = {1: "mono", 2: "stereo"}.get(self.channels, f"{self.channels} ch")
        return f"{self.sample_rate / 1000:g} kHz {ch}, {self.frame_ms:g} ms frames"

    def validate_opus(self, wire: bool = False) -> AudioFormat:
        """Raises ConfigError unless Opus can carry this format.

        One set of checks, two phrasings: naming the command-line options, or (``wire``) a sender's
        announced format, whose refusal goes back to that sender.
        """
        if self.sample_rate not in OPUS_RATES:
            rates = ", ".join(str(r) for r in OPUS_RATES)
            if wire:
                raise ConfigError(f"sample rate {self.sample_rate} Hz not supported by Opus ({rates})")
            raise ConfigError(f"--rate {self.sample_rate}: Opus encodes only at {rates} Hz")
        if self.channels not in (1, 2):
            if wire:
                raise ConfigError(f"{self.channels} channels not supported (Opus carries 1 or 2)")
            raise ConfigError(f"--channels {self.channels}: Opus encodes 1 or 2 channels")
        if self.frame_us not in OPUS_FRAME_US:
            allowed = ", ".join(f"{f / 1000:g}" for f in OPUS_FRAME_US)
            if wire:
                raise ConfigError(f"frame duration {self.frame_us} us not supported by Opus ({allowed} ms)")
            raise ConfigError(f"--frame-ms {self.frame_us / 1000:g}: Opus frames are {allowed} ms")
        return self


def frame_us_from_ms(frame_ms: float) -> int:
    """Converts a --frame-ms value, refusing durations Opus cannot packetise."""
    us = round(frame_ms * 1000)
    if us not in OPUS_FRAME_US or abs(frame_ms * 1000 - us) > 1e-6:
        allowed = ", ".join(f"{f / 1000:g}" for f in OPUS_FRAME_US)
        raise ConfigError(f"--frame-ms {frame_ms:g}: Opus frames are {allowed} ms")
    return us


@dataclass(frozen=True, slots=True)
class CodecConfig:
    """Opus encoder settings."""

    bitrate: int = DEFAULT_BITRATE  # bits/s; Opus accepts 6000..510000
    complexity: int = 10  # 0..10; lower saves CPU in audio, restricted-lowdelay; not in voip
    application: str = DEFAULT_APPLICATION  # see DEFAULT_APPLICATION for why
    inband_fec: bool = False  # costs bitrate; helps only when packets are actually lost
    dtx: bool = False  # saves bandwidth in silence, at the cost of comfort noise
    packet_loss_perc: int = 0  # expected loss %, steers how much FEC the encoder spends

    def validate(self) -> CodecConfig:
        if not 6_000 <= self.bitrate <= 510_000:
            raise ConfigError(f"--bitrate {self.bitrate / 1000:g}: Opus takes 6 to 510 kbit/s")
        if not 0 <= self.complexity <= 10:
            raise ConfigError(f"--complexity {self.complexity}: must be 0 to 10")
        if self.application not in OPUS_APPLICATIONS:
            raise ConfigError(
                f"--application {self.application}: choose one of {', '.join(OPUS_APPLICATIONS)}"
            )
        if not 0 <= self.packet_loss_perc <= 100:
            raise ConfigError(f"--expected-loss {self.packet_loss_perc}: must be 0 to 100")
        return self


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A HOST:PORT the sender connects to."""

    host: str
    port: int

    @property
    def target(self) -> str:
        """The gRPC target string (IPv6 literals bracketed)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def is_loopback(self) -> bool:
        if self.host in ("localhost", ""):
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def parse_port(text: str, option: str = "port") -> int:
    try:
        port = int(text)
    except ValueError:
        raise ConfigError(f"{option} {text!r}: not a number (expected 1-65535)") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"{option} {port}: out of range (expected 1-65535)")
    return port


def parse_endpoint(text: str, default_port: int = DEFAULT_PORT) -> Endpoint:
    """Parses HOST, HOST:PORT, [V6]:PORT or V6; raises ConfigError naming the expected form."""
    s = text.strip()
    form = "expected HOST:PORT, e.g. gui-host:50052 or [::1]:50052"
    if not s:
        raise ConfigError(f"address {text!r}: empty ({form})")
    if s.startswith("["):
        end = s.find("]")
        if end < 0:
            raise ConfigError(f"address {text!r}: unclosed '[' ({form})")
        host, rest = s[1:end], s[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ConfigError(f"address {text!r}: unexpected {rest!r} after ']' ({form})")
        port = parse_port(rest[1:], f"address {text!r}: port") if rest else default_port
    elif s.count(":") > 1:
        host, port = s, default_port  # a bare IPv6 literal
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"address {text!r}: not a valid IPv6 address ({form})") from None
    elif ":" in s:
        host, _, port_text = s.partition(":")
        port = parse_port(port_text, f"address {text!r}: port")
    else:
        host, port = s, default_port
    if not host or any(c.isspace() or c in "/@?#" for c in host):
        raise ConfigError(f"address {text!r}: bad host name ({form})")
    if port == 0:
        raise ConfigError(f"address {text!r}: port 0 is not a port to connect to ({form})")
    return Endpoint(host, port)


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

    def validate(self) -> ServerSecurity:
        """Raises ConfigError for a half-configured TLS set-up (a library caller gets the CLI's words)."""
        if self.token is not None and not self.token:
            raise ConfigError("--token: empty")
        if (self.cert_pem is None) != (self.key_pem is None):
            raise ConfigError("--tls-cert and --tls-key go together")
        if self.client_ca_pem is not None and self.cert_pem is None:
            raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)")
        return self


@dataclass(frozen=True, slots=True)
class ClientSecurity:
    """What the sender presents: the token, and TLS trust (CA) plus its own certificate for mutual TLS."""

    token: str | None = field(default=None, repr=False)
    tls: bool = False
    ca_pem: bytes | None = field(default=None, repr=False)  # None with tls: the system's roots
    cert_pem: bytes | None = field(default=None, repr=False)
    key_pem: bytes | None = field(default=None, repr=False)
    server_name: str | None = None  # the name to expect in the receiver's certificate

    def validate(self) -> ClientSecurity:
        if self.token is not None and not self.token:
            raise ConfigError("--token: empty")
        if (self.cert_pem is None) != (self.key_pem is None):
            raise ConfigError("--tls-cert and --tls-key go together (mutual TLS needs both)")
        if (self.cert_pem is not None or self.ca_pem is not None) and not self.tls:
            raise ConfigError("--tls-ca / --tls-cert need TLS (--tls)")
        return self
