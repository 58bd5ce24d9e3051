#!/usr/bin/env bash
# Install the sandbox backends' system parts and build the podman backend's image. Idempotent.
#
#   Debian packages   bubblewrap (default backend), podman + runc + catatonit (OCI backend; catatonit
#                     is each container's pid 1, podman only recommends it), debootstrap
#   podman image      agentmesh-sandbox:bookworm: Debian bookworm minbase + python3 (with sqlite3),
#                     built offline from the Debian mirror apt already uses, then `podman import`ed
#
# Runs as root. Each step prints one line; a step that fails stops the script with a line that says
# which step and where its log is. A second run only checks (seconds).
#
# Usage: deploy/install_sandboxes.sh [--rebuild-image]
#   AGENTMESH_SANDBOX_IMAGE    image name (default agentmesh-sandbox:bookworm)
#   AGENTMESH_DEBIAN_MIRROR    mirror for debootstrap (default: the one in /etc/apt/sources.list*)
set -euo pipefail

IMAGE="${AGENTMESH_SANDBOX_IMAGE:-agentmesh-sandbox:bookworm}"
SUITE=bookworm
PACKAGES=(bubblewrap podman runc catatonit debootstrap)
# podman's global options on these machines: no systemd (cgroupfs, events to a file)
PODMAN=(podman --cgroup-manager cgroupfs --events-backend file)

log() { printf '[install_sandboxes] %s\n' "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }

rebuild=0
if [[ "${1:-}" == "--rebuild-image" ]]; then rebuild=1; elif [[ -n "${1:-}" ]]; then
  die "unknown argument ${1} (usage: $0 [--rebuild-image])"
fi
[[ "$(id -u)" == "0" ]] || die "must run as root (apt-get, debootstrap and rootful podman need it)"

logdir="$(mktemp -d /tmp/agentmesh-install-sandboxes.XXXXXX)"
keep_logs=0
cleanup() {
  if [[ -n "${rootfs:-}" && -d "$rootfs" ]]; then rm -rf "$rootfs"; fi
  if [[ $keep_logs -eq 0 ]]; then rm -rf "$logdir"; fi
}
trap cleanup EXIT
fail() { keep_logs=1; die "$1 (log: $2)"; }

# -- 1. Debian packages ---------------------------------------------------------------------------
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [[ ${#missing[@]} -eq 0 ]]; then
  log "packages: ${PACKAGES[*]} already installed"
else
  command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install ${missing[*]} by hand"
  log "packages: installing ${missing[*]} (apt)"
  apt_install() {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" \
      >>"$logdir/apt.log" 2>&1
  }
  # a stale package index (fresh image) makes the first try fail: refresh it once and retry
  apt_install || { apt-get update -q >>"$logdir/apt.log" 2>&1 && apt_install; } \
    || fail "apt-get install ${missing[*]}" "$logdir/apt.log"
fi
for b in bwrap podman runc catatonit debootstrap; do
  command -v "$b" >/dev/null 2>&1 || die "packages: $b is still missing after the install"
done

# -- 2. the podman image --------------------------------------------------------------------------
if [[ $rebuild -eq 0 ]] && "${PODMAN[@]}" image exists "$IMAGE" 2>/dev/null; then
  log "image: $IMAGE already built"
  exit 0
fi

# The Debian mirror apt uses for the main suite: deb822 (*.sources) or one-line (*.list) format.
find_mirror() {
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -f "$f" ]] || continue
    # per stanza: its URIs if its Suites hold exactly "$SUITE"
    awk -v suite="$SUITE" '
      function flush() { if (uris != "" && has) { print uris; found = 1; exit } uris = ""; has = 0 }
      /^[[:space:]]*$/ { flush(); next }
      tolower($1) == "uris:" { uris = $2 }
      tolower($1) == "suites:" { for (i = 2; i <= NF; i++) if ($i == suite) has = 1 }
      END { if (!found) flush() }
    ' "$f" | head -n1
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [[ -f "$f" ]] || continue
    # "deb [opts] URI SUITE COMPONENTS..."
    awk -v suite="$SUITE" '
      $1 == "deb" { i = 2; if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
                    if ($(i + 1) == suite) { print $i; exit } }
    ' "$f"
  done
}
mirror="${AGENTMESH_DEBIAN_MIRROR:-$(find_mirror | head -n1)}"
mirror="${mirror:-http://deb.debian.org/debian}"

rootfs="$(mktemp -d /var/tmp/agentmesh-rootfs.XXXXXX)"
t0=$SECONDS
log "image: debootstrap $SUITE minbase + python3 from $mirror (~35 s)"
debootstrap --variant=minbase --include=python3-minimal,python3 "$SUITE" "$rootfs" "$mirror" \
  >"$logdir/debootstrap.log" 2>&1 || fail "debootstrap $SUITE from $mirror" "$logdir/debootstrap.log"

# What a sandbox never needs: package caches and lists (no network, no apt inside), docs, locales.
rm -rf "$rootfs"/var/cache/apt/* "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/* \
  "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
  "$rootfs"/usr/share/locale/*
chroot "$rootfs" python3 -c "import sqlite3, json, subprocess" >"$logdir/check.log" 2>&1 \
  || fail "image check: python3 with sqlite3 in the new root" "$logdir/check.log"
# /work and /tmp are the sandbox's writable mounts; they must exist in a read-only root
mkdir -p "$rootfs/work" && chmod 1777 "$rootfs/work" "$rootfs/tmp"

log "image: importing as $IMAGE ($(du -sh "$rootfs" | cut -f1))"
if [[ $rebuild -eq 1 ]] && "${PODMAN[@]}" image exists "$IMAGE" 2>/dev/null; then
  "${PODMAN[@]}" rmi "$IMAGE" >/dev/null 2>&1 || true
fi
tar -C "$rootfs" -c . | "${PODMAN[@]}" import \
  --change 'ENV=PATH=/usr/local/bin:/usr/bin:/bin' --change 'WORKDIR=/work' \
  --message "agentmesh sandbox image ($SUITE minbase + python3)" - "$IMAGE" >"$logdir/import.log" 2>&1 \
  || fail "podman import $IMAGE" "$logdir/import.log"
# podman's default nofile and nproc limits exceed this machine's hard limits, which runc may not raise
"${PODMAN[@]}" run --rm --runtime runc --network none --user 65534:65534 \
  --ulimit nofile=20000:20000 --ulimit nproc=1024:1024 "$IMAGE" \
  python3 -c "import sqlite3" >"$logdir/run.log" 2>&1 \
  || fail "podman run $IMAGE python3 -c 'import sqlite3'" "$logdir/run.log"
log "image: $IMAGE built and checked in $((SECONDS - t0)) s"
