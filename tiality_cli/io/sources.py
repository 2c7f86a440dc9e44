"""Audio sources: where the sender's frames come from, named by an ``-i`` URI.

    tone://440              a sine at 440 Hz, -12 dBFS
    file:speech.wav         any WAV (rate, channels, 8-32 bit or float), converted to the stream format
    alsa://DEVICE           ALSA capture (default, hw:1,0, plughw:CARD=Array,DEV=0 ...)   [devices]
    sd://NAME_OR_INDEX      PortAudio capture through sounddevice                          [devices]

``read(out)`` fills one frame and returns its capture time; see tiality_cli.io.base for the contract.
"""

from __future__ import annotations

from tiality_cli.clock import SYSTEM_CLOCK, Clock
from tiality_cli.config import AudioFormat
from tiality_cli.errors import ConfigError
from tiality_cli.io.base import CaptureOptions, Source, split_uri
from tiality_cli.io.files import ToneSource, WavSource


def open_source(
    uri: str, fmt: AudioFormat, capture: CaptureOptions | None = None, clock: Clock = SYSTEM_CLOCK
) -> Source:
    """Builds the source a URI names; file and device errors are raised here, before any network."""
    scheme, rest = split_uri(uri)
    if scheme == "tone://":
        try:
            freq = float(rest)
        except ValueError:
            raise ConfigError(f"{uri!r}: expected tone://FREQUENCY_HZ, e.g. tone://440") from None
        return ToneSource(freq, fmt, clock=clock)
    if scheme == "file:":
        if not rest:
            raise ConfigError(f"{uri!r}: expected file:PATH.wav")
        return WavSource(rest, fmt, clock=clock)
    if scheme in ("alsa://", "sd://"):
        return open_capture(scheme, rest, fmt, capture or CaptureOptions(), clock)
    raise ConfigError(f"{uri!r}: {scheme} is an output, not an input")


def open_capture(scheme: str, rest: str, fmt: AudioFormat, capture: CaptureOptions, clock: Clock) -> Source:
    """An opened, checked capture device for ``alsa://`` or ``sd://`` (read() after open())."""
    from tiality_cli.io.routing import resolve_capture

    router = resolve_capture(fmt, capture)
    uri = f"{scheme}{rest}"
    if scheme == "alsa://":
        from tiality_cli.io.alsa import AlsaCapture

        return AlsaCapture(uri, rest, fmt, router, clock)
    if scheme == "sd://":
        from tiality_cli.io.portaudio import SdCapture

        return SdCapture(uri, rest, fmt, router, clock)
    raise ConfigError(f"{uri!r}: not a sound device (use alsa://DEVICE or sd://DEVICE)")
