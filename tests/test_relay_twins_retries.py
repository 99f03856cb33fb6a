"""The twin harness (test_relay_twins) with a retry policy on every
routed decision that retries every final status (and resets): each answer
kind, HEAD, the client cases and the generated conversations go through
given-up tries; the twins must still agree byte for byte."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

import tests.test_relay_twins as twins
from l4proxy.dataplane.verdict import RetryPolicy

EVERY = RetryPolicy.of(
    2, 0.0, ["5xx", "reset", "retriable-status-codes"], range(200, 600), backoff=0.001
)


@pytest.fixture(autouse=True)
def _retried(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    decide = twins.Run._decide

    def with_policy(self: twins.Run, head: twins.RequestHead, origin: object) -> twins.Decision:
        d = decide(self, head, origin)
        return d if d.local is not None else d._replace(retry=EVERY)

    monkeypatch.setattr(twins.Run, "_decide", with_policy)
    run_case = twins.run_case

    def settled(*args: object, **kw: object) -> twins.Outcome:
        # a given-up try's connection is closed at once by both twins; when
        # the backend's thread sees it ('eof', or still 'open' at the
        # snapshot) is timing under load: its bytes are compared, not that
        out = run_case(*args, **kw)  # type: ignore[arg-type]
        out.backend = [
            (data, "closed" if how in ("eof", "open") else how) for data, how in out.backend
        ]
        return out

    monkeypatch.setattr(twins, "run_case", settled)
    yield


# Every other answer kind and client case (the suite's time: all of them
# took 30 s; L4PROXY_TWINS_RETRIED_ALL=1 runs them all, as make fuzz does)
_STEP = 1 if os.environ.get("L4PROXY_TWINS_RETRIED_ALL") else 2
RETRIED_ANSWERS = twins.GET_ANSWERS[::_STEP]


@pytest.mark.parametrize("name", RETRIED_ANSWERS)
def test_each_answer_retried(name: str) -> None:
    twins.test_each_answer_then_the_next_request(name)


@pytest.mark.parametrize(
    "name", ["head", "head_chunked", "cl", "chunked", "204", "304_cl", "two_cl"]
)
def test_head_requests_retried(name: str) -> None:
    twins.test_head_requests(name)


@pytest.mark.parametrize("name", sorted(twins.CLIENT_CASES)[::_STEP])
def test_clients_retried(name: str) -> None:
    twins.test_clients(name)


def test_generated_conversations_retried() -> None:
    twins.test_generated_conversations()
