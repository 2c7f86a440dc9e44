"""Options from the environment and the configuration files, and ``tiality config``.

Every option of ``send`` and ``recv`` (and the shared ones of ``doctor``) can also come from a
``TIALITY_<OPTION>`` environment variable (``--frame-ms`` -> ``TIALITY_FRAME_MS``, ``-i/--input`` ->
``TIALITY_INPUT``, send's HOST:PORT -> ``TIALITY_TARGET``) and from the ``[send]`` / ``[recv]`` tables of
the configuration files (tiality_cli/settings.py). Precedence: command line > environment > user file >
system file > default. The commands are built with ``ConfiguredCommand``: it names each option's
variable (shown by ``--help``), and hands the files' values to Typer as the context's ``default_map``,
which its parser consults after the command line and the environment, before the option's default.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

import typer
from typer.core import TyperCommand

from tiality_cli.errors import ConfigError

if TYPE_CHECKING:
    from rich.table import Table

    from tiality_cli.settings import ConfigFile

ENV_PREFIX = "TIALITY_"
SOURCES = ("cli", "env", "user file", "system file", "default")
SECRET_KEYS = frozenset({"token"})


def option_key(param: Any) -> str:
    """The option's config key and variable stem: ``--frame-ms`` -> ``frame_ms``; an argument's name."""
    for opt in getattr(param, "opts", ()):
        if opt.startswith("--"):
            return str(opt[2:].replace("-", "_"))
    return str(param.name)


def env_name(param: Any) -> str:
    return f"{ENV_PREFIX}{option_key(param).upper()}"


def _wants_help(args: list[str]) -> bool:
    return any(a in ("--help", "-h") for a in args)


# Typer (0.29) converts every option that is not a bool flag, defaults included, through a pydantic
# TypeAdapter: importing pydantic for that costs 0.06 s of CPU, a fifth of `send`'s start-up on a Pi.
# Values that are plainly a str, an int or a decimal number are converted here the way the adapter
# converts them; anything else (a typo, "1e3", a value of another type) still goes to Typer's own
# conversion, so its result and its error messages are Typer's. Typer internals: if they are not
# there (another Typer version), every option simply keeps Typer's conversion.
try:
    from typer._coercion import RuntimeParam, TypeDescriptor, build_runtime_param
except ImportError:  # pragma: no cover - another Typer
    RuntimeParam = None  # type: ignore[assignment,misc]

_PLAIN = {
    bool: None,  # a flag's value is already a bool; anything else goes to Typer
    str: None,
    int: re.compile(r"-?[0-9]+"),
    float: re.compile(r"-?[0-9]+(?:\.[0-9]+)?"),
}

if RuntimeParam is not None:

    @dataclass(frozen=True)
    class _PlainConversion(RuntimeParam):
        """bool, str, int or float options: plain values converted without pydantic, the rest by Typer."""

        descriptor: TypeDescriptor

        def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
            kind = self.annotation
            if type(value) is kind:
                return value
            if type(value) is str:
                pattern = _PLAIN[kind]
                if kind is str:
                    return value
                if pattern is not None and pattern.fullmatch(value):
                    return kind(value)
            return build_runtime_param(self.descriptor)._coerce_value(value, param, ctx)


def convert_plainly(param: Any) -> None:
    """Gives a bool, str, int or float option (one value, no bounds) the conversion above."""
    desc = getattr(param, "type_descriptor", None)
    if RuntimeParam is None or desc is None or not hasattr(param, "_runtime_param"):
        return
    info = desc.parameter_info
    if (
        desc.annotation not in _PLAIN
        or desc.file_annotation is not None
        or param.nargs != 1
        or param.multiple
        or info.parser is not None
        or info.min is not None
        or info.max is not None
    ):
        return
    param._runtime_param = _PlainConversion(info, desc.annotation, desc)


class ConfiguredCommand(TyperCommand):
    """A Typer command whose options also come from ``TIALITY_*`` variables and the config files.

    ``section``: the config table of this command (``send``, ``recv``), or None. ``borrow``: (section, keys)
    whose values this command takes too (``doctor`` checks what send and recv would use). ``env_keys``:
    the options that get a variable (None: all of them).
    """

    section: ClassVar[str | None] = None
    borrow: ClassVar[tuple[tuple[str, frozenset[str]], ...]] = ()
    env_keys: ClassVar[frozenset[str] | None] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            if param.name is None or param.envvar is not None:
                continue
            if self.env_keys is None or option_key(param) in self.env_keys:
                param.envvar = env_name(param)
                param.show_envvar = True  # type: ignore[attr-defined]  # options and Typer arguments have it

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        for param in self.get_params(ctx):  # the options and --help, which Click adds to them here
            convert_plainly(param)
        rest: list[str] = super().parse_args(ctx, args)
        return rest

    def config_keys(self) -> dict[str, Any]:
        """Config key -> parameter, for every option of the command."""
        return {option_key(p): p for p in self.params if p.name is not None}

    def file_defaults(self, files: list[ConfigFile], ctx: Any) -> dict[str, Any]:
        """``default_map`` from the files: the user's values over the system's, converted and checked."""
        from tiality_cli.settings import layered

        keys = self.config_keys()
        picked: dict[str, tuple[Any, ConfigFile, str]] = {}
        sources = [(section, wanted) for section, wanted in self.borrow]
        if self.section is not None:
            sources.append((self.section, frozenset(keys)))
        for section, wanted in sources:
            for key, (value, origin) in layered(files, section).items():
                if key in wanted and key in keys:
                    picked[key] = (value, origin, section)
        out: dict[str, Any] = {}
        for key, (value, origin, section) in picked.items():
            param = keys[key]
            where = f"{origin.path}: [{section}] {key.replace('_', '-')}"
            out[str(param.name)] = convert(param, value, where, ctx)
        return out

    def make_context(self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any) -> Any:
        if "default_map" not in extra and (self.section is not None or self.borrow):
            try:
                scratch = self.context_class(self, info_name=info_name, parent=parent)
                extra["default_map"] = self.file_defaults(checked_files(parent), scratch)
            except ConfigError as exc:
                if not _wants_help(args):  # --help works even with a broken file
                    from tiality_cli.cli.common import fail

                    raise fail(str(exc), exc.exit_code) from None
        return super().make_context(info_name, args, parent, **extra)


class SendCommand(ConfiguredCommand):
    section = "send"


class RecvCommand(ConfiguredCommand):
    section = "recv"


def convert(param: Any, value: Any, where: str, ctx: Any) -> Any:
    """A file's or variable's value as the option's type; ConfigError naming where it came from."""
    if isinstance(value, list):
        value = ",".join(str(v) for v in value)  # channel-map = [0, 1]
    try:
        return param.process_value(ctx, value)
    except Exception as exc:  # click's BadParameter: its message says what was expected
        message = getattr(exc, "message", None) or str(exc)
        raise ConfigError(f"{where} = {value!r}: {message}") from None


