"""Import and export: prompts (JSONL/CSV), TRL preference data, Anthropic hh-rlhf transcripts.

Import reads and validates the whole file first and only then writes, in one transaction:
a malformed file raises `ImportFormatError` naming file, line and field, and leaves the
database unchanged. Degenerate preference rows (identical or empty answers) are not errors
of the file but useless as data: they are skipped and reported with their line numbers.

Export writes TRL's conversational preference format (prompt as a list of messages, chosen
and rejected as one assistant message each), which `DPOTrainer` and `RewardTrainer` take as
is, to JSONL, parquet, or a `datasets.save_to_disk` folder; and CSV for spreadsheets, with
cells that a spreadsheet would run as a formula defused (`csv_cell`).

Limits: MAX_IMPORT_BYTES per file (also after gunzipping), MAX_IMPORT_ROWS rows, prompts and
answers as in `annotations.store` (MAX_PROMPT_CHARS, MAX_ANSWER_CHARS).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from annotations.db import write_transaction
from annotations.errors import ImportFormatError, InvalidInput
from annotations.quality import check_weight_by, pair_weights, select_pair_ids, weighting
from annotations.store import (
    DEFAULT_HELDOUT_FRACTION,
    MAX_ANSWER_CHARS,
    add_prompt,
    canonical_messages,
    iter_pairs,
    queue_items,
)

FORMATS = ("prompts", "trl", "hh")
MAX_IMPORT_BYTES = 512 * 1024 * 1024
MAX_IMPORT_ROWS = 2_000_000


@dataclass
class ImportReport:
    """What an import did: rows read, rows stored, and the lines it skipped and why."""

    path: str
    format: str
    rows: int = 0
    prompts_created: int = 0
    pairs_created: int = 0
    items_queued: int = 0
    duplicates: int = 0
    skipped: list[tuple[int, str]] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"{self.path}: read {self.rows} rows ({self.format}); "
            f"{self.prompts_created} new prompts, {self.pairs_created} pairs, {self.items_queued} items queued"
            + (f", {self.duplicates} already present" if self.duplicates else "")
        ]
        for line, reason in self.skipped:
            lines.append(f"  skipped line {line}: {reason}")
        return "\n".join(lines)


# ---------------------------------------------------------------- reading files


def _check_size(path: Path) -> None:
    if not path.exists():
        raise ImportFormatError(path, None, "no such file")
    size = path.stat().st_size if path.is_file() else 0
    if size > MAX_IMPORT_BYTES:
        raise ImportFormatError(path, None, f"file is {size} bytes; the import limit is {MAX_IMPORT_BYTES}")


def _open_text_bytes(path: Path) -> bytes:
    if path.suffix.lower() != ".gz":
        return path.read_bytes()
    try:
        # Read one byte past the limit at most: a small "gzip bomb" never expands in memory.
        with gzip.open(path, "rb") as f:
            raw = f.read(MAX_IMPORT_BYTES + 1)
    except (OSError, EOFError, zlib.error) as e:  # bad header, truncated, corrupt data
        raise ImportFormatError(path, None, f"not a valid gzip file ({e})") from None
    if len(raw) > MAX_IMPORT_BYTES:
        raise ImportFormatError(path, None, f"uncompressed size exceeds the limit of {MAX_IMPORT_BYTES} bytes")
    return raw


def _decode_lines(path: Path, raw: bytes):
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if number > MAX_IMPORT_ROWS:
            raise ImportFormatError(path, number, f"more than {MAX_IMPORT_ROWS} rows")
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ImportFormatError(path, number, f"invalid UTF-8 at byte {e.start}") from None
        if text.strip():
            yield number, text.lstrip("\ufeff")


def read_jsonl(path: Path):
    """Yield (line number, object) for each non-blank line of a JSONL (optionally .gz) file."""
    for number, text in _decode_lines(path, _open_text_bytes(path)):
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            raise ImportFormatError(path, number, f"malformed JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:
            raise ImportFormatError(path, number, "JSON nested too deeply") from None
        except ValueError as e:  # e.g. an integer of more than 4,300 digits
            raise ImportFormatError(path, number, f"unreadable JSON value ({e})") from None
        if not isinstance(row, dict):
            raise ImportFormatError(path, number, f"expected a JSON object, got {type(row).__name__}")
        if "\\u" in text:  # only an escape can smuggle in a lone surrogate, which is not Unicode text
            try:
                json.dumps(row, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                raise ImportFormatError(path, number, "a lone surrogate escape (\\ud800-\\udfff) is not text") from None
        yield number, row


def read_csv(path: Path):
    raw = _open_text_bytes(path)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ImportFormatError(path, line, "invalid UTF-8") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        for row in reader:
            # line_num is the line where the record ended (records may span lines).
            yield reader.line_num, row
    except csv.Error as e:  # raised before the line it is on is counted
        raise ImportFormatError(path, reader.line_num + 1, f"malformed CSV ({e})") from None


def read_rows(path: Path):
    """(line or row number, dict) from JSONL, JSONL.gz, CSV, parquet, or a datasets folder."""
    path = Path(path)
    _check_size(path)
    name = path.name.lower()
    if path.is_dir():
        from datasets import load_from_disk

        try:
            dataset = load_from_disk(str(path))
        except Exception as e:  # datasets raises many types for a bad folder
            raise ImportFormatError(path, None, f"not a datasets folder ({e})") from None
        for i, row in enumerate(dataset, start=1):
            yield i, row
    elif name.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:
            raise ImportFormatError(path, None, f"not a readable parquet file ({e})") from None
        for i, row in enumerate(table.to_pylist(), start=1):
            yield i, row
    elif name.endswith(".csv") or name.endswith(".csv.gz"):
        yield from read_csv(path)
    else:
        yield from read_jsonl(path)


# ---------------------------------------------------------------- parsing records


def _prompt_messages(path, number, value, field_name):
    # In CSV, a `messages` cell holds JSON; a `prompt` cell is always plain text (it may start with "[").
    if isinstance(value, str) and field_name == "messages" and path.name.lower().endswith((".csv", ".csv.gz")):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ImportFormatError(path, number, f"malformed JSON messages ({e.msg})", field_name) from None
        except (ValueError, RecursionError) as e:  # a huge integer, or nested too deeply
            raise ImportFormatError(path, number, f"unreadable JSON messages ({type(e).__name__})",
                                    field_name) from None
    try:
        return canonical_messages(value)
    except InvalidInput as e:
        raise ImportFormatError(path, number, str(e), field_name) from None


def parse_prompt_row(path, number, row) -> dict:
    if "messages" in row and row["messages"] not in (None, ""):
        key = "messages"
    elif "prompt" in row:
        key = "prompt"
    else:
        raise ImportFormatError(path, number, "a prompt row needs a 'prompt' (text or messages) or 'messages' field")
    messages = _prompt_messages(path, number, row[key], key)
    tags = row.get("tags") or []
    if isinstance(tags, str):
        tags = [t.strip() for t in tags.split(",") if t.strip()]
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise ImportFormatError(path, number, "tags must be a list of strings or comma-separated text", "tags")
    external_id = row.get("id")
    if isinstance(external_id, bool) or not isinstance(external_id, (str, int, type(None))):
        raise ImportFormatError(path, number, f"must be text or a whole number, not {type(external_id).__name__}", "id")
    if isinstance(external_id, str) and not external_id.strip():
        external_id = None  # an empty CSV cell: no id
    return {"messages": messages, "tags": tags, "external_id": None if external_id is None else str(external_id)}


def _answer_text(path, number, value, field_name, prompt_messages):
    """The final assistant reply from a TRL chosen/rejected value (text, or messages)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        messages = value
        if prompt_messages is not None and len(messages) > 1 and messages[: len(prompt_messages)] == prompt_messages:
            messages = messages[len(prompt_messages):]
        if len(messages) != 1 or not isinstance(messages[0], dict):
            raise ImportFormatError(path, number, "expected exactly one assistant message", field_name)
        message = messages[0]
        if message.get("role") != "assistant":
            raise ImportFormatError(path, number, f"role is {message.get('role')!r}, expected 'assistant'", field_name)
        if not isinstance(message.get("content"), str):
            raise ImportFormatError(path, number, "content must be text", field_name)
        return message["content"]
    raise ImportFormatError(path, number, f"must be text or a list of messages, not {type(value).__name__}", field_name)


