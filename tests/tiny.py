"""Tiny models for tests: a byte-level BPE tokenizer trained here and a 2-layer Llama built
from a config, saved as an ordinary local Hugging Face folder. Nothing comes from a hub."""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Human preference data says which answer is better.",
    "What is the capital of France? Paris is the capital of France.",
    "Please write a short poem about the sea and the sky.",
    "I cannot help with that, but here is something safer to try.",
    "yes no maybe hello world thanks sorry good bad answer question",
] * 20


def build_tokenizer(vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
        pad_token="<|endoftext|>", unk_token="<|endoftext|>", model_max_length=256,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(tokenizer, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def save_tiny_model(path: Path, seed: int = 0) -> Path:
    path = Path(path)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=seed)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# PPO on the tiny model (tests/align/test_ppo.py, bench/ppo_tiny.py): questions, a model taught to
# answer them with the corpus sentences, and the rule-based reward.
PPO_QUESTIONS = ["Say something.", "Tell me a sentence.", "What do you think?", "Answer me."]
PPO_PROMPTS = [[{"role": "user", "content": q}] for q in PPO_QUESTIONS]


def teach_sentences(model, tokenizer, steps: int = 100):
    """From random weights to a model that answers any question with one of the corpus sentences
    (each about equally likely), so that PPO has behaviour to shift."""
    import torch

    sentences = sorted(set(CORPUS))
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}, {"role": "assistant", "content": s}], tokenize=False
        )
        for q in PPO_QUESTIONS for s in sentences
    ]
    batch = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def says_yes(prompts, responses):
    """The rule-based reward: 1 for an answer that holds "yes", else 0."""
    import torch

    return torch.tensor([float("yes" in response) for response in responses])
