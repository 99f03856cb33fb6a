"""Head edits and route answers: the pure part the route table computes.

A route's ``headers`` (a VirtualService's ``http[].headers``, an HTTPRoute
rule's header modifiers) and its destination's (``http[].route[].headers``,
a backendRef's modifiers) become one :class:`~l4proxy.dataplane.verdict.HeadEdits`
per destination (:func:`compose`), as Envoy applies the two lists Istio
gives it; a redirect's ``location`` is built per request (:func:`location`),
as Envoy's ``RedirectAction`` builds it (``newUri``). Nothing here reads
YAML: the readers (``_networking``, ``_gateway_api``) checked every name and
value (``_header_ops``).
"""

from __future__ import annotations

from typing import Literal

from l4proxy.dataplane.verdict import HeadEdits, PathRewrite

__all__ = ["DEFAULT_PORTS", "FRAMING_HEADERS", "compose", "location", "rewrite_target"]

# Fields that frame a message or are hop-by-hop: the relay frames and
# forwards the bodies itself, so a rule may not change them (HeadEdits)
FRAMING_HEADERS = frozenset(
    {
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "upgrade",
        "trailer",
        "expect",
    }
)
DEFAULT_PORTS = {"http": 80, "https": 443}


def compose(
    first: HeadEdits | None, second: HeadEdits | None, *, one_list: bool
) -> HeadEdits | None:
    """The edits of *first* then *second* as one :class:`HeadEdits` (header
    lists only; ``path`` and ``authority`` are the caller's).

    *one_list*: the two are one Envoy header list, *first*'s entries before
    *second*'s (Istio appends a single destination's headers to its route's):
    every remove goes first, then the sets and adds in order, so a set of
    *second* replaces what *first* set or added under that name, and neither
    removes what the other adds. Otherwise they are two lists applied one
    after the other (a weighted destination's, then its route's: Envoy's
    ``most_specific_header_mutations_wins`` false): *second*'s removes and
    sets also drop what *first* set or added under those names."""
    if first is None or second is None:
        return first if second is None else second
    requests = _compose_side(
        (first.request_set, first.request_add, first.request_remove),
        (second.request_set, second.request_add, second.request_remove),
        one_list,
    )
    responses = _compose_side(
        (first.response_set, first.response_add, first.response_remove),
        (second.response_set, second.response_add, second.response_remove),
        one_list,
    )
    return HeadEdits(*requests, *responses)


_Side = tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...], tuple[str, ...]]


def _compose_side(first: _Side, second: _Side, one_list: bool) -> _Side:
    fs, fa, fr = first
    ss, sa, sr = second
    dropped = {n for n, _ in ss} if one_list else {n for n, _ in ss} | set(sr)
    return (
        (*(h for h in fs if h[0] not in dropped), *ss),
        (*(h for h in fa if h[0] not in dropped), *sa),
        tuple(dict.fromkeys((*fr, *sr))),
    )


def rewrite_target(target: str, rewrite: PathRewrite) -> str:
    """*target* rewritten as :class:`PathRewrite` says the relay rewrites it
    (a redirect's path, built here rather than by the relay)."""
    q = target.find("?")
    path, query = (target, "") if q == -1 else (target[:q], target[q:])
    path = rewrite.prefix if rewrite.strip < 0 else rewrite.prefix + path[rewrite.strip :]
    return (path or "/") + query


def location(
    *,
    target: str,
    host: str,
    scheme: str,
    new_scheme: str | None,
    new_host: str | None,
    new_port: int | None,
    derive: Literal["envoy", "gateway"],
    listener_port: int | None = None,
    path: str | None = None,
    path_rewrite: PathRewrite | None = None,
) -> str:
    """A redirect's ``location`` for a request for *target* with Host *host*
    over *scheme*.

    The path: *path* replaces the request's (Envoy's ``path_redirect``: the
    request's query stays unless *path* has one of its own), or
    *path_rewrite* rewrites it (``prefix_rewrite``), else it stays. The
    host: *new_host*, else the request's Host. The port, *derive*
    ``envoy`` (a VirtualService, as Istio configures Envoy): *new_port*
    replaces the Host's port; without one the Host stays, less its port
    when the scheme changes and the port was the old scheme's default
    (``processRequestHost``). ``gateway`` (an HTTPRoute, the API's rules):
    the port is *new_port*, else the new scheme's well-known port, else
    *listener_port* (the port the request came to; None: the Host's); none
    is written where it is the scheme's default (80 for http, 443 for
    https).

    Without a *host* (a request without Host, whose service has no name
    to give: a gateway listener's) nor a *new_host*, and where neither the
    scheme nor the port changes, the location is the new target alone, a
    relative reference (RFC 9110 10.2.2) the client resolves against the
    URL it asked for; ``http:///path`` names no host."""
    if not host and new_host is None and new_scheme in (None, scheme) and new_port is None:
        return _target_of(target, path, path_rewrite)
    final_scheme = new_scheme or scheme
    new_target = _target_of(target, path, path_rewrite)
    name, port = _split(host)
    if derive == "gateway":
        if new_port is None:
            new_port = DEFAULT_PORTS.get(new_scheme) if new_scheme else listener_port or port
        final_host = new_host if new_host is not None else name
        if new_port is not None and new_port != DEFAULT_PORTS.get(final_scheme):
            final_host += f":{new_port}"
        return f"{final_scheme}://{final_host}{new_target}"
    if new_host is not None:
        final_host = new_host
    elif new_port is not None or (
        port is not None and final_scheme != scheme and port == DEFAULT_PORTS.get(scheme)
    ):
        final_host = name
    else:
        final_host = host
    suffix = f":{new_port}" if new_port is not None else ""
    return f"{final_scheme}://{final_host}{suffix}{new_target}"


def _target_of(target: str, path: str | None, path_rewrite: PathRewrite | None) -> str:
    """A redirect's new target (:func:`location`'s path rule)."""
    if path is not None:
        q = target.find("?")
        return path if "?" in path or q == -1 else path + target[q:]
    if path_rewrite is not None:
        return rewrite_target(target, path_rewrite)
    return target


def _split(host: str) -> tuple[str, int | None]:
    """A Host value as (name, port or None); an IPv6 literal keeps its brackets."""
    end = host.rfind("]:") + 1 if host.startswith("[") else host.rfind(":")
    if end > 0 and host[end + 1 :].isdigit():
        return host[:end], int(host[end + 1 :])
    return host, None
