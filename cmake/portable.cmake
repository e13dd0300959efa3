# MOELITE_PORTABLE: ggml's CPU backend as one shared library per SIMD level (GGML_CPU_ALL_VARIANTS with
# GGML_BACKEND_DL), installed beside _core in moelite/ggml/ with libggml-base.so.
#
# moelite's C++ core calls the CPU backend's API directly (ggml_backend_cpu_init, its threadpool, ...), which
# ggml's dynamic-backend registry does not offer. So _core is linked against libggml-base.so only and leaves
# the CPU backend's symbols undefined (an ELF shared object may): at import time moelite/_cpu.py asks each
# variant's ggml_backend_score() (ggml's own CPUID/HWCAP check, compiled without the variant's flags), loads
# the best one RTLD_GLOBAL, and the dynamic linker binds _core's undefined symbols to it when Python loads
# _core (RTLD_NOW: a missing one fails the import, never a later call). _core names no libggml-cpu file, so
# auditwheel/delocate have nothing to look for.

include(CheckCSourceCompiles)

# can this compiler take the variant's flags? (g++ 12 knows no -march=armv9.2-a, so no armv9.2_* there)
function(moelite_compiler_builds variant out)
    get_target_property(opts ggml-cpu-${variant} COMPILE_OPTIONS)
    set(flags "")
    foreach(opt IN LISTS opts)
        if(opt MATCHES "^-m")
            string(APPEND flags " ${opt}")
        endif()
    endforeach()
    string(MAKE_C_IDENTIFIER "MOELITE_CC_BUILDS_${variant}" var)
    set(CMAKE_REQUIRED_FLAGS "${flags}")
    set(CMAKE_REQUIRED_QUIET ON)
    check_c_source_compiles("int main(void) { return 0; }" ${var})
    set(${out} ${${var}} PARENT_SCOPE)
endfunction()

# the variants to build: MOELITE_CPU_VARIANTS, else all of ggml's for the target that the compiler can build
function(moelite_cpu_variants out)
    set(all "")
    set(usable "")
    foreach(lib IN LISTS GGML_AVAILABLE_BACKENDS)       # ggml lists them lowest level first
        if(NOT lib MATCHES "^ggml-cpu-(.+)$")
            continue()
        endif()
        set(v "${CMAKE_MATCH_1}")
        list(APPEND all "${v}")
        moelite_compiler_builds("${v}" ok)
        if(ok)
            list(APPEND usable "${v}")
        else()
            message(STATUS "moelite: ${CMAKE_C_COMPILER_ID} ${CMAKE_C_COMPILER_VERSION} cannot build the CPU variant "
                           "${v} (its flags are unknown to it): left out")
        endif()
    endforeach()
    if(NOT MOELITE_CPU_VARIANTS)
        set(${out} "${usable}" PARENT_SCOPE)
        return()
    endif()
    foreach(v IN LISTS MOELITE_CPU_VARIANTS)
        if(NOT v IN_LIST all)
            message(FATAL_ERROR "MOELITE_CPU_VARIANTS: ggml has no CPU variant '${v}' for ${CMAKE_SYSTEM_PROCESSOR}; "
                                "it has: ${all}")
        elseif(NOT v IN_LIST usable)
            message(FATAL_ERROR "MOELITE_CPU_VARIANTS: ${CMAKE_C_COMPILER} cannot build the CPU variant '${v}'; "
                                "it can build: ${usable}")
        endif()
    endforeach()
    set(${out} "${MOELITE_CPU_VARIANTS}" PARENT_SCOPE)
endfunction()

function(moelite_link_cpu_variants target)
    moelite_cpu_variants(variants)
    message(STATUS "moelite: portable CPU backend, variants ${variants}")
    set(libs ggml-base)
    foreach(v IN LISTS variants)
        set_target_properties(ggml-cpu-${v} PROPERTIES BUILD_RPATH "$ORIGIN" INSTALL_RPATH "$ORIGIN")
        add_dependencies(${target} ggml-cpu-${v})
        list(APPEND libs ggml-cpu-${v})
    endforeach()
    # one file per library in a wheel (zip keeps no symlinks): libggml-base.so, no versioned names
    set_property(TARGET ggml-base PROPERTY VERSION)
    set_property(TARGET ggml-base PROPERTY SOVERSION)
    target_link_libraries(${target} PRIVATE ggml-base)
    set_target_properties(${target} PROPERTIES BUILD_RPATH "$ORIGIN/ggml" INSTALL_RPATH "$ORIGIN/ggml")
    target_compile_definitions(${target} PRIVATE MOELITE_PORTABLE=1)
    install(TARGETS ${libs} LIBRARY DESTINATION moelite/ggml)
endfunction()
