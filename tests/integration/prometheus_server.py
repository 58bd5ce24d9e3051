"""A real Prometheus for the tests: Debian's ``prometheus`` binary on loopback, a free port, its own
data directory, scraping every second whatever a file_sd file lists (``agentmesh metrics sd``)."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

__all__ = ["PrometheusServer", "prometheus_binary", "wait_until"]


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


def wait_until(fn: Callable[[], Any], *, timeout_s: float, what: str, every_s: float = 0.25) -> Any:
    """Poll ``fn`` until it returns something truthy; fail naming ``what`` and the last value."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}; last: {last!r}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrometheusServer:
    """``with PrometheusServer(tmp_path, sd_file) as prom: prom.query("up")``."""

    def __init__(self, workdir: Path, sd_file: Path, *, scrape_interval_s: int = 1) -> None:
        self.workdir = workdir
        self.sd_file = sd_file
        self.scrape_interval_s = scrape_interval_s
        self.url = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = workdir / "prometheus.log"

    def __enter__(self) -> PrometheusServer:
        binary = prometheus_binary()
        if binary is None:
            raise RuntimeError("prometheus is not installed (deploy/install_prometheus.sh)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "global": {"scrape_interval": f"{self.scrape_interval_s}s", "scrape_timeout": "1s"},
            "scrape_configs": [
                {
                    "job_name": "agentmesh",
                    "honor_labels": True,
                    "file_sd_configs": [{"files": [str(self.sd_file)], "refresh_interval": "1s"}],
                }
            ],
        }
        (self.workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        for _attempt in range(3):  # the free port may be taken between the probe and the bind
            port = _free_port()
            log = self._log.open("ab")
            self._proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={self.workdir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--storage.tsdb.retention.time=1h",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
            log.close()
            self.url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self._proc.poll() is None:
                with contextlib.suppress(OSError):
                    with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as r:
                        if r.status == 200:
                            return self
                time.sleep(0.1)
            self.stop()
        raise RuntimeError(f"prometheus did not become ready; log: {self._log.read_text()[-2000:]}")

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(15)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=5) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query's vector: ``[{"metric": {...}, "value": [t, "v"]}]``."""
        data = self.api("query", query=promql)
        assert data["resultType"] == "vector", data
        return list(data["result"])

    def scalar(self, promql: str) -> float | None:
        """The one value of a query that returns one series (None while it returns none)."""
        res = self.query(promql)
        return float(res[0]["value"][1]) if res else None

    def targets(self) -> list[dict[str, Any]]:
        return list(self.api("targets", state="active")["activeTargets"])
