"""Checkpoint shards: split a checkpoint folder into content-addressed shards, describe them in a
manifest the coordinator signs, and reassemble the folder from shards found anywhere.

A shard is named by the sha256 of its bytes, so any peer may serve it and the receiver checks it
against the signed manifest before use. Everything streams: no function holds a whole file in memory,
except delta work, which holds one shard's base, delta and result.

Deltas: a manifest of step s may carry, per shard, a delta against the shard at the same place (same
file, same index, same size) of step s - 1 (`add_deltas`); the delta is named by its own sha256 and
stored next to the shards, and `rebuild_shard` turns base + delta back into the shard, checked
against the manifest like a downloaded one.

What this module does not know: where shards come from (the swarm, a cache, a test) or how a
checkpoint is trained or loaded.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from intellect.protocol.delta import CODEC_XOR_ZSTD, apply_delta, encode_delta
from intellect.protocol.files import atomic_write, fsync_dir
from intellect.protocol.identity import Identity
from intellect.protocol.messages import (
    FileEntry,
    PolicyManifest,
    ShardDelta,
    ShardEntry,
    decode_body,
    encode_body,
)
from intellect.protocol.wire import MessageKind, WireRejected, open_envelope, seal

DEFAULT_SHARD_SIZE = 50_000_000  # SHARDCAST's default, decimal
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
_READ = 1 << 20
# Files that make up a loadable checkpoint folder; anything else in the folder is not published.
CHECKPOINT_SUFFIXES = (".safetensors", ".json", ".jinja", ".txt", ".model")


class ShardRejected(WireRejected):
    """Shard bytes that do not match what the manifest promises."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_READ):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_files(src: Path) -> list[Path]:
    src = Path(src)
    if src.is_file():
        return [src]
    files = sorted(p for p in src.iterdir() if p.is_file() and p.name.endswith(CHECKPOINT_SUFFIXES))
    if not any(p.name.endswith(".safetensors") for p in files):
        raise ValueError(f"{src} holds no .safetensors file: not a checkpoint folder")
    return files


