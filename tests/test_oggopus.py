"""Ogg Opus recordings, judged by the tools users open them with: opusinfo, opusdec and ffmpeg.

opusdec is libopus, as is our OpusDecoder, so with --no-dither its output must equal our own decode of
the same packets sample for sample; ffmpeg has its own Opus decoder, so it is compared by correlation.
Every file is also parsed page by page here, and must match what RFC 7845 asks of its structure.
"""

from __future__ import annotations

import re
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import numpy.typing as npt
import pytest

from tests.helpers.signals import align, correlation, load_speech
from tiality_cli.codec import OpusDecoder, OpusEncoder
from tiality_cli.config import AudioFormat, CodecConfig
from tiality_cli.errors import ConfigError
from tiality_cli.oggopus import OggOpusWriter, ogg_crc32, opus_packet_samples
from tiality_cli.wavfile import read_wav

_I16 = npt.NDArray[np.int16]
FRAME_48K = 960  # every stream here uses 20 ms frames


class Encoded(NamedTuple):
    packets: list[bytes]
    lookahead: int  # at the input rate
    pcm: _I16  # what went into the encoder, (frames, channels)


class Page(NamedTuple):
    flags: int
    granule: int
    serial: int
    seq: int
    crc: int
    lacing: bytes
    raw: bytes  # the whole page


