"""Files a running server reads again when they change (tokens, TLS certificates, webhook
secrets), without a restart."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tensorgate.server.config import ConfigError

log = logging.getLogger(__name__)

# Files are looked at no more often than this (a stat per call would be wasted work).
_RECHECK_S = 1.0


class WatchedFile:
    """A file read again when its modification time or size changes (checked at most once a
    second); a broken new version is logged and the last good one kept."""

    def __init__(self, paths: Sequence[Path], load: Callable[[], Any]) -> None:
        self._paths = list(paths)
        self._load = load
        self._lock = threading.Lock()
        self._stamp = self._stamps()
        self.value = load()
        self._checked = time.monotonic()

    def _stamps(self) -> tuple[tuple[int, int], ...]:
        stamps = []
        for path in self._paths:
            try:
                stat = path.stat()
                stamps.append((stat.st_mtime_ns, stat.st_size))
            except OSError:
                stamps.append((0, 0))
        return tuple(stamps)

    def current(self) -> tuple[Any, bool]:
        """(the value, whether it changed since the last call)."""
        now = time.monotonic()
        if now - self._checked < _RECHECK_S:
            return self.value, False
        with self._lock:
            self._checked = now
            stamp = self._stamps()
            if stamp == self._stamp:
                return self.value, False
            self._stamp = stamp
            try:
                self.value = self._load()
            except (ConfigError, OSError, ValueError) as exc:
                log.error("keeping the previous version: %s", exc)
                return self.value, False
            log.info("re-read %s", ", ".join(str(p) for p in self._paths))
            return self.value, True
