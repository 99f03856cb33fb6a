"""The test process's fd account (tests/_fd_audit.py) and the accept loop
of the tests' servers (conftest.accept_until_closed), on real sockets."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

from tests._fd_audit import FdAudit, held_unlisted, snapshot
from tests.conftest import ACCEPT_POLL, accept_until_closed


def _held() -> int:
    """held_unlisted() once two counts in a row agree (a thread of an
    earlier test closing an fd meanwhile moves one count)."""
    last = -1
    for _ in range(50):
        now = held_unlisted(set(snapshot()))
        if now == last:
            break
        last = now
        time.sleep(0.01)
    return last


def _blocked_in_accept(listener: socket.socket) -> threading.Thread:
    """A thread in a blocking accept() on *listener*, once it is there."""

    def wait() -> None:
        with contextlib.suppress(OSError):  # (EINVAL: shut down)
            listener.accept()

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while not _held() and time.monotonic() < deadline:  # (a bound, not a measurement)
        time.sleep(0.01)
    return thread


def test_a_thread_blocked_in_accept_holds_a_number_proc_does_not_list() -> None:
    """The kernel takes the number of the connection to come when accept()
    starts to wait: held_unlisted() counts it, /proc/self/fd does not
    list it, and it is free again once the accept() ends (shutdown()
    wakes it, where a close() would not)."""
    before = _held()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listed = set(snapshot())
        thread = _blocked_in_accept(listener)
        assert _held() == before + 1
        assert set(snapshot()) == listed
        listener.shutdown(socket.SHUT_RDWR)  # (accept() fails: EINVAL)
        thread.join(5)
        assert not thread.is_alive()
    assert _held() == before


def test_a_listener_closed_under_accept_until_closed_ends_its_thread() -> None:
    """accept_until_closed() waits in poll(): the listener closed, its
    thread ends within ACCEPT_POLL and holds no number (a thread blocked
    in accept() waited for good, holding one)."""
    before = _held()
    listener = socket.create_server(("127.0.0.1", 0))
    got: list[socket.socket] = []
    thread = accept_until_closed(listener, got.append)
    with socket.create_connection(listener.getsockname()[:2], timeout=5):
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)
    assert len(got) == 1 and got[0].gettimeout() is None  # (blocking, as before)
    got[0].close()
    listener.close()
    thread.join(ACCEPT_POLL + 5)
    assert not thread.is_alive()
    assert _held() == before


def test_an_fd_a_test_leaves_open_is_charged_to_it() -> None:
    """Opened during a test and open after it: charged to that test; closed
    by a test of another file: a leak that ended by chance, still charged;
    opened and closed within one test: nothing."""
    audit = FdAudit()
    audit.before()
    left = socket.socket()
    audit.after("tests/test_a.py::test_leaves_one")
    audit.before()
    socket.socket().close()
    audit.after("tests/test_a.py::test_closes_its_own")
    assert audit.leaks() == {"tests/test_a.py::test_leaves_one": 1}
    assert audit.owner[left.fileno()][1] == "tests/test_a.py::test_leaves_one"
    audit.before()
    fd = left.fileno()
    left.close()
    audit.after("tests/test_b.py::test_closes_it")
    assert fd not in audit.owner
    assert audit.late == [
        ("tests/test_a.py::test_leaves_one", "tests/test_b.py::test_closes_it", audit.late[0][2])
    ]
    assert audit.leaks() == {"tests/test_a.py::test_leaves_one": 1}
