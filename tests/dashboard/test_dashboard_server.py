"""The dashboard's server on loopback: page, assets, state, live stream, token gate, TLS, Host check."""

import json
import threading
from pathlib import Path

import httpx
import pytest

from pollinate.dashboard.access import COOKIE, Access, DashboardError
from pollinate.dashboard.server import STATIC, DashboardServer, bind
from pollinate.deploy.keys import init_certs

EVENT = {"type": "round", "round": 1, "eval_loss": 2.0, "eval_metrics": {"accuracy": 0.5}, "bytes_up": 1,
         "bytes_down": 2, "seconds": 1.0}


@pytest.fixture
def run_dir(tmp_path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    initial = {"type": "initial_eval", "eval_loss": 3.0, "eval_metrics": {}}
    (run / "metrics.jsonl").write_text(json.dumps(initial) + "\n")
    return run


@pytest.fixture
def served(run_dir):
    with DashboardServer(run_dir, Access("127.0.0.1", 0), poll_s=0.05) as server:
        yield server


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("certs")
    init_certs(directory, ["127.0.0.1"])
    return directory


def test_page_and_assets_ship_inside_the_package_with_a_strict_policy(served):
    page = httpx.get(served.url)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "default-src 'none'" in policy and "'unsafe-inline'" not in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    for asset in ("dashboard.js", "dashboard.css", "chart.umd.min.js"):
        assert f"/static/{asset}" in page.text
        assert httpx.get(f"{served.url}static/{asset}").status_code == 200
    assert "http" not in page.text.replace("http-equiv", "")  # nothing fetched from elsewhere
    assert (STATIC / "chart.js.LICENSE.md").is_file()


def test_the_page_script_never_parses_run_data_as_html():
    script = (STATIC / "dashboard.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in script


def test_state_is_served_as_json(served):
    state = httpx.get(f"{served.url}api/state").json()
    assert state["runs"][0]["rounds"][0]["eval_loss"] == 3.0


def test_the_event_stream_pushes_new_lines_as_the_file_grows(served, run_dir):
    states = []
    with httpx.stream("GET", f"{served.url}api/events", timeout=10) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            states.append(json.loads(line[6:]))
            if len(states) == 1:
                with open(run_dir / "metrics.jsonl", "a") as fh:
                    fh.write(json.dumps(EVENT) + "\n" + '{"type": "client", "round": 2, "cli')  # a partial line
            else:
                break
    assert [r["round"] for r in states[0]["runs"][0]["rounds"]] == [0]
    assert [r["round"] for r in states[1]["runs"][0]["rounds"]] == [0, 1]
    assert states[1]["version"] > states[0]["version"]


def test_stopping_sends_the_last_state_and_ends_open_streams(run_dir):
    server = DashboardServer(run_dir, Access("127.0.0.1", 0), poll_s=0.05).start()
    received, done = [], threading.Event()

    def listen():
        with httpx.stream("GET", f"{server.url}api/events", timeout=10) as response:
            received.extend(line for line in response.iter_lines() if line.startswith("data: "))
        done.set()

    reader = threading.Thread(target=listen, daemon=True)
    reader.start()
    while not received:
        threading.Event().wait(0.02)
    with open(run_dir / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps(EVENT) + "\n")
    server.stop()
    assert done.wait(10)
    assert json.loads(received[-1][6:])["runs"][0]["status"]["last_done"] == 1


def test_a_foreign_host_header_is_refused_on_loopback(served):
    assert httpx.get(served.url, headers={"host": "attacker.example:80"}).status_code == 400
    assert httpx.get(served.url, headers={"host": f"localhost:{served.port}"}).status_code == 200


def test_a_busy_port_is_a_clear_error(served):
    with pytest.raises(DashboardError, match=f"127.0.0.1:{served.port}"):
        bind("127.0.0.1", served.port)


def test_with_a_token_every_request_needs_it_and_tls_is_on(run_dir, certs):
    access = Access("127.0.0.1", 0, token="s3cret-token", certfile=certs / "server.crt", keyfile=certs / "server.key")
    with DashboardServer(run_dir, access) as server:
        base = f"https://127.0.0.1:{server.port}/"
        assert server.url == f"{base}?token=s3cret-token"
        with httpx.Client(verify=str(certs / "ca.crt")) as client:
            for path in ("", "api/state", "api/events", "static/dashboard.js"):
                assert client.get(base + path).status_code == 401
            assert client.get(base + "api/state", headers={"authorization": "Bearer wrong"}).status_code == 401
            assert client.get(base + "?token=s3cret-tokeN").status_code == 401
            opened = client.get(server.url)  # the printed URL: the token moves into a cookie
            assert opened.status_code == 303 and opened.headers["location"] == "/"
            cookie = opened.headers["set-cookie"]
            assert "HttpOnly" in cookie and "Secure" in cookie and "SameSite=strict" in cookie
            assert client.get(base + "api/state").status_code == 200  # the client kept the cookie
        assert httpx.get(base + "api/state", cookies={COOKIE: "s3cret-token"}, verify=str(certs / "ca.crt")).is_success
        assert httpx.get(base + "api/state", headers={"authorization": "Bearer s3cret-token"},
                         verify=str(certs / "ca.crt")).is_success
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{server.port}/api/state", cookies={COOKIE: "s3cret-token"}, timeout=5)
