"""The serving lock: adapter loads first, then interactive requests, then background work,
each in arrival order — so a promotion is not starved by a stream of chat requests."""

import threading
import time

import pytest

from app.serving import ModelLock


def queue_up(lock, entries, order):
    """Start one thread per (name, priority) while the lock is held; wait until all are queued."""
    threads = []
    for name, priority in entries:
        def take(name=name, priority=priority):
            with lock.hold(priority):
                order.append(name)
        thread = threading.Thread(target=take)
        thread.start()
        threads.append(thread)
        deadline = time.monotonic() + 5
        while len(lock._queue) < len(threads) and time.monotonic() < deadline:
            time.sleep(0.001)  # queue them one by one so arrival order is known
    return threads


def test_waiters_are_served_by_priority_then_arrival():
    lock, order = ModelLock(), []
    lock.acquire(ModelLock.INTERACTIVE)
    threads = queue_up(lock, [("bg1", ModelLock.BACKGROUND), ("chat1", ModelLock.INTERACTIVE),
                              ("bg2", ModelLock.BACKGROUND), ("swap", ModelLock.SWAP),
                              ("chat2", ModelLock.INTERACTIVE)], order)
    assert lock.urgent_waiting()
    lock.release()
    for thread in threads:
        thread.join(5)
    assert order == ["swap", "chat1", "chat2", "bg1", "bg2"]
    assert not lock.locked() and not lock.urgent_waiting()


def test_a_releasing_thread_cannot_jump_the_queue():
    """The starvation a plain Lock allows: a loop that releases and re-takes the lock."""
    lock, order = ModelLock(), []
    lock.acquire(ModelLock.INTERACTIVE)
    [swap] = queue_up(lock, [("swap", ModelLock.SWAP)], order)
    lock.release()
    lock.acquire(ModelLock.INTERACTIVE)  # queued behind the swap even though it just let go
    order.append("chat again")
    lock.release()
    swap.join(5)
    assert order == ["swap", "chat again"]


def test_only_queued_background_work_is_not_urgent():
    lock, order = ModelLock(), []
    lock.acquire(ModelLock.BACKGROUND)
    [bg] = queue_up(lock, [("bg", ModelLock.BACKGROUND)], order)
    assert not lock.urgent_waiting()
    lock.release()
    bg.join(5)
    assert order == ["bg"]


def test_release_of_an_unheld_lock_is_an_error():
    with pytest.raises(RuntimeError, match="unheld"):
        ModelLock().release()


def test_an_exception_inside_hold_releases_the_lock():
    lock = ModelLock()
    with pytest.raises(ValueError):
        with lock.hold(ModelLock.INTERACTIVE):
            raise ValueError("generation failed")
    assert not lock.locked()
    with lock.hold():
        assert lock.locked()
