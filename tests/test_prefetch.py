"""EpochPrefetcher: the same batches, epoch by epoch, made ahead in a thread."""

from __future__ import annotations

import itertools
import threading
import time

import pytest

from recoder_dist.training.worker.prefetch import EpochPrefetcher


def wait_until(condition, seconds=5.0):
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def within(seconds, call):
    """``call()``'s result, or its error; a test failure, not a hang, if it takes longer."""
    outcome = {}

    def run():
        try:
            outcome["result"] = call()
        except BaseException as error:
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still waiting after {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def test_epochs_keep_their_batches_and_boundaries():
    epochs = [[1, 2, 3], [], [4], list(range(10, 30))]
    with EpochPrefetcher(iter(epochs), depth=2) as prefetcher:
        assert [list(prefetcher.next_epoch()) for _ in epochs] == epochs


def test_runs_ahead_into_the_next_epoch():
    """The next epoch's first batch is made while the consumer is still between epochs."""
    started = threading.Event()

    def second_epoch():
        started.set()
        yield "b"

    with EpochPrefetcher(iter([["a"], second_epoch()]), depth=2) as prefetcher:
        assert list(prefetcher.next_epoch()) == ["a"]
        assert started.wait(5.0), "the second epoch did not start before it was asked for"
        assert list(prefetcher.next_epoch()) == ["b"]


@pytest.mark.parametrize("depth", [1, 3])
def test_makes_at_most_depth_batches_ahead(depth):
    """``depth`` batches wait in the queue and one more in the producer's hand, no more."""
    made = itertools.count()
    counts = []

    def endless():
        while True:
            counts.append(next(made))
            yield counts[-1]

    with EpochPrefetcher(iter([endless()]), depth=depth) as prefetcher:
        assert wait_until(lambda: len(counts) == depth + 1)
        time.sleep(0.2)
        assert len(counts) == depth + 1
        batches = prefetcher.next_epoch()
        assert [next(batches) for _ in range(5)] == [0, 1, 2, 3, 4]


def test_an_error_is_raised_where_its_batch_would_be():
    def failing():
        yield 1
        yield 2
        raise ValueError("bad group")

    with EpochPrefetcher(iter([[0], failing()])) as prefetcher:
        assert list(prefetcher.next_epoch()) == [0]
        batches = prefetcher.next_epoch()
        assert [next(batches), next(batches)] == [1, 2]
        with pytest.raises(ValueError, match="bad group"):
            within(5.0, lambda: next(batches))


def test_an_epoch_past_the_last_is_an_error_not_a_hang():
    with EpochPrefetcher(iter([[1]])) as prefetcher:
        assert list(prefetcher.next_epoch()) == [1]
        with pytest.raises(RuntimeError, match="after the last epoch"):
            within(5.0, lambda: list(prefetcher.next_epoch()))


def test_close_stops_a_producer_waiting_on_a_full_queue():
    prefetcher = EpochPrefetcher(iter([itertools.count()]), depth=1)
    assert wait_until(lambda: prefetcher._queue.full())
    prefetcher.close()
    assert not prefetcher._thread.is_alive()


def test_depth_below_one_is_a_value_error():
    with pytest.raises(ValueError, match="depth must be >= 1"):
        EpochPrefetcher(iter([]), depth=0)
