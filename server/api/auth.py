"""Who is calling: TLS credentials (re-read when the files change), bearer tokens from a file of
SHA-256 hashes (re-read when it changes), and the tenant a call acts for.

Tenant of a call, in order: a valid `authorization: Bearer TOKEN` names it; else, with mutual TLS,
the common name of the verified client certificate; else (auth off) the anonymous tenant "".
With --auth-tokens and without mutual TLS a call with no valid token is refused
(UNAUTHENTICATED). grpc.health.v1 is always open (probes carry no token); reflection and both
inference front ends are not.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from tensorgate.server.config import ConfigError
from tensorgate.server.errors import Unauthenticated
from tensorgate.server.watched import WatchedFile

log = logging.getLogger(__name__)

_HEX64 = re.compile(r"[0-9a-f]{64}")
_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,127}")
_OPEN_SERVICES = ("/grpc.health.v1.Health/",)


def read_tokens(path: Path) -> dict[str, str]:
    """The token file: one caller a line, `TENANT SHA256HEX`; # starts a comment. Returns
    {sha256 hex: tenant}. ConfigError (one line, naming the file and line) when it is wrong."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"--auth-tokens {path}: {exc.strerror or exc}") from None
    by_hash: dict[str, str] = {}
    tenants: set[str] = set()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        where = f"--auth-tokens {path}, line {number}"
        if len(parts) != 2 or not _HEX64.fullmatch(parts[1].lower()):
            raise ConfigError(
                f"{where}: expected 'TENANT SHA256HEX' (the hex SHA-256 of the caller's token, "
                'e.g. from: printf %s "$TOKEN" | sha256sum)'
            )
        tenant, digest = parts[0], parts[1].lower()
        if not _TENANT.fullmatch(tenant):
            raise ConfigError(f"{where}: tenant {tenant[:64]!r} must be letters, digits, ._@-")
        if tenant in tenants:
            raise ConfigError(f"{where}: tenant '{tenant}' is listed twice")
        if digest in by_hash:
            raise ConfigError(f"{where}: the same token hash is given to two tenants")
        tenants.add(tenant)
        by_hash[digest] = tenant
    if not by_hash:
        raise ConfigError(f"--auth-tokens {path}: no tokens in the file")
    return by_hash


@dataclass(slots=True)
class TlsFiles:
    cert: Path
    key: Path
    client_ca: Path | None = None


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """TLS (mutual with a client CA) whose certificate files are re-read on change: gRPC asks for
    the configuration at each new handshake, and gets a new one only when the files changed."""

    def load() -> Any:
        try:
            key, cert = files.key.read_bytes(), files.cert.read_bytes()
            roots = files.client_ca.read_bytes() if files.client_ca else None
        except OSError as exc:
            raise ConfigError(f"TLS: {exc.filename}: {exc.strerror or exc}") from None
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=roots)

    paths = [files.cert, files.key, *([files.client_ca] if files.client_ca else [])]
    watched = WatchedFile(paths, load)

    def fetch() -> Any:
        value, changed = watched.current()
        return value if changed else None

    return grpc.dynamic_ssl_server_credentials(
        watched.value, fetch, require_client_authentication=files.client_ca is not None
    )


class Authenticator:
    """Resolves the tenant of each call (see the module doc)."""

    def __init__(self, tokens_file: Path | None, mutual_tls: bool) -> None:
        self.mutual_tls = mutual_tls
        self._tokens = (
            WatchedFile([tokens_file], lambda: read_tokens(tokens_file)) if tokens_file else None
        )

    @property
    def enabled(self) -> bool:
        return self._tokens is not None or self.mutual_tls

    def check(self, metadata: Sequence[tuple[str, Any]] | None) -> None:
        """Refuses a call whose credentials do not suffice (mutual TLS has authenticated the
        connection already; a token, when sent, must be valid)."""
        token = _bearer(metadata)
        if self._tokens is None:
            return
        if token is None:
            if not self.mutual_tls:
                raise Unauthenticated(
                    "this server needs a token: send metadata 'authorization: Bearer TOKEN'"
                )
            return
        tokens, _ = self._tokens.current()
        if hashlib.sha256(token.encode()).hexdigest() not in tokens:
            raise Unauthenticated("the bearer token is not valid")

    def tenant(self, metadata: Sequence[tuple[str, Any]] | None, auth_context: Any = None) -> str:
        """The caller's tenant; Unauthenticated when the server needs credentials it lacks."""
        token = _bearer(metadata)
        if token is not None:
            if self._tokens is None:
                if self.mutual_tls:
                    return _certificate_tenant(auth_context)
                return ""  # auth is off: a token is ignored
            tokens, _ = self._tokens.current()
            tenant: str | None = tokens.get(hashlib.sha256(token.encode()).hexdigest())
            if tenant is None:
                raise Unauthenticated("the bearer token is not valid")
            return tenant
        if self.mutual_tls:
            return _certificate_tenant(auth_context)
        if self._tokens is not None:
            raise Unauthenticated(
                "this server needs a token: send metadata 'authorization: Bearer TOKEN'"
            )
        return ""


def _bearer(metadata: Sequence[tuple[str, Any]] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return ""  # present but not a bearer token: never valid
    return None


def _certificate_tenant(auth_context: Any) -> str:
    """The common name of the verified client certificate (gRPC checked it against the CA)."""
    names = (auth_context or {}).get("x509_common_name") or []
    if not names:
        raise Unauthenticated("a client certificate is required")
    name = names[0]
    return name.decode() if isinstance(name, bytes) else str(name)


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses calls without valid credentials before any handler runs, except the health
    service's (reflection included: it lists the API). The tenant itself is resolved again by
    the front end, which has the call's TLS context."""

    def __init__(self, auth: Authenticator) -> None:
        self._auth = auth

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method: str = details.method  # type: ignore[attr-defined]
        if handler is None or method.startswith(_OPEN_SERVICES):
            return handler
        try:
            self._auth.check(details.invocation_metadata)  # type: ignore[attr-defined]
        except Unauthenticated as exc:
            return _refusal(handler, str(exc))
        return handler


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def refuse_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - abort raises

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    streaming = (handler.request_streaming, handler.response_streaming)
    make: Any = kinds[streaming]
    return make(  # type: ignore[no-any-return]
        refuse_stream if handler.response_streaming else refuse,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
