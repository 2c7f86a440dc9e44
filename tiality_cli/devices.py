"""Real sound devices: ALSA (pyalsaaudio) and PortAudio (sounddevice) capture, playback and listing.

    open_capture(scheme, rest, fmt, capture, clock) -> Source    alsa://DEVICE, sd://NAME_OR_INDEX
    open_playback(scheme, rest, fmt, clock) -> Sink              sd://NAME_OR_INDEX, alsa://DEVICE
    list_devices() -> DeviceList                                 what ``tiality devices`` shows
    default_input_uri(), default_output_uri()                    the -i / -o defaults (no imports)
    resolve_capture(fmt, capture) -> ChannelRouter               device channels -> stream channels

Device names: ``alsa://`` takes any ALSA PCM name (``default``, ``hw:1,0``, ``plughw:CARD=Array,DEV=0``,
a name from asound.conf). ``sd://`` takes a PortAudio device number, or words that must appear in order
in "device name, host API" (as python-sounddevice matches them); an exact name wins over substrings;
``sd://`` and ``sd://default`` are PortAudio's default device.

Every device is opened and checked (rate, channels, 16-bit) when the Source or Sink is built, so a bad
device fails before any network connection. Failures raise DeviceError with one line that names the
device, says why, and lists the device URIs that would work.

Real-time contract. Capture: the period is one frame, and ``read(out)`` returns the wall-clock time of
the frame's first sample (time of the read minus the audio still queued behind it, minus the frame).
Playback: the device clocks ``fill(buf)``: the PortAudio callback (5 ms blocks) hands its own output
buffer to ``fill`` (nothing is allocated per period), the ALSA thread writes each filled frame to a
3-period buffer. ``overruns`` and ``underruns`` count the device's xruns. alsaaudio and sounddevice
are imported inside the functions that use them, so ``tiality --help`` loads neither.
"""

from __future__ import annotations

import ctypes as _ctypes
import re as _re
import select as _select
import sys as _sys
import threading as _threading
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from tiality_cli.clock import Clock
from tiality_cli.config import AudioFormat
from tiality_cli.errors import ConfigError, DeviceError
from tiality_cli.sinks import BLOCK_US, FillFn, Sink
from tiality_cli.sources import CaptureOptions, Source

STALL_S = 5.0  # a device that delivers or takes no audio for this long is reported as broken
_POLL_MS = 100  # how often a blocked read or write looks at close()/stop()
_NS = 1_000_000_000
_MENU_MAX = 12  # device URIs listed in one error line
SD_OUTPUT_LATENCY_S = 0.020  # PortAudio output buffer asked for: 'low' (~9 ms) underran under CPU load
# ALSA PCMs that are plugins needing arguments or a server, not devices: left out of error hints.
_HELPER_PCMS = frozenset(("null", "lavrate", "samplerate", "speexrate", "jack", "oss", "speex"))
_HELPER_PCMS |= {"upmix", "vdownmix", "a52", "usbstream"}


# ----------------------------------------------------------------------------------------------------
# Channel routing


class ChannelRouter:
    """Copies the stream's channels out of a device frame, without allocating per frame.

    ``device_channels`` are opened on the device; stream channel c takes device channel ``channel_map[c]``,
    or with ``downmix`` the average of all device channels.
    """

    def __init__(
        self, device_channels: int, channel_map: tuple[int, ...], downmix: bool, max_samples: int
    ) -> None:
        self.device_channels = device_channels
        self.channel_map = channel_map
        self.downmix = downmix
        self.identity = not downmix and channel_map == tuple(range(device_channels))
        self._acc = np.zeros(max_samples if downmix else 0, dtype=np.int32)

    def route(self, src: npt.NDArray[np.int16], out: npt.NDArray[np.int16]) -> None:
        """``src``: (n, device_channels); ``out``: (n, len(channel_map)), written in place."""
        if self.identity:
            out[:] = src
        elif self.downmix:
            acc = self._acc[: len(src)]
            np.sum(src, axis=1, dtype=np.int32, out=acc)
            np.floor_divide(acc, self.device_channels, out=acc)
            for c in range(out.shape[1]):
                out[:, c] = acc
        else:
            for c, d in enumerate(self.channel_map):
                out[:, c] = src[:, d]


