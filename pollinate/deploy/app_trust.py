"""Clients run only the coordinator's app: Flower's own pre-execution FAB check, fed a Pollinate signature.

What Flower 1.42 offers (read in its source). `flower-supernode --trusted-entities FILE` (a YAML map of key
id to OpenSSH ed25519 public key) makes the SuperNode check the FAB of every new run before it stores it or
creates a task for it (`_pull_and_store_message` in flwr/supernode/start_client_internal.py): unless
`fab.verifications["valid_license"]` is set and one entry is an ed25519 signature by a trusted key over
`signed_at (8 bytes) + sha256(FAB)` (`_verify_fab`), it answers the message with an INVALID_FAB error and no
ClientApp process ever starts for that run. The open-source SuperLink fills `verifications` only for apps it
downloads from Flower Hub (`_get_remote_fab` in flwr/superlink/servicer/control/control_handlers.py);
`flwr run <dir>` submits `Fab(hash, bytes, {})` (flwr/cli/run/run.py). So on its own the flag refuses every
app Pollinate submits ("App verification is not supported by the connected SuperLink").

What Pollinate adds. The coordinator builds the FAB it is about to submit with Flower's own builder (the same
bytes `flwr run` sends: fixed zip dates, only the generated pyproject.toml naming the installed components and
holding the run config), signs it with its app-signing key (ed25519, `app-signing.key` beside the CA) and hands
the signature to the Fleet gateway, which attaches it to get-fab answers for exactly that FAB and only for runs
without run-config overrides (`FabApprover`). `pollinate join` gives the SuperNode the coordinator's
`app-signing.pub` as its only trusted entity. Any other run (another app, the same app with another config or
overrides, or an app signed by another key) is refused by every client before any of its code runs.

Not defended. (1) Whatever reaches the SuperLink's loopback Control API (any local account on the coordinator
host) can still start a run whose ServerApp runs on the coordinator; only its ClientApps are refused. (2) A
process running as the coordinator's user (which includes every ServerApp the SuperLink starts) can read
`app-signing.key` or replace the gateway, so this check is only as strong as the coordinator host: the
loopback-only Control API (gateway.py) is what keeps others from submitting. (3) Re-running the approved FAB
through loopback runs the coordinator's own app and config again. (4) The signature covers the component names,
not the code they resolve to: each client runs the Pollinate installed on it. (5) Insecure coordinators sign
nothing and their clients trust any app.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from flwr.common.constant import FAB_MAX_SIZE
from flwr.proto.fab_pb2 import GetFabRequest, GetFabResponse  # pylint: disable=E0611
from flwr.proto.run_pb2 import GetRunResponse  # pylint: disable=E0611
from flwr.supercore.primitives.asymmetric_ed25519 import create_message_to_sign
from google.protobuf.message import DecodeError

from pollinate.deploy.keyfiles import load_private_key, private_key_encryption, write_key_files

log = logging.getLogger(__name__)

APP_SIGNING_KEY_FILE = "app-signing.key"
APP_SIGNING_PUB_FILE = "app-signing.pub"
TRUSTED_ENTITIES_FILE = "trusted-entities.yaml"
# The SuperNode refuses a FAB whose verifications lack this truthy entry before it looks at signatures.
_LICENSE_MARK = "valid_license"
_RECENT_RUNS = 4096


def app_signing_paths(directory: str | Path) -> tuple[Path, Path]:
    """`(private, public)` paths of the app-signing key pair in a certs directory."""
    d = Path(directory)
    return d / APP_SIGNING_KEY_FILE, d / APP_SIGNING_PUB_FILE


def app_signing_key_files(directory: str | Path) -> dict[Path, tuple[bytes, int]]:
    """A fresh app-signing key pair (ed25519) as `{path: (bytes, mode)}` for `keyfiles.write_key_files`.

    The private key is OpenSSH, or PKCS#8 PEM encrypted with `POLLINATE_KEY_PASSPHRASE` when that is set
    (encrypted OpenSSH keys need bcrypt; keys.create_node_key does the same); the coordinator then needs the
    passphrase to sign.
    """
    private_path, public_path = app_signing_paths(directory)
    key = ed25519.Ed25519PrivateKey.generate()
    encryption = private_key_encryption()
    fmt = serialization.PrivateFormat.OpenSSH
    if not isinstance(encryption, serialization.NoEncryption):
        fmt = serialization.PrivateFormat.PKCS8
    private = key.private_bytes(serialization.Encoding.PEM, fmt, encryption)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return {private_path: (private, 0o600), public_path: (public + b"\n", 0o644)}


def create_app_signing_key(directory: str | Path, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Create the coordinator's app-signing key pair in `directory` (`pollinate keys init` makes it too).

    Parameters
    ----------
    directory : str or Path
        The coordinator's certs directory; `app-signing.key` (0600) stays there, `app-signing.pub` goes to
        every client with `ca.crt`.
    overwrite : bool, default False
        Replace existing files; otherwise an existing file raises `FileExistsError`. Symbolic links and
        leftover temporary files are refused either way (`keyfiles.write_key_files`).
    """
    write_key_files(app_signing_key_files(directory), overwrite=overwrite)
    return app_signing_paths(directory)


def ensure_app_signing_key(directory: str | Path) -> tuple[Path, Path]:
    """The app-signing key pair in `directory`, created when neither file exists."""
    private_path, public_path = app_signing_paths(directory)
    if not private_path.exists() and not public_path.exists():
        return create_app_signing_key(directory)
    if not private_path.is_file():
        raise FileNotFoundError(f"app-signing private key {private_path} is missing beside {public_path}")
    return private_path, public_path


def _read(path: str | Path, what: str) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: {p}")
    return p.read_bytes()


