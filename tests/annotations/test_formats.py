"""Import and export: hh-rlhf transcripts, TRL preference rows (JSONL, parquet, `datasets`
folders), prompt files (JSONL, CSV). Malformed files fail whole, naming file, line and field."""

import csv
import gzip
import io
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from annotations import ImportFormatError, InvalidInput, open_db
from annotations.formats import export_pairs, import_file
from annotations.store import (
    add_candidates,
    add_prompt,
    add_user,
    count_rows,
    derive_pairs,
    get_prompt,
    iter_pairs,
    queue_items,
    submit_judgement,
)

TABLES = ("prompts", "items", "pairs")


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def write_csv(path: Path, header, rows) -> Path:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    data = buffer.getvalue().encode("utf-8")
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def read_jsonl_rows(path: Path) -> list:
    # Split on "\n" only: str.splitlines() would also split inside text at U+0085, U+2028...
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]


def table_counts(db) -> dict:
    return {table: count_rows(db, table) for table in TABLES}


def trl_rows(n, start=0):
    return [{"prompt": f"question {i}", "chosen": f"good answer {i}", "rejected": f"bad answer {i}"}
            for i in range(start, start + n)]


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# ---------------------------------------------------------------- hh-rlhf transcripts


def test_import_hh_dev_stores_999_pairs(db, hh_dev):
    report = import_file(db, hh_dev, "hh")
    assert (report.rows, report.pairs_created, count_rows(db, "pairs")) == (1000, 999, 999)


def test_import_hh_dev_reports_line_872_skipped(db, hh_dev):
    report = import_file(db, hh_dev, "hh")
    assert [line for line, _ in report.skipped] == [872]
    assert "skipped line 872" in report.summary()


def test_import_hh_transcript_becomes_conversational_prompt(db, tmp_path):
    shared = "\n\nHuman: Hi\n\nAssistant: Hello, how can I help?\n\nHuman: Tell me a joke."
    path = write_jsonl(tmp_path / "hh.jsonl", [
        {"chosen": shared + "\n\nAssistant: Why did the chicken cross the road?",
         "rejected": shared + "\n\nAssistant: No."},
    ])
    import_file(db, path, "hh")
    (pair,) = list(iter_pairs(db))
    assert pair["messages"] == [user("Hi"), assistant("Hello, how can I help?"), user("Tell me a joke.")]
    assert (pair["chosen"], pair["rejected"]) == ("Why did the chicken cross the road?", "No.")


# ---------------------------------------------------------------- TRL preference rows


def test_import_trl_plain_rows_store_single_user_prompt(db, tmp_path):
    path = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}])
    report = import_file(db, path, "trl")
    (pair,) = list(iter_pairs(db))
    assert report.pairs_created == 1
    assert (pair["messages"], pair["chosen"], pair["rejected"]) == ([user("What is 2+2?")], "4", "5")


def test_import_trl_conversational_rows_keep_all_prompt_turns(db, tmp_path):
    prompt = [{"role": "system", "content": "Be kind."}, user("Hi"), assistant("Hello"), user("How are you?")]
    path = write_jsonl(tmp_path / "conv.jsonl", [
        {"prompt": prompt, "chosen": [assistant("Fine, thanks!")], "rejected": [assistant("Go away.")]},
    ])
    import_file(db, path, "trl")
    (pair,) = list(iter_pairs(db))
    assert (pair["messages"], pair["chosen"], pair["rejected"]) == (prompt, "Fine, thanks!", "Go away.")


def test_import_trl_conversational_rows_accept_answers_repeating_prompt(db, tmp_path):
    prompt = [user("Name a colour")]
    path = write_jsonl(tmp_path / "conv.jsonl", [
        {"prompt": prompt, "chosen": prompt + [assistant("Blue")], "rejected": prompt + [assistant("Seven")]},
    ])
    import_file(db, path, "trl")
    (pair,) = list(iter_pairs(db))
    assert (pair["messages"], pair["chosen"], pair["rejected"]) == (prompt, "Blue", "Seven")


