"""Held-out evaluation: a finished policy checkpoint scored on the task's held-out problems, greedy and
mean@k, in a background thread so the policy loop keeps training while it runs.

The problems are the held-out split's first `eval.num_problems` (the same ones at every step, so the
curve compares like with like); they are never drawn for training (`setup_task(..., "heldout")`).
Sampling uses the protocol's seeded sampler with fixed seeds per (problem, sample): two evaluations of
one policy give the same numbers, and no torch RNG is touched. Scores are task rewards (1 right, 0
wrong), without length penalties.

What this module does not know: the swarm, the trainer, or where results go (a callback takes each).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from intellect.coordinator.config import CoordinatorConfig
from intellect.protocol.tasks import Task, grade_with_timeout, prompt_token_ids, setup_task

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalResult:
    policy_step: int
    heldout_greedy: float  # share of problems the greedy completion answers right
    heldout_mean_at_k: float  # mean task reward over k sampled completions per problem
    k: int
    temperature: float
    num_problems: int
    eval_s: float

    def line(self) -> dict:
        """The metrics.jsonl line (kind "eval" tells it from the train-step lines)."""
        return {"kind": "eval"} | asdict(self) | {"at": time.time()}


def sample_seed(problem_index: int, sample: int) -> int:
    digest = hashlib.sha256(f"intellect-node/heldout-eval/v1\0{problem_index}\0{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def generate(model, prompts: list[list[int]], copies: int, temperature: float, seeds: list[int],
             max_new_tokens: int, eos_ids: frozenset[int], pad_id: int) -> list[list[int]]:
    """Output tokens (up to and including an EOS) of `copies` completions of each prompt, in rows
    p * copies + j: copy 0 greedy, the others sampled at `temperature` with seed seeds[row]. One
    prefill per prompt (left-padded batch), its KV cache repeated for the copies; finished rows leave
    the batch."""
    import torch
    from transformers import DynamicCache

    from intellect.protocol.sampling import sample

    num, width = len(prompts), max(map(len, prompts))
    ids = torch.full((num, width), pad_id, dtype=torch.long)
    mask = torch.zeros((num, width), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[r, width - len(p):] = 1
    positions = (mask.cumsum(-1) - 1).clamp_(min=0)
    cache = DynamicCache(config=model.config)
    out: list[list[int]] = [[] for _ in range(num * copies)]
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1].repeat_interleave(copies, 0)
        cache.batch_repeat_interleave(copies)
        mask, next_pos = mask.repeat_interleave(copies, 0), positions[:, -1:].repeat_interleave(copies, 0) + 1
        active = list(range(num * copies))  # the row of `out` each batch row is
        for t in range(max_new_tokens):
            tokens = torch.empty(len(active), dtype=torch.long)
            for rows, temp in (([r for r, i in enumerate(active) if i % copies == 0], 0.0),
                               ([r for r, i in enumerate(active) if i % copies], temperature)):
                if rows:
                    tokens[rows] = sample(logits[rows], temp, [seeds[active[r]] for r in rows], [t] * len(rows))[0]
            keep = []
            for r, (i, v) in enumerate(zip(active, tokens.tolist(), strict=True)):
                out[i].append(v)
                if v not in eos_ids:
                    keep.append(r)
            if not keep or t == max_new_tokens - 1:
                break
            if len(keep) < len(active):
                sel = torch.tensor(keep)
                cache.batch_select_indices(sel)
                mask, tokens, next_pos = mask[sel], tokens[sel], next_pos[sel]
                active = [active[r] for r in keep]
            mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
            logits = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=next_pos,
                           past_key_values=cache, use_cache=True).logits[:, -1]
            next_pos = next_pos + 1
    return out


class HeldoutEval:
    """The run's held-out problems (prompts rendered once), which policies are due, and how a model scores."""

    def __init__(self, config: CoordinatorConfig, tokenizer, eos_ids: frozenset[int]) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.task: Task = setup_task(config.task, "heldout")
        self.num_problems = min(config.eval.num_problems, self.task.num_problems)
        self.problems = [self.task.problem(i) for i in range(self.num_problems)]
        targets = config.task.length_targets
        # with length targets on, the prompt asks for the largest budget (training prompts always ask for one)
        self.prompts = [prompt_token_ids(tokenizer, p, max(targets) if targets else 0, config.task.thinking)
                        for p in self.problems]
        self.temperature = config.eval.temperature or config.rollouts.temperature
        self.max_new_tokens = config.eval.max_new_tokens or config.rollouts.max_new_tokens

    def due(self, policy_step: int) -> bool:
        every = self.config.eval.every
        return every > 0 and (policy_step % every == 0 or policy_step == self.config.max_steps)

    def evaluate(self, model, policy_step: int, stop: threading.Event | None = None) -> EvalResult | None:
        """Greedy and mean@k of `model` on the held-out problems; None if `stop` was set meanwhile."""
        started = time.perf_counter()
        n, k = self.num_problems, self.config.eval.samples
        per_batch = max(1, self.config.eval.batch_size // (k + 1))  # problems whose completions go together
        greedy = sampled = 0.0
        for start in range(0, n, per_batch):
            if stop is not None and stop.is_set():
                return None
            chunk = range(start, min(n, start + per_batch))
            outs = generate(model, [self.prompts[i] for i in chunk], k + 1, self.temperature,
                            [sample_seed(i, j) for i in chunk for j in range(k + 1)], self.max_new_tokens,
                            self.eos_ids, self.tokenizer.pad_token_id or 0)
            for row, tokens in enumerate(outs):
                i, copy = chunk[row // (k + 1)], row % (k + 1)
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                score = grade_with_timeout(self.task, self.problems[i], text, self.config.task.grade_timeout_s)
                if copy == 0:
                    greedy += score
                else:
                    sampled += score
        return EvalResult(policy_step=policy_step, heldout_greedy=greedy / n, heldout_mean_at_k=sampled / (n * k),
                          k=k, temperature=self.temperature, num_problems=n, eval_s=time.perf_counter() - started)


class EvalWorker:
    """A daemon thread that evaluates the checkpoints `submit`ted to it, oldest first, and hands each
    result to `on_result`. A checkpoint is loaded (protocol.model.load_model, on the CPU) when its turn
    comes; one deleted by then (the trainer keeps `keep_checkpoints`) is skipped with a warning."""

    def __init__(self, heldout: HeldoutEval, policy_dir: Callable[[int], Path],
                 on_result: Callable[[EvalResult], None]) -> None:
        self.heldout, self.policy_dir, self.on_result = heldout, policy_dir, on_result
        self.queue: list[int] = []
        self.running: int | None = None  # the policy step being evaluated
        self._cv = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="heldout-eval", daemon=True)
        self._thread.start()

    def submit(self, policy_step: int) -> None:
        with self._cv:
            if policy_step != self.running and policy_step not in self.queue:
                self.queue.append(policy_step)
                self._cv.notify_all()

    def busy(self) -> bool:
        with self._cv:
            return bool(self.queue) or self.running is not None

    def drain(self, stop: threading.Event) -> None:
        """Wait until every submitted step is evaluated, or `stop` is set."""
        with self._cv:
            while (self.queue or self.running is not None) and not stop.is_set():
                self._cv.wait(0.5)

    def close(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        with self._cv:
            self._cv.notify_all()
        self._thread.join(timeout_s)

    def _loop(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self.queue or self._stop.is_set())
                if self._stop.is_set():
                    return
                self.running = self.queue.pop(0)
            try:
                result = self._evaluate(self.running)
                if result is not None:
                    self.on_result(result)
            except Exception as e:  # noqa: BLE001 -- an evaluation never ends the run; the next one may work
                logger.warning("held-out evaluation of policy %s failed: %s: %s", self.running, type(e).__name__, e)
            finally:
                with self._cv:
                    self.running = None
                    self._cv.notify_all()

    def _evaluate(self, step: int) -> EvalResult | None:
        from intellect.protocol.model import load_model

        model, _ = load_model(self.policy_dir(step))
        return self.heldout.evaluate(model, step, self._stop)