def load_signing_key(path: str | Path) -> ed25519.Ed25519PrivateKey:
    """The coordinator's app-signing private key (decrypted with `POLLINATE_KEY_PASSPHRASE` when encrypted),
    naming the file on failure."""
    key = load_private_key(_read(path, "app-signing private key"), path, "app-signing private key")
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ValueError(f"app-signing private key {path} is {type(key).__name__}; expected ed25519")
    return key


def load_verify_key(path: str | Path) -> ed25519.Ed25519PublicKey:
    """The coordinator's app-signing public key (OpenSSH ed25519), naming the file on failure."""
    try:
        key = serialization.load_ssh_public_key(_read(path, "app-signing public key").strip())
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise ValueError(f"app-signing public key {path} is not an OpenSSH public key: {err}") from err
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ValueError(f"app-signing public key {path} is {type(key).__name__}; expected ed25519")
    return key


def key_id(public_key: ed25519.Ed25519PublicKey) -> str:
    """The name a key has in Flower's trusted-entities file and FAB verifications (from its fingerprint)."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return f"pollinate-{hashlib.sha256(raw).hexdigest()[:16]}"


def build_fab(app_dir: str | Path) -> bytes:
    """The FAB `flwr run app_dir` submits, built by Flower's own builder (deterministic bytes)."""
    from flwr.cli.build import build_fab_from_disk  # typer/click: only the coordinator needs them

    return build_fab_from_disk(Path(app_dir))


@dataclass(frozen=True)
class AppApproval:
    """The coordinator's signature over one FAB, in the form Flower's SuperNode verifies.

    Parameters
    ----------
    fab_hash : str
        SHA-256 (hex) of the approved FAB.
    verifications : dict of str to str
        Entries for `Fab.verifications`: the license mark and `{key id: {"signature", "signed_at"} as JSON}`.
    """

    fab_hash: str
    verifications: dict[str, str]

    def write(self, path: str | Path) -> Path:
        """Write as JSON, atomically: the gateway may read it at any moment."""
        target = Path(path)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(json.dumps({"fab_hash": self.fab_hash, "verifications": self.verifications}))
        os.replace(tmp, target)
        return target

    @classmethod
    def read(cls, path: str | Path) -> AppApproval:
        data = json.loads(_read(path, "app approval"))
        return cls(str(data["fab_hash"]), {str(k): str(v) for k, v in data["verifications"].items()})


def sign_fab(fab: bytes, key: ed25519.Ed25519PrivateKey, signed_at: int | None = None) -> AppApproval:
    """Sign `fab` the way Flower Hub's verifications are made (`create_message_to_sign`)."""
    digest = hashlib.sha256(fab)
    signed_at = int(time.time()) if signed_at is None else signed_at
    signature = key.sign(create_message_to_sign(digest.digest(), signed_at))
    record = {"signature": base64.urlsafe_b64encode(signature).decode("ascii").rstrip("="), "signed_at": signed_at}
    return AppApproval(digest.hexdigest(), {_LICENSE_MARK: "Valid", key_id(key.public_key()): json.dumps(record)})


def approve_app(app_dir: str | Path, signing_key: str | Path) -> AppApproval:
    """Sign the FAB of the coordinator's generated app directory with its app-signing key."""
    return sign_fab(build_fab(app_dir), load_signing_key(signing_key))


def write_trusted_entities(public_key: str | Path, out_path: str | Path) -> Path:
    """Write Flower's `--trusted-entities` YAML naming only the coordinator's app-signing public key."""
    key = load_verify_key(public_key)
    openssh = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump({key_id(key): openssh}), encoding="utf-8")
    return out


class FabApprover:
    """Fleet gateway hook: attaches the coordinator's signature to get-fab answers for the approved FAB.

    It remembers, from the get-run answers it forwards (a SuperNode asks get-run before get-fab for a new
    run), which runs have no run-config overrides; the signature is attached only for those runs and only
    when the answered FAB's content hashes to the approved hash.

    Parameters
    ----------
    approval : AppApproval or Path
        The coordinator's signature over its FAB, or the file it writes it to (read at each get-fab: the
        coordinator signs its FAB only when it submits the run, after the gateway has started).
    """

    max_response_bytes = FAB_MAX_SIZE + 1024 * 1024

    def __init__(self, approval: AppApproval | Path) -> None:
        self.approval = approval
        self._plain_runs: OrderedDict[int, None] = OrderedDict()

    def _current(self) -> AppApproval | None:
        if isinstance(self.approval, AppApproval):
            return self.approval
        try:
            return AppApproval.read(self.approval)
        except (OSError, ValueError, KeyError, AttributeError) as err:
            log.warning("no app approval readable at %s (%s)", self.approval, err)
            return None

    def on_get_run(self, response: bytes) -> None:
        try:
            run = GetRunResponse.FromString(response).run
        except DecodeError:
            return
        if not run.override_config:
            self._plain_runs[run.run_id] = None
            while len(self._plain_runs) > _RECENT_RUNS:
                self._plain_runs.popitem(last=False)

    def on_get_fab(self, request: bytes, response: bytes) -> bytes:
        try:
            run_id = GetFabRequest.FromString(request).run_id
            answer = GetFabResponse.FromString(response)
        except DecodeError:
            return response
        fab = answer.fab
        content_hash = hashlib.sha256(fab.content).hexdigest()
        approval = self._current()
        if approval is None or content_hash != approval.fab_hash or fab.hash_str != approval.fab_hash:
            log.warning("run %d: FAB %s is not the coordinator's app; clients will refuse it", run_id, content_hash)
            return response
        if run_id not in self._plain_runs:
            log.warning("run %d: run config overrides (or no get-run seen); clients will refuse it", run_id)
            return response
        fab.verifications.update(approval.verifications)
        return answer.SerializeToString()
