"""A node runs for days: generating, scoring and writing batches must not grow its memory.

200 batches through the worker's own generate -> score -> write path on the tiny model (the swarm is
left out: only its run id is read), with resident memory sampled after a warm-up and at the end."""

import gc
from types import SimpleNamespace

import psutil
import pytest

from intellect.node.config import NodeConfig
from intellect.node.engine import TorchEngineConfig, setup_engine
from intellect.node.status import NodeStatus
from intellect.node.worker import Worker
from intellect.protocol.identity import Identity
from intellect.protocol.messages import RunInfo
from intellect.protocol.rollouts import read_rollouts
from intellect.protocol.tasks import TaskConfig


@pytest.mark.slow
def test_200_batches_keep_memory_flat(tmp_path, tiny_model_path):
    identity = Identity.from_seed(b"memory")
    config = NodeConfig(state_dir=tmp_path, run_id="r-1", coordinator_key="ab" * 32,
                        engine=TorchEngineConfig(threads=1, max_batch_size=16))
    worker = Worker(config, identity, SimpleNamespace(run_id="r-1"), fetcher=None, status=NodeStatus())
    worker.engine = setup_engine(config.engine, tiny_model_path)
    worker.tokenizer = worker.engine.tokenizer
    info = RunInfo(run_id="r-1", run_name="r", coordinator_peer_id="in-c",
                   task=TaskConfig(name="arithmetic"), collect_step=0, latest_policy_step=0, async_level=2,
                   prompts_per_batch=4, completions_per_prompt=4, max_new_tokens=16, temperature=1.0,
                   model_config_hash="0" * 64, eos_token_ids=[2])
    process = psutil.Process()

    def batches(n: int) -> None:
        for _ in range(n):
            path = worker.write(worker.generate(info, step=0))
            assert len(read_rollouts(path).rows) == 16
            path.unlink()

    batches(20)  # warm-up: allocator pools, kernels, tokenizer caches
    gc.collect()
    start = process.memory_info().rss
    batches(180)
    gc.collect()
    grown = process.memory_info().rss - start
    worker.close()
    assert grown < 40 * 2**20, f"resident memory grew {grown / 2**20:.1f} MiB over 180 batches"
