"""Small stores for align tests: a few preference pairs imported the way users import them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

TOPICS = ["the sea", "the sky", "France", "a poem", "dogs", "foxes", "good answers", "questions", "thanks", "the world"]

# Round settings that keep a round on the tiny model to a few seconds.
FAST_TRAINING = {"max_steps": 2, "batch_size": 2, "precision": "fp32", "lora_r": 4, "lora_alpha": 8, "learning_rate": 1e-2,
                 "logging_steps": 1}
FAST_EVAL = {"eval_pairs": 4, "eval_prompts": 2, "eval_max_new_tokens": 4, "eval_samples": 1, "gate_prompts": 4}


def write_pairs(path: Path, n: int = 24, start: int = 0) -> Path:
    """A TRL conversational preference file with `n` distinct prompts."""
    with Path(path).open("w", encoding="utf-8") as f:
        for i in range(start, start + n):
            topic = TOPICS[i % len(TOPICS)]
            f.write(json.dumps({
                "prompt": [{"role": "user", "content": f"Tell me about {topic}, please ({i})."}],
                "chosen": [{"role": "assistant", "content": f"Here is a good answer about {topic}. yes thanks"}],
                "rejected": [{"role": "assistant", "content": "no sorry bad"}],
            }) + "\n")
    return Path(path)


def import_pairs(db, folder: Path, n: int = 24, start: int = 0, heldout_fraction: float = 0.3):
    """Import `n` pairs (about `heldout_fraction` of their prompts land in the held-out split)."""
    from annotations.formats import import_file

    path = write_pairs(Path(folder) / f"pairs-{start}-{n}.jsonl", n, start)
    return import_file(db, path, "trl", queue=False, heldout_fraction=heldout_fraction)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and 2 cores are shared: import this into a test module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
