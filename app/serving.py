"""PolicyServer: the base model loaded once, policy versions as LoRA adapters over it.

The model is used by one thread at a time, under one lock: on 2 cores, two concurrent
generations only slow each other down, and the lock is also what makes adapter swaps safe. A
swap (`set_live`) only changes which version the *next* request uses; an answer in flight keeps
the version it started with, and every result records the version that produced it.

Chat answers share the model differently from the rest: they are decoded together, one token
per step, in one running batch that a new request joins at the next step (`app.decoding`), so
concurrent chats and a promotion's first answer do not wait for other answers to finish.
Batches of candidates (`generate_many`) and arena answers run whole, with `generate`.

The lock is fair and ordered (`ModelLock`): loading an adapter goes first, then interactive
requests (the chat batch, arena answers) in arrival order, then background work (prefetching
answers). With a plain `threading.Lock` a thread that releases it usually takes it straight
back, so under a steady stream of chat requests a promotion waited seconds for its turn. The
chat batch lets go of the lock between two steps whenever an adapter load or an arena request
is queued.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import queue
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from align.models import load_causal_lm, load_tokenizer
from align.training import cpu_has_bf16, tune_malloc
from app.decoding import ChatBatcher

logger = logging.getLogger(__name__)

BASE_VERSION = "base"
SERVING_DTYPES = ("auto", "float32", "bfloat16")
STREAM_TIMEOUT_S = 300


def default_serving_dtype() -> str:
    """bfloat16 weights on a CPU with native bf16 (avx512_bf16/AMX): K=4 answers of 96 tokens
    take 3.7 s instead of 7.0 s there (docs/benchmarks.md); float32 elsewhere, where bf16
    arithmetic is emulated and slower."""
    return "bfloat16" if cpu_has_bf16() else "float32"


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings for one request."""

    temperature: float = 0.8
    top_p: float = 0.95
    repetition_penalty: float = 1.1
    max_new_tokens: int = 96

    def __post_init__(self):
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature {self.temperature} is out of range: use 0 (greedy) to 2")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p {self.top_p} is out of range: use a value in (0, 1]")
        if not 1.0 <= self.repetition_penalty <= 2.0:
            raise ValueError(f"repetition_penalty {self.repetition_penalty} is out of range: use 1 to 2")
        if not 1 <= self.max_new_tokens <= 1024:
            raise ValueError(f"max_new_tokens {self.max_new_tokens} is out of range: use 1 to 1024")

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Generation:
    text: str
    version: str
    seconds: float
    sampling: dict


class Preempted(Exception):
    """A background generation gave way to an interactive request; retry it later."""


class _StopWhen:
    """A stopping criterion that ends generation for the whole batch when `predicate()` holds."""

    def __init__(self, predicate):
        self.predicate = predicate

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), bool(self.predicate()), dtype=torch.bool)


class ModelLock:
    """A lock granted by priority, then in arrival order (a ticket queue).

    Priorities: `SWAP` (loading an adapter), `INTERACTIVE` (a person waits), `BACKGROUND`.
    `urgent_waiting()` tells a running background job that someone more urgent is queued.
    """

    SWAP, INTERACTIVE, BACKGROUND = 0, 1, 2

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._held = False
        self._queue: list[tuple[int, int]] = []  # heap of (priority, arrival number)
        self._arrivals = itertools.count()

    def acquire(self, priority: int = BACKGROUND) -> None:
        with self._cond:
            ticket = (priority, next(self._arrivals))
            heapq.heappush(self._queue, ticket)
            try:
                while self._held or self._queue[0] != ticket:
                    self._cond.wait()
            except BaseException:  # interrupted while queued: leave the queue as found
                self._queue.remove(ticket)
                heapq.heapify(self._queue)
                self._cond.notify_all()
                raise
            heapq.heappop(self._queue)
            self._held = True

    def release(self) -> None:
        with self._cond:
            if not self._held:
                raise RuntimeError("release of an unheld ModelLock")
            self._held = False
            self._cond.notify_all()

    @contextlib.contextmanager
    def hold(self, priority: int = BACKGROUND):
        self.acquire(priority)
        try:
            yield
        finally:
            self.release()

    def locked(self) -> bool:
        return self._held

    def waiting(self, priority: int) -> bool:
        """Whether a request of `priority` or more urgent is queued."""
        with self._cond:
            return bool(self._queue) and self._queue[0][0] <= priority

    def urgent_waiting(self) -> bool:
        """Whether a request more urgent than background work is queued."""
        with self._cond:
            return bool(self._queue) and self._queue[0][0] < self.BACKGROUND


