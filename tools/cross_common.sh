# Shared by tools/arm64_check.sh and tools/portable_check.sh (sourced, not run): build a portable
# moelite._core with cmake, lay out an import tree of symlinks for it, install missing Debian tools.
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2}

# need TOOL PACKAGE: install Debian's PACKAGE when TOOL is missing (as root), else say what to install
need() {
  command -v "$1" >/dev/null && return
  if [ "$(id -u)" = 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q "$2" >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q "$2" >/dev/null; }
  else
    echo "$(basename "$0"): $1 is missing: apt-get install $2" >&2
    exit 2
  fi
}

# portable_build DIR VARIANTS [cmake args...]: configure (once) and build _core with MOELITE_PORTABLE=ON
portable_build() {
  local dir=$1 variants=$2
  shift 2
  if [ ! -f "$root/$dir/CMakeCache.txt" ]; then
    local pyb
    pyb=$(python3 -c "import pybind11; print(pybind11.get_cmake_dir())")
    cmake -S "$root" -B "$root/$dir" -G Ninja -DCMAKE_BUILD_TYPE=Release -Dpybind11_DIR="$pyb" \
      -DMOELITE_PORTABLE=ON "-DMOELITE_CPU_VARIANTS=$variants" "$@" >"$root/$dir.configure.log" \
      || { cat "$root/$dir.configure.log"; exit 1; }
  fi
  cmake --build "$root/$dir" --target _core
}

# dev_tree BUILD_DIR OUT_DIR: OUT_DIR/moelite = the source folders + BUILD_DIR's _core and ggml/ (symlinks)
dev_tree() {
  local build=$root/$1 out=$root/$2/moelite f d
  mkdir -p "$out"
  for f in "$root"/src/moelite/*; do ln -sfn "$f" "$out/$(basename "$f")"; done
  for d in runtime cache_policies converters apps; do ln -sfn "$root/$d" "$out/$d"; done
  ln -sfn "$(ls "$build"/_core*.so)" "$out/"
  ln -sfn "$build/ggml" "$out/ggml"
}