def parse_trl_row(path, number, row) -> dict:
    for key in ("chosen", "rejected"):
        if key not in row or row[key] is None:
            raise ImportFormatError(path, number, f"'{key}' is missing", key)
    prompt = row.get("prompt")
    if prompt is None:
        # Implicit prompt: chosen and rejected are full conversations sharing all but the last turn.
        chosen, rejected = row["chosen"], row["rejected"]
        if not (isinstance(chosen, list) and isinstance(rejected, list) and len(chosen) >= 2):
            raise ImportFormatError(path, number, "'prompt' is missing (and chosen/rejected are not full conversations)", "prompt")
        if chosen[:-1] != rejected[:-1]:
            raise ImportFormatError(path, number, "chosen and rejected conversations differ before the last turn", "rejected")
        prompt, row = chosen[:-1], {"chosen": chosen[-1:], "rejected": rejected[-1:]}
    messages = _prompt_messages(path, number, prompt, "prompt")
    return {
        "messages": messages,
        "chosen": _answer_text(path, number, row["chosen"], "chosen", messages),
        "rejected": _answer_text(path, number, row["rejected"], "rejected", messages),
    }


_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


def parse_hh_transcript(text: str) -> list[dict]:
    """Split an hh-rlhf transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") into messages."""
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        raise ValueError("text before the first 'Human:' turn")
    messages = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": "user" if speaker == "Human" else "assistant", "content": content.strip()})
    if not messages:
        raise ValueError("no 'Human:' or 'Assistant:' turns")
    return messages


