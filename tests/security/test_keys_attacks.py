"""Issue 11 item 5/7: a local attacker who can write into the key directory cannot redirect key material.

Before the fix, a planted `.ca.key.tmp` symlink made `pollinate keys init` write the CA private key through the
link and leave `ca.key` a symlink to a file of the attacker's choosing.
"""

import os
import stat

import pytest

from pollinate.deploy import keyfiles
from pollinate.deploy.keyfiles import PASSPHRASE_ENV, private_copy, temp_path, write_key_files
from pollinate.deploy.keys import create_node_key, init_certs
from pollinate.deploy.processes import child_env


@pytest.fixture(autouse=True)
def _no_passphrase(monkeypatch):
    monkeypatch.delenv(PASSPHRASE_ENV, raising=False)


def _mode(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


def _plant_link(link, target):
    target.write_text("attacker's file\n")
    link.symlink_to(target)


def test_planted_ca_key_tmp_symlink_is_refused_and_nothing_is_written_through_it(tmp_path):
    certs, loot = tmp_path / "certs", tmp_path / "loot"
    certs.mkdir()
    _plant_link(certs / ".ca.key.tmp", loot)
    with pytest.raises(FileExistsError, match=r"temporary file .*\.ca\.key\.tmp already exists") as err:
        init_certs(certs, ["coord"])
    assert "\n" not in str(err.value)
    assert loot.read_text() == "attacker's file\n"  # no key material went through the link
    assert not os.path.lexists(certs / "ca.key")
    assert not os.path.lexists(certs / "ca.crt")  # refused before anything was written


def test_planted_tmp_symlink_is_refused_on_overwrite_too_and_the_existing_key_stays(tmp_path):
    paths = init_certs(tmp_path, ["coord"])
    before = paths.ca_key.read_bytes()
    _plant_link(temp_path(paths.ca_key), tmp_path / "loot")
    with pytest.raises(FileExistsError, match="temporary file"):
        init_certs(tmp_path, ["coord"], overwrite=True)
    assert not paths.ca_key.is_symlink() and paths.ca_key.read_bytes() == before
    assert (tmp_path / "loot").read_text() == "attacker's file\n"


@pytest.mark.parametrize("overwrite", [False, True])
def test_existing_target_symlink_is_refused(tmp_path, overwrite):
    loot = tmp_path / "loot"
    _plant_link(tmp_path / "ca.key", loot)
    with pytest.raises(FileExistsError, match=r"ca\.key: it is a symbolic link"):
        init_certs(tmp_path, ["coord"], overwrite=overwrite)
    assert loot.read_text() == "attacker's file\n"


def test_dangling_target_symlink_is_refused(tmp_path):
    (tmp_path / "edge-1").symlink_to(tmp_path / "does-not-exist-yet")
    with pytest.raises(FileExistsError, match="symbolic link"):
        create_node_key(tmp_path, "edge-1")
    assert not (tmp_path / "does-not-exist-yet").exists()


def test_planted_node_key_tmp_is_refused(tmp_path):
    (tmp_path / ".edge-1.pub.tmp").write_text("leftover")
    with pytest.raises(FileExistsError, match=r"\.edge-1\.pub\.tmp"):
        create_node_key(tmp_path, "edge-1")
    assert not os.path.lexists(tmp_path / "edge-1")


def test_symlink_planted_after_the_check_is_not_followed(tmp_path, monkeypatch):
    # The race: the link appears between the pre-check and the creation; O_EXCL|O_NOFOLLOW refuses it.
    target, loot = tmp_path / "ca.key", tmp_path / "loot"
    monkeypatch.setattr(keyfiles, "_refuse_unsafe", lambda path: _plant_link(temp_path(path), loot))
    with pytest.raises(FileExistsError, match="appeared while writing"):
        write_key_files({target: (b"secret", 0o600)})
    assert loot.read_text() == "attacker's file\n" and not os.path.lexists(target)


def test_target_swapped_during_the_rename_is_detected(tmp_path, monkeypatch):
    target, loot = tmp_path / "ca.key", tmp_path / "loot"
    real_replace = os.replace

    def replace_then_swap(src, dst):
        real_replace(src, dst)
        os.unlink(dst)
        _plant_link(dst, loot)

    monkeypatch.setattr(keyfiles.os, "replace", replace_then_swap)
    with pytest.raises(FileExistsError, match="was replaced while it was being written"):
        write_key_files({target: (b"secret", 0o600)})


def test_failed_write_leaves_no_temporary_file_behind(tmp_path, monkeypatch):
    def fail(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(keyfiles.os, "replace", fail)
    with pytest.raises(OSError, match="No space"):
        write_key_files({tmp_path / "ca.key": (b"secret", 0o600)})
    assert list(tmp_path.iterdir()) == []  # the next attempt is not refused for a leftover


@pytest.mark.parametrize("umask", [0o000, 0o077])
def test_permissions_do_not_depend_on_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        paths = init_certs(tmp_path / "certs", ["coord"])
        private, public = create_node_key(tmp_path / "nodes", "edge-1")
    finally:
        os.umask(old)
    assert _mode(paths.ca_key) == _mode(paths.server_key) == _mode(private) == 0o600
    assert _mode(paths.ca_cert) == _mode(paths.server_cert) == _mode(public) == 0o644
    assert _mode(tmp_path / "certs") == _mode(tmp_path / "nodes") == 0o700


def test_decrypted_copy_lives_in_an_owner_only_directory_and_is_removed(tmp_path):
    with private_copy(b"plain key", "edge-1") as copy:
        assert copy.read_bytes() == b"plain key"
        assert _mode(copy) == 0o600 and _mode(copy.parent) == 0o700
    assert not copy.parent.exists()


def test_flower_children_do_not_inherit_the_key_passphrase(monkeypatch):
    monkeypatch.setenv(PASSPHRASE_ENV, "correct horse")
    assert PASSPHRASE_ENV not in child_env({"FLWR_HOME": "/x"})

