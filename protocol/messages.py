"""Message bodies: strict pydantic models, one per message kind, msgpack on the wire.

Every model forbids extra fields and bounds every string, list and number, so a decoded body can be
used without further checks. `encode_body` / `decode_body` are the only way bodies cross the wire;
decoding failures raise `WireRejected` with the field that was wrong.

What this module does not know: signatures and run ids (that is `wire`), or what the coordinator
does with a body.
"""

from __future__ import annotations

from typing import Annotated, Literal, TypeVar

import msgpack
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from intellect.protocol.constants import MAX_SUBMISSION_BYTES
from intellect.protocol.tasks.config import TaskConfig
from intellect.protocol.wire import MessageKind, WireRejected

MAX_BODY_BYTES = 1024 * 1024  # every body but a submission's payload is small

Hex32 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]  # sha256 digests, public keys
Name = Annotated[str, Field(min_length=1, max_length=128)]
Count = Annotated[int, Field(ge=0, le=2**31 - 1)]
Step = Annotated[int, Field(ge=0, le=10**9)]
# where a peer can be dialled: directly at /ip4|ip6/<ip>/tcp/<port>, or through a relay at
# /ip4|ip6/<ip>/tcp/<port>/p2p/<relay id>/p2p-circuit (protocol/swarm/addr_book.py checks them further)
DialAddrs = Annotated[list[Annotated[str, Field(max_length=160, pattern=r"^/ip[46]/[0-9A-Fa-f.:]+/tcp/[0-9]{1,5}"
                                                                          r"(/p2p/[1-9A-HJ-NP-Za-km-z]{32,64}/p2p-circuit)?$")]],
                      Field(max_length=4)]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Heartbeat(Body):
    """A node tells the swarm it is alive and what it is doing (the coordinator's dashboard shows it);
    who sent it is the envelope's signer."""

    policy_step: Step | None
    engine: Literal["torch", "vllm"]
    device: Annotated[str, Field(max_length=64)]
    tokens_per_s: Annotated[float, Field(ge=0, le=1e9, allow_inf_nan=False)]
    paused: bool


class ShardDelta(Body):
    """The shard as a delta against the shard of the manifest's `delta_base_step` with `base_sha256`
    (protocol/delta.py says how to apply it); named and served by the delta's own sha256."""

    codec: Literal["xor-zstd"]
    base_sha256: Hex32
    sha256: Hex32
    size: Annotated[int, Field(ge=1, le=2**40)]


class ShardEntry(Body):
    sha256: Hex32
    size: Annotated[int, Field(ge=1, le=2**40)]
    delta: ShardDelta | None = None  # absent in manifests without a base step


class FileEntry(Body):
    """One file of a checkpoint folder, split into consecutive shards."""

    name: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.-]+$")]
    size: Annotated[int, Field(ge=0, le=2**44)]
    sha256: Hex32
    shards: Annotated[list[ShardEntry], Field(max_length=100_000)]


class PolicyManifest(Body):
    """What the coordinator signs for each policy step: every file and shard of the checkpoint."""

    run_id: Name
    policy_step: Step
    model_config_hash: Hex32
    shard_size: Annotated[int, Field(ge=1024, le=2**32)]
    files: Annotated[list[FileEntry], Field(min_length=1, max_length=64)]
    delta_base_step: Step | None = None  # the step the shards' deltas apply to (s - 1), if any

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def shards(self) -> list[ShardEntry]:
        return [s for f in self.files for s in f.shards]


class ShardAnnounce(Body):
    """A peer says which verified shards of a policy step it holds and serves."""

    policy_step: Step
    manifest_sha256: Hex32
    shard_sha256s: Annotated[list[Hex32], Field(max_length=100_000)]
    addrs: DialAddrs = []  # where to dial the signer (direct, or relay circuits): fetchers dial them


class DataAnnounce(Body):
    """A peer says which verified task data files (`RunInfo.task_data`) it holds and serves."""

    sha256s: Annotated[list[Hex32], Field(min_length=1, max_length=16)]
    addrs: DialAddrs = []  # as in ShardAnnounce


class RunInfo(Body):
    """Signed by the coordinator, published at the run's root key: how to take part, and where the
    run is now (nodes poll it before every batch, like INTELLECT-2's step endpoint).

    Steps: train step s trains policy s into s + 1 from rollouts queued for it; `collect_step` is the
    train step newly accepted rollouts are queued for (the latest policy, or one more while that step
    trains); `latest_policy_step` the newest published policy."""

    run_id: Name
    run_name: Name
    coordinator_peer_id: Name
    task: TaskConfig
    collect_step: Step
    latest_policy_step: Step
    async_level: Annotated[int, Field(ge=0, le=64)]
    prompts_per_batch: Annotated[int, Field(ge=1, le=4096)]
    completions_per_prompt: Annotated[int, Field(ge=2, le=256)]
    max_new_tokens: Annotated[int, Field(ge=1, le=131072)]
    temperature: Annotated[float, Field(gt=0, le=10, allow_inf_nan=False)]
    model_config_hash: Hex32  # `model_config_hash` of the run's config.json: a node refuses a policy that differs
    # the tokens that end a completion (the policy folder's tokenizer and generation_config EOS ids):
    # engines stop on exactly these, and intake checks terminations against the same set
    eos_token_ids: Annotated[list[Annotated[int, Field(ge=0, lt=2**31)]], Field(min_length=1, max_length=64)]
    # a "jsonl:" task's data file (its sha256 and size): nodes fetch it through the swarm like a shard and
    # check both, so every node trains on the coordinator's exact file (its path in `task` is the coordinator's)
    task_data: ShardEntry | None = None


