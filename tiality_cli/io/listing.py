"""What ``tiality devices`` shows: ALSA cards and PCMs, PortAudio devices, and the URIs to use.

Also the one-line menus that device errors end with ("capture devices: alsa://default, sd://0 ..."),
and PortAudio's device matching (words in order in "name, host API", as python-sounddevice matches).
"""

from __future__ import annotations

import ctypes as _ctypes
import re as _re
import sys as _sys
from dataclasses import asdict, dataclass
from typing import Any

from tiality_cli.errors import DeviceError
from tiality_cli.io.backends import libasound, libc, load_alsaaudio, load_sounddevice

_MENU_MAX = 12  # device URIs listed in one error line
# ALSA PCMs that are plugins needing arguments or a server, not devices: left out of error hints.
_HELPER_PCMS = frozenset(("null", "lavrate", "samplerate", "speexrate", "jack", "oss", "speex"))
_HELPER_PCMS |= {"upmix", "vdownmix", "a52", "usbstream"}


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
        aa = load_alsaaudio()
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
    lib = libasound()
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
        libc().free(p)


def _list_portaudio() -> tuple[Backend, tuple[PortAudioDevice, ...]]:
    try:
        sd = load_sounddevice()
        infos = list(sd.query_devices())
        hostapis = [h["name"] for h in sd.query_hostapis()]
        default_in, default_out = sd_defaults(sd)
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
                if sd_match(infos, hostapis, info["name"], kind) == [i]:
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


def sd_defaults(sd: Any) -> tuple[int, int]:
    try:
        d_in, d_out = sd.default.device
    except Exception:
        return -1, -1
    return (d_in if d_in is not None else -1), (d_out if d_out is not None else -1)


def sd_match(infos: list[Any], hostapis: list[str], query: str, kind: str) -> list[int]:
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


def device_error(uri: str, reason: str, capture: bool, scheme: str) -> DeviceError:
    return DeviceError(f"{uri}: {reason}; {_menu(capture, scheme)}")


def ranges(values: list[int]) -> str:
    """[1, 2, 3, 6] -> '1-3, 6'."""
    spans: list[list[int]] = []
    for v in sorted(set(values)):
        if spans and v == spans[-1][1] + 1:
            spans[-1][1] = v
        else:
            spans.append([v, v])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans)
