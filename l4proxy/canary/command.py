"""``l4proxy canary SERVICE --stable v1 --canary v2 --rules PATH``: progressive delivery.

Theory of operation
-------------------
Flagger's canary analysis, run against the rules path the sidecars watch.
The decisions are :mod:`l4proxy.canary._analysis` (pure); the numbers come from
:mod:`l4proxy.canary._metrics`; this module is the I/O around them:

* **The canary's document.** The command owns exactly one document: a
  RouteRule ``canary-SERVICE`` (config.istio.io/v1alpha2, the tutorial's
  kind: ``destination.name`` and ``route[].labels.version``), no ``match``,
  precedence 0. While A/B testing (``--match``) it owns one more RouteRule
  per alternative, ``canary-SERVICE-match-1`` to ``-N``: that ``match``
  (``request.headers``), precedence :data:`MATCH_PRECEDENCE`, every request
  to the canary; the main document then routes every request to stable.
  With a rules *directory* they live alone in ``DIR/canary-SERVICE.yaml``
  (one YAML document each), and no other file is ever opened for writing.
  With a rules *file* they are documents of that file: the other documents
  keep their exact bytes (comments, order, separators) and only ours are
  replaced, appended, or (the match documents, once the test ends)
  removed. A RouteRule (or HTTPRoute) named as ours in the rules'
  namespace is ours, in a rules file too; one of that name in another
  namespace (``metadata.namespace``) is another object, the user's, and is
  neither replaced nor removed nor taken for ours. Nothing else marks
  ours (the comment at its head is no part of the object: ``kubectl`` and
  editors drop it); a kind, name and namespace identify an object, and the
  loader refuses two alike. A rule
  of the user's that routes SERVICE without a ``match`` (a RouteRule, a
  VirtualService for its host, an HTTPRoute whose parent is its Service)
  would compete with ours, so the command refuses, naming file and line;
  rules with a ``match`` at a higher precedence (say, testers pinned to v2
  by a header) keep their requests.
* **Gateway API** (``--gateway-api``, Flagger's Gateway API provider): the
  one document is an HTTPRoute ``canary-SERVICE`` instead
  (:func:`http_route_document`): parentRefs SERVICE's Service (GAMMA) and
  each ``--gateway``, one rule whose backendRefs are the stable and canary
  *Services* with the weights, a RequestMirror filter while mirrored, and
  one rule per ``--match`` alternative before it. It goes where the
  RouteRule goes. A user's HTTPRoute on SERVICE's Service or on a
  ``--gateway`` (parents resolved as the Gateway API resolves them,
  :class:`ParentRef`; on a Gateway, only where the loader attaches it: a
  listener's ``allowedRoutes``, :func:`competing`) with a rule that has no
  match competes with it.
  The samples select what the sidecars report for each backend: the
  registry decides (:func:`backend_targets`, from the rules as loaded).
* **Session affinity** (``--session-affinity COOKIE``, Gateway API mode
  only: Flagger's ``analysis.sessionAffinity`` as its Gateway API router
  writes it). While the canary has a weight, the canary's backendRef
  carries a ResponseHeaderModifier that adds ``Set-Cookie`` (the rollout's
  cookie, :func:`set_cookie`), and a rule before the weighted one matches
  a ``Cookie`` header holding it (:func:`cookie_regex`) and sends the
  request to the canary: a user drawn to the canary once stays there.
  ``--primary-cookie`` does the same for stable, a value per step; both
  with the attributes ``--cookie-path`` and the others give. Once
  the rollout ends the rule routes its holders as every request goes and
  its answers delete the cookie (:func:`expired_cookie`, with the
  attributes it was set with); mirrored, no
  cookie is handed out and the last rollout's is deleted, which a rollout
  that ends mirrored goes on doing (it handed none of its own out). The
  value is drawn here (``secrets``) and kept in the state
  (:class:`~l4proxy.canary._analysis.SessionAffinity`). A RouteRule
  cannot add a response header: refused without ``--gateway-api``.
  ``status``, ``promote`` and ``abort`` act on the saved rollout and its
  cookie: they take the cookie options and ignore them, as they do the
  other options of a run (an abort in a hurry, from a copied command
  line, must not fail on them).
* **Atomic, validated writes.** Every change goes through the pieces of
  ``l4proxy create|replace|delete`` (:mod:`l4proxy.rules.apply`): under the rules
  directory's flock, the path as it would be is loaded exactly as a sidecar
  loads it, and only then installed by write-temp/fsync/rename, so a sidecar
  sees the old rules or the new ones.
* **Edits under it.** Before each verdict the document is compared with
  what this command wrote for the rollout (``Store.edited``): edited by
  hand or removed, the interval was not routed at the weight it would be
  judged at, so it is a failed check, not judged, and ours is written
  again. With ``--metrics`` each check carries the canary's share of the
  requests to stable and canary (:attr:`~l4proxy.canary._analysis.Sample.share`),
  what the routing did whatever the document says.
* **State** is ``.canary-SERVICE.state.json`` beside the document (a hidden
  name: the sidecars never read it), written the same atomic way *before*
  the document, and re-read every interval, so that ``l4proxy canary
  promote|abort`` from another shell ends a running analysis, and a killed
  command resumes at its step (:func:`l4proxy.canary._analysis.resume`).
  A promotion stands: ``abort`` refuses a promoted rollout
  (:func:`abort_after_promotion`, Flagger's semantics); so does a
  rollback: ``promote`` refuses a rolled-back one
  (:func:`promote_after_rollback`).
* **One command per rollout.** The state names the command that drives a
  progressing rollout (:class:`~l4proxy.canary._analysis.Owner`: host,
  pid namespace, pid and start time, and a lease renewed at each of its
  writes: :func:`lease_of`). Another one, on the same host and pid
  namespace, is refused while that process runs; from elsewhere (a Job's
  next pod, a laptop), where the process cannot be asked, it waits until
  the lease ends without a write from the holder, and then takes the
  rollout over, as a leader election's candidate does
  (:func:`await_hold`): a Job's pod lost with its node holds its rollout
  until then, and the Job's next pod resumes it. A write expects the
  holder it read (:func:`stored_as`), and each interval's read of the
  state checks it, so a command whose rollout was taken over (its lease
  lapsed while it still ran) stops without writing. A command gives the
  rollout up as it stops (its end, or SIGTERM leaving the weights).
  ``promote`` and ``abort`` are never refused: they end it.
* **Windows.** After each weight change the command waits until the
  sidecars serve the new rules, then starts the interval's window: each
  interval's sample is traffic at one weight. With ``--metrics`` it reads
  that from each sidecar's ``/stats``; with ``--prometheus``, from the same
  marks as Prometheus scraped them (``l4proxy_rules_digest`` and
  ``l4proxy_rules_generation`` of each target that reports requests to
  SERVICE), and the queries' range is the interval, ending an interval
  after the change was seen live. A Prometheus without those marks: a
  warning, and a change is taken as live --wait-live after it was written.
  A sidecar loads its rules file by file, holding back a file whose text
  does not load, and its digest names the files as served: a sidecar that
  holds the canary's own file back (``l4proxy_rules_file_held{file}``, by
  the file's name) does not serve the change, whatever its digest says
  (another file's change moved it); one that holds another file back
  does, and that file is warned of (:class:`Held`).

* **Webhooks** (``--webhook TYPE=URL``, ``--webhooks FILE``: Flagger's
  ``analysis.webhooks``, :mod:`l4proxy.canary._webhooks`): :class:`Hooks`
  calls them, and the analysis acts on their answers as the pure step
  machine decides. A new rollout's start waits on its confirm-rollout,
  pre-rollout and first weight's gates (:func:`_before_start`: a
  pre-rollout failure is a failed check, and ``--threshold`` of them an
  end to write) with no route written: its state records it *waiting*,
  with what holds it and this command as its owner, so that ``status``
  shows it, ``abort`` ends it (seen at the next interval) and a Ctrl-C
  puts the state back (:meth:`Store.put_back`). The rollout hooks are
  called at each interval's start and fail its check; a pass that raises
  the weight or makes it 100 % asks its gates, which may hold it at its
  stage (the hold kept in the state for ``status``, and for the phase the
  payloads say); the rollback hooks are asked before each verdict, and a
  pass is an end (:func:`_end_here`); the post-rollout hooks hear each end
  written, the event hooks each line printed (:attr:`Display.notify`, and
  stderr's: :func:`complain`), their failures only logged; the events go
  in the background (:meth:`Hooks.notify`: a receiver that hangs never
  holds the analysis), every other call in line. ``promote`` and
  ``abort`` call the post-rollout and event hooks given to them
  (:func:`_hand_hooks`).
* **--dry-run** (:func:`_dry_run`): everything a run checks before its
  first write, then the stages it would walk were every check to pass and
  every gate to say yes (the analysis' own :func:`~l4proxy.canary._analysis.gates_of`
  and :func:`~l4proxy.canary._analysis.advance`, :func:`dry_stages`), each
  stage's documents refused as a write would refuse them
  (:meth:`Store.would_install`), printed; nothing written (the rules
  directory's reads take its lock shared, where the lock file is there,
  and make none), no webhook called, no other command waited for.

Output (:class:`Display`): a line per event, each starting with the time
(UTC, ISO 8601 to the second: :func:`stamp`), and while the command waits
(an interval, the sidecars, another command's hold) a progress line at
most every :data:`PROGRESS_EVERY` seconds; with ``--json``, an object per
event with its ``time``, and no progress lines. What it says on stderr (a
warning, an error, NOT SERVED) starts with the time too (:func:`complain`).

Exit status: 0 promoted, 1 rolled back, 2 error (usage, unreadable or
invalid rules, metrics missing, an abort of a promoted rollout, a promote
of a rolled-back one), 3
interrupted with the weights left as they were (run the same command again
to resume), 4 an end (a rollback, an abort, a promotion) written but not
served. Once a weight is
written, the sidecars unreadable or not serving it within --wait-live is a
failed check (the analysis goes on watching), and so is a next stage that
cannot be written (a competing rule or a broken file copied in beside
ours: :func:`refused_check`); --threshold of them roll back, which is
written whatever the other files hold. An end written is checked
too: a sidecar read that still serves the rules from before it after
--wait-live (one that refuses the rules: its ``/config_dump`` says why)
makes it NOT SERVED, said loudly with that error, never "rolled back" while
the canary keeps its traffic (:func:`not_served`), and so does one that
holds the canary's file back; sidecars that cannot be
read leave it unconfirmed, and it exits as that end, with a warning.
``abort`` and ``promote`` check it with ``--metrics`` or ``--prometheus``;
said again of an end whose document is written already, from the files
the sidecars hold back and, with ``--metrics``, their ``last_error`` and
the time they last loaded rules (:meth:`SidecarMetrics.refusing`); without
either, they warn that it is not checked (:func:`unchecked`).
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import fcntl
import json
import math
import os
import re
import secrets
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol, TextIO

import yaml

from l4proxy.canary._analysis import (
    PATH_ONLY,
    SAME_SITE,
    Check,
    Conflict,
    CookieAttributes,
    Event,
    GatewayRoute,
    HeaderMatch,
    Hold,
    Owner,
    Policy,
    PolicyError,
    Rollout,
    Sample,
    SessionAffinity,
    advance,
    check,
    cookie_attributes_problem,
    cookie_name_problem,
    cookie_prefix_problem,
    count,
    fail_before_start,
    first_gates,
    gates_of,
    mirrored_stages,
    new_cookie_value,
    p99_limit,
    p99_ok,
    parse_match,
    parse_steps,
    promote,
    resume,
    roll_back,
    started,
    steps_from,
    success_ok,
    waiting,
    with_hook_failures,
)
from l4proxy.canary._metrics import (
    MIRROR_DROPPED,
    CounterWindow,
    MetricsError,
    Series,
    copies_missing,
    dropped_query,
    held_files,
    held_of,
    http_get,
    is_document,
    marks_of,
    marks_query,
    parse_query_response,
    parse_query_vector,
    promql,
    query_url,
    read_sidecar,
    sample_from_prometheus,
    stable_query,
    stats_url,
    target_of,
    targets_query,
    totals_of,
    window,
)
from l4proxy.canary._webhooks import (
    EVENT_QUEUE,
    GATES,
    EventSender,
    HookResult,
    Post,
    Webhook,
    WebhookError,
    decided,
    event_payload,
    failures,
    holding,
    parse_file,
    parse_option,
    payload,
    post,
    rollback_asked,
)
from l4proxy.k8s_names import DNS1123_LABEL, DNS1123_SUBDOMAIN, namespace_arg
from l4proxy.rules import (
    UNATTACHED,
    ConfigError,
    ConfigUnreadable,
    Diagnostic,
    RouteParentRef,
    apply,
    load_rules,
    rule_files,
)
from l4proxy.rules._objects import Env, fqdn
from l4proxy.rules._schema import Report
from l4proxy.rules._yaml import (
    Document,
    SourceProblem,
    Unreadable,
    parse_documents,
    read_file,
)
from l4proxy.rules.routing import Request, RouteTable, version_and_workload, versions_differ
from l4proxy.stats import DIGEST, DIGEST_DISAGREE, GENERATION, RulesMark

EXIT_PROMOTED = 0
EXIT_ROLLED_BACK = 1
EXIT_ERROR = 2
EXIT_LEFT = 3
EXIT_NOT_SERVED = 4

ACTIONS = ("status", "promote", "abort")
BLOCKS = " ▏▎▍▌▋▊▉█"

EPILOG = """\
examples:
  # in the pod (or netns) whose sidecar runs 'l4proxy run --http-routing request'
  l4proxy canary bootcamp --stable v1 --canary v2 --rules /etc/l4proxy \\
      --steps 5,25,50,100 --interval 30 --metrics 127.0.0.1:15000
  l4proxy canary bootcamp --stable v1 --canary v2 --rules /etc/l4proxy \\
      --step-weight 10 --max-weight 50 --prometheus http://prometheus:9090
  # Flagger's mirroring pre-stage: one interval on copies of every request, then 5 %
  l4proxy canary bootcamp --stable v1 --canary v2 --rules /etc/l4proxy \\
      --mirror --steps 5,25,50,100 --metrics 127.0.0.1:15000
  # blue/green mirroring: ten intervals on copies, then every request to v2
  l4proxy canary bootcamp --stable v1 --canary v2 --rules /etc/l4proxy \\
      --mirror 10 --steps 100 --metrics 127.0.0.1:15000
  # A/B testing: ten intervals on the insiders' requests alone, then 100 %
  l4proxy canary bootcamp --stable v1 --canary v2 --rules /etc/l4proxy \\
      --match x-canary=insider --match 'cookie~^(.*?;)?(canary=always)(;.*)?$' \\
      --iterations 10 --metrics 127.0.0.1:15000
  # Gateway API (one Service per version): an HTTPRoute with weighted backendRefs
  l4proxy canary bootcamp --gateway-api --stable bootcamp-v1 --canary bootcamp-v2 \\
      --rules /etc/l4proxy [--port 8080] [--gateway bootcamp-gateway] --metrics 127.0.0.1:15000
  # ... and sticky: a user who got an answer from v2 keeps getting v2
  l4proxy canary bootcamp --gateway-api --stable bootcamp-v1 --canary bootcamp-v2 \\
      --rules /etc/l4proxy --session-affinity flagger-cookie --metrics 127.0.0.1:15000
  # what it would do at each step (routes, checks, gates), nothing written: exit 0
  l4proxy canary bootcamp --stable v1 --canary v2 --rules /etc/l4proxy \\
      --steps 5,25,50,100 --metrics 127.0.0.1:15000 --dry-run
  l4proxy canary status bootcamp --rules /etc/l4proxy
  l4proxy canary promote bootcamp --rules /etc/l4proxy   # 100 % to canary (not once rolled back)
  l4proxy canary abort bootcamp --rules /etc/l4proxy     # 100 % to stable now (not once promoted)
  # on Kubernetes: the sidecars' rules ConfigMap through the API (in a Job: its
  # service account; on a laptop: kubectl proxy)
  l4proxy canary bootcamp --stable v1 --canary v2 --configmap default/l4proxy-rules \\
      --kube-api http://127.0.0.1:8001 --prometheus http://127.0.0.1:9090

the canary owns one document: RouteRule canary-SERVICE, in DIR/canary-SERVICE.yaml
(or appended to a rules FILE, whose other documents are kept byte for byte);
its state is DIR/.canary-SERVICE.state.json. With --configmap: the key
canary-SERVICE.yaml and the annotation l4proxy.io/canary-SERVICE. Metrics need sidecars run with
'l4proxy run --http-routing request' (or Prometheus scraping them).

--mirror N: for the first N intervals the document routes every request to stable
and mirrors each to the canary; each is judged on the canary's answers to the
copies (l4proxy_mirror_requests_total, as the calling sidecar counts them) and on
any request it served itself. Every request is then sent twice: mirror only
services whose requests are idempotent (a copied POST is a second POST).

--match HEADER=VALUE or HEADER~REGEX (repeatable: any of them), --iterations N:
A/B testing. For N intervals (10) the requests that match go to the canary and
every other one to stable (RouteRules canary-SERVICE-match-1.. at precedence 1,
beside canary-SERVICE at 0, in the same file or key); each interval is judged on
the canary's requests, N passes promote it (100 %), --threshold fails roll back.
Not with --steps, --step-weight, --max-weight or --mirror.

--gateway-api: --stable and --canary name backend Services (one per version), and
the document is the HTTPRoute canary-SERVICE (gateway.networking.k8s.io/v1):
parentRefs SERVICE's Service (--port, else its one port in the registry) and each
--gateway NAME; backendRefs stable and canary with the weights; mirrored, a
RequestMirror filter; A/B, a rule per --match (headers only) before it.

