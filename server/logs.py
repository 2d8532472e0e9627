"""Log set-up for `tensorgate serve`: plain text for people, or one JSON object a line for log
pipelines (--log-format json), each line carrying the request id of the call it was written for.
"""

from __future__ import annotations

import contextvars
import json
import logging
import time
from typing import Any

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
FORMATS = ("text", "json")

# The id the caller gave the request being handled (set by the front ends' call wrapper); log
# lines written while it is handled carry it.
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


class _RequestId(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (RFC 3339, UTC), level, logger, message, process tag, the
    request id when there is one, and the exception's text when there is one."""

    def __init__(self, process: str = "") -> None:
        super().__init__()
        self._process = process

    def format(self, record: logging.LogRecord) -> str:
        seconds = int(record.created)
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self._process:
            line["process"] = self._process % {"process": record.process}
        request_id = getattr(record, "request_id", "")
        if request_id:
            line["request_id"] = request_id
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure(level: str = "INFO", fmt: str = "text", process: str = "") -> None:
    """Sets up the root logger. process: a tag naming this process among several (--workers),
    with %(process)d for its pid."""
    handler = logging.StreamHandler()
    handler.addFilter(_RequestId())
    if fmt == "json":
        handler.setFormatter(JsonFormatter(process))
    else:
        tag = f"[{process}] " if process else ""
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s {tag}%(name)s: %(message)s")
        )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
