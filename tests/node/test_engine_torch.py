"""The torch engine: batching, seeds, stopping, log-probs, proofs that the prefill verifier accepts,
and in-place weight reload. Real (tiny random / SmolLM2) models, no mocks."""

import pytest
import torch

from intellect.node.engine import (
    AutoEngineConfig,
    SamplingParams,
    TorchEngineConfig,
    VllmEngineConfig,
    parse_engine_config,
    setup_engine,
)
from intellect.protocol.model import load_model, tiny_model_dir
from intellect.protocol.toploc import expected_proof_bytes
from intellect.protocol.toploc_torch import verify_completions

PROMPTS = [[1, 504, 3181, 314, 253], [1, 2683, 17], [1, 9, 48, 2001, 32, 5, 77, 4001], [1, 330, 8, 9]]


@pytest.fixture(scope="module")
def engine(tiny_model_path):
    """bf16 engine on the tiny random model (the dtype proofs are made in)."""
    eng = setup_engine(TorchEngineConfig(max_batch_size=8), tiny_model_path)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def engine32(tiny_model_path):
    """fp32 engine: exact comparisons against references without bf16 rounding noise."""
    eng = setup_engine(TorchEngineConfig(dtype="float32", max_batch_size=8), tiny_model_path)
    yield eng
    eng.close()


def test_config_is_a_tagged_union():
    assert isinstance(parse_engine_config({"type": "torch"}), TorchEngineConfig)
    cfg = parse_engine_config({"type": "vllm", "gpu_memory_fraction": 0.5})
    assert isinstance(cfg, VllmEngineConfig) and cfg.dtype == "auto"
    with pytest.raises(ValueError):
        parse_engine_config({"type": "torch", "gpu_memory_fraction": 0.5})  # vLLM-only field
    with pytest.raises(ValueError):
        parse_engine_config({"type": "tensorrt"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto picks vLLM where a GPU is present")
def test_auto_picks_torch_without_gpu(tiny_model_path):
    eng = setup_engine(AutoEngineConfig(), tiny_model_path)
    assert eng.name == "torch" and eng.device == "cpu"


def test_batched_greedy_matches_hf_generate_per_prompt(engine32):
    """Left padding, attention mask and position ids are right: the batch reproduces each prompt
    run alone through transformers' own generate()."""
    out = engine32.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=12), seeds=[0] * 4)
    for prompt, comp in zip(PROMPTS, out):
        ref = engine32.model.generate(torch.tensor([prompt], device=engine32.device), max_new_tokens=12,
                                      do_sample=False,
                                      eos_token_id=sorted(engine32.eos_ids))[0, len(prompt):].tolist()
        assert comp.output_tokens == ref
        assert comp.finish_reason == ("stop" if ref[-1] in engine32.eos_ids else "length")


def test_logprobs_are_those_of_the_sampling_distribution(engine32):
    temperature = 0.7
    out = engine32.generate(PROMPTS, SamplingParams(temperature=temperature, max_tokens=10), seeds=[1, 2, 3, 4])
    for prompt, comp in zip(PROMPTS, out):
        seq = torch.tensor([prompt + comp.output_tokens], device=engine32.device)
        logits = engine32.model(seq).logits[0, len(prompt) - 1:-1].float().cpu()  # [n_out, V]
        ref = torch.log_softmax(logits / temperature, -1).gather(1, torch.tensor(comp.output_tokens)[:, None])
        assert torch.allclose(torch.tensor(comp.output_logprobs), ref[:, 0], atol=1e-4)


def test_seeds_fix_the_sample_and_differ_between_sequences(engine):
    params = SamplingParams(temperature=1.0, max_tokens=16)
    a = engine.generate(PROMPTS, params, seeds=[5, 6, 7, 8])
    b = engine.generate(PROMPTS, params, seeds=[5, 6, 7, 8])
    c = engine.generate(PROMPTS, params, seeds=[9, 10, 11, 12])
    assert [x.output_tokens for x in a] == [x.output_tokens for x in b]
    assert [x.proofs for x in a] == [x.proofs for x in b]
    assert [x.output_tokens for x in a] != [x.output_tokens for x in c]
    # The same prompt twice in one batch with different seeds gives different samples.
    d = engine.generate([PROMPTS[0], PROMPTS[0]], params, seeds=[1, 2])
    assert d[0].output_tokens != d[1].output_tokens


def test_stop_token_ends_only_its_sequence(engine32):
    """A sequence that stops is dropped from the batch; the others carry on unchanged."""
    free = engine32.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=12), seeds=[0] * 4)
    others = {t for f in (free[0], free[1], free[3]) for t in f.output_tokens}
    stop_id = next(t for t in free[2].output_tokens[:-1] if t not in others)
    cut = engine32.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=(stop_id,)),
                            seeds=[0] * 4)
    for f, c in zip(free, cut):
        if stop_id in f.output_tokens:
            k = f.output_tokens.index(stop_id)
            assert c.output_tokens == f.output_tokens[:k + 1] and c.finish_reason == "stop"
        else:
            assert c.output_tokens == f.output_tokens and c.finish_reason == f.finish_reason
    assert len(cut[2].output_tokens) < len(free[2].output_tokens)