def test_import_trl_implicit_prompt_rows_split_off_shared_turns(db, tmp_path):
    shared = [user("Hi"), assistant("Hello"), user("Capital of France?")]
    path = write_jsonl(tmp_path / "implicit.jsonl", [
        {"chosen": shared + [assistant("Paris")], "rejected": shared + [assistant("Lyon")]},
    ])
    import_file(db, path, "trl")
    (pair,) = list(iter_pairs(db))
    assert (pair["messages"], pair["chosen"], pair["rejected"]) == (shared, "Paris", "Lyon")


def test_import_trl_skips_identical_answers_and_reports_line(db, tmp_path):
    rows = trl_rows(2) + [{"prompt": "q", "chosen": "same", "rejected": " same "}]
    report = import_file(db, write_jsonl(tmp_path / "d.jsonl", rows), "trl")
    assert report.pairs_created == 2
    assert [line for line, _ in report.skipped] == [3]


def test_import_trl_reimport_adds_nothing(db, tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", trl_rows(5))
    import_file(db, path, "trl")
    before = table_counts(db)
    report = import_file(db, path, "trl")
    assert (report.pairs_created, report.prompts_created, report.duplicates) == (0, 0, 5)
    assert table_counts(db) == before


# ---------------------------------------------------------------- prompt files


def test_import_prompts_jsonl_stores_text_and_messages_and_queues_items(db, tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, user("Why is the sky blue?")]
    path = write_jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": "Write a haiku", "tags": ["poetry"]},
        {"messages": messages},
        {"prompt": [user("Explain tides")]},
    ])
    report = import_file(db, path, "prompts", k=4, mode="ranking")
    assert (report.prompts_created, report.items_queued) == (3, 3)
    assert [get_prompt(db, i)["messages"] for i in (1, 2, 3)] == [
        [user("Write a haiku")], messages, [user("Explain tides")]]
    assert db.execute("SELECT DISTINCT mode, k, status FROM items").fetchall() == [("ranking", 4, "pending")]


@pytest.mark.parametrize("name", ["prompts.csv", "prompts.csv.gz"])
def test_import_prompts_csv_reads_text_and_messages_json(db, tmp_path, name):
    messages = [{"role": "system", "content": "Be brief."}, user("Why, \"exactly\", is the sky blue?")]
    path = write_csv(tmp_path / name, ["prompt", "messages", "tags"], [
        ["Write a haiku\nabout rain", "", "poetry, short"],
        ["", json.dumps(messages), ""],
    ])
    report = import_file(db, path, "prompts")
    assert (report.prompts_created, report.items_queued) == (2, 2)
    assert get_prompt(db, 1)["messages"] == [user("Write a haiku\nabout rain")]
    assert get_prompt(db, 2)["messages"] == messages
    assert json.loads(db.execute("SELECT tags FROM prompts WHERE id = 1").fetchone()[0]) == ["poetry", "short"]


def test_import_prompts_reimport_queues_nothing_new(db, tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"prompt {i}"} for i in range(4)])
    import_file(db, path, "prompts")
    before = table_counts(db)
    report = import_file(db, path, "prompts")
    assert (report.prompts_created, report.items_queued, report.duplicates) == (0, 0, 4)
    assert table_counts(db) == before


# ---------------------------------------------------------------- export round trips


@pytest.fixture
def populated(db, tmp_path):
    """A store with imported pairs (plain, multi-turn, non-ASCII) and one judged item's pairs."""
    rows = trl_rows(3) + [
        {"prompt": [{"role": "system", "content": "Réponds en français."}, user("Bonjour 👋"),
                    assistant("Salut !"), user("Ça va ?")],
         "chosen": [assistant("Très bien, merci ✨")], "rejected": [assistant("…")]},
        {"prompt": "Quote: \"a\\b\"\ttab\u2028sep", "chosen": "line1\nline2", "rejected": "中文回答"},
    ]
    import_file(db, write_jsonl(tmp_path / "seed.jsonl", rows), "trl")
    annotator = add_user(db, "ann", "annotator", "password123")
    prompt_id, _ = add_prompt(db, "Rank these")
    (item_id,) = queue_items(db, [prompt_id], mode="ranking", k=3)
    a, b, c = add_candidates(db, item_id, [{"text": t, "policy_version": "base"} for t in ("A", "B", "C")])
    submit_judgement(db, annotator, item_id, [[b], [a], [c]], shown_order=[a, b, c])
    return db


