"""The model's one owner: a single thread that runs every piece of model work, in the order a
priority lock grants it.

`PolicyServer` (app/serving.py) and the chat batcher (app/decoding.py) never touch the model,
its adapter table, the live pointer or the merged copies from any other thread: they hand the
work to the owner (`ModelOwner.call(priority, fn)`), which waits its turn in the `ModelLock`
(a ticket queue: priority first, then arrival) and then runs `fn` on the model thread. That is
an actor with a priority mailbox: loading or unloading an adapter, confirming a staged one and
moving the live pointer go first (`SWAP`), then interactive work (a chat decoding step, an arena
answer), then brief upkeep (a chunk of a merge), then background work (prefetching answers,
which gives way mid-generation when someone interactive is queued). Other threads read only
the snapshot the owner publishes after each change (`PolicyServer.view`).

Why one thread and not only a lock: see `on_model_thread`.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import threading
from concurrent.futures import ThreadPoolExecutor

_MODEL_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rankloop-model")


def on_model_thread(fn, *args, **kwargs):
    """Run `fn(*args, **kwargs)` on the process's one model thread and return its result.

    Every forward pass of the serving path runs on that one thread. Each thread that runs
    parallel torch work gets its own OpenMP team, and as soon as a second team exists, libgomp
    (PyTorch's OpenMP on Linux) stops its workers spinning between operations because more
    threads than cores exist: every bf16 matmul then pays a futex wake-up, and a decoding step
    of SmolLM2 took 45-60 ms instead of 25 ms (docs/performance.md). The thread count set by
    `torch.set_num_threads` is also per thread: the thread budget is set here, on this thread.
    """
    if threading.current_thread().name.startswith("rankloop-model"):
        return fn(*args, **kwargs)
    return _MODEL_THREAD.submit(fn, *args, **kwargs).result()



class ModelLock:
    """A lock granted by priority, then in arrival order (a ticket queue).

    Priorities: `SWAP` (loading an adapter), `INTERACTIVE` (a person waits), `BRIEF` (a few
    milliseconds of upkeep, such as one layer of a merge, slipped between two chat decoding
    steps), `BACKGROUND` (prefetching answers). `urgent_waiting()` tells a running background
    job that someone interactive (or a swap) is queued; `BRIEF` work waits for it instead.
    """

    SWAP, INTERACTIVE, BRIEF, BACKGROUND = 0, 1, 2, 3

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
        """Whether an interactive request or a swap is queued."""
        return self.waiting(self.INTERACTIVE)


class ModelOwner:
    """Runs work on the model thread, one piece at a time, in `ModelLock` order."""

    def __init__(self):
        self.lock = ModelLock()

    def call(self, priority: int, fn, *args, **kwargs):
        """Wait for the turn of `priority`, run `fn(*args, **kwargs)` on the model thread, and
        return its result (or raise its exception)."""
        with self.lock.hold(priority):
            return on_model_thread(fn, *args, **kwargs)

    @staticmethod
    def on_owner_thread() -> bool:
        return threading.current_thread().name.startswith("rankloop-model")
