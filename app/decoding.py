"""Chat streams decoded together, one token at a time (continuous batching).

Before this, a chat request took the model for a whole answer: with three people chatting the
third waited two answers for its first token, and after a promotion the new version's first
answer came only once the answer in flight had finished. Here a request joins the running batch
at the next decoding step: its prompt is prefilled alone, its KV cache is left-padded into the
batch's cache, and from then on every step gives one token to every row. On two CPU cores a
step costs about the same for a few rows as for one (decoding is bound by reading the weights),
so concurrent answers take little longer than one.

Answers of different versions are decoded in separate batches, one forward pass each per step:
a request admitted after a promotion runs on the new version beside answers still finishing on
the old one. (PEFT can mix adapters in one batch, but its mixed path cost 76-116 ms a step for
three rows where two batches on merged copies cost about 30 ms each.) Until those old answers
are done, they advance every other step and the new version's every step: the first answers
of a newly promoted version come at nearly full speed, the old ones finish at half speed. Each row keeps its own
sampling settings (temperature, top-p, repetition penalty, length), applied to its own logits.

The loop runs in one thread that holds the model lock (`ModelLock.INTERACTIVE`) while rows are
in flight, and lets go between steps whenever an adapter load, another interactive request (an
arena battle) or brief upkeep (one layer of a merge) is queued; the rows keep their cache and go
on afterwards.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
from dataclasses import dataclass, field

import torch

from app.model_thread import ModelLock, on_model_thread

logger = logging.getLogger(__name__)

MAX_ROWS = 8  # chat answers decoded together; later requests wait for a free row
DRAINING_EVERY = 2  # after a promotion, answers finishing on the old version step every 2nd step
TOP_P_CANDIDATES = 256  # tokens searched for the nucleus before sorting the whole vocabulary
_TOKEN, _VERSION, _END, _ERROR = "token", "version", "end", "error"


@dataclass
class ChatRequest:
    """One chat answer to decode. `events` receives ("version", v) when the request is
    admitted, then ("token", id) per token, then ("end", None) or ("error", exception)."""

    prompt_ids: list[int]
    sampling: object  # app.serving.SamplingParams
    version: str | None  # None: the live version at admission
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Row:
    request: ChatRequest
    version: str
    context: list[int]  # prompt and answer so far (the repetition penalty looks at both)
    penalty: object  # transformers' RepetitionPenaltyLogitsProcessor, or None
    generated: int = 0
    finished: bool = False

    @property
    def next_token(self) -> int:
        return self.context[-1]


def repetition_penalty(sampling):
    """transformers' repetition-penalty processor for these settings (None when off)."""
    from transformers import RepetitionPenaltyLogitsProcessor

    return RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty) if sampling.repetition_penalty != 1.0 else None


def _nucleus(scores: torch.Tensor, top_p: float, top_k: int = 0):
    """Each row's nucleus of `scores` [rows, vocab]: (token ids by rank, their probabilities,
    which of them the nucleus keeps), all [rows, k].

    The nucleus is the one transformers' `TopPLogitsWarper` keeps (a token stays when the
    probability of the tokens ranked above it is below `top_p`), found among the
    `TOP_P_CANDIDATES` likeliest tokens instead of by sorting the whole vocabulary (49,152 on
    SmolLM2: sorting it took 3 ms per row and step); when those hold less than `top_p` of some
    row's probability, the whole vocabulary is sorted after all. With `top_k`, first only the
    `top_k` likeliest tokens stay, their probabilities renormalised (`TopKLogitsWarper` before
    `TopPLogitsWarper`).
    """
    vocab = scores.shape[-1]
    sizes = [top_k] if 0 < top_k < vocab else [min(TOP_P_CANDIDATES, vocab), vocab]
    log_total = torch.logsumexp(scores, dim=-1, keepdim=True)
    for k in sizes:
        top, index = scores.topk(k, dim=-1)
        if k == top_k:
            log_total = torch.logsumexp(top, dim=-1, keepdim=True)
        probs = (top - log_total).exp()
        above = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each
        if k == sizes[-1] or bool((above[:, -1] + probs[:, -1] >= top_p).all()):
            break
    keep = above < top_p if top_p < 1.0 else torch.ones_like(above, dtype=torch.bool)
    keep[:, 0] = True
    return index, probs, keep


def sample_token(scores: torch.Tensor, temperature: float, top_p: float) -> int:
    """One token from `scores` (logits over the vocabulary, 1-D) with temperature and nucleus
    (top-p) sampling (`_nucleus`), greedy when `temperature` is 0."""
    if temperature == 0:
        return int(scores.argmax())
    scores = scores / temperature
    if top_p >= 1.0:
        return int(torch.multinomial(torch.softmax(scores, dim=-1), 1))
    index, probs, keep = (t[0] for t in _nucleus(scores[None], top_p))
    return int(index[keep][torch.multinomial(probs[keep], 1)])


