"""The coordinator of one run: intake answers nodes, the trainer turns accepted rollouts into the
next policy, the publisher puts it into the swarm. The async policy loop:

    train step s waits for `batches_per_step` accepted batches made by policies >= s - async_level,
    trains, checkpoints (atomically), hands policy s + 1 over to be published, repeats.
    Once step s has taken its batches, newly accepted ones are queued for step s + 1, so nothing
    accepted while the trainer runs is left behind.

Publishing (shard, sign, store the manifest, then announce the new step in RunInfo) runs in a thread of
its own (coordinator/publish.PublishQueue; `publish_in_background = false`: inline), so step s + 1
trains while policy s + 1 goes out. Two steps: `latest_policy_step` is the newest checkpoint, the one
the trainer works from; `published_step` the newest policy whose manifest is out, the only one RunInfo
names, so a node never reads of a policy it cannot fetch. Steps go out in order, none skipped (a
manifest's deltas are against the step before); one at a time: a train step waits for the step before
it to be out before it checkpoints (which prunes old checkpoints), so at most one is in flight.
A failed publish is logged and tried again; at max_steps, run() returns once the last policy is out.

Crash safety: a rollout is acknowledged only after its file is fsynced and its verdict committed
to the ledger; a checkpoint folder appears only whole. Restarted, the coordinator resumes at the
last complete checkpoint and finds every accepted rollout of the steps after it in the ledger;
metrics lines of the steps it redoes are dropped, so metrics.jsonl holds each step once. The whole
training state is written every `full_state_every` steps, at the last step and at exit, the policy
alone at the others. A policy step, once checkpointed, may be out in the swarm, so it is never made
twice: when the newest whole state (step k) is older than the newest policy (step s), the trainer
resumes from k's weights and optimizer and numbers on at s + 1 (steps k + 1 .. s lose their training).

With `eval.every` set, a background worker (coordinator/heldout.py) scores saved policies on the task's
held-out problems, starting with the one the loop starts from; its lines in metrics.jsonl have
"kind": "eval" and a "policy_step" (train-step lines have neither).

What this module does not know: how the screen looks (dashboard) or what the CLI flags are.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

from intellect.coordinator.config import CoordinatorConfig
from intellect.coordinator.faults import pause_point
from intellect.coordinator.intake import Intake, Outcome
from intellect.coordinator.ledger import BanPolicy, Ledger
from intellect.coordinator.policies import PolicyCache, policy_dir
from intellect.coordinator.rules import run_rules
from intellect.coordinator.validated import read_validated
from intellect.coordinator.verdicts import Reason
from intellect.protocol.identity import Identity, load_identity, peer_id_of
from intellect.protocol.messages import SUBMIT_RPC, VERDICT_RPC, RunInfo, Verdict, encode_body
from intellect.protocol.rollouts import RolloutFormatError, read_rollouts
from intellect.protocol.swarm.keys import run_info_key
from intellect.protocol.wire import MessageKind, run_id_for, seal

logger = logging.getLogger(__name__)

LOOP_BACKOFF_S = 1.0
LOOP_BACKOFF_MAX_S = 60.0


class FatalError(RuntimeError):
    """The policy loop cannot go on (no retry would help); the message says why, in plain words."""



def ban_policy(config: CoordinatorConfig) -> BanPolicy:
    return BanPolicy(strikes=config.ban_after_failures, window=config.ban_window,
                     statistical_weight=config.statistical_strike)


def train_sample(row) -> tuple:
    """A rollout row as the trainer takes it, with the row's own advantage and log-probs as mu (the
    behaviour policy of the loss's importance ratio); row.step its version, for the staleness histogram.
    For rows whose numbers are trusted (made in this process); the coordinator's intake uses
    `validated_samples`."""
    return row.input_tokens, row.output_tokens, row.advantage, row.reward, row.output_logprobs, row.step


def validated_samples(batch, computed) -> list[tuple]:
    """The rows of an accepted file as the trainer takes them, with what validation computed in place of
    the node's claims: recomputed advantages and rewards, and the validator's log-probs as mu (None for
    rows its prefill did not re-run: their ratio is taken against the policy at the step's start). A file
    accepted without them (an older version) keeps its checked advantages and claims no mu."""
    if computed is None:
        return [(r.input_tokens, r.output_tokens, r.advantage, r.reward, None, r.step) for r in batch.rows]
    return [(r.input_tokens, r.output_tokens, adv, reward, mu, r.step) for r, adv, reward, mu in
            zip(batch.rows, computed.advantages, computed.rewards, computed.behaviour_logprobs, strict=True)]


def base_model_dir(model: str, cache_dir: Path) -> Path:
    from intellect.protocol.model import default_model_dir, tiny_model_dir

    if model == "smollm2":
        return default_model_dir(cache_dir)
    if model == "tiny":
        return tiny_model_dir(cache_dir)
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(f"model {model!r} is neither 'smollm2', 'tiny' nor a checkpoint folder with config.json")
    return path


def build_trainer(config: CoordinatorConfig, base_dir: Path):
    """(GRPOTrainer, tokenizer) of the run's model, fp32 master weights; under torchrun every rank builds
    the same and the trainer shards it (FSDP2)."""
    import torch

    from intellect.coordinator.trainer.trainer import GRPOTrainer
    from intellect.protocol.model import load_model

    if config.threads:
        torch.set_num_threads(config.threads)
    model, tokenizer = load_model(base_dir, dtype=torch.float32)
    trainer_config = config.trainer.model_copy(update={"pad_token_id": tokenizer.pad_token_id or 0})
    return GRPOTrainer(model, trainer_config), tokenizer


def follow_coordinator(config: CoordinatorConfig) -> None:
    """Ranks > 0 under torchrun: build the same trainer and run what rank 0's coordinator trains (its
    steps, checkpoints and resume) until it stops; no swarm, intake or files of their own."""
    trainer, _ = build_trainer(config, base_model_dir(config.model, config.state_dir / "models"))
    logger.info("rank %s of %s: training this rank's FSDP2 shards of the coordinator's model",
                trainer.rank, trainer.world_size)
    trainer.follow()
    logger.info("rank %s: the coordinator stopped", trainer.rank)


class Coordinator:
    def __init__(self, config: CoordinatorConfig) -> None:
        self.config = config
        self.state_dir = config.state_dir
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.identity: Identity = load_identity(self.state_dir, create=True)[0]
        self.run_id = run_id_for(self.identity.public_key, config.run_name)
        self.ledger = Ledger(self.state_dir / "ledger.sqlite", ban_policy(config))
        self.metrics_path = self.state_dir / "metrics.jsonl"
        self.stop = threading.Event()
        self.accepted = threading.Condition()
        self.loop_errors = 0  # failed turns of the policy loop (it goes on after each)
        self.last_error = ""  # the last one, in words, until a turn succeeds
        self.history: list[dict] = []  # one metrics dict per train step (dashboard, headless lines)
        self.evals: list[dict] = []  # one metrics dict per held-out evaluation, in the order they finished
        self._metrics_lock = threading.Lock()  # metrics.jsonl has two writers: the loop and the evaluator
        self.evaluator = None
        self.swarm = None
        self.publisher = None
        self.publishing = None  # a PublishQueue of new policy steps, published in order (start_swarm)
        self._announce_lock = threading.Lock()  # one announce at a time: the newer RunInfo gets the higher seq
        self.task_data = None  # the ShardEntry of a "jsonl:" task's file, served to nodes (RunInfo.task_data)
        self._setup_model()
        self._setup_intake()
        self._setup_eval()

    # ------------------------------------------------------------------ set-up

    def _setup_model(self) -> None:
        from intellect.protocol.model import eos_token_ids

        self.base_dir = base_model_dir(self.config.model, self.state_dir / "models")
        self.trainer, self.tokenizer = build_trainer(self.config, self.base_dir)
        # the run's one EOS set, from the policy folder: announced to nodes, checked by intake
        self.eos_ids = eos_token_ids(self.tokenizer, self.base_dir)
        self.checkpoints = self.state_dir / "checkpoints"
        # the model of a published policy step, in `compute_dtype` (the last async_level + 1 kept)
        self.policy_for = PolicyCache(self.checkpoints, self.config.async_level + 1)
        if self.trainer.resume(self.checkpoints):
            logger.info("resumed at policy step %s", self.trainer.policy_step)
            from intellect.coordinator.trainer.checkpoint import complete_checkpoints, step_of

            newest = step_of(complete_checkpoints(self.checkpoints)[-1])
            if newest > self.trainer.policy_step:
                logger.warning("policies %s..%s were checkpointed without the training state (full_state_every "
                               "= %s) and may be out in the swarm: training goes on from the state of step %s "
                               "and the next policy is step %s", self.trainer.policy_step + 1, newest,
                               self.config.full_state_every, self.trainer.policy_step, newest + 1)
                self.trainer.policy_step = newest
        else:
            self.trainer.save(self.checkpoints, keep=self.config.keep_checkpoints, tokenizer=self.tokenizer)
        # the newest checkpoint; the next train step trains it into latest + 1
        self.latest_policy_step = self.trainer.policy_step
        # the newest policy out in the swarm, which RunInfo names (start_swarm publishes the checkpoints on disk)
        self.published_step = self.latest_policy_step
        self.collect_step = self.latest_policy_step  # the train step newly accepted rollouts are queued for
        self._sync_metrics()

    def _sync_metrics(self) -> None:
        """metrics.jsonl and the history hold the finished steps only: a crash (or a failed turn) after
        the metrics line, before its checkpoint, redoes that step."""
        with self._metrics_lock:
            lines = _read_jsonl(self.metrics_path)
            # an eval line is of a saved policy, which a restart does not redo
            kept = [m for m in lines if m.get("kind") == "eval" or m.get("step", -1) < self.latest_policy_step]
            self.history = [m for m in kept if m.get("kind") != "eval"]
            self.evals = [m for m in kept if m.get("kind") == "eval"]
            if len(kept) != len(lines):
                _write_jsonl(self.metrics_path, kept)

    def _setup_intake(self) -> None:
        from intellect.coordinator.validators import resolve_workers

        self.validator_workers = resolve_workers(self.config.intake.workers)  # started with the swarm
        self.intake = Intake(self.config.intake, run_rules(self.config, self.run_id), self.ledger, self.state_dir,
                             self.tokenizer, self.eos_ids, policy_for=self.policy_for,
                             steps=lambda: (self.collect_step, self.published_step))
        dropped = self.intake.recover_inbox(keep_received=self.validator_workers > 0)
        if dropped:
            logger.info("dropped %s unacknowledged submissions from before a restart", dropped)

    def _setup_eval(self) -> None:
        if not self.config.eval.every:
            return
        from intellect.coordinator.heldout import EvalWorker, HeldoutEval

        self.evaluator = EvalWorker(HeldoutEval(self.config, self.tokenizer, self.eos_ids), self.policy_dir,
                                    self._record_eval)

    def _record_eval(self, result) -> None:
        line = result.line()
        with self._metrics_lock:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(line) + "\n")
            self.evals.append(line)
        logger.info("held-out evaluation of policy %s: greedy %.3f, mean@%s %.3f (%s problems, %.1f s)",
                    result.policy_step, result.heldout_greedy, result.k, result.heldout_mean_at_k,
                    result.num_problems, result.eval_s)

    def _evaluate_if_due(self, policy_step: int) -> None:
        if self.evaluator is not None and self.evaluator.heldout.due(policy_step) \
                and policy_step not in {m["policy_step"] for m in self.evals}:
            self.evaluator.submit(policy_step)

    def policy_dir(self, step: int) -> Path:
        return policy_dir(self.checkpoints, step)

    # ------------------------------------------------------------------ network

    def start_swarm(self) -> None:
        from intellect.coordinator.publish import Publisher, PublishQueue
        from intellect.protocol.swarm import setup_swarm

        self.swarm = setup_swarm(self.config.swarm, self.identity, self.run_id, self.identity.public_key)
        if self.validator_workers:  # before the first submission can arrive
            from intellect.coordinator.validators import WorkerSpec

            spec = WorkerSpec(self.config, self.run_id, self.base_dir, self.checkpoints, self.eos_ids,
                              self.intake.ctx.row_secret)
            self.intake.start_workers(spec, self.validator_workers, on_accept=self._on_accept)
        self.swarm.register_request_handler(SUBMIT_RPC, self.rpc_submit,
                                            max_request_bytes=self.config.intake.max_submission_bytes)
        self.swarm.register_request_handler(VERDICT_RPC, self.rpc_verdict, max_request_bytes=32)
        self.publisher = Publisher(self.swarm, self.identity, self.config.swarm, self.state_dir)
        if self.config.task.name.startswith("jsonl:"):  # nodes fetch this exact file; its hash goes in RunInfo
            self.task_data = self.publisher.publish_data(Path(self.config.task.name.removeprefix("jsonl:")))
        # after a restart, the newest checkpoint may never have gone out: publish the ones nodes may use
        for step in range(max(0, self.latest_policy_step - self.config.async_level), self.latest_policy_step + 1):
            if self.policy_dir(step).is_dir():
                self.publisher.publish(self.policy_dir(step), step, shard_size=self.config.shard_size)
        self.published_step = self.latest_policy_step
        self.announce()
        self.publishing = PublishQueue(self._publish_policy, background=self.config.publish_in_background)

    def rpc_submit(self, peer: bytes, request: bytes) -> bytes:
        """A signed submission in, a signed verdict out: the verdict itself, or with validator workers
        `received` (the verdict is asked for by file hash: rpc_verdict)."""
        if self.intake.pool is not None:
            outcome: Outcome = self.intake.receive(request)
        else:
            outcome = self.intake.submit(request, on_accept=self._on_accept)
        if outcome.sender is not None:
            self.ledger.node_seen(outcome.sender.hex(), peer_id_of(outcome.sender))
        return seal(self.identity, MessageKind.VERDICT, self.run_id, encode_body(outcome.verdict))

    def rpc_verdict(self, peer: bytes, request: bytes) -> bytes:
        """The 32-byte sha256 of a submitted file in, its signed verdict out (`received` while judged)."""
        if len(request) == 32:
            verdict = self.intake.verdict_for(request.hex())
        else:  # answered like any bad input, not raised (a handler's exception is logged as our failure)
            verdict = Verdict(file_sha256="0" * 64, accepted=False, reason=Reason.BAD_SCHEMA.value,
                              detail="a verdict request is the 32-byte sha256 of the submitted file")
        return seal(self.identity, MessageKind.VERDICT, self.run_id, encode_body(verdict))

    def _on_accept(self, train_step: int) -> None:
        with self.accepted:
            self.accepted.notify_all()

    def run_info(self) -> RunInfo:
        from intellect.protocol.model import model_config_hash

        r = self.config.rollouts
        return RunInfo(run_id=self.run_id, run_name=self.config.run_name, coordinator_peer_id=self.identity.peer_id,
                       task=self.config.task, collect_step=self.collect_step,
                       latest_policy_step=self.published_step,
                       async_level=self.config.async_level, prompts_per_batch=r.prompts_per_batch,
                       completions_per_prompt=r.completions_per_prompt, max_new_tokens=r.max_new_tokens,
                       temperature=r.temperature, model_config_hash=model_config_hash(self.base_dir),
                       eos_token_ids=sorted(self.eos_ids), task_data=self.task_data)

    def announce(self) -> None:
        """Store the run's state (RunInfo) in the DHT. Two threads announce (the loop, when due, and the
        publisher, after a new step): sealed and stored under one lock, the newest state has the highest seq."""
        with self._announce_lock:
            envelope = seal(self.identity, MessageKind.RUN_INFO, self.run_id, encode_body(self.run_info()))
            self.swarm.publish(run_info_key(), envelope, self.config.swarm.record_ttl_s)

    def _publish_policy(self, step: int) -> None:
        """Put policy `step` out (its manifest in the DHT, its shards served), then announce it: in this
        order, a node never reads of a step it cannot fetch. Run by `self.publishing`, in order; a
        retry after a failed announce does not publish the manifest again."""
        if self.published_step < step:
            self.publisher.publish(self.policy_dir(step), step, shard_size=self.config.shard_size)
            self.published_step = step
        self.announce()

    # ------------------------------------------------------------------ the async policy loop

    def run(self, on_step=None) -> None:
        """The async policy loop, until stopped or max_steps. No single failure ends it: the DHT timing
        out on an announce, a full disk under a checkpoint, a bug in a step. The failure is logged with
        its traceback, counted (`loop_errors`, metric `intellect_loop_errors`) and shown in plain words
        (`last_error`, on the dashboard) until a turn succeeds; the loop waits (doubling from
        LOOP_BACKOFF_S up to LOOP_BACKOFF_MAX_S) and goes on, a half-done train step is redone. What no
        retry can fix, a missing module (ImportError), raises `FatalError` for the runner to exit non-zero."""
        self._last_announce = time.monotonic()
        self._evaluate_if_due(self.trainer.policy_step)  # the policy it starts from: "before" (0 on a fresh run)
        failures = 0
        while not self.stop.is_set() and not self._done():
            try:
                worked = self._turn(on_step)
            except ImportError as e:
                raise FatalError(f"a module the coordinator needs is missing: {e}") from e
            except Exception as e:  # the loop outlives any one failure
                failures += 1
                self.loop_errors += 1
                self.last_error = f"{type(e).__name__}: {e}"[:500]
                backoff = min(LOOP_BACKOFF_MAX_S, LOOP_BACKOFF_S * 2 ** (failures - 1))
                logger.exception("policy loop (failure %s, again in %.0f s): %s", failures, backoff, self.last_error)
                self._sync_metrics()  # a step that failed after its metrics line is redone: drop the line
                self.stop.wait(backoff)
                continue
            if worked:
                failures, self.last_error = 0, ""
        self.save_training_state()
        if self.evaluator is not None and self._finished():
            self.evaluator.drain(self.stop)  # the last policy's score ("after") is part of the run

    def save_training_state(self) -> None:
        """At exit: make the newest checkpoint resumable if it holds the policy alone (and is the policy in
        memory: a step that failed between training and its checkpoint is redone from the disk anyway)."""
        from intellect.coordinator.trainer.checkpoint import (
            complete_checkpoints,
            resumable_checkpoints,
            step_of,
        )

        newest = complete_checkpoints(self.checkpoints)[-1:]
        if (newest and step_of(newest[0]) == self.trainer.policy_step
                and newest != resumable_checkpoints(self.checkpoints)[-1:]):
            logger.info("writing the training state of policy step %s", self.trainer.policy_step)
            self.trainer.add_training_state(self.checkpoints)

    def _turn(self, on_step) -> bool:
        """Train if enough batches are in, else wait a little and announce when due; True if it did either."""
        self.publishing.publish_pending()  # inline: a step whose publish failed goes out first
        if not self._finished() and self.ready_to_train():
            metrics = self.train_once()
            if on_step is not None:
                on_step(metrics)
            self._last_announce = time.monotonic()
            return True
        with self.accepted:
            self.accepted.wait(timeout=0.5)
        if time.monotonic() - self._last_announce > self.config.swarm.record_ttl_s / 4:
            self.announce()
            self._last_announce = time.monotonic()
            return True
        return False

    def _finished(self) -> bool:
        """max_steps trained (the last policy may still be going out)."""
        return self.config.max_steps is not None and self.latest_policy_step >= self.config.max_steps

    def _done(self) -> bool:
        """max_steps trained and the last policy out: the run is over."""
        return self._finished() and self.publishing.num_pending == 0

    def ready_to_train(self) -> bool:
        return len(self.ledger.accepted_for_train_step(self.latest_policy_step)) >= self.config.batches_per_step

    def train_once(self) -> dict:
        step = self.latest_policy_step
        with self.intake.record_lock:  # from here on, accepted rollouts are queued for step + 1
            queued = self.ledger.accepted_for_train_step(step)
            # oldest first: later batches wait for the next step (while fresh enough) instead of
            # making this one longer than configured
            submissions, later = queued[: self.config.batches_per_step], queued[self.config.batches_per_step:]
            fresh = [s.id for s in later if s.policy_step >= step + 1 - self.config.async_level]
            self.ledger.requeue(fresh, step + 1)
            self.collect_step = step + 1
        samples, rewards, lengths = self._load_samples(submissions)
        started = time.perf_counter()
        metrics = self.trainer.train_step(samples)
        pause_point("train.trained")
        self.trainer.policy_step = step + 1  # a step with only zero advantages still moves the policy version
        counts = self.intake.counts_by_reason()
        metrics = {
            "step": step,
            "reward": sum(rewards) / max(len(rewards), 1),
            "length": sum(lengths) / max(len(lengths), 1),
            "num_completions": len(samples),
            "num_batches": len(submissions),
            "staleness_max": max((step - s.policy_step for s in submissions), default=0),
            "accepted": counts.get("accepted", 0),
            "rejected": sum(v for k, v in counts.items() if k != "accepted"),
            "step_s": time.perf_counter() - started,
            "at": time.time(),
        } | {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        # the line goes first: a crash before the checkpoint is whole redoes the step, and the
        # restart drops this line, so the file never skips a step
        with self._metrics_lock, open(self.metrics_path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        # one publish in flight at most, and never of a checkpoint this save prunes
        self.publishing.wait_idle(self.stop)
        last = self.config.max_steps is not None and step + 1 >= self.config.max_steps
        full_state = last or (step + 1) % self.config.full_state_every == 0
        self.trainer.save(self.checkpoints, keep=self.config.keep_checkpoints, tokenizer=self.tokenizer,
                          full_state=full_state)
        pause_point("train.saved")
        self._evaluate_if_due(step + 1)  # it reads the checkpoint just saved, in its own thread
        self.latest_policy_step = step + 1
        self.history.append(metrics)
        self.publishing.put(step + 1)  # in the background: returns at once, the next step trains meanwhile
        return metrics

    def _load_samples(self, submissions) -> tuple[list, list[float], list[int]]:
        samples, rewards, lengths = [], [], []
        for sub in submissions:
            try:
                batch = read_rollouts(sub.stored_path)
            except RolloutFormatError as e:  # it was valid when accepted: the disk changed under us
                logger.error("accepted rollout %s became unreadable: %s", sub.stored_path, e)
                continue
            rows = validated_samples(batch, read_validated(Path(sub.stored_path), len(batch.rows)))
            samples.extend(rows)
            rewards.extend(reward for _, _, _, reward, _, _ in rows)
            lengths.extend(len(output) for _, output, _, _, _, _ in rows)
        return samples, rewards, lengths

    def join_command(self) -> str:
        addrs = self.swarm.visible_addrs() if self.swarm else []
        boots = " ".join(f"--bootstrap {a}" for a in addrs[:2])
        return (f"intellect-node join {boots} --run {self.run_id} "
                f"--coordinator {self.identity.public_key_hex} --backend {self.config.swarm.backend}")

    def close(self) -> None:
        self.stop.set()
        self.trainer.stop_followers()  # under torchrun the other ranks leave `follow` (one process: nothing)
        if self.evaluator is not None:
            self.evaluator.close()
        if self.publishing is not None:
            self.publishing.close()
        if self.publisher is not None:
            self.publisher.close()
        if self.swarm is not None:
            self.swarm.close()
        self.intake.close()  # validator workers: after the swarm, so no submission arrives for them
        self.ledger.close()


def _read_jsonl(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


def _write_jsonl(path: Path, lines: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(m) + "\n" for m in lines))
    os.replace(tmp, path)
