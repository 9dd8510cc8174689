"""One EOS set per run, from the policy folder (tokenizer EOS + generation_config.json's eos_token_id
list, as Llama-3-style models have), announced in RunInfo, stopped on by the node's engine and
checked by intake.

The policy is the tiny random model with a second EOS id in generation_config.json, made likely: a
constant added to one embedding dimension of every token dominates the final hidden state, and the
second id gets a little more of it, so its logit stands ~9 above the rest (tied embeddings: the same
rows are the output head) and most completions end on it within 24 tokens. A coordinator in this
process and one `intellect-node join` process; every batch must be accepted.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from intellect.protocol.identity import Identity
from intellect.protocol.rollouts import read_rollouts
from tests.coordinator.procs import NODE_ENV, Procs, node_cmd, wait_while_alive

pytestmark = pytest.mark.slow  # a coordinator and a node process (~1-2 minutes)

SECOND_EOS = 30000  # an ordinary word piece of the SmolLM2 vocabulary, not an end-of-turn token
BATCHES = 2


def multi_eos_model(src: Path, out: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src)
    with torch.no_grad():
        embeddings = model.get_input_embeddings().weight
        embeddings[:, 0] += 1.0
        embeddings[SECOND_EOS, 0] += 1.1
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, SECOND_EOS]
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_path):
    from intellect.coordinator.config import CoordinatorConfig
    from intellect.coordinator.runner import start_coordinator

    tmp = tmp_path_factory.mktemp("eos")
    model = multi_eos_model(tiny_model_path, tmp / "multi-eos")
    assert json.loads((model / "generation_config.json").read_text())["eos_token_id"][1] == SECOND_EOS
    coordinator = start_coordinator(CoordinatorConfig(
        state_dir=tmp / "coordinator", run_name="eos", model=str(model), async_level=1,
        batches_per_step=10_000, threads=1, shard_size=16_000_000,
        rollouts={"prompts_per_batch": 4, "completions_per_prompt": 4, "max_new_tokens": 24, "temperature": 1.0},
        task={"name": "arithmetic", "max_operand": 20, "operators": "+"},
        trainer={"temperature": 1.0}, swarm={"host": "127.0.0.1", "port": 0, "record_ttl_s": 600.0},
        intake={"eos_min_prob": 1e-3}))
    procs = Procs(tmp)
    try:
        node_dir = tmp / "node"
        procs.start("node", node_cmd(tmp / "coordinator" / "run.toml", node_dir, "--max-batches", str(BATCHES)),
                    env=NODE_ENV)
        verdicts = node_dir / "verdicts.jsonl"
        wait_while_alive(procs, lambda: verdicts.exists() and len(verdicts.read_text().splitlines()) >= BATCHES,
                         300, "the node's verdicts", "node")
        assert procs.wait_exit("node", 120) == 0, procs.tails("node")
        yield coordinator, node_dir
    finally:
        procs.close()
        coordinator.close()


def test_run_info_announces_the_policy_folders_eos_set(run):
    from intellect.protocol.model import eos_token_ids

    coordinator, _ = run
    announced = coordinator.run_info().eos_token_ids
    assert {coordinator.tokenizer.eos_token_id, SECOND_EOS} <= set(announced)
    assert announced == sorted(eos_token_ids(coordinator.tokenizer, coordinator.base_dir))
    assert coordinator.intake.ctx.eos_ids == frozenset(announced)


def test_honest_node_ending_on_the_second_eos_is_accepted(run):
    coordinator, node_dir = run
    lines = [json.loads(x) for x in (node_dir / "verdicts.jsonl").read_text().splitlines()]
    assert [v["reason"] for v in lines] == ["accepted"] * BATCHES, lines
    key = Identity.from_pem((node_dir / "node_key.pem").read_bytes()).public_key_hex
    endings = []
    for v in lines:
        batch = read_rollouts(coordinator.state_dir / "accepted" / f"{v['file_sha256']}.parquet")
        assert batch.meta.node_public_key == key
        endings += [row.output_tokens[-1] for row in batch.rows if row.finish_reason == "stop"]
    assert endings.count(SECOND_EOS) >= 4, endings  # the node stopped on the second id, and intake agreed
