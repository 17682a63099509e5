"""`python -m annotations export-dataset`: the store's pairs as a `datasets` folder with a dataset
card, on a hand-made store whose figures are worked out below."""

import json

import pytest
from huggingface_hub import DatasetCard

from annotations.__main__ import main
from annotations.formats import export_dataset, import_file
from tests.annotations.test_quality import judge_value, ready_item

IMPORTED = [
    {"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "I cannot help with that."},
    {"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Write about the sea."}],
     "chosen": [{"role": "assistant", "content": "The sea is wide."}],
     "rejected": [{"role": "assistant", "content": "no"}]},
]


# Two imported pairs (no judged unit: agreement unknown) and two pairwise items judged by ann and
# bob. Item A: both prefer a over b -> 2 pairs, each with item agreement 2/2 = 1. Item B: ann
# prefers c, bob prefers d -> 2 pairs (c>d, d>c), each with item agreement 1/2. So 6 pairs:
# import 2, judgement 4; agreement known for 4, mean (1 + 1 + 0.5 + 0.5) / 4 = 0.75, 2 at full.
# Weights (source 1 x item agreement x trust 1, no gold seen): 1, 1, 1, 1, 0.5, 0.5.
# Store-wide: units A and B are both shared; pairwise agreement mean(1, 0) = 0.5. Alpha: the
# coincidences are o[+][+] = 2 (unit A), o[+][-] = o[-][+] = 1 (unit B); n+ = 3, n- = 1, n = 4;
# D_o = 2/4, D_e = 2 * 3 * 1 / (4 * 3) = 1/2, alpha = 1 - (1/2) / (1/2) = 0.
@pytest.fixture
def hand_store(db, users, tmp_path):
    source = tmp_path / "imported.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in IMPORTED), encoding="utf-8")
    import_file(db, source, "trl", queue=False)
    item_a, (a, b) = ready_item(db, "unit A", overlap=2)
    item_b, (c, d) = ready_item(db, "unit B", overlap=2)
    judge_value(db, users["ann"], item_a, a, b, 1)
    judge_value(db, users["bob"], item_a, a, b, 1)
    judge_value(db, users["ann"], item_b, c, d, 1)
    judge_value(db, users["bob"], item_b, c, d, -1)
    return db


def test_export_dataset_loads_from_disk_with_the_rows_and_columns(hand_store, tmp_path):
    from datasets import load_from_disk

    out = tmp_path / "pairs"
    export_dataset(hand_store, out)
    dataset = load_from_disk(str(out))
    assert set(dataset.column_names) == {"prompt", "chosen", "rejected", "id", "split", "source", "weight",
                                         "agreement"}
    assert dataset["source"] == ["import", "import", "judgement", "judgement", "judgement", "judgement"]
    assert dataset["agreement"] == [None, None, 1.0, 1.0, 0.5, 0.5]
    assert dataset["weight"] == [1.0, 1.0, 1.0, 1.0, 0.5, 0.5]
    first, second = dataset[0], dataset[1]
    assert first["prompt"] == [{"role": "user", "content": "What is the capital of France?"}]
    assert first["chosen"] == [{"role": "assistant", "content": "Paris."}]
    assert first["rejected"] == [{"role": "assistant", "content": "I cannot help with that."}]
    assert second["prompt"] == IMPORTED[1]["prompt"]
    assert [row["chosen"][0]["content"] for row in dataset][2:] == [
        "answer 0 to unit A", "answer 0 to unit A", "answer 0 to unit B", "answer 1 to unit B"]


def test_export_dataset_card_counts_sources_and_agreement(hand_store, tmp_path):
    out = tmp_path / "pairs"
    summary = export_dataset(hand_store, out, license="cc-by-4.0")
    card = DatasetCard.load(out / "README.md")
    assert card.data.license == "cc-by-4.0" and card.data.size_categories == ["n<1K"]
    assert "rankloop" in card.data.tags
    text = card.text
    assert "| import | 2 |\n| judgement | 4 |\n| **all** | **6** |" in text
    assert "item agreement measured for 4 of 6 pairs (imported pairs and written answers have none); " \
           "mean 0.750, 2 with full agreement" in text
    assert "over all 4 judgements in the store, 2 answer pairs were judged by two or more annotators: " \
           "pairwise agreement 0.500, Krippendorff's alpha (nominal) 0.000" in text
    assert sum(summary["splits"].values()) == 6 and summary["zero_weight"] == 0


def test_export_dataset_command_defaults_license_to_other_and_refuses_a_non_empty_folder(hand_store, tmp_path,
                                                                                            capsys):
    out = tmp_path / "pairs"
    db = ["--db", str(tmp_path / "rankloop.db")]
    assert main([*db, "export-dataset", "--out", str(out)]) == 0
    assert capsys.readouterr().out == f"exported 6 pairs (import 2, judgement 4) with a dataset card to {out}\n"
    assert DatasetCard.load(out / "README.md").data.license == "other"
    assert main([*db, "export-dataset", "--out", str(out)]) == 2
    assert "is not empty: choose a new folder, or pass --force to replace it" in capsys.readouterr().err
    assert main([*db, "export-dataset", "--out", str(out), "--split", "train", "--force"]) == 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # nothing left beside it


def test_export_dataset_of_an_empty_store_is_an_error_and_writes_nothing(db, tmp_path, capsys):
    out = tmp_path / "pairs"
    assert main(["--db", str(tmp_path / "rankloop.db"), "export-dataset", "--out", str(out)]) == 2
    assert "there are no pairs to export" in capsys.readouterr().err
    assert not out.exists()
