"""How to hand a block-diagonal mask to a transformers model (checked against transformers 5.19).

Why this exists: transformers' `masking_utils._preprocess_mask_arguments` passes a 4-D attention mask
through unchanged, so each attention implementation receives it raw and wants its own form:
- "sdpa": torch's scaled_dot_product_attention takes a bool mask (True = attend) whatever the
  query dtype; a float mask must match the query dtype, which breaks under bf16 autocast.
- "eager": `attn_weights + attention_mask`, so an additive float mask (0 / dtype min).
- "flash_attention_2"/"flash_attention_3": no dense mask; varlen kernels find the sample boundaries
  from the restarted position ids, so we pass None.
(transformers >= 4.54 also infers packing from position ids when the mask is None, but only when
nothing else is passed; we do not rely on it, so older versions stay correct.)
"""

from __future__ import annotations

import torch
from torch import Tensor

_VARLEN = ("flash_attention_2", "flash_attention_3")


def attention_mask_for(model: torch.nn.Module, allowed: Tensor, dtype: torch.dtype) -> Tensor | None:
    """allowed: [R, 1, S, S] bool -> the mask `model` expects for it (None for varlen flash kernels).

    dtype is the dtype attention scores are computed in (for the additive eager mask).
    """
    implementation = getattr(model.config, "_attn_implementation", None) or "eager"
    if implementation in _VARLEN:
        return None
    if implementation == "sdpa":
        return allowed
    if implementation == "eager":
        additive = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return additive.masked_fill_(~allowed, torch.finfo(dtype).min)
    raise ValueError(f"no packed-attention mask known for attn_implementation={implementation!r}")
