"""Where webhooks may go: --webhook-allow, checked when a job is submitted and again on the
addresses actually connected to.

An entry is a host name (`hooks.example.com`), a host and port (`hooks.example.com:8443`), a
domain wildcard (`*.example.com`), an IP address or a CIDR (`10.1.0.0/16`). A callback URL must
match one. Private, loopback, link-local and other non-public addresses are reached only when an
entry names them: an IP or CIDR that contains the address, or the exact host name. A name matched
only by a wildcard that resolves to such an address is refused at connect time (so DNS cannot
point an allowed domain at the server's own network).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult

from tensorgate.server.config import ConfigError
from tensorgate.server.errors import InvalidArgument

_MAX_URL = 2048
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(slots=True, frozen=True)
class _Rule:
    host: str = ""  # a name, exact (lower case)
    suffix: str = ""  # *.domain: ".domain"
    network: IpNetwork | None = None
    port: int | None = None


class AllowList:
    """The parsed --webhook-allow entries."""

    def __init__(self, entries: Sequence[str]) -> None:
        self.rules = [_parse(entry) for entry in entries if entry.strip()]

    def check(self, url: str) -> None:
        """INVALID_ARGUMENT, naming what is wrong and the flag, unless the URL may be called."""
        if len(url) > _MAX_URL:
            raise InvalidArgument(f"callback url is {len(url)} characters; at most {_MAX_URL}")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise InvalidArgument(f"callback url {url[:200]!r} is malformed: {exc}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidArgument(
                f"callback url {url[:200]!r} must be an http:// or https:// URL with a host"
            )
        if parts.username or parts.password:
            raise InvalidArgument("callback url must not carry credentials (user:password@)")
        if port is None:
            port = 443 if parts.scheme == "https" else 80
        if self.match(parts.hostname, port) is None:
            raise InvalidArgument(
                f"callback url host {parts.hostname}:{port} is not allowed by the server's "
                "--webhook-allow"
                + ("" if self.rules else " (empty: this server sends no webhooks)")
            )

    def match(self, host: str, port: int) -> _Rule | None:
        host = host.lower().rstrip(".")
        address = _address(host)
        for rule in self.rules:
            if rule.port is not None and rule.port != port:
                continue
            if rule.network is not None:
                if address is not None and address in rule.network:
                    return rule
            elif rule.host:
                if host == rule.host:
                    return rule
            elif host.endswith(rule.suffix):
                return rule
        return None

    def reaches(self, host: str, port: int, address: IpAddress) -> bool:
        """Whether a connection for host:port may go to this address."""
        rule = self.match(host, port)
        if rule is None:
            return False
        if address.is_global:
            return True
        # Not public: only where an entry names it (its network, or this very host).
        if rule.host:
            return True
        return any(
            r.network is not None and address in r.network and r.port in (None, port)
            for r in self.rules
        )


class GuardedResolver(AbstractResolver):
    """Resolves as usual, then keeps only the addresses the allow list lets this host reach, so
    the check applies to the address the connection is made to."""

    def __init__(self, allow: AllowList, inner: AbstractResolver) -> None:
        self._allow = allow
        self._inner = inner

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        kept = [r for r in results if self._allow.reaches(host, port, _parsed(r["host"]))]
        if not kept:
            found = ", ".join(sorted({r["host"] for r in results}))
            raise OSError(
                f"{host} resolves to {found}, which --webhook-allow does not let it reach "
                "(name the address or the exact host to allow a private one)"
            )
        return kept

    async def close(self) -> None:
        await self._inner.close()


def _parse(entry: str) -> _Rule:
    entry = entry.strip().lower()
    where = f"--webhook-allow entry {entry!r}"
    if "://" in entry:
        raise ConfigError(
            f"{where}: expected a host, host:port, *.domain, an IP address or a CIDR, not a URL"
        )
    try:
        return _Rule(network=ipaddress.ip_network(entry, strict=False))
    except ValueError:
        pass
    host, port = entry, None
    if entry.startswith("[") and "]" in entry:  # [v6]:port
        host, _, rest = entry[1:].partition("]")
        port = _port(rest.lstrip(":"), where) if rest else None
        return _Rule(network=ipaddress.ip_network(host), port=port)
    if entry.count(":") == 1:
        host, _, raw = entry.partition(":")
        port = _port(raw, where)
    address = _address(host)
    if address is not None:
        return _Rule(network=ipaddress.ip_network(address), port=port)
    if host.startswith("*."):
        return _Rule(suffix=host[1:], port=port)
    if not host or "/" in host or "*" in host or " " in host:
        raise ConfigError(f"{where}: expected a host, host:port, *.domain, an IP address or a CIDR")
    return _Rule(host=host.rstrip("."), port=port)


def _port(raw: str, where: str) -> int:
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise ConfigError(f"{where}: the port must be a number from 1 to 65535")
    return int(raw)


def _address(host: str) -> IpAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _parsed(host: Any) -> IpAddress:
    return ipaddress.ip_address(str(host).split("%", 1)[0])
