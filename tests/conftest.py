"""Shared fixtures: ``sound_card``, the virtual PulseAudio sound card (tests/helpers/soundcard.py), and
``rx``, a receiver playing to null://."""

from __future__ import annotations

import gc
import itertools
import os
from collections.abc import Iterator

import pytest

from tests.helpers.soundcard import SoundCardError, VirtualSoundCard, reinit_portaudio, start_sound_card
from tiality_cli.io.files import NullSink
from tiality_cli.receiver import Receiver, ReceiverConfig

pytest_plugins = ("tests.helpers.stalls",)  # a failure during a host stall runs again


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "soundcard: needs the virtual PulseAudio sound card (session fixture)")


_tests_run = itertools.count()


@pytest.fixture(autouse=True)
def _frozen_heap(request: pytest.FixtureRequest) -> Iterator[None]:
    """Each test runs with the objects that came before it frozen out of the collector, as the CLI runs
    with its start-up frozen (``cli/common.long_work``). A full collection of a pytest session's heap
    (50,000+ objects) holds the GIL for about 40 ms on this machine, which a real-time test hears as
    concealed and late frames: a stall that no product run has. Garbage frozen along the way is
    collected before every real-time test (sound card or slow) and every 20th other one."""
    realtime = "sound_card" in request.fixturenames or request.node.get_closest_marker("slow") is not None
    if realtime or next(_tests_run) % 20 == 0:
        gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


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
