"""Short-lived per-round credentials for the split service, each bound to the Flower node it was issued to.

The coordinator issues a token per node and round and sends it in that node's train message (or, forward-only, in
its evaluate message), which only the authenticated node receives (Flower's TLS and node authentication); every
split-service call presents the token together with the node id, and a token presented under another node id is
refused. A forward-only token admits Forward calls without ``keep_graph`` alone: no Backward, no graph held.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


class TokenError(Exception):
    """A split-service token that is missing, unknown, revoked, expired or presented by another node."""


@dataclass(frozen=True)
class TokenInfo:
    """The node a token was issued to, for which round, until when (in the registry's clock), and whether it
    admits forward-only calls alone (evaluation)."""

    node: str
    round: int
    expires_at: float
    forward_only: bool = False


class TokenRegistry:
    """Short-lived per-round tokens the coordinator issues to nodes and the split service checks.

    Tokens are ``secrets.token_urlsafe(32)``; only their SHA-256 is stored, so lookups never compare the
    secret itself. Thread-safe.

    Parameters
    ----------
    clock : callable, default time.monotonic
        Time source in seconds (injectable for tests).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens: dict[bytes, TokenInfo] = {}

    @staticmethod
    def _key(token: str) -> bytes:
        return hashlib.sha256(token.encode("utf-8")).digest()

    def issue(self, node: str, round: int, ttl_s: float, *, forward_only: bool = False) -> str:
        """A new token for ``node`` (its Flower node id, as text) in ``round``, valid for ``ttl_s`` seconds;
        ``forward_only`` restricts it to Forward calls that keep no graph (evaluation)."""
        if ttl_s <= 0:
            raise ValueError(f"ttl_s={ttl_s}: a token needs a positive lifetime in seconds")
        if not node:
            raise ValueError("node must be a non-empty string (the Flower node id the token is issued to)")
        token = secrets.token_urlsafe(32)
        now = self._clock()
        with self._lock:
            # Expired entries are pruned here so the table stays the size of the live tokens.
            self._tokens = {k: v for k, v in self._tokens.items() if v.expires_at > now}
            self._tokens[self._key(token)] = TokenInfo(node, int(round), now + ttl_s, bool(forward_only))
        return token

    def check(self, token: str, node: str) -> TokenInfo:
        """The token's info when it is live and was issued to ``node``; raises ``TokenError`` otherwise."""
        if not token:
            raise TokenError("missing token")
        with self._lock:
            info = self._tokens.get(self._key(token))
        if info is None:
            raise TokenError("unknown or revoked token")
        if self._clock() >= info.expires_at:
            raise TokenError(f"token for node {info.node!r} round {info.round} has expired")
        if not hmac.compare_digest(info.node.encode(), node.encode()):
            # Not named: the caller learns nothing about whom the token belongs to.
            raise TokenError(f"token was not issued to node {node[:64]!r}")
        return info

    def revoke(self, token: str) -> None:
        """Invalidate one token now (no error if unknown)."""
        with self._lock:
            self._tokens.pop(self._key(token), None)

    def revoke_round(self, round: int) -> int:
        """Invalidate every token of ``round``; returns how many."""
        with self._lock:
            doomed = [k for k, v in self._tokens.items() if v.round == round]
            for key in doomed:
                del self._tokens[key]
        return len(doomed)
