"""The HTTP endpoint: /metrics (Prometheus text, or OpenMetrics when the scraper asks), /healthz, /readyz."""

from __future__ import annotations

import gzip
import threading
from collections.abc import Callable
from urllib.parse import parse_qs
from wsgiref.simple_server import make_server

from prometheus_client import make_wsgi_app
from prometheus_client.exposition import (
    ThreadingWSGIServer,
    _get_best_family,
    _SilentHandler,
    choose_encoder,
    gzip_accepted,
)
from prometheus_client.registry import CollectorRegistry

_EOF = b"# EOF\n"


class _One:
    """A collector of one family: how a single family is rendered with prometheus_client's encoders."""

    def __init__(self, fam) -> None:
        self.fam = fam

    def collect(self):
        return [self.fam]


class ExpositionCache:
    """/metrics rendered family by family with prometheus_client's own encoder, reusing the text of every
    family whose samples are what they were at the previous scrape (comparing samples is a C-level tuple
    compare, several times cheaper than formatting them): at 10k active keys most families do not change
    between two scrapes."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._cache: dict[str, dict[tuple, tuple]] = {}  # content type -> (name, type) -> (doc, samples, text)

    def render(self, encoder, content_type: str) -> bytes:
        old = self._cache.get(content_type, {})
        new: dict[tuple, tuple] = {}
        parts = []
        for fam in self.registry.collect():
            key = (fam.name, fam.type)
            hit = old.get(key)
            if hit is not None and hit[0] == fam.documentation and hit[1] == fam.samples:
                text = hit[2]
            else:
                text = encoder(_One(fam))
                if text.endswith(_EOF):  # OpenMetrics ends every exposition with # EOF: once, at the very end
                    text = text[:-len(_EOF)]
            new[key] = (fam.documentation, fam.samples, text)
            parts.append(text)
        self._cache[content_type] = new  # concurrent scrapes: the last one's families win, both render right
        if content_type.startswith("application/openmetrics-text"):
            parts.append(_EOF)
        return b"".join(parts)


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
    cache = ExpositionCache(registry)

    def cached_metrics(environ, start_response):
        encoder, content_type = choose_encoder(environ.get("HTTP_ACCEPT"))
        output = cache.render(encoder, content_type)
        headers = [("Content-Type", content_type)]
        if gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING")):
            output = gzip.compress(output)
            headers.append(("Content-Encoding", "gzip"))
        start_response("200 OK", headers)
        return [output]

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            plain_get = environ.get("REQUEST_METHOD") == "GET" and "name[]" not in parse_qs(
                environ.get("QUERY_STRING", ""))
            return (cached_metrics if plain_get else metrics_app)(environ, start_response)
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