def parse_hh_row(path, number, row) -> dict:
    """Both transcripts must share every turn but the last assistant reply. A row that breaks
    that shape, or whose prompt is unusable (an empty turn), is degenerate: it is returned
    with a `problem` and skipped by the import, not treated as a broken file."""
    turns = {}
    for key in ("chosen", "rejected"):
        value = row.get(key)
        if not isinstance(value, str):
            raise ImportFormatError(path, number, "missing or not a transcript string", key)
        try:
            turns[key] = parse_hh_transcript(value)
        except ValueError as e:
            raise ImportFormatError(path, number, str(e), key) from None
    chosen, rejected = turns["chosen"], turns["rejected"]
    record = {"messages": chosen[:-1], "chosen": chosen[-1]["content"], "rejected": rejected[-1]["content"]}
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        record["problem"] = "a transcript does not end with an 'Assistant:' reply"
    elif chosen[:-1] != rejected[:-1]:
        record["problem"] = "the transcripts differ before the last reply (chosen has {} turns, rejected {})".format(
            len(chosen), len(rejected))
    else:
        try:
            record["messages"] = canonical_messages(chosen[:-1])
        except InvalidInput as e:
            record["problem"] = f"unusable prompt: {e}"
    return record


def degenerate_reason(record: dict) -> str | None:
    """Why a preference record is useless as data, or None."""
    if record.get("problem"):
        return record["problem"]
    chosen, rejected = record["chosen"], record["rejected"]
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            return f"empty {name} answer"
    if chosen.strip() == rejected.strip():
        return "chosen and rejected answers are identical"
    if len(chosen) > MAX_ANSWER_CHARS or len(rejected) > MAX_ANSWER_CHARS:
        return f"answer longer than {MAX_ANSWER_CHARS} characters"
    return None


PARSERS = {"prompts": parse_prompt_row, "trl": parse_trl_row, "hh": parse_hh_row}


def parse_file(path, fmt: str) -> tuple[list[dict], list[tuple[int, str]], int]:
    """Parse and validate a whole file. Returns (records, skipped lines, rows read)."""
    if fmt not in PARSERS:
        raise InvalidInput(f"format {fmt!r} is unknown: use one of {', '.join(FORMATS)}")
    path = Path(path)
    records, skipped, rows = [], [], 0
    first_line_of_id: dict[str, int] = {}
    for number, row in read_rows(path):
        rows += 1
        if rows > MAX_IMPORT_ROWS:
            raise ImportFormatError(path, number, f"more than {MAX_IMPORT_ROWS} rows: split the file")
        if not isinstance(row, dict):
            raise ImportFormatError(path, number, f"expected a record with named fields, got {type(row).__name__}")
        record = PARSERS[fmt](path, number, row)
        record["line"] = number
        if record.get("external_id") is not None:
            first = first_line_of_id.setdefault(record["external_id"], number)
            if first != number:
                raise ImportFormatError(path, number, f"duplicate id {record['external_id']!r} (first on line {first})",
                                        "id")
        if fmt != "prompts":
            reason = degenerate_reason(record)
            if reason:
                skipped.append((number, reason))
                continue
        records.append(record)
    if rows == 0:
        raise ImportFormatError(path, None, "the file holds no rows")
    return records, skipped, rows


