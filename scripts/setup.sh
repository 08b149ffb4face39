#!/usr/bin/env bash
# Installs everything napari-omicsimage needs on a fresh Debian/Ubuntu machine with Python >= 3.11:
# the X server and GL libraries Qt 6 needs (napari, GUI tests), torch + torchvision, and the package
# itself with its test extras. Safe to run again: what is present is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

need_apt=0
for lib in /usr/bin/Xvfb /usr/bin/xauth; do [ -e "$lib" ] || need_apt=1; done
ldconfig -p | grep -q libxkbcommon-x11 || need_apt=1
ldconfig -p | grep -q libxcb-cursor || need_apt=1
ldconfig -p | grep -q libEGL.so.1 || need_apt=1
if [ "$need_apt" = 1 ]; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  # Xvfb + Mesa give Qt 6 a real X server and OpenGL without a screen (offscreen Qt crashes napari's canvas).
  $SUDO apt-get install -y -qq --no-install-recommends \
    xvfb xauth libgl1 libgl1-mesa-dri libegl1 libglx-mesa0 libxkbcommon-x11-0 libxkbcommon0 \
    libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0 \
    libxcb-xfixes0 libxcb-shape0 libxcb-cursor0 libxcb-xkb1 libdbus-1-3 libfontconfig1 fonts-dejavu-core \
    > /dev/null
fi

# torch and torchvision first, as a matching pair (other pairs fail to import torchvision here).
$PYTHON -m pip install -q torch==2.14.1 torchvision==0.29.1
$PYTHON -m pip install -q -e ".[testing,benchmarks]"
