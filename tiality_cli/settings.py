"""Configuration files: ``/etc/tiality/tiality.toml`` and ``~/.config/tiality/tiality.toml``.

    config_paths(environ) -> [(kind, path, required)]     which files, lowest precedence first
    load_files(environ) -> [ConfigFile]                    parsed, keys normalised; ConfigError when malformed
    check_keys(files, known)                               unknown sections or keys: ConfigError
    layered(files, section) -> {key: (value, ConfigFile)}  the user file's values over the system file's

One table per command, ``[send]`` and ``[recv]``; keys are option names, with dashes or underscores
(``frame-ms = 10``, ``token_file = "/etc/tiality/token"``; the positional HOST:PORT of send is
``target``). ``TIALITY_CONFIG=PATH`` reads that file instead of the system file (a per-robot file, or a
test's); the user file (``$XDG_CONFIG_HOME``, default ``~/.config``) still overrides it. Precedence as a
whole: command line > ``TIALITY_<OPTION>`` environment variable > user file > system file > default; the
CLI applies it (cli/settings.py). Pure stdlib: no typer here.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tiality_cli.errors import ConfigError

SYSTEM_FILE = Path("/etc/tiality/tiality.toml")
SYSTEM, USER = "system file", "user file"
CONFIG_ENV = "TIALITY_CONFIG"


def user_file(environ: Mapping[str, str]) -> Path:
    base = environ.get("XDG_CONFIG_HOME") or os.path.join(
        environ.get("HOME") or os.path.expanduser("~"), ".config"
    )
    return Path(base) / "tiality" / "tiality.toml"


def config_paths(environ: Mapping[str, str] = os.environ) -> list[tuple[str, Path, bool]]:
    """(kind, path, required) for each file, lowest precedence first; TIALITY_CONFIG must exist."""
    override = environ.get(CONFIG_ENV)
    system = (SYSTEM, Path(override), True) if override else (SYSTEM, SYSTEM_FILE, False)
    return [system, (USER, user_file(environ), False)]


def normalise(key: str) -> str:
    """``frame-ms`` and ``frame_ms`` are the same key."""
    return key.strip().replace("-", "_").lower()


@dataclass(frozen=True, slots=True)
class ConfigFile:
    kind: str  # SYSTEM or USER
    path: Path
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)  # keys normalised
    spelled: dict[tuple[str, str], str] = field(default_factory=dict)  # (section, key) -> as written

    def label(self) -> str:
        return f"{self.kind} {self.path}"


def load_file(kind: str, path: Path) -> ConfigFile:
    """Parses one file; ConfigError (one line, naming the file and the line) when it is not valid TOML."""
    import tomllib  # only when a file exists: most starts have none, and the Pi's sender starts sooner

    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    sections: dict[str, dict[str, Any]] = {}
    spelled: dict[tuple[str, str], str] = {}
    for name, table in data.items():
        if not isinstance(table, dict):
            raise ConfigError(
                f"{path}: {name} = {table!r} is outside a section; put options under [send] or [recv]"
            )
        sec = sections.setdefault(normalise(name), {})
        for key, value in table.items():
            k = normalise(key)
            if k in sec:
                raise ConfigError(
                    f"{path}: [{name}] sets {key!r} twice (dashes and underscores are the same)"
                )
            sec[k] = value
            spelled[(normalise(name), k)] = key
    return ConfigFile(kind, path, sections, spelled)


def load_files(environ: Mapping[str, str] = os.environ) -> list[ConfigFile]:
    """The files that exist, lowest precedence first."""
    out = []
    for kind, path, required in config_paths(environ):
        if not path.is_file():
            if required:
                raise ConfigError(f"{CONFIG_ENV}={path}: no such file")
            continue
        out.append(load_file(kind, path))
    return out


def check_keys(files: list[ConfigFile], known: Mapping[str, Collection[str]]) -> None:
    """ConfigError for the first section or key that no command knows (with the nearest known one)."""
    for f in files:
        for section, values in f.sections.items():
            if section not in known:
                near = difflib.get_close_matches(section, list(known), n=1)
                hint = f" (did you mean [{near[0]}]?)" if near else f" (sections: {', '.join(sorted(known))})"
                raise ConfigError(f"{f.path}: unknown section [{section}]{hint}")
            for key in values:
                if key not in known[section]:
                    near = difflib.get_close_matches(key, list(known[section]), n=1)
                    hint = f" (did you mean {near[0].replace('_', '-')!r}?)" if near else ""
                    written = f.spelled.get((section, key), key)
                    raise ConfigError(f"{f.path}: [{section}] unknown key {written!r}{hint}")


def layered(files: list[ConfigFile], section: str) -> dict[str, tuple[Any, ConfigFile]]:
    """Each key's value and the file it comes from: later files (the user's) win."""
    out: dict[str, tuple[Any, ConfigFile]] = {}
    for f in files:
        for key, value in f.sections.get(section, {}).items():
            out[key] = (value, f)
    return out
