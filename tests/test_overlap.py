"""lib.overlap: stages in threads behind bounded queues, errors raised in the caller, no thread
left behind."""

from __future__ import annotations

import threading
import time

import pytest

from lib.overlap import Background, Sink, Workers


def _threads(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == name]


def test_background_yields_everything_in_order():
    stage = Background(iter(range(100)), maxsize=3, name="bg-order")
    assert list(stage) == list(range(100))
    stage.close()
    assert _threads("bg-order") == []


def test_background_stays_at_most_maxsize_ahead():
    produced = []

    def items():
        for i in range(50):
            produced.append(i)
            yield i

    stage = Background(items(), maxsize=2, name="bg-ahead")
    iterator = iter(stage)
    assert next(iterator) == 0
    time.sleep(0.2)
    # One in the caller's hand, two queued, one waiting to be put.
    assert len(produced) <= 4
    stage.close()


def test_background_error_is_raised_in_the_consumer_after_the_items_before_it():
    def items():
        yield 1
        yield 2
        raise ValueError("bad unit")

    stage = Background(items(), maxsize=1, name="bg-error")
    seen = []
    with pytest.raises(ValueError, match="bad unit"):
        for item in stage:
            seen.append(item)
    assert seen == [1, 2]
    stage.close()


def test_background_close_stops_the_producer_and_runs_its_cleanup():
    cleaned = threading.Event()

    def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            cleaned.set()

    stage = Background(endless(), maxsize=2, name="bg-close")
    next(iter(stage))
    stage.close()
    assert cleaned.is_set() and _threads("bg-close") == []


def test_background_failing_cleanup_reaches_the_consumer():
    class Items:
        def __init__(self):
            self.left = [1, 2]

        def __iter__(self):
            return self

        def __next__(self):
            if not self.left:
                raise StopIteration
            return self.left.pop(0)

        def close(self):
            raise RuntimeError("cleanup failed")

    stage = Background(Items(), maxsize=1, name="bg-cleanup")
    outcome = []

    def consume():
        try:
            outcome.append(list(stage))
        except RuntimeError as exc:
            outcome.append(str(exc))

    consumer = threading.Thread(target=consume)
    consumer.start()
    consumer.join(timeout=10)  # before the fix the consumer waited forever for the end marker
    assert outcome == ["cleanup failed"]
    stage.close()


def test_sink_consumes_everything_and_close_waits_for_it():
    seen = []

    def consume(items):
        for item in items:
            time.sleep(0.001)
            seen.append(item)

    sink = Sink(consume, maxsize=2, name="sink-all")
    for i in range(30):
        sink.put(i)
    sink.close()
    assert seen == list(range(30)) and sink.error is None
    assert _threads("sink-all") == []


def test_sink_survives_a_wake_up_lost_to_a_signal():
    """A signal handler that raises in the caller's Queue.put right after notify() released the
    writer's waiter, before removing it from the list (the job's SIGINT did this once in ~30
    interrupts): the stale waiter takes the next notify, close()'s end marker included. The
    writer must still see every item and the end, and close() must return."""
    got: list = []
    sink = Sink(got.extend, maxsize=4, name="writer")
    condition = sink.queue.not_empty
    deadline = time.monotonic() + 60
    while not condition._waiters and time.monotonic() < deadline:
        time.sleep(0.01)  # the writer waits for its first item
    with condition:  # Queue.put, cut short where the signal lands
        sink.queue._put("first")
        sink.queue.unfinished_tasks += 1
        condition._waiters[0].release()  # notify() woke the writer; remove() never ran
    while len(condition._waiters) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)  # the writer took the item and waits again, behind the stale waiter
    closer = threading.Thread(target=sink.close, daemon=True)
    closer.start()
    closer.join(60)
    assert not closer.is_alive(), "close() waits for a writer that never wakes"
    assert got == ["first"] and sink.error is None


def test_sink_error_reaches_the_producer():
    def consume(items):
        for item in items:
            if item == 3:
                raise OSError(28, "No space left on device")

    sink = Sink(consume, maxsize=1, name="sink-error")
    with pytest.raises(OSError, match="No space left"):
        for i in range(1000):
            sink.put(i)
    sink.close()
    assert isinstance(sink.error, OSError) and _threads("sink-error") == []


def test_workers_run_every_call_with_at_most_size_in_flight():
    """The first two calls wait for each other (so two run at once); none ever runs third."""
    running, peak, done = [0], [0], []
    lock = threading.Lock()
    both = threading.Barrier(2, timeout=600)

    def call(i):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        if i < 2:
            both.wait()
        with lock:
            running[0] -= 1
            done.append(i)

    workers = Workers(2, name="w-bound")
    for i in range(10):
        workers.submit(call, i)
    workers.close()
    assert sorted(done) == list(range(10))
    assert peak[0] == 2


def test_workers_failure_stops_later_calls_and_is_raised():
    started = []

    def call(i):
        started.append(i)
        if i == 1:
            raise OSError(28, "No space left on device")

    workers = Workers(1, name="w-fail")
    workers.submit(call, 0)
    workers.submit(call, 1)
    with pytest.raises(OSError, match="No space"):
        workers.submit(call, 2)  # waits for the free thread, then sees the failure
    workers.close()
    assert started == [0, 1]


def test_workers_close_raises_a_failure_of_the_last_call():
    workers = Workers(2, name="w-last")
    workers.submit(lambda: None)
    workers.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        workers.close()
