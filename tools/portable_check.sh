#!/usr/bin/env bash
# A portable x86-64 wheel (MOELITE_PORTABLE: ggml's CPU backend built per SIMD level, one picked at import
# time; docs/ARM64.md) on a CPU without AVX-512. Builds the wheel with pip (scikit-build-core, as
# cibuildwheel does), installs it into build/portable-wheel/site, and runs the demo model from it
# (tools/arm64_check.py): natively (the reference), with each variant forced (MOELITE_CPU_VARIANT), and under
# qemu-x86_64-static with an emulated Haswell (SSE4.2, AVX2, FMA, F16C; no AVX-512), where it must pick the
# haswell variant, not die with SIGILL, and give the same greedy tokens, and logits within tolerance. The
# control: the native (-march=native) build of tools/dev_build.sh, if there is one, on the same emulated
# CPU (it dies with SIGILL where this machine has AVX-512: what the portable build is for).
# Usage: tools/portable_check.sh     (with the dev venv active: it has scikit-build-core and pybind11)
# Env: MOELITE_CPU_VARIANTS (default x64;haswell;skylakex; empty for all of ggml's), QEMU_X86_CPU (Haswell).
set -euo pipefail
source "$(dirname "$0")/cross_common.sh"
cd "$root"
variants=${MOELITE_CPU_VARIANTS-"x64;haswell;skylakex"}
qcpu=${QEMU_X86_CPU:-Haswell}
out=build/portable-out
wheel=build/portable-wheel
mkdir -p "$out"
need qemu-x86_64-static qemu-user-static

rm -rf "$wheel"
python3 -m pip wheel -q . --no-deps --no-build-isolation -w "$wheel" -C build-dir=build/portable \
  -C cmake.define.MOELITE_PORTABLE=ON -C "cmake.define.MOELITE_CPU_VARIANTS=$variants"
python3 -m pip install -q --no-deps --target "$wheel/site" "$wheel"/moelite-*.whl
echo "wheel: $(ls "$wheel"/moelite-*.whl); CPU variants: $(ls "$wheel/site/moelite/ggml" | tr '\n' ' ')"
export PYTHONPATH=$wheel/site
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
MOELITE_PORTABLE_TREE=$wheel/site python3 -m pytest -q -p no:cacheprovider tests/test_cpu_backend.py

if ls build/dev/moelite/_core*.so >/dev/null 2>&1; then
  echo "--- control: the native build (build/dev) under qemu-x86_64-static -cpu $qcpu"
  set +e
  QEMU_CPU=$qcpu PYTHONPATH=build/dev qemu-x86_64-static "$(command -v python3)" -c \
    "import moelite; print(moelite.load(n_threads=1).generate('Once upon a time', max_tokens=4))" 2>/dev/null
  rc=$?
  set -e
  echo "native build on $qcpu: exit status $rc$( [ $rc = 132 ] && echo ' (SIGILL)')"
fi
