"""Reading fault injection: a VirtualService's ``http[].fault`` and a
RouteRule's ``httpFault``.

Both become a :class:`~l4proxy.dataplane.verdict.Fault`, what Envoy's fault
filter does with the route's config as Istio's pilot translates it
(``TranslateFault`` in ``pilot/pkg/networking/core/route/route.go``): a
fixed delay and an abort with an HTTP status, each falling on its own share
of the requests, in parts per million (:data:`FAULT_SCALE`). The relay
draws both per request (see ``Fault``'s docstring).

The VirtualService's ``HTTPFaultInjection``:

* ``delay.fixedDelay``: an Istio duration, at least 1ms, whole
  milliseconds (Istio's validation); ``delay.percentage.value`` (a double,
  0 or 0.0001 to 100) becomes ``uint32(value * 10000)`` parts per million,
  truncated as pilot converts it to Envoy's FractionalPercent with
  denominator MILLION; the deprecated integer ``delay.percent`` (0..100) is
  read when ``percentage`` is absent (pilot's order; both: a warning).
* ``abort.httpStatus``: 200..599 (Envoy's range for its fault filter's
  abort; Istio's validation message says the same), and
  ``abort.percentage`` as the delay's (Istio removed the abort's integer
  ``percent``: refused by name).
* A delay or abort without a percentage falls on **no** request: pilot
  leaves Envoy's percentage unset, which is 0 (istio/istio #36303 and
  #39969: the reference once said "all requests"; the maintainers kept the
  behaviour and called the docs wrong). A warning says so; a share of 0
  written out is taken as meant.
* Refused by name: ``exponentialDelay`` (Envoy has none; Istio's
  validation refuses it too), ``grpcStatus`` and ``http2Error`` (the
  relays speak HTTP/1.1: no gRPC status to send, no stream to reset). A
  fault with neither delay nor abort is an error (Istio's validation).

The RouteRule's ``httpFault`` (Istio 0.7): ``delay: {percent, fixedDelay}``
and ``abort: {percent, httpStatus}``, ``percent`` a number 0..100 of which
Istio 0.7's pilot kept the whole percents (Envoy's v1 fault filter took an
integer: ``int(percent)``, so 0.5 was none; a fraction is a warning) and a
``percent`` of 0 or none made no fault at all (a warning here);
``exponentialDelay``, ``grpcStatus``, ``http2Error`` and
``overrideHeaderName`` are refused by name.
"""

from __future__ import annotations

from typing import Any

from l4proxy.dataplane.verdict import FAULT_SCALE, Fault
from l4proxy.rules._schema import Ctx, dotted, duration, fields, integer, type_name
from l4proxy.rules._yaml import Path

__all__ = ["is_number", "istio_fault", "route_rule_fault"]

# Envoy's FaultAbort.http_status: [200, 600)
MIN_ABORT_STATUS, MAX_ABORT_STATUS = 200, 599
# a percentage's smallest share above 0 (Istio's validatePercentage)
_MIN_PERCENTAGE = 0.0001
_PPM_PER_PERCENT = FAULT_SCALE // 100

_EXPONENTIAL = (
    "Envoy has no exponential delay (Istio refuses it: 'exponentialDelay not supported yet'); "
    "use fixedDelay"
)
_GRPC = "the relays speak HTTP/1.1, where there is no gRPC status to send; use httpStatus"
_HTTP2 = "the relays speak HTTP/1.1, where there is no HTTP/2 stream to reset; use httpStatus"
_OVERRIDE = "the fault comes from the rule, never from a request header"
_NO_SHARE = (
    "falls on no request: without a percentage Istio leaves Envoy's share at 0 "
    "(istio/istio #36303; the reference once said every request)"
)


