"""Who may open a dashboard: loopback open, anything else TLS + token; the flags fail early on bad input."""

from pathlib import Path

import pytest

from pollinate.cli import main
from pollinate.common.config import ConfigError
from pollinate.dashboard.access import Access, is_loopback, parse_address, plan_access
from pollinate.dashboard.launch import DashboardOptions


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    from pollinate.deploy.keys import init_certs

    directory = tmp_path_factory.mktemp("certs")
    init_certs(directory, ["127.0.0.1"])
    return directory


@pytest.mark.parametrize(("text", "expected"), [
    ("8765", ("127.0.0.1", 8765)), ("0", ("127.0.0.1", 0)), ("0.0.0.0:80", ("0.0.0.0", 80)),
    ("localhost:9000", ("localhost", 9000)), ("[::1]:8765", ("::1", 8765)),
])
def test_addresses_parse(text, expected):
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["", "http", "host:", ":80", "1.2.3.4:65536", "::1:8765", "a:b:c"])
def test_malformed_addresses_name_the_flag(text):
    with pytest.raises(ConfigError, match="--dashboard"):
        parse_address(text)


def test_loopback_is_recognised():
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.8.0.1", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.1", "example.org", "localhost.example.org"))


def test_loopback_needs_neither_tls_nor_token():
    access = plan_access("127.0.0.1", 8765, None)
    assert access.token is None and access.certfile is None
    assert access.url() == "http://127.0.0.1:8765/"


def test_any_other_address_requires_tls(tmp_path):
    with pytest.raises(ConfigError, match="needs TLS"):
        plan_access("0.0.0.0", 8765, None)
    with pytest.raises(ConfigError, match="server.crt, server.key"):
        plan_access("10.0.0.1", 8765, tmp_path)


def test_any_other_address_gets_tls_and_a_fresh_random_token(certs):
    first, second = plan_access("0.0.0.0", 8765, certs), plan_access("0.0.0.0", 8765, certs)
    assert first.certfile == certs / "server.crt" and first.keyfile == certs / "server.key"
    assert first.token and second.token and first.token != second.token and len(first.token) >= 32
    assert first.url().startswith("https://") and first.url().endswith(f"/?token={first.token}")


def test_tokens_compare_whole():
    access = Access("0.0.0.0", 1, token="abc")
    assert access.token_matches("abc")
    assert not any(access.token_matches(t) for t in (None, "", "ab", "abcd", "ABC"))
    assert Access("127.0.0.1", 1).token_matches(None)


def test_the_coordinators_certificates_serve_only_off_loopback(certs):
    assert DashboardOptions.parse("8765", None, default_certs=certs).access.certfile is None
    assert DashboardOptions.parse("0.0.0.0:8765", None, default_certs=certs).access.certfile == certs / "server.crt"
    assert DashboardOptions.parse("8765", certs).access.certfile == certs / "server.crt"


def test_simulate_refuses_a_dashboard_off_loopback_without_certificates_before_running(capsys, tmp_path):
    code = main(["simulate", "--model", "tiny-llama", "--out", str(tmp_path / "run"), "--dashboard", "0.0.0.0:0"])
    assert code == 2
    assert "needs TLS" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_dashboard_command_refuses_a_missing_run_directory(capsys, tmp_path):
    assert main(["dashboard", str(tmp_path / "missing"), "--port", "0"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_coordinator_refuses_a_dashboard_off_loopback_without_certificates_before_starting(capsys, tmp_path):
    code = main(["coordinator", "--insecure", "--host", "127.0.0.1", "--port", "0", "--model", "tiny-llama",
                 "--out", str(tmp_path / "run"), "--dashboard", "0.0.0.0:0"])
    assert code == 2
    assert "needs TLS" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
