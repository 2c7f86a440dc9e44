"""A virtual sound card for the tests: a private PulseAudio server with two null sinks and ALSA names.

    sink ``mic``    what play_into_mic() plays; its monitor is the capture device alsa://tmic, sd://tmic
    sink ``spk``    what alsa://tspk and sd://tspk play into; Recorder / record_speaker() read spk.monitor
    alsa://tfeed    plays into ``mic`` too: a loopback from tmic to tfeed echoes, and the echo's period
                    in mic.monitor is the true capture-to-playback latency

``start_sound_card()`` starts ``pulseaudio`` under its own XDG_RUNTIME_DIR, waits until ``pactl info``
answers and both sinks deliver audio, and returns a VirtualSoundCard whose ``env`` (XDG_RUNTIME_DIR,
ALSA_CONFIG_PATH, PULSE_SERVER) points ALSA, PortAudio and the pulse tools at it. ``stop()`` ends the
server by the PID in its pid file. Nothing here sleeps a fixed time: every wait polls a condition.

Two PulseAudio habits would make the card unlike real hardware, and are switched off. A null sink that
nobody listens to renders in blocks of up to 2 s, so a client that connects to an idle one waits that
long for its first audio: the card keeps one low-latency recorder ("keeper") on each monitor for its
whole life, so the sinks always run in small blocks. And a sink rewinds to mix a new stream in early,
but its monitor has already delivered the rewound audio, so the first milliseconds of every stream
would be missing from the monitor: the sinks are loaded with ``norewinds=1``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
import numpy.typing as npt

RATE = 48_000
TOOLS = ("pulseaudio", "pactl", "pacat", "parec")

ALSA_CONFIG = """\
pcm.tmic { type pulse; device "mic.monitor"; hint { show on description "virtual mic" } }
pcm.tspk { type pulse; device "spk"; hint { show on description "virtual speaker" } }
pcm.tfeed { type pulse; device "mic"; hint { show on description "plays into the virtual mic" } }
"""


class SoundCardError(RuntimeError):
    """The virtual sound card could not be started (the message says why and what to install)."""


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.005) -> None:
    """Polls ``condition`` until it holds; raises TimeoutError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(poll_s)


def parec_command(device: str, channels: int, rate: int, latency_ms: int) -> list[str]:
    """``parec`` writing raw s16le from ``device`` to stdout, in blocks of about ``latency_ms``."""
    return [
        "parec",
        f"--device={device}",
        "--raw",
        "--format=s16le",
        f"--rate={rate}",
        f"--channels={channels}",
        f"--latency-msec={latency_ms}",
    ]


