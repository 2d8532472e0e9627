"""How a client proves itself to the server: TLS files and a bearer token, and the metadata each
call carries (the token, and the caller's trace context)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc
from opentelemetry import propagate


@dataclass(slots=True, frozen=True)
class Security:
    """How a client proves itself: TLS (the server's CA; a client certificate and key for mutual
    TLS) and a bearer token. Empty: plaintext, anonymous."""

    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    token: str = ""

    @property
    def tls(self) -> bool:
        return bool(self.tls_ca or self.tls_cert)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """The TLS credentials; ValueError naming the flag of a file that cannot be read."""

        def read(path: str, flag: str) -> bytes | None:
            if not path:
                return None
            try:
                return Path(path).expanduser().read_bytes()
            except OSError as exc:
                raise ValueError(f"{flag} {path}: {exc.strerror or exc}") from None

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.tls_ca, "--tls-ca"),
            private_key=read(self.tls_key, "--tls-key"),
            certificate_chain=read(self.tls_cert, "--tls-cert"),
        )

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()


def call_metadata(security: Security) -> tuple[tuple[str, str], ...] | None:
    """A call's metadata: the trace context (when tracing) and the bearer token (when set)."""
    trace = trace_metadata() or ()
    both = (*trace, *security.metadata())
    return both or None


def trace_metadata() -> tuple[tuple[str, str], ...] | None:
    """W3C trace context (traceparent, tracestate) of the caller's current OpenTelemetry span,
    so the server's spans continue the caller's trace; None when there is no active span."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return tuple(carrier.items()) or None