--session-affinity COOKIE (with --gateway-api; --cookie-max-age, --primary-cookie):
while the canary has a weight, its backendRef adds 'Set-Cookie: COOKIE=VALUE;
Max-Age=86400; Path=/' to its answers (VALUE: ten random letters, drawn once per
rollout and kept in the state, so a resume keeps it; status shows it), and a rule
before the weighted one sends every request whose Cookie header holds COOKIE=VALUE
to the canary. Rolled back or promoted, that rule routes as every request goes and
deletes the cookie (Max-Age=0); a mirrored interval hands none out, and deletes
the last rollout's, as a rollout that ended mirrored goes on doing. --primary-cookie
NAME: stable's answers set NAME (a value per step, Max-Age the interval) and its
holders stay on stable until the next step. The attributes (Flagger's): --cookie-path
(/), --cookie-domain, --cookie-secure, --cookie-http-only, --cookie-same-site and
--cookie-partitioned, for both cookies and their deletions, e.g. 'Set-Cookie:
COOKIE=VALUE; Max-Age=86400; Domain=example.com; Path=/; SameSite=None; Secure'.
SameSite=None, Partitioned, and a __Secure- or __Host- name need --cookie-secure
(a __Host- name also Path=/ and no Domain; an __Http- or __Host-Http- name also
--cookie-http-only): browsers drop such cookies without it.
status, promote and abort ignore these options (they act on the saved rollout and
the cookie it was started with).

--webhook TYPE=URL (repeatable), --webhooks FILE: Flagger's analysis.webhooks.
Each is a POST of {"name": SERVICE, "namespace": NS, "phase": ..., "checksum": ...,
"metadata": {...}} (checksum: the rollout's, the same across resumes); it passes on
200-202, and fails on any other status, no answer within its timeout (10 s: the
whole call, its body too) or a refused connection. A URL's user:password goes as
Basic authorization; a 307 or 308 is followed with the POST again (10 at most).
FILE is YAML in Flagger's form: a Canary (its spec.analysis.webhooks; among other
documents, the kind: Canary one), a mapping with webhooks, or the list; each entry
has name, url, and optionally type (rollout), timeout (30s, 2m), metadata
(strings), retries, disableTLS. A directory is each file in it (a ConfigMap
volume's keys), none where it is empty. The output shows a hook's name and its
URL's scheme and host (without a name, its path too), never a query or a
password.
The types:
  confirm-rollout           before a new rollout writes anything, asked every
                            interval until it passes (manual approval)
  pre-rollout               then, before any request goes to the canary; a
                            failure is a failed check, tried again each interval
  rollout                   at the start of each interval (a load test); a
                            failure fails that interval's check, whatever its
                            numbers
  confirm-traffic-increase  after a pass, before the canary's weight goes up
                            (the first weight, and the promotion's 100 %, too);
                            a failure holds the weight
  confirm-promotion         then, before the canary's weight becomes 100 %: the
                            raise to a last step of 100 (--steps 5,...,100), or
                            the promotion after a last step under 100; a failure
                            holds it, the checks go on, only it is asked again
  rollback                  before each verdict, and while the start waits (once
                            confirm-rollout was asked): a pass rolls back now,
                            the interval never judged
  post-rollout              after a promotion or rollback is written; a failure
                            is only logged
  event                     every line the command prints, stderr's too (as a
                            Warning), in plain text, sent in the background (a
                            slow receiver never holds the analysis: 64 queued
                            at most, the oldest dropped); failures only logged
While the start's webhooks hold it, no route is written: the state records the
rollout waiting (status: 'waiting to start ... held since ... by ...'); abort
ends it (the waiting command stops at its next interval), promote refuses it,
Ctrl-C ends the wait (exit 3) and puts the state back. A command killed while
it waits (SIGKILL) leaves it waiting (status: 'nothing runs it'): the same
command run again resumes the wait where it stood, its failed checks counted.
While confirm-promotion holds, status says 'waiting for promotion'. promote and
abort call the post-rollout and event webhooks given to them (post-rollout not
where a running command holds the rollout: it calls its own); status calls none.
e.g. --webhook confirm-promotion=http://flagger-loadtester.test/gate/check

exit status:
  0  promoted (100 % to the canary); --dry-run: the preview printed
  1  rolled back (100 % to stable), by the analysis, by abort, or by a rollback
     webhook (a pre-rollout webhook failing --threshold times too; an abort while
     the start's webhooks held it)
  2  error, before the analysis starts (mid-rollout, a step refused is a failed
     check): usage, unreadable or invalid rules, a SERVICE no ServiceEntry of
     the rules describes (a typo), a competing rule, no metrics,
     a rollback that could not be written (NOT applied), an abort of a promoted
     rollout (a promotion stands: roll the old version out as a new canary),
     a promote of a rolled-back one (a rollback stands: roll it out anew) or of
     one waiting to start (its webhooks hold it), an unexpected error
  3  interrupted, weights left where they were: run the same command to resume
     (interrupted while a confirm-rollout or pre-rollout webhook holds the
     start: no route written, the state put back)
  4  written, NOT SERVED: a rollback, abort or promotion that a sidecar read still
     does not serve after --wait-live (one that refuses the rules: its
     /config_dump's last_error is printed); the canary keeps its traffic until
     the sidecars load it. Sidecars that cannot be read: 0 or 1, with a warning
"""


class CanaryError(Exception):
    """Exit 2 with this message."""


class NotLive(CanaryError):
    """A change written did not reach every sidecar within --wait-live.

    *summary* says it in a few words, for the line of a rollout's end
    (``the sidecars still serve rules generation 24: FILE:LINE: why``):
    the generation a sidecar still serves and, where its admin endpoint
    answers ``/config_dump``, the error it refused the change with."""

    def __init__(self, message: str, summary: str = "") -> None:
        super().__init__(message)
        self.summary = summary or message


class Transient(CanaryError):
    """A write that failed for a reason that may pass (the API server down,
    429 or 5xx, a timeout; an OSError on the rules directory): a rollback
    is tried again (the store's ``end_retry``) before it is given up."""


# --wait-live defaults: a rules directory the sidecars poll (1 s, see
# l4proxy run --reload-interval), and a ConfigMap the kubelet projects into
# the pods (its syncFrequency, 1 min by default, plus the ConfigMap cache's
# propagation delay: Kubernetes documents the sum as the delay to expect).
WAIT_LIVE_FILES = 5.0
WAIT_LIVE_CONFIGMAP = 150.0
# With --prometheus a change is seen live once Prometheus has scraped it: one
# scrape interval more (Prometheus' default, 1 min; Istio's setup scrapes
# every 15 s). Without it, 5 s with --rules failed nearly every step, and each
# "not live" counted as a failed check: a healthy canary rolled back.
WAIT_LIVE_SCRAPE = 60.0
# --iterations without a number: Flagger's A/B testing examples' analysis.iterations
AB_ITERATIONS = 10
# The match documents' precedence: above the main document's 0, so that
# they take the matching requests from it; a rule of the user's with a
# match at 2 or more still keeps its requests (testers pinned to a
# version), and one at 1 is ordered with ours by (namespace, name), as the
# loader orders equal precedences (Istio 0.7's order).
MATCH_PRECEDENCE = 1


def wait_live_of(args: argparse.Namespace) -> float:
    """--wait-live, or the default for where the rules are written."""
    if args.wait_live is not None:
        if not args.wait_live > 0:
            raise CanaryError(f"--wait-live must be more than 0 seconds, got {args.wait_live:g}")
        return float(args.wait_live)
    wait = WAIT_LIVE_CONFIGMAP if getattr(args, "configmap", None) else WAIT_LIVE_FILES
    return wait + (WAIT_LIVE_SCRAPE if getattr(args, "prometheus", None) else 0.0)


# -- arguments ------------------------------------------------------------------
def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "canary",
        help="progressive delivery: shift a service to a new version while it stays healthy",
        description=(__doc__ or "").split("\n\n")[0].replace("``", ""),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "words", nargs="+", metavar="[status|promote|abort] SERVICE", help="the service to shift"
    )
    p.add_argument("--rules", metavar="PATH", help="rules file or directory (or --configmap)")
    p.add_argument("--stable", metavar="VERSION", help="the version serving now (label version)")
    p.add_argument("--canary", metavar="VERSION", help="the version to shift to")
    p.add_argument(
        "--steps",
        metavar="W,W,...",
        help="canary weights in turn (5,10,25,50,100); a rollout resumed with other steps "
        "stays at its weight, judged there, then goes on along them",
    )
    p.add_argument("--step-weight", type=int, metavar="W", help="or: weights W, 2W, ...")
    p.add_argument("--max-weight", type=int, metavar="W", help="... up to W (100)")
    p.add_argument(
        "--mirror",
        type=_intervals,
        nargs="?",
        const=1,
        default=0,
        metavar="N",
        help="first N intervals (no N: 1) mirrored: every request to stable and a copy of "
        "each to the canary, judged on the copies' answers, which no client sees; then "
        "the steps (Flagger's analysis.mirror; idempotent requests only). 0: none (0)",
    )
    p.add_argument(
        "--match",
        action="append",
        default=[],
        metavar="HEADER=VALUE|HEADER~REGEX",
        help="A/B testing: the requests whose header HEADER (any case) is VALUE, or matches "
        "the RE2 REGEX whole, go to the canary, every other one to stable; repeatable, "
        "any of them (Flagger's analysis.match; cookies: --match 'cookie~...')",
    )
    p.add_argument(
        "--iterations",
        type=int,
        metavar="N",
        help=f"A/B testing: intervals judged before the canary is promoted "
        f"(Flagger's analysis.iterations) ({AB_ITERATIONS})",
    )
    p.add_argument(
        "--gateway-api",
        action="store_true",
        help="write an HTTPRoute (Flagger's Gateway API provider): --stable and --canary "
        "name a backend Service each (one Service per version, e.g. bootcamp-v1), weighted "
        "as backendRefs; its parents SERVICE's Service and each --gateway",
    )
    p.add_argument(
        "--port",
        type=int,
        metavar="PORT",
        help="--gateway-api: SERVICE's port (its parentRef's) and the backends' (default: "
        "SERVICE's port in the registry, when it has one)",
    )
    p.add_argument(
        "--gateway",
        action="append",
        default=[],
        metavar="NAME",
        help="--gateway-api: a Gateway the HTTPRoute attaches to as well (repeatable; "
        "Flagger's gatewayRefs)",
    )
    p.add_argument(
        "--session-affinity",
        metavar="COOKIE",
        help="--gateway-api: a sticky canary (Flagger's analysis.sessionAffinity): while the "
        "canary has a weight its answers set the cookie COOKIE (one random value per "
        "rollout, kept in the state), and every request that sends it back goes to the "
        "canary, so a user who met the new version stays on it; the rollout's end deletes "
        "it (after a rollback its holders reach stable). Not with --match",
    )
    p.add_argument(
        "--cookie-max-age",
        type=int,
        metavar="SECONDS",
        help=f"--session-affinity: how long a client keeps the canary's cookie "
        f"({DEFAULT_COOKIE_MAX_AGE}, a day, as Flagger's maxAge)",
    )
    p.add_argument(
        "--primary-cookie",
        metavar="NAME",
        help="--session-affinity: stable's answers set the cookie NAME too, and the "
        "requests that send it back go to stable, until the next step (a new value each "
        "step, Max-Age one interval: Flagger's primaryCookieName), so a user does not "
        "switch versions within a step",
    )
    p.add_argument(
        "--cookie-path",
        metavar="PATH",
        help="--session-affinity: the cookies' Path (/; Flagger's sessionAffinity.path, "
        "which it leaves out by default: a cookie without a Path is sent only below the "
        "directory of the request whose answer set it, so a user pinned by an answer to "
        "/api/x would lose it, and be drawn again, at /)",
    )
    p.add_argument(
        "--cookie-domain",
        metavar="HOST",
        help="--session-affinity: the cookies' Domain: sent to HOST and its subdomains "
        "(Flagger's domain; not given: to the answering host alone)",
    )
    p.add_argument(
        "--cookie-secure",
        action="store_true",
        help="--session-affinity: the cookies are Secure, sent over https alone (Flagger's "
        "secure); needed by --cookie-same-site None, --cookie-partitioned, and a "
        "__Secure-, __Host-, __Http- or __Host-Http- cookie name",
    )
    p.add_argument(
        "--cookie-http-only",
        action="store_true",
        help="--session-affinity: the cookies are HttpOnly, hidden from the page's "
        "JavaScript (Flagger's httpOnly); needed by an __Http- or __Host-Http- cookie name",
    )
    p.add_argument(
        "--cookie-same-site",
        choices=SAME_SITE,
        help="--session-affinity: the cookies' SameSite (Flagger's sameSite): Strict, no "
        "cross-site request sends them; Lax, a top-level navigation does; None, every one "
        "does (with --cookie-secure). Not given: none written, the browser's default",
    )
    p.add_argument(
        "--cookie-partitioned",
        action="store_true",
        help="--session-affinity: the cookies are Partitioned, kept apart for each top-level "
        "site that embeds the service (CHIPS; with --cookie-secure; Flagger's partitioned)",
    )
    p.add_argument(
        "--interval",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="time between two checks, each judging the canary's requests since the one "
        "before (Flagger's analysis.interval) (60)",
    )
    p.add_argument(
        "--threshold",
        type=int,
        default=5,
        metavar="N",
        help="failed checks that roll back (Flagger's analysis.threshold) (5)",
    )
    p.add_argument(
        "--min-success-rate",
        type=float,
        default=99.0,
        metavar="PCT",
        help="a check fails below this share of the canary's requests answered neither "
        "5xx nor 0 (no response at all) (99)",
    )
    p.add_argument(
        "--max-p99",
        type=_max_p99,
        default=500.0,
        metavar="MS",
        help="a check fails above this p99 latency of the canary's requests, in ms (500; "
        "off: no latency check, for sources without the latency histogram)",
    )
    p.add_argument(
        "--min-requests",
        type=int,
        default=10,
        metavar="N",
        help="canary requests per interval; fewer halts the rollout (10)",
    )
    p.add_argument(
        "--progress-deadline",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="roll back a rollout that has judged no interval (only halts: too little "
        "canary traffic) for this long, and two intervals at least; Flagger's "
        "progressDeadlineSeconds. 0: wait for traffic for ever (600)",
    )
    p.add_argument(
        "--metrics",
        action="append",
        default=[],
        metavar="URL",
        help="a sidecar's admin endpoint (HOST:PORT); repeatable, counters are summed",
    )
    p.add_argument("--prometheus", metavar="URL", help="read Istio's metrics from Prometheus")
    p.add_argument(
        "--reporter",
        default="source",
        metavar="NAME",
        help="--prometheus: the reporter label to select (source, the default: l4proxy "
        "sidecars count the requests they send, as the caller's side)",
    )
    p.add_argument(
        "--webhook",
        action="append",
        default=[],
        metavar="TYPE=URL",
        help="a webhook (Flagger's analysis.webhooks): POSTed at the moment TYPE names, its "
        "answer acted on (see below); repeatable. No name, a 10 s timeout, no metadata: "
        "--webhooks FILE gives those",
    )
    p.add_argument(
        "--webhooks",
        action="append",
        default=[],
        metavar="FILE",
        help="webhooks from a YAML file in Flagger's form: a Canary (only its "
        "spec.analysis.webhooks is read), a mapping with webhooks, or the list; "
        "a directory: each file in it, in name order (a ConfigMap volume's keys; "
        "none where it is empty); repeatable, after the --webhook ones",
    )
    p.add_argument("--json", action="store_true", help="one JSON event per line on stdout")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print what the rollout would do at each step (the routes written, the gates "
        "asked, the checks and their thresholds) and exit 0: nothing written, no webhook "
        "called, nothing waited for; refused (exit 2) where a run would be, with its error",
    )
    p.add_argument(
        "--on-abort",
        choices=("ask", "rollback", "leave"),
        default="ask",
        help="on Ctrl-C/SIGTERM: ask (on a terminal; else leave), roll back, or leave "
        "weights (ask)",
    )
    p.add_argument(
        "--restart",
        action="store_true",
        help="start again at the first step a rollout of these versions that was rolled "
        "back (a promoted one is not started again: roll the old version out as a new "
        "canary)",
    )
    p.add_argument(
        "--wait-live",
        type=float,
        metavar="SECONDS",
        help="how long a change may take to reach every sidecar (read with --metrics, or as "
        "Prometheus scraped them) before it is a failed check; with --prometheus and no "
        "sidecar's rules marks in it, how long after a change its window starts "
        f"({WAIT_LIVE_FILES:g} with --rules, which sidecars poll every second; "
        f"{WAIT_LIVE_CONFIGMAP:g} with --configmap: the kubelet refreshes a mounted "
        "ConfigMap on its sync period, a minute by default, plus its cache's delay; "
        f"{WAIT_LIVE_SCRAPE:g} more with --prometheus, for its scrape interval)",
    )
    p.add_argument(
        "-n",
        "--namespace",
        type=namespace_arg,
        help="as for l4proxy validate (default: default; the ConfigMap's)",
    )
    p.add_argument("--domain", default="cluster.local", help="as for l4proxy validate")
    from l4proxy.canary import (
        kube as canary_kube,  # --configmap and the API server (a cycle: import here)
    )

    canary_kube.add_arguments(p)
    p.set_defaults(func=run)


def gateway_options(args: argparse.Namespace) -> bool:
    """Whether Gateway API mode is asked for; --port and --gateway checked
    (they go with it, and nothing else reads them)."""
    on = bool(getattr(args, "gateway_api", False))
    port: int | None = getattr(args, "port", None)
    gateways: list[str] = getattr(args, "gateway", None) or []
    if not on:
        for flag, given in (("--port", port is not None), ("--gateway", bool(gateways))):
            if given:
                raise CanaryError(
                    f"{flag} goes with --gateway-api (the HTTPRoute's port and parents); a "
                    "RouteRule routes SERVICE's every port"
                )
        return False
    if port is not None and not 1 <= port <= 65535:
        raise CanaryError(f"--port {port}: not a port (1..65535)")
    for g in gateways:
        if not DNS1123_SUBDOMAIN.fullmatch(g):
            raise CanaryError(
                f"--gateway {g!r}: not a Gateway name (a DNS subdomain, e.g. bootcamp-gateway; "
                "the HTTPRoute's namespace's)"
            )
    return True


# --cookie-max-age: Flagger's maxAge default (a day), and at most 400 days,
# where browsers cap it (RFC 6265bis: a longer Max-Age is taken as 400 days)
DEFAULT_COOKIE_MAX_AGE = 86400
MAX_COOKIE_MAX_AGE = 400 * 86400


def affinity_options(
    args: argparse.Namespace, gateway_api: bool, policy: Policy, value: str
) -> SessionAffinity | None:
    """``--session-affinity``, ``--cookie-max-age``, ``--primary-cookie``
    and the cookie attributes (``--cookie-path`` ...) checked, as the
    rollout would take them with the cookie value *value* (drawn by the
    caller); None without them.

    Refused: without ``--gateway-api`` (a RouteRule cannot set a response
    header, which is how a client gets the cookie), with ``--match`` (A/B
    testing routes by a header already: the requests it matches all go to
    the canary, which is what a cookie would pin; Flagger's sticky canary is
    for weighted steps), attributes that are not a path or a host name, or
    that browsers drop (:func:`~l4proxy.canary._analysis.cookie_attributes_problem`),
    a name that is not a cookie name (an RFC 6265 token), is too long for
    the sticky rule's regex, or is a ``__Secure-`` or ``__Host-`` name
    without the attributes its prefix needs, the two names alike, a
    max-age outside 1..400 days, and the other options alone."""
    cookie: str | None = getattr(args, "session_affinity", None)
    max_age: int | None = getattr(args, "cookie_max_age", None)
    primary: str | None = getattr(args, "primary_cookie", None)
    path: str | None = getattr(args, "cookie_path", None)
    domain: str | None = getattr(args, "cookie_domain", None)
    same_site: str | None = getattr(args, "cookie_same_site", None)
    secure = bool(getattr(args, "cookie_secure", False))
    http_only = bool(getattr(args, "cookie_http_only", False))
    partitioned = bool(getattr(args, "cookie_partitioned", False))
    if cookie is None:
        for flag, given in (
            ("--cookie-max-age", max_age is not None),
            ("--primary-cookie", primary is not None),
            ("--cookie-path", path is not None),
            ("--cookie-domain", domain is not None),
            ("--cookie-secure", secure),
            ("--cookie-http-only", http_only),
            ("--cookie-same-site", same_site is not None),
            ("--cookie-partitioned", partitioned),
        ):
            if given:
                raise CanaryError(
                    f"{flag} goes with --session-affinity COOKIE (the canary's cookie; "
                    "Flagger's sessionAffinity.cookieName)"
                )
        return None
    if not gateway_api:
        raise CanaryError(
            "--session-affinity needs --gateway-api: a client gets the cookie from a "
            "Set-Cookie that the canary's answers carry, and Istio 0.7's RouteRule cannot "
            "add a response header; with --gateway-api the HTTPRoute's canary backendRef "
            "adds it (one Service per version: --stable and --canary name them)"
        )
    if policy.match:
        raise CanaryError(
            "--session-affinity and --match: A/B testing sends every matching request to "
            "the canary already (a cookie too: --match 'cookie~...'), and no weight draws "
            "a user there to be pinned; session affinity goes with weighted steps"
        )
    if domain == "":
        raise CanaryError(
            "--cookie-domain '': not a host name, e.g. example.com (without the option the "
            "cookies go back to the host that answered alone)"
        )
    attributes = CookieAttributes(
        "/" if path is None else path,
        # as a browser takes it (RFC 6265, 5.2.3): a leading dot dropped
        (domain or "").removeprefix("."),
        secure,
        http_only,
        same_site or "",
        partitioned,
    )
    if why := cookie_attributes_problem(attributes):
        raise CanaryError(why)
    # (any case, the same name: a resume in another case is no conflict)
    attributes = replace(attributes, domain=attributes.domain.lower())
    for flag, name in (("--session-affinity", cookie), ("--primary-cookie", primary)):
        if name is None:
            continue
        if why := cookie_name_problem(name) or cookie_prefix_problem(name, attributes):
            raise CanaryError(f"{flag} {name!r}: {why}")
    if primary is not None and primary == cookie:
        raise CanaryError(
            f"--primary-cookie {primary}: the same name as --session-affinity; give stable's "
            "cookie another (a client holds one of each, and each must say its version)"
        )
    if max_age is not None and not 1 <= max_age <= MAX_COOKIE_MAX_AGE:
        raise CanaryError(
            f"--cookie-max-age {max_age}: seconds from 1 to {MAX_COOKIE_MAX_AGE} (400 days, "
            "where browsers cap a cookie's life)"
        )
    return SessionAffinity(
        cookie,
        value,
        DEFAULT_COOKIE_MAX_AGE if max_age is None else max_age,
        primary or "",
        # Flagger's: the interval (whole seconds, at least 1: a Max-Age of 0
        # would delete it at once)
        max(1, math.ceil(policy.interval)),
        attributes=attributes,
    )


def ended_note(saved: SessionAffinity | None, given: SessionAffinity | None) -> str:
    """The note of a finished rollout run again (it is reported as it
    ended, and nothing is written but its document as it was): that
    ``--restart`` starts it again, and, where the cookie options given are
    not those it ran with (*saved*; *given* as :func:`affinity_options`
    made them), both: the given ones were not used."""
    note = "this rollout had ended; --restart starts it again"

    def options(a: SessionAffinity | None) -> tuple[str, int, str, CookieAttributes] | None:
        return None if a is None else (a.cookie, a.max_age, a.primary_cookie, a.attributes)

    if options(saved) == options(given):
        return note
    ran = "without --session-affinity" if saved is None else f"with {saved.options(max_age=True)}"
    unused = (
        "this command gives no cookie options"
        if given is None
        else f"this command's {given.options(max_age=True)} were not used"
    )
    return f"{note} (it ran {ran}; {unused})"


def policy_of(args: argparse.Namespace) -> Policy:
    texts: list[str] = getattr(args, "match", None) or []
    iterations: int | None = getattr(args, "iterations", None)
    if texts:
        for flag, given in (
            ("--steps", args.steps is not None),
            ("--step-weight", args.step_weight is not None),
            ("--max-weight", args.max_weight is not None),
            ("--mirror", bool(getattr(args, "mirror", 0))),
        ):
            if given:
                # Flagger does not combine them either: an A/B test shifts no weight
                raise PolicyError(
                    f"--match and {flag}: A/B testing routes the matching requests to the "
                    f"canary for --iterations intervals, then promotes it; give one of them"
                )
    elif iterations is not None:
        raise PolicyError(
            "--iterations needs --match HEADER=VALUE (or HEADER~REGEX): the requests that go "
            "to the canary for those intervals (Flagger's A/B testing)"
        )
    # dict: each alternative once, in the order given
    match = tuple(dict.fromkeys(parse_match(t) for t in texts))
    if args.steps is not None and args.step_weight is not None:
        raise PolicyError("--steps and --step-weight: give one of them")
    if args.max_weight is not None and args.step_weight is None:
        # alone it would be ignored, and the rollout would go on to 100 %
        raise PolicyError("--max-weight goes with --step-weight (Flagger's maxWeight/stepWeight)")
    if args.steps is not None:
        steps = parse_steps(args.steps)
    elif args.step_weight is not None:
        steps = steps_from(args.step_weight, 100 if args.max_weight is None else args.max_weight)
    else:
        steps = (5, 10, 25, 50, 100)
    return Policy(
        steps=steps,
        interval=args.interval,
        threshold=args.threshold,
        min_success_rate=args.min_success_rate,
        max_p99_ms=args.max_p99,
        min_requests=args.min_requests,
        progress_deadline=args.progress_deadline,
        mirror=getattr(args, "mirror", 0),
        match=match,
        iterations=(AB_ITERATIONS if iterations is None else iterations) if match else 0,
    )


# -- the document and the state ---------------------------------------------------
@dataclass(frozen=True)
class Paths:
    rules: str  # what the user gave
    directory: str  # where the lock and the state live
    document: str  # the file holding our document
    state: str
    is_dir: bool

    @classmethod
    def of(cls, rules: str, service: str) -> Paths:
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", service):
            raise CanaryError(f"{service!r} is not a service name (a DNS label, e.g. bootcamp)")
        short = service.split(".", 1)[0]
        if os.path.isdir(rules):
            return cls(
                rules,
                rules,
                os.path.join(rules, f"canary-{short}.yaml"),
                os.path.join(rules, f".canary-{short}.state.json"),
                True,
            )
        if os.path.isfile(rules):
            d = os.path.dirname(os.path.abspath(rules))
            return cls(rules, d, rules, os.path.join(d, f".canary-{short}.state.json"), False)
        raise CanaryError(f"{rules}: no such rules file or directory")


_LABEL_VALUE = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")


def rule_name(service: str) -> str:
    return f"canary-{service.split('.', 1)[0]}"


def match_rule_name(service: str, i: int) -> str:
    """The RouteRule of the *i*-th ``--match`` alternative (from 1)."""
    return f"{rule_name(service)}-match-{i}"


def canary_owns(main: str, name: object) -> bool:
    """Whether a RouteRule named *name* is one of the canary's whose main
    document is named *main*: that one, or a match document (of this A/B
    test, or of one that ended)."""
    return isinstance(name, str) and (
        name == main or re.fullmatch(re.escape(main) + r"-match-[1-9][0-9]*", name) is not None
    )


def document(r: Rollout) -> str:
    """The canary's main document: :func:`route_rule_document`, or in Gateway
    API mode :func:`http_route_document`."""
    return route_rule_document(r) if r.gateway is None else http_route_document(r)


# --match names that a RouteRule reads as request attributes, not headers
# (uri, method, scheme, authority): an HTTPRoute's header match would take
# them for headers of those names
PSEUDO_HEADERS = ("uri", "method", "scheme", "authority")


def http_route_document(r: Rollout) -> str:
    """The canary's HTTPRoute (Gateway API mode, Flagger's Gateway API
    provider): parents SERVICE's Service (GAMMA: ``group: ""``, ``kind:
    Service``, the port) and each Gateway; one rule without a match whose
    backendRefs are the stable and canary Services, both always listed (a
    weight 0 sends none, the API's rule, as Flagger writes its primary and
    canary refs), and while mirrored a RequestMirror filter on that rule to
    the canary (the API lets no backendRef carry one; Flagger puts it on the
    rule). While A/B testing each alternative is a rule before it: its
    header match, every request to the canary. The API ranks a rule with a
    header match above one without (both PathPrefix ``/``), whatever their
    order; they come first anyway, as the RouteRules' precedence reads.

    With session affinity (:attr:`Rollout.affinity`), while the canary has
    a weight: a rule whose ``Cookie`` match is the rollout's cookie sends
    its holders to the canary, then (``--primary-cookie``) one for stable's
    cookie of this step, and the weighted rule's backendRefs each add their
    ``Set-Cookie`` to their answers (Flagger's layout). Ended, or mirrored
    with a cookie of the rollout before: a rule matching that cookie with
    the weighted rule's backends (and mirror), whose answers delete it
    (with the attributes it was set with)."""
    g = r.gateway
    assert g is not None
    phase = "mirrored" if r.mirrored else "A/B testing" if r.ab_testing else r.phase
    parents = f'  - group: ""\n    kind: Service\n    name: {r.service.split(".", 1)[0]}\n'
    parents += f"    port: {g.port}\n"
    parents += "".join(f"  - name: {json.dumps(name)}\n" for name in g.gateways)

    def ref(name: str, weight: int, cookie: str = "") -> str:
        # quoted (JSON is YAML): a name like 1.10 or on is a string
        out = f"    - name: {json.dumps(name)}\n      port: {g.port}\n      weight: {weight}\n"
        if cookie:  # the backend's own responses set it (Flagger's backendRef filter)
            out += "      filters:\n" + _set_cookie_filter(cookie, "      ")
        return out

    def header_rule(name: str, kind: str, value: str, refs: str, filters: str = "") -> str:
        return (
            "  - matches:\n    - headers:\n"
            f"      - name: {json.dumps(name)}\n        type: {kind}\n"
            f"        value: {json.dumps(value)}\n"
            f"    backendRefs:\n{refs}" + (f"    filters:\n{filters}" if filters else "")
        )

    rules = ""
    if r.ab_testing:
        for m in r.match:
            kind = "Exact" if m.kind == "exact" else "RegularExpression"
            rules += header_rule(m.header, kind, m.value, ref(r.canary, 1))
    mirror = ""
    if r.mirrored:
        mirror = (
            "    - type: RequestMirror\n      requestMirror:\n"
            f"        backendRef:\n          name: {json.dumps(r.canary)}\n"
            f"          port: {g.port}\n"
        )
    weighted = ref(r.stable, 100 - r.weight) + ref(r.canary, r.weight)
    a = r.affinity
    expired, expired_attributes = expired_cookie(r)
    if a is not None and r.phase == "progressing" and r.weight > 0:
        # sticky: the cookie holders first (a header match outranks the
        # weighted rule, and the canary's cookie the primary's), then the
        # weighted rule whose backends hand the cookies out
        rules += header_rule("Cookie", "RegularExpression", cookie_regex(a.pair), ref(r.canary, 1))
        primary = ""
        if a.primary_cookie:
            primary = f"{a.primary_cookie}={a.primary_value(r.step)}"
            rules += header_rule(
                "Cookie", "RegularExpression", cookie_regex(primary), ref(r.stable, 1)
            )
        weighted = ref(
            r.stable, 100 - r.weight, set_cookie(primary, a.primary_max_age, a.attributes)
        )
        weighted += ref(r.canary, r.weight, set_cookie(a.pair, a.max_age, a.attributes))
    elif expired:
        # the cookie of a rollout that ended (or, mirrored, of the one
        # before): routed as every other request, and deleted
        rules += header_rule(
            "Cookie",
            "RegularExpression",
            cookie_regex(expired),
            weighted,
            _set_cookie_filter(set_cookie(expired, 0, expired_attributes), "    ") + mirror,
        )
    rules += f"  - backendRefs:\n{weighted}"
    if mirror:
        rules += f"    filters:\n{mirror}"
    return (
        f"# Owned by 'l4proxy canary {r.service} --gateway-api' ({r.stable} -> {r.canary}, "
        f"{phase}):\n"
        "# rewritten at every step; edits are overwritten. Remove it with the rollout's end.\n"
        "apiVersion: gateway.networking.k8s.io/v1\n"
        "kind: HTTPRoute\n"
        f"metadata:\n  name: {rule_name(r.service)}\n"
        f"spec:\n  parentRefs:\n{parents}  rules:\n{rules}"
    )


def cookie_regex(pair: str) -> str:
    """An RE2 regex that matches a ``Cookie`` header's whole value when
    the cookie *pair* (``NAME=VALUE``) is one of its cookies: at its start
    or after a ``;`` (and the spaces a client puts after it), and ending
    at the next ``;`` or at the end (spaces allowed before either). A
    cookie whose name or value only ends or begins so (``xNAME=VALUE``,
    ``NAME=VALUEx``) or holds it (``a=NAME=VALUE``) does not match. Flagger
    writes ``.*NAME.*VALUE.*``, which all of those match. Every character
    but a letter or digit is escaped (RE2 takes ``\\`` before any
    punctuation as that character), so a cookie name's ``.`` or ``+`` is
    itself."""
    name, _, value = pair.partition("=")

    def literal(text: str) -> str:
        return "".join(c if c.isascii() and c.isalnum() else "\\" + c for c in text)

    return rf"(?:.*;[ \t]*)?{literal(name)}={literal(value)}[ \t]*(?:;.*)?"


def set_cookie(pair: str, max_age: int, attributes: CookieAttributes = PATH_ONLY) -> str:
    """A ``Set-Cookie`` value for *pair* (``NAME=VALUE``; "": none) that
    lives *max_age* seconds (0: expires it now), with *attributes* after
    the Max-Age, in Flagger's order (:class:`CookieAttributes`; by default
    ``Path=/`` alone).

    ``Max-Age=0`` deletes it, where Flagger writes ``-1``: RFC 6265
    (5.2.2) has a user agent expire a cookie whose Max-Age is zero or less,
    so both work, and 0 is what servers write for it (Go's net/http, which
    Flagger uses, writes ``Max-Age=0`` for a negative MaxAge). A deletion
    carries the attributes the cookie was set with, where Flagger's carries
    none: a browser deletes only the cookie of the same name, domain and
    path (and partition), and takes the deletion by the rules it took the
    cookie by (a ``SameSite=None`` without ``Secure`` is dropped), so
    Flagger's, in an answer to ``/api/x``, names the path ``/api`` and no
    domain, and misses a cookie set with ``Path=/`` or a ``Domain``.

    A Path is always written, ``/`` by default, where Flagger writes one
    only when its ``sessionAffinity.path`` is set: a cookie without one
    takes the directory of the request that set it (RFC 6265, 5.1.4), so
    one set by an answer to ``/api/x`` would not be sent to ``/`` (that
    user would be drawn again there)."""
    return f"{pair}; Max-Age={max_age}; {attributes}" if pair else ""


def _set_cookie_filter(value: str, indent: str) -> str:
    """A ResponseHeaderModifier filter (a list item at *indent*) that adds
    ``Set-Cookie: value`` to a response (added, not set: the backend's own
    cookies stay)."""
    return (
        f"{indent}- type: ResponseHeaderModifier\n{indent}  responseHeaderModifier:\n"
        f"{indent}    add:\n{indent}    - name: Set-Cookie\n"
        f"{indent}      value: {json.dumps(value)}\n"
    )


def expired_cookie(r: Rollout) -> tuple[str, CookieAttributes]:
    """The cookie (``NAME=VALUE``) that *r*'s HTTPRoute deletes, of those
    a client may hold, and the attributes it was set with: once the
    rollout ended (rolled back or promoted), its own, whose holders then
    go where everyone goes (stable; after a promotion the canary, which
    is now every user's version, so the cookie says nothing any more);
    while mirrored, that of the rollout before it (its holders go to
    stable as everyone does, and no cookie of this one is handed out
    yet). A rollout that ended before its canary had a weight
    (:attr:`Rollout.had_weight`: rolled back or promoted during its
    mirrored intervals) handed out no cookie of its own: it goes on
    deleting the one before; "" none."""
    a = r.affinity
    if a is None:
        return "", PATH_ONLY
    if r.phase != "progressing" and r.had_weight:
        return a.pair, a.attributes
    if r.phase != "progressing" or r.mirrored:
        return a.previous, a.previous_attributes
    return "", PATH_ONLY


def route_rule_document(r: Rollout) -> str:
    """The canary's RouteRule for *r*'s weight (0-weight routes left out);
    mirrored (:attr:`Rollout.mirrored`), every request to stable and a
    ``mirror`` copying each to the canary (Istio 0.7's field: an
    IstioService whose labels pick the version)."""
    routes = [(r.stable, 100 - r.weight), (r.canary, r.weight)]
    body = "".join(
        # quoted (JSON is YAML): 1.10 is not the number 1.1, on not true
        f"  - labels:\n      version: {json.dumps(v)}\n    weight: {w}\n"
        for v, w in routes
        if w > 0
    )
    if r.mirrored:
        body += (
            f"  mirror:\n    name: {r.service}\n    labels:\n"
            f"      version: {json.dumps(r.canary)}\n"
        )
    phase = "mirrored" if r.mirrored else "A/B testing" if r.ab_testing else r.phase
    return (
        f"# Owned by 'l4proxy canary {r.service}' ({r.stable} -> {r.canary}, {phase}):\n"
        "# rewritten at every step; edits are overwritten. Remove it with the rollout's end.\n"
        "apiVersion: config.istio.io/v1alpha2\n"
        "kind: RouteRule\n"
        f"metadata:\n  name: {rule_name(r.service)}\n"
        f"spec:\n  destination:\n    name: {r.service}\n  precedence: 0\n  route:\n{body}"
    )


def match_document(r: Rollout, i: int, m: HeaderMatch) -> str:
    """The RouteRule of A/B testing's *i*-th alternative *m*: the requests
    it matches, every one to the canary."""
    return (
        f"# Owned by 'l4proxy canary {r.service}' ({r.stable} -> {r.canary}, A/B testing): "
        "removed at its end.\n"
        "apiVersion: config.istio.io/v1alpha2\n"
        "kind: RouteRule\n"
        f"metadata:\n  name: {match_rule_name(r.service, i)}\n"
        f"spec:\n  destination:\n    name: {r.service}\n"
        f"  precedence: {MATCH_PRECEDENCE}\n"
        # quoted (JSON is YAML): a header value or regex as it was given
        f"  match:\n    request:\n      headers:\n        {json.dumps(m.header)}:\n"
        f"          {m.kind}: {json.dumps(m.value)}\n"
        f"  route:\n  - labels:\n      version: {json.dumps(r.canary)}\n    weight: 100\n"
    )


def documents(r: Rollout) -> list[tuple[str, str]]:
    """(name, text) of each document the canary owns for *r*: the main one,
    then, while A/B testing, one per alternative (an HTTPRoute has them
    inside: its rules)."""
    out = [(rule_name(r.service), document(r))]
    if r.ab_testing and r.gateway is None:
        out += [
            (match_rule_name(r.service, i), match_document(r, i, m))
            for i, m in enumerate(r.match, 1)
        ]
    return out


def documents_text(r: Rollout) -> str:
    """The canary's documents as one file (``DIR/canary-SERVICE.yaml``, the
    ConfigMap key): the main one alone, or with the match documents after
    it, ``---`` between them."""
    return "---\n".join(text for _, text in documents(r))


_SEPARATOR = re.compile(r"(?m)^(---[ \t]*(?:#[^\n]*)?\n?)")


def splice(text: str, ours: str, name: str) -> str:
    """*text* with the document named *name* replaced by *ours* (appended
    when absent); every other document keeps its bytes."""
    return splice_documents(text, [(name, ours)], lambda n: n == name)


def splice_documents(
    text: str,
    ours: Sequence[tuple[str, str]],
    owned: Callable[[str], bool],
    kind: str = "RouteRule",
    namespace: str = "default",
) -> str:
    """*text* with each of *ours* (name, document) replacing the document of
    that *kind* and name in place (appended, in order, when absent), and
    every other RouteRule or HTTPRoute whose name is *owned* removed with
    one separator (the one before it; the first document's, the one after
    it): the match documents of an A/B test that ended, and the canary's
    document of the other kind (a rollout run in the other mode before).
    Only documents of *namespace* (the rules' namespace, where ours are) are
    replaced or removed: one of another namespace is another object,
    whatever its name. Every other document keeps its bytes."""
    parts = _SEPARATOR.split(text)  # doc, sep, doc, sep, ...
    # (the separator before it, the document): the first has none
    items = [("", parts[0])] + [(parts[i], parts[i + 1]) for i in range(1, len(parts), 2)]
    wanted = dict(ours)
    placed: set[str] = set()
    kept: list[tuple[str, str]] = []
    dropped_first = False
    for sep, segment in items:
        if dropped_first and not kept:
            sep = ""  # the document that comes first now
        found = _owned_kind_name(segment, namespace)
        name = None if found is None else found[1]
        if found is not None and found[0] == kind and found[1] in wanted and name not in placed:
            placed.add(found[1])
            kept.append((sep, wanted[found[1]]))
        elif name is not None and owned(name):
            dropped_first = dropped_first or not kept
        else:
            kept.append((sep, segment))
    out = "".join(sep + segment for sep, segment in kept)
    for name, doc in ours:
        if name in placed:
            continue
        if not out.strip():
            out = doc
        else:
            sep = "" if out.endswith("\n") else "\n"
            out += f"{sep}---\n{doc}"
    return out


def _owned_kind_name(segment: str, namespace: str) -> tuple[str, str] | None:
    """The kind and name of the RouteRule or HTTPRoute that *segment* is,
    where it is one of *namespace* (the rules' namespace, that of a
    document without ``metadata.namespace``, as the canary's are written);
    None: another document, or one of another namespace, which is never the
    canary's whatever its name."""
    try:
        doc = yaml.safe_load(segment)
    except yaml.YAMLError:
        return None
    if (
        isinstance(doc, dict)
        and doc.get("kind") in ("RouteRule", "HTTPRoute")
        and isinstance(doc.get("metadata"), dict)
        and isinstance(doc["metadata"].get("name"), str)
        and namespace_of(doc["metadata"], namespace) == namespace
    ):
        return str(doc["kind"]), str(doc["metadata"]["name"])
    return None


def namespace_of(metadata: object, default: str) -> str:
    """A document's namespace as the loader takes it: ``metadata.namespace``,
    or *default* (the namespace the rules are loaded in) without one."""
    ns = metadata.get("namespace") if isinstance(metadata, dict) else None
    return ns if isinstance(ns, str) and ns else default


# A parentRef's group where it names none (a Gateway's), as the loader reads it
GATEWAY_GROUP = "gateway.networking.k8s.io"


@dataclass(frozen=True)
class ParentRef:
    """An HTTPRoute's parentRef as the Gateway API resolves it: *group*
    (``gateway.networking.k8s.io`` where absent; ``""``, written ``""`` or
    ``core``, for a Service), *kind* (``Gateway`` where absent), *namespace*
    (the route's where absent) and *name*; *section* (``sectionName``) and
    *port* narrow it to some listeners or one port (None: all)."""

    group: str
    kind: str
    namespace: str
    name: str
    section: str | None = None
    port: int | None = None

    @classmethod
    def of(cls, ref: object, route_namespace: str) -> ParentRef | None:
        """*ref* as read from a route of *route_namespace*; None where it is
        no parentRef (the loader says what is wrong with it)."""
        if not isinstance(ref, dict) or not isinstance(ref.get("name"), str):
            return None
        group = ref.get("group", GATEWAY_GROUP)
        section, port = ref.get("sectionName"), ref.get("port")
        return cls(
            "" if group in ("core", None) else str(group),
            str(ref.get("kind", "Gateway")),
            namespace_of(ref, route_namespace),
            ref["name"],
            section if isinstance(section, str) else None,
            port if isinstance(port, int) and not isinstance(port, bool) else None,
        )

    @property
    def service(self) -> bool:
        return (self.group, self.kind) == ("", "Service")

    def meets(self, other: ParentRef) -> bool:
        """Whether routes of both parents can take the same requests: one
        parent (group, kind, namespace, name), and no sectionName or port
        that keeps them apart (one side without it attaches to all of the
        other's listeners or ports; both with it, only where they are
        equal). A Gateway's sectionName and port are not compared with each
        other: which listener a port selects is the Gateway's to say, and
        such a pair is taken to meet."""
        return (
            (self.group, self.kind, self.namespace, self.name)
            == (other.group, other.kind, other.namespace, other.name)
            and (self.section is None or other.section is None or self.section == other.section)
            and (self.port is None or other.port is None or self.port == other.port)
        )


def canary_parents(
    service: str, namespace: str, port: int | None, gateways: Sequence[str]
) -> list[ParentRef]:
    """The parents of the canary's HTTPRoute (:func:`http_route_document`)
    as resolved: SERVICE's Service on *port* (None: every port, as a
    RouteRule routes its host) and each Gateway of *gateways*, all in
    *namespace* (the document has no ``metadata.namespace``, nor its
    parentRefs a namespace), the Gateways with no sectionName or port:
    every listener. The canary's HTTPRoute has no ``hostnames`` either, so
    on each listener it takes every host the listener takes."""
    short = service.split(".", 1)[0]
    return [ParentRef("", "Service", namespace, short, port=port)] + [
        ParentRef(GATEWAY_GROUP, "Gateway", namespace, name) for name in gateways
    ]


def competing(
    files: Sequence[str],
    service: str,
    own: str,
    name: str,
    gateway_api: bool = False,
    gateways: Sequence[str] = (),
    *,
    namespace: str = "default",
    domain: str = "cluster.local",
    port: int | None = None,
) -> list[str]:
    """The user's rules that route SERVICE for every request (file:line: what).

    Names are resolved as the loader resolves them (:func:`fqdn`), in
    *namespace* (the rules' namespace, where the canary's documents are)
    and *domain*: a document's namespace is its ``metadata.namespace``,
    else *namespace*; a RouteRule routes ``destination.name`` in
    ``destination.namespace`` (else its own); a VirtualService's host
    without a dot is a Service of its own namespace, ``NAME.NS.svc`` that
    Service too, and any other host with a dot is taken as written, as
    Istio takes it (``ResolveShortnameToFQDN``): ``bootcamp.default`` is
    the host ``bootcamp.default``, which the sidecars route only once a
    ServiceEntry names it, never SERVICE's. So a rule for a same-named
    service of another namespace, or for such a host, routes another host
    and never competes.

    *gateway_api* (our document an HTTPRoute): an HTTPRoute one of whose
    parents meets one of ours (:func:`canary_parents`, :meth:`ParentRef.meets`:
    SERVICE's Service on *port*, each of *gateways*) competes only where
    one of its rules has no match (or an empty one: every request); one
    whose every rule matches something keeps those requests beside ours,
    ranked by the API's precedence. Without it every HTTPRoute on SERVICE's
    Service competes with our RouteRule, on any port (the loader refuses a
    host routed by two APIs). A route on SERVICE's Service from another
    namespace is a consumer route, which routes that namespace's clients
    alone (GAMMA; the loader leaves it out), and competes with neither.

    A parentRef on one of our Gateways competes only where the loader
    attaches it (:func:`unattached_refs`): a route that no listener of its
    ``sectionName`` or ``port`` admits (``allowedRoutes.namespaces.from``
    is ``Same`` by default: a route of another namespace attaches only to
    a listener with ``All``), or whose hostnames meet none of theirs, is
    not served there and competes with nothing. Ours has no sectionName,
    port or hostnames and is of the Gateway's namespace, so it is on every
    listener and every host of it: a route attached anywhere on it meets
    ours. Where the loader cannot tell, the route is taken to attach (as
    its parentRef's name alone says): a Gateway not in *files*, or files
    that do not load (a listener's ``from: Selector``, whose namespace
    labels no file holds, or ``allowedRoutes.kinds`` without HTTPRoute:
    both refused by the loader, so that no rollout runs beside them).

    Ours, of either kind, in *own* and of *namespace* (its name alone does
    not make it ours: a document of that name in another namespace is
    another object, the user's), never competes."""
    out: list[str] = []
    short = service.split(".", 1)[0]
    host = f"{short}.{namespace}.svc.{domain}"
    env = Env(namespace, domain)
    ours = canary_parents(service, namespace, port if gateway_api else None, gateways)
    parsed: list[tuple[str, list[Document]]] = []
    for f in files:
        try:
            parsed.append((f, list(parse_documents(read_file(f), f))))
        except (Unreadable, SourceProblem):
            continue  # the validation that follows says what is wrong with it
    # the Gateway API's Gateways in the files: the loader's verdict on a
    # parentRef to one of them is known, one to another is not
    known = {
        (namespace_of(d.value.get("metadata"), namespace), d.value["metadata"]["name"])
        for _, docs in parsed
        for d in docs
        if isinstance(d.value, dict)
        and d.value.get("kind") == "Gateway"
        and str(d.value.get("apiVersion", "")).startswith(f"{GATEWAY_GROUP}/")
        and isinstance(d.value.get("metadata"), dict)
        and isinstance(d.value["metadata"].get("name"), str)
    }
    verdict: list[frozenset[RouteParentRef] | None] = []  # loaded once, where asked

    def attaches(ref: RouteParentRef, p: ParentRef) -> bool:
        """Whether the parentRef *ref* (resolved *p*, a Gateway) is attached
        by the loader: not where it was warned of (reason UNATTACHED)."""
        if (p.namespace, p.name) not in known:
            return True
        if not verdict:
            verdict.append(unattached_refs(files, namespace, domain))
        warned = verdict[0]
        return warned is None or ref not in warned

    for f, docs in parsed:
        for d in docs:
            v = d.value
            if not isinstance(v, dict):
                continue
            meta: dict[str, Any] = v["metadata"] if isinstance(v.get("metadata"), dict) else {}
            spec: dict[str, Any] = v["spec"] if isinstance(v.get("spec"), dict) else {}
            kind, obj = v.get("kind"), f"{v.get('kind')} {meta.get('name')}"
            doc_ns = namespace_of(meta, namespace)
            if (
                f == own
                and kind in ("RouteRule", "HTTPRoute")
                and meta.get("name") == name
                and doc_ns == namespace
            ):
                continue  # ours (an A/B test's match documents have a match: never compete)
            if kind == "RouteRule":
                dest: dict[str, Any] = spec.get("destination") or {}
                dest = dest if isinstance(dest, dict) else {}
                dest_domain = dest.get("domain")
                routes_it = (
                    dest.get("name") == short
                    and namespace_of(dest, doc_ns) == namespace
                    and (
                        not isinstance(dest_domain, str)
                        or dest_domain.lower().rstrip(".") == domain
                    )
                )
                if routes_it and not spec.get("match"):
                    out.append(f"{f}:{d.line}: {obj} routes every request of {short}")
            elif kind == "VirtualService":
                hosts = spec.get("hosts")
                if isinstance(hosts, list) and any(
                    isinstance(h, str) and fqdn(h, doc_ns, env) == host for h in hosts
                ):
                    out.append(f"{f}:{d.line}: {obj} routes host {short}")
            elif kind == "HTTPRoute":
                refs = spec.get("parentRefs")
                refs = refs if isinstance(refs, list) else []
                met = []
                for i, ref in enumerate(refs):
                    p = ParentRef.of(ref, doc_ns)
                    if (
                        p is not None
                        # a consumer route (another namespace's) routes its clients alone
                        and not (p.service and doc_ns != namespace)
                        and any(p.meets(o) for o in ours)
                        and (
                            p.service
                            or attaches(RouteParentRef(doc_ns, str(meta.get("name")), i), p)
                        )
                    ):
                        met.append(p)
                parent = any(p.service for p in met)
                gateway = next((p.name for p in met if not p.service), None)
                every = any(_every_request(rule) for rule in spec.get("rules") or [])
                if parent and not gateway_api:
                    out.append(f"{f}:{d.line}: {obj} routes Service {short}")
                elif parent and every:
                    out.append(f"{f}:{d.line}: {obj} routes every request of Service {short}")
                elif gateway is not None and every:
                    out.append(f"{f}:{d.line}: {obj} routes every request of Gateway {gateway}")
    return out


def unattached_refs(
    files: Sequence[str], namespace: str, domain: str
) -> frozenset[RouteParentRef] | None:
    """The loader's verdict on the parentRefs of *files*, loaded as a
    sidecar loads them: those that attach to nothing (its warnings of
    reason UNATTACHED, :mod:`l4proxy.rules._gateway_api`, each naming its
    route and index in ``spec.parentRefs``; a route's namespace and name
    are one object's, duplicates being an error). None where the files do
    not load: then no verdict is known."""
    try:
        result = load_rules(list(files), namespace=namespace, domain=domain)
    except ConfigError:  # (ConfigUnreadable too)
        return None
    return frozenset(
        d.parent_ref for d in result.notes if d.reason == UNATTACHED and d.parent_ref is not None
    )


def _every_request(rule: object) -> bool:
    """Whether an HTTPRoute rule matches every request: no ``matches`` (the
    API's default, PathPrefix ``/``), or a match that tests nothing but
    PathPrefix ``/``."""
    if not isinstance(rule, dict):
        return False
    matches = rule.get("matches")
    if not matches:
        return True
    if not isinstance(matches, list):
        return False
    for m in matches:
        if not isinstance(m, dict):
            continue
        path = m.get("path")
        tests = {k for k in m if k != "path"}
        every_path = path is None or (
            isinstance(path, dict)
            and path.get("type", "PathPrefix") == "PathPrefix"
            and path.get("value", "/") == "/"
        )
        if every_path and not tests:
            return True
    return False


def _write_atomic(path: str, text: str) -> None:
    """Through apply's installer: temp+fsync+rename."""
    apply._install(text.encode(), path)


def at_words(r: Rollout) -> str:
    """Where a rollout's documents route, for an error: ``at weight 25``,
    ``while mirrored`` (weight 0, and a mirror), ``while A/B testing``."""
    if r.ab_testing:
        return "while A/B testing"
    if r.mirrored:
        return "while mirrored (weight 0, every request copied to the canary)"
    return f"at weight {r.weight}"


def check_matches(r: Rollout, namespace: str, domain: str) -> None:
    """Refuse *r*'s ``--match`` alternatives that a sidecar would refuse (a
    header name that is not one, a regex that is not RE2's), before
    anything is written: its match documents alone, loaded as a sidecar
    loads rules; the error names the option. In Gateway API mode each
    alternative alone, as an HTTPRoute rule, beside a registry of its own
    (SERVICE and the two backends) so that nothing else can fail."""
    if r.gateway is not None:
        _check_gateway_matches(r, namespace, domain)
        return
    names = {match_rule_name(r.service, i): m for i, m in enumerate(r.match, 1)}
    with tempfile.TemporaryDirectory(prefix="l4proxy-canary-") as tmp:
        path = os.path.join(tmp, "match.yaml")
        with open(path, "w") as f:
            f.write("---\n".join(text for name, text in documents(r) if name in names))
        try:
            load_rules([tmp], namespace=namespace, domain=domain)
        except ConfigError as exc:
            d = next((d for d in exc.diagnostics if d.severity == "error"), None)
            m = names.get(d.name or "") if d is not None else None
            raise CanaryError(
                f"--match {m}: {d.message}" if d is not None and m is not None else str(exc)
            ) from exc


def _check_gateway_matches(r: Rollout, namespace: str, domain: str) -> None:
    assert r.gateway is not None
    for m in r.match:
        if m.header in PSEUDO_HEADERS:
            raise CanaryError(
                f"--match {m}: with --gateway-api a match is on a request header; {m.header} "
                "is one of a RouteRule's request attributes (uri, method, scheme, authority), "
                "which an HTTPRoute matches otherwise (path, method): match a header"
            )
    port = r.gateway.port
    registry = "".join(
        "---\napiVersion: networking.istio.io/v1alpha3\nkind: ServiceEntry\n"
        f"metadata: {{name: {json.dumps(f'probe-{i}')}}}\n"
        f"spec:\n  hosts: [{json.dumps(f'{host}.{namespace}.svc.{domain}')}]\n"
        f"  ports: [{{number: {port}, name: http, protocol: HTTP}}]\n"
        "  endpoints: [{address: 127.0.0.1}]\n"
        for i, host in enumerate((r.service.split(".", 1)[0], r.stable, r.canary))
    )
    for m in r.match:
        alone = replace(r, gateway=replace(r.gateway, gateways=()), match=(m,))
        with tempfile.TemporaryDirectory(prefix="l4proxy-canary-") as tmp:
            with open(os.path.join(tmp, "match.yaml"), "w") as f:
                f.write(http_route_document(alone) + registry)
            try:
                load_rules([tmp], namespace=namespace, domain=domain)
            except ConfigError as exc:
                d = next((d for d in exc.diagnostics if d.severity == "error"), None)
                raise CanaryError(f"--match {m}: {d.message if d else exc}") from exc


def first_error(exc: ConfigError) -> str:
    """The first error of a refused rule set, as the user reads it."""
    return next((str(d) for d in exc.diagnostics if d.severity == "error"), "")


class _Any:
    def __repr__(self) -> str:
        return "ANY"


ANY: Any = _Any()  # commit(..., expected=ANY): whatever the state is now


def stored_as(current: Rollout | None, expected: Rollout | None) -> bool:
    """Whether the stored rollout *current* is *expected*, the command that
    holds it included: a rollout taken over by another command (the same
    stage, another :class:`~l4proxy.canary._analysis.Owner`) is not the one
    its former holder wrote, and a write of that holder's expecting it is
    refused (:class:`Superseded`). (``Rollout``'s own equality leaves the
    owner out: two states that differ in it alone are the same rollout.)"""
    if current is None or expected is None:
        return current is expected
    return current == expected and current.owner == expected.owner


class Superseded(Exception):
    """The stored rollout is not the one this run last wrote: an abort or a
    promote by hand (or a second controller) came in between."""

    def __init__(self, current: Rollout | None) -> None:
        now = "its state was removed" if current is None else f"now {rollout_words(current)}"
        super().__init__(f"the rollout changed meanwhile ({now})")
        self.current = current
        # the rollout as its writer last wrote it, where the caller does
        # not know it (a waiting start's: _before_start)
        self.ours: Rollout | None = None


class RulesWriter:
    """Installs the canary's document; validates the result first."""

    def __init__(self, paths: Paths, service: str, namespace: str, domain: str) -> None:
        self.paths = paths
        self.service = service
        self.namespace = namespace
        self.domain = domain
        # --dry-run: nothing is written, the directory's lock file not even
        # made (its reads take the lock shared, where there is one)
        self.read_only = False

    def _lock(self) -> contextlib.AbstractContextManager[None]:
        """The directory's lock for a read: apply's (made where missing), or
        with :attr:`read_only` a shared one of the lock file there is (none
        where there is none: nothing is made)."""
        if self.read_only:
            return _shared_lock(self.paths.directory)
        return apply._locked(self.paths.directory)

    def others(self) -> list[str]:
        if not self.paths.is_dir:
            return [self.paths.document]
        files, unreadable = rule_files([self.paths.directory], Report())
        if unreadable:
            raise CanaryError(f"{self.paths.directory}: {unreadable[0].message}")
        return [f for f in files if f != self.paths.document]

    def check_competing(
        self, gateway_api: bool = False, gateways: Sequence[str] = (), port: int | None = None
    ) -> None:
        self.check_other_form()
        found = competing(
            self.others(),
            self.service,
            self.paths.document,
            rule_name(self.service),
            gateway_api,
            gateways,
            namespace=self.namespace,
            domain=self.domain,
            port=port,
        )
        if found:
            kind = "HTTPRoute" if gateway_api else "RouteRule"
            raise CanaryError(
                f"{found[0]}\n  l4proxy canary routes {self.service} through its own {kind} "
                f"{rule_name(self.service)}, and a rule without a match would compete with it: "
                "delete that rule (l4proxy delete -f FILE), or give it a match so it takes only "
                "the requests it names; then run this again"
            )

    def check_other_form(self) -> None:
        """Refuse a second canary document of SERVICE in one directory.

        ``--rules DIR`` and ``--rules DIR/FILE`` share the directory's state
        file, and each writes its own document: ``DIR/canary-SERVICE.yaml``
        for the one, a RouteRule ``canary-SERVICE`` in FILE for the other.
        Run once each way, DIR held both, and the sidecars watching it
        refused the duplicate name (every change after that unloaded)."""
        main = rule_name(self.service)
        directory = self.paths.directory
        if not self.paths.is_dir:
            other = os.path.join(directory, f"{main}.yaml")
            if os.path.exists(other) and not os.path.samefile(other, self.paths.document):
                raise CanaryError(
                    f"{other} holds the canary's RouteRule {main} (a rollout run with "
                    f"--rules {directory}), and --rules {self.paths.rules} would add a second "
                    f"one to {self.paths.rules}: two of that name in {directory}, which the "
                    f"sidecars refuse. Run it with --rules {directory}, or, once that "
                    f"rollout has ended, remove {other} first"
                )
            return
        for f in self.others():
            try:
                docs = list(parse_documents(read_file(f), f))
            except (Unreadable, SourceProblem):
                continue  # the validation says what is wrong with it
            for d in docs:
                v = d.value
                if not isinstance(v, dict) or v.get("kind") not in ("RouteRule", "HTTPRoute"):
                    continue
                meta = v.get("metadata")
                name = meta.get("name") if isinstance(meta, dict) else None
                # (one of another namespace is another object: the user's)
                if canary_owns(main, name) and namespace_of(meta, self.namespace) == (
                    self.namespace
                ):
                    raise CanaryError(
                        f"{f}:{d.line}: {v.get('kind')} {name} is the canary's (a rollout run with "
                        f"--rules {f}), and --rules {self.paths.rules} would write another in "
                        f"{self.paths.document}: two of that name in {directory}, which the "
                        f"sidecars refuse. Run it with --rules {f}, or, once that rollout has "
                        f"ended, remove {name} from {f} first (l4proxy delete -f FILE)"
                    )

    def install(self, r: Rollout) -> bool:
        with apply._locked(self.paths.directory):
            return self.install_locked(r)

    def _spliced(self, r: Rollout) -> str:
        """The user's rules file with our documents in it (the rest kept,
        the match documents of an A/B test that ended removed)."""
        doc = self.paths.document
        main = rule_name(self.service)
        try:
            return splice_documents(
                read_file(doc),
                documents(r),
                lambda name: canary_owns(main, name),
                "RouteRule" if r.gateway is None else "HTTPRoute",
                self.namespace,
            )
        except (Unreadable, SourceProblem) as exc:
            raise CanaryError(f"{doc}: cannot read: {exc}") from exc

    def install_locked(self, r: Rollout) -> bool:
        """install() with the directory's lock held by the caller.

        A rollback is written whatever the other files hold: refused (a
        broken file beside ours, a competing rule), the sidecars went on
        serving the canary's weight, and once that file was fixed they
        loaded our old document again. Ours alone is valid by construction."""
        doc = self.paths.document
        rollback = r.phase == "rolled_back"
        new_text = self._checked_text(r)
        if self._holds(new_text):
            return False
        cand = os.path.join(self.paths.directory, f".{os.path.basename(doc)}.validate")
        with open(cand, "w") as f:
            f.write(new_text)
        try:
            if not rollback:
                self._load_as(r, cand)
            apply._install(new_text.encode(), doc)  # (the text checked)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(cand)
        return True

    def would_install(self, r: Rollout) -> None:
        """What :meth:`install` refuses of *r*, refused alike (the same
        errors), with nothing written: the candidate loaded from a
        directory of its own (``--dry-run``)."""
        new_text = self._checked_text(r)
        if r.phase == "rolled_back" or self._holds(new_text):
            return
        with self._lock(), tempfile.TemporaryDirectory(prefix="l4proxy-canary-") as tmp:
            cand = os.path.join(tmp, f".{os.path.basename(self.paths.document)}.validate")
            with open(cand, "w") as f:
                f.write(new_text)
            self._load_as(r, cand)

    def _checked_text(self, r: Rollout) -> str:
        """The text of our document's file with *r*'s documents, once no
        rule of the user's competes with them (a rollback: whatever does)."""
        if r.phase != "rolled_back":
            g = r.gateway
            self.check_competing(
                g is not None, g.gateways if g is not None else (), g.port if g else None
            )
        return documents_text(r) if self.paths.is_dir else self._spliced(r)

    def _load_as(self, r: Rollout, cand: str) -> None:
        """Load the rules as a sidecar would with *cand* (a candidate of our
        document's file, *r*'s) in its place; refused: :class:`CanaryError`,
        naming our document."""
        doc = self.paths.document
        keep = [f for f in self.others() if f != doc] if self.paths.is_dir else []
        try:
            load_rules([*keep, cand], namespace=self.namespace, domain=self.domain)
        except ConfigUnreadable as exc:
            raise CanaryError(str(exc)) from exc
        except ConfigError as exc:
            raise CanaryError(
                f"refused: the rules would be invalid {at_words(r)}: "
                f"{first_error(exc).replace(cand, doc)}"
            ) from exc

    def table(self, r: Rollout | None) -> RouteTable:
        """The rules as a sidecar would load them with *r*'s documents
        written (None: as they are): the registry the Gateway API mode's
        port and metric labels come from. Refused: :class:`CanaryError`."""
        with self._lock():
            if r is None:
                files = self.others() if self.paths.is_dir else [self.paths.document]
                return _load_table(files, self.namespace, self.domain, lambda t: t)
            new_text = documents_text(r) if self.paths.is_dir else self._spliced(r)
            keep = self.others() if self.paths.is_dir else []
            with tempfile.TemporaryDirectory(prefix="l4proxy-canary-") as tmp:
                cand = os.path.join(tmp, os.path.basename(self.paths.document))
                with open(cand, "w") as f:
                    f.write(new_text)
                return _load_table(
                    [*keep, cand],
                    self.namespace,
                    self.domain,
                    lambda t: t.replace(cand, self.paths.document),
                    ours=cand,
                )

    def edited(self, r: Rollout) -> str:
        """Why the canary's documents are not as this command wrote them for
        *r* (edited by hand, removed, another rollout's); "" where they are.
        With a rules FILE only ours are compared: the user's documents
        beside them are theirs to edit."""
        doc = self.paths.document
        try:
            expected = documents_text(r) if self.paths.is_dir else self._spliced(r)
        except CanaryError as exc:
            return f"{doc}: the canary's document cannot be read ({exc})"
        if self._holds(expected):
            return ""
        if not os.path.exists(doc):
            return f"{doc} was removed under the canary (it routed {at_words(r)})"
        return f"{doc} was changed under the canary (it routed {at_words(r)})"

    def _holds(self, text: str) -> bool:
        """Whether our document's file holds *text* already (a resume at the
        same weight): then nothing is written, and no reload is waited for."""
        try:
            with open(self.paths.document) as f:
                return f.read() == text
        except OSError:
            return False


@contextlib.contextmanager
def _shared_lock(directory: str) -> Iterator[None]:
    """The rules directory's lock (apply's), taken shared, where its lock
    file is there; none where it is not, which is not made: a reader that
    writes nothing (``--dry-run``) waits for a write under way, and leaves
    the directory as it found it."""
    try:
        fd = os.open(os.path.join(directory, apply.LOCK_NAME), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def _load_table(
    files: Sequence[str],
    namespace: str,
    domain: str,
    relabel: Callable[[str], str],
    ours: str | None = None,
) -> RouteTable:
    """The table of *files*; refused (:class:`CanaryError`) when they are
    invalid, or when a parentRef of our document (the file *ours*) attaches
    to nothing (a warning of reason UNATTACHED: a Gateway not in the files,
    no listener of its sectionName or port, none that admits the route): a
    user's route is then not served, and the rules load, but our route must
    reach every parent it names."""
    try:
        result = load_rules(list(files), namespace=namespace, domain=domain)
    except ConfigUnreadable as exc:
        raise CanaryError(relabel(str(exc))) from exc
    except ConfigError as exc:
        raise CanaryError(f"refused: the rules are invalid: {relabel(first_error(exc))}") from exc
    refuse_unattached(result.notes, ours, relabel)
    return result.table


def refuse_unattached(
    notes: Sequence[Diagnostic], ours: str | None, relabel: Callable[[str], str]
) -> None:
    """Raise :class:`CanaryError` where *notes* (a load's) warn of a
    parentRef of our document (the file *ours*) that attaches to nothing
    (its reason UNATTACHED); its cause a ConfigError of that one, an error."""
    for d in notes:
        if d.file == ours and d.reason == UNATTACHED:
            raise CanaryError(
                f"refused: our HTTPRoute would not be served: {relabel(str(d))}"
            ) from ConfigError([replace(d, severity="error")])


def service_port(table: RouteTable, service: str, namespace: str, domain: str) -> int:
    """``--gateway-api`` without ``--port``: SERVICE's one port in the
    registry (its ServiceEntry); none, or several: an error naming --port."""
    host = service_host(service, namespace, domain)
    svc = table.service(host)
    if svc is None:
        raise CanaryError(
            f"--gateway-api: no ServiceEntry for {host} in the rules, so SERVICE's port is not "
            "known: give --port PORT (the port of the HTTPRoute's parent and backends)"
        )
    ports = sorted(p.number for p in svc.ports)
    if len(ports) != 1:
        raise CanaryError(
            f"--gateway-api: {host} has ports {', '.join(map(str, ports))}: give --port PORT "
            "(the one the HTTPRoute routes, its backends' too)"
        )
    return ports[0]


def check_port(table: RouteTable, service: str, port: int, namespace: str, domain: str) -> None:
    """``--port`` given: refuse one that SERVICE's ServiceEntry does not
    have (the loader would say so of a backend, in a document not written)."""
    svc = table.service(service_host(service, namespace, domain))
    if svc is not None and svc.port(port) is None:
        ports = ", ".join(str(p.number) for p in sorted(svc.ports, key=lambda p: p.number))
        raise CanaryError(
            f"--port {port}: not a port of {service} ({svc.host} has {ports}): give one of "
            "those, the port the HTTPRoute routes (its backends' too), or leave it out"
        )


def probe_table(store: Store, probe: Rollout) -> RouteTable:
    """The rules with *probe*'s HTTPRoute, for :func:`backend_targets`.

    Refused, the loader's error would name our document, never written; the
    option at fault is found instead by loading it without each in turn:
    its Gateways (``--gateway``), then a backend (``--stable``,
    ``--canary``)."""
    g = probe.gateway
    assert g is not None
    try:
        return store.table(probe)
    except CanaryError as exc:
        short = probe.service.split(".", 1)[0]
        try:
            store.table(replace(probe, gateway=replace(g, gateways=())))
        except CanaryError as without:
            message = _message(without)
            for flag, name in (("--stable", probe.stable), ("--canary", probe.canary)):
                if f"backendRef {name} resolves to nothing" in message:
                    raise CanaryError(
                        f"{flag} {name}: no Service {name} in the rules (with --gateway-api, "
                        f"--stable and --canary name Services, e.g. {short}-{name}): {message}"
                    ) from exc
            raise
        for gw in g.gateways:
            try:
                store.table(replace(probe, gateway=replace(g, gateways=(gw,))))
            except CanaryError as one:
                message = _message(one)
                what = "no such Gateway in the rules" if "unknown parent" in message else message
                raise CanaryError(f"--gateway {gw}: {what} ({message})") from exc
        raise


def _message(exc: CanaryError) -> str:
    """A refusal's first error without its place (our document's, not
    written), where the loader's error is at hand."""
    cause = exc.__cause__
    if isinstance(cause, ConfigError):
        d = next((d for d in cause.diagnostics if d.severity == "error"), None)
        if d is not None:
            return d.message
    return str(exc)


def service_host(service: str, namespace: str, domain: str) -> str:
    """SERVICE's host in the registry: as given when it has a dot, else
    ``SERVICE.NAMESPACE.svc.DOMAIN``."""
    return service if "." in service else f"{service}.{namespace}.svc.{domain}"


def check_registered(table: RouteTable, service: str, namespace: str, domain: str) -> None:
    """SERVICE must be a service of the rules (a ServiceEntry's host, or a
    name of it): a rollout of a name no ServiceEntry describes (a typo)
    wrote its RouteRule, which validates with a warning, and then halted
    for want of requests until --progress-deadline rolled it back."""
    names = {service, service_host(service, namespace, domain)}
    if any(names & {svc.host, *svc.aliases} for svc in table.services()):
        return
    known = sorted(svc.host for svc in table.services())
    shown = ", ".join(known[:10]) + (f", ... ({len(known)} in all)" if len(known) > 10 else "")
    raise CanaryError(
        f"{service}: no ServiceEntry for {service_host(service, namespace, domain)} in the "
        f"rules, so no request can go to it (the services: {shown or 'none'}); check the "
        "name, or add its ServiceEntry"
    )


def backend_targets(
    table: RouteTable, r: Rollout, namespace: str, domain: str
) -> dict[str, tuple[str, str]]:
    """Gateway API mode: for the stable and the canary backend, the
    (``destination_service_name``, ``destination_version``) that the
    sidecars' metrics give its requests, from *r*'s own HTTPRoute rule in a
    *table* loaded with it at 50/50, never from whatever route a request
    would take (:meth:`RouteTable.choices`, as the worker labels a
    choice: ``_subset_tag``, :func:`version_and_workload`). The registry
    decides: a backend with a ServiceEntry of its own reports its own name
    (``bootcamp-v2``) and its endpoints' ``version`` label (else the subset's
    name, ``default``); a backend that is a DNS endpoint of SERVICE's
    ServiceEntry (deploy/kubernetes) reports SERVICE and that endpoint's
    ``version`` label, as a RouteRule's subset does. A backend that resolves
    to nothing, or two that report alike, is an error naming the option;
    so is one whose endpoints differ in version (a rolling update of that
    Service): the sidecars label each of its requests with the version of
    the pod that answered it (``Choice.endpoint_tags``), and one
    (name, version) would select a part of them (its ``unknown`` only
    what no pod answered)."""
    host = service_host(r.service, namespace, domain)
    svc = table.service(host)
    assert r.gateway is not None
    if svc is None:
        raise CanaryError(f"--gateway-api: no ServiceEntry for {host} in the rules")
    port = r.gateway.port
    # Our own route alone, found by its name: a probe request through the
    # whole table is taken by any user HTTPRoute that matches it (an Exact
    # path /, a method GET), which ranks above our rule without a match, and
    # its backends were then taken for ours (a canary judged on another
    # backend's requests).
    ours = [rt for rt in table.routes_for(host) if rt.name == rule_name(r.service)]
    alone = RouteTable(table.services(), {host: ours}, namespace=namespace, domain=domain)
    rc = alone.choices(svc, port, Request(path="/", authority=f"{r.service}:{port}"))
    out: dict[str, tuple[str, str]] = {}
    subsets = list(rc.subsets)
    for flag, name in (("--stable", r.stable), ("--canary", r.canary)):
        ws = subsets.pop(0) if subsets else None
        if ws is None or ws.service is None or not ws.endpoints:
            raise CanaryError(
                f"--gateway-api: {flag} {name}: the backend resolves to no endpoint in the "
                f"rules (no ServiceEntry host {name}.{namespace}.svc.{domain}, nor a DNS "
                "endpoint of that name): its requests would be answered 500 (with "
                "--gateway-api, --stable and --canary name Services, e.g. "
                f"{r.service.split('.', 1)[0]}-v2)"
            )
        if versions_differ(ws.endpoints):
            found = sorted({e.labels.get("version", "(none)") for e in ws.endpoints})
            raise CanaryError(
                f"--gateway-api: {flag} {name}: its endpoints differ in version label "
                f"({', '.join(found)}): the sidecars count each request under the version of "
                "the pod that answered it, and the analysis reads one version of each "
                "backend; give the backend's endpoints one version label (or wait until "
                "its own rollout has ended), then run this again"
            )
        version, _ = version_and_workload(ws.service.host, ws.subset, ws.endpoints)
        out[name] = (ws.service.host.split(".", 1)[0], version)
    if out[r.stable] == out[r.canary]:
        service, version = out[r.canary]
        raise CanaryError(
            f"--gateway-api: --stable {r.stable} and --canary {r.canary} are both reported as "
            f"{service} version {version}: the metrics could not tell them apart (give each "
            "version's endpoints their own version label)"
        )
    return out


class Store(Protocol):
    """Where a rollout lives: FileStore (--rules), canary_kube.ConfigMapStore (--configmap)."""

    service: str
    where: str
    # the file of the canary's document, as the sidecars name it at its end
    # (canary-SERVICE.yaml, or a rules FILE's name): Held
    document: str
    # seconds between the tries of a rollback (or promotion) that failed
    # with Transient; then it is given up, loudly (exit 2)
    end_retry: tuple[float, ...]

    def load_state(self) -> Rollout | None: ...
    def save_state(self, r: Rollout, expected: Rollout | None = ANY) -> None: ...
    def put_back(self, previous: Rollout | None, expected: Rollout) -> None: ...
    def install(self, r: Rollout) -> bool: ...
    # install()'s refusals of *r*, with nothing written (--dry-run)
    def would_install(self, r: Rollout) -> None: ...
    def commit(self, r: Rollout, expected: Rollout | None = ANY) -> bool: ...
    def edited(self, r: Rollout) -> str: ...
    def check_competing(
        self, *, gateway_api: bool = False, gateways: Sequence[str] = (), port: int | None = None
    ) -> None: ...
    def table(self, r: Rollout | None) -> RouteTable: ...


class FileStore:
    """Where the rollout lives with ``--rules``: the state file and the document.
    (``--configmap``: :class:`l4proxy.canary.kube.ConfigMapStore`, same methods.)

    An OSError (a full disk, an I/O error, a directory made read-only) is
    :class:`Transient`: a rollback is tried again for a few seconds."""

    end_retry: tuple[float, ...] = (0.1, 0.2, 0.5, 1.0, 2.0, 4.0)

    def __init__(self, paths: Paths, writer: RulesWriter) -> None:
        self.paths = paths
        self.writer = writer
        self.service = writer.service
        self.where = f"{paths.rules} ({paths.state})"
        self.document = paths.document

    def load_state(self) -> Rollout | None:
        return load_state(self.paths.state)

    def save_state(self, r: Rollout, expected: Rollout | None = ANY) -> None:
        try:
            with apply._locked(self.paths.directory):
                self._still(expected, r)
                save_state(self.paths.state, r)
        except OSError as exc:
            raise Transient(f"{self.paths.state}: cannot write it: {exc}") from exc

    def put_back(self, previous: Rollout | None, expected: Rollout) -> None:
        """The state as it was, *previous* (None: none), where it is still
        *expected* (a waiting start given up: nothing of it stays)."""
        try:
            with apply._locked(self.paths.directory):
                if not stored_as(load_state(self.paths.state), expected):
                    raise Superseded(load_state(self.paths.state))
                if previous is None:
                    os.unlink(self.paths.state)
                else:
                    save_state(self.paths.state, previous)
        except OSError as exc:
            raise Transient(f"{self.paths.state}: cannot write it: {exc}") from exc

    def install(self, r: Rollout) -> bool:
        return self.writer.install(r)

    def would_install(self, r: Rollout) -> None:
        self.writer.would_install(r)

    def edited(self, r: Rollout) -> str:
        return self.writer.edited(r)

    def commit(self, r: Rollout, expected: Rollout | None = ANY) -> bool:
        """State first, then the document (a crash between: resume rewrites
        it), under the directory's lock and only while the stored rollout is
        *expected* (else :class:`Superseded`: an abort typed meanwhile is not
        overwritten). A document refused, or not written, puts the state back."""
        try:
            with apply._locked(self.paths.directory):
                before = self._still(expected, r)
                save_state(self.paths.state, r)
                try:
                    return self.writer.install_locked(r)
                except (CanaryError, OSError):
                    if before is None:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(self.paths.state)
                    else:
                        save_state(self.paths.state, before)
                    raise
        except OSError as exc:
            raise Transient(f"{self.paths.rules}: cannot write it: {exc}") from exc

    def _still(self, expected: Rollout | None, r: Rollout) -> Rollout | None:
        current = load_state(self.paths.state)
        # *r* stored already: a try of this write that failed after the state
        # (and could not put it back)
        if expected is not ANY and not stored_as(current, expected) and not stored_as(current, r):
            raise Superseded(current)
        return current

    def check_competing(
        self, *, gateway_api: bool = False, gateways: Sequence[str] = (), port: int | None = None
    ) -> None:
        self.writer.check_competing(gateway_api, gateways, port)

    def table(self, r: Rollout | None) -> RouteTable:
        return self.writer.table(r)


def load_state(path: str) -> Rollout | None:
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return None
    try:
        return Rollout.from_json(json.loads(text))
    except ValueError as exc:
        raise CanaryError(
            f"{path}: {exc}; it is the canary's state: remove it to start over"
        ) from exc


def save_state(path: str, r: Rollout) -> None:
    _write_atomic(path, json.dumps(r.to_json(), indent=1) + "\n")


# -- metrics sources -------------------------------------------------------------
class SidecarMetrics:
    """``--metrics URL``...: deltas of the sidecars' own counters."""

    def __init__(self, urls: Sequence[str], service: str, get: Callable[[str], str] = http_get):
        self.urls = [stats_url(u) for u in urls]
        self.service = service
        self.get = get
        self.window = CounterWindow()
        self.marks: dict[str, RulesMark | None] = {}
        # a version's (destination_service_name, destination_version) where
        # it is not (SERVICE, the version): Gateway API mode's backends
        # (backend_targets)
        self.targets: dict[str, tuple[str, str]] = {}
        self.progress: Callable[[str], None] = _quiet  # while waiting (Display.progress)
        # the file of the canary's document (Store.document), and the rule
        # files each sidecar held back at its last read: see Held
        self.held = Held()

    def _read(self, mirrored: bool = False) -> dict[Series, float]:
        readings: dict[str, dict[Series, float]] = {}
        for url in self.urls:
            values, mark = read_sidecar(url, self.get(url), mirrored)
            readings[url] = values
            self.marks[url] = mark
            self.held.files[url] = held_files(values)
        return self.window.read(readings)

    def start_window(self, mirrored: bool = False) -> None:
        """A window starts now (*mirrored*: every sidecar must count copies)."""
        self._read(mirrored)

    def before_change(self) -> dict[str, RulesMark | None]:
        """The marks of the last read (the sample that decided the change, or
        the window's start): reading again would take the window's counts."""
        return dict(self.marks)

    def sample(
        self,
        version: str,
        interval: float,
        mirrored_from: str | None = None,
        stable: str | None = None,
    ) -> Sample:
        """The canary's requests since the window started; *mirrored_from*
        (stable, at a mirrored interval): its answers to the copies too.
        *stable* (not mirrored): the canary's share of the requests to it
        and to *stable* goes with it (:attr:`Sample.share`)."""
        mirrored = mirrored_from is not None
        deltas = self._read(mirrored)
        service, label = self.targets.get(version, (self.service, version))
        sample = totals_of(deltas, service, label, mirrored).sample()
        if not mirrored:
            if stable is not None:
                s_service, s_label = self.targets.get(stable, (self.service, stable))
                both = sample.requests + totals_of(deltas, s_service, s_label).requests
                if both > 0:
                    sample = replace(sample, share=100.0 * sample.requests / both)
            return sample
        # summed over the sidecars, as the copies are: a copy dropped (the
        # in-flight cap, the replay limit) is not judged, and a check on a
        # tenth of the copies should say so
        return replace(sample, copies_dropped=deltas.get((MIRROR_DROPPED, ()), 0.0))

    def wait_live(self, before: dict[str, RulesMark | None], timeout: float) -> None:
        """Until every sidecar serves the rules as they are now (its workers
        agree on files other than *before*'s: see RulesMark)."""
        deadline = time.monotonic() + timeout

        def late() -> list[str]:
            return [
                u
                for u in self.urls
                if (
                    (b := before.get(u)) is not None
                    and ((m := self.marks.get(u)) is None or not m.past(b))
                )
                or self.held.ours(u)
            ]

        start = time.monotonic()
        while True:
            self._read()
            waiting = late()
            if not waiting:
                self.held.warn(self.config_dump)
                return
            self.progress(
                f"waiting for the sidecars to serve the change: {time.monotonic() - start:.0f} s "
                f"of --wait-live {timeout:g} s ({waiting[0]} not yet)"
            )
            if time.monotonic() >= deadline:
                url = late()[0]
                if held := self.held.ours(url):
                    raise self.held.not_served(url, held, self.config_dump(url), timeout)
                mark = self.marks.get(url)
                gen = mark.generation if mark is not None else None
                after = f"{url} still serves rules generation {gen} {timeout:g} s after the change"
                why = self.last_error(url)
                if why:
                    raise NotLive(
                        f"{after} (--wait-live); its last error: {why}",
                        f"the sidecars still serve rules generation {gen}: {why}",
                    )
                raise NotLive(
                    f"{after} (--wait-live): is it watching these rules? (its /config_dump "
                    "says why it refused a change)",
                    f"the sidecars still serve rules generation {gen} {timeout:g} s after the "
                    "change (--wait-live)",
                )
            time.sleep(0.05)

    def refusing(self, since: float) -> NotLive | None:
        """Whether a sidecar refuses the rules as written since *since* (a
        time since the epoch: when the canary's document was last
        written), read now: it holds the canary's document back (its
        ``/stats``' :data:`~l4proxy.rules.watch.FILE_HELD`, or its
        ``/config_dump``'s ``held``), whatever it loaded since (another
        file's change is served beside the document as last loaded); or it
        has a ``last_error`` and the rules it serves were loaded before
        *since* (it refused the change as a whole: an l4proxy that loads
        its rules so, or files that do not load even with the broken ones
        held back). None: none does, or none could be asked; the files
        held back that are not the document are warned of (they do not
        keep it from being served)."""
        for url in self.urls:
            dump = self.config_dump(url)
            # what /stats said at the last read (of every worker), and what
            # /config_dump says now (of one)
            self.held.files[url] = tuple(sorted({*self.held.files.get(url, ()), *held_in(dump)}))
            if held := self.held.ours(url):
                return self.held.not_served(url, held, dump)
            why, loaded, gen = dump.get("last_error"), dump.get("loaded_at"), dump.get("generation")
            if isinstance(why, str) and why and isinstance(loaded, int | float) and loaded < since:
                return NotLive(
                    f"{url} serves rules generation {gen}, loaded before the canary's document "
                    f"was written, and refuses every change since: its last error: {why}",
                    f"the sidecars still serve rules generation {gen}: {why}",
                )
        self.held.warn(self.config_dump)
        return None

    def config_dump(self, url: str) -> dict[str, Any]:
        """The ``/config_dump`` of the sidecar at *url* (its ``/stats``);
        {} where its endpoint serves none (``--stats-listen``'s: /stats
        alone), or it cannot be read."""
        parts = urllib.parse.urlsplit(url)
        dump_url = urllib.parse.urlunsplit((parts.scheme, parts.netloc, "/config_dump", "", ""))
        try:
            dump = json.loads(self.get(dump_url))
        except (MetricsError, ValueError):
            return {}
        return dump if isinstance(dump, dict) else {}

    def last_error(self, url: str) -> str:
        """Why the sidecar at *url* (its ``/stats``) refused its last change:
        its ``/config_dump``'s ``last_error``; "" where it has none, or its
        endpoint serves no ``/config_dump`` or cannot be read."""
        why = self.config_dump(url).get("last_error")
        return why if isinstance(why, str) else ""


def held_in(dump: Mapping[str, Any]) -> list[str]:
    """The files a sidecar's ``/config_dump`` says it holds back (``held``:
    one worker's; [] from an l4proxy that loads its rules as a whole)."""
    held = dump.get("held")
    if not isinstance(held, list):
        return []
    return [h["file"] for h in held if isinstance(h, dict) and isinstance(h.get("file"), str)]


def held_errors(dump: Mapping[str, Any], file: str) -> str:
    """The errors a sidecar's ``/config_dump`` gives for the file it holds
    back that is *file* (by name: :func:`~l4proxy.canary._metrics.is_document`),
    joined; "" where it does not say."""
    for h in dump.get("held") or ():
        if isinstance(h, dict) and is_document(str(h.get("file", "")), file):
            errors = [e for e in h.get("errors") or () if isinstance(e, str)]
            return "; ".join(errors)
    return ""


@dataclass
class Held:
    """The rule files the sidecars hold back, and what that means for the
    canary.

    A sidecar loads its rules file by file: a file whose text as it is does
    not load is *held*, served at its last good version (or left out where
    it has none) while the others' changes go live (``l4proxy run``,
    :mod:`l4proxy.rules.watch`). Its rules digest then names the files as
    served, so another file's change moves it although the canary's own
    file is held: a mark past the one before the canary's write does not
    say that the write is served. So the canary's document held by a
    sidecar (*document*: its file, matched by name, :func:`is_document`)
    is never live, whatever the digest says (an end: NOT SERVED); another
    file held does not keep the document from being served, and is warned
    of, once a file (its errors, where ``/config_dump`` says them)."""

    document: str = ""
    files: dict[str, tuple[str, ...]] = field(default_factory=dict)  # per sidecar (target)
    err: TextIO | None = None
    warned: set[str] = field(default_factory=set)

    def ours(self, where: str) -> str:
        """The canary's document as *where* names it among the files it
        holds back; "" where it holds it not."""
        return next((f for f in self.files.get(where, ()) if is_document(f, self.document)), "")

    def not_served(
        self, where: str, file: str, dump: Mapping[str, Any], timeout: float | None = None
    ) -> NotLive:
        """*where* holds *file*, the canary's document, back."""
        why = held_errors(dump, file) or str(dump.get("last_error") or "")
        after = f" {timeout:g} s after the change (--wait-live)" if timeout is not None else ""
        because = f": {why}" if why else ""
        return NotLive(
            f"{where} holds {file} back{after}: it refuses the canary's document as written "
            f"and serves it as it last loaded it (or not at all){because}",
            f"the sidecars hold {file.rsplit('/', 1)[-1]} back, as last loaded{because}",
        )

    def warn(self, dump_of: Callable[[str], Mapping[str, Any]] | None = None) -> None:
        """Warn of each file held back that is not the document, once."""
        for where, files in self.files.items():
            for f in files:
                if is_document(f, self.document) or f in self.warned:
                    continue
                self.warned.add(f)
                why = held_errors(dump_of(where), f) if dump_of is not None else ""
                complain(
                    self.err,
                    f"warning: {where} holds {f} back (its text as it is refused"
                    + (f": {why}" if why else "")
                    + "), serving it as it last loaded it or not at all; the canary's document "
                    "is served beside it",
                )


class PrometheusMetrics:
    """``--prometheus URL``: Flagger's Istio queries, one instant each.

    Which rules the sidecars serve is read from the same Prometheus: each
    scrape target's ``l4proxy_rules_digest`` and ``l4proxy_rules_generation``
    (:func:`~l4proxy.canary._metrics.marks_query`: the targets that report
    requests to SERVICE), read just before a change (:meth:`before_change`)
    and then polled until every target is past its mark (:meth:`wait_live`).
    A check's window starts once the change is live (:meth:`sample`)."""

    POLL = 1.0  # seconds between two reads of the marks while waiting

    def __init__(
        self,
        base: str,
        service: str,
        reporter: str,
        get: Callable[[str], str] = http_get,
        err: TextIO | None = None,
        min_requests: int = 1,
    ):
        self.base = base
        self.service = service
        self.reporter = reporter
        self.get = get
        self.err = err
        self.min_requests = min_requests  # --min-requests: see copies_missing
        self.marks: dict[str, RulesMark | None] = {}
        self.targets: dict[str, tuple[str, str]] = {}  # as SidecarMetrics'
        self.unread = ""  # why the marks could not be read before the change
        self.warned: set[str] = set()
        # time.monotonic() from which the rules last written are live (or
        # presumed so): no check's window starts before it
        self.live_at: float | None = None
        self.progress: Callable[[str], None] = _quiet  # while waiting (Display.progress)
        # the rule files each target held back as last scraped (Held)
        self.held = Held(err=err)

    def _marks(self) -> dict[str, RulesMark | None]:
        services = dict.fromkeys([self.service, *(s for s, _ in self.targets.values())])
        url = query_url(self.base, marks_query(tuple(services), self.reporter))
        rows = parse_query_vector(url, self.get(url))
        self.held.files = held_of(rows)
        return marks_of(rows)

    def refusing(self) -> NotLive | None:
        """Whether a target holds the canary's document back, as Prometheus
        scraped it now (:class:`Held`): NOT SERVED, whatever it loaded
        since. None: none does, or Prometheus cannot be read (the files
        held back that are not the document are warned of)."""
        try:
            self._marks()
        except MetricsError:
            return None
        for target in self.held.files:
            if held := self.held.ours(target):
                return self.held.not_served(target, held, {})
        self.held.warn()
        return None

    def start_window(self, mirrored: bool = False) -> None:
        pass

    def probe(self) -> None:
        """Before anything is written: Prometheus answers a query (the rules
        marks'), as ``--metrics`` reads every sidecar first. A Prometheus
        that is down had the first weight written, then every interval
        fail unread: :class:`CanaryError` instead (exit 2, nothing written)."""
        try:
            self._marks()
        except MetricsError as exc:
            raise CanaryError(
                f"--prometheus {self.base}: cannot be read, so no interval could be judged; "
                f"nothing written ({exc})"
            ) from exc

    def before_change(self) -> dict[str, RulesMark | None]:
        """The marks now, to wait past once the change is written. Not
        readable: {} (the change is written all the same, and
        :meth:`wait_live` falls back to waiting its timeout)."""
        try:
            self.marks = self._marks()
            self.unread = ""
        except MetricsError as exc:
            self.marks, self.unread = {}, str(exc)
        return dict(self.marks)

    def sample(
        self,
        version: str,
        interval: float,
        mirrored_from: str | None = None,
        stable: str | None = None,
    ) -> Sample:
        """The canary's requests in the window that ends now; *stable* is not
        asked (the canary's share would be a query more); *mirrored_from*
        (stable, at a mirrored interval): its answers to the copies too, and
        no copies' series at all while stable had traffic is an error
        (:func:`~l4proxy.canary._metrics.copies_missing`); the copies
        dropped go with it (:func:`~l4proxy.canary._metrics.dropped_query`)."""
        # The queries cover the window that ends now: after a change, not
        # before it is live (the loop has slept an interval since: this
        # waits only for what it has not)
        if self.live_at is not None:
            rest = self.live_at + window(interval) - time.monotonic()
            if rest > 0:
                pause(
                    rest,
                    self.progress,
                    lambda done: (
                        f"the window starts once the change is live: {done:.0f} s of "
                        f"{rest:.0f} s more"
                    ),
                )
        mirrored = mirrored_from is not None
        answers = {}
        service, label = self.targets.get(version, (self.service, version))
        for key, q in promql(service, label, interval, self.reporter, mirrored).items():
            url = query_url(self.base, q)
            answers[key] = parse_query_response(url, self.get(url))
        if mirrored_from is not None and answers["copies"] is None:
            from_service, from_label = self.targets.get(
                mirrored_from, (self.service, mirrored_from)
            )
            q = stable_query(from_service, from_label, interval, self.reporter)
            url = query_url(self.base, q)
            served = parse_query_response(url, self.get(url))
            why = copies_missing(answers["copies"], served, self.min_requests, service, label)
            if why:
                raise MetricsError(why)
        sample = sample_from_prometheus(answers)
        if not mirrored:
            return sample
        # the copies the mirroring sidecars dropped, as --metrics shows them
        # (none scraped, an older sidecar: not shown)
        services = dict.fromkeys([self.service, *(s for s, _ in self.targets.values())])
        url = query_url(self.base, dropped_query(tuple(services), interval, self.reporter))
        return replace(sample, copies_dropped=parse_query_response(url, self.get(url)))

    def wait_live(self, before: dict[str, RulesMark | None], timeout: float) -> None:
        """Until every target of *before* serves the rules as they are now
        (see RulesMark.past), as Prometheus scrapes them.

        A target gone since (a pod deleted: Prometheus has no ``up`` of it
        any more) is not waited for; one whose scrape fails (``up`` 0, its
        series stale) is. One that has come (a new pod, which mounts the
        rules as they are when it starts) counts once its workers agree on
        files (its digest not -1, nor 0: none loaded). Staleness needs no
        timestamps: Prometheus answers a target's last scrape, and a value
        that has not changed is not past; one that has changed was scraped
        after *before* was read, a moment before the change was written.

        No marks to wait past (none scraped, or Prometheus unreadable just
        before the change): warns once, and the change is presumed live
        *timeout* (--wait-live, how long it may take) after it was written;
        the next window starts then. Nothing is slept here: the end of a
        rollout exits at once."""
        known = {k: b for k, b in before.items() if b is not None}
        if not known:
            self._presume(timeout)
            return
        start = time.monotonic()
        deadline = start + timeout
        after = f"{timeout:g} s after the change (--wait-live)"
        try:
            while True:
                late = self._late(known, before, after)
                if not late:
                    self.held.warn()
                    return
                self.progress(
                    f"waiting for the sidecars to serve the change, as Prometheus scrapes "
                    f"them: {time.monotonic() - start:.0f} s of --wait-live {timeout:g} s"
                )
                if time.monotonic() >= deadline:
                    if held_at := next((k for k in known if self.held.ours(k)), ""):
                        raise self.held.not_served(held_at, self.held.ours(held_at), {}, timeout)
                    raise NotLive(late[0])
                time.sleep(max(0.0, min(self.POLL, deadline - time.monotonic())))
        finally:
            self.live_at = time.monotonic()

    def _late(
        self, known: dict[str, RulesMark], before: dict[str, RulesMark | None], after: str
    ) -> list[str]:
        """Why each target that does not serve the change yet does not."""
        now = self._marks()
        missing = [k for k in known if k not in now]
        up: dict[str, float] = {}
        if missing:
            url = query_url(self.base, targets_query(missing))
            rows = parse_query_vector(url, self.get(url))
            now.update((k, m) for k, m in marks_of(rows).items() if k in known)
            up = {target_of(metric): v for metric, v in rows if metric.get("__name__") == "up"}
        late: list[str] = []
        for key, b in known.items():
            if key not in now:
                if key in up:  # there, but its scrapes fail
                    late.append(
                        f"{key} is not scraped (up {up[key]:g}) {after}: which rules it "
                        "serves is not known"
                    )
                continue  # gone: a pod deleted
            m = now[key]
            if held := self.held.ours(key):
                late.append(
                    f"{key} holds {held} back {after}, as Prometheus scraped it: it refuses "
                    "the canary's document as written and serves it as it last loaded it (or "
                    "not at all); its /config_dump's held says why"
                )
            elif m is None or not m.past(b):
                gen = m.generation if m is not None else None
                late.append(
                    f"{key} still serves rules generation {gen} {after}, as Prometheus "
                    "scraped it: is it watching these rules? (its /config_dump says why it "
                    "refused a change)"
                )
        for key, m in now.items():
            if key not in before and m is not None and m.digest in (DIGEST_DISAGREE, 0):
                late.append(
                    f"{key}, come since the change, serves no rules all its workers agree "
                    f"on ({DIGEST} {m.digest}) {after}"
                )
        return late

    def _presume(self, timeout: float) -> None:
        if self.unread:
            kind = "unread"
            why = f"the sidecars' rules could not be read from Prometheus ({self.unread})"
        else:
            kind = "absent"
            why = (
                f"Prometheus has no {DIGEST} nor {GENERATION} of a sidecar that reports "
                f'requests to {self.service} (reporter="{self.reporter}"): are the sidecars\' '
                "/stats scraped? (l4proxy inject --stats-port 15090)"
            )
        if kind not in self.warned:
            self.warned.add(kind)
            complain(
                self.err,
                f"warning: {why}; a change is taken as live {timeout:g} s "
                "(--wait-live) after it is written, and the next window starts then",
            )
        self.live_at = time.monotonic() + timeout


Metrics = SidecarMetrics | PrometheusMetrics


def _quiet(text: str) -> None:
    """No progress lines (``--json``; ``abort`` and ``promote``)."""


# At most one progress line in this many seconds, while the command waits
# (an interval, the sidecars): a minute's interval, or --wait-live's 150 s
# on Kubernetes, printed nothing, and a stuck command could not be told
# from a waiting one.
PROGRESS_EVERY = 30.0


def pause(seconds: float, progress: Callable[[str], None], what: Callable[[float], str]) -> None:
    """Sleep *seconds*, offering *progress* a line (*what* of the seconds
    slept so far) at least every :data:`PROGRESS_EVERY`; it prints the ones
    its own pace allows."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        time.sleep(min(left, PROGRESS_EVERY))
        if end - time.monotonic() > 0:
            progress(what(seconds - (end - time.monotonic())))


def judging(r: Rollout, interval: float) -> Callable[[float], str]:
    """The progress line of an interval of *r* under way, of its seconds done."""
    where = f"{r.canary} {at_words(r)}"
    return lambda done: f"{where}: {done:.0f} s of the {interval:g} s interval, judged at its end"


def stamp(at: float | None = None) -> str:
    """A time (now) as the lines and ``--json``'s ``time`` give it: UTC,
    ISO 8601 to the second (``2026-05-01T12:00:00Z``)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


# Where what complain() says goes besides stderr: the event webhooks of the
# rollout this command runs (Hooks.warned), set once they are known and
# reset as run() returns. A context variable, not a parameter: a warning is
# said from deep in the metrics, the store and the display, and an event
# webhook must hear every line the command prints, stderr's too (a
# rollout left interrupted, or stopped because another command took it).
_HEARD: contextvars.ContextVar[Callable[[str], None] | None] = contextvars.ContextVar(
    "l4proxy_canary_heard", default=None
)
# The Hooks of the run under way, whose event senders run() closes as it
# returns (after its last line, an error's included, was told them).
_SENDING: contextvars.ContextVar[list[Hooks] | None] = contextvars.ContextVar(
    "l4proxy_canary_sending", default=None
)


def complain(err: TextIO | None, text: str, heard: bool = True) -> None:
    """Say *text* on stderr (*err*), as ``l4proxy canary: TEXT``, each of
    its lines after the time as on stdout (:func:`stamp`): a Job's log
    interleaves the two, and a warning, an error or NOT SERVED said when
    it happened. Then to the event webhooks, a Warning (:data:`_HEARD`;
    not where *heard* is false: an event webhook's own failure)."""
    at = stamp()
    lines = f"l4proxy canary: {text}".split("\n")
    print("\n".join(f"{at} {line}" for line in lines), file=err or sys.stderr, flush=True)
    if heard and (tell := _HEARD.get()) is not None:
        tell(text)


def plain(text: str) -> str:
    """A line as the event webhooks get it (their ``eventMessage``): plain
    text, without the bar's glyphs and the columns' padding, its lines
    joined (a chat shows it as it is)."""
    return " ".join(text.translate({ord(c): " " for c in BLOCKS}).split())


# -- display -----------------------------------------------------------------------
def bar(pct: float, width: int = 20) -> str:
    """A horizontal bar for 0..100 % in eighths (as ``l4proxy demo`` draws them)."""
    eighths = round(pct / 100 * width * 8)
    full, part = divmod(eighths, 8)
    return ("█" * full + (BLOCKS[part] if part else "")).ljust(width)


class Display:
    """The command's output: a line per event, each line starting with the
    time (:func:`stamp`), and a progress line while it waits; or, with
    ``--json``, an object per event with its ``time``, and no progress."""

    def __init__(self, out: TextIO, as_json: bool, policy: Policy) -> None:
        self.out = out
        self.as_json = as_json
        self.policy = policy
        self.said = time.monotonic()  # when the last line was printed
        # the webhooks, as the first line lists them (:func:`hooks_words`; ""
        # none) and as --json's start and resume events do (no metadata)
        self.webhooks = ""
        self.declared: list[dict[str, Any]] = []
        # each event's line, Warning or not, and the rollout's phase in
        # Flagger's words, to the event webhooks (:meth:`Hooks.notify`)
        self.notify: Callable[[str, bool, str], None] | None = None

    def say(self, text: str) -> None:
        """Print *text*, each of its lines after the time."""
        at = stamp()
        print("\n".join(f"{at} {line}" for line in text.split("\n")), file=self.out, flush=True)
        self.said = time.monotonic()

    def progress(self, text: str) -> None:
        """A progress line (``  ... text``), where none was printed for
        :data:`PROGRESS_EVERY` seconds; none with ``--json``."""
        if not self.as_json and time.monotonic() - self.said >= PROGRESS_EVERY:
            self.say(f"  ... {text}")

    def emit(
        self,
        ev: Event,
        note: str = "",
        cut_short: bool = False,
        not_served: str = "",
        webhooks: Sequence[HookResult] = (),
    ) -> None:
        """Print *ev*: a line, or a JSON object. *cut_short*: the rollout
        ended (by hand, or rolled back at an interruption) during the
        interval *ev* shows, which was never judged: the line says so where
        a check's numbers go, and the JSON carries ``"cut_short": true``.
        *not_served*: the end *ev* wrote is not served (why, in a few
        words): the line says ``ROLLBACK NOT SERVED``, and the JSON carries
        ``"served": false`` and ``"not_served"``. *webhooks*: the calls the
        event rests on (the interval's rollout hooks and the gate asked
        after it, a pre-rollout hook's, the rollback hook's), in the JSON
        (``"webhook_calls"``); the line names the ones that failed, as the
        check's reasons or what holds it. A start or resume event lists
        the webhooks declared (``"webhooks"``, :attr:`declared`). Then the
        event goes to the event webhooks (:attr:`notify`)."""
        text = self.line(ev, note, cut_short, not_served)
        if self.as_json:
            out = {"time": stamp(), **event_json(ev, note)}
            if cut_short and ev.rollout.started:
                out["cut_short"] = True
            if not_served:
                out["served"] = False
                out["not_served"] = not_served
            if ev.kind in ("start", "resume") and self.declared:
                out["webhooks"] = self.declared
            if webhooks:
                out["webhook_calls"] = [w.to_json() for w in webhooks]
            print(json.dumps(out), file=self.out, flush=True)
        else:
            self.say(text)
        if self.notify is not None:
            c = ev.check
            warning = (
                ev.kind == "rolled_back"
                or bool(ev.held)
                or bool(not_served)
                or (c is not None and c.verdict == "fail")
            )
            # a start is said before anything is written (Flagger's
            # Initialized: the analysis has not begun)
            phase = "Initialized" if ev.kind == "start" else flagger_phase(ev.rollout)
            self.notify(plain(text), warning, phase)

    def hook(self, r: Rollout, result: HookResult, effect: str, note: str = "") -> None:
        """A webhook's call that is no check's: *effect* ``waiting`` (a gate
        holds the start), ``confirmed`` (it no longer does), ``logged`` (a
        post-rollout hook); a line (``  v2 waiting: confirm-rollout ...``),
        or a ``webhook`` event; then to the event webhooks, a Warning where
        it holds or failed."""
        words = {"waiting": "waiting: ", "confirmed": "confirmed: ", "logged": ""}[effect]
        failed = " (only logged)" if effect == "logged" and not result.ok else ""
        text = f"  {r.canary} {words}{result}{failed}" + (f"; {note}" if note else "")
        if self.as_json:
            out = {
                "time": stamp(),
                "event": "webhook",
                "service": r.service,
                "stable": r.stable,
                "canary": r.canary,
                "phase": r.phase,
                "effect": effect,
                "webhook": result.to_json(),
            }
            if note:
                out["note"] = note
            print(json.dumps(out), file=self.out, flush=True)
        else:
            self.say(text)
        if self.notify is not None:
            self.notify(plain(text), effect == "waiting" or not result.ok, flagger_phase(r))

    def line(self, ev: Event, note: str = "", cut_short: bool = False, not_served: str = "") -> str:
        r, p = ev.rollout, self.policy
        if ev.kind in ("start", "resume"):
            head = (
                f"{r.service}: {r.stable} -> {r.canary}{route_words(r)}, {plan(r.steps, r)} "
                f"every {p.interval:g} s; a check passes with success >= "
                f"{p.min_success_rate:g} %, {p99_limit(p)}, >= "
                f"{count(p.min_requests, 'request')}; {count(p.threshold, 'failed check')} "
                f"roll{'s' if p.threshold == 1 else ''} back"
            )
            if self.webhooks:
                head += f"; {self.webhooks}"
            if ev.kind == "resume" and r.phase == "waiting":
                # its command was killed while the start's webhooks held it
                head += (
                    f"\n  resumed waiting to start (nothing routed to {r.canary} yet, "
                    f"{count(r.failed_checks, 'failed check')} so far)"
                )
            elif ev.kind == "resume":
                at = (
                    f"A/B {r.step + 1}/{len(r.steps)}"
                    if r.ab_testing
                    else f"mirrored {r.step + 1}/{mirrored_stages(r.steps)}"
                    if r.mirrored
                    else f"{r.weight} %"
                )
                head += (
                    f"\n  resumed at {at} (step {r.step + 1}/{len(r.steps)}, "
                    f"{count(r.failed_checks, 'failed check')} so far)"
                )
                if ev.replanned:
                    head += f"\n  {replan_words(ev.replanned, r)}"
            return head + (f"\n  {note}" if note else "")
        c = ev.check
        weight = ev.previous_weight if ev.previous_weight is not None else r.weight
        # a mirrored interval: no weight to draw, and what it counted are
        # the canary's answers to copies (and its own requests, if any)
        if ev.pre_rollout:
            # before the first stage is written: no interval, no numbers
            cells = f"  {r.canary} {'pre-rollout':<26}"
        elif not r.started:
            # ended before its first stage was written (a rollback webhook
            # while a gate held it, an abort): no interval to show
            cells = f"  {r.canary} {'not started':<26}"
        elif r.match:
            # an A/B interval: no weight moves; the interval it judged, of N
            # (a pass moved the step on, unless a gate held it)
            passed = ev.kind == "check" and c is not None and c.verdict == "pass" and not ev.held
            cells = f"  {r.canary} {f'A/B {r.step - passed + 1}/{len(r.steps)}':<26}"
        elif ev.mirrored:
            cells = f"  {r.canary} {'mirror':<26}"
        else:
            cells = f"  {r.canary} {weight:3d} % {bar(weight)}"
        n = None if c is None else c.requests
        unit = "req"
        if ev.mirrored:
            unit = "copy" if n is not None and _num(n) == "1" else "copies"
        if c is not None and c.share is not None:
            # what the routing did (a hand edit, a rule of higher precedence)
            unit += f" ({c.share:.0f} %)"
        if c is None or ev.pre_rollout:
            pass
        elif n is None:
            # not read (or not live): nothing is known of the interval
            cells += f" {'?':>6} {unit}  success and p99 unknown"
        elif c.verdict == "halt":
            cells += f" {_num(n):>6} {unit}  (too few to judge)"
        else:
            cells += f" {_num(n):>6} {unit}  " + _judge(
                "success",
                c.success_rate,
                "%",
                p.min_success_rate,
                ">=",
                ok=c.success_rate is not None and success_ok(p, c.success_rate),
            )
            cells += "  " + _judge(
                "p99",
                c.p99_ms,
                "ms",
                p.max_p99_ms,
                "<=",
                # unknown with requests fails (see check); an unreadable
                # interval (no requests) has no p99 to blame
                ok=p99_ok(p, c.p99_ms) if c.p99_ms is not None else n <= 0,
            )
        if c is not None and c.copies_dropped is not None:
            cells += f"  {_num(c.copies_dropped)} dropped (all mirrors)"
        if cut_short and r.started:  # neither pass nor fail: no interval's numbers were judged
            cells += "  interval cut short, not judged"
        verdict = self.verdict(ev, not_served)
        return f"{cells}  {verdict}" + (f" ({note})" if note else "")

    def verdict(self, ev: Event, not_served: str = "") -> str:
        r, c = ev.rollout, ev.check
        # (an end without a check, by hand, interrupted or run again, judged
        # no interval: neither pass nor fail)
        if ev.kind == "promoted":
            judged = "pass " if c is not None else ""
            if not_served:
                return (
                    f"{judged}-> PROMOTION NOT SERVED: 100 % to {r.canary} is written, but "
                    f"{not_served}"
                )
            return f"{judged}-> PROMOTED: {r.canary} takes 100 % of {r.service}"
        if ev.kind == "rolled_back":
            judged = "fail " if c is not None else ""
            if not_served:
                # the canary still gets its traffic: never "ROLLED BACK"
                return (
                    f"{judged}-> ROLLBACK NOT SERVED: 100 % to {r.stable} is written, but "
                    f"{not_served}; {r.reason}"
                )
            return f"{judged}-> ROLLED BACK: 100 % to {r.stable}; {r.reason}"
        if c is None:
            return phase_words(r)
        if c.verdict == "halt":
            return f"halt: {'; '.join(c.reasons)}"
        stays = (
            f"nothing routed to {r.canary} yet"
            if ev.pre_rollout
            else f"stays A/B {r.step + 1}/{len(r.steps)}"
            if r.ab_testing
            else "stays mirrored"
            if r.mirrored
            else f"stays at {r.weight} %"
        )
        if c.verdict == "fail":
            return (
                f"fail ({r.failed_checks}/{self.policy.threshold}): {'; '.join(c.reasons)}; {stays}"
            )
        if ev.held:
            steps = r.steps or self.policy.stages
            to = "promotion" if r.step + 1 >= len(steps) else f"{steps[r.step + 1]} %"
            if to == "100 %":  # a last step of 100: the promotion in all but name
                to = "100 % (the promotion)"
            return f"pass -> {to} held: {ev.held}; {stays}"
        if r.ab_testing:
            return f"pass -> A/B {r.step + 1}/{len(r.steps)}"
        if r.mirrored:
            return f"pass -> mirror {r.step + 1}/{mirrored_stages(r.steps)}"
        return f"pass -> {r.weight} %"


def stage_words(r: Rollout, i: int) -> str:
    """The stage *i* of *r*'s stages as the lines say it: ``mirror 2/3``,
    ``A/B 2/10``, ``30 %``; past the last, ``the promotion``."""
    if i >= len(r.steps):
        return "the promotion"
    if r.match:
        return f"A/B {i + 1}/{len(r.steps)}"
    if r.steps[i] == 0:
        return f"mirror {i + 1}/{mirrored_stages(r.steps)}"
    return f"{r.steps[i]} %"


def replan_words(before: Sequence[int], r: Rollout) -> str:
    """A resume whose options changed the stages (*before*: the ones the
    rollout had; :func:`~l4proxy.canary._analysis.replan`): it moves
    nothing, and where a pass goes now."""
    here = "mirrored" if r.mirrored else f"at {r.weight} %"
    after = stage_words(r, r.step + 1)
    to = "promotes it" if after == "the promotion" else f"goes on to {after}"
    return (
        f"the plan changed (it was {plan(before)}): it stays {here}, judged there, and a pass {to}"
    )


def route_words(r: Rollout) -> str:
    """After ``stable -> canary``, in Gateway API mode what routes them:
    `` (HTTPRoute canary-bootcamp, port 8080, gateways gw)``, and with
    session affinity its cookies (``, sticky cookie c=LpsIaLdoNZ``, the
    value a tester can send to reach the canary; ``, primary cookie p``,
    whose value changes each step; ``, set with Path=/app; Secure``, their
    attributes where they are not ``Path=/`` alone); else ""."""
    if r.gateway is None:
        return ""
    g = r.gateway
    gateways = f", gateway{'s' if len(g.gateways) > 1 else ''} {','.join(g.gateways)}"
    sticky = ""
    if r.affinity is not None:
        sticky = f", sticky cookie {r.affinity.pair}"
        if r.affinity.primary_cookie:
            sticky += f", primary cookie {r.affinity.primary_cookie}"
        if r.affinity.attributes != PATH_ONLY:
            sticky += f", set with {r.affinity.attributes}"
    return (
        f" (HTTPRoute {rule_name(r.service)}, port {g.port}"
        f"{gateways if g.gateways else ''}{sticky})"
    )


def alternatives(match: Sequence[HeaderMatch]) -> str:
    """A/B testing's alternatives as the display says them:
    ``x-canary=insider or cookie~^(.*?;)?(canary=always)(;.*)?$``."""
    return " or ".join(map(str, match))


def plan(steps: Sequence[int], r: Rollout | None = None) -> str:
    """A rollout's stages as its first line says them: ``steps 5,25,100``,
    or ``mirror 2 intervals, then steps 5,25,100``; an A/B test (*r* with a
    match): ``A/B: requests with x-canary=insider to v2 for 10 intervals``."""
    if r is not None and r.match:
        n = len(steps)
        return (
            f"A/B: requests with {alternatives(r.match)} to {r.canary} "
            f"for {n} interval{'s' if n > 1 else ''}"
        )
    n = mirrored_stages(steps)
    weights = f"steps {','.join(map(str, steps[n:]))}"
    if not n:
        return weights
    return f"mirror {n} interval{'s' if n > 1 else ''}, then {weights}"


def _num(x: float) -> str:
    return str(round(x))


def _intervals(text: str) -> int:
    """``--mirror N``: a number; a word is the SERVICE put after it
    (``l4proxy canary --mirror bootcamp``), which argparse takes for N."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"takes a number of intervals, got {text!r}; put SERVICE first "
            "(l4proxy canary SERVICE --mirror ...) or give N"
        ) from None


def _max_p99(text: str) -> float:
    """``--max-p99``: milliseconds, or ``off`` (math.inf: p99 not checked)."""
    if text.strip().lower() == "off":
        return math.inf
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"milliseconds or off, got {text!r}") from None
    if math.isinf(value):
        raise argparse.ArgumentTypeError(f"milliseconds or off, got {text!r}")
    return value


def _judge(label: str, value: float | None, unit: str, limit: float, op: str, ok: bool) -> str:
    if value is None:
        shown = "   -"
    elif value == math.inf:
        shown = "+Inf"  # beyond the largest bucket, as Prometheus' le="+Inf"
    else:
        shown = f"{value:5.1f}" if unit == "%" else f"{value:4.0f}"

    if limit == math.inf:  # --max-p99 off
        return f"{label} {shown} {unit} (not checked)"
    return f"{label} {shown} {unit} {op} {limit:g} {'ok' if ok else 'NO'}"


def event_json(ev: Event, note: str = "") -> dict[str, Any]:
    r = ev.rollout
    out: dict[str, Any] = {
        "event": ev.kind,
        "service": r.service,
        "stable": r.stable,
        "canary": r.canary,
        "phase": r.phase,
        "weight": r.weight,
        "previous_weight": ev.previous_weight,
        "step": r.step,
        "steps": list(r.steps),
        "failed_checks": r.failed_checks,
        "reason": r.reason,
    }
    if ev.mirrored:  # the check's numbers are the canary's answers to copies
        out["mirror"] = True
    if ev.held:  # a pass that a gate (a confirm webhook) held at its stage
        out["held"] = ev.held
    if ev.pre_rollout:  # before the first stage was written
        out["pre_rollout"] = True
    if ev.replanned:  # resumed with options that changed its stages: the ones it had
        out["steps_before"] = list(ev.replanned)
    if r.phase == "waiting":  # its webhooks hold its start: nothing routed yet
        out["written"] = False
    if r.match:  # A/B testing: the requests that went to the canary
        out["match"] = [m.to_json() for m in r.match]
    if r.gateway is not None:  # stable and canary are backend Services of an HTTPRoute
        out["gateway_api"] = r.gateway.to_json()
    if r.affinity is not None:  # the cookies, as the state holds them
        out["session_affinity"] = r.affinity.to_json()
    if ev.kind in ("start", "resume"):  # the plan, as the first line says it
        if r.match:
            out["iterations"] = len(r.steps)
        elif mirrored := mirrored_stages(r.steps):
            out["mirror"] = mirrored
    if ev.check is not None:
        c: Check = ev.check
        out["check"] = {
            "verdict": c.verdict,
            # a count (Prometheus' increase() extrapolates: 249.7), or
            # null where it is not known
            "requests": None if c.requests is None else round(c.requests),
            "success_rate": c.success_rate,
            # JSON has no infinity: beyond the largest bucket is "+Inf"
            "p99_ms": "+Inf" if c.p99_ms == math.inf else c.p99_ms,
            "reasons": list(c.reasons),
        }
        if c.copies_dropped is not None:  # of every mirror of the sidecars
            out["check"]["copies_dropped"] = round(c.copies_dropped)
        if c.share is not None:  # the canary's % of the requests to stable and canary
            out["check"]["share"] = round(c.share, 1)
    if note:
        out["note"] = note
    return out


# -- webhooks ----------------------------------------------------------------------
def webhooks_of(args: argparse.Namespace) -> tuple[Webhook, ...]:
    """``--webhook TYPE=URL`` and ``--webhooks FILE``, in that order (the
    order a type's hooks are called in); exit 2 naming the option, the
    file and the entry, before anything is written. A directory given to
    ``--webhooks`` is each of its files (:func:`webhook_files`)."""
    try:
        hooks = [parse_option(t) for t in getattr(args, "webhook", None) or []]
        for given in getattr(args, "webhooks", None) or []:
            for path in webhook_files(given):
                try:
                    with open(path, encoding="utf-8") as f:
                        text = f.read()
                except (OSError, UnicodeDecodeError) as exc:
                    raise WebhookError(f"--webhooks {path}: cannot read it ({exc})") from None
                hooks.extend(parse_file(text, f"--webhooks {path}"))
    except WebhookError as exc:
        raise CanaryError(str(exc)) from None
    return tuple(hooks)


def webhook_files(path: str) -> list[str]:
    """The files ``--webhooks PATH`` reads: *path*; or, a directory, each
    file in it whose name does not start with a dot, in name order, and
    none where it has none. That is a ConfigMap volume as the kubelet
    mounts it (``KEY`` a link to ``..data/KEY``, ``..data`` and its
    timestamped directory hidden), each key a file of webhooks, and an
    empty directory where the volume is ``optional`` and the ConfigMap
    absent: the Job (deploy/kubernetes/canary) runs with the webhooks of
    a ConfigMap of them, or with none."""
    if not os.path.isdir(path):
        return [path]
    try:
        names = sorted(os.listdir(path))
    except OSError as exc:
        raise WebhookError(f"--webhooks {path}: cannot read the directory ({exc})") from None
    files = [os.path.join(path, n) for n in names if not n.startswith(".")]
    return [f for f in files if not os.path.isdir(f)]


def flagger_phase(r: Rollout) -> str:
    """*r*'s phase as Flagger names it in a webhook's payload: Waiting (a
    confirm-rollout webhook holds its start), Progressing (its analysis, a
    pre-rollout hook's and the first confirm-traffic-increase's included),
    WaitingPromotion (a confirm-promotion webhook holds it: :attr:`Rollout.hold`,
    kept through failed checks, as Flagger's phase is), Succeeded
    (promoted), Failed (rolled back). Initialized, before the first
    confirm-rollout call, is the caller's to say."""
    if r.phase == "promoted":
        return "Succeeded"
    if r.phase == "rolled_back":
        return "Failed"
    gate = "" if r.hold is None else r.hold.gate
    if gate == "confirm-rollout":
        return "Waiting"
    return "WaitingPromotion" if gate == "confirm-promotion" else "Progressing"


def hooks_words(hooks: Sequence[Webhook]) -> str:
    """The webhooks as the first line says them: ``webhooks confirm-rollout,
    rollout x2, post-rollout`` (each type once, in the order given)."""
    counts: dict[str, int] = {}
    for h in hooks:
        counts[h.type] = counts.get(h.type, 0) + 1
    return "webhooks " + ", ".join(t + (f" x{n}" if n > 1 else "") for t, n in counts.items())


class Hooks:
    """The rollout's webhooks as this command calls them: each call's
    payload (:func:`~l4proxy.canary._webhooks.payload`) names SERVICE, the
    rules' *namespace* and the phase the caller gives; a type's hooks are
    called in order, up to the first whose answer decides
    (:func:`~l4proxy.canary._webhooks.decided`). What the answers do to the
    rollout is the analysis' (the caller); said here: each event to the
    ``event`` hooks (:meth:`notify`: in the background, each hook's
    :class:`~l4proxy.canary._webhooks.EventSender`, a failing one warned of
    on stderr once until it answers again; :meth:`close` as the command
    ends), and the post-rollout hooks' answers (:meth:`post_rollout`).
    *post* does the POST (a test may count them)."""

    def __init__(
        self,
        hooks: Sequence[Webhook],
        service: str,
        namespace: str,
        err: TextIO,
        post: Post = post,
    ) -> None:
        self.hooks = tuple(hooks)
        self.service = service
        self.namespace = namespace
        self.err = err
        self.post = post
        self.failing: set[Webhook] = set()  # event hooks whose last call failed
        # the rollout's checksum, in every payload (set once it is known)
        self.checksum = ""
        # the phase of the last event told: a warning's (warned)
        self.phase = "Initialized"
        # each event hook's sender, started at its first event; closed as
        # run() returns (_SENDING), or by the caller (close)
        self.senders: dict[Webhook, EventSender] = {}
        self._lock = threading.Lock()  # failing, from the senders' threads
        if (sending := _SENDING.get()) is not None:
            sending.append(self)

    def has(self, kind: str) -> bool:
        return any(h.type == kind for h in self.hooks)

    def call(self, kind: str, phase: str) -> list[HookResult]:
        """Call *kind*'s hooks, in order, up to the first that decides."""
        out: list[HookResult] = []
        for h in self.hooks:
            if h.type != kind:
                continue
            body = payload(h, self.service, self.namespace, phase, self.checksum)
            out.append(self.post(h, body))
            if decided(out[-1]):
                break
        return out

    def notify(self, message: str, warning: bool, phase: str) -> None:
        """POST an event (*message*, a line as the command prints it, in
        plain text) to every ``event`` hook, in the background: queued for
        the hook's sender, which calls it in turn (Flagger sends its events
        without blocking the rollout: a receiver that hangs must not hold
        the analysis). A failure is only logged, once until that hook
        answers again (an event hook down must not stop the analysis, nor
        write a line per event); so is a drop (the queue full: a receiver
        slower than the events), once, and their count as it ends."""
        self.phase = phase
        now = time.time()  # the event's time, whenever it is sent
        for h in self.hooks:
            if h.type != "event":
                continue
            body = event_payload(
                h, self.service, self.namespace, phase, self.checksum, message, warning, now
            )
            sender = self.senders.get(h)
            if sender is None:
                sender = self.senders[h] = EventSender(h, self._sent, self._post_event)
            if not sender.send(body) and sender.dropped == 1:
                complain(
                    self.err,
                    f"warning: {h}: it answers slower than the events come; the oldest "
                    f"queued are dropped (the last {EVENT_QUEUE} kept, their count said as "
                    "the command ends)",
                    heard=False,
                )

    def _post_event(self, hook: Webhook, body: Mapping[str, Any]) -> HookResult:
        return self.post(hook, body)

    def _sent(self, result: HookResult) -> None:
        """An event's call done (on its sender's thread): a failure said
        once until that hook answers again."""
        h = result.hook
        with self._lock:
            if result.ok:
                self.failing.discard(h)
                return
            if h in self.failing:
                return
            self.failing.add(h)
        complain(
            self.err,
            f"warning: {result}; an event webhook's failure is only logged (said "
            "once until it answers again)",
            heard=False,
        )

    def close(self, wait: float | None = None) -> None:
        """As the command ends: wait for the events queued, at most *wait*
        seconds (None: the longest event hook's timeout, which bounds the
        call under way, and a second for its end to be seen), each sender
        within what is left of it, and say what was dropped or left unsent,
        per hook. Nothing is sent after."""
        senders = list(self.senders.values())
        if not senders:
            return
        if wait is None:
            wait = max(s.hook.timeout for s in senders) + 1.0
        deadline = time.monotonic() + wait
        for sender in senders:
            unsent = sender.close(deadline)
            lost = []
            if sender.dropped:
                lost.append(
                    f"{count(sender.dropped, 'event')} dropped while it answered slower than they "
                    f"came (the last {EVENT_QUEUE} kept)"
                )
            if unsent:
                lost.append(
                    f"{count(unsent, 'event')} not sent: still queued or unanswered {wait:g} s "
                    "after the command ended"
                )
            if lost:
                complain(self.err, f"warning: {sender.hook}: {'; '.join(lost)}", heard=False)

    def warned(self, text: str) -> None:
        """What the command said on stderr (:func:`complain`: a warning, an
        error, an interruption), to the event hooks as a Warning, in the
        phase of the last event."""
        self.notify(plain(text), True, self.phase)

    def post_rollout(self, r: Rollout, display: Display) -> None:
        """Call the post-rollout hooks of *r*, whose end (a promotion, a
        rollback) is written: each answer is a line (a ``webhook`` event),
        a failure also a warning on stderr; only logged (Flagger's), the
        exit stays that of the end."""
        for result in self.call("post-rollout", flagger_phase(r)):
            display.hook(r, result, "logged")
            if not result.ok:
                complain(
                    self.err,
                    f"warning: {result}; a post-rollout webhook's failure is only logged",
                )


# -- the command -------------------------------------------------------------------
class Interrupted(Exception):
    pass


@contextlib.contextmanager
def _interruptible() -> Iterator[None]:
    """SIGTERM (a Job deleted, ``kill``) is handled like Ctrl-C."""

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    # what this run says on stderr goes to its event webhooks once they are
    # known (_HEARD), its last error included; none past its return
    token = _HEARD.set(None)
    sending = _SENDING.set([])
    try:
        return _run(args, out, err)
    finally:
        _HEARD.reset(token)
        for hooks in _SENDING.get() or []:
            hooks.close()
        _SENDING.reset(sending)


def _run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    words: list[str] = args.words
    action = words[0] if words[0] in ACTIONS and len(words) == 2 else "run"
    try:
        if action == "run" and len(words) != 1:
            raise CanaryError(
                f"expected SERVICE, or status|promote|abort SERVICE; got {' '.join(words)}"
            )
        service = words[-1]
        dry = bool(getattr(args, "dry_run", False))
        if dry and action in ("promote", "abort"):
            # (never the end itself, by a flag it would not heed)
            raise CanaryError(
                f"--dry-run previews a rollout (l4proxy canary {service} --stable ... --canary "
                f"...); {action} writes its end at once: nothing written"
            )
        store = _store(args, service, dry)
        if action != "run":
            return _by_hand(action, store, args, out, err)
        with _interruptible():
            return _analyse(args, service, store, out, err)
    except (CanaryError, PolicyError, Conflict, MetricsError) as exc:
        complain(err, str(exc))
        return EXIT_ERROR
    except apply.Refusal as exc:
        complain(err, str(exc))
        return EXIT_ERROR
    except OSError as exc:
        complain(err, str(exc))
        return EXIT_ERROR
    except Superseded as exc:  # by hand, while another controller wrote
        complain(err, f"{exc}; nothing written")
        return EXIT_ERROR
    except Exception as exc:
        # a bug: exit 2, never the traceback's 1, which says "rolled back"
        frames = traceback.extract_tb(exc.__traceback__)
        at = f"{os.path.basename(frames[-1].filename)}:{frames[-1].lineno}; " if frames else ""
        complain(
            err, f"unexpected error: {type(exc).__name__}: {exc} ({at}a bug, please report it)"
        )
        return EXIT_ERROR


def _store(args: argparse.Namespace, service: str, dry: bool = False) -> Store:
    """The rollout's store; *dry* (``--dry-run``): one whose reads make
    nothing (no lock file), and that the caller asks no write of."""
    if bool(args.rules) == bool(getattr(args, "configmap", None)):
        raise CanaryError("give the rules: --rules PATH, or --configmap [NAMESPACE/]NAME")
    if args.rules:
        paths = Paths.of(args.rules, service)
        writer = RulesWriter(paths, service, args.namespace or "default", args.domain)
        writer.read_only = dry
        return FileStore(paths, writer)
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", service):
        raise CanaryError(f"{service!r} is not a service name (a DNS label, e.g. bootcamp)")
    from l4proxy.canary import kube as canary_kube

    return canary_kube.store_of(args, service)


def _by_hand(action: str, store: Store, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """status, promote, abort; with --metrics or --prometheus, promote/abort
    return once live.

    The sidecars (or Prometheus) are read on a best-effort basis: an abort is
    an emergency, and one unreachable sidecar must not keep it from being
    written. So are the webhooks (:func:`_hand_hooks`): promote and abort
    call the event and post-rollout ones they are given; ``status`` none.

    A rollout waiting to start (its webhooks hold it: nothing routed yet) is
    aborted as any (rolled back, never started; the waiting command sees
    it at its next interval and stops, writing nothing), and not promoted
    (:func:`promote_before_start`)."""
    as_json: bool = args.json
    wait = wait_live_of(args)
    loaded = store.load_state()
    if loaded is None:
        raise CanaryError(f"no rollout of {store.service} under {store.where}")
    saved: Rollout = loaded
    if action == "abort" and saved.phase == "promoted":
        raise CanaryError(abort_after_promotion(saved))
    if action == "promote" and saved.phase == "rolled_back":
        raise CanaryError(promote_after_rollback(saved))
    if action == "promote" and saved.phase == "waiting":
        raise CanaryError(promote_before_start(saved))
    hooks = _hand_hooks(action, store, args, loaded, err)
    # (an end said again stays as it was: its reason, and its time, which
    # tells whether a sidecar loaded it)
    if action == "promote" and saved.phase != "promoted":
        saved = replace(promote(saved, time.time()), owner=None)
    elif action == "abort" and saved.phase != "rolled_back":
        why = "aborted by hand" if saved.started else "aborted by hand before it started"
        saved = replace(roll_back(saved, time.time(), why), owner=None)
    if action != "status":
        sidecars: SidecarMetrics | PrometheusMetrics | None = None
        before: dict[str, RulesMark | None] = {}
        if args.metrics:
            sidecars = SidecarMetrics(args.metrics, store.service)
            sidecars.held.document, sidecars.held.err = store.document, err
            try:
                sidecars.start_window()
                before = dict(sidecars.marks)
            except MetricsError as exc:
                complain(err, f"warning: {exc}; not waiting for it to be live")
                sidecars = None
        elif args.prometheus:
            # the marks as Prometheus scraped them; none readable: the change
            # is written all the same, and not waited for
            sidecars = PrometheusMetrics(args.prometheus, store.service, args.reporter, err=err)
            sidecars.held.document = store.document
            if saved.gateway is not None:
                # the backends' names too, for the marks: what a backend with
                # a ServiceEntry of its own reports (backend_targets; not
                # resolved here: an abort must not wait on the rules loading)
                sidecars.targets = {v: (v, v) for v in (saved.stable, saved.canary)}
            before = sidecars.before_change()
            if not any(m is not None for m in before.values()):
                why = sidecars.unread or (
                    f"Prometheus has no {DIGEST} of a sidecar that reports requests to "
                    f"{store.service}"
                )
                complain(err, f"warning: {why}; not waiting for it to be live")
                sidecars = None
        refused: NotLive | None = None
        for attempt in range(1, END_ATTEMPTS + 1):
            try:
                changed = _commit(store, saved, loaded, err)
                break
            except Superseded as exc:
                # The running command saved its check between our read and
                # our write (it writes every interval): the end applies to
                # the rollout as it is now. Anything else (it ended, another
                # rollout) is not ours to overwrite.
                now = exc.current
                busy = ("waiting", "progressing")
                if (
                    attempt == END_ATTEMPTS
                    or loaded.phase not in busy
                    or now is None
                    or now.phase not in busy
                    or (now.stable, now.canary) != (loaded.stable, loaded.canary)
                ):
                    raise
                if action == "promote" and now.phase == "waiting":
                    raise CanaryError(promote_before_start(now)) from None
                loaded = now
                why = "aborted by hand" if now.started else "aborted by hand before it started"
                ended = (
                    promote(now, time.time())
                    if action == "promote"
                    else roll_back(now, time.time(), why)
                )
                saved = replace(ended, owner=None)
                if isinstance(sidecars, SidecarMetrics):
                    with contextlib.suppress(MetricsError):
                        sidecars.start_window()  # the marks before ours, not before its
                        before = dict(sidecars.marks)
                elif sidecars is not None:
                    before = sidecars.before_change()
        if not changed:
            # the document was so already (an abort said again): nothing
            # reloads, but a sidecar that refused the change that wrote it
            # (and every change since) still routes as before it; one that
            # holds the document back serves it as before, whatever it
            # loaded since
            if isinstance(sidecars, SidecarMetrics):
                refused = sidecars.refusing(saved.updated)
            elif sidecars is not None:
                refused = sidecars.refusing()
            sidecars = None
        if not args.metrics and not args.prometheus:
            unchecked(err, action, store)
        if sidecars is not None:
            try:
                sidecars.wait_live(before, wait)
            except MetricsError as exc:  # written, not confirmed: warn, exit as what was done
                complain(err, f"warning: {exc}")
            except NotLive as exc:
                refused = exc
        if refused is not None:
            if as_json:
                print(json.dumps({**saved.to_json(), "not_served": refused.summary}), file=out)
            else:
                print(f"{stamp()} {status_line(saved)}", file=out)
            hooks.notify(plain(status_line(saved)), True, flagger_phase(saved))
            not_served(err, saved, store, refused)
            _hand_post_rollout(hooks, saved, loaded, as_json, out)
            return EXIT_NOT_SERVED
    if as_json:
        shown = saved.to_json()
        if action == "status":
            # (the state's owner is the command that ran it last)
            now_by = running(saved)
            shown["run_by"] = None if now_by is None else now_by.to_json()
        print(json.dumps(shown), file=out)
    else:
        print(f"{stamp()} {status_line(saved)}", file=out)
    if action != "status":
        hooks.notify(plain(status_line(saved)), saved.phase != "promoted", flagger_phase(saved))
        _hand_post_rollout(hooks, saved, loaded, as_json, out)
    return {"promoted": EXIT_PROMOTED, "rolled_back": EXIT_ROLLED_BACK}.get(saved.phase, 0)


def _hand_hooks(
    action: str, store: Store, args: argparse.Namespace, loaded: Rollout, err: TextIO
) -> Hooks:
    """The webhooks ``promote`` and ``abort`` call: the ``event`` ones hear
    each line they print (stderr's too), the ``post-rollout`` ones the end
    they write (:func:`_hand_post_rollout`); the other types are taken and
    not called (nothing there to gate or test), as a run's other options
    are: an abort in a hurry from a copied command line works. A webhook
    option that cannot be used is a warning, never a refusal of the end.
    ``status`` calls none (it changes nothing)."""
    namespace = getattr(store, "namespace", None) or args.namespace or "default"
    declared: tuple[Webhook, ...] = ()
    if action != "status":
        try:
            declared = webhooks_of(args)
        except CanaryError as exc:
            complain(err, f"warning: {exc}; no webhook is called")
    hooks = Hooks(declared, store.service, namespace, err)
    hooks.checksum = loaded.webhook_checksum
    if hooks.has("event"):
        _HEARD.set(hooks.warned)
    return hooks


# The policy of a Display that prints webhooks' lines alone (promote and
# abort print no check's line: any policy draws them)
_ANY_POLICY = Policy(steps=(100,))


def _hand_post_rollout(
    hooks: Hooks, ended: Rollout, loaded: Rollout, as_json: bool, out: TextIO
) -> None:
    """The post-rollout webhooks of an end written by ``promote`` or
    ``abort`` (*ended*, from *loaded*): called where this command ended
    the rollout and no other runs it. One that runs it (its process, or
    elsewhere its lease: :func:`alive`) sees the end at its next interval
    and calls its own post-rollout webhooks: called here too, the same
    hooks (a copied command line) would hear the end twice. Said again
    (an end written before), none: they heard it then."""
    if not hooks.has("post-rollout") or loaded.phase not in ("waiting", "progressing"):
        return
    display = Display(out, as_json, _ANY_POLICY)
    display.notify = hooks.notify
    holder, me = loaded.owner, this_process(0.0)
    if holder is not None and not holder.same_process(me) and alive(holder, me, time.time()):
        if not as_json:
            display.say(
                f"  {ended.canary} post-rollout webhooks: left to the command that runs the "
                f"rollout ({holder}), which calls its own as it sees the end"
            )
        return
    hooks.post_rollout(ended, display)


# An abort or promote that meets the running command's write of a check
# between its read and its own write is computed again on the state as it
# is then, this many times at most.
END_ATTEMPTS = 5


def status_line(r: Rollout) -> str:
    """What ``status`` (and ``promote``, ``abort``) prints of *r*: where it
    stands, and what holds it there (a webhook: :attr:`Rollout.hold`, since
    when), and the command that runs it."""
    held = ""
    if r.hold is not None and r.phase in ("waiting", "progressing"):
        held = f"; held since {stamp(r.hold.since)} by {r.hold.why}"
    if r.phase == "waiting":
        at = f"({plan(r.steps, r)}; nothing routed to {r.canary} yet),"
    elif not r.started:
        at = f"(nothing was routed to {r.canary}),"
    elif r.ab_testing:
        at = (
            f"A/B: requests with {alternatives(r.match)} to {r.canary}, "
            f"{r.step}/{len(r.steps)} intervals passed,"
        )
    elif r.mirrored:
        at = f"mirrored: every request copied to {r.canary}, 0 % live, "
        at += f"step {r.step + 1}/{len(r.steps)},"
    else:
        at = f"at {r.weight} % {bar(r.weight)} step {r.step + 1}/{len(r.steps)},"
    return (
        f"{r.service}: {r.stable} -> {r.canary}{route_words(r)} {phase_words(r)} {at} "
        f"{count(r.failed_checks, 'failed check')}, "
        f"{count(r.checks, 'check')}"
        + (f"; {r.reason}" if r.reason else "")
        + held
        + run_by_words(r)
    )


def running(r: Rollout, me: Owner | None = None, now: float | None = None) -> Owner | None:
    """The command that runs *r* (waiting or progressing) now, as *me*
    (this process) can tell: its owner where that process runs (this host
    and pid namespace) or its lease lasts (elsewhere: :func:`alive`);
    None where it has none, or one SIGKILLed, or lost with its node, that
    the state still names."""
    if r.owner is None or r.phase not in ("waiting", "progressing"):
        return None
    me = me or this_process(0.0)
    return r.owner if alive(r.owner, me, time.time() if now is None else now) else None


def run_by_words(r: Rollout) -> str:
    """Who runs *r*, as ``status`` says it: ``; run by pid 7 on HOST``,
    or, where no command does (none named: given up; or the one named is
    gone: SIGKILLed, its node lost, its lease over), that nothing does and
    how to go on. "" for a rollout that ended."""
    if r.phase not in ("waiting", "progressing"):
        return ""
    me = this_process(0.0)
    if running(r, me) is not None:
        return f"; run by {r.owner}"
    o = r.owner
    gone = ""
    if o is not None and o.same_host(me):
        gone = f": its command ({o}) is gone"
    elif o is not None:
        gone = (
            f": its command ({o}, elsewhere: it cannot be asked from here) holds it no more, "
            f"its lease over since {stamp(o.lease_until)}"
        )
    ends = "abort" if r.phase == "waiting" else "promote|abort"
    return (
        f"; nothing runs it{gone}; run the same command again to resume it, or l4proxy "
        f"canary {ends} {r.service}"
    )


def phase_words(r: Rollout) -> str:
    """*r*'s phase as the text says it (``rolled back``; --json and the
    state keep ``rolled_back``): ``waiting to start`` while its webhooks
    hold its start, ``waiting for promotion`` while a confirm-promotion
    webhook holds it (Flagger's WaitingPromotion), ``rolled back before it
    started`` where it ended so."""
    if r.phase == "waiting":
        return "waiting to start"
    if r.phase == "progressing" and r.hold is not None and r.hold.gate == "confirm-promotion":
        return "waiting for promotion"
    words = r.phase.replace("_", " ")
    return words if r.started else f"{words} before it started"


def unchecked(err: TextIO, action: str, store: Store) -> None:
    """``abort`` or ``promote`` without ``--metrics`` or ``--prometheus``:
    written, and nothing tells whether the sidecars serve it. Said so, with
    the one thing that can be known here: whether the rules as written
    load as a sidecar loads them. Where they do not (another file is
    broken), a sidecar that loads its rules as a whole refuses the change
    and goes on routing as before it; one that sets a broken file aside
    serves it. Which of the two the sidecars do is theirs to say, so the
    exit stays that of the end written, and the warning names the file."""
    what = "abort" if action == "abort" else "promotion"
    try:
        store.table(None)
        problem = ""
    except CanaryError as exc:
        problem = (
            f"; and the rules as written do not load ({exc}): a sidecar that refuses them "
            f"goes on routing as before this {what}"
        )
    complain(
        err,
        f"warning: the {what} is written, not checked live (no --metrics "
        f"or --prometheus: give one to wait until the sidecars serve it){problem}",
    )


def abort_after_promotion(r: Rollout) -> str:
    """Why ``abort`` refuses a promoted rollout *r*, and what to run instead.

    Flagger rolls back by hand (a ``rollback`` webhook) only while the
    analysis runs (its Progressing, Waiting and WaitingPromotion phases);
    once a canary is promoted, it is the stable version, and going back is
    another release. So here: an abort ends a rollout in progress (or is
    said again of one rolled back), and a promotion stands; sending every
    request back to the old version is a rollout of it, judged as any."""
    mode = " --gateway-api" if r.gateway is not None else ""
    return (
        f"the rollout of {r.service} from {r.stable} to {r.canary} was promoted ({r.canary} "
        f"takes 100 %); abort ends a rollout in progress, as Flagger rolls back only during "
        f"its analysis, and a promotion stands: nothing written. To send {r.service}'s "
        f"requests back to {r.stable}, roll it out as a new canary: l4proxy canary "
        f"{r.service}{mode} --stable {r.canary} --canary {r.stable} ..."
    )


def promote_before_start(r: Rollout) -> str:
    """Why ``promote`` refuses a rollout *r* waiting to start: nothing of it
    was judged, nor routed; its webhooks hold it (a manual approval's
    gate, a failing smoke test), and a promotion would send every request
    to the canary past them. Flagger has no such way either."""
    held = f" ({r.hold.why})" if r.hold is not None else ""
    return (
        f"the rollout of {r.service} from {r.stable} to {r.canary} has not started: its "
        f"webhooks hold its start{held}, and nothing of {r.canary} was judged; promote ends "
        "a rollout in progress: nothing written. Let its webhooks pass (open the gate), or "
        f"end it: l4proxy canary abort {r.service}"
    )


def promote_after_rollback(r: Rollout) -> str:
    """Why ``promote`` refuses a rolled-back rollout *r*, and what to run
    instead: the converse of :func:`abort_after_promotion`. A rollback
    (by the analysis or by abort) is a verdict on the canary; sending it
    every request at once would put the version that just failed in front
    of every client, unjudged. Flagger has no way to do that either: a
    failed canary goes out again only as a new revision, analysed anew."""
    mode = " --gateway-api" if r.gateway is not None else ""
    return (
        f"the rollout of {r.service} from {r.stable} to {r.canary} was rolled back "
        f"({r.stable} takes 100 %); promote ends a rollout in progress, and a rollback "
        f"stands: nothing written. To try {r.canary} again, roll it out anew, judged as any: "
        f"l4proxy canary {r.service}{mode} --stable {r.stable} --canary {r.canary} ..."
    )


def _analyse(
    args: argparse.Namespace,
    service: str,
    store: Store,
    out: TextIO,
    err: TextIO,
) -> int:
    if not args.stable or not args.canary:
        raise CanaryError("--stable VERSION and --canary VERSION are needed")
    if args.stable == args.canary:
        raise CanaryError("--stable and --canary name the same version")
    for flag, v in (("--stable", args.stable), ("--canary", args.canary)):
        if not _LABEL_VALUE.fullmatch(v):
            raise CanaryError(
                f"{flag} {v!r} is not a label value (up to 63 letters, digits, '-', '_', "
                "'.', starting and ending with a letter or digit)"
            )
    if args.metrics and args.prometheus:
        raise CanaryError(
            "--metrics and --prometheus: give one of them (the sidecars' counters, or "
            "Prometheus' queries of them: one source judges every interval)"
        )
    if not args.metrics and not args.prometheus:
        raise CanaryError(
            "give the metrics: --metrics HOST:PORT (a sidecar's admin endpoint, repeatable) "
            "or --prometheus URL"
        )
    if getattr(args, "gateway_api", False):
        for flag, v in (("--stable", args.stable), ("--canary", args.canary)):
            if not DNS1123_LABEL.fullmatch(v):
                raise CanaryError(
                    f"--gateway-api: {flag} {v!r} is not a Service name (a DNS label: lower "
                    "case letters, digits and '-', e.g. bootcamp-v2): with --gateway-api "
                    "it names the version's backend Service, not a version label"
                )
    policy = policy_of(args)
    gateway_api = gateway_options(args)
    # a new rollout's cookie value; a resumed one keeps its own (resume)
    affinity = affinity_options(args, gateway_api, policy, new_cookie_value(secrets.choice))
    namespace = getattr(store, "namespace", None) or args.namespace or "default"
    # (the port is the registry's where not given: read once the rules are)
    plan_gateway = GatewayRoute(args.port or 1, tuple(args.gateway)) if gateway_api else None
    if policy.match:  # exit 2 naming the option, before anything is written
        plan_only = Rollout(
            service, args.stable, args.canary, steps=policy.stages, gateway=plan_gateway
        )
        check_matches(replace(plan_only, match=policy.match), namespace, args.domain)
    wait = wait_live_of(args)
    metrics: Metrics = (
        SidecarMetrics(args.metrics, service)
        if args.metrics
        else PrometheusMetrics(
            args.prometheus, service, args.reporter, err=err, min_requests=policy.min_requests
        )
    )
    display = Display(out, args.json, policy)
    metrics.progress = display.progress
    metrics.held.document, metrics.held.err = store.document, err
    hooks = Hooks(webhooks_of(args), service, namespace, err)
    dry = bool(getattr(args, "dry_run", False))  # (no webhook called: not the events)
    if hooks.hooks:
        display.webhooks = hooks_words(hooks.hooks)
        display.declared = [h.to_json() for h in hooks.hooks]
        if not dry:
            display.notify = hooks.notify
    if hooks.has("event") and not dry:
        _HEARD.set(hooks.warned)
    gateway = None
    if gateway_api:
        port = args.port or service_port(store.table(None), service, namespace, args.domain)
        if args.port:
            check_port(store.table(None), service, port, namespace, args.domain)
        gateway = GatewayRoute(port, tuple(dict.fromkeys(args.gateway)))
    # (once the port is known: a route of the user's on another port of
    # SERVICE's Service takes other requests than ours)
    me = this_process(lease_of(policy, wait))
    try:
        # (a dry run waits for no one: it says what a run would do)
        saved = (
            store.load_state() if dry else await_hold(store, store.load_state(), me, display, err)
        )
    except KeyboardInterrupt:
        complain(
            err,
            f"interrupted while waiting for another command's hold on the rollout of "
            f"{service} to end; nothing written",
        )
        return EXIT_LEFT
    # the command this one takes the rollout over from: one whose process
    # is gone (this host), or whose hold ended (elsewhere)
    busy = ("waiting", "progressing")
    prior = saved.owner if saved is not None and saved.phase in busy else None
    with _left_if_refused(saved):
        store.check_competing(
            gateway_api=gateway_api,
            gateways=gateway.gateways if gateway is not None else (),
            port=gateway.port if gateway is not None else None,
        )
    ev = resume(
        policy,
        service,
        args.stable,
        args.canary,
        saved,
        time.time(),
        restart=args.restart,
        gateway=gateway,
        affinity=affinity,
    )

    def own(x: Rollout) -> Rollout:
        """*x* as this command writes it: held by it (the lease renewed)
        while it waits or progresses, by nobody once it has ended."""
        held = replace(me, lease_until=time.time() + me.lease_until)
        return replace(x, owner=held if x.phase in ("waiting", "progressing") else None)

    r = own(ev.rollout)
    hooks.checksum = r.webhook_checksum
    if r.gateway is not None:
        # what the sidecars report for each backend: the registry decides
        # (our weighted rule alone: no sticky rule beside it)
        probe = replace(r, phase="progressing", weight=50, match=(), affinity=None)
        metrics.targets = backend_targets(probe_table(store, probe), probe, namespace, args.domain)
    # what resume() started from, the holder it ended included: the first
    # write expects it (stored_as), so that a command that took the rollout
    # over meanwhile is not overwritten
    loaded = saved
    # fails early (exit 2) when the metrics are missing: those of the
    # copies too where the rollout is mirrored; Prometheus down alike
    metrics.start_window(r.mirrored)
    if isinstance(metrics, PrometheusMetrics):
        metrics.probe()
    if not gateway_api:  # (--gateway-api: backend_targets() said it of SERVICE)
        try:  # (here: the rules' lock file is made once read)
            registry: RouteTable | None = store.table(None)
        except CanaryError:  # rules that do not load: refused as the first stage is written
            registry = None
        if registry is not None:
            with _left_if_refused(saved):
                check_registered(registry, service, namespace, args.domain)
    if dry:
        note = ended_note(r.affinity, affinity) if ev.kind in ("promoted", "rolled_back") else ""
        return _dry_run(policy, ev, saved, me, hooks, store, display, note)
    if ev.kind in ("promoted", "rolled_back"):
        store.install(r)  # as it ended, in case the document was lost
        display.emit(ev, ended_note(r.affinity, affinity))
        return EXIT_PROMOTED if r.phase == "promoted" else EXIT_ROLLED_BACK
    taken = ""
    if ev.kind == "resume" and prior is not None and not prior.same_process(me):
        gone = "its process is gone" if prior.same_host(me) else "its hold ended"
        taken = f"taken over from {prior}: {gone}"
    starts = ("confirm-rollout", "pre-rollout", "rollback", *first_gates(r))
    # a wait resumed (its command killed while the start's webhooks held
    # it) goes on waiting, where it stood, whatever webhooks are given now
    resumed_wait = ev.kind == "resume" and r.phase == "waiting"
    gated_start = resumed_wait or (ev.kind == "start" and any(hooks.has(k) for k in starts))
    if gated_start and not resumed_wait:
        # nothing is written until the start's webhooks let it (a new
        # rollout only: a resumed one was started); said so, in --json too
        r = own(waiting(r))
        ev = replace(ev, rollout=r)
    display.emit(ev, taken)
    before_wait = loaded  # the state before this command (put back if it never starts)
    if gated_start:
        try:
            opened, loaded = _before_start(
                policy, r, hooks, display, store, loaded, own, resumed_wait
            )
        except Superseded as exc:
            # aborted while it waited (or taken over): nothing to write
            return _ended_by_hand(display, exc.current, exc.ours or r, hooks)
        except KeyboardInterrupt:
            print(file=err)  # (after the ^C a terminal shows)
            if resumed_wait:
                complain(
                    err,
                    f"interrupted before the rollout of {service} started (its webhooks held "
                    f"it); nothing routed to {r.canary}, and it still waits, run by no command: "
                    f"run the same command again to resume it, or l4proxy canary abort {service}",
                )
                return EXIT_LEFT
            complain(
                err,
                f"interrupted before the rollout of {service} started (its webhooks held it); "
                "nothing written (its state is as it was before this command)",
            )
            return EXIT_LEFT
        # (the progress deadline counts the analysis' time, not the wait)
        begun = time.time()
        r = own(replace(opened.rollout, updated=begun, judged=begun))
        if opened.kind == "rolled_back":
            try:
                return _end_here(store, metrics, r, wait, loaded, display, hooks, opened, err)
            except Superseded as exc:
                return _ended_by_hand(display, exc.current, r, hooks)
            except KeyboardInterrupt:
                print(file=err)
                complain(
                    err,
                    f"interrupted while the rollback of {service} was written (its webhooks "
                    f"asked for it): see l4proxy canary status {service}, and abort it again",
                )
                return EXIT_LEFT
    try:
        # inside: a SIGTERM while the first weight goes live (up to
        # --wait-live) is the same interruption as one later
        try:
            with _left_if_refused(loaded):
                try:
                    unseen = _set_weight(store, metrics, r, wait, loaded, err)
                except CanaryError:
                    if loaded is not before_wait and loaded is not None:
                        # refused after a wait (a competing rule came
                        # meanwhile): its waiting state does not stay
                        with contextlib.suppress(CanaryError, Superseded, OSError):
                            store.put_back(before_wait, expected=loaded)
                    raise
        except Superseded as exc:
            return _ended_by_hand(display, exc.current, r, hooks)
        while True:
            if unseen:
                # The weight is written but could not be seen live, or the
                # sidecars not read: a failed check now, as an unreadable
                # sample is, and the analysis goes on watching (it ended
                # with exit 2 and the canary left at its weight).
                graded = Check("fail", None, None, None, (unseen.reason,))
                unseen = Unseen()
                edited = ""
                called = []
            else:
                # the rollout hooks at the interval's start: a load test they
                # start sends the canary the traffic this interval judges
                began = time.monotonic()
                called = hooks.call("rollout", flagger_phase(r))
                spent = time.monotonic() - began
                pause(
                    max(0.0, policy.interval - spent), display.progress, judging(r, policy.interval)
                )
                now_saved = store.load_state()
                if not stored_as(now_saved, r):
                    # promote/abort from another shell ended it, or another
                    # command took it over (this one's hold had lapsed)
                    return _ended_by_hand(display, now_saved, r, hooks)
                asked = hooks.call("rollback", flagger_phase(r))
                if (by := rollback_asked(asked)) is not None:
                    # as an abort: the interval cut short, never judged
                    ended = Event("rolled_back", r, None, r.weight, r.mirrored)
                    new = own(roll_back(r, time.time(), f"webhook {by}"))
                    try:
                        return _end_here(
                            store, metrics, new, wait, r, display, hooks, ended, err, asked
                        )
                    except Superseded as exc:
                        return _ended_by_hand(display, exc.current, r, hooks)
                edited = store.edited(r)
                try:
                    stable = r.stable if r.mirrored else None
                    sample = metrics.sample(
                        r.canary, policy.interval, stable, None if r.mirrored else r.stable
                    )
                    graded = check(policy, sample, r.mirrored)
                    if edited:
                        # The interval was not routed as its line would
                        # say: never judged a pass. A failed check, as a
                        # competing change is, and ours is written again.
                        graded = replace(
                            graded,
                            verdict="fail",
                            reasons=(f"{edited}; not judged, and written again",),
                        )
                except MetricsError as exc:
                    # A sidecar restarting or Prometheus answering 503 once must
                    # not leave the canary at its weight with nothing watching:
                    # a failed check (Flagger counts it so), and --threshold of
                    # them in a row roll back.
                    why: tuple[str, ...] = (f"metrics unreadable: {exc}",)
                    if edited:
                        why += (f"{edited}; written again",)
                    graded = Check("fail", None, None, None, why)
                    with contextlib.suppress(MetricsError):
                        metrics.start_window(r.mirrored)  # the next interval counts from now
            graded = with_hook_failures(graded, failures(called))
            now = time.time()
            # a pass that raises the weight or makes it 100 % asks its
            # gates first, in turn, up to the first that holds
            gated: list[HookResult] = []
            held: Hold | None = None
            for gate in gates_of(policy, r, graded):
                got = hooks.call(gate, flagger_phase(r))
                gated += got
                if holds := holding(got):
                    held = Hold(gate, holds, now)
                    break
            # (a confirm-promotion webhook said yes: a raise to 100 records it)
            confirmed = held is None and any(g.hook.type == "confirm-promotion" for g in gated)
            ev = advance(policy, r, graded, now, held=held, promotion_confirmed=confirmed)
            new = own(ev.rollout)
            try:
                try:
                    if new.weight != r.weight or new.phase != r.phase or edited:
                        unseen = _set_weight(store, metrics, new, wait, r, err)
                    else:
                        store.save_state(new, expected=r)
                except CanaryError as exc:
                    if new.phase != "progressing":
                        raise  # an end not written: _commit says it was NOT applied
                    # The next stage refused (a competing rule, a broken
                    # file beside ours) or not written: a failed check, as
                    # Flagger counts a step it cannot route, and the
                    # analysis goes on watching; --threshold of them roll
                    # back, which is written whatever the other files hold.
                    graded = refused_check(graded, new, exc)
                    ev = advance(policy, r, graded, now)
                    new = own(ev.rollout)
                    if new.phase != "progressing":
                        unseen = _set_weight(store, metrics, new, wait, r, err)
                    else:
                        store.save_state(new, expected=r)
            except Superseded as exc:  # promote/abort by hand while we measured
                return _ended_by_hand(display, exc.current, r, hooks)
            r = new
            if r.phase != "progressing" and unseen.not_served is not None:
                # written, and a sidecar read still serves the rules from
                # before it: never reported as done
                display.emit(ev, not_served=unseen.not_served.summary, webhooks=called + gated)
                not_served(err, r, store, unseen.not_served)
                hooks.post_rollout(r, display)
                return EXIT_NOT_SERVED
            display.emit(ev, webhooks=called + gated)
            if r.phase != "progressing":
                if unseen:  # written, not confirmed: warn, exit as what was done
                    complain(err, f"warning: {unseen}")
                hooks.post_rollout(r, display)
                return EXIT_PROMOTED if r.phase == "promoted" else EXIT_ROLLED_BACK
    except KeyboardInterrupt:
        choice = args.on_abort
        if choice == "ask":
            choice = _ask(err, r)
        if choice == "rollback":
            # the line shows the interval that was running (its weight,
            # not the rollback's 0), cut short
            weight, mirrored = r.weight, r.mirrored
            r = own(roll_back(r, time.time(), "interrupted; rolled back on request"))
            _commit(store, r, err=err)
            display.emit(
                Event("rolled_back", r, None, weight, mirrored), "interrupted", cut_short=True
            )
            hooks.post_rollout(r, display)
            return EXIT_ROLLED_BACK
        # given up: the next command resumes it at once (best effort: a
        # state that cannot be written now keeps its lease, which ends)
        with contextlib.suppress(CanaryError, Superseded, OSError):
            store.save_state(replace(r, owner=None), expected=r)
        print(file=err)  # (after the ^C a terminal shows)
        complain(
            err,
            f"interrupted; {left_as_is(r)}, and nothing judges "
            f"{r.canary} now: run the same command again to resume, or l4proxy canary "
            "promote|abort " + service,
        )
        return EXIT_LEFT


# -- --dry-run --------------------------------------------------------------------
# a check that passes, as the preview takes every check: the stages a run
# walks, and the gates each pass asks (the analysis' own: gates_of, advance)
_PASS = Check("pass", None, None, None)


@dataclass(frozen=True)
class DryStage:
    """One stage of a ``--dry-run``: the rollout at it, the gates its pass
    asks that have webhooks (in turn), where that pass leads, and whether
    its documents are as a run would write them already (a resumed
    rollout's stage: ``edited`` says why not)."""

    rollout: Rollout
    gates: tuple[str, ...]
    then: Rollout
    written: str  # "new", "already", or why it is written again


def dry_stages(
    policy: Policy, r: Rollout, hooks: Hooks, now: float
) -> tuple[list[DryStage], Rollout]:
    """The stages a run of *r* (as :func:`~l4proxy.canary._analysis.resume`
    gives it; a waiting one from its first stage) walks when every check
    passes and every gate says yes, and the promoted rollout it ends as:
    what :func:`_analyse` does with those answers, step by step."""
    x = started(r) if r.phase == "waiting" else r
    out: list[DryStage] = []
    while x.phase == "progressing":
        gates = tuple(g for g in gates_of(policy, x, _PASS) if hooks.has(g))
        confirmed = "confirm-promotion" in gates
        nxt = advance(policy, x, _PASS, now, promotion_confirmed=confirmed).rollout
        out.append(DryStage(x, gates, nxt, "new"))
        x = nxt
    return out, x


def routes_of(x: Rollout) -> dict[str, int]:
    """The share of every request each version gets from *x*'s documents
    (mirrored or A/B testing: stable's, but the copies or the matching ones)."""
    w = 100 if x.phase == "promoted" else 0 if x.mirrored or x.ab_testing else x.weight
    if x.phase == "rolled_back":
        w = 0
    return {x.stable: 100 - w, x.canary: w}


def routes_words(x: Rollout) -> str:
    """*x*'s routes as the preview says them: ``v1 70 %, v2 30 %``, ``v1
    100 %, every request copied to v2``, ``the requests with ... to v2,
    every other one to v1``."""
    if x.ab_testing:
        return (
            f"the requests with {alternatives(x.match)} to {x.canary}, every other one to "
            f"{x.stable}"
        )
    shown = ", ".join(f"{v} {w} %" for v, w in routes_of(x).items())
    if x.mirrored:
        return f"{shown}, every request copied to {x.canary}"
    a = x.affinity
    if a is not None and x.phase == "progressing" and x.weight:
        # (the sticky rule before the weighted one: http_route_document)
        shown += f", every request with cookie {a.cookie} to {x.canary}"
        if a.primary_cookie:
            shown += f", with {a.primary_cookie} to {x.stable}"
    return shown


def check_words(policy: Policy, x: Rollout) -> str:
    """What an interval of *x* judges, and the thresholds."""
    what = (
        "answers to the copies (and its own requests)"
        if x.mirrored
        else "requests (the matching ones)"
        if x.ab_testing
        else "requests"
    )
    unit = (
        count(policy.min_requests, "copy", "copies")
        if x.mirrored
        else count(policy.min_requests, "request")
    )
    return (
        f"every {policy.interval:g} s a check of {x.canary}'s {what}: success >= "
        f"{policy.min_success_rate:g} %, {p99_limit(policy)}, >= {unit}"
    )


def _hooks_of(hooks: Hooks, kind: str) -> list[Webhook]:
    return [h for h in hooks.hooks if h.type == kind]


def _named(hooks: Hooks, kind: str) -> str:
    """*kind*'s webhooks as the lines name them (``confirm-promotion
    "gate"``), each in turn."""
    return ", ".join(map(str, _hooks_of(hooks, kind)))


def _start_hooks(r: Rollout, hooks: Hooks) -> list[str]:
    """The webhook types a new rollout *r* (or a wait resumed: from where
    its hold says it stood) asks before its first stage is written, in
    :func:`_before_start`'s order; none: it starts at once."""
    held = r.hold.gate if r.phase == "waiting" and r.hold is not None else ""
    stood = START_ORDER.index(held) if held in START_ORDER else 0
    kinds = [k for k in ("confirm-rollout", "pre-rollout") if START_ORDER.index(k) >= stood]
    kinds += [g for g in first_gates(started(r)) if START_ORDER.index(g) >= stood]
    return [k for k in kinds if hooks.has(k)]


def _holder_words(saved: Rollout | None, me: Owner) -> str:
    """Who runs *saved* now, as a run would meet it (refused, or waiting
    for the hold to end); "" where a run would take it up at once."""
    busy = saved is not None and saved.phase in ("waiting", "progressing")
    o = saved.owner if saved is not None and busy else None
    now = time.time()
    if o is None or o.same_process(me) or not alive(o, me, now):
        return ""
    if o.same_host(me):
        return (
            f"run by {o}: a run now is refused (exit 2: stop it first, kill -TERM {o.pid}), "
            "and would do this once it has stopped"
        )
    return (
        f"run by {o}, elsewhere: a run now waits for its hold to end (in "
        f"{math.ceil(max(0.0, o.lease_until - now))} s unless it writes again), then takes "
        "it over and does this"
    )


def _dry_run(
    policy: Policy,
    ev: Event,
    saved: Rollout | None,
    me: Owner,
    hooks: Hooks,
    store: Store,
    display: Display,
    ended: str = "",
) -> int:
    """``--dry-run``: what a run would do from here, validated as it is and
    written nowhere, then exit 0. The first line is a run's (the plan, or
    the end of a rollout that ended, *ended* its note); then, with every
    check passing and every gate saying yes, each stage: the routes its
    documents give and where they go, the checks an interval runs and
    their thresholds, the gates its pass asks and where it leads; the
    gates before a new rollout's first write, the webhooks of every
    interval, and how it rolls back. Each stage's documents are refused as
    a write of them would be (:meth:`Store.would_install`): the first with
    a run's error (exit 2), a later one with its step named (a run would
    count it a failed check each interval, then roll back). Nothing is
    written, no lock file made, no webhook called (an ``event`` hook hears
    nothing), and no other command's hold waited for (said instead)."""
    r = ev.rollout
    where = (
        store.paths.document
        if isinstance(store, FileStore)
        else f"key {store.document} of {store.where}"
    )
    lines: list[str] = []
    events: list[dict[str, Any]] = []
    if display.as_json:
        first = {**event_json(ev, ended), "dry_run": True}
        if display.declared:
            first["webhooks"] = display.declared
        events.append(first)
    else:
        lines.append(display.line(ev, ended))
    if ev.kind in ("promoted", "rolled_back"):
        code = EXIT_PROMOTED if r.phase == "promoted" else EXIT_ROLLED_BACK
        lines.append(
            f"  dry run: nothing written; a run reports this rollout as it ended (exit {code}), "
            f"and writes its documents ({where}) again only where they are not as it ended"
        )
        events.append({"event": "dry_run", "ended": r.phase, "exit": code})
        _dry_say(display, lines, events)
        return EXIT_PROMOTED
    stages, promoted = dry_stages(policy, r, hooks, time.time())
    starting = ev.kind == "start" or r.phase == "waiting"
    checked: set[str] = set()  # (mirrored or A/B stages alike: each text once)
    for i, st in enumerate(stages):
        x = st.rollout
        text = documents_text(x)
        try:
            if text not in checked:
                store.would_install(x)
            checked.add(text)
        except CanaryError as exc:
            if i == 0:
                with _left_if_refused(saved):
                    raise
            raise CanaryError(
                f"--dry-run: step {x.step + 1}/{len(x.steps)} ({stage_words(x, x.step)}) would "
                f"be refused: {exc}\n  a run writes the steps before it, then counts each "
                "interval this step is refused a failed check (--threshold of them roll back)"
            ) from exc
        if i == 0 and not starting:
            edited = store.edited(x)
            stages[0] = replace(st, written=f"again: {edited}" if edited else "already")
    try:
        store.would_install(promoted)
    except CanaryError as exc:
        raise CanaryError(
            f"--dry-run: the promotion would be refused: {exc}\n  a run walks its steps, "
            "then cannot write its end"
        ) from exc
    holder = _holder_words(saved, me)
    kind = "HTTPRoute" if r.gateway is not None else "RouteRule"
    names = ", ".join(name for name, _ in documents(stages[0].rollout if stages else r))
    drawn = " (a run draws its own cookie value)" if ev.kind == "start" and r.affinity else ""
    lines.append(
        "  dry run: nothing written, no webhook called, nothing waited for. A run writes "
        f"{kind} {names} to {where} at each step{drawn}, as follows where every check passes "
        "and every gate says yes"
    )
    if holder:
        lines.append(f"  {holder}")
    start = _start_hooks(r, hooks) if starting else []
    if start:
        asked = "; ".join(
            f"{_named(hooks, k)}"
            + {
                "confirm-rollout": f" (asked every {policy.interval:g} s until it says yes)",
                "pre-rollout": " (each failure a failed check, asked again each interval)",
            }.get(k, "")
            for k in start
        )
        rollback = f"; {_named(hooks, 'rollback')} each interval" if hooks.has("rollback") else ""
        lines.append(
            f"  before step 1: {asked}{rollback}; meanwhile its state says it waits, and "
            "nothing is routed"
        )
    n = len(stages[0].rollout.steps) if stages else 0
    said: list[tuple[str, str]] = []  # each stage's (routes and check, what its pass does)
    for st in stages:
        x = st.rollout
        written = "" if st.written == "new" else f" (written {st.written})"
        gates = "; ".join(_named(hooks, g) for g in st.gates)
        to = (
            f"promotes it: {routes_words(st.then)}"
            if st.then.phase == "promoted"
            else f"goes on to {stage_words(st.then, st.then.step)}"
        )
        said.append(
            (
                f"{routes_words(x)}{written}; {check_words(policy, x)}",
                f"asks {gates}, then {to}" if gates else to,
            )
        )
    # stages alike in a row (mirrored, A/B testing, up to 1000 of them): one line
    i = 0
    while i < len(stages):
        j = i
        while j + 1 < len(stages) and not stages[j].gates and said[j + 1][0] == said[i][0]:
            j += 1
        a, b = stages[i].rollout.step + 1, stages[j].rollout.step + 1
        if i == j:
            lines.append(f"  step {a}/{n}: {said[i][0]}; its pass {said[i][1]}")
        else:
            lines.append(
                f"  steps {a}-{b}/{n}: {said[i][0]}; each pass goes on to the next; step "
                f"{b}'s pass {said[j][1]}"
            )
        i = j + 1
    for st in stages:
        x = st.rollout
        events.append(
            {
                "event": "dry_run",
                "step": x.step,
                "steps": list(x.steps),
                "weight": x.weight,
                "mirror": x.mirrored,
                "match": [m.to_json() for m in x.match],
                "routes": routes_of(x),
                "written": st.written.split(":", 1)[0],
                "document": documents_text(x),
                "check": {
                    "interval": policy.interval,
                    "min_success_rate": policy.min_success_rate,
                    "max_p99_ms": None if policy.max_p99_ms == math.inf else policy.max_p99_ms,
                    "min_requests": policy.min_requests,
                },
                "gates": [
                    {"type": g, "webhooks": [h.to_json() for h in _hooks_of(hooks, g)]}
                    for g in st.gates
                ],
                # where its pass leads: the next stage, or the promotion
                "then": (
                    "promoted"
                    if st.then.phase == "promoted"
                    else {"step": st.then.step, "weight": st.then.weight}
                ),
            }
        )
    each = [
        f"{_named(hooks, k)} {when}"
        for k, when in (
            ("rollout", "at each interval's start"),
            ("rollback", "before each verdict (a 2xx rolls back)"),
            ("post-rollout", "once the end is written"),
            ("event", "hears every line"),
        )
        if hooks.has(k)
    ]
    if each:
        lines.append(f"  webhooks: {'; '.join(each)}")
    deadline = (
        f"{policy.progress_deadline:g} s of them roll back (--progress-deadline)"
        if policy.progress_deadline
        else "they wait for ever (--progress-deadline 0)"
    )
    back = roll_back(r, time.time())
    lines.append(
        f"  a failed check stays at its step, and {count(policy.threshold, 'failed check')} "
        f"(--threshold{f'; {r.failed_checks} so far' if r.failed_checks else ''}) "
        f"roll{'s' if policy.threshold == 1 else ''} back: ROLLED BACK, "
        f"{routes_words(back)}; an interval with fewer than "
        f"{count(policy.min_requests, 'request')} is a halt, and {deadline}"
    )
    events.append(
        {
            "event": "dry_run",
            "promoted": {"routes": routes_of(promoted), "document": documents_text(promoted)},
            "rolled_back": {
                "routes": routes_of(back),
                "threshold": policy.threshold,
                "progress_deadline": policy.progress_deadline,
            },
            "before_start": [
                {"type": k, "webhooks": [h.to_json() for h in _hooks_of(hooks, k)]} for k in start
            ],
            "run_by": holder or None,
        }
    )
    _dry_say(display, lines, events)
    return EXIT_PROMOTED


def _dry_say(display: Display, lines: Sequence[str], events: Sequence[dict[str, Any]]) -> None:
    """The preview: its lines, or with ``--json`` its events, each with the time."""
    if display.as_json:
        at = stamp()
        for e in events:
            print(json.dumps({"time": at, **e}), file=display.out, flush=True)
    else:
        display.say("\n".join(lines))


@contextlib.contextmanager
def _left_if_refused(saved: Rollout | None) -> Iterator[None]:
    """A refusal before the analysis runs (exit 2), of a run that would
    resume the progressing rollout *saved*: the message says that it stays
    as it was, with nothing judging it (an earlier run left it so)."""
    try:
        yield
    except CanaryError as exc:
        if saved is None or saved.phase != "progressing":
            raise
        raise CanaryError(
            f"{exc}\n  nothing written: the rollout of {saved.service} stays as it was "
            f"({left_as_is(saved)}), and nothing judges {saved.canary} until this runs "
            f"(or l4proxy canary promote|abort {saved.service})"
        ) from exc


def refused_check(graded: Check, new: Rollout, exc: CanaryError) -> Check:
    """*graded* turned into a failed check because the stage it led to,
    *new*, could not be written (*exc*: refused, or not written); its
    numbers are kept, and the reason is the refusal's first line (a
    competing rule's message goes on to say what to do)."""
    why = str(exc).split("\n", 1)[0]
    if new.ab_testing:
        stage = f"A/B {new.step + 1}/{len(new.steps)}"
    elif new.mirrored:
        stage = f"mirror {new.step + 1}/{mirrored_stages(new.steps)}"
    else:
        stage = f"{new.weight} %"
    return replace(graded, verdict="fail", reasons=(*graded.reasons, f"{stage} not written: {why}"))


def rollout_words(r: Rollout) -> str:
    """*r* in a few words, for a message: ``v1 -> v2 at 10 %, run by pid
    4242 on node-1``."""
    if r.phase == "waiting":
        at = "waiting to start (nothing written for it yet)"
    elif r.ab_testing:
        at = f"A/B testing, {r.step}/{len(r.steps)} intervals passed"
    elif r.mirrored:
        at = "mirrored"
    else:
        at = f"{phase_words(r)} at {r.weight} %" if r.phase != "progressing" else f"at {r.weight} %"
    return f"{r.stable} -> {r.canary} {at}" + (f", run by {r.owner}" if r.owner else "")


def lease_of(policy: Policy, wait: float) -> float:
    """How long a running command's hold on its rollout lasts past each of
    its writes (:class:`~l4proxy.canary._analysis.Owner`): two intervals
    and --wait-live (a write, the wait for it to be live, an interval, the
    next write), and a minute for slow reads."""
    return 2 * policy.interval + wait + 60.0


def this_process(lease: float) -> Owner:
    """This command as the owner of a rollout; its *lease_until* holds the
    lease's length until a write adds the time to it."""
    pid = os.getpid()
    return Owner(socket.gethostname(), pid, _pid_namespace(), _start_ticks(pid), lease)


def _pid_namespace() -> str:
    """This process's pid namespace (``pid:[4026531836]``; "" where /proc
    does not say): two containers of one host name have pids of their own."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _start_ticks(pid: int) -> int:
    """When process *pid* started, in clock ticks since boot (/proc's
    ``stat`` field 22); 0 where it is not known (no such process, no /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        # the command name (field 2) is in parentheses and may hold spaces
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return 0


def alive(owner: Owner, me: Owner, now: float) -> bool:
    """Whether *owner* still drives its rollout, as seen by *me*: on this
    host and pid namespace, whether its process runs (the same pid, started
    at the same time: a pid used again is another process); elsewhere,
    whether its lease lasts."""
    if not owner.same_host(me):
        return now < owner.lease_until
    try:
        os.kill(owner.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it runs
    started = _start_ticks(owner.pid)
    return not (owner.started and started and started != owner.started)


# At most this many seconds between two reads of the state while another
# command's hold on the rollout lasts (a renewal, the rollout given up or
# ended are seen then); and the hold's end is read at once.
HOLD_POLL = 5.0


def await_hold(
    store: Store, saved: Rollout | None, me: Owner, display: Display, err: TextIO
) -> Rollout | None:
    """The stored rollout once no other command holds it, as *me* sees it
    (*saved*: as just read). Not held (none progressing, no owner, this
    process, or one that has stopped): at once. Held from this host and pid
    namespace by a process that runs: refused (exit 2, nothing written),
    since that process can be asked and stopped. Held from elsewhere (a
    Job's pod, a laptop: a process that cannot be asked from here): waited
    for until its lease ends without a write from it, the state read again
    every :data:`HOLD_POLL` seconds, as a leader election's candidate waits
    for the leader's lease (a renewal waits on; given up or ended, at
    once). A Job's pod lost with its node (SIGKILL, no word) holds its
    rollout until then, and the Job's next pod takes it over: refusing it
    (exit 2) failed the Job, which was to resume the rollout. A line says
    whose hold it waits for, and a progress line comes at most every
    :data:`PROGRESS_EVERY` seconds (``--json``: the line on stderr, no
    progress). Ctrl-C or SIGTERM (KeyboardInterrupt) ends the wait, with
    nothing written.

    The lease is a time on the holder's clock. Clocks that disagree by more
    than its minute of slack may take a running holder's rollout over
    early; that holder then finds, at its next read of the state or its
    next write (which expects the holder it wrote: :func:`stored_as`), that
    the rollout was taken over, and stops without writing: the two never
    drive it together past one interval. (A Kubernetes Lease's candidates
    count from when they saw it change instead; here a Job's next pod,
    started minutes after its node was lost, would wait a whole lease
    again.)"""
    waited: Owner | None = None
    start = time.monotonic()
    while True:
        busy = saved is not None and saved.phase in ("waiting", "progressing")
        o = saved.owner if saved is not None and busy else None
        now = time.time()
        if saved is None or o is None or o.same_process(me) or not alive(o, me, now):
            return saved
        if o.same_host(me):
            raise CanaryError(
                f"the rollout of {saved.service} ({rollout_words(saved)}) is run by another "
                f"l4proxy canary: stop it first (kill -TERM {o.pid}: it leaves the weights as "
                f"they are); or end the rollout (l4proxy canary promote|abort "
                f"{saved.service}). Nothing written"
            )
        left = max(0.0, o.lease_until - now)
        if waited is None or not o.same_process(waited):
            start = time.monotonic()
            text = (
                f"{saved.service}: {rollout_words(saved)}, elsewhere (another host or pid "
                f"namespace: a process this command cannot ask); waiting for its hold to end, "
                f"in {math.ceil(left)} s unless it writes again, then this command takes the "
                "rollout over (Ctrl-C or SIGTERM ends the wait, nothing written)"
            )
            if display.as_json:
                complain(err, text)
            else:
                display.say(text)
        waited = o
        display.progress(
            f"waiting for the hold of {o} to end: {time.monotonic() - start:.0f} s waited, "
            f"{left:.0f} s left unless it writes again"
        )
        time.sleep(min(left, HOLD_POLL))
        saved = store.load_state()


def left_as_is(r: Rollout) -> str:
    """What a progressing rollout left as it is goes on doing: its weight,
    or its mirror (every request sent twice), or its A/B match."""
    if r.ab_testing:
        return f"the requests with {alternatives(r.match)} still go to {r.canary}"
    if r.mirrored:
        return f"the mirror stays on: every request is still copied to {r.canary}"
    return f"{r.canary} keeps {r.weight} %"


def _before_start(
    policy: Policy,
    r: Rollout,
    hooks: Hooks,
    display: Display,
    store: Store,
    loaded: Rollout | None,
    own: Callable[[Rollout], Rollout],
    resumed: bool = False,
) -> tuple[Event, Rollout | None]:
    """A new rollout *r* (:func:`~l4proxy.canary._analysis.waiting`: its
    first stage not written) once its webhooks let it start, every
    interval asking again, in Flagger's order:

    * ``confirm-rollout``: until every one answers 2xx, it waits (Flagger's
      Initialized at the first call, then Waiting);
    * ``rollback``: once the rollout is Waiting or Progressing (Flagger asks
      none before), first at each interval: 2xx rolls it back before it
      started (an end to write: every request to stable);
    * ``pre-rollout``: then, until they pass: each failure is a failed
      check (a line), ``--threshold`` of them roll it back;
    * ``confirm-traffic-increase`` (and ``confirm-promotion`` where the
      first stage is 100 %): then, where its first stage is a weight,
      until every one answers 2xx, it waits.

    While something holds it, its state records the rollout *waiting*,
    with what holds it and since when (a :class:`~l4proxy.canary._analysis.Hold`)
    and this command as its owner, written again each interval (its lease
    renewed): ``status`` shows it, a second command is refused or waits as
    for any rollout held, and ``abort`` ends it, which the next write here
    finds (:class:`Superseded`, with the rollout as last written). Nothing
    else is written: no route. A gate that holds is said once
    (``waiting: ...``) and again when what it says changes, with progress
    lines between; its opening is said too. A Ctrl-C or SIGTERM
    (KeyboardInterrupt, raised on) puts the state back as it was before
    (*loaded*). *resumed*: *r* is a wait resumed (*loaded*, its command
    killed while its webhooks held it), which goes on where its hold says
    it stood (the steps before it taken: confirm-rollout, the pre-rollout
    hooks, the first gates, in that order), Waiting from its first call;
    a Ctrl-C or SIGTERM leaves it waiting, as last written, with no owner
    (it is the rollout's, not this command's to undo). Returns ``start``
    with the rollout as it starts (its failed checks counted), or
    ``rolled_back`` to write, and the state as last written (what the
    next write expects)."""
    # a wait *resumed* goes on where its hold says it stood: the steps
    # before it were taken (the gates passed, the pre-rollout hooks too)
    held = r.hold.gate if resumed and r.hold is not None else ""
    stood = START_ORDER.index(held) if held in START_ORDER else 0
    confirmed = not hooks.has("confirm-rollout") or stood > 0
    # whether the confirm-rollout gate was asked (Initialized until then)
    asked = confirmed or resumed
    passed = not hooks.has("pre-rollout") or stood > 1
    gates = [g for g in first_gates(r) if hooks.has(g) and START_ORDER.index(g) >= stood]
    said: HookResult | None = None  # the call that holds the start, as last printed
    said_at = time.time()  # when it began to hold (the confirmation says how long)
    # the gate that held a resumed wait (said by the command killed): its
    # opening, the first call here, is said, with how long it held
    reheld = held if held in GATES else ""
    if reheld and r.hold is not None:
        said_at = r.hold.since
    last = loaded  # the state as last written
    try:
        while True:
            # once per interval: (again) after each wait
            if asked:
                got = hooks.call("rollback", flagger_phase(r))
                if (by := rollback_asked(got)) is not None:
                    ended = roll_back(r, time.time(), f"webhook {by}")
                    return Event("rolled_back", ended, None, 0), last
            hold: Hold | None = None
            while hold is None:  # the steps that can be taken now
                now = time.time()
                if not confirmed:
                    got = hooks.call("confirm-rollout", "Waiting" if asked else "Initialized")
                    asked = True
                    confirmed = not holding(got)
                    if not confirmed:
                        hold = Hold("confirm-rollout", holding(got), now)
                elif not passed:
                    got = hooks.call("pre-rollout", "Progressing")
                    if reasons := failures(got):
                        ev = fail_before_start(policy, r, reasons, now)
                        if ev.kind == "rolled_back":
                            return ev, last
                        display.emit(ev, webhooks=got)
                        r = ev.rollout
                        hold = _held_since(r, Hold("pre-rollout", "; ".join(reasons), now))
                        r = replace(r, hold=hold)
                        break
                    passed = True
                    r = replace(r, hold=None)
                    display.emit(
                        Event("check", r, Check("pass", None, None, None), 0, pre_rollout=True),
                        webhooks=got,
                    )
                    continue
                elif gates:
                    got = hooks.call(gates[0], "Progressing")
                    if why := holding(got):
                        hold = Hold(gates[0], why, now)
                    elif gates.pop(0) == "confirm-promotion":
                        # a first stage of 100 (--steps 100): its raise confirmed
                        r = replace(r, promotion_confirmed=True)
                else:
                    return Event("start", started(r)), last
                if hold is None and (said is not None or (got and got[-1].hook.type == reheld)):
                    r = replace(r, hold=None)
                    display.hook(r, got[-1], "confirmed", f"after {now - said_at:.0f} s")
                    said = None
                elif hold is not None:
                    hold = _held_since(r, hold)
                    r = replace(r, hold=hold)
                    if said is None and not reheld:
                        said_at = now
                    if said is None or str(said) != str(got[-1]):
                        display.hook(
                            r,
                            got[-1],
                            "waiting",
                            f"nothing written yet; asked again every {policy.interval:g} s",
                        )
                    said = got[-1]
                reheld = ""
            # recorded for status and abort (the owner's lease renewed): no route
            mine = own(r)
            try:
                store.save_state(mine, expected=last)
            except Superseded as exc:
                exc.ours = r if last is loaded else last
                raise
            last = r = mine
            what = hold.gate if hold is not None else "pre-rollout"
            pause(policy.interval, display.progress, _not_started(r, what, hold))
    except KeyboardInterrupt:
        if resumed and last is not None:
            # the wait is the rollout's (a command killed left it), not
            # this one's to undo: it stays, as last written, run by nobody
            with contextlib.suppress(CanaryError, Superseded, OSError):
                store.save_state(replace(last, owner=None), expected=last)
        elif last is not loaded and last is not None:  # ours is written: put it back
            with contextlib.suppress(CanaryError, Superseded, OSError):
                store.put_back(loaded, expected=last)
        raise


# The steps of a new rollout's start, in the order _before_start takes
# them: what holds a waiting rollout (its Hold's gate) says where it stood.
START_ORDER = ("confirm-rollout", "pre-rollout", "confirm-traffic-increase", "confirm-promotion")


def _held_since(r: Rollout, hold: Hold) -> Hold:
    """*hold*, since *r*'s hold began where the same gate held it already."""
    if r.hold is not None and r.hold.gate == hold.gate:
        return replace(hold, since=r.hold.since)
    return hold


def _not_started(r: Rollout, kind: str, hold: Hold | None) -> Callable[[float], str]:
    """The progress line while a new rollout's start waits on *kind*'s
    webhooks (held since *hold*'s time)."""
    since = time.time() if hold is None else hold.since
    return lambda _: (
        f"{r.canary} not started: waiting for its {kind} webhooks, "
        f"{time.time() - since:.0f} s so far"
    )


def _end_here(
    store: Store,
    metrics: Metrics,
    new: Rollout,
    wait: float,
    expected: Rollout | None,
    display: Display,
    hooks: Hooks,
    shown: Event,
    err: TextIO,
    webhooks: Sequence[HookResult] = (),
) -> int:
    """Write the end *new* (a rollback a webhook asked for, or pre-rollout
    webhooks failing --threshold times), as the analysis' own ends are
    written (waited for live, NOT SERVED said), then print *shown* (the
    interval it cut short, never judged; or the pre-rollout's end) and
    call the post-rollout webhooks. Raises :class:`Superseded` where the
    stored rollout is no longer *expected*."""
    unseen = _set_weight(store, metrics, new, wait, expected, err)
    ev = replace(shown, kind="rolled_back", rollout=new)
    cut_short = ev.check is None and not ev.pre_rollout and new.started
    if unseen.not_served is not None:
        display.emit(
            ev, cut_short=cut_short, not_served=unseen.not_served.summary, webhooks=webhooks
        )
        not_served(err, new, store, unseen.not_served)
        hooks.post_rollout(new, display)
        return EXIT_NOT_SERVED
    display.emit(ev, cut_short=cut_short, webhooks=webhooks)
    if unseen:
        complain(err, f"warning: {unseen}")
    hooks.post_rollout(new, display)
    return EXIT_ROLLED_BACK


def _ended_by_hand(
    display: Display, now: Rollout | None, ours: Rollout, hooks: Hooks | None = None
) -> int:
    """The stored rollout is no longer ours: say how it ended (to the
    post-rollout webhooks too: it ended), exit so. A waiting start (*ours*
    not started) ended by hand stops here writing nothing, as at a
    Ctrl-C, and exits as that end."""
    if now is not None and now.phase in ("waiting", "progressing") and now == ours:
        # the same stage, held by another command: it took the rollout over
        # (this one's hold had lapsed, or it was thought gone)
        raise CanaryError(
            f"the rollout of {ours.service} was taken over by another l4proxy canary "
            f"({rollout_words(now)}); stopped without writing"
        )
    if now is None or now.phase in ("waiting", "progressing"):
        # removed, or another controller drives it now: not ours to write
        what = "its state was removed" if now is None else f"it is now {rollout_words(now)}"
        raise CanaryError(
            f"the rollout of {ours.service} was changed by someone else ({what}); "
            "stopped without writing"
        )
    # what the last interval was (a mirrored one has no weight to show),
    # cut short: its verdict, if one was reached meanwhile, was never applied
    kind: Literal["promoted", "rolled_back"] = (
        "promoted" if now.phase == "promoted" else "rolled_back"
    )
    display.emit(
        Event(kind, now, None, ours.weight, ours.mirrored), "ended by hand", cut_short=True
    )
    if hooks is not None:
        hooks.post_rollout(now, display)
    return EXIT_PROMOTED if now.phase == "promoted" else EXIT_ROLLED_BACK


@dataclass(frozen=True)
class Unseen:
    """Why a change written was not seen live ("" and None: it was):
    *reason*, that of a failed check (progressing) or of the warning at a
    rollout's end; *not_served*, where a sidecar was read and still served
    the rules from before the change after --wait-live (not where it could
    not be read: a sidecar down serves nothing, and one that comes back
    loads the rules as they are)."""

    reason: str = ""
    not_served: NotLive | None = None

    def __bool__(self) -> bool:
        return bool(self.reason)

    def __str__(self) -> str:
        return self.reason


def _set_weight(
    store: Store,
    metrics: Metrics,
    r: Rollout,
    wait: float,
    expected: Rollout | None = ANY,
    err: TextIO | None = None,
) -> Unseen:
    """State first, then the document; then a fresh window at that weight.

    Once the commit is done the change is made, so what fails after it
    (the sidecars unreadable, or not serving it within *wait*) is not
    raised: it is returned (:class:`Unseen`, false when all went well), and
    the caller counts it as a failed check (progressing), or says it (an
    end: a warning where the sidecars could not be read, NOT SERVED where
    they still serve the rules from before it)."""
    before = metrics.before_change()
    unseen = Unseen()
    if _commit(store, r, expected, err):  # unchanged (a resume): no reload to wait for
        try:
            metrics.wait_live(before, wait)  # also on the way out: exit once it is live
        except MetricsError as exc:
            unseen = Unseen(f"metrics unreadable: {exc}")
        except NotLive as exc:
            unseen = Unseen(f"not live: {exc}", exc)
    if r.phase == "progressing":
        try:
            metrics.start_window(r.mirrored)
        except MetricsError as exc:
            unseen = unseen or Unseen(f"metrics unreadable: {exc}")
    return unseen


def not_served(err: TextIO, r: Rollout, store: Store, why: NotLive) -> None:
    """Say loudly that *r*'s end (a rollback, an abort, a promotion) is
    written but not served: the sidecars still route as before it (the
    canary keeps its traffic after a rollback), and what to do."""
    what = "ROLLBACK" if r.phase == "rolled_back" else "PROMOTION"
    complain(
        err,
        f"{what} NOT SERVED: {why.summary}\n"
        f"  it is written ({store.where}: 100 % to "
        f"{r.stable if r.phase == 'rolled_back' else r.canary}), and the sidecars load it "
        "once they accept the rules again: fix what they refuse (their "
        "/config_dump's last_error, and its held: the files they hold back), then check "
        f"with 'l4proxy canary status {store.service}' and their /stats. In detail: "
        f"{why}",
    )


def _commit(
    store: Store, r: Rollout, expected: Rollout | None = ANY, err: TextIO | None = None
) -> bool:
    """store.commit; the end of a rollout (a rollback above all) is tried
    again while it fails with :class:`Transient`, on the store's
    ``end_retry``: one 503 from the API server left the canary serving
    traffic. Given up, it says loudly that it was NOT applied (exit 2)."""
    if r.phase == "progressing":
        return store.commit(r, expected)  # the next run resumes it
    what = "rollback" if r.phase == "rolled_back" else "promotion"
    for delay in (*store.end_retry, None):
        try:
            return store.commit(r, expected)
        except Transient as exc:
            if delay is None:
                now = f" ({expected.weight} %)" if isinstance(expected, Rollout) else ""
                raise CanaryError(
                    f"the {what} was NOT applied: {exc}; tried {len(store.end_retry) + 1} "
                    f"times. {store.where} still routes as before{now}: "
                    f"'l4proxy canary {'abort' if what == 'rollback' else 'promote'} "
                    f"{store.service}' once it can be written"
                ) from exc
            complain(err, f"{what} not written ({exc}); trying again in {delay:g} s")
            time.sleep(delay)
    raise AssertionError("not reached")


def _ask(err: TextIO, r: Rollout) -> str:
    if not sys.stdin.isatty():
        return "leave"
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C just quits
    leave = (
        f"leave it as it is (l: {left_as_is(r)})"
        if r.ab_testing or r.mirrored
        else "leave the weights as they are (l)"
    )
    while True:
        print(
            f"\nroll back to stable (r) or {leave}? [r/l] ",
            end="",
            file=err,
            flush=True,
        )
        try:
            answer = sys.stdin.readline().strip().lower()
        except (OSError, ValueError):
            return "leave"
        if answer.startswith("r"):
            return "rollback"
        if answer.startswith("l") or not answer:
            return "leave"
