"""Run a pipeline stage in a thread behind a bounded queue, with its error raised in the caller.

`Background(generator)` produces in a thread and is iterated by the caller; `Sink(consume)` is
fed by the caller and consumes in a thread; `Workers` runs independent calls (shard commits) on
a few threads. Either way the queue bounds memory, an exception in
the thread is raised in the caller, and `close()` stops and joins the thread, so no thread
outlives the stage.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

_END = object()
_POLL_S = 0.1


class Background:
    """Iterate `items` in a thread, at most `maxsize` items ahead of the caller."""

    def __init__(self, items: Iterable, maxsize: int, name: str):
        self._items = items
        self.queue: queue.Queue = queue.Queue(maxsize=maxsize)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self.queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        iterator = iter(self._items)
        try:
            for item in iterator:
                if not self._put(item):
                    break
        except BaseException as exc:  # raised in the consumer
            self._error = exc
        finally:
            try:
                close = getattr(iterator, "close", None)
                if close is not None:
                    close()  # a generator stopped early runs its own cleanup here, in its thread
            except BaseException as exc:  # the consumer must still get its end marker
                self._error = self._error or exc
            self._put(_END)

    def __iter__(self) -> Iterator:
        while True:
            item = self.queue.get()
            if item is _END:
                if self._error is not None:
                    raise self._error
                return
            yield item

    def close(self) -> None:
        """Stop producing and wait for the thread (it finishes the item in hand)."""
        self._stop.set()
        self._thread.join()


class Sink:
    """Hand items to `consume(items)` running in a thread, at most `maxsize` waiting."""

    def __init__(self, consume: Callable[[Iterable], None], maxsize: int, name: str):
        self.queue: queue.Queue = queue.Queue(maxsize=maxsize)
        self._consume = consume
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _items(self) -> Iterator:
        while True:
            # Never wait without a timeout: a signal that raises in the caller's Queue.put
            # between a notify's wake-up and its bookkeeping leaves a stale waiter, which the
            # next notify (even close()'s end marker) is spent on; polling recovers from that.
            try:
                item = self.queue.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            if item is _END:
                return
            yield item

    def _run(self) -> None:
        try:
            self._consume(self._items())
        except BaseException as exc:
            self.error = exc

    def put(self, item) -> None:
        """Queue an item; raise the consumer's error as soon as it has failed."""
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.queue.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Let the consumer finish what is queued, then wait for it (errors stay in `error`)."""
        while self._thread.is_alive():
            try:
                self.queue.put(_END, timeout=_POLL_S)
                break
            except queue.Full:
                continue
        self._thread.join()


class Workers:
    """Run calls on up to `size` threads; `submit` waits while all are busy, so at most `size`
    calls (and what they hold) are in flight. The first failure is raised by the next `submit`
    or by `close`, which waits for every call."""

    def __init__(self, size: int, name: str):
        self._pool = ThreadPoolExecutor(max_workers=size, thread_name_prefix=name)
        self._slots = threading.Semaphore(size)
        self._futures: set[Future] = set()
        self._lock = threading.Lock()

    def _done(self, future: Future) -> None:
        self._slots.release()

    def check(self) -> None:
        """Raise the failure of a call that has ended, if any."""
        with self._lock:
            done = {f for f in self._futures if f.done()}
            self._futures -= done
        for future in done:
            if future.exception() is not None:
                raise future.exception()

    def submit(self, call: Callable, *args) -> None:
        """Run `call(*args)` on a free thread, waiting for one if all are busy."""
        self._slots.acquire()
        try:
            self.check()  # after the wait too: no call starts once another has failed
        except BaseException:
            self._slots.release()
            raise
        future = self._pool.submit(call, *args)
        with self._lock:
            self._futures.add(future)
        future.add_done_callback(self._done)

    def close(self) -> None:
        """Wait for every call; raise the first failure, if any."""
        self._pool.shutdown(wait=True)
        self.check()
