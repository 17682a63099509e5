"""Which ready item is served next: the project's selection policy (active learning).

Annotators' time is the scarce resource, so the queue can put first the items a judgement
teaches the most. The policy is the project setting `selection_policy`; each ready item gets a
`priority` under it (higher is served first; items without one come after, oldest first), and
the item records the policy that set it (`items.selection`), so what was served, and why, can
be analysed later. Promotion-gate pairs keep their own share of the queue (annotations/gate.py).

- `oldest` (default): first queued, first served.
- `uncertainty`: the smallest margin between the reward-model scores of the item's answers
  (scored by the live reward model when the answers were generated: app/prefetch.py) — the
  items the reward model can least tell apart. Items without scores come after.
- `disagreement`: items already judged whose judgements disagree (the share of answer pairs
  the judgements order differently), while their overlap still takes judgements; then the rest.
- `diversity`: prompts least like those already judged: one minus the highest cosine
  similarity between the prompt's words (hashed counts) and any judged prompt's.
- `model_disagreement`: items whose answers the live reward model and the live policy's
  implicit reward order differently (the share of answer pairs they order differently). The
  implicit reward of an answer is DPO's, log pi_live(answer) - log pi_base(answer) (beta left
  out: it does not change the order), computed by the server that generated the answers while
  it prefetches the item (`candidates.implicit_reward`, app/prefetch.py); with the base live it
  is 0 for every answer and says nothing, so the item gets no priority. Where the two models of
  what people prefer disagree, a judgement settles which one is wrong (a reward model the policy
  has learned to exploit, or a policy that learned what the reward model missed).

Priorities are refreshed when an item becomes ready (`store.add_candidates`), and for every
ready item by `refresh_priorities`, which the app's prefetcher calls on each pass (a judgement
changes what is diverse or disputed). No torch.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from itertools import combinations

POLICIES = ("oldest", "uncertainty", "disagreement", "diversity", "model_disagreement")
DEFAULT_POLICY = "oldest"
HASH_DIMS = 4096
MAX_JUDGED_PROMPTS = 2000  # diversity compares with the most recently judged prompts, at most this many
WORD = re.compile(r"[a-z0-9']+")


def selection_policy(db) -> str:
    from annotations.store import get_setting

    return get_setting(db, "selection_policy", DEFAULT_POLICY)


def set_selection_policy(db, policy: str) -> None:
    from annotations.errors import InvalidInput
    from annotations.store import set_setting

    if policy not in POLICIES:
        raise InvalidInput(f"selection policy {policy!r} is unknown: use one of {', '.join(POLICIES)}")
    set_setting(db, "selection_policy", policy)
    refresh_priorities(db)


def refresh_priorities(db, item_ids: list[int] | None = None) -> int:
    """Set the priority of ready items (`item_ids`, or all) under the project's policy, and
    record the policy on them; returns how many got one. Runs inside the caller's transaction
    if there is one."""
    from annotations.db import write_transaction

    policy = selection_policy(db)
    sql = "SELECT id, prompt_id FROM items WHERE status = 'ready'"
    params: list = []
    if item_ids is not None:
        if not item_ids:
            return 0
        sql += f" AND id IN ({', '.join('?' * len(item_ids))})"
        params = list(item_ids)
    with write_transaction(db):
        items = db.execute(sql, params).fetchall()
        if policy == "oldest":
            values = {item_id: None for item_id, _ in items}
        elif policy == "uncertainty":
            values = {item_id: uncertainty_priority(_scores(db, item_id)) for item_id, _ in items}
        elif policy == "disagreement":
            values = {item_id: disagreement_priority(_rankings(db, item_id)) for item_id, _ in items}
        elif policy == "model_disagreement":
            values = {item_id: model_disagreement_priority(*_scores_and_implicit(db, item_id)) for item_id, _ in items}
        else:
            judged = _judged_vectors(db)
            values = {item_id: diversity_priority(_prompt_vector(db, prompt_id), judged) for item_id, prompt_id in items}
        db.conn.executemany("UPDATE items SET priority = ?, selection = ? WHERE id = ?",
                       [(value, policy, item_id) for item_id, value in values.items()])
    return sum(value is not None for value in values.values())


# ---------------------------------------------------------------- the policies, on plain values


def uncertainty_priority(scores: list[float | None]) -> float | None:
    """Minus the smallest gap between any two answers' reward scores (None without two scores):
    the closer the reward model thinks two answers are, the more a person's judgement teaches."""
    known = [s for s in scores if s is not None]
    if len(known) < 2 or len(known) < len(scores):
        return None
    return -min(abs(a - b) for a, b in combinations(known, 2))