def istio_fault(ctx: Ctx, value: Any, path: Path) -> tuple[bool, Fault | None]:
    """``http[].fault`` (Istio's HTTPFaultInjection): (valid, the fault);
    None when nothing can ever fall (every share 0)."""
    f = fields(ctx, value, path, allowed=("delay", "abort"))
    if f is None:
        return False, None
    if f.get("delay") is None and f.get("abort") is None:
        ctx.error(path, f"{dotted(path)} must have a delay, an abort or both (Istio's validation)")
        return False, None
    ok = all(k in ("delay", "abort") for k in f)  # (fields() reported the others)
    delay, delay_ppm = 0.0, 0
    if f.get("delay") is not None:
        got = _istio_delay(ctx, f["delay"], (*path, "delay"))
        ok = ok and got is not None
        delay, delay_ppm = got or (0.0, 0)
    status, abort_ppm = 0, 0
    if f.get("abort") is not None:
        got_abort = _istio_abort(ctx, f["abort"], (*path, "abort"))
        ok = ok and got_abort is not None
        status, abort_ppm = got_abort or (0, 0)
    if not ok:
        return False, None
    return True, _fault(delay, delay_ppm, status, abort_ppm)


def _istio_delay(ctx: Ctx, value: Any, path: Path) -> tuple[float, int] | None:
    d = fields(
        ctx,
        value,
        path,
        allowed=("fixedDelay", "percentage", "percent"),
        unimplemented={"exponentialDelay": _EXPONENTIAL},
    )
    if d is None or "exponentialDelay" in d:
        return None
    ok = all(k in ("fixedDelay", "percentage", "percent") for k in d)
    delay: float | None = None
    if d.get("fixedDelay") is None:
        ctx.error(path, f"{dotted((*path, 'fixedDelay'))} is required")
    else:
        delay = duration(ctx, d["fixedDelay"], (*path, "fixedDelay"), zero=False)
    ppm: int | None = 0
    if d.get("percentage") is not None:
        ppm = _percentage(ctx, d["percentage"], (*path, "percentage"))
        if d.get("percent") is not None:
            ctx.warning(
                (*path, "percent"),
                f"{dotted((*path, 'percent'))} is ignored: percentage is given "
                "(Istio reads percentage first; percent is deprecated)",
            )
    elif d.get("percent") is not None:
        pct = integer(ctx, d["percent"], (*path, "percent"), 0, 100)
        ppm = None if pct is None else pct * _PPM_PER_PERCENT
    elif delay is not None:
        ctx.warning(path, f"{dotted(path)} {_NO_SHARE}; add percentage: {{value: 100}}")
    if delay is None or ppm is None or not ok:
        return None
    return delay, ppm


def _istio_abort(ctx: Ctx, value: Any, path: Path) -> tuple[int, int] | None:
    a = fields(
        ctx,
        value,
        path,
        allowed=("httpStatus", "percentage"),
        unimplemented={
            "grpcStatus": _GRPC,
            "http2Error": _HTTP2,
            "percent": "Istio removed the abort's integer percent; use percentage: {value: N}",
        },
    )
    if a is None:
        return None
    if any(k not in ("httpStatus", "percentage") for k in a):
        return None  # (fields() reported them)
    status = _abort_status(ctx, a.get("httpStatus"), path)
    ppm: int | None = 0
    if a.get("percentage") is not None:
        ppm = _percentage(ctx, a["percentage"], (*path, "percentage"))
    elif status is not None:
        ctx.warning(path, f"{dotted(path)} {_NO_SHARE}; add percentage: {{value: 100}}")
    if status is None or ppm is None:
        return None
    return status, ppm


def _abort_status(ctx: Ctx, value: Any, path: Path) -> int | None:
    if value is None:
        ctx.error(path, f"{dotted((*path, 'httpStatus'))} is required")
        return None
    return integer(
        ctx,
        value,
        (*path, "httpStatus"),
        MIN_ABORT_STATUS,
        MAX_ABORT_STATUS,
        what="abort httpStatus",
    )


def _percentage(ctx: Ctx, value: Any, path: Path) -> int | None:
    """Istio's Percent message, ``{value: 0.1}``, as parts per million:
    ``uint32(value * 10000)``, pilot's conversion (Go truncates)."""
    if is_number(value):
        ctx.error(path, f"{dotted(path)} must be a mapping like {{value: {value}}}")
        return None
    p = fields(ctx, value, path, allowed=("value",))
    if p is None or any(k != "value" for k in p):
        return None
    v = p.get("value", 0.0)  # (the message's default)
    vpath = (*path, "value")
    if not is_number(v):
        ctx.error(vpath, f"{dotted(vpath)} must be a number, not {type_name(v)}")
        return None
    if v < 0 or v > 100 or 0 < v < _MIN_PERCENTAGE:
        ctx.error(vpath, f"percentage {v} is neither 0, nor in range 0.0001..100 (Istio's)")
        return None
    return int(float(v) * _PPM_PER_PERCENT)


