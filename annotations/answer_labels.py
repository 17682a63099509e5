"""Unpaired labels for KTO: one label per answer, decided from every signal about it.

KTO trains on answers labelled desirable or undesirable. The store holds several signals about
the same answer, and read naively they contradict each other: under the "all" pair policy a
middle answer of a ranking is the chosen side of some pairs and the rejected side of others,
and a thumb may say the opposite of a ranking. Here each answer (a prompt and an answer text)
gets at most one label per round:

1. Votes. Each signal gives the answer a vote of +1 or -1:
   - a judgement (derived): its top tier +1, its bottom tier -1, the tiers between give no
     vote, and a ranking that is one tier (all tied) gives none; a "both bad" judgement gives
     every model answer -1; an answer the annotator wrote is the top tier (+1);
   - a pair that no judgement derived (imported, arena): chosen +1, rejected -1 (derived);
   - a thumbs rating, on the Annotate page or in chat (explicit).
2. Decision. If the answer has explicit votes, they alone decide (an explicit thumb overrides
   what a ranking implies); otherwise the derived votes do. The label is the sign of the sum;
   a sum of 0 (an even split) leaves the answer out.
3. Weight. The mean weight of the votes on the winning side times the share of votes that
   side holds (a 3-to-1 majority counts 3/4). A vote's weight is its source's weight, times the
   annotator's trust where an annotator gave it (`annotations.quality`); a pair's vote carries
   the pair's stored weight.

`sources` picks the signals: 'ratings' (explicit thumbs only), 'pairs' (judgements and
underived pairs), or 'both'. Snapshot edges (`*_until`) and "since" edges bound each signal by
its row id, as for pairs (`annotations.training_data`).
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict

from annotations.quality import _gold_record, annotator_trust, weighting

SOURCES = ("ratings", "pairs", "both")
EXPLICIT_RATING_SOURCES = ("thumbs", "chat")  # 'both_bad' ratings repeat what the judgement says


def _answer_key(prompt_id: int, text: str) -> tuple[int, str]:
    return prompt_id, text.strip()


def _bounds(column: str, since: int, until: int | None) -> tuple[str, list]:
    sql, params = f" AND {column} > ?", [since]
    if until is not None:
        sql += f" AND {column} <= ?"
        params.append(until)
    return sql, params


def kto_examples(
    db,
    split: str | None = "train",
    *,
    sources: str = "both",
    since: dict | None = None,
    until: dict | None = None,
) -> list[dict]:
    """One labelled example per answer (see the module notes), oldest first:
    {"id", "messages", "completion" (text), "label" (bool), "weight", "votes" (n)}.

    `since` / `until` map "judgement", "pair" and "rating" to row-id edges (missing: no edge).
    """
    if sources not in SOURCES:
        raise ValueError(f"sources must be one of {', '.join(SOURCES)}, got {sources!r}")
    since, until = dict(since or {}), dict(until or {})
    settings = weighting(db)
    trust = {user: annotator_trust(*record) for user, record in _gold_record(db, None).items()} \
        if settings["annotator_accuracy"] else {}
    annotation_weight = settings["sources"]["annotation"]
    split_sql, split_params = (" AND prompts.split = ?", [split]) if split else ("", [])
    votes: dict[tuple[int, str], dict[str, list[tuple[int, float]]]] = defaultdict(lambda: {"explicit": [],
                                                                                            "derived": []})
    messages: dict[int, str] = {}
    order: dict[tuple[int, str], int] = {}

    def vote(prompt_id, prompt_messages, text, value, weight, kind):
        key = _answer_key(prompt_id, text)
        if not key[1]:
            return
        messages[prompt_id] = prompt_messages
        order.setdefault(key, len(order))
        votes[key][kind].append((value, weight))

    if sources in ("pairs", "both"):
        bounds, params = _bounds("j.id", since.get("judgement", 0), until.get("judgement"))
        rows = db.execute(
            "SELECT j.id, j.user_id, j.ranking, j.both_bad, items.prompt_id, prompts.messages FROM judgements j"
            " JOIN items ON items.id = j.item_id JOIN prompts ON prompts.id = items.prompt_id"
            " WHERE 1" + bounds + split_sql + " ORDER BY j.id", params + split_params).fetchall()
        texts = {cid: (text, version) for cid, text, version in db.execute(
            "SELECT c.id, c.text, c.policy_version FROM candidates c WHERE c.item_id IN"
            " (SELECT item_id FROM judgements)").fetchall()}
        for _, user_id, ranking, both_bad, prompt_id, prompt_messages in rows:
            tiers = json.loads(ranking)
            weight = annotation_weight * trust.get(user_id, 1.0)
            for position, tier in enumerate(tiers):
                for candidate_id in tier:
                    text, version = texts[candidate_id]
                    written = version is None
                    if both_bad:
                        value = 1 if written else -1
                    elif len(tiers) >= 2 and position == 0:
                        value = 1
                    elif len(tiers) >= 2 and position == len(tiers) - 1:
                        value = -1
                    else:
                        continue
                    vote(prompt_id, prompt_messages, text, value, weight, "derived")
        bounds, params = _bounds("pairs.id", since.get("pair", 0), until.get("pair"))
        for prompt_id, prompt_messages, chosen, rejected, weight in db.execute(
            "SELECT pairs.prompt_id, prompts.messages, pairs.chosen, pairs.rejected, pairs.weight FROM pairs"
            " JOIN prompts ON prompts.id = pairs.prompt_id WHERE pairs.judgement_id IS NULL" + bounds + split_sql
            + " ORDER BY pairs.id", params + split_params).fetchall():
            vote(prompt_id, prompt_messages, chosen, 1, weight, "derived")
            vote(prompt_id, prompt_messages, rejected, -1, weight, "derived")
    if sources in ("ratings", "both"):
        bounds, params = _bounds("ratings.id", since.get("rating", 0), until.get("rating"))
        for user_id, value, source, text, prompt_id, prompt_messages in db.execute(
            "SELECT ratings.user_id, ratings.value, ratings.source, candidates.text, items.prompt_id,"
            " prompts.messages FROM ratings JOIN candidates ON candidates.id = ratings.candidate_id"
            " JOIN items ON items.id = candidates.item_id JOIN prompts ON prompts.id = items.prompt_id"
            f" WHERE ratings.value != 0 AND ratings.source IN ({', '.join('?' * len(EXPLICIT_RATING_SOURCES))})"
            + bounds + split_sql + " ORDER BY ratings.id",
            [*EXPLICIT_RATING_SOURCES, *params, *split_params]).fetchall():
            weight = settings["sources"]["chat"] if source == "chat" else \
                annotation_weight * trust.get(user_id, 1.0)
            vote(prompt_id, prompt_messages, text, 1 if value > 0 else -1, weight, "explicit")

    examples = []
    for key in sorted(votes, key=order.__getitem__):
        deciding = votes[key]["explicit"] or votes[key]["derived"]
        total = sum(value for value, _ in deciding)
        if total == 0:
            continue
        winning = [weight for value, weight in deciding if (value > 0) == (total > 0)]
        prompt_id, text = key
        examples.append({
            "id": f"{prompt_id}:{hashlib.sha256(text.encode('utf-8')).hexdigest()[:16]}",
            "messages": json.loads(messages[prompt_id]),
            "completion": text,
            "label": total > 0,
            "weight": sum(winning) / len(deciding),  # mean winning weight x the winning share
            "votes": len(deciding),
        })
    return examples
