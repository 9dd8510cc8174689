import hashlib

import msgpack
import pytest
from pydantic import ValidationError

from intellect.protocol.delta import DeltaRejected
from intellect.protocol.identity import Identity
from intellect.protocol.manifest import (
    ShardRejected,
    ShardStore,
    add_deltas,
    assemble,
    delta_entry,
    manifest_deltas,
    missing_shards,
    open_manifest,
    rebuild_shard,
    shard_checkpoint,
    sign_manifest,
)
from intellect.protocol.messages import PolicyManifest, ShardEntry, decode_body
from intellect.protocol.wire import WireRejected, run_id_for

COORD = Identity.from_seed(b"coordinator")
RUN = run_id_for(COORD.public_key, "manifest-test")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    folder = tmp_path_factory.mktemp("ckpt")
    LlamaForCausalLM(config).save_pretrained(folder)
    assert (folder / "model.safetensors").exists()
    return folder


def publish(folder, store_dir, shard_size=64 * 1024):
    store = ShardStore(store_dir)
    manifest = shard_checkpoint(folder, store, run_id=RUN, policy_step=3, model_config_hash="0" * 64,
                                shard_size=shard_size)
    return store, manifest, sign_manifest(COORD, manifest)


def test_round_trip_on_real_safetensors(tiny_checkpoint, tmp_path):
    store, manifest, signed = publish(tiny_checkpoint, tmp_path / "origin")
    weights = next(f for f in manifest.files if f.name == "model.safetensors")
    assert len(weights.shards) > 3  # really split
    assert weights.sha256 == hashlib.sha256((tiny_checkpoint / "model.safetensors").read_bytes()).hexdigest()
    received = open_manifest(signed, run_id=RUN, coordinator_key=COORD.public_key)
    assert received == manifest
    # a node with an empty store copies verified shards over, then assembles
    node = ShardStore(tmp_path / "node")
    for entry in missing_shards(received, node):
        node.put(entry, store.get(entry.sha256))
    assert missing_shards(received, node) == []
    out = assemble(received, lambda h: node.path(h) if node.has(h) else None, tmp_path / "step-3")
    for f in received.files:
        assert (out / f.name).read_bytes() == (tiny_checkpoint / f.name).read_bytes()
    from transformers import LlamaForCausalLM

    LlamaForCausalLM.from_pretrained(out)  # it loads


