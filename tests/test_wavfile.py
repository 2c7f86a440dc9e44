"""WAV files: every layout read_wav claims to read, files sox writes, and a WavWriter killed mid-write.

Layouts are built byte by byte here (so the expected samples are known exactly) and also converted
by sox (so the reader meets real-world headers: WAVE_FORMAT_EXTENSIBLE, 'fact' chunks).
"""

from __future__ import annotations

import signal
import struct
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from tiality_cli.errors import SourceError
from tiality_cli.wavfile import WavWriter, read_wav, write_wav

_F32 = npt.NDArray[np.float32]
_EXT = 0xFFFE  # WAVE_FORMAT_EXTENSIBLE
_KSDATAFORMAT_TAIL = bytes.fromhex("000000001000800000aa00389b71")  # GUID after the 2-byte format tag


def wav_bytes(
    body: bytes, tag: int, bits: int, channels: int, rate: int = 8000, *, extensible: bool, extra: bytes = b""
) -> bytes:
    """A RIFF/WAVE file: fmt (plain, or WAVE_FORMAT_EXTENSIBLE around ``tag``), ``extra`` chunks, data."""
    block = max(1, channels * bits // 8)
    if extensible:
        fmt = struct.pack("<HHIIHHHHI", _EXT, channels, rate, rate * block, block, bits, 22, bits, 0)
        fmt += struct.pack("<H", tag) + _KSDATAFORMAT_TAIL
    else:
        fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * block, block, bits)
    chunks = (
        b"fmt " + struct.pack("<I", len(fmt)) + fmt + extra + b"data" + struct.pack("<I", len(body)) + body
    )
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks


def _int24(values: list[int]) -> bytes:
    return b"".join(v.to_bytes(3, "little", signed=True) for v in values)


# name: (format tag, bits, file body, expected samples as float32; 6 samples = 3 stereo frames)
_LAYOUTS: dict[str, tuple[int, int, bytes, list[float]]] = {
    "uint8": (1, 8, bytes([0, 1, 127, 128, 129, 255]), [-1.0, -127 / 128, -1 / 128, 0.0, 1 / 128, 127 / 128]),
    "int16": (
        1,
        16,
        struct.pack("<6h", -32768, -1, 0, 1, 32767, 12345),
        [-1.0, -1 / 32768, 0.0, 1 / 32768, 32767 / 32768, 12345 / 32768],
    ),
    "int24": (
        1,
        24,
        _int24([-(1 << 23), -1, 0, 1, (1 << 23) - 1, 1234567]),
        [-1.0, -(2.0**-23), 0.0, 2.0**-23, 1 - 2.0**-23, 1234567 / 2**23],
    ),
    "int32": (
        1,
        32,
        struct.pack("<6i", -(1 << 31), -1, 0, 1 << 16, (1 << 31) - 1, 123456789),
        [-1.0, -(2.0**-31), 0.0, 2.0**-15, 1 - 2.0**-31, 123456789 / 2**31],
    ),
    "float32": (
        3,
        32,
        struct.pack("<6f", -1.0, -0.5, 0.0, 0.25, 1.0, 0.1),
        [-1.0, -0.5, 0.0, 0.25, 1.0, 0.1],
    ),
    "float64": (
        3,
        64,
        struct.pack("<6d", -1.0, -0.5, 0.0, 0.25, 1.0, 0.1),
        [-1.0, -0.5, 0.0, 0.25, 1.0, 0.1],
    ),
}


@pytest.mark.parametrize("extensible", [False, True], ids=["plain", "extensible"])
@pytest.mark.parametrize("layout", list(_LAYOUTS))
def test_reads_every_sample_layout(tmp_path: Path, layout: str, extensible: bool) -> None:
    tag, bits, body, expected = _LAYOUTS[layout]
    path = tmp_path / f"{layout}.wav"
    path.write_bytes(wav_bytes(body, tag, bits, 2, 22050, extensible=extensible))
    x, info = read_wav(path)
    assert (info.sample_rate, info.channels, info.frames, info.sample_format) == (22050, 2, 3, layout)
    assert x.dtype == np.float32 and x.shape == (3, 2)
    assert np.array_equal(x, np.array(expected, np.float32).reshape(3, 2))  # interleaved L, R, L, R...


def _reference(path: Path, channels: int) -> _F32:
    """A 16-bit file written by the stdlib (full-scale noise, both extremes); returns its samples."""
    rng = np.random.default_rng(7)
    x = rng.integers(-32768, 32768, (4000, channels), dtype=np.int16)
    x[0] = -32768
    x[1] = 32767
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(x.tobytes())
    return (x / 32768).astype(np.float32)


@pytest.mark.parametrize(
    ("sox_args", "tags", "name"),  # tags: the format tag sox writes for (1, 4) channels
    [
        (["-b", "16"], (1, _EXT), "int16"),
        (["-b", "24"], (_EXT, _EXT), "int24"),  # sox writes > 16 bits or > 2 channels as EXTENSIBLE
        (["-t", "wavpcm", "-b", "24"], (1, 1), "int24"),
        (["-b", "32"], (_EXT, _EXT), "int32"),
        (["-e", "floating-point", "-b", "32"], (3, 3), "float32"),  # with a 'fact' chunk before 'data'
        (["-e", "floating-point", "-b", "64"], (3, 3), "float64"),
        (["-e", "unsigned-integer", "-b", "8"], (1, _EXT), "uint8"),
    ],
)
@pytest.mark.parametrize("channels", [1, 4])
def test_reads_what_sox_writes(
    tmp_path: Path, sox_args: list[str], tags: tuple[int, int], name: str, channels: int
) -> None:
    ref_path, path = tmp_path / "ref.wav", tmp_path / "sox.wav"
    ref = _reference(ref_path, channels)
    subprocess.run(["sox", "-D", str(ref_path), *sox_args, str(path)], check=True, timeout=30)
    header_tag = struct.unpack_from("<H", path.read_bytes(), 20)[0]
    assert header_tag == tags[channels > 1]
    x, info = read_wav(path)
    assert (info.sample_rate, info.channels, info.frames, info.sample_format) == (16000, channels, 4000, name)
    if name == "uint8":  # sox rounds 16 bits to 8 (half a step), clipping at +127/128 (one step)
        assert np.abs(x - ref).max() <= 1 / 128
        assert np.abs(x - ref)[ref < 127 / 128].max() <= 1 / 256
    else:  # widening is exact
        assert np.array_equal(x, ref)


