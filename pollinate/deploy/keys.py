"""TLS certificates and SuperNode authentication keys for a Pollinate deployment.

`init_certs` makes a private CA and a server certificate signed by it (the coordinator's SuperLink serves
TLS with them; clients trust only the CA). `create_node_key` makes the EC key pair a client presents to the
SuperLink when SuperNode authentication is on: OpenSSH format, which is what `flower-supernode
--auth-supernode-private-key` and `flwr supernode register` read (both use cryptography's `load_ssh_*`).

Files are written by `keyfiles.write_key_files` (exclusive, no-follow, atomic). With `POLLINATE_KEY_PASSPHRASE`
set, `ca.key` and node private keys are encrypted (node keys then as PKCS#8 PEM: encrypted OpenSSH needs the
bcrypt package); `flower_node_key` hands the SuperNode a decrypted private copy. `server.key` stays unencrypted:
the SuperLink, the TLS front and SFPrompt's split service load it by path at every start and take no password.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pollinate.deploy.app_trust import app_signing_key_files
from pollinate.deploy.keyfiles import (
    is_encrypted,
    load_private_key,
    private_copy,
    private_key_encryption,
    write_key_files,
)

CA_CERT_FILE = "ca.crt"
CA_KEY_FILE = "ca.key"
SERVER_CERT_FILE = "server.crt"
SERVER_KEY_FILE = "server.key"
# The SuperLink's own helper processes (SuperExec, ServerApp) reach it on loopback, so these are always in.
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_CURVE = ec.SECP384R1


@dataclass(frozen=True)
class CertPaths:
    """PEM files of a deployment's private CA and the coordinator's server certificate.

    Parameters
    ----------
    ca_cert : Path
        Self-signed CA certificate; clients pass it to `pollinate join --certs` to trust the coordinator.
    ca_key : Path
        CA private key (0600); keep it off clients.
    server_cert : Path
        Server certificate signed by the CA, with SANs for the coordinator's host names and loopback.
    server_key : Path
        Server private key (0600).
    """

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def in_dir(cls, directory: str | Path) -> CertPaths:
        """Return the standard file names inside `directory` (nothing is checked)."""
        d = Path(directory)
        return cls(d / CA_CERT_FILE, d / CA_KEY_FILE, d / SERVER_CERT_FILE, d / SERVER_KEY_FILE)


def _san_entry(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _private_pem(key: ec.EllipticCurvePrivateKey, encryption: serialization.KeySerializationEncryption) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def init_certs(
    directory: str | Path,
    host_names: Sequence[str],
    *,
    valid_days: int = 365,
    overwrite: bool = False,
) -> CertPaths:
    """Create a private CA and a coordinator server certificate signed by it.

    Parameters
    ----------
    directory : str or Path
        Where to write `ca.crt`, `ca.key`, `server.crt`, `server.key` (created if missing).
    host_names : sequence of str
        DNS names or IP addresses clients use to reach the coordinator; loopback names are always added.
    valid_days : int, default 365
        Validity of both certificates.
    overwrite : bool, default False
        Replace existing files; otherwise an existing file raises `FileExistsError` and nothing is written.
        A symbolic link or a leftover `.NAME.tmp` raises `FileExistsError` either way.

    Returns
    -------
    CertPaths
        Paths of the four PEM files.
    """
    if valid_days < 1:
        raise ValueError(f"valid_days must be >= 1, got {valid_days}")
    names: list[str] = []
    for name in [*host_names, *LOOPBACK_NAMES]:
        name = name.strip()
        if not name or (not _is_ip(name) and any(c in name for c in " /:")):
            raise ValueError(f"host name {name!r} is not a DNS name or IP address")
        if name not in names:
            names.append(name)
    paths = CertPaths.in_dir(directory)

    now = datetime.datetime.now(datetime.UTC)
    # Backdate slightly so a client whose clock is a little behind still accepts the certificate.
    not_before = now - datetime.timedelta(minutes=5)
    not_after = now + datetime.timedelta(days=valid_days)

    ca_key = ec.generate_private_key(_CURVE())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Pollinate deployment CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(_CURVE())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName([_san_entry(n) for n in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_encipherment=False, key_cert_sign=False, crl_sign=False,
                content_commitment=False, data_encipherment=False, key_agreement=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )

    pem = serialization.Encoding.PEM
    write_key_files(
        {
            paths.ca_cert: (ca_cert.public_bytes(pem), 0o644),
            paths.ca_key: (_private_pem(ca_key, private_key_encryption()), 0o600),
            paths.server_cert: (server_cert.public_bytes(pem), 0o644),
            paths.server_key: (_private_pem(server_key, serialization.NoEncryption()), 0o600),
            # The key the coordinator signs its app with; clients get app-signing.pub with ca.crt.
            **app_signing_key_files(directory),
        },
        overwrite=overwrite,
    )
    return paths


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def node_key_paths(directory: str | Path, name: str) -> tuple[Path, Path]:
    """Return `(private, public)` paths of node `name`'s key pair in `directory` (ssh-keygen naming)."""
    if not _NODE_NAME.match(name):
        raise ValueError(
            f"node name {name!r} must be 1-64 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    private = Path(directory) / name
    return private, private.with_name(f"{name}.pub")


def create_node_key(directory: str | Path, name: str, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Create a SuperNode authentication key pair (EC SECP384R1, OpenSSH format).

    Parameters
    ----------
    directory : str or Path
        Where to write `<name>` (private, 0600; encrypted PKCS#8 PEM when `POLLINATE_KEY_PASSPHRASE` is set)
        and `<name>.pub` (public; the coordinator registers it).
    name : str
        Node name, used as the file name.
    overwrite : bool, default False
        Replace existing files; otherwise an existing file raises `FileExistsError`.

    Returns
    -------
    tuple of Path
        `(private_key_path, public_key_path)`.
    """
    private_path, public_path = node_key_paths(directory, name)
    key = ec.generate_private_key(_CURVE())
    encryption = private_key_encryption()
    if isinstance(encryption, serialization.NoEncryption):
        private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, encryption)
    else:
        private = _private_pem(key, encryption)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    write_key_files({private_path: (private, 0o600), public_path: (public + b"\n", 0o644)}, overwrite=overwrite)
    return private_path, public_path


def _read(path: str | Path, what: str) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: {p}")
    try:
        return p.read_bytes()
    except OSError as err:
        raise PermissionError(f"{what} at {p} is not readable: {err.strerror}") from err


def load_node_public_key(path: str | Path) -> ec.EllipticCurvePublicKey:
    """Load and check a node public key (OpenSSH EC format), naming the file on any failure."""
    data = _read(path, "node public key")
    try:
        key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise ValueError(f"node public key {path} is not an OpenSSH public key: {err}") from err
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError(
            f"node public key {path} is {type(key).__name__}; Flower SuperNode auth needs an EC key "
            "(create one with `pollinate keys node`)"
        )
    return key


def load_node_private_key(path: str | Path) -> ec.EllipticCurvePrivateKey:
    """Load and check a node private key (OpenSSH, or PKCS#8 PEM; decrypted with `POLLINATE_KEY_PASSPHRASE` when
    encrypted), naming the file on failure."""
    key = load_private_key(_read(path, "node private key"), path, "node private key")
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"node private key {path} is {type(key).__name__}; an EC key is required")
    return key


@contextmanager
def flower_node_key(path: str | Path) -> Iterator[Path]:
    """A path `flower-supernode --auth-supernode-private-key` can read: `path` itself when it is an unencrypted
    OpenSSH key, else a decrypted OpenSSH copy in a private directory, removed on exit (Flower 1.42 reads the
    key with `load_ssh_private_key(data, None)`: no password, OpenSSH only)."""
    data = _read(path, "node private key")
    if b"OPENSSH PRIVATE KEY" in data and not is_encrypted(data):
        yield Path(path)
        return
    key = load_node_private_key(path)
    plain = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                              serialization.NoEncryption())
    with private_copy(plain, Path(path).name) as copy:
        yield copy


def check_cert_paths(paths: CertPaths, *, need_ca_key: bool = False) -> CertPaths:
    """Check that the coordinator's PEM files exist, are readable and parse; name every missing one.

    Parameters
    ----------
    paths : CertPaths
        Files to check.
    need_ca_key : bool, default False
        Also require the CA private key (the SuperLink itself does not need it).
    """
    required = {"CA certificate": paths.ca_cert, "server certificate": paths.server_cert,
                "server private key": paths.server_key}
    if need_ca_key:
        required["CA private key"] = paths.ca_key
    missing = [f"{what} ({p})" for what, p in required.items() if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(
            f"missing TLS file(s): {'; '.join(missing)}. "
            "Create them with `pollinate keys init DIR --host NAME`"
        )
    for what, p in (("CA certificate", paths.ca_cert), ("server certificate", paths.server_cert)):
        try:
            x509.load_pem_x509_certificate(_read(p, what))
        except ValueError as err:
            raise ValueError(f"{what} {p} is not a PEM certificate: {err}") from err
    try:
        serialization.load_pem_private_key(_read(paths.server_key, "server private key"), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise ValueError(
            f"server private key {paths.server_key} is not an unencrypted PEM key: {err}"
        ) from err
    return paths


def check_ca_cert(path: str | Path) -> Path:
    """Check a CA certificate a client will trust; name the file on failure."""
    try:
        x509.load_pem_x509_certificate(_read(path, "CA certificate"))
    except ValueError as err:
        raise ValueError(f"CA certificate {path} is not a PEM certificate: {err}") from err
    return Path(path)
