#!/usr/bin/env bash
# Install Arize Phoenix (a trace backend: OTLP in, an HTTP API out) into a venv of its own.
#
# Phoenix brings its own web stack and pins (~850 MB), so it never shares the project venv. The
# venv lives at
#   ${AGENTMESH_HOME:-$HOME/.cache/agentmesh}/phoenix-venv
# and a stamp file records the pin: a second run with the same pin is a no-op. The last line of
# output (stdout) is the venv's path; tests/integration/test_phoenix.py looks there.
#
# Usage: deploy/install_phoenix.sh [--force]
#   AGENTMESH_HOME   where the venv lives
#   PYTHON           the interpreter that creates the venv (default: python3.11, else python3)
set -euo pipefail

PHOENIX_PIN="arize-phoenix==20.26.1"
STAMP_VERSION=1

home="${AGENTMESH_HOME:-$HOME/.cache/agentmesh}"
venv="$home/phoenix-venv"
stamp="$venv/.agentmesh-phoenix-stamp"
want_stamp="stamp=$STAMP_VERSION $PHOENIX_PIN"

force=0
if [[ "${1:-}" == "--force" ]]; then force=1; fi

log() { printf '[install_phoenix] %s\n' "$*" >&2; }

if [[ $force -eq 0 && -x "$venv/bin/phoenix" && -f "$stamp" && "$(head -n1 "$stamp")" == "$want_stamp" ]]; then
  log "up to date"
  echo "$venv"
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
rm -f "$stamp"

t0=$SECONDS
log "installing $PHOENIX_PIN (about a minute and ~850 MB on a fresh machine)"
"$venv/bin/python" -m pip --disable-pip-version-check install -q "$PHOENIX_PIN"
# the server must at least import; a broken resolve fails here, not in a test
"$venv/bin/python" -c "import phoenix.server.main" >/dev/null
printf '%s\n' "$want_stamp" >"$stamp"
log "installed in $((SECONDS - t0)) s"
echo "$venv"
