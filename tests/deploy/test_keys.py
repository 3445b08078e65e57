"""CA/server certificates and SuperNode keys: formats Flower reads, permissions, refusal to overwrite, passphrase."""

import argparse
import ipaddress
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from pollinate.deploy.keyfiles import PASSPHRASE_ENV
from pollinate.deploy.keys import (
    CertPaths,
    check_ca_cert,
    check_cert_paths,
    create_node_key,
    flower_node_key,
    init_certs,
    load_node_private_key,
    load_node_public_key,
)


@pytest.fixture(autouse=True)
def _no_passphrase(monkeypatch):
    monkeypatch.delenv(PASSPHRASE_ENV, raising=False)


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_server_cert_is_signed_by_ca_and_names_hosts_and_loopback(tmp_path):
    paths = init_certs(tmp_path, ["coord.example.org", "10.0.0.5"])
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())

    server.verify_directly_issued_by(ca)  # raises if the signature or issuer does not match
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"coord.example.org", "localhost"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("10.0.0.5"), ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")
    }
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_private_keys_are_owner_only_and_certs_world_readable(tmp_path):
    paths = init_certs(tmp_path, ["coord"])
    private, public = create_node_key(tmp_path / "nodes", "edge-1")
    assert _mode(paths.ca_key) == _mode(paths.server_key) == _mode(private) == 0o600
    assert _mode(paths.ca_cert) == _mode(paths.server_cert) == _mode(public) == 0o644


def test_node_key_is_ec_p384_in_openssh_format(tmp_path):
    private, public = create_node_key(tmp_path, "edge-1")
    assert private.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ")
    # The same loaders Flower's SuperNode and `flwr supernode register` use.
    priv = load_ssh_private_key(private.read_bytes(), None)
    pub = load_ssh_public_key(public.read_bytes())
    assert isinstance(priv, ec.EllipticCurvePrivateKey) and isinstance(priv.curve, ec.SECP384R1)
    assert priv.public_key().public_numbers() == pub.public_numbers()
    ours = load_node_private_key(private).public_key()
    assert load_node_public_key(public).public_numbers() == ours.public_numbers()


def test_existing_files_are_not_overwritten_unless_asked(tmp_path):
    paths = init_certs(tmp_path, ["coord"])
    before = paths.ca_cert.read_bytes()
    with pytest.raises(FileExistsError, match="ca.crt"):
        init_certs(tmp_path, ["coord"])
    assert paths.ca_cert.read_bytes() == before
    init_certs(tmp_path, ["coord"], overwrite=True)
    assert paths.ca_cert.read_bytes() != before

    create_node_key(tmp_path, "n1")
    with pytest.raises(FileExistsError, match="n1"):
        create_node_key(tmp_path, "n1")


def test_missing_cert_files_are_all_named(tmp_path):
    paths = init_certs(tmp_path, ["coord"])
    paths.server_key.unlink()
    paths.ca_cert.unlink()
    with pytest.raises(FileNotFoundError) as err:
        check_cert_paths(paths)
    assert "server.key" in str(err.value) and "ca.crt" in str(err.value)
    assert "server.crt" not in str(err.value)


def test_garbage_files_are_rejected_with_their_path(tmp_path):
    paths = init_certs(tmp_path, ["coord"])
    paths.server_cert.write_text("not a certificate")
    with pytest.raises(ValueError, match="server.crt"):
        check_cert_paths(paths)
    bad = tmp_path / "bad.pub"
    bad.write_text("ssh-nonsense AAAA")
    with pytest.raises(ValueError, match="bad.pub"):
        load_node_public_key(bad)
    with pytest.raises(FileNotFoundError, match="nope.crt"):
        check_ca_cert(tmp_path / "nope.crt")