@pytest.mark.parametrize("channels", [1, 2])
def test_write_wav_round_trip_and_sox_agrees(tmp_path: Path, channels: int) -> None:
    rng = np.random.default_rng(1)
    pcm = rng.integers(-32768, 32768, (12345, channels), dtype=np.int16)
    path = tmp_path / "rt.wav"
    write_wav(path, pcm[:, 0] if channels == 1 else pcm, 48000)  # mono may be 1-D
    x, info = read_wav(path)
    assert (info.sample_rate, info.channels, info.frames, info.sample_format) == (
        48000,
        channels,
        12345,
        "int16",
    )
    assert np.array_equal(np.round(x * 32768).astype(np.int16), pcm)
    assert path.stat().st_size == WavWriter.HEADER_BYTES + pcm.nbytes
    soxi = subprocess.run(["sox", "--i", str(path)], capture_output=True, text=True, check=True).stdout
    assert f"Channels       : {channels}\n" in soxi
    assert "Sample Rate    : 48000\n" in soxi
    assert "= 12345 samples" in soxi
    raw = subprocess.run(["sox", str(path), "-t", "s16", "-"], capture_output=True, check=True).stdout
    assert raw == pcm.tobytes()


def test_truncated_file_keeps_its_whole_frames(tmp_path: Path) -> None:
    path = tmp_path / "cut.wav"
    full = wav_bytes(struct.pack("<8h", *range(8)), 1, 16, 2, extensible=False)
    path.write_bytes(full[:-6])  # the data chunk claims 4 frames; 2.5 are left
    x, info = read_wav(path)
    assert info.frames == 2
    assert np.array_equal(x * 32768, [[0, 1], [2, 3]])


def test_odd_sized_chunks_are_padded(tmp_path: Path) -> None:
    path = tmp_path / "list.wav"
    odd = b"LIST" + struct.pack("<I", 3) + b"abc" + b"\0"  # RIFF pads chunks to an even size
    path.write_bytes(wav_bytes(struct.pack("<2h", 100, -100), 1, 16, 1, extensible=False, extra=odd))
    x, info = read_wav(path)
    assert info.frames == 2
    assert np.array_equal(x[:, 0] * 32768, [100, -100])


def test_errors_name_the_file_and_the_problem(tmp_path: Path) -> None:
    def message(data: bytes | None, name: str = "bad.wav") -> str:
        path = tmp_path / name
        if data is not None:
            path.write_bytes(data)
        with pytest.raises(SourceError) as err:
            read_wav(path)
        return str(err.value)

    assert message(None, "missing.wav") == f"file:{tmp_path / 'missing.wav'}: no such file"
    assert (
        message(b"ID3\x03" + bytes(40))
        == f"file:{tmp_path / 'bad.wav'}: not a WAV file (no RIFF/WAVE header)"
    )
    no_data = wav_bytes(b"", 1, 16, 1, extensible=False)[:-8]
    assert message(no_data).endswith("bad.wav: WAV file without a fmt or data chunk")
    adpcm = wav_bytes(bytes(8), 2, 4, 1, extensible=False)
    assert message(adpcm).endswith("bad.wav: unsupported WAV encoding (format tag 2, 4 bits)")
    alaw_ext = wav_bytes(bytes(8), 6, 8, 1, extensible=True)
    assert message(alaw_ext).endswith("bad.wav: unsupported WAV encoding (format tag 6, 8 bits)")
    (tmp_path / "dir.wav").mkdir()
    assert message(None, "dir.wav").endswith("dir.wav: is a directory, not a WAV file")


_CHILD = """
import sys
import numpy as np
from tiality_cli.wavfile import WavWriter
path, blocks = sys.argv[1], int(sys.argv[2])
ramp = (np.arange(blocks * 960 * 2) % 65536 - 32768).astype(np.int16).reshape(-1, 2)
w = WavWriter(path, 48000, 2)
for i in range(blocks):
    w.write(ramp[i * 960 : (i + 1) * 960])  # 20 ms at a time, as a receiver's sink does
print("written", w.frames, flush=True)
sys.stdin.readline()  # mid-recording; never closed
"""


def test_kill_9_loses_at_most_the_last_second(tmp_path: Path) -> None:
    path, blocks = tmp_path / "killed.wav", 170  # 3.4 s
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path), str(blocks)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == f"written {blocks * 960}\n"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL

    written = blocks * 960
    soxi = subprocess.run(["sox", "--i", "-s", str(path)], capture_output=True, text=True, check=True)
    kept = int(soxi.stdout)
    assert written - 48000 <= kept <= written
    x, info = read_wav(path)
    assert (info.sample_rate, info.channels, info.frames) == (48000, 2, kept)
    ramp = (np.arange(kept * 2) % 65536 - 32768).astype(np.int16).reshape(-1, 2)
    assert np.array_equal(np.round(x * 32768).astype(np.int16), ramp)
    decoded = subprocess.run(["sox", str(path), "-t", "s16", "-"], capture_output=True, check=True)
    assert decoded.stdout == ramp.tobytes()
