"""`pollinate coordinator | join | keys` as the CLI runs them: every flag still parses, warnings print once."""

import sys

import pytest

from pollinate import cli
from pollinate.deploy import coordinator as coordinator_module
from pollinate.deploy import join as join_module
from pollinate.deploy.keyfiles import PASSPHRASE_ENV
from pollinate.deploy.processes import free_loopback_port, port_in_use


@pytest.fixture(autouse=True)
def _no_passphrase(monkeypatch):
    monkeypatch.delenv(PASSPHRASE_ENV, raising=False)


def test_top_level_help_speaks_to_users(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    assert "quick start:" in text and "pollinate coordinator" in text and "pollinate join" in text
    assert "``" not in text and "parse" not in text


@pytest.mark.parametrize("argv, expected", [
    (["coordinator", "--host", "127.0.0.1", "--port", "9100", "--certs", "c", "--node-key", "a.pub", "--node-key",
      "b.pub", "--public-address", "coord:9100", "--resume", "run", "--model", "tiny-llama", "--set", "x.y=1"],
     {"host": "127.0.0.1", "port": 9100, "certs": "c", "node_key": ["a.pub", "b.pub"],
      "public_address": "coord:9100", "resume": "run", "insecure": False}),
    (["coordinator", "--insecure"], {"host": "0.0.0.0", "port": 9092, "insecure": True, "node_key": []}),
    (["join", "--coordinator", "h:1", "--data", "d.jsonl", "--profile", "p.toml", "--certs", "c", "--key", "k",
      "--partition-id", "3", "--work-dir", "w", "--retry-budget", "5"],
     {"coordinator": "h:1", "data": "d.jsonl", "profile": "p.toml", "certs": "c", "key": "k", "partition_id": 3,
      "work_dir": "w", "retry_budget": 5.0, "insecure": False}),
    (["keys", "init", "dir", "--host", "a", "--host", "b", "--days", "9", "--overwrite"],
     {"dir": "dir", "host": ["a", "b"], "days": 9, "overwrite": True}),
    (["keys", "node", "dir", "edge-1"], {"dir": "dir", "name": "edge-1", "overwrite": False}),
])
def test_every_deploy_flag_still_parses(argv, expected):
    args = vars(cli.build_parser().parse_args(argv))
    assert {key: args[key] for key in expected} == expected


def _free_port_pair() -> int:
    """A free loopback port whose successor (the SuperLink's own port) is free too."""
    while port_in_use("127.0.0.1", (port := free_loopback_port()) + 1):
        pass
    return port


def test_insecure_coordinator_warns_exactly_once(tmp_path, monkeypatch, capsys):
    import pollinate.simulations.run as simulations_run

    monkeypatch.setattr(simulations_run, "preflight", lambda cfg: None)  # no model or data load
    # A SuperLink that dies at once: the command gets as far as starting it, then fails with exit 1.
    monkeypatch.setattr(coordinator_module, "superlink_argv",
                        lambda spec: [sys.executable, "-c", "raise SystemExit(3)"])
    code = cli.main(["coordinator", "--insecure", "--host", "127.0.0.1", "--port", str(_free_port_pair()),
                     "--out", str(tmp_path / "run"), "--model", "tiny-llama"])
    captured = capsys.readouterr()
    assert code == 1 and "flower-superlink exited with code 3" in captured.err, captured.err
    assert (captured.out + captured.err).count("INSECURE") == 1


class _ExitingSuperNode:
    """Stands in for `flower-supernode`: exits at once, as against a coordinator that is not there."""

    def __init__(self, name, argv, env, log_path, **kwargs):
        self.argv = argv

    def wait(self, timeout=None):
        return 1

    def tail(self, lines=15):
        return "connection refused"

    def stop(self, grace_s=5.0):
        return 1


def test_insecure_join_warns_exactly_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(join_module, "ChildProcess", _ExitingSuperNode)
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n')
    code = cli.main(["join", "--coordinator", "127.0.0.1:9", "--insecure", "--partition-id", "0", "--data", str(data),
                     "--retry-budget", "0.5", "--work-dir", str(tmp_path / "node")])
    captured = capsys.readouterr()
    assert code == 1 and "did not accept this node" in captured.err
    assert (captured.out + captured.err).count("INSECURE") == 1


def test_keys_commands_say_where_each_file_goes_and_when_keys_are_encrypted(tmp_path, monkeypatch, capsys):
    assert cli.main(["keys", "node", str(tmp_path), "edge-1"]) == 0
    out = capsys.readouterr().out
    assert "pollinate join --key" in out and "--node-key" in out and "encrypted" not in out
    monkeypatch.setenv(PASSPHRASE_ENV, "correct horse")
    assert cli.main(["keys", "init", str(tmp_path / "certs"), "--host", "coord"]) == 0
    out = capsys.readouterr().out
    assert "never ca.key, server.key or app-signing.key" in out and f"encrypted with {PASSPHRASE_ENV}" in out


def test_key_refusals_exit_2_with_one_line(tmp_path, capsys):
    (tmp_path / ".edge-1.tmp").symlink_to(tmp_path / "elsewhere")
    assert cli.main(["keys", "node", str(tmp_path), "edge-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pollinate: error: refusing to write") and "\n" not in err
