// Two-tier expert placement for a discrete GPU: VRAM slots (tier 1, the ExpertCache the graphs read),
// host RAM slots (tier 2, pinned on CUDA), the GGUF file (tier 3).
//
// A routed expert missing from VRAM is either copied host -> device and run by the GPU, or run where it
// already is, by the CPU backend from its RAM slot (Fiddler / ktransformers style). The choice is made
// per expert and per layer step by comparing measured times (CostModel, measured once at load):
//
//   copy:  bytes / h2d_bytes_per_s + gpu(n)                  the expert then stays in VRAM, so a later
//          - reuse * (cpu(1) - gpu(1))                        use (probability `reuse`) is cheaper
//   cpu:   cpu(n)
//
// with cpu(n) = cpu_fixed_s + n * cpu_per_token_s and gpu(n) likewise: the time to run one expert's
// three matrices for n tokens (fixed part: streaming the weights once; per token: the flops). `reuse` is
// the layer's VRAM hit rate so far: an expert copied in is used again about as often as the layer hits.
// Everything here is plain arithmetic, unit-tested on the CPU (tests/test_tiering.py).
#pragma once

namespace moelite {

struct CostModel {
    double h2d_bytes_per_s = 0.0;                    // measured host -> device copy rate (pinned); 0: unknown
    double cpu_fixed_s = 0.0, cpu_per_token_s = 0.0; // one expert on the CPU backend
    double gpu_fixed_s = 0.0, gpu_per_token_s = 0.0; // one expert on the device backend
    double expert_bytes = 0.0;                       // bytes copied per expert (gate + up + down)
    bool valid() const { return h2d_bytes_per_s > 0.0 && expert_bytes > 0.0; }
};

enum class CpuCompute : int { NEVER = 0, AUTO = 1, ALWAYS = 2 };

// Seconds to copy the expert and run it on the device for n tokens, net of the expected later savings.
inline double copy_cost(const CostModel & c, int n, double reuse) {
    const double cpu1 = c.cpu_fixed_s + c.cpu_per_token_s, gpu1 = c.gpu_fixed_s + c.gpu_per_token_s;
    const double saving = cpu1 > gpu1 ? reuse * (cpu1 - gpu1) : 0.0;
    return c.expert_bytes / c.h2d_bytes_per_s + c.gpu_fixed_s + n * c.gpu_per_token_s - saving;
}

inline double cpu_cost(const CostModel & c, int n) { return c.cpu_fixed_s + n * c.cpu_per_token_s; }

// Should the CPU run this VRAM-missing expert (routed to n tokens of this step) from its RAM slot?
inline bool run_on_cpu(const CostModel & c, CpuCompute mode, int n, double reuse) {
    if (mode == CpuCompute::ALWAYS) return true;
    if (mode == CpuCompute::NEVER || !c.valid()) return false;
    return cpu_cost(c, n) < copy_cost(c, n, reuse);
}

} // namespace moelite
