"""Who may open a dashboard: loopback is open to this machine; any other address needs TLS and a token.

The token is random, printed once at start inside the URL, and compared in constant time. A browser that opens
the URL gets it back as an HttpOnly, Secure, SameSite=Strict cookie, so the page's own requests carry it.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path

from pollinate.common.config import ConfigError

DEFAULT_HOST = "127.0.0.1"
COOKIE = "pollinate_dashboard"


class DashboardError(ConfigError):
    """The dashboard cannot start as asked: its address is taken, or there is no run directory to show."""


@dataclass(frozen=True)
class Access:
    """Where a dashboard listens and what it asks of a request.

    Parameters
    ----------
    host, port : str, int
        The address to bind (port 0: any free port).
    token : str or None
        Required on every request when set (always set off loopback).
    certfile, keyfile : Path or None
        TLS certificate and key (always set off loopback).
    """

    host: str
    port: int
    token: str | None = None
    certfile: Path | None = None
    keyfile: Path | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.certfile else "http"

    def url(self, port: int | None = None) -> str:
        """The address to open, with the token when one is needed (the unspecified address names this host)."""
        host = socket.gethostname() if self.host in ("0.0.0.0", "::", "") else self.host
        host = f"[{host}]" if ":" in host else host
        query = f"?token={self.token}" if self.token else ""
        return f"{self.scheme}://{host}:{self.port if port is None else port}/{query}"

    def token_matches(self, candidate: str | None) -> bool:
        """Constant-time comparison; no token configured accepts every request."""
        if self.token is None:
            return True
        return candidate is not None and hmac.compare_digest(candidate.encode(), self.token.encode())


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_address(text: str, flag: str = "--dashboard") -> tuple[str, int]:
    """``[HOST:]PORT`` (IPv6 in brackets) as (host, port); a bare port listens on loopback."""
    host, sep, port = str(text).rpartition(":")
    host = host.strip("[]") if sep else DEFAULT_HOST
    if not port.isdigit() or not 0 <= int(port) <= 65535 or (sep and not host):
        raise ConfigError(f"{flag} {text!r}: expected [HOST:]PORT with PORT in 0..65535, e.g. 8765 or 0.0.0.0:8765")
    if ":" in host and "[" not in text:
        raise ConfigError(f"{flag} {text!r}: write an IPv6 address in brackets, e.g. [::1]:8765")
    return host, int(port)


def plan_access(host: str, port: int, certs_dir: Path | None, flag: str = "--dashboard-certs") -> Access:
    """The access rules for an address: open on loopback; off loopback TLS from ``certs_dir`` plus a fresh token.

    ``certs_dir`` is a directory made by ``pollinate keys init`` (server.crt, server.key); on loopback it is
    optional and, when given, turns TLS on.
    """
    tls = _tls_files(certs_dir, flag) if certs_dir is not None else None
    if is_loopback(host):
        return Access(host, port, certfile=tls[0] if tls else None, keyfile=tls[1] if tls else None)
    if tls is None:
        raise ConfigError(f"dashboard on {host}: an address other than loopback needs TLS; give {flag} DIR "
                          "(server.crt and server.key from `pollinate keys init`) or listen on 127.0.0.1")
    return Access(host, port, token=secrets.token_urlsafe(24), certfile=tls[0], keyfile=tls[1])


def _tls_files(certs_dir: Path, flag: str) -> tuple[Path, Path]:
    directory = Path(certs_dir).expanduser()
    cert, key = directory / "server.crt", directory / "server.key"
    missing = [p.name for p in (cert, key) if not p.is_file()]
    if missing:
        raise ConfigError(f"{flag} {certs_dir}: missing {', '.join(missing)}; expected a directory made by "
                          "`pollinate keys init`")
    return cert, key
