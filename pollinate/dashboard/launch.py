"""Starting a dashboard: beside a run (``--dashboard``) for as long as it runs, or on its own until Ctrl-C."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from pollinate.dashboard.access import Access, DashboardError, is_loopback, parse_address, plan_access
from pollinate.dashboard.server import DashboardServer


@dataclass(frozen=True)
class DashboardOptions:
    """``--dashboard [HOST:]PORT`` and the certificates it needs off loopback, checked when parsed.

    Parameters
    ----------
    access : Access
        Address, TLS files and token (see ``pollinate.dashboard.access.plan_access``).
    """

    access: Access

    @classmethod
    def parse(cls, address: str, certs_dir: Path | None, default_certs: Path | None = None) -> DashboardOptions:
        """Raises ``ConfigError`` for a malformed address, or one off loopback without certificates.

        ``default_certs`` (the coordinator's) serve only off loopback: a loopback page stays plain HTTP unless
        ``certs_dir`` is given.
        """
        host, port = parse_address(address)
        certs = certs_dir or (None if is_loopback(host) else default_certs)
        return cls(plan_access(host, port, certs, "--dashboard-certs"))


@contextmanager
def dashboard_running(run_dir: Path, options: DashboardOptions | None,
                      echo: TextIO | None = None) -> Iterator[DashboardServer | None]:
    """Serve ``run_dir`` for the duration of the block (nothing when ``options`` is None); print its URL."""
    if options is None:
        yield None
        return
    echo = echo or sys.stderr
    with DashboardServer(run_dir, options.access) as server:
        print(f"dashboard: {server.url}", file=echo, flush=True)
        yield server
    print(f"dashboard stopped; to look at this run again: pollinate dashboard {run_dir}", file=echo, flush=True)


def serve(run_dir: Path, access: Access, echo: TextIO | None = None) -> None:
    """``pollinate dashboard``: serve ``run_dir`` until interrupted (Ctrl-C)."""
    import threading

    if not Path(run_dir).is_dir():
        raise DashboardError(f"run directory {run_dir} does not exist")
    with DashboardServer(run_dir, access) as server:
        print(f"dashboard of {run_dir}: {server.url}  (Ctrl-C to stop)", file=echo or sys.stderr, flush=True)
        threading.Event().wait()