class ShardStore:
    """A folder of verified shards named by their sha256. Writes are atomic, so a shard file that
    exists is whole; `put` refuses bytes whose hash is not the name."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        return self.root / sha256

    def has(self, sha256: str) -> bool:
        return self.path(sha256).exists()

    def put(self, entry: ShardEntry, data: bytes, *, hashed_here: bool = False) -> Path:
        """Store verified bytes. `hashed_here`: `entry` was just computed from these very bytes in this
        process (the origin sharding its own checkpoint), so they are not hashed a second time."""
        if not hashed_here:
            check_shard(entry, data)
        path = self.path(entry.sha256)
        if not path.exists():
            atomic_write(path, [data])
        return path

    def get(self, sha256: str) -> bytes | None:
        try:
            return self.path(sha256).read_bytes()
        except FileNotFoundError:
            return None

    def remove(self, sha256: str) -> None:
        self.path(sha256).unlink(missing_ok=True)

    def held(self) -> set[str]:
        return {p.name for p in self.root.iterdir() if len(p.name) == 64}

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.iterdir() if p.is_file())


def check_shard(entry: ShardEntry, data: bytes) -> None:
    if len(data) != entry.size:
        raise ShardRejected(f"shard {entry.sha256[:12]} has {len(data)} bytes, manifest says {entry.size}")
    if hashlib.sha256(data).hexdigest() != entry.sha256:
        raise ShardRejected(f"shard {entry.sha256[:12]} bytes do not match its hash")


def shard_checkpoint(src: Path, store: ShardStore, *, run_id: str, policy_step: int, model_config_hash: str,
                     shard_size: int = DEFAULT_SHARD_SIZE) -> PolicyManifest:
    """Split every file of a checkpoint (file or folder) into shards in `store`; return the manifest.
    Each byte is read once and hashed twice (its file's hash, its shard's); a shard the store already
    holds (unchanged since an earlier step, a tokenizer file) is not written again. A changed shard
    is a copy: a shard is a byte range of a file, and a store file that shared the checkpoint's
    bytes (a hard link) would be changed by anything that rewrites either in place."""
    files = []
    for path in checkpoint_files(src):
        whole = hashlib.sha256()
        shards = []
        with open(path, "rb") as f:
            while data := f.read(shard_size):
                whole.update(data)
                entry = ShardEntry(sha256=hashlib.sha256(data).hexdigest(), size=len(data))
                if not store.has(entry.sha256):
                    store.put(entry, data, hashed_here=True)
                shards.append(entry)
        files.append(FileEntry(name=path.name, size=path.stat().st_size, sha256=whole.hexdigest(), shards=shards))
    return PolicyManifest(run_id=run_id, policy_step=policy_step, model_config_hash=model_config_hash,
                          shard_size=shard_size, files=files)


def sign_manifest(identity: Identity, manifest: PolicyManifest) -> bytes:
    return seal(identity, MessageKind.POLICY_MANIFEST, manifest.run_id, encode_body(manifest))


def open_manifest(data: bytes, *, run_id: str, coordinator_key: bytes) -> PolicyManifest:
    """Accept a signed manifest only from the run's coordinator, for this run. Raises WireRejected."""
    envelope = open_envelope(data, run_id=run_id, kinds={MessageKind.POLICY_MANIFEST},
                             max_bytes=MAX_MANIFEST_BYTES, expected_sender=coordinator_key, max_age_s=None)
    manifest = decode_body(PolicyManifest, envelope.body, max_bytes=MAX_MANIFEST_BYTES)
    if manifest.run_id != run_id:
        raise WireRejected(f"manifest body names run {manifest.run_id!r}, envelope {run_id!r}")
    for f in manifest.files:
        if sum(s.size for s in f.shards) != f.size:
            raise WireRejected(f"manifest file {f.name}: shard sizes do not add up to {f.size}")
        if any(s.size > manifest.shard_size for s in f.shards):
            raise WireRejected(f"manifest file {f.name}: a shard is larger than shard_size")
    if len({f.name for f in manifest.files}) != len(manifest.files):
        raise WireRejected("manifest lists a file twice")
    _check_deltas(manifest)
    return manifest


def _check_deltas(manifest: PolicyManifest) -> None:
    with_delta = [s for s in manifest.shards if s.delta is not None]
    if not with_delta:
        return
    base = manifest.delta_base_step
    if base is None or base >= manifest.policy_step:
        raise WireRejected(f"manifest of step {manifest.policy_step} has deltas but base step {base}")
    for s in with_delta:
        if s.delta.size >= s.size:  # a delta never costs more than the shard it replaces
            raise WireRejected(f"shard {s.sha256[:12]}: delta of {s.delta.size} bytes for a {s.size}-byte shard")


def add_deltas(manifest: PolicyManifest, base: PolicyManifest, store: ShardStore) -> PolicyManifest:
    """`manifest` with a delta for each changed shard whose place (file name, index, size) also exists
    in `base` and whose delta is smaller than the shard; both steps' shards must be in `store`, and
    the deltas are put there."""
    base_files = {f.name: f for f in base.files}
    files = []
    for f in manifest.files:
        old = base_files.get(f.name)
        shards = []
        for i, s in enumerate(f.shards):
            b = old.shards[i] if old is not None and i < len(old.shards) else None
            if b is not None and b.size == s.size and b.sha256 != s.sha256:
                s = _with_delta(s, b, store)
            shards.append(s)
        files.append(f.model_copy(update={"shards": shards}))
    return manifest.model_copy(update={"files": files, "delta_base_step": base.policy_step})


