"""Attention for serving: one query token attends through two plain matmuls.

On these CPUs, PyTorch's scaled-dot-product attention runs a decoding step in bf16 (one query
token against the cached keys) through its blocked flash kernel, whose set-up dominates such a
small product: 139 µs per layer against 32 µs in fp32. With 16 answers of 300 tokens decoded
together, attention took more than half of each step (SmolLM2-135M, 2 cores: 97 ms a step
with SDPA, 41 ms with this). `decode_attention` computes the one-token case as transformers'
eager attention does (bf16 matmuls, softmax in fp32), with the query heads grouped over their
shared key/value head instead of repeating the keys; every other case (prompts, training) goes
to transformers' SDPA function unchanged. It is registered with transformers'
`AttentionInterface` under `DECODE_ATTENTION`, with SDPA's mask function, and the policy
server loads its model with it (`attn_implementation=DECODE_ATTENTION`).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

DECODE_ATTENTION = "rankloop_decode"


def decode_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs):
    """Attention of `query` [batch, heads, q, dim] over `key`/`value` [batch, kv heads, kv, dim];
    for one query token by matmuls, else by SDPA. `attention_mask` is SDPA's: None, or a
    boolean [batch, 1, q, kv] (True: attend) or additive float mask."""
    if query.shape[2] != 1 or module.training:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, dim)  # the query heads sharing each kv head
    scores = torch.matmul(grouped, key.transpose(2, 3)) * (scaling if scaling is not None else dim ** -0.5)
    if attention_mask is not None:
        mask = attention_mask[:, :, -1:, : key.shape[2]]  # [batch, 1, 1, kv]: broadcast over every head
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs, value).reshape(batch, heads, 1, dim)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(DECODE_ATTENTION, decode_attention)
AttentionMaskInterface.register(DECODE_ATTENTION, sdpa_mask)
