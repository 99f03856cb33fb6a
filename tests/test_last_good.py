"""The workers' shared memory file of the rule files' last good texts.

Real memory files (memfd_create), as the supervisor makes them; two
:class:`LastGood` of one file stand for two workers (one process holds
the record lock for both: they take turns here). A writer killed
mid-write is a forked child that writes a version's bytes and kills
itself with SIGKILL in the middle of its header.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import random
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from l4proxy.rules import _last_good
from l4proxy.rules._last_good import DATA_AT, HEADER, FileEntry, LastGood, Texts, newest


def texts(*names: str, version: int = 1) -> Texts:
    """A text per name, *version* in its text and its entry's size."""
    out: Texts = {}
    for name in names:
        text = f"# {name} v{version}\n" + "x" * (100 * version)
        entry: FileEntry = (f"/r/{name}", f"/r/{name}", 1, 2, len(text), version, version, 0, 0)
        out[f"/r/{name}"] = (entry, text)
    return out


@pytest.fixture
def memory() -> Iterator[int]:
    fd = os.memfd_create("l4proxy-rules-last-good-test", os.MFD_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def kept(worker: LastGood, what: Texts) -> None:
    """*what* served by *worker*, and written (keep()'s thread, here now)."""
    worker.keep(what)
    worker.flush()


def test_a_worker_gets_what_another_wrote_and_nothing_from_a_new_file(memory: int) -> None:
    one, two = LastGood(memory), LastGood(memory)
    assert two.get() == {} and not two.check()
    kept(one, texts("a.yaml", "b.yaml"))
    assert two.check()  # (a version it had not seen)
    assert two.get() == texts("a.yaml", "b.yaml")
    assert list(two.get()) == ["/r/a.yaml", "/r/b.yaml"]  # (the order written)


def test_a_writer_killed_mid_write_leaves_the_version_before(memory: int) -> None:
    """Version 2 written whole, then a writer of version 3 killed with its
    bytes written and half its header: a reader gets version 2."""
    one, two = LastGood(memory), LastGood(memory)
    kept(one, texts("a.yaml", version=1))
    kept(one, texts("a.yaml", version=2))
    pid = os.fork()
    if pid == 0:  # the writer of version 3, killed in the middle of its header
        try:
            real = _last_good._pwrite

            def torn(fd: int, data: bytes, offset: int) -> None:
                if offset < DATA_AT:  # (the header: written last)
                    real(fd, data[: HEADER.size // 2], offset)
                    os.kill(os.getpid(), signal.SIGKILL)
                real(fd, data, offset)

            _last_good._pwrite = torn
            kept(one, texts("a.yaml", version=3))
        finally:
            os._exit(1)  # (not reached)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert two.get() == texts("a.yaml", version=2)


def test_a_shared_version_without_a_path_keeps_the_readers_own(memory: int) -> None:
    """Worker 2 wrote a version without route.yaml (restarted while the file
    was damaged, it had none): worker 1 still gets its own route.yaml, and
    the newer text of every path both have."""
    one, two = LastGood(memory), LastGood(memory)
    kept(one, texts("registry.yaml", "route.yaml", version=1))
    kept(two, texts("registry.yaml", version=2))
    assert one.get() == {**texts("registry.yaml", version=2), **texts("route.yaml", version=1)}


def test_a_readers_own_texts_not_yet_written_are_the_newer(memory: int) -> None:
    one, two = LastGood(memory), LastGood(memory)
    kept(two, texts("a.yaml", "b.yaml", version=1))
    one._own, one._kept = texts("a.yaml", version=2), 1  # (kept: its thread not yet run)
    assert one.get() == {**texts("a.yaml", version=2), **texts("b.yaml", version=1)}


@pytest.mark.parametrize("damage", ["truncated", "garbage", "headers"])
def test_a_damaged_file_gives_the_own_texts_and_is_written_again(memory: int, damage: str) -> None:
    """Both versions lost (the file truncated to nothing, garbage over it,
    both headers overwritten): a worker that wrote uses its own and writes
    them again, found at its next check (the poll) or its next get(); then
    another worker gets them."""
    rng = random.Random(11)
    one, two, three = LastGood(memory), LastGood(memory), LastGood(memory)
    kept(one, texts("a.yaml", version=1))
    kept(one, texts("a.yaml", version=2))
    size = os.fstat(memory).st_size
    if damage == "truncated":
        os.ftruncate(memory, 0)
    elif damage == "garbage":
        os.pwrite(memory, rng.randbytes(size), 0)
    else:
        os.pwrite(memory, rng.randbytes(DATA_AT), 0)
    assert two.get() == {}  # (it has none of its own)
    with pytest.raises(_last_good.Damaged) if damage != "truncated" else contextlib.nullcontext():
        assert newest(memory) is None
    assert one.due()  # (its poll sees the file is not as it wrote it)
    assert not one.check()  # (nothing new: repaired)
    one.flush()
    assert two.get() == texts("a.yaml", version=2)
    # and a reader that finds it damaged writes its own there again too
    os.ftruncate(memory, 0)
    assert one.get() == texts("a.yaml", version=2)
    one.flush()
    assert three.get() == texts("a.yaml", version=2)


def in_a_thread(fn: Callable[[], Any]) -> Any:
    """fn() in a thread, its result; fails where it has not returned in 10 s
    (a lock waited for without end: the thread is left to it)."""
    got: list[Any] = []
    thread = threading.Thread(target=lambda: got.append(fn()), daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), f"{fn} still waiting"
    return got[0]


def test_a_worker_stopped_with_the_lock_held_holds_no_other_up(
    memory: int, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker stopped (SIGSTOP) with the record lock held: another's read
    gives its own texts and its write gives up, each once lock_within has
    passed (they waited for ever, and held that worker's next load up);
    once the lock is free, its next check writes what it kept."""
    one, two, three = LastGood(memory), LastGood(memory), LastGood(memory)
    kept(one, texts("b.yaml"))
    kept(two, texts("a.yaml"))
    assert one.get() == {**texts("a.yaml"), **texts("b.yaml")}
    one.lock_within = 0.05
    ready, tell = os.pipe()
    pid = os.fork()
    if pid == 0:  # a worker stopped with the lock held
        try:
            fcntl.lockf(memory, fcntl.LOCK_EX)
            os.write(tell, b"x")
            os.kill(os.getpid(), signal.SIGSTOP)
        finally:
            os._exit(0)
    try:
        assert os.read(ready, 1) == b"x"
        os.waitpid(pid, os.WUNTRACED)
        with caplog.at_level(logging.DEBUG, logger="l4proxy.rules"):
            assert in_a_thread(one.get) == texts("b.yaml")
            one.keep(texts("b.yaml", version=2))
            in_a_thread(one.flush)
        said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert said == [
            "the rules' last good versions could not be read (its lock not had within "
            "0.05 s (a worker stopped with it held?)); this worker's own are used"
        ]
        assert one.due()  # (its write is still to be done)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(ready)
        os.close(tell)
    assert not in_a_thread(one.check)
    one.flush()
    assert three.get() == texts("b.yaml", version=2)


def test_the_file_stays_within_three_versions(memory: int) -> None:
    """Many writes of texts that grow and shrink: the newest is read, and
    the file stays within the headers and three versions' bytes (two
    versions, and the room a larger one skipped: each goes where it
    overlaps none of the newest's bytes)."""
    one = LastGood(memory)
    rng = random.Random(5)
    for i in range(50):
        version = rng.randint(1, 40)
        kept(one, texts("a.yaml", version=version))
        found = newest(memory)
        assert found is not None and found[0].seq == i + 1
        assert LastGood(memory).get() == texts("a.yaml", version=version)
        largest = len(_last_good._encode(texts("a.yaml", version=40)))
        assert os.fstat(memory).st_size <= DATA_AT + 3 * (largest + 8)
