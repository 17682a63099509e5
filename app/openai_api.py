"""The OpenAI-compatible API, served beside the UI on the same port: `GET /v1/models` and
`POST /v1/chat/completions` (streamed as server-sent events or whole), so the `openai` client
and tools built on it can talk to the tuned model.

Who may call it: a person holding an API key (`annotations.api_keys`), sent as
`Authorization: Bearer KEY`. The guard (`app.guard`) hands every `/v1/...` request here before
Gradio sees it; this app checks the key itself and never looks at Gradio's session cookie, so
a logged-in browser cannot be made to call it. The key acts as its person with their current
role: annotators may name the versions available to them, admins any version not retired
(`app.completions.resolve_model`). Each key may make `api_keys.rate_limit` requests a minute
(the setting `api_requests_per_minute`); one more is answered 429 with how long to wait.

Errors come in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with its
status codes, so clients raise their usual exceptions (AuthenticationError, RateLimitError...).
The routes are listed in `ROUTES` with the least role each needs; tests check that the app
serves exactly these.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import threading
import time
import uuid

from annotations import api_keys, model_versions
from annotations.errors import AnnotationsError, InvalidInput, NotFound, PermissionDenied
from app import completions
from app.handlers import AppContext

logger = logging.getLogger(__name__)

ROUTES = {  # "METHOD path": the least role a key's user needs
    "GET /v1/models": "annotator",
    "POST /v1/chat/completions": "annotator",
    "POST /v1/load_lora_adapter": "admin",  # vLLM's runtime LoRA routes (app/completions.py)
    "POST /v1/unload_lora_adapter": "admin",
}
MAX_BODY_BYTES = 1 << 20  # a prompt is at most 16,000 characters (annotations.store.MAX_PROMPT_CHARS)
# Threads the API's waiting on answers may hold at once. The API waits in worker threads (the
# answers come from the model thread); without its own allowance, a burst of API requests could
# take every thread of the pool Gradio's handlers share and stall the pages people work in.
API_THREADS = 16
WINDOW_SECONDS = 60.0


class ApiError(Exception):
    """A refusal in OpenAI's error shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def api_error(e: Exception) -> ApiError:
    """The OpenAI-shaped error for a domain error (anything else: a 500 with no details)."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, PermissionDenied):
        return ApiError(403, str(e), "permission_error", "model_not_available", "model")
    if isinstance(e, NotFound):
        return ApiError(404, str(e), "invalid_request_error", "model_not_found", "model")
    if isinstance(e, InvalidInput):
        return ApiError(400, str(e), "invalid_request_error", None, getattr(e, "param", None))
    if isinstance(e, AnnotationsError):
        return ApiError(400, str(e))
    logger.exception("the API failed to answer")
    return ApiError(500, "the server failed to answer: the admin's Health tab and log say why", "server_error")


class KeyRateLimiter:
    """At most `limit` requests per key in any `WINDOW_SECONDS` (a sliding window)."""

    def __init__(self):
        self._uses: dict[int, collections.deque] = {}
        self._lock = threading.Lock()

    def spend(self, key_id: int, limit: int, now: float | None = None) -> float:
        """Count one request of `key_id` and return 0, or refuse it and return the seconds
        until the key may ask again."""
        now = time.monotonic() if now is None else now
        with self._lock:
            uses = self._uses.setdefault(key_id, collections.deque())
            while uses and now - uses[0] >= WINDOW_SECONDS:
                uses.popleft()
            if len(uses) >= limit:
                return WINDOW_SECONDS - (now - uses[0])
            uses.append(now)
            return 0.0


def authorize(ctx: AppContext, limiter: KeyRateLimiter, header: str | None) -> dict:
    """The key's user ({"id", "name", "role", "key_id"}) for an `Authorization` header, after
    counting the request against the key's rate limit; ApiError 401 or 429 otherwise."""
    scheme, _, key = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise ApiError(401, "no API key given: send it as 'Authorization: Bearer KEY' (an admin makes keys with "
                            "`python -m app api-key create NAME`)", code="invalid_api_key")
    user = api_keys.user_for_key(ctx.db(), key.strip())
    if user is None:
        raise ApiError(401, "this API key is unknown or has been revoked: ask an admin for a new one",
                       code="invalid_api_key")
    limit = api_keys.rate_limit(ctx.db())
    wait = limiter.spend(user["key_id"], limit)
    if wait > 0:
        raise ApiError(429, f"rate limit reached: this API key may make {limit} requests per minute; "
                            f"try again in {math.ceil(wait)} s", "rate_limit_error", "rate_limit_exceeded",
                       headers={"retry-after": str(math.ceil(wait))})
    return user


def model_list(ctx: AppContext, user: dict) -> dict:
    """GET /v1/models: the models the key's user may name, "live" first."""
    created = {}
    for name in completions.model_names(ctx, user):
        row = model_versions.find_version(ctx.db(), ctx.server.live_version if name == "live" else name)
        created[name] = _unix_time((row or {}).get("created_at"))
    return {"object": "list", "data": [{"id": name, "object": "model", "created": when, "owned_by": "rankloop"}
                                       for name, when in created.items()]}


def _unix_time(stamp: str | None) -> int:
    from datetime import datetime

    try:
        return int(datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp())
    except (AttributeError, ValueError):
        return 0


