"""Ogg Opus recording (RFC 7845) of the packets as received: no decoding, no re-encoding.

``recv --record PATH.opus`` keeps the sender's own Opus packets, so the file costs what the wire cost
and plays in anything that reads .opus (opusdec, ffmpeg, browsers). A page is written (and flushed to
the kernel) at least every ``flush_every_s`` of audio, so a receiver killed by ``kill -9`` leaves a file
that opens and lacks at most that much at its end.

Lost packets: ``write_gap`` writes one TOC-only packet per missing frame. A zero-length Opus frame
means "lost or DTX" (RFC 6716, section 3.2.1; libopus's DTX emits exactly these), so the file keeps its
timing and decoders conceal the gap as they would live.

Granule positions count 48 kHz samples whatever the input rate, as RFC 7845 requires.
"""

from __future__ import annotations

import os
import random
import struct
from pathlib import Path
from typing import BinaryIO

from tiality_cli.errors import ConfigError, SinkError


def _crc_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        r = i << 24
        for _ in range(8):
            r = ((r << 1) ^ 0x04C11DB7) if r & 0x80000000 else (r << 1)
        table.append(r & 0xFFFFFFFF)
    return tuple(table)


_CRC_TABLE = _crc_table()
_MAX_SEGMENTS = 255  # lacing values in one page's segment table
_FLAG_CONTINUED, _FLAG_BOS, _FLAG_EOS = 0x01, 0x02, 0x04
_PAGE_HEADER = struct.Struct("<4sBBqIIIB")  # capture, version, flags, granule, serial, seq, crc, nsegs
_CELT_FB_20MS = 31  # TOC config for a lost frame when no packet has shown the stream's own config


def ogg_crc32(data: bytes | bytearray) -> int:
    """Ogg's page checksum: CRC-32, polynomial 0x04c11db7, initial value 0, no reflection, no final xor.

    (``zlib.crc32`` is the reflected variant with a final xor: a different checksum.)
    """
    crc, table = 0, _CRC_TABLE
    for b in data:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ table[(crc >> 24) ^ b]
    return crc


def _frame_samples_48k(config: int) -> int:
    """Samples (at 48 kHz) in one frame of TOC configuration ``config`` (RFC 6716, table 2)."""
    if config < 12:  # SILK: 10, 20, 40, 60 ms
        return (480, 960, 1920, 2880)[config & 3]
    if config < 16:  # hybrid: 10, 20 ms
        return (480, 960)[config & 1]
    return (120, 240, 480, 960)[config & 3]  # CELT: 2.5, 5, 10, 20 ms


def opus_packet_samples(packet: bytes) -> int:
    """Duration of an Opus packet in 48 kHz samples, from its TOC byte (and frame count byte)."""
    if not packet:
        raise ValueError("empty Opus packet (no TOC byte)")
    toc = packet[0]
    code = toc & 3
    if code == 0:
        frames = 1
    elif code < 3:
        frames = 2
    elif len(packet) < 2:
        raise ValueError("Opus code-3 packet without its frame count byte")
    else:
        frames = packet[1] & 0x3F
    return frames * _frame_samples_48k(toc >> 3)


