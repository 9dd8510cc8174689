"""Signed envelopes: the only thing that crosses the network.

An envelope carries protocol version, message kind, run id, the sender's Ed25519 public key, a
per-sender sequence number, a timestamp and the body bytes, signed over their canonical msgpack
encoding. Decoding is paranoid: size limit before parsing, exact field set and types, known version
and kind, expected run, valid signature, and (with a `ReplayGuard`) a sequence number that only grows.

What this module does not know: what a body means. Bodies are validated by `messages`.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from enum import StrEnum

import msgpack

from intellect.protocol.constants import MAX_SUBMISSION_BYTES
from intellect.protocol.identity import Identity, peer_id_of, verify_signature

PROTOCOL_VERSION = 1
MAX_ENVELOPE_BYTES = MAX_SUBMISSION_BYTES  # rollout files ride in bodies; override per call for small kinds
MAX_CLOCK_SKEW_S = 600.0
_SIG_DOMAIN = b"intellect-node/envelope/v1\x00"


class MessageKind(StrEnum):
    HEARTBEAT = "heartbeat"
    POLICY_MANIFEST = "policy_manifest"
    SHARD_ANNOUNCE = "shard_announce"
    SUBMISSION = "submission"
    VERDICT = "verdict"
    RUN_INFO = "run_info"
    DATA_ANNOUNCE = "data_announce"


class WireRejected(ValueError):
    """Any reason an incoming wire input (envelope, message body, manifest, shard) is not acted on.
    The one error every decoder raises; the message says which check failed."""



@dataclass(frozen=True)
class Envelope:
    version: int
    kind: MessageKind
    run_id: str
    sender: bytes  # 32-byte Ed25519 public key
    seq: int
    timestamp: float
    body: bytes
    signature: bytes

    @property
    def sender_id(self) -> str:
        return peer_id_of(self.sender)

    def digest(self) -> str:
        """Content id of the signed envelope (replay detection, logs)."""
        return hashlib.sha256(_signed_part(self.version, self.kind, self.run_id, self.sender, self.seq,
                                           self.timestamp, self.body) + self.signature).hexdigest()


def _signed_part(version: int, kind: str, run_id: str, sender: bytes, seq: int, timestamp: float,
                 body: bytes) -> bytes:
    return _SIG_DOMAIN + msgpack.packb([version, str(kind), run_id, sender, seq, timestamp, body],
                                       use_bin_type=True)


class SequenceCounter:
    """Monotonic per-process sequence numbers: starts at the current time in microseconds so a
    restarted sender (same key) still moves forward past what receivers saw before."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = 0

    def next(self) -> int:
        with self._lock:
            self._last = max(self._last + 1, time.time_ns() // 1000)
            return self._last


_default_counter = SequenceCounter()


def seal(identity: Identity, kind: MessageKind, run_id: str, body: bytes, *, seq: int | None = None,
         timestamp: float | None = None) -> bytes:
    """Sign and encode one envelope."""
    seq = _default_counter.next() if seq is None else seq
    timestamp = time.time() if timestamp is None else timestamp
    signature = identity.sign(_signed_part(PROTOCOL_VERSION, kind, run_id, identity.public_key, seq,
                                           timestamp, body))
    return msgpack.packb(
        [PROTOCOL_VERSION, str(kind), run_id, identity.public_key, seq, timestamp, body, signature],
        use_bin_type=True,
    )


def _field(value, expected_type, name: str, *, max_len: int | None = None, exact_len: int | None = None):
    if type(value) is not expected_type:
        raise WireRejected(f"field {name!r} must be {expected_type.__name__}, got {type(value).__name__}")
    if exact_len is not None and len(value) != exact_len:
        raise WireRejected(f"field {name!r} must be {exact_len} bytes, got {len(value)}")
    if max_len is not None and len(value) > max_len:
        raise WireRejected(f"field {name!r} longer than {max_len}")
    return value


def open_envelope(
    data: bytes,
    *,
    run_id: str | None,
    kinds: set[MessageKind] | None = None,
    max_bytes: int = MAX_ENVELOPE_BYTES,
    replay_guard: ReplayGuard | None = None,
    expected_sender: bytes | None = None,
    now: float | None = None,
    max_age_s: float | None = MAX_CLOCK_SKEW_S,
) -> Envelope:
    """Decode and check one envelope. Raises WireRejected with the reason on any failure.

    run_id=None accepts any run (only for run discovery); kinds limits what the caller handles;
    max_age_s=None accepts old envelopes (long-lived DHT records such as manifests).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireRejected(f"envelope must be bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise WireRejected(f"envelope of {len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        fields = msgpack.unpackb(bytes(data), use_list=True, raw=False, strict_map_key=True,
                                 max_bin_len=max_bytes, max_str_len=4096, max_array_len=16, max_map_len=0,
                                 max_ext_len=0)
    except Exception as e:  # noqa: BLE001 -- msgpack raises many types on garbage; all mean the same thing here
        raise WireRejected(f"envelope is not valid msgpack: {type(e).__name__}") from None
    if type(fields) is not list or len(fields) != 8:
        raise WireRejected("envelope must be an 8-element array")
    version, kind, env_run, sender, seq, timestamp, body, signature = fields
    _field(version, int, "version")
    if version != PROTOCOL_VERSION:
        raise WireRejected(f"unsupported protocol version {version} (this node speaks {PROTOCOL_VERSION})")
    _field(kind, str, "kind", max_len=64)
    try:
        kind = MessageKind(kind)
    except ValueError:
        raise WireRejected(f"unknown message kind {kind[:64]!r}") from None
    if kinds is not None and kind not in kinds:
        raise WireRejected(f"message kind {kind} not accepted here")
    _field(env_run, str, "run_id", max_len=128)
    if run_id is not None and env_run != run_id:
        raise WireRejected(f"envelope is for run {env_run[:128]!r}, not {run_id!r}")
    _field(sender, bytes, "sender", exact_len=32)
    _field(seq, int, "seq")
    if not 0 <= seq < 2**63:
        raise WireRejected("sequence number out of range")
    if type(timestamp) is not float:
        raise WireRejected("field 'timestamp' must be float")
    _field(body, bytes, "body")
    _field(signature, bytes, "signature", exact_len=64)
    if expected_sender is not None and sender != expected_sender:
        raise WireRejected(f"envelope signed by {peer_id_of(sender)}, expected {peer_id_of(expected_sender)}")
    if not verify_signature(sender, signature, _signed_part(version, kind, env_run, sender, seq, timestamp, body)):
        raise WireRejected(f"bad signature (claimed sender {peer_id_of(sender)})")
    now = time.time() if now is None else now
    if not timestamp - now <= MAX_CLOCK_SKEW_S:
        raise WireRejected(f"timestamp {timestamp - now:.0f} s in the future (check this machine's clock)")
    if max_age_s is not None and not now - timestamp <= max_age_s:
        raise WireRejected(f"envelope is {now - timestamp:.0f} s old (limit {max_age_s:.0f} s)")
    envelope = Envelope(version, kind, env_run, sender, seq, timestamp, body, signature)
    if replay_guard is not None:
        replay_guard.check_and_record(envelope)
    return envelope


class ReplayGuard:
    """Tracks the highest sequence number seen per (sender, kind); anything not above it is a replay.

    Bounded: remembers at most `max_senders` senders, forgetting the least recently seen first.
    """

    def __init__(self, max_senders: int = 100_000) -> None:
        self._last: dict[tuple[bytes, str], int] = {}
        self._max = max_senders
        self._lock = threading.Lock()

    def check_and_record(self, envelope: Envelope) -> None:
        key = (envelope.sender, str(envelope.kind))
        with self._lock:
            last = self._last.get(key)
            if last is not None and envelope.seq <= last:
                raise WireRejected(
                    f"replay: sequence {envelope.seq} from {envelope.sender_id} is not above {last}"
                )
            self._last.pop(key, None)
            self._last[key] = envelope.seq
            if len(self._last) > self._max:
                self._last.pop(next(iter(self._last)))

    def last_seq(self, sender: bytes, kind: MessageKind) -> int | None:
        return self._last.get((sender, str(kind)))


def run_id_for(coordinator_key: bytes, run_name: str) -> str:
    """A run is named by the coordinator's key and a name: sha256(key || name), first 16 hex chars
    prefixed with the readable name so logs stay legible."""
    if not run_name or len(run_name) > 48 or not all(c.isalnum() or c in "-_" for c in run_name):
        raise ValueError("run name must be 1-48 characters of letters, digits, '-' or '_'")
    return f"{run_name}-{hashlib.sha256(coordinator_key + run_name.encode()).hexdigest()[:16]}"
