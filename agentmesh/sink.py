"""The sink's record writer: one record per finished task, written exactly once, and resumable.

A run writes its dataset into one output directory::

    OUT/records.jsonl            one JSON object per line (``compression="none"``), or
    OUT/records.jsonl.zst        the same lines as a sequence of independent zstd frames
    OUT/records/part-NNNNN.parquet   one Parquet part per flush (``"parquet"`` in ``formats``)

Durability and exactly once. Records are buffered and flushed in batches; a flush appends the
batch to the JSONL file (one ``write`` + ``fsync``; with zstd the batch is one complete frame), then
writes the same batch as a *new* Parquet part (written to ``part-NNNNN.parquet.tmp``, fsynced, then
atomically renamed), so nothing already written is ever rewritten. A kill can therefore only leave
a torn *tail*: a partial last JSONL line, an incomplete last zstd frame, or a ``.tmp`` part.
:meth:`SinkWriter.open` repairs that tail (truncates the file back to the last complete line or
frame, deletes ``.tmp`` parts), reads back every task id already written and returns them, so the
source skips those tasks and re-runs only the ones that were in flight. Because JSONL is always
appended before Parquet, a kill between the two leaves records in JSONL that Parquet lacks; ``open``
re-appends them to Parquet (and, the other way round, copies into JSONL anything only Parquet has,
e.g. after ``jsonl`` was added to ``formats`` between runs), so every enabled format holds the same
set of task ids. Damage that a kill cannot cause (an unparseable line in the middle of the file, a
zstd frame with a bad checksum, an unreadable committed Parquet part) raises
:class:`SinkCorruptError` instead of silently dropping data.

The writer is not thread-safe: one owner (the sink role) calls it; its flushes block on disk I/O.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from agentmesh.errors import AgentMeshError, ConfigError
from agentmesh.v1 import orchestrator_pb2

__all__ = [
    "JSONL_NAME",
    "PARQUET_DIR",
    "PARQUET_SCHEMA",
    "ZSTD_NAME",
    "SinkCorruptError",
    "SinkWriter",
    "read_records",
    "record_from_orchestrator",
    "record_from_parquet_row",
    "record_to_parquet_row",
]

log = logging.getLogger(__name__)

JSONL_NAME = "records.jsonl"
ZSTD_NAME = "records.jsonl.zst"
PARQUET_DIR = "records"
FORMATS = frozenset({"jsonl", "parquet"})
COMPRESSIONS = frozenset({"none", "zstd"})

_PART_RE = re.compile(r"^part-(\d+)\.parquet$")
# Records copied between formats by open() go out in parts of at most this many rows.
_RECONCILE_BATCH = 4096
_READ_CHUNK = 1 << 16

PARQUET_SCHEMA = pa.schema(
    [
        pa.field("task_id", pa.string(), nullable=False),
        pa.field("run_id", pa.string()),
        pa.field("trial", pa.int64()),
        pa.field("seed", pa.uint64()),
        pa.field("status", pa.string()),
        pa.field("error_code", pa.string()),
        pa.field("error_message", pa.string()),
        pa.field("error_role", pa.string()),
        pa.field("error_replica_id", pa.string()),
        pa.field("error_attempts", pa.int64()),
        pa.field("attempts", pa.int64()),
        pa.field("recoveries", pa.int64()),
        pa.field("input_json", pa.string()),
        pa.field("history_json", pa.string()),
        pa.field("results_json", pa.string()),
        pa.field("prompt_tokens", pa.int64()),
        pa.field("completion_tokens", pa.int64()),
        pa.field("turns", pa.int64()),
        pa.field("started_unix_ns", pa.int64()),
        pa.field("finished_unix_ns", pa.int64()),
        pa.field("duration_s", pa.float64()),
        # Top-level keys of the record that the columns above do not cover, as one JSON object
        # (null when none), so a record survives a Parquet -> JSONL copy unchanged.
        pa.field("extra_json", pa.string()),
    ]
)
"""Parquet columns. Nested values (input, history, results) are JSON strings for schema stability."""

_KNOWN_KEYS = frozenset(
    {
        "task_id",
        "run_id",
        "trial",
        "seed",
        "status",
        "error",
        "attempts",
        "recoveries",
        "input",
        "history",
        "results",
        "tokens",
        "turns",
        "timings",
    }
)


class SinkCorruptError(AgentMeshError):
    """An output file is damaged in a way a kill cannot cause; the message names file and place."""


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _fsync_dir(path: Path) -> None:
    # A rename or a new file is durable only once its directory entry is.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# Record shape


def record_from_orchestrator(
    orch: orchestrator_pb2.Orchestrator,
    *,
    contents: Mapping[int, str] | None = None,
    finished_unix_ns: int,
) -> dict[str, Any]:
    """Build the output record of one finished task.

    ``contents`` maps a history index to the text of a turn whose body was offloaded (a
    ``payload`` reference); the caller fetches those. A payload turn missing from ``contents``
    keeps its reference (``"payload": {store, key, size_bytes}``) and a null ``content``.
    ``status`` is ``"failed"`` when the task's status is FAILED or it carries an error code, else
    ``"done"`` (reaching the sink is how a running task finishes). ``attempts`` is the most
    attempts any single step of the task needed.
    """
    history: list[dict[str, Any]] = []
    prompt_tokens = 0
    completion_tokens = 0
    attempts = orch.attempt
    for index, turn in enumerate(orch.history):
        body = turn.WhichOneof("body")
        entry: dict[str, Any] = {"role": turn.role, "replica_id": turn.replica_id, "content": None}
        if body == "content":
            entry["content"] = turn.content
        elif body == "payload":
            if contents is not None and index in contents:
                entry["content"] = contents[index]
            else:
                entry["payload"] = {
                    "store": turn.payload.store,
                    "key": turn.payload.key,
                    "size_bytes": turn.payload.size_bytes,
                }
        entry["usage"] = {
            "prompt_tokens": turn.usage.prompt_tokens,
            "completion_tokens": turn.usage.completion_tokens,
        }
        entry["started_unix_ns"] = turn.started_unix_ns
        entry["finished_unix_ns"] = turn.finished_unix_ns
        entry["metadata"] = dict(turn.metadata)
        entry["attempt"] = turn.attempt
        history.append(entry)
        prompt_tokens += turn.usage.prompt_tokens
        completion_tokens += turn.usage.completion_tokens
        attempts = max(attempts, turn.attempt)

    failed = orch.status == orchestrator_pb2.TASK_STATUS_FAILED or bool(orch.error.code)
    error: dict[str, Any] | None = None
    if failed:
        error = {
            "code": orch.error.code,
            "message": orch.error.message,
            "role": orch.error.role,
            "replica_id": orch.error.replica_id,
            "attempts": orch.error.attempts,
        }
        attempts = max(attempts, orch.error.attempts)

    parsed_input: Any = {}
    if orch.input_json:
        try:
            parsed_input = json.loads(orch.input_json)
        except ValueError:
            # Never lose the row because it was not JSON: keep it as the raw string.
            parsed_input = orch.input_json

    admitted = orch.admitted_unix_ns
    return {
        "task_id": orch.task_id,
        "run_id": orch.run_id,
        "trial": orch.trial,
        "seed": orch.seed,
        "status": "failed" if failed else "done",
        "error": error,
        "attempts": attempts,
        "recoveries": orch.recoveries,
        "input": parsed_input,
        "history": history,
        "results": dict(orch.results),
        "tokens": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
        "turns": len(history),
        "timings": {
            "admitted_unix_ns": admitted,
            "finished_unix_ns": finished_unix_ns,
            "duration_s": (finished_unix_ns - admitted) / 1e9 if admitted else None,
        },
    }


def _get(mapping: Any, key: str) -> Any:
    return mapping.get(key) if isinstance(mapping, Mapping) else None


def record_to_parquet_row(record: Mapping[str, Any]) -> dict[str, Any]:
    """Flatten a record into a row of :data:`PARQUET_SCHEMA` (missing fields become nulls)."""
    error = record.get("error")
    tokens = record.get("tokens")
    timings = record.get("timings")
    extra = {k: v for k, v in record.items() if k not in _KNOWN_KEYS}
    return {
        "task_id": record["task_id"],
        "run_id": record.get("run_id"),
        "trial": record.get("trial"),
        "seed": record.get("seed"),
        "status": record.get("status"),
        "error_code": _get(error, "code"),
        "error_message": _get(error, "message"),
        "error_role": _get(error, "role"),
        "error_replica_id": _get(error, "replica_id"),
        "error_attempts": _get(error, "attempts"),
        "attempts": record.get("attempts"),
        "recoveries": record.get("recoveries"),
        "input_json": _dumps(record.get("input")),
        "history_json": _dumps(record.get("history") or []),
        "results_json": _dumps(record.get("results") or {}),
        "prompt_tokens": _get(tokens, "prompt_tokens"),
        "completion_tokens": _get(tokens, "completion_tokens"),
        "turns": record.get("turns"),
        "started_unix_ns": _get(timings, "admitted_unix_ns"),
        "finished_unix_ns": _get(timings, "finished_unix_ns"),
        "duration_s": _get(timings, "duration_s"),
        "extra_json": _dumps(extra) if extra else None,
    }


def record_from_parquet_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`record_to_parquet_row` for records built by :func:`record_from_orchestrator`."""
    error = None
    if row.get("error_code") is not None:
        error = {
            "code": row["error_code"],
            "message": row.get("error_message"),
            "role": row.get("error_role"),
            "replica_id": row.get("error_replica_id"),
            "attempts": row.get("error_attempts"),
        }
    record: dict[str, Any] = {
        "task_id": row["task_id"],
        "run_id": row.get("run_id"),
        "trial": row.get("trial"),
        "seed": row.get("seed"),
        "status": row.get("status"),
        "error": error,
        "attempts": row.get("attempts"),
        "recoveries": row.get("recoveries"),
        "input": json.loads(row["input_json"]) if row.get("input_json") is not None else None,
        "history": json.loads(row["history_json"]) if row.get("history_json") else [],
        "results": json.loads(row["results_json"]) if row.get("results_json") else {},
        "tokens": {
            "prompt_tokens": row.get("prompt_tokens"),
            "completion_tokens": row.get("completion_tokens"),
        },
        "turns": row.get("turns"),
        "timings": {
            "admitted_unix_ns": row.get("started_unix_ns"),
            "finished_unix_ns": row.get("finished_unix_ns"),
            "duration_s": row.get("duration_s"),
        },
    }
    if row.get("extra_json"):
        record.update(json.loads(row["extra_json"]))
    return record


