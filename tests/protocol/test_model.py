"""Model loader: tiny random checkpoint folders, SmolLM2 conversion, process-safe caching."""

import json
import subprocess
import sys

import pytest
import torch

from intellect.protocol.model import load_model, model_config_hash, tiny_model_dir


def test_tiny_model_loads_like_a_checkpoint(tiny_model_path, tiny_model):
    model, tok = tiny_model
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in tiny_model_path.iterdir()
    }
    assert model.dtype == torch.float32 and not model.training  # compute_dtype on a CPU
    assert (model.config.vocab_size, model.config.hidden_size, model.config.num_hidden_layers) == (
        49152,
        64,
        2,
    )
    assert len(tok) == 49152 and tok.eos_token_id == model.config.eos_token_id
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\nhi<|im_end|>" in chat


def test_tiny_model_is_cached_and_seeded(model_cache_dir, tiny_model_path):
    before = (tiny_model_path / "model.safetensors").stat().st_mtime_ns
    assert tiny_model_dir(model_cache_dir, seed=0) == tiny_model_path
    assert (tiny_model_path / "model.safetensors").stat().st_mtime_ns == before  # not rebuilt
    other = tiny_model_dir(model_cache_dir, seed=1)
    assert model_config_hash(other) == model_config_hash(tiny_model_path)  # same architecture
    a, _ = load_model(tiny_model_path, torch.float32)
    b, _ = load_model(other, torch.float32)
    assert not torch.equal(a.model.embed_tokens.weight, b.model.embed_tokens.weight)


def test_config_hash_ignores_writer_fields_only(tmp_path, tiny_model_path):
    cfg = json.loads((tiny_model_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "transformers_version": "0.0"}))
    assert model_config_hash(tmp_path) == model_config_hash(tiny_model_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "hidden_size": 65}))
    assert model_config_hash(tmp_path) != model_config_hash(tiny_model_path)


def test_load_model_refuses_non_checkpoints(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a JSON object"):
        model_config_hash(tmp_path)


def test_concurrent_builds_share_one_folder(model_cache_dir, tiny_model_path):
    # two processes race for the same new folder: both get it, the lock + rename leave no debris
    code = (
        "import sys; from pathlib import Path; from intellect.protocol.model import tiny_model_dir;"
        "print(tiny_model_dir(Path(sys.argv[1]), seed=7))"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(model_cache_dir)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0] == outs[1] == str(model_cache_dir / "tiny-llama-seed7")
    assert not [
        p for p in model_cache_dir.iterdir() if p.is_dir() and p.name.startswith(".tiny-llama-seed7.")
    ]
    load_model(model_cache_dir / "tiny-llama-seed7")


@pytest.mark.slow
def test_smollm2_conversion_generates_sensibly(smollm2_path, smollm2):
    model, tok = smollm2
    cfg = json.loads((smollm2_path / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["hidden_size"] == 576
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1] :])
