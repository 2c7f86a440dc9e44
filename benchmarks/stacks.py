"""Where the time goes: a py-spy raw profile summarised by group, by function (own and total) and thread.

    py-spy record -r 100 -d 15 --threads --format raw -o /tmp/recv.txt -p PID
    python -m benchmarks.stacks /tmp/recv.txt --rate 100 --seconds 15 [--top 15]

py-spy (without ``--native``) sees Python frames only: time in a C extension (libopus through ctypes,
gRPC's Cython core, numpy, libsamplerate) shows as the Python line that called it, so each sample is
classified by its innermost frame: the file, the function and the text of that source line (read from
the repository or the installed package), by the first matching rule of GROUPS. A sample is one
thread seen active once: running, or runnable and waiting for a core (py-spy's idle test reads the
thread's OS state), so on a loaded machine the figures exceed the process's CPU and frames that only
return from a wait show up as "waits". Threads that never run Python (gRPC's C-core pollers and
timers) are not sampled at all: compare with the process's CPU from /proc (benchmarks/cpu.py).
"""

from __future__ import annotations

import argparse
import linecache
import re
import sys
import sysconfig
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SITE = Path(sysconfig.get_paths()["purelib"])
STDLIB = Path(sysconfig.get_paths()["stdlib"])
FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*):(?P<line>\d+)\)$")

# (group, pattern on the file, pattern on the function, pattern on the source line): first match wins.
GROUPS: list[tuple[str, str, str, str]] = [
    ("Opus (libopus via ctypes)", r"tiality_cli/codec\.py|opuslib/", "", ""),
    ("resampling (libsamplerate)", r"samplerate/", "", r"_resampler\.process|samplerate\."),
    ("gRPC / protobuf", r"grpc/|grpc_\w+/|google/protobuf|tiality_cli/net/|_pb2", "", r"\bpb\.|grpc"),
    ("level metering", "", "", r"\.peak\b|\.rms\b|dbfs|np\.dot\(flat|np\.vdot"),
    ("waits (threading, sleep, queue, asyncio)", r"threading\.py|queue\.py|selectors\.py|asyncio/", "",
     r"\.wait\(|sleep\(|wait_next\("),
    ("stats and JSON lines", r"tiality_cli/stats\.py|tiality_cli/cli/|json/",
     r"snapshot|_summarise|session_views", ""),
    ("numpy (copies, mixing, conversion, tone)", r"numpy/", "", r"\bnp\.|\[:\]|acc \+= |\*= "),
    ("playout control (jitter buffer, latency, drift)", r"tiality_cli/(playout|jitter)\.py", "", ""),
    ("sender loop and backlog", r"tiality_cli/sender\.py", "", ""),
    ("mixing, sink and source loops (receiver.py, io/)", r"tiality_cli/receiver\.py|tiality_cli/io/", "", ""),
]  # fmt: skip
OTHER = "other"


@dataclass(frozen=True, slots=True)
class Frame:
    func: str
    file: str
    line: int

    @property
    def name(self) -> str:
        return f"{self.func} ({self.file})"

    def source(self) -> str:
        for base in (ROOT, SITE, STDLIB):
            path = base / self.file
            if path.is_file():
                return linecache.getline(str(path), self.line).strip()
        return ""


def parse(path: str) -> list[tuple[str, list[Frame], int]]:
    """(thread, frames outermost first, count) per line of a py-spy raw (collapsed) file."""
    stacks = []
    for text in Path(path).read_text().splitlines():
        body, _, count = text.rpartition(" ")
        if not body or not count.isdigit():
            continue
        parts = body.split(";")
        thread = parts[0] if parts[0].startswith(("thread", "process")) else ""
        frames = []
        for part in parts[1:] if thread else parts:
            m = FRAME.match(part)
            if m:
                frames.append(Frame(m["func"], m["file"], int(m["line"])))
        if frames:
            stacks.append((thread, frames, int(count)))
    return stacks


def group_of(frame: Frame) -> str:
    src = frame.source()
    for group, file_re, func_re, line_re in GROUPS:
        if (
            (file_re and re.search(file_re, frame.file))
            or (func_re and re.search(func_re, frame.func))
            or (line_re and re.search(line_re, src))
        ):
            return group
    return OTHER


def thread_kind(frames: Sequence[Frame]) -> str:
    """The thread's job: the first frame past the threading and concurrent.futures bootstrap."""
    for f in frames:
        if not re.search(r"threading\.py|concurrent/futures|runpy\.py|<module>", f"{f.file} {f.func}"):
            return f.func
    return frames[0].func


def table(title: str, counts: Counter[str], total: int, rounds: float, top: int) -> list[str]:
    out = [f"| {title} | samples | share | ≈ % of a core |", "|---|---:|---:|---:|"]
    for key, n in counts.most_common(top):
        out.append(f"| {key} | {n} | {100 * n / total:.1f} % | {100 * n / rounds:.2f} % |")
    return out


def summarise(path: str, rate: float, seconds: float, top: int, thread: str = "") -> list[str]:
    stacks = [s for s in parse(path) if not thread or thread_kind(s[1]) == thread]
    total = sum(c for _, _, c in stacks)
    rounds = rate * seconds
    groups: Counter[str] = Counter()
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    lines: Counter[str] = Counter()
    for _, frames, count in stacks:
        leaf = frames[-1]
        groups[group_of(leaf)] += count
        lines[f"`{leaf.file}:{leaf.line}` `{leaf.source()[:70]}`"] += count
        own[f"`{leaf.name}`"] += count
        for name in {f"`{f.name}`" for f in frames}:
            incl[name] += count
        threads[f"`{thread_kind(frames)}`"] += count
    return [
        f"{total} active thread samples in {seconds:g} s at {rate:g} Hz: {100 * total / rounds:.1f} % of a "
        "core as py-spy sees it.",
        "",
        *table("group (innermost frame)", groups, total, rounds, len(groups)),
        "",
        *table("thread (its entry function)", threads, total, rounds, top),
        "",
        *table("function, own", own, total, rounds, top),
        "",
        *table("function, total (itself and what it calls)", incl, total, rounds, top),
        "",
        *table("source line, own", lines, total, rounds, top),
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.stacks", description=__doc__.split("\n\n")[0])
    ap.add_argument("profile", help="py-spy raw output (--format raw)")
    ap.add_argument("--rate", type=float, default=100.0, help="py-spy's --rate")
    ap.add_argument("--seconds", type=float, required=True, help="py-spy's --duration")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--thread", default="", help="only the threads with this entry function")
    args = ap.parse_args(argv)
    print("\n".join(summarise(args.profile, args.rate, args.seconds, args.top, args.thread)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
