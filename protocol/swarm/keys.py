"""DHT key space of a run, the sealed record every value is stored as, and the rule for who may write
each key.

Every record lives under `intellect/<run_id>/<name>` and under a subkey that is the writer's Ed25519
public key (hex). The stored value is a *record*: msgpack [version, name, envelope, signature], where
the signature (by the envelope's sender) covers run id, name, subkey, the record's DHT expiration time
and the envelope's digest. So a record cannot be moved to another key or subkey, and nobody but its
signer can give it a later expiration. A record counts only if both signatures hold, its envelope is
for this run, of the kind expected for the key space, signed by the subkey's key, for coordinator key
spaces by the run's coordinator, and its expiration is not beyond `max_expiration`.

The same check runs at store time (hivemind's record validator, see `hivemind_backend`) and at read
time (`verify_record`, which counts what it drops).

What this module does not know: how records travel (that is the backend) or what the bodies mean.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from dataclasses import dataclass

import msgpack

from intellect.protocol.identity import Identity, verify_signature
from intellect.protocol.wire import Envelope, MessageKind, WireRejected, open_envelope

MAX_RECORD_BYTES = 4 * 1024 * 1024  # the envelope inside a record
MAX_SEALED_BYTES = MAX_RECORD_BYTES + 512  # the record: version, name and signature around the envelope
RECORD_VERSION = 1
_RECORD_DOMAIN = b"intellect-node/dht-record/v1\x00"
_INDEX = re.compile(r"^(0|[1-9][0-9]{0,9})$")  # canonical decimal, as str(int) writes it


@dataclass(frozen=True)
class KeySpace:
    kinds: frozenset[MessageKind]
    coordinator_only: bool
    indexed: bool = False  # `<space>/<step>`


KEY_SPACES: dict[str, KeySpace] = {
    "run_info": KeySpace(frozenset({MessageKind.RUN_INFO}), True),
    "manifest": KeySpace(frozenset({MessageKind.POLICY_MANIFEST}), True, indexed=True),
    "shards": KeySpace(frozenset({MessageKind.SHARD_ANNOUNCE}), False, indexed=True),
    "peers": KeySpace(frozenset({MessageKind.HEARTBEAT}), False),
    "task_data": KeySpace(frozenset({MessageKind.DATA_ANNOUNCE}), False),
}


def run_info_key() -> str:
    return "run_info"


def manifest_key(step: int) -> str:
    return f"manifest/{int(step)}"


def shards_key(step: int) -> str:
    return f"shards/{int(step)}"


def peers_key() -> str:
    return "peers"


def task_data_key() -> str:
    """Where peers announce the task data files they hold (DataAnnounce)."""
    return "task_data"


def key_space(key: str) -> KeySpace:
    """The space of a key name (`run_info`, `manifest/12`, ...); ValueError for anything else."""
    space, slash, index = key.partition("/")
    rule = KEY_SPACES.get(space)
    if rule is None:
        raise ValueError(f"unknown key space {space[:64]!r} (known: {sorted(KEY_SPACES)})")
    if rule.indexed != bool(slash) or (slash and not _INDEX.match(index)):
        raise ValueError(f"malformed key {key[:80]!r}")
    return rule


def dht_key(run_id: str, key: str) -> str:
    key_space(key)
    return f"intellect/{run_id}/{key}"


class RecordRejected(WireRejected):
    """A DHT record that does not count; `reason` is a short stats name (`bad_record`, `wrong_key`, ...)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def _record_signed_part(run_id: str, key: str, subkey: str, expiration: float, envelope: bytes) -> bytes:
    return _RECORD_DOMAIN + msgpack.packb([run_id, key, subkey, float(expiration), hashlib.sha256(envelope).digest()],
                                          use_bin_type=True)


def seal_record(identity: Identity, run_id: str, key: str, envelope: bytes, expiration: float) -> bytes:
    """Our envelope as the DHT value for `key` (subkey: our public key hex) until `expiration`."""
    key_space(key)
    if len(envelope) > MAX_RECORD_BYTES:
        raise ValueError(f"record of {len(envelope)} bytes exceeds {MAX_RECORD_BYTES}")
    signature = identity.sign(_record_signed_part(run_id, key, identity.public_key_hex, expiration, envelope))
    return msgpack.packb([RECORD_VERSION, key, bytes(envelope), signature], use_bin_type=True)


