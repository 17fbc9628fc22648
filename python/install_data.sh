#!/usr/bin/env bash
# Installs the offline data the training app uses, from Debian packages:
#   - CJK font packages (python/font_packages.txt): glyph classes are rendered from them at
#     run time (python/xbm_data.py);
#   - dataset-fashion-mnist: Fashion-MNIST as gzipped IDX files.
# scikit-learn's digits ship with scikit-learn and need nothing here.
#
# A busy package manager (another apt-get, unattended-upgrades) is waited for: every apt-get
# waits up to APT_LOCK_TIMEOUT seconds (default 600) for the dpkg lock, and a failed apt-get
# is retried APT_RETRIES times (default 3), APT_RETRY_PAUSE seconds apart (default 15).
# Exit status:
#   0  everything is installed (or nothing to do: no apt-get, or not root; then the missing
#      packages and the command that installs them are printed, and train_xbm.py checks
#      the glyph set itself before it renders or trains);
#   1  packages are still missing after the retries: they are named, with the command.
set -u
cd "$(dirname "$0")"

FONTS=()
while read -r line; do
  case "$line" in ''|'#'*) ;; *) FONTS+=("$line") ;; esac
done < font_packages.txt
PACKAGES=("${FONTS[@]}" dataset-fashion-mnist)
LOCK_TIMEOUT=${APT_LOCK_TIMEOUT:-600}
RETRIES=${APT_RETRIES:-3}
RETRY_PAUSE=${APT_RETRY_PAUSE:-15}

say() { echo "install_data.sh: $*"; }
installed() { dpkg-query -W -f='${Status}\n' "$1" 2>/dev/null | grep -q "install ok installed"; }
missing_of() { local p; for p in "$@"; do installed "$p" || echo "$p"; done; }
install_cmd() { echo "sudo apt-get install -y --no-install-recommends $*"; }

if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-query >/dev/null 2>&1; then
  say "apt-get/dpkg not found: skipping. The glyph set needs the CJK fonts of python/font_packages.txt" \
      "(Debian names) installed by other means; Fashion-MNIST needs FASHION_MNIST_DIR."
  exit 0
fi
mapfile -t missing < <(missing_of "${PACKAGES[@]}")
if [ ${#missing[@]} -eq 0 ]; then
  say "0 package(s) newly installed; ${#PACKAGES[@]} of ${#PACKAGES[@]} were already installed (CJK fonts, dataset-fashion-mnist)"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  say "not root: skipping ${#missing[@]} missing package(s). Install them with:"
  echo "  $(install_cmd "${missing[@]}")"
  exit 0
fi

export DEBIAN_FRONTEND=noninteractive
# DPkg::Lock::Timeout: wait for another apt/dpkg process instead of failing at once.
LOCK_OPT="-oDPkg::Lock::Timeout=$LOCK_TIMEOUT"

# apt-get's own output, with its "Waiting for cache lock" line (one every few seconds while
# another process holds the lock) shown once every 30 s.
quiet_waits() { awk '/^Waiting for cache lock/ { if (n++ % 15) next } { print; fflush() }'; }

retry() {  # retry WHAT CMD...: runs CMD up to RETRIES times
  local what=$1 i
  shift
  for ((i = 1; i <= RETRIES; i++)); do
    "$@" 2>&1 | quiet_waits
    [ "${PIPESTATUS[0]}" -eq 0 ] && return 0
    if [ "$i" -lt "$RETRIES" ]; then
      say "$what failed (attempt $i of $RETRIES; apt waits up to ${LOCK_TIMEOUT}s for the dpkg lock); again in ${RETRY_PAUSE}s"
      sleep "$RETRY_PAUSE"
    fi
  done
  say "$what failed $RETRIES times"
  return 1
}

update() {  # apt-get update; DPkg::Lock::Timeout does not cover the lists lock: wait for it here
  local start=$SECONDS out rc n=0
  while true; do
    out=$(apt-get update -q "$LOCK_OPT" 2>&1); rc=$?
    if [ $rc -eq 0 ] || ! grep -q "Could not get lock" <<<"$out" || [ $((SECONDS - start)) -ge "$LOCK_TIMEOUT" ]; then
      echo "$out" | tail -n 3
      return $rc
    fi
    if [ $((n++ % 6)) -eq 0 ]; then
      say "another apt process holds the package lists lock; waiting ($((SECONDS - start))s of at most ${LOCK_TIMEOUT}s)"
    fi
    sleep 5
  done
}

say "installing ${#missing[@]} package(s): ${missing[*]}"
retry "apt-get update" update || say "continuing with the package lists already here"
# Install what this Debian release has; a package missing from it is reported, not fatal
# (train_xbm.py checks the glyph set it gets).
available=()
for p in "${missing[@]}"; do
  if apt-cache show "$p" >/dev/null 2>&1; then available+=("$p"); else say "no package $p in this release's lists"; fi
done
if [ ${#available[@]} -gt 0 ]; then
  retry "apt-get install" apt-get install -y -q --no-install-recommends "$LOCK_OPT" "${available[@]}"
fi

mapfile -t still < <(missing_of "${available[@]}")
new=$(( ${#available[@]} - ${#still[@]} ))
if [ ${#still[@]} -gt 0 ]; then
  say "ERROR: ${#still[@]} package(s) still missing after $RETRIES attempt(s): ${still[*]}"
  say "without them the glyph data set is short (fewer font faces, fewer characters) and the quick start's"
  say "--pretrain-classes 4000 does not fit. When the other apt/dpkg process has finished, run:"
  echo "  $(install_cmd "${still[@]}")"
  echo "  (or: sudo bash python/install_data.sh; APT_LOCK_TIMEOUT=<seconds> waits longer for the lock)"
  exit 1
fi
say "$new package(s) newly installed; $(( ${#PACKAGES[@]} - ${#missing[@]} )) of ${#PACKAGES[@]} were already installed"