def test_export_import_export_jsonl_is_byte_identical(populated, tmp_path):
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    assert export_pairs(populated, first) == 8
    fresh = open_db(tmp_path / "fresh.db")
    import_file(fresh, first, "trl")
    export_pairs(fresh, second)
    assert second.read_bytes() == first.read_bytes()


def test_export_jsonl_rows_are_trl_conversational(populated, tmp_path):
    out = tmp_path / "out.jsonl"
    export_pairs(populated, out)
    row = read_jsonl_rows(out)[0]
    assert row == {"prompt": [user("question 0")], "chosen": [assistant("good answer 0")],
                   "rejected": [assistant("bad answer 0")]}


def test_export_import_parquet_round_trips_to_same_jsonl(populated, tmp_path):
    reference, parquet, again = tmp_path / "ref.jsonl", tmp_path / "pairs.parquet", tmp_path / "again.jsonl"
    export_pairs(populated, reference)
    export_pairs(populated, parquet)
    fresh = open_db(tmp_path / "fresh.db")
    assert import_file(fresh, parquet, "trl").pairs_created == 8
    export_pairs(fresh, again)
    assert again.read_bytes() == reference.read_bytes()


def test_export_datasets_folder_loads_same_rows_as_jsonl(populated, tmp_path):
    from datasets import load_from_disk

    reference, folder = tmp_path / "ref.jsonl", tmp_path / "pairs_dataset"
    export_pairs(populated, reference)
    export_pairs(populated, folder)
    assert load_from_disk(str(folder)).to_list() == read_jsonl_rows(reference)


def test_export_import_datasets_folder_round_trips_to_same_jsonl(populated, tmp_path):
    reference, folder, again = tmp_path / "ref.jsonl", tmp_path / "pairs_dataset", tmp_path / "again.jsonl"
    export_pairs(populated, reference)
    export_pairs(populated, folder)
    fresh = open_db(tmp_path / "fresh.db")
    import_file(fresh, folder, "trl")
    export_pairs(fresh, again)
    assert again.read_bytes() == reference.read_bytes()


def test_export_standard_style_writes_plain_text_for_single_turn_prompts(db, tmp_path):
    import_file(db, write_jsonl(tmp_path / "in.jsonl", trl_rows(2)), "trl")
    out = tmp_path / "out.jsonl"
    export_pairs(db, out, style="standard")
    assert read_jsonl_rows(out) == trl_rows(2)


# ---------------------------------------------------------------- malformed files

GOOD = json.dumps(trl_rows(1)[0]).encode()
GZIPPED = gzip.compress(b"\n".join(json.dumps(r).encode() for r in trl_rows(300)))


def lines(*rows) -> bytes:
    return b"\n".join(r if isinstance(r, bytes) else json.dumps(r).encode() for r in rows) + b"\n"


