import hashlib

import pytest

from intellect.protocol.identity import Identity
from intellect.protocol.manifest import (
    ShardRejected,
    ShardStore,
    assemble,
    missing_shards,
    open_manifest,
    shard_checkpoint,
    sign_manifest,
)
from intellect.protocol.messages import ShardEntry
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
        for _ in range(48):
            f.write(os.urandom(1 << 20))
    store, manifest, _ = publish(folder, tmp_path / "origin", shard_size=4 << 20)
    tracemalloc.start()
    assemble(manifest, store.path, tmp_path / "out")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 << 20, f"assembly peaked at {peak} bytes"


def test_shard_entry_bounds():
    with pytest.raises(Exception):
        ShardEntry(sha256="zz", size=1)
