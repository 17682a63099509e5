"""Plain functions behind the UI: the UI wires them to components, tests call them directly.

Each takes the `AppContext` and the acting user (a store row, or None for anonymous) and
checks the user's role itself: Gradio exposes every event handler as an HTTP endpoint, so a
hidden button protects nothing.
"""

from __future__ import annotations

import logging
import re
import string
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from annotations import model_versions, store
from annotations.db import connect as connect_db
from app.prefetch import DEFAULT_ANSWER_INSTRUCTION
from annotations.errors import InvalidInput, NotFound, PermissionDenied

logger = logging.getLogger(__name__)

PAIRWISE_CHOICES = ("A", "B", "tie", "both_bad")
LETTERS = string.ascii_uppercase[:6]
DEFAULT_GUIDELINES = """\
**How to judge.** Prefer the answer that is more helpful, honest and harmless, in that order of
importance when they conflict. Judge the content, not the length: a short correct answer beats a
long rambling one. If both answers are unacceptable, choose *both bad*; if you can write a
clearly better answer, do so in the editor (it is stored as the best answer).

**Ranking.** Type the answers best first, `>` between levels and `=` for ties: `B > A = C > D`.
"""
DEFAULT_SETTINGS = {
    "mode": "pairwise",
    "k": 4,
    "overlap": 1,
    "pair_policy": "all",
    # 256 new tokens under the answer instruction: most answers end by themselves well before
    # (bench/completeness.py measures the share and the time per item it costs)
    "sampling": {"temperature": 0.8, "top_p": 0.95, "repetition_penalty": 1.1, "max_new_tokens": 256},
    # sample an answer again when the token budget cut it off (app/prefetch.py)
    "exclude_truncated": True,
    # the system message candidates are sampled under when a prompt has none (app/prefetch.py)
    "answer_instruction": DEFAULT_ANSWER_INSTRUCTION,
    # how long after giving a judgement its author may change it (annotations/judgement_history.py)
    "reopen_window_minutes": 30,
    # which ready item is served next (annotations/selection.py)
    "selection_policy": "oldest",
    # the live reward model's suggested ranking on the annotate page (off for blind studies)
    "suggestions": True,
}
MAX_INSTRUCTION_CHARS = 2_000


