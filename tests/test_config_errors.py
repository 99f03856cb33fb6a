"""Every error the loader reports: the message, the file and the line.

Each case is a small rule file loaded next to the bootcamp registry
(tests/data/rules/registry.yaml: 2 v1 pods, 1 v2 pod). The expected line is
where a user should look; the message must say what to do.
"""

from __future__ import annotations

import os
import shutil
import textwrap
import threading
from pathlib import Path

import pytest

from l4proxy.rules import ConfigError, ConfigUnreadable, Diagnostic, load_rules

DATA = os.path.join(os.path.dirname(__file__), "data", "rules")
REGISTRY = os.path.join(DATA, "registry.yaml")


def errors_of(tmp_path: Path, text: str, *, registry: bool = True) -> list[Diagnostic]:
    f = tmp_path / "rules.yaml"
    f.write_text(textwrap.dedent(text))
    paths = [str(f), REGISTRY] if registry else [str(f)]
    with pytest.raises(ConfigError) as info:
        load_rules(paths)
    assert not isinstance(info.value, ConfigUnreadable)
    errs = info.value.errors
    assert errs, "ConfigError without an error diagnostic"
    return errs


RR = """\
apiVersion: config.istio.io/v1alpha2
kind: RouteRule
metadata:
  name: bootcamp-default
spec:
"""


def _cookie_regex(regex: str) -> str:
    """A RouteRule matching the cookie header by *regex* (on line 11)."""
    match = "  match:\n    request:\n      headers:\n        cookie:\n"
    return RR + "  destination: {name: bootcamp}\n" + match + f'          regex: "{regex}"\n'


VS = """\
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata:
  name: bootcamp
spec:
  hosts: [bootcamp]
"""

DR = """\
---
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata:
  name: bootcamp
spec:
  host: bootcamp
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"""

