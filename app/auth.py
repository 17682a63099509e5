"""Authentication against the store, with failed logins slowed down.

Gradio calls `check_login` for its login form and for `gradio_client` logins; every event
handler then resolves the request's authenticated user name to a fresh store row with
`user_from_request`, so roles are checked on the server, per call.
"""

from __future__ import annotations

import logging
import threading
import time

from annotations import store

logger = logging.getLogger(__name__)

FREE_FAILURES = 5
MAX_BACKOFF_SECONDS = 300.0


class Authenticator:
    """Checks passwords; after FREE_FAILURES wrong passwords for a name, refuses further
    attempts for 2^(n - FREE_FAILURES) seconds (capped), whatever the password."""

    def __init__(self, connect):
        self._connect = connect
        self._failures: dict[str, tuple[int, float]] = {}
        self._lock = threading.Lock()

    def locked_for(self, name: str, now: float | None = None) -> float:
        now = time.time() if now is None else now
        with self._lock:
            count, last = self._failures.get(name, (0, 0.0))
        if count < FREE_FAILURES:
            return 0.0
        wait = min(2.0 ** (count - FREE_FAILURES), MAX_BACKOFF_SECONDS)
        return max(0.0, last + wait - now)

    async def check_login_async(self, name: str, password: str) -> bool:
        """`check_login` in a worker thread: Gradio awaits this, so the Argon2 check (tens of
        milliseconds of CPU) never stalls the server's event loop for everyone else."""
        import anyio

        return await anyio.to_thread.run_sync(self.check_login, name, password)

    def check_login(self, name: str, password: str) -> bool:
        if self.locked_for(name) > 0:
            logger.warning("login refused for %r: too many failed attempts", name)
            return False
        user = store.authenticate(self._connect(), name, password)
        with self._lock:
            if user is None:
                count, _ = self._failures.get(name, (0, 0.0))
                self._failures[name] = (count + 1, time.time())
            else:
                self._failures.pop(name, None)
        if user is None:
            logger.info("failed login for %r", name)
        return user is not None


def user_from_request(connect, request) -> dict | None:
    """The store's row for the request's logged-in user, or None if anonymous/unknown."""
    name = getattr(request, "username", None) if request is not None else None
    if not name:
        return None
    try:
        return store.get_user(connect(), name)
    except Exception:
        return None
