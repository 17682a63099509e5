"""The live reward model's scores of an item's answers, computed while the item is prefetched.

The uncertainty selection policy (annotations/selection.py) serves first the items whose
answers the reward model can least tell apart; it needs each answer's score when the item
becomes ready. `RewardScorer` loads the live reward model (base + its adapter and score head)
the first time it is needed and again when another one goes live, and scores an item's K
answers in one batch, in the background: on the model thread's owner at background priority
for the in-process server (so chat still comes first), or directly where answers come from an
external inference server. The scores are stored with the answers (`candidates.reward_score`,
`reward_version`), so an item never waits for them once it is ready.
"""

from __future__ import annotations

import logging
from pathlib import Path

from annotations import model_versions

logger = logging.getLogger(__name__)

MAX_SCORE_TOKENS = 512


class RewardScorer:
    def __init__(self, base_path: Path, server):
        self.base_path = Path(base_path)
        self.server = server
        self._loaded = None  # (version, model, tokenizer)
        self.scored = 0

    def _run(self, fn, *args):
        owner = getattr(self.server, "_owner", None)
        if owner is None:  # answers come from elsewhere: nothing else uses the model thread here
            return fn(*args)
        from app.model_thread import ModelLock

        return owner.call(ModelLock.BACKGROUND, fn, *args)

    def live_version(self, db) -> dict | None:
        row = model_versions.get_live_version(db, "reward")
        return row if row and row.get("path") else None

    def score(self, db, messages: list[dict], answers: list[str]) -> tuple[list[float], str] | None:
        """Each answer's score by the live reward model, and its version; None without one."""
        live = self.live_version(db)
        if live is None:
            return None
        if self._loaded is None or self._loaded[0] != live["version"]:
            from align.reward import load_reward_model

            model, tokenizer = self._run(load_reward_model, self.base_path, Path(live["path"]))
            self._loaded = (live["version"], model, tokenizer)
            logger.info("reward model %s loaded to score prefetched answers", live["version"])
        version, model, tokenizer = self._loaded

        def run():
            import torch

            from align.reward import score

            with torch.inference_mode():
                return score(model, tokenizer, [messages] * len(answers), answers, batch_size=len(answers),
                             max_length=MAX_SCORE_TOKENS).tolist()

        scores = self._run(run)
        self.scored += len(answers)
        return scores, version