def disagreement_priority(rankings: list[list[list[int]]]) -> float | None:
    """The share of answer pairs that the judgements so far order differently (one of them
    prefers a, another b, or one ties them), over the pairs any judgement ordered; None with
    fewer than two judgements. 0: all agree; 1: every pair disputed."""
    if len(rankings) < 2:
        return None
    orders = [_pair_orders(r) for r in rankings]
    pairs = set().union(*orders)
    if not pairs:
        return 0.0
    disputed = sum(len({order.get(pair, 0) for order in orders}) > 1 for pair in pairs)
    return disputed / len(pairs)


def model_disagreement_priority(scores: list[float | None], implicit: list[float | None]) -> float | None:
    """The share of answer pairs that the reward model's scores and the policy's implicit
    rewards order differently (one prefers a, the other b, or one ties them); None without both
    for every answer, or when the implicit rewards are all equal (the base live: no view of its
    own). 0: the two agree on every pair; 1: on none."""
    if len(scores) < 2 or any(s is None for s in scores) or any(r is None for r in implicit) \
            or len(set(implicit)) == 1:
        return None
    pairs = list(combinations(range(len(scores)), 2))

    def sign(x: float) -> int:
        return (x > 0) - (x < 0)

    disputed = sum(sign(scores[a] - scores[b]) != sign(implicit[a] - implicit[b]) for a, b in pairs)
    return disputed / len(pairs)


def diversity_priority(vector: dict[int, float], judged: list[dict[int, float]]) -> float:
    """One minus the highest cosine similarity to any judged prompt (1 with none judged)."""
    if not judged:
        return 1.0
    return 1.0 - max(_cosine(vector, other) for other in judged)


def text_vector(text: str) -> dict[int, float]:
    """Hashed word counts of a text, L2-normalised (a bag of words; no model needed)."""
    counts: dict[int, float] = {}
    for word in WORD.findall(text.lower()):
        index = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=4).digest(), "big") % HASH_DIMS
        counts[index] = counts.get(index, 0.0) + 1.0
    norm = math.sqrt(sum(v * v for v in counts.values())) or 1.0
    return {k: v / norm for k, v in counts.items()}


# ---------------------------------------------------------------- reading the store


def _scores(db, item_id: int) -> list[float | None]:
    return [r[0] for r in db.execute(
        "SELECT reward_score FROM candidates WHERE item_id = ? AND policy_version IS NOT NULL", [item_id])]


def _scores_and_implicit(db, item_id: int) -> tuple[list[float | None], list[float | None]]:
    rows = db.execute("SELECT reward_score, implicit_reward FROM candidates"
                      " WHERE item_id = ? AND policy_version IS NOT NULL ORDER BY id", [item_id]).fetchall()
    return [r[0] for r in rows], [r[1] for r in rows]


def _rankings(db, item_id: int) -> list[list[list[int]]]:
    return [json.loads(r[0]) for r in db.execute(
        "SELECT ranking FROM judgements WHERE item_id = ? AND both_bad = 0", [item_id])]


def _pair_orders(tiers: list[list[int]]) -> dict[tuple[int, int], int]:
    """{(a, b) with a < b: +1 a above b, -1 below, 0 tied} for a ranking's answers."""
    level = {c: i for i, tier in enumerate(tiers) for c in tier}
    return {(a, b): (level[a] < level[b]) - (level[a] > level[b]) for a, b in combinations(sorted(level), 2)}


def _prompt_text(messages: str) -> str:
    return " ".join(m["content"] for m in json.loads(messages) if m["role"] in ("user", "system"))


def _prompt_vector(db, prompt_id: int) -> dict[int, float]:
    return text_vector(_prompt_text(db.execute("SELECT messages FROM prompts WHERE id = ?", [prompt_id]).fetchone()[0]))


def _judged_vectors(db) -> list[dict[int, float]]:
    rows = db.execute(
        "SELECT DISTINCT prompts.messages FROM judgements JOIN items ON items.id = judgements.item_id"
        " JOIN prompts ON prompts.id = items.prompt_id ORDER BY judgements.id DESC LIMIT ?",
        [MAX_JUDGED_PROMPTS]).fetchall()
    return [text_vector(_prompt_text(r[0])) for r in rows]


def _cosine(a: dict[int, float], b: dict[int, float]) -> float:
    if len(a) > len(b):
        a, b = b, a
    return sum(v * b.get(k, 0.0) for k, v in a.items())