# --------------------------------------------------------------------------------------------
# Reading the files back (also used by open() to resume)


def _parse_line(line: bytes, path: Path, lineno: int) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except ValueError as exc:
        raise SinkCorruptError(
            f"{path}: line {lineno}: expected a JSON object, got invalid JSON ({exc})"
        ) from None
    if not isinstance(record, dict) or not isinstance(record.get("task_id"), str):
        raise SinkCorruptError(f"{path}: line {lineno}: expected a JSON object with a string task_id")
    return record


def _scan_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (end offset, record) for each complete line; stops at a torn (unterminated) tail."""
    offset = 0
    with open(path, "rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.endswith(b"\n"):
                return
            offset += len(line)
            if line.strip():
                yield offset, _parse_line(line, path, lineno)


def _zstd_frames(fh: IO[bytes], path: Path) -> Iterator[tuple[int, bytes]]:
    """Yield (end offset, content) for each complete zstd frame; stops at an incomplete last frame.

    Frame boundaries come from the decoder itself: a decompression object reports ``eof`` at the
    end of its frame and hands back the bytes after it, so no side index is needed.
    """
    dctx = zstandard.ZstdDecompressor()
    frame_start = 0
    carry = b""
    while True:
        obj = dctx.decompressobj()
        parts: list[bytes] = []
        fed = 0
        while not obj.eof:
            chunk = carry or fh.read(_READ_CHUNK)
            carry = b""
            if not chunk:
                return  # an incomplete (torn) frame, or the clean end of the file when fed == 0
            try:
                parts.append(obj.decompress(chunk))
            except zstandard.ZstdError as exc:
                raise SinkCorruptError(f"{path}: byte {frame_start}: bad zstd frame ({exc})") from None
            fed += len(chunk)
        carry = obj.unused_data
        frame_start += fed - len(carry)
        yield frame_start, b"".join(parts)


def _scan_zstd(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (end offset of its frame, record) for every line of every complete frame."""
    lineno = 0
    with open(path, "rb") as fh:
        for end, content in _zstd_frames(fh, path):
            if content and not content.endswith(b"\n"):
                raise SinkCorruptError(f"{path}: byte {end}: zstd frame does not end with a complete line")
            for line in content.splitlines():
                lineno += 1
                if line.strip():
                    yield end, _parse_line(line, path, lineno)


