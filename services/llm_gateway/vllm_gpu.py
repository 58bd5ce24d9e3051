"""One GPU vLLM server process: ``vllm serve MODEL ... --tensor-parallel-size K``.

The process handling (a process group of its own, the kernel stopping it when its parent dies, a
log file, waiting for ``/health``, the log tail in errors, stop with SIGTERM then SIGKILL) is
:class:`~agentmesh.llm_gateway.vllm_cpu.VllmCpuServer`'s; this class changes only what is started
and what must exist first. The executable is ``$AGENTMESH_VLLM_BIN``, else ``vllm`` on ``PATH``.

Which GPUs the server uses is decided by whoever starts it: a Ray actor scheduled with
``num_gpus=K`` has ``CUDA_VISIBLE_DEVICES`` set by Ray, and the server inherits it.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from agentmesh.errors import ConfigError
from agentmesh.llm_gateway.constants import VLLM_STARTUP_TIMEOUT_S
from agentmesh.llm_gateway.vllm_cpu import VllmCpuServer

__all__ = ["VllmServer", "find_vllm_binary"]

log = logging.getLogger(__name__)

# VllmCpuServer starts ``python ARGS`` (behind a die-with-parent trampoline that re-execs the same
# interpreter). ``vllm`` is an executable, not a module of this interpreter: this one-liner, run by
# that interpreter, replaces itself with it, keeping the trampoline's parent-death signal.
_EXEC_ARGV = "import os, sys; os.execv(sys.argv[1], sys.argv[1:])"


def find_vllm_binary(override: str | None = None) -> Path:
    """``override``, else ``$AGENTMESH_VLLM_BIN``, else ``vllm`` on ``PATH``; an executable file."""
    raw = override or os.environ.get("AGENTMESH_VLLM_BIN")
    if raw:
        path = Path(raw).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise ConfigError(f"{raw!r} is not an executable file", key="AGENTMESH_VLLM_BIN")
        return path
    found = shutil.which("vllm")
    if found is None:
        raise ConfigError(
            "no `vllm` executable on PATH: install vLLM on the GPU nodes (pip install vllm) "
            "or point AGENTMESH_VLLM_BIN at it",
            key="AGENTMESH_VLLM_BIN",
        )
    return Path(found)


class VllmServer(VllmCpuServer):
    """``vllm serve`` on GPUs. ``model`` is a Hugging Face id or a local folder (vLLM resolves it).

    ``tensor_parallel_size`` should equal the number of GPUs the process sees. ``env`` adds to (and
    overrides) the environment; unlike the CPU server, hub downloads stay allowed unless the caller's
    environment sets ``HF_HUB_OFFLINE``.
    """

    def __init__(
        self,
        model: str,
        *,
        served_model_name: str,
        tensor_parallel_size: int = 1,
        host: str = "127.0.0.1",
        port: int = 0,
        max_num_seqs: int = 256,
        vllm_bin: Path | str | None = None,
        log_path: Path | str | None = None,
        startup_timeout_s: float = VLLM_STARTUP_TIMEOUT_S,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        die_with_parent: bool = True,
    ) -> None:
        if not model:
            raise ConfigError("model must not be empty", key="model")
        if tensor_parallel_size < 1:
            raise ConfigError(f"expected >= 1, got {tensor_parallel_size}", key="tensor_parallel_size")
        # The CPU server's defaults turn hub access off; here the caller's own settings apply.
        hub_env = {k: os.environ.get(k, "0") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
        super().__init__(
            model,
            served_model_name=served_model_name,
            host=host,
            port=port,
            max_num_seqs=max_num_seqs,
            python=sys.executable,
            log_path=log_path,
            startup_timeout_s=startup_timeout_s,
            extra_args=extra_args,
            env={**hub_env, **(env or {})},
            die_with_parent=die_with_parent,
        )
        self.model = model
        self.tensor_parallel_size = tensor_parallel_size
        self.vllm_bin = Path(vllm_bin) if vllm_bin is not None else None

    def command(self) -> list[str]:
        binary = self.vllm_bin if self.vllm_bin is not None else find_vllm_binary()
        return [
            str(self.python),
            "-c",
            _EXEC_ARGV,
            str(binary),
            "serve",
            self.model,
            "--served-model-name",
            self.served_model_name,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--tensor-parallel-size",
            str(self.tensor_parallel_size),
            "--max-num-seqs",
            str(self.max_num_seqs),
            *self.extra_args,
        ]

    async def start(self) -> str:
        """Start ``vllm serve`` and wait for ``/health``; return ``base_url``.

        Raises :class:`ConfigError` when there is no ``vllm`` executable, :class:`LlmError` with the
        log tail if the process exits first or the timeout passes.
        """
        return await super().start()

    def _check_can_start(self) -> None:
        self.vllm_bin = find_vllm_binary(str(self.vllm_bin) if self.vllm_bin is not None else None)
