"""Background generation of candidates, so annotators never wait on the model.

One daemon thread keeps at least `target_ready` items ready beyond those already handed out:
when fewer are ready it takes the oldest pending items (up to `batch_items` that share K and
sampling settings), samples all their answers from the live version in one batch, and
stores them — so the buffer may hold up to target_ready + batch_items - 1. A batch stays
within `batch_tokens` padded prompt tokens (rows x longest prompt), which bounds the memory
of its first forward pass. On two CPU cores
a decoding step costs little more for 16 rows than for 4: K=4 answers of 96 tokens take
3.6 s for one item alone and 1.3 s per item four at a time (docs/performance.md). It
sleeps when enough items are ready and wakes when an item is judged. Contrast items
(answers from named versions) are generated one at a time.
"""

from __future__ import annotations

import logging
import threading
import time

from annotations import store
from annotations.errors import AnnotationsError
from app.serving import Preempted, SamplingParams, ensure_loaded

logger = logging.getLogger(__name__)

BATCH_ITEMS = 4  # items whose answers are sampled together
BATCH_TOKENS = 4096  # padded prompt tokens (rows x longest prompt) a batch may hold
RESAMPLE_TRIES = 2  # with `exclude_truncated`, times a cut-off answer is sampled again
MAX_ITEM_TRIES = 3  # an item whose answers fail this often is parked (app.health shows why)
RETRY_SECONDS = 5.0  # a failed item waits this long times its failures while the queue moves on
# The project's default answer instruction (setting `answer_instruction`; empty: none): the
# system message candidates are sampled under when the prompt has none of its own, so that
# answers end by themselves instead of at the token budget (docs/annotation.md, "Complete
# answers"). It is recorded with each candidate's sampling settings; annotators judge, and
# training learns from, the prompt as stored.
DEFAULT_ANSWER_INSTRUCTION = "Answer helpfully, briefly and completely, in a few sentences."