@dataclass
class AppContext:
    """Everything the handlers share: the store's path, the policy server, the prefetcher."""

    db_path: Path
    server: object = None  # app.serving.PolicyServer
    prefetcher: object = None  # app.prefetch.Prefetcher
    live: object = None  # app.live.LiveWatcher
    worker: object = None  # app.live.WorkerProcess
    lease_seconds: float = store.DEFAULT_LEASE_SECONDS
    export_dir: Path | None = None  # where exports are written, each in a fresh private folder
    upload_dir: Path | None = None  # when set, only files under it (Gradio's uploads) can be imported
    file_owners: object = None  # app.guard.FileOwners: who may download each export
    errors: object = None  # app.health.ErrorLog: what the background parts report
    # adapters an admin's API key loaded by name through vLLM's runtime LoRA route
    # (app/completions.py: load_named_adapter): name -> folder; the server holds the weights
    named_adapters: dict = field(default_factory=dict)
    _local: threading.local = field(default_factory=threading.local, repr=False)

    def db(self):
        """This thread's connection to the store (sqlite connections are not shared)."""
        conn = getattr(self._local, "db", None)
        if conn is None:
            conn = self._local.db = connect_db(self.db_path)
        return conn

    def setting(self, key: str):
        return store.get_setting(self.db(), key, DEFAULT_SETTINGS.get(key))

    def wake_prefetcher(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.wake()


def _annotator(user):
    return store.require_role(user, "annotator", "admin")


def _admin(user):
    return store.require_role(user, "admin")


# ---------------------------------------------------------------- annotate


def next_item(ctx: AppContext, user: dict | None) -> dict | None:
    """Lease the next item for this annotator and return what the page shows, or None.

    Call it when the Annotate page actually shows the item. The answers are labelled A, B, ...
    in the order the store dealt them to this user (random, and the same every time the same
    item is shown to them again); that order is later stored as `shown_order`. `served_at` is
    when they first saw it, `key` the idempotency key its submission carries.
    """
    user = _annotator(user)
    item = store.next_item(ctx.db(), user["id"], lease_seconds=ctx.lease_seconds)
    ctx.wake_prefetcher()
    if item is None:
        return None
    return {
        "item_id": item["id"],
        "mode": item["mode"],
        "messages": item["messages"],
        "answers": [{"id": c["id"], "text": c["text"], "letter": LETTERS[i], "truncated": bool(c["truncated"])}
                    for i, c in enumerate(item["candidates"])],
        "shown_order": item["shown_order"],
        "served_at": item["served_at"],
        "key": item["view_key"],
        "suggestion": suggestion_in_letters(item.get("suggestion"), item["shown_order"]),
    }


def suggestion_in_letters(suggestion: dict | None, shown_order: list[int]) -> dict | None:
    """The reward model's suggested ranking (annotations/suggestions.py) in the letters shown:
    {"ranking": "B > A = C", "scores": [(letter, score)...] in letter order, "version"}."""
    if not suggestion:
        return None
    letter = {cid: LETTERS[i] for i, cid in enumerate(shown_order)}
    if any(c not in letter for tier in suggestion["ranking"] for c in tier):
        return None
    ranking = " > ".join(" = ".join(sorted(letter[c] for c in tier)) for tier in suggestion["ranking"])
    scores = sorted((letter[int(c)], value) for c, value in suggestion["scores"].items() if int(c) in letter)
    return {"ranking": ranking, "scores": scores, "version": suggestion["version"]}


def parse_ranking(text: str, k: int) -> list[list[int]]:
    """Parse a typed ranking over answers A.. into tiers of 0-based positions, best first.

    `B > A = C > D` (spaces optional, lower case fine); `BACD` is a strict order. Every
    answer must appear exactly once.
    """
    letters = LETTERS[:k]
    compact = re.sub(r"\s+", "", (text or "").upper())
    if not compact:
        raise InvalidInput(f"type a ranking of {', '.join(letters)}, best first, e.g. {' > '.join(letters)}")
    if not re.fullmatch(r"[A-Z>=,]+", compact):
        raise InvalidInput("a ranking uses only answer letters, '>' between levels and '=' for ties")
    if ">" not in compact and "=" not in compact and "," not in compact:
        compact = ">".join(compact)
    tiers, seen = [], []
    for level in re.split(r"[>,]", compact):
        members = [m for m in level.split("=")]
        if not level or any(len(m) != 1 for m in members):
            raise InvalidInput(f"cannot read {text!r}: write single letters such as B > A = C")
        for m in members:
            if m not in letters:
                raise InvalidInput(f"there is no answer {m}: this item has {', '.join(letters)}")
        tiers.append([letters.index(m) for m in members])
        seen.extend(members)
    duplicates = sorted({m for m in seen if seen.count(m) > 1})
    missing = [m for m in letters if m not in seen]
    if duplicates:
        raise InvalidInput(f"{', '.join(duplicates)} appear(s) more than once in the ranking")
    if missing:
        raise InvalidInput(f"the ranking must place every answer: {', '.join(missing)} missing")
    return tiers


def _letters_to_ids(view: dict, letters) -> list[int]:
    ids = []
    for letter in letters or []:
        position = LETTERS.find(str(letter).strip().upper()[:1])
        if position < 0 or position >= len(view["shown_order"]):
            raise InvalidInput(f"there is no answer {letter!r} on this item")
        ids.append(view["shown_order"][position])
    return ids


def _ratings(view: dict, thumbs_up, thumbs_down) -> dict[int, int]:
    up, down = _letters_to_ids(view, thumbs_up), _letters_to_ids(view, thumbs_down)
    both = set(up) & set(down)
    if both:
        raise InvalidInput("an answer cannot get both a thumbs up and a thumbs down")
    return {**{c: 1 for c in up}, **{c: -1 for c in down}}


def _require_view(view):
    if not view or "item_id" not in view:
        raise InvalidInput("there is no item on screen; load the next item")
    return view


def _submit(ctx, user, view, ranking, both_bad, edited, thumbs_up, thumbs_down):
    decision_ms = int((time.time() - view.get("served_at", time.time())) * 1000)
    result = store.submit_judgement(
        ctx.db(), user["id"], view["item_id"], ranking,
        shown_order=view["shown_order"], both_bad=both_bad, decision_ms=decision_ms,
        idempotency_key=view.get("key"), pair_policy=ctx.setting("pair_policy"),
        human_text=(edited or None) if (edited or "").strip() else None,
        ratings=_ratings(view, thumbs_up, thumbs_down),
    )
    ctx.wake_prefetcher()
    return result


def submit_pairwise(ctx: AppContext, user: dict | None, view: dict | None, choice: str, *,
                    edited: str | None = None, thumbs_up=(), thumbs_down=()) -> dict:
    """Store an A / B / tie / both-bad judgement on the item in `view` (stored once, however
    often the same view is submitted)."""
    user = _annotator(user)
    view = _require_view(view)
    if choice not in PAIRWISE_CHOICES:
        raise InvalidInput(f"choice {choice!r} is unknown: use one of {', '.join(PAIRWISE_CHOICES)}")
    if len(view["shown_order"]) != 2:
        raise InvalidInput("this item has more than two answers: submit a ranking")
    first, second = view["shown_order"]
    ranking, both_bad = store.pairwise_ranking(choice, first, second)
    return _submit(ctx, user, view, ranking, both_bad, edited, thumbs_up, thumbs_down)


def submit_ranking(ctx: AppContext, user: dict | None, view: dict | None, ranking_text: str, *,
                   all_bad: bool = False, edited: str | None = None, thumbs_up=(), thumbs_down=()) -> dict:
    """Store a full ranking (ties allowed) typed as letters, e.g. `B > A = C > D`; with
    `all_bad`, no answer is preferred (every answer gets a thumbs down)."""
    user = _annotator(user)
    view = _require_view(view)
    order = view["shown_order"]
    if all_bad:
        ranking = [list(order)]
    else:
        ranking = [[order[p] for p in tier] for tier in parse_ranking(ranking_text, len(order))]
    return _submit(ctx, user, view, ranking, all_bad, edited, thumbs_up, thumbs_down)


def recent_judgements(ctx: AppContext, user: dict | None, limit: int = 10) -> list[dict]:
    """The person's last judgements, newest first, and until when each may be changed
    (annotations/judgement_history.py)."""
    from annotations.judgement_history import recent_judgements as recent

    return recent(ctx.db(), _annotator(user)["id"], limit)


def reopen_judgement(ctx: AppContext, user: dict | None, judgement_id) -> dict:
    """One of the person's judgements, ready to change: its prompt, its answers in the letters
    they saw, and what they said. Refused when it is not theirs or its window has passed."""
    from annotations.judgement_history import describe_ranking, judgement_for_reopening

    user = _annotator(user)
    try:
        judgement_id = int(judgement_id)
    except (TypeError, ValueError):
        raise InvalidInput("give the number of one of your judgements (the first column of the list)") from None
    old = judgement_for_reopening(ctx.db(), user["id"], judgement_id)
    texts = store.candidate_texts(ctx.db(), old["item_id"])
    prompt = store.get_prompt(ctx.db(), store.item_prompt_id(ctx.db(), old["item_id"]))
    return {
        "judgement_id": judgement_id, "item_id": old["item_id"], "messages": prompt["messages"],
        "answers": [{"letter": LETTERS[i], "text": texts[c]} for i, c in enumerate(old["shown_order"])],
        "written": texts.get(old["written_id"]) if old["written_id"] else None,
        "shown_order": old["shown_order"],
        "current": describe_ranking(old["ranking"], old["shown_order"], old["both_bad"]),
    }


def revise_judgement(ctx: AppContext, user: dict | None, reopened: dict | None, ranking_text: str) -> dict:
    """Change the reopened judgement to `ranking_text` (`B > A = C`, or `both bad`): its pairs
    are derived again in one transaction. Returns {"judgement_id" (new number), "previous_id",
    "pairs"}."""
    from annotations.judgement_history import revise_judgement as revise

    user = _annotator(user)
    if not reopened or "judgement_id" not in reopened:
        raise InvalidInput("reopen one of your judgements first")
    shown = reopened["shown_order"]
    both_bad = re.sub(r"[\s_-]+", " ", (ranking_text or "").strip().lower()) in ("both bad", "all bad")
    positions = [list(range(len(shown)))] if both_bad else parse_ranking(ranking_text, len(shown))
    tiers = [[shown[p] for p in tier] for tier in positions]
    result = revise(ctx.db(), user["id"], int(reopened["judgement_id"]), tiers, both_bad=both_bad,
                    pair_policy=ctx.setting("pair_policy"))
    return result


def skip(ctx: AppContext, user: dict | None, view: dict | None, reason: str) -> None:
    user = _annotator(user)
    view = _require_view(view)
    store.skip_item(ctx.db(), user["id"], view["item_id"], reason)
    ctx.wake_prefetcher()


def flag(ctx: AppContext, user: dict | None, view: dict | None, letters=(), reason: str = "unsafe") -> int:
    """Flag the prompt (no letters) or the given answers as unsafe; the item stays on screen."""
    user = _annotator(user)
    view = _require_view(view)
    return store.flag_item(ctx.db(), user["id"], view["item_id"], reason, _letters_to_ids(view, letters))


def best_answer_text(view: dict | None, ranking_text: str = "", choice: str | None = None) -> str:
    """The text to start an edit from: the answer ranked (or chosen) best so far, else A."""
    view = _require_view(view)
    answers = view["answers"]
    position = 0
    if choice == "B":
        position = 1
    elif ranking_text and ranking_text.strip():
        try:
            position = parse_ranking(ranking_text, len(answers))[0][0]
        except InvalidInput:
            position = 0
    return answers[position]["text"]


def annotator_progress(ctx: AppContext, user: dict | None) -> dict:
    user = _annotator(user)
    db = ctx.db()
    return {**store.judgement_counts(db, user["id"]), "ready": store.count_items(db, "ready"),
            "pending": store.count_items(db, "pending")}


def guidelines(ctx: AppContext, user: dict | None) -> str:
    _annotator(user)
    return store.get_setting(ctx.db(), "guidelines", DEFAULT_GUIDELINES)


# ---------------------------------------------------------------- admin: project settings


def whoami(user: dict | None) -> dict:
    return store.require_role(user)


def save_guidelines(ctx: AppContext, user: dict | None, text: str) -> None:
    _admin(user)
    if len(text or "") > 50_000:
        raise InvalidInput("guidelines are limited to 50,000 characters")
    store.set_setting(ctx.db(), "guidelines", text or "")


def project_settings(ctx: AppContext, user: dict | None) -> dict:
    _admin(user)
    return {key: ctx.setting(key) for key in DEFAULT_SETTINGS}


def save_project_settings(ctx: AppContext, user: dict | None, *, mode: str, k: int, overlap: int,
                          pair_policy: str, sampling: dict, exclude_truncated: bool = True,
                          answer_instruction: str | None = None,
                          reopen_window_minutes: float | None = None, selection_policy: str | None = None,
                          suggestions: bool | None = None) -> dict:
    """Validate and store the defaults for newly queued items and for deriving pairs."""
    from app.serving import SamplingParams

    _admin(user)
    k, overlap = int(k), int(overlap)
    if mode not in ("pairwise", "ranking"):
        raise InvalidInput("mode must be pairwise or ranking")
    if not 2 <= k <= 6:
        raise InvalidInput("K must be between 2 and 6")
    if overlap < 1 or overlap > 20:
        raise InvalidInput("overlap must be between 1 and 20")
    if pair_policy not in store.PAIR_POLICIES:
        raise InvalidInput(f"pair policy must be one of {', '.join(store.PAIR_POLICIES)}")
    try:
        sampling = SamplingParams(**sampling).as_dict()
    except (TypeError, ValueError) as e:
        raise InvalidInput(str(e)) from None
    instruction = ctx.setting("answer_instruction") if answer_instruction is None else answer_instruction.strip()
    if len(instruction) > MAX_INSTRUCTION_CHARS:
        raise InvalidInput(f"the answer instruction is limited to {MAX_INSTRUCTION_CHARS:,} characters")
    reopen = ctx.setting("reopen_window_minutes") if reopen_window_minutes is None else reopen_window_minutes
    if not 0 <= float(reopen) <= 10_080:
        raise InvalidInput("minutes to change a judgement must be between 0 (never) and 10,080 (a week)")
    from annotations.selection import POLICIES, set_selection_policy

    selection = selection_policy or ctx.setting("selection_policy")
    if selection not in POLICIES:
        raise InvalidInput(f"the selection policy must be one of {', '.join(POLICIES)}")
    values = {"mode": mode, "k": k, "overlap": overlap, "pair_policy": pair_policy, "sampling": sampling,
              "exclude_truncated": bool(exclude_truncated), "answer_instruction": instruction,
              "reopen_window_minutes": int(reopen),
              "suggestions": bool(ctx.setting("suggestions") if suggestions is None else suggestions)}
    for key, value in values.items():
        store.set_setting(ctx.db(), key, value)
    set_selection_policy(ctx.db(), selection)  # the ready items' order follows at once
    return {**values, "selection_policy": selection}


def queued_unlike_settings(ctx: AppContext, user: dict | None) -> int:
    """Unjudged queued items that keep an earlier mode, K or overlap than the saved settings."""
    _admin(user)
    return store.queued_unlike(ctx.db(), ctx.setting("mode"), int(ctx.setting("k")), int(ctx.setting("overlap")))


def requeue_with_settings(ctx: AppContext, user: dict | None) -> str:
    """Queue unjudged items afresh with the saved mode, K and overlap (the old ones retire)."""
    _admin(user)
    requeued, held = store.requeue_unlike(ctx.db(), ctx.setting("mode"), int(ctx.setting("k")),
                                          int(ctx.setting("overlap")))
    ctx.wake_prefetcher()
    return (f"Requeued {requeued} unjudged item(s) with the current settings"
            + (f"; {held} that someone has open were left as they are" if held else "") + ".")


def describe_settings(values: dict) -> str:
    """The saved project settings in words, for the admin who saved them."""
    sampling = values["sampling"]
    return (f"Saved. New items: {values['mode']}"
            + (f" with {values['k']} answers" if values["mode"] == "ranking" else "")
            + f", {values['overlap']} judgement(s) each, pairs by '{values['pair_policy']}'; answers sampled at "
            f"temperature {sampling['temperature']}, top-p {sampling['top_p']}, up to {sampling['max_new_tokens']} "
            "tokens" + ("; cut-off answers are sampled again" if values["exclude_truncated"] else "")
            + (f"; instruction: \u201c{values['answer_instruction']}\u201d" if values["answer_instruction"]
               else "; no answer instruction")
            + (f"; a judgement may be changed for {values['reopen_window_minutes']} minutes"
               if values.get("reopen_window_minutes") else "; judgements cannot be changed once given")
            + (f"; ready items served {SELECTION_WORDS[values['selection_policy']]}"
               if values.get("selection_policy") else "")
            + ("; the reward model's suggestions shown" if values.get("suggestions") else "; no suggestions shown")
            + "."
            + (f" {values['queued_unlike']} unjudged item(s) already queued keep their earlier mode, K or overlap: "
               "*Requeue unjudged items* queues them again with these." if values.get("queued_unlike") else
               " Items already queued follow these settings." if "queued_unlike" in values else ""))


SELECTION_WORDS = {
    "oldest": "oldest first",
    "uncertainty": "where the live reward model is least sure first (its scores of the answers closest)",
    "disagreement": "where annotators disagree first",
    "diversity": "least like the prompts already judged first",
    "model_disagreement": "where the live reward model and the live policy's implicit reward order the answers "
                          "differently first",
}


def weighting(ctx: AppContext, user: dict | None) -> dict:
    from annotations.quality import weighting as stored_weighting

    _admin(user)
    return stored_weighting(ctx.db())


def save_weighting(ctx: AppContext, user: dict | None, *, agreement: bool, annotator_accuracy: bool,
                   sources: dict) -> str:
    """Store how pairs are weighed in training and re-weigh every stored pair."""
    from annotations.quality import set_weighting

    _admin(user)
    values = set_weighting(ctx.db(), {"agreement": bool(agreement), "annotator_accuracy": bool(annotator_accuracy),
                                      "sources": {k: float(v) for k, v in (sources or {}).items()}})
    factors = [name for name, on in (("item agreement", values["agreement"]),
                                     ("annotator trust", values["annotator_accuracy"])) if on]
    return ("Saved; every pair re-weighed: source weight"
            + "".join(f" × {f}" for f in factors) + " ("
            + ", ".join(f"{k} {v:g}" for k, v in values["sources"].items()) + ").")


def queue_prompt(ctx: AppContext, user: dict | None, text: str, *, versions=(), mode=None, k=None,
                 overlap=None) -> int:
    """Queue one prompt typed by an admin; `versions` asks for answers from those versions."""
    _admin(user)
    prompt_id, _ = store.add_prompt(ctx.db(), text, source=f"admin:{user['name']}")
    versions = [v for v in versions or [] if v]
    for v in versions:
        row = model_versions.find_version(ctx.db(), v)
        if row is None or row["kind"] != "policy":
            raise NotFound(f"no policy version {v!r}")
    (item_id,) = store.queue_items(
        ctx.db(), [prompt_id], mode=mode or ctx.setting("mode"), k=int(k or ctx.setting("k")),
        overlap=int(overlap or ctx.setting("overlap")), versions=versions or None,
    )
    ctx.wake_prefetcher()
    return item_id


def import_upload(ctx: AppContext, user: dict | None, path: str, fmt: str) -> str:
    """Import an uploaded file (the admin page's upload); returns the import summary."""
    from annotations.formats import import_file

    _admin(user)
    if not path:
        raise InvalidInput("choose a file to import")
    # Gradio already refuses a path outside its upload folder; this holds even if it did not.
    if ctx.upload_dir is not None and not Path(path).resolve().is_relative_to(Path(ctx.upload_dir).resolve()):
        raise PermissionDenied("only a file uploaded through the page can be imported")
    name = Path(path).name
    try:
        report = import_file(
            ctx.db(), Path(path), fmt, source=f"upload:{name}",
            mode=ctx.setting("mode"), k=int(ctx.setting("k")), overlap=int(ctx.setting("overlap")),
        )
    except InvalidInput as e:  # the message names the file the admin chose, not where the server keeps it
        raise InvalidInput(str(e).replace(str(path), name)) from None
    finally:
        if ctx.upload_dir is not None:  # an upload is read once: it does not stay in the server's cache
            Path(path).unlink(missing_ok=True)
    ctx.wake_prefetcher()
    report.path = name
    return report.summary()


EXPORT_FORMATS = ("jsonl", "parquet", "csv")


def export_download(ctx: AppContext, user: dict | None, *, split: str | None = None, file_format: str = "jsonl",
                    **filters) -> tuple[str, int]:
    """Write the TRL export to a file in a fresh private folder (mode 0700) of the export folder;
    returns (path, rows). Nothing the caller sends becomes part of the path unchecked."""
    from annotations.formats import export_pairs

    _admin(user)
    if file_format not in EXPORT_FORMATS:
        raise InvalidInput(f"export format must be one of {', '.join(EXPORT_FORMATS)}")
    if split not in (None, "train", "heldout"):
        raise InvalidInput("split must be train, heldout or empty (all)")
    root = Path(ctx.export_dir or tempfile.gettempdir())
    root.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="rankloop-export-", dir=root))
    # a random token in the name: the copy Gradio serves keeps it, and the guard serves that copy
    # to this admin alone (app.guard)
    out = folder / f"pairs{'-' + split if split else ''}-{uuid.uuid4().hex[:16]}.{file_format}"
    n = export_pairs(ctx.db(), out, split=split or None, **filters)
    if ctx.file_owners is not None:
        ctx.file_owners.add(out, user["name"])
    return str(out), n