# (file name, file bytes, line named in the error or None, field named or None, words in the message)
BAD_FILES = [
    pytest.param("a.jsonl", lines(GOOD, b'{"prompt": "q", "chosen": '), 2, None, "malformed JSON", id="malformed-json"),
    pytest.param("a.jsonl", lines(GOOD, GOOD, b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}'), 3, None,
                 "invalid UTF-8", id="invalid-utf8"),
    pytest.param("a.jsonl", lines(GOOD, [1, 2, 3]), 2, None, "JSON object", id="non-object-line"),
    pytest.param("a.jsonl", lines({"prompt": "q", "rejected": "b"}), 1, "chosen", "missing", id="missing-chosen"),
    pytest.param("a.jsonl", lines(GOOD, {"prompt": "q", "chosen": "a", "rejected": 7}), 2, "rejected", "int",
                 id="rejected-wrong-type"),
    pytest.param("a.jsonl", lines({"prompt": "  ", "chosen": "a", "rejected": "b"}), 1, "prompt", "empty",
                 id="empty-prompt"),
    pytest.param("a.jsonl", lines({"prompt": [{"role": "bot", "content": "hi"}], "chosen": "a", "rejected": "b"}),
                 1, "prompt", "role", id="prompt-wrong-role"),
    pytest.param("a.jsonl", lines(GOOD, {"prompt": "q", "chosen": [user("a")], "rejected": "b"}), 2, "chosen",
                 "assistant", id="answer-wrong-role"),
    pytest.param("a.jsonl", lines(GOOD, b'{"prompt": "lone \\ud800 surrogate", "chosen": "a", "rejected": "b"}'),
                 2, None, "surrogate", id="lone-surrogate-escape"),
    pytest.param("a.jsonl", b"", None, None, "no rows", id="empty-file"),
    pytest.param("a.jsonl", b"\n  \n", None, None, "no rows", id="blank-lines-only"),
    pytest.param("a.jsonl.gz", b"this is not gzip", None, None, "gzip", id="gzip-garbage"),
    pytest.param("a.jsonl.gz", GZIPPED[: len(GZIPPED) // 2], None, None, "gzip", id="gzip-truncated"),
    pytest.param("a.jsonl.gz", GZIPPED[:20] + bytes(b ^ 0xFF for b in GZIPPED[20:40]) + GZIPPED[40:], None, None,
                 "gzip", id="gzip-corrupt-data"),
]


@pytest.mark.parametrize(("name", "content", "line", "field", "words"), BAD_FILES)
def test_import_bad_file_raises_error_naming_file_line_and_field(db, tmp_path, name, content, line, field, words):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImportFormatError) as caught:
        import_file(db, path, "trl")
    message = str(caught.value)
    assert str(path) in message
    assert words in message
    assert (caught.value.line, caught.value.field) == (line, field)
    if line is not None:
        assert f"line {line}" in message
    if field is not None:
        assert f"'{field}'" in message


def test_import_hh_bad_transcript_names_line_and_field(db, tmp_path):
    good = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go"}
    path = write_jsonl(tmp_path / "hh.jsonl", [good, good, {"chosen": "no turns at all", "rejected": good["rejected"]}])
    with pytest.raises(ImportFormatError, match=r"line 3, field 'chosen'"):
        import_file(db, path, "hh")


def test_import_csv_prompts_bad_messages_json_names_line_and_field(db, tmp_path):
    path = write_csv(tmp_path / "p.csv", ["messages"], [[json.dumps([user("ok")])], ['[{"role": "user", ']])
    with pytest.raises(ImportFormatError, match=r"line 3, field 'messages'"):
        import_file(db, path, "prompts")


@pytest.mark.parametrize("fmt", ["trl", "prompts"])
def test_import_failed_file_leaves_row_counts_unchanged(db, tmp_path, fmt):
    good = write_jsonl(tmp_path / "good.jsonl", trl_rows(4))
    import_file(db, good, fmt)
    before = table_counts(db)
    assert before["prompts"] == 4
    rows = trl_rows(6, start=100)
    rows[4] = {"prompt": "", "chosen": "a", "rejected": "b"}  # line 5
    with pytest.raises(ImportFormatError, match="line 5"):
        import_file(db, write_jsonl(tmp_path / "bad.jsonl", rows), fmt)
    assert table_counts(db) == before


# ---------------------------------------------------------------- limits and duplicates


def test_import_prompts_duplicate_id_names_both_lines(db, tmp_path):
    rows = [{"id": "p1", "prompt": "one"}, {"id": 2, "prompt": "two"}, {"id": "p1", "prompt": "three"}]
    with pytest.raises(ImportFormatError, match=r"line 3, field 'id': duplicate id 'p1' \(first on line 1\)"):
        import_file(db, write_jsonl(tmp_path / "p.jsonl", rows), "prompts")
    assert table_counts(db) == {"prompts": 0, "items": 0, "pairs": 0}


def test_import_prompts_duplicate_id_in_csv_names_the_line(db, tmp_path):
    path = write_csv(tmp_path / "p.csv", ["id", "prompt"], [["a", "one"], ["b", "two"], ["a", "three"]])
    with pytest.raises(ImportFormatError, match=r"line 4, field 'id': duplicate id 'a' \(first on line 2\)"):
        import_file(db, path, "prompts")


@pytest.mark.parametrize("value", [{"x": 1}, [1], 1.5, True])
def test_import_prompts_id_of_wrong_type_names_line_and_field(db, tmp_path, value):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ok"}, {"id": value, "prompt": "two"}])
    with pytest.raises(ImportFormatError, match=r"line 2, field 'id': must be text or a whole number"):
        import_file(db, path, "prompts")


def test_import_prompt_over_the_length_limit_names_line_and_field(db, tmp_path):
    from annotations.store import MAX_PROMPT_CHARS

    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ok"}, {"prompt": "x" * (MAX_PROMPT_CHARS + 1)}])
    message = rf"line 2, field 'prompt': prompt is {MAX_PROMPT_CHARS + 1} characters long; the limit is"
    with pytest.raises(ImportFormatError, match=message):
        import_file(db, path, "prompts")


def test_import_answer_over_the_length_limit_is_skipped_with_its_line(db, tmp_path):
    from annotations.store import MAX_ANSWER_CHARS

    rows = trl_rows(2) + [{"prompt": "q", "chosen": "y" * (MAX_ANSWER_CHARS + 1), "rejected": "n"}]
    report = import_file(db, write_jsonl(tmp_path / "t.jsonl", rows), "trl")
    assert report.pairs_created == 2
    assert report.skipped == [(3, f"answer longer than {MAX_ANSWER_CHARS} characters")]


def test_import_file_over_the_size_limit_is_refused_unread(db, tmp_path, monkeypatch):
    monkeypatch.setattr("annotations.formats.MAX_IMPORT_BYTES", 100)
    path = write_jsonl(tmp_path / "big.jsonl", trl_rows(5))
    with pytest.raises(ImportFormatError, match=r"big.jsonl: file is \d+ bytes; the import limit is 100"):
        import_file(db, path, "trl")


def test_import_gzip_that_expands_past_the_limit_stops_reading(db, tmp_path, monkeypatch):
    monkeypatch.setattr("annotations.formats.MAX_IMPORT_BYTES", 10_000)
    path = tmp_path / "bomb.jsonl.gz"
    path.write_bytes(gzip.compress(b"\n" * 5_000_000))  # 5 MB of nothing in a few kB
    assert path.stat().st_size < 10_000
    with pytest.raises(ImportFormatError, match="uncompressed size exceeds the limit of 10000 bytes"):
        import_file(db, path, "trl")


@pytest.mark.parametrize("name", ["rows.jsonl", "rows.csv"])
def test_import_with_more_rows_than_the_limit_names_the_line(db, tmp_path, monkeypatch, name):
    monkeypatch.setattr("annotations.formats.MAX_IMPORT_ROWS", 3)
    path = (write_csv(tmp_path / name, ["prompt"], [[f"q{i}"] for i in range(5)]) if name.endswith(".csv")
            else write_jsonl(tmp_path / name, [{"prompt": f"q{i}"} for i in range(5)]))
    with pytest.raises(ImportFormatError, match="more than 3 rows"):
        import_file(db, path, "prompts")
    assert table_counts(db)["prompts"] == 0


def test_import_json_nested_too_deeply_names_the_line(db, tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_bytes(GOOD + b"\n" + b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n")
    with pytest.raises(ImportFormatError, match="line 2: JSON nested too deeply"):
        import_file(db, path, "trl")


@pytest.mark.parametrize("k", [1, 7])
def test_import_with_k_out_of_range_is_refused_and_stores_nothing(db, tmp_path, k):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "one"}, {"prompt": "two"}])
    with pytest.raises(InvalidInput, match=f"K={k} is out of range"):
        import_file(db, path, "prompts", mode="ranking", k=k)
    assert table_counts(db) == {"prompts": 0, "items": 0, "pairs": 0}


