"""Small file helpers shared by the cluster, the job manager and its tasks."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["write_atomic"]


def write_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file renamed over it: whoever polls for or reads
    the file sees all of it or nothing. The temp name carries the pid, so processes writing the same
    file at once never share one."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
