"""SinkWriter: exactly once, resume after a kill (torn tails), format reconciliation, throughput."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from agentmesh import sink
from agentmesh.errors import ConfigError
from agentmesh.sink import (
    JSONL_NAME,
    PARQUET_DIR,
    ZSTD_NAME,
    SinkCorruptError,
    SinkWriter,
    read_records,
    record_from_orchestrator,
    record_from_parquet_row,
    record_to_parquet_row,
)
from agentmesh.v1 import orchestrator_pb2 as pb


def make_record(i: int | str, content: str = "the answer is (B) because ...") -> dict[str, Any]:
    tid = i if isinstance(i, str) else f"task-{i}"
    return {
        "task_id": tid,
        "run_id": "run-1",
        "trial": 0,
        "seed": 7,
        "status": "done",
        "error": None,
        "attempts": 1,
        "recoveries": 0,
        "input": {"id": tid, "question": "Which is larger? ünïcode", "choices": ["A", "B"]},
        "history": [
            {
                "role": role,
                "replica_id": f"{role}-0",
                "content": content,
                "usage": {"prompt_tokens": 30, "completion_tokens": 12},
                "started_unix_ns": 1,
                "finished_unix_ns": 2,
                "metadata": {"model": "smollm2"},
                "attempt": 1,
            }
            for role in ("teacher", "student", "extractor")
        ],
        "results": {"answer": "B", "agree": "true"},
        "tokens": {"prompt_tokens": 90, "completion_tokens": 36},
        "turns": 3,
        "timings": {"admitted_unix_ns": 1, "finished_unix_ns": 2_000_000_001, "duration_s": 2.0},
    }


def parquet_ids(out: Path) -> list[str]:
    ids: list[str] = []
    for part in sorted((out / PARQUET_DIR).glob("part-*.parquet")):
        ids.extend(pq.read_table(part, columns=["task_id"]).column("task_id").to_pylist())
    return ids


def parquet_records(out: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for part in sorted((out / PARQUET_DIR).glob("part-*.parquet")):
        rows.extend(pq.read_table(part).to_pylist())
    return [record_from_parquet_row(r) for r in rows]


# -- the record shape


def test_record_from_orchestrator_shape_and_payloads() -> None:
    orch = pb.Orchestrator(
        task_id="q1#t1",
        run_id="r",
        trial=1,
        seed=42,
        input_json='{"id": "q1", "question": "2+2?"}',
        status=pb.TASK_STATUS_DONE,
        recoveries=1,
        admitted_unix_ns=1_000_000_000,
    )
    t0 = orch.history.add(role="teacher", replica_id="teacher-0", content="four", attempt=1)
    t0.usage.prompt_tokens, t0.usage.completion_tokens = 10, 3
    t0.metadata["model"] = "m"
    t1 = orch.history.add(role="student", replica_id="student-1", attempt=2)
    t1.payload.store, t1.payload.key, t1.payload.size_bytes = "ray", "k1", 99999
    t1.usage.prompt_tokens, t1.usage.completion_tokens = 20, 5
    t2 = orch.history.add(role="student", replica_id="student-1", attempt=1)
    t2.payload.store, t2.payload.key, t2.payload.size_bytes = "ray", "k2", 5
    orch.results["answer"] = "4"

    rec = record_from_orchestrator(orch, contents={1: "FOUR (offloaded)"}, finished_unix_ns=3_500_000_000)

    assert next(iter(rec)) == "task_id"
    assert rec["task_id"] == "q1#t1" and rec["trial"] == 1 and rec["seed"] == 42
    assert rec["status"] == "done" and rec["error"] is None
    assert rec["input"] == {"id": "q1", "question": "2+2?"}
    assert rec["history"][0]["content"] == "four"
    assert rec["history"][0]["metadata"] == {"model": "m"}
    assert rec["history"][1]["content"] == "FOUR (offloaded)" and "payload" not in rec["history"][1]
    # Not fetched: the reference is kept and the content is null.
    assert rec["history"][2]["content"] is None
    assert rec["history"][2]["payload"] == {"store": "ray", "key": "k2", "size_bytes": 5}
    assert rec["tokens"] == {"prompt_tokens": 30, "completion_tokens": 8}
    assert rec["turns"] == 3 and rec["attempts"] == 2 and rec["recoveries"] == 1
    assert rec["results"] == {"answer": "4"}
    assert rec["timings"] == {
        "admitted_unix_ns": 1_000_000_000,
        "finished_unix_ns": 3_500_000_000,
        "duration_s": 2.5,
    }
    json.dumps(rec)  # JSON-able as is
    assert record_from_parquet_row(record_to_parquet_row(rec)) == rec


def test_record_from_failed_orchestrator() -> None:
    orch = pb.Orchestrator(task_id="q2", status=pb.TASK_STATUS_FAILED)
    orch.error.code, orch.error.message, orch.error.role = "step_exception", "boom", "teacher"
    orch.error.replica_id, orch.error.attempts = "teacher-0", 3
    rec = record_from_orchestrator(orch, finished_unix_ns=5)
    assert rec["status"] == "failed"
    assert rec["error"] == {
        "code": "step_exception",
        "message": "boom",
        "role": "teacher",
        "replica_id": "teacher-0",
        "attempts": 3,
    }
    assert rec["attempts"] == 3 and rec["timings"]["duration_s"] is None and rec["input"] == {}
    assert record_from_parquet_row(record_to_parquet_row(rec)) == rec


# -- exactly once and resume


def test_duplicates_refused_buffered_and_flushed(tmp_path: Path) -> None:
    with SinkWriter(tmp_path, flush_every=1000) as w:
        assert w.write(make_record(1)) is True
        assert w.write(make_record(1)) is False  # still buffered
        w.flush()
        assert w.write(make_record(1)) is False  # durable
        assert w.write(make_record(2)) is True
        assert w.duplicates == 2
    assert [r["task_id"] for r in read_records(tmp_path)] == ["task-1", "task-2"]


def test_resume_returns_ids_and_refuses_them(tmp_path: Path) -> None:
    with SinkWriter(tmp_path, formats=("jsonl", "parquet"), flush_every=3) as w:
        for i in range(10):
            w.write(make_record(i))
    w2 = SinkWriter(tmp_path, formats=("jsonl", "parquet"), flush_every=3)
    assert w2.open() == {f"task-{i}" for i in range(10)}
    assert w2.write(make_record(4)) is False
    assert w2.write(make_record(10)) is True
    w2.close()
    ids = [r["task_id"] for r in read_records(tmp_path)]
    assert sorted(ids) == sorted(f"task-{i}" for i in range(11))
    assert sorted(parquet_ids(tmp_path)) == sorted(ids)


def test_record_without_task_id_rejected(tmp_path: Path) -> None:
    with SinkWriter(tmp_path) as w, pytest.raises(ValueError, match="task_id"):
        w.write({"status": "done"})


def test_unserialisable_record_fails_at_write_not_flush(tmp_path: Path) -> None:
    with SinkWriter(tmp_path) as w:
        with pytest.raises(ValueError):
            w.write({"task_id": "x", "score": float("nan")})
        assert w.buffered == 0
        assert w.write({"task_id": "x", "score": 1.0}) is True


def test_bad_settings_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"output\.formats"):
        SinkWriter(tmp_path, formats=("csv",))
    with pytest.raises(ConfigError, match=r"output\.compression"):
        SinkWriter(tmp_path, compression="gzip")
    with pytest.raises(ConfigError, match=r"output\.flush_every"):
        SinkWriter(tmp_path, flush_every=0)


def test_time_based_flush(tmp_path: Path) -> None:
    now = [100.0]
    w = SinkWriter(tmp_path, flush_every=1000, flush_interval_s=1.0, clock=lambda: now[0])
    w.open()
    w.write(make_record(1))
    assert w.maybe_flush() is False and w.buffered == 1
    assert list(read_records(tmp_path)) == []
    now[0] += 1.5
    assert w.maybe_flush() is True and w.buffered == 0
    assert [r["task_id"] for r in read_records(tmp_path)] == ["task-1"]
    w.close()


# -- torn tails


def test_torn_jsonl_tail_is_truncated(tmp_path: Path) -> None:
    with SinkWriter(tmp_path, flush_every=2) as w:
        for i in range(5):
            w.write(make_record(i))
    path = tmp_path / JSONL_NAME
    good_size = path.stat().st_size
    with open(path, "ab") as fh:  # what a SIGKILL mid-append leaves
        fh.write(json.dumps(make_record(5)).encode()[:40])

    w2 = SinkWriter(tmp_path, flush_every=2)
    assert w2.open() == {f"task-{i}" for i in range(5)}
    assert path.stat().st_size == good_size
    assert w2.write(make_record(5)) is True
    w2.close()
    assert [r["task_id"] for r in read_records(tmp_path)] == [f"task-{i}" for i in range(6)]


def test_corrupt_jsonl_middle_line_raises(tmp_path: Path) -> None:
    path = tmp_path / JSONL_NAME
    path.write_text(json.dumps(make_record(0)) + "\n{not json\n" + json.dumps(make_record(1)) + "\n")
    with pytest.raises(SinkCorruptError, match="line 2"):
        SinkWriter(tmp_path).open()


def zstd_frame_ends(path: Path) -> list[int]:
    with open(path, "rb") as fh:
        return [end for end, _ in sink._zstd_frames(fh, path)]


@pytest.mark.parametrize("cut", ["mid_frame", "frame_header", "one_byte_short"])
def test_torn_zstd_tail_is_truncated(tmp_path: Path, cut: str) -> None:
    with SinkWriter(tmp_path, compression="zstd", flush_every=2) as w:
        for i in range(6):
            w.write(make_record(i))
    path = tmp_path / ZSTD_NAME
    ends = zstd_frame_ends(path)
    assert len(ends) == 3 and ends[-1] == path.stat().st_size  # one independent frame per flush
    size = {"mid_frame": (ends[1] + ends[2]) // 2, "frame_header": ends[1] + 3, "one_byte_short": ends[2] - 1}
    os.truncate(path, size[cut])

    w2 = SinkWriter(tmp_path, compression="zstd", flush_every=2)
    assert w2.open() == {f"task-{i}" for i in range(4)}
    assert path.stat().st_size == ends[1]
    for i in range(6):
        w2.write(make_record(i))
    w2.close()
    assert w2.duplicates == 4
    assert [r["task_id"] for r in read_records(tmp_path)] == [f"task-{i}" for i in range(6)]


def test_corrupt_zstd_frame_raises(tmp_path: Path) -> None:
    with SinkWriter(tmp_path, compression="zstd", flush_every=2) as w:
        for i in range(4):
            w.write(make_record(i, content="x" * 2000))
    path = tmp_path / ZSTD_NAME
    data = bytearray(path.read_bytes())
    data[30] ^= 0xFF  # inside the first frame's compressed data
    path.write_bytes(bytes(data))
    with pytest.raises(SinkCorruptError, match="zstd"):
        SinkWriter(tmp_path, compression="zstd").open()


def test_compression_mismatch_with_existing_output(tmp_path: Path) -> None:
    with SinkWriter(tmp_path) as w:
        w.write(make_record(0))
    with pytest.raises(ConfigError, match="compression"):
        SinkWriter(tmp_path, compression="zstd").open()


def test_leftover_parquet_tmp_is_removed(tmp_path: Path) -> None:
    with SinkWriter(tmp_path, formats=("parquet",), flush_every=3) as w:
        for i in range(3):
            w.write(make_record(i))
    leftover = tmp_path / PARQUET_DIR / "part-00001.parquet.tmp"
    leftover.write_bytes(b"PAR1 half a part")

    w2 = SinkWriter(tmp_path, formats=("parquet",), flush_every=3)
    assert w2.open() == {"task-0", "task-1", "task-2"}
    assert not leftover.exists()
    for i in range(3, 6):
        w2.write(make_record(i))
    w2.close()
    assert sorted(p.name for p in (tmp_path / PARQUET_DIR).iterdir()) == [
        "part-00000.parquet",
        "part-00001.parquet",
    ]
    assert [r["task_id"] for r in read_records(tmp_path)] == [f"task-{i}" for i in range(6)]


# -- reconciling JSONL and Parquet


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_kill_between_jsonl_and_parquet_is_reconciled(tmp_path: Path, compression: str) -> None:
    fmts = ("jsonl", "parquet")
    w = SinkWriter(tmp_path, formats=fmts, compression=compression, flush_every=4)
    w.open()
    for i in range(4):
        w.write(make_record(i))

    def killed(records: Any) -> None:
        raise KeyboardInterrupt("killed before the Parquet part")

    w._write_part = killed  # type: ignore[method-assign]
    for i in range(4, 7):
        w.write(make_record(i))
    with pytest.raises(KeyboardInterrupt):
        w.write(make_record(7))  # the 4th buffered record triggers the flush
    # The process dies here: no close(), only the OS releasing its file descriptors.
    assert w._fh is not None
    w._fh.close()
    # JSONL has 8 records, Parquet only the first 4.
    assert len(list(read_records(tmp_path))) == 8 and len(parquet_ids(tmp_path)) == 4

    w2 = SinkWriter(tmp_path, formats=fmts, compression=compression, flush_every=4)
    expected = {f"task-{i}" for i in range(8)}
    assert w2.open() == expected
    w2.close()
    assert sorted(parquet_ids(tmp_path)) == sorted(expected)  # no duplicates, none missing
    jsonl = {r["task_id"]: r for r in read_records(tmp_path)}
    assert {r["task_id"]: r for r in parquet_records(tmp_path)} == jsonl


def test_parquet_only_records_are_copied_into_jsonl(tmp_path: Path) -> None:
    with SinkWriter(tmp_path, formats=("parquet",), flush_every=2) as w:
        for i in range(5):
            w.write({**make_record(i), "extra_field": [i]})
    # jsonl is added to the formats on the next run.
    w2 = SinkWriter(tmp_path, formats=("jsonl", "parquet"))
    assert w2.open() == {f"task-{i}" for i in range(5)}
    w2.close()
    jsonl = list(read_records(tmp_path))
    assert [r["task_id"] for r in jsonl] == [f"task-{i}" for i in range(5)]
    assert jsonl[3] == {**make_record(3), "extra_field": [3]}
    # A second open finds both formats agreeing and copies nothing.
    w3 = SinkWriter(tmp_path, formats=("jsonl", "parquet"))
    w3.open()
    w3.close()
    assert len(list(read_records(tmp_path))) == 5 and len(parquet_ids(tmp_path)) == 5


def test_parquet_failure_is_retried_on_next_flush(tmp_path: Path) -> None:
    w = SinkWriter(tmp_path, formats=("jsonl", "parquet"), flush_every=2)
    w.open()
    real = w._write_part
    calls = [0]

    def flaky(records: Any) -> None:
        calls[0] += 1
        if calls[0] == 1:
            raise OSError("disk hiccup")
        real(records)

    w._write_part = flaky  # type: ignore[method-assign]
    w.write(make_record(0))
    with pytest.raises(OSError):
        w.write(make_record(1))
    w.write(make_record(2))
    w.write(make_record(3))
    w.close()
    assert sorted(parquet_ids(tmp_path)) == [f"task-{i}" for i in range(4)]


# -- scale


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_100k_records_bounded_memory_and_throughput(tmp_path: Path) -> None:
    n = 100_000
    template = make_record(0)
    w = SinkWriter(tmp_path, flush_every=64)
    w.open()
    max_buffered = 0
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    for i in range(n):
        rec = dict(template)
        rec["task_id"] = f"task-{i}"
        w.write(rec)
        max_buffered = max(max_buffered, w.buffered)
    w.close()
    elapsed = time.perf_counter() - t0
    growth = rss_bytes() - rss0
    size = (tmp_path / JSONL_NAME).stat().st_size
    rate = n / elapsed
    print(
        f"\nSinkWriter jsonl: {n} records in {elapsed:.2f} s = {rate:,.0f} records/s; "
        f"{size / 1e6:.0f} MB written, RSS grew {growth / 1e6:.1f} MB"
    )
    assert w.written == n
    assert rate > 2_000  # 10k/s+ on an idle machine; lenient for shared CI runners
    # The buffer never reaches flush_every (a full buffer is flushed at once); what grows is only
    # the set of done ids (~10 MB here), far below the bytes written.
    assert max_buffered < 64
    assert growth < size / 2

    w2 = SinkWriter(tmp_path)
    t0 = time.perf_counter()
    assert len(w2.open()) == n
    print(f"SinkWriter resume scan of {n} records: {time.perf_counter() - t0:.2f} s")
    w2.close()
