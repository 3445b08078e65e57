"""How key material touches the disk: exclusive no-follow creation, atomic replacement, an optional passphrase.

Every file is first written to ``.<name>.tmp`` beside its target, created with ``O_CREAT | O_EXCL | O_NOFOLLOW``
(an existing file or symbolic link there is refused, never written through), then renamed over the target, which
is checked afterwards to be the very file that was written. A target that is a symbolic link is refused, as is
a leftover temporary file: both are what an interrupted write or another local user leaves behind.

Private keys are encrypted when ``POLLINATE_KEY_PASSPHRASE`` is set (cryptography's ``BestAvailableEncryption``)
and read back with the same variable. Flower's executables read keys by path without a password, so an
encrypted key they need is handed to them as a decrypted copy in a private directory (``private_copy``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

PASSPHRASE_ENV = "POLLINATE_KEY_PASSPHRASE"
# Refuse, never follow: a planted link must not redirect where key material is written.
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
# A RAM file system where there is one: a decrypted key copy should never reach a disk.
_RAM_DIR = Path("/dev/shm")


def temp_path(path: Path) -> Path:
    """The temporary name ``path`` is written under before it is renamed into place."""
    return path.with_name(f".{path.name}.tmp")


def _refuse_unsafe(path: Path) -> None:
    if path.is_symlink():
        raise FileExistsError(f"refusing to write {path}: it is a symbolic link (to {os.readlink(path)}); "
                              "remove it and run again")
    if path.exists() and not path.is_file():
        raise FileExistsError(f"refusing to write {path}: it exists and is not a regular file")
    tmp = temp_path(path)
    if os.path.lexists(tmp):
        raise FileExistsError(f"refusing to write {path}: temporary file {tmp} already exists (left by an "
                              "interrupted write, or planted); check and remove it")


def write_key_files(files: Mapping[Path, tuple[bytes, int]], *, overwrite: bool = False) -> None:
    """Write every ``path: (data, mode)``, refusing before anything is written if one target is unsafe.

    Parameters
    ----------
    files : mapping of Path to (bytes, int)
        Contents and permission bits of each file (0o600 for private keys).
    overwrite : bool, default False
        Replace existing regular files; otherwise any existing target raises ``FileExistsError``. Symbolic links
        and leftover temporary files are refused either way.
    """
    paths = [Path(p) for p in files]
    for path in paths:
        _refuse_unsafe(path)
    existing = [str(p) for p in paths if os.path.lexists(p)]
    if existing and not overwrite:
        raise FileExistsError(f"refusing to overwrite existing key material: {', '.join(existing)} "
                              "(pass overwrite=True / --overwrite to replace it)")
    for path, (data, mode) in zip(paths, files.values(), strict=True):
        # A new directory for keys is the owner's alone (like ~/.ssh); an existing one is left as it is.
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        _write_one(path, data, mode)


def _write_one(path: Path, data: bytes, mode: int) -> None:
    tmp = temp_path(path)
    try:
        fd = os.open(tmp, _CREATE_FLAGS, mode)
    except FileExistsError:
        raise FileExistsError(f"refusing to write {path}: temporary file {tmp} appeared while writing; check "
                              "who else writes into this directory") from None
    with os.fdopen(fd, "wb") as out:
        written = os.fstat(fd)
        try:
            os.fchmod(fd, mode)  # the umask may have taken bits away from a certificate's 0o644
            out.write(data)
            out.flush()
            os.fsync(fd)
            os.replace(tmp, path)  # atomic; a link planted at the target meanwhile is replaced, never followed
        except BaseException:
            _remove_if_ours(tmp, written)
            raise
    placed = os.lstat(path)
    if (placed.st_dev, placed.st_ino) != (written.st_dev, written.st_ino):
        raise FileExistsError(f"{path} was replaced while it was being written; check who else writes into "
                              f"{path.parent}")


def _remove_if_ours(tmp: Path, written: os.stat_result) -> None:
    try:
        current = os.lstat(tmp)
    except FileNotFoundError:
        return
    if (current.st_dev, current.st_ino) == (written.st_dev, written.st_ino):
        tmp.unlink()


def key_passphrase() -> bytes | None:
    """The passphrase from ``POLLINATE_KEY_PASSPHRASE``, or None when it is unset or empty."""
    value = os.environ.get(PASSPHRASE_ENV, "")
    return value.encode("utf-8") if value else None


def private_key_encryption() -> serialization.KeySerializationEncryption:
    """Encryption for a private key being written: the passphrase's, else none."""
    passphrase = key_passphrase()
    return serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()


def is_encrypted(data: bytes) -> bool:
    """True for a PEM or OpenSSH private key that needs a password to be read."""
    loader = serialization.load_ssh_private_key if b"OPENSSH PRIVATE KEY" in data else (
        serialization.load_pem_private_key)
    try:
        loader(data, password=None)
    except TypeError:  # cryptography's "password was not given but private key is encrypted"
        return True
    except (ValueError, UnsupportedAlgorithm):
        return False
    return False


def load_private_key(data: bytes, path: str | Path, what: str) -> PrivateKeyTypes:
    """Parse a PEM (PKCS#8 or traditional) or OpenSSH private key, decrypting it with the passphrase if needed.

    Raises
    ------
    ValueError
        Naming ``what`` and ``path``: not a private key, encrypted without ``POLLINATE_KEY_PASSPHRASE`` set, or
        not decryptable with it.
    """
    openssh = b"OPENSSH PRIVATE KEY" in data
    loader = serialization.load_ssh_private_key if openssh else serialization.load_pem_private_key
    encrypted = is_encrypted(data)
    passphrase = key_passphrase() if encrypted else None
    if encrypted and passphrase is None:
        raise ValueError(f"{what} {path} is encrypted: set {PASSPHRASE_ENV} to its passphrase")
    try:
        return loader(data, password=passphrase)
    except UnsupportedAlgorithm as err:
        if openssh and encrypted:
            raise ValueError(f"{what} {path} is an encrypted OpenSSH key, which needs the bcrypt package; make "
                             "it with `pollinate keys node` instead (encrypted keys are written as PKCS#8)") from err
        raise ValueError(f"{what} {path} uses an unsupported algorithm: {err}") from err
    except (ValueError, TypeError) as err:
        if encrypted:
            raise ValueError(f"{what} {path} could not be decrypted with {PASSPHRASE_ENV} (wrong passphrase?)") \
                from err
        raise ValueError(f"{what} {path} is not a PEM or OpenSSH private key: {err}") from err


@contextmanager
def private_copy(data: bytes, name: str) -> Iterator[Path]:
    """A 0600 file holding ``data`` in a fresh 0700 directory (in RAM where possible), removed on exit."""
    base = _RAM_DIR if _RAM_DIR.is_dir() and os.access(_RAM_DIR, os.W_OK | os.X_OK) else None
    directory = Path(tempfile.mkdtemp(prefix="pollinate-key-", dir=base))
    try:
        path = directory / name
        write_key_files({path: (data, 0o600)})
        yield path
    finally:
        shutil.rmtree(directory, ignore_errors=True)