def resolve_capture(fmt: AudioFormat, capture: CaptureOptions) -> ChannelRouter:
    """Checks the capture options against the stream format; raises ConfigError naming the option."""
    n = fmt.channels
    if capture.downmix and capture.channel_map is not None:
        raise ConfigError("--downmix and --channel-map exclude each other: choose one")
    cmap = capture.channel_map if capture.channel_map is not None else tuple(range(n))
    if len(cmap) != n:
        raise ConfigError(
            f"--channel-map {','.join(map(str, cmap))}: needs {n} device channel(s), one per stream channel"
        )
    device_channels = capture.capture_channels
    if device_channels is None:
        device_channels = n if capture.downmix else max(n, max(cmap) + 1)
    if device_channels < 1:
        raise ConfigError(f"--capture-channels {device_channels}: must be at least 1")
    bad = [d for d in cmap if not 0 <= d < device_channels]
    if bad and not capture.downmix and capture.channel_map is None:
        raise ConfigError(
            f"--capture-channels {device_channels}: fewer than the {n} stream channels; "
            f"add --channel-map (e.g. {','.join(['0'] * n)}) or --downmix"
        )
    if bad and not capture.downmix:
        raise ConfigError(
            f"--channel-map {','.join(map(str, cmap))}: channel {bad[0]} does not exist in "
            f"{device_channels} captured channel(s) (0-{device_channels - 1})"
        )
    return ChannelRouter(device_channels, cmap, capture.downmix, fmt.frame_samples)


# ----------------------------------------------------------------------------------------------------
# Device listing


@dataclass(frozen=True, slots=True)
class Backend:
    """One audio API: whether it can be used, and its version or why not."""

    name: str
    available: bool
    detail: str  # the library version, or the reason it is unavailable


@dataclass(frozen=True, slots=True)
class AlsaCardDevice:
    """One PCM device of a card, as ``arecord -l`` / ``aplay -l`` list it."""

    card: int
    device: int
    id: str
    name: str
    capture: bool
    playback: bool
    uris: tuple[str, ...]  # alsa://hw:C,D (exact formats only), alsa://plughw:C,D (ALSA converts)


@dataclass(frozen=True, slots=True)
class AlsaCard:
    index: int
    id: str
    name: str
    longname: str
    devices: tuple[AlsaCardDevice, ...]


@dataclass(frozen=True, slots=True)
class AlsaPcm:
    """A named PCM from the ALSA configuration, as ``arecord -L`` / ``aplay -L`` list it."""

    name: str
    description: str
    capture: bool
    playback: bool
    uri: str


