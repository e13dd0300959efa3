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

function(moelite_cpu_variants out)
    set(all "")
    foreach(lib IN LISTS GGML_AVAILABLE_BACKENDS)       # ggml lists them lowest level first
        if(lib MATCHES "^ggml-cpu-(.+)$")
            list(APPEND all "${CMAKE_MATCH_1}")
        endif()
    endforeach()
    if(NOT MOELITE_CPU_VARIANTS)
        set(${out} "${all}" PARENT_SCOPE)
        return()
    endif()
    foreach(v IN LISTS MOELITE_CPU_VARIANTS)
        if(NOT v IN_LIST all)
            message(FATAL_ERROR "MOELITE_CPU_VARIANTS: ggml has no CPU variant '${v}' for ${CMAKE_SYSTEM_PROCESSOR}; "
                                "it has: ${all}")
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
