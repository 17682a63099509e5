"""PolicyServer: the base model loaded once, policy versions as LoRA adapters over it.

The model is used by one thread at a time, under one lock: on 2 cores, two concurrent
generations only slow each other down, and the lock is also what makes adapter swaps safe. A
swap (`set_live`) only changes which version the *next* request uses; an answer in flight keeps
the version it started with, and every result records the version that produced it.

Chat answers share the model differently from the rest: they are decoded together, one token
per step, in one running batch that a new request joins at the next step (`app.decoding`), so
concurrent chats and a promotion's first answer do not wait for other answers to finish.
Batches of candidates (`generate_many`) and arena answers run whole, with `generate`.

One owner (app/model_thread.py): the model, the adapter table, the live pointer and the merged
copies are touched only on the model thread, in the order of a priority lock (`ModelLock`):
loading, unloading, confirming an adapter and moving the live pointer first, then interactive
requests (the chat batch, arena answers) in arrival order, then brief upkeep (the next layers
of a merge), then background work (prefetching answers). Other threads read the snapshot the
owner publishes after each change (`ServerView`), never the tables themselves. With a plain
`threading.Lock` a thread that releases it usually takes it straight back, so under a steady
stream of chat requests a promotion waited seconds for its turn. The chat batch lets go of
the lock between two steps whenever any of the first three is queued.
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MappingProxyType

import torch

from align.models import BASE_VERSION, load_causal_lm, load_tokenizer
from align.training import cpu_has_bf16, tune_malloc
from app.attention import DECODE_ATTENTION
from app.decoding import ChatBatcher, NucleusWarper
from app.model_thread import ModelLock, ModelOwner, on_model_thread  # noqa: F401 (ModelLock: for callers)

logger = logging.getLogger(__name__)

SERVING_DTYPES = ("auto", "float32", "bfloat16")
STREAM_TIMEOUT_S = 300
# Memory for merged serving copies of adapter versions (the live one's first). A copy holds its
# own copy of each weight its adapter adapts: on SmolLM2-135M in bf16, 57 MB for the top 8
# layers (a DPO or SFT round's default), 212 MB for all 30 (KTO, PPO); twice that in fp32.
MERGED_BUDGET_MIB = 600
GENERATE_TOP_K = 50  # transformers' default for sampling in `generate` (chat streams do not apply it)
MERGE_CHUNK = 35  # adapted linear layers merged per hold of the lock: five decoder layers of SmolLM2, ~50 ms


def default_serving_dtype(device: str = "cpu") -> str:
    """bfloat16 weights on a CPU with native bf16 (avx512_bf16/AMX): K=4 answers of 96 tokens
    take 3.7 s instead of 7.0 s there (docs/benchmarks.md); float32 elsewhere, where bf16
    arithmetic is emulated and slower. On a GPU: bfloat16 where it has it (Ampere and later)."""
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if cpu_has_bf16() else "float32"


def serving_device(device: str = "auto") -> str:
    """The device the served model lives on: `auto` is the first CUDA GPU when one is visible,
    else the CPU. Asking for CUDA where there is none is refused, not silently run on the CPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"serving device {device!r} asked for, and no CUDA GPU is visible: use auto or cpu")
    if not (device == "cpu" or device.startswith("cuda")):
        raise ValueError(f"serving device {device!r} is unknown: use auto, cpu, cuda or cuda:N")
    return device


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
    truncated: bool = False  # cut off by max_new_tokens before its end-of-turn token


class Preempted(Exception):
    """A background generation gave way to an interactive request; retry it later."""


class _StopWhen:
    """A stopping criterion that ends generation for the whole batch when `predicate()` holds."""

    def __init__(self, predicate):
        self.predicate = predicate
        self.fired = False  # whether it ended the generation (the predicate may be false again after)

    def __call__(self, input_ids, scores, **kwargs):
        stop = bool(self.predicate())
        self.fired = self.fired or stop
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


@dataclass(frozen=True)
class ServerView:
    """What the server holds, as its owner last published it: safe to read from any thread."""

    live: str = BASE_VERSION
    adapters: tuple[str, ...] = ()
    provisional: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))  # version -> round id
    merged: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))  # version -> bytes of its own