def _with_delta(entry: ShardEntry, base: ShardEntry, store: ShardStore) -> ShardEntry:
    base_bytes, target = store.get(base.sha256), store.get(entry.sha256)
    if base_bytes is None or target is None:
        return entry
    data = encode_delta(base_bytes, target)
    if len(data) >= entry.size:
        return entry
    delta = ShardDelta(codec=CODEC_XOR_ZSTD, base_sha256=base.sha256, sha256=hashlib.sha256(data).hexdigest(),
                       size=len(data))
    store.put(delta_entry(delta), data)
    return entry.model_copy(update={"delta": delta})


def delta_entry(delta: ShardDelta) -> ShardEntry:
    """The delta as a fetchable, content-addressed blob (what `ShardStore.put` and peers deal in)."""
    return ShardEntry(sha256=delta.sha256, size=delta.size)


def manifest_deltas(manifest: PolicyManifest) -> list[ShardDelta]:
    return [s.delta for s in manifest.shards if s.delta is not None]


def rebuild_shard(entry: ShardEntry, store: ShardStore) -> Path:
    """Apply the shard's delta (held in `store`) to its base (held too) and store the result, which
    must hash to `entry`. Raises ShardRejected (a missing part, or a result that does not match) or
    DeltaRejected (delta bytes that do not decode)."""
    delta = entry.delta
    if delta is None:
        raise ShardRejected(f"shard {entry.sha256[:12]} has no delta")
    base, data = store.get(delta.base_sha256), store.get(delta.sha256)
    if base is None or data is None:
        raise ShardRejected(f"shard {entry.sha256[:12]}: its base or delta is not held")
    return store.put(entry, apply_delta(delta.codec, base, data, entry.size))


def manifest_digest(signed_manifest: bytes) -> str:
    return hashlib.sha256(signed_manifest).hexdigest()


def missing_shards(manifest: PolicyManifest, store: ShardStore) -> list[ShardEntry]:
    seen: set[str] = set()
    missing = []
    for s in manifest.shards:
        if s.sha256 not in seen and not store.has(s.sha256):
            missing.append(s)
        seen.add(s.sha256)
    return missing


def assemble(manifest: PolicyManifest, shard_path: Callable[[str], Path | None], out_dir: Path) -> Path:
    """Rebuild the checkpoint folder. Every shard is re-hashed as it is copied and each whole file is
    checked at the end; the folder appears (atomic rename) only when everything matched."""
    out_dir = Path(out_dir)
    if out_dir.exists() and verify_folder(manifest, out_dir):
        return out_dir
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".part"))
    try:
        for f in manifest.files:
            atomic_write(tmp / f.name, _verified_chunks(f, shard_path))
        fsync_dir(tmp)
        if out_dir.exists():
            _remove_tree(out_dir)
        os.replace(tmp, out_dir)
        fsync_dir(out_dir.parent)
    except BaseException:
        _remove_tree(tmp)
        raise
    return out_dir


def _verified_chunks(f: FileEntry, shard_path: Callable[[str], Path | None]) -> Iterable[bytes]:
    whole = hashlib.sha256()
    for s in f.shards:
        path = shard_path(s.sha256)
        if path is None:
            raise ShardRejected(f"shard {s.sha256[:12]} of {f.name} is not available")
        h = hashlib.sha256()
        size = 0
        with open(path, "rb") as src:
            while chunk := src.read(_READ):
                h.update(chunk)
                whole.update(chunk)
                size += len(chunk)
                yield chunk
        if size != s.size or h.hexdigest() != s.sha256:
            raise ShardRejected(f"shard {s.sha256[:12]} of {f.name} is corrupted on disk")
    if whole.hexdigest() != f.sha256:
        raise ShardRejected(f"{f.name}: whole-file hash does not match the manifest")


def verify_folder(manifest: PolicyManifest, folder: Path) -> bool:
    """True when every manifest file exists in `folder` with the right size and hash."""
    for f in manifest.files:
        p = Path(folder) / f.name
        if not p.is_file() or p.stat().st_size != f.size or sha256_file(p) != f.sha256:
            return False
    return True


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