def encode(rate: int, channels: int, seconds: float, cfg: CodecConfig | None = None) -> Encoded:
    """Speech (the second channel plays it backwards, so a channel mix-up shows) as 20 ms Opus packets."""
    speech = load_speech()[:: 48_000 // rate, 0]
    n_frames = round(seconds * 50)
    fmt = AudioFormat(rate, channels, 20_000)
    n = fmt.frame_samples
    x = np.resize(speech, n * n_frames)
    chans = [x, 0.7 * x[::-1]][:channels]
    pcm = (np.stack(chans, axis=1) * 32767).astype(np.int16)
    enc = OpusEncoder(fmt, cfg or CodecConfig())
    packets = []
    for i in range(n_frames):
        enc.input[:] = pcm[i * n : (i + 1) * n]
        packets.append(enc.encode())
    lookahead = enc.lookahead
    enc.close()
    return Encoded(packets, lookahead, pcm)


def own_decode(packets: list[bytes], channels: int, pre_skip: int) -> _I16:
    """libopus at 48 kHz, lost-frame markers concealed like any packet, minus the pre-skip."""
    dec = OpusDecoder(48_000, channels, FRAME_48K)
    out = []
    for p in packets:
        n = dec.decode(p)
        out.append(dec.output[:n].copy())
    dec.close()
    return np.concatenate(out)[pre_skip:]


def as_int16(path: Path) -> _I16:
    x, _ = read_wav(path)
    return np.round(x * 32768.0).astype(np.int16)


def opusdec(path: Path, rate: int = 48_000) -> _I16:
    out = path.with_suffix(f".opusdec{rate}.wav")
    args = ["opusdec", "--quiet", "--no-dither", "--rate", str(rate), str(path), str(out)]
    subprocess.run(args, check=True, capture_output=True, timeout=30)
    return as_int16(out)


def ffmpeg(path: Path) -> tuple[_I16, str]:
    """ffmpeg's own decoder (not libopus) to 16-bit WAV; also returns ffmpeg's warnings."""
    out = path.with_suffix(".ffmpeg.wav")
    args = ["ffmpeg", "-nostdin", "-v", "warning", "-y", "-i", str(path), str(out)]
    proc = subprocess.run(args, check=True, capture_output=True, text=True, timeout=30)
    return as_int16(out), proc.stderr


def opusinfo(path: Path, warning: str | None = None) -> str:
    """opusinfo's report; it exits 1 on any warning, so the one warning expected (if any) is named."""
    proc = subprocess.run(["opusinfo", str(path)], capture_output=True, text=True, timeout=30)
    text = proc.stdout + proc.stderr
    warnings = re.findall(r"WARNING: (.*)", text)
    assert warnings == ([] if warning is None else [warning]), text
    assert proc.returncode == (0 if warning is None else 1), text
    assert not re.search(r"error|hole", text, re.IGNORECASE), text
    return text


def pages(path: Path) -> list[Page]:
    data = path.read_bytes()
    out, pos = [], 0
    while pos < len(data):
        capture, version, flags, granule, serial, seq, crc, nseg = struct.unpack_from("<4sBBqIIIB", data, pos)
        assert (capture, version) == (b"OggS", 0), f"no page at byte {pos}"
        lacing = data[pos + 27 : pos + 27 + nseg]
        end = pos + 27 + nseg + sum(lacing)
        assert ogg_crc32(data[pos : pos + 22] + b"\0\0\0\0" + data[pos + 26 : end]) == crc, f"page {seq}"
        out.append(Page(flags, granule, serial, seq, crc, lacing, data[pos:end]))
        pos = end
    return out


def packets_of(path: Path) -> list[bytes]:
    """Every packet in the file, headers included, reassembled across segments and pages."""
    out, cur = [], bytearray()
    for p in pages(path):
        pos = 27 + len(p.lacing)
        for n in p.lacing:
            cur += p.raw[pos : pos + n]
            pos += n
            if n < 255:
                out.append(bytes(cur))
                cur.clear()
    return out


def check_structure(path: Path, channels: int, pre_skip: int, total_48k: int, closed: bool = True) -> None:
    """RFC 7845 sections 3 and 4, as far as a reader relies on them."""
    ps = pages(path)
    assert [p.seq for p in ps] == list(range(len(ps)))
    assert len({p.serial for p in ps}) == 1
    assert ps[0].flags == 0x02 and ps[0].granule == 0 and len(ps[0].lacing) == 1  # BOS, ID header alone
    assert all(p.flags & 0x02 == 0 for p in ps[1:])
    assert ps[1].granule == 0 and ps[1].lacing[-1] < 255  # the comment header ends its page
    head, tags = packets_of(path)[:2]
    assert tags.startswith(b"OpusTags\x07\0\0\0tiality")
    assert head[:8] == b"OpusHead" and head[8] == 1 and head[9] == channels
    assert int.from_bytes(head[10:12], "little") == pre_skip
    granules = [p.granule for p in ps if p.granule != -1]
    assert granules == sorted(granules) and granules[-1] == total_48k
    assert [p.flags & 0x04 != 0 for p in ps] == [False] * (len(ps) - 1) + [closed]


def write(path: Path, enc: Encoded, rate: int, channels: int) -> int:
    """Writes every packet; returns the pre-skip at 48 kHz that the header must hold."""
    with OggOpusWriter(path, channels, rate, enc.lookahead) as w:
        for p in enc.packets:
            w.write_packet(p, FRAME_48K)
        assert w.granule == len(enc.packets) * FRAME_48K
    return enc.lookahead * 48_000 // rate


def test_crc_is_ogg_crc32_not_zlib() -> None:
    # CRC-32/CKSUM's catalogue check value is 0x765e7680; Ogg's CRC is the same without the final xor.
    assert ogg_crc32(b"123456789") == 0x765E7680 ^ 0xFFFFFFFF
    assert ogg_crc32(b"123456789") != zlib.crc32(b"123456789")


def test_crc_matches_libogg_on_pages_written_by_opusenc(tmp_path: Path) -> None:
    wav, opus = tmp_path / "in.wav", tmp_path / "ref.opus"
    subprocess.run(
        ["sox", "-n", "-r", "48000", "-c", "2", "-b", "16", str(wav), "synth", "1.5", "pinknoise"], check=True
    )
    subprocess.run(["opusenc", "--quiet", str(wav), str(opus)], check=True, timeout=30)
    ps = pages(opus)
    assert len(ps) >= 3
    for p in ps:
        assert ogg_crc32(p.raw[:22] + b"\0\0\0\0" + p.raw[26:]) == p.crc


def test_packet_duration_comes_from_the_toc() -> None:
    assert opus_packet_samples(bytes([31 << 3])) == 960  # CELT FB 20 ms, one frame
    assert opus_packet_samples(bytes([(28 << 3) | 4 | 1, 0, 0])) == 240  # CELT 2.5 ms, two frames
    assert opus_packet_samples(bytes([(3 << 3) | 3, 2])) == 5760  # SILK NB 60 ms, two frames
    assert opus_packet_samples(bytes([(13 << 3) | 3, 0x83])) == 2880  # hybrid 20 ms x 3, VBR flag
    with pytest.raises(ValueError, match="empty Opus packet"):
        opus_packet_samples(b"")


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("rate", [16_000, 48_000])
def test_recording_plays_in_opusinfo_opusdec_and_ffmpeg(tmp_path: Path, rate: int, channels: int) -> None:
    enc = encode(rate, channels, 2.5)
    path = tmp_path / "rec.opus"
    pre_skip = write(path, enc, rate, channels)
    total = len(enc.packets) * FRAME_48K
    assert pre_skip == 120  # restricted-lowdelay: 2.5 ms at any rate

    check_structure(path, channels, pre_skip, total)
    assert packets_of(path)[2:] == enc.packets  # stored as sent: no re-encoding

    info = opusinfo(path)
    assert f"Channels: {channels}\n" in info
    assert f"Pre-skip: {pre_skip}\n" in info
    assert f"Original sample rate: {rate} Hz" in info
    assert "Playback length: 0m:02.497s" in info

    ours = own_decode(enc.packets, channels, pre_skip)
    assert ours.shape == (total - pre_skip, channels)
    got = opusdec(path)
    assert got.shape == ours.shape
    assert np.array_equal(got, ours)  # the same libopus, the same packets, no dither

    ff, warnings = ffmpeg(path)
    assert warnings == ""
    assert ff.shape == ours.shape
    assert correlation(ff, ours) > 0.999


@pytest.mark.parametrize(
    ("rate", "application", "pre_skip"),
    [(16_000, "restricted-lowdelay", 120), (48_000, "restricted-lowdelay", 120), (16_000, "voip", 312)],
)
def test_pre_skip_lines_the_recording_up_with_the_input(
    tmp_path: Path, rate: int, application: str, pre_skip: int
) -> None:
    enc = encode(rate, 1, 2.0, CodecConfig(application=application))
    path = tmp_path / "rec.opus"
    assert write(path, enc, rate, 1) == pre_skip
    assert f"Pre-skip: {pre_skip}\n" in opusinfo(path)
    got = opusdec(path, rate)  # at the input rate, opusdec skips pre_skip * rate / 48000 samples
    assert len(got) == len(enc.pcm) - enc.lookahead
    assert align(enc.pcm, got, 400) == 0


def test_lost_frames_keep_the_timing_and_are_concealed(tmp_path: Path) -> None:
    enc = encode(48_000, 2, 3.0)
    lost = set(range(60, 75)) | {100}
    path = tmp_path / "lossy.opus"
    with OggOpusWriter(path, 2, 48_000, enc.lookahead) as w:
        w.write_gap(3 * FRAME_48K)  # lost before the first packet: no TOC seen yet
        i = 0
        while i < len(enc.packets):
            if i in lost:  # the receiver reports each run of missing frames once
                run = next(j for j in range(i, len(enc.packets) + 1) if j not in lost) - i
                w.write_gap(run * FRAME_48K)
                i += run
            else:
                w.write_packet(enc.packets[i], FRAME_48K)
                i += 1
        w.write_gap(FRAME_48K + 240)  # 25 ms: one 20 ms frame and one 5 ms CELT frame
    n_frames = 3 + len(enc.packets)
    total = n_frames * FRAME_48K + FRAME_48K + 240
    check_structure(path, 2, 120, total)
    stored = packets_of(path)[2:]
    assert stored[:3] == [bytes([(31 << 3) | 4])] * 3  # no TOC seen yet: CELT 20 ms, stereo
    assert stored[-2:] == [bytes([enc.packets[-1][0] & 0xFC]), bytes([(29 << 3) | 4])]  # + CELT 5 ms
    assert stored[3 + 60 : 3 + 75] == [bytes([enc.packets[59][0] & 0xFC])] * 15  # the stream's TOC
    assert len(stored) == n_frames + 2
    assert sum(opus_packet_samples(p) for p in stored) == total

    info = opusinfo(path)
    assert "Playback length: 0m:03.082s" in info  # 3 s + 3 lost frames in front + 25 ms after, - 2.5 ms
    ours = own_decode(stored, 2, 120)
    assert ours.shape == (total - 120, 2)
    assert np.array_equal(opusdec(path), ours)
    ff, warnings = ffmpeg(path)
    assert warnings == ""
    assert ff.shape == ours.shape

    # Timing is kept: long after the gap, the audio is where a loss-free decode puts it.
    clean = own_decode(enc.packets, 2, 120)
    tail = slice(3 * FRAME_48K + 110 * FRAME_48K - 120, 3 * FRAME_48K + 150 * FRAME_48K - 120)
    ref = clean[110 * FRAME_48K - 120 : 150 * FRAME_48K - 120]
    assert correlation(ours[tail], ref) > 0.99
    assert correlation(ff[tail], ref) > 0.99


def test_gap_must_be_whole_2_5_ms(tmp_path: Path) -> None:
    with OggOpusWriter(tmp_path / "x.opus", 1, 48_000, 120) as w, pytest.raises(ValueError, match=r"2\.5 ms"):
        w.write_gap(100)


def _pad(packet: bytes, size: int) -> bytes:
    """The same audio as a code-3 packet padded to ``size`` bytes (RFC 6716, section 3.2.5)."""
    assert packet[0] & 3 == 0  # a one-frame (code 0) packet
    frame = packet[1:]
    # TOC, count byte (one frame, padded), length bytes (255 = 254 more and another byte), frame, zeros.
    k, last = divmod(size - 3 - len(frame), 255)
    return bytes([packet[0] | 3, 0x41]) + b"\xff" * k + bytes([last]) + frame + bytes(254 * k + last)


def test_big_packets_span_segments_and_pages(tmp_path: Path) -> None:
    enc = encode(48_000, 2, 2.0, CodecConfig(bitrate=510_000))
    packets = list(enc.packets)
    packets[30] = _pad(packets[30], 140_000)  # more than two pages can hold (255 x 255 bytes each)
    assert opus_packet_samples(packets[30]) == FRAME_48K
    path = tmp_path / "big.opus"
    with OggOpusWriter(path, 2, 48_000, enc.lookahead) as w:
        for p in packets:
            w.write_packet(p)  # duration read from the TOC
    check_structure(path, 2, 120, len(packets) * FRAME_48K)
    ps = pages(path)
    assert any(p.flags & 0x01 for p in ps)  # a page that starts with the tail of a packet
    assert any(p.granule == -1 for p in ps)  # a page on which no packet ends
    assert max(len(p.lacing) for p in ps) == 255
    assert packets_of(path)[2:] == packets
    ours = own_decode(packets, 2, 120)
    assert np.array_equal(opusdec(path), ours)
    ff, _ = ffmpeg(path)
    assert ff.shape == ours.shape and correlation(ff, ours) > 0.999


@pytest.mark.parametrize("n_packets", [0, 50])
def test_close_with_nothing_pending_still_marks_the_end(tmp_path: Path, n_packets: int) -> None:
    enc = encode(48_000, 1, 1.0)
    path = tmp_path / "short.opus"
    with OggOpusWriter(path, 1, 48_000, enc.lookahead, stream_serial=1234) as w:
        for p in enc.packets[:n_packets]:
            w.write_packet(p)
    check_structure(path, 1, 120, n_packets * FRAME_48K)
    assert {p.serial for p in pages(path)} == {1234}
    info = opusinfo(path, None if n_packets else "stream 1 is empty")
    assert "serial: 000004d2" in info
    if n_packets:
        assert len(opusdec(path)) == n_packets * FRAME_48K - 120
        assert len(ffmpeg(path)[0]) == n_packets * FRAME_48K - 120


def test_misuse_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="3 channels"):
        OggOpusWriter(tmp_path / "x.opus", 3, 48_000, 120)
    w = OggOpusWriter(tmp_path / "x.opus", 1, 48_000, 120)
    with pytest.raises(ValueError, match="empty Opus packet"):
        w.write_packet(b"")
    w.close()
    w.close()
    with pytest.raises(ValueError, match="closed"):
        w.write_packet(b"\xf8")


