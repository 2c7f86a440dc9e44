"""Loading the audio libraries: pyalsaaudio, PortAudio (sounddevice) and libasound through ctypes.

Imported only by the device modules, inside the functions that need a backend, so ``tiality --help``
loads none of them. alsa-lib's own stderr messages are silenced: tiality reports its own one line.
"""

from __future__ import annotations

import ctypes as _ctypes
import sys as _sys
from typing import Any

from tiality_cli.errors import DeviceError

_LIBS: dict[str, Any] = {}


def libasound() -> Any:
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


def libc() -> Any:
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


def silence_alsa() -> None:
    lib = libasound()
    if lib is not None:
        lib.snd_lib_error_set_handler(_SILENT_HANDLER)


def load_alsaaudio() -> Any:
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
    silence_alsa()
    return alsaaudio


def load_sounddevice() -> Any:
    """Imports sounddevice; DeviceError when the PortAudio library is missing."""
    try:
        import sounddevice
    except (ImportError, OSError) as exc:
        raise DeviceError(f"PortAudio unavailable: {exc} (install libportaudio2)") from None
    silence_alsa()  # PortAudio's ALSA host API reports xruns through alsa-lib's stderr printer too
    return sounddevice
