"""The dashboard's web server (Starlette on uvicorn): the page, its assets, the run's state and a live stream.

Routes: ``/`` the page, ``/static/*`` its scripts and styles (all inside this package), ``/api/state`` the
state as JSON, ``/api/events`` the same state pushed as server-sent events whenever the run's files change.
Every response carries a strict Content-Security-Policy (scripts and styles from this server only).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pollinate.common.uvicorn_thread import wait_until_started
from pollinate.dashboard.access import COOKIE, Access, DashboardError, is_loopback
from pollinate.dashboard.source import DashboardData

STATIC = Path(str(resources.files("pollinate.dashboard") / "static"))
MAX_STREAMS = 32  # open event streams (browser tabs) at once
KEEPALIVE_S = 15.0
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                                 b"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]
LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1"}


class AccessGate:
    """ASGI middleware: the token (off loopback), the Host header (on loopback, against DNS rebinding), and the
    security headers on every response."""

    def __init__(self, app: ASGIApp, access: Access):
        self.app = app
        self.access = access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        request = Request(scope)
        if is_loopback(self.access.host) and _host_name(request.headers.get("host", "")) not in LOOPBACK_NAMES:
            return await PlainTextResponse("unexpected Host header", 400)(scope, receive, send_with_headers)
        query_token = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [None])[0]
        if self.access.token is not None and query_token is not None and self.access.token_matches(query_token):
            # The URL printed at start: keep the token in a cookie and drop it from the address bar.
            response = Response(status_code=303, headers={"location": "/"})
            response.set_cookie(COOKIE, self.access.token, httponly=True, secure=True, samesite="strict")
            return await response(scope, receive, send_with_headers)
        if not self.access.token_matches(request.cookies.get(COOKIE) or _bearer(request.headers)):
            response = PlainTextResponse("token required: open the URL the dashboard printed at start", 401)
            return await response(scope, receive, send_with_headers)
        await self.app(scope, receive, send_with_headers)


def _host_name(host: str) -> str:
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def _bearer(headers: object) -> str | None:
    value = headers.get("authorization", "")  # type: ignore[attr-defined]
    return value[7:] if value.lower().startswith("bearer ") else None


def create_app(data: DashboardData, access: Access, stopping: threading.Event | None = None) -> ASGIApp:
    """The dashboard as an ASGI app for ``data``; ``stopping`` ends open event streams after a last update."""
    stopping = stopping or threading.Event()
    streams = [0]

    async def page(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    async def state(request: Request) -> Response:
        _, text = await anyio.to_thread.run_sync(data.poll)
        return Response(text, media_type="application/json")

    async def events(request: Request) -> Response:
        if streams[0] >= MAX_STREAMS:
            return PlainTextResponse("too many open dashboards", 503)
        return StreamingResponse(_stream(data, stopping, streams), media_type="text/event-stream",
                                 headers={"x-accel-buffering": "no"})

    async def no_icon(request: Request) -> Response:
        return Response(status_code=204)

    app = Starlette(routes=[Route("/", page), Route("/api/state", state), Route("/api/events", events),
                            Route("/favicon.ico", no_icon),
                            Mount("/static", StaticFiles(directory=STATIC), name="static")])
    return AccessGate(app, access)


async def _stream(data: DashboardData, stopping: threading.Event, streams: list[int]) -> AsyncIterator[str]:
    """The state as an SSE ``state`` event whenever it changes; a comment now and then keeps proxies open."""
    streams[0] += 1
    try:
        sent, quiet = -1, 0.0
        yield "retry: 2000\n\n"
        while True:
            last = stopping.is_set()
            version, text = await anyio.to_thread.run_sync(data.poll, last)
            if version != sent:
                sent, quiet = version, 0.0
                yield f"event: state\ndata: {text}\n\n"
            elif quiet >= KEEPALIVE_S:
                quiet = 0.0
                yield ": keep-alive\n\n"
            if last:
                return
            await anyio.sleep(data.poll_s)
            quiet += data.poll_s
    finally:
        streams[0] -= 1


class DashboardServer:
    """A dashboard served from a background thread; ``start()`` binds and returns once it listens.

    Parameters
    ----------
    root : Path
        The run (or bench) directory to show.
    access : Access
        Address, TLS and token (see ``plan_access``).
    poll_s : float, default 0.25
        How often the run's files are read while a page is open.
    """

    def __init__(self, root: Path, access: Access, poll_s: float = 0.25):
        self.access = access
        self.data = DashboardData(Path(root), poll_s)
        self.stopping = threading.Event()
        self.port = access.port
        self._socket: socket.socket | None = None
        config = uvicorn.Config(
            create_app(self.data, access, self.stopping), ssl_certfile=_opt(access.certfile),
            ssl_keyfile=_opt(access.keyfile), lifespan="off", ws="none", proxy_headers=False, server_header=False,
            access_log=False, log_level="warning", limit_concurrency=MAX_STREAMS + 16, timeout_graceful_shutdown=3)
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return self.access.url(self.port)

    def start(self, timeout_s: float = 10.0) -> DashboardServer:
        self._socket = bind(self.access.host, self.access.port)
        self.port = self._socket.getsockname()[1]
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._socket]},
                                        name="pollinate-dashboard", daemon=True)
        self._thread.start()
        if not wait_until_started(self.server, self._thread, timeout_s):
            self.stop()
            raise DashboardError(f"dashboard on {self.access.host}:{self.port} did not start")
        return self

    def stop(self) -> None:
        """Push the run's last state to open pages, then close them and stop serving."""
        self.stopping.set()
        threading.Event().wait(min(1.0, 2 * self.data.poll_s))  # streams wake, read once more, send, end
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(10.0)
        if self._socket is not None:
            self._socket.close()

    def __enter__(self) -> DashboardServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: a free one), or a ``DashboardError`` naming the address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as exc:
        raise DashboardError(f"dashboard cannot listen on {host}:{port}: {exc.strerror or exc}") from exc


def _opt(path: Path | None) -> str | None:
    return None if path is None else str(path)
