"""A real redis-server on a free loopback port in a folder of its own, for tests and benchmarks.

AOF is on (appendfsync everysec, the setting docs/jobs.md recommends), so a restart in the same
folder keeps what Redis had acknowledged.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis


class RedisProcess:
    def __init__(self, folder: Path, appendfsync: str = "everysec") -> None:
        self.folder = folder
        self.appendfsync = appendfsync
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisProcess:
        """Starts Redis (on the port it had before, after a stop) and waits until it answers."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "redis-server is not installed: apt-get install redis-server (.ci/run does)"
            )
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            port = self.port or _free_port()
            args = [
                binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(self.folder),
                "--appendonly", "yes", "--appendfsync", self.appendfsync, "--save", "",
                "--logfile", "redis.log", "--daemonize", "no",
            ]  # fmt: skip
            self.process = subprocess.Popen(
                args,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            if self._answers(port):
                self.port = port
                return self
            self.process.kill()
            self.process.wait()
        log = (self.folder / "redis.log").read_text()[-2000:]
        raise RuntimeError(f"redis-server did not start:\n{log}")

    def _answers(self, port: int, timeout_s: float = 10.0) -> bool:
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                assert self.process is not None
                if self.process.poll() is not None:
                    return False  # exited: the port was taken meanwhile
                try:
                    if client.ping():
                        return True
                except redis.exceptions.ConnectionError:
                    pass
                except redis.exceptions.BusyLoadingError:
                    pass  # replaying the AOF
                time.sleep(0.02)
            return False
        finally:
            client.close()

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port)

    def stop(self) -> None:
        """SIGTERM: Redis fsyncs its AOF and exits."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port