def test_corrupted_shard_is_rejected_on_put_and_on_assembly(tiny_checkpoint, tmp_path):
    store, manifest, _ = publish(tiny_checkpoint, tmp_path / "origin")
    entry = manifest.shards[1]
    good = store.get(entry.sha256)
    bad = bytes([good[0] ^ 1]) + good[1:]
    node = ShardStore(tmp_path / "node")
    with pytest.raises(ShardRejected, match="do not match"):
        node.put(entry, bad)
    with pytest.raises(ShardRejected, match="bytes"):
        node.put(entry, good[:-1])
    assert not node.has(entry.sha256)
    # bytes rotting on disk after verification are caught during assembly, and nothing is published
    store.path(entry.sha256).write_bytes(bad)
    with pytest.raises(ShardRejected, match="corrupted"):
        assemble(manifest, store.path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*"))


def test_forged_manifest_is_rejected(tiny_checkpoint, tmp_path):
    _, manifest, signed = publish(tiny_checkpoint, tmp_path / "origin")
    forged = sign_manifest(Identity.from_seed(b"mallory"), manifest)
    with pytest.raises(WireRejected, match="expected"):
        open_manifest(forged, run_id=RUN, coordinator_key=COORD.public_key)
    with pytest.raises(WireRejected, match="not"):
        open_manifest(signed, run_id=run_id_for(COORD.public_key, "other"), coordinator_key=COORD.public_key)
    bad = manifest.model_copy(update={"files": [manifest.files[0].model_copy(update={"size": 1})]})
    with pytest.raises(WireRejected, match="add up"):
        open_manifest(sign_manifest(COORD, bad), run_id=RUN, coordinator_key=COORD.public_key)


def test_assembly_streams_in_bounded_memory(tmp_path):
    """A 48 MB file passes through assembly without ever being held whole."""
    import os
    import tracemalloc

    folder = tmp_path / "big"
    folder.mkdir()
    with open(folder / "model.safetensors", "wb") as f:
        f.writelines(os.urandom(1 << 20) for _ in range(48))
    store, manifest, _ = publish(folder, tmp_path / "origin", shard_size=4 << 20)
    tracemalloc.start()
    assemble(manifest, store.path, tmp_path / "out")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 << 20, f"assembly peaked at {peak} bytes"


def test_shard_entry_bounds():
    with pytest.raises(ValidationError):
        ShardEntry(sha256="zz", size=1)


# ---- deltas -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """A bf16 checkpoint and the next policy step: a few bf16 words of each tensor moved, the rest
    equal, the config untouched (as after a small-lr optimizer step)."""
    import torch
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("steps")
    gen = torch.Generator().manual_seed(0)
    tensors = {f"layer{i}.weight": torch.randn(64, 1024, generator=gen).to(torch.bfloat16) for i in range(6)}
    folders = []
    for step in (0, 1):
        folder = root / f"step{step}"
        folder.mkdir()
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text('{"model_type": "llama"}')
        folders.append(folder)
        for name, t in tensors.items():  # the update for the next step
            flat = t.view(torch.int16).flatten().clone()
            idx = torch.randint(0, flat.numel(), (flat.numel() // 50,), generator=gen)
            flat[idx] += 1  # one ulp
            tensors[name] = flat.view(torch.bfloat16).view_as(t)
    assert load_file(str(folders[0] / "model.safetensors")).keys() == tensors.keys()
    return folders


def publish_steps(two_steps, store_dir, shard_size=64 * 1024):
    store = ShardStore(store_dir)
    m0, m1 = (shard_checkpoint(folder, store, run_id=RUN, policy_step=step, model_config_hash="0" * 64,
                               shard_size=shard_size) for step, folder in enumerate(two_steps))
    return store, m0, add_deltas(m1, m0, store)


def test_delta_path_equals_full_path_byte_for_byte(two_steps, tmp_path):
    origin, m0, m1 = publish_steps(two_steps, tmp_path / "origin")
    received = open_manifest(sign_manifest(COORD, m1), run_id=RUN, coordinator_key=COORD.public_key)
    assert received == m1 and received.delta_base_step == 0
    changed = [s for s in received.shards if s.sha256 not in {b.sha256 for b in m0.shards}]
    assert changed and all(s.delta is not None for s in changed)  # every changed shard has a delta
    assert all(s.delta is None for s in received.shards if s not in changed)  # config.json did not change
    delta_bytes = sum(s.delta.size for s in changed)
    assert delta_bytes < 0.2 * sum(s.size for s in changed)
    # a node holding step 0 only: shards of step 0, then the deltas; nothing of step 1's shards
    node = ShardStore(tmp_path / "node")
    for s in m0.shards:
        node.put(s, origin.get(s.sha256))
    for d in manifest_deltas(received):
        node.put(delta_entry(d), origin.get(d.sha256))
    for s in missing_shards(received, node):
        rebuild_shard(s, node)
    assert missing_shards(received, node) == []
    via_delta = assemble(received, lambda h: node.path(h) if node.has(h) else None, tmp_path / "delta")
    full = assemble(received, lambda h: origin.path(h) if origin.has(h) else None, tmp_path / "full")
    for f in received.files:
        assert (via_delta / f.name).read_bytes() == (full / f.name).read_bytes() == (two_steps[1] / f.name).read_bytes()


def test_a_delta_that_does_not_rebuild_its_shard_is_refused(two_steps, tmp_path):
    origin, m0, m1 = publish_steps(two_steps, tmp_path / "origin")
    entry = next(s for s in m1.shards if s.delta is not None)
    node = ShardStore(tmp_path / "node")
    base = origin.get(entry.delta.base_sha256)
    node.put(m0.shards[0].model_copy(update={"sha256": entry.delta.base_sha256, "size": len(base)}), base)
    # a delta for another shard, stored under this delta's name (as if the coordinator erred)
    other = next(s for s in m1.shards if s.delta is not None and s.sha256 != entry.sha256)
    (node.root / entry.delta.sha256).write_bytes(origin.get(other.delta.sha256))
    with pytest.raises((ShardRejected, DeltaRejected)):
        rebuild_shard(entry, node)
    assert not node.has(entry.sha256)
    (node.root / entry.delta.sha256).write_bytes(b"not zstd")
    with pytest.raises(DeltaRejected):
        rebuild_shard(entry, node)
    assert not node.has(entry.sha256)


def test_manifest_deltas_are_strictly_checked(two_steps, tmp_path):
    _, _, m1 = publish_steps(two_steps, tmp_path / "origin")

    def opened(manifest):
        return open_manifest(sign_manifest(COORD, manifest), run_id=RUN, coordinator_key=COORD.public_key)

    with pytest.raises(WireRejected, match="base step None"):
        opened(m1.model_copy(update={"delta_base_step": None}))
    with pytest.raises(WireRejected, match="base step 1"):
        opened(m1.model_copy(update={"delta_base_step": 1}))
    f = next(f for f in m1.files if any(s.delta for s in f.shards))
    s = next(s for s in f.shards if s.delta)
    big = s.model_copy(update={"delta": s.delta.model_copy(update={"size": s.size})})
    shards = [big if x is s else x for x in f.shards]
    files = [f.model_copy(update={"shards": shards}) if x is f else x for x in m1.files]
    with pytest.raises(WireRejected, match="delta of"):
        opened(m1.model_copy(update={"files": files}))
    # unknown codecs and extra fields are refused by the schema itself
    raw = m1.model_dump(mode="python")
    raw["files"][0]["shards"][0]["delta"] = {**s.delta.model_dump(), "codec": "bsdiff"}
    with pytest.raises(WireRejected, match="codec"):
        decode_body(PolicyManifest, msgpack.packb(raw, use_bin_type=True))


def test_manifests_from_before_deltas_still_decode(tiny_checkpoint, tmp_path):
    """Nodes keep signed manifests on disk; one written before deltas existed has no delta fields."""
    _, manifest, _ = publish(tiny_checkpoint, tmp_path / "origin")
    raw = manifest.model_dump(mode="python")
    del raw["delta_base_step"]
    for f in raw["files"]:
        for s in f["shards"]:
            del s["delta"]
    assert decode_body(PolicyManifest, msgpack.packb(raw, use_bin_type=True)) == manifest


def test_no_delta_where_the_base_shard_differs_in_size(two_steps, tmp_path):
    store, m0, _ = publish_steps(two_steps, tmp_path / "origin")
    m1 = shard_checkpoint(two_steps[1], store, run_id=RUN, policy_step=1, model_config_hash="0" * 64,
                          shard_size=48 * 1024)  # other cut points: no shard has a base at its place
    assert all(s.delta is None for s in add_deltas(m1, m0, store).shards)