CASES = [
    (
        "weights total 90",
        RR
        + """\
  destination:
    name: bootcamp
  route:
  - labels: {version: v1}
    weight: 40
  - labels: {version: v2}
    weight: 50
""",
        "RouteRule bootcamp-default: route weights total 90 (must total 100)",
        8,
    ),
    (
        "weight out of range",
        RR
        + """\
  destination:
    name: bootcamp
  route:
  - labels: {version: v1}
    weight: 150
  - labels: {version: v2}
    weight: -50
""",
        "weight 150 is not in range 0..100",
        10,
    ),
    (
        "single weight not 100",
        RR
        + """\
  destination: {name: bootcamp}
  route:
  - labels: {version: v1}
    weight: 60
""",
        "route weights total 60 (must total 100)",
        7,
    ),
    (
        "weight not an integer",
        VS
        + """\
  http:
  - route:
    - destination: {host: bootcamp, subset: v1}
      weight: "50"
    - destination: {host: bootcamp, subset: v2}
      weight: 50
"""
        + DR,
        "weight must be an integer, not the string '50'",
        10,
    ),
    (
        # (relative weights since Istio 1.15: any total above 0 is fine)
        "VirtualService weights total 0",
        VS
        + """\
  http:
  - route:
    - destination: {host: bootcamp, subset: v1}
      weight: 0
    - destination: {host: bootcamp, subset: v2}
"""
        + DR,
        "route weights total 0: at least one destination needs a weight above 0",
        8,
    ),
    (
        "unknown subset",
        VS
        + """\
  http:
  - route:
    - destination: {host: bootcamp, subset: v3}
"""
        + DR,
        "subset v3 is not defined by DestinationRule bootcamp for host "
        "bootcamp.default.svc.cluster.local (it defines: v1, v2)",
        9,
    ),
    (
        "subset without any DestinationRule",
        VS
        + """\
  http:
  - route:
    - destination: {host: bootcamp, subset: v1}
""",
        "subset v1 is not defined: no DestinationRule for host bootcamp.default.svc.cluster.local",
        9,
    ),
    (
        "DestinationRule subset selects no endpoint",
        VS
        + """\
  http:
  - route:
    - destination: {host: bootcamp, subset: v1}
---
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata:
  name: bootcamp
spec:
  host: bootcamp
  subsets:
  - name: v1
    labels: {version: v1}
  - name: canary
    labels: {version: v3}
""",
        "subset canary (version=v3) selects no endpoint of bootcamp.default.svc.cluster.local "
        "(its endpoints have: app=bootcamp,version=v1; app=bootcamp,version=v2)",
        20,
    ),
    (
        "RouteRule labels select no endpoint",
        RR
        + """\
  destination: {name: bootcamp}
  route:
  - labels:
      version: v3
""",
        "route labels version=v3 select no endpoint of bootcamp.default.svc.cluster.local",
        8,
    ),
    (
        "bad regex",
        _cookie_regex("^(.*?;)?(user=jason(;.*)?$"),
        "regex '^(.*?;)?(user=jason(;.*)?$' in spec.match.request.headers.cookie is invalid",
        11,
    ),
    (
        "a host with a port (VirtualService)",
        VS.replace("hosts: [bootcamp]", "hosts: ['bootcamp:8080']")
        + "  http:\n  - route:\n    - destination: {host: bootcamp}\n",
        "host 'bootcamp:8080' must be a DNS name (no port: 'bootcamp')",
        6,
    ),
    (
        "a host with a port (Ingress)",
        "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: shop}\nspec:\n"
        "  rules:\n  - host: shop.example.com:80\n    http:\n      paths:\n"
        "      - {path: /, pathType: Prefix, backend: {service: {name: bootcamp, "
        "port: {number: 8080}}}}\n",
        "host 'shop.example.com:80' must be a DNS name (no port: 'shop.example.com')",
        6,
    ),
    (
        "a lookahead, which RE2 (Envoy) has not",
        _cookie_regex("(?=.*user=jason).*"),
        "is invalid: invalid perl operator: (?= (rules use RE2's syntax, as Envoy does)",
        11,
    ),
    (
        "a backreference (VirtualService)",
        VS
        + """\
  http:
  - match:
    - uri:
        regex: "/(a)/\\\\1"
    route:
    - destination: {host: bootcamp}
""",
        "invalid escape sequence: \\1",
        10,
    ),
    (
        "a regex past Envoy's program size",
        VS
        + """\
  http:
  - match:
    - uri:
        regex: "/x{200}"
    route:
    - destination: {host: bootcamp}
""",
        "its program is too large (205 > 100, Envoy's limit)",
        10,
    ),
    (
        "uppercase header name (RouteRule)",
        RR
        + """\
  destination: {name: bootcamp}
  match:
    request:
      headers:
        X-User: {exact: jason}
""",
        "header name X-User must be in lower case",
        10,
    ),
    (
        "uppercase header name (VirtualService)",
        VS
        + """\
  http:
  - match:
    - headers:
        End-User: {exact: jason}
    route:
    - destination: {host: bootcamp}
""",
        "header name End-User must be in lower case",
        10,
    ),
    (
        # lowercase, so it passed; the compiled relay's key headers are ASCII
        "non-ASCII header name (VirtualService)",
        VS
        + """\
  http:
  - match:
    - headers:
        x-caf\u00e9: {exact: jason}
    route:
    - destination: {host: bootcamp}
""",
        "header name 'x-caf\u00e9' is not an HTTP field name",
        10,
    ),
    (
        "header name with a space (RouteRule)",
        RR
        + """\
  destination: {name: bootcamp}
  match:
    request:
      headers:
        "x user": {exact: jason}
""",
        "header name 'x user' is not an HTTP field name",
        10,
    ),
    (
        "empty RouteRule destination",
        RR
        + """\
  destination: {}
  route:
  - labels: {version: v1}
""",
        "spec.destination must not be empty",
        6,
    ),
    (
        "missing RouteRule destination",
        RR
        + """\
  route:
  - labels: {version: v1}
""",
        "spec.destination is required",
        5,
    ),
    (
        "empty VirtualService destination",
        VS
        + """\
  http:
  - route:
    - destination: {}
""",
        "spec.http[0].route[0].destination must not be empty",
        9,
    ),
    (
        "VirtualService destination without host",
        VS
        + """\
  http:
  - route:
    - destination:
        subset: v1
"""
        + DR,
        "spec.http[0].route[0].destination.host is required",
        9,
    ),
    (
        "RouteRule destination labels",
        RR
        + """\
  destination:
    name: bootcamp
    labels: {version: v1}
""",
        "route rule destination labels must be empty",
        8,
    ),
    (
        "route and redirect (RouteRule)",
        RR
        + """\
  destination: {name: bootcamp}
  route:
  - labels: {version: v1}
  redirect:
    uri: /v1/bootcamp
""",
        "rule cannot contain both route and redirect",
        9,
    ),
    (
        "route and redirect (VirtualService)",
        VS
        + """\
  http:
  - route:
    - destination: {host: bootcamp}
    redirect:
      uri: /elsewhere
""",
        "rule cannot contain both route and redirect",
        10,
    ),
    (
        "unimplemented RouteRule field",
        RR
        + """\
  destination: {name: bootcamp}
  l4Fault:
    terminate: {percent: 10}
""",
        "spec.l4Fault is not implemented by l4proxy",
        7,
    ),
    (
        "RouteRule retries attempts negative",
        RR
        + """\
  destination: {name: bootcamp}
  httpReqRetries:
    simpleRetry:
      attempts: -1
      perTryTimeout: 2s
""",
        "spec.httpReqRetries.simpleRetry.attempts -1 is not in range 0..2147483647",
        9,
    ),
    (
        "RouteRule retries attempts a string",
        RR
        + """\
  destination: {name: bootcamp}
  httpReqRetries:
    simpleRetry:
      attempts: "3"
      perTryTimeout: 2s
""",
        "spec.httpReqRetries.simpleRetry.attempts must be an integer, not the string '3'",
        9,
    ),
    (
        "RouteRule retries without perTryTimeout (Istio 0.7: a nil duration)",
        RR
        + """\
  destination: {name: bootcamp}
  httpReqRetries:
    simpleRetry:
      attempts: 3
""",
        "spec.httpReqRetries.simpleRetry.perTryTimeout is required",
        8,
    ),
    (
        "RouteRule retries perTryTimeout of zero",
        RR
        + """\
  destination: {name: bootcamp}
  httpReqRetries:
    simpleRetry:
      attempts: 3
      perTryTimeout: 0s
""",
        "spec.httpReqRetries.simpleRetry.perTryTimeout '0s' must be whole milliseconds from 1ms",
        10,
    ),
    (
        "RouteRule retries perTryTimeout without a unit",
        RR
        + """\
  destination: {name: bootcamp}
  httpReqRetries:
    simpleRetry:
      attempts: 3
      perTryTimeout: "2"
""",
        "spec.httpReqRetries.simpleRetry.perTryTimeout '2' is not a duration "
        "(write it like '5s', '0.5s' or '250ms')",
        10,
    ),
    (
        "RouteRule retries without simpleRetry",
        RR
        + """\
  destination: {name: bootcamp}
  httpReqRetries: {}
""",
        "spec.httpReqRetries.simpleRetry is required "
        "(simpleRetry: {attempts: 3, perTryTimeout: 2s})",
        7,
    ),
    (
        "RouteRule retries written the v1alpha3 way",
        RR
        + """\
  destination: {name: bootcamp}
  httpReqRetries:
    attempts: 3
""",
        "unknown field spec.httpReqRetries.attempts (expected one of: simpleRetry)",
        8,
    ),
    (
        "RouteRule retries a string",
        RR
        + """\
  destination: {name: bootcamp}
  httpReqRetries: "3"
""",
        "spec.httpReqRetries must be a mapping: httpReqRetries: "
        "{simpleRetry: {attempts: 3, perTryTimeout: 2s}}",
        7,
    ),
    (
        "RouteRule simpleRetry with attempts misspelt",
        RR
        + """\
  destination: {name: bootcamp}
  httpReqRetries:
    simpleRetry:
      attemps: 3
      perTryTimeout: 2s
""",
        "unknown field spec.httpReqRetries.simpleRetry.attemps "
        "(expected one of: attempts, perTryTimeout)",
        9,
    ),
    (
        "RouteRule retries from a request header",
        RR
        + """\
  destination: {name: bootcamp}
  httpReqRetries:
    simpleRetry:
      attempts: 3
      perTryTimeout: 2s
      overrideHeaderName: x-retries
""",
        "spec.httpReqRetries.simpleRetry.overrideHeaderName is not implemented by l4proxy; "
        "remove it (the sidecar would not honour it); "
        "the attempts come from the rule, never from a request header",
        11,
    ),
    (
        "RouteRule custom retry policy",
        RR
        + """\
  destination: {name: bootcamp}
  httpReqRetries:
    custom: {"@type": type.googleapis.com/x}
""",
        "spec.httpReqRetries.custom is not implemented by l4proxy; remove it (the sidecar "
        "would not honour it); use simpleRetry",
        8,
    ),
    (
        "RouteRule timeout without a unit",
        RR
        + """\
  destination: {name: bootcamp}
  httpReqTimeout:
    simpleTimeout:
      timeout: "5"
""",
        "spec.httpReqTimeout.simpleTimeout.timeout '5' is not a duration "
        "(write it like '5s', '0.5s' or '250ms')",
        9,
    ),
    (
        "RouteRule timeout a number",
        RR
        + """\
  destination: {name: bootcamp}
  httpReqTimeout:
    simpleTimeout:
      timeout: 5
""",
        "spec.httpReqTimeout.simpleTimeout.timeout must be a duration string like "
        "'5s', '0.5s' or '250ms', not the number 5",
        9,
    ),
    (
        "RouteRule timeout of zero (Istio 0.7: greater than 1ms)",
        RR
        + """\
  destination: {name: bootcamp}
  httpReqTimeout:
    simpleTimeout:
      timeout: 0s
""",
        "spec.httpReqTimeout.simpleTimeout.timeout '0s' must be whole milliseconds from 1ms",
        9,
    ),
    (
        "RouteRule timeout finer than milliseconds",
        RR
        + """\
  destination: {name: bootcamp}
  httpReqTimeout:
    simpleTimeout:
      timeout: 1500us
""",
        "spec.httpReqTimeout.simpleTimeout.timeout '1500us' must be whole milliseconds from 1ms",
        9,
    ),
    (
        "RouteRule timeout without simpleTimeout",
        RR
        + """\
  destination: {name: bootcamp}
  httpReqTimeout: {}
""",
        "spec.httpReqTimeout.simpleTimeout is required (simpleTimeout: {timeout: 10s})",
        7,
    ),
    (
        "RouteRule timeout written the v1alpha3 way",
        RR
        + """\
  destination: {name: bootcamp}
  httpReqTimeout: 5s
""",
        "spec.httpReqTimeout must be a mapping: httpReqTimeout: {simpleTimeout: {timeout: 5s}}",
        7,
    ),
    (
        "RouteRule simpleTimeout with its timeout misspelt",
        RR
        + """\
  destination: {name: bootcamp}
  httpReqTimeout:
    simpleTimeout:
      timeOut: 1s
""",
        "unknown field spec.httpReqTimeout.simpleTimeout.timeOut (expected one of: timeout)",
        9,
    ),
    (
        "RouteRule timeout from a request header",
        RR
        + """\
  destination: {name: bootcamp}
  httpReqTimeout:
    simpleTimeout:
      timeout: 1s
      overrideHeaderName: x-timeout
""",
        "spec.httpReqTimeout.simpleTimeout.overrideHeaderName is not implemented by l4proxy",
        10,
    ),
    (
        "RouteRule custom timeout policy",
        RR
        + """\
  destination: {name: bootcamp}
  httpReqTimeout:
    custom: {"@type": type.googleapis.com/x}
""",
        "spec.httpReqTimeout.custom is not implemented by l4proxy",
        8,
    ),
    (
        "unimplemented VirtualService field",
        VS
        + """\
  http:
  - route:
    - destination: {host: bootcamp}
    websocketUpgrade: true
""",
        "spec.http[0].websocketUpgrade is not implemented by l4proxy",
        10,
    ),
    (
        "retries attempts negative",
        VS
        + """\
  http:
  - route:
    - destination: {host: bootcamp}
    retries: {attempts: -1}
""",
        "spec.http[0].retries.attempts -1 is not in range 0..2147483647",
        10,
    ),
    (
        "retries attempts a string",
        VS
        + """\
  http:
  - route:
    - destination: {host: bootcamp}
    retries:
      attempts: "3"
""",
        "spec.http[0].retries.attempts must be an integer, not the string '3'",
        11,
    ),
    (
        "retries perTryTimeout without a unit",
        VS
        + """\
  http:
  - route:
    - destination: {host: bootcamp}
    retries:
      attempts: 2
      perTryTimeout: "2"
""",
        "spec.http[0].retries.perTryTimeout '2' is not a duration "
        "(write it like '5s', '0.5s' or '250ms')",
        12,
    ),
    (
        "retries perTryTimeout of zero",
        VS
        + """\
  http:
  - route:
    - destination: {host: bootcamp}
    retries:
      attempts: 2
      perTryTimeout: 0s
""",
        "spec.http[0].retries.perTryTimeout '0s' must be whole milliseconds from 1ms",
        12,
    ),
    (
        "retries retryOn unknown policy",
        VS
        + """\
  http:
  - route:
    - destination: {host: bootcamp}
    retries:
      attempts: 2
      retryOn: 5xx,gateway-eror
""",
        "spec.http[0].retries.retryOn: 'gateway-eror' is not a retry policy "
        "(expected status codes or: 5xx, gateway-error,",
        12,
    ),
    (
        "retries retryOn status code out of range",
        VS
        + """\
  http:
  - route:
    - destination: {host: bootcamp}
    retries:
      attempts: 2
      retryOn: "5xx,99"
""",
        "spec.http[0].retries.retryOn: '99' is not an HTTP status code Istio knows "
        "(100..511, as Go's net/http names them)",
        12,
    ),
    (
        "retries retryOn a code Go does not name",
        VS
        + """\
  http:
  - route:
    - destination: {host: bootcamp}
    retries:
      attempts: 2
      retryOn: "5xx,599"
""",
        "spec.http[0].retries.retryOn: '599' is not an HTTP status code Istio knows",
        12,
    ),
    (
        "retries retryOn a comma too many",
        VS
        + """\
  http:
  - route:
    - destination: {host: bootcamp}
    retries:
      attempts: 2
      retryOn: "5xx,reset,"
""",
        "spec.http[0].retries.retryOn: '5xx,reset,' has an empty policy (a comma too many; "
        "Istio refuses it)",
        12,
    ),
    (
        "retries retryOn with spaces",
        VS
        + """\
  http:
  - route:
    - destination: {host: bootcamp}
    retries:
      attempts: 2
      retryOn: 5xx, reset
""",
        "spec.http[0].retries.retryOn: ' reset' has spaces around it (Istio refuses it: "
        "write the list without spaces, like '5xx,reset')",
        12,
    ),
    (
        "retries retryOn a list",
        VS
        + """\
  http:
  - route:
    - destination: {host: bootcamp}
    retries:
      attempts: 2
      retryOn: [5xx]
""",
        "spec.http[0].retries.retryOn must be a string like '5xx,reset', not a list",
        12,
    ),
    (
        "retries field misspelt",
        VS
        + """\
  http:
  - route:
    - destination: {host: bootcamp}
    retries:
      attempts: 2
      retryon: 5xx
""",
        "unknown field spec.http[0].retries.retryon (expected one of: attempts, backoff, "
        "perTryTimeout, retryIgnorePreviousHosts, retryOn, retryRemoteLocalities)",
        12,
    ),
    (
        "retries backoff not a duration",
        VS
        + """\
  http:
  - route:
    - destination: {host: bootcamp}
    retries:
      attempts: 2
      backoff: 1 second
""",
        "spec.http[0].retries.backoff '1 second' is not a duration "
        "(write it like '5s', '0.5s' or '250ms')",
        12,
    ),
    (
        "retries backoff a number",
        VS
        + """\
  http:
  - route:
    - destination: {host: bootcamp}
    retries:
      attempts: 2
      backoff: 100
""",
        "spec.http[0].retries.backoff must be a duration string like '5s', '0.5s' or '250ms', "
        "not the number 100",
        12,
    ),
    (
        # Envoy's base_interval must be above 0 (Istio: at least 1ms)
        "retries backoff zero",
        VS
        + """\
  http:
  - route:
    - destination: {host: bootcamp}
    retries:
      attempts: 2
      backoff: 0s
""",
        "spec.http[0].retries.backoff '0s' must be whole milliseconds from 1ms to",
        12,
    ),
    (
        "retries backoff negative",
        VS
        + """\
  http:
  - route:
    - destination: {host: bootcamp}
    retries:
      attempts: 2
      backoff: -25ms
""",
        "spec.http[0].retries.backoff '-25ms' is not a duration",
        12,
    ),
    (
        "retries retryRemoteLocalities not a bool",
        VS
        + """\
  http:
  - route:
    - destination: {host: bootcamp}
    retries:
      attempts: 2
      retryRemoteLocalities: "yes"
""",
        "spec.http[0].retries.retryRemoteLocalities must be true or false, not the string 'yes'",
        12,
    ),
    (
        "retries retryIgnorePreviousHosts not a bool",
        VS
        + """\
  http:
  - route:
    - destination: {host: bootcamp}
    retries:
      attempts: 2
      retryIgnorePreviousHosts: "false"
""",
        "spec.http[0].retries.retryIgnorePreviousHosts must be true or false, "
        "not the string 'false'",
        12,
    ),
    (
        "retries retryIgnorePreviousHosts a number",
        VS
        + """\
  http:
  - route:
    - destination: {host: bootcamp}
    retries:
      attempts: 2
      retryIgnorePreviousHosts: 0
""",
        "spec.http[0].retries.retryIgnorePreviousHosts must be true or false, not the number 0",
        12,
    ),
    (
        "timeout without a unit",
        VS
        + """\
  http:
  - route:
    - destination: {host: bootcamp}
    timeout: "5"
""",
        "spec.http[0].timeout '5' is not a duration (write it like '5s', '0.5s' or '250ms')",
        10,
    ),
    (
        "timeout a number",
        VS
        + """\
  http:
  - route:
    - destination: {host: bootcamp}
    timeout: 5
""",
        "spec.http[0].timeout must be a duration string like '5s', '0.5s' or '250ms', "
        "not the number 5",
        10,
    ),
    (
        "timeout negative",
        VS
        + """\
  http:
  - route:
    - destination: {host: bootcamp}
    timeout: -1s
""",
        "spec.http[0].timeout '-1s' is not a duration",
        10,
    ),
    (
        "timeout an unknown unit",
        VS
        + """\
  http:
  - route:
    - destination: {host: bootcamp}
    timeout: 5d
""",
        "spec.http[0].timeout '5d' is not a duration",
        10,
    ),
    (
        "timeout under a millisecond",
        VS
        + """\
  http:
  - route:
    - destination: {host: bootcamp}
    timeout: 500us
""",
        "spec.http[0].timeout '500us' must be 0 (no timeout) or whole milliseconds",
        10,
    ),
    (
        "timeout finer than milliseconds",
        VS
        + """\
  http:
  - route:
    - destination: {host: bootcamp}
    timeout: 1.0005s
""",
        "spec.http[0].timeout '1.0005s' must be 0 (no timeout) or whole milliseconds",
        10,
    ),
    (
        "unimplemented DestinationRule field",
        """\
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata: {name: bootcamp}
spec:
  host: bootcamp
  trafficPolicy:
    connectionPool:
      tcp: {tcpKeepalive: {time: 7200s}}
""",
        "spec.trafficPolicy.connectionPool.tcp.tcpKeepalive is not implemented by l4proxy",
        8,
    ),
    (
        "unknown field is a probable typo",
        RR
        + """\
  destination: {name: bootcamp}
  rout:
  - labels: {version: v1}
""",
        "unknown field spec.rout (expected one of: corsPolicy, destination, httpFault, "
        "httpReqRetries, httpReqTimeout, match, mirror, precedence, route)",
        7,
    ),
    (
        "source by name",
        RR
        + """\
  destination: {name: bootcamp}
  match:
    source: {name: client}
""",
        "spec.match.source.name is not implemented by l4proxy",
        8,
    ),
    (
        "label value not a string",
        RR
        + """\
  destination: {name: bootcamp}
  route:
  - labels: {version: 1}
""",
        "label version in spec.route[0].labels must be a string, not the number 1 "
        '(quote it: version: "1")',
        8,
    ),
    (
        "label value true, not a string",
        RR
        + """\
  destination: {name: bootcamp}
  route:
  - labels: {canary: true}
""",
        # (the hint as YAML spells it: it said "True", Python's)
        "label canary in spec.route[0].labels must be a string, not the boolean true "
        '(quote it: canary: "true")',
        8,
    ),
    (
        "label value null, not a string",
        RR
        + """\
  destination: {name: bootcamp}
  route:
  - labels: {canary: null}
""",
        # (it said "None")
        'label canary in spec.route[0].labels must be a string, not null (quote it: canary: "")',
        8,
    ),
    (
        "unknown load balancer",
        """\
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata: {name: bootcamp}
spec:
  host: bootcamp
  trafficPolicy:
    loadBalancer: {simple: FASTEST}
""",
        "load balancer FASTEST is not known; simple takes ROUND_ROBIN, LEAST_REQUEST, RANDOM, "
        "UNSPECIFIED (the default, ROUND_ROBIN here) and LEAST_CONN (LEAST_REQUEST's deprecated "
        "name), or use a consistentHash",
        7,
    ),
    (
        "unknown kind",
        """\
apiVersion: cert-manager.io/v1
kind: Certificate
metadata: {name: x}
""",
        "unknown kind Certificate (cert-manager.io/v1)",
        2,
    ),
    (
        "Istio kind not implemented",
        """\
apiVersion: config.istio.io/v1alpha2
kind: DestinationPolicy
metadata: {name: x}
""",
        "kind DestinationPolicy (config.istio.io/v1alpha2) is not implemented by l4proxy; "
        "use a DestinationRule",
        2,
    ),
    (
        "wrong apiVersion for a kind",
        """\
apiVersion: networking.istio.io/v1alpha3
kind: RouteRule
metadata: {name: x}
spec: {destination: {name: bootcamp}}
""",
        "apiVersion networking.istio.io/v1alpha3 is not supported for RouteRule "
        "(use config.istio.io/v1alpha2)",
        1,
    ),
    (
        "document is not a mapping",
        """\
- apiVersion: v1
- kind: Service
""",
        "document is a list, not a mapping",
        1,
    ),
    (
        "document is a scalar",
        """\
apiVersion: v1
---
just some text
""",
        "document is the string 'just some text', not a mapping",
        3,
    ),
    (
        "no kind",
        """\
apiVersion: v1
metadata: {name: x}
""",
        "document has no kind",
        1,
    ),
    (
        "no metadata.name",
        """\
apiVersion: config.istio.io/v1alpha2
kind: RouteRule
metadata: {namespace: default}
spec: {destination: {name: bootcamp}}
""",
        "metadata.name is required",
        3,
    ),
    (
        "two VirtualServices for one host",
        VS
        + """\
  http:
  - route:
    - destination: {host: bootcamp}
---
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata:
  name: bootcamp-too
spec:
  hosts: [bootcamp.default.svc.cluster.local]
  http:
  - route:
    - destination: {host: bootcamp}
""",
        "host bootcamp.default.svc.cluster.local is already routed by VirtualService bootcamp",
        11,
    ),
    (
        "destination port not a port of the service",
        VS
        + """\
  http:
  - route:
    - destination:
        host: bootcamp
        port: {number: 9090}
""",
        "port 9090 is not a port of bootcamp.default.svc.cluster.local (ports: 8080)",
        9,
    ),
    (
        "STATIC ServiceEntry endpoint not an IP",
        """\
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {name: other}
spec:
  hosts: [other]
  ports: [{number: 80, name: http}]
  resolution: STATIC
  endpoints:
  - address: other.example.com
""",
        "endpoint address 'other.example.com' is not an IP address",
        9,
    ),
    (
        "two ServiceEntries for one host",
        """\
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {name: bootcamp-again}
spec:
  hosts: [bootcamp]
  ports: [{number: 8080, name: http}]
  endpoints: [{address: 198.18.0.99}]
""",
        "host bootcamp.default.svc.cluster.local is already described by ServiceEntry",
        None,
    ),
    (
        "Ingress backend port the service lacks",
        """\
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: web}
spec:
  rules:
  - http:
      paths:
      - path: /bootcamp
        pathType: Prefix
        backend:
          service: {name: bootcamp, port: {number: 9999}}
""",
        "service bootcamp.default.svc.cluster.local has no port 9999 (ports: 8080 (http))",
        8,
    ),
    (
        # (one error: the typo's, which says what is missing too; it was three)
        "a typo where two required fields are missing",
        """\
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {name: other}
spec:
  hosts: [other.example.com]
  ports:
  - numbr: 80
  resolution: DNS
""",
        "unknown field spec.ports[0].numbr (expected one of: name, number, protocol, targetPort); "
        "spec.ports[0].number and spec.ports[0].name are required",
        7,
    ),
    (
        # (Istio's RouteDestination has none; they were read, shown by
        # validate -v, and applied to nothing)
        "headers on a tcp route's destination",
        """\
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {name: bootcamp}
spec:
  hosts: [bootcamp]
  tcp:
  - route:
    - destination: {host: bootcamp}
      headers: {request: {set: {x-a: b}}}
""",
        "unknown field spec.tcp[0].route[0].headers (expected one of: destination, weight)",
        9,
    ),
    (
        "YAML merge key",
        """\
base: &base {a: 1}
other:
  <<: *base
""",
        "YAML merge keys (<<) are not supported",
        3,
    ),
    (
        "duplicate YAML key",
        RR
        + """\
  destination: {name: bootcamp}
  precedence: 1
  precedence: 2
""",
        "duplicate key 'precedence' in one mapping",
        8,
    ),
]


