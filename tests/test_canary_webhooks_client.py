"""``l4proxy canary``'s webhook client as Go's (Flagger's) behaves: a URL's
user and password sent as Basic authorization, the timeout over the whole
exchange, 307/308 redirects followed with the POST's body, what the output
shows of a URL, and a Canary file of several documents. Real HTTP servers
on 127.0.0.1, port 0."""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from l4proxy.canary._webhooks import HookResult, Webhook, WebhookError, parse_file, post

Handler = Callable[[http.server.BaseHTTPRequestHandler, bytes], None]


class Server:
    """An HTTP server on 127.0.0.1 (port 0) whose answer to a request on
    PATH is ``routes[PATH](handler, body)``; each request is kept, in
    order, as (method, path, headers, body)."""

    def __init__(self, routes: dict[str, Handler]) -> None:
        self.routes = routes
        self.seen: list[tuple[str, str, dict[str, str], bytes]] = []
        self.url = ""

    @contextlib.contextmanager
    def serving(self) -> Iterator[Server]:
        server = self

        class Handle(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _any(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                server.seen.append((self.command, self.path, dict(self.headers), body))
                server.routes[self.path](self, body)

            do_POST = do_GET = _any

            def log_message(self, *a: object) -> None:
                pass

        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handle)
        srv.daemon_threads = True
        threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True).start()
        self.url = f"http://127.0.0.1:{srv.server_address[1]}"
        try:
            yield self
        finally:
            srv.shutdown()
            srv.server_close()


def answer(status: int, text: bytes = b"ok", headers: dict[str, str] | None = None) -> Handler:
    def handle(h: http.server.BaseHTTPRequestHandler, body: bytes) -> None:
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(text)))
        h.end_headers()
        h.wfile.write(text)

    return handle


def call(url: str, name: str = "", timeout: float = 5.0) -> HookResult:
    return post(Webhook(name, "rollout", url, timeout=timeout), {"name": "bootcamp"})


def test_a_urls_user_and_password_are_sent_as_basic_authorization() -> None:
    """As Go's client sends a URL's userinfo (%-decoded): urllib took them
    for part of the host, and every call failed. The lines never show the
    password (nor the user)."""
    with Server({"/h": answer(200)}).serving() as srv:
        url = srv.url.replace("//", "//us%40er:p%3Ass@") + "/h"
        result = call(url)
    assert result.ok, result
    ((method, path, headers, body),) = srv.seen
    expected = base64.b64encode(b"us@er:p:ss").decode()
    assert (method, path, headers.get("Authorization")) == ("POST", "/h", f"Basic {expected}")
    assert json.loads(body) == {"name": "bootcamp"}
    assert "p%3Ass" not in str(result) and "us%40er" not in str(result)
    assert str(result) == f"rollout {srv.url}/h: HTTP 200: ok"


def test_the_timeout_bounds_an_answer_whose_body_trickles_in() -> None:
    """A 200 that sends its 100 bytes of body one at a time, 50 ms apart
    (5 s in all), to a hook with a timeout of 0.3 s: the call gives up
    within it, the body not read. Each socket read waited its own timeout,
    so the call waited for the whole body (50 s for a byte a second under
    a 3 s timeout)."""
    sent: list[int] = []

    def trickle(h: http.server.BaseHTTPRequestHandler, body: bytes) -> None:
        h.send_response(200)
        h.send_header("Content-Length", "100")
        h.end_headers()
        for _ in range(100):
            try:
                h.wfile.write(b"x")
                h.wfile.flush()
            except OSError:
                return
            sent.append(1)
            time.sleep(0.05)

    with Server({"/slow": trickle}).serving() as srv:
        result = call(f"{srv.url}/slow", timeout=0.3)
        at_return = len(sent)
    assert at_return < 100  # the call gave up before the body was all sent
    assert (result.ok, result.status) == (False, None), result
    assert result.detail == "HTTP 200, but its body not read within 0.3 s"


