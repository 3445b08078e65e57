"""The Fleet gateway in front of a stand-in SuperLink (a Starlette app on loopback that records what reaches it).

Every server a test starts binds 127.0.0.1 and is stopped by that test.
"""

import hashlib
import http.client
import inspect
import os
import re
import socket
import ssl
import threading
import time

import httpx
import pytest
import uvicorn
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from pollinate.deploy.gateway import FLEET_ROUTES, FleetGateway, GatewayConfig, GatewayThread
from pollinate.deploy.keys import init_certs
from pollinate.deploy.processes import free_loopback_port


class StandIn:
    """A stand-in SuperLink: records (path, headers, body digest, body length) and answers by path."""

    def __init__(self):
        self.seen = []
        self.first_chunk_in = threading.Event()
        self.client_read_first = threading.Event()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        digest, size = hashlib.sha256(), 0
        async for chunk in request.stream():
            if chunk:
                self.first_chunk_in.set()
            digest.update(chunk)
            size += len(chunk)
        self.seen.append((scope["path"], dict(request.headers), digest.hexdigest(), size))
        if scope["path"] == "/v1/fleet/pull-object":
            response = StreamingResponse(self._slow_answer(), media_type="application/protobuf")
        else:
            response = Response(digest.hexdigest().encode(), media_type="application/protobuf",
                                headers={"x-upstream": "1"})
        await response(scope, receive, send)

    async def _slow_answer(self):
        """A first piece, then the rest only once the client has read that piece (streaming or deadlock)."""
        import asyncio

        yield b"first-piece"
        for _ in range(500):
            if self.client_read_first.is_set():
                break
            await asyncio.sleep(0.01)
        yield b"rest" if self.client_read_first.is_set() else b"client never got the first piece"


def _two_ports():
    first = free_loopback_port()
    while (second := free_loopback_port()) == first:
        pass
    return first, second


def _serve(app, port, **ssl_files):
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **ssl_files))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started

    def stop():
        server.should_exit = True
        thread.join(10)

    return stop


@pytest.fixture
def plain():
    """Gateway (plain HTTP, 1 MiB request limit, 1 s idle timeout) in front of a stand-in SuperLink."""
    upstream, (upstream_port, port) = StandIn(), _two_ports()
    stop_upstream = _serve(upstream, upstream_port)
    config = GatewayConfig("127.0.0.1", port, f"127.0.0.1:{upstream_port}", max_request_bytes=1 << 20,
                           idle_timeout_s=1.0)
    gateway = GatewayThread(FleetGateway(config)).start()
    yield upstream, port
    gateway.stop()
    stop_upstream()


