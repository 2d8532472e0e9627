"""The README's code runs as printed, against a live server: the Python client snippet, the
tritonclient snippet (in its own environment), the list of shell commands and the recorded shell
session, whose outputs must keep the shape the README shows."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from tests.harness import ServerThread

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _block(after: str, language: str) -> str:
    """The first code block of the language after a heading or sentence of the README."""
    start = README.index(after)
    match = re.compile(rf"```{language}\n(.*?)```", re.S).search(README, start)
    assert match is not None, f"no ```{language} block after {after!r}"
    return match.group(1)


def _tensorgate(server: ServerThread, command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, "-m", "tensorgate", *_split(command), "--target", server.target]
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60)


def _split(command: str) -> list[str]:
    import shlex

    return shlex.split(command.split("  #")[0])[1:]  # drop "tensorgate" and any comment


def test_the_python_client_snippet_runs(server: ServerThread) -> None:
    code = _block("### Python clients", "python").replace("localhost:50051", server.target)
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["(4, 16)", "SUCCEEDED (1, 16)", "(1, 16)"]


def test_the_tritonclient_snippet_runs_in_its_own_environment(
    server: ServerThread,
    triton_python: Path,
) -> None:
    code = _block("### KServe v2 / Triton clients", "python").replace(
        "localhost:50051", server.target
    )
    done = subprocess.run(
        [str(triton_python), "-c", code], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(1, 16)"


def test_the_listed_shell_commands_run(server: ServerThread, tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((1, 256), np.float32))
    job_id = ""
    for line in _block("Then, from another shell", "sh").splitlines():
        command = line.split("  #")[0].strip()
        if not command:
            continue
        command = command.replace("<job_id>", job_id)
        done = _tensorgate(server, command, tmp_path)
        assert done.returncode == 0, (command, done.stderr)
        if " submit " in f" {command} ":
            job_id = json.loads(done.stdout)["job_id"]


def _shape(value: Any) -> Any:
    """The keys of a JSON value, recursively (values differ from run to run)."""
    if isinstance(value, dict):
        return {key: _shape(item) for key, item in value.items() if item != "…"}
    return type(value).__name__


def test_the_recorded_shell_session_prints_what_it_shows(
    server: ServerThread, tmp_path: Path
) -> None:
    session = _block("A session from a shell", "").splitlines()
    job_id = ""
    checked = 0
    for i, line in enumerate(session):
        if not line.startswith("$ tensorgate ") or line.startswith("$ tensorgate serve"):
            continue
        printed = []
        for shown in session[i + 1 :]:
            if shown.startswith("$ "):
                break
            printed.append(shown)
        recorded_id = re.search(r"[0-9a-f]{32}", line)
        command = line[2:].replace(recorded_id.group(0), job_id) if recorded_id else line[2:]
        done = _tensorgate(server, command, tmp_path)
        output = (done.stdout + done.stderr).strip().splitlines()
        assert len(output) == len(printed), (command, output)
        for got, want in zip(output, printed, strict=True):
            if want.startswith("error:"):
                assert got == want
                continue
            expected = json.loads(_uncut(want))
            actual = json.loads(got)
            assert _shape(actual) == _shape(expected) or _keys(actual) >= _keys(expected), (
                command,
                got,
            )
            if "job_id" in actual and "submit" in command:
                job_id = actual["job_id"]
        checked += 1
    assert checked >= 6


def _keys(value: Any) -> set[str]:
    return set(value) if isinstance(value, dict) else set()


def _uncut(line: str) -> str:
    """A printed JSON line with its `…` cuts made parseable again."""
    line = re.sub(r", …\]", "]", line)
    return line.replace("{…}", '"…"')


def test_the_serving_options_table_names_real_flags_and_defaults() -> None:
    help_text = subprocess.run(
        [sys.executable, "-m", "tensorgate", "serve", "--help"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip
    table = README[README.index("## Serving options") : README.index("### Workers")]
    flags = [f for row in table.splitlines() if row.startswith("| `--")
             for f in re.findall(r"`(--[a-z-]+)`", row.split("|")[1])]  # fmt: skip
    assert len(flags) >= 20
    for flag in flags:
        assert re.search(rf"^\s+{flag}\b", help_text, re.M), flag
