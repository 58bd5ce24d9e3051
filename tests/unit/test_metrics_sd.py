"""agentmesh metrics sd: target groups from discovery entries, the atomic file, the loop (memory store)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from agentmesh.discovery import Endpoint
from agentmesh.discovery.memory import MemoryDiscovery
from agentmesh.metrics import METRICS_SERVICE
from agentmesh.metrics_cli import main, target_groups, write_targets, write_targets_loop


def ep(eid: str, address: str, **meta: str) -> Endpoint:
    return Endpoint(METRICS_SERVICE, eid, address, meta)


def test_groups_one_per_address_with_labels() -> None:
    groups = target_groups(
        [
            ep("b", "127.0.0.1:9002", job="agent", run="r1", role="critic", replica="c-0"),
            ep("a", "127.0.0.1:9001", job="driver", run="r1", **{"bad-name": "x", "__meta": "y"}),
        ]
    )
    assert groups == [
        {"targets": ["127.0.0.1:9001"], "labels": {"job": "driver", "run": "r1"}},
        {
            "targets": ["127.0.0.1:9002"],
            "labels": {"job": "agent", "replica": "c-0", "role": "critic", "run": "r1"},
        },
    ]


def test_entries_sharing_an_address_are_one_target() -> None:
    groups = target_groups(
        [
            ep("x", "h:1", job="agent", run="r", role="a", replica="a-0"),
            ep("y", "h:1", job="agent", run="r", role="b", replica="b-0"),
            ep("z", "h:2", job="registry", registry="p"),
            ep("w", "h:2", job="holder", registry="p", holder="h0"),
        ]
    )
    assert groups == [
        {"targets": ["h:1"], "labels": {"job": "agent", "run": "r"}},
        {"targets": ["h:2"], "labels": {"job": "holder", "registry": "p"}},
    ]


def test_write_is_atomic_and_only_on_change(tmp_path: Path) -> None:
    path = tmp_path / "sd" / "targets.json"
    groups = [{"targets": ["h:1"], "labels": {"job": "agent"}}]
    assert write_targets(path, groups) is True
    assert json.loads(path.read_text()) == groups
    inode = path.stat().st_ino
    assert write_targets(path, groups) is False  # unchanged: not rewritten
    assert path.stat().st_ino == inode
    assert write_targets(path, []) is True
    assert json.loads(path.read_text()) == []
    assert path.stat().st_ino != inode  # replaced by rename, never truncated in place
    assert [p.name for p in path.parent.iterdir()] == ["targets.json"]  # no temp file left


async def test_loop_follows_the_store(tmp_path: Path) -> None:
    disc = MemoryDiscovery()
    path = tmp_path / "targets.json"
    stop = asyncio.Event()
    task = asyncio.create_task(write_targets_loop(disc, path, interval_s=0.01, stop=stop))

    async def until(pred) -> None:  # type: ignore[no-untyped-def]
        for _ in range(500):
            if path.exists() and pred(json.loads(path.read_text())):
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"file never matched; it holds {path.read_text()!r}")

    await until(lambda g: g == [])
    reg = await disc.register(ep("r0", "127.0.0.1:7001", job="agent", run="r", role="a", replica="a-0"))
    await until(lambda g: [x["targets"] for x in g] == [["127.0.0.1:7001"]])
    await reg.close()
    await until(lambda g: g == [])
    stop.set()
    await asyncio.wait_for(task, 5)


def test_main_prints_once_from_a_memory_store(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sd", "--discovery", "memory://", "--once"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_main_bad_url_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sd", "--discovery", "nope", "--once"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--discovery" in err[0] and "nope" in err[0]


def test_main_flag_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sd", "--discovery", "memory://", "--http", "127.0.0.1:0", "--once"]) == 2
    assert "--once" in capsys.readouterr().err
    assert main(["sd", "--discovery", "memory://", "--file", "x.json", "--interval", "0"]) == 2
    assert "--interval" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["sd", "--discovery", "memory://", "--http", "nohostport"])
    assert exc.value.code == 2
    assert "HOST:PORT" in capsys.readouterr().err