def test_max_model_len_caps_output(tiny_model_path):
    eng = setup_engine(TorchEngineConfig(max_model_len=16, dtype="float32"), tiny_model_path)
    out = eng.generate([PROMPTS[2]], SamplingParams(temperature=0.0, max_tokens=100, stop_token_ids=()), seeds=[0])
    assert len(out[0].output_tokens) <= 16 - len(PROMPTS[2])
    with pytest.raises(ValueError, match="max_model_len"):
        eng.generate([[1] * 16], SamplingParams(max_tokens=4), seeds=[0])
    with pytest.raises(ValueError, match="seeds"):
        eng.generate(PROMPTS, SamplingParams(), seeds=[0])


def test_proofs_verify_and_wrong_weights_fail(engine, model_cache_dir, tiny_model):
    """70 tokens -> 69 decode rows -> 3 proofs (32 + 32 + 5): streamed full chunks and the tail."""
    params = SamplingParams(temperature=1.0, max_tokens=70)
    out = engine.generate(PROMPTS, params, seeds=[1, 2, 3, 4])
    outputs = [c.output_tokens for c in out]
    for c in out:
        assert len(c.proofs) == expected_proof_bytes(len(c.output_tokens))
    assert max(map(len, outputs)) == 70
    model, _ = tiny_model
    checks = verify_completions(model, PROMPTS, outputs, [c.proofs for c in out], temperature=1.0)
    assert all(ch.accepted for ch in checks), [ch.chunks for ch in checks]
    other, _ = load_model(tiny_model_dir(model_cache_dir, seed=1))
    checks = verify_completions(other, PROMPTS, outputs, [c.proofs for c in out], temperature=1.0)
    assert not any(ch.accepted for ch in checks)
    off = engine.generate(PROMPTS, params.model_copy(update={"proofs": False}), seeds=[1, 2, 3, 4])
    assert [c.output_tokens for c in off] == outputs and all(c.proofs == b"" for c in off)


def test_load_weights_swaps_the_policy_in_place(tiny_model_path, model_cache_dir):
    params = SamplingParams(temperature=0.0, max_tokens=8)
    eng = setup_engine(TorchEngineConfig(dtype="float32"), tiny_model_path)
    before = eng.generate(PROMPTS, params, seeds=[0] * 4)
    new_dir = tiny_model_dir(model_cache_dir, seed=1)
    eng.load_weights(new_dir)
    fresh = setup_engine(TorchEngineConfig(dtype="float32"), new_dir)
    after, expected = eng.generate(PROMPTS, params, seeds=[0] * 4), fresh.generate(PROMPTS, params, seeds=[0] * 4)
    assert [c.output_tokens for c in after] == [c.output_tokens for c in expected]
    assert [c.output_tokens for c in after] != [c.output_tokens for c in before]
    with pytest.raises(ValueError):
        eng.load_weights(model_cache_dir)  # no safetensors there


def test_tokens_do_not_depend_on_the_batch_and_the_prefill_redraws_them(engine, tiny_model):
    """Seeded sampling: a sequence gets the same tokens alone or batched with others, and the
    validator's prefill re-draws every one of them (no mismatch)."""
    params = SamplingParams(temperature=1.0, max_tokens=20)
    seeds = [11, 12, 13, 14]
    batched = engine.generate(PROMPTS, params, seeds=seeds)
    alone = [engine.generate([p], params, seeds=[s])[0] for p, s in zip(PROMPTS, seeds)]
    assert [c.output_tokens for c in batched] == [c.output_tokens for c in alone]
    model = tiny_model[0]
    checks = verify_completions(model, PROMPTS, [c.output_tokens for c in batched], [c.proofs for c in batched],
                                temperature=1.0, seeds=seeds)
    assert all(ch.accepted and ch.tokens.mismatch == 0 for ch in checks)
    assert sum(ch.tokens.exact for ch in checks) >= 0.9 * sum(len(c.output_tokens) for c in batched)
    wrong = verify_completions(model, PROMPTS, [c.output_tokens for c in batched], [c.proofs for c in batched],
                               temperature=1.0, seeds=[s + 100 for s in seeds])
    assert all(ch.tokens.mismatch > 0 for ch in wrong)  # another seed's noise: the tokens do not re-draw


@pytest.mark.slow
def test_smollm2_stops_at_end_of_turn_and_proves(smollm2_path, smollm2):
    """The real model answers a chat prompt, stops on <|im_end|>, and its proofs verify."""
    eng = setup_engine(TorchEngineConfig(max_batch_size=4), smollm2_path)
    tok = eng.tokenizer
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in eng.eos_ids
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                       return_dict=False) for q in ("Say hello.", "What is 2 + 3?")]
    out = eng.generate(prompts, SamplingParams(temperature=0.6, max_tokens=80), seeds=[0, 1])
    assert any(c.finish_reason == "stop" and c.output_tokens[-1] == im_end for c in out)
    checks = verify_completions(smollm2[0], prompts, [c.output_tokens for c in out], [c.proofs for c in out],
                                temperature=0.6, seeds=[0, 1])
    assert all(ch.accepted and ch.tokens.mismatch == 0 for ch in checks)