class NucleusWarper:
    """transformers' `TemperatureLogitsWarper`, `TopKLogitsWarper` and `TopPLogitsWarper` in
    that order, as one logits processor for `generate` (pass temperature=1.0, top_k=0 and
    top_p=1.0 beside it so that transformers applies none of them): the same scores out, but
    the nucleus comes from `_nucleus` instead of a sort of every row's whole vocabulary at
    every step (16 answers decoded together: 6 ms a step)."""

    def __init__(self, temperature: float, top_p: float, top_k: int = 0):
        if temperature <= 0:
            raise ValueError(f"temperature must be positive to sample, got {temperature}")
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores / self.temperature
        if self.top_p >= 1.0 and not 0 < self.top_k < scores.shape[-1]:
            return scores
        index, _, keep = _nucleus(scores, self.top_p, self.top_k)
        kept = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, index, keep)
        return scores.masked_fill(~kept, -float("inf"))


@dataclass
class _Batch:
    """The rows of one version decoded together: their KV cache and attention mask."""

    version: str
    rows: list[_Row]
    cache: object  # transformers.DynamicCache, rows left-padded to one length
    mask: torch.Tensor  # [rows, length]: 0 over each row's left padding


class ChatBatcher:
    """Admits chat requests into the running batches (one per version) and decodes them step
    by step."""

    def __init__(self, server, max_rows: int = MAX_ROWS):
        self.server = server
        self.max_rows = max_rows
        self._pending: collections.deque[ChatRequest] = collections.deque()
        self._guard = threading.Lock()
        self._running = False
        self._batches: dict[str, _Batch] = {}
        self.peak_rows = 0  # the most rows decoded together so far (for benchmarks and tests)
        self.steps = 0

    @property
    def rows(self) -> list[_Row]:
        """The answers in flight, every version's."""
        return [row for batch in list(self._batches.values()) for row in batch.rows]

    def submit(self, request: ChatRequest) -> None:
        """Queue `request` and make sure the decoding loop runs."""
        with self._guard:
            self._pending.append(request)
            if not self._running:
                self._running = True
                threading.Thread(target=self._run, name="rankloop-chat", daemon=True).start()

    def enqueue(self, request: ChatRequest) -> None:
        """Queue `request` without starting the loop (tests drive `advance` by hand)."""
        with self._guard:
            self._pending.append(request)

    def advance(self) -> int:
        """Admit what is queued, then decode one token for every row (but see `_draining`).
        Returns the rows still in flight. The caller holds the model lock."""
        with torch.inference_mode():
            self._admit()
            self.steps += 1
            live = self.server._live
            for version, batch in list(self._batches.items()):
                if version not in self.server.versions():  # unloaded (a failed round's staged adapter)
                    error = KeyError(f"version {version} was unloaded while answering")
                    for row in batch.rows:
                        row.request.events.put((_ERROR, error))
                    del self._batches[version]
                elif self._draining(batch, live) and self.steps % DRAINING_EVERY:
                    continue
                elif not self._step(batch):
                    del self._batches[version]
        return len(self.rows)

    def _draining(self, batch: _Batch, live: str) -> bool:
        """Whether `batch` holds only answers still finishing on a version that was live when
        they were asked and no longer is, beside answers of the new live version. Those take a
        step every `DRAINING_EVERY` steps, so the new version's answers after a promotion do not
        pay for two forward passes a step until the old ones are done."""
        return (batch.version != live and live in self._batches
                and all(row.request.version is None for row in batch.rows))

    # ------------------------------------------------------------ the loop

    def _run(self) -> None:
        lock = self.server._lock
        priority = ModelLock.INTERACTIVE
        try:
            while True:
                with lock.hold(priority):
                    while on_model_thread(self.advance) and not lock.waiting(ModelLock.BRIEF):
                        pass  # between two steps, an adapter load, an arena request or upkeep goes first
                # Having let someone go first, queue behind them (at BRIEF, still ahead of any
                # background work): at INTERACTIVE this loop would overtake a waiting merge chunk.
                priority = ModelLock.BRIEF if self._batches else ModelLock.INTERACTIVE
                with self._guard:
                    if not self._batches and not self._pending:
                        self._running = False
                        return
        except BaseException as e:  # every waiting stream hears of it; the next request starts afresh
            logger.exception("chat decoding failed")
            with self._guard:
                waiting = [row.request for row in self.rows] + list(self._pending)
                self._pending.clear()
                self._batches = {}
                self._running = False
            for request in waiting:
                request.events.put((_ERROR, e))

    def _admit(self) -> None:
        """Prefill queued requests (each alone) and add each to its version's batch."""
        while len(self.rows) < self.max_rows:
            with self._guard:
                if not self._pending:
                    break
                request = self._pending.popleft()
            if request.cancelled.is_set():
                request.events.put((_END, None))
                continue
            try:
                version = request.version or self.server._live  # on the owner thread: the table itself
                self.server._check_version(version)
                row, cache = self._prefill(request, version)
            except Exception as e:  # this request's problem (an unknown version, say), not the batch's
                request.events.put((_ERROR, e))
                continue
            if not row.finished:  # an answer of one token needs no more steps
                self._join(row, cache)
        self.peak_rows = max(self.peak_rows, len(self.rows))

    def _prefill(self, request: ChatRequest, version: str):
        from transformers import DynamicCache

        request.events.put((_VERSION, version))
        ids = torch.tensor([request.prompt_ids], device=self.server.device)
        cache = DynamicCache(config=self.server.model.config)
        model = self.server._model_for(version)
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache, use_cache=True,
                    logits_to_keep=1)
        row = _Row(request, version, list(request.prompt_ids), repetition_penalty(request.sampling))
        self._emit(row, out.logits[0, -1])
        return row, out.past_key_values

    def _join(self, row: _Row, cache) -> None:
        """Add `row` to its version's batch, both caches left-padded to the longer one."""
        from transformers import DynamicCache

        new_kv = [(layer.keys, layer.values) for layer in cache.layers]
        new_mask = torch.ones((1, new_kv[0][0].shape[-2]), dtype=torch.long, device=self.server.device)
        batch = self._batches.get(row.version)
        if batch is None:
            self._batches[row.version] = _Batch(row.version, [row], cache, new_mask)
            return
        old_kv = [(layer.keys, layer.values) for layer in batch.cache.layers]
        width = max(batch.mask.shape[1], new_mask.shape[1])
        kv = [(torch.cat([_pad_left(k0, width), _pad_left(k1, width)]),
               torch.cat([_pad_left(v0, width), _pad_left(v1, width)]))
              for (k0, v0), (k1, v1) in zip(old_kv, new_kv)]
        batch.mask = torch.cat([_pad_left(batch.mask, width), _pad_left(new_mask, width)])
        batch.cache = DynamicCache(ddp_cache_data=kv, config=self.server.model.config)
        batch.rows.append(row)

    def _step(self, batch: _Batch) -> bool:
        """One token for every row of `batch`; finished and cancelled rows leave it. Returns
        whether any row is left."""
        rows = batch.rows
        device = self.server.device
        mask = torch.cat([batch.mask, torch.ones((len(rows), 1), dtype=torch.long, device=device)], dim=1)
        input_ids = torch.tensor([[row.next_token] for row in rows], device=device)
        positions = mask.sum(dim=1, keepdim=True) - 1
        model = self.server._model_for(batch.version)
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=batch.cache,
                    use_cache=True)
        for i, row in enumerate(rows):
            if row.request.cancelled.is_set():
                row.finished = True
                row.request.events.put((_END, None))
            else:
                self._emit(row, out.logits[i, -1])
        keep = [i for i, row in enumerate(rows) if not row.finished]
        batch.mask = mask
        if len(keep) == len(rows) or not keep:
            return bool(keep)
        index = torch.tensor(keep, device=device)
        batch.cache.batch_select_indices(index)
        batch.mask = mask[index]
        batch.rows = [rows[i] for i in keep]
        start = int((batch.mask.cumsum(dim=1) == 0).sum(dim=1).min())  # columns that are padding in every row
        if start:
            from transformers import DynamicCache

            kv = [(layer.keys[..., start:, :], layer.values[..., start:, :]) for layer in batch.cache.layers]
            batch.cache = DynamicCache(ddp_cache_data=kv, config=self.server.model.config)
            batch.mask = batch.mask[:, start:]
        return True

    # ------------------------------------------------------------ pieces

    def _emit(self, row: _Row, logits: torch.Tensor) -> None:
        """Pick the row's next token from its logits and hand it to the stream."""
        sampling = row.request.sampling
        scores = logits[None].float()
        if row.penalty is not None:
            scores = row.penalty(torch.tensor([row.context], device=scores.device), scores)
        token = sample_token(scores[0], sampling.temperature, sampling.top_p)
        row.context.append(token)
        row.generated += 1
        tokenizer = self.server.tokenizer
        eos = tokenizer.eos_token_id
        if token == eos or (isinstance(eos, list) and token in eos):
            row.finished = True
            row.request.events.put((_END, None))
            return
        row.request.events.put((_TOKEN, token))
        if row.generated >= sampling.max_new_tokens:
            row.finished = True
            row.request.events.put((_END, None))


def _pad_left(t: torch.Tensor, width: int) -> torch.Tensor:
    """`t` (a mask [rows, length] or a cache [rows, heads, length, dim]) left-padded with zeros."""
    dim = 1 if t.dim() == 2 else 2
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([torch.zeros(shape, dtype=t.dtype, device=t.device), t], dim=dim)