def _parts(parquet_dir: Path) -> list[tuple[int, Path]]:
    found = []
    if parquet_dir.is_dir():
        for entry in parquet_dir.iterdir():
            m = _PART_RE.match(entry.name)
            if m:
                found.append((int(m.group(1)), entry))
    return sorted(found)


def _read_part(path: Path, columns: Sequence[str] | None = None) -> pa.Table:
    try:
        return pq.read_table(path, columns=list(columns) if columns is not None else None)
    except (pa.ArrowException, OSError) as exc:
        raise SinkCorruptError(f"{path}: unreadable Parquet part ({exc}); move it away to continue") from None


def read_records(out_dir: str | Path) -> Iterator[dict[str, Any]]:
    """Yield the records of an output directory, in write order, without modifying anything.

    Reads ``records.jsonl``, else ``records.jsonl.zst``, else the Parquet parts. A torn tail is
    skipped (as :meth:`SinkWriter.open` would drop it).
    """
    out = Path(out_dir)
    if (out / JSONL_NAME).exists():
        for _, record in _scan_jsonl(out / JSONL_NAME):
            yield record
    elif (out / ZSTD_NAME).exists():
        for _, record in _scan_zstd(out / ZSTD_NAME):
            yield record
    else:
        for _, part in _parts(out / PARQUET_DIR):
            for row in _read_part(part).to_pylist():
                yield record_from_parquet_row(row)


