"""Audio sinks: where the receiver's audio goes, named by an ``-o`` URI.

    file:heard.wav       a WAV file of exactly the stream's audio (concealed frames included)
    null://              discards the audio (statistics only)
    app://               the application's audio engine pulls ``Receiver.fill`` itself (a GUI)
    sd://NAME_OR_INDEX   PortAudio playback, one continuous callback stream   [devices]
    alsa://DEVICE        ALSA playback, for headless Pis                      [devices]

The sink is the clock. It pulls audio from the receiver by calling ``fill(buf)``, which must write the
whole buffer (int16, shape (n, channels)) in place and return True when it holds stream audio, False
when no stream is playing (the buffer is then silence). A device sink calls ``fill`` from its audio
callback; a file or null sink calls it from its own thread paced in real time, one 5 ms block at a
time, and keeps only the frames for which it returned True, so a file holds the streams back to back
and its length is exactly the streams' duration.
"""

from __future__ import annotations

from tiality_cli.clock import SYSTEM_CLOCK, Clock
from tiality_cli.config import AudioFormat
from tiality_cli.errors import ConfigError
from tiality_cli.io.base import OUTPUTS_TOLD, AppSink, Sink, split_uri
from tiality_cli.io.files import NullSink, WavSink


def open_sink(uri: str, fmt: AudioFormat | None = None, clock: Clock = SYSTEM_CLOCK) -> Sink:
    """Builds the sink a URI names. Device sinks open (and fail) here, before the port is bound.

    ``fmt`` fixes a device's format (default 48 kHz stereo); file and null sinks take the stream's format
    unless one is given.
    """
    scheme, rest = split_uri(uri, OUTPUTS_TOLD)
    if scheme == "app://":
        return AppSink(fmt or AudioFormat())
    if scheme == "null://":
        sink: Sink = NullSink(clock)
    elif scheme == "file:":
        if not rest:
            raise ConfigError(f"{uri!r}: expected file:PATH.wav")
        sink = WavSink(rest, clock)
    elif scheme in ("alsa://", "sd://"):
        return open_playback(scheme, rest, fmt or AudioFormat(), clock)
    else:
        raise ConfigError(f"{uri!r}: {scheme} is an input, not an output")
    if fmt is not None:
        sink.open(fmt)
    return sink


def open_playback(scheme: str, rest: str, fmt: AudioFormat, clock: Clock) -> Sink:
    """An opened, checked playback device for ``sd://`` or ``alsa://`` (start(fill) to play)."""
    uri = f"{scheme}{rest}"
    if scheme == "sd://":
        from tiality_cli.io.portaudio import SdPlayback

        return SdPlayback(uri, rest, fmt, clock)
    if scheme == "alsa://":
        from tiality_cli.io.alsa import AlsaPlayback

        return AlsaPlayback(uri, rest, fmt, clock)
    raise ConfigError(f"{uri!r}: not a sound device (use sd://DEVICE or alsa://DEVICE)")
