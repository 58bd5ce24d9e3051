"""One vLLM CPU server process: start it, wait until it serves, stop it with all its children.

vLLM lives in its own venv (``deploy/install_vllm_cpu.sh``), so the server is a subprocess of that
venv's interpreter, started as ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm``
console script fails there) in a process group of its own: vLLM forks an engine-core process, and
``stop()`` must take it down too. Output goes to a log file; when the server dies while starting,
the error carries the tail of that log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import aiohttp

from agentmesh.errors import ConfigError, LlmError
from agentmesh.llm_gateway.constants import VLLM_STARTUP_TIMEOUT_S, agentmesh_home, vllm_python

__all__ = ["VllmCpuServer", "vllm_cpu_env"]

log = logging.getLogger(__name__)

_LOG_TAIL_BYTES = 4000

# Runs first in the server process, then execs vLLM: PR_SET_PDEATHSIG (1) with SIGTERM (15) makes
# the kernel stop the server when its parent dies (a Ray actor killed with SIGKILL never runs its
# cleanup, and a 4 GB orphan per crash would exhaust the machine). The flag survives exec. If the
# parent is already gone by the time the flag is set, exit instead.
_DIE_WITH_PARENT = (
    "import ctypes, os, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, 15, 0, 0, 0)\n"
    "if os.getppid() != int(os.environ['AGENTMESH_PARENT_PID']): sys.exit(1)\n"
    "os.execv(sys.executable, [sys.executable] + sys.argv[1:])\n"
)


def vllm_cpu_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment vLLM CPU needs on these machines (see docs: ENVIRONMENT.md).

    Both cores for compute (no reserved CPU), a 1 GiB KV cache (the default reserves far more than
    a 135M model needs), and never a hub download.
    """
    env = dict(os.environ)
    env.update(
        VLLM_CPU_NUM_OF_RESERVED_CPU="0",
        VLLM_CPU_KVCACHE_SPACE="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    if extra:
        env.update(extra)
    return env


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class VllmCpuServer:
    """A vLLM OpenAI-compatible server on the CPU, serving one Hugging Face model folder.

    ``port=0`` picks a free port. After :meth:`start`, ``base_url`` is ``http://host:port`` and
    ``startup_s`` how long it took to answer ``/health``.
    """

    def __init__(
        self,
        model_dir: Path | str,
        *,
        served_model_name: str,
        host: str = "127.0.0.1",
        port: int = 0,
        max_num_seqs: int = 16,
        dtype: str = "float32",
        python: Path | str | None = None,
        log_path: Path | str | None = None,
        startup_timeout_s: float = VLLM_STARTUP_TIMEOUT_S,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        die_with_parent: bool = True,
    ) -> None:
        if not served_model_name:
            raise ConfigError("served_model_name must not be empty", key="served_model_name")
        if max_num_seqs < 1:
            raise ConfigError(f"expected >= 1, got {max_num_seqs}", key="max_num_seqs")
        if not 0 <= port < 65536:
            raise ConfigError(f"expected 0..65535, got {port}", key="port")
        self.model_dir = Path(model_dir)
        self.served_model_name = served_model_name
        self.host = host
        self.port = port
        self.max_num_seqs = max_num_seqs
        self.dtype = dtype
        self.python = Path(python) if python is not None else vllm_python()
        self.log_path = Path(log_path) if log_path is not None else None
        self.startup_timeout_s = startup_timeout_s
        self.extra_args = tuple(extra_args)
        self.extra_env = dict(env or {})
        self.die_with_parent = die_with_parent and sys.platform == "linux"
        self.startup_s: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._current_log: Path | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def command(self) -> list[str]:
        """The argv that starts the server (for logs and for running it by hand)."""
        return [
            str(self.python),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.model_dir),
            "--served-model-name",
            self.served_model_name,
            "--dtype",
            self.dtype,
            # Without it startup takes 150-200 s here: the compile cache does not reload on CPU.
            "--enforce-eager",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--max-num-seqs",
            str(self.max_num_seqs),
            *self.extra_args,
        ]

    async def start(self) -> str:
        """Start the server and wait for ``/health``; return ``base_url``.

        Raises :class:`LlmError` with the log tail if the process exits first or the timeout passes.
        """
        if self.running():
            return self.base_url
        self._check_can_start()
        # A port picked by binding port 0 can be taken by someone else before vLLM binds it: if the
        # server dies of that, pick another.
        pick_port = self.port == 0
        for attempt in range(3):
            if pick_port:
                self.port = _free_port(self.host)
            try:
                return await self._start_once()
            except LlmError as exc:
                if pick_port and attempt < 2 and "address already in use" in str(exc).lower():
                    log.warning("vLLM port %d was taken, retrying on another", self.port)
                    continue
                raise
        raise AssertionError("unreachable")

    def _check_can_start(self) -> None:
        """Raise :class:`ConfigError` when what the command needs is missing (before any process)."""
        if not self.python.exists():
            raise ConfigError(
                f"the vLLM CPU venv interpreter {self.python} does not exist: run deploy/install_vllm_cpu.sh",
                key="AGENTMESH_VLLM_PYTHON",
            )
        if not (self.model_dir / "config.json").is_file():
            raise ConfigError(f"{self.model_dir} is not a Hugging Face model folder", key="model_dir")

    async def _start_once(self) -> str:
        if self.log_path is None:
            log_dir = agentmesh_home() / "logs"
            log_dir.mkdir(parents=True, exist_ok=True)
            safe_name = re.sub(r"[^A-Za-z0-9._-]+", "-", self.served_model_name)  # "org/model" has a slash
            log_path = log_dir / f"vllm-{safe_name}-{self.port}.log"
        else:
            log_path = self.log_path
            log_path.parent.mkdir(parents=True, exist_ok=True)
        self._current_log = log_path
        t0 = time.monotonic()
        self._proc = self._spawn(log_path)
        log.info("vLLM CPU pid %d starting on %s (log %s)", self._proc.pid, self.base_url, log_path)
        try:
            await self._wait_healthy(t0)
        except BaseException:
            await self.stop()
            raise
        self.startup_s = time.monotonic() - t0
        log.info("vLLM CPU %s ready in %.1fs", self.base_url, self.startup_s)
        return self.base_url

    def _spawn(self, log_path: Path) -> subprocess.Popen[bytes]:
        # Popen returns as soon as the child is forked: fine to call from the event loop.
        with open(log_path, "ab") as log_file:
            log_file.write(f"$ {' '.join(self.command())}\n".encode())
            log_file.flush()
            argv = self.command()
            env = vllm_cpu_env(self.extra_env)
            if self.die_with_parent:
                argv = [argv[0], "-c", _DIE_WITH_PARENT, *argv[1:]]
                env["AGENTMESH_PARENT_PID"] = str(os.getpid())
            return subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its own process group, so stop() reaches the engine core
            )

    async def _wait_healthy(self, t0: float) -> None:
        assert self._proc is not None
        deadline = t0 + self.startup_timeout_s
        url = f"{self.base_url}/health"
        timeout = aiohttp.ClientTimeout(total=2.0)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                code = self._proc.poll()
                if code is not None:
                    raise LlmError(
                        f"vLLM CPU server exited with code {code} while starting; log {self._current_log}:\n"
                        f"{self.log_tail()}"
                    )
                with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
                    async with session.get(url) as resp:
                        if resp.status == 200:
                            return
                if time.monotonic() > deadline:
                    raise LlmError(
                        f"vLLM CPU server did not answer {url} within {self.startup_timeout_s}s; "
                        f"log {self._current_log}:\n{self.log_tail()}"
                    )
                await asyncio.sleep(0.5)

    def log_tail(self, n_bytes: int = _LOG_TAIL_BYTES) -> str:
        path = self._current_log
        if path is None:
            return ""
        try:
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - n_bytes))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    async def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL it after ``grace_s``. Idempotent."""
        proc = self._proc
        if proc is None:
            return
        self._proc = None
        if proc.poll() is None:
            self._signal_group(proc.pid, signal.SIGTERM)
            try:
                await asyncio.to_thread(proc.wait, grace_s)
            except subprocess.TimeoutExpired:
                log.warning("vLLM CPU pid %d ignored SIGTERM for %.0fs; killing", proc.pid, grace_s)
        # The engine core may outlive the API process: always sweep the whole group.
        self._signal_group(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            await asyncio.to_thread(proc.wait, 5.0)

    def kill(self) -> None:
        """Synchronous last resort (e.g. at interpreter exit): SIGKILL the process group."""
        proc, self._proc = self._proc, None
        if proc is not None:
            self._signal_group(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5.0)

    @staticmethod
    def _signal_group(pgid: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
