# Cross-compile moelite._core for aarch64 Linux with Debian's gcc-aarch64-linux-gnu / g++-aarch64-linux-gnu.
#
#   cmake -S . -B build/arm64 -G Ninja -DCMAKE_TOOLCHAIN_FILE=cmake/aarch64-linux-gnu.cmake \
#         -DMOELITE_ARM64_ROOT=build/arm64-root -Dpybind11_DIR=$(python -c "import pybind11; print(pybind11.get_cmake_dir())")
#
# MOELITE_ARM64_ROOT is an arm64 Debian tree (tools/arm64_check.sh makes one with mmdebstrap) that holds the
# target Python's headers (libpython3.11-dev): the extension is built for that Python, and its suffix is taken
# from it. The host Python still runs the configure-time helpers (cmake/fetch_ggml.py). The tree is, first found:
# -DMOELITE_ARM64_ROOT, the environment's MOELITE_ARM64_ROOT, build/arm64-root of this source tree.
# tools/arm64_check.sh runs the result under qemu-aarch64-static; see docs/ARM64.md.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)

if(NOT MOELITE_ARM64_ROOT)
    if(DEFINED ENV{MOELITE_ARM64_ROOT} AND NOT "$ENV{MOELITE_ARM64_ROOT}" STREQUAL "")
        set(MOELITE_ARM64_ROOT "$ENV{MOELITE_ARM64_ROOT}")
    else()
        get_filename_component(MOELITE_ARM64_ROOT "${CMAKE_CURRENT_LIST_DIR}/../build/arm64-root" ABSOLUTE)
    endif()
endif()
set(MOELITE_ARM64_ROOT "${MOELITE_ARM64_ROOT}" CACHE PATH "an arm64 Debian tree with python3 and libpython3-dev")
# try_compile() (CMake's compiler checks) configures a project of its own that re-reads this file without the
# cache: the root must reach it, or it looks in the default tree
list(APPEND CMAKE_TRY_COMPILE_PLATFORM_VARIABLES MOELITE_ARM64_ROOT)
# try_run() checks (none are needed by moelite's options, but keep them runnable) go through qemu
set(CMAKE_CROSSCOMPILING_EMULATOR qemu-aarch64-static -L "${MOELITE_ARM64_ROOT}")

set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu "${MOELITE_ARM64_ROOT}")
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)      # programs (python for fetch_ggml.py) are the host's
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE BOTH)       # pybind11's config files are the host's (header-only)

# the target Python: its headers and extension suffix, not the host interpreter's
file(GLOB _moelite_pyinc LIST_DIRECTORIES true "${MOELITE_ARM64_ROOT}/usr/include/python3.*")
if(NOT _moelite_pyinc)
    message(FATAL_ERROR "${MOELITE_ARM64_ROOT}: no usr/include/python3.* (an arm64 tree with libpython3-dev is needed; "
                        "tools/arm64_check.sh --setup makes one)")
endif()
list(GET _moelite_pyinc 0 _moelite_pyinc)
string(REGEX MATCH "python3\\.[0-9]+$" _moelite_pyver "${_moelite_pyinc}")
string(REPLACE "python3." "" _moelite_pyminor "${_moelite_pyver}")
set(Python_INCLUDE_DIR "${_moelite_pyinc}" CACHE PATH "the target Python's headers")
# Debian's pyconfig.h includes <aarch64-linux-gnu/python3.X/pyconfig.h>: searched after the cross
# toolchain's own headers, so the tree's libc headers never shadow them
set(CMAKE_CXX_FLAGS_INIT "-idirafter ${MOELITE_ARM64_ROOT}/usr/include")
set(PYTHON_MODULE_EXTENSION ".cpython-3${_moelite_pyminor}-aarch64-linux-gnu.so" CACHE STRING "the target's extension suffix")
