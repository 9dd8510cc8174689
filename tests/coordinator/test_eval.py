"""Held-out evaluation: every task keeps a held-out split out of training, and the coordinator scores
saved policies on it (greedy and mean@k) in a background thread while it goes on training.

The split is checked with the real seeded prompt choice nodes use (`sample_batch` over the task they
build from the announced TaskConfig). The coordinator runs for real (its swarm on 127.0.0.1, ledger,
trainer, publisher); its model is a one-layer Llama built from a config with hand-set weights that
answers "1" to every prompt, so each held-out score is known exactly in advance."""

from __future__ import annotations

import json

import numpy as np
import pytest

from intellect.coordinator.config import CoordinatorConfig
from intellect.coordinator.rules import run_rules
from intellect.protocol.tasks import TaskConfig, TaskDataError, sample_batch, setup_task


def _jsonl(tmp_path) -> str:
    rows = [{"prompt": f"What is {i} * 3?", "answer": str(3 * i)} for i in range(60)]
    rows += rows  # a prompt on two lines is held out on both or on neither
    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f"jsonl:{path}"


SPLITS = {  # (task config fields, expected training problems, expected held-out problems)
    "demo pool": ({"pool": 40, "heldout": 120, "instruction": "Answer with just the number."}, 40, 120),
    "all problems": ({"heldout": 100}, 441 - 100, 100),
    "three operators": ({"max_operand": 5, "operators": "+-*", "heldout": 30}, 3 * 36 - 30, 30),
    "jsonl": ({"heldout": 12}, 2 * (60 - 12), 12),  # every prompt is on two lines, held out once
}


@pytest.mark.parametrize("case", SPLITS)
def test_heldout_problems_never_appear_in_training_batches(case, tmp_path):
    fields, num_train, num_heldout = SPLITS[case]
    config = TaskConfig(**({"name": _jsonl(tmp_path)} if case == "jsonl" else {}) | fields)
    train, heldout = setup_task(config), setup_task(config, "heldout")
    assert (train.num_problems, heldout.num_problems) == (num_train, num_heldout)
    held_prompts = {heldout.problem(i).prompt for i in range(heldout.num_problems)}
    assert len(held_prompts) == num_heldout
    assert not held_prompts & {train.problem(i).prompt for i in range(train.num_problems)}
    # the prompts nodes are given and the coordinator checks: many seeded draws, as nodes make them
    rng = np.random.default_rng(7)
    drawn = set()
    for node_seed, step, counter in zip(rng.integers(0, 2**63, 500), rng.integers(0, 1000, 500),
                                        rng.integers(1, 50, 500), strict=True):
        drawn |= {s.problem_index for s in sample_batch(train, int(node_seed), int(step), int(counter), 16)}
    assert len(drawn) > 0.9 * num_train  # the draws cover the training split...
    assert not held_prompts & {train.problem(i).prompt for i in drawn}  # ...and never a held-out problem
    # the coordinator checks submissions against the same training split nodes draw from
    rules_task = run_rules(CoordinatorConfig(state_dir=tmp_path / "c", task=config), "run").task
    assert [rules_task.problem(i) for i in range(num_train)] == [train.problem(i) for i in range(num_train)]


def test_the_split_is_deterministic_and_leaves_the_demo_pool_as_it_was():
    demo = {"pool": 40, "instruction": "Answer with just the number."}
    before = setup_task(TaskConfig(**demo))
    train = setup_task(TaskConfig(**demo, heldout=120))
    assert [train.problem(i) for i in range(40)] == [before.problem(i) for i in range(40)]
    again = setup_task(TaskConfig(**demo, heldout=120), "heldout")
    first = setup_task(TaskConfig(**demo, heldout=120), "heldout")
    assert [again.problem(i) for i in range(120)] == [first.problem(i) for i in range(120)]
    # without a pool, training keeps every problem that is not held out
    full = setup_task(TaskConfig())
    train, held = setup_task(TaskConfig(heldout=100)), setup_task(TaskConfig(heldout=100), "heldout")
    assert sorted(p.prompt for t in (train, held) for p in map(t.problem, range(t.num_problems))) == \
        sorted(full.problem(i).prompt for i in range(full.num_problems))


