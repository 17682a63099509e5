"""Answers from an external OpenAI-compatible inference server instead of the in-process model.

`python -m app --inference-url URL --inference-model NAME` makes the app's candidates, chat,
arena and API answers come from a server such as vLLM, TGI, SGLang, llama.cpp's server or
another rankloop app (`/v1/chat/completions`), through `RemoteServer`, which stands in for
`PolicyServer` (app/serving.py): the same methods, the same one owner of what is served.

Versions. NAME is the base model as that server calls it. With `--inference-lora` (vLLM
started with `--enable-lora` and `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`), every version the
app would load — the live one on promotion, candidates ahead of time, a round's staged
adapter — is loaded there with vLLM's dynamic LoRA endpoint (`POST /v1/load_lora_adapter`
{lora_name: the version, lora_path: its adapter folder, which the server must be able to
read}) and asked for by its name; retired ones are unloaded (`/v1/unload_lora_adapter`).
Without it the server has the base only, and a promotion of any other version is refused
where the admin looks (the Health tab), the base serving on.

What is recorded is the version that answered: each response's `model` field, mapped back to
the version it was asked as. A response from any other model is refused, never stored under
the name that was asked for.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from align.models import BASE_VERSION, load_tokenizer
from app.serving import Generation, SamplingParams

logger = logging.getLogger(__name__)

PARALLEL_REQUESTS = 8  # requests in flight at once for one batch of candidates
ALREADY_LOADED = "already been loaded"  # vLLM's 400 for a LoRA name it has


class RemoteError(RuntimeError):
    """The inference server failed, refused, or answered as another model."""


class RemoteServer:
    """`PolicyServer`'s interface, answered by an OpenAI-compatible server at `url`."""

    def __init__(self, base_path: Path, url: str, model: str, *, api_key: str | None = None, lora: bool = False,
                 timeout: float = 300.0, max_prompt_tokens: int = 1024):
        from openai import OpenAI

        self.base_path = Path(base_path)
        self.url = url.rstrip("/")
        self.served_model = model
        self.lora = lora
        self.max_prompt_tokens = max_prompt_tokens
        self.dtype = "remote"
        # the base's tokenizer counts prompt tokens (queue order, API usage); the server must serve that base
        self.tokenizer = load_tokenizer(self.base_path)
        self.client = OpenAI(base_url=self.url, api_key=api_key or "none", timeout=timeout, max_retries=2)
        self._http = httpx.Client(timeout=timeout, headers={"Authorization": f"Bearer {api_key or 'none'}"})
        self._pool = ThreadPoolExecutor(PARALLEL_REQUESTS, thread_name_prefix="rankloop-remote")
        self._lock = threading.Lock()  # guards what is loaded and what is live: one owner, as in PolicyServer
        self._adapters: dict[str, Path] = {}
        self._provisional: dict[str, int] = {}
        self._live = BASE_VERSION
        self._last_used: dict[str, float] = {}

    def describe(self) -> str:
        return f"inference server {self.url} ({self.served_model}{', LoRA versions loaded there' if self.lora else ''})"

    # ------------------------------------------------------------ versions

    @property
    def live_version(self) -> str:
        return self._live

    def versions(self) -> list[str]:
        with self._lock:
            return [BASE_VERSION, *self._adapters]

    def provisional_versions(self) -> dict[str, int]:
        with self._lock:
            return dict(self._provisional)

    def merged_versions(self) -> list[str]:
        return []  # the server merges (or not) on its own

    def merged_sizes(self) -> dict[str, int]:
        return {}

    def adapter_sizes(self) -> dict[str, int]:
        with self._lock:
            return dict.fromkeys(self._adapters, 0)  # held by the server, not here

    def merge(self, version: str) -> bool:
        return False

    def configure_threads(self, n: int) -> int:
        return n  # nothing decodes here

    def interactive_waiting(self) -> bool:
        return False  # the server schedules its own requests: background work never blocks chat here

    def touch(self, version: str) -> None:
        self._last_used[version] = time.monotonic()

    def idle_seconds(self, version: str) -> float:
        return time.monotonic() - self._last_used.get(version, float("-inf"))

    def load_adapter(self, version: str, path: Path, *, provisional_round: int | None = None) -> None:
        with self._lock:
            self._load(version, Path(path), provisional_round)

    def _load(self, version: str, path: Path, provisional_round: int | None = None) -> None:
        if version == BASE_VERSION or version in self._adapters:
            return
        if not self.lora:
            raise RemoteError(
                f"the inference server {self.url} serves the base model only: to serve {version} there, start "
                f"it with LoRA enabled (vLLM: --enable-lora, VLLM_ALLOW_RUNTIME_LORA_UPDATING=True) and the app "
                f"with --inference-lora")
        response = self._http.post(f"{self.url}/load_lora_adapter",
                                   json={"lora_name": version, "lora_path": str(Path(path).resolve())})
        if response.status_code != 200 and ALREADY_LOADED not in response.text:
            raise RemoteError(f"the inference server could not load {version} from {path}: "
                              f"HTTP {response.status_code} {response.text[:300]}")
        self._adapters[version] = Path(path)
        if provisional_round is not None:
            self._provisional[version] = provisional_round
        self.touch(version)
        logger.info("inference server %s loaded adapter %s from %s", self.url, version, path)

    def confirm(self, version: str, path: Path) -> None:
        with self._lock:
            if self._provisional.pop(version, None) is not None:
                self._adapters[version] = Path(path)

    def unload_adapter(self, version: str, *, idle_for: float | None = None) -> bool:
        with self._lock:
            if version == BASE_VERSION or version not in self._adapters:
                return False
            if version == self._live:
                raise ValueError(f"{version} is live: promote another version before unloading it")
            if idle_for is not None and self.idle_seconds(version) < idle_for:
                return False
            response = self._http.post(f"{self.url}/unload_lora_adapter", json={"lora_name": version})
            if response.status_code != 200:
                logger.warning("inference server could not unload %s: HTTP %d %s", version, response.status_code,
                               response.text[:200])
            del self._adapters[version]
            self._provisional.pop(version, None)
            return True

    def set_live(self, version: str, path: Path | None = None) -> None:
        with self._lock:
            if version != BASE_VERSION and version not in self._adapters:
                if path is None:
                    raise KeyError(f"version {version} is not loaded and no adapter path was given")
                self._load(version, Path(path))
            self._live = version

    # ------------------------------------------------------------ answers

    def prompt_tokens(self, messages: list[dict]) -> int:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=True)["input_ids"]
        return min(len(ids), self.max_prompt_tokens)

    def _asked(self, version: str | None) -> tuple[str, str]:
        """(version, the model name to ask the server for)."""
        with self._lock:
            version = version or self._live
            if version != BASE_VERSION and version not in self._adapters:
                raise KeyError(f"version {version} is not loaded")
        self.touch(version)
        return version, self.served_model if version == BASE_VERSION else version

    def _answered_by(self, asked_version: str, asked_model: str, model: str | None) -> str:
        if model not in (asked_model, None):
            raise RemoteError(f"the inference server answered as {model!r} when asked for {asked_model!r} "
                              f"({asked_version}): not recorded")
        return asked_version

    def _request(self, messages: list[dict], sampling: SamplingParams, model: str, seed: int | None, **extra):
        body = dict(model=model, messages=messages, temperature=sampling.temperature, top_p=sampling.top_p,
                    max_tokens=sampling.max_new_tokens, **extra)
        if seed is not None:
            body["seed"] = seed
        if sampling.repetition_penalty != 1.0:
            body["extra_body"] = {"repetition_penalty": sampling.repetition_penalty}  # vLLM, TGI, SGLang, llama.cpp
        return self.client.chat.completions.create(**body)

    def generate(self, messages: list[dict], n: int = 1, sampling: SamplingParams | None = None,
                 version: str | None = None, seed: int | None = None, *, preemptible: bool = False,
                 interactive: bool = False) -> list[Generation]:
        return self.generate_many([messages], n, sampling, version, seed)[0]

    def generate_many(self, prompts: list[list[dict]], n: int = 1, sampling: SamplingParams | None = None,
                      version: str | None = None, seed: int | None = None, *, preemptible: bool = False,
                      interactive: bool = False) -> list[list[Generation]]:
        """`n` answers to each prompt: n × prompts requests of one answer each, in parallel (some
        servers, rankloop's own among them, answer one choice per request)."""
        sampling = sampling or SamplingParams()
        version, model = self._asked(version)
        start = time.perf_counter()

        def one(job):
            messages, i = job
            from openai import OpenAIError

            try:
                response = self._request(messages, sampling, model, None if seed is None else seed + i)
            except OpenAIError as e:
                raise RemoteError(f"the inference server {self.url} failed: {e}") from None
            choice = response.choices[0]
            return (choice.message.content or "", self._answered_by(version, model, response.model),
                    choice.finish_reason == "length")

        jobs = [(messages, i) for messages in prompts for i in range(n)]
        results = list(self._pool.map(one, jobs))
        seconds = time.perf_counter() - start
        answers = [Generation(text.strip(), answered, seconds, sampling.as_dict(), truncated=cut)
                   for text, answered, cut in results]
        return [answers[i * n:(i + 1) * n] for i in range(len(prompts))]

    def stream(self, messages: list[dict], sampling: SamplingParams | None = None, version: str | None = None):
        """Yield (text so far, version) as the server streams the answer; returns (as the
        StopIteration value) the answer's tokens as the server counted them, when it says."""
        from openai import OpenAIError

        sampling = sampling or SamplingParams()
        version, model = self._asked(version)
        try:
            chunks = self._request(messages, sampling, model, None, stream=True,
                                   stream_options={"include_usage": True})
        except OpenAIError as e:
            raise RemoteError(f"the inference server {self.url} failed: {e}") from None
        text, tokens, yielded = "", None, False
        try:
            for chunk in chunks:
                self._answered_by(version, model, chunk.model)
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
                if chunk.choices and chunk.choices[0].delta.content:
                    text += chunk.choices[0].delta.content
                    yielded = True
                    yield text, version
        except OpenAIError as e:
            raise RemoteError(f"the inference server {self.url} failed mid-answer: {e}") from None
        finally:
            chunks.close()
        if not yielded:
            yield text, version
        return tokens

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._http.close()
        self.client.close()


def inference_settings(url: str | None, model: str | None, lora: bool, api_key: str | None) -> dict | None:
    """The app's `inference` setting from its command line (None: the in-process model). Without
    a model name, the server's only model; RemoteError if it cannot be reached or lists several."""
    if not url:
        return None
    if not model:
        from openai import OpenAI, OpenAIError

        try:
            names = [m.id for m in OpenAI(base_url=url, api_key=api_key or "none", timeout=30).models.list()]
        except OpenAIError as e:
            raise RemoteError(f"the inference server {url} cannot be reached to list its models: {e}") from None
        if len(names) != 1:
            raise RemoteError(f"the inference server {url} serves {', '.join(names) or 'no models'}: name the base "
                              f"model with --inference-model")
        model = names[0]
    return {"url": url, "model": model, "api_key": api_key, "lora": lora}
