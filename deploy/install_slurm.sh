#!/usr/bin/env bash
# Install a single-node Slurm's parts (Debian's slurm-wlm and munge); idempotent, needs root.
# The daemons are not started here: the test setup (tests/integration/slurm/conftest.py) and
# deploy/slurm/local-slurm.sh start a private instance on loopback with its own config and dirs.
set -euo pipefail
need=()
for bin in slurmctld slurmd sbatch squeue scancel sinfo munged; do
  command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || need+=("$bin")
done
if [ "${#need[@]}" -eq 0 ]; then
  echo "install_slurm: slurm-wlm and munge already installed"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install_slurm: missing ${need[*]}; run as root to install slurm-wlm and munge" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends slurm-wlm munge
echo "install_slurm: installed $(dpkg-query -W -f='slurm-wlm ${Version}' slurm-wlm)"