@pytest.mark.parametrize("code", [307, 308])
def test_a_307_or_308_is_followed_with_the_post_and_its_body(code: int) -> None:
    """Go re-POSTs the body on a 307 or 308 (the status' meaning); urllib
    refused them, and the call failed with the redirect's status."""
    routes = {"/a": answer(code, b"", {"Location": "/b"}), "/b": answer(200, b"at b")}
    with Server(routes).serving() as srv:
        result = call(f"{srv.url}/a")
    assert (result.ok, result.detail) == (True, "at b"), result
    assert [(m, p) for m, p, _, _ in srv.seen] == [("POST", "/a"), ("POST", "/b")]
    assert json.loads(srv.seen[1][3]) == {"name": "bootcamp"}
    assert srv.seen[1][2]["Content-Type"] == "application/json"


def test_credentials_follow_a_redirect_to_the_same_host_only() -> None:
    """A relative Location keeps the hook's user and password (Go sends
    them again); another host's URL does not get them."""
    with Server({"/b": answer(200)}).serving() as other:
        routes = {
            "/a": answer(307, b"", {"Location": "/b"}),
            "/b": answer(307, b"", {"Location": f"{other.url}/b"}),
        }
        with Server(routes).serving() as srv:
            result = call(srv.url.replace("//", "//u:p@") + "/a")
    assert result.ok, result
    basic = f"Basic {base64.b64encode(b'u:p').decode()}"
    assert [h.get("Authorization") for _, _, h, _ in srv.seen] == [basic, basic]
    assert [h.get("Authorization") for _, _, h, _ in other.seen] == [None]


def test_redirects_stop_after_ten_as_gos() -> None:
    """Each /r/N sends to /r/N+1: the call follows ten redirects (eleven
    requests), then fails with the last one's status."""
    routes = {f"/r/{i}": answer(307, b"", {"Location": f"/r/{i + 1}"}) for i in range(20)}
    with Server(routes).serving() as srv:
        result = call(f"{srv.url}/r/0")
    assert (result.ok, result.status) == (False, 307), result
    assert len(srv.seen) == 11


def test_the_output_shows_a_named_hooks_host_and_an_unnamed_ones_path_never_a_query() -> None:
    """A chat's incoming webhook holds its secret in the path or the query:
    a hook with a name shows its scheme and host beside the name, one
    without its path too (how else to tell it), never the query."""
    slack = "https://hooks.slack.example:8443/services/T0/B0/SECRET?token=abc#x"
    named = Webhook("slack", "event", slack)
    assert (str(named), named.to_json()["url"]) == (
        'event "slack"',
        "https://hooks.slack.example:8443",
    )
    unnamed = Webhook("", "event", slack.replace("https://", "https://u:pw@"))
    shown = "https://hooks.slack.example:8443/services/T0/B0/SECRET"
    assert (str(unnamed), unnamed.to_json()["url"]) == (f"event {shown}", shown)
    result = HookResult(named, 500, "no")
    assert "SECRET" not in json.dumps(result.to_json()) and "token" not in str(result)


CANARY_AND_HPA = """\
apiVersion: flagger.app/v1beta1
kind: Canary
metadata: {name: podinfo}
spec:
  analysis:
    webhooks:
      - name: load test
        url: http://flagger-loadtester.test/
---
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata: {name: podinfo}
spec: {minReplicas: 2}
"""


def test_a_canary_file_with_other_documents_gives_the_canarys_webhooks() -> None:
    """A Canary saved with its HPA: the Canary's hooks (yaml.safe_load
    refused the stream with a parser dump)."""
    assert parse_file(CANARY_AND_HPA, "podinfo.yaml") == (
        Webhook("load test", "rollout", "http://flagger-loadtester.test/"),
    )
    assert parse_file("---\n" + CANARY_AND_HPA + "---\n", "podinfo.yaml") == parse_file(
        CANARY_AND_HPA, "podinfo.yaml"
    )


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("---\n".join([CANARY_AND_HPA.split("---\n")[1]] * 2), "none is a Canary"),
        (CANARY_AND_HPA.split("---\n")[0] + "---\n" + CANARY_AND_HPA, "2 are a Canary"),
    ],
)
def test_several_documents_without_one_canary_are_refused_plainly(text: str, found: str) -> None:
    with pytest.raises(WebhookError) as exc:
        parse_file(text, "podinfo.yaml")
    message = str(exc.value)
    assert message.startswith("podinfo.yaml: ") and found in message, message
    assert "\n" not in message  # one line, not the parser's dump
