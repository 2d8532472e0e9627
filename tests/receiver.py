"""A real HTTP webhook receiver on a free loopback port, recording every request it gets.

Behaviour is set per test: answer 2xx, fail the first N attempts of each webhook-id (with an
optional Retry-After), hold every request unanswered until released (a receiver that never
answers, or one whose sender is killed mid-request)."""

from __future__ import annotations

import base64
import collections
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(slots=True, frozen=True)
class Received:
    headers: dict[str, str]
    body: bytes
    answered: int  # the status code sent back (0: held, never answered)
    at: float = field(default_factory=time.monotonic)

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def webhook_id(self) -> str:
        return self.headers["webhook-id"]


def new_secret() -> str:
    """A Standard Webhooks secret: whsec_ + base64 of 32 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


class Receiver:
    def __init__(self) -> None:
        self.fail_first = 0  # answer 500 to the first N attempts of each webhook-id
        self.retry_after: str | None = None  # sent with those failures
        self.status = 204  # the answer once the failures are used up
        self.hold = threading.Event()  # while set, requests wait (for release()) unanswered
        self._released = threading.Event()
        self.received: list[Received] = []
        self._attempts: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", 0))
                body = self.rfile.read(length)
                headers = {k.lower(): v for k, v in self.headers.items()}
                status, extra = receiver._answer(headers)
                if status == 0:
                    receiver._record(Received(headers, body, 0))
                    receiver._released.wait()
                    status, extra = 503, {}
                else:
                    receiver._record(Received(headers, body, status))
                self.send_response(status)
                for name, value in extra.items():
                    self.send_header(name, value)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _answer(self, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
        if self.hold.is_set():
            return 0, {}
        with self._lock:
            self._attempts[headers.get("webhook-id", "")] += 1
            attempt = self._attempts[headers.get("webhook-id", "")]
        if attempt <= self.fail_first:
            return 500, ({"Retry-After": self.retry_after} if self.retry_after else {})
        return self.status, {}

    def _record(self, received: Received) -> None:
        with self._lock:
            self.received.append(received)

    def release(self) -> None:
        """Held requests are answered (503) and new ones handled normally."""
        self.hold.clear()
        self._released.set()

    def delivered(self) -> list[Received]:
        """Requests answered 2xx."""
        with self._lock:
            return [r for r in self.received if 200 <= r.answered < 300]

    def by_id(self, webhook_id: str) -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.headers.get("webhook-id") == webhook_id]

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
        self._server.shutdown()
        self._server.server_close()
