"""`tensorgate serve`: its flags, each with a TENSORGATE_* environment equivalent, parsed into a
ServerConfig. The flags are made from ServerConfig's own declaration (config.flag), so a default
cannot disagree with the setting; starting the process is launch.py's and workers.py's job.

A bad value, on the command line or in the environment, is one line naming the flag or the
variable and what was expected; it never breaks another subcommand (Kubernetes injects
TENSORGATE_PORT=tcp://… into pods beside a Service named tensorgate).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tensorgate.server import logs
from tensorgate.server.config import ConfigError, ServerConfig

log = logging.getLogger("tensorgate")

ENV_PREFIX = "TENSORGATE_"
EVENT_LOOPS = ("auto", "uvloop", "asyncio")


def env_name(flag_name: str) -> str:
    """The environment variable of a flag: --max-pending-jobs → TENSORGATE_MAX_PENDING_JOBS."""
    return ENV_PREFIX + flag_name.upper()


def _whole(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError("expected a whole number") from None


def _number(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValueError("expected a number") from None


def _switch(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("", "0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false (1/0, yes/no, on/off)")


def _names(value: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in value.split(",") if name.strip())


def _workers(value: str) -> int:
    if value == "auto":
        from tensorgate.server.workers import usable_cores

        return usable_cores()
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise ValueError("expected a number >= 1 or auto")
    return count


def _choice(choices: tuple[str, ...], upper: bool = False) -> Callable[[str], str]:
    def parse(value: str) -> str:
        value = value.upper() if upper else value
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return value

    return parse


_PARSERS: dict[Any, Callable[[str], Any]] = {
    int: _whole,
    float: _number,
    bool: _switch,
    str: str,
    Path: Path,
    tuple[str, ...]: _names,
}


@dataclasses.dataclass(slots=True, frozen=True)
class _Flag:
    dest: str
    parse: Callable[[str], Any]
    default: Any
    help: str
    switch: bool = False

    @property
    def option(self) -> str:
        return "--" + self.dest.replace("_", "-")


def _flags() -> list[_Flag]:
    """Every serve flag: ServerConfig's flag() fields, then the process-level ones."""
    hints = typing.get_type_hints(ServerConfig)
    flags = [
        _Flag(f.name, _PARSERS[hints[f.name]], f.default, f.metadata["help"], hints[f.name] is bool)
        for f in dataclasses.fields(ServerConfig)
        if "help" in f.metadata
    ]
    flags += [
        _Flag("event_loop", _choice(EVENT_LOOPS), "auto", "auto: uvloop where installed"),
        _Flag(
            "workers",
            _workers,
            1,
            "serving processes sharing the port: a number, or auto (one per usable core); "
            "more than 1 needs --job-store redis://",
        ),
        _Flag("log_level", _choice(logs.LEVELS, upper=True), "INFO", ", ".join(logs.LEVELS)),
        _Flag(
            "log_format",
            _choice(logs.FORMATS),
            "text",
            "text, or json: one JSON object a line (time, level, logger, message, request_id)",
        ),
    ]
    return flags


class _Parse(argparse.Action):
    """Parses a flag's value on the command line with the flag's own parser (one line on error)."""

    def __init__(self, *args: Any, parse: Callable[[str], Any], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._parse = parse

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, value: Any,
        option: str | None = None,
    ) -> None:  # fmt: skip
        try:
            setattr(namespace, self.dest, self._parse(value))
        except ValueError as exc:
            parser.error(f"argument {option}: {exc}, got {value!r}")


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(value) or "(empty)"
    if isinstance(value, bool):
        return "off" if not value else "on"
    return str(value) if value != "" else "(empty)"


def add_serve_command(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    serve = commands.add_parser(
        "serve",
        help="serve the models of a repository over gRPC",
        description="Each flag also reads TENSORGATE_<FLAG> from the environment "
        "(e.g. TENSORGATE_PORT=50052); a flag on the command line wins.",
    )
    for flag in _flags():
        text = f"{flag.help} (default: {_shown(flag.default)}; env {env_name(flag.dest)})"
        if flag.switch:
            serve.add_argument(flag.option, dest=flag.dest, action="store_true", default=None,
                               help=text)  # fmt: skip
        else:
            serve.add_argument(flag.option, dest=flag.dest, action=_Parse, parse=flag.parse,
                               default=None, metavar=flag.dest.upper(), help=text)  # fmt: skip
    serve.set_defaults(func=_serve)


def resolve(args: argparse.Namespace, environ: typing.Mapping[str, str] | None = None) -> None:
    """Fills each serve flag not given on the command line from its TENSORGATE_* variable, else
    its default. A bad variable raises ConfigError naming it and its value."""
    environ = os.environ if environ is None else environ
    for flag in _flags():
        if getattr(args, flag.dest) is not None:
            continue
        name = env_name(flag.dest)
        raw = environ.get(name)
        if raw is None:
            setattr(args, flag.dest, flag.default)
            continue
        try:
            setattr(args, flag.dest, flag.parse(raw))
        except ValueError as exc:
            raise ConfigError(
                f"environment variable {name}={raw[:200]!r} is not a valid {flag.option}: {exc}"
                + (_SERVICE_LINK_HINT if raw.startswith("tcp://") else "")
            ) from None


# What a value like tcp://10.96.1.2:50051 in TENSORGATE_PORT means.
_SERVICE_LINK_HINT = (
    " (Kubernetes injects such variables for a Service named tensorgate: set "
    "enableServiceLinks: false in the pod spec, as deploy/kubernetes does)"
)


def server_config(args: argparse.Namespace) -> ServerConfig:
    """The ServerConfig the resolved flags describe (no field copied by hand)."""
    names = {f.name for f in dataclasses.fields(ServerConfig) if "help" in f.metadata}
    return ServerConfig(**{name: getattr(args, name) for name in names})


def _serve(args: argparse.Namespace) -> int:
    try:
        resolve(args)
    except ConfigError as exc:
        logs.configure("INFO", os.environ.get(env_name("log_format"), "text"))
        log.error("%s", exc)
        return 2
    workers: int = args.workers
    logs.configure(
        args.log_level, args.log_format, "supervisor pid %(process)d" if workers > 1 else ""
    )
    config = server_config(args)
    try:
        if workers > 1:
            from tensorgate.server.workers import Supervisor

            return Supervisor(
                config, workers, args.log_level, args.event_loop, args.log_format
            ).run()
        from tensorgate.server.launch import run

        run(config, args.event_loop)
    except ConfigError as exc:
        log.error("%s", exc)
        return 1
    return 0
