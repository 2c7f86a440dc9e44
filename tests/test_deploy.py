"""deploy/: the systemd units and their EnvironmentFile (docs/pi.md).

The units are checked twice: by reading their directives (what docs/pi.md and the hardening promise),
and by ``systemd-analyze verify``, systemd's own parser, which reports unknown keys, bad values and
misplaced directives. ``verify`` needs no running systemd (it works in containers) and does not check
that ``User=`` exists or that ``EnvironmentFile=`` is readable; the one thing it checks on this machine
is that the ``ExecStart=`` binary exists and is executable. So the test verifies a copy of each unit
whose ExecStart path, /opt/tiality/.venv/bin/tiality, is rewritten to this checkout's ``tiality``
script (or the running Python when there is none); nothing else is changed. ``--man=no`` keeps it from
looking up ``man:`` documentation links, which minimal images lack.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "deploy" / "systemd"
ENV_FILE = ROOT / "deploy" / "default" / "tiality"
INSTALLED_BINARY = "/opt/tiality/.venv/bin/tiality"
COMMANDS = {"tiality-send.service": "send", "tiality-recv.service": "recv"}

Unit = dict[str, list[tuple[str, str]]]


def parse_unit(text: str) -> Unit:
    """Sections to (key, value) pairs in file order, keeping repeated keys (systemd.syntax(7))."""
    unit: Unit = {}
    section: list[tuple[str, str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], [])
            continue
        assert section is not None, f"directive outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not a KEY=VALUE line: {line!r}"
        section.append((key.strip(), value.strip()))
    return unit


def values(unit: Unit, section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def words(unit: Unit, section: str, key: str) -> set[str]:
    """The space-separated words of every occurrence of a list-valued directive (After=, Wants=...)."""
    return {w for v in values(unit, section, key) for w in v.split()}


def one(unit: Unit, section: str, key: str) -> str:
    found = values(unit, section, key)
    assert len(found) == 1, f"[{section}] {key}= should appear once, found {found}"
    return found[0]


def is_true(value: str) -> bool:
    return value.lower() in ("1", "yes", "true", "on")


def load(name: str) -> Unit:
    return parse_unit((UNITS / name).read_text())


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_unit_directives(name: str) -> None:
    unit = load(name)
    assert {"network-online.target", "sound.target"} <= words(unit, "Unit", "After")
    assert "network-online.target" in words(unit, "Unit", "Wants")

    svc = "Service"
    assert one(unit, svc, "ExecStart") == f"{INSTALLED_BINARY} {COMMANDS[name]}"
    assert "/etc/default/tiality" in values(unit, svc, "EnvironmentFile")
    assert one(unit, svc, "Restart") == "always"
    restart_sec = re.fullmatch(r"(\d+)(ms|s)?", one(unit, svc, "RestartSec"))
    assert restart_sec, "RestartSec= should be a plain number of seconds or ms"
    assert int(restart_sec[1]) / (1000 if restart_sec[2] == "ms" else 1) <= 5

    assert one(unit, svc, "User") == "tiality"
    assert "audio" in words(unit, svc, "Group") | words(unit, svc, "SupplementaryGroups")

    assert one(unit, svc, "ProtectSystem") == "strict"
    for key in (
        "ProtectHome",
        "NoNewPrivileges",
        "PrivateTmp",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectControlGroups",
        "LockPersonality",
    ):
        assert is_true(one(unit, svc, key)), key
    assert words(unit, svc, "RestrictAddressFamilies") == {"AF_INET", "AF_INET6", "AF_UNIX", "AF_NETLINK"}
    assert one(unit, svc, "DevicePolicy") == "closed"
    assert "char-alsa rw" in values(unit, svc, "DeviceAllow")
    assert one(unit, svc, "SystemCallArchitectures") == "native"
    assert one(unit, svc, "StandardOutput") == "journal"
    # /dev/snd must stay visible; ctypes callbacks (libffi closures) may need W+X memory; audio threads
    # may ask for real-time scheduling. See the comments in the units.
    assert not any(is_true(v) for v in values(unit, svc, "PrivateDevices"))
    assert not values(unit, svc, "MemoryDenyWriteExecute")
    assert not any(is_true(v) for v in values(unit, svc, "RestrictRealtime"))
    assert "multi-user.target" in words(unit, "Install", "WantedBy")


def test_recv_unit_state_directory() -> None:
    unit = load("tiality-recv.service")
    assert one(unit, "Service", "StateDirectory") == "tiality"


def help_text(command: str) -> str:
    """``tiality COMMAND --help``, wide enough that no option row wraps."""
    env = {**os.environ, "COLUMNS": "200", "TERMINAL_WIDTH": "200", "NO_COLOR": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "tiality_cli", command, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def tiality_options(command: str) -> set[str]:
    """Long option names (without --) in ``tiality COMMAND --help``: the first word of each table row."""
    text = help_text(command)
    options = set(re.findall(r"^\W*--([a-z][a-z0-9-]*)", text, flags=re.MULTILINE))
    assert {"help", "token"} <= options, text
    return options - {"help"}


def env_file_variables() -> set[str]:
    """Every variable the example file sets or shows commented out (``#TIALITY_X=...``)."""
    names: set[str] = set()
    for raw in ENV_FILE.read_text().splitlines():
        line = raw.strip()
        m = re.fullmatch(r"#?(TIALITY_[A-Z0-9_]+)=(.*)", line)
        if m:
            assert " " not in m.group(2) and '"' not in m.group(2), line
            names.add(m.group(1))
        else:
            assert not line or line.startswith("#"), f"not a comment or VAR=value: {line!r}"
    return names


def test_env_file_names_match_options() -> None:
    """--foo-bar is TIALITY_FOO_BAR; send's positional HOST:PORT is TIALITY_TARGET."""
    variables = env_file_variables()
    required = {
        "TIALITY_TARGET",
        "TIALITY_TOKEN",
        "TIALITY_INPUT",
        "TIALITY_CAPTURE_CHANNELS",
        "TIALITY_CHANNEL_MAP",
        "TIALITY_FRAME_MS",
        "TIALITY_OUTPUT",
        "TIALITY_RECORD",
    }
    assert required <= variables
    options = tiality_options("send") | tiality_options("recv")
    known = {"TIALITY_TARGET"} | {"TIALITY_" + o.upper().replace("-", "_") for o in options}
    assert variables <= known, f"no such option: {sorted(variables - known)}"


def test_env_file_matches_declared_env_vars() -> None:
    """Once the CLI declares its environment variables (Typer shows ``[env var: ...]`` in --help), each
    one the example file uses must be among them."""
    declared = {
        name
        for command in ("send", "recv")
        for name in re.findall(r"env var:\s*(TIALITY_[A-Z0-9_]+)", help_text(command))
    }
    assert declared, "send and recv --help declare their TIALITY_* environment variables"
    missing = env_file_variables() - declared
    assert not missing, f"used in deploy/default/tiality but not declared by the CLI: {sorted(missing)}"


def verify_copy(name: str, directory: Path, *, text: str | None = None) -> Path:
    """A copy of the unit with ExecStart pointing at a binary that exists here (see the module doc)."""
    local = Path(sys.executable).with_name("tiality")
    binary = local if os.access(local, os.X_OK) else Path(sys.executable)
    original = (UNITS / name).read_text() if text is None else text
    assert INSTALLED_BINARY in original
    path = directory / name
    path.write_text(original.replace(INSTALLED_BINARY, str(binary)))
    return path


def systemd_analyze_verify(unit: Path) -> tuple[int, list[str]]:
    """Exit code and the stderr lines that concern the unit."""
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze not installed (Debian package: systemd; scripts/sysdeps.sh test)")
    proc = subprocess.run(
        [exe, "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0"},
    )
    lines = [ln for ln in proc.stderr.splitlines() if unit.name in ln or str(unit.parent) in ln]
    return proc.returncode, lines


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_systemd_analyze_verify(name: str, tmp_path: Path) -> None:
    code, complaints = systemd_analyze_verify(verify_copy(name, tmp_path))
    assert code == 0 and not complaints, "\n".join(complaints)


def test_systemd_analyze_verify_catches_mistakes(tmp_path: Path) -> None:
    """The check above is not vacuous: a misspelt value and an unknown key are reported."""
    text = (UNITS / "tiality-send.service").read_text()
    broken = text.replace("Restart=always", "Restart=allways") + "\n[Service]\nProtectFoo=yes\n"
    _, complaints = systemd_analyze_verify(verify_copy("tiality-send.service", tmp_path, text=broken))
    joined = "\n".join(complaints)
    assert "allways" in joined and "ProtectFoo" in joined, joined