class SubmissionHeader(Body):
    """Describes the rollout file that follows it in a submission."""

    policy_step: Step
    batch_counter: Annotated[int, Field(ge=1, le=10**9)]
    num_completions: Annotated[int, Field(ge=1, le=65536)]
    num_tokens: Count
    file_sha256: Hex32
    file_size: Annotated[int, Field(ge=1, le=2**31)]


# Verdict.reason of a resend that arrived while an earlier copy is being validated: no verdict on the
# file yet; the node keeps it and asks again later
IN_FLIGHT = "in_flight"
# Verdict.reason of a batch on a policy older than the run's collected step - async level: the node's
# view of the run is behind (after a coordinator restart its DHT may not reach the coordinator's records)
STALE_POLICY = "stale_policy"
# Verdict.reason while validator workers judge the file (stored durably): not a verdict yet; the node
# asks for it with VERDICT_RPC, by file hash
RECEIVED = "received"
# Verdict.reason of a verdict asked for a file the coordinator holds nothing of: submit it again
UNKNOWN_FILE = "unknown_file"


class Verdict(Body):
    """The coordinator's answer to one submission."""

    file_sha256: Hex32
    accepted: bool
    reason: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-z_]+$")]
    detail: Annotated[str, Field(max_length=1024)] = ""
    train_step: Step | None = None  # an accepted batch: the train step it is queued for
    credit_tokens: Count = 0


BODY_TYPES: dict[MessageKind, type[Body]] = {
    MessageKind.HEARTBEAT: Heartbeat,
    MessageKind.POLICY_MANIFEST: PolicyManifest,
    MessageKind.SHARD_ANNOUNCE: ShardAnnounce,
    MessageKind.RUN_INFO: RunInfo,
    MessageKind.DATA_ANNOUNCE: DataAnnounce,
    MessageKind.SUBMISSION: SubmissionHeader,
    MessageKind.VERDICT: Verdict,
}


def encode_body(body: Body) -> bytes:
    return msgpack.packb(body.model_dump(mode="python"), use_bin_type=True)


B = TypeVar("B", bound=Body)


def decode_body(body_type: type[B], data: bytes, max_bytes: int = MAX_BODY_BYTES) -> B:
    """Parse and validate one body. Any problem raises WireRejected naming the field."""
    if not isinstance(data, (bytes, bytearray)):
        raise WireRejected(f"{body_type.__name__} body must be bytes")
    if len(data) > max_bytes:
        raise WireRejected(f"{body_type.__name__} body of {len(data)} bytes exceeds {max_bytes}")
    try:
        raw = msgpack.unpackb(bytes(data), raw=False, strict_map_key=True, max_str_len=65536,
                              max_bin_len=0, max_ext_len=0, max_array_len=200_000, max_map_len=64)
    except Exception as e:  # noqa: BLE001 -- garbage bytes raise many msgpack error types; all mean "not a body"
        raise WireRejected(f"{body_type.__name__} body is not valid msgpack: {type(e).__name__}") from None
    if type(raw) is not dict:
        raise WireRejected(f"{body_type.__name__} body must be a map")
    try:
        return body_type.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise WireRejected(f"{body_type.__name__}: {where}: {first['msg']}") from None
    except (TypeError, ValueError, RecursionError) as e:
        raise WireRejected(f"{body_type.__name__}: {e}") from None


MAX_SUBMISSION_FILE_BYTES = MAX_SUBMISSION_BYTES
SUBMIT_RPC = "submit"  # the coordinator's request handler: a signed submission in, a signed verdict out
VERDICT_RPC = "verdict"  # the 32-byte sha256 of a submitted file in, its signed verdict (or RECEIVED) out


def encode_submission(header: SubmissionHeader, rollout_file: bytes) -> bytes:
    """A submission's envelope body: the header and the rollout parquet bytes it describes."""
    return msgpack.packb([encode_body(header), rollout_file], use_bin_type=True)


def decode_submission(data: bytes, max_file_bytes: int = MAX_SUBMISSION_FILE_BYTES) -> tuple[SubmissionHeader, bytes]:
    """Split and check a submission body: the file must be exactly what the header says."""
    import hashlib

    if len(data) > max_file_bytes + MAX_BODY_BYTES:
        raise WireRejected(f"submission of {len(data)} bytes exceeds {max_file_bytes + MAX_BODY_BYTES}")
    try:
        parts = msgpack.unpackb(bytes(data), raw=False, max_bin_len=max_file_bytes, max_str_len=0,
                                max_array_len=2, max_map_len=0, max_ext_len=0)
    except Exception as e:  # noqa: BLE001 -- garbage bytes raise many msgpack error types
        raise WireRejected(f"submission is not valid msgpack: {type(e).__name__}") from None
    if type(parts) is not list or len(parts) != 2 or not all(type(p) is bytes for p in parts):
        raise WireRejected("submission must be [header bytes, file bytes]")
    header = decode_body(SubmissionHeader, parts[0])
    rollout_file = parts[1]
    if len(rollout_file) != header.file_size:
        raise WireRejected(f"file has {len(rollout_file)} bytes, header says {header.file_size}")
    if hashlib.sha256(rollout_file).hexdigest() != header.file_sha256:
        raise WireRejected("file bytes do not match the header's sha256")
    return header, rollout_file