def known_sections(commands: Mapping[str, Any]) -> dict[str, set[str]]:
    """Each config section and the keys its command accepts, from the app's commands."""
    out: dict[str, set[str]] = {}
    for cmd in commands.values():
        if isinstance(cmd, ConfiguredCommand) and cmd.section is not None:
            out.setdefault(cmd.section, set()).update(cmd.config_keys())
    return out


def checked_files(parent: Any) -> list[ConfigFile]:
    """The config files, parsed, with every key checked against the app's commands."""
    from tiality_cli.settings import check_keys, load_files

    files = load_files(os.environ)
    if files and parent is not None:
        known = known_sections(configured_commands(parent))
        if known:
            check_keys(files, known)
    return files


def configured_commands(parent: Any) -> Mapping[str, Any]:
    """The app's commands that read a config section (send, recv), built: the console entry builds only
    the command it runs, and the root group builds these on demand."""
    root = parent.find_root().command
    build = getattr(root, "configured_commands", None)
    return build() if build is not None else getattr(root, "commands", {})


# ---------------------------------------------------------------------------------------------------------
# tiality config
# ---------------------------------------------------------------------------------------------------------
def typed_values(command: ConfiguredCommand, name: str, args: list[str], parent: Any) -> dict[str, Any]:
    """The options ``args`` set on the command line of ``command``, parsed by the command itself."""
    if not args:
        return {}
    sub = command.make_context(name, list(args), parent=parent, resilient_parsing=True)
    out = {}
    for key, param in command.config_keys().items():
        source = sub.get_parameter_source(str(param.name))
        if source is not None and source.name == "COMMANDLINE":
            out[key] = sub.params.get(str(param.name))
    return out