def open_record(data: object, *, subkey: object, expiration: float, run_id: str, coordinator_key: bytes,
                max_expiration: float | None) -> tuple[str, Envelope]:
    """A stored value -> (its key name, its envelope), or RecordRejected naming the first check that failed.
    The caller checks that the name is the key the value was stored under (hivemind hands us its hash)."""
    if not isinstance(data, bytes):
        raise RecordRejected("not_bytes", f"value is {type(data).__name__}")
    if not isinstance(subkey, str) or not re.fullmatch(r"[0-9a-f]{64}", subkey):
        raise RecordRejected("bad_subkey", "a record's subkey is its signer's public key in hex")
    if type(expiration) is not float or not math.isfinite(expiration):
        raise RecordRejected("bad_record", "expiration is not a finite float")
    if max_expiration is not None and expiration > max_expiration:
        raise RecordRejected("expires_too_late", f"expiration {expiration - max_expiration:.0f} s beyond the cap")
    if len(data) > MAX_SEALED_BYTES:
        raise RecordRejected("bad_record", f"value of {len(data)} bytes is too large")
    try:
        fields = msgpack.unpackb(data, raw=False, max_bin_len=MAX_RECORD_BYTES, max_str_len=256, max_array_len=4,
                                 max_map_len=0, max_ext_len=0)
    except Exception as e:  # noqa: BLE001 -- msgpack raises many types on garbage; all mean the same here
        raise RecordRejected("bad_record", f"not msgpack ({type(e).__name__})") from None
    if type(fields) is not list or len(fields) != 4 or fields[0] != RECORD_VERSION or type(fields[0]) is not int:
        raise RecordRejected("bad_record", "expected [version 1, key, envelope, signature]")
    _, key, envelope_bytes, signature = fields
    if type(key) is not str or type(envelope_bytes) is not bytes or type(signature) is not bytes:
        raise RecordRejected("bad_record", "field types")
    try:
        space = key_space(key)
    except ValueError as e:
        raise RecordRejected("wrong_key", str(e)) from None
    if len(signature) != 64 or not verify_signature(
            bytes.fromhex(subkey), signature, _record_signed_part(run_id, key, subkey, expiration, envelope_bytes)):
        raise RecordRejected("bad_record_signature", "not signed by the subkey's key for this run, key and "
                                                     "expiration")
    try:
        envelope = open_envelope(envelope_bytes, run_id=None, kinds=set(space.kinds), max_bytes=MAX_RECORD_BYTES,
                                 max_age_s=None)
    except WireRejected as e:
        reason = "unsigned" if "signature" in str(e) else "bad_envelope"
        raise RecordRejected(reason, str(e)) from None
    if envelope.run_id != run_id:
        raise RecordRejected("wrong_run", f"envelope for run {envelope.run_id!r}")
    if envelope.sender.hex() != subkey:
        raise RecordRejected("subkey_mismatch", "envelope signed by another key than the subkey's")
    if space.coordinator_only and envelope.sender != coordinator_key:
        raise RecordRejected("not_allowed", f"only the coordinator writes {key.partition('/')[0]}")
    return key, envelope


def verify_record(key: str, subkey: object, value: object, expiration: float, *, run_id: str,
                  coordinator_key: bytes, stats: Counter, max_expiration: float | None = None) -> Envelope | None:
    """One DHT record read under `key` -> its envelope, or None (and a count in `stats` under
    `rejected_<reason>`)."""
    try:
        name, envelope = open_record(value, subkey=subkey, expiration=expiration, run_id=run_id,
                                     coordinator_key=coordinator_key, max_expiration=max_expiration)
        if name != key:
            raise RecordRejected("wrong_key", f"record for {name!r} stored under {key!r}")
    except RecordRejected as e:
        stats[f"rejected_{e.reason}"] += 1
        stats["records_rejected"] += 1
        return None
    stats["records_ok"] += 1
    return envelope
