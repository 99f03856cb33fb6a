"""Types of the compiled framer (ext/framing.pyx); see l4proxy/dataplane/_framing_py.py.

Everything but BodyFramer is re-exported from the pure twin.
"""

from l4proxy.dataplane._framing_py import Framing as Framing
from l4proxy.dataplane._framing_py import FramingError as FramingError
from l4proxy.dataplane._framing_py import ResponseHead as ResponseHead
from l4proxy.dataplane._framing_py import parse_response_head as parse_response_head
from l4proxy.dataplane._framing_py import request_framing as request_framing
from l4proxy.dataplane._framing_py import response_framing as response_framing

__all__ = [
    "BodyFramer",
    "Framing",
    "FramingError",
    "ResponseHead",
    "parse_response_head",
    "request_framing",
    "response_framing",
]

class BodyFramer:
    error_status: int
    max_trailers: int
    def __init__(
        self, framing: Framing, length: int = 0, error_status: int = 400, max_trailers: int = 65536
    ) -> None: ...
    @property
    def framing(self) -> Framing: ...
    @property
    def done(self) -> bool: ...
    def blind(self) -> int: ...
    def skip(self, n: int) -> None: ...
    def feed(self, data: bytes | bytearray | memoryview) -> int: ...
