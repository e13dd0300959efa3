#!/usr/bin/env bash
# Developer build: compile moelite._core with cmake into build/dev-cmake (incremental), and lay out an
# import tree in build/dev/moelite made of symlinks to the source folders, so that
#   PYTHONPATH=build/dev python -c "import moelite"
# sees source edits at once. CI and users install with `pip install .` instead.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2}
pyb=$(python3 -c "import pybind11; print(pybind11.get_cmake_dir())")
if [ ! -f build/dev-cmake/CMakeCache.txt ]; then
  cmake -S . -B build/dev-cmake -G Ninja -DCMAKE_BUILD_TYPE=Release -Dpybind11_DIR="$pyb" "$@"
fi
cmake --build build/dev-cmake --target _core
mkdir -p build/dev/moelite
for f in src/moelite/*; do ln -sfn "$root/$f" "build/dev/moelite/$(basename "$f")"; done
for d in runtime cache_policies converters apps; do ln -sfn "$root/$d" "build/dev/moelite/$d"; done
ln -sfn "$(ls "$root"/build/dev-cmake/_core*.so)" build/dev/moelite/
echo "dev tree ready: export PYTHONPATH=$root/build/dev"
