"""Taking a version out (`python -m align export`): the adapter as is, or base and adapter merged
into full weights that plain transformers loads, each with a model card carrying the lineage.

The store is real and its rounds are recorded through the registry the way a round records
them; the adapters are made here with visibly nonzero weights (training is not what is tested),
so a merged model that silently dropped the adapter could not pass for the right one."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from huggingface_hub import ModelCard

from align.__main__ import main
from annotations import model_versions, open_db, round_records, training_data
from annotations.intervals import accuracy
from tests.align.stores import import_pairs, one_thread  # noqa: F401 (one_thread: autouse)

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Please write a short poem about the sea."}],
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hello world"}],
]
HUB_ID = "example/tiny-llama"


def save_policy_adapter(base_dir, out_dir, seed):
    from peft import LoraConfig, get_peft_model

    from align.models import load_causal_lm, load_tokenizer

    torch.manual_seed(seed)
    model = get_peft_model(load_causal_lm(base_dir), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # a fresh LoRA's B is zero: this makes a visibly different policy
    model.save_pretrained(str(out_dir))
    load_tokenizer(base_dir).save_pretrained(str(out_dir))
    return out_dir


def save_reward_adapter(base_dir, out_dir, seed):
    from peft import LoraConfig, get_peft_model

    from align.models import load_tokenizer
    from align.reward import load_sequence_classifier

    torch.manual_seed(seed)
    tokenizer = load_tokenizer(base_dir)
    model = get_peft_model(load_sequence_classifier(base_dir, tokenizer), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS", modules_to_save=["score"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.normal_(0, 0.5)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def record_round(db, home, base_dir, method, parent, metrics, save, seed):
    """A round as `align.rounds.run_round` records one: claimed, version reserved, data
    snapshot stored, folder in place, version registered, round succeeded."""
    round_id = round_records.create_round(db, method, {"max_steps": 2, "parent": parent or "base"})
    round_records.claim_round(db, round_id, os.getpid())
    version = round_records.reserve_version(db, round_id)
    pairs = training_data.select_pairs(db, None, "train")
    round_records.set_round_data(db, round_id, data_hash=training_data.snapshot_hash(pairs), n_pairs=len(pairs),
                            parent_version=parent, code_version="test", base_path=str(base_dir),
                            data_until_pair_id=training_data.pair_watermark(db))
    path = save(base_dir, home / "versions" / version, seed)
    kind = model_versions.method_kind(method)
    model_versions.register_version(db, version, kind, parent, method, round_id, str(path), metrics)
    round_records.finish_round(db, round_id, "succeeded", version=version, metrics=metrics)
    return version


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model_dir):
    """rankloop.db with v1 (SFT on 24 pairs, parent base), v2 (DPO on 30 pairs, parent v1) and
    rm1 (a reward model on 30 pairs). heldout_fraction 0: every pair is a training pair."""
    home = tmp_path_factory.mktemp("export-home")
    db = open_db(home / "rankloop.db")
    import_pairs(db, home, n=24, heldout_fraction=0.0)
    record_round(db, home, tiny_model_dir, "sft", "base", {}, save_policy_adapter, seed=1)
    import_pairs(db, home, n=6, start=24, heldout_fraction=0.0)
    implicit = {"heldout_implicit_accuracy": 0.75, "heldout_implicit_accuracy_interval": accuracy(3, 4)}
    record_round(db, home, tiny_model_dir, "dpo", "v1", implicit, save_policy_adapter, seed=2)
    record_round(db, home, tiny_model_dir, "rm", None, {}, save_reward_adapter, seed=3)
    db.close()
    return home / "rankloop.db"


def export(store, tiny_model_dir, *args) -> int:
    return main(["--db", str(store), "export", *args, "--base", str(tiny_model_dir), "--base-model-id", HUB_ID])


def chat_ids(tokenizer, messages):
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True)["input_ids"]


def peft_logits(tiny_model_dir, adapter, prompts=PROMPTS):
    """Logits of the base with the adapter on, through PEFT (what rankloop serves)."""
    from peft import PeftModel

    from align.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    model = PeftModel.from_pretrained(load_causal_lm(tiny_model_dir), str(adapter)).eval()
    with torch.no_grad():
        with_adapter = [model(input_ids=chat_ids(tokenizer, m)).logits for m in prompts]
        with model.disable_adapter():
            base = [model(input_ids=chat_ids(tokenizer, m)).logits for m in prompts]
    return with_adapter, base


def test_merged_policy_loads_with_plain_transformers_and_matches_base_plus_adapter(store, tiny_model_dir, tmp_path,
                                                                                   capsys):
    out = tmp_path / "v2-merged"
    assert export(store, tiny_model_dir, "v2", "--out", str(out), "--merged") == 0
    assert f"exported v2 (policy, full weights (merged)) to {out}; lineage v2 <- v1 <- base" in capsys.readouterr().out
    assert (out / "model.safetensors").exists() and (out / "generation_config.json").exists()
    assert not (out / "adapter_config.json").exists()

    # A fresh interpreter that imports transformers only: no rankloop module is needed to load it.
    script = (
        "import json, sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"path, prompts = {str(out)!r}, json.loads({json.dumps(PROMPTS)!r})\n"
        "tokenizer = AutoTokenizer.from_pretrained(path)\n"
        "model = AutoModelForCausalLM.from_pretrained(path).eval()\n"
        "rows = []\n"
        "for messages in prompts:\n"
        "    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors='pt',\n"
        "                                        return_dict=True)['input_ids']\n"
        "    with torch.no_grad():\n"
        "        rows.append(model(input_ids=ids).logits[0].tolist())\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('align', 'annotations', 'app'))\n"
        "print(json.dumps({'logits': rows, 'rankloop_modules': loaded, 'pad': model.config.pad_token_id,\n"
        "                  'tokenizer_pad': tokenizer.pad_token_id, 'template': tokenizer.chat_template}))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["rankloop_modules"] == []
    assert loaded["pad"] == loaded["tokenizer_pad"] == 0  # <|endoftext|>, distinct from EOS
    assert "<|im_start|>" in loaded["template"]

    with_adapter, base = peft_logits(tiny_model_dir, store.parent / "versions" / "v2")
    for merged, expected, plain in zip(loaded["logits"], with_adapter, base):
        merged = torch.tensor(merged)
        assert torch.allclose(merged, expected[0], atol=1e-4, rtol=0)
        assert (merged - plain[0]).abs().max() > 0.1  # the adapter is in there


def test_adapter_export_is_the_version_folder_with_a_card_and_loads_with_peft(store, tiny_model_dir, tmp_path):
    from peft import PeftModel

    from align.models import load_causal_lm, load_tokenizer

    source, out = store.parent / "versions" / "v2", tmp_path / "v2-adapter"
    assert export(store, tiny_model_dir, "v2", "--out", str(out)) == 0
    # PEFT's own placeholder README (if it wrote one) is replaced by the card; every other file is copied as is.
    copied = {p.name for p in source.iterdir()} - {"README.md"}
    assert {p.name for p in out.iterdir()} == copied | {"README.md"}
    assert all((out / name).read_bytes() == (source / name).read_bytes() for name in copied)

    tokenizer = load_tokenizer(tiny_model_dir)
    model = PeftModel.from_pretrained(load_causal_lm(tiny_model_dir), str(out)).eval()
    expected, _ = peft_logits(tiny_model_dir, source)
    with torch.no_grad():
        for messages, logits in zip(PROMPTS, expected):
            assert torch.equal(model(input_ids=chat_ids(tokenizer, messages)).logits, logits)
    card = ModelCard.load(out / "README.md")
    assert (card.data.library_name, card.data.base_model) == ("peft", HUB_ID)
    assert "PeftModel.from_pretrained(base" in card.text


def test_card_names_base_parent_chain_rounds_and_data(store, tiny_model_dir, tmp_path):
    out = tmp_path / "v2-merged"
    assert export(store, tiny_model_dir, "v2", "--out", str(out), "--merged", "--license", "apache-2.0") == 0
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == HUB_ID and card.data.library_name == "transformers"
    assert card.data.license == "apache-2.0" and card.data.pipeline_tag == "text-generation"
    assert {"rankloop", "dpo"} <= set(card.data.tags)
    db = open_db(store)
    first, second = round_records.get_round(db, 1), round_records.get_round(db, 2)
    text = card.text
    assert f"Base model: `{tiny_model_dir.resolve()}` ([{HUB_ID}]" in text
    # The chain newest first: v2 (round 2, DPO on 24 + 6 pairs) <- v1 (round 1, SFT on 24) <- base.
    rows = [line for line in text.splitlines() if line.startswith(("| v1 ", "| v2 ", "| base "))]
    assert [row.split(" | ")[:4] for row in rows] == [["| v2", "dpo", "2", "v1"], ["| v1", "sft", "1", "base"],
                                                      ["| base", "base", "-", "-"]]
    assert "| 30 pairs | " in rows[0] and "| 24 pairs | " in rows[1]
    assert "### Round 2: dpo → v2" in text and "### Round 1: sft → v1" in text
    assert f"snapshot sha256 `{second['data_hash']}` (store rows with pair id ≤ 30)" in text
    assert f"snapshot sha256 `{first['data_hash']}` (store rows with pair id ≤ 24)" in text
    assert first["data_hash"] != second["data_hash"]
    assert "`max_steps=2`, `parent=v1`" in text
    # accuracy(3, 4): 3 of 4 held-out pairs, with its exact 95% interval and n
    interval = accuracy(3, 4)
    assert (f"held-out implicit accuracy: 0.750 [{interval['low']:.3f}, {interval['high']:.3f}], n=4"
            in text)
    assert f"It was registered {model_versions.get_version(db, 'v2')['created_at']}." in text


def test_reward_version_exports_as_a_sequence_classifier_with_equal_scores(store, tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from align.reward import load_reward_model

    out = tmp_path / "rm1-merged"
    assert export(store, tiny_model_dir, "rm1", "--out", str(out), "--merged") == 0
    model = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id == 0
    reference, _ = load_reward_model(tiny_model_dir, store.parent / "versions" / "rm1")
    texts = [tokenizer.apply_chat_template(m + [{"role": "assistant", "content": answer}], tokenize=False)
             for m, answer in zip(PROMPTS, ["Paris.", "The sea and the sky, blue and wide.", "hello"])]
    batch = tokenizer(texts, return_tensors="pt", padding=True)  # right padding: scores at the last real token
    assert (batch["attention_mask"] == 0).any()
    with torch.no_grad():
        scores, expected = model(**batch).logits, reference(**batch).logits
    assert scores.shape == (3, 1)
    assert torch.allclose(scores, expected, atol=1e-4, rtol=0)
    assert (scores - scores[0]).abs().max() > 1e-3  # three answers, three different scores
    card = ModelCard.load(out / "README.md")
    assert card.data.pipeline_tag == "text-classification" and "reward-model" in card.data.tags
    assert "AutoModelForSequenceClassification" in card.text


@pytest.mark.parametrize("version, message", [
    ("base", "'base' is the base model itself, with no adapter: nothing to export"),
    ("v9", "no version 'v9'"),
])
def test_export_of_base_or_missing_version_exits_2_and_writes_nothing(store, tiny_model_dir, tmp_path, capsys,
                                                                      version, message):
    out = tmp_path / "out"
    assert export(store, tiny_model_dir, version, "--out", str(out), "--merged") == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_a_non_empty_folder_unless_forced(store, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert export(store, tiny_model_dir, "v1", "--out", str(out)) == 2
    assert "is not empty: choose a new folder, or pass --force to replace it" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert export(store, tiny_model_dir, "v1", "--out", str(out), "--force") == 0
    assert "notes.txt" not in {p.name for p in out.iterdir()} and (out / "adapter_config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # nothing left beside it


def test_export_into_the_version_folder_is_refused(store, tiny_model_dir, capsys):
    source = store.parent / "versions" / "v1"
    assert export(store, tiny_model_dir, "v1", "--out", str(source), "--force") == 2
    assert "which the export reads: choose a folder outside it" in capsys.readouterr().err
    assert (source / "adapter_config.json").exists()


def test_failed_merge_leaves_no_folder_behind(store, tiny_model_dir, tmp_path):
    import shutil

    from safetensors import SafetensorError

    from align.export import export_version

    broken = tmp_path / "broken-adapter"
    shutil.copytree(store.parent / "versions" / "v1", broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    db = open_db(tmp_path / "rankloop.db")
    model_versions.register_version(db, "v7", "policy", "base", "dpo", None, str(broken))
    out = tmp_path / "exports" / "v7"
    with pytest.raises(SafetensorError, match="header"):  # half way: the merge reads the adapter's weights
        export_version(db, "v7", out, base_path=tiny_model_dir, merged=True)
    assert list((tmp_path / "exports").iterdir()) == []


def test_versions_from_real_rounds_export_merged_with_equal_outputs(tiny_model_dir, tmp_path):
    """Adapters as the trainers write them (TRL's RewardTrainer with the score head under
    modules_to_save, DPO's LoRA on the top layers) merge as well as the hand-made ones."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from align.models import load_tokenizer
    from align.reward import load_reward_model
    from tests.align.test_cli import settings

    db = open_db(tmp_path / "rankloop.db")
    import_pairs(db, tmp_path)
    db.close()
    args = ["--db", str(tmp_path / "rankloop.db")]
    for method in ("rm", "dpo"):
        assert main([*args, "round", "--method", method, "--base", str(tiny_model_dir),
                     *settings()]) == 0
    for version in ("rm1", "v1"):
        assert main([*args, "export", version, "--out", str(tmp_path / "out" / version), "--merged"]) == 0
    ids = torch.tensor([[5, 17, 42, 99, 3, 8]])
    reference, _ = load_reward_model(tiny_model_dir, tmp_path / "versions" / "rm1")
    merged = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "out" / "rm1")).eval()
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-4, rtol=0)
    with_adapter, _ = peft_logits(tiny_model_dir, tmp_path / "versions" / "v1", prompts=PROMPTS[:1])
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out" / "v1")).eval()
    tokenizer = load_tokenizer(tiny_model_dir)
    with torch.no_grad():
        logits = merged(input_ids=chat_ids(tokenizer, PROMPTS[0])).logits
    assert torch.allclose(logits, with_adapter[0], atol=1e-4, rtol=0)
