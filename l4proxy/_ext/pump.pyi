"""Types of the compiled pump (ext/pump.pyx); the pure twin is l4proxy/_pump_py.py.

Both twins have exactly this interface and pass the same tests
(tests/test_pump.py). Counters returned by ``stats()``:

active, accepted, closed, bytes_upstream, bytes_downstream, resets,
idle_timeouts, errors, spliced, buffered, force_closed.
"""

from types import TracebackType

__all__ = ["Pump"]

class Pump:
    idle_timeout: float
    buffer_size: int
    splice_threshold: int
    def __init__(
        self,
        *,
        idle_timeout: float = 3600.0,
        buffer_size: int = 65536,
        splice_threshold: int = 262144,
    ) -> None: ...
    def start(self) -> None: ...
    def add(
        self,
        client_fd: int,
        upstream_fd: int,
        pending_upstream: bytes = b"",
        pending_client: bytes = b"",
    ) -> None: ...
    @property
    def active(self) -> int: ...
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