def completion_body(completion: completions.Completion) -> dict:
    return {
        "id": completion.id, "object": "chat.completion", "created": completion.created, "model": completion.version,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": completion.text},
                     "finish_reason": completion.finish_reason, "logprobs": None}],
        "usage": completion.usage(),
    }


def chunk(completion_id: str, created: int, version: str, delta: dict, finish_reason: str | None = None) -> bytes:
    """One server-sent event carrying a `chat.completion.chunk`."""
    body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": version,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}
    return sse(body)


def sse(body: dict) -> bytes:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n".encode()


def build_api(ctx: AppContext):
    """The ASGI app serving `ROUTES` (the guard sends it every `/v1/...` request)."""
    import anyio
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    limiter = KeyRateLimiter()
    threads = anyio.CapacityLimiter(API_THREADS)

    def in_thread(fn, *args):
        return anyio.to_thread.run_sync(fn, *args, limiter=threads)

    def refusal(error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    async def user_of(request) -> dict:
        return await in_thread(authorize, ctx, limiter, request.headers.get("authorization"))

    async def models(request):
        try:
            user = await user_of(request)
            return JSONResponse(await in_thread(model_list, ctx, user))
        except Exception as e:
            return refusal(api_error(e))

    async def chat_completions(request):
        try:
            user = await user_of(request)
            body = await _read_json(request)
            wanted = completions.parse_request(body)
            version = await in_thread(completions.resolve_model, ctx, user, wanted.model)
            completion_id = f"chatcmpl-{uuid.uuid4().hex}"
            if not wanted.stream:
                completion = await in_thread(
                    lambda: completions.complete(ctx, user, wanted, version, api_key_id=user["key_id"],
                                                 completion_id=completion_id))
                return JSONResponse(completion_body(completion))
        except Exception as e:
            return refusal(api_error(e))
        answer = completions.stream_completion(ctx, user, wanted, version, api_key_id=user["key_id"],
                                               completion_id=completion_id)
        return StreamingResponse(_events(answer, completion_id, wanted.include_usage), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache", "x-accel-buffering": "no"})

    async def _events(answer, completion_id: str, include_usage: bool):
        """The answer as OpenAI's chunks: the role first, then text, then the finish reason
        (and the usage, when asked for), then `[DONE]`. An error after the first chunk goes out
        as an event carrying an `error` object, which the openai client raises."""
        created, version, started = int(time.time()), "", False
        done = object()

        def step():
            try:
                return next(answer)
            except StopIteration as end:
                return done, end.value

        try:
            while True:
                item = await in_thread(step)
                if item[0] is done:
                    completion = item[1]
                    break
                delta, version = item
                if not started:
                    started = True
                    yield chunk(completion_id, created, version, {"role": "assistant", "content": ""})
                if delta:
                    yield chunk(completion_id, created, version, {"content": delta})
            yield chunk(completion_id, created, completion.version, {}, completion.finish_reason)
            if include_usage:
                yield sse({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                           "model": completion.version, "choices": [], "usage": completion.usage()})
            yield b"data: [DONE]\n\n"
        except Exception as e:
            yield sse(api_error(e).body())
        finally:
            answer.close()  # a client gone mid-answer: out of the batch at the next step, nothing stored

    def lora_route(action):
        async def route(request):
            from starlette.responses import PlainTextResponse

            try:
                user = await user_of(request)
                body = await _read_json(request)
                if not isinstance(body, dict):
                    raise ApiError(400, "the request body must be a JSON object")
                if action == "load":
                    text = await in_thread(completions.load_named_adapter, ctx, user, body.get("lora_name"),
                                           body.get("lora_path"))
                else:
                    text = await in_thread(completions.unload_named_adapter, ctx, user, body.get("lora_name"))
                return PlainTextResponse(text)  # as vLLM answers
            except Exception as e:
                return refusal(api_error(e))

        return route

    async def not_found(request, exc):
        if exc.status_code == 405:
            return refusal(ApiError(405, f"{request.method} is not allowed on {request.url.path}"))
        return refusal(ApiError(404, f"no such API route: {request.method} {request.url.path} (rankloop serves "
                                     f"{', '.join(ROUTES)})", code="unknown_url"))

    return Starlette(routes=[Route("/v1/models", models, methods=["GET"]),
                             Route("/v1/chat/completions", chat_completions, methods=["POST"]),
                             Route("/v1/load_lora_adapter", lora_route("load"), methods=["POST"]),
                             Route("/v1/unload_lora_adapter", lora_route("unload"), methods=["POST"])],
                     exception_handlers={HTTPException: not_found})


async def _read_json(request):
    """The request's JSON body, refused (413, 400) when too large or not JSON."""
    declared = request.headers.get("content-length") or "0"
    if not declared.isdigit() or int(declared) > MAX_BODY_BYTES:
        raise ApiError(413, f"the request body is over {MAX_BODY_BYTES // 1024} KiB")
    body = bytearray()
    async for part in request.stream():
        body.extend(part)
        if len(body) > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body is over {MAX_BODY_BYTES // 1024} KiB")
    try:
        return json.loads(bytes(body))
    except ValueError:
        raise ApiError(400, "the request body is not valid JSON") from None