@dataclass(frozen=True, slots=True)
class PortAudioDevice:
    index: int
    name: str
    hostapi: str
    max_input_channels: int
    max_output_channels: int
    default_samplerate: float
    default_input: bool
    default_output: bool
    input_uris: tuple[str, ...]  # sd://INDEX, and sd://NAME when the name selects this device alone
    output_uris: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class DeviceList:
    alsa: Backend
    cards: tuple[AlsaCard, ...]
    pcms: tuple[AlsaPcm, ...]
    portaudio: Backend
    sd_devices: tuple[PortAudioDevice, ...]

    def input_uris(self) -> list[str]:
        """Every URI that ``-i`` accepts, ALSA first."""
        return self._uris(True)

    def output_uris(self) -> list[str]:
        """Every URI that ``-o`` accepts, ALSA first."""
        return self._uris(False)

    def _uris(self, capture: bool) -> list[str]:
        uris = [p.uri for p in self.pcms if (p.capture if capture else p.playback)]
        for card in self.cards:
            uris += [u for d in card.devices if (d.capture if capture else d.playback) for u in d.uris]
        for s in self.sd_devices:
            uris += s.input_uris if capture else s.output_uris
        return uris

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (what ``tiality devices --json`` prints), with the -i/-o URI lists."""
        return {**asdict(self), "input_uris": self.input_uris(), "output_uris": self.output_uris()}


def list_devices() -> DeviceList:
    """Lists ALSA cards and PCMs and PortAudio devices; an unusable backend is listed with the reason."""
    alsa, cards, pcms = _list_alsa()
    portaudio, sd_devices = _list_portaudio()
    return DeviceList(alsa, cards, pcms, portaudio, sd_devices)


def _list_alsa() -> tuple[Backend, tuple[AlsaCard, ...], tuple[AlsaPcm, ...]]:
    try:
        aa = _alsaaudio()
    except DeviceError as exc:
        return Backend("ALSA", False, str(exc)), (), ()
    try:
        with open("/proc/asound/pcm") as f:
            pcm_devices = parse_proc_asound_pcm(f.read())
    except OSError:
        pcm_devices = []
    cards = []
    try:
        for index, card_id in zip(aa.card_indexes(), aa.cards(), strict=False):
            try:
                name, longname = aa.card_name(index)
            except aa.ALSAAudioError:
                name, longname = card_id, card_id
            devices = tuple(d for d in pcm_devices if d.card == index)
            cards.append(AlsaCard(index, card_id, name, longname, devices))
        pcms = tuple(_alsa_pcms(aa))
    except aa.ALSAAudioError as exc:
        return Backend("ALSA", False, f"ALSA unavailable: {exc}"), (), ()
    return Backend("ALSA", True, f"alsa-lib {aa.asoundlib_version()}"), tuple(cards), pcms


def parse_proc_asound_pcm(text: str) -> list[AlsaCardDevice]:
    """Parses /proc/asound/pcm lines: ``01-00: USB Audio : USB Audio : playback 1 : capture 1``."""
    out = []
    for line in text.splitlines():
        m = _re.match(r"(\d+)-(\d+): (.*?) : (.*?)(?: : (.*))?$", line)
        if not m:
            continue
        card, dev = int(m[1]), int(m[2])
        streams = m[5] or ""
        uris = (f"alsa://hw:{card},{dev}", f"alsa://plughw:{card},{dev}")
        out.append(AlsaCardDevice(card, dev, m[3], m[4], "capture" in streams, "playback" in streams, uris))
    return out


def _alsa_pcms(aa: Any) -> list[AlsaPcm]:
    """Named PCMs with their descriptions (alsa-lib's hints), or bare names from alsaaudio.pcms()."""
    hints = _alsa_hints()
    if hints is None:
        cap, play = set(aa.pcms(aa.PCM_CAPTURE)), aa.pcms(aa.PCM_PLAYBACK)
        names = list(dict.fromkeys([*play, *cap]))
        return [AlsaPcm(n, "", n in cap, n in play, f"alsa://{n}") for n in names]
    return [AlsaPcm(n, d, io != "Output", io != "Input", f"alsa://{n}") for n, d, io in hints]


def _alsa_hints() -> list[tuple[str, str, str]] | None:
    """(name, description, "Input"/"Output"/"") for every PCM hint; None when libasound is not loadable."""
    lib = _libasound()
    if lib is None:
        return None
    hints = _ctypes.POINTER(_ctypes.c_void_p)()
    if lib.snd_device_name_hint(-1, b"pcm", _ctypes.byref(hints)) < 0:
        return None
    out = []
    try:
        i = 0
        while hints[i]:
            name, desc, io = (_hint(lib, hints[i], key) for key in (b"NAME", b"DESC", b"IOID"))
            if name:
                out.append((name, " / ".join(desc.splitlines()), io))
            i += 1
    finally:
        lib.snd_device_name_free_hint(hints)
    return out


def _hint(lib: Any, hint: int | None, key: bytes) -> str:
    p = lib.snd_device_name_get_hint(hint, key)
    if not p:
        return ""
    try:
        return _ctypes.string_at(p).decode(errors="replace")
    finally:
        _libc().free(p)


_LIBS: dict[str, Any] = {}


def _libasound() -> Any:
    """libasound through ctypes (for hints and a silent error handler), or None."""
    if "asound" not in _LIBS:
        try:
            lib = _ctypes.CDLL("libasound.so.2")
            lib.snd_device_name_hint.argtypes = [
                _ctypes.c_int,
                _ctypes.c_char_p,
                _ctypes.POINTER(_ctypes.POINTER(_ctypes.c_void_p)),
            ]
            lib.snd_device_name_get_hint.argtypes = [_ctypes.c_void_p, _ctypes.c_char_p]
            lib.snd_device_name_get_hint.restype = _ctypes.c_void_p
            lib.snd_device_name_free_hint.argtypes = [_ctypes.POINTER(_ctypes.c_void_p)]
        except (OSError, AttributeError):
            lib = None
        _LIBS["asound"] = lib
    return _LIBS["asound"]


def _libc() -> Any:
    if "c" not in _LIBS:
        libc = _ctypes.CDLL(None)
        libc.free.argtypes = [_ctypes.c_void_p]
        _LIBS["c"] = libc
    return _LIBS["c"]


# alsa-lib prints its errors on stderr ("ALSA lib pcm.c:2666: Unknown PCM nosuch"); we report our own line.
_ERROR_HANDLER_T = _ctypes.CFUNCTYPE(
    None, _ctypes.c_char_p, _ctypes.c_int, _ctypes.c_char_p, _ctypes.c_int, _ctypes.c_char_p
)
_SILENT_HANDLER = _ERROR_HANDLER_T(lambda *args: None)


def _silence_alsa() -> None:
    lib = _libasound()
    if lib is not None:
        lib.snd_lib_error_set_handler(_SILENT_HANDLER)


def _alsaaudio() -> Any:
    """Imports pyalsaaudio (and silences alsa-lib's stderr messages); DeviceError if it cannot."""
    try:
        import alsaaudio
    except ImportError as exc:
        hint = (
            "ALSA exists only on Linux"
            if not _sys.platform.startswith("linux")
            else "pip install pyalsaaudio"
        )
        raise DeviceError(f"ALSA unavailable: {exc} ({hint})") from None
    _silence_alsa()
    return alsaaudio


def _sounddevice() -> Any:
    """Imports sounddevice; DeviceError when the PortAudio library is missing."""
    try:
        import sounddevice
    except (ImportError, OSError) as exc:
        raise DeviceError(f"PortAudio unavailable: {exc} (install libportaudio2)") from None
    _silence_alsa()  # PortAudio's ALSA host API reports xruns through alsa-lib's stderr printer too
    return sounddevice


def _list_portaudio() -> tuple[Backend, tuple[PortAudioDevice, ...]]:
    try:
        sd = _sounddevice()
        infos = list(sd.query_devices())
        hostapis = [h["name"] for h in sd.query_hostapis()]
        default_in, default_out = _sd_defaults(sd)
        version = sd.get_portaudio_version()[1]
    except DeviceError as exc:
        return Backend("PortAudio", False, str(exc)), ()
    except Exception as exc:  # PortAudioError while enumerating
        return Backend("PortAudio", False, f"PortAudio unavailable: {exc}"), ()
    devices = []
    for info in infos:
        i = int(info["index"])
        uris: dict[str, tuple[str, ...]] = {}
        for kind in ("input", "output"):
            uris[kind] = ()
            if info[f"max_{kind}_channels"] > 0:
                uris[kind] = (f"sd://{i}",)
                # sd://NAME only when the name selects this device alone ("default" means PortAudio's default)
                default = default_in if kind == "input" else default_out
                if info["name"].lower() == "default" and i != default:
                    continue
                if _sd_match(infos, hostapis, info["name"], kind) == [i]:
                    uris[kind] += (f"sd://{info['name']}",)
        devices.append(
            PortAudioDevice(
                i,
                info["name"],
                hostapis[info["hostapi"]],
                int(info["max_input_channels"]),
                int(info["max_output_channels"]),
                float(info["default_samplerate"]),
                i == default_in,
                i == default_out,
                uris["input"],
                uris["output"],
            )
        )
    return Backend("PortAudio", True, str(version)), tuple(devices)


def _sd_defaults(sd: Any) -> tuple[int, int]:
    try:
        d_in, d_out = sd.default.device
    except Exception:
        return -1, -1
    return (d_in if d_in is not None else -1), (d_out if d_out is not None else -1)


def _sd_match(infos: list[Any], hostapis: list[str], query: str, kind: str) -> list[int]:
    """The devices ``query`` selects, as python-sounddevice matches: words in order in "name, host API".

    One exact name (or "name, host API") wins over any number of substring matches.
    """
    words = query.lower().split()
    matches, exact = [], []
    for info in infos:
        if info[f"max_{kind}_channels"] <= 0:
            continue
        full = f"{info['name']}, {hostapis[info['hostapi']]}"
        low, pos = full.lower(), 0
        for word in words:
            pos = low.find(word, pos)
            if pos < 0:
                break
            pos += len(word)
        else:
            matches.append(int(info["index"]))
            if query.lower() in (info["name"].lower(), low):
                exact.append(int(info["index"]))
    return exact if len(exact) == 1 else matches


def default_input_uri() -> str:
    """The -i default: ALSA's default PCM on Linux (the Pi), PortAudio's default input elsewhere."""
    return "alsa://default" if _sys.platform.startswith("linux") else "sd://default"


def default_output_uri() -> str:
    """The -o default: PortAudio's default output device (sd://default), on every platform."""
    return "sd://default"


def _menu(capture: bool, first: str) -> str:
    """'capture devices: alsa://default, alsa://tmic, sd://0 (tmic), ...' for error messages."""
    what = "capture" if capture else "playback"
    try:
        listing = list_devices()
    except Exception as exc:  # the error being reported matters more than the listing
        return f"(cannot list {what} devices: {exc})"
    alsa = [p.uri for p in listing.pcms if (p.capture if capture else p.playback) and _useful_pcm(p.name)]
    for card in listing.cards:
        alsa += [f"{d.uris[0]} ({card.id})" for d in card.devices if (d.capture if capture else d.playback)]
    sd = [
        f"sd://{s.index} ({s.name})"
        for s in listing.sd_devices
        if (s.max_input_channels if capture else s.max_output_channels) > 0
    ]
    items = alsa + sd if first == "alsa://" else sd + alsa
    if not items:
        reasons = [b.detail for b in (listing.alsa, listing.portaudio) if not b.available]
        return f"no {what} devices found" + (f" ({'; '.join(reasons)})" if reasons else "")
    more = f" and {len(items) - _MENU_MAX} more (tiality devices)" if len(items) > _MENU_MAX else ""
    return f"{what} devices: {', '.join(items[:_MENU_MAX])}{more}"


def _useful_pcm(name: str) -> bool:
    return name not in _HELPER_PCMS and ":" not in name  # card-specific aliases are listed as hw:C,D


def _device_error(uri: str, reason: str, capture: bool, scheme: str) -> DeviceError:
    return DeviceError(f"{uri}: {reason}; {_menu(capture, scheme)}")


def _ranges(values: list[int]) -> str:
    """[1, 2, 3, 6] -> '1-3, 6'."""
    spans: list[list[int]] = []
    for v in sorted(set(values)):
        if spans and v == spans[-1][1] + 1:
            spans[-1][1] = v
        else:
            spans.append([v, v])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans)


