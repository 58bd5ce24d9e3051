#!/usr/bin/env bash
# Start or stop a private single-node Slurm on loopback under DIR (root; deploy/install_slurm.sh first).
#   eval "$(deploy/slurm/local-slurm.sh up /tmp/slurm)"   # exports SLURM_CONF for sbatch/squeue/...
#   deploy/slurm/local-slurm.sh latency /tmp/slurm        # five sbatch-to-running latencies
#   deploy/slurm/local-slurm.sh down /tmp/slurm
set -euo pipefail
if [ "$#" -ne 2 ]; then
  echo "usage: $0 up|down|latency DIR" >&2
  exit 2
fi
root="$(cd "$(dirname "$0")/../.." && pwd)"
python="${AGENTMESH_PYTHON:-$root/.venv/bin/python}"
[ -x "$python" ] || python=python3
exec "$python" -m agentmesh.cluster.slurm_local "$1" "$2"
