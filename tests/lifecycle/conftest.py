"""A repository of versioned `python` models whose answer says which version ran: y = x * factor,
the factor written into each version's model.py."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.harness import ServerThread

_MODEL = """
import time

class Model:
    def load(self, config):
        if {broken!r}:
            raise RuntimeError("version {version} is broken: its weights do not load")

    def execute(self, inputs, stream):
        if {sleep_s!r} and inputs["x"].any():
            time.sleep({sleep_s!r})
        return {{"y": inputs["x"] * {factor!r}}}
"""


def write_model(
    root: Path,
    name: str = "scaled",
    versions: dict[str, float] | None = None,
    policy: str = "",
    traffic: dict[str, int] | None = None,
    sleep_s: float = 0.0,
    broken: tuple[str, ...] = (),
    max_batch_size: int = 8,
) -> Path:
    """A versioned model: version v answers y = x * versions[v] (default {"1": 1.0})."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    lines = [
        'backend = "python"',
        f"max_batch_size = {max_batch_size}",
        "max_queue_delay_ms = 1.0",
    ]
    if policy:
        lines.append(f"version_policy = {policy}")
    lines += [
        "",
        "[python]",
        'device = "cpu"',
        'inputs = [{ name = "x", datatype = "FP32", shape = [-1, 4] }]',
        'outputs = [{ name = "y", datatype = "FP32", shape = [-1, 4] }]',
    ]
    if traffic:
        weights = ", ".join(f'"{v}" = {w}' for v, w in traffic.items())
        lines += ["", "[traffic]", f"weights = {{ {weights} }}"]
    _write(folder / "config.toml", "\n".join(lines) + "\n")
    for version, factor in (versions or {"1": 1.0}).items():
        add_version(folder, version, factor, sleep_s=sleep_s, broken=version in broken)
    return folder


def add_version(
    folder: Path, version: str, factor: float, sleep_s: float = 0.0, broken: bool = False
) -> None:
    (folder / version).mkdir(parents=True, exist_ok=True)
    code = _MODEL.format(version=version, factor=factor, sleep_s=sleep_s, broken=broken)
    _write(folder / version / "model.py", code)


def _write(path: Path, text: str) -> None:
    """Writes a file so that a poll sees it whole, with a modification time after any earlier
    write (a rename of a complete file; a fresh mtime)."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)
    now = time.time_ns()
    os.utime(path, ns=(now, now))


@pytest.fixture
def lifecycle_server(
    start_server: Callable[..., ServerThread], tmp_path: Path
) -> Callable[..., ServerThread]:
    def start(**overrides: Any) -> ServerThread:
        overrides.setdefault("model_repository", tmp_path / "engines")
        return start_server(**overrides)

    return start
