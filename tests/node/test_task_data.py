"""A "jsonl:" run's task data reaches the node through the swarm: the coordinator serves its file as a
blob named in the signed RunInfo (`task_data`), the node fetches it, checks it and builds its task from
that copy, not from the path in the task name (the coordinator's, absent here).

Real hivemind swarms on 127.0.0.1 (coordinator and node), the coordinator's Publisher, the node's
ShardFetcher and Worker with the tiny model's torch engine. (Two nodes and a corrupt peer:
tests/node/test_fetch.py.)"""

from __future__ import annotations

import json

import pytest

from intellect.coordinator.publish import Publisher
from intellect.node.config import NodeConfig
from intellect.node.engine import TorchEngineConfig, setup_engine
from intellect.node.fetch import ShardFetcher
from intellect.node.status import NodeStatus
from intellect.node.worker import Worker, WorkError
from intellect.protocol.identity import Identity
from intellect.protocol.messages import RunInfo, ShardEntry, decode_body, encode_body
from intellect.protocol.swarm import setup_swarm
from intellect.protocol.swarm.config import SwarmConfig
from intellect.protocol.tasks import TaskConfig
from intellect.protocol.wire import run_id_for

pytestmark = pytest.mark.slow  # two swarms and an engine (~15 s)

COORDINATOR = Identity.from_seed(b"task-data-coordinator")
NODE = Identity.from_seed(b"task-data-node")
RUN_ID = run_id_for(COORDINATOR.public_key, "taskdata")


def run_info(task_name: str, entry: ShardEntry) -> RunInfo:
    return RunInfo(run_id=RUN_ID, run_name="taskdata", coordinator_peer_id=COORDINATOR.peer_id,
                   task=TaskConfig(name=task_name), collect_step=0, latest_policy_step=0, async_level=1,
                   prompts_per_batch=2, completions_per_prompt=2, max_new_tokens=4, temperature=1.0,
                   model_config_hash="0" * 64, eos_token_ids=[2], task_data=entry)


def test_the_node_runs_the_file_the_run_announces(tmp_path, tiny_model_path):
    served = tmp_path / "coordinator" / "problems.jsonl"
    served.parent.mkdir()
    served.write_text("".join(json.dumps({"prompt": f"What is {i} times 7?", "answer": str(7 * i)}) + "\n"
                              for i in range(50)))
    coordinator = setup_swarm(SwarmConfig(host="127.0.0.1"), COORDINATOR, RUN_ID, COORDINATOR.public_key)
    swarm = fetcher = None
    try:
        publisher = Publisher(coordinator, COORDINATOR, coordinator.config, tmp_path / "coordinator")
        entry = publisher.publish_data(served)
        info = run_info(f"jsonl:{served}", entry)
        assert decode_body(RunInfo, encode_body(info)).task_data == entry  # it is part of the signed record
        served.rename(served.with_suffix(".gone"))  # the node cannot read the coordinator's path

        config = NodeConfig(state_dir=tmp_path / "node", run_id=RUN_ID, coordinator_key=COORDINATOR.public_key_hex,
                            engine=TorchEngineConfig(threads=1, max_batch_size=4), policy_wait_s=20,
                            swarm=SwarmConfig(host="127.0.0.1", bootstrap=coordinator.visible_addrs()[:2]))
        config.state_dir.mkdir()
        swarm = setup_swarm(config.swarm, NODE, RUN_ID, COORDINATOR.public_key)
        fetcher = ShardFetcher(swarm, config.swarm, config.state_dir / "cache", COORDINATOR.public_key)
        worker = Worker(config, NODE, swarm, fetcher, NodeStatus())
        engine = setup_engine(config.engine, tiny_model_path)
        worker.engine, worker.tokenizer, worker.loaded_step = engine, engine.tokenizer, 0

        local = worker.task_config(info).name.removeprefix("jsonl:")
        assert local.startswith(str(config.state_dir)) and fetcher.stats["data_downloaded"] == 1
        batch = worker.generate(info, 0)
        asked = {engine.tokenizer.decode(r.input_tokens) for r in batch.rows}
        assert all("times 7" in text for text in asked), asked  # prompts from the fetched copy
        worker.generate(info, 0)
        assert fetcher.stats["data_downloaded"] == 1  # held: fetched once
        fetcher.prune()
        assert worker.task_config(info).name == f"jsonl:{local}"  # pruning keeps it

        wrong = ShardEntry(sha256="ab" * 32, size=entry.size)  # a file nobody serves
        worker.config = config.model_copy(update={"policy_wait_s": 3.0})
        with pytest.raises(WorkError, match="could not fetch the run's task data"):
            worker.task_config(run_info(f"jsonl:{served}", wrong))
    finally:
        if fetcher is not None:
            fetcher.close()
        if swarm is not None:
            swarm.close()
        coordinator.close()
