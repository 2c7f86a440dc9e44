"""Drift compensation's converters in numbers: what ``recv --resampler linear`` gives up for its CPU.

Decoded Opus speech (tests/data/speech.wav at the sender's defaults) is drift-compensated frame by frame
at 100 ppm, as the playout does, by each converter; libsamplerate's ``sinc_best`` is the reference.
Everything here is computed, not timed: the figures are the same on every machine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from tests.helpers.signals import align, snr_db, trim_aligned
from tiality_cli.codec import OpusDecoder, OpusEncoder
from tiality_cli.config import AudioFormat, CodecConfig
from tiality_cli.resample import Resampler
from tiality_cli.wavfile import read_wav

F32 = npt.NDArray[np.float32]
FMT = AudioFormat(48_000, 2, 20_000)
SPEECH = Path(__file__).parent / "data" / "speech.wav"
PPM = 100.0


def compensate(x: F32, converter: str, ppm: float = PPM) -> F32:
    """``x`` through one converter at 1 + ppm, a 20 ms frame per call (the playout's calls)."""
    n = FMT.frame_samples
    r = Resampler(converter, x.shape[1], n)
    out = []
    for i in range(0, len(x) - n + 1, n):
        m = r.process(np.ascontiguousarray(x[i : i + n]), 1 + ppm * 1e-6)
        out.append(r.output[:m].copy())
    r.close()
    return np.concatenate(out)


def snr_after(reference: F32, other: F32) -> float:
    """SNR of ``other`` against ``reference`` once aligned (the converters hold back different amounts),
    the first and last 0.1 s left out, no gain matched: a converter's dulling counts as error."""
    ref, got = trim_aligned(reference[4800:-4800], other, align(reference[4800:-4800], other, 4800 + 64))
    return snr_db(ref, got, match_gain=False)


@pytest.fixture(scope="module")
def decoded() -> tuple[F32, F32]:
    """(the speech in both channels, the same after an Opus round trip at the defaults), aligned."""
    mono, _ = read_wav(SPEECH)
    speech = np.repeat(mono[:, :1], 2, axis=1)
    n = FMT.frame_samples
    enc, dec = OpusEncoder(FMT, CodecConfig()), OpusDecoder(48_000, 2, n)
    out = []
    for i in range(0, len(speech) - n + 1, n):
        enc.input[:] = np.round(speech[i : i + n] * 32767).astype(np.int16)
        got = dec.decode(enc.encode())
        out.append(dec.output[:got].astype(np.float32) / 32768)
    coded = np.concatenate(out)[enc.lookahead :]
    enc.close()
    dec.close()
    return speech[: len(coded)], np.asarray(coded, dtype=np.float32)


def test_linear_drift_compensation_stays_far_below_the_codecs_own_error(decoded: tuple[F32, F32]) -> None:
    speech, coded = decoded
    reference = compensate(coded, "sinc_best")
    codec = snr_after(speech, coded)
    fastest = snr_after(reference, compensate(coded, "sinc_fastest"))
    linear = snr_after(reference, compensate(coded, "linear"))
    print(f"Opus {codec:.1f} dB; after it at {PPM:g} ppm: sinc_fastest {fastest:.1f}, linear {linear:.1f} dB")
    assert fastest >= 85.0  # measured: 90.4 dB
    assert linear >= 37.0  # measured: 40.9 dB (Opus itself: 11.3 dB, its voip high-pass included)
    # The codec's error is the larger by far: what linear adds is over 25 dB below it.
    assert linear - codec >= 25.0


@pytest.mark.parametrize(("freq", "low", "high"), [(4_000, 0.2, 0.4), (12_000, 2.5, 3.3)])
def test_linear_dulls_high_tones_in_a_slow_swing_and_sinc_does_not(
    freq: int, low: float, high: float
) -> None:
    """Linear interpolation between two samples is a low-pass whose depth follows the fractional
    position, which drift sweeps once per 1 / (48 kHz x 100 ppm) = 0.21 s: a high tone's level swings
    (in theory 20 log10(1 / cos(pi f / fs)): 0.30 dB at 4 kHz, 3.0 dB at 12 kHz). sinc_fastest holds it."""
    t = np.arange(48_000 * 3) / 48_000
    tone = np.repeat((0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)[:, None], 2, axis=1)

    def swing_db(converter: str) -> float:
        y = compensate(tone, converter)[4800:-4800, 0].astype(np.float64)
        levels = [np.sqrt(2 * np.mean(y[i : i + 480] ** 2)) for i in range(0, len(y) - 480, 480)]
        return float(20 * np.log10(max(levels) / min(levels)))

    assert low <= swing_db("linear") <= high  # measured: 0.29 and 2.90 dB
    assert swing_db("sinc_fastest") < 0.05  # measured: 0.001 dB
