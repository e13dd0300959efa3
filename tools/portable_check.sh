#!/usr/bin/env bash
# A portable x86-64 moelite._core (MOELITE_PORTABLE: ggml's CPU backend built per SIMD level, one picked at
# import time; docs/ARM64.md) on a CPU without AVX-512: the demo model run under qemu-x86_64-static with an
# emulated Haswell (SSE4.2, AVX2, FMA, F16C; no AVX-512) must pick the haswell variant, not die with
# SIGILL, and give this machine's greedy tokens and logits (tools/arm64_check.py compare). Each variant is
# also forced on this machine (MOELITE_CPU_VARIANT). The control: the native (-march=native) build of
# tools/dev_build.sh, if there is one, run on the same emulated CPU (it dies with SIGILL where this machine
# has AVX-512: what the portable build is for).
# Usage: tools/portable_check.sh     (with the venv active)
# Env: MOELITE_CPU_VARIANTS (default x64;haswell;skylakex; empty for all of ggml's), QEMU_X86_CPU (Haswell).
set -euo pipefail
source "$(dirname "$0")/cross_common.sh"
cd "$root"
variants=${MOELITE_CPU_VARIANTS-"x64;haswell;skylakex"}
qcpu=${QEMU_X86_CPU:-Haswell}
out=build/portable-out
mkdir -p "$out"
need qemu-x86_64-static qemu-user-static

portable_build build/portable "$variants"
dev_tree build/portable build/portable-dev
export PYTHONPATH=build/portable-dev
python3 tools/arm64_check.py dump "$out/x86_64.npz"
runs=()
for v in $(python3 -c "from moelite import _cpu; print(' '.join(_cpu.variants()))"); do
  echo "--- MOELITE_CPU_VARIANT=$v"
  if MOELITE_CPU_VARIANT=$v python3 tools/arm64_check.py dump "$out/forced-$v.npz"; then
    runs+=("$out/forced-$v.npz")
  fi
done
echo "--- qemu-x86_64-static -cpu $qcpu"
QEMU_CPU=$qcpu qemu-x86_64-static "$(command -v python3)" tools/arm64_check.py dump "$out/qemu-$qcpu.npz" \
  2> >(grep -v "TCG doesn't support requested feature" >&2)      # pcid, x2apic, TSX: not emulated, not used
runs+=("$out/qemu-$qcpu.npz")
python3 tools/arm64_check.py compare "$out/x86_64.npz" "${runs[@]}"

if ls build/dev/moelite/_core*.so >/dev/null 2>&1; then
  echo "--- control: the native build (build/dev) under qemu-x86_64-static -cpu $qcpu"
  set +e
  QEMU_CPU=$qcpu PYTHONPATH=build/dev qemu-x86_64-static "$(command -v python3)" -c \
    "import moelite; print(moelite.load(n_threads=1).generate('Once upon a time', max_tokens=4))" 2>/dev/null
  rc=$?
  set -e
  echo "native build on $qcpu: exit status $rc$( [ $rc = 132 ] && echo ' (SIGILL)')"
fi