def _raw(port, method, path, body=b"", headers=None):
    """One request with the path sent exactly as written (httpx would normalise dot segments)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def superlink_routes():
    """(path, methods) of every route of the installed Flower SuperLink app."""
    from fastapi.routing import iter_route_contexts
    from flwr.superlink.main import create_app

    return [(ctx.path, set(ctx.methods or ())) for ctx in iter_route_contexts(create_app().routes)]


def test_fleet_routes_are_exactly_what_flower_serves_and_its_supernode_calls(superlink_routes):
    from flwr.supernode import fleet_http_client

    served = {path for path, _ in superlink_routes if path.startswith("/v1/fleet/")}
    called = set(re.findall(r'path="(/v1/fleet/[^"]+)"', inspect.getsource(fleet_http_client)))
    assert FLEET_ROUTES == served == called
    assert all(methods == {"POST"} for path, methods in superlink_routes if path in FLEET_ROUTES)


def test_every_other_superlink_route_is_not_found_and_never_forwarded(plain, superlink_routes):
    upstream, port = plain
    others = sorted({path for path, _ in superlink_routes if path not in FLEET_ROUTES})
    assert "/v1/control/start-run" in others and "/v1/runtime/pull-messages" in others and "/health" in others
    for path in others:
        for method in ("GET", "POST"):
            assert _raw(port, method, path)[0] == 404, (method, path)
    assert upstream.seen == []


@pytest.mark.parametrize("path", [
    "/v1/fleet/../control/start-run", "/v1/fleet/%2e%2e/control/list-runs", "/v1/fleet/..%2fcontrol/list-runs",
    "//v1/fleet/get-run", "/v1/fleet/get-run/", "/V1/FLEET/GET-RUN", "/v1/fleet/get-run/../../control/stop-run",
    "/v1/fleet", "/v1/fleet/", "/", "/v1/fleet/get-run;/../../control/list-runs",
])
def test_path_tricks_do_not_reach_the_superlink(plain, path):
    upstream, port = plain
    assert _raw(port, "POST", path, b"x")[0] == 404
    assert upstream.seen == []


def test_fleet_route_with_another_method_is_refused(plain):
    upstream, port = plain
    for method in ("GET", "PUT", "DELETE", "OPTIONS"):
        assert _raw(port, method, "/v1/fleet/pull-messages")[0] == 405
    assert upstream.seen == []


def test_fleet_call_passes_byte_for_byte_with_only_the_headers_a_supernode_sends(plain):
    upstream, port = plain
    body = os.urandom(900_000)
    headers = {"content-type": "application/protobuf", "flwr-public-key": "pk", "flwr-signature": "sig",
               "flwr-timestamp": "ts", "x-forwarded-for": "10.9.9.9", "forwarded": "for=10.9.9.9",
               "cookie": "a=b", "authorization": "Bearer x"}
    response = httpx.post(f"http://127.0.0.1:{port}/v1/fleet/push-object?run=1", content=body, headers=headers)
    assert response.status_code == 200 and response.headers["x-upstream"] == "1"
    path, seen_headers, digest, size = upstream.seen[-1]
    assert path == "/v1/fleet/push-object" and size == len(body)
    assert response.content == digest.encode() == hashlib.sha256(body).hexdigest().encode()
    assert {k: seen_headers[k] for k in ("flwr-public-key", "flwr-signature", "flwr-timestamp")} == {
        "flwr-public-key": "pk", "flwr-signature": "sig", "flwr-timestamp": "ts"}
    assert not {"x-forwarded-for", "forwarded", "cookie", "authorization"} & set(seen_headers)


def test_request_body_is_streamed_to_the_superlink_not_buffered(plain):
    upstream, port = plain
    outcome = {}

    def body():
        yield b"a" * 1000
        # The rest is sent only once the SuperLink holds the first piece: a buffering gateway never lets it.
        outcome["streamed"] = upstream.first_chunk_in.wait(10)
        yield b"b" * 1000

    response = httpx.post(f"http://127.0.0.1:{port}/v1/fleet/push-object", content=body(), timeout=30)
    assert response.status_code == 200 and outcome["streamed"]
    assert upstream.seen[-1][3] == 2000


def test_response_is_streamed_to_the_supernode_not_buffered(plain):
    upstream, port = plain
    with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/fleet/pull-object", content=b"q", timeout=30) as r:
        pieces = r.iter_raw()
        first = next(pieces)
        upstream.client_read_first.set()
        rest = b"".join(pieces)
    assert first.startswith(b"first-piece") and (first + rest).endswith(b"rest")


def test_oversized_requests_are_refused(plain):
    upstream, port = plain
    url = f"http://127.0.0.1:{port}/v1/fleet/push-object"
    assert httpx.post(url, content=b"x" * ((1 << 20) + 1)).status_code == 413
    assert upstream.seen == []  # the declared length alone was enough
    chunks = (b"y" * 65536 for _ in range(40))  # 2.5 MiB, chunked: counted as it arrives
    assert httpx.post(url, content=chunks).status_code == 413
    assert _raw(port, "POST", "/v1/fleet/push-object", b"", {"content-length": "nan"})[0] in (400, 413)


def test_stalled_request_body_is_cut_off(plain):
    _, port = plain
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(b"POST /v1/fleet/push-object HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n0123456789")
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 408")


@pytest.mark.parametrize("sent", [b"", b"POST /v1/fleet/pull-messages HTTP/1.1\r\nhost: x\r\nflwr-"])
def test_connection_without_complete_headers_is_closed(plain, sent):
    _, port = plain
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(sent)
        assert sock.recv(4096) == b""  # closed by the gateway, nothing answered


def test_superlink_down_answers_502():
    port, dead = _two_ports()
    gateway = GatewayThread(FleetGateway(GatewayConfig("127.0.0.1", port, f"127.0.0.1:{dead}"))).start()
    try:
        assert httpx.post(f"http://127.0.0.1:{port}/v1/fleet/pull-messages", content=b"x").status_code == 502
    finally:
        gateway.stop()


def test_tls_on_both_sides_with_the_deployment_certificates(tmp_path):
    certs = init_certs(tmp_path / "certs", ["coordinator.test"])
    other = init_certs(tmp_path / "other", ["coordinator.test"])
    upstream, (upstream_port, port) = StandIn(), _two_ports()
    stop_upstream = _serve(upstream, upstream_port, ssl_certfile=str(certs.server_cert),
                           ssl_keyfile=str(certs.server_key))
    config = GatewayConfig("127.0.0.1", port, f"127.0.0.1:{upstream_port}", certfile=certs.server_cert,
                           keyfile=certs.server_key, upstream_ca=certs.ca_cert)
    gateway = GatewayThread(FleetGateway(config)).start()
    try:
        trusted = ssl.create_default_context(cafile=str(certs.ca_cert))
        url = f"https://127.0.0.1:{port}/v1/fleet/get-run"
        assert httpx.post(url, content=b"abc", verify=trusted).content == hashlib.sha256(b"abc").hexdigest().encode()
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.post(url, content=b"abc", verify=ssl.create_default_context(cafile=str(other.ca_cert)))
        with pytest.raises(httpx.HTTPError):
            httpx.post(f"http://127.0.0.1:{port}/v1/fleet/get-run", content=b"abc")  # plain HTTP on a TLS port
    finally:
        gateway.stop()
        stop_upstream()


def test_bad_configs_are_refused_with_the_field_named():
    with pytest.raises(ValueError, match="certfile and keyfile"):
        GatewayConfig("127.0.0.1", 1, "127.0.0.1:2", certfile="a.crt")
    with pytest.raises(ValueError, match="listen_port"):
        GatewayConfig("127.0.0.1", 0, "127.0.0.1:2")
    with pytest.raises(ValueError, match="max_request_bytes"):
        GatewayConfig("127.0.0.1", 1, "127.0.0.1:2", max_request_bytes=0)


@pytest.mark.slow
def test_large_messages_pass_through_the_gateway_in_flower_chunks(tmp_path):
    """A 12 MB ArrayRecord each way (three of Flower's 5 MiB object chunks) through a real deployment, with the
    node dialling the gateway and, for comparison, the SuperLink's loopback port (gateway_bench)."""
    from pollinate.deploy.gateway_bench import deployment_rounds

    certs = init_certs(tmp_path / "certs", ["coordinator.test"])
    rounds = {mode: deployment_rounds(tmp_path / mode, certs.ca_cert.parent, 12.0, 3, mode == "gateway")
              for mode in ("direct", "gateway")}
    assert all(len(seconds) == 2 for seconds in rounds.values())
    print({mode: [f"{s:.2f}" for s in seconds] for mode, seconds in rounds.items()})