_CHILD = """
import sys
from tiality_cli.oggopus import OggOpusWriter
path, blob, lookahead = sys.argv[1], open(sys.argv[2], "rb").read(), int(sys.argv[3])
w = OggOpusWriter(path, 2, 48000, lookahead)
pos = 0
while pos < len(blob):
    n = int.from_bytes(blob[pos : pos + 2], "little")
    w.write_packet(blob[pos + 2 : pos + 2 + n], 960)
    pos += 2 + n
print("written", w.granule, flush=True)
sys.stdin.readline()  # mid-stream, as a receiver waiting for its next packet; never closed
"""


def test_kill_9_loses_at_most_the_last_second(tmp_path: Path) -> None:
    enc = encode(48_000, 2, 3.7)
    blob = tmp_path / "packets.bin"
    blob.write_bytes(b"".join(len(p).to_bytes(2, "little") + p for p in enc.packets))
    path = tmp_path / "killed.opus"
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path), str(blob), str(enc.lookahead)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line == f"written {len(enc.packets) * FRAME_48K}\n"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL

    kept = packets_of(path)[2:]
    assert kept == enc.packets[: len(kept)]
    written = len(enc.packets) * FRAME_48K
    assert written - 48_000 <= len(kept) * FRAME_48K <= written
    check_structure(path, 2, 120, len(kept) * FRAME_48K, closed=False)

    info = opusinfo(path, "EOS not set on stream 1 (normal for live streams)")
    ms = (len(kept) * FRAME_48K - 120) // 48  # opusinfo truncates to the millisecond
    assert f"Playback length: 0m:{ms // 1000:02d}.{ms % 1000:03d}s" in info
    ours = own_decode(enc.packets, 2, 120)
    got = opusdec(path)
    assert len(got) == len(kept) * FRAME_48K - 120
    assert np.array_equal(got, ours[: len(got)])
    ff, _ = ffmpeg(path)
    assert len(ff) == len(got)
    assert correlation(ff, got) > 0.999