class Prefetcher:
    def __init__(self, connect, server, *, target_ready: int = 4, batch_items: int = BATCH_ITEMS,
                 batch_tokens: int = BATCH_TOKENS,
                 sampling=None, poll_seconds: float = 5.0, errors=None, scorer=None):
        if batch_items < 1:
            raise ValueError(f"batch_items must be at least 1, got {batch_items}")
        self._connect = connect  # () -> a store connection for this thread
        self.server = server
        self.target_ready = target_ready
        self.batch_items = batch_items
        self.batch_tokens = batch_tokens  # bounds the memory of a batch's first forward pass
        self.sampling = sampling
        self.poll_seconds = poll_seconds
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.generated = 0
        self.preempted = 0
        self.discarded = 0
        self.resampled = 0  # answers sampled again because the first ones were cut off
        self.kept_truncated = 0  # items shown with a truncated answer after every try
        self.parked = 0  # items given up on (their reason is stored with them)
        self.errors = errors  # app.health.ErrorLog: what went wrong, for the Health tab
        self.scorer = scorer  # app.reward_scores.RewardScorer: answers' scores, for the uncertainty policy
        self._priorities_at = 0.0
        self._failures: dict[int, tuple[int, float]] = {}  # item id -> (failures, monotonic time to retry after)
        self.last_error: str | None = None

    def start(self) -> "Prefetcher":
        self._thread = threading.Thread(target=self._run, name="rankloop-prefetch", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout)

    def wake(self) -> None:
        self._wake.set()

    def _instruction(self, db) -> str:
        return (store.get_setting(db, "answer_instruction", DEFAULT_ANSWER_INSTRUCTION) or "").strip()

    def _prompt(self, messages: list[dict], instruction: str) -> list[dict]:
        """What the model is asked: the item's prompt, with the project's answer instruction as
        its system message when the prompt brings none of its own."""
        if not instruction or any(m["role"] == "system" for m in messages):
            return messages
        return [{"role": "system", "content": instruction}, *messages]

    def _sampling(self, db, item) -> SamplingParams:
        return self.sampling or SamplingParams(**(item["sampling"] or store.get_setting(db, "sampling", {}) or {}))

    def refresh_priorities(self, db) -> None:
        """Under a selection policy that judgements change (disagreement, diversity), the ready
        items' priorities again, at most every few seconds (annotations/selection.py)."""
        from annotations.selection import refresh_priorities, selection_policy

        if selection_policy(db) in ("disagreement", "diversity") and time.monotonic() - self._priorities_at >= 5:
            self._priorities_at = time.monotonic()
            refresh_priorities(db)

    def fill_once(self, db) -> bool:
        """Generate candidates for the oldest pending item(s) if the buffer is low. True if it did
        (or set aside an item that failed: the queue moves on)."""
        self.refresh_priorities(db)
        if store.count_unclaimed_ready(db) >= self.target_ready:
            return False
        now = time.monotonic()
        pending = [item for item in store.pending_items(db, limit=self.batch_items + len(self._failures))
                   if self._failures.get(item["id"], (0, 0.0))[1] <= now]
        if not pending:
            return False
        first = pending[0]
        batch = [first]
        try:
            if first["versions"] is not None:
                return self._fill_contrast(db, first)
            if first["id"] in self._failures:  # it failed before: alone, so it fails nobody else
                return self._fill_batch(db, batch)
            sampling = self._sampling(db, first)
            width = self.server.prompt_tokens(first["messages"])
            for item in pending[1:]:
                if item["versions"] is not None or item["k"] != first["k"] or item["id"] in self._failures \
                        or self._sampling(db, item) != sampling:
                    continue
                tokens = self.server.prompt_tokens(item["messages"])
                if max(width, tokens) * first["k"] * (len(batch) + 1) > self.batch_tokens:
                    break  # left-padded to the longest prompt: this many rows would outgrow the budget
                batch.append(item)
                width = max(width, tokens)
            return self._fill_batch(db, batch)
        except (Preempted, AnnotationsError):
            raise
        except Exception as e:
            self._set_aside(db, batch, e)
            return True

    def _set_aside(self, db, items, error: Exception) -> None:
        """Items whose answers could not be generated wait a while (longer each time) while the
        queue moves on; after `MAX_ITEM_TRIES` failures one is parked with its reason."""
        message = f"{type(error).__name__}: {error}"
        if self.errors is None or self.errors.record("prefetch", message):
            logger.error("prefetch: items %s failed: %s", [i["id"] for i in items], message)
        for item in items:
            tries = self._failures.get(item["id"], (0, 0.0))[0] + 1
            if tries >= MAX_ITEM_TRIES:
                store.park_item(db, item["id"], f"answers could not be generated {tries} times: {message}")
                self._failures.pop(item["id"], None)
                self.parked += 1
            else:
                self._failures[item["id"]] = (tries, time.monotonic() + RETRY_SECONDS * tries)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _fill_batch(self, db, batch) -> bool:
        """Sample the answers of `batch` (items sharing K and sampling settings) together."""
        first = batch[0]
        sampling = self._sampling(db, first)
        instruction = self._instruction(db)
        prompts = [self._prompt(item["messages"], instruction) for item in batch]
        answers = self.server.generate_many(prompts, n=first["k"], sampling=sampling, preemptible=True)
        if self._exclude_truncated(db) and not self._stale(answers):
            answers = self._replace_truncated(prompts, answers, sampling, version=answers[0][0].version)
        if self._stale(answers):
            # A new version went live while these answers were generated: they would be stale
            # on arrival. Leave the items pending; the next pass answers them with the new version.
            self.discarded += len(batch)
            return True
        total = sum(len(group) for group in answers)
        for item, group in zip(batch, answers):
            try:
                self._store(db, item, group, total, instruction)
            except AnnotationsError as e:  # this item changed under us (retired, filled): keep the others
                logger.warning("prefetch: item %s: %s", item["id"], e)
            self._failures.pop(item["id"], None)
        return True

    def _exclude_truncated(self, db) -> bool:
        return bool(store.get_setting(db, "exclude_truncated", True))

    def _stale(self, answers) -> bool:
        return any(g.version != self.server.live_version for group in answers for g in group)

    def _replace_truncated(self, prompts, answers, sampling, version: str):
        """Answers cut off by the token budget, sampled again (up to `RESAMPLE_TRIES` times, the
        items that need it in one batch) so that items show complete answers only; an item
        whose prompt keeps producing overlong answers keeps the rest, marked as truncated,
        rather than never being shown (`kept_truncated` counts them)."""
        answers = [list(group) for group in answers]
        for _ in range(RESAMPLE_TRIES):
            short = [i for i, group in enumerate(answers) if any(g.truncated for g in group)]
            if not short:
                return answers
            wanted = max(sum(g.truncated for g in answers[i]) for i in short)
            fresh = self.server.generate_many([prompts[i] for i in short], n=wanted, sampling=sampling,
                                              version=version, preemptible=True)
            for i, extra in zip(short, fresh):
                complete = iter(g for g in extra if not g.truncated)
                answers[i] = [next(complete, g) if g.truncated else g for g in answers[i]]
            self.resampled += sum(len(group) for group in fresh)
        self.kept_truncated += sum(any(g.truncated for g in group) for group in answers)
        return answers

    def _fill_contrast(self, db, item) -> bool:
        """A contrast item splits its K answers over the requested versions."""
        versions = item["versions"]
        counts = [item["k"] // len(versions) + (i < item["k"] % len(versions)) for i in range(len(versions))]
        instruction = self._instruction(db)
        generations = []
        for version, n in zip(versions, counts):
            version = ensure_loaded(self.server, db, version)
            generations += self.server.generate(self._prompt(item["messages"], instruction), n=n,
                                                sampling=self._sampling(db, item), version=version, preemptible=True)
        self._store(db, item, generations, len(generations), instruction)
        self._failures.pop(item["id"], None)
        return True

    def _store(self, db, item, generations, batch_answers: int, instruction: str = "") -> None:
        used = instruction if not any(m["role"] == "system" for m in item["messages"]) else ""
        scored = self._reward_scores(db, item, generations)
        implicit = self._implicit_rewards(db, item, generations, instruction)
        store.add_candidates(
            db,
            item["id"],
            [
                {"text": g.text, "policy_version": g.version,
                 "sampling": {**g.sampling, **({"instruction": used} if used else {})},
                 "gen_seconds": g.seconds / batch_answers, "truncated": g.truncated,
                 **({"reward_score": scored[0][i], "reward_version": scored[1]} if scored else {}),
                 **({"implicit_reward": implicit[i]} if implicit else {})}
                for i, g in enumerate(generations)
            ],
        )
        self.generated += 1

    def _reward_scores(self, db, item, generations):
        """The live reward model's scores of the answers, when suggestions are shown or the
        selection policy needs them (app/reward_scores.py); None otherwise, or when scoring fails
        (the item is served all the same, without a suggestion)."""
        from annotations.selection import selection_policy
        from annotations.suggestions import show_suggestions

        needs = selection_policy(db) in ("uncertainty", "model_disagreement")
        if self.scorer is None or not (needs or show_suggestions(db)):
            return None
        try:
            return self.scorer.score(db, item["messages"], [g.text for g in generations])
        except Exception as e:  # a broken reward model must not stop the queue
            if self.errors is None or self.errors.record("reward scores", f"scoring answers failed: {e}"):
                logger.exception("prefetch: scoring item %s", item["id"])
            return None

    def _implicit_rewards(self, db, item, generations, instruction: str):
        """The answers' implicit rewards under the version that generated them (log pi - log
        pi_base, app.serving.PolicyServer.implicit_rewards), when the selection policy is
        `model_disagreement`; None otherwise, for answers from several versions or the base,
        from a server that cannot compute them, or when computing fails (the item is served all
        the same, after those with a priority)."""
        from annotations.selection import selection_policy

        compute = getattr(self.server, "implicit_rewards", None)
        versions = {g.version for g in generations}
        if compute is None or len(versions) != 1 or selection_policy(db) != "model_disagreement":
            return None
        try:
            return compute(self._prompt(item["messages"], instruction), [g.text for g in generations], versions.pop())
        except Exception as e:  # never stop the queue for a priority
            if self.errors is None or self.errors.record("implicit rewards", f"computing them failed: {e}"):
                logger.exception("prefetch: implicit rewards of item %s", item["id"])
            return None

    def _run(self) -> None:
        db = self._connect()
        while not self._stop.is_set():
            pause = self.poll_seconds
            try:
                worked = self.fill_once(db)
                self.last_error = None
            except AnnotationsError as e:  # the item changed under us (retired, filled): move on
                logger.warning("prefetch: %s", e)
                worked = True
            except Preempted:  # chat or arena needed the model: let it go first, then retry
                self.preempted += 1
                worked, pause = False, 0.5
            except Exception as e:  # keep the thread alive; the error shows on the Health tab
                self.last_error = f"{type(e).__name__}: {e}"
                if self.errors is None or self.errors.record("prefetch", self.last_error):
                    logger.exception("prefetch failed")
                worked = False
            if not worked:
                self._wake.wait(pause)
                self._wake.clear()
