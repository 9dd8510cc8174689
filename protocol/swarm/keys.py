"""DHT key space of a run, and the rule for who may write each key.

Every record lives under `intellect/<run_id>/<name>` and under a subkey that is the writer's Ed25519
public key (hex). A record counts only if its envelope is signed by that key, for this run, of the
kind expected for the key space, and, for coordinator key spaces, signed by the run's coordinator.

What this module does not know: how records travel (that is the backend) or what the bodies mean.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from intellect.protocol.wire import Envelope, MessageKind, WireRejected, open_envelope

MAX_RECORD_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class KeySpace:
    kinds: frozenset[MessageKind]
    coordinator_only: bool


KEY_SPACES: dict[str, KeySpace] = {
    "run_info": KeySpace(frozenset({MessageKind.RUN_INFO}), True),
    "manifest": KeySpace(frozenset({MessageKind.POLICY_MANIFEST}), True),
    "latest": KeySpace(frozenset({MessageKind.POLICY_MANIFEST}), True),  # the newest signed manifest
    "shards": KeySpace(frozenset({MessageKind.SHARD_ANNOUNCE}), False),
    "peers": KeySpace(frozenset({MessageKind.HEARTBEAT}), False),
}


def run_info_key() -> str:
    return "run_info"


def manifest_key(step: int) -> str:
    return f"manifest/{int(step)}"


def latest_key() -> str:
    return "latest"


def shards_key(step: int) -> str:
    return f"shards/{int(step)}"


def peers_key() -> str:
    return "peers"


def dht_key(run_id: str, key: str) -> str:
    space = key.split("/", 1)[0]
    if space not in KEY_SPACES:
        raise ValueError(f"unknown key space {space!r} (known: {sorted(KEY_SPACES)})")
    return f"intellect/{run_id}/{key}"


def verify_record(key: str, subkey: object, value: object, *, run_id: str, coordinator_key: bytes,
                  stats: Counter) -> Envelope | None:
    """One DHT record -> its envelope, or None (and a count in `stats` under `rejected_<reason>`)."""
    space = KEY_SPACES[key.split("/", 1)[0]]
    reason = None
    if not isinstance(value, bytes):
        reason = "not_bytes"
    elif not isinstance(subkey, str) or len(subkey) != 64:
        reason = "bad_subkey"
    if reason is None:
        try:
            envelope = open_envelope(value, run_id=None, kinds=set(space.kinds), max_bytes=MAX_RECORD_BYTES,
                                     max_age_s=None)
        except WireRejected as e:
            reason = "unsigned" if "signature" in str(e) or "msgpack" in str(e) else "bad_envelope"
        else:
            if envelope.run_id != run_id:
                reason = "wrong_run"
            elif envelope.sender.hex() != subkey:
                reason = "subkey_mismatch"
            elif space.coordinator_only and envelope.sender != coordinator_key:
                reason = "not_allowed"
            else:
                stats["records_ok"] += 1
                return envelope
    stats[f"rejected_{reason}"] += 1
    stats["records_rejected"] += 1
    return None