# ---------------------------------------------------------------- CSV export

FORMULAS = ["=HYPERLINK(\"http://evil\",\"x\")", "+1+1", "-2+3", "@SUM(A1)", "\tcmd", "\rcmd", "\uff1d1+1"]


def test_export_csv_defuses_every_cell_that_would_start_a_formula(db, tmp_path):
    rows = [{"prompt": f, "chosen": f"{f} chosen", "rejected": "plain text"} for f in FORMULAS]
    rows.append({"prompt": "a = b, and +1", "chosen": "fine", "rejected": "also fine"})
    import_file(db, write_jsonl(tmp_path / "in.jsonl", rows), "trl")
    assert export_pairs(db, tmp_path / "out.csv", style="standard") == len(rows)
    with (tmp_path / "out.csv").open(encoding="utf-8", newline="") as f:
        exported = list(csv.DictReader(f))
    for row, original in zip(exported, rows):
        for column in ("prompt", "chosen", "rejected"):
            value = original[column]
            expected = "'" + value if value[0] in "=+-@\t\r\uff1d" else value
            assert row[column] == expected


def test_export_csv_from_the_command_line_writes_messages_as_json_text(db, tmp_path, capsys):
    from annotations.__main__ import main

    db_path = tmp_path / "cli.db"
    store_db = open_db(db_path)
    import_file(store_db, write_jsonl(tmp_path / "in.jsonl", [{"prompt": "=1+1", "chosen": "a", "rejected": "b"}]),
                "trl")
    store_db.close()
    assert main(["--db", str(db_path), "export", "--out", str(tmp_path / "x.csv")]) == 0
    assert "exported 1 pairs" in capsys.readouterr().out
    with (tmp_path / "x.csv").open(encoding="utf-8", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["prompt"] == json.dumps([user("=1+1")], ensure_ascii=False)  # a JSON list: starts with '['
    assert row["chosen"] == json.dumps([assistant("a")])


# ---------------------------------------------------------------- properties

# Text that survives as data: at least one non-whitespace character. Surrogates are not
# Unicode scalar values and cannot be written as UTF-8, so hypothesis' text() leaves them out.
texts = st.text(max_size=40).filter(lambda t: t.strip())
triples = st.tuples(texts, texts, texts).filter(lambda t: t[1].strip() != t[2].strip())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(triples, min_size=1, max_size=6, unique=True))
def test_trl_import_export_round_trip_preserves_arbitrary_text(rows):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        given_rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in rows]
        store = open_db(tmp / "a.db")
        import_file(store, write_jsonl(tmp / "in.jsonl", given_rows), "trl")
        export_pairs(store, tmp / "standard.jsonl", style="standard")
        export_pairs(store, tmp / "first.jsonl")
        store.close()
        assert read_jsonl_rows(tmp / "standard.jsonl") == given_rows

        fresh = open_db(tmp / "b.db")
        import_file(fresh, tmp / "first.jsonl", "trl")
        export_pairs(fresh, tmp / "second.jsonl")
        fresh.close()
        assert (tmp / "second.jsonl").read_bytes() == (tmp / "first.jsonl").read_bytes()