# ----------------------------------------------------------------------------------------------------
# ALSA


def _alsa_reason(message: str) -> str:
    """A user's reason for an ALSAAudioError text such as 'Device or resource busy [hw:1,0]'."""
    text = message.rsplit(" [", 1)[0]
    low = text.lower()
    if "no such file" in low or "no such device" in low:
        return "no such ALSA device"
    if "busy" in low:
        return "busy: another program is using it (close it, or use a dsnoop/dmix or pulse device)"
    if "permission" in low:
        return "permission denied (add your user to the 'audio' group)"
    return text


def _open_alsa_pcm(
    uri: str, device: str, capture: bool, rate: int, channels: int, period: int, periods: int
) -> tuple[Any, dict[str, Any]]:
    """Opens and configures an ALSA PCM (non-blocking), or raises DeviceError with the reason."""
    aa = _alsaaudio()
    if not device:
        raise _device_error(
            uri, "expected alsa://DEVICE, e.g. alsa://default or alsa://hw:1,0", capture, "alsa://"
        )
    try:
        pcm = aa.PCM(
            type=aa.PCM_CAPTURE if capture else aa.PCM_PLAYBACK,
            mode=aa.PCM_NONBLOCK,
            device=device,
            rate=rate,
            channels=channels,
            format=aa.PCM_FORMAT_S16_LE,
            periodsize=period,
            periods=periods,
        )
    except aa.ALSAAudioError as exc:
        raise _device_error(uri, _alsa_reason(str(exc)), capture, "alsa://") from None
    info = pcm.info()
    # pyalsaaudio silently keeps what the device accepts: check what we got.
    what = "capture" if capture else "play"
    problem = ""
    if info["channels"] != channels:
        offered = _ranges(pcm.getchannels())
        problem = f"cannot {what} {channels} channel(s) (the device offers {offered})"
    elif info["rate"] != rate:
        problem = f"cannot {what} at {rate} Hz (the device runs at {info['rate']} Hz; plughw: converts)"
    elif info["format_name"] != "S16_LE":
        problem = f"cannot {what} 16-bit samples (the device offers {info['format_name']}; plughw: converts)"
    if problem:
        pcm.close()
        raise _device_error(uri, problem, capture, "alsa://")
    return pcm, info


