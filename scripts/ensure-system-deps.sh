#!/usr/bin/env bash
# Install the Debian packages replicator's tests and demo need, only if something is missing.
# Runs as root on a fresh Debian machine: `apt-get update` first, then install.
set -euo pipefail

# command -> package
declare -A need=(
  [conntrack]=conntrack
  [conntrackd]=conntrackd
  [nft]=nftables
  [keepalived]=keepalived
  [ip]=iproute2
  [ping]=iputils-ping
  [sysctl]=procps
  [systemd-analyze]=systemd
)
missing=()
for cmd in "${!need[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${need[$cmd]}")
done
# A venv needs ensurepip, which Debian ships separately for its own python3.
if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
  missing+=(python3-venv)
fi
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "missing packages: ${missing[*]} (run as root to install them)" >&2
  exit 1
fi
echo "installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# The Debian packages enable their services; the lab starts its own instances in
# namespaces, so stop the host-wide ones the install may have started.
for svc in conntrackd keepalived; do
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$svc" 2>/dev/null; then
    systemctl stop "$svc" || true
  fi
done
