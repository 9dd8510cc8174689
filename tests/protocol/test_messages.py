import msgpack
import pytest

from intellect.protocol.messages import (
    BODY_TYPES,
    Heartbeat,
    PolicyManifest,
    RunInfo,
    ShardAnnounce,
    SubmissionHeader,
    Verdict,
    decode_body,
    encode_body,
)
from intellect.protocol.tasks import TaskConfig
from intellect.protocol.wire import WireRejected

H = "ab" * 32


def examples():
    from intellect.protocol.messages import (
        DataAnnounce,
        FileEntry,
        PolicyManifest,
        RunInfo,
        ShardAnnounce,
        ShardEntry,
    )

    shard = ShardEntry(sha256=H, size=10)
    return [
        Heartbeat(policy_step=3, engine="torch", device="cpu", tokens_per_s=12.5, paused=False),
        PolicyManifest(run_id="r-1", policy_step=2, model_config_hash=H, shard_size=4096,
                       files=[FileEntry(name="model.safetensors", size=10, sha256=H, shards=[shard])]),
        ShardAnnounce(policy_step=2, manifest_sha256=H, shard_sha256s=[H]),
        RunInfo(run_id="r-1", run_name="r", coordinator_peer_id="in-c",
                task=TaskConfig(name="arithmetic", length_targets=(16, 32)), collect_step=3, latest_policy_step=2,
                async_level=2, prompts_per_batch=8, completions_per_prompt=4, max_new_tokens=48, temperature=1.0,
                model_config_hash=H, eos_token_ids=[0, 2]),
        SubmissionHeader(policy_step=1, batch_counter=1, num_completions=32, num_tokens=999, file_sha256=H,
                         file_size=123),
        Verdict(file_sha256=H, accepted=False, reason="toploc_failed", detail="chunk 3"),
        DataAnnounce(sha256s=[H]),
        RunInfo(run_id="r-1", run_name="r", coordinator_peer_id="in-c", task=TaskConfig(name="jsonl:/data/p.jsonl"),
                collect_step=0, latest_policy_step=0, async_level=1, prompts_per_batch=8, completions_per_prompt=4,
                max_new_tokens=48, temperature=1.0, model_config_hash=H, eos_token_ids=[2], task_data=shard),
    ]


def test_every_kind_has_a_schema_and_round_trips():
    models = examples()
    assert {type(m) for m in models} == set(BODY_TYPES.values())
    for m in models:
        assert decode_body(type(m), encode_body(m)) == m


def test_removed_and_renamed_fields_are_extra_inputs():
    """The wire stays strict: a body with a field this version dropped (or its old name) is refused."""
    heartbeat, manifest, announce, run_info = (msgpack.unpackb(encode_body(m)) for m in examples()[:4])
    for body_type, d, old in ((Heartbeat, heartbeat, {"peer_id": "in-x"}),
                              (PolicyManifest, manifest, {"created_at": 1.0}),
                              (ShardAnnounce, announce, {"complete": True}),
                              (RunInfo, run_info, {"coordinator_addrs": []})):
        with pytest.raises(WireRejected, match="Extra inputs"):
            decode_body(body_type, msgpack.packb({**d, **old}))
    with pytest.raises(WireRejected, match="at least 1"):
        decode_body(type(examples()[-2]), msgpack.packb({"sha256s": []}))  # an announce names what it holds
    renamed = {k: v for k, v in run_info.items() if k != "collect_step"} | {"train_step": 3}
    with pytest.raises(WireRejected, match="collect_step"):
        decode_body(RunInfo, msgpack.packb(renamed))


def test_extra_fields_wrong_types_and_bounds_are_rejected():
    raw = encode_body(examples()[0])
    d = msgpack.unpackb(raw)
    with pytest.raises(WireRejected, match="Extra inputs"):
        decode_body(Heartbeat, msgpack.packb({**d, "evil": 1}))
    with pytest.raises(WireRejected, match="tokens_per_s"):
        decode_body(Heartbeat, msgpack.packb({**d, "tokens_per_s": -1.0}))
    with pytest.raises(WireRejected, match="engine"):
        decode_body(Heartbeat, msgpack.packb({**d, "engine": "gpt"}))
    with pytest.raises(WireRejected, match="policy_step"):
        decode_body(Heartbeat, msgpack.packb({**d, "policy_step": "3"}))
    with pytest.raises(WireRejected, match="reason"):
        decode_body(Verdict, msgpack.packb({"file_sha256": H, "accepted": True, "reason": "x" * 100}))
    with pytest.raises(WireRejected, match="not valid msgpack|must be a map"):
        decode_body(SubmissionHeader, b"\xc1")
    with pytest.raises(WireRejected, match="exceeds"):
        decode_body(SubmissionHeader, b"\x00" * 100, max_bytes=10)