def health(ctx: AppContext, user: dict | None) -> dict:
    """Every part's state and what went wrong (app.health)."""
    from app.health import health_report

    _admin(user)
    return health_report(ctx)


def quality_report(ctx: AppContext, user: dict | None) -> str:
    """Agreement, Krippendorff's alpha, gold accuracy and decision times, as a text table."""
    from annotations.quality import agreement_report, format_report

    _admin(user)
    return format_report(agreement_report(ctx.db()))


def available_versions(ctx: AppContext, user: dict | None) -> dict:
    """{"available": what annotators may pick in chat and the arena, "extra": those listed by an
    admin beyond the live version, its parent and the candidates}."""
    _admin(user)
    return {"available": model_versions.available_versions(ctx.db()),
            "extra": store.get_setting(ctx.db(), model_versions.AVAILABLE_SETTING, []) or []}


def save_available_versions(ctx: AppContext, user: dict | None, names) -> str:
    _admin(user)
    available = model_versions.set_available_versions(ctx.db(), list(names or []))
    return "Annotators may now pick: " + ", ".join(available) + "."


def add_account(ctx: AppContext, user: dict | None, name: str, role: str, password: str) -> str:
    _admin(user)
    store.add_user(ctx.db(), name, role, password)
    return f"created {role} {name}"


def list_accounts(ctx: AppContext, user: dict | None) -> list[list]:
    _admin(user)
    return [[a["name"], a["role"], a["judgements"], a["created_at"]] for a in store.list_accounts(ctx.db())]


def mark_gold(ctx: AppContext, user: dict | None, view: dict | None, ranking_text: str) -> int:
    """Make the item on screen gold, with the admin's typed ranking as its known answer."""
    _admin(user)
    view = _require_view(view)
    order = view["shown_order"]
    ranking = [[order[p] for p in tier] for tier in parse_ranking(ranking_text, len(order))]
    store.set_gold(ctx.db(), view["item_id"], ranking)
    return view["item_id"]