class _PcmPoll:
    """Waits on a PCM's poll descriptors (registered once per PCM, not once per wait)."""

    def __init__(self, pcm: Any, events: int) -> None:
        self._pcm = pcm
        self._events = events | _select.POLLERR  # an error is "ready": the next call reports it
        self._poller = _select.poll()
        for fd, mask in pcm.polldescriptors():
            self._poller.register(fd, mask)

    def wait(self, timeout_ms: int) -> bool:
        """True when the PCM can be read/written (or is in error), False after ``timeout_ms``."""
        ready = self._poller.poll(timeout_ms)
        return bool(ready) and bool(self._pcm.polldescriptors_revents(ready) & self._events)


class AlsaCapture:
    """ALSA capture, one period per frame; see the module doc for the timestamps."""

    def __init__(self, uri: str, device: str, fmt: AudioFormat, router: ChannelRouter, clock: Clock) -> None:
        self.format = fmt
        self.name = uri
        self.overruns = 0
        self.device = device
        self._router = router
        self._clock = clock
        self._periods = max(4, -(-100_000 // fmt.frame_us))  # >= 100 ms of slack for a late reader
        self._pcm: Any = None
        self._closing = False
        self._lock = _threading.Lock()
        self._opened = False
        self._reopen()

    def _reopen(self) -> None:
        fmt = self.format
        self._pcm, info = _open_alsa_pcm(
            self.name,
            self.device,
            True,
            fmt.sample_rate,
            self._router.device_channels,
            fmt.frame_samples,
            self._periods,
        )
        self._poll = _PcmPoll(self._pcm, _select.POLLIN)
        self.period = int(info["period_size"])
        self.buffer_frames = int(info["buffer_size"])
        self._stage = np.zeros(
            (fmt.frame_samples + self.period, self._router.device_channels), dtype=np.int16
        )
        self._staged = 0

    def open(self) -> None:
        with self._lock:
            if self._pcm is None:
                self._reopen()
            self._closing = False
            self._staged = 0
            self._pcm.read()  # a prepared capture PCM starts on its first read (non-blocking: returns 0)
            self._opened = True

    def read(self, out: npt.NDArray[np.int16]) -> int | None:
        n = self.format.frame_samples
        with self._lock:
            pcm = self._pcm
            if pcm is None or self._closing:
                return None
            if not self._opened:
                raise RuntimeError("open() the source before read()")
            stalled = 0
            kick = False
            while self._staged < n:
                if self._closing:
                    return None
                if not kick and not self._poll.wait(_POLL_MS):
                    stalled += _POLL_MS
                    if stalled >= STALL_S * 1000:
                        raise DeviceError(f"{self.name}: no audio from the device for {STALL_S:g} s")
                    continue
                kick = False
                try:
                    length, data = pcm.read()
                except Exception as exc:  # ALSAAudioError: unplugged, server gone...
                    raise DeviceError(f"{self.name}: capture failed: {_alsa_reason(str(exc))}") from None
                if length < 0:  # -EPIPE: overrun; pyalsaaudio has prepared the PCM again
                    self.overruns += 1
                    self._staged = 0  # never join audio across a gap
                    kick = True  # the next read restarts capture
                    continue
                if length:
                    stalled = 0
                    chunk = np.frombuffer(data, dtype=np.int16).reshape(length, -1)
                    self._stage[self._staged : self._staged + length] = chunk
                    self._staged += length
            queued = max(0, int(pcm.avail()))
            t = self._clock.wall_ns() - (queued + self._staged) * _NS // self.format.sample_rate
            self._router.route(self._stage[:n], out)
            rest = self._staged - n
            if rest:
                self._stage[:rest] = self._stage[n : self._staged]
            self._staged = rest
            return t

    def close(self) -> None:
        self._closing = True
        with self._lock:
            if self._pcm is not None:
                self._pcm.close()
                self._pcm = None
            self._opened = False


class AlsaPlayback:
    """ALSA playback: a thread fills one 5 ms period at a time and writes it to a 4-period buffer."""

    # 4 x 5 ms, as the PortAudio sink: the device plays one period while we fill the next, two more
    # absorb scheduling jitter. (3 x 20 ms cost about 30 ms more end to end; docs/performance.md.)
    PERIODS = 4

    def __init__(self, uri: str, device: str, fmt: AudioFormat, clock: Clock) -> None:
        self.name = uri
        self.device = device
        self.format: AudioFormat | None = None
        self.underruns = 0
        self.frames_written = 0
        self.delay_ns = 0  # audio queued in the device after the last write
        self.error: BaseException | None = None
        self._clock = clock
        self._pcm: Any = None
        self._stop = _threading.Event()
        self._thread: _threading.Thread | None = None
        self.open(fmt)

    def open(self, fmt: AudioFormat) -> None:
        if self._pcm is not None and fmt == self.format:
            return
        self.stop()
        if self._pcm is not None:
            self._pcm.close()
            self._pcm = None
        self.period = min(fmt.frame_samples, fmt.sample_rate * BLOCK_US // 1_000_000)
        self._pcm, info = _open_alsa_pcm(
            self.name, self.device, False, fmt.sample_rate, fmt.channels, self.period, self.PERIODS
        )
        self.buffer_frames = int(info["buffer_size"])
        self._poll = _PcmPoll(self._pcm, _select.POLLOUT)
        self.format = fmt

    def start(self, fill: FillFn) -> None:
        if self.format is None or self._pcm is None:
            raise RuntimeError("open() the sink before start()")
        self.stop()
        self._stop.clear()
        self._thread = _threading.Thread(
            target=self._run, args=(fill, self.format), name=self.name, daemon=True
        )
        self._thread.start()

    def _run(self, fill: FillFn, fmt: AudioFormat) -> None:
        pcm = self._pcm
        buf = np.zeros((self.period, fmt.channels), dtype=np.int16)
        n = len(buf)
        try:
            while not self._stop.is_set():
                if fill(buf):
                    self.frames_written += n
                done = stalled = 0
                while done < n and not self._stop.is_set():
                    if not self._poll.wait(_POLL_MS):
                        stalled += _POLL_MS
                        if stalled >= STALL_S * 1000:
                            raise DeviceError(f"{self.name}: the device took no audio for {STALL_S:g} s")
                        continue
                    try:
                        written = pcm.write(buf[done:])
                    except Exception as exc:  # ALSAAudioError: unplugged, server gone...
                        raise DeviceError(f"{self.name}: playback failed: {_alsa_reason(str(exc))}") from None
                    if written < 0:  # -EPIPE: underrun; pyalsaaudio has prepared the PCM again
                        self.underruns += 1
                        continue
                    done += written
                self.delay_ns = max(0, self.buffer_frames - int(pcm.avail())) * _NS // fmt.sample_rate
        except BaseException as exc:  # reported through .error: nothing may escape a device thread
            self.error = exc

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            if self._pcm is not None:
                self._pcm.drop()  # the next write prepares and restarts the PCM

    def close(self) -> None:
        self.stop()
        if self._pcm is not None:
            self._pcm.close()
            self._pcm = None


# ----------------------------------------------------------------------------------------------------
# PortAudio


def _sd_device(uri: str, query: str, capture: bool) -> tuple[Any, int, dict[str, Any]]:
    """Resolves an sd:// device (number, words, default); returns (sounddevice, index, info)."""
    sd = _sounddevice()
    kind = "input" if capture else "output"
    infos = list(sd.query_devices())
    hostapis = [h["name"] for h in sd.query_hostapis()]
    q = query.strip()
    if q.lower() in ("", "default"):
        index = _sd_defaults(sd)[0 if capture else 1]
        if index < 0:
            raise _device_error(uri, f"PortAudio has no default {kind} device", capture, "sd://")
    elif q.isdigit():
        index = int(q)
        if index >= len(infos) or infos[index][f"max_{kind}_channels"] <= 0:
            raise _device_error(uri, f"no PortAudio {kind} device number {index}", capture, "sd://")
    else:
        matches = _sd_match(infos, hostapis, q, kind)
        if not matches:
            raise _device_error(uri, f"no PortAudio {kind} device matches {q!r}", capture, "sd://")
        if len(matches) > 1:
            names = ", ".join(f"sd://{i} ({infos[i]['name']})" for i in matches)
            raise DeviceError(
                f"{uri}: {len(matches)} {kind} devices match {q!r}: {names}; name one exactly or by number"
            )
        index = matches[0]
    return sd, index, dict(infos[index])


def _sd_open_error(
    uri: str, exc: Exception, info: dict[str, Any], capture: bool, channels: int, rate: int
) -> DeviceError:
    kind = "input" if capture else "output"
    code = exc.args[1] if len(exc.args) > 1 else 0
    if code == -9998:  # paInvalidChannelCount
        verb = "capture" if capture else "play"
        reason = f"cannot {verb} {channels} channel(s) (max {info[f'max_{kind}_channels']})"
    elif code == -9997:  # paInvalidSampleRate
        reason = f"cannot run at {rate} Hz (default rate {info['default_samplerate']:g} Hz)"
    elif code == -9985:  # paDeviceUnavailable
        reason = "busy or unavailable: another program may be using it"
    else:
        reason = str(exc)
    return _device_error(uri, reason, capture, "sd://")


class SdCapture:
    """PortAudio capture: the callback copies each frame into a small ring that read() drains."""

    RING_FRAMES = 8  # frames kept for a late reader; older ones are dropped (and counted) first

    def __init__(self, uri: str, query: str, fmt: AudioFormat, router: ChannelRouter, clock: Clock) -> None:
        self.format = fmt
        self.name = uri
        self.overruns = 0
        self._router = router
        self._clock = clock
        sd, index, info = _sd_device(uri, query, True)
        self.device = f"sd://{index} ({info['name']})"
        ch, n = router.device_channels, fmt.frame_samples
        if ch > info["max_input_channels"]:
            raise _device_error(
                uri, f"cannot capture {ch} channel(s) (max {info['max_input_channels']})", True, "sd://"
            )
        self._ring = np.zeros((self.RING_FRAMES, n, ch), dtype=np.int16)
        self._times = np.zeros(self.RING_FRAMES, dtype=np.int64)
        self._written = self._read = 0
        self._cond = _threading.Condition()
        self._closing = False
        self._frame_ns = fmt.frame_ns
        try:
            self._stream = sd.InputStream(
                device=index,
                samplerate=fmt.sample_rate,
                channels=ch,
                dtype="int16",
                blocksize=n,
                latency="low",
                callback=self._callback,
            )
        except sd.PortAudioError as exc:
            raise _sd_open_error(uri, exc, info, True, ch, fmt.sample_rate) from None
        self.latency_s = float(self._stream.latency)

    def _callback(self, indata: npt.NDArray[np.int16], frames: int, time: Any, status: Any) -> None:
        now = self._clock.wall_ns()
        if status.input_overflow:
            self.overruns += 1
        # PortAudio's ADC time of the first sample; never later than one frame before now.
        lag = time.currentTime - time.inputBufferAdcTime
        age = int(lag * _NS) if 0.0 < lag < 1.0 else 0
        with self._cond:
            if self._written - self._read >= self.RING_FRAMES:
                self._read += 1
                self.overruns += 1
            slot = self._written % self.RING_FRAMES
            self._ring[slot] = indata
            self._times[slot] = now - max(age, self._frame_ns)
            self._written += 1
            self._cond.notify()

    def open(self) -> None:
        with self._cond:
            self._closing = False
            self._written = self._read = 0
        if not self._stream.active:
            self._stream.start()

    def read(self, out: npt.NDArray[np.int16]) -> int | None:
        waited = 0.0
        with self._cond:
            while self._written == self._read:
                if self._closing:
                    return None
                if not self._cond.wait(_POLL_MS / 1000):
                    waited += _POLL_MS / 1000
                    if waited >= STALL_S:
                        raise DeviceError(f"{self.name}: no audio from the device for {STALL_S:g} s")
            if self._closing:
                return None
            slot = self._read % self.RING_FRAMES
            self._router.route(self._ring[slot], out)
            self._read += 1
            return int(self._times[slot])

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._stream.stop()
        self._stream.close()


class SdPlayback:
    """PortAudio playback: one continuous OutputStream whose callback hands its buffer to ``fill``.

    The callback period is 5 ms (BLOCK_US; at most one frame) and the buffer about 20 ms
    (SD_OUTPUT_LATENCY_S): a small period shortens the output delay, which with 20 ms periods is at
    least two of them (through the virtual card: 46 ms of output delay with 20 ms blocks, 34 ms with
    5 ms blocks in a 20 ms buffer). PortAudio's 'low' (~9 ms) underran with both CPUs busy.
    ``fill`` gets any length.
    """

    def __init__(
        self, uri: str, query: str, fmt: AudioFormat, clock: Clock, blocksize: int | None = None
    ) -> None:
        self.name = uri
        self.format: AudioFormat | None = None
        self.underruns = 0
        self.frames_written = 0
        self.delay_ns = 0  # from the callback to the DAC, as PortAudio last reported it
        self.error: BaseException | None = None
        self._clock = clock
        self._blocksize = blocksize
        self._fill: FillFn = _silence
        self._stream: Any = None
        self._sd, self._index, self._info = _sd_device(uri, query, False)
        self.device = f"sd://{self._index} ({self._info['name']})"
        self.open(fmt)

    def open(self, fmt: AudioFormat) -> None:
        if self._stream is not None and fmt == self.format:
            return
        self.close()
        sd = self._sd
        if fmt.channels > self._info["max_output_channels"]:
            reason = f"cannot play {fmt.channels} channel(s) (max {self._info['max_output_channels']})"
            raise _device_error(self.name, reason, False, "sd://")
        try:
            self._stream = sd.OutputStream(
                device=self._index,
                samplerate=fmt.sample_rate,
                channels=fmt.channels,
                dtype="int16",
                blocksize=self._blocksize or min(fmt.frame_samples, fmt.sample_rate * BLOCK_US // 1_000_000),
                latency=SD_OUTPUT_LATENCY_S,
                callback=self._callback,
            )
        except sd.PortAudioError as exc:
            raise _sd_open_error(self.name, exc, self._info, False, fmt.channels, fmt.sample_rate) from None
        self.latency_s = float(self._stream.latency)
        self.format = fmt

    def _callback(self, outdata: npt.NDArray[np.int16], frames: int, time: Any, status: Any) -> None:
        if status.output_underflow:
            self.underruns += 1
        try:
            if self._fill(outdata):
                self.frames_written += frames
        except BaseException as exc:  # reported through .error; the stream goes quiet
            self.error = exc
            outdata.fill(0)
            raise self._sd.CallbackAbort from None
        ahead = time.outputBufferDacTime - time.currentTime
        if 0.0 < ahead < 1.0:
            self.delay_ns = int(ahead * _NS)

    def start(self, fill: FillFn) -> None:
        if self._stream is None:
            raise RuntimeError("open() the sink before start()")
        self.stop()
        self._fill = fill
        self._stream.start()

    def stop(self) -> None:
        if self._stream is not None and not self._stream.stopped:
            self._stream.stop()
        self._fill = _silence

    def close(self) -> None:
        if self._stream is not None:
            self.stop()
            self._stream.close()
            self._stream = None


def _silence(buf: npt.NDArray[np.int16]) -> bool:
    buf.fill(0)
    return False


# ----------------------------------------------------------------------------------------------------
# Entry points (called by sources.open_source and sinks.open_sink)


def open_capture(scheme: str, rest: str, fmt: AudioFormat, capture: CaptureOptions, clock: Clock) -> Source:
    """An opened, checked capture device for ``alsa://`` or ``sd://`` (read() after open())."""
    router = resolve_capture(fmt, capture)
    uri = f"{scheme}{rest}"
    if scheme == "alsa://":
        return AlsaCapture(uri, rest, fmt, router, clock)
    if scheme == "sd://":
        return SdCapture(uri, rest, fmt, router, clock)
    raise ConfigError(f"{uri!r}: not a sound device (use alsa://DEVICE or sd://DEVICE)")


def open_playback(scheme: str, rest: str, fmt: AudioFormat, clock: Clock) -> Sink:
    """An opened, checked playback device for ``sd://`` or ``alsa://`` (start(fill) to play)."""
    uri = f"{scheme}{rest}"
    if scheme == "sd://":
        return SdPlayback(uri, rest, fmt, clock)
    if scheme == "alsa://":
        return AlsaPlayback(uri, rest, fmt, clock)
    raise ConfigError(f"{uri!r}: not a sound device (use sd://DEVICE or alsa://DEVICE)")


__all__ = [
    "AlsaCapture",
    "AlsaCard",
    "AlsaCardDevice",
    "AlsaPcm",
    "AlsaPlayback",
    "Backend",
    "ChannelRouter",
    "DeviceList",
    "PortAudioDevice",
    "SdCapture",
    "SdPlayback",
    "default_input_uri",
    "default_output_uri",
    "list_devices",
    "open_capture",
    "open_playback",
    "parse_proc_asound_pcm",
    "resolve_capture",
]
