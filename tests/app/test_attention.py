"""Serving attention (app/attention.py): one query token by plain matmuls, equal to SDPA."""

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from app.attention import DECODE_ATTENTION, decode_attention


class Layer(torch.nn.Module):
    """What the attention functions read from a Llama attention layer."""

    def __init__(self, heads, kv_heads):
        super().__init__()
        self.num_key_value_groups = heads // kv_heads
        self.is_causal = True


def inputs(batch=3, heads=9, kv_heads=3, q=1, kv=12, dim=16, dtype=torch.float32, padded=True):
    torch.manual_seed(0)
    query = torch.randn(batch, heads, q, dim, dtype=dtype)
    key, value = (torch.randn(batch, kv_heads, kv, dim, dtype=dtype) for _ in range(2))
    mask = None
    if padded:  # left padding: row i ignores its first 2*i cached positions
        mask = torch.ones(batch, 1, q, kv, dtype=torch.bool)
        for i in range(batch):
            mask[i, :, :, : 2 * i] = False
    return Layer(heads, kv_heads).eval(), query, key, value, mask


@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 4)])
def test_one_query_token_attends_as_sdpa_does(padded, heads, kv_heads):
    layer, query, key, value, mask = inputs(heads=heads, kv_heads=kv_heads, padded=padded)
    ours, _ = decode_attention(layer, query, key, value, mask, scaling=0.25)
    expected, _ = sdpa_attention_forward(layer, query, key, value, mask, scaling=0.25)
    assert ours.shape == expected.shape == (3, 1, heads, 16)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_an_additive_float_mask_works_too():
    layer, query, key, value, mask = inputs()
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    torch.testing.assert_close(decode_attention(layer, query, key, value, additive)[0],
                               decode_attention(layer, query, key, value, mask)[0])


def test_in_bf16_it_stays_within_bf16_rounding_of_sdpa():
    layer, query, key, value, mask = inputs(dtype=torch.bfloat16, kv=300, dim=64)
    ours, _ = decode_attention(layer, query, key, value, mask)
    expected, _ = sdpa_attention_forward(layer, query, key, value, mask)
    torch.testing.assert_close(ours.float(), expected.float(), rtol=0.02, atol=0.02)


def test_prompts_and_training_go_to_sdpa_unchanged():
    layer, query, key, value, _ = inputs(q=12, padded=False)
    torch.testing.assert_close(decode_attention(layer, query, key, value, None)[0],
                               sdpa_attention_forward(layer, query, key, value, None)[0])
    layer.train()
    _, query, key, value, mask = inputs()
    torch.testing.assert_close(decode_attention(layer, query, key, value, mask)[0],
                               sdpa_attention_forward(layer, query, key, value, mask)[0])


def test_a_model_generates_the_same_with_it(tiny_model_dir):
    from align.models import load_causal_lm

    sdpa, ours = load_causal_lm(tiny_model_dir), load_causal_lm(tiny_model_dir, attn_implementation=DECODE_ATTENTION)
    assert ours.config._attn_implementation == DECODE_ATTENTION
    ids = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])  # the first row left-padded
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.inference_mode():
        kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert ours.generate(**kwargs).tolist() == sdpa.generate(**kwargs).tolist()


def test_the_policy_server_serves_with_it(server):
    assert server._plain.config._attn_implementation == DECODE_ATTENTION
