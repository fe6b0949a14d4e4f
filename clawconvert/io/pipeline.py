"""Two threads between a tensor source and a writer: one produces, the other writes.

File reads, CRC checks, transposes, casts, matmuls and writes all release the GIL, so the
next tensors are read and transformed while the current one is written.  Items are
``("copy", name, (file, offset, nbytes))`` for bytes the writer copies from the source as
they are, ``("write", name, array)``, or ``("fill", name, filler)`` for a tensor computed a
band of rows at a time straight into the writer's buffers (a merged LoRA weight: no whole
copy of it ever exists); at most ``IN_FLIGHT_BYTES`` of finished arrays wait
between the threads, and at most ``MAX_WAITING`` of them (one is always let through), so memory
stays a few tensors.
"""
from __future__ import annotations

import contextvars
import threading
from collections import deque
from concurrent.futures import wait
from typing import Any, Callable, Iterable

IN_FLIGHT_BYTES = 32 << 20   # finished tensors waiting for the writer, at most (one is always let through)
MAX_WAITING = 2              # and at most this many of them: memory follows the largest tensor, not the model

TWO_THREADS_FROM = 8 << 20   # arrays this large are transposed or merged in two halves (in_two_halves)
_HELPER = None


def in_two_halves(work: Callable[[int, int], None], n: int, step: int, nbytes: int) -> None:
    """``work(0, half)`` on this thread and ``work(half, n)`` on the helper thread, ``half`` a
    multiple of ``step`` near ``n / 2`` (numpy releases the GIL, so both run at once); plain
    ``work(0, n)`` when the data (``nbytes``) is under ``TWO_THREADS_FROM`` or ``n`` under two
    steps.  Both halves are finished before this returns or raises."""
    if nbytes < TWO_THREADS_FROM or n < 2 * step:
        work(0, n)
        return
    global _HELPER
    if _HELPER is None:
        from concurrent.futures import ThreadPoolExecutor
        _HELPER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clawconvert-helper")
    half = (n // 2 + step - 1) // step * step
    helper = _HELPER.submit(work, half, n)
    try:
        work(0, half)
    finally:
        wait([helper])      # never leave the helper writing after an error here
    helper.result()


class Handoff:
    """A queue between the producing and the writing thread, bounded by bytes, that either
    side can stop: the writer on an error, the producer by handing over its exception."""

    def __init__(self, limit: int):
        self.limit = limit
        self._items: deque = deque()
        self._bytes = 0
        self._cv = threading.Condition()
        self._stopped = False
        self._error: BaseException | None = None

    @staticmethod
    def _size(item) -> int:
        return item[2].nbytes if item is not None and item[0] == "write" else 0

    def put(self, item) -> bool:
        n = self._size(item)
        with self._cv:
            while not self._stopped and self._items and (self._bytes + n > self.limit
                                                         or len(self._items) >= MAX_WAITING):
                self._cv.wait()
            if self._stopped:
                return False
            self._items.append(item)
            self._bytes += n
            self._cv.notify_all()
            return True

    def get(self):
        with self._cv:
            while not self._items and self._error is None:
                self._cv.wait()
            if self._error is not None:
                raise self._error
            item = self._items.popleft()
            self._bytes -= self._size(item)
            self._cv.notify_all()
            return item

    def fail(self, error: BaseException) -> None:
        with self._cv:
            self._error = error
            self._cv.notify_all()

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._items.clear()
            self._cv.notify_all()


def write_pipelined(items: Iterable[tuple], sink: Any) -> int:
    """Produce ``items`` on a worker thread and hand each to ``sink`` here; returns the count.

    An exception on either side stops both and is raised here; context variables (e.g.
    ``--check-finite``) apply in the worker as in the caller."""
    handoff = Handoff(IN_FLIGHT_BYTES)
    worker = threading.Thread(target=contextvars.copy_context().run, args=(_produce, items, handoff),
                              name="clawconvert-produce", daemon=True)
    worker.start()
    written = 0
    try:
        while True:
            item = handoff.get()
            if item is None:
                break
            kind, name, payload = item
            if kind == "copy":
                sink.copy_range(name, *payload)
            elif kind == "fill":
                sink.fill(name, payload)
            else:
                sink.write(name, payload)
            written += 1
            del item, payload
    finally:
        handoff.stop()
        worker.join()
    return written


def _produce(items: Iterable[tuple], handoff: Handoff) -> None:
    try:
        for item in items:
            if not handoff.put(item):
                return  # the writer stopped (an error there)
        handoff.put(None)
    except BaseException as e:  # handed to the writing thread, which raises it
        handoff.fail(e)


class Background:
    """``fn(*args)`` on its own thread from now on; ``result()`` waits and returns it or
    raises what it raised.  For work beside the tensor stream (side files)."""

    def __init__(self, fn, *args):
        self._result: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=contextvars.copy_context().run, args=(self._run, fn, args),
                                        name="clawconvert-side", daemon=True)
        self._thread.start()

    def _run(self, fn, args) -> None:
        try:
            self._result = fn(*args)
        except BaseException as e:
            self._error = e

    def wait(self) -> None:
        self._thread.join()

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._result