def test_a_split_that_does_not_fit_is_refused_in_plain_words(tmp_path):
    with pytest.raises(ValueError, match="heldout must be in"):
        setup_task(TaskConfig(pool=400, heldout=100))  # 441 problems
    with pytest.raises(ValueError, match="no held-out problems: set task.heldout"):
        setup_task(TaskConfig(), "heldout")
    with pytest.raises(TaskDataError, match="leaves no training problems"):
        setup_task(TaskConfig(name=_jsonl(tmp_path), heldout=60))  # 60 distinct prompts
    with pytest.raises(ValueError, match="task.heldout is 0"):
        CoordinatorConfig(state_dir=tmp_path / "c", eval={"every": 5})


# ---------------------------------------------------------------------------- the coordinator's evaluation

EVAL_TASK = {"max_operand": 3, "operators": "+-", "heldout": 8}  # 32 problems, 8 held out
MAX_STEPS, EVERY = 3, 2  # evaluated: policy 0 (before), 2 (every 2 steps) and 3 (the last)


@pytest.fixture(scope="module")
def answers_one(tmp_path_factory, tiny_model_path):
    """A one-layer Llama whose attention and MLP write nothing, so the next token depends on the last
    one only: "1" after any token but "1", EOS after "1". It answers "1" to every prompt, greedy or
    sampled (the logit gap, 160, is far beyond what the sampler's bounded noise can bridge)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    one = tok.convert_tokens_to_ids("1")
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.norm.weight.fill_(1.0)
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight
        embed[:, 1] = 1.0  # every token: e1, normalised to 8 e1
        embed[one, 1], embed[one, 0] = 0.0, 1.0  # "1": 8 e0
        head[one, 1] = 20.0
        head[tok.eos_token_id, 0] = 20.0
    out = tmp_path_factory.mktemp("answers-one")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _accept_a_batch(c, step: int) -> None:
    """An accepted batch of policy `step` for train step `step`, recorded as intake records one."""
    from tests.coordinator.batches import accept_a_batch

    accept_a_batch(c, step, step, 2, 2, [5, 6, 7], [8, 9], temperature=0.6)


@pytest.fixture(scope="module")
def run(tmp_path_factory, answers_one):
    """A real coordinator trained MAX_STEPS steps with eval.every = EVERY. The evaluation of policy 0 is
    held until train step 1 is done: had training waited for it, the hold would time out."""
    import threading

    from intellect.coordinator.runner import start_coordinator

    config = CoordinatorConfig(
        state_dir=tmp_path_factory.mktemp("eval") / "c", run_name="heldout", model=str(answers_one), async_level=1,
        batches_per_step=1, max_steps=MAX_STEPS, threads=1, shard_size=16_000_000,
        rollouts={"prompts_per_batch": 2, "completions_per_prompt": 2, "max_new_tokens": 4},
        task=EVAL_TASK, eval={"every": EVERY, "num_problems": 100, "samples": 3, "batch_size": 8},
        trainer={"lr": 1e-5, "warmup_steps": 0, "optimizer_steps_per_policy_step": 1, "seq_len": 64},
        swarm={"host": "127.0.0.1", "port": 0, "record_ttl_s": 5.0})
    c = start_coordinator(config)
    for step in range(MAX_STEPS):
        _accept_a_batch(c, step)
    trained, held = threading.Event(), {}
    evaluate = c.evaluator.heldout.evaluate

    def held_evaluate(model, policy_step, stop=None):
        if policy_step == 0:
            held["steps_trained_meanwhile"] = trained.wait(120) and len(c.history)
        return evaluate(model, policy_step, stop)

    c.evaluator.heldout.evaluate = held_evaluate
    loop = threading.Thread(target=c.run, kwargs={"on_step": lambda m: m["step"] == 1 and trained.set()})
    try:
        loop.start()
        loop.join(240)
        assert not loop.is_alive(), "the run did not finish"
        yield c, held
    finally:
        c.close()


def _lines(c) -> list[dict]:
    return [json.loads(x) for x in (c.state_dir / "metrics.jsonl").read_text().splitlines()]


def test_eval_results_land_in_metrics_at_the_right_steps(run):
    c, _ = run
    expected = sum(setup_task(TaskConfig(**EVAL_TASK), "heldout").problem(i).answer == "1" for i in range(8)) / 8
    assert 0 < expected < 1  # the model answers "1": right on some held-out problems, wrong on others
    lines = _lines(c)
    assert [m["step"] for m in lines if m.get("kind") != "eval"] == list(range(MAX_STEPS))
    evals = sorted((m for m in lines if m.get("kind") == "eval"), key=lambda m: m["policy_step"])
    assert [m["policy_step"] for m in evals] == [0, 2, 3]  # before, every 2 steps, and the last policy
    for m in evals:
        assert 0.0 <= m["heldout_greedy"] <= 1.0 and 0.0 <= m["heldout_mean_at_k"] <= 1.0
        assert m["heldout_greedy"] == m["heldout_mean_at_k"] == expected == 0.375
        assert (m["num_problems"], m["k"], m["temperature"]) == (8, 3, 0.6)
    assert c.evals == [m for m in lines if m.get("kind") == "eval"]


def test_eval_runs_while_training_continues(run):
    c, held = run
    assert held["steps_trained_meanwhile"] >= 2  # steps 0 and 1 trained while policy 0 was being evaluated
    order = [("eval", m["policy_step"]) if m.get("kind") == "eval" else ("train", m["step"]) for m in _lines(c)]
    assert order.index(("eval", 0)) > order.index(("train", 1))


def test_eval_is_shown_on_the_dashboard_in_metrics_and_in_the_report(run):
    import io

    from rich.console import Console

    from intellect.coordinator.dashboard import metrics_registry, render
    from intellect.coordinator.report import write_report
    from intellect.coordinator.service import Coordinator

    c, _ = run
    registry = metrics_registry(c)
    assert registry.get_sample_value("intellect_heldout_greedy") == 0.375
    assert registry.get_sample_value("intellect_heldout_mean_at_k") == 0.375
    assert registry.get_sample_value("intellect_heldout_policy_step") == 3
    screen = Console(file=io.StringIO(), width=200)
    screen.print(render(c, {}))
    assert "greedy 0.375   mean@3 0.375   (policy 3; policy 0: greedy 0.375)" in screen.file.getvalue()
    write_report(c.state_dir)
    summary = (c.state_dir / "report" / "summary.md").read_text()
    assert "held-out (8 problems never trained on): greedy 0.375 at policy 0 -> 0.375 at policy 3" in summary
    assert f"train steps: {MAX_STEPS}" in summary
    # a restart keeps the eval lines and does not evaluate the last policy again
    again = Coordinator(c.config)
    try:
        assert again.evals == c.evals and len(again.history) == MAX_STEPS
        again._evaluate_if_due(MAX_STEPS)
        assert not again.evaluator.busy()
    finally:
        again.close()


def test_a_pruned_checkpoint_is_skipped_and_the_next_one_evaluated(answers_one, tmp_path, caplog):
    import threading

    from transformers import AutoTokenizer

    from intellect.coordinator.heldout import EvalWorker, HeldoutEval
    from intellect.protocol.model import eos_token_ids

    config = CoordinatorConfig(state_dir=tmp_path / "c", task=EVAL_TASK, eval={"every": 1, "samples": 2})
    tok = AutoTokenizer.from_pretrained(answers_one)
    results = []
    worker = EvalWorker(HeldoutEval(config, tok, eos_token_ids(tok, answers_one)),
                        lambda step: answers_one if step == 2 else tmp_path / "pruned", results.append)
    try:
        worker.submit(1)
        worker.submit(2)
        worker.drain(threading.Event())
    finally:
        worker.close()
    assert [(r.policy_step, r.heldout_greedy, r.heldout_mean_at_k) for r in results] == [(2, 0.375, 0.375)]
    assert "held-out evaluation of policy 1 failed" in caplog.text
