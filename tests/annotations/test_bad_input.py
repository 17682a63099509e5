"""Bad input never crashes an import: a corpus of well over a hundred broken files, generated
here (truncations, wrong types, missing fields, bad encodings, huge values, odd Unicode,
nested junk, broken CSV / gzip / parquet, duplicate ids), and hypothesis-generated rows and
bytes. Each file either imports cleanly or raises `ImportFormatError` naming the file (and
the line, for a bad row), and a refused file leaves the database exactly as it was."""

from __future__ import annotations

import csv
import gzip
import io
import json
import shutil
import sqlite3
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from annotations import ImportFormatError, open_db
from annotations.db import check_db
from annotations.formats import import_file
from annotations.store import MAX_PROMPT_CHARS

OK, FAIL, EITHER = "ok", "fail", "either"


@dataclass
class Case:
    id: str
    fmt: str
    name: str  # file name: its suffix picks the reader
    content: bytes
    expect: str = FAIL  # OK, FAIL or EITHER
    line: int | None = None  # the line a failure must name (None: a file-level error, or not checked)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


HUMAN = "\n\nHuman: {}\n\nAssistant: {}"
GOOD_ROWS = {
    "prompts": [{"id": "p1", "prompt": "First question?", "tags": ["a"]},
                {"id": 2, "prompt": [user("Second question?")]},
                {"messages": [{"role": "system", "content": "Be brief."}, user("Third?")]}],
    "trl": [{"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},
            {"prompt": [user("Name a colour")], "chosen": [assistant("Blue")], "rejected": [assistant("Seven")]},
            {"prompt": "Say hi", "chosen": "Hi!", "rejected": "No."}],
    "hh": [{"chosen": HUMAN.format("hi", "hello"), "rejected": HUMAN.format("hi", "go away")},
           {"chosen": HUMAN.format("tell me a joke", "a joke"), "rejected": HUMAN.format("tell me a joke", "no")},
           {"chosen": HUMAN.format("bye", "bye!"), "rejected": HUMAN.format("bye", "whatever")}],
}
REQUIRED = {"prompts": ["prompt"], "trl": ["prompt", "chosen", "rejected"], "hh": ["chosen", "rejected"]}
# Values of the wrong type for any text field: every one must be refused there.
WRONG_TYPES = {
    "null": None, "zero": 0, "negative": -1, "float": 3.5, "true": True, "empty-list": [], "empty-object": {},
    "int-list": [1, 2], "nested-junk": {"a": {"b": [None, {"c": []}]}}, "list-of-lists": [[[]]],
    "message-without-content": [{"role": "user"}], "message-without-role": [{"content": "x"}],
    "message-content-number": [{"role": "user", "content": 5}], "content-parts": [{"type": "text", "text": "x"}],
    "unknown-role": [{"role": "wizard", "content": "x"}],
}


def jsonl(rows) -> bytes:
    return b"".join((row if isinstance(row, bytes) else json.dumps(row).encode()) + b"\n" for row in rows)


def with_bad_second_row(fmt: str, bad) -> bytes:
    """Two good rows around a bad one: the error must name line 2."""
    good = GOOD_ROWS[fmt]
    return jsonl([good[0], bad, good[2]])


def truncations() -> list[Case]:
    cases = []
    for fmt, rows in GOOD_ROWS.items():
        data = jsonl(rows)
        lines = data.split(b"\n")
        for cut in range(5, len(data) - 1, max(1, len(data) // 11)):
            kept = data[:cut]
            line = kept.count(b"\n") + 1
            partial = kept.split(b"\n")[-1]
            whole = partial == lines[line - 1]  # cut right before the newline: the row is complete
            cases.append(Case(f"truncated-{fmt}-at-{cut}", fmt, "t.jsonl", kept,
                              OK if whole or not partial else FAIL, None if whole or not partial else line))
    return cases


def wrong_types() -> list[Case]:
    cases = []
    for fmt, fields in REQUIRED.items():
        for field in fields:
            for label, value in WRONG_TYPES.items():
                if fmt == "trl" and field == "prompt" and value is None:
                    continue  # no prompt: TRL's implicit-prompt form, tested below
                row = {**GOOD_ROWS[fmt][0], field: value}
                cases.append(Case(f"{fmt}-{field}-{label}", fmt, "w.jsonl", with_bad_second_row(fmt, row), FAIL, 2))
            row = {k: v for k, v in GOOD_ROWS[fmt][0].items() if k != field}
            cases.append(Case(f"{fmt}-{field}-missing", fmt, "m.jsonl", with_bad_second_row(fmt, row), FAIL, 2))
    for label, value in (("object", {"a": 1}), ("list", [1]), ("float", 1.5), ("bool", False)):
        cases.append(Case(f"prompts-id-{label}", "prompts", "i.jsonl",
                          with_bad_second_row("prompts", {"id": value, "prompt": "x"}), FAIL, 2))
    for label, value in (("number", 7), ("object", {"a": "b"}), ("list-of-numbers", [1, 2]), ("nested", [["a"]])):
        cases.append(Case(f"prompts-tags-{label}", "prompts", "g.jsonl",
                          with_bad_second_row("prompts", {"prompt": "x", "tags": value}), FAIL, 2))
    return cases


def empty_values() -> list[Case]:
    cases = [Case(f"prompts-prompt-{label}", "prompts", "e.jsonl",
                  with_bad_second_row("prompts", {"prompt": value}), FAIL, 2)
             for label, value in (("empty", ""), ("spaces", "   "), ("newlines", "\n\n"),
                                  ("empty-message", [user("")]), ("only-system", [{"role": "system", "content": "x"}]),
                                  ("ends-with-assistant", [user("q"), assistant("a")]))]
    # Empty or identical answers are not errors of the file: skipped, with their line.
    for label, row in (("empty-chosen", {"prompt": "q", "chosen": "", "rejected": "b"}),
                       ("blank-rejected", {"prompt": "q", "chosen": "a", "rejected": "  "}),
                       ("identical", {"prompt": "q", "chosen": "same", "rejected": "same"})):
        cases.append(Case(f"trl-{label}", "trl", "e.jsonl", with_bad_second_row("trl", row), OK))
    cases.append(Case("trl-implicit-prompt-ok", "trl", "e.jsonl", with_bad_second_row("trl", {
        "chosen": [user("q"), assistant("a")], "rejected": [user("q"), assistant("b")]}), OK))
    cases.append(Case("trl-implicit-prompt-differs", "trl", "e.jsonl", with_bad_second_row("trl", {
        "chosen": [user("q"), assistant("a")], "rejected": [user("other"), assistant("b")]}), FAIL, 2))
    cases.append(Case("prompts-empty-id-is-no-id", "prompts", "e.jsonl",
                      with_bad_second_row("prompts", {"id": "", "prompt": "x"}), OK))
    return cases


def structure() -> list[Case]:
    cases = []
    for label, line in (("array", b"[1, 2]"), ("string", b'"text"'), ("number", b"42"), ("null", b"null"),
                        ("trailing-comma", b'{"prompt": "x",}'), ("single-quotes", b"{'prompt': 'x'}"),
                        ("comment", b'{"prompt": "x"} // note'), ("two-objects", b'{"prompt": "a"}{"prompt": "b"}'),
                        ("unclosed-string", b'{"prompt": "x}'), ("bare-word", b"prompt"),
                        ("nan", b'{"prompt": NaN}'), ("infinity", b'{"prompt": Infinity}'),
                        ("duplicate-key-last-wins", b'{"prompt": "fine", "prompt": 5}'),
                        ("huge-integer", b'{"prompt": ' + b"9" * 5000 + b"}"),
                        ("huge-exponent", b'{"prompt": 1e400}'),
                        ("deep-nesting", b'{"prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"),
                        ("deep-objects", b'{"prompt": ' + b'{"a":' * 50_000 + b"1" + b"}" * 50_000 + b"}")):
        cases.append(Case(f"json-{label}", "prompts", "s.jsonl", with_bad_second_row("prompts", line), FAIL, 2))
    cases.append(Case("extra-fields-ignored", "prompts", "s.jsonl", with_bad_second_row(
        "prompts", {"prompt": "x", "extra": {"deep": [[{"junk": None}]] * 50}, "source": 5}), OK))
    cases.append(Case("many-keys", "prompts", "s.jsonl", with_bad_second_row(
        "prompts", {"prompt": "x", **{f"k{i}": i for i in range(5000)}}), OK))
    return cases


def encodings() -> list[Case]:
    row = b'{"prompt": "caf%s"}'
    cases = [Case(f"bytes-{label}", "prompts", "b.jsonl", with_bad_second_row("prompts", row % raw), FAIL, 2)
             for label, raw in (("latin1", b"\xe9"), ("cp1252-quote", b"\x93"), ("overlong-slash", b"\xc0\xaf"),
                                ("truncated-sequence", b"\xe2\x82"), ("surrogate-bytes", b"\xed\xa0\x80"),
                                ("invalid-start", b"\xff"), ("raw-nul", b"\x00"), ("raw-newline-in-string", b"\r"))]
    cases.append(Case("escaped-lone-surrogate", "prompts", "b.jsonl",
                      with_bad_second_row("prompts", b'{"prompt": "x \\udc80 y"}'), FAIL, 2))
    text = "\n".join(json.dumps(r) for r in GOOD_ROWS["prompts"]) + "\n"
    cases.append(Case("utf16-with-bom", "prompts", "b.jsonl", text.encode("utf-16"), FAIL, 1))
    cases.append(Case("utf8-bom", "prompts", "b.jsonl", b"\xef\xbb\xbf" + text.encode(), OK))
    cases.append(Case("crlf-lines", "prompts", "b.jsonl", text.replace("\n", "\r\n").encode(), OK))
    return cases


def odd_unicode() -> list[Case]:
    texts = {
        "rtl-override": "\u202eevil\u202c text", "zero-width": "a\u200bb\u200dc", "combining": "e\u0301" * 50,
        "emoji-zwj": "\U0001F469\u200d\U0001F4BB", "line-separators": "a\u2028b\u2029c\x85d",
        "escaped-nul": "a\x00b", "noncharacters": "\ufffe\uffff\ufdd0", "private-use": "\ue000\U000F0000",
        "astral": "\U0001D54F\U0001F600", "control-chars": "\x01\x02\x1b[31m red", "replacement": "\ufffd" * 3,
        "mixed-scripts": "Ελληνικά עברית العربية 中文 हिन्दी",
    }
    return [Case(f"unicode-{fmt}-{label}", fmt, "u.jsonl", with_bad_second_row(fmt, row), OK)
            for label, value in texts.items()
            for fmt, row in (("prompts", {"prompt": value}),
                             ("trl", {"prompt": value, "chosen": value + " yes", "rejected": value + " no"}))]


def huge_values() -> list[Case]:
    over = "x" * (MAX_PROMPT_CHARS + 1)
    return [
        Case("prompt-over-limit", "prompts", "h.jsonl", with_bad_second_row("prompts", {"prompt": over}), FAIL, 2),
        Case("turns-over-limit", "prompts", "h.jsonl", with_bad_second_row(
            "prompts", {"prompt": [user("y" * 9000), assistant("ok"), user("z" * 9000)]}), FAIL, 2),
        Case("answer-over-limit-skipped", "trl", "h.jsonl", with_bad_second_row(
            "trl", {"prompt": "q", "chosen": over, "rejected": "n"}), OK),
        Case("many-messages", "prompts", "h.jsonl", with_bad_second_row(
            "prompts", {"prompt": [user("q"), assistant("a")] * 2000 + [user("last")]}), OK),
        Case("many-tags", "prompts", "h.jsonl", with_bad_second_row("prompts", {"prompt": "q", "tags": ["t"] * 10_000}),
             OK),
        Case("long-line-of-spaces", "prompts", "h.jsonl", jsonl([GOOD_ROWS["prompts"][0], b" " * 2_000_000]), OK),
    ]


def hh_transcripts() -> list[Case]:
    bad = {"no-turns": ("just text", FAIL), "text-before-human": ("hello\n\nHuman: hi\n\nAssistant: a", FAIL),
           "only-assistant": ("\n\nAssistant: a", EITHER), "ends-with-human": ("\n\nHuman: hi", OK),
           "empty-human": ("\n\nHuman: \n\nAssistant: a", OK), "empty-reply": ("\n\nHuman: hi\n\nAssistant: ", OK)}
    cases = []
    for label, (text, expect) in bad.items():
        row = {"chosen": text, "rejected": HUMAN.format("hi", "other")}
        cases.append(Case(f"hh-{label}", "hh", "h.jsonl", with_bad_second_row("hh", row), expect,
                          2 if expect != OK else None))
    cases.append(Case("hh-different-history", "hh", "h.jsonl", with_bad_second_row("hh", {
        "chosen": HUMAN.format("a", "b"), "rejected": HUMAN.format("c", "d")}), OK))  # skipped, listed
    return cases


def csv_bytes(header, rows) -> bytes:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue().encode()


def csv_files() -> list[Case]:
    return [
        Case("csv-ok", "prompts", "c.csv", csv_bytes(["id", "prompt", "tags"], [["1", "q", "a,b"], ["2", "r", ""]]),
             OK),
        Case("csv-no-prompt-column", "prompts", "c.csv", csv_bytes(["question"], [["q"]]), FAIL, 2),
        Case("csv-empty-prompt", "prompts", "c.csv", csv_bytes(["prompt"], [["q"], [""]]), FAIL, 3),
        Case("csv-header-only", "prompts", "c.csv", b"prompt\n", FAIL, None),
        Case("csv-nul-byte", "prompts", "c.csv", b"prompt\nq\nbad\x00cell\n", OK),  # text, as "\u0000" in JSON
        Case("csv-field-too-large", "prompts", "c.csv", b"prompt\nq\n\"" + b"x" * 200_000 + b"\"\n", FAIL, 3),
        Case("csv-latin1", "prompts", "c.csv", b"prompt\nq\ncaf\xe9\n", FAIL, 3),
        Case("csv-bad-messages-json", "prompts", "c.csv", csv_bytes(["messages"], [["[{\"role\": "]]), FAIL, 2),
        Case("csv-messages-wrong-shape", "prompts", "c.csv", csv_bytes(["messages"], [['{"role": "user"}']]), FAIL, 2),
        Case("csv-messages-deep", "prompts", "c.csv", csv_bytes(["messages"], [["[" * 50_000 + "]" * 50_000]]),
             FAIL, 2),
        Case("csv-ragged-rows", "prompts", "c.csv", b"prompt,tags\nq\nr,a,b,c\n", OK),
        Case("csv-unbalanced-quote", "prompts", "c.csv", b'prompt\nq\n"never closed\nmore\n', EITHER, 3),
        Case("csv-trl-missing-rejected", "trl", "c.csv", csv_bytes(["prompt", "chosen"], [["q", "a"]]), FAIL, 2),
        Case("csv-gz-ok", "prompts", "c.csv.gz", gzip.compress(csv_bytes(["prompt"], [["q"]])), OK),
    ]


def compressed_and_binary() -> list[Case]:
    data = jsonl(GOOD_ROWS["trl"] * 20)
    packed = gzip.compress(data)
    return [
        Case("gz-garbage", "trl", "g.jsonl.gz", b"not gzip at all", FAIL, None),
        Case("gz-truncated", "trl", "g.jsonl.gz", packed[: len(packed) // 2], FAIL, None),
        Case("gz-empty", "trl", "g.jsonl.gz", gzip.compress(b""), FAIL, None),
        Case("gz-of-bad-json", "trl", "g.jsonl.gz", gzip.compress(jsonl([GOOD_ROWS["trl"][0], b"{oops"])), FAIL, 2),
        Case("gz-ok", "trl", "g.jsonl.gz", packed, OK),
        Case("parquet-garbage", "trl", "p.parquet", b"PAR1 this is not parquet", FAIL, None),
        Case("parquet-empty-file", "trl", "p.parquet", b"", FAIL, None),
        Case("binary-as-jsonl", "trl", "x.jsonl", bytes(range(256)) * 4, FAIL, 1),
        Case("empty-file", "trl", "x.jsonl", b"", FAIL, None),
        Case("blank-lines", "trl", "x.jsonl", b"\n \n\t\n", FAIL, None),
        Case("bom-only", "trl", "x.jsonl", b"\xef\xbb\xbf", FAIL, None),
        Case("duplicate-ids", "prompts", "d.jsonl", jsonl([{"id": 1, "prompt": "a"}, {"id": "1", "prompt": "b"}]),
             FAIL, 2),
    ]


def parquet_files() -> list[Case]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    def parquet(table) -> bytes:
        sink = io.BytesIO()
        pq.write_table(table, sink)
        return sink.getvalue()

    return [
        Case("parquet-int-prompt", "trl", "p.parquet", parquet(pa.table(
            {"prompt": [1, 2], "chosen": ["a", "b"], "rejected": ["c", "d"]})), FAIL, 1),
        Case("parquet-null-chosen", "trl", "p.parquet", parquet(pa.table(
            {"prompt": ["q", "r"], "chosen": ["a", None], "rejected": ["c", "d"]})), FAIL, 2),
        Case("parquet-struct-prompt", "trl", "p.parquet", parquet(pa.table(
            {"prompt": [{"x": 1}], "chosen": ["a"], "rejected": ["b"]})), FAIL, 1),
        Case("parquet-no-rows", "trl", "p.parquet", parquet(pa.table(
            {"prompt": pa.array([], pa.string()), "chosen": pa.array([], pa.string()),
             "rejected": pa.array([], pa.string())})), FAIL, None),
        Case("parquet-ok", "trl", "p.parquet", parquet(pa.table(
            {"prompt": ["q"], "chosen": ["a"], "rejected": ["b"]})), OK),
    ]


CORPUS = (truncations() + wrong_types() + empty_values() + structure() + encodings() + odd_unicode()
          + huge_values() + hh_transcripts() + csv_files() + compressed_and_binary() + parquet_files())


def test_the_corpus_holds_over_a_hundred_cases_each_named_once():
    assert len(CORPUS) >= 100
    assert len({case.id for case in CORPUS}) == len(CORPUS)
    assert sum(case.expect == FAIL for case in CORPUS) >= 100


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A store that already holds data, so 'unchanged' means something."""
    folder = tmp_path_factory.mktemp("bad-input")
    db = open_db(folder / "template.db")
    seed = folder / "seed.jsonl"
    seed.write_bytes(jsonl([{"prompt": f"seed {i}", "chosen": "yes", "rejected": "no"} for i in range(5)]))
    import_file(db, seed, "trl")
    db.close()
    return folder / "template.db"


def dump(path: Path) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


def import_and_check(template: Path, folder: Path, fmt: str, name: str, content: bytes,
                     expect: str = EITHER, line: int | None = None, max_line: int | None = None) -> str:
    """Import `content` into a copy of the template store; returns 'ok' or 'fail' after checking
    the contract: a refusal is an ImportFormatError naming the file (and `line`), and changes nothing."""
    db_path = folder / "store.db"
    shutil.copy(template, db_path)
    before = dump(db_path)
    path = folder / name
    path.write_bytes(content)
    db = open_db(db_path)
    try:
        import_file(db, path, fmt)
        outcome = OK
    except ImportFormatError as e:
        outcome = FAIL
        assert str(path) in str(e)
        if line is not None:
            assert e.line == line, str(e)
        if max_line is not None:
            assert e.line is None or 1 <= e.line <= max_line, str(e)
    finally:
        db.close()
    if outcome == FAIL:
        assert dump(db_path) == before
    else:
        assert check_db(sqlite3.connect(db_path)) == []
    if expect != EITHER:
        assert outcome == expect
    return outcome


@pytest.mark.parametrize("case", CORPUS, ids=[case.id for case in CORPUS])
def test_bad_input_is_imported_or_refused_by_file_and_line_never_crashes(case, template, tmp_path):
    import_and_check(template, tmp_path, case.fmt, case.name, case.content, case.expect, case.line)


# ---------------------------------------------------------------- generated by hypothesis

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
field_values = json_values | st.sampled_from(["", " ", "hi", [user("hi")], [assistant("a")], [user("")]])
rows_strategy = st.lists(
    st.dictionaries(st.sampled_from(["prompt", "messages", "chosen", "rejected", "id", "tags", "other"]),
                    field_values, max_size=5),
    min_size=1, max_size=5,
)
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.function_scoped_fixture])


@FUZZ
@given(fmt=st.sampled_from(["prompts", "trl", "hh"]), rows=rows_strategy)
def test_any_json_rows_are_imported_or_refused_by_line(template, fmt, rows):
    with tempfile.TemporaryDirectory() as folder:
        import_and_check(template, Path(folder), fmt, "rows.jsonl", jsonl(rows), max_line=len(rows))


@FUZZ
@given(fmt=st.sampled_from(["prompts", "trl", "hh"]), name=st.sampled_from(["f.jsonl", "f.csv", "f.jsonl.gz"]),
       content=st.binary(max_size=300))
def test_any_bytes_are_imported_or_refused_never_crash(template, fmt, name, content):
    with tempfile.TemporaryDirectory() as folder:
        import_and_check(template, Path(folder), fmt, name, content)


@st.composite
def mutated_good_files(draw):
    """A good file of the format with a few bytes replaced, inserted or deleted."""
    fmt = draw(st.sampled_from(sorted(GOOD_ROWS)))
    data = bytearray(jsonl(GOOD_ROWS[fmt]))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data) - 1))
        edit = draw(st.sampled_from(["replace", "insert", "delete"]))
        byte = draw(st.integers(0, 255))
        if edit == "replace":
            data[at] = byte
        elif edit == "insert":
            data.insert(at, byte)
        elif len(data) > 1:
            del data[at]
    return fmt, bytes(data)


@FUZZ
@given(case=mutated_good_files())
def test_a_good_file_with_a_few_bytes_changed_is_imported_or_refused_by_line(template, case):
    fmt, content = case
    with tempfile.TemporaryDirectory() as folder:
        import_and_check(template, Path(folder), fmt, "mutated.jsonl", content, max_line=content.count(b"\n") + 1)
