"""Types of the compiled pump (ext/pump.pyx); the pure twin is l4proxy/dataplane/_pump_py.py.

Both twins have exactly this interface and pass the same tests
(tests/test_pump.py). Counters returned by ``stats()``:

active, accepted, closed, bytes_upstream, bytes_downstream, resets,
idle_timeouts, errors, spliced, buffered, force_closed; and

* ``wakeups``: returns from epoll_wait (a spinning loop shows here);
* ``urgent``: reads that stepped over an urgent mark with recv(), where
  splice() cannot (the urgent byte is relayed inline, as data);
* ``pipes_used`` / ``pipes_free``: splice pipes held by a direction / pooled
  for reuse (their sum never exceeds ``max_pipes``; 2 fds each);
* ``pipe_refusals``: times a direction asked for a pipe and got none
  (``max_pipes`` in use, or pipe2() failed: EMFILE, ENFILE, ENOMEM); it
  relays through recv/send and asks again after another MiB.

``add(..., token=t)`` (t != 0): ``ended()`` returns ``t`` once that
connection has ended, and ``ended_fd`` (an eventfd) is readable while
there are tokens to take; ``ends()`` takes the same, each as ``(t,
bytes_upstream, bytes_downstream, ended)`` (the bytes moved each way, when
it ended on ``time.monotonic()``'s clock).
"""

from types import TracebackType

__all__ = ["Pump"]

class Pump:
    idle_timeout: float
    buffer_size: int
    splice_threshold: int
    max_pipes: int
    def __init__(
        self,
        *,
        idle_timeout: float = 3600.0,
        buffer_size: int = 65536,
        splice_threshold: int = 262144,
        max_pipes: int = 1024,
    ) -> None: ...
    def start(self) -> None: ...
    def add(
        self,
        client_fd: int,
        upstream_fd: int,
        pending_upstream: bytes = b"",
        pending_client: bytes = b"",
        token: int = 0,
    ) -> None: ...
    @property
    def active(self) -> int: ...
    @property
    def ended_fd(self) -> int: ...
    def ended(self) -> list[int]: ...
    def ends(self) -> list[tuple[int, int, int, float]]: ...
    def stats(self) -> dict[str, int]: ...
    def drain(self, timeout: float) -> int: ...
    def close(self) -> None: ...
    def __enter__(self) -> Pump: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...
