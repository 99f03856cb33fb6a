"""Types of the compiled per-request relay (ext/relay.pyx); see l4proxy/dataplane/relay.py.

The interface of l4proxy.dataplane._relay_py.HttpRelay, plus what the
compiled loop needs: verdicts (resolve), aggregated reports (report_rows).
"""

from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from socket import socket
from typing import Any

from l4proxy.dataplane._peek_py import RequestHead
from l4proxy.dataplane._pool_py import EndpointSettings, PoolOptions
from l4proxy.dataplane._relay_py import Decision as Decision
from l4proxy.dataplane._relay_py import HttpRelay as PureRelay
from l4proxy.dataplane.verdict import Verdict

__all__ = ["Decision", "HttpRelay"]

Endpoint = tuple[str, int]
Row = tuple[Any, int, int, float, tuple[int, ...]]

class _Pools:
    def active(self, endpoint: Endpoint) -> int: ...
    def snapshot(self) -> dict[Endpoint, tuple[int, int]]: ...

class HttpRelay:
    connect_failed: Callable[[Endpoint, Any, str], None] | None
    response_failed: Callable[[Endpoint, Any, str], None] | None
    answered: Callable[[Endpoint, Any], None] | None
    answered_5xx: Callable[[Endpoint, Any, int], None] | None
    @property
    def slow(self) -> PureRelay: ...
    @property
    def pools(self) -> _Pools: ...
    def __init__(
        self,
        decide: Callable[[RequestHead, Any], Decision],
        l4: Callable[[socket, socket | None, bytes, bytes, Any, Endpoint | None], None],
        pool: PoolOptions | None = None,
        connect_timeout: float = 5.0,
        header_timeout: float = 10.0,
        idle_timeout: float = 300.0,
        report: Callable[[Any, int, float], None] | None = None,
        connect_failed: Callable[[Endpoint, Any, str], None] | None = None,
        response_failed: Callable[[Endpoint, Any, str], None] | None = None,
        answered: Callable[[Endpoint, Any], None] | None = None,
        refused: Callable[[str], None] | None = None,
        *,
        answered_5xx: Callable[[Endpoint, Any, int], None] | None = None,
        resolve: Callable[[RequestHead, Any], Verdict] | None = None,
        report_rows: Callable[[list[tuple[Any, int]], list[Row]], None] | None = None,
        accepted: Callable[[socket, int], None] | None = None,
        classify_origin: Callable[[str, int], tuple[bool, Any]] | None = None,
        accepts: Callable[[int, int], None] | None = None,
        max_connections: int = 0,
        key_headers: Iterable[str] = (),
        buckets: Sequence[float] = (),
        seed: Hashable | None = None,
        max_head: int = 65536,
    ) -> None: ...
    def start(self) -> None: ...
    def add(self, sock: socket, origin: Any, data: bytes = b"", requests: int = 0) -> None: ...
    def invalidate(self, key_headers: Iterable[str] | None = None) -> None: ...
    def report_next_successes(self) -> None: ...
    def retain_endpoints(self, endpoints: Iterable[Endpoint]) -> None: ...
    def endpoint_settings(self, settings: Mapping[Endpoint, EndpointSettings]) -> None: ...
    def close(self) -> None: ...
    def active(self) -> int: ...
    def stats(self) -> dict[str, int]: ...
    def add_external(self, endpoint: Endpoint, n: int) -> None: ...
    def pool_active(self, endpoint: Endpoint) -> int: ...
    def pool_snapshot(self) -> dict[Endpoint, tuple[int, int]]: ...
    def overflows(self) -> dict[Endpoint, int]: ...
    def pending(self) -> dict[Endpoint, int]: ...
    def flush_reports(self, timeout: float = 0.5) -> None: ...
    def listen(
        self, fd: int, index: int, gateway: bool = False, gateway_origin: Any = None
    ) -> None: ...
    def unlisten(self, index: int, timeout: float = 2.0) -> None: ...
    def set_external_active(self, n: int) -> None: ...
    def last_accept(self) -> float: ...
