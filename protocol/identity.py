"""Node identity: one Ed25519 key per node, kept in the state dir with mode 0600.

A node never replaces an existing key silently: credit, bans and the run's view of a node all
hang off its public key. The peer id is a readable digest of the public key.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

KEY_FILE = "node_key.pem"
STATE_DIR_ENV = "INTELLECT_NODE_STATE_DIR"


class IdentityError(Exception):
    """A key file is missing, unreadable, malformed, or would be overwritten."""


def default_state_dir() -> Path:
    return Path(os.environ.get(STATE_DIR_ENV) or Path.home() / ".intellect-node")


def key_path(state_dir: Path) -> Path:
    return Path(state_dir) / KEY_FILE


def peer_id_of(public_key: bytes) -> str:
    """Readable id: 'in-' + first 16 bytes of sha256(public key), base32, lower case."""
    import base64

    digest = hashlib.sha256(public_key).digest()[:16]
    return "in-" + base64.b32encode(digest).decode().rstrip("=").lower()


def verify_signature(public_key: bytes, signature: bytes, message: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
        return True
    except (InvalidSignature, ValueError):
        return False


@dataclass(frozen=True)
class Identity:
    private_key: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """Deterministic key from 32 bytes (tests and derived demo keys)."""
        return cls(Ed25519PrivateKey.from_private_bytes(hashlib.sha256(seed).digest()))

    @property
    def public_key(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @property
    def public_key_hex(self) -> str:
        return self.public_key.hex()

    @property
    def peer_id(self) -> str:
        return peer_id_of(self.public_key)

    def sign(self, message: bytes) -> bytes:
        return self.private_key.sign(message)

    def to_pem(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    @classmethod
    def from_pem(cls, data: bytes, source: str = "key") -> Identity:
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as e:
            raise IdentityError(f"{source} is not a readable PEM private key: {e}") from e
        if not isinstance(key, Ed25519PrivateKey):
            raise IdentityError(f"{source} holds a {type(key).__name__}, not an Ed25519 key")
        return cls(key)


def _write_private(path: Path, data: bytes) -> None:
    """Write with mode 0600 from the first byte (no window where the key is world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def load_identity(state_dir: Path, create: bool = False) -> tuple[Identity, bool]:
    """Load the node key; with create=True make one if none exists. Returns (identity, created)."""
    path = key_path(state_dir)
    if path.exists():
        try:
            data = path.read_bytes()
        except OSError as e:
            raise IdentityError(f"cannot read key file {path}: {e}") from e
        return Identity.from_pem(data, source=str(path)), False
    if not create:
        raise IdentityError(f"no key at {path}: run `intellect-node keys new` or `keys import FILE`")
    identity = Identity.generate()
    _write_private(path, identity.to_pem())
    return identity, True


def new_identity(state_dir: Path, force: bool = False) -> Identity:
    path = key_path(state_dir)
    if path.exists() and not force:
        raise IdentityError(
            f"a key already exists at {path}; replacing it loses this node's identity and credit. "
            "Back it up with `intellect-node keys export FILE`, then use `keys new --force`."
        )
    identity = Identity.generate()
    _write_private(path, identity.to_pem())
    return identity


def import_key(state_dir: Path, source: Path, force: bool = False) -> Identity:
    try:
        data = Path(source).read_bytes()
    except OSError as e:
        raise IdentityError(f"cannot read {source}: {e}") from e
    identity = Identity.from_pem(data, source=str(source))
    path = key_path(state_dir)
    if path.exists() and not force:
        current = load_identity(state_dir)[0]
        if current.public_key == identity.public_key:
            return identity
        raise IdentityError(f"a different key already exists at {path}; use --force to replace it")
    _write_private(path, identity.to_pem())
    return identity


def export_key(state_dir: Path, dest: Path) -> None:
    identity, _ = load_identity(state_dir)
    dest = Path(dest)
    if dest.exists():
        raise IdentityError(f"{dest} exists; choose a new file name")
    _write_private(dest, identity.to_pem())