@pytest.mark.parametrize(
    ("text", "expected", "line"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_error(tmp_path: Path, text: str, expected: str, line: int | None) -> None:
    errs = errors_of(tmp_path, text)
    hits = [e for e in errs if expected in str(e)]
    assert hits, f"expected {expected!r} among:\n" + "\n".join(map(str, errs))
    if line is not None:
        assert hits[0].line == line, str(hits[0])
        assert hits[0].file.endswith("rules.yaml")


def test_diagnostic_str_is_istioctl_like() -> None:
    d = Diagnostic(
        file="bootcamp.yaml",
        line=12,
        kind="RouteRule",
        name="bootcamp-default",
        message="route weights total 90 (must total 100)",
    )
    assert (
        str(d)
        == "bootcamp.yaml:12: RouteRule bootcamp-default: route weights total 90 (must total 100)"
    )
    w = Diagnostic(file="a.yaml", line=3, column=7, message="m", severity="warning")
    assert str(w) == "a.yaml:3:7: warning: m"


def test_every_error_is_reported_not_just_the_first(tmp_path: Path) -> None:
    errs = errors_of(
        tmp_path,
        RR
        + """\
  destination: {name: bootcamp}
  httpFault: {}
  route:
  - labels: {version: v1}
    weight: 70
  - labels: {version: v2}
    weight: 20
---
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {name: other}
spec:
  hosts: [other]
  http:
  - route:
    - destination: {host: other}
    timeout: 1 s
""",
    )
    text = "\n".join(map(str, errs))
    assert "spec.httpFault must have a delay, an abort or both" in text
    assert "route weights total 90" in text
    assert "spec.http[0].timeout '1 s' is not a duration" in text
    assert len(errs) == 3


def test_duplicate_names_across_files(tmp_path: Path) -> None:
    a = tmp_path / "a.yaml"
    b = tmp_path / "b.yaml"
    rule = RR + "  destination: {name: bootcamp}\n"
    a.write_text(rule)
    b.write_text("# replaces a.yaml\n" + rule)
    with pytest.raises(ConfigError) as info:
        load_rules([str(a), str(b), REGISTRY])
    (err,) = info.value.errors
    assert err.file == str(b) and err.line == 5
    assert f"RouteRule default/bootcamp-default is already defined at {a}:4" in err.message
    # Same name in another namespace, or of another kind, is no duplicate.
    b.write_text(rule.replace("name: bootcamp-default", "name: bootcamp-default\n  namespace: x"))
    load_rules([str(a), str(b), REGISTRY])


def test_a_file_named_twice_is_read_once(tmp_path: Path) -> None:
    """``--rules DIR --rules DIR/r.yaml`` (or DIR and DIR/): each object was
    its own duplicate, and the whole rule set was refused."""
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "r.yaml").write_text(RR + "  destination: {name: bootcamp}\n")
    shutil.copy(REGISTRY, rules)
    for paths in ([str(rules), str(rules / "r.yaml")], [str(rules), str(rules) + "/"]):
        result = load_rules(paths)
        assert len(result.sources) == 2, result.sources


def test_yaml_syntax_error_has_line_and_column(tmp_path: Path) -> None:
    errs = errors_of(tmp_path, RR + "  destination: {name: bootcamp\n  precedence: 1\n")
    (err,) = errs
    assert err.line == 7 and err.column is not None
    assert str(err).startswith(f"{tmp_path / 'rules.yaml'}:7:{err.column}: YAML syntax error: ")
    # where the unclosed { was opened, not only where its } was missed
    line = RR.count("\n") + 1
    assert err.message.endswith(f"(while parsing a flow mapping begun at line {line}, column 16)")


def test_a_tab_that_indents_says_so(tmp_path: Path) -> None:
    """PyYAML's "found character that cannot start any token" names no
    tab; the message says what it is."""
    (err,) = errors_of(tmp_path, "kind: RouteRule\nmetadata:\n\tname: r\n")
    assert (err.line, err.column) == (3, 1)
    assert err.message == "YAML syntax error: a tab: YAML indents with spaces, never tabs"


def test_spec_fields_at_the_top_say_to_indent_them_under_spec(tmp_path: Path) -> None:
    """hosts: and http: not indented under spec: each is an unknown field,
    and spec is required says where they go; the VirtualService's own
    checks of the spec it lacks (hosts required, a route needed) no longer
    follow, three more lines of the same mistake."""
    text = (
        "apiVersion: networking.istio.io/v1beta1\nkind: VirtualService\nmetadata: {name: b}\n"
        "hosts: [bootcamp]\nhttp:\n- route:\n  - destination: {host: bootcamp}\n"
    )
    got = sorted((e.line, e.message) for e in errors_of(tmp_path, text))
    expected = "(expected one of: apiVersion, kind, metadata, spec, status)"
    assert got == [
        (1, "spec is required (hosts, http: indent them under spec:)"),
        (4, f"unknown field hosts {expected}"),
        (5, f"unknown field http {expected}"),
    ], got
    # without a stray field: spec is required alone; an empty one, as before
    only = [e.message for e in errors_of(tmp_path, text.split("hosts:")[0])]
    assert only == ["spec is required"], only
    empty = [e.message for e in errors_of(tmp_path, text.split("hosts:")[0] + "spec: {}\n")]
    assert empty[0] == "spec must not be empty", empty


@pytest.mark.parametrize(
    ("text", "expected", "line"),
    [
        # each raised a bare exception (a traceback from `l4proxy validate`)
        (
            VS + "  http:\n  - match:\n    - headers: [x-canary]\n    route:\n"
            "    - destination: {host: bootcamp}\n",
            "must be a mapping of header name",
            9,
        ),
        (
            "apiVersion: networking.istio.io/v1alpha3\nkind: ServiceEntry\nmetadata: {name: se}\n"
            "spec:\n  hosts: [db.example]\n  ports: [{number: 80, name: http, protocol: HTTP}]\n"
            "  resolution: STATIC\n  endpoints:\n  - address: 198.18.0.9\n    ports: [http]\n",
            "endpoint ports must map port name: number",
            10,
        ),
        (
            "apiVersion: networking.istio.io/v1alpha3\nkind: ServiceEntry\nmetadata: {name: se}\n"
            "spec:\n  hosts: [db.example]\n  ports: [{number: 80, name: http, protocol: HTTP}]\n"
            "  resolution: STATIC\n  endpoints:\n  - address: 198.18.0.9\n    ports: {80: 8080}\n",
            "endpoint port 80 names no port of this ServiceEntry (ports: http); an endpoint's "
            "ports are keyed by the port's name, not its number: {http: 8080}",
            10,
        ),
        (
            VS + "  http:\n  - route:\n    - destination: {host: bootcamp, port: 8080}\n",
            "spec.http[0].route[0].destination.port must be a mapping, not the number 8080 "
            "(write it port: {number: 8080})",
            9,
        ),
        (
            RR + "  destination: {name: bootcamp}\n  precedence: !!int abc\n",
            "cannot read value 'abc' as int",
            7,
        ),
        (
            RR + "  destination: {name: bootcamp}\n  precedence: " + "9" * 5000 + "\n",
            "cannot read value",
            7,
        ),
        (
            "apiVersion: networking.k8s.io/v1beta1\nkind: Ingress\nmetadata: {name: i}\nspec:\n"
            '  backend: {serviceName: bootcamp, servicePort: "\u00b2"}\n',
            "has no port \u00b2",
            5,
        ),
    ],
    ids=[
        "headers as a list",
        "endpoint ports as a list",
        "endpoint ports keyed by a port's number",
        "a destination's port as a number",
        "!!int abc",
        "5000 digits",
        "a superscript two as servicePort",
    ],
)
def test_bad_values_are_errors_with_a_line_not_tracebacks(
    tmp_path: Path, text: str, expected: str, line: int
) -> None:
    errs = errors_of(tmp_path, text)
    hits = [e for e in errs if expected in str(e)]
    assert hits, "\n".join(map(str, errs))
    assert hits[0].line == line, str(hits[0])


def test_unreadable_paths(tmp_path: Path) -> None:
    with pytest.raises(ConfigUnreadable) as info:
        load_rules([str(tmp_path / "missing.yaml"), REGISTRY])
    assert "missing.yaml: no such file or directory" in str(info.value)
    if os.geteuid() != 0:  # root reads anything
        f = tmp_path / "secret.yaml"
        f.write_text("{}")
        f.chmod(0)
        with pytest.raises(ConfigUnreadable, match=r"secret\.yaml: cannot read"):
            load_rules([str(f)])


def _load_in_a_thread(paths: list[str], fifo: Path) -> tuple[object, bool]:
    """load_rules(*paths*) in a thread; what it returned or raised, and whether
    it was still waiting after 5 s (it is then let go by a writer on *fifo*;
    another it waits on next stays stuck, in a daemon thread)."""
    out: list[object] = []

    def load() -> None:
        try:
            out.append(load_rules(paths))
        except ConfigError as exc:
            out.append(exc)

    t = threading.Thread(target=load, daemon=True)
    t.start()
    t.join(5)
    stuck = t.is_alive()
    if stuck:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # EOF: the open returns
        t.join(5)
    return (out[0] if out else None), stuck


def test_a_named_pipe_in_a_rules_directory_is_refused_without_waiting(tmp_path: Path) -> None:
    """open() of a FIFO named pipe.yaml in the rules directory waited for a
    writer: the reload thread never returned, with the collector paused and
    the worker unable to exit. A rules directory is read for regular files
    (and symlinks to them, a ConfigMap's way); anything else is an error
    naming the file, at once."""
    rules = tmp_path / "rules"
    rules.mkdir()
    shutil.copy(REGISTRY, rules)
    pipe = rules / "pipe.yaml"
    os.mkfifo(pipe)
    (rules / "..data").mkdir()  # a ConfigMap's way: a visible symlink into ..data
    os.mkfifo(rules / "..data" / "routes.yaml")
    (rules / "routes.yaml").symlink_to("..data/routes.yaml")
    got, stuck = _load_in_a_thread([str(rules)], pipe)
    assert not stuck
    assert isinstance(got, ConfigUnreadable)
    assert sorted(str(e) for e in got.errors) == [
        f"{rules / name}: cannot read: is a named pipe, not a regular file (rules "
        "are read from regular files and symlinks to them)"
        for name in ("pipe.yaml", "routes.yaml")
    ]


def test_a_dangling_symlink_says_where_it_points(tmp_path: Path) -> None:
    """A link whose target is gone (a ConfigMap's ..data swapped under a
    reader, a link made by hand to a moved file) is unreadable, and the
    error says so, not that the name it has is missing."""
    rules = tmp_path / "rules"
    rules.mkdir()
    shutil.copy(REGISTRY, rules)
    (rules / "routes.yaml").symlink_to("..data/routes.yaml")
    with pytest.raises(ConfigUnreadable) as info:
        load_rules([str(rules)])
    assert [str(e) for e in info.value.errors] == [
        f"{rules / 'routes.yaml'}: cannot read: a symbolic link to ..data/routes.yaml, which "
        "does not exist"
    ]


def test_a_named_pipe_named_on_its_own_is_read(tmp_path: Path) -> None:
    """``l4proxy validate <(kubectl get ... -o yaml)``: a path given by name
    is read as it is, pipe or not."""
    pipe = tmp_path / "fd63"
    os.mkfifo(pipe)

    def write() -> None:
        with open(pipe, "w") as f:
            f.write(Path(REGISTRY).read_text())

    threading.Thread(target=write, daemon=True).start()
    got, stuck = _load_in_a_thread([str(pipe)], pipe)
    assert not stuck and not isinstance(got, ConfigError), got


def test_the_sidecar_refuses_a_named_pipe_named_on_its_own(tmp_path: Path) -> None:
    """The rule file a sidecar was started with, replaced by a FIFO: its reload
    thread waited for a writer for ever, and no load came after it. The
    sidecar's loads (read_pipes=False) read regular files only."""
    pipe = tmp_path / "rules.yaml"
    os.mkfifo(pipe)
    out: list[object] = []

    def load() -> None:
        try:
            out.append(load_rules([str(pipe)], read_pipes=False))
        except ConfigError as exc:
            out.append(exc)

    t = threading.Thread(target=load, daemon=True)
    t.start()
    t.join(5)
    if t.is_alive():
        os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))
        t.join(5)
        raise AssertionError("the load waited on the pipe")
    [got] = out
    assert isinstance(got, ConfigUnreadable)
    assert [str(e) for e in got.errors] == [
        f"{pipe}: cannot read: is a named pipe, not a regular file (rules "
        "are read from regular files and symlinks to them)"
    ]


def test_error_str_lists_every_diagnostic_one_per_line(tmp_path: Path) -> None:
    f = tmp_path / "rules.yaml"
    f.write_text(
        RR + "  destination: {name: bootcamp}\n  route:\n  - labels: {version: v1}\n    weight: 5\n"
        "  - labels: {version: v2}\n    weight: 5\n"
    )
    with pytest.raises(ConfigError) as info:
        load_rules([str(f), REGISTRY])
    lines = str(info.value).splitlines()
    assert lines == [str(d) for d in info.value.diagnostics if d.severity != "note"]
    assert any("route weights total 10" in line for line in lines)
