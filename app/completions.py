"""Chat completions for the OpenAI-compatible API (`app.openai_api`): a request read into
rankloop's terms, the version it may use, and its answer streamed from the chat batcher, cut at
its stop strings and stored as a chat reply with the version that produced it.

Plain functions, role-checked from the key's user, like `app.chat_and_arena`; the HTTP layer
only turns their results and errors into OpenAI's shapes. The answer joins the same running
batch as the chat page's (`PolicyServer.stream`), so API clients and people chatting share
the model fairly and nobody touches it from another thread.

Replies are preference data later (thumbs, annotation), so what is stored is exactly what the
client was sent: the request's messages as the model saw them, and the answer text the client
received, whitespace-trimmed at both ends as chat replies are (the stream holds back trailing
whitespace and any text that could be the start of a stop string until it knows more).
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from annotations import chat_replies, model_versions, store
from annotations.errors import InvalidInput, NotFound, PermissionDenied
from app.chat_and_arena import LIVE, policy_versions
from app.handlers import AppContext, _annotator
from app.serving import BASE_VERSION, SamplingParams, ensure_loaded

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 256  # as the annotation candidates' default budget (app.handlers.DEFAULT_SETTINGS)
MAX_STOP_STRINGS = 4  # as OpenAI's API
ROLE_NAMES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# Request fields that would change what the answer means; refused rather than ignored. Any
# other field (user, seed, metadata...) is ignored.
UNSUPPORTED = {
    "tools": "tools (function calling)", "tool_choice": "tools (function calling)",
    "functions": "functions", "function_call": "functions", "logprobs": "logprobs",
    "top_logprobs": "logprobs", "logit_bias": "logit_bias", "audio": "audio", "modalities": "modalities",
    "prediction": "predicted outputs", "frequency_penalty": "frequency_penalty",
    "presence_penalty": "presence_penalty",
}
HARMLESS_VALUES = (None, False, 0, [], {}, "auto", "none", ["text"])


def invalid(message: str, param: str | None = None) -> InvalidInput:
    """An InvalidInput naming the request field at fault (OpenAI's error `param`)."""
    error = InvalidInput(message)
    error.param = param
    return error


@dataclass(frozen=True)
class CompletionRequest:
    """A chat completion request in rankloop's terms."""

    messages: list[dict]
    model: str | None  # None: the live version when the answer starts
    sampling: SamplingParams
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the token counts


@dataclass
class Completion:
    """An answer as sent: its text, the version that produced it, why it ended, token counts."""

    id: str
    text: str = ""
    version: str = ""
    finish_reason: str = "stop"  # "stop": end of turn or a stop string; "length": max_tokens reached
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reply_id: int | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


def parse_request(body) -> CompletionRequest:
    """Read an OpenAI chat completion request body (a dict from JSON); InvalidInput says which
    field is wrong and how."""
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    for name, feature in UNSUPPORTED.items():
        if body.get(name) not in HARMLESS_VALUES:
            raise invalid(f"{feature} is not supported by rankloop's API", name)
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise invalid("only text responses are supported (response_format type 'text')", "response_format")
    if body.get("n") not in (None, 1):
        raise invalid("n must be 1: ask again for another answer", "n")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise invalid("model must be a string: 'live' or a version name from GET /v1/models", "model")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise invalid("stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise invalid("stream_options must be an object", "stream_options")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    sampling = {"max_new_tokens": DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens}
    for name in ("temperature", "top_p"):
        if body.get(name) is not None:
            sampling[name] = body[name]
    for name, value in sampling.items():
        wanted = int if name == "max_new_tokens" else (int, float)
        if isinstance(value, bool) or not isinstance(value, wanted):
            param = "max_tokens" if name == "max_new_tokens" else name
            raise invalid(f"{param} must be a number", param)
    try:
        params = SamplingParams(**sampling)
    except ValueError as e:
        raise invalid(str(e).replace("max_new_tokens", "max_tokens")) from None
    return CompletionRequest(messages=read_messages(body.get("messages")), model=model or None, sampling=params,
                             stop=read_stop(body.get("stop")), stream=stream,
                             include_usage=bool(stream and options.get("include_usage")))


def read_messages(messages) -> list[dict]:
    """OpenAI messages as rankloop's {role, content} list: text content (a string, or a list of
    text parts joined), a developer message as the system message it is to this model."""
    if not isinstance(messages, list) or not messages:
        raise invalid("messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLE_NAMES:
            raise invalid(f"messages[{i}] needs a role: one of {', '.join(ROLE_NAMES)}", "messages")
        content = message.get("content")
        if isinstance(content, list):
            if not all(isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                       for part in content):
                raise invalid(f"messages[{i}]: only text parts are supported", "messages")
            content = "".join(part["text"] for part in content)
        out.append({"role": ROLE_NAMES[message["role"]], "content": content})
    try:
        return store.canonical_messages(out)
    except InvalidInput as e:
        raise invalid(str(e), "messages") from None


def read_stop(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise invalid("stop must be a non-empty string or a list of them", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise invalid(f"stop takes at most {MAX_STOP_STRINGS} strings", "stop")
    return tuple(dict.fromkeys(stops))


def model_names(ctx: AppContext, user: dict | None) -> list[str]:
    """The models this user may name: "live" first, then the versions `policy_versions` allows
    (and, for an admin, the adapters loaded by name: `load_named_adapter`)."""
    user = _annotator(user)
    names = policy_versions(ctx, user)
    return names + sorted(ctx.named_adapters) if user["role"] == "admin" else names


_NAMED_LOCK = threading.Lock()
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def load_named_adapter(ctx: AppContext, user: dict | None, name, path) -> str:
    """vLLM's runtime LoRA loading (`POST /v1/load_lora_adapter`), so that another app, or any
    tool written for vLLM, can put an adapter in this server by name: an admin's key only; the
    name must not be one this store's versions or `live` use; the folder a PEFT adapter in
    safetensors. Returns vLLM's success line."""
    user = _annotator(user)
    if user["role"] != "admin":
        raise PermissionDenied("loading adapters needs an admin's API key")
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name) or name in (LIVE, BASE_VERSION):
        raise invalid("lora_name must be 1-64 letters, digits, '.', '_' or '-', and not 'live' or 'base'",
                      "lora_name")
    if model_versions.find_version(ctx.db(), name) is not None:
        raise invalid(f"lora_name {name!r} is a version of this store: choose another name", "lora_name")
    folder = Path(path) if isinstance(path, str) and path else None
    if folder is None or not folder.is_absolute() or not (folder / "adapter_config.json").is_file() \
            or not (folder / "adapter_model.safetensors").is_file():
        raise invalid("lora_path must be the absolute path of a PEFT adapter folder (adapter_config.json, "
                      "adapter_model.safetensors) that this server can read", "lora_path")
    with _NAMED_LOCK:
        if name in ctx.named_adapters:
            raise invalid(f"The lora adapter '{name}' has already been loaded.", "lora_name")  # vLLM's words
        ctx.server.load_adapter(name, folder)
        ctx.named_adapters[name] = folder
    logger.info("%s loaded adapter %s from %s through the API", user["name"], name, folder)
    return f"Success: LoRA adapter '{name}' added successfully."


def unload_named_adapter(ctx: AppContext, user: dict | None, name) -> str:
    """vLLM's `POST /v1/unload_lora_adapter` for an adapter `load_named_adapter` loaded."""
    user = _annotator(user)
    if user["role"] != "admin":
        raise PermissionDenied("unloading adapters needs an admin's API key")
    if not isinstance(name, str) or not name:
        raise invalid("lora_name must name an adapter loaded through the API", "lora_name")
    with _NAMED_LOCK:
        if name not in ctx.named_adapters:
            raise NotFound(f"no adapter named {name!r} was loaded through the API")
        ctx.server.unload_adapter(name)
        del ctx.named_adapters[name]
    return f"Success: LoRA adapter '{name}' removed successfully."


def resolve_model(ctx: AppContext, user: dict | None, model: str | None) -> str | None:
    """The version a request names, loaded and ready (None: the live one, resolved when the
    answer starts, so a request behind a promotion gets the new version). A version the user
    may not use is PermissionDenied; an unknown one NotFound."""
    user = _annotator(user)
    if model in (None, "", LIVE):
        return None
    if user["role"] == "admin" and model in ctx.named_adapters:
        return model
    if model in policy_versions(ctx, user):
        try:
            return ensure_loaded(ctx.server, ctx.db(), model)
        except KeyError as e:  # registered without an adapter to load
            raise NotFound(str(e).strip("'\"")) from None
    row = model_versions.find_version(ctx.db(), model)
    if row is None or row["kind"] != "policy":
        raise NotFound(f"the model {model!r} does not exist: GET /v1/models lists those you may use")
    if user["role"] == "admin":
        raise PermissionDenied(f"the model {model!r} is retired: GET /v1/models lists those you may use")
    raise PermissionDenied(f"the model {model!r} is not available to you: ask an admin to make it available, "
                           "or use one of those GET /v1/models lists")


def visible_text(text: str, stops: tuple[str, ...], final: bool) -> tuple[str, bool]:
    """The part of an answer so far that can be sent, and whether a stop string ended it.

    The answer is cut before the first stop string; until the answer is `final`, a tail that
    could be the start of a stop string is held back, and so is trailing whitespace. What this
    returns for an answer so far is always a prefix of what it returns once more text came."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    if cut >= 0:
        return text[:cut].strip(), True
    if not final:
        hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        text = text[:len(text) - hold]
    return text.strip(), False


def stream_completion(ctx: AppContext, user: dict, request: CompletionRequest, version: str | None, *,
                      api_key_id: int | None = None, completion_id: str | None = None):
    """Answer `request` with `version` (from `resolve_model`; None: live). Yields (new text,
    version) as the answer grows (the first item may carry no text: it says which version
    answers); returns (as the StopIteration value) the stored `Completion`. Closed early (the
    client went away), it stores nothing and takes the answer out of the batch."""
    completion = Completion(id=completion_id or f"chatcmpl-{uuid.uuid4().hex}", version=version or "")
    completion.prompt_tokens = ctx.server.prompt_tokens(request.messages)
    start = time.perf_counter()
    answer = ctx.server.stream(request.messages, request.sampling, version)
    text, stopped, tokens, announced = "", False, None, False
    try:
        while not stopped:
            try:
                text, completion.version = next(answer)
            except StopIteration as end:
                tokens = end.value
                break
            shown, stopped = visible_text(text, request.stop, final=False)
            delta = _extend(completion, shown)
            if delta or not announced:
                announced = True
                yield delta, completion.version
    finally:
        answer.close()
    if not stopped:
        shown, stopped = visible_text(text, request.stop, final=True)
        delta = _extend(completion, shown)
        if delta:
            yield delta, completion.version
    if tokens is None:  # cut at a stop string: the tokens decoded until then, counted again from their text
        # (an estimate: a text need not tokenize back into the tokens that made it)
        tokens = min(len(ctx.server.tokenizer(text, add_special_tokens=False)["input_ids"]),
                     request.sampling.max_new_tokens)
    completion.completion_tokens = tokens
    completion.finish_reason = "length" if not stopped and tokens >= request.sampling.max_new_tokens else "stop"
    completion.reply_id = chat_replies.add_reply(
        ctx.db(), user["id"], completion.id, request.messages, completion.text, completion.version,
        sampling={**request.sampling.as_dict(), "stop": list(request.stop), "finish_reason": completion.finish_reason},
        seconds=time.perf_counter() - start, api_key_id=api_key_id)
    return completion


def _extend(completion: Completion, shown: str) -> str:
    """The text `shown` adds to what the client has been sent, now counted as sent."""
    if not shown.startswith(completion.text):  # decoding revised earlier text: wait for it to settle
        logger.debug("answer %s revised its earlier text; holding it back", completion.id)
        return ""
    delta = shown[len(completion.text):]
    completion.text = shown
    return delta


def complete(ctx: AppContext, user: dict, request: CompletionRequest, version: str | None, **kwargs) -> Completion:
    """`stream_completion` run to its end: the whole answer at once."""
    answer = stream_completion(ctx, user, request, version, **kwargs)
    while True:
        try:
            next(answer)
        except StopIteration as end:
            return end.value