@st.composite
def rankings(draw):
    """Tiers (best first) of distinct candidate ids, each tier non-empty."""
    ids = draw(st.lists(st.integers(1, 10_000), min_size=1, max_size=8, unique=True))
    cuts = sorted(draw(st.sets(st.integers(1, len(ids) - 1), max_size=len(ids) - 1))) if len(ids) > 1 else []
    bounds = [0, *cuts, len(ids)]
    return [ids[a:b] for a, b in zip(bounds, bounds[1:])]


def tier_of(ranking):
    return {c: i for i, tier in enumerate(ranking) for c in tier}


@given(ranking=rankings())
def test_derive_pairs_all_count_is_sum_of_tier_size_products(ranking):
    sizes = [len(t) for t in ranking]
    expected = sum(sizes[i] * sizes[j] for i in range(len(sizes)) for j in range(i + 1, len(sizes)))
    pairs = derive_pairs(ranking, "all")
    assert len(pairs) == len(set(pairs)) == expected


@pytest.mark.parametrize("policy", ["all", "best_vs_rest", "adjacent"])
@given(ranking=rankings())
def test_derive_pairs_never_pairs_within_a_tier(policy, ranking):
    tier = tier_of(ranking)
    assert all(tier[chosen] != tier[rejected] for chosen, rejected in derive_pairs(ranking, policy))


