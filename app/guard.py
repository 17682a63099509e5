"""The HTTP guard in front of Gradio: who may fetch files, upload, or see monitoring, and what a
page may load.

Gradio checks that a request is logged in, not who is asking. Every logged-in user could
fetch any file in its cache by path (`/gradio_api/file=...`): an annotator could download an
admin's export of every pair, or another admin's upload. This ASGI middleware sits in front of
Gradio's own app and resolves the request's user from Gradio's session cookie, then:

- uploads (`/gradio_api/upload`) are for admins only (importing is an admin action), and the
  guard remembers who uploaded each file from the upload's response;
- files (`/gradio_api/file=...`) are served to admins only, and an upload or an export only to
  the admin who made it (`FileOwners`);
- `/monitoring` (Gradio's per-endpoint counts and timings) is for admins only;
- every response carries a Content-Security-Policy that lets a page load images only from the
  app itself (`img-src 'self' data: blob:`): a markdown image in a chat message or a model's
  reply (`![](http://host/x.png)`) is never fetched from elsewhere;
- `GET /health` answers an admin with the app's health report (`app.health`): 200 when all
  is well, 503 when something is degraded (for monitoring);
- the client's address is kept for the request (`client_address()`), so login throttling can
  count failures per address as well as per name (`app.auth`);
- requests under `/v1/` go to the OpenAI-compatible API (`app.openai_api`), which checks its
  own API keys and ignores the session cookie; Gradio never sees them, and nothing else is
  routed there.

Pure ASGI (no BaseHTTPMiddleware), so streamed responses (server-sent events, chat) pass
through untouched.
"""

from __future__ import annotations

import contextvars
import json
import logging
import threading
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import unquote

logger = logging.getLogger(__name__)

CSP = "img-src 'self' data: blob:; object-src 'none'; frame-ancestors 'self'"
FILE_PREFIXES = ("/gradio_api/file=", "/file=")
UPLOAD_PREFIXES = ("/gradio_api/upload", "/upload")
ADMIN_ONLY_PREFIXES = ("/monitoring", "/gradio_api/monitoring")
HEALTH_PATH = "/health"
API_PREFIX = "/v1/"  # app.openai_api

_client_address: contextvars.ContextVar[str | None] = contextvars.ContextVar("rankloop_client", default=None)


def client_address() -> str | None:
    """The address of the client whose request is being handled (None outside a request)."""
    return _client_address.get()


class FileOwners:
    """Which user made each file Gradio serves (uploads and exports), by file path."""

    def __init__(self, limit: int = 10_000):
        self._owners: dict[str, str] = {}
        self._limit = limit
        self._lock = threading.Lock()

    def add(self, path, user: str) -> None:
        with self._lock:
            if len(self._owners) >= self._limit:  # bounded: forget the oldest
                self._owners.pop(next(iter(self._owners)))
            self._owners[str(Path(path).resolve())] = user

    def owner(self, path) -> str | None:
        with self._lock:
            return self._owners.get(str(Path(path).resolve()))

    def owner_by_name(self, name: str) -> str | None:
        """The owner of a file of this unique name (Gradio copies a file returned by an event into
        its cache under a new folder, keeping the name; exports carry a random token in theirs)."""
        with self._lock:
            for path, user in self._owners.items():
                if Path(path).name == name:
                    return user
        return None


class Guard:
    """ASGI middleware around Gradio's app (see the module docstring). `role_of(name)` returns
    a user's role ('admin', 'annotator') or None."""

    def __init__(self, app, role_of, owners: FileOwners, health=None, api=None):
        self.app = app
        self.role_of = role_of
        self.owners = owners
        self.health = health  # () -> the app's health report (app.health), served at /health
        self.api = api  # the ASGI app of the OpenAI-compatible API (app.openai_api), served under /v1/

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        token = _client_address.set((scope.get("client") or ("unknown",))[0])
        try:
            path = scope.get("path", "")
            if self.api is not None and path.startswith(API_PREFIX):  # its own keys, never the cookie
                return await self.api(scope, receive, _with_csp(send))
            user = self._user(scope)
            refusal = self._refusal(path, user)
            if refusal:
                return await _respond(send, 403, refusal)
            if path.rstrip("/") == HEALTH_PATH and self.health is not None:
                if self.role_of(user) != "admin" if user else True:
                    return await _respond(send, 403, "the health report is for admins")
                import anyio

                report = await anyio.to_thread.run_sync(self.health)
                return await _respond(send, 200 if report["status"] == "ok" else 503, None, report)
            if path.startswith(UPLOAD_PREFIXES) and scope.get("method") == "POST":
                return await self.app(scope, receive, self._remember_uploads(send, user))
            return await self.app(scope, receive, _with_csp(send))
        finally:
            _client_address.reset(token)

    def _user(self, scope) -> str | None:
        gradio = scope.get("app")  # Gradio's own FastAPI app: its session tokens
        tokens, cookie_id = getattr(gradio, "tokens", None), getattr(gradio, "cookie_id", None)
        if tokens is None:
            return None
        cookies = SimpleCookie()
        for name, value in scope.get("headers", []):
            if name == b"cookie":
                try:
                    cookies.load(value.decode("latin-1"))
                except Exception:  # a malformed cookie header: nobody
                    return None
        for key in (f"access-token-{cookie_id}", f"access-token-unsecure-{cookie_id}"):
            if key in cookies and cookies[key].value in tokens:
                return tokens[cookies[key].value]
        return None

    def _refusal(self, path: str, user: str | None) -> str | None:
        role = self.role_of(user) if user else None
        if path.startswith(ADMIN_ONLY_PREFIXES) and role != "admin":
            return "monitoring is for admins"
        if path.startswith(UPLOAD_PREFIXES) and role != "admin":
            return "uploading files is for admins (to import data)"
        if path.startswith(FILE_PREFIXES):
            if role != "admin":
                return "files are for admins"
            requested = Path(unquote(path.split("=", 1)[1]))
            owner = self.owners.owner(requested) or self.owners.owner_by_name(requested.name)
            if owner is not None and owner != user:
                return "this file belongs to another admin"
        return None

    def _remember_uploads(self, send, user):
        """Wrap `send`: note the paths an upload response lists as `user`'s files."""
        body = bytearray()

        async def remembering(message):
            if message["type"] == "http.response.body":
                body.extend(message.get("body", b""))
                if not message.get("more_body"):
                    try:
                        for path in json.loads(bytes(body)):
                            self.owners.add(path, user)
                    except (ValueError, TypeError):
                        pass
            await _with_csp(send)(message)

        return remembering


def _with_csp(send):
    async def sending(message):
        if message["type"] == "http.response.start":
            headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"content-security-policy"]
            message = {**message, "headers": [*headers, (b"content-security-policy", CSP.encode())]}
        await send(message)

    return sending


async def _respond(send, status: int, detail: str | None, payload: dict | None = None) -> None:
    body = json.dumps(payload if payload is not None else {"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"content-security-policy", CSP.encode())]})
    await send({"type": "http.response.body", "body": body})
