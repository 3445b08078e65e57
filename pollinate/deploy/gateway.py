"""The coordinator's public port: a TLS gateway that forwards Flower's Fleet API and nothing else.

Flower 1.42's SuperLink serves the Fleet API (SuperNodes), the Control API (`flwr run`, `flwr ls`) and the
Runtime/ServerAppIo API on one HTTP port, and the open-source SuperLink does not authenticate Control calls:
whoever reaches that port can submit an app that runs on the coordinator and on every client. So the
SuperLink binds loopback only (the operator's `flwr` CLI and Flower's own helper processes reach it there) and
this gateway holds the public address: it answers only `POST` on the exact Fleet paths a SuperNode calls
(`FLEET_ROUTES`, the routes of `flwr.superlink.routers.fleet.router`) and 404 for every other path, forwards
those byte for byte (headers it needs, body streamed both ways with bounded memory, request size and idle time
bounded) and never parses them, except get-run/get-fab answers when an `AppApproval` is attached (app_trust).

Why a small ASGI proxy (uvicorn + httpx, both already Flower dependencies) instead of an nginx/Envoy config:
it installs with Pollinate and starts with the coordinator on every OS with the same certificates, and it can
attach the coordinator's app signature to get-fab answers, which a static proxy config cannot.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import ssl
import threading
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import httpx
import uvicorn
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from pollinate.common.uvicorn_thread import wait_until_started

log = logging.getLogger(__name__)

# Every route of Flower 1.42's Fleet router (flwr/superlink/routers/fleet/router.py), which is also every
# path its SuperNode client calls (flwr/supernode/fleet_http_client.py). tests/deploy/test_gateway.py
# compares this set with the installed Flower so an upgrade that changes it is noticed.
FLEET_ROUTES = frozenset(
    f"/v1/fleet/{name}"
    for name in (
        "register-node", "activate-node", "deactivate-node", "unregister-node", "send-node-heartbeat",
        "pull-messages", "push-messages", "get-run", "get-fab", "push-object", "pull-object",
        "confirm-message-received",
    )
)
GET_RUN = "/v1/fleet/get-run"
GET_FAB = "/v1/fleet/get-fab"
# Request headers a SuperNode sends (protobuf media types and Flower's `flwr-*` auth/version headers); the
# rest, e.g. X-Forwarded-For that the SuperLink's uvicorn would believe from loopback, stays out.
_FORWARDED_REQUEST_HEADERS = frozenset({"content-type", "content-length", "accept", "accept-encoding", "user-agent"})
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
     "transfer-encoding", "upgrade", "date", "server"}  # uvicorn writes its own date
)
# get-run/get-fab requests are a node id, run id and hash: a few hundred bytes.
_SMALL_REQUEST_BYTES = 64 * 1024


class FleetHook(Protocol):
    """Sees the get-run and get-fab exchanges (whole protobuf bodies) and may rewrite get-fab answers."""

    max_response_bytes: int

    def on_get_run(self, response: bytes) -> None: ...

    def on_get_fab(self, request: bytes, response: bytes) -> bytes: ...


@dataclass
class GatewayConfig:
    """Where the gateway listens, where it forwards to and its limits.

    Parameters
    ----------
    listen_host, listen_port : str, int
        Public address (the coordinator's `--host`/`--port`).
    upstream : str
        The SuperLink's loopback `host:port`.
    certfile, keyfile : Path or None
        Public TLS certificate and key (the coordinator's server.crt/server.key); None serves plain HTTP
        (an insecure coordinator).
    upstream_ca : Path or None
        CA that signed the SuperLink's certificate; None talks plain HTTP to the SuperLink.
    max_request_bytes : int, default 64 MiB
        Largest request body; Flower sends arrays in 5 MiB chunks, so only a hostile request comes near it.
    idle_timeout_s : float, default 30
        Longest wait for the next piece of a request body, and for the SuperLink to answer or send more.
    max_connections : int, default 256
        Concurrent connections served; more are answered 503.
    """

    listen_host: str
    listen_port: int
    upstream: str
    certfile: Path | None = None
    keyfile: Path | None = None
    upstream_ca: Path | None = None
    max_request_bytes: int = 64 * 1024 * 1024
    idle_timeout_s: float = 30.0
    max_connections: int = 256

    def __post_init__(self) -> None:
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("certfile and keyfile go together: pass both for TLS or neither")
        if not 1 <= self.listen_port <= 65535:
            raise ValueError(f"listen_port={self.listen_port} must be in 1..65535")
        if self.max_request_bytes < 1 or self.idle_timeout_s <= 0 or self.max_connections < 1:
            raise ValueError(
                f"max_request_bytes={self.max_request_bytes}, idle_timeout_s={self.idle_timeout_s} and "
                f"max_connections={self.max_connections} must be positive"
            )

    @property
    def upstream_url(self) -> str:
        return f"{'http' if self.upstream_ca is None else 'https'}://{self.upstream}"


class _RequestTooLarge(Exception):
    pass


class _RequestStalled(Exception):
    pass


def _error(status: int, text: str) -> Response:
    return PlainTextResponse(text, status_code=status)


class FleetGateway:
    """The ASGI application: Fleet routes forwarded to the SuperLink, every other path 404.

    Parameters
    ----------
    config : GatewayConfig
        Upstream address and limits.
    hook : FleetHook or None
        Sees get-run/get-fab bodies (app_trust.FabApprover attaches the coordinator's app signature).
    """

    def __init__(self, config: GatewayConfig, hook: FleetHook | None = None) -> None:
        self.config = config
        self.hook = hook
        self._client: httpx.AsyncClient | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            response = await self._handle(Request(scope, receive))
            await response(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        """One upstream connection pool per server run, opened at startup and closed at shutdown."""
        cfg = self.config
        verify: ssl.SSLContext | bool = False
        if cfg.upstream_ca is not None:
            verify = ssl.create_default_context(cafile=str(cfg.upstream_ca))
        await receive()  # lifespan.startup
        self._client = httpx.AsyncClient(
            base_url=cfg.upstream_url, verify=verify, timeout=httpx.Timeout(cfg.idle_timeout_s, connect=10.0),
            limits=httpx.Limits(max_connections=cfg.max_connections, max_keepalive_connections=32),
        )
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        await self._client.aclose()
        await send({"type": "lifespan.shutdown.complete"})

    async def _handle(self, request: Request) -> Response:
        path = request.scope["path"]  # percent-decoded, never normalised: only the exact strings match
        if path not in FLEET_ROUTES:
            return _error(404, "Not Found")
        if request.method != "POST":
            return _error(405, "Method Not Allowed")
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.config.max_request_bytes):
            return _error(413, f"request body over {self.config.max_request_bytes} bytes")
        try:
            if self.hook is not None and path in (GET_RUN, GET_FAB):
                return await self._exchange_whole(request, path)
            return await self._stream(request, path)
        except _RequestTooLarge:
            return _error(413, f"request body over {self.config.max_request_bytes} bytes")
        except _RequestStalled:
            return _error(408, "request body stalled")
        except ClientDisconnect:
            return _error(400, "client disconnected")
        except httpx.TimeoutException:
            return _error(504, "coordinator timed out")
        except httpx.HTTPError as err:
            log.warning("gateway: forwarding %s failed: %s", path, err)
            return _error(502, "coordinator unavailable")

    def _headers(self, request: Request) -> list[tuple[bytes, bytes]]:
        return [
            (name, value) for name, value in request.headers.raw
            if (key := name.decode("latin-1").lower()) in _FORWARDED_REQUEST_HEADERS or key.startswith("flwr-")
        ]

    async def _body(self, request: Request, limit: int) -> AsyncIterator[bytes]:
        """The request body as it arrives, refused past `limit` bytes or after an idle timeout."""
        received = 0
        chunks = request.stream().__aiter__()
        while True:
            try:
                chunk = await asyncio.wait_for(chunks.__anext__(), self.config.idle_timeout_s)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise _RequestStalled from None
            received += len(chunk)
            if received > limit:
                raise _RequestTooLarge
            if chunk:
                yield chunk

    async def _stream(self, request: Request, path: str) -> Response:
        assert self._client is not None, "gateway used outside its lifespan"
        upstream_request = self._client.build_request(
            "POST", path, headers=self._headers(request),
            content=self._body(request, self.config.max_request_bytes),
        )
        upstream = await self._client.send(upstream_request, stream=True)
        return StreamingResponse(
            _relay(upstream), status_code=upstream.status_code, headers=_response_headers(upstream.headers),
            background=BackgroundTask(upstream.aclose),
        )

    async def _exchange_whole(self, request: Request, path: str) -> Response:
        """Forward a get-run/get-fab call with both bodies in memory (both are bounded) and show the hook."""
        assert self._client is not None and self.hook is not None
        body = b"".join([chunk async for chunk in self._body(request, _SMALL_REQUEST_BYTES)])
        headers = [(k, v) for k, v in self._headers(request) if k.lower() != b"content-length"]
        upstream_request = self._client.build_request("POST", path, headers=headers, content=body)
        upstream = await self._client.send(upstream_request, stream=True)
        try:
            content = bytearray()
            async for chunk in upstream.aiter_raw():
                content += chunk
                if len(content) > self.hook.max_response_bytes:
                    return _error(502, "coordinator answer too large")
        finally:
            await upstream.aclose()
        headers = _response_headers(upstream.headers)
        if upstream.status_code == 200 and "content-encoding" not in upstream.headers:
            if path == GET_RUN:
                self.hook.on_get_run(bytes(content))
            else:
                content = bytearray(self.hook.on_get_fab(body, bytes(content)))
                headers.pop("content-length", None)
        return Response(bytes(content), status_code=upstream.status_code, headers=headers)


async def _relay(upstream: httpx.Response) -> AsyncIterator[bytes]:
    try:
        async for chunk in upstream.aiter_raw():
            yield chunk
    finally:
        await upstream.aclose()


def _response_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in _HOP_BY_HOP}


class _HeaderDeadlineProtocol(HttpToolsProtocol):
    """uvicorn's HTTP protocol, plus: a request's headers must be complete within the idle timeout of the
    connection opening (or of the request's first byte). uvicorn has no such limit, so an idle or trickling
    connection would hold one of the `max_connections` slots for ever."""

    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._deadline is None:
            self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.timeout_keep_alive, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()


def uvicorn_config(gateway: FleetGateway) -> uvicorn.Config:
    """uvicorn settings for the public port: TLS, connection cap, header deadline, no proxy headers or websockets."""
    cfg = gateway.config
    return uvicorn.Config(
        gateway, host=cfg.listen_host, port=cfg.listen_port,
        ssl_certfile=None if cfg.certfile is None else str(cfg.certfile),
        ssl_keyfile=None if cfg.keyfile is None else str(cfg.keyfile),
        limit_concurrency=cfg.max_connections, timeout_keep_alive=max(1, round(cfg.idle_timeout_s)),
        http=_HeaderDeadlineProtocol, proxy_headers=False, server_header=False, ws="none", lifespan="on",
        access_log=False,
        log_level="warning",
    )


class GatewayThread:
    """Runs a gateway inside this process (for tests and benchmarks); `stop()` ends it."""

    def __init__(self, gateway: FleetGateway) -> None:
        self.server = uvicorn.Server(uvicorn_config(gateway))
        self._thread = threading.Thread(target=self.server.run, name="fleet-gateway", daemon=True)

    def start(self, timeout_s: float = 10.0) -> GatewayThread:
        self._thread.start()
        if not wait_until_started(self.server, self._thread, timeout_s):
            raise RuntimeError(f"fleet gateway did not start within {timeout_s:.0f} s")
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(10.0)


def main(argv: list[str] | None = None) -> None:
    """`python -m pollinate.deploy.gateway`: the coordinator starts the gateway as its own process."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="public host:port")
    parser.add_argument("--upstream", required=True, help="the SuperLink's loopback host:port")
    parser.add_argument("--certfile", type=Path)
    parser.add_argument("--keyfile", type=Path)
    parser.add_argument("--upstream-ca", type=Path)
    parser.add_argument("--app-approval", type=Path, help="AppApproval JSON written by the coordinator")
    parser.add_argument("--max-request-bytes", type=int, default=GatewayConfig.max_request_bytes)
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    config = GatewayConfig(
        listen_host=host.strip("[]"), listen_port=int(port), upstream=args.upstream, certfile=args.certfile,
        keyfile=args.keyfile, upstream_ca=args.upstream_ca, max_request_bytes=args.max_request_bytes,
    )
    hook = None
    if args.app_approval is not None:
        from pollinate.deploy.app_trust import FabApprover

        hook = FabApprover(args.app_approval)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    gateway = FleetGateway(config, hook)
    log.info("Fleet gateway on %s forwarding the Fleet API to %s", args.listen, config.upstream_url)
    uvicorn.Server(uvicorn_config(gateway)).run()


if __name__ == "__main__":
    main()