# --------------------------------------------------------------------------------------------
# The writer


class SinkWriter:
    """Buffers finished-task records and appends them durably, each task id exactly once.

    Call :meth:`open` first (it resumes), then :meth:`write` per record, :meth:`maybe_flush`
    periodically, and :meth:`close` at the end. Also usable as a context manager (``__enter__``
    opens). ``clock`` (monotonic seconds) is injectable for tests of the time-based flush.
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        formats: Sequence[str] = ("jsonl",),
        compression: str = "none",
        flush_every: int = 64,
        flush_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        formats = tuple(formats)
        if not formats or any(f not in FORMATS for f in formats) or len(set(formats)) != len(formats):
            raise ConfigError(
                f"expected a non-empty list of distinct formats from {sorted(FORMATS)}, got {list(formats)}",
                key="output.formats",
            )
        if compression not in COMPRESSIONS:
            raise ConfigError(
                f"expected one of {sorted(COMPRESSIONS)}, got {compression!r}", key="output.compression"
            )
        if isinstance(flush_every, bool) or not isinstance(flush_every, int) or flush_every < 1:
            raise ConfigError(f"expected an int >= 1, got {flush_every!r}", key="output.flush_every")
        if not flush_interval_s > 0:
            raise ConfigError(f"expected a number > 0, got {flush_interval_s!r}", key="flush_interval_s")
        self.out_dir = Path(out_dir)
        self.formats = formats
        self.compression = compression
        self.flush_every = flush_every
        self.flush_interval_s = float(flush_interval_s)
        self.duplicates = 0
        """Records refused by :meth:`write` because their task id was already written or buffered."""
        self.written = 0
        """Records made durable by this writer (excluding those found on open)."""
        self._jsonl = "jsonl" in formats
        self._parquet = "parquet" in formats
        self._done: set[str] = set()
        self._buffer: list[tuple[str, dict[str, Any], bytes]] = []
        self._buffered_ids: set[str] = set()
        # Records already in JSONL whose Parquet part failed to write; retried on the next flush.
        self._parquet_pending: list[dict[str, Any]] = []
        self._fh: IO[bytes] | None = None
        self._size = 0  # committed size of the JSONL file
        self._cctx = zstandard.ZstdCompressor(level=3, write_checksum=True, write_content_size=True)
        self._next_part = 0
        self._clock = clock
        self._last_flush = clock()
        self._opened = False
        self._closed = False

    # -- paths

    @property
    def jsonl_path(self) -> Path:
        """The JSONL file (``records.jsonl`` or ``records.jsonl.zst``)."""
        return self.out_dir / (ZSTD_NAME if self.compression == "zstd" else JSONL_NAME)

    @property
    def parquet_dir(self) -> Path:
        """The folder of Parquet parts."""
        return self.out_dir / PARQUET_DIR

    @property
    def done_count(self) -> int:
        """Task ids durably written (found on open plus written since)."""
        return len(self._done)

    @property
    def buffered(self) -> int:
        """Records accepted but not yet flushed."""
        return len(self._buffer)

    def is_done(self, task_id: str) -> bool:
        """Whether ``task_id`` is durably written."""
        return task_id in self._done

    # -- resume

    def open(self) -> set[str]:
        """Prepare the directory, repair a torn tail, reconcile formats; return the ids already done."""
        if self._opened:
            raise RuntimeError("SinkWriter.open() called twice")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        jsonl_ids: set[str] | None = None
        parquet_ids: set[str] | None = None
        if self._jsonl:
            other = self.out_dir / (JSONL_NAME if self.compression == "zstd" else ZSTD_NAME)
            if other.exists():
                raise ConfigError(
                    f"expected compression {self.compression!r} to match the existing output, got a "
                    f"{other.name} from an earlier run; use the same compression or another output.dir",
                    file=str(other),
                    key="output.compression",
                )
            jsonl_ids = self._recover_jsonl()
        if self._parquet:
            parquet_ids = self._recover_parquet()
        if jsonl_ids is not None and parquet_ids is not None:
            self._reconcile(jsonl_ids, parquet_ids)
            self._done = jsonl_ids | parquet_ids
        else:
            self._done = jsonl_ids if jsonl_ids is not None else parquet_ids or set()
        if self._jsonl:
            self._fh = open(self.jsonl_path, "ab")  # held open until close()
            self._size = self._fh.tell()
        self._opened = True
        self._last_flush = self._clock()
        return set(self._done)

    def _recover_jsonl(self) -> set[str]:
        path = self.jsonl_path
        if not path.exists():
            path.touch()
            _fsync_dir(self.out_dir)
            return set()
        scan = _scan_zstd(path) if self.compression == "zstd" else _scan_jsonl(path)
        ids: set[str] = set()
        good = 0
        dupes = 0
        for end, record in scan:
            good = end
            tid = record["task_id"]
            if tid in ids:
                dupes += 1
            ids.add(tid)
        if dupes:
            log.warning("%s: %d duplicate task ids found on resume (kept once)", path, dupes)
        size = path.stat().st_size
        if good < size:
            # A kill mid-append leaves a partial last line/frame: drop it; its tasks are redone.
            log.warning("%s: truncating a torn tail of %d bytes at offset %d", path, size - good, good)
            with open(path, "r+b") as fh:
                fh.truncate(good)
                fh.flush()
                os.fsync(fh.fileno())
        return ids

    def _recover_parquet(self) -> set[str]:
        pdir = self.parquet_dir
        pdir.mkdir(parents=True, exist_ok=True)
        for leftover in pdir.glob("*.tmp"):
            # Written but never renamed: the batch it held is in JSONL (or will be redone).
            log.warning("%s: removing an unfinished Parquet part", leftover)
            leftover.unlink()
        ids: set[str] = set()
        parts = _parts(pdir)
        for _, part in parts:
            ids.update(_read_part(part, ["task_id"]).column("task_id").to_pylist())
        self._next_part = parts[-1][0] + 1 if parts else 0
        return ids

    def _reconcile(self, jsonl_ids: set[str], parquet_ids: set[str]) -> None:
        only_jsonl = jsonl_ids - parquet_ids
        only_parquet = parquet_ids - jsonl_ids
        if only_jsonl:
            # The usual case: killed between the JSONL append and the Parquet rename.
            log.warning("%s: copying %d records missing from Parquet", self.out_dir, len(only_jsonl))
            scan = _scan_zstd(self.jsonl_path) if self.compression == "zstd" else _scan_jsonl(self.jsonl_path)
            batch: list[dict[str, Any]] = []
            for _, record in scan:
                if record["task_id"] in only_jsonl:
                    only_jsonl.discard(record["task_id"])  # a duplicate line is copied once
                    batch.append(record)
                    if len(batch) >= _RECONCILE_BATCH:
                        self._write_part(batch)
                        batch = []
            if batch:
                self._write_part(batch)
        if only_parquet:
            log.warning("%s: copying %d records missing from JSONL", self.out_dir, len(only_parquet))
            lines: list[bytes] = []
            for _, part in _parts(self.parquet_dir):
                for row in _read_part(part).to_pylist():
                    if row["task_id"] in only_parquet:
                        only_parquet.discard(row["task_id"])
                        lines.append(_dumps(record_from_parquet_row(row)).encode() + b"\n")
                        if len(lines) >= _RECONCILE_BATCH:
                            self._append_jsonl_once(lines)
                            lines = []
            if lines:
                self._append_jsonl_once(lines)

    def _append_jsonl_once(self, lines: list[bytes]) -> None:
        with open(self.jsonl_path, "ab") as fh:
            self._append(fh, fh.tell(), lines)

    # -- writing

    def write(self, record: Mapping[str, Any]) -> bool:
        """Buffer one record; False (and a counted duplicate) if its task id was seen already.

        The record is serialised here, so a record that is not JSON-able (or holds NaN) raises
        ``ValueError``/``TypeError`` now rather than poisoning a later flush.
        """
        if not self._opened or self._closed:
            raise RuntimeError("SinkWriter.write() needs open() first and no close()")
        tid = record.get("task_id")
        if not isinstance(tid, str) or not tid:
            raise ValueError(f"expected a record with a non-empty string task_id, got {tid!r}")
        if tid in self._done or tid in self._buffered_ids:
            self.duplicates += 1
            return False
        line = _dumps(record).encode() + b"\n" if self._jsonl else b""
        self._buffer.append((tid, dict(record), line))
        self._buffered_ids.add(tid)
        if len(self._buffer) >= self.flush_every:
            self.flush()
        return True

    def maybe_flush(self) -> bool:
        """Flush if records are buffered and ``flush_interval_s`` passed since the last flush."""
        if self._buffer and self._clock() - self._last_flush >= self.flush_interval_s:
            self.flush()
            return True
        return False

    def flush(self) -> None:
        """Append the buffered records durably: JSONL first (fsync), then one new Parquet part."""
        if not self._buffer and not self._parquet_pending:
            return
        batch = self._buffer
        if batch and self._fh is not None:
            self._size = self._append(self._fh, self._size, [line for _, _, line in batch])
        # Durable in the source of ids now; only the Parquet copy may still be missing.
        for tid, _, _ in batch:
            self._done.add(tid)
        self._buffer = []
        self._buffered_ids = set()
        self.written += len(batch)
        self._last_flush = self._clock()
        if self._parquet:
            self._parquet_pending.extend(record for _, record, _ in batch)
            self._write_part(self._parquet_pending)  # clears the pending list once committed

    def _append(self, fh: IO[bytes], size: int, lines: list[bytes]) -> int:
        data = b"".join(lines)
        if self.compression == "zstd":
            data = self._cctx.compress(data)  # one complete, independent frame per append
        try:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        except BaseException:
            # Leave no partial append behind for the next one to land after.
            try:
                fh.truncate(size)
                fh.seek(size)
            except OSError:
                pass
            raise
        return size + len(data)

    def _write_part(self, records: Iterable[Mapping[str, Any]]) -> None:
        table = pa.Table.from_pylist([record_to_parquet_row(r) for r in records], schema=PARQUET_SCHEMA)
        final = self.parquet_dir / f"part-{self._next_part:05d}.parquet"
        tmp = final.with_name(final.name + ".tmp")
        with open(tmp, "wb") as fh:
            pq.write_table(table, fh, compression="zstd" if self.compression == "zstd" else "snappy")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        # Committed from here on: never write these rows again, even if the dir fsync fails.
        self._next_part += 1
        self._parquet_pending = []
        _fsync_dir(self.parquet_dir)

    def close(self) -> None:
        """Flush what is buffered and close the files. Idempotent."""
        if self._closed or not self._opened:
            self._closed = True
            return
        try:
            self.flush()
        finally:
            if self._fh is not None:
                self._fh.close()
                self._fh = None
            self._closed = True

    def __enter__(self) -> SinkWriter:
        self.open()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
