"""Opus encoder and decoder over libopus (through opuslib's ctypes bindings), allocation-free per frame.

opuslib's high-level ``decode()`` builds a ctypes array, a Python list and two bytes objects for every
packet; at 50 packets/s on a Pi Zero that is wasted work. These classes call libopus directly on
buffers allocated once: the encoder reads its own ``input`` array, the decoder writes its own
``output`` array, and the only per-packet object is the encoded ``bytes`` the wire needs anyway.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np
import opuslib
import opuslib.api.ctl as _ctl
import opuslib.api.decoder as _dec
import opuslib.api.encoder as _enc
from opuslib.api import c_int16_pointer as _c_int16_p

from tiality_cli.config import OPUS_RATES, AudioFormat, CodecConfig
from tiality_cli.errors import ConfigError, CorruptPacketError

MAX_PACKET_BYTES = 1500  # RFC 6716 allows up to 1275 bytes per frame; 1500 covers 120 ms at 510 kbit/s / 3
_APPLICATIONS = {"voip": 2048, "audio": 2049, "restricted-lowdelay": 2051}


def _opus_text(code: int) -> str:
    try:
        return str(opuslib.OpusError(code))
    except Exception:  # pragma: no cover - opuslib formats every libopus code
        return f"libopus error {code}"


class OpusEncoder:
    """Encodes one frame of ``input`` (int16, shape (frame_samples, channels)) per ``encode()`` call."""

    _state: Any = None

    def __init__(self, fmt: AudioFormat, config: CodecConfig | None = None) -> None:
        fmt.validate_opus()
        self.config = (config or CodecConfig()).validate()
        self.format = fmt
        try:
            self._state = _enc.create_state(
                fmt.sample_rate, fmt.channels, _APPLICATIONS[self.config.application]
            )
        except opuslib.OpusError as exc:
            raise ConfigError(f"Opus encoder: {exc}") from None
        self._set(_ctl.set_bitrate, self.config.bitrate)
        self._set(_ctl.set_complexity, self.config.complexity)
        self._set(_ctl.set_inband_fec, int(self.config.inband_fec))
        self._set(_ctl.set_dtx, int(self.config.dtx))
        self._set(_ctl.set_packet_loss_perc, self.config.packet_loss_perc)
        self.lookahead: int = int(_enc.encoder_ctl(self._state, _ctl.get_lookahead))
        self.input = np.zeros((fmt.frame_samples, fmt.channels), dtype=np.int16)
        self._in_ptr = self.input.ctypes.data_as(_c_int16_p)
        self._out = ctypes.create_string_buffer(MAX_PACKET_BYTES)
        self._frame = fmt.frame_samples

    def _set(self, request: Any, value: int) -> None:
        _enc.encoder_ctl(self._state, request, value)

    def encode(self) -> bytes:
        """Encodes ``self.input``; returns the Opus packet."""
        n = _enc.libopus_encode(self._state, self._in_ptr, self._frame, self._out, MAX_PACKET_BYTES)
        if n < 0:
            raise RuntimeError(f"Opus encode failed: {_opus_text(n)}")
        return ctypes.string_at(self._out, n)

    def close(self) -> None:
        if self._state is not None:
            _enc.destroy(self._state)
            self._state = None

    def __del__(self) -> None:
        self.close()


class OpusDecoder:
    """Decodes packets, FEC and concealment into its own ``output`` array (int16, frames x channels).

    The decoder may run at any Opus rate and channel count, whatever the encoder used: libopus converts
    internally, so a 16 kHz mono stream plays on a 48 kHz stereo device without a resampler.
    """

    _state: Any = None

    def __init__(self, sample_rate: int, channels: int, max_frame_samples: int) -> None:
        if sample_rate not in OPUS_RATES or channels not in (1, 2):
            raise ConfigError(
                f"Opus decodes at {OPUS_RATES} Hz and 1-2 channels, not {sample_rate} Hz x {channels}"
            )
        self.sample_rate = sample_rate
        self.channels = channels
        self._state = _dec.create_state(sample_rate, channels)
        # 120 ms is the longest Opus packet; a hostile one must not overflow the buffer.
        self._capacity = max(max_frame_samples, sample_rate * 120 // 1000)
        self.output = np.zeros((self._capacity, channels), dtype=np.int16)
        self._out_ptr = self.output.ctypes.data_as(_c_int16_p)

    def decode(self, payload: bytes) -> int:
        """Decodes one packet into ``output``; returns samples per channel. Raises CorruptPacketError."""
        n = _dec.libopus_decode(self._state, payload, len(payload), self._out_ptr, self._capacity, 0)
        if n < 0:
            raise CorruptPacketError(f"undecodable Opus packet ({len(payload)} bytes): {_opus_text(n)}")
        return int(n)

    def conceal(self, samples: int) -> int:
        """Packet-loss concealment for ``samples`` per channel (a multiple of 2.5 ms)."""
        n = _dec.libopus_decode(self._state, None, 0, self._out_ptr, samples, 0)
        if n < 0:
            raise RuntimeError(f"Opus PLC failed: {_opus_text(n)}")
        return int(n)

    def decode_fec(self, next_payload: bytes, samples: int) -> int:
        """Rebuilds a lost frame of ``samples`` from the in-band FEC of the packet after it."""
        n = _dec.libopus_decode(self._state, next_payload, len(next_payload), self._out_ptr, samples, 1)
        if n < 0:
            raise CorruptPacketError(f"undecodable Opus FEC ({len(next_payload)} bytes): {_opus_text(n)}")
        return int(n)

    def reset(self) -> None:
        """Forgets the previous stream (call between streams so PLC does not smear one into the next)."""
        _dec.decoder_ctl(self._state, _ctl.reset_state)

    def close(self) -> None:
        if self._state is not None:
            _dec.destroy(self._state)
            self._state = None

    def __del__(self) -> None:
        self.close()
