"""The reward model's suggested ranking of an item's answers, and how often people agree with it.

When the live reward model scored an item's answers as it was prefetched (app/reward_scores.py)
and the project shows suggestions (setting `suggestions`, on by default; off for blind
studies), the person the item is shown to sees the answers ranked by those scores, marked as a
suggestion with the scores, and may accept or change it. What was suggested is recorded when
the item is first shown to them (`item_views.suggestion`) and copied onto their judgement
(`judgements.suggestion`), so the judgement says what the person saw.

`suggestion_agreement` turns those records into a running estimate of the reward model's
accuracy on fresh data: of the answer pairs people ordered, the share the suggestion ordered
the same way, per reward-model version and per annotator, with exact intervals and n; and how
often the suggestion was accepted unchanged. (People who accept suggestions without reading
make this figure look better than it is: the share accepted unchanged beside it shows when to
worry; a blind study, with suggestions off, is the clean measure.) No torch.
"""

from __future__ import annotations

import json
from itertools import combinations

from annotations.intervals import MIN_TRUSTWORTHY_N, accuracy

DEFAULT_SHOW = True


def show_suggestions(db) -> bool:
    from annotations.store import get_setting

    return bool(get_setting(db, "suggestions", DEFAULT_SHOW))


def suggestion_for(candidates: list[dict]) -> dict | None:
    """{"ranking": tiers of candidate ids, best first (equal scores tied), "scores": {id: score},
    "version"} from candidates' stored reward scores; None unless every answer has one, all from
    the same reward model."""
    scores = {c["id"]: c.get("reward_score") for c in candidates}
    versions = {c.get("reward_version") for c in candidates}
    if not candidates or any(s is None for s in scores.values()) or len(versions) != 1:
        return None
    tiers: list[list[int]] = []
    for cid in sorted(scores, key=lambda c: -scores[c]):
        if tiers and scores[tiers[-1][0]] == scores[cid]:
            tiers[-1].append(cid)
        else:
            tiers.append([cid])
    return {"ranking": tiers, "scores": {str(k): v for k, v in scores.items()}, "version": versions.pop()}


def suggestion_agreement(db) -> dict:
    """{"by_version": [...], "by_annotator": [...]}: for each reward-model version and each
    (annotator, version), the answer pairs people ordered strictly, how many the suggestion
    ordered the same way (agreement with its exact 95% interval and n), the judgements made with
    a suggestion and how many accepted it unchanged."""
    rows = db.execute(
        "SELECT users.name, j.ranking, j.suggestion FROM judgements j JOIN users ON users.id = j.user_id"
        " WHERE j.suggestion IS NOT NULL AND j.both_bad = 0").fetchall()
    tallies: dict[tuple, list[int]] = {}
    for name, ranking, suggestion in rows:
        suggestion = json.loads(suggestion)
        scores = {int(k): v for k, v in suggestion["scores"].items()}
        tiers = [[c for c in tier if c in scores] for tier in json.loads(ranking)]
        tiers = [tier for tier in tiers if tier]  # a written answer has no score: left out
        level = {c: i for i, tier in enumerate(tiers) for c in tier}
        pairs = agreed = 0
        for a, b in combinations(sorted(level), 2):
            if level[a] == level[b] or scores[a] == scores[b]:
                continue
            pairs += 1
            agreed += (level[a] < level[b]) == (scores[a] > scores[b])
        accepted = int(tiers == suggestion["ranking"])
        for key in (("version", suggestion["version"]), ("annotator", name, suggestion["version"])):
            tally = tallies.setdefault(key, [0, 0, 0, 0])
            for i, value in enumerate((pairs, agreed, 1, accepted)):
                tally[i] += value

    def figure(tally):
        pairs, agreed, judgements, accepted = tally
        return {"pairs": pairs, "agreement": accuracy(agreed, pairs), "judgements": judgements,
                "accepted_unchanged": accepted, "too_few": pairs < MIN_TRUSTWORTHY_N}

    return {
        "by_version": [{"version": key[1], **figure(t)} for key, t in sorted(tallies.items()) if key[0] == "version"],
        "by_annotator": [{"annotator": key[1], "version": key[2], **figure(t)}
                         for key, t in sorted(tallies.items()) if key[0] == "annotator"],
    }
