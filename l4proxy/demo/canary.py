"""The end of ``l4proxy demo``: two automated rollouts with ``l4proxy canary``.

After the tutorial's five steps (which end with no RouteRule), the demo adds
a bootcamp **v3** pod that answers ``500`` to 20 % of its requests
(``--fail-rate 0.2``, seeded) and a **traffic** pod: ``l4proxy-init`` plus a
sidecar with ``--http-routing request`` (the per-request metrics the canary
reads), and keep-alive clients as uid 1000 sending requests to ``bootcamp``
throughout. Then, in the traffic pod, ``l4proxy canary`` runs twice on the
demo's rules directory with one-second intervals:

* v1 -> v2: one mirrored interval (every request to v1, a copy of each to
  v2, judged on v2's answers to the copies), then promoted from 5 % to
  100 % while v2 stays healthy;
* v2 -> v3 (``--mirror 2``): rolled back while still mirrored, once v3
  fails two checks, showing why; then the traffic sidecar's own counts
  since that rollout started show that no client request went to v3
  (``istio_requests_total``), only copies
  (``l4proxy_mirror_requests_total``). (Before the first rollout, with no
  RouteRule, the clients' requests went round robin to every pod, v3's
  too, and were counted under the pod that answered.)
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

from l4proxy.demo.podnet import Pod

CANARY_ARGS = (
    "--steps",
    "5,25,50,100",
    "--interval",
    "1",
    "--threshold",
    "2",
    "--min-requests",
    "10",
    "--metrics",
    "127.0.0.1:15000",
)

LOAD = r"""
import http.client, sys, time
c = None
while True:
    try:
        if c is None:
            c = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]), timeout=10)
        c.request("GET", "/")
        c.getresponse().read()
    except Exception:
        c = None
        time.sleep(0.01)
"""


def rollouts(tut: Any, exe: Any, quick_stop: tuple[str, ...]) -> int:
    """Run both rollouts; 0 when v2 was promoted and v3 rolled back, else 1."""
    # the demo's own types and options (no import cycle at load)
    from l4proxy.demo.tutorial import PER_REQUEST, PodInfo

    svc = tut.man.services[0]
    tut.say("== progressive delivery: l4proxy canary")
    pod = tut.net.add_pod("bootcamp-v3-0", labels={"app": "bootcamp", "version": "v3"})
    tut.app_pods.append(PodInfo(pod, "v3"))
    tut._init(pod)
    tut._spawn(
        pod,
        [
            sys.executable,
            "-m",
            "l4proxy.demo.bootcamp",
            "--port",
            str(svc.target_port),
            "--pod",
            pod.name,
            "--version",
            "3",
            "--fail-rate",
            "0.2",
            "--seed",
            "1",
        ],
        f"{pod.name}.app",
        user=1000,
    )
    tut._spawn(
        pod,
        [*exe("l4proxy"), "run", "--uid", "1337", *quick_stop, *PER_REQUEST],
        f"{pod.name}.sidecar",
    )
    pod.wait_listening(svc.target_port)
    tut._write_registry(tut.man.services)
    traffic: Pod = tut.net.add_pod("traffic", labels={"app": "traffic"})
    traffic.set_hosts({tut.vips[svc.name]: [svc.name, f"{svc.name}.default"]})
    tut._init(traffic)
    tut._spawn(
        traffic,
        [
            *exe("l4proxy"),
            "run",
            "--rules",
            tut.rules_dir,
            "--uid",
            "1337",
            "--reload-interval",
            "0.2",
            *PER_REQUEST,
            *quick_stop,
            *tut.seed_args,
        ],
        "traffic.sidecar",
    )
    traffic.wait_listening(15001)
    tut._wait_ready(traffic)
    tut.say(
        f"   pod bootcamp-v3-0 {pod.ipv4} (v3: answers 500 to 20 % of requests); pod traffic "
        f"{traffic.ipv4}: keep-alive clients to {svc.name}:{svc.port} through a sidecar "
        "with --http-routing request"
    )
    for _ in range(8):
        tut._spawn(
            traffic,
            [sys.executable, "-c", LOAD, svc.name, str(svc.port)],
            "traffic.load",
            user=1000,
        )
    code = 0
    for stable, canary, mirror, want in (("v1", "v2", "1", 0), ("v2", "v3", "2", 1)):
        args = ("--mirror", mirror, *CANARY_ARGS)
        argv = [
            *exe("l4proxy"),
            "canary",
            svc.name,
            "--stable",
            stable,
            "--canary",
            canary,
            "--rules",
            tut.rules_dir,
            *args,
        ]
        tut.say(
            f"   $ l4proxy canary {svc.name} --stable {stable} --canary {canary} "
            + " ".join(args[:-2])
        )
        before = tut._admin(traffic, "/stats") if canary == "v3" else ""
        proc = subprocess.Popen(
            traffic.command(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert proc.stdout is not None
        for line in proc.stdout:  # as it happens: one line per interval
            tut.say(f"   {line.rstrip()}")
        returncode = proc.wait()
        meaning = {0: "promoted", 1: "rolled back"}.get(returncode, "error")
        tut.say(f"   exit {returncode} ({meaning})")
        if canary == "v3":
            tut.say(f"   {_what_v3_answered(tut._admin(traffic, '/stats'), before)}")
        tut.say()
        if returncode != want:
            code = 1
    return code


def _what_v3_answered(stats: str, before: str) -> str:
    """The traffic sidecar's own account of v3 since its rollout started
    (*stats* less *before*, the sidecar's /stats then): the client
    requests it served and the copies it answered. (Not since the sidecar
    started: before the first rollout, with no rule, v3 served its share
    of the clients' requests, each counted under the pod that answered.)"""
    from l4proxy.canary._metrics import failed, parse_text

    values, _ = parse_text(stats)
    earlier, _ = parse_text(before)
    served = copies = bad = 0.0
    for (name, labels), total in values.items():
        d = dict(labels)
        if d.get("destination_version") != "v3":
            continue
        n = total - earlier.get((name, labels), 0.0)
        if name == "istio_requests_total":
            served += n
        elif name == "l4proxy_mirror_requests_total":
            copies += n
            if failed(d.get("response_code", "")):
                bad += n
    line = (
        f"the traffic sidecar's counts for v3: {served:,.0f} client requests, "
        f"{copies:,.0f} copies answered ({bad:,.0f} of them failed: 5xx or none) "
        "during this rollout"
    )
    return line + (": no client got an answer from v3" if not served else "")