class PolicyServer:
    """Serves generations from the base model and any registered adapter version.

    Interactive requests (chat, arena) come first: a background generation (prefetching
    an item's answers) started with `preemptible=True` stops as soon as an interactive
    request is waiting for the model, and raises `Preempted` so its caller retries later.
    Every change to what the server holds runs on the model thread (`ModelOwner`); the
    methods below send it there and wait.
    """

    def __init__(self, base_path: Path, *, max_prompt_tokens: int = 1024, dtype: str = "float32",
                 device: str = "auto"):
        if dtype not in SERVING_DTYPES:
            raise ValueError(f"serving dtype {dtype!r} is unknown: use {', '.join(SERVING_DTYPES)}")
        self.device = torch.device(serving_device(device))
        if dtype == "auto":
            dtype = default_serving_dtype(self.device.type)
        self.dtype = dtype
        self.base_path = Path(base_path)
        tune_malloc()  # the KV cache grows and is freed on every answer
        self.tokenizer = load_tokenizer(self.base_path)
        self.tokenizer.padding_side = "left"
        self._owner = ModelOwner()
        self._lock = self._owner.lock
        self.model = on_model_thread(load_causal_lm, self.base_path, dtype=getattr(torch, dtype),
                                     attn_implementation=DECODE_ATTENTION).to(self.device)  # app/attention.py
        # The base without PEFT's wrappers (loading an adapter wraps `self.model`'s layers in
        # place): the same weights, none copied. Base generations run on it.
        self._plain = copy.deepcopy(self.model, {id(t): t for t in (*self.model.parameters(), *self.model.buffers())})
        # --- owned by the model thread: read and written there only
        self._merged: dict[str, tuple[torch.nn.Module, int]] = {}  # version -> (merged copy, bytes of its own)
        self._unmergeable: set[str] = set()
        self._adapters: dict[str, Path] = {}
        self._provisional: dict[str, int] = {}  # version -> round id: staged by a running round, not registered
        self._loads = 0  # counts adapter loads: a merge started before an unload must not land after it
        self._load_ids: dict[str, int] = {}
        self._live = BASE_VERSION
        # --- published by the owner after each change, read by anyone
        self.view = ServerView()
        # --- bookkeeping any thread may update: when each version was last asked for or used
        self._last_used: dict[str, float] = {}
        self._use_lock = threading.Lock()
        self.merged_budget_bytes = MERGED_BUDGET_MIB * 2**20
        self.max_prompt_tokens = max_prompt_tokens
        self._batcher = ChatBatcher(self)

    def _publish(self) -> None:
        """(Model thread.) Publish what the server holds now."""
        self.view = ServerView(self._live, tuple(self._adapters), MappingProxyType(dict(self._provisional)),
                               MappingProxyType({v: size for v, (_, size) in self._merged.items()}))

    def describe(self) -> str:
        return f"in process, {self.device.type} {self.dtype}"

    # ------------------------------------------------------------ versions

    @property
    def live_version(self) -> str:
        return self.view.live

    def versions(self) -> list[str]:
        return [BASE_VERSION, *self.view.adapters]

    def provisional_versions(self) -> dict[str, int]:
        """{version: round id} of the adapters loaded from a running round's staging folder,
        before their registration: the app preloads them, nobody can ask for them by name."""
        return dict(self.view.provisional)

    def merged_versions(self) -> list[str]:
        return list(self.view.merged)

    def merged_sizes(self) -> dict[str, int]:
        """Bytes each merged serving copy holds of its own (weights not shared with the base)."""
        return dict(self.view.merged)

    def adapter_sizes(self) -> dict[str, int]:
        """Bytes of each loaded adapter's own weights, by version (counted on the model thread)."""
        def count():
            sizes = dict.fromkeys(self._adapters, 0)
            for name, parameter in self.model.named_parameters():
                for version in sizes:
                    if f".{version}." in name:
                        sizes[version] += parameter.numel() * parameter.element_size()
            return sizes

        return self._owner.call(ModelLock.BRIEF, count)

    def load_adapter(self, version: str, path: Path, *, provisional_round: int | None = None) -> None:
        """Load a LoRA adapter folder as `version` (no-op if already loaded). With
        `provisional_round`, the adapter is round `provisional_round`'s, staged but not yet
        registered: `confirm` it once registered, `unload_adapter` it if the round fails."""
        if version == BASE_VERSION or version in self.view.adapters:
            return  # a look at the snapshot spares a turn in the queue; the owner checks again
        self._owner.call(ModelLock.SWAP, self._load, version, Path(path), provisional_round)

    def _load(self, version: str, path: Path, provisional_round: int | None = None) -> None:
        """(Model thread.) Load `version`'s adapter unless it is loaded already."""
        if version == BASE_VERSION or version in self._adapters:
            return
        from peft import PeftModel

        if not hasattr(self.model, "peft_config"):
            self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=version)
        else:
            self.model.load_adapter(str(path), adapter_name=version)
        self.model.eval()
        self._adapters[version] = path
        self._loads += 1
        self._load_ids[version] = self._loads
        if provisional_round is not None:
            self._provisional[version] = provisional_round
        self.touch(version)
        self._publish()
        logger.info("loaded adapter %s from %s%s", version, path,
                    f" (staged by round {provisional_round})" if provisional_round is not None else "")

    def confirm(self, version: str, path: Path) -> None:
        """A provisional adapter was registered (its staging folder renamed to `path`)."""
        def confirm():
            if self._provisional.pop(version, None) is not None:
                self._adapters[version] = Path(path)
                self._publish()

        self._owner.call(ModelLock.SWAP, confirm)

    def touch(self, version: str) -> None:
        """Note that `version` is in use (a request named it): `idle_seconds` starts again."""
        with self._use_lock:
            self._last_used[version] = time.monotonic()

    def idle_seconds(self, version: str) -> float:
        """Seconds since `version` was loaded, named by a request or decoded."""
        with self._use_lock:
            return time.monotonic() - self._last_used.get(version, float("-inf"))

    def unload_adapter(self, version: str, *, idle_for: float | None = None) -> bool:
        """Drop `version`'s adapter and its merged copy: a staged adapter whose round failed
        (its name may be reserved again by the next round), or a retired version nobody uses.
        With `idle_for`, only if unused for that many seconds (checked by the owner, so no
        decoding step is using it). Answers in flight on it fail. Returns whether it was
        unloaded; refuses (ValueError) to unload the live version."""
        if version == BASE_VERSION or version not in self.view.adapters:
            return False

        def unload() -> bool:
            if version not in self._adapters:
                return False
            if version == self._live:
                raise ValueError(f"{version} is live: promote another version before unloading it")
            if idle_for is not None and self.idle_seconds(version) < idle_for:
                return False
            self.model.delete_adapter(version)
            del self._adapters[version]
            self._load_ids.pop(version, None)
            self._provisional.pop(version, None)
            self._unmergeable.discard(version)
            self._merged.pop(version, None)
            with self._use_lock:
                self._last_used.pop(version, None)
            self._publish()
            return True

        unloaded = self._owner.call(ModelLock.SWAP, unload)
        if unloaded:
            logger.info("unloaded adapter %s", version)
        return unloaded

    def set_live(self, version: str, path: Path | None = None) -> None:
        """Make `version` the default for new generations, loading it from `path` first if it is
        not loaded (one step of the owner: nothing can unload it in between)."""
        def set_live():
            if version != BASE_VERSION and version not in self._adapters:
                if path is None:
                    raise KeyError(f"version {version} is not loaded and no adapter path was given")
                self._load(version, Path(path))
            self._live = version
            self._publish()

        self._owner.call(ModelLock.SWAP, set_live)

    def configure_threads(self, n: int) -> int:
        """Set torch's intra-op threads for serving (serving and training share 2 cores): a turn
        of the owner at swap priority, so a prefetch batch in flight stops for it at its next
        step instead of holding it up for the whole batch. Returns the count in force."""
        def set_threads():
            torch.set_num_threads(n)
            return torch.get_num_threads()

        return self._owner.call(ModelLock.SWAP, set_threads)

    def merge(self, version: str) -> bool:
        """Make a serving copy of the base with `version`'s adapter merged into the weights it
        adapts, so that generations of that version alone run at the base model's speed: PEFT's
        unmerged LoRA adds two small matmuls and a Python call to every adapted layer, 50% more
        time per token with an adapter on all 30 layers of SmolLM2 (docs/performance.md). The
        copy shares every weight the adapter leaves alone (an adapter on the top 8 layers costs
        57 MB in bf16, one on all layers 212 MB).

        The merge goes `MERGE_CHUNK` layers at a time, each chunk a brief turn of the owner
        (`ModelLock.BRIEF`), slipped between two chat decoding steps, so it never pauses chat
        for long and never throws away a prefetch batch. Returns False when the copy does not
        fit in `MERGED_BUDGET_MIB` beside the live version's, or when the adapter is not plain
        LoRA on linear layers (it is then served unmerged).
        """
        from peft.tuners.lora import Linear as LoraLinear

        if version == BASE_VERSION or version in self.view.merged:
            return True
        start = time.perf_counter()

        def plan():
            if version in self._merged:
                return None
            if version in self._unmergeable or version not in self._adapters:
                return False  # not plain LoRA, or not loaded (unloaded meanwhile)
            layers = [m for m in self.model.modules() if isinstance(m, LoraLinear) and version in m.lora_A]
            plain = all(version not in m.lora_variant and not m.fan_in_fan_out for m in layers)
            embedding = self._plain.get_input_embeddings().weight
            if not layers or not plain or any(m.get_base_layer().weight is embedding for m in layers) \
                    or self.model.peft_config[version].modules_to_save:
                self._unmergeable.add(version)
                logger.info("%s is not plain LoRA on linear layers: served unmerged", version)
                return False
            size = sum(m.get_base_layer().weight.nbytes for m in layers)
            return (layers, self._load_ids.get(version), size) if self._merge_room(size, evict=False) else False

        planned = self._owner.call(ModelLock.BRIEF, plan)
        if not planned:
            return planned is None  # None: merged meanwhile
        layers, load_id, size = planned
        merged_weights: dict[int, torch.nn.Parameter] = {}

        def merge_chunk(modules) -> bool:
            if self._load_ids.get(version) != load_id:
                return False  # unloaded meanwhile
            with torch.no_grad():
                for module in modules:  # W + scaling * B @ A, in the weights' own dtype
                    weight = module.get_base_layer().weight
                    lora_a = module.lora_A[version].weight.to(weight.dtype)
                    lora_b = module.lora_B[version].weight.to(weight.dtype)
                    merged = torch.addmm(weight, lora_b, lora_a, alpha=module.scaling[version])
                    merged_weights[id(weight)] = torch.nn.Parameter(merged, requires_grad=False)
            return True

        for chunk in range(0, len(layers), MERGE_CHUNK):
            if not self._owner.call(ModelLock.BRIEF, merge_chunk, layers[chunk:chunk + MERGE_CHUNK]):
                return False
        memo = {id(t): t for t in (*self._plain.parameters(), *self._plain.buffers())}
        memo.update(merged_weights)
        model = copy.deepcopy(self._plain, memo)  # the module tree; tensors shared unless merged

        def commit() -> bool:
            if self._load_ids.get(version) == load_id and self._merge_room(size, evict=True):
                self._merged[version] = (model, size)
                self._publish()
            return version in self._merged

        done = self._owner.call(ModelLock.BRIEF, commit)
        logger.info("merged %s into a serving copy (%d MB) in %.2f s", version, size // 2**20,
                    time.perf_counter() - start)
        return done

    def _merge_room(self, size: int, evict: bool) -> bool:
        """(Model thread.) Whether a merged copy of `size` bytes fits in the budget beside the
        copies of the live version and of staged (provisional) versions, the next to go live;
        with `evict`, make the room by dropping the oldest other copies."""
        kept = [v for v in self._merged if v == self._live or v in self._provisional]
        if sum(self._merged[v][1] for v in kept) + size > self.merged_budget_bytes:
            return False
        while evict and sum(s for _, s in self._merged.values()) + size > self.merged_budget_bytes:
            del self._merged[next(v for v in self._merged if v not in kept)]
        return True

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

    def implicit_rewards(self, messages: list[dict], answers: list[str], version: str) -> list[float] | None:
        """Each answer's implicit reward under `version`: log pi_version(answer | prompt) minus
        log pi_base(answer | prompt), DPO's reward without its beta (for the `model_disagreement`
        selection policy, annotations/selection.py). None for the base, whose implicit reward is
        0 for every answer. Runs on the model thread at background priority (chat comes first)."""
        if version == BASE_VERSION:
            return None
        from align.evaluate import answer_logprobs

        prompts = [messages] * len(answers)
        limit = self.max_prompt_tokens + 4096

        def run() -> list[float]:
            with torch.inference_mode():
                mine = answer_logprobs(self._model_for(version), self.tokenizer, prompts, answers,
                                       batch_size=len(answers), max_length=limit)
                base = answer_logprobs(self._plain, self.tokenizer, prompts, answers, batch_size=len(answers),
                                       max_length=limit)
            return (mine - base).tolist()

        return self._owner.call(ModelLock.BACKGROUND, run)

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
            # transformers' temperature, top-k and top-p warpers in one that sorts no vocabulary;
            # top-k is generate's implicit default, which candidates have always been sampled with
            from transformers import LogitsProcessorList

            warper = NucleusWarper(sampling.temperature, sampling.top_p, top_k=GENERATE_TOP_K)
            kwargs.update(do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                          logits_processor=LogitsProcessorList([warper]))
        else:
            kwargs.update(do_sample=False)
        return kwargs

    def _check_version(self, version: str) -> None:
        """(Model thread.)"""
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
        inputs = self._encode(prompts, n)
        kwargs = self._generate_kwargs(sampling)
        stop = _StopWhen(self.interactive_waiting)
        if preemptible:
            kwargs["stopping_criteria"] = StoppingCriteriaList([stop])
        start = time.perf_counter()
        priority = ModelLock.INTERACTIVE if interactive else ModelLock.BACKGROUND
        out, version = self._owner.call(priority, self._run_generate, version, inputs, kwargs, seed)
        out = out.cpu()
        seconds = time.perf_counter() - start
        if preemptible and (stop.fired or self.interactive_waiting()):
            # cut short for someone waiting (who may have been served already): never returned
            # as answers, which would be truncated ones
            raise Preempted()
        prompt_len = inputs["input_ids"].shape[1]
        texts = self.tokenizer.batch_decode(out[:, prompt_len:], skip_special_tokens=True)
        ended = (out[:, prompt_len:] == self.tokenizer.eos_token_id).any(dim=1).tolist()
        answers = [Generation(t.strip(), version, seconds, sampling.as_dict(), truncated=not e)
                   for t, e in zip(texts, ended)]
        return [answers[i * n:(i + 1) * n] for i in range(len(prompts))]

    def _run_generate(self, version: str | None, inputs: dict, kwargs: dict, seed: int | None):
        """(Model thread.) The generated ids and the version that produced them (None: live)."""
        version = version or self._live
        if seed is not None:
            torch.manual_seed(seed)  # seeds the GPUs' generators too
        inputs = {key: value.to(self.device) for key, value in inputs.items()}
        with torch.inference_mode():
            return self._model_for(version).generate(**inputs, **kwargs), version

    def stream(self, messages: list[dict], sampling: SamplingParams | None = None, version: str | None = None):
        """Yield (text so far, version) while one answer is generated; an interactive request.

        The answer is decoded in the running chat batch (`app.decoding.ChatBatcher`): it starts
        at the next decoding step even while other answers are in flight. `version=None` means
        the live version when the request is admitted. Closing the generator (a browser tab
        closed mid-answer) takes the answer out of the batch at the next step. A generator run
        to its end returns (as its StopIteration value) how many tokens the answer took, its
        end-of-turn token not counted: `sampling.max_new_tokens` of them means it was cut off.
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
            return len(tokens)
        finally:
            request.cancelled.set()

    def _model_for(self, version: str) -> torch.nn.Module:
        """(Model thread.) The module that runs `version`: the plain base, the version's merged
        copy, or the PEFT model with its adapter active."""
        self._check_version(version)
        self.touch(version)
        if version == BASE_VERSION:
            return self._plain
        merged = self._merged.get(version)
        if merged is not None:
            return merged[0]
        if self.model.active_adapter != version:
            self.model.set_adapter(version)
        return self.model


def ensure_loaded(server: PolicyServer, db, version: str | None) -> str:
    """Make sure `version` (None: the live one) is loaded in `server`, reading its adapter
    path from the store's registry. Returns the version name.

    A version loaded provisionally (staged by a running round) counts only once the registry
    has it from that same round."""
    staged_by = server.provisional_versions().get(version)
    if version is None or version == BASE_VERSION or (version in server.versions() and staged_by is None):
        if version:
            server.touch(version)  # the watcher does not unload a version someone just asked for
        return version or server.live_version
    from annotations.model_versions import find_version

    row = find_version(db, version)
    if row is None or row["kind"] != "policy" or not row["path"]:
        raise KeyError(f"no policy version {version!r} with an adapter in the registry")
    if staged_by is not None:
        if row["round_id"] == staged_by:
            server.confirm(version, Path(row["path"]))
            return version
        server.unload_adapter(version)  # a failed round's adapter under a name now reused
    server.load_adapter(version, Path(row["path"]))
    return version


def configure_threads(n: int | None) -> int:
    """Set torch's intra-op threads on the model thread, before anything serves (at start-up;
    a running server's count changes through `PolicyServer.configure_threads`). Returns the
    count in force there."""
    if n:
        on_model_thread(torch.set_num_threads, n)
    return on_model_thread(torch.get_num_threads)
