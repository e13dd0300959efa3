#!/usr/bin/env bash
# moelite on aarch64, checked on this x86-64 machine under emulation (docs/ARM64.md):
#  1. an arm64 Debian tree with python3, numpy, psutil, jinja2 (mmdebstrap) + the tokenizers aarch64 wheel;
#  2. moelite._core cross-compiled with g++-aarch64-linux-gnu, portable: ggml's CPU backend as the variants
#     armv8.0_1 (NEON), armv8.2_2 (+dotprod, fp16) and armv8.6_1 (+SVE, i8mm), picked at import time;
#  3. the demo model run by the arm64 Python under qemu-aarch64-static on three emulated CPUs (cortex-a53:
#     NEON only; cortex-a76: dotprod; max: SVE, i8mm, ...), each checked for offloaded == resident bit for
#     bit, then compared with the x86-64 run of the same sources (tools/arm64_check.py).
# Usage: tools/arm64_check.sh [QEMU_CPU ...]     (with the venv active; default CPUs: cortex-a53 cortex-a76 max)
# Env: MOELITE_ARM64_ROOT (the arm64 tree, about 180 MB; default build/arm64-root), MOELITE_DEBIAN_MIRROR (the
# Debian archive it is made from; default: the one this machine's apt sources name for bookworm).
set -euo pipefail
source "$(dirname "$0")/cross_common.sh"
cd "$root"
rootfs=$(realpath -m "${MOELITE_ARM64_ROOT:-build/arm64-root}")
suite=bookworm # its python3.11 is the host's
cpus=("$@")
[ ${#cpus[@]} -gt 0 ] || cpus=(cortex-a53 cortex-a76 max)
out=build/arm64-out
mkdir -p "$out"

need aarch64-linux-gnu-g++ g++-aarch64-linux-gnu
need qemu-aarch64-static qemu-user-static
need mmdebstrap mmdebstrap

# apt_mirror SUITE: the archive URI this machine's apt sources give for SUITE, from one-line entries
# (/etc/apt/sources.list, sources.list.d/*.list: `deb [options] URI SUITE COMPONENT...`) or deb822 stanzas
# (sources.list.d/*.sources: Types / URIs / Suites / Enabled fields); the first that names SUITE
apt_mirror() {
  local f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    awk -v s="$1" '$1 == "deb" { i = 2; if ($i ~ /^\[/) { while ($i !~ /\]$/ && i < NF) i++; i++ }
                                 for (j = i + 1; j <= NF; j++) if ($j == s) { print $i; exit } }' "$f"
  done
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk -v s="$1" 'BEGIN { RS = ""; FS = "\n" }
      { types = uris = suites = ""; on = 1
        for (k = 1; k <= NF; k++) {
          if ($k ~ /^#/) continue
          split($k, kv, ":"); key = tolower(kv[1]); val = substr($k, length(kv[1]) + 2)
          if (key == "types") types = " " val " "; else if (key == "uris") uris = val
          else if (key == "suites") suites = " " val " "; else if (key == "enabled" && val ~ /no/) on = 0
        }
        if (on && types ~ / deb / && suites ~ (" " s " ")) { split(uris, u, " "); print u[1]; exit } }' "$f"
  done
}

if [ ! -x "$rootfs/usr/bin/python3" ]; then
  mirror=${MOELITE_DEBIAN_MIRROR:-$(apt_mirror "$suite" | head -n 1)}
  if [ -z "$mirror" ]; then
    echo "$(basename "$0"): no apt source for Debian $suite in /etc/apt/sources.list{,.d}: set MOELITE_DEBIAN_MIRROR" >&2
    exit 2
  fi
  # extract only (no maintainer scripts: nothing runs under emulation)
  mmdebstrap --arch=arm64 --variant=extract \
    --include=python3,python3-numpy,python3-psutil,python3-jinja2,libpython3.11-dev,libstdc++6 \
    "$suite" "$rootfs" "$mirror"
  # what update-alternatives would have made for numpy
  ln -sfn blas/libblas.so.3 "$rootfs/usr/lib/aarch64-linux-gnu/libblas.so.3"
  ln -sfn lapack/liblapack.so.3 "$rootfs/usr/lib/aarch64-linux-gnu/liblapack.so.3"
  python3 -m pip install -q --target "$rootfs/usr/local/lib/python3.11/dist-packages" --no-deps \
    --platform manylinux2014_aarch64 --python-version 3.11 --only-binary=:all: tokenizers
fi

portable_build build/arm64 "armv8.0_1;armv8.2_2;armv8.6_1" \
  -DCMAKE_TOOLCHAIN_FILE="$root/cmake/aarch64-linux-gnu.cmake" -DMOELITE_ARM64_ROOT="$rootfs"
dev_tree build/arm64 build/arm64-dev

# the x86-64 reference: the same sources, portable build, the best variant for this CPU
portable_build build/portable "x64;haswell;skylakex"
dev_tree build/portable build/portable-dev
PYTHONPATH=build/portable-dev python3 tools/arm64_check.py dump "$out/x86_64.npz"

runs=()
for cpu in "${cpus[@]}"; do
  echo "--- aarch64, qemu-aarch64-static -cpu $cpu"
  QEMU_CPU=$cpu PYTHONPATH=build/arm64-dev qemu-aarch64-static -L "$rootfs" "$rootfs/usr/bin/python3" \
    tools/arm64_check.py dump "$out/aarch64-$cpu.npz"
  runs+=("$out/aarch64-$cpu.npz")
done
python3 tools/arm64_check.py compare "$out/x86_64.npz" "${runs[@]}"
