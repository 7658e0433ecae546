"""Real Prometheus for kernel tests: started inside a lab node's network namespace (beside netwatchd, which
it scrapes at 127.0.0.1 like a node-local agent would), with a temporary storage directory, a 2 s scrape
interval (a scrape of netwatchd takes 0.2-1 s on a busy 2-vCPU test VM: 1 s timed out now and then) and 1 s
rule evaluation. Used by tests/test_alerts.py and tests/test_dashboards.py.

Prometheus is Debian's `prometheus` package (`apt-get install --no-install-recommends prometheus`); tests
skip with that hint when it is missing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import yaml

from netwatchd.lab.kubeapi import run_in_netns
from netwatchd.lab.netns import Node

INSTALL_HINT = "Debian's prometheus package is not installed (apt-get install --no-install-recommends prometheus)"
PORT = 19090  # inside the node's own network namespace: cannot collide with anything on the host
NODE_LABEL = "lab-node-1"  # what the ServiceMonitor relabeling adds in Kubernetes


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


def promtool_binary() -> str | None:
    return shutil.which("promtool")


class Prometheus:
    """A Prometheus server in `node`'s netns scraping netwatchd at 127.0.0.1:`target_port` (job "netwatchd",
    static label node="lab-node-1"), evaluating `rule_files`. Stop it with `close()` (also killed by the
    lab's teardown, being started through `node.popen`)."""

    def __init__(self, node: Node, target_port: int, rule_files: Sequence[str | Path] = (),
                 scrape_interval: str = "2s", evaluation_interval: str = "1s") -> None:
        self.node = node
        self.dir = Path(tempfile.mkdtemp(prefix="nwprom-"))
        config = {
            "global": {"scrape_interval": scrape_interval, "scrape_timeout": scrape_interval,
                       "evaluation_interval": evaluation_interval},
            "rule_files": [str(Path(f).resolve()) for f in rule_files],
            "scrape_configs": [{
                "job_name": "netwatchd",
                "static_configs": [{"targets": [f"127.0.0.1:{target_port}"], "labels": {"node": NODE_LABEL}}],
            }],
        }
        (self.dir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log_path = self.dir / "prometheus.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in close()
        binary = prometheus_binary()
        if binary is None:
            raise RuntimeError(INSTALL_HINT)
        self.proc = node.popen([
            binary, f"--config.file={self.dir / 'prometheus.yml'}", f"--storage.tsdb.path={self.dir / 'data'}",
            f"--web.listen-address=127.0.0.1:{PORT}", "--log.level=warn",
        ], stdout=self._log, stderr=subprocess.STDOUT)
        try:
            self._wait_ready()
        except BaseException:
            self.close()
            raise

    # -- HTTP, from inside the node's netns ---------------------------------------------------------
    def _get(self, path: str, params: dict[str, str] | None = None, timeout: float = 10.0) -> tuple[int, bytes]:
        url = f"http://127.0.0.1:{PORT}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)

        def fetch() -> tuple[int, bytes]:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp:
                    return resp.status, resp.read()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read()

        return run_in_netns(self.node.netns, fetch)

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited {self.proc.returncode}: {self.log()[-3000:]}")
            try:
                if self._get("/-/ready", timeout=1.0)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"prometheus not ready after {timeout}s: {self.log()[-3000:]}")

    def api(self, path: str, **params: str) -> dict:
        """GET /api/v1/`path`; returns the decoded body (status "success" or "error" with errorType/error)."""
        status, body = self._get(f"/api/v1/{path}", params)
        try:
            return json.loads(body)
        except ValueError:
            return {"status": "error", "errorType": f"http {status}", "error": body.decode(errors="replace")}

    def query(self, expr: str, **params: str) -> dict:
        """An instant query: the raw API answer (check ["status"], results in ["data"]["result"])."""
        return self.api("query", query=expr, **params)

    def vector(self, expr: str) -> list[dict]:
        """Result of an instant query that must succeed."""
        res = self.query(expr)
        if res.get("status") != "success":
            raise AssertionError(f"query {expr!r} failed: {res.get('errorType')}: {res.get('error')}")
        return res["data"]["result"]

    def alerts(self) -> list[dict]:
        """Active alerts (pending and firing) as /api/v1/alerts reports them."""
        res = self.api("alerts")
        assert res.get("status") == "success", res
        return res["data"]["alerts"]

    def targets_up(self) -> bool:
        res = self.api("targets")
        active = res.get("data", {}).get("activeTargets", [])
        return bool(active) and all(t.get("health") == "up" for t in active)

    def wait_scraped(self, timeout: float = 20.0) -> None:
        """Until every target has been scraped successfully."""
        deadline = time.monotonic() + timeout
        while not self.targets_up():
            if time.monotonic() > deadline:
                raise AssertionError(f"targets not up after {timeout}s: {self.api('targets')}")
            time.sleep(0.3)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
