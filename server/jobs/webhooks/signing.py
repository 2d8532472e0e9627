"""Webhook signatures, per the Standard Webhooks spec (standardwebhooks.com): headers
webhook-id, webhook-timestamp and webhook-signature, the last `v1,` + base64 of the HMAC-SHA256
of `id.timestamp.body` under the secret's bytes. A receiver verifies with any Standard Webhooks
library (Python: `standardwebhooks`) and the same `whsec_...` secret.

Secrets come from --webhook-secrets: one `TENANT whsec_BASE64` a line (# starts a comment); the
tenant `*` signs for every tenant without a line of its own (and is how a server without auth,
whose callers are the anonymous tenant, signs). The file is read again when it changes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from pathlib import Path

from tensorgate.server.config import ConfigError
from tensorgate.server.watched import WatchedFile

PREFIX = "whsec_"
ANY_TENANT = "*"


def read_secrets(path: Path) -> dict[str, bytes]:
    """{tenant: key bytes}; ConfigError (one line, naming the file and line) when it is wrong."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"--webhook-secrets {path}: {exc.strerror or exc}") from None
    keys: dict[str, bytes] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"--webhook-secrets {path}, line {number}"
        parts = line.split()
        if len(parts) != 2 or not parts[1].startswith(PREFIX):
            raise ConfigError(f"{where}: expected 'TENANT whsec_BASE64' (or '* whsec_...')")
        tenant, secret = parts
        if tenant in keys:
            raise ConfigError(f"{where}: tenant '{tenant}' is listed twice")
        try:
            key = base64.b64decode(secret[len(PREFIX) :], validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(f"{where}: the secret after whsec_ is not base64") from None
        if len(key) < 24:
            raise ConfigError(f"{where}: the secret is {len(key)} bytes; use at least 24")
        keys[tenant] = key
    if not keys:
        raise ConfigError(f"--webhook-secrets {path}: no secrets in the file")
    return keys


class Secrets:
    """The signing keys, from a file watched for changes (or none)."""

    def __init__(self, path: Path | None) -> None:
        self._file = WatchedFile([path], lambda: read_secrets(path)) if path else None

    def key(self, tenant: str) -> bytes | None:
        """The tenant's key, or the `*` key; None when neither is configured."""
        if self._file is None:
            return None
        keys, _ = self._file.current()
        return keys.get(tenant) or keys.get(ANY_TENANT)


def signature(key: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    """The webhook-signature header's value."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()
