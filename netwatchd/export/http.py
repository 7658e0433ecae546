"""The HTTP endpoint: /metrics (Prometheus text, or OpenMetrics when the scraper asks), /healthz, /readyz."""

from __future__ import annotations

import threading
from collections.abc import Callable
from wsgiref.simple_server import make_server

from prometheus_client import make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer, _get_best_family, _SilentHandler
from prometheus_client.registry import CollectorRegistry


def parse_listen(value: str) -> tuple[str, int]:
    """'127.0.0.1:9990', '[::1]:9990' or ':9990' -> (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--listen must be HOST:PORT, got {value!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def make_app(registry: CollectorRegistry, ready: Callable[[], tuple[bool, str]],
             api: Callable[[str, str], tuple[int, bytes] | None] | None = None):
    metrics_app = make_wsgi_app(registry)

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            return metrics_app(environ, start_response)
        if api is not None and path.startswith("/api/"):
            res = api(path, environ.get("QUERY_STRING", ""))
            if res is not None:
                code, body = res
                status = {200: "200 OK", 400: "400 Bad Request", 503: "503 Service Unavailable"}[code]
                start_response(status, [("Content-Type", "application/json")])
                return [body]
        if path == "/healthz":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok\n"]
        if path == "/readyz":
            ok, why = ready()
            start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
            return [(why + "\n").encode()]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: try /metrics, /healthz, /readyz, /api/v1/status, /api/v1/pods, /api/v1/probes\n"]

    return app


class MetricsServer:
    """A threaded WSGI server in a daemon thread; `close()` stops it."""

    def __init__(self, listen: str, registry: CollectorRegistry, ready: Callable[[], tuple[bool, str]],
                 api: Callable[[str, str], tuple[int, bytes] | None] | None = None):
        host, port = parse_listen(listen)

        class Server(ThreadingWSGIServer):
            address_family, _ = _get_best_family(host, port)

        self.httpd = make_server(host, port, make_app(registry, ready, api), Server, handler_class=_SilentHandler)
        self.address = self.httpd.server_address[:2]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="metrics-http", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
