"""Pure pieces of bench/gateway.py: the nginx config it writes, imbalance and utilisation."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from types import ModuleType

import pytest

from tests.bench_scripts import load_bench


@pytest.fixture(scope="module")
def gw() -> ModuleType:
    return load_bench("bench_gateway", "gateway.py")


def test_imbalance_is_max_over_mean_per_sample_and_skips_idle_samples(gw: ModuleType) -> None:
    samples = [[10, 10, 10, 10], [20, 10, 0, 10], [0, 0, 0, 0], []]
    assert gw.imbalance(samples) == [1.0, 2.0]


def test_utilisation_is_slot_seconds_used_over_available(gw: ModuleType) -> None:
    before = [
        {"slot_busy_s": 0.0, "uptime_s": 10.0, "max_num_seqs": 4},
        {"slot_busy_s": 5.0, "uptime_s": 10.0, "max_num_seqs": 4},
    ]
    # Replica 0 ran a full batch for the 2 s; replica 1 half of it.
    after = [
        {"slot_busy_s": 8.0, "uptime_s": 12.0, "max_num_seqs": 4},
        {"slot_busy_s": 9.0, "uptime_s": 12.0, "max_num_seqs": 4},
    ]
    assert gw.utilisation(before, after) == pytest.approx(12.0 / 16.0)


def test_output_lengths_average_to_the_requested_mean(gw: ModuleType) -> None:
    lo, hi = gw.output_range(128)
    assert (lo, hi) == (64, 192) and (lo + hi) / 2 == 128
    assert gw.output_range(1) == (1, 2)


def _conf(gw: ModuleType, tmp_path: Path, workers: int = 1) -> str:
    text: str = gw.nginx_conf(
        upstreams=["127.0.0.1:4001", "127.0.0.1:4002"],
        port=4100,
        workdir=tmp_path,
        workers=workers,
        keepalive=64,
        worker_connections=2048,
    )
    return text


def test_nginx_conf_is_least_conn_with_keepalive_and_private_paths(gw: ModuleType, tmp_path: Path) -> None:
    text = _conf(gw, tmp_path, workers=2)
    for line in (
        "worker_processes 2;",
        "daemon off;",
        "least_conn;",
        "zone replicas 1m;",
        "server 127.0.0.1:4001 max_fails=0;",
        "server 127.0.0.1:4002 max_fails=0;",
        "keepalive 64;",
        "listen 127.0.0.1:4100 backlog=4096;",
        "proxy_http_version 1.1;",
        'proxy_set_header Connection "";',
        f"pid {tmp_path}/nginx.pid;",
    ):
        assert line in text
    # Nothing outside the private directory is written (no /var/log, no /run).
    assert "/var/" not in text and "/run/" not in text


def test_nginx_conf_rejects_an_empty_upstream_or_no_workers(gw: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="upstreams"):
        gw.nginx_conf(upstreams=[], port=1, workdir=tmp_path, workers=1, keepalive=1, worker_connections=64)
    with pytest.raises(ValueError, match="workers"):
        gw.nginx_conf(
            upstreams=["127.0.0.1:1"], port=1, workdir=tmp_path, workers=0, keepalive=1, worker_connections=64
        )


@pytest.mark.skipif(
    shutil.which("nginx") is None and os.environ.get("AGENTMESH_REQUIRE_NGINX") != "1",
    reason="nginx not installed (apt-get install nginx; scripts/setup does it)",
)
def test_nginx_accepts_the_generated_conf(gw: ModuleType, tmp_path: Path) -> None:
    assert shutil.which("nginx"), "AGENTMESH_REQUIRE_NGINX=1 but there is no nginx: run scripts/setup"
    conf = tmp_path / "nginx.conf"
    conf.write_text(_conf(gw, tmp_path))
    nginx = shutil.which("nginx")
    assert nginx is not None
    proc = subprocess.run(
        [nginx, "-t", "-p", str(tmp_path), "-c", str(conf), "-e", str(tmp_path / "error.log")],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert proc.returncode == 0, proc.stderr


def test_nginx_conf_round_robin_has_no_balancing_directive(gw: ModuleType, tmp_path: Path) -> None:
    text = gw.nginx_conf(
        upstreams=["127.0.0.1:4001"],
        port=4100,
        workdir=tmp_path,
        workers=1,
        keepalive=8,
        worker_connections=64,
        balance="round_robin",
    )
    assert "least_conn" not in text and "server 127.0.0.1:4001 max_fails=0;" in text
    with pytest.raises(ValueError, match="balance"):
        gw.nginx_conf(
            upstreams=["127.0.0.1:1"],
            port=1,
            workdir=tmp_path,
            workers=1,
            keepalive=1,
            worker_connections=64,
            balance="ip_hash",
        )
