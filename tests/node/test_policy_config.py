"""A node runs only the model the run announces: a fetched policy whose config.json does not hash to the
run's `model_config_hash` is refused in plain words, before any engine loads it.

Real parts: the coordinator's `Publisher` and the node's `ShardFetcher` on two in-process swarms (each
with its own DHT process and daemon), the tiny model's folder as policy 0 and a copy with one more
layer in its config.json as policy 1, and a real `Worker` whose `fetch_policy` is what is tested."""

from __future__ import annotations

import json
import shutil

import pytest

from intellect.coordinator.publish import Publisher
from intellect.node.config import NodeConfig
from intellect.node.engine import TorchEngineConfig
from intellect.node.fetch import FetchTuning, ShardFetcher
from intellect.node.status import NodeStatus
from intellect.node.worker import Worker, WorkError
from intellect.protocol.identity import Identity
from intellect.protocol.messages import RunInfo
from intellect.protocol.model import model_config_hash
from intellect.protocol.swarm import SwarmConfig, setup_swarm
from intellect.protocol.tasks import TaskConfig
from intellect.protocol.wire import run_id_for

COORD, NODE = Identity.from_seed(b"config-coordinator"), Identity.from_seed(b"config-node")
RUN_ID = run_id_for(COORD.public_key, "config")


def test_a_policy_of_another_model_is_refused_and_the_announced_one_runs(tmp_path, tiny_model_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_model_path, other)
    config = json.loads((other / "config.json").read_text())
    config["num_hidden_layers"] += 1  # still loads (the new layer starts random): only the hash tells
    (other / "config.json").write_text(json.dumps(config))

    origin = setup_swarm(SwarmConfig(host="127.0.0.1"), COORD, RUN_ID, COORD.public_key)
    swarm_config = SwarmConfig(host="127.0.0.1", bootstrap=origin.visible_addrs())
    node_swarm = setup_swarm(swarm_config, NODE, RUN_ID, COORD.public_key)
    publisher = Publisher(origin, COORD, SwarmConfig(host="127.0.0.1"), tmp_path / "coordinator")
    fetcher = ShardFetcher(node_swarm, swarm_config, tmp_path / "cache", COORD.public_key,
                           tuning=FetchTuning(shard_timeout_s=20))
    node_config = NodeConfig(state_dir=tmp_path / "node", run_id=RUN_ID, coordinator_key=COORD.public_key_hex,
                             engine=TorchEngineConfig(threads=1, max_batch_size=4), policy_wait_s=60)
    worker = Worker(node_config, NODE, node_swarm, fetcher, NodeStatus())
    try:
        publisher.publish(tiny_model_path, 0, shard_size=1 << 20)
        publisher.publish(other, 1, shard_size=1 << 20)
        info = RunInfo(run_id=RUN_ID, run_name="config", coordinator_peer_id=COORD.peer_id,
                       task=TaskConfig(name="arithmetic"), collect_step=1, latest_policy_step=1, async_level=1,
                       prompts_per_batch=1, completions_per_prompt=2, max_new_tokens=4, temperature=1.0,
                       model_config_hash=model_config_hash(tiny_model_path), eos_token_ids=[2])

        with pytest.raises(WorkError, match="policy step 1 is a different model than the run announces"):
            worker.fetch_policy(info)
        assert worker.engine is None and worker.loaded_step is None and worker.status.policy_step is None

        assert worker.fetch_policy(info.model_copy(update={"latest_policy_step": 0})) == 0
        assert worker.engine is not None and worker.status.policy_step == 0
    finally:
        worker.close()
        fetcher.close()
        publisher.close()
        node_swarm.close()
        origin.close()
