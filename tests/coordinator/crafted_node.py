"""A node process that makes dishonest submissions, for tests/coordinator/test_intake.py.

It is a real node: it joins the run's swarm with its own key, reads the signed run info, fetches the
policy shards and generates with the torch engine through `Worker`, as `intellect-node join` does.
Each case then tampers with its honest batch before the file is written and signed. Every case signs
with a key of its own (`Identity.from_seed(b"case:" + name)`), so one case's strikes never ban another.

Cases listed in --over-swarm are submitted over the swarm by `Worker.submit` (bad_signature_swarm by a
raw `swarm.call`); their signed verdicts go into the result. The others are written as signed
submissions (`<case>.<i>.bin`, in signing order: the coordinator's replay guard wants a sender's
sequence numbers to grow) for the test to hand to the coordinator when it chooses.

  python crafted_node.py --run-file RUN.toml --state-dir DIR --wrong-model TINY_SEED1_DIR \
      --result result.json [--over-swarm honest_swarm,forged_reward,...]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
import tomllib
from pathlib import Path

import numpy as np

from intellect.node.config import NodeConfig
from intellect.node.engine import SamplingParams, TorchEngineConfig, setup_engine
from intellect.node.fetch import ShardFetcher
from intellect.node.status import NodeStatus
from intellect.node.worker import Worker, WorkError
from intellect.protocol.identity import Identity
from intellect.protocol.messages import SUBMIT_RPC, SubmissionHeader, Verdict, decode_body, encode_submission
from intellect.protocol.rollouts import RolloutBatch, read_rollouts, rollouts_to_bytes
from intellect.protocol.swarm import SwarmConfig, setup_swarm
from intellect.protocol.tasks import completion_reward, group_advantages, setup_task
from intellect.protocol.toploc import build_chunk_proofs, decode_chunks
from intellect.protocol.toploc_torch import prefill_final_norm, verify_completions
from intellect.protocol.wire import MessageKind, open_envelope, seal

NUM_FALSE_SIGNATURES = 4  # bad signatures claiming the victim's key: more than ban_after_failures
NUM_STRIKES = 3  # = the test's ban_after_failures


def case_key(name: str) -> Identity:
    return Identity.from_seed(b"case:" + name.encode())


class CraftedNode:
    def __init__(self, args: argparse.Namespace) -> None:
        run = tomllib.loads(Path(args.run_file).read_text())
        self.root = Path(args.state_dir)
        self.config = NodeConfig(state_dir=self.root / "main", run_id=run["run_id"],
                                 coordinator_key=run["coordinator_key"],
                                 swarm=SwarmConfig(host="127.0.0.1", bootstrap=run["bootstrap"]),
                                 engine=TorchEngineConfig(threads=1), submit_timeout_s=120, policy_wait_s=120)
        identity = Identity.from_seed(b"crafted-node")
        self.swarm = setup_swarm(self.config.swarm, identity, self.config.run_id, self.config.coordinator_public_key)
        self.fetcher = ShardFetcher(self.swarm, self.config.swarm, self.config.state_dir / "cache",
                                    self.config.coordinator_public_key)
        self.base = Worker(self.config, identity, self.swarm, self.fetcher, NodeStatus())
        self.info = self._run_info()
        self.step = self.base.fetch_policy(self.info)
        self.task = setup_task(self.info.task)
        self.wrong_engine = setup_engine(TorchEngineConfig(threads=1), args.wrong_model)
        self.over_swarm = set(filter(None, args.over_swarm.split(",")))
        self.result: dict = {"policy_step": self.step, "node_key": identity.public_key_hex, "cases": {}}
        self.files: list[dict] = []

    def _run_info(self):
        deadline = time.monotonic() + 120
        while True:
            try:
                return self.base.follow_policy()
            except WorkError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)

    # ------------------------------------------------------------------ node code, one key per case

    def worker(self, case: str, engine=None) -> Worker:
        config = self.config.model_copy(update={"state_dir": self.root / case})
        config.state_dir.mkdir(parents=True, exist_ok=True)
        w = Worker(config, case_key(case), self.swarm, self.fetcher, NodeStatus())
        w.engine, w.tokenizer, w.loaded_step = engine or self.base.engine, self.base.tokenizer, self.base.loaded_step
        return w

    def generate(self, w: Worker, info=None, step: int | None = None) -> RolloutBatch:
        return w.generate(info or self.info, self.step if step is None else step)

    def rescore(self, batch: RolloutBatch) -> RolloutBatch:
        """Rewards and advantages recomputed for the (tampered) tokens, as a careful cheater would."""
        n = self.info.completions_per_prompt
        rows, rewards = [], []
        for r in batch.rows:
            text = self.base.tokenizer.decode(r.output_tokens, skip_special_tokens=True)
            reward, task_reward, penalty = completion_reward(self.task, self.info.task, self.task.problem(r.problem_index),
                                                             text, r.target_length, len(r.output_tokens))
            rows.append(dataclasses.replace(r, reward=reward, task_reward=task_reward, length_penalty=penalty))
            rewards.append(reward)
        adv = group_advantages(np.array(rewards, dtype=np.float32).reshape(-1, n)).reshape(-1)
        return dataclasses.replace(batch, rows=[dataclasses.replace(r, advantage=float(a)) for r, a in zip(rows, adv)])

    def signed(self, w: Worker, data: bytes, batch: RolloutBatch, run_id: str | None = None) -> bytes:
        """What `Worker.submit` sends for a file (the header is computed from `batch`, so that a
        malformed file can still be described)."""
        header = SubmissionHeader(policy_step=batch.meta.policy_step, batch_counter=batch.meta.batch_counter,
                                  num_completions=len(batch.rows), num_tokens=batch.num_output_tokens,
                                  file_sha256=hashlib.sha256(data).hexdigest(), file_size=len(data))
        return seal(w.identity, MessageKind.SUBMISSION, run_id or self.swarm.run_id, encode_submission(header, data))

    def emit(self, case: str, w: Worker, batch: RolloutBatch, *, data: bytes | None = None,
             run_id: str | None = None, corrupt_signature: bool = False) -> None:
        """Sign and keep (or, for swarm cases, send) one submission of `case`."""
        entry = self.result["cases"].setdefault(case, {"key": w.identity.public_key_hex, "files": [], "verdicts": []})
        if case in self.over_swarm and data is None and run_id is None and not corrupt_signature:
            verdict = w.submit(w.write(batch), self.info)
            entry["verdicts"].append(verdict.model_dump())
            return
        envelope = self.signed(w, rollouts_to_bytes(batch) if data is None else data, batch, run_id)
        if corrupt_signature:
            envelope = envelope[:-1] + bytes([envelope[-1] ^ 0x01])  # the signature is the last field
        if case in self.over_swarm:
            answer = self.swarm.call(self.config.coordinator_public_key, SUBMIT_RPC, envelope, timeout=120)
            signed = open_envelope(answer, run_id=self.swarm.run_id, kinds={MessageKind.VERDICT},
                                   expected_sender=self.config.coordinator_public_key)
            entry["verdicts"].append(decode_body(Verdict, signed.body).model_dump())
            return
        path = self.root / f"{case}.{len(entry['files'])}.bin"
        path.write_bytes(envelope)
        entry["files"].append(str(path))

    # ------------------------------------------------------------------ the cases

    def run(self) -> None:
        for name in CASES:
            getattr(self, f"case_{name}")(name)

    def case_honest_swarm(self, case: str) -> None:
        w = self.worker(case)
        self.emit(case, w, self.generate(w))

    def case_wrong_model(self, case: str) -> None:
        """Sampled from another model (same architecture, another random init), claiming the log-probs
        the real policy gives those tokens (one prefill): only the proofs can tell."""
        w = self.worker(case, engine=self.wrong_engine)
        batch = self.generate(w)
        checks = verify_completions(self.base.engine.model, [r.input_tokens for r in batch.rows],
                                    [r.output_tokens for r in batch.rows], [r.proof for r in batch.rows],
                                    temperature=self.info.temperature)
        rows = [dataclasses.replace(r, output_logprobs=c.token_logprobs) for r, c in zip(batch.rows, checks)]
        self.emit(case, w, dataclasses.replace(batch, rows=rows))

    def case_edited_tokens(self, case: str) -> None:
        """After proving, rewrite completion 0 (same length) to end in the right answer (reward 1),
        with log-probs that match the policy: only the proof can tell.
        (One edited token is not enough to fail TOPLOC on the tiny model: a chunk tolerates 38 of 128
        exponent mismatches, and a near-uniform policy gives every token the same probability.)"""
        w = self.worker(case)
        batch = self.generate(w)
        row = batch.rows[0]
        tok = self.base.tokenizer
        answer = tok(f" = {self.task.problem(row.problem_index).answer}", add_special_tokens=False)["input_ids"]
        filler = tok(" so", add_special_tokens=False)["input_ids"][0]
        # a completion that stopped keeps its EOS last (else the termination check, not the proof, catches it)
        end = row.output_tokens[-1:] if row.finish_reason == "stop" else []
        tokens = [filler] * (len(row.output_tokens) - len(answer) - len(end)) + answer + end
        # a careful cheater also claims the policy's own log-probs for the new tokens (one prefill)
        logprobs = verify_completions(self.base.engine.model, [row.input_tokens], [tokens], [row.proof],
                                      temperature=self.info.temperature)[0].token_logprobs
        rows = [dataclasses.replace(row, output_tokens=tokens, output_logprobs=logprobs)] + batch.rows[1:]
        edited = self.rescore(dataclasses.replace(batch, rows=rows))
        assert edited.rows[0].task_reward == 1.0
        self.emit(case, w, edited)

    def case_swapped_proofs(self, case: str) -> None:
        w = self.worker(case)
        batch = self.generate(w)
        rows = list(batch.rows)
        # two completions whose proofs have the same length, so the swap passes the size check
        i, j = next((i, j) for i in range(len(rows)) for j in range(i + 1, len(rows))
                    if len(rows[i].proof) == len(rows[j].proof) and rows[i].proof != rows[j].proof)
        rows[i], rows[j] = (dataclasses.replace(rows[i], proof=rows[j].proof),
                            dataclasses.replace(rows[j], proof=rows[i].proof))
        self.emit(case, w, dataclasses.replace(batch, rows=rows))

    def _forge_reward(self, batch: RolloutBatch) -> RolloutBatch:
        """Claim full marks for completion 0 (advantages made consistent with the claim)."""
        n = self.info.completions_per_prompt
        rows = [dataclasses.replace(batch.rows[0], reward=batch.rows[0].reward + 1.0, task_reward=1.0)] + batch.rows[1:]
        adv = group_advantages(np.array([r.reward for r in rows], dtype=np.float32).reshape(-1, n)).reshape(-1)
        return dataclasses.replace(batch, rows=[dataclasses.replace(r, advantage=float(a)) for r, a in zip(rows, adv)])

    def case_forged_reward(self, case: str) -> None:
        w = self.worker(case)
        self.emit(case, w, self._forge_reward(self.generate(w)))

    def case_forged_advantage(self, case: str) -> None:
        w = self.worker(case)
        batch = self.generate(w)
        rows = [dataclasses.replace(batch.rows[0], advantage=batch.rows[0].advantage + 1.5)] + batch.rows[1:]
        self.emit(case, w, dataclasses.replace(batch, rows=rows))

    def case_cherry_picked(self, case: str) -> None:
        """Generate batch 5 (other prompts) and submit it as batch 1."""
        w = self.worker(case)
        w.counters_path.write_text(json.dumps({str(self.step): 4}))
        batch = self.generate(w)
        assert batch.meta.batch_counter == 5
        self.emit(case, w, dataclasses.replace(batch, meta=batch.meta.model_copy(update={"batch_counter": 1})))

    def case_bad_target_length(self, case: str) -> None:
        """Claim each completion's own length as its target: no length penalty."""
        w = self.worker(case)
        batch = self.generate(w)
        rows = [dataclasses.replace(r, target_length=len(r.output_tokens)) for r in batch.rows]
        self.emit(case, w, self.rescore(dataclasses.replace(batch, rows=rows)))

    def case_stale_policy(self, case: str) -> None:
        w = self.worker(case)  # honest; the test submits it after two train steps
        self.emit(case, w, self.generate(w))

    def case_during_training(self, case: str) -> None:
        w = self.worker(case)  # honest; the test submits it while the trainer runs
        self.emit(case, w, self.generate(w))

    def case_unknown_policy(self, case: str) -> None:
        w = self.worker(case)  # prompts of the seed for step + 5, a policy never published
        self.emit(case, w, self.generate(w, step=self.step + 5))

    def case_replay(self, case: str) -> None:
        """One honest file: signed once (the test sends those bytes twice), then signed again."""
        w = self.worker(case)
        batch = self.generate(w)
        data = rollouts_to_bytes(batch)
        self.emit(case, w, batch, data=data)
        self.emit(case, w, batch, data=data)

    def case_batch_reused(self, case: str) -> None:
        """Batch 1 answered twice: a node keeping only its luckiest answers. Its seeds make a second
        honest answer the same file (a replay), so the second copy re-samples completion 0 off-seed."""
        w = self.worker(case)
        self.emit(case, w, self.generate(w))
        w.counters_path.unlink(missing_ok=True)  # generating does not advance the counter, writing does
        again = self.generate(w)
        assert again.meta.batch_counter == 1
        params = SamplingParams(temperature=self.info.temperature, max_tokens=self.info.max_new_tokens)
        c = self.base.engine.generate([again.rows[0].input_tokens], params, [12345])[0]
        row = dataclasses.replace(again.rows[0], output_tokens=c.output_tokens, output_logprobs=c.output_logprobs,
                                  proof=c.proofs, finish_reason=c.finish_reason)
        self.emit(case, w, self.rescore(dataclasses.replace(again, rows=[row] + again.rows[1:])))

    def case_oversize(self, case: str) -> None:
        w = self.worker(case)
        batch = self.generate(w)
        rows = [dataclasses.replace(batch.rows[0], proof=os.urandom(300_000))] + batch.rows[1:]
        self.emit(case, w, dataclasses.replace(batch, rows=rows))

    def case_bad_signature(self, case: str) -> None:
        """Envelopes claiming the victim's key with broken signatures, then the victim's honest one."""
        w = self.worker(case)
        batch = self.generate(w)
        for _ in range(NUM_FALSE_SIGNATURES):
            self.emit(case, w, batch, corrupt_signature=True)
        self.emit(case, w, batch)

    def case_bad_signature_swarm(self, case: str) -> None:
        w = self.worker(case)
        self.emit(case, w, self.generate(w), corrupt_signature=True)

    def case_wrong_run(self, case: str) -> None:
        w = self.worker(case)
        self.emit(case, w, self.generate(w), run_id="demo-0123456789abcdef")

    def case_malformed_parquet(self, case: str) -> None:
        w = self.worker(case)
        batch = self.generate(w)
        data = rollouts_to_bytes(batch)
        self.emit(case, w, batch, data=data[: len(data) // 2] + b"\0" * 64)

    def case_wrong_temperature(self, case: str) -> None:
        """Sampled colder than the run says (easier, higher-reward samples), and says so."""
        w = self.worker(case)
        self.emit(case, w, self.generate(w, info=self.info.model_copy(update={"temperature": 0.3})))

    def case_banned(self, case: str) -> None:
        """NUM_STRIKES forged rewards from one key, then an honest batch from it."""
        w = self.worker(case)
        for _ in range(NUM_STRIKES):
            self.emit(case, w, self._forge_reward(self.generate(w)))
        self.emit(case, w, self.generate(w))

    def case_stop_without_eos(self, case: str) -> None:
        w = self.worker(case)
        batch = self.generate(w)
        i = next(i for i, r in enumerate(batch.rows) if r.finish_reason == "length")
        rows = list(batch.rows)
        rows[i] = dataclasses.replace(rows[i], finish_reason="stop")
        self.emit(case, w, dataclasses.replace(batch, rows=rows))

    def _truncated(self, batch: RolloutBatch, keep: int, eos: bool) -> RolloutBatch:
        """Completion 0 cut after `keep` tokens (to save compute), optionally ended with EOS. Its proof
        still has the right size (one chunk either way), so only the termination checks can tell."""
        row = batch.rows[0]
        tokens, logprobs = list(row.output_tokens[:keep]), list(row.output_logprobs[:keep])
        if eos:
            tokens.append(int(self.base.tokenizer.eos_token_id))
            logprobs.append(-0.1)
        assert len(row.proof) == 258 and len(tokens) <= 33
        cut = dataclasses.replace(row, output_tokens=tokens, output_logprobs=logprobs,
                                  finish_reason="stop" if eos else "length")
        return self.rescore(dataclasses.replace(batch, rows=[cut] + batch.rows[1:]))

    def case_length_short(self, case: str) -> None:
        w = self.worker(case)
        self.emit(case, w, self._truncated(self.generate(w), keep=10, eos=False))

    def case_improbable_eos(self, case: str) -> None:
        w = self.worker(case)
        self.emit(case, w, self._truncated(self.generate(w), keep=10, eos=True))

    def case_forged_logprobs(self, case: str) -> None:
        """Claim every sampled token was near-certain (what greedy decoding of another model looks like)."""
        w = self.worker(case)
        batch = self.generate(w)
        rows = [dataclasses.replace(r, output_logprobs=[-0.01] * len(r.output_tokens)) for r in batch.rows]
        self.emit(case, w, dataclasses.replace(batch, rows=rows))

    def case_tilted_claims(self, case: str) -> None:
        """Claims tilted inside the intake's tolerances: every advantage up by 9e-4 (tolerance 1e-3) and every
        log-prob up by 0.2 (the mean error allowed is 0.25). Accepted; the trainer must not use them."""
        w = self.worker(case)
        batch = self.generate(w)
        rows = [dataclasses.replace(r, advantage=r.advantage + 9e-4,
                                    output_logprobs=[x + 0.2 for x in r.output_logprobs]) for r in batch.rows]
        self.emit(case, w, dataclasses.replace(batch, rows=rows))

    def case_concurrent(self, case: str) -> None:
        """Resends racing the first copy: batch 1 signed three times (a node whose first call timed out),
        another file for batch 1's seed signed twice between them, then batch 2 signed four times."""
        w = self.worker(case)
        batch = self.generate(w)
        first = rollouts_to_bytes(batch)
        other = rollouts_to_bytes(self._forge_reward(batch))  # other bytes for the same seed
        w.counters_path.write_text(json.dumps({str(self.step): 1}))
        second = rollouts_to_bytes(self.generate(w))
        for data in (first, first, other, first, other, second, second, second, second):
            self.emit(case, w, read_rollouts(data), data=data)


    # ------------------------------------------------------------------ sampling attacks (issue 11)
    # Each one passes TOPLOC (proofs rebuilt by one prefill of the real policy, or made by it) and
    # the log-prob check (log-probs recomputed at the run's temperature): only the seeded sampler
    # check can tell.

    def _reproved(self, batch: RolloutBatch, outputs: list[list[int]] | None = None,
                  finish_reasons: list[str] | None = None) -> RolloutBatch:
        """Rows with these output tokens (and finish reasons, where they came from other samples), proofs
        rebuilt by a prefill of the policy, log-probs the policy's at the run's temperature, rewards and
        advantages recomputed."""
        model = self.base.engine.model
        outputs = outputs or [r.output_tokens for r in batch.rows]
        finish_reasons = finish_reasons or [r.finish_reason for r in batch.rows]
        rows = []
        for r, out, finish in zip(batch.rows, outputs, finish_reasons, strict=True):
            hidden = prefill_final_norm(model, r.input_tokens, out)
            proof = b"".join(build_chunk_proofs(decode_chunks(hidden, 32), 128)) if len(out) > 1 else b""
            rows.append(dataclasses.replace(r, output_tokens=list(out), proof=proof, finish_reason=finish))
        checks = verify_completions(model, [r.input_tokens for r in rows], [r.output_tokens for r in rows],
                                    [r.proof for r in rows], temperature=self.info.temperature)
        rows = [dataclasses.replace(r, output_logprobs=c.token_logprobs) for r, c in zip(rows, checks, strict=True)]
        return self.rescore(dataclasses.replace(batch, rows=rows))

    def case_edited_one_token(self, case: str) -> None:
        """One token of one completion replaced (the middle one), then re-proved."""
        w = self.worker(case)
        batch = self.generate(w)
        outputs = [list(r.output_tokens) for r in batch.rows]
        k = len(outputs[0]) // 2
        outputs[0][k] = (outputs[0][k] + 1) % 1000 + 1000  # another ordinary token
        self.emit(case, w, self._reproved(batch, outputs))

    def _colder(self, case: str, temperature: float) -> None:
        """Sampled at `temperature` (with the run's own seeds), claimed at the run's temperature."""
        w = self.worker(case)
        batch = self.generate(w, info=self.info.model_copy(update={"temperature": temperature}))
        meta = batch.meta.model_copy(update={"sampling": batch.meta.sampling.model_copy(
            update={"temperature": self.info.temperature})})
        self.emit(case, w, self._reproved(dataclasses.replace(batch, meta=meta)))

    def case_colder_sampling(self, case: str) -> None:
        self._colder(case, 0.2)

    def case_greedy(self, case: str) -> None:
        self._colder(case, 0.0)

    def case_best_of_4(self, case: str) -> None:
        """Four samples per completion (seeds of the node's own choosing), the highest reward kept."""
        w = self.worker(case)
        batch = self.generate(w)
        params = SamplingParams(temperature=self.info.temperature, max_tokens=self.info.max_new_tokens, proofs=True)
        tries = [self.base.engine.generate([r.input_tokens for r in batch.rows], params,
                                           [10_000 * k + i for i in range(len(batch.rows))]) for k in range(1, 5)]
        best = []
        for i, r in enumerate(batch.rows):
            def reward(c, r=r):
                text = self.base.tokenizer.decode(c.output_tokens, skip_special_tokens=True)
                return completion_reward(self.task, self.info.task, self.task.problem(r.problem_index), text,
                                         r.target_length, len(c.output_tokens))[0]
            best.append(max((t[i] for t in tries), key=reward))
        # each kept sample with its own finish reason: a well-formed batch, so only the sampling check can
        # tell (a 'stop' row whose kept sample ran to the length limit failed as bad_termination, in CI)
        self.emit(case, w, self._reproved(batch, [c.output_tokens for c in best], [c.finish_reason for c in best]))

    def case_other_model_reproved(self, case: str) -> None:
        """Tokens sampled by another model, then proved with the policy by one prefill."""
        w = self.worker(case, engine=self.wrong_engine)
        batch = self.generate(w)
        self.emit(case, w, self._reproved(batch))

    def case_counter_skipped(self, case: str) -> None:
        """An honest batch 3 from a key that never sent batches 1 and 2 of this step."""
        w = self.worker(case)
        w.counters_path.write_text(json.dumps({str(self.step): 2}))
        batch = self.generate(w)
        assert batch.meta.batch_counter == 3
        self.emit(case, w, batch)


CASES = ["honest_swarm", "wrong_model", "edited_tokens", "swapped_proofs", "forged_reward",
         "forged_advantage", "cherry_picked", "bad_target_length", "stale_policy", "during_training", "unknown_policy", "replay",
         "batch_reused", "oversize", "bad_signature", "bad_signature_swarm", "wrong_run", "malformed_parquet",
         "wrong_temperature", "banned", "stop_without_eos", "length_short", "improbable_eos", "forged_logprobs",
         "concurrent", "edited_one_token", "colder_sampling", "greedy", "best_of_4", "other_model_reproved",
         "counter_skipped", "tilted_claims"]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--run-file", required=True)
    p.add_argument("--state-dir", required=True)
    p.add_argument("--wrong-model", required=True)
    p.add_argument("--result", required=True)
    p.add_argument("--over-swarm", default="")
    args = p.parse_args()
    node = CraftedNode(args)
    try:
        node.run()
        tmp = args.result + ".tmp"
        Path(tmp).write_text(json.dumps(node.result))
        os.replace(tmp, args.result)
    finally:
        node.wrong_engine.close()
        node.base.close()
        node.fetcher.close()
        node.swarm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
