"""Driving wrk and reading its report.

wrk runs with ``--latency`` so that its report carries the latency
distribution; the text report is the interface (wrk 4.1 as Debian ships it),
parsed strictly: a report without ``Requests/sec`` or the percentiles is an
error, never a zero.

``Connection: close`` is a request header: the server closes after each
response and wrk opens a new connection, so every request pays accept,
(for l4proxy) original destination, peek, route, upstream connect and
hand-off — the per-connection cost the close runs exist to show.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from bench.process import Launcher, on_host

_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_PERCENTILE = re.compile(r"^\s*(\d+(?:\.\d+)?)%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.M)
_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)\s*$", re.M)
_TOTAL = re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h),", re.M)
_SOCKET_ERRORS = re.compile(
    r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", re.M
)
_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)", re.M)


class WrkError(RuntimeError):
    pass


@dataclass(frozen=True)
class WrkResult:
    requests: int
    duration_s: float
    rps: float
    latency_ms: dict[str, float]  # "50", "75", "90", "99" -> milliseconds
    socket_errors: dict[str, int] = field(default_factory=dict)
    non_2xx: int = 0

    @property
    def p50_ms(self) -> float:
        return self.latency_ms["50"]

    @property
    def p99_ms(self) -> float:
        return self.latency_ms["99"]

    @property
    def errors(self) -> int:
        return sum(self.socket_errors.values()) + self.non_2xx

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _ms(value: str, unit: str) -> float:
    return float(value) * _UNITS_MS[unit]


def parse(text: str) -> WrkResult:
    """Read a ``wrk --latency`` report."""
    rps = _RPS.search(text)
    total = _TOTAL.search(text)
    if rps is None or total is None:
        raise WrkError(f"not a wrk report (no Requests/sec or request count):\n{text[-2000:]}")
    latency = {
        p.rstrip("0").rstrip(".") if "." in p else p: _ms(v, u)
        for p, v, u in _PERCENTILE.findall(text)
    }
    if "50" not in latency or "99" not in latency:
        raise WrkError(f"wrk report has no latency distribution (run with --latency):\n{text}")
    errors: dict[str, int] = {}
    m = _SOCKET_ERRORS.search(text)
    if m:
        errors = dict(
            zip(("connect", "read", "write", "timeout"), map(int, m.groups()), strict=True)
        )
    non_2xx = _NON_2XX.search(text)
    return WrkResult(
        requests=int(total.group(1)),
        duration_s=_ms(total.group(2), total.group(3)) / 1000.0,
        rps=float(rps.group(1)),
        latency_ms=latency,
        socket_errors=errors,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
    )


BODIES = ("none", "length", "chunked")


def command(
    url: str,
    connections: int,
    duration_s: float,
    close: bool = False,
    threads: int = 1,
    timeout_s: float = 5.0,
    paths: int = 1,
    body: str = "none",
) -> list[str]:
    """The wrk argv for one measurement.

    *paths* > 1: each connection cycles through that many distinct request
    targets (``/item/<i>?q=<i>``), as real traffic with ids in its paths does,
    instead of asking for the URL's path every time. *body*: GETs
    (``none``), or POSTs of 5 bytes framed by Content-Length (``length``) or
    chunked (``chunked``). (Not ``Expect: 100-continue``: wrk would count the
    server's 100 as the answer.)
    """
    argv = [
        "wrk",
        f"--threads={min(threads, connections)}",
        f"--connections={connections}",
        f"--duration={max(1, round(duration_s))}s",
        f"--timeout={max(1, round(timeout_s))}s",
        "--latency",
    ]
    if close:
        argv += ["--header=Connection: close"]
    if paths > 1 or body != "none":
        argv += [f"--script={request_script(paths, body)}"]
    return [*argv, url]


_LUA_REQUEST = {
    "none": "wrk.format(nil, path)",
    "length": 'wrk.format("POST", path, nil, "hello")',
    "chunked": "chunked(path)",
}

_LUA_HELPERS = """\
local function chunked(path)
  local s = {"POST " .. path .. " HTTP/1.1", "Host: " .. (wrk.headers["Host"] or wrk.host)}
  for k, v in pairs(wrk.headers) do
    if k ~= "Host" then s[#s + 1] = k .. ": " .. v end
  end
  s[#s + 1] = "Transfer-Encoding: chunked"
  return table.concat(s, "\\r\\n") .. "\\r\\n\\r\\n5\\r\\nhello\\r\\n0\\r\\n\\r\\n"
end
"""


def request_script(paths: int, body: str = "none") -> str:
    """A wrk Lua script for *paths* targets and *body* (see :func:`command`),
    in a file any uid can read (wrk in a pod runs as uid 1000)."""
    if body not in BODIES:
        raise ValueError(f"body: one of {', '.join(BODIES)}, not {body!r}")
    path = os.path.join(tempfile.gettempdir(), f"l4proxy-bench-{paths}-{body}.lua")
    target = (
        f'  n = n % {paths} + 1\n  local path = "/item/" .. n .. "?q=" .. n\n'
        if paths > 1
        else "  local path = wrk.path\n"
    )
    text = (
        _LUA_HELPERS
        + "local n = 0\n"
        + "request = function()\n"
        + target
        + f"  return {_LUA_REQUEST[body]}\n"
        + "end\n"
    )
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o644)
    return path


def run(argv: Sequence[str], launcher: Launcher = on_host, grace_s: float = 30.0) -> WrkResult:
    """Run wrk (through *launcher*: a pod, a uid) and parse its report."""
    full = launcher(argv)
    duration = next((a for a in argv if a.startswith("--duration=")), "--duration=10s")
    limit = float(duration.split("=")[1].rstrip("s")) + grace_s
    try:
        done = subprocess.run(full, capture_output=True, text=True, timeout=limit, check=False)
    except subprocess.TimeoutExpired as exc:
        raise WrkError(f"wrk did not finish within {limit:.0f}s: {' '.join(full)}") from exc
    if done.returncode != 0:
        raise WrkError(f"wrk exited {done.returncode}: {' '.join(full)}\n{done.stderr[-2000:]}")
    return parse(done.stdout)
