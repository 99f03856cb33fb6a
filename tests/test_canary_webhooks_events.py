"""``l4proxy canary``'s event webhooks are fire-and-forget, as Flagger's
are: a slow or hanging receiver never holds the analysis. Each event hook
has one sender (a thread) and a bounded queue, the oldest event dropped
(counted, said on stderr) when it is full; the command waits for what is
queued as it ends, at most the hook's timeout. The gates stay synchronous.
The hooks are real HTTP servers on 127.0.0.1, port 0
(tests/test_canary_webhooks.HookServer)."""

from __future__ import annotations

import io
import pathlib
import threading
from typing import Any

import pytest
import yaml

from l4proxy.canary._webhooks import EVENT_QUEUE, parse_file
from l4proxy.canary.command import Hooks
from tests.test_canary_core import unstamped
from tests.test_canary_webhooks import HookServer, rollout

# How long a held receiver is let hang at most (a guard: the code before
# this change waited for each event, and the test then ends in its
# assertions, not in a hang). Not a measure: nothing here is timed.
GUARD = 15.0


def _event_hooks_file(tmp_path: pathlib.Path, url: str, timeout: str = "60s") -> str:
    """A --webhooks file with one event hook, "chat", of *timeout*."""
    path = tmp_path.parent / f"{tmp_path.name}-events.yaml"
    entry = {"name": "chat", "type": "event", "url": f"{url}/events", "timeout": timeout}
    path.write_text(yaml.safe_dump([entry]))
    return str(path)


def test_a_hanging_event_hook_does_not_hold_the_analysis(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The event receiver takes the first event and does not answer until
    the rollout's end is written (its post-rollout hook lets it go): every
    interval runs meanwhile, no event sent after the first (one sender,
    which waits for its answer), and then each event arrives, in order.
    Called in line, the first event held the analysis for its 60 s
    timeout: the rollout hook saw the events go out one by one."""
    arrived = threading.Event()
    release = threading.Event()
    threading.Timer(GUARD, release.set).start()
    seen_by_load: list[int] = []

    def events(n: int, body: dict[str, Any]) -> int:
        arrived.set()
        release.wait()
        return 200

    def load(n: int, body: dict[str, Any]) -> int:
        assert arrived.wait(GUARD)  # the first event's call is under way
        seen_by_load.append(len(hooks.of("events")))
        return 200

    def notify(n: int, body: dict[str, Any]) -> int:
        release.set()  # the end is written: the receiver answers now
        return 200

    answers = {"events": events, "load": load, "notify": notify}
    try:
        with HookServer(answers).serving() as hooks:
            code = rollout(
                tmp_path,
                "--steps",
                "25,50,100",
                "--webhook",
                hooks.hook("rollout", "load"),
                "--webhook",
                hooks.hook("post-rollout", "notify"),
                "--webhooks",
                _event_hooks_file(tmp_path, hooks.url),
            )
            told = [e["metadata"]["eventMessage"] for e in hooks.of("events")]
    finally:
        release.set()
    captured = capsys.readouterr()
    assert code == 0, captured
    # three intervals (25, 50, 100 %: its pass promotes), each with the
    # first event still unanswered and nothing sent after it
    assert seen_by_load == [1, 1, 1], captured
    # once it answered, the rest went, in order, before the command ended
    lines = unstamped(captured.out).splitlines()
    assert told == [" ".join(line.replace("█", " ").split()) for line in lines]
    assert "dropped" not in captured.err and "not sent" not in captured.err


def _held_hooks(url: str, err: io.StringIO, timeout: str = "60s") -> Hooks:
    """Hooks with one event hook, "chat", at *url*/events."""
    text = f"- {{name: chat, type: event, url: '{url}/events', timeout: {timeout}}}"
    return Hooks(parse_file(text, "x"), "bootcamp", "default", err)


def _senders() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("l4proxy-canary-event")]


def test_a_slow_receiver_keeps_the_last_events_and_the_drops_are_counted(
    tmp_path: pathlib.Path,
) -> None:
    """100 events while the receiver holds the first: one sender thread
    (not one per event), the first in flight, the last EVENT_QUEUE queued,
    the ones between dropped (oldest first), counted and said on stderr
    once as they begin and with their total as the command ends."""
    arrived = threading.Event()
    release = threading.Event()
    threading.Timer(GUARD, release.set).start()

    def events(n: int, body: dict[str, Any]) -> int:
        arrived.set()
        release.wait()
        return 200

    err = io.StringIO()
    before = len(_senders())
    try:
        with HookServer({"events": events}).serving() as server:
            hooks = _held_hooks(server.url, err)
            hooks.notify("event 1", False, "Progressing")
            assert arrived.wait(GUARD)
            for i in range(2, 101):
                hooks.notify(f"event {i}", False, "Progressing")
            assert len(_senders()) == before + 1
            assert err.getvalue().count("dropped") == 1  # said once, as it began
            release.set()
            hooks.close()
            got = [b["metadata"]["eventMessage"] for b in server.of("events")]
    finally:
        release.set()
    dropped = 100 - 1 - EVENT_QUEUE
    assert got == ["event 1", *(f"event {i}" for i in range(2 + dropped, 101))]
    assert f'event "chat": {dropped} events dropped' in err.getvalue(), err.getvalue()
    assert "not sent" not in err.getvalue()


def test_the_end_waits_for_the_call_under_way_which_its_timeout_bounds(
    tmp_path: pathlib.Path,
) -> None:
    """A receiver that never answers, the hook's timeout 1 s: the command's
    end waits for the call under way (it waits at most the longest event
    hook's timeout and a second, and that timeout bounds the call), the
    failure is said, nothing is left unsent, and the sender's thread ends."""
    arrived = threading.Event()

    def events(n: int, body: dict[str, Any]) -> None:
        arrived.set()  # and no answer (until the server stops)

    err = io.StringIO()
    with HookServer({"events": events}).serving() as server:
        hooks = _held_hooks(server.url, err, "1s")
        hooks.notify("the end", False, "Succeeded")
        assert arrived.wait(GUARD)
        hooks.close()
        for t in _senders():
            t.join(GUARD)
        assert _senders() == []
    assert len(server.of("events")) == 1
    assert 'warning: event "chat": no answer within 1 s' in err.getvalue(), err.getvalue()
    assert "not sent" not in err.getvalue()


def test_what_the_end_gives_up_is_counted(tmp_path: pathlib.Path) -> None:
    """Given no time to wait, the end gives up the call under way and the
    two events queued behind it, and says so: they are not sent."""
    arrived = threading.Event()

    def events(n: int, body: dict[str, Any]) -> None:
        arrived.set()

    err = io.StringIO()
    with HookServer({"events": events}).serving() as server:
        hooks = _held_hooks(server.url, err)
        for i in range(1, 4):
            hooks.notify(f"event {i}", False, "Progressing")
        assert arrived.wait(GUARD)
        hooks.close(wait=0.0)
        hooks.notify("after the end", False, "Progressing")  # nothing sent after it
        assert len(server.of("events")) == 1
    assert 'event "chat": 3 events not sent' in err.getvalue(), err.getvalue()
