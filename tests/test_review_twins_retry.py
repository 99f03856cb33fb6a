"""Review: the twin harness (test_relay_twins) with a retry policy on every
routed decision that retries every final status (and resets): each answer
kind, HEAD, the client cases and the generated conversations go through
given-up tries; the twins must still agree byte for byte."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import tests.test_relay_twins as twins
from l4proxy.dataplane.verdict import RetryPolicy

EVERY = RetryPolicy.of(2, 0.0, ["5xx", "reset", "retriable-status-codes"], range(200, 600))


@pytest.fixture(autouse=True)
def _retried(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    decide = twins.Run._decide

    def with_policy(self: twins.Run, head: twins.RequestHead, origin: object) -> twins.Decision:
        d = decide(self, head, origin)
        return d if d.local is not None else d._replace(retry=EVERY)

    monkeypatch.setattr(twins.Run, "_decide", with_policy)
    yield


# (a given-up try of a big answer: when the backend sees its connection
# closed, 'eof' or still 'open' at the harness's snapshot, is timing: the
# backend is blocked writing into a full socket buffer)
RETRIED_ANSWERS = [n for n in twins.GET_ANSWERS if "big" not in n]


@pytest.mark.parametrize("name", RETRIED_ANSWERS)
def test_each_answer_retried(name: str) -> None:
    twins.test_each_answer_then_the_next_request(name)


@pytest.mark.parametrize(
    "name", ["head", "head_chunked", "cl", "chunked", "204", "304_cl", "two_cl"]
)
def test_head_requests_retried(name: str) -> None:
    twins.test_head_requests(name)


@pytest.mark.parametrize("name", sorted(twins.CLIENT_CASES))
def test_clients_retried(name: str) -> None:
    twins.test_clients(name)


def test_generated_conversations_retried() -> None:
    twins.test_generated_conversations()


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(
    max_examples=120,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(st.lists(twins.request(), min_size=1, max_size=4), st.data())
def test_more_generated_conversations_retried(
    requests: list[tuple[bytes, bool]], data: st.DataObject
) -> None:
    twins.test_generated_conversations.hypothesis.inner_test(requests, data)
