"""The comparison helpers recover known lags, SNRs, gaps and click times, to the sample or the dB."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import pytest

from tests.helpers.signals import (
    SPEECH_RATE,
    align,
    click_train,
    correlation,
    detect_clicks,
    find_dropouts,
    follow_warp,
    load_speech,
    rms_dbfs,
    segmental_snr_db,
    snr_db,
    tone,
    trim_aligned,
    white_noise,
)

RATE = 48_000


def silence(frames: int, channels: int = 1) -> npt.NDArray[np.float32]:
    return np.zeros((frames, channels), dtype=np.float32)


def test_speech_fixture_is_6_s_of_48_khz_mono_peaking_at_minus_3_dbfs() -> None:
    speech = load_speech()

    assert speech.shape[1] == 1
    assert 5.5 * SPEECH_RATE <= speech.shape[0] <= 6.5 * SPEECH_RATE
    assert 20 * math.log10(float(np.max(np.abs(speech)))) == pytest.approx(-3.0, abs=0.1)
    assert -30 < rms_dbfs(speech) < -15


def test_align_finds_a_known_lag_in_noisy_quieter_longer_speech() -> None:
    speech = load_speech()
    late = np.concatenate([silence(1234), 0.25 * speech, silence(4000)])
    received = late + white_noise(late.shape[0], rms_dbfs=-45, seed=1)  # about 10 dB SNR

    assert align(speech, received, max_lag_samples=RATE) == 1234


def test_align_finds_a_negative_lag_and_mixes_channels() -> None:
    speech = load_speech()
    early_stereo = np.repeat(speech[500:], 2, axis=1) * np.array([0.9, 0.1], dtype=np.float32)

    assert align(speech, early_stereo, max_lag_samples=2000) == -500


def test_align_stays_within_max_lag() -> None:
    speech = load_speech()
    received = np.concatenate([silence(3000), speech])

    assert align(speech, received, max_lag_samples=3000) == 3000
    assert abs(align(speech, received, max_lag_samples=1000)) <= 1000


def test_align_rejects_a_silent_signal() -> None:
    with pytest.raises(ValueError, match="received signal is silent"):
        align(load_speech(), silence(1000), max_lag_samples=100)


def test_trim_aligned_pairs_reference_n_with_received_n_plus_lag() -> None:
    reference = np.arange(10, dtype=np.float64)
    received = np.concatenate([np.full(3, -1.0), reference[:8]])

    ref, rec = trim_aligned(reference, received, 3)

    assert ref.tolist() == rec.tolist() == list(range(8))
    ref, rec = trim_aligned(reference, reference[2:], -2)
    assert ref.tolist() == rec.tolist() == list(range(2, 10))


def test_snr_of_a_tone_with_noise_20_db_down_is_20_db_whatever_the_gain() -> None:
    clean = tone(997, 2.0, RATE, level_dbfs=-10.0)  # mean square -13 dBFS
    noise = white_noise(clean.shape[0], rms_dbfs=-33.0, seed=2)

    assert snr_db(clean, clean + noise) == pytest.approx(20.0, abs=0.2)
    assert snr_db(clean, 0.3 * (clean + noise)) == pytest.approx(20.0, abs=0.2)
    assert snr_db(clean, 0.3 * (clean + noise), match_gain=False) < 5.0
    assert snr_db(clean, clean) == math.inf


def test_segmental_snr_of_speech_plus_noise_matches_the_expected_value() -> None:
    speech = load_speech().astype(np.float64)
    noise_dbfs = -40.0
    received = speech + white_noise(speech.shape[0], rms_dbfs=noise_dbfs, seed=3)
    # Expected: each loud 20 ms segment's power over the known noise power, clamped, averaged.
    seg = RATE // 50
    powers = np.mean(speech[: speech.shape[0] // seg * seg].reshape(-1, seg) ** 2, axis=1)
    loud = 10 * np.log10(powers + 1e-30) >= -50.0
    expected = float(np.mean(np.clip(10 * np.log10(powers[loud]) - noise_dbfs, -10.0, 35.0)))

    measured = segmental_snr_db(speech, received, RATE)

    assert 5.0 < expected < 30.0  # the clamp and the silence gate matter, but do not decide alone
    assert measured == pytest.approx(expected, abs=1.0)


def test_segmental_snr_of_a_tone_with_noise_20_db_down_is_20_db() -> None:
    clean = tone(997, 1.0, RATE, channels=2, level_dbfs=-10.0)
    noise = white_noise(clean.shape[0], rms_dbfs=-33.0, channels=2, seed=4)

    assert segmental_snr_db(clean, clean + noise, RATE) == pytest.approx(20.0, abs=1.0)


def test_segmental_snr_clamps_and_skips_silent_segments() -> None:
    speech = load_speech()
    one_lost = speech.copy()
    one_lost[RATE : RATE + 960] = 0  # a 20 ms segment lost: clamped at -10 dB, not -inf

    assert segmental_snr_db(speech, speech, RATE) == 35.0
    assert 33.0 < segmental_snr_db(speech, one_lost, RATE) < 35.0
    whisper = tone(997, 1.0, RATE, level_dbfs=-60.0)
    with pytest.raises(ValueError, match=r"no 20\.0 ms segment of the reference is above -50\.0 dBFS"):
        segmental_snr_db(whisper, whisper, RATE)


def test_find_dropouts_finds_an_inserted_20_ms_gap() -> None:
    signal = tone(997, 1.0, RATE, channels=2)
    signal[19_200 : 19_200 + 960] = 0

    assert find_dropouts(signal, RATE) == [(19_200, 960)]


def test_find_dropouts_finds_nothing_in_continuous_signals() -> None:
    assert find_dropouts(tone(997, 1.0, RATE), RATE) == []
    assert find_dropouts(white_noise(RATE, rms_dbfs=-60.0, seed=5), RATE) == []
    assert find_dropouts(tone(50, 1.0, RATE, level_dbfs=-60.0), RATE) == []


def test_find_dropouts_reports_leading_and_trailing_silence_only_when_asked() -> None:
    signal = np.concatenate([silence(480), tone(997, 0.5, RATE, phase=1.0), silence(960)])
    as_int16 = (signal * 32767).astype(np.int16)

    assert find_dropouts(as_int16, RATE) == []
    assert find_dropouts(as_int16, RATE, include_edges=True) == [(0, 480), (24_480, 960)]


def test_detect_clicks_recovers_onsets_to_the_sample() -> None:
    train = click_train(RATE, 0.25, 8, start_s=0.1)
    delay = 777
    received = 0.5 * np.concatenate([silence(delay), train.signal])
    received += white_noise(received.shape[0], rms_dbfs=-50.0, seed=6)

    onsets = detect_clicks(received, RATE, threshold=0.1)

    assert train.onsets.tolist() == [round((0.1 + 0.25 * k) * RATE) for k in range(8)]
    assert onsets.shape == train.onsets.shape
    assert np.max(np.abs(onsets - (train.onsets + delay))) <= 1


def test_correlation_is_one_for_a_scaled_copy_and_near_zero_for_unrelated_audio() -> None:
    speech = load_speech()
    noise = white_noise(speech.shape[0], rms_dbfs=-20.0, seed=7)

    assert correlation(speech, 0.2 * speech + 0.01) == pytest.approx(1.0, abs=1e-6)
    assert correlation(speech, -speech) == pytest.approx(-1.0, abs=1e-6)
    assert abs(correlation(speech, noise)) < 0.01
    with pytest.raises(ValueError, match="constant"):
        correlation(speech, silence(speech.shape[0]))


def test_tone_has_the_asked_shape_level_and_frequency() -> None:
    x = tone(1000, 0.5, RATE, channels=2, level_dbfs=-12.0)
    spectrum = np.abs(np.fft.rfft(x[:, 0]))

    assert x.shape == (24_000, 2) and x.dtype == np.float32
    assert np.array_equal(x[:, 0], x[:, 1])
    assert float(np.max(np.abs(x))) == pytest.approx(10 ** (-12 / 20), rel=1e-4)
    assert rms_dbfs(x) == pytest.approx(-15.01, abs=0.02)
    assert np.argmax(spectrum) * RATE / x.shape[0] == 1000


def slid(x: npt.NDArray[np.float64], slope: float, start: int, stop: int) -> npt.NDArray[np.float64]:
    """``x`` read on a timeline that runs ``slope`` fast between ``start`` and ``stop`` (a steered ratio)."""
    t = np.arange(len(x), dtype=np.float64)
    out: npt.NDArray[np.float64] = np.interp(
        t + np.cumsum(np.where((t > start) & (t < stop), slope, 0.0)), t, x
    )
    return out


def test_follow_warp_undoes_the_playouts_fastest_steer_and_nothing_else() -> None:
    speech = load_speech()[RATE : RATE + 38_400, 0].astype(np.float64)
    # 0.5 % for 0.4 s (the steering limit): the timeline slides 2 ms, which ruins a waveform comparison.
    steered = slid(speech, 0.005, 9_600, 28_800)
    assert segmental_snr_db(speech, steered, RATE) < 0.0
    assert segmental_snr_db(speech, follow_warp(speech, steered, RATE, max_shift_ms=10.0), RATE) >= 25.0
    # Drift (100 ppm all along) and a fixed 1.3-sample offset are followed to better than 28 dB.
    assert segmental_snr_db(speech, follow_warp(speech, slid(speech, 1e-4, 0, 38_400), RATE), RATE) >= 28.0
    offset = np.interp(np.arange(38_400) - 1.3, np.arange(38_400), speech)
    assert segmental_snr_db(speech, follow_warp(speech, offset, RATE), RATE) >= 28.0
    # A 10 ms dropout is timing it cannot undo: the gap stays in the output, and in the SNR.
    gapped = steered.copy()
    gapped[19_200:19_680] = 0.0
    warped = follow_warp(speech, gapped, RATE, max_shift_ms=10.0)
    natural = find_dropouts(speech, RATE, min_ms=5)  # the recording's own digital silences
    found = find_dropouts(warped, RATE, min_ms=5)
    new = [d for d in found if all(abs(d[0] - n[0]) > 100 for n in natural)]
    assert len(new) == 1 and abs(new[0][0] - 19_200) <= 100 and new[0][1] >= 400, (new, natural)
    nothing = snr_db(speech[19_248:19_680], warped[19_248:19_680], match_gain=False)
    assert nothing < 1.0  # none of the speech is there
    # ... and the line carries on past it: the speech after the gap is followed as well as before.
    assert segmental_snr_db(speech[20_160:], warped[20_160:], RATE) >= 25.0