class Recorder:
    """Records a PulseAudio source with ``parec`` into memory until stopped."""

    def __init__(
        self,
        env: Mapping[str, str],
        device: str,
        channels: int = 2,
        rate: int = RATE,
        keep: bool = True,
        latency_ms: int = 50,
    ) -> None:
        self.device = device
        self.keep = keep  # False: only count what arrives (a keeper)
        self.channels = channels
        self.rate = rate
        self._chunks: list[bytes] = []
        self._bytes = 0
        self._lock = threading.Lock()
        # latency: roomy, a busy machine must not make the recording lose audio
        cmd = parec_command(device, channels, rate, latency_ms)
        self._proc = subprocess.Popen(cmd, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._thread = threading.Thread(target=self._pump, name=f"parec {device}", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        out = self._proc.stdout
        assert out is not None
        while chunk := os.read(out.fileno(), 65536):
            with self._lock:
                if self.keep:
                    self._chunks.append(chunk)
                self._bytes += len(chunk)

    @property
    def frames(self) -> int:
        """Samples per channel received so far."""
        with self._lock:
            return self._bytes // (2 * self.channels)

    def wait_frames(self, frames: int, timeout_s: float = 10.0) -> None:
        """Blocks until at least ``frames`` samples per channel have arrived."""
        wait_until(
            lambda: self.frames >= frames or self._proc.poll() is not None, timeout_s, f"{self.device} audio"
        )
        if self.frames < frames:
            raise SoundCardError(f"parec {self.device} exited: {self._stderr()}")

    def wait_sound(self, threshold: int = 1000, timeout_s: float = 10.0) -> None:
        """Blocks until a sample reaches ``threshold`` (int16): the audio played into the source arrived."""
        wait_until(lambda: self._loudest() >= threshold, timeout_s, f"sound in {self.device}")

    def _loudest(self) -> int:
        with self._lock:
            tail = self._chunks[-1] if self._chunks else b""
        usable = len(tail) - len(tail) % 2
        return int(np.abs(np.frombuffer(tail[:usable], dtype="<i2").astype(np.int32)).max(initial=0))

    def wait_started(self, timeout_s: float = 10.0) -> Recorder:
        """Blocks until the first audio arrives (the stream is connected and running)."""
        self.wait_frames(1, timeout_s)
        return self

    def _stderr(self) -> str:
        err = self._proc.stderr
        return (
            err.read().decode(errors="replace").strip()
            if err is not None and self._proc.poll() is not None
            else ""
        )

    def stop(self) -> npt.NDArray[np.int16]:
        """Ends the recording; returns everything recorded, shape (frames, channels)."""
        if self._proc.poll() is None:
            self._proc.terminate()
        self._proc.wait(timeout=10)
        self._thread.join(timeout=10)
        with self._lock:
            data = b"".join(self._chunks)
        usable = len(data) - len(data) % (2 * self.channels)
        return np.frombuffer(data[:usable], dtype="<i2").astype(np.int16).reshape(-1, self.channels)


@dataclass
class VirtualSoundCard:
    """A running private PulseAudio server; ``env`` holds the variables that select it."""

    runtime_dir: Path
    alsa_config: Path
    pid: int
    env: dict[str, str]
    _keepers: list[Recorder] = field(default_factory=list)

    def play_into_mic(self, samples: npt.NDArray[np.int16], rate: int = RATE) -> subprocess.Popen[bytes]:
        """Starts playing int16 ``samples`` (frames, or frames x channels) into the ``mic`` sink.

        Returns the ``pacat`` process; it exits once the last sample has been played (``wait()`` on it).
        """
        pcm = np.ascontiguousarray(samples, dtype="<i2")
        channels = 1 if pcm.ndim == 1 else pcm.shape[1]
        cmd = [
            "pacat",
            "--playback",
            "--device=mic",
            "--raw",
            "--format=s16le",
            f"--rate={rate}",
            f"--channels={channels}",
            "--latency-msec=100",  # roomy: an underrun would put a gap into the "microphone" signal
        ]
        proc = subprocess.Popen(cmd, env=self.process_env(), stdin=subprocess.PIPE, stderr=subprocess.PIPE)
        stdin = proc.stdin
        assert stdin is not None
        threading.Thread(target=_write_and_close, args=(stdin, pcm.tobytes()), daemon=True).start()
        return proc

    def recorder(
        self, device: str = "spk.monitor", channels: int = 2, rate: int = RATE, keep: bool = True
    ) -> Recorder:
        """Starts recording ``device`` (by default what is played into alsa://tspk and sd://tspk)."""
        return Recorder(self.process_env(), device, channels, rate, keep)

    def record_speaker(self, seconds: float, channels: int = 2) -> npt.NDArray[np.int16]:
        """Records ``seconds`` of the speaker sink's output."""
        rec = self.recorder(channels=channels).wait_started()
        rec.wait_frames(rec.frames + round(seconds * RATE), timeout_s=seconds + 10)
        return rec.stop()

    def process_env(self) -> dict[str, str]:
        """os.environ with this card's variables: the environment for a subprocess that uses it."""
        return {**os.environ, **self.env}

    def pactl(self, *args: str) -> str:
        done = subprocess.run(
            ["pactl", *args], env=self.process_env(), capture_output=True, text=True, timeout=10
        )
        if done.returncode != 0:
            raise SoundCardError(f"pactl {' '.join(args)}: {done.stderr.strip() or done.stdout.strip()}")
        return done.stdout

    def stop(self) -> None:
        """Ends the keepers and the server (by PID), then removes the runtime directory."""
        for keeper in self._keepers:
            keeper.stop()
        self._keepers.clear()
        _kill_and_wait(self.pid)
        shutil.rmtree(self.runtime_dir, ignore_errors=True)


def _write_and_close(stream: IO[bytes], data: bytes) -> None:
    try:
        stream.write(data)
        stream.close()
    except BrokenPipeError:  # the player was stopped early
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead too
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _kill_and_wait(pid: int) -> None:
    if not _alive(pid):
        return
    os.kill(pid, signal.SIGTERM)
    try:
        wait_until(lambda: not _alive(pid), 5.0, f"pulseaudio (pid {pid}) to exit")
    except TimeoutError:
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not _alive(pid), 5.0, f"pulseaudio (pid {pid}) to die")


def start_sound_card(base_dir: Path | None = None, timeout_s: float = 15.0) -> VirtualSoundCard:
    """Starts the private PulseAudio server and returns it once both sinks deliver audio.

    Raises SoundCardError with the reason (missing tool, server log) when it cannot.
    """
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        raise SoundCardError(
            f"{', '.join(missing)} not found: install pulseaudio pulseaudio-utils libasound2-plugins "
            "(make sysdeps-test)"
        )
    runtime = Path(tempfile.mkdtemp(prefix="tiality-snd-", dir=base_dir))
    runtime.chmod(0o700)
    alsa_config = runtime / "asound.conf"
    alsa_config.write_text(ALSA_CONFIG)
    log = runtime / "pulse.log"
    env = {
        "XDG_RUNTIME_DIR": str(runtime),
        "ALSA_CONFIG_PATH": f"/usr/share/alsa/alsa.conf:{alsa_config}",
        "PULSE_SERVER": f"unix:{runtime}/pulse/native",
    }
    cmd = [
        "pulseaudio",
        "-n",
        "--daemonize=yes",
        "--use-pid-file=yes",
        "--exit-idle-time=-1",
        f"--log-target=file:{log}",
        "--load=module-native-protocol-unix auth-anonymous=1",
        f"--load=module-null-sink sink_name=mic rate={RATE} norewinds=1",
        f"--load=module-null-sink sink_name=spk rate={RATE} norewinds=1",
    ]
    full_env = {**os.environ, **env}
    full_env.pop("PULSE_SERVER")  # the daemon itself must not try to connect to a server
    done = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout_s)
    pid_file = runtime / "pulse" / "pid"
    if done.returncode != 0 or not pid_file.exists():
        detail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.exists() else []
        shutil.rmtree(runtime, ignore_errors=True)
        raise SoundCardError(
            f"pulseaudio did not start (exit {done.returncode}): "
            + " | ".join([done.stderr.strip(), *detail]).strip(" |")
        )
    card = VirtualSoundCard(runtime, alsa_config, int(pid_file.read_text().split()[0]), env)
    try:
        wait_until(lambda: _pactl_ok(card), timeout_s, "pactl info to answer")
        card.pactl("set-default-sink", "spk")
        card.pactl("set-default-source", "mic.monitor")
        card._keepers = [
            Recorder(card.process_env(), monitor, keep=False, latency_ms=10)
            for monitor in ("mic.monitor", "spk.monitor")
        ]
        for keeper in card._keepers:
            keeper.wait_started(timeout_s)
    except (TimeoutError, SoundCardError) as exc:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.exists() else []
        card.stop()
        raise SoundCardError(f"virtual sound card not ready: {exc} {' | '.join(tail)}".strip()) from None
    return card


def _pactl_ok(card: VirtualSoundCard) -> bool:
    done = subprocess.run(["pactl", "info"], env=card.process_env(), capture_output=True, timeout=10)
    return done.returncode == 0


def reinit_portaudio() -> None:
    """Makes an already imported sounddevice enumerate the devices again (PortAudio lists them once)."""
    import sys

    sd = sys.modules.get("sounddevice")
    if sd is not None:
        sd._terminate()
        sd._initialize()
