"""Authentication against the store, with failed logins slowed down.

Gradio calls `check_login` for its login form and for `gradio_client` logins; every event
handler then resolves the request's authenticated user name to a fresh store row with
`user_from_request`, so roles are checked on the server, per call.

Throttling counts failures per (name, client address) and per client address
(`app.guard.client_address`), never per name alone: one wrong password every few minutes from
elsewhere cannot keep the admin locked out of their own desk, while one address guessing at
one name, or spraying many names, is slowed down. After `FREE_FAILURES` failures a key is
refused for 2^(n - FREE_FAILURES) seconds (capped), and a refused person is told that they
are locked and for how long (HTTP 429), not that their correct password is wrong. The failure
table is bounded and forgets entries once their wait is long over. Argon2 checks run one at a
time (`HASHING`): sixteen parallel attempts queue instead of taking both cores from everyone.
"""

from __future__ import annotations

import logging
import threading
import time

from annotations import store
from app.guard import client_address

logger = logging.getLogger(__name__)

FREE_FAILURES = 5
ADDRESS_FREE_FAILURES = 20  # an address may mistype several names before it is slowed down
MAX_BACKOFF_SECONDS = 300.0
MAX_TRACKED = 10_000
HASHING = threading.BoundedSemaphore(1)  # one Argon2 verification at a time


class LockedOut(Exception):
    """Login refused without checking the password: too many recent failures."""

    def __init__(self, seconds: float):
        super().__init__(f"too many failed logins: try again in {seconds:.0f} s")
        self.seconds = seconds


class Authenticator:
    """Checks passwords, slowing down repeated failures (see the module docstring)."""

    def __init__(self, connect):
        self._connect = connect
        self._failures: dict[tuple, tuple[int, float]] = {}
        self._lock = threading.Lock()

    def _wait(self, key: tuple, free: int, now: float) -> float:
        count, last = self._failures.get(key, (0, 0.0))
        if count < free:
            return 0.0
        return max(0.0, last + min(2.0 ** (count - free), MAX_BACKOFF_SECONDS) - now)

    def locked_for(self, name: str, address: str | None = None, now: float | None = None) -> float:
        """Seconds until `name` may try again from `address` (0: now)."""
        now = time.time() if now is None else now
        with self._lock:
            return max(self._wait(("name", name, address), FREE_FAILURES, now),
                       self._wait(("address", address), ADDRESS_FREE_FAILURES, now))

    def _record(self, name: str, address: str | None, ok: bool, now: float) -> None:
        with self._lock:
            keys = (("name", name, address), ("address", address))
            if ok:
                self._failures.pop(keys[0], None)
                return
            for key in keys:
                count, _ = self._failures.get(key, (0, 0.0))
                self._failures[key] = (count + 1, now)
            if len(self._failures) > MAX_TRACKED:
                self._forget(now)

    def _forget(self, now: float) -> None:
        """Drop entries whose wait ended long ago, then the oldest, to stay within MAX_TRACKED."""
        for key, (_, last) in list(self._failures.items()):
            if now - last > 2 * MAX_BACKOFF_SECONDS:
                del self._failures[key]
        for key, _ in sorted(self._failures.items(), key=lambda kv: kv[1][1])[: len(self._failures) - MAX_TRACKED]:
            del self._failures[key]

    async def check_login_async(self, name: str, password: str) -> bool:
        """`check_login` in a worker thread: Gradio awaits this, so the Argon2 check (tens of
        milliseconds of CPU) never stalls the server's event loop for everyone else. A locked
        person gets HTTP 429 saying for how long."""
        import anyio
        from fastapi import HTTPException

        try:
            return await anyio.to_thread.run_sync(self.check_login, name, password)
        except LockedOut as e:
            raise HTTPException(status_code=429, detail=f"Too many failed logins for {name!r} from here: "
                                                        f"try again in {e.seconds:.0f} s.") from None

    def check_login(self, name: str, password: str, address: str | None = None) -> bool:
        """True if the password is right; False if wrong; LockedOut (without checking the
        password) during a wait."""
        address = address if address is not None else client_address()
        wait = self.locked_for(name, address)
        if wait > 0:
            logger.warning("login refused for %r from %s: locked for %.0f s", name, address, wait)
            raise LockedOut(wait)
        with HASHING:
            user = store.authenticate(self._connect(), name, password)
        self._record(name, address, user is not None, time.time())
        if user is None:
            logger.info("failed login for %r from %s", name, address)
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