# ---------------------------------------------------------------- import


def import_file(
    db,
    path,
    fmt: str,
    *,
    source: str | None = None,
    queue: bool = True,
    mode: str = "pairwise",
    k: int = 2,
    overlap: int = 1,
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
) -> ImportReport:
    """Import a file into the store, all or nothing.

    Prompts are queued for annotation (as `mode` items with `k` answers) unless `queue` is
    False. Preference rows become pairs with source 'import'; a pair already present (same
    prompt, chosen and rejected) is not stored twice, so re-importing a file is harmless.
    """
    path = Path(path)
    records, skipped, rows = parse_file(path, fmt)
    report = ImportReport(path=str(path), format=fmt, rows=rows, skipped=skipped)
    source = source or f"import:{path.name}"
    batch = uuid.uuid4().hex[:12]
    with write_transaction(db):
        new_prompt_ids = []
        for record in records:
            prompt_id, created = add_prompt(
                db, record["messages"], source=source, tags=record.get("tags", ()),
                external_id=record.get("external_id"), heldout_fraction=heldout_fraction,
            )
            report.prompts_created += created
            if fmt == "prompts":
                if created:
                    new_prompt_ids.append(prompt_id)
                else:
                    report.duplicates += 1
                continue
            exists = db.execute(
                "SELECT 1 FROM pairs WHERE prompt_id = ? AND chosen = ? AND rejected = ? AND source = 'import'",
                [prompt_id, record["chosen"], record["rejected"]],
            ).fetchone()
            if exists:
                report.duplicates += 1
                continue
            db.execute(
                "INSERT INTO pairs (prompt_id, chosen, rejected, source, import_batch) VALUES (?, ?, ?, 'import', ?)",
                [prompt_id, record["chosen"], record["rejected"], batch],
            )
            report.pairs_created += 1
        if report.pairs_created:
            # the import source's weight, as an admin set it (annotations.quality)
            import_weight = weighting(db)["sources"]["import"]
            db.execute("UPDATE pairs SET weight = ? WHERE import_batch = ?", [import_weight, batch])
        if queue and new_prompt_ids:
            report.items_queued = len(queue_items(db, new_prompt_ids, mode=mode, k=k, overlap=overlap))
    return report


# ---------------------------------------------------------------- export

STYLES = ("conversational", "standard")


def pair_rows(
    db,
    *,
    split: str | None = None,
    style: str = "conversational",
    with_meta: bool = False,
    min_agreement: float | None = None,
    min_annotator_accuracy: float | None = None,
    weight_by: str | None = None,
) -> list[dict]:
    """Pairs as TRL preference rows.

    conversational: {"prompt": [messages], "chosen": [assistant msg], "rejected": [assistant msg]}
    standard: {"prompt": text, "chosen": text, "rejected": text}, for single-turn user prompts
    (a system message or several turns cannot be flattened without a template: use
    conversational for those).

    `min_agreement` and `min_annotator_accuracy` drop pairs as `quality.select_pair_ids` does.
    `weight_by` ('agreement' or 'accuracy') replaces the stored weight with the one
    `quality.pair_weights` gives; the weight is a column of the `with_meta` rows only.
    """
    if style not in STYLES:
        raise InvalidInput(f"style {style!r} is unknown: use one of {', '.join(STYLES)}")
    check_weight_by(weight_by)
    keep = None
    if min_agreement is not None or min_annotator_accuracy is not None:
        keep = select_pair_ids(db, min_agreement=min_agreement, min_annotator_accuracy=min_annotator_accuracy)
    weights = {}
    if weight_by is not None and with_meta:
        weights = pair_weights(db, by_agreement=weight_by == "agreement", by_annotator_accuracy=weight_by == "accuracy")
    rows = []
    for pair in iter_pairs(db, split=split):
        if keep is not None and pair["id"] not in keep:
            continue
        if style == "conversational":
            row = {
                "prompt": pair["messages"],
                "chosen": [{"role": "assistant", "content": pair["chosen"]}],
                "rejected": [{"role": "assistant", "content": pair["rejected"]}],
            }
        else:
            if len(pair["messages"]) != 1:
                raise InvalidInput(
                    f"pair {pair['id']} has a {len(pair['messages'])}-message prompt; export it with --style conversational"
                )
            row = {"prompt": pair["messages"][0]["content"], "chosen": pair["chosen"], "rejected": pair["rejected"]}
        if with_meta:
            weight = weights.get(pair["id"], pair["weight"])
            row.update({"id": pair["id"], "weight": weight, "split": pair["split"], "source": pair["source"]})
        rows.append(row)
    return rows


