"""The node's work loop: follow the policy -> fetch -> generate -> prove -> submit.

One batch per turn. Submitting is pipelined: a submitter thread sends the outbox's files in order (so
batch counters reach the coordinator contiguous) and waits for their verdicts while the loop generates
the next batch; the loop waits only when `pipeline_depth` batches are already waiting (0: it submits
each batch itself before generating the next, the synchronous way). New policies are fetched in the
background while the loop generates (`PolicyPrefetch`); the loop copies the weights in between batches.
Prompts come from the node's seed (spec B.3) and every completion's sampling seed is derived from
(run, node key, policy step, batch counter, index), so the coordinator can recompute both and check
every sampled token; batch counters run 1, 2, ... per policy step with no gaps. The
engine returns tokens, log-probs and TOPLOC proofs; rewards and group advantages (B.5, B.6) are
computed here; the batch is written as a parquet file into the outbox *before* it is sent, so nothing
generated is lost when the coordinator is away: unsent files are retried while their policy is fresh
enough, and reported as expired when not. A coordinator with validator workers answers a submission
`received`: the file moves to outbox/received/ and its verdict is asked for by file hash until it comes.

What this module does not know: how bytes travel (the `Swarm`), how shards are fetched (`ShardFetcher`),
or how tokens are sampled (`Engine`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from intellect.node.config import NodeConfig
from intellect.node.engine import SamplingParams, setup_engine
from intellect.node.fetch import ShardUnavailable
from intellect.node.prefetch import PolicyPrefetch
from intellect.node.status import NodeStatus
from intellect.protocol.files import atomic_write
from intellect.protocol.identity import Identity
from intellect.protocol.messages import (
    IN_FLIGHT,
    RECEIVED,
    STALE_POLICY,
    SUBMIT_RPC,
    UNKNOWN_FILE,
    VERDICT_RPC,
    RunInfo,
    SubmissionHeader,
    Verdict,
    decode_body,
    encode_submission,
)
from intellect.protocol.rollouts import (
    RolloutBatch,
    RolloutMeta,
    RolloutRow,
    read_rollouts,
    rollouts_to_bytes,
)
from intellect.protocol.rollouts import SamplingParams as RolloutSampling
from intellect.protocol.sampling import batch_seeds
from intellect.protocol.swarm import Swarm, SwarmError
from intellect.protocol.swarm.keys import run_info_key
from intellect.protocol.tasks import (
    TaskConfig,
    TaskDataError,
    completion_reward,
    group_advantages,
    node_seed_int,
    prompt_token_ids,
    sample_batch,
    setup_task,
)
from intellect.protocol.wire import MessageKind, WireRejected, open_envelope, seal

logger = logging.getLogger(__name__)

KEEP_SENT = 100
VERDICT_POLL_S = 0.5  # between verdict questions while files are judged (the door allows 4 calls/s a caller)


class WorkError(Exception):
    """A recoverable failure of one turn, in plain words with what to do; the loop retries."""


def check_model_config(folder: Path, announced: str, step: int) -> None:
    """Refuse a policy folder whose config.json is not the model the run announces: its rollouts would be
    rejected anyway, and a wrong architecture may not even load."""
    from intellect.protocol.model import model_config_hash

    try:
        found = model_config_hash(folder)
    except (OSError, ValueError) as e:
        raise WorkError(f"policy step {step} has no readable config.json: {e}") from e
    if found != announced:
        raise WorkError(f"policy step {step} is a different model than the run announces (its config.json hashes "
                        f"to {found[:12]}, the run's model config to {announced[:12]}): not running it; the "
                        "coordinator must publish the run's model")


class Worker:
    def __init__(self, config: NodeConfig, identity: Identity, swarm: Swarm, fetcher, status: NodeStatus) -> None:
        self.config = config
        self.identity = identity
        self.swarm = swarm
        self.fetcher = fetcher
        self.status = status
        self.coordinator_key = config.coordinator_public_key
        self.outbox = config.state_dir / "outbox"
        self.outbox.mkdir(parents=True, exist_ok=True)
        self.received = self.outbox / "received"  # stored by the coordinator, verdict not in yet
        self._sent_at: dict[str, float] = {}  # file name -> when it was sent (monotonic), for latency_s
        self.counters_path = config.state_dir / "batch_counters.json"
        self.verdict_log = config.state_dir / "verdicts.jsonl"
        self.engine = None
        self.tokenizer = None
        self.loaded_step: int | None = None
        self.newest_run_info: tuple[int, RunInfo] | None = None  # (seq, info): never follow an older one
        self._run_info_lock = threading.Lock()
        self.resume = threading.Event()
        self.resume.set()
        self.stop = threading.Event()
        self.num_batches = 0
        self.fatal = ""  # why the loop ended for good, when no retry can help
        self._task_loaded = False  # a task data file that never loaded is a setup error, not a hiccup
        self.pipelined = config.pipeline_depth > 0
        self._outbox_changed = threading.Event()  # a batch was written, or a verdict took one away
        self._errors = {"loop": "", "submit": ""}  # the last failure of each thread, until it succeeds
        self.prefetch: PolicyPrefetch | None = None  # while `run` runs: policies fetched as they appear

    # ------------------------------------------------------------------ the loop

    def run(self) -> None:
        """Turn until stopped. Whatever fails in a turn (the DHT timing out, a full disk, a task file gone
        missing, a bug) is shown in plain words (status.error, the TUI, the log with its traceback when
        unexpected), counted (status.restarts), and the loop waits and starts again. What no retry can
        fix ends the loop with `fatal` set, for `join` to exit non-zero: a missing module (ImportError,
        e.g. the vLLM version gate) or a task data file that could not be read since the node started."""
        submitter = None
        if self.pipelined:
            submitter = threading.Thread(target=self._submit_loop, name="submitter", daemon=True)
            submitter.start()
        if self.fetcher is not None and self.config.prefetch_policy:
            self.prefetch = PolicyPrefetch(lambda step, timeout_s: self.fetcher.fetch(step, timeout_s=timeout_s),
                                           self._latest_policy_step, timeout_s=self.config.policy_wait_s).start()
        while not self.stop.is_set() and not self._done():
            try:
                self.turn()
            except WorkError as e:
                self._fail(str(e))
            except MemoryError:
                self._fail("out of memory: lower --gpu-memory or the engine's max batch size, or close other programs")
            except ImportError as e:
                self._die(f"a module the node needs is missing: {e}")
            except TaskDataError as e:
                if not self._task_loaded:
                    self._die(f"the run's task data cannot be read: {e}")
                else:
                    self._fail(f"the run's task data cannot be read: {e}; retrying")
            except OSError as e:
                self._fail(f"{e}: is the disk under {self.config.state_dir} full or read-only? retrying")
            except Exception as e:  # the loop outlives any one failure
                logger.exception("work loop: unexpected failure")
                self._fail(f"unexpected failure: {type(e).__name__}: {e}; retrying")
        if submitter is not None:
            # done: the last verdicts are in and the submitter leaves on its own; stopped: it finishes
            # its call (a network wait, safe to abandon) and sends nothing more
            submitter.join(timeout=None if self._done() else 1.0)
        if self.prefetch is not None:
            self.prefetch.close()
            self.prefetch = None
        self.status.state = "failed" if self.fatal else "stopped"

    def turn(self) -> None:
        self._wait_if_paused()
        info = self.follow_policy()  # the submitter needs the run's state before it can make room
        if self.pipelined:
            full = self._pending() > self.config.pipeline_depth
            with self._waiting("verdict_wait_s"):
                room = self._wait_for_room()
            if not room:
                return
            if full:  # the run may have moved on while we waited
                info = self.follow_policy()
        else:
            with self._waiting("verdict_wait_s"):
                self.flush_outbox(info)
        with self._waiting("policy_wait_s"):
            step = self.fetch_policy(info)
        batch = self.generate(info, step)
        path = self.write(batch)
        if self.pipelined:
            self._outbox_changed.set()
        else:
            with self._waiting("verdict_wait_s"):
                self.submit(path, info)
        self._show_error("loop", "")  # the last failure's message stays up until a turn succeeds

    @contextmanager
    def _waiting(self, counter: str) -> Iterator[None]:
        """Add the loop's wait inside the block to a status counter (`policy_wait_s`, `verdict_wait_s`),
        from the first batch on: the counters split the span the duty cycle is taken over."""
        began = time.monotonic()
        try:
            yield
        finally:
            if self.status.first_generate_at is not None:
                setattr(self.status, counter, getattr(self.status, counter) + time.monotonic() - began)

    # ------------------------------------------------------------------ the submitter (pipelined)

    def _submit_loop(self) -> None:
        """Send the outbox's files, oldest first, as they come; a failure is shown and retried after the
        backoff, and later files wait for it (the coordinator refuses a counter that skips ahead)."""
        while not self.stop.is_set() and not self._done():
            self._outbox_changed.clear()
            if self.newest_run_info is None or not self._pending():
                self._outbox_changed.wait(0.5)
                continue
            try:
                self.flush_outbox(self.newest_run_info[1])
                if self.poll_verdicts():  # still being judged: ask again soon (a caller may ask 4 times a
                    self._outbox_changed.wait(VERDICT_POLL_S)  # second), or when a batch comes
                self._show_error("submit", "")
            except WorkError as e:
                self._submit_failed(str(e))
            except OSError as e:
                self._submit_failed(f"{e}: is the disk under {self.config.state_dir} full or read-only? retrying")
            except Exception as e:  # the submitter outlives any one failure, like the loop
                logger.exception("submitter: unexpected failure")
                self._submit_failed(f"unexpected failure while submitting: {type(e).__name__}: {e}; retrying")

    def _submit_failed(self, message: str) -> None:
        logger.warning("submitter: %s", message)
        self._show_error("submit", message)
        self.stop.wait(self.config.restart_backoff_s)

    def _wait_for_room(self) -> bool:
        """Wait while `pipeline_depth` batches already wait for verdicts. False when no batch is to be made
        (stopped, or the batches sent and waiting already reach `max_batches`)."""
        while not self.stop.is_set() and not self._done():
            pending = self._pending()
            budget_left = self.config.max_batches is None or self.num_batches + pending < self.config.max_batches
            if budget_left and pending <= self.config.pipeline_depth:
                return True
            self.status.state = "submitting"
            self._outbox_changed.wait(0.2)
        return False

    def _pending(self) -> int:
        """Batches written and without a verdict: unsent, or received and being judged."""
        return len(list(self.outbox.glob("*.parquet"))) + len(list(self.received.glob("*.parquet")))

    # ------------------------------------------------------------------ follow_policy -> fetch

    def follow_policy(self) -> RunInfo:
        """The run's current state, from the coordinator-signed record in the DHT."""
        self.status.state = "waiting"
        info = self._read_run_info()
        self.status.peers = len(self.swarm.peers())
        return info

    def _latest_policy_step(self) -> int:
        """For the prefetcher's polls: the run's newest policy step."""
        return self._read_run_info().latest_policy_step

    def _read_run_info(self) -> RunInfo:
        records = self.swarm.read(run_info_key())
        infos = []
        for envelope in records:
            try:
                infos.append((envelope.seq, decode_body(RunInfo, envelope.body)))
            except WireRejected as e:
                logger.warning("ignoring run info: %s", e)
        if not infos:
            raise WorkError("the coordinator is not in the swarm (no run info found): check that it is running "
                            "and that --bootstrap points at a live peer")
        seq, info = max(infos, key=lambda item: item[0])
        with self._run_info_lock:  # the loop and the prefetcher both read
            if self.newest_run_info is not None and seq < self.newest_run_info[0]:
                seq, info = self.newest_run_info  # a replayed older record must not take the node back a step
            self.newest_run_info = (seq, info)
            self.status.collect_step = info.collect_step
            self.status.coordinator = info.coordinator_peer_id
        return info

    def fetch_policy(self, info: RunInfo) -> int:
        """Make sure the engine runs the newest policy (never older than collect_step - async_level)."""
        step = info.latest_policy_step
        if self.loaded_step is not None and self.loaded_step >= step:
            return self.loaded_step
        try:
            if self.prefetch is not None:
                if self.prefetch.ready_step is None or self.prefetch.ready_step < step:
                    self.status.state = "fetching"
                step, folder = self.prefetch.get(step, self.config.policy_wait_s, self.stop)
            else:
                self.status.state = "fetching"
                folder = self.fetcher.fetch(step, timeout_s=self.config.policy_wait_s)
        except (ShardUnavailable, SwarmError, TimeoutError, OSError) as e:  # the swarm may heal: retry later
            raise WorkError(f"could not fetch policy step {step}: {e}") from e
        check_model_config(folder, info.model_config_hash, step)
        if self.engine is None:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(folder)
            try:
                self.engine = setup_engine(self.config.engine, folder)
            except (OSError, ValueError, RuntimeError) as e:
                raise WorkError(f"the model of policy step {step} failed to load: {e}") from e
            self.status.engine, self.status.device = self.engine.name, str(self.engine.device)
        else:
            self.engine.load_weights(folder)
        self.engine.eos_ids = frozenset(info.eos_token_ids)  # the run's one EOS set, as intake checks it
        self.loaded_step = step
        self.status.policy_step = step
        return step

    # ------------------------------------------------------------------ generate -> prove

    def generate(self, info: RunInfo, step: int) -> RolloutBatch:
        self.status.state = "generating"
        task = setup_task(self.task_config(info))
        self._task_loaded = True
        counter = self._next_batch_counter(step)  # committed once the batch is in the outbox (write)
        sampled = sample_batch(task, node_seed_int(self.identity.public_key), step, counter,
                               info.prompts_per_batch, info.task.length_targets)
        prompts = [prompt_token_ids(self.tokenizer, task.problem(s.problem_index), s.target_length, info.task.thinking)
                   for s in sampled]
        limit = self.config.engine.max_model_len
        if any(len(p) + info.max_new_tokens > limit for p in prompts):
            raise WorkError(f"a prompt plus {info.max_new_tokens} new tokens exceeds the engine's context of {limit} "
                            "tokens: raise engine.max_model_len")
        n = info.completions_per_prompt
        params = SamplingParams(temperature=info.temperature, max_tokens=info.max_new_tokens, proofs=True)
        seeds = batch_seeds(self.swarm.run_id, self.identity.public_key, step, counter, len(prompts) * n)
        began = time.time()
        self.status.first_generate_at = self.status.first_generate_at or began
        completions = self.engine.generate([p for p in prompts for _ in range(n)], params, seeds)
        self.status.last_generated_at = time.time()
        self.status.generate_s += self.status.last_generated_at - began
        rows = self._score(task, info, step, sampled, prompts, completions)
        self.status.tokens_per_s = self.engine.tokens_per_s
        meta = RolloutMeta(node_public_key=self.identity.public_key_hex, run_id=self.swarm.run_id, policy_step=step,
                           batch_counter=counter, task=info.task.name,
                           sampling=RolloutSampling(temperature=info.temperature, max_tokens=info.max_new_tokens, n=n))
        return RolloutBatch(meta=meta, rows=rows)

    def task_config(self, info: RunInfo) -> TaskConfig:
        """The run's task as this node runs it: a "jsonl:" task reads the coordinator's data file, fetched
        through the swarm and checked against the hash in the signed RunInfo (the path in `info.task` is
        the coordinator's, not ours)."""
        if info.task_data is None or not info.task.name.startswith("jsonl:"):
            return info.task
        if self.fetcher is None:
            raise WorkError("the run's task data comes through the swarm, and this node has no fetcher")
        if not self.fetcher.holds_data(info.task_data.sha256):
            self.status.state = "fetching"
        try:
            path = self.fetcher.fetch_data(info.task_data, timeout_s=self.config.policy_wait_s)
        except (ShardUnavailable, SwarmError, TimeoutError, OSError) as e:
            raise WorkError(f"could not fetch the run's task data ({info.task_data.sha256[:12]}): {e}") from e
        return info.task.model_copy(update={"name": f"jsonl:{path}"})

    def _score(self, task, info: RunInfo, step: int, sampled, prompts, completions) -> list[RolloutRow]:
        n = info.completions_per_prompt
        scored = []
        for i, c in enumerate(completions):
            s = sampled[i // n]
            text = self.tokenizer.decode(c.output_tokens, skip_special_tokens=True)
            scored.append(completion_reward(task, info.task, task.problem(s.problem_index), text, s.target_length,
                                            len(c.output_tokens)))
        rewards = np.array([r for r, _, _ in scored], dtype=np.float32).reshape(len(prompts), n)
        advantages = group_advantages(rewards).reshape(-1)
        self.status.last_reward = float(rewards.mean())
        return [
            RolloutRow(problem_index=sampled[i // n].problem_index, input_tokens=prompts[i // n],
                       output_tokens=c.output_tokens, output_logprobs=c.output_logprobs,
                       advantage=float(advantages[i]), reward=reward, task_reward=task_reward,
                       length_penalty=penalty, proof=c.proofs, step=step,
                       target_length=sampled[i // n].target_length, finish_reason=c.finish_reason)
            for i, (c, (reward, task_reward, penalty)) in enumerate(zip(completions, scored, strict=True))
        ]

    def write(self, batch: RolloutBatch) -> Path:
        data = rollouts_to_bytes(batch)
        path = self.outbox / f"{batch.meta.policy_step:08d}-{batch.meta.batch_counter:06d}-" \
                             f"{hashlib.sha256(data).hexdigest()[:16]}.parquet"
        atomic_write(path, [data])
        self._commit_batch_counter(batch.meta.policy_step, batch.meta.batch_counter)
        self.status.pending = self._pending()
        return path

    # ------------------------------------------------------------------ submit

    def submit(self, path: Path, info: RunInfo) -> Verdict | None:
        """Sign and send one rollout file; the file leaves the outbox only once a verdict came back."""
        if not self.pipelined:  # pipelined, the loop is generating meanwhile and says so
            self.status.state = "submitting"
        data = path.read_bytes()
        batch = read_rollouts(data)
        header = SubmissionHeader(policy_step=batch.meta.policy_step, batch_counter=batch.meta.batch_counter,
                                  num_completions=len(batch.rows), num_tokens=batch.num_output_tokens,
                                  file_sha256=hashlib.sha256(data).hexdigest(), file_size=len(data))
        envelope = seal(self.identity, MessageKind.SUBMISSION, self.swarm.run_id, encode_submission(header, data))
        sent_at = time.monotonic()
        try:
            answer = self.swarm.call(self.coordinator_key, SUBMIT_RPC, envelope, timeout=self.config.submit_timeout_s)
            signed = open_envelope(answer, run_id=self.swarm.run_id, kinds={MessageKind.VERDICT},
                                   expected_sender=self.coordinator_key)
            verdict = decode_body(Verdict, signed.body)
        except (SwarmError, TimeoutError, WireRejected) as e:
            self.status.pending = self._pending()
            raise WorkError(f"the coordinator did not answer ({e}); the batch stays in the outbox and is retried") from e
        if verdict.reason == IN_FLIGHT:  # an earlier copy is still being validated: its verdict comes on a resend
            raise WorkError("the coordinator is still validating an earlier copy of this batch; it is retried")
        if verdict.reason == RECEIVED:  # stored; a validator judges it: its verdict is asked for by hash
            self._keep_signed(path, envelope)
            self.received.mkdir(exist_ok=True)
            self._sent_at[path.name] = sent_at
            os.replace(path, self.received / path.name)
            if not self.pipelined:
                return self._await_verdict(self.received / path.name)
            return None
        self._keep_signed(path, envelope)
        return self._verdict_in(path, verdict, sent_at, asked=False)

    def _verdict_in(self, path: Path, verdict: Verdict, sent_at: float, asked: bool) -> Verdict:
        if verdict.reason == STALE_POLICY:  # the run moved on without us seeing it: our DHT view is behind
            self.swarm.rebootstrap_soon()
        self._record(path, verdict, latency_s=time.monotonic() - sent_at, asked=asked)
        self.num_batches += 1
        return verdict

    def poll_verdicts(self) -> int:
        """Ask for the verdicts of received files, oldest first; returns how many are still being judged.
        A file the coordinator no longer holds (`unknown_file`) goes back to the outbox to be sent again."""
        waiting = 0
        for path in sorted(self.received.glob("*.parquet")):
            verdict = self.ask_verdict(path)
            if verdict.reason == RECEIVED:
                waiting += 1
            elif verdict.reason == UNKNOWN_FILE:
                logger.warning("%s: the coordinator holds no copy any more; sending it again", path.name)
                os.replace(path, self.outbox / path.name)
            else:
                self._verdict_in(path, verdict, self._sent_at.pop(path.name, time.monotonic()), asked=True)
        return waiting

    def ask_verdict(self, path: Path) -> Verdict:
        sha = hashlib.sha256(path.read_bytes()).digest()
        try:
            answer = self.swarm.call(self.coordinator_key, VERDICT_RPC, sha, timeout=min(60.0, self.config.submit_timeout_s))
            signed = open_envelope(answer, run_id=self.swarm.run_id, kinds={MessageKind.VERDICT},
                                   expected_sender=self.coordinator_key)
            verdict = decode_body(Verdict, signed.body)
        except (SwarmError, TimeoutError, WireRejected) as e:
            raise WorkError(f"the coordinator did not answer a verdict question ({e}); asking again") from e
        if verdict.file_sha256 != sha.hex():
            raise WorkError(f"the coordinator answered for another file ({verdict.file_sha256[:12]}); asking again")
        return verdict

    def _await_verdict(self, path: Path) -> Verdict | None:
        """Depth 0: wait here for a received file's verdict (up to submit_timeout_s, then the loop goes on)."""
        deadline = time.monotonic() + self.config.submit_timeout_s
        while not self.stop.is_set() and time.monotonic() < deadline:
            if not self.poll_verdicts():
                return None
            self.stop.wait(0.5)
        return None

    def flush_outbox(self, info: RunInfo) -> None:
        """Resend files that got no verdict; report those too stale to be trained on."""
        for path in sorted(self.outbox.glob("*.parquet")):
            policy_step = int(path.name.split("-", 1)[0])
            if policy_step < info.collect_step - info.async_level:
                path.rename(path.with_suffix(".expired"))
                self.status.expired += 1
                logger.warning("%s expired: policy %s is older than the collected step %s - async level %s",
                               path.name, policy_step, info.collect_step, info.async_level)
                continue
            self.submit(path, info)
        if not self.pipelined:
            for path in sorted(self.received.glob("*.parquet")):  # received before a restart
                self._await_verdict(path)

    def _record(self, path: Path, verdict: Verdict, latency_s: float, asked: bool) -> None:
        self.status.submitted += 1
        if verdict.accepted:
            self.status.accepted += 1
            self.status.credit += verdict.credit_tokens
        else:
            self.status.rejected += 1
            self.status.last_rejection = f"{verdict.reason}: {verdict.detail}"[:200]
        with open(self.verdict_log, "a") as f:
            # latency_s: send to signed verdict, the coordinator's validation included; asked: the verdict
            # came from a verdict question (validator workers), not as the submit call's answer
            f.write(json.dumps({"file": path.name, "at": time.time(), "latency_s": round(latency_s, 4),
                                "asked": asked, **verdict.model_dump()}) + "\n")
        path.unlink(missing_ok=True)
        self.status.pending = self._pending()
        self._outbox_changed.set()

    def _keep_signed(self, path: Path, envelope: bytes) -> None:
        """Keep the signed submission (for `intellect-node verify`), the last KEEP_SENT of them."""
        sent = self.config.state_dir / "sent"
        sent.mkdir(exist_ok=True)
        (sent / f"{path.stem}.signed").write_bytes(envelope)
        for old in sorted(sent.glob("*.signed"))[:-KEEP_SENT]:
            old.unlink(missing_ok=True)

    # ------------------------------------------------------------------ helpers

    def _read_counters(self) -> dict:
        try:
            return json.loads(self.counters_path.read_text())
        except (OSError, ValueError):
            return {}

    def _next_batch_counter(self, step: int) -> int:
        """The next batch counter of `step`: 1 + the last one written to the outbox. Counters persist
        across restarts and only advance when a batch is kept, so they stay contiguous: the
        coordinator refuses a counter that skips ahead, and answers each seed's prompts once."""
        return int(self._read_counters().get(str(step), 0)) + 1

    def _commit_batch_counter(self, step: int, counter: int) -> None:
        counters = self._read_counters()
        counters = {k: v for k, v in counters.items() if int(k) >= step - 16}
        counters[str(step)] = max(counter, int(counters.get(str(step), 0)))
        tmp = self.counters_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(counters))
        os.replace(tmp, self.counters_path)

    def _wait_if_paused(self) -> None:
        """No new batch while paused. Pipelined, the batches already made are still sent and judged (they
        would go stale): the state reads "paused" once none is left, or while the submitter is failing."""
        while not self.resume.is_set() and not self.stop.is_set():
            draining = self.pipelined and self._pending() and not self._errors["submit"]
            self.status.state = "submitting" if draining else "paused"
            self.resume.wait(0.2)

    def _show_error(self, source: str, message: str) -> None:
        """status.error shows the work loop's and the submitter's last failures until each succeeds."""
        self._errors[source] = message
        self.status.error = "; ".join(m for m in self._errors.values() if m)

    def _fail(self, message: str) -> None:
        logger.warning("work loop: %s", message)
        self.status.state = "error"
        self._show_error("loop", message)
        self.status.restarts += 1
        self.stop.wait(self.config.restart_backoff_s)

    def _die(self, message: str) -> None:
        logger.error("work loop stopped: %s", message)
        self.fatal = self.status.error = message
        self.status.state = "failed"
        self.stop.set()

    def _done(self) -> bool:
        return self.config.max_batches is not None and self.num_batches >= self.config.max_batches

    def pause(self, paused: bool) -> None:
        self.status.paused = paused
        (self.resume.clear if paused else self.resume.set)()

    def close(self) -> None:
        self.stop.set()
        self.resume.set()
        if self.engine is not None:
            self.engine.close()
