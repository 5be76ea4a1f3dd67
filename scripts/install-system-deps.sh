#!/usr/bin/env bash
# Installs Debian's prometheus and prometheus-alertmanager when they are missing.
# Where apt is not usable, says so and carries on: the tests that need them skip with a reason.
set -u
missing=()
command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v prometheus-alertmanager >/dev/null 2>&1 && command -v amtool >/dev/null 2>&1 || missing+=(prometheus-alertmanager)
[ ${#missing[@]} -eq 0 ] && exit 0
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; else
    echo "opskit: cannot install ${missing[*]} (not root, no sudo); tests that need them will skip"; exit 0
  fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "opskit: apt-get not found; install ${missing[*]} by hand; tests that need them will skip"; exit 0
fi
export DEBIAN_FRONTEND=noninteractive
echo "opskit: installing ${missing[*]} from Debian"
$sudo apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 \
  || { $sudo apt-get update -q >/dev/null 2>&1 && $sudo apt-get install -y -q "${missing[@]}" >/dev/null 2>&1; } \
  || echo "opskit: apt-get could not install ${missing[*]}; tests that need them will skip"
# The Debian packages ship services; opskit starts its own instances on loopback ports instead.
for svc in prometheus prometheus-alertmanager prometheus-node-exporter; do
  $sudo systemctl stop "$svc" >/dev/null 2>&1 || true
done
exit 0
