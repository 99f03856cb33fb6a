"""Types of the compiled head parser (ext/peek.pyx); see l4proxy/dataplane/_peek_py.py.

The exception classes and RequestHead are re-exported from the pure twin:
both twins raise and return the very same types.
"""

from l4proxy.dataplane._peek_py import HeadError as HeadError
from l4proxy.dataplane._peek_py import NotHTTP as NotHTTP
from l4proxy.dataplane._peek_py import RequestHead as RequestHead

__all__ = ["HeadError", "HeadParser", "NotHTTP", "RequestHead", "parse_head"]

class HeadParser:
    def __init__(self, max_head: int = 65536) -> None: ...
    @property
    def buffered(self) -> bytes: ...
    @property
    def steps(self) -> int: ...
    def feed(self, data: bytes) -> RequestHead | None: ...

def parse_head(data: bytes, max_head: int = 65536) -> RequestHead | None: ...
