"""Shared fixtures: ``sound_card``, the virtual PulseAudio sound card (tests/helpers/soundcard.py), and
``rx``, a receiver playing to null://."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.helpers.soundcard import SoundCardError, VirtualSoundCard, reinit_portaudio, start_sound_card
from tiality_cli.io.files import NullSink
from tiality_cli.receiver import Receiver, ReceiverConfig


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "soundcard: needs the virtual PulseAudio sound card (session fixture)")


@pytest.fixture(scope="session")
def sound_card(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VirtualSoundCard]:
    """A private PulseAudio server with mic/spk null sinks, selected for this process and its children.

    Sets XDG_RUNTIME_DIR, ALSA_CONFIG_PATH and PULSE_SERVER in os.environ for the session, and makes an
    already imported sounddevice list the new devices. Fails (never skips) when the card cannot start.
    """
    try:
        card = start_sound_card(tmp_path_factory.getbasetemp())
    except SoundCardError as exc:
        pytest.fail(f"virtual sound card unavailable: {exc}", pytrace=False)
    saved = {name: os.environ.get(name) for name in card.env}
    os.environ.update(card.env)
    reinit_portaudio()
    try:
        yield card
    finally:
        card.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture
def rx() -> Iterator[Receiver]:
    """A receiver of this test's own on a loopback port, playing to null:// (the examples of a hypothesis
    test share it)."""
    r = Receiver(NullSink(), ReceiverConfig(port=0, bind="127.0.0.1"))
    r.start()
    yield r
    r.stop()
