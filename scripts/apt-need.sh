#!/usr/bin/env bash
# Installs the Debian packages given as arguments that are not installed yet
# (apt-get update first, once, only if something is missing). Every script of
# the project installs what it needs through this one place. When another apt
# or dpkg holds the lock (unattended-upgrades, a second script), it waits for
# it, up to PS_APT_WAIT_S seconds (default 900), instead of failing.
#   scripts/apt-need.sh PACKAGE...
set -euo pipefail
need=()
for pkg in "$@"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
((${#need[@]})) || exit 0
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
deadline=$(($(date +%s) + ${PS_APT_WAIT_S:-900}))

# apt-get ARGS..., again while the failure is another process holding a lock
apt_run() {
  local out
  while :; do
    # DPkg::Lock::Timeout covers dpkg's lock; the lists lock of `update` is retried here
    if out=$($SUDO env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=30 "$@" 2>&1); then
      return 0
    fi
    if grep -qiE 'could not get lock|unable to acquire|another process' <<<"$out" \
      && [ "$(date +%s)" -lt "$deadline" ]; then
      echo "apt-need: another apt or dpkg holds its lock; waiting ($(grep -im1 'lock' <<<"$out"))" >&2
      sleep 5
      continue
    fi
    printf '%s\n' "$out" >&2
    echo "apt-need: apt-get $* failed (above)" >&2
    return 1
  done
}

echo "installing ${need[*]}" >&2
apt_run update -qq
apt_run install -y -qq --no-install-recommends "${need[@]}"
