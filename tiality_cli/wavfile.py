"""WAV reading (any PCM/float layout) and a crash-tolerant streaming WAV writer.

The stdlib ``wave`` module on 3.11 reads only integer PCM and no WAVE_FORMAT_EXTENSIBLE headers, which
many recorders write; this reader takes 8/16/24/32-bit integer and 32/64-bit float in both. The writer
patches its header sizes about once a second, so a file cut short by ``kill -9`` still opens.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import numpy.typing as npt

from tiality_cli.errors import SinkError, SourceError

_PCM, _FLOAT, _EXTENSIBLE = 1, 3, 0xFFFE


@dataclass(frozen=True, slots=True)
class WavInfo:
    sample_rate: int
    channels: int
    frames: int
    sample_format: str  # e.g. 'int16', 'float32'


def read_wav(path: str | Path) -> tuple[npt.NDArray[np.float32], WavInfo]:
    """Reads a whole WAV file as float32 in [-1, 1], shape (frames, channels)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise SourceError(f"file:{path}: no such file") from None
    except IsADirectoryError:
        raise SourceError(f"file:{path}: is a directory, not a WAV file") from None
    except OSError as exc:
        raise SourceError(f"file:{path}: cannot read ({exc.strerror})") from None
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise SourceError(f"file:{path}: not a WAV file (no RIFF/WAVE header)")
    pos, fmt, body = 12, None, None
    while pos + 8 <= len(data):
        cid, size = data[pos : pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        chunk = data[pos + 8 : pos + 8 + size]
        if cid == b"fmt ":
            fmt = chunk
        elif cid == b"data":
            body = chunk  # a truncated file keeps what it has
            break
        pos += 8 + size + (size & 1)
    if fmt is None or len(fmt) < 16 or body is None:
        raise SourceError(f"file:{path}: WAV file without a fmt or data chunk")
    tag, channels, rate, _, block, bits = struct.unpack_from("<HHIIHH", fmt)
    if tag == _EXTENSIBLE and len(fmt) >= 26:
        tag = struct.unpack_from("<H", fmt, 24)[0]
    if channels < 1 or rate < 1 or block < 1:
        raise SourceError(f"file:{path}: WAV header is corrupt ({channels} channels, {rate} Hz)")
    nframes = len(body) // block
    raw = body[: nframes * block]
    if tag == _PCM and bits == 8:
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
        name = "uint8"
    elif tag == _PCM and bits == 16:
        x = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
        name = "int16"
    elif tag == _PCM and bits == 24:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        v = np.where(v >= 1 << 23, v - (1 << 24), v)
        x = v.astype(np.float32) / float(1 << 23)
        name = "int24"
    elif tag == _PCM and bits == 32:
        x = (np.frombuffer(raw, "<i4").astype(np.float64) / 2147483648.0).astype(np.float32)
        name = "int32"
    elif tag == _FLOAT and bits in (32, 64):
        x = np.frombuffer(raw, "<f4" if bits == 32 else "<f8").astype(np.float32)
        name = f"float{bits}"
    else:
        raise SourceError(f"file:{path}: unsupported WAV encoding (format tag {tag}, {bits} bits)")
    x = x.reshape(nframes, channels)
    return x, WavInfo(rate, channels, nframes, name)


def _header(rate: int, channels: int, data_bytes: int) -> bytes:
    # Past 4 GiB (6.2 h of 48 kHz stereo) the 32-bit sizes saturate; readers then take the data to the
    # end of the file, so a long recording keeps going instead of failing.
    data_bytes = min(data_bytes, 0xFFFFFFFF - 36)
    block = channels * 2
    return struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF",
        36 + data_bytes,
        b"WAVE",
        b"fmt ",
        16,
        _PCM,
        channels,
        rate,
        rate * block,
        block,
        16,
        b"data",
        data_bytes,
    )


class WavWriter:
    """Streams int16 frames to a WAV file; the header is kept valid as it grows (see module doc)."""

    HEADER_BYTES = 44

    def __init__(self, path: str | Path, sample_rate: int, channels: int, sync_every_s: float = 1.0) -> None:
        self.path = Path(path)
        self.sample_rate = sample_rate
        self.channels = channels
        self.frames = 0
        self._sync_every = max(1, int(sample_rate * sync_every_s))
        self._since_sync = 0
        try:
            self._f: BinaryIO | None = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        except OSError as exc:
            raise SinkError(f"file:{path}: cannot write ({exc.strerror})") from None
        self._f.write(_header(sample_rate, channels, 0))

    def write(self, frames: npt.NDArray[np.int16]) -> None:
        """Appends frames (shape (n, channels), int16)."""
        f = self._f
        if f is None:
            return
        try:
            f.write(np.ascontiguousarray(frames, dtype="<i2").data)
        except OSError as exc:
            raise SinkError(f"file:{self.path}: write failed ({exc.strerror})") from None
        n = frames.shape[0]
        self.frames += n
        self._since_sync += n
        if self._since_sync >= self._sync_every:
            self._since_sync = 0
            self._patch_header()

    def _patch_header(self) -> None:
        f = self._f
        if f is None:
            return
        data_bytes = self.frames * self.channels * 2
        try:
            end = f.tell()
            f.seek(0)
            f.write(_header(self.sample_rate, self.channels, data_bytes))
            f.seek(end)
            f.flush()
        except OSError as exc:
            raise SinkError(f"file:{self.path}: write failed ({exc.strerror})") from None

    def close(self) -> None:
        if self._f is None:
            return
        f, self._f = self._f, None
        try:
            self._f = f
            self._patch_header()
            os.fsync(f.fileno())
        except OSError as exc:
            raise SinkError(f"file:{self.path}: write failed ({exc.strerror})") from None
        finally:
            self._f = None
            f.close()

    def __enter__(self) -> WavWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_wav(path: str | Path, samples: npt.NDArray[np.int16], sample_rate: int) -> None:
    """Writes a whole int16 array (frames x channels, or 1-D mono) to a WAV file."""
    a = samples.reshape(len(samples), -1)
    with WavWriter(path, sample_rate, a.shape[1]) as w:
        w.write(a)