class PolicyServer:
    """Serves generations from the base model and any registered adapter version.

    Interactive requests (chat, arena) come first: a background generation (prefetching
    an item's answers) started with `preemptible=True` stops as soon as an interactive
    request is waiting for the model, and raises `Preempted` so its caller retries later.
    """

    def __init__(self, base_path: Path, *, max_prompt_tokens: int = 1024, dtype: str = "float32"):
        if dtype not in SERVING_DTYPES:
            raise ValueError(f"serving dtype {dtype!r} is unknown: use {', '.join(SERVING_DTYPES)}")
        if dtype == "auto":
            dtype = default_serving_dtype()
        self.dtype = dtype
        self.base_path = Path(base_path)
        tune_malloc()  # the KV cache grows and is freed on every answer
        self.tokenizer = load_tokenizer(self.base_path)
        self.tokenizer.padding_side = "left"
        self.model = load_causal_lm(self.base_path, dtype=getattr(torch, dtype))
        self.max_prompt_tokens = max_prompt_tokens
        self._lock = ModelLock()
        self._adapters: dict[str, Path] = {}
        self._live = BASE_VERSION
        self._batcher = ChatBatcher(self)

    # ------------------------------------------------------------ versions

    @property
    def live_version(self) -> str:
        return self._live

    def versions(self) -> list[str]:
        return [BASE_VERSION, *self._adapters]

    def load_adapter(self, version: str, path: Path) -> None:
        """Load a LoRA adapter folder as `version` (no-op if already loaded)."""
        if version == BASE_VERSION or version in self._adapters:
            return
        from peft import PeftModel

        path = Path(path)
        with self._lock.hold(ModelLock.SWAP):
            if not hasattr(self.model, "peft_config"):
                self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=version)
            else:
                self.model.load_adapter(str(path), adapter_name=version)
            self.model.eval()
            self._adapters[version] = path
        logger.info("loaded adapter %s from %s", version, path)

    def set_live(self, version: str, path: Path | None = None) -> None:
        """Make `version` the default for new generations (loading it first if needed)."""
        if version != BASE_VERSION and version not in self._adapters:
            if path is None:
                raise KeyError(f"version {version} is not loaded and no adapter path was given")
            self.load_adapter(version, path)
        self._live = version

    # ------------------------------------------------------------ generation

    def prompt_tokens(self, messages: list[dict]) -> int:
        """How many tokens `messages` take as a prompt (after the cut to `max_prompt_tokens`)."""
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=True)["input_ids"]
        return min(len(ids), self.max_prompt_tokens)

    def _prompt_ids(self, messages: list[dict]) -> list[int]:
        """A chat prompt's token ids, cut to its last `max_prompt_tokens`."""
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=True)["input_ids"]
        return list(ids)[-self.max_prompt_tokens:]

    def _encode(self, prompts: list[list[dict]], n: int) -> dict:
        """Each chat prompt (its last `max_prompt_tokens` tokens) `n` times, left-padded to one width."""
        rows = [self._prompt_ids(messages) for messages in prompts]
        width = max(len(ids) for ids in rows)
        input_ids = torch.full((len(rows) * n, width), self.tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(rows) * n, width), dtype=torch.long)
        for i, ids in enumerate(rows):
            input_ids[i * n:(i + 1) * n, width - len(ids):] = torch.tensor(ids)
            attention[i * n:(i + 1) * n, width - len(ids):] = 1
        return {"input_ids": input_ids, "attention_mask": attention}

    def _model_lock(self, interactive: bool):
        return self._lock.hold(ModelLock.INTERACTIVE if interactive else ModelLock.BACKGROUND)

    def interactive_waiting(self) -> bool:
        """Whether a chat/arena request or an adapter load is queued for the model."""
        return self._lock.urgent_waiting()

    def _generate_kwargs(self, sampling: SamplingParams) -> dict:
        kwargs = dict(
            max_new_tokens=sampling.max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            repetition_penalty=sampling.repetition_penalty,
        )
        if sampling.temperature > 0:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
        else:
            kwargs.update(do_sample=False)
        return kwargs

    def _check_version(self, version: str) -> None:
        if version != BASE_VERSION and version not in self._adapters:
            raise KeyError(f"version {version} is not loaded")

    def generate(self, messages: list[dict], n: int = 1, sampling: SamplingParams | None = None,
                 version: str | None = None, seed: int | None = None, *, preemptible: bool = False,
                 interactive: bool = False) -> list[Generation]:
        """`n` answers to one chat prompt, sampled in one batch, from `version` (default: live).

        `interactive` requests jump ahead of background work; a `preemptible` one stops and
        raises `Preempted` when an interactive request is waiting.
        """
        return self.generate_many([messages], n, sampling, version, seed, preemptible=preemptible,
                                  interactive=interactive)[0]

    def generate_many(self, prompts: list[list[dict]], n: int = 1, sampling: SamplingParams | None = None,
                      version: str | None = None, seed: int | None = None, *, preemptible: bool = False,
                      interactive: bool = False) -> list[list[Generation]]:
        """`n` answers to each of several chat prompts, all sampled in one batch (the prompts
        left-padded): on two CPU cores a decoding step costs little more for 8 rows than for 4,
        so two items' candidates together take far less than twice one item's time.

        Each Generation's `seconds` is the whole batch's time.
        """
        from transformers import StoppingCriteriaList

        if not prompts:
            return []
        sampling = sampling or SamplingParams()
        with self._model_lock(interactive):
            version = version or self._live
            self._check_version(version)
            inputs = self._encode(prompts, n)
            if seed is not None:
                torch.manual_seed(seed)
            start = time.perf_counter()
            kwargs = self._generate_kwargs(sampling)
            if preemptible:
                kwargs["stopping_criteria"] = StoppingCriteriaList([_StopWhen(self.interactive_waiting)])
            with torch.inference_mode(), self._using(version):
                out = self.model.generate(**inputs, **kwargs)
            seconds = time.perf_counter() - start
            if preemptible and self.interactive_waiting():
                raise Preempted()
        prompt_len = inputs["input_ids"].shape[1]
        texts = self.tokenizer.batch_decode(out[:, prompt_len:], skip_special_tokens=True)
        answers = [Generation(t.strip(), version, seconds, sampling.as_dict()) for t in texts]
        return [answers[i * n:(i + 1) * n] for i in range(len(prompts))]

    def stream(self, messages: list[dict], sampling: SamplingParams | None = None, version: str | None = None):
        """Yield (text so far, version) while one answer is generated; an interactive request.

        The answer is decoded in the running chat batch (`app.decoding.ChatBatcher`): it starts
        at the next decoding step even while other answers are in flight. `version=None` means
        the live version when the request is admitted. Closing the generator (a browser tab
        closed mid-answer) takes the answer out of the batch at the next step.
        """
        from app.decoding import ChatRequest

        sampling = sampling or SamplingParams()
        request = ChatRequest(self._prompt_ids(messages), sampling, version)
        self._batcher.submit(request)
        tokens, text, version_used, yielded = [], "", version, False
        try:
            while True:
                try:
                    kind, value = request.events.get(timeout=STREAM_TIMEOUT_S)
                except queue.Empty:
                    raise TimeoutError(f"no token for {STREAM_TIMEOUT_S} s: the model is stuck or overloaded") from None
                if kind == "version":
                    version_used = value
                elif kind == "token":
                    tokens.append(value)
                    decoded = self.tokenizer.decode(tokens, skip_special_tokens=True)
                    if decoded != text and not decoded.endswith("\ufffd"):  # wait for a whole character
                        text, yielded = decoded, True
                        yield text, version_used
                elif kind == "error":
                    raise value
                else:
                    break
            final = self.tokenizer.decode(tokens, skip_special_tokens=True)
            if final != text or not yielded:  # an empty answer still says which version gave it
                yield final, version_used
        finally:
            request.cancelled.set()

    def _using(self, version: str):
        """Context in which the model runs as `version` (the caller holds the lock)."""
        if not hasattr(self.model, "peft_config"):
            return contextlib.nullcontext()
        if version == BASE_VERSION:
            return self.model.disable_adapter()
        self.model.set_adapter(version)
        return contextlib.nullcontext()


def ensure_loaded(server: PolicyServer, db, version: str | None) -> str:
    """Make sure `version` (None: the live one) is loaded in `server`, reading its adapter
    path from the store's registry. Returns the version name."""
    if version is None or version == BASE_VERSION or version in server.versions():
        return version or server.live_version
    row = db.execute("SELECT path FROM policies WHERE version = ? AND kind = 'policy'", [version]).fetchone()
    if row is None or not row[0]:
        raise KeyError(f"no policy version {version!r} with an adapter in the registry")
    server.load_adapter(version, Path(row[0]))
    return version


def configure_threads(n: int | None) -> int:
    """Set torch's intra-op threads for this process (serving and training share 2 cores)."""
    if n:
        torch.set_num_threads(n)
    return torch.get_num_threads()
