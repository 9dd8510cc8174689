"""Weight distribution between real peer processes on 127.0.0.1: the happy path, a node killed mid-download,
a peer serving corrupted bytes, task data, the origin leaving (each on both swarm backends, hivemind and
py-libp2p), a forged manifest; plus the cache, progress and deltas."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from swarm_harness import Peers, coordinator_key_hex, make_checkpoint, sha256_of

COORD = "coord-seed"
SHARD_KB = 256


@pytest.fixture(params=["hivemind", "libp2p"])
def peers(tmp_path, request):
    """Peer processes of one swarm backend: every test that takes them runs on both."""
    p = Peers(tmp_path)
    p.backend = request.param
    yield p
    p.close()


@pytest.fixture
def hivemind_peers(tmp_path):
    """For a test with a swarm peer in this (pytest) process, which imports hivemind: py-libp2p cannot be
    imported beside it. (The libp2p store-time rules: tests/protocol/swarm_cases.py.)"""
    p = Peers(tmp_path)
    p.backend = "hivemind"
    yield p
    p.close()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), size_mb=3.0)


def start_origin(peers: Peers, checkpoint: Path, *extra: str) -> dict:
    peers.start("origin", "--role", "origin", "--seed", COORD, "--cache", "origin", "--checkpoint", str(checkpoint),
                "--ready", "origin.ready", "--result", "origin.json", "--shard-kb", str(SHARD_KB),
                "--backend", peers.backend, *extra)
    ready = peers.wait_json(peers.workdir / "origin.ready", 60, "origin")
    peers.wait_json(peers.workdir / "origin.json.published", 30, "origin")
    return ready


def start_node(peers: Peers, name: str, bootstrap: list[str], *extra: str) -> None:
    args = ["--role", "node", "--seed", name, "--coordinator-key", coordinator_key_hex(COORD), "--cache", name,
            "--ready", f"{name}.ready", "--result", f"{name}.json", "--timeout", "90", "--backend", peers.backend]
    for addr in bootstrap:
        args += ["--bootstrap", addr]
    peers.start(name, *args, *extra)


def result(peers: Peers, name: str, timeout: float = 120) -> dict:
    return peers.wait_json(peers.workdir / f"{name}.json", timeout, name)


def assert_same_checkpoint(folder: str, peers: Peers, checkpoint: Path) -> None:
    got = peers.workdir / folder
    assert sha256_of(got / "model.safetensors") == sha256_of(checkpoint / "model.safetensors")
    from safetensors.torch import load_file

    assert set(load_file(str(got / "model.safetensors"))) == {"embed.weight", "head.weight"}


@pytest.mark.slow
def test_nodes_fetch_from_origin_and_from_each_other(peers, checkpoint):
    origin = start_origin(peers, checkpoint, "--max-upload-mbit", "40")
    for name in ("a", "b", "c"):
        start_node(peers, name, origin["addrs"], "--stay")
    results = {name: result(peers, name) for name in ("a", "b", "c")}
    for name, r in results.items():
        assert r["ok"], r
        assert_same_checkpoint(r["folder"], peers, checkpoint)
    assert sum(r["stats"].get("bytes_from_peers", 0) for r in results.values()) > 0
    peers.stop("origin")
    sent = peers.wait_json(peers.workdir / "origin.json", 10)["bytes_sent"]
    size = (checkpoint / "model.safetensors").stat().st_size + (checkpoint / "config.json").stat().st_size
    assert sent <= 1.5 * size, f"origin sent {sent / size:.2f}x the checkpoint"


@pytest.mark.slow
def test_node_killed_mid_download_resumes_without_refetching(peers, checkpoint):
    origin = start_origin(peers, checkpoint, "--max-upload-mbit", "6", "--no-super-seed")
    start_node(peers, "a", origin["addrs"], "--parallel", "2")
    shards = peers.workdir / "a" / "shards"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len([p for p in shards.glob("*") if len(p.name) == 64]) < 3:
        time.sleep(0.05)
    peers.kill("a")  # SIGKILL: node, its DHT process and its daemon
    held = len([p for p in shards.glob("*") if len(p.name) == 64])
    assert 3 <= held < 13, held
    (peers.workdir / "a.json").unlink(missing_ok=True)
    start_node(peers, "a", origin["addrs"], "--parallel", "2")
    r = result(peers, "a")
    assert r["ok"], r
    assert r["held_before"] == held
    assert r["stats"]["shards_downloaded"] == 13 - held  # 12 shards of the safetensors file + config.json
    assert_same_checkpoint(r["folder"], peers, checkpoint)


@pytest.mark.slow
def test_corrupt_peer_is_dropped_and_others_finish(peers, checkpoint):
    origin = start_origin(peers, checkpoint)
    start_node(peers, "evil", origin["addrs"], "--corrupt", "--stay")
    evil = result(peers, "evil")
    assert evil["ok"]
    evil_key = peers.wait_json(peers.workdir / "evil.ready", 5)["key"]
    for name in ("a", "b"):
        start_node(peers, name, origin["addrs"], "--stay")
    for name in ("a", "b"):
        r = result(peers, name)
        assert r["ok"], r
        assert_same_checkpoint(r["folder"], peers, checkpoint)
        assert evil_key in r["bad_peers"]
        # dropped after its first bad shard: at most the downloads already running to it were rejected
        assert 1 <= r["stats"]["shards_rejected"] <= 2


@pytest.mark.slow
def test_task_data_reaches_two_nodes_and_a_corrupted_copy_is_rejected(peers, checkpoint, tmp_path):
    """A "jsonl:" run's data file travels like a shard: named by its hash in the signed RunInfo, fetched
    from the peers that announce it (a corrupt one among them), the coordinator last."""
    data = tmp_path / "problems.jsonl"
    data.write_text("".join(f'{{"prompt": "What is {i} + {i}?", "answer": "{2 * i}"}}\n' for i in range(30_000)))
    origin = start_origin(peers, checkpoint, "--data", str(data))
    entry = peers.wait_json(peers.workdir / "origin.json.published", 5)["data"]
    assert entry["sha256"] == sha256_of(data) and entry["size"] == data.stat().st_size > 2 * SHARD_KB * 1024
    wanted = f"{entry['sha256']}:{entry['size']}"
    start_node(peers, "evil", origin["addrs"], "--corrupt", "--stay", "--data-entry", wanted)
    assert result(peers, "evil")["ok"]
    evil_key = peers.wait_json(peers.workdir / "evil.ready", 5)["key"]
    start_node(peers, "a", origin["addrs"], "--stay", "--data-entry", wanted)
    a = result(peers, "a")  # the corrupt peer is the only one announcing it: tried first, dropped
    assert a["ok"] and sha256_of(peers.workdir / a["folder"]) == entry["sha256"], a
    assert evil_key in a["bad_peers"] and a["stats"]["data_rejected"] == 1, a
    start_node(peers, "b", origin["addrs"], "--stay", "--data-entry", wanted)
    b = result(peers, "b")
    assert b["ok"] and sha256_of(peers.workdir / b["folder"]) == entry["sha256"], b
    assert b["stats"].get("data_rejected", 0) <= 1 and b["stats"]["data_downloaded"] == 1, b


@pytest.mark.slow
def test_origin_leaves_after_one_full_copy(peers, checkpoint):
    origin = start_origin(peers, checkpoint)
    start_node(peers, "a", origin["addrs"], "--stay")
    assert result(peers, "a")["ok"]
    a_addrs = peers.wait_json(peers.workdir / "a.ready", 5)["addrs"]
    peers.stop("origin")
    start_node(peers, "b", origin["addrs"] + a_addrs)  # the first bootstrap address is dead now
    r = result(peers, "b")
    assert r["ok"], r
    assert r["stats"].get("bytes_from_origin", 0) == 0
    assert_same_checkpoint(r["folder"], peers, checkpoint)


@pytest.mark.slow
def test_forged_manifest_is_never_acted_on(hivemind_peers, checkpoint, tmp_path):
    from intellect.protocol.identity import Identity
    from intellect.protocol.manifest import ShardStore, shard_checkpoint, sign_manifest
    from intellect.protocol.swarm import SwarmConfig, setup_swarm
    from intellect.protocol.swarm.keys import manifest_key
    from intellect.protocol.wire import run_id_for

    origin = start_origin(hivemind_peers, checkpoint)
    coordinator = bytes.fromhex(coordinator_key_hex(COORD))
    run_id = run_id_for(coordinator, "swarmtest")
    forger = Identity.from_seed(b"forger")
    swarm = setup_swarm(SwarmConfig(host="127.0.0.1", bootstrap=origin["addrs"]), forger, run_id, coordinator)
    try:
        manifest = shard_checkpoint(checkpoint, ShardStore(tmp_path / "forged"), run_id=run_id, policy_step=2,
                                    model_config_hash="0" * 64, shard_size=SHARD_KB * 1024)
        signed = sign_manifest(forger, manifest)
        assert not swarm.publish(manifest_key(2), signed, 60)  # refused by every DHT it would be stored in
        start_node(hivemind_peers, "a", origin["addrs"], "--step", "2", "--timeout", "4")
        r = result(hivemind_peers, "a")
        assert not r["ok"] and "no manifest for step 2" in r["error"]
        assert r["stats"].get("bytes_downloaded", 0) == 0
        assert not (hivemind_peers.workdir / "a" / "steps" / "2").exists()
    finally:
        swarm.close()


def test_holders_reached_directly_are_picked_before_those_behind_a_relay():
    """_pick: connected or direct-hinted holders first, then those that announced only a relay circuit, then
    the rest; a relayed holder takes the shard when every direct one is busy."""
    from types import SimpleNamespace

    from intellect.node.fetch import FetchTuning, ShardFetcher, _Job, _PickState
    from intellect.protocol.messages import ShardEntry
    from intellect.protocol.swarm.addr_book import AddrBook

    direct, relayed, unknown, connected, me = (bytes([i]) * 32 for i in range(1, 6))
    book = AddrBook()
    book.note(direct, ["/ip4/198.18.0.5/tcp/4001"])
    book.note(relayed, ["/ip4/198.18.0.10/tcp/4001/p2p/12D3KooWPeuigMJXMh8hCPQxjaB5b9Gu6vBisyyeF6AbP9NkFqSX/p2p-circuit"])
    fetcher = ShardFetcher.__new__(ShardFetcher)
    fetcher.swarm = SimpleNamespace(addr_book=book, identity=SimpleNamespace(public_key=me))
    fetcher.tuning, fetcher.coordinator_key, fetcher.bad_peers = FetchTuning(per_peer=1), bytes(32), {}
    entry = ShardEntry(sha256="ab" * 32, size=1)

    def picked(holders: list[bytes], running=()) -> bytes:
        state = _PickState(holders={entry.sha256: holders}, connected={connected})
        return fetcher._pick({entry.sha256: entry}, list(running), state).peer

    assert {picked([unknown, relayed, direct]) for _ in range(20)} == {direct}
    assert {picked([unknown, relayed, connected]) for _ in range(20)} == {connected}
    assert {picked([unknown, relayed]) for _ in range(20)} == {relayed}
    assert {picked([unknown]) for _ in range(5)} == {unknown}
    other = ShardEntry(sha256="cd" * 32, size=1)
    assert picked([relayed, direct], [_Job(other, direct, False, other)]) == relayed  # direct is at per_peer


@pytest.mark.slow
def test_cache_keeps_last_steps_and_reports_progress(tmp_path):
    """In-process coordinator and node swarms (each with its own DHT process and daemon)."""
    from intellect.coordinator.publish import Publisher
    from intellect.node.fetch import FetchTuning, ShardFetcher
    from intellect.protocol.identity import Identity
    from intellect.protocol.swarm import SwarmConfig, setup_swarm
    from intellect.protocol.wire import run_id_for

    coord, node = Identity.from_seed(b"c"), Identity.from_seed(b"n")
    run_id = run_id_for(coord.public_key, "cache")
    origin_swarm = setup_swarm(SwarmConfig(host="127.0.0.1"), coord, run_id, coord.public_key)
    config = SwarmConfig(host="127.0.0.1", bootstrap=origin_swarm.visible_addrs(), cache_steps=2)
    node_swarm = setup_swarm(config, node, run_id, coord.public_key)
    publisher = Publisher(origin_swarm, coord, SwarmConfig(host="127.0.0.1", cache_steps=5), tmp_path / "coord")
    seen = []
    fetcher = ShardFetcher(node_swarm, config, tmp_path / "cache", coord.public_key,
                           tuning=FetchTuning(shard_timeout_s=20), progress=seen.append)
    try:
        for step in (1, 2, 3):
            publisher.publish(make_checkpoint(tmp_path / f"ck{step}", 0.5, seed=step), step, shard_size=64 * 1024)
            out = fetcher.fetch(step, timeout_s=60)
            assert sha256_of(out / "model.safetensors") == sha256_of(tmp_path / f"ck{step}" / "model.safetensors")
        assert sorted(p.name for p in (tmp_path / "cache" / "steps").iterdir()) == ["2", "3"]
        from intellect.protocol.manifest import manifest_deltas

        manifests = [fetcher.manifest(step)[0] for step in (2, 3)]
        wanted = {s.sha256 for m in manifests for s in m.shards} | {d.sha256 for m in manifests
                                                                    for d in manifest_deltas(m)}
        assert fetcher.store.held() == wanted  # the shards and the deltas (served too) of the kept steps
        assert seen and seen[-1].bytes_done == seen[-1].bytes_total and seen[-1].rate_bytes_per_s > 0
        fetcher.config = config.model_copy(update={"max_cache_bytes": 1})
        fetcher.prune(keep_step=3)  # over the disk cap: only the step in use survives
        assert sorted(p.name for p in (tmp_path / "cache" / "steps").iterdir()) == ["3"]
    finally:
        fetcher.close()
        publisher.close()
        node_swarm.close()
        origin_swarm.close()


# ---- deltas: in-process origin and node swarms (each with its own DHT process and daemon) -------------


def make_policy_steps(folder: Path, size_mb: float = 1.0, num_steps: int = 2) -> list[Path]:
    """bf16 checkpoints of consecutive policy steps: each moves 2% of the weights by one bf16 ulp."""
    import json

    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(1)
    numel = int(size_mb * 1e6 / 2)
    tensors = {"embed.weight": torch.randn(numel // 2, generator=gen).to(torch.bfloat16),
               "head.weight": torch.randn(numel - numel // 2, generator=gen).to(torch.bfloat16)}
    folders = []
    for step in range(1, num_steps + 1):
        out = folder / f"step{step}"
        out.mkdir(parents=True)
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        (out / "config.json").write_text(json.dumps({"numel": numel}))
        folders.append(out)
        for name, t in tensors.items():
            words = t.view(torch.int16).clone()
            words[torch.randint(0, numel // 2, (numel // 100,), generator=gen)] += 1
            tensors[name] = words.view(torch.bfloat16)
    return folders


class DeltaSwarm:
    """A publishing origin and any number of fetching nodes, all in this process."""

    def __init__(self, tmp_path: Path) -> None:
        from intellect.coordinator.publish import Publisher
        from intellect.protocol.identity import Identity
        from intellect.protocol.swarm import SwarmConfig, setup_swarm
        from intellect.protocol.wire import run_id_for

        self.tmp_path = tmp_path
        self.coord = Identity.from_seed(b"delta-coord")
        self.run_id = run_id_for(self.coord.public_key, "delta")
        self.origin = setup_swarm(SwarmConfig(host="127.0.0.1"), self.coord, self.run_id, self.coord.public_key)
        self.publisher = Publisher(self.origin, self.coord, SwarmConfig(host="127.0.0.1"), tmp_path / "coord")
        self.nodes: dict = {}

    def node(self, name: str, server_class=None):
        from intellect.node.fetch import FetchTuning, ShardFetcher
        from intellect.protocol.identity import Identity
        from intellect.protocol.manifest import ShardStore
        from intellect.protocol.swarm import SwarmConfig, setup_swarm

        config = SwarmConfig(host="127.0.0.1", bootstrap=self.origin.visible_addrs())
        swarm = setup_swarm(config, Identity.from_seed(name.encode()), self.run_id, self.coord.public_key)
        cache = self.tmp_path / name
        server = server_class(ShardStore(cache / "shards")) if server_class else None
        fetcher = ShardFetcher(swarm, config, cache, self.coord.public_key, server=server,
                               tuning=FetchTuning(shard_timeout_s=20))
        self.nodes[name] = (swarm, fetcher)
        return fetcher

    def wait_announced(self, step: int, holder, shas: set[str], timeout: float = 30) -> None:
        """Until the DHT shows `holder` announcing every one of `shas` for `step`."""
        from intellect.protocol.messages import ShardAnnounce, decode_body
        from intellect.protocol.swarm.keys import shards_key

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for envelope in self.origin.read(shards_key(step)):
                if envelope.sender == holder and shas <= set(decode_body(ShardAnnounce, envelope.body).shard_sha256s):
                    return
            time.sleep(0.2)
        raise AssertionError(f"step {step}: holder never announced its {len(shas)} blobs")

    def close(self) -> None:
        for swarm, fetcher in self.nodes.values():
            fetcher.close()
            swarm.close()
        self.publisher.close()
        self.origin.close()


@pytest.fixture
def delta_swarm(tmp_path):
    s = DeltaSwarm(tmp_path)
    yield s
    s.close()


def changed_shards(fetcher, step: int) -> list:
    new, _ = fetcher.manifest(step)
    old = {s.sha256 for s in fetcher.manifest(step - 1)[0].shards}
    return [s for s in new.shards if s.sha256 not in old]


@pytest.mark.slow
def test_delta_path_equals_full_path_and_peers_serve_deltas(delta_swarm, tmp_path):
    steps = make_policy_steps(tmp_path / "policies")
    a, b = delta_swarm.node("a"), delta_swarm.node("b")
    delta_swarm.publisher.publish(steps[0], 1, shard_size=64 * 1024)
    for node in (a, b):
        node.fetch(1, timeout_s=60)
    manifest = delta_swarm.publisher.publish(steps[1], 2, shard_size=64 * 1024)
    assert manifest.delta_base_step == 1

    before = dict(a.stats)
    via_delta = a.fetch(2, timeout_s=60)
    got = {k: a.stats[k] - before.get(k, 0) for k in a.stats}
    changed = changed_shards(a, 2)
    assert len(changed) >= 10 and all(s.delta is not None for s in changed)
    assert got["shards_from_delta"] == len(changed) and got.get("shards_downloaded", 0) == 0
    assert got["bytes_downloaded"] == got["delta_bytes"] == sum(s.delta.size for s in changed)
    assert got["bytes_downloaded"] < 0.2 * sum(s.size for s in changed)

    c = delta_swarm.node("c")  # holds no step 1: fetches whole shards
    full = c.fetch(2, timeout_s=60)
    assert c.stats.get("shards_from_delta", 0) == 0 and c.stats.get("delta_bytes", 0) == 0
    assert c.stats["shards_downloaded"] == len({s.sha256 for s in manifest.shards})
    for f in ("model.safetensors", "config.json"):
        assert (via_delta / f).read_bytes() == (full / f).read_bytes() == (steps[1] / f).read_bytes()

    # the origin stops serving: b (holding step 1) gets the deltas from a, who announced them
    delta_swarm.wait_announced(2, delta_swarm.nodes["a"][0].identity.public_key, {s.delta.sha256 for s in changed})
    delta_swarm.publisher.server.disallow(delta_swarm.publisher.store.held())
    from_peer = b.fetch(2, timeout_s=60)
    assert b.stats["shards_from_delta"] == len(changed) and b.stats.get("bytes_from_origin", 0) == 0
    assert b.stats["delta_bytes"] == sum(s.delta.size for s in changed)
    assert sha256_of(from_peer / "model.safetensors") == sha256_of(steps[1] / "model.safetensors")


@pytest.mark.slow
def test_corrupted_delta_is_refused_and_a_rotten_base_falls_back_to_the_shard(delta_swarm, tmp_path):
    from fetch_worker import CorruptShardServer

    steps = make_policy_steps(tmp_path / "policies")
    a = delta_swarm.node("a")
    delta_swarm.publisher.publish(steps[0], 1, shard_size=64 * 1024)
    a.fetch(1, timeout_s=60)
    evil = delta_swarm.node("evil", CorruptShardServer)  # after a's first fetch: a has not met it yet
    evil.fetch(1, timeout_s=60)
    delta_swarm.publisher.publish(steps[1], 2, shard_size=64 * 1024)
    evil.fetch(2, timeout_s=60)  # it holds the deltas now, and serves them with a flipped byte
    changed = changed_shards(a, 2)
    evil_key = delta_swarm.nodes["evil"][0].identity.public_key
    delta_swarm.wait_announced(2, evil_key, {s.delta.sha256 for s in changed})
    rotten = changed[0]  # a's copy of this shard's base rots on disk: its delta cannot rebuild it
    base = a.store.path(rotten.delta.base_sha256)
    base.write_bytes(bytes([base.read_bytes()[0] ^ 1]) + base.read_bytes()[1:])

    before = dict(a.stats)
    out = a.fetch(2, timeout_s=90)
    got = {k: a.stats[k] - before.get(k, 0) for k in a.stats}
    assert sha256_of(out / "model.safetensors") == sha256_of(steps[1] / "model.safetensors")
    assert evil_key in a.bad_peers
    assert got.get("deltas_rejected", 0) >= 1  # its deltas are the first thing a asks it for
    assert got.get("deltas_rejected", 0) + got.get("shards_rejected", 0) <= 2  # dropped after its first
    assert got["deltas_unusable"] == 1 and got["delta_fallbacks"] == 1
    assert got["shards_downloaded"] == 1 and got["shards_from_delta"] == len(changed) - 1
