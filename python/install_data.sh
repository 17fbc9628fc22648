#!/usr/bin/env bash
# Installs the offline data the training app uses, from Debian packages:
#   - CJK font packages: glyph classes are rendered from them at run time (python/xbm_data.py);
#   - dataset-fashion-mnist: Fashion-MNIST as gzipped IDX files.
# scikit-learn's digits ship with scikit-learn and need nothing here.
# Skips with a message (exit 0) when not root or when apt-get is missing.
set -u

PACKAGES=(
  fonts-ipafont-gothic fonts-ipafont-mincho fonts-ipaexfont-gothic fonts-ipaexfont-mincho
  fonts-takao-gothic fonts-takao-mincho fonts-vlgothic fonts-horai-umefont fonts-umeplus
  fonts-konatu fonts-mona fonts-monapo fonts-motoya-l-cedar fonts-motoya-l-maruberi
  fonts-misaki fonts-hanazono fonts-droid-fallback
  fonts-arphic-ukai fonts-arphic-uming fonts-arphic-bkai00mp fonts-arphic-bsmi00lp
  fonts-arphic-gbsn00lp fonts-arphic-gkai00mp
  fonts-cwtex-fs fonts-cwtex-heib fonts-cwtex-kai fonts-cwtex-ming fonts-cwtex-yen
  fonts-wqy-zenhei fonts-wqy-microhei
  dataset-fashion-mnist
)

if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_data.sh: apt-get not found; skipping (install the font packages and dataset-fashion-mnist by hand)"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install_data.sh: not root; skipping (run as root: apt-get install ${PACKAGES[*]})"
  exit 0
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -q || { echo "install_data.sh: apt-get update failed; skipping"; exit 0; }
# Install what this Debian release has; a package missing from it is reported, not fatal.
available=()
for p in "${PACKAGES[@]}"; do
  if apt-cache show "$p" >/dev/null 2>&1; then available+=("$p"); else echo "install_data.sh: no package $p here"; fi
done
# What apt newly installs is counted from dpkg's status before and after, not from the list.
installed() { dpkg-query -W -f='${Status}\n' "$1" 2>/dev/null | grep -q "install ok installed"; }
before=()
for p in "${available[@]}"; do installed "$p" && before+=("$p"); done
if ! apt-get install -y -q --no-install-recommends "${available[@]}"; then
  echo "install_data.sh: apt-get install failed; the glyph and Fashion-MNIST sets may be incomplete"
  exit 0
fi
new=()
for p in "${available[@]}"; do
  if installed "$p" && [[ " ${before[*]} " != *" $p "* ]]; then new+=("$p"); fi
done
echo "install_data.sh: ${#new[@]} package(s) newly installed${new:+: ${new[*]}}; ${#before[@]} of ${#available[@]} were already installed"