# A cell starting with one of these is run as a formula by Excel, LibreOffice or Google
# Sheets (tab and carriage return too, and the full-width forms some of them accept).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "\uff1d", "\uff0b", "\uff0d", "\uff20")


def csv_cell(value) -> str:
    """A value as a CSV cell that a spreadsheet shows as text and never evaluates: lists and
    dicts as JSON, and a leading single quote before anything that would start a formula
    (OWASP's advice against CSV injection). The quote changes the text: re-import JSONL, not CSV."""
    text = value if isinstance(value, str) else "" if value is None else json.dumps(value, ensure_ascii=False)
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def write_rows(rows: list[dict], out) -> str:
    """Write rows by the output's name: .jsonl, .csv, .parquet, or (anything else) a datasets folder."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    name = out.name.lower()
    if name.endswith(".jsonl"):
        tmp = out.with_name(out.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        tmp.replace(out)
        return "jsonl"
    if name.endswith(".csv"):
        tmp = out.with_name(out.name + ".tmp")
        with tmp.open("w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            columns = list(rows[0]) if rows else []
            writer.writerow(columns)
            writer.writerows([csv_cell(row.get(column)) for column in columns] for row in rows)
        tmp.replace(out)
        return "csv"
    if name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), out)
        return "parquet"
    from datasets import Dataset

    Dataset.from_list(rows).save_to_disk(str(out))
    return "datasets"


def export_pairs(
    db,
    out,
    *,
    split: str | None = None,
    style: str = "conversational",
    with_meta: bool = False,
    min_agreement: float | None = None,
    min_annotator_accuracy: float | None = None,
    weight_by: str | None = None,
) -> int:
    """Write `pair_rows` (same options) to `out`; returns how many. No rows is an error."""
    rows = pair_rows(
        db, split=split, style=style, with_meta=with_meta, min_agreement=min_agreement,
        min_annotator_accuracy=min_annotator_accuracy, weight_by=weight_by,
    )
    if not rows:
        filtered = min_agreement is not None or min_annotator_accuracy is not None
        raise InvalidInput(
            "there are no pairs to export" + (f" in the {split} split" if split else "")
            + (" that pass the agreement/accuracy filters" if filtered else "")
        )
    write_rows(rows, out)
    return len(rows)


# ---------------------------------------------------------------- a dataset for the Hub

DATASET_NAME = "rankloop preference pairs"


def dataset_rows(db, *, split: str | None = None, min_agreement: float | None = None,
                 min_annotator_accuracy: float | None = None) -> list[dict]:
    """Pairs as TRL conversational rows with their id, split, source, stored weight and item
    agreement (the share of the item's judgements that order the two answers this way; None
    where there is no judged unit: imported pairs, pairs with a written answer)."""
    from annotations.quality import pair_quality

    quality = pair_quality(db)
    rows = pair_rows(db, split=split, with_meta=True, min_agreement=min_agreement,
                     min_annotator_accuracy=min_annotator_accuracy)
    for row in rows:
        row["agreement"] = quality[row["id"]].agreement if row["id"] in quality else None
    return rows


def export_dataset(
    db,
    out,
    *,
    license: str = "other",
    split: str | None = None,
    min_agreement: float | None = None,
    min_annotator_accuracy: float | None = None,
    force: bool = False,
) -> dict:
    """The store's preference pairs as a Hugging Face `datasets` folder (`Dataset.save_to_disk`,
    rows as `dataset_rows`) with a dataset card, README.md, whose front matter carries `license`.
    The folder is written whole or not at all; a non-empty `out` is refused unless `force`.
    Returns the card's figures (`dataset_summary`). No rows is an error."""
    from annotations.output_folder import check_target, write_folder
    from annotations.quality import agreement_report

    check_target(out, force)
    if not str(license or "").strip():
        raise InvalidInput("license is empty: give an SPDX-style id such as cc-by-4.0, or 'other'")
    rows = dataset_rows(db, split=split, min_agreement=min_agreement, min_annotator_accuracy=min_annotator_accuracy)
    if not rows:
        raise InvalidInput("there are no pairs to export" + (f" in the {split} split" if split else ""))
    summary = dataset_summary(rows, agreement_report(db))
    from datasets import Dataset  # only here: importing the store must stay light

    with write_folder(out, force) as staging:
        Dataset.from_list(rows).save_to_disk(str(staging))
        (staging / "README.md").write_text(dataset_card(summary, license.strip()), encoding="utf-8")
    return summary