def route_rule_fault(ctx: Ctx, value: Any, path: Path) -> tuple[bool, Fault | None]:
    """A RouteRule's ``httpFault`` as Istio 0.7's pilot made Envoy's fault
    filter: (valid, the fault); None when nothing can ever fall."""
    f = fields(ctx, value, path, allowed=("delay", "abort"))
    if f is None:
        return False, None
    if f.get("delay") is None and f.get("abort") is None:
        ctx.error(path, f"{dotted(path)} must have a delay, an abort or both")
        return False, None
    ok = all(k in ("delay", "abort") for k in f)
    delay, delay_ppm = 0.0, 0
    if f.get("delay") is not None:
        dpath = (*path, "delay")
        d = fields(
            ctx,
            f["delay"],
            dpath,
            allowed=("percent", "fixedDelay"),
            unimplemented={"exponentialDelay": _EXPONENTIAL, "overrideHeaderName": _OVERRIDE},
        )
        got_delay: float | None = None
        ppm = None
        if d is not None and all(k in ("percent", "fixedDelay") for k in d):
            if d.get("fixedDelay") is None:
                ctx.error(dpath, f"{dotted((*dpath, 'fixedDelay'))} is required")
            else:
                got_delay = duration(ctx, d["fixedDelay"], (*dpath, "fixedDelay"), zero=False)
            ppm = _whole_percent(ctx, d.get("percent"), dpath)
        ok = ok and got_delay is not None and ppm is not None
        delay, delay_ppm = got_delay or 0.0, ppm or 0
    status, abort_ppm = 0, 0
    if f.get("abort") is not None:
        apath = (*path, "abort")
        a = fields(
            ctx,
            f["abort"],
            apath,
            allowed=("percent", "httpStatus"),
            unimplemented={
                "grpcStatus": _GRPC,
                "http2Error": _HTTP2,
                "overrideHeaderName": _OVERRIDE,
            },
        )
        got_status = ppm = None
        if a is not None and all(k in ("percent", "httpStatus") for k in a):
            got_status = _abort_status(ctx, a.get("httpStatus"), apath)
            ppm = _whole_percent(ctx, a.get("percent"), apath)
        ok = ok and got_status is not None and ppm is not None
        status, abort_ppm = got_status or 0, ppm or 0
    if not ok:
        return False, None
    return True, _fault(delay, delay_ppm, status, abort_ppm)


def _whole_percent(ctx: Ctx, value: Any, path: Path) -> int | None:
    """A RouteRule fault's ``percent`` (0..100) as parts per million of
    the whole percents Istio 0.7 kept (``int(percent)``)."""
    ppath = (*path, "percent")
    if value is None:
        ctx.warning(
            path,
            f"{dotted(path)} falls on no request: without a percent Istio 0.7 made no fault "
            "(add percent: 100)",
        )
        return 0
    if not is_number(value):
        ctx.error(ppath, f"{dotted(ppath)} must be a number, not {type_name(value)}")
        return None
    if not 0 <= value <= 100:
        ctx.error(ppath, f"{dotted(ppath)} {value} is not in range 0..100")
        return None
    whole = int(value)
    if whole != value:
        ctx.warning(
            ppath,
            f"{dotted(ppath)} {value}: Istio 0.7 kept the whole percents (Envoy's then took "
            f"an integer), so it falls on {whole}% of the requests",
        )
    return whole * _PPM_PER_PERCENT


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _fault(delay: float, delay_ppm: int, status: int, abort_ppm: int) -> Fault | None:
    """The Fault, each part zeroed where its share is 0 (one spelling for
    one behaviour); None when nothing can fall."""
    if not delay_ppm:
        delay = 0.0
    if not abort_ppm:
        status = 0
    if not delay_ppm and not abort_ppm:
        return None
    return Fault(delay, delay_ppm, status, abort_ppm)