@pytest.mark.parametrize("policy", ["all", "best_vs_rest", "adjacent"])
@given(ranking=rankings())
def test_derive_pairs_chosen_always_ranked_above_rejected(policy, ranking):
    tier = tier_of(ranking)
    assert all(tier[chosen] < tier[rejected] for chosen, rejected in derive_pairs(ranking, policy))


def transitive_closure(pairs):
    closure = set(pairs)
    while True:
        more = {(a, d) for a, b in closure for c, d in closure if b == c} - closure
        if not more:
            return closure
        closure |= more


@given(ranking=rankings())
def test_derive_pairs_adjacent_implies_exactly_the_all_pairs(ranking):
    assert transitive_closure(derive_pairs(ranking, "adjacent")) == set(derive_pairs(ranking, "all"))


@given(ranking=rankings())
def test_derive_pairs_best_vs_rest_and_adjacent_are_subsets_of_all(ranking):
    everything = set(derive_pairs(ranking, "all"))
    assert set(derive_pairs(ranking, "best_vs_rest")) <= everything
    assert set(derive_pairs(ranking, "adjacent")) <= everything
    assert {b for _, b in derive_pairs(ranking, "best_vs_rest")} == {c for tier in ranking[1:] for c in tier}


@given(ranking=rankings(), data=st.data())
def test_derive_pairs_ignores_the_order_within_a_tier(ranking, data):
    shuffled = [data.draw(st.permutations(tier)) for tier in ranking]
    for policy in ("all", "best_vs_rest", "adjacent"):
        assert set(derive_pairs(shuffled, policy)) == set(derive_pairs(ranking, policy))


@st.composite
def judgements(draw):
    """(k, tiers as positions 0..k-1 best first, policy, both_bad, human text or None)."""
    k = draw(st.integers(2, 6))
    order = draw(st.permutations(range(k)))
    cuts = sorted(draw(st.sets(st.integers(1, k - 1), max_size=k - 1)))
    bounds = [0, *cuts, k]
    tiers = [list(order[a:b]) for a, b in zip(bounds, bounds[1:])]
    human = draw(st.none() | st.text(min_size=1, max_size=20).filter(lambda t: t.strip()))
    return k, tiers, draw(st.sampled_from(["all", "best_vs_rest", "adjacent"])), draw(st.booleans()), human


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=judgements())
def test_submitted_judgement_stores_exactly_the_derived_pairs(case):
    k, tiers, policy, both_bad, human = case
    with tempfile.TemporaryDirectory() as tmp:
        store = open_db(Path(tmp) / "s.db")
        # An account row without add_user's Argon2 hashing, which would dominate this test's time.
        annotator = store.execute("INSERT INTO users (name, role, password_hash) VALUES ('ann', 'annotator', '-')"
                                  ).lastrowid
        prompt_id, _ = add_prompt(store, "Rank these")
        (item_id,) = queue_items(store, [prompt_id], mode="ranking", k=k)
        ids = add_candidates(store, item_id, [{"text": f"answer {i}", "policy_version": "base"} for i in range(k)])
        ranking = [[ids[p] for p in tier] for tier in tiers]
        if both_bad:
            ranking = [list(ids)]
        result = submit_judgement(store, annotator, item_id, ranking, shown_order=ids, both_bad=both_bad,
                                  pair_policy=policy, human_text=human)
        stored = set(store.execute("SELECT chosen_candidate_id, rejected_candidate_id FROM pairs"
                                   " WHERE judgement_id = ?", [result["judgement_id"]]).fetchall())
        expected = set() if both_bad else set(derive_pairs(ranking, policy))
        human_id = store.execute("SELECT id FROM candidates WHERE policy_version IS NULL").fetchone()
        if human is not None and human.strip() not in {f"answer {i}" for i in range(k)}:
            expected |= {(human_id[0], c) for c in ids}
        else:
            assert human_id is None
        assert stored == expected and result["pairs"] == len(expected)
        negative = store.execute("SELECT count(*) FROM ratings WHERE value = -1").fetchone()[0]
        assert negative == (k if both_bad else 0)
        store.close()
