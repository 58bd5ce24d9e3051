"""`agentmesh run --cluster NAME`: the cluster's record fills in ray.address and discovery.url."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agentmesh import cli
from agentmesh.driver import RunProgress


def _record(home: Path, name: str) -> None:
    (home / "clusters").mkdir(parents=True)
    record = {
        "name": name,
        "ray_address": "127.0.0.1:6399",
        "discovery_url": "etcd://127.0.0.1:23799",
        "temp_dir": "/tmp/none",
        "ray_session": 1,
        "ray_pids": [],
        "etcd_pid": 1,
        "etcd_keeper_pid": 1,
        "num_cpus": 1,
        "num_gpus": 0,
    }
    (home / "clusters" / f"{name}.json").write_text(json.dumps(record))


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[Any]:
    monkeypatch.setenv("AGENTMESH_HOME", str(tmp_path / "home"))
    seen: list[Any] = []

    def fake_run(cfg: Any, **_kw: Any) -> RunProgress:
        seen.append(cfg)
        return RunProgress(total=0)

    monkeypatch.setattr("agentmesh.launcher.run_pipeline", fake_run)
    return seen


def test_cluster_record_fills_in_ray_and_discovery(captured: list[Any], tmp_path: Path) -> None:
    _record(tmp_path / "home", "c1")
    code = cli.main(["run", "examples/collab_reasoning/sim.yaml", "--cluster", "c1", "-q"])
    assert code == 0
    (cfg,) = captured
    assert cfg.ray.address == "127.0.0.1:6399"
    assert cfg.discovery.url == "etcd://127.0.0.1:23799"


def test_an_explicit_override_wins_over_the_cluster(captured: list[Any], tmp_path: Path) -> None:
    _record(tmp_path / "home", "c1")
    argv = ["run", "examples/collab_reasoning/sim.yaml", "ray.address=10.0.0.1:6379", "--cluster", "c1", "-q"]
    assert cli.main(argv) == 0
    (cfg,) = captured
    assert cfg.ray.address == "10.0.0.1:6379"
    assert cfg.discovery.url == "etcd://127.0.0.1:23799"


def test_an_unknown_cluster_is_exit_2_with_one_line(
    captured: list[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["run", "examples/collab_reasoning/sim.yaml", "--cluster", "nope"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "no cluster 'nope'" in err and "\n" not in err
    assert captured == []