def test_unreadable_key_gives_permission_error(tmp_path, monkeypatch):
    private, _ = create_node_key(tmp_path, "n1")

    def deny(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(type(private), "read_bytes", deny)
    with pytest.raises(PermissionError, match="not readable"):
        load_node_private_key(private)


def test_rsa_public_key_is_refused_for_node_auth(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    path = tmp_path / "rsa.pub"
    openssh = serialization.Encoding.OpenSSH
    path.write_bytes(key.public_key().public_bytes(openssh, serialization.PublicFormat.OpenSSH))
    with pytest.raises(ValueError, match="EC key"):
        load_node_public_key(path)


@pytest.mark.parametrize("name", ["", "../evil", "a b", "-x"])
def test_bad_node_names_are_refused(tmp_path, name):
    with pytest.raises(ValueError, match="node name"):
        create_node_key(tmp_path, name)


def test_cert_paths_use_standard_file_names(tmp_path):
    paths = CertPaths.in_dir(tmp_path)
    assert [p.name for p in (paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key)] == [
        "ca.crt", "ca.key", "server.crt", "server.key"
    ]


def test_passphrase_encrypts_ca_and_node_keys_and_reads_them_back(tmp_path, monkeypatch):
    monkeypatch.setenv(PASSPHRASE_ENV, "correct horse")
    paths = init_certs(tmp_path / "certs", ["coord"])
    private, public = create_node_key(tmp_path / "nodes", "edge-1")
    assert paths.ca_key.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert private.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    # The SuperLink (and the TLS front, and SFPrompt's service) load server.key with no password.
    assert paths.server_key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    check_cert_paths(paths, need_ca_key=True)
    assert load_node_private_key(private).public_key().public_numbers() == (
        load_node_public_key(public).public_numbers())

    monkeypatch.delenv(PASSPHRASE_ENV)
    with pytest.raises(ValueError, match=f"edge-1 is encrypted: set {PASSPHRASE_ENV}"):
        load_node_private_key(private)
    monkeypatch.setenv(PASSPHRASE_ENV, "wrong")
    with pytest.raises(ValueError, match="could not be decrypted .*wrong passphrase"):
        load_node_private_key(private)


def test_unencrypted_keys_still_load_while_a_passphrase_is_set(tmp_path, monkeypatch):
    private, _ = create_node_key(tmp_path, "edge-1")
    monkeypatch.setenv(PASSPHRASE_ENV, "correct horse")
    assert isinstance(load_node_private_key(private), ec.EllipticCurvePrivateKey)


def _flower_reads(path):
    """Flower 1.42's own SuperNode key loader (`flower-supernode --auth-supernode-private-key`)."""
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    args = argparse.Namespace(auth_supernode_private_key=str(path), auth_supernode_public_key=None)
    return _try_setup_client_authentication(args)[0]


def _flower_can_read(path) -> bool:
    """Flower's loader in a child process: on failure it calls flwr_exit, whose force-exit thread would
    os._exit the test process seconds later."""
    code = ("import argparse, sys; from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication;"
            f"_try_setup_client_authentication(argparse.Namespace(auth_supernode_private_key={str(path)!r}, "
            "auth_supernode_public_key=None))")
    env = {k: v for k, v in os.environ.items() if k != PASSPHRASE_ENV}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, timeout=120).returncode == 0


def test_supernode_gets_a_decrypted_private_copy_of_an_encrypted_key(tmp_path, monkeypatch):
    monkeypatch.setenv(PASSPHRASE_ENV, "correct horse")
    private, public = create_node_key(tmp_path, "edge-1")
    assert not _flower_can_read(private)  # flower-supernode cannot read an encrypted key itself
    with flower_node_key(private) as copy:
        assert copy != private and _mode(copy) == 0o600 and _mode(copy.parent) == 0o700
        key = _flower_reads(copy)
        assert key.public_key().public_numbers() == load_node_public_key(public).public_numbers()
    assert not copy.exists() and not copy.parent.exists()


def test_supernode_reads_an_unencrypted_key_in_place(tmp_path):
    private, _ = create_node_key(tmp_path, "edge-1")
    with flower_node_key(private) as path:
        assert path == private
    assert private.is_file()


class _SuperNodeThatJoins:
    """Stands in for `flower-supernode`: reads its key at start, reports a node id, then exits."""

    seen: list = []

    def __init__(self, name, argv, env, log_path, *, on_line, **kwargs):
        key = argv[argv.index("--auth-supernode-private-key") + 1]
        self.seen.append({"key": key, "readable": load_ssh_private_key(Path(key).read_bytes(), None) is not None,
                          "passphrase_in_env": PASSPHRASE_ENV in env})
        on_line("INFO :      SuperNode ID: 42")
        self.seen[-1]["kept_after_join"] = os.path.exists(key)

    def wait(self, timeout=None):
        return 1

    def tail(self, lines=15):
        return ""

    def stop(self, grace_s=5.0):
        return 1


def test_join_decrypts_the_key_for_the_supernode_and_removes_the_copy_once_it_is_in(tmp_path, monkeypatch):
    from pollinate.deploy import join as join_module

    monkeypatch.setenv(PASSPHRASE_ENV, "correct horse")
    certs = init_certs(tmp_path / "certs", ["coord"])
    private, _ = create_node_key(tmp_path / "nodes", "edge-1")
    (tmp_path / "d.jsonl").write_text("{}\n")
    monkeypatch.setattr(join_module, "ChildProcess", _SuperNodeThatJoins)
    _SuperNodeThatJoins.seen = []
    spec = join_module.JoinSpec(coordinator="127.0.0.1:9", work_dir=tmp_path / "node", ca_cert=certs.ca_cert,
                                private_key=private, data_path=tmp_path / "d.jsonl", retry_budget_s=0.5)
    with pytest.raises(join_module.CoordinatorUnreachableError):
        join_module.Node(spec, echo=None).run()
    [start] = _SuperNodeThatJoins.seen
    assert start["key"] != str(private) and start["readable"]
    assert not start["kept_after_join"] and not start["passphrase_in_env"]
