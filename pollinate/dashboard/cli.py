"""The dashboard's part of the ``pollinate`` command: ``pollinate dashboard RUN_DIR`` and ``--dashboard`` on the
commands that run a federation."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def _optional_path(value: str | None) -> Path | None:
    return Path(value) if value else None


def add_dashboard_option(parser: argparse.ArgumentParser, certs_help: str) -> None:
    parser.add_argument("--dashboard", metavar="[HOST:]PORT",
                        help="serve a live dashboard of this run while it runs (a bare port: 127.0.0.1; another "
                             "address needs TLS and prints a token URL)")
    parser.add_argument("--dashboard-certs", metavar="DIR", help=certs_help)


def add_dashboard_parser(sub: argparse._SubParsersAction) -> None:
    from pollinate.dashboard.access import DEFAULT_HOST

    dashboard = sub.add_parser(
        "dashboard", help="watch a run in a browser: rounds, clients, plans, traffic, rejections (read-only)",
        description="Serve a live, read-only web page of a finished or running run (or of a bench directory, "
                    "its methods side by side). Loopback by default; any other address needs --certs (TLS) and "
                    "prints a URL with a token.")
    dashboard.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (output.dir) or a bench --out directory")
    dashboard.add_argument("--host", default=DEFAULT_HOST, help=f"interface to listen on (default {DEFAULT_HOST})")
    dashboard.add_argument("--port", type=int, default=8765, help="port (default 8765; 0: any free port)")
    dashboard.add_argument("--certs", metavar="DIR",
                           help="directory with server.crt and server.key (`pollinate keys init`): TLS")


def dashboard_options(args: argparse.Namespace, default_certs: Path | None) -> Any:
    """``--dashboard`` as checked ``DashboardOptions`` (None without the flag); bad input raises ConfigError."""
    if not getattr(args, "dashboard", None):
        return None
    from pollinate.dashboard.launch import DashboardOptions

    return DashboardOptions.parse(args.dashboard, _optional_path(args.dashboard_certs), default_certs)


def cmd_dashboard(args: argparse.Namespace) -> int:
    from pollinate.dashboard.access import plan_access
    from pollinate.dashboard.launch import serve

    access = plan_access(args.host, args.port, _optional_path(args.certs), flag="--certs")
    try:
        serve(Path(args.run_dir), access)
    except KeyboardInterrupt:
        print("pollinate dashboard: stopped", file=sys.stderr)
    return 0