def dataset_summary(rows: list[dict], report: dict) -> dict:
    """The figures a dataset card shows: counts by source and split, weights, and agreement
    (per exported pair, and the store's agreement report over all judgements)."""
    from collections import Counter

    known = [row["agreement"] for row in rows if row["agreement"] is not None]
    return {
        "pairs": len(rows),
        "sources": dict(sorted(Counter(row["source"] for row in rows).items())),
        "splits": dict(sorted(Counter(row["split"] for row in rows).items())),
        "zero_weight": sum(1 for row in rows if row["weight"] == 0),
        "agreement_known": len(known),
        "mean_agreement": sum(known) / len(known) if known else None,
        "full_agreement": sum(1 for value in known if value == 1.0),
        "judgements": report["judgements"],
        "shared_units": report["shared_units"],
        "pairwise_agreement": report["pairwise_agreement"],
        "alpha": report["alpha"],
    }


def size_category(n: int) -> str:
    """The Hub's size_categories bucket of `n` rows."""
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                         (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M")):
        if n < limit:
            return label
    return "10M<n<100M"


def dataset_card(summary: dict, license: str) -> str:
    """README.md of an exported dataset: Hub front matter, the columns, and the figures."""
    from huggingface_hub import DatasetCard, DatasetCardData

    def show(value):
        return "-" if value is None else f"{value:.3f}"

    data = DatasetCardData(
        license=license, pretty_name=DATASET_NAME, size_categories=[size_category(summary["pairs"])],
        task_categories=["text-generation"], tags=["rankloop", "preference", "dpo", "rlhf", "human-feedback"],
    )
    n, known = summary["pairs"], summary["agreement_known"]
    lines = [
        f"# {DATASET_NAME}",
        "",
        f"{n} preference pairs collected with rankloop: people compared model answers to the same prompt,",
        "and each judgement's ranking became chosen/rejected pairs. The rows are in TRL's conversational",
        "preference format, which `DPOTrainer` and `RewardTrainer` take as is.",
        "",
        "| column | meaning |",
        "|---|---|",
        "| `prompt` | the conversation so far: a list of `{role, content}` messages ending with the user's |",
        "| `chosen`, `rejected` | the preferred and the other answer, each one assistant message |",
        "| `id` | the pair's id in the store it came from |",
        "| `split` | `train`, or `heldout` (about 10% of prompts, by a hash of their text, never trained on) |",
        "| `source` | `judgement` (an annotator's ranking), `arena` (a blind vote between two versions) or `import` |",
        "| `weight` | the loss weight rankloop gives the pair: source weight × item agreement × annotator trust |",
        "| `agreement` | share of the item's judgements that order these two answers this way (empty: not measured) |",
        "",
        "## Counts",
        "",
        "| source | pairs |",
        "|---|---|",
        *[f"| {source} | {count} |" for source, count in summary["sources"].items()],
        f"| **all** | **{n}** |",
        "",
        "Splits: " + ", ".join(f"{split} {count}" for split, count in summary["splits"].items())
        + f". Pairs of weight 0 (kept out of training by rankloop): {summary['zero_weight']}.",
        "",
        "## Agreement",
        "",
        f"- item agreement measured for {known} of {n} pairs (imported pairs and written answers have none)"
        + (f"; mean {show(summary['mean_agreement'])}, {summary['full_agreement']} with full agreement" if known
           else ""),
        f"- over all {summary['judgements']} judgements in the store, {summary['shared_units']} answer pairs were "
        f"judged by two or more annotators: pairwise agreement {show(summary['pairwise_agreement'])}, "
        f"Krippendorff's alpha (nominal) {show(summary['alpha'])}",
        "",
        "## Loading",
        "",
        "```python",
        "from datasets import load_from_disk",
        "",
        'pairs = load_from_disk("THIS_FOLDER")',
        "```",
    ]
    return str(DatasetCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"))