def effective(
    command: ConfiguredCommand,
    files: list[ConfigFile],
    environ: Mapping[str, str],
    ctx: Any,
    typed: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Each option of ``command``: its value in effect and its source (``typed``: the command line's)."""
    from tiality_cli.settings import layered

    from_files = layered(files, command.section or "")
    rows = []
    for key, param in command.config_keys().items():
        if key == "help":
            continue
        var = param.envvar if isinstance(param.envvar, str) else None
        raw = environ.get(var) if var else None
        origin: ConfigFile | None = None
        if typed and key in typed:
            value, source = typed[key], "cli"
        elif raw:
            value, source = convert(param, raw, f"{var}", ctx), "env"
        elif key in from_files:
            value, origin = from_files[key]
            where = f"{origin.path}: [{command.section}] {key.replace('_', '-')}"
            value = convert(param, value, where, ctx)
            source = origin.kind
        else:
            value, source = param.default, "default"
        if callable(value):
            value = value()
        if key in SECRET_KEYS and value:
            value = "(set)"
        rows.append(
            {
                "option": key.upper()
                if param.param_type_name == "argument"
                else "--" + key.replace("_", "-"),
                "key": key.replace("_", "-"),
                "value": value,
                "source": source,
                "env": var,
                "file": str(origin.path) if origin is not None else None,
            }
        )
    return rows


def config(
    ctx: typer.Context,
    command: Annotated[
        str | None,
        typer.Argument(
            help="send or recv: show only that command; its options may follow.", show_default=False
        ),
    ] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print it as one JSON document.")] = False,
) -> None:
    """Show the configuration in effect for send and recv, and where each value comes from.

    Sources, strongest first: cli (options given after the command's name), env (TIALITY_<OPTION>),
    user file (~/.config/tiality/tiality.toml), system file (/etc/tiality/tiality.toml, or
    $TIALITY_CONFIG), default.
    """
    from tiality_cli.cli.common import guarded

    def body() -> None:
        from tiality_cli.settings import config_paths

        files = checked_files(ctx.parent)
        every = configured_commands(ctx.parent) if ctx.parent is not None else {}
        wanted = ("send", "recv") if command is None else (command,)
        if command not in (None, "send", "recv"):
            raise ConfigError(f"{command!r}: tiality config shows send or recv")
        if command is None and ctx.args:
            raise ConfigError(f"{' '.join(ctx.args)}: name the command first (tiality config send ...)")
        commands = {n: c for n, c in every.items() if n in wanted and isinstance(c, ConfiguredCommand)}
        doc: dict[str, Any] = {
            "files": [
                {"kind": kind, "path": str(path), "exists": path.is_file()}
                for kind, path, _ in config_paths(os.environ)
            ]
        }
        for name, cmd in commands.items():
            scratch = cmd.context_class(cmd, info_name=name, parent=ctx.parent)
            typed = typed_values(cmd, name, ctx.args, ctx.parent)
            doc[name] = effective(cmd, files, os.environ, scratch, typed)
        if json_:
            import json

            print(json.dumps(doc, indent=2, default=str))
            return
        from tiality_cli.cli.common import out_console

        console = out_console()
        for f in doc["files"]:
            state = "read" if f["exists"] else "absent"
            console.print(f"{f['kind']}: {f['path']} ({state})", markup=False, highlight=False)
        for name in commands:
            console.print(config_table(name, doc[name]))

    guarded(body)


def config_table(name: str, rows: list[dict[str, Any]]) -> Table:
    from rich.table import Table
    from rich.text import Text

    t = Table(title=f"tiality {name}", title_justify="left")
    for col in ("Option", "Value", "Source", "Variable"):
        t.add_column(col)
    for r in rows:
        value = "" if r["value"] is None else str(r["value"])
        source = r["source"]
        style = "dim" if r["source"] == "default" else "bold"
        t.add_row(r["option"], Text(value), Text(source, style=style), Text(r["env"] or "", style="cyan"))
    return t


CONFIG_EPILOG = (
    "Examples:\n\n"
    "  tiality config                                  # what send and recv would use, and why\n\n"
    "  TIALITY_FRAME_MS=10 tiality config --json | jq '.send[] | select(.key == \"frame-ms\")'\n\n"
    "  tiality config send gui-host:50052 --frame-ms 10   # with options typed as for send\n\n"
    "  TIALITY_CONFIG=robot.toml tiality config        # another file instead of /etc/tiality/tiality.toml"
)


def register(app: typer.Typer) -> None:
    """Adds ``config`` to the tiality app."""
    app.command(
        "config",
        epilog=CONFIG_EPILOG,
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )(config)
