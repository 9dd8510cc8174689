"""An accepted batch put straight into a coordinator's ledger and accepted/ folder, as the intake records
one, for tests that drive the policy loop without nodes. Rewards alternate 0, 1 (advantages -1, +1)."""

from __future__ import annotations

from intellect.coordinator.ledger import Submission, Verdict
from intellect.protocol.rollouts import (
    RolloutBatch,
    RolloutMeta,
    RolloutRow,
    SamplingParams,
    content_hash,
    rollouts_to_bytes,
)

NODE = "ab" * 32


def accept_a_batch(c, policy_step: int, train_step: int, prompts: int, n: int, prompt: list[int],
                   output: list[int], temperature: float) -> None:
    """Batch counter 1 of a fake node for `policy_step`, queued for `train_step`: prompts x n rows."""
    meta = RolloutMeta(node_public_key=NODE, run_id=c.run_id, policy_step=policy_step, batch_counter=1,
                       task="arithmetic",
                       sampling=SamplingParams(temperature=temperature, max_tokens=2 * len(output), n=n))
    rows = [RolloutRow(problem_index=i // n, input_tokens=prompt, output_tokens=output,
                       output_logprobs=[-1.0] * len(output), advantage=1.0 if i % 2 else -1.0,
                       reward=float(i % 2), task_reward=float(i % 2), length_penalty=0.0, proof=b"",
                       step=policy_step, target_length=0, finish_reason="length") for i in range(prompts * n)]
    data = rollouts_to_bytes(RolloutBatch(meta=meta, rows=rows))
    path = c.state_dir / "accepted" / f"{content_hash(data)}.parquet"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    c.ledger.record_submission(Submission(content_hash(data), NODE, policy_step, train_step, len(rows),
                                          len(output) * len(rows), str(path), f"{NODE}:{policy_step}:1"),
                               Verdict(True, "accepted"))
