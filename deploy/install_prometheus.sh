#!/usr/bin/env bash
# Install Debian's Prometheus (the server and promtool) for the metrics tests and local dashboards,
# without leaving its system service running. Idempotent: a second run only checks (a second).
#
# Debian's package starts its service on install (invoke-rc.d), which would hold port 9090 and
# scrape localhost forever. agentmesh starts Prometheus itself where it needs one (its own config,
# data directory and port: tests/integration/test_prometheus.py, deploy/prometheus/prometheus.yml),
# so the install runs under a policy-rc.d that forbids service starts, and a service the package
# started anyway (its pid file /run/prometheus/prometheus.pid) is stopped.
#
# Runs as root. Usage: deploy/install_prometheus.sh
set -euo pipefail

PACKAGES=(prometheus)
PIDFILE=/run/prometheus/prometheus.pid
POLICY=/usr/sbin/policy-rc.d

log() { printf '[install_prometheus] %s\n' "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }

[[ "$(id -u)" == "0" ]] || die "must run as root (apt-get needs it)"

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if ((${#missing[@]})); then
  logfile="$(mktemp /tmp/agentmesh-install-prometheus.XXXXXX.log)"
  # No service may start during the install; put back whatever policy was there before.
  saved=""
  if [[ -e "$POLICY" ]]; then saved="$(mktemp)"; cp -p "$POLICY" "$saved"; fi
  restore() {
    if [[ -n "$saved" ]]; then mv -f "$saved" "$POLICY"; else rm -f "$POLICY"; fi
  }
  trap restore EXIT
  printf '#!/bin/sh\nexit 101\n' >"$POLICY"
  chmod 755 "$POLICY"
  log "installing ${missing[*]} (apt-get, --no-install-recommends)"
  if ! { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      "${missing[@]}"; } >"$logfile" 2>&1; then
    die "apt-get install ${missing[*]} (log: $logfile)"
  fi
  rm -f "$logfile"
  restore
  trap - EXIT
else
  log "already installed: ${PACKAGES[*]}"
fi

# A system service started anyway (another policy, an older install): stop it, by its pid file only.
if [[ -s "$PIDFILE" ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
  log "stopping the prometheus system service the package started (pid $(cat "$PIDFILE"))"
  if [[ -x /etc/init.d/prometheus ]]; then
    /etc/init.d/prometheus stop >/dev/null 2>&1 || true
  fi
  if [[ -s "$PIDFILE" ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
    kill "$(cat "$PIDFILE")" || true
  fi
fi

command -v prometheus >/dev/null || die "prometheus is not on PATH after the install"
command -v promtool >/dev/null || die "promtool is not on PATH after the install"
log "ok: $(prometheus --version 2>&1 | head -1)"
