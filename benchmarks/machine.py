"""What a benchmark notes about the machine and the code it measured, for the lines under its tables."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name (x86 ``model name``, or a Pi's ``Model``)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("model name", "Model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def run_text(cmd: list[str]) -> str:
    """A command's stdout, stripped; empty if it cannot run."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def tiality_version(root: Path) -> str:
    """The commit of the tiality that is imported (and where, if not from ``root``), marked if modified."""
    import tiality_cli

    source = Path(tiality_cli.__file__).resolve().parent.parent
    commit = run_text(["git", "-C", str(source), "rev-parse", "--short", "HEAD"])
    dirty = run_text(["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"])
    where = "" if source == root else f" from {source}"
    version = f"{commit}{' with uncommitted changes' if dirty else ''}" if commit else "(not a git checkout)"
    return version + where
