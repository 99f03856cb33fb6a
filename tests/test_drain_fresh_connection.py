"""A drain leaves a connection taken a moment ago for its first request.

The drain closes the keep-alive connections between requests (see
"Drain" in ``l4proxy/dataplane/_relay_py.py``). A connection the relay had
just taken, whose first request had not come yet, counted as one: closed
at once, its client, which had connected to send that request, read EOF
for it (the churn tests of tests/test_drain_listener_queue.py saw it about
once in a dozen runs: a connection accepted in the loop's turn that
applied the SIGTERM's drain). Now one taken less than a second ago that
has sent nothing is due again then, and its request, when it comes, is
answered saying ``connection: close``; one idle for longer still closes
(tests/test_drain_keepalive.py: a connection that never sent a byte
reads EOF at the drain).

Each twin in-process (tests/test_drain_relay_twins.py's relay and
clients). The order is made by the test: an idle keep-alive connection
beside it reads EOF once the drain was applied, in the same pass that
decided the fresh one's close.
"""

from __future__ import annotations

import time

import pytest

from tests.test_drain_keepalive import GET, WAIT, read_answer, reads_eof
from tests.test_drain_relay_twins import GATEWAY, TWINS, client, keeps, relay_to_backend


@pytest.mark.parametrize("which", TWINS)
def test_a_connection_taken_a_moment_before_the_drain_gets_its_answer(which: str) -> None:
    """A fresh connection (taken, nothing sent) and a keep-alive one idle
    after a request; drain(spread=0): the idle one reads EOF; then the
    fresh one sends its request and is answered 200 saying close, then
    EOF. Before, it was closed with the idle one and read EOF."""
    with relay_to_backend(which) as (relay, _):
        idle = client(relay, GATEWAY)
        assert keeps(idle)
        fresh = client(relay, GATEWAY)
        deadline = time.monotonic() + WAIT
        while relay.stats()["connections"] < 2:  # (taken before the drain is asked)
            assert time.monotonic() < deadline
            time.sleep(0.001)
        relay.drain(inbound_only=True, spread=0.0)
        assert reads_eof(idle)  # (the drain applied: the fresh one decided too)
        fresh.settimeout(WAIT)
        fresh.sendall(GET % b"/")
        status, fields, _ = read_answer(fresh)
        assert (status, fields["connection"]) == (200, ["close"])
        assert reads_eof(fresh)
