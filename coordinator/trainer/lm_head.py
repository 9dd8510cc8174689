"""Log-probs of target tokens and the entropy of each prediction, chunk by chunk over tokens.

The dense way (`loss.token_logprobs`) materialises [tokens, vocab] fp32 logits and several tensors
of that size for softmax and backward: at 4k tokens and a 150k vocabulary that is gigabytes per
row. `chunked_logprobs` takes the final hidden states and the LM-head weight instead and never
holds more than `chunk_tokens` rows of logits: the forward keeps only log Z and the entropy per
token, and the backward recomputes each chunk's logits (prime-rl's FusedLmHead pattern).

Gradients: d logp_t / dz_j = 1[j = y_t] - p_j and d H_t / dz_j = -p_j (log p_j + H_t), z = logits / tau.
The entropy gets a gradient only when the caller back-propagates through it (the entropy bonus);
otherwise its gradient arrives as None and costs nothing. `final_hidden_states` runs a transformers
causal LM up to its final norm (through the model's own forward, so FSDP2's hooks still fire).
This module knows tensors and a causal LM's shape only: no loss, no packing, no optimizer.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor


class _ChunkedLogProbEntropy(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, inv_tau: float, chunk: int):
        # hidden [N, H], weight [V, H], targets [N] -> (logprobs [N], entropy [N]) float32
        n = hidden.shape[0]
        logprobs = torch.empty(n, device=hidden.device, dtype=torch.float32)
        entropy = torch.empty_like(logprobs)
        log_z = torch.empty_like(logprobs)
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            z = (hidden[start:stop] @ weight.t()).float() * inv_tau  # [c, V]
            lz = torch.logsumexp(z, dim=-1)
            logp = z.sub_(lz[:, None])  # in place: one [c, V] buffer less
            log_z[start:stop] = lz
            logprobs[start:stop] = logp.gather(1, targets[start:stop, None])[:, 0]
            entropy[start:stop] = -(logp.exp() * logp).sum(-1)  # -sum p log p: no log Z - E[z] cancellation
        ctx.set_materialize_grads(False)  # an unused entropy output gets None, not a zero tensor
        ctx.save_for_backward(hidden, weight, targets, log_z, entropy)
        ctx.inv_tau, ctx.chunk = inv_tau, chunk
        return logprobs, entropy

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_logprobs: Tensor | None, grad_entropy: Tensor | None):
        hidden, weight, targets, log_z, entropy = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight) if need_weight else None
        if grad_logprobs is None and grad_entropy is None:
            return grad_hidden, grad_weight, None, None, None
        for start in range(0, hidden.shape[0], ctx.chunk):
            stop = min(start + ctx.chunk, hidden.shape[0])
            h = hidden[start:stop]
            logp = ((h @ weight.t()).float() * ctx.inv_tau).sub_(log_z[start:stop, None])
            p = logp.exp()
            grad_z = torch.zeros_like(logp)
            if grad_logprobs is not None:
                g = grad_logprobs[start:stop].float()
                grad_z.sub_(g[:, None] * p).scatter_add_(1, targets[start:stop, None], g[:, None])
            if grad_entropy is not None:
                # z - E_p[z] = log p + H
                g = grad_entropy[start:stop].float()
                grad_z.sub_(logp.add_(entropy[start:stop, None]).mul_(p).mul_(g[:, None]))
            grad_logits = grad_z.mul_(ctx.inv_tau)
            if need_hidden:
                grad_hidden[start:stop] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_weight:
                grad_weight.add_((grad_logits.t().to(h.dtype) @ h).to(weight.dtype))
        return grad_hidden, grad_weight, None, None, None


CHUNK_ELEMENTS = 1 << 24  # logits per chunk when the caller does not say: 64 MiB in fp32


def chunked_logprobs(
    hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float, chunk_tokens: int | None = None
) -> tuple[Tensor, Tensor]:
    """hidden [..., H] (the LM-head input), weight [V, H], targets [...] -> (logprobs, entropy) [...].

    log p(target) and the entropy of softmax(hidden @ weight.T / tau), float32, chunk_tokens rows
    of logits at a time in forward and in backward (None: CHUNK_ELEMENTS / vocab rows). The
    working set is about four such chunks, whatever the number of tokens.
    """
    if chunk_tokens is None:
        chunk_tokens = max(1, CHUNK_ELEMENTS // weight.shape[0])
    shape = targets.shape
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    logprobs, entropy = _ChunkedLogProbEntropy.apply(
        flat_hidden, weight, targets.reshape(-1), 1.0 / temperature, chunk_tokens
    )
    return logprobs.view(shape), entropy.view(shape)


def supports_chunking(model: torch.nn.Module) -> str | None:
    """None when `chunked_logprobs` computes exactly what the model's logits would; else why not."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        return "the LM head is not a plain linear layer"
    if head.bias is not None:
        return "the LM head has a bias"
    if getattr(model.config, "final_logit_softcapping", None):
        return "the model soft-caps its logits"
    if getattr(model.config, "logit_scale", None) not in (None, 1, 1.0):
        return "the model scales its logits"
    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        return "the model's forward has no logits_to_keep"
    return None


def final_hidden_states(model: torch.nn.Module, **inputs) -> Tensor:
    """The LM-head input [R, S, H] from one forward of the whole model.

    Calling the model itself (not its decoder) keeps FSDP2's root hooks, which gather and later
    reduce the embedding and LM-head weights; `logits_to_keep=1` makes the head it runs cost one
    position per row. A hook on the decoder catches its last hidden state on the way.
    """
    caught: list[Tensor] = []

    def catch(_module, _args, output):
        caught.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

    handle = model.get_decoder().register_forward_hook(catch)
    try:
        model(**inputs, logits_to_keep=1)
    finally:
        handle.remove()
    return caught[0]
