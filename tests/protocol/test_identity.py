import os
import stat

import pytest
from typer.testing import CliRunner

from intellect.node.cli import app
from intellect.protocol.identity import (
    Identity,
    IdentityError,
    export_key,
    import_key,
    key_path,
    load_identity,
    new_identity,
    peer_id_of,
    verify_signature,
)


def test_key_created_once_with_mode_0600_and_persists(tmp_path):
    ident, created = load_identity(tmp_path, create=True)
    assert created
    mode = stat.S_IMODE(os.stat(key_path(tmp_path)).st_mode)
    assert mode == 0o600
    again, created_again = load_identity(tmp_path, create=True)
    assert not created_again
    assert again.public_key == ident.public_key


def test_missing_key_without_create_says_what_to_do(tmp_path):
    with pytest.raises(IdentityError, match="keys new"):
        load_identity(tmp_path)


def test_new_never_replaces_silently(tmp_path):
    first = new_identity(tmp_path)
    with pytest.raises(IdentityError, match="already exists"):
        new_identity(tmp_path)
    assert load_identity(tmp_path)[0].public_key == first.public_key
    second = new_identity(tmp_path, force=True)
    assert second.public_key != first.public_key


def test_export_import_round_trip(tmp_path):
    a = tmp_path / "a"
    b = tmp_path / "b"
    ident = new_identity(a)
    export_key(a, tmp_path / "backup.pem")
    assert stat.S_IMODE(os.stat(tmp_path / "backup.pem").st_mode) == 0o600
    with pytest.raises(IdentityError, match="exists"):
        export_key(a, tmp_path / "backup.pem")
    assert import_key(b, tmp_path / "backup.pem").public_key == ident.public_key
    new_identity(tmp_path / "c")
    with pytest.raises(IdentityError, match="different key"):
        import_key(tmp_path / "c", tmp_path / "backup.pem")


def test_corrupt_key_file_is_a_clear_error(tmp_path):
    key_path(tmp_path).write_bytes(b"not a key")
    with pytest.raises(IdentityError, match="PEM"):
        load_identity(tmp_path)


def test_sign_verify_and_peer_id():
    ident = Identity.from_seed(b"x")
    sig = ident.sign(b"hello")
    assert verify_signature(ident.public_key, sig, b"hello")
    assert not verify_signature(ident.public_key, sig, b"hellp")
    assert not verify_signature(Identity.from_seed(b"y").public_key, sig, b"hello")
    assert not verify_signature(b"\x00" * 31, sig, b"hello")
    assert ident.peer_id == peer_id_of(ident.public_key)
    assert ident.peer_id.startswith("in-") and ident.peer_id != Identity.from_seed(b"y").peer_id


def test_cli_keys_show_new_export_import(tmp_path):
    runner = CliRunner()
    env = {"INTELLECT_NODE_STATE_DIR": str(tmp_path / "s")}
    shown = runner.invoke(app, ["keys", "show"], env=env)
    assert shown.exit_code == 0, shown.output
    peer = load_identity(tmp_path / "s")[0].peer_id
    assert peer in shown.output and str(key_path(tmp_path / "s")) in shown.output
    refused = runner.invoke(app, ["keys", "new"], env=env)
    assert refused.exit_code == 1 and "already exists" in refused.output
    assert runner.invoke(app, ["keys", "export", str(tmp_path / "k.pem")], env=env).exit_code == 0
    other = runner.invoke(app, ["keys", "import", str(tmp_path / "k.pem"), "--state-dir", str(tmp_path / "o")])
    assert other.exit_code == 0 and peer in other.output
    assert runner.invoke(app, ["keys", "new", "--force"], env=env).exit_code == 0
    assert load_identity(tmp_path / "s")[0].peer_id != peer
