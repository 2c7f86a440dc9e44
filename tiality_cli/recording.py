"""``recv --record``: what was played as WAV, or the received Opus packets as Ogg Opus.

WAV: the mixer hands every played block to ``WavRecorder.push`` from the audio callback, which only
copies it into a preallocated ring; a writer thread does the file I/O, and the WAV header is patched
about once a second, so Ctrl-C, SIGTERM or even ``kill -9`` leave a file that opens (at most the last
second missing).

Ogg Opus: each stream's packets are written as they arrive, without re-encoding, in sequence order. A
short reorder window holds early packets; a frame that has not arrived when the window moves on is
written as a zero-length "lost" packet, so the file keeps its timing and players conceal the gap. The
first stream goes to PATH.opus, the next ones to PATH-2.opus, PATH-3.opus...
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import numpy.typing as npt

from tiality_cli.config import AudioFormat
from tiality_cli.errors import ConfigError
from tiality_cli.oggopus import OggOpusWriter
from tiality_cli.seq import seq_add, seq_delta
from tiality_cli.wavfile import WavWriter

REORDER_FRAMES = 8  # how long an out-of-order packet may be waited for before its slot is declared lost


def check_record_path(path: str) -> str:
    """Refuses anything but PATH.wav and PATH.opus, and paths that cannot be written, before listening."""
    suffix = Path(path).suffix.lower()
    if suffix not in (".wav", ".opus"):
        raise ConfigError(f"--record {path}: name a .wav (what was played) or .opus (the packets received)")
    if suffix == ".wav":
        WavWriter(path, 48_000, 1).close()
    return path


class WavRecorder:
    """Records played int16 blocks to a WAV file without doing I/O on the audio thread."""

    def __init__(self, path: str | Path, fmt: AudioFormat, buffer_s: float = 2.0) -> None:
        self._writer = WavWriter(path, fmt.sample_rate, fmt.channels)
        self._ring = np.zeros((max(1, int(fmt.sample_rate * buffer_s)), fmt.channels), dtype=np.int16)
        self._w = 0  # samples pushed (monotonic)
        self._r = 0  # samples written (monotonic)
        self.overflows = 0  # samples dropped because the disk fell more than buffer_s behind
        self._wake = threading.Event()
        self._closing = False
        self._thread = threading.Thread(target=self._drain_loop, name="tiality-record", daemon=True)
        self._thread.start()

    def push(self, block: npt.NDArray[np.int16]) -> None:
        """Audio thread: copies the block into the ring (never blocks, never allocates)."""
        n, cap = len(block), len(self._ring)
        if self._w + n - self._r > cap:
            self.overflows += n
            return
        i = self._w % cap
        first = min(n, cap - i)
        self._ring[i : i + first] = block[:first]
        if first < n:
            self._ring[: n - first] = block[first:]
        self._w += n
        self._wake.set()

    def _drain(self) -> None:
        cap = len(self._ring)
        while self._r < self._w:
            i = self._r % cap
            n = min(self._w - self._r, cap - i)
            self._writer.write(self._ring[i : i + n])
            self._r += n

    def _drain_loop(self) -> None:
        while not self._closing:
            self._wake.wait(0.5)
            self._wake.clear()
            self._drain()

    def close(self) -> None:
        self._closing = True
        self._wake.set()
        self._thread.join()
        self._drain()
        self._writer.close()


class OpusTap:
    """One stream's packets into one Ogg Opus file, in sequence order (see the module doc)."""

    def __init__(self, path: Path, fmt: AudioFormat, lookahead: int) -> None:
        self._ogg = OggOpusWriter(path, fmt.channels, fmt.sample_rate, lookahead)
        self._frame_48k = fmt.frame_us * 48 // 1000
        self._next: int | None = None
        self._held: dict[int, bytes] = {}
        self.path = path

    def push(self, seq: int, payload: bytes) -> None:
        """Network thread: a packet with its 32-bit sequence number."""
        if self._next is None:
            self._next = seq
        if seq_delta(seq, self._next) < 0:
            return  # older than what was already written (late or duplicate)
        self._held[seq] = payload
        while self._held:
            nxt = self._next
            p = self._held.pop(nxt, None)
            if p is not None:
                self._ogg.write_packet(p)
            elif len(self._held) > REORDER_FRAMES:
                self._ogg.write_gap(self._frame_48k)  # waited long enough: that frame is lost
            else:
                return
            self._next = seq_add(nxt, 1)

    def close(self) -> None:
        start = self._next or 0
        for seq in sorted(self._held, key=lambda s: seq_delta(s, start)):
            while self._next is not None and self._next != seq:
                self._ogg.write_gap(self._frame_48k)
                self._next = seq_add(self._next, 1)
            self._ogg.write_packet(self._held[seq])
            self._next = seq_add(seq, 1)
        self._held.clear()
        self._ogg.close()


class OpusRecorder:
    """Hands out one OpusTap per stream: PATH.opus, then PATH-2.opus, PATH-3.opus..."""

    def __init__(self, path: str | Path) -> None:
        self.base = Path(path)
        self.streams = 0
        self._lock = threading.Lock()
        OggOpusWriter(self.base, 2, 48_000, 0).close()  # fail now, before listening, if it cannot be written

    def open_stream(self, fmt: AudioFormat, lookahead: int) -> OpusTap:
        with self._lock:
            self.streams += 1
            n = self.streams
        path = self.base if n == 1 else self.base.with_name(f"{self.base.stem}-{n}{self.base.suffix}")
        return OpusTap(path, fmt, lookahead)