class OggOpusWriter:
    """Appends Opus packets to an Ogg Opus file (see module doc); use as a context manager or ``close()``.

    ``pre_skip`` is the encoder's lookahead in samples at ``input_sample_rate``: what the stream
    announces as its algorithmic delay. The header stores it converted to 48 kHz (``self.pre_skip``).
    ``granule`` is the 48 kHz sample count of all packets so far, pre-skip included.
    """

    def __init__(
        self,
        path: str | Path,
        channels: int,
        input_sample_rate: int,
        pre_skip: int,
        stream_serial: int | None = None,
        vendor: str = "tiality",
        flush_every_s: float = 1.0,
    ) -> None:
        if channels not in (1, 2):
            raise ConfigError(f"Ogg Opus recording: {channels} channels (mapping family 0 has 1 or 2)")
        if input_sample_rate < 1 or pre_skip < 0:
            raise ConfigError(f"Ogg Opus recording: bad rate {input_sample_rate} or pre-skip {pre_skip}")
        self.path = Path(path)
        self.channels = channels
        self.input_sample_rate = input_sample_rate
        self.pre_skip = -(-pre_skip * 48_000 // input_sample_rate)  # rounded up: never play encoder junk
        if self.pre_skip > 0xFFFF:
            raise ConfigError(f"Ogg Opus recording: pre-skip {self.pre_skip} does not fit 16 bits")
        self.serial = random.getrandbits(32) if stream_serial is None else stream_serial & 0xFFFFFFFF
        self.granule = 0
        self._flush_every = max(1, round(48_000 * flush_every_s))
        self._flushed_granule = 0
        self._seq = 0
        self._lacing = bytearray()
        self._body = bytearray()
        self._page_granule = -1  # granule of the last packet that ends on the pending page
        self._continued = False  # the pending page starts with the tail of a packet
        self._last_page = (0, b"")  # file offset and bytes of the last page written
        self._toc = (_CELT_FB_20MS << 3) | (4 if channels == 2 else 0)
        try:
            self._f: BinaryIO | None = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        except OSError as exc:
            raise SinkError(f"file:{path}: cannot write ({exc.strerror})") from None
        head = struct.pack("<8sBBHIhB", b"OpusHead", 1, channels, self.pre_skip, input_sample_rate, 0, 0)
        v = vendor.encode()
        tags = b"OpusTags" + struct.pack("<I", len(v)) + v + struct.pack("<I", 0)
        # RFC 7845 section 3: the ID header alone on the first page, the comment header ending a page.
        self._write_packet_raw(head)
        self._emit_page(_FLAG_BOS, 0)
        self._write_packet_raw(tags)
        self._emit_page(0, 0)

    def write_packet(self, payload: bytes, samples_48k: int | None = None) -> None:
        """Appends one Opus packet lasting ``samples_48k``; leave it out to read it from the TOC byte."""
        if not payload:
            raise ValueError("empty Opus packet (no TOC byte)")
        self.granule += opus_packet_samples(payload) if samples_48k is None else samples_48k
        self._toc = payload[0] & 0xFC  # config and stereo bits, code 0: the template for lost frames
        self._write_packet_raw(payload)
        if self.granule - self._flushed_granule >= self._flush_every:
            self._emit_page(0, self._page_granule)

    def write_gap(self, samples_48k: int) -> None:
        """Marks ``samples_48k`` of lost audio (a multiple of 120, i.e. 2.5 ms) with empty Opus frames.

        Frames take the last packet's TOC configuration (so decoders conceal as for that stream); what
        is left over is filled with shorter CELT frames.
        """
        if samples_48k < 0 or samples_48k % 120:
            raise ValueError(f"a gap of {samples_48k} samples at 48 kHz is not a multiple of 2.5 ms")
        stereo = self._toc & 4
        celt_fb = [(((28 + k) << 3) | stereo, 120 << k) for k in (3, 2, 1, 0)]  # 20, 10, 5, 2.5 ms
        left = samples_48k
        for toc, n in [(self._toc, _frame_samples_48k(self._toc >> 3)), *celt_fb]:
            marker = bytes((toc,))
            while left >= n:
                left -= n
                self.granule += n
                self._write_packet_raw(marker)
                if self.granule - self._flushed_granule >= self._flush_every:
                    self._emit_page(0, self._page_granule)

    def _write_packet_raw(self, payload: bytes) -> None:
        if self._f is None:
            raise ValueError(f"{self.path}: write to a closed OggOpusWriter")
        full, rem = divmod(len(payload), 255)
        if len(self._lacing) + full < _MAX_SEGMENTS:  # fast path: the whole packet fits this page
            self._lacing += b"\xff" * full
            self._lacing.append(rem)
            self._body += payload
            self._page_granule = self.granule
            return
        pos, n = 0, len(payload)
        while True:
            room = _MAX_SEGMENTS - len(self._lacing)
            full = (n - pos) // 255
            if full < room:  # the rest of the packet ends on this page
                self._lacing += b"\xff" * full
                self._lacing.append((n - pos) % 255)
                self._body += payload[pos:]
                self._page_granule = self.granule
                return
            self._lacing += b"\xff" * room
            self._body += payload[pos : pos + 255 * room]
            pos += 255 * room
            self._emit_page(0, self._page_granule)
            self._continued = pos > 0

    def _emit_page(self, flags: int, granule: int) -> None:
        f = self._f
        assert f is not None
        if self._continued:
            flags |= _FLAG_CONTINUED
        header = _PAGE_HEADER.pack(b"OggS", 0, flags, granule, self.serial, self._seq, 0, len(self._lacing))
        page = bytearray(header)
        page += self._lacing
        page += self._body
        struct.pack_into("<I", page, 22, ogg_crc32(page))
        try:
            self._last_page = (f.tell(), bytes(page))
            f.write(page)
            f.flush()
        except OSError as exc:
            raise SinkError(f"file:{self.path}: cannot write ({exc.strerror})") from None
        self._seq += 1
        self._lacing.clear()
        self._body.clear()
        self._continued = False
        if granule >= 0:
            self._flushed_granule = granule
        self._page_granule = -1

    def close(self) -> None:
        """Writes the last page, flagged end-of-stream, and closes the file."""
        f = self._f
        if f is None:
            return
        try:
            if self._lacing:
                self._emit_page(_FLAG_EOS, self._page_granule)
            else:  # everything is on disk already: set the EOS flag on the last page in place
                offset, old = self._last_page
                page = bytearray(old)
                page[5] |= _FLAG_EOS
                page[22:26] = b"\0\0\0\0"
                struct.pack_into("<I", page, 22, ogg_crc32(page))
                f.seek(offset)
                f.write(page)
            f.flush()
            os.fsync(f.fileno())
        except OSError as exc:
            raise SinkError(f"file:{self.path}: cannot write ({exc.strerror})") from None
        finally:
            self._f = None
            f.close()

    def __enter__(self) -> OggOpusWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
