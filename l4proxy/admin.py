"""The admin endpoint (127.0.0.1:15000 by default), Envoy-style.

=================  ==========================================================
``/ready``         200 ``LIVE`` while serving; 503 ``DRAINING`` after SIGTERM
``/stats``         Prometheus text: connections, decisions, bytes, failures,
                   reloads, active connections (``?format=json`` for JSON)
``/config_dump``   JSON: the live route table, its generation and sources,
                   the last rejected config's errors
``/clusters``      endpoints per service and their health (text; ``?format=json``)
``/quitquitquit``  POST: drain and exit, as on SIGTERM
=================  ==========================================================

Only for operators on the loopback interface: it reads a request line, and
answers one request per connection.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from l4proxy.worker import Worker

log = logging.getLogger("l4proxy.admin")


class AdminServer:
    def __init__(self, worker: Worker, on_quit: Callable[[], None], implementation: str) -> None:
        self.worker = worker
        self.on_quit = on_quit
        self.implementation = implementation
        self._server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._handle, host, port, reuse_address=True)

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        sockname: tuple[str, int] = self._server.sockets[0].getsockname()[:2]
        return sockname

    async def close(self) -> None:
        if self._server:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            while True:  # skip headers
                h = await asyncio.wait_for(reader.readline(), 5)
                if h in (b"\r\n", b"\n", b""):
                    break
            parts = line.decode("latin-1").split()
            if len(parts) < 2:
                status, ctype, body = 400, "text/plain", "bad request\n"
            else:
                status, ctype, body = self.dispatch(parts[0], parts[1])
            data = body.encode()
            writer.write(
                f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\n"
                f"content-type: {ctype}\r\ncontent-length: {len(data)}\r\n"
                "connection: close\r\n\r\n".encode()
                + data
            )
            await writer.drain()
        except (TimeoutError, ConnectionError, OSError):
            pass
        except Exception:
            log.exception("admin request failed")
        finally:
            writer.close()

    def dispatch(self, method: str, target: str) -> tuple[int, str, str]:
        path, _, query = target.partition("?")
        as_json = "format=json" in query
        w = self.worker
        if path == "/ready":
            if w.draining:
                return 503, "text/plain", "DRAINING\n"
            return 200, "text/plain", "LIVE\n"
        if path == "/stats":
            if as_json:
                return 200, "application/json", json.dumps(self.stats_json(), indent=1) + "\n"
            return 200, "text/plain; version=0.0.4", self.stats_text()
        if path == "/config_dump":
            return 200, "application/json", json.dumps(w.rules.state.to_json(), indent=1) + "\n"
        if path == "/clusters":
            clusters = self.clusters()
            if as_json:
                return 200, "application/json", json.dumps(clusters, indent=1) + "\n"
            lines = []
            for c in clusters:
                for ep in c["endpoints"]:
                    flag = "healthy" if ep["healthy"] else "failed_outlier_check"
                    base = f"{c['service']}::{ep['address']}:{ep['port']}"
                    lines.append(f"{base}::health_flags::{flag}")
                    lines.append(f"{base}::connect_failures::{ep['connect_failures']}")
                    lines.append(f"{base}::ejections::{ep['ejections']}")
            return 200, "text/plain", "\n".join(lines) + "\n"
        if path == "/quitquitquit":
            if method != "POST":
                return 405, "text/plain", "use POST\n"
            asyncio.get_running_loop().call_soon(self.on_quit)
            return 200, "text/plain", "OK\n"
        return 404, "text/plain", "not found: /ready /stats /config_dump /clusters /quitquitquit\n"

    def clusters(self) -> list[dict[str, Any]]:
        out = []
        for svc in self.worker.rules.state.table.services():
            eps = []
            for ep in svc.endpoints:
                d = {"address": ep.address, "port": ep.port, "labels": dict(ep.labels)}
                d.update(self.worker.health.describe(ep))
                eps.append(d)
            out.append({"service": svc.host, "endpoints": eps})
        return out

    def _gauges(self) -> dict[str, float]:
        w = self.worker
        ps = w.pump.stats()
        st = w.rules.state
        return {
            "l4proxy_active_connections": ps.get("active", 0) + len(w.handshakes),
            "l4proxy_relayed_connections_total": ps.get("accepted", 0),
            "l4proxy_bytes_upstream_total": ps.get("bytes_upstream", 0),
            "l4proxy_bytes_downstream_total": ps.get("bytes_downstream", 0),
            "l4proxy_resets_total": ps.get("resets", 0),
            "l4proxy_idle_timeouts_total": ps.get("idle_timeouts", 0),
            "l4proxy_pump_errors_total": ps.get("errors", 0),
            "l4proxy_spliced_connections_total": ps.get("spliced", 0),
            "l4proxy_rules_generation": st.generation,
            "l4proxy_reloads_total": st.reloads,
            "l4proxy_reload_failures_total": st.reload_failures,
            "l4proxy_rules_valid": 0 if st.last_error else 1,
        }

    def stats_text(self) -> str:
        return self.worker.counters.render(self._gauges())

    def stats_json(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self._gauges())
        for name, series in self.worker.counters.snapshot().items():
            out[name] = [{"labels": dict(k), "value": v} for k, v in series.items()]
        out["implementation"] = self.implementation
        return out
