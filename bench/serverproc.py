"""Start and stop `tensorgate serve` processes for benchmarks (127.0.0.1 only)."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def checkout(revision: str, tmp: Path) -> Iterator[Path]:
    """A temporary git worktree of the revision under tmp (a ServeProcess root), removed after."""
    worktree = tmp / "before"
    subprocess.run(["git", "worktree", "add", "--detach", str(worktree), revision], cwd=ROOT,
                   check=True, capture_output=True)  # fmt: skip
    try:
        yield worktree
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=ROOT,
                       capture_output=True)  # fmt: skip


class ServeProcess:
    def __init__(
        self,
        repository: Path,
        models: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        extra_args: Sequence[str] = (),
        root: Path = ROOT,
    ) -> None:
        """root: the source tree to run (another checkout, to compare revisions)."""
        # A checkout from before the package was named tensorgate runs its tensorgate_cli.
        command = "tensorgate_cli" if (root / "tensorgate_cli").is_dir() else "tensorgate"
        args = [
            sys.executable, "-m", command, "serve", "--host", "127.0.0.1", "--port", "0",
            "--metrics-port", "-1", "--model-repository", str(repository), *extra_args,
        ]  # fmt: skip
        if models:
            args += ["--models", ",".join(models)]
        paths = os.pathsep.join([str(root), str(root / "protos")])
        # With --workers the supervisor says when every worker serves.
        flags = list(extra_args)
        workers = flags[flags.index("--workers") + 1] if "--workers" in flags else "1"
        ready = r"server\.app: serving " if workers == "1" else r"server\.workers: serving "
        self.process = subprocess.Popen(
            args,
            cwd=root,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": paths, **(env or {})},
        )
        assert self.process.stderr is not None
        self.port = 0
        self.metrics_port = 0
        self.log: list[str] = []
        while line := self.process.stderr.readline():
            self.log.append(line)
            if match := re.search(r"listening on 127\.0\.0\.1:(\d+)", line):
                self.port = int(match.group(1))
            match = re.search(r"metrics (?:of all workers )?on http://127\.0\.0\.1:(\d+)", line)
            if match and not self.metrics_port:  # with --workers, the supervisor's comes first
                self.metrics_port = int(match.group(1))
            if re.search(ready, line):
                break
        else:
            raise RuntimeError("server did not start:\n" + "".join(self.log))
        # Keep draining the log so the pipe never fills.
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def batch_rows(self) -> tuple[float, float]:
        """(rows, batches) summed over models so far, from the metrics endpoint."""
        import urllib.request

        text = (
            urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5)
            .read()
            .decode()
        )
        rows = batches = 0.0
        for line in text.splitlines():
            if line.startswith("tensorgate_batch_size_rows_sum"):
                rows += float(line.rsplit(" ", 1)[1])
            elif line.startswith("tensorgate_batch_size_rows_count"):
                batches += float(line.rsplit(" ", 1)[1])
        return rows, batches

    def rss_mib(self) -> float:
        """The server's resident memory now."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        match = re.search(r"VmRSS:\s+(\d+) kB", status)
        return int(match.group(1)) / 1024 if match else float("nan")

    def threads(self) -> int:
        """The server process's threads now."""
        return len(os.listdir(f"/proc/{self.process.pid}/task"))

    def cpu_seconds(self) -> float:
        """User + system CPU time the server has used so far: its process and, with --workers,
        the worker processes it started."""
        total = 0.0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = _stat_fields(stat)
            except OSError:
                continue  # gone meanwhile
            pid, parent = int(stat.parent.name), int(fields[1])
            if self.process.pid in (pid, parent):
                total += _cpu_of(fields)
        return total

    def stop(self) -> int:
        self.process.terminate()
        return self.process.wait(60)

    def kill(self) -> None:
        """SIGKILL: no drain, no goodbye (a crash)."""
        self.process.kill()
        self.process.wait(60)


def stat_cpu_seconds(stat: Path) -> float:
    """User + system CPU seconds from a /proc/PID/stat or /proc/PID/task/TID/stat file
    (OSError when the process or thread is gone)."""
    return _cpu_of(_stat_fields(stat))


def _stat_fields(stat: Path) -> list[str]:
    """The fields after the command name (which may hold spaces and parentheses)."""
    return stat.read_text().rsplit(")", 1)[1].split()


def _cpu_of(fields: list[str]) -> float:
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
