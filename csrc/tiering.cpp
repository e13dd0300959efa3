// Tiering on the compute side (tiering.h has the decision rule): which arena misses of a step the CPU runs
// from the RAM tier, and the cost model's numbers measured at load.
#include <algorithm>
#include <chrono>
#include <vector>

#include "graph_util.h"
#include "model.h"

namespace moelite {

// Distinct experts of this step (ids [n]) that miss the arena and that the cost model runs on the CPU.
std::vector<int32_t> Model::cpu_group(int il, const std::vector<int32_t> & ids, int n) {
    std::vector<int32_t> out;
    const Layer & L = layers_[il];
    if (!tier2_ || opt_.cpu_compute == (int) CpuCompute::NEVER) return out;
    // per-expert biases live with the dense weights: on a GPU they are not where the CPU could read them
    if (backend_ != cpu_backend_ && (L.gate_exps_b || L.up_exps_b || L.down_exps_b)) return out;
    std::vector<int> count(hp_.n_expert, 0);
    std::vector<int32_t> order;
    for (int i = 0; i < n; ++i)
        if (count[ids[i]]++ == 0) order.push_back(ids[i]);
    // reuse: the share of this layer's expert uses that found the expert in the arena
    const LayerStats st = cache_->stats(il);
    const double uses = (double) (st.hits + st.misses + cpu_experts_[il]);
    const double reuse = uses > 0 ? (double) st.hits / uses : 0.5;
    for (int32_t e : order)
        if (!cache_->resident(il, e) && run_on_cpu(costs_, (CpuCompute) opt_.cpu_compute, count[e], reuse))
            out.push_back(e);
    return out;
}

// Seconds for one expert's three matrices over n tokens on `backend` (weights from the first slot of
// layer il in pool P, which is empty: zeros), median of 3 after a warm-up.
double Model::time_expert(ggml_backend_t backend, ggml_gallocr_t galloc, const Pool & P, int slot0, int il, int n) {
    const HParams & h = hp_;
    ggml_context * ctx = begin_graph();
    ggml_cgraph * gf = ggml_new_graph_custom(ctx, kMaxNodes, false);
    ggml_tensor * x = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, h.n_embd_exp(), 1, n);
    ggml_set_input(x);
    ggml_tensor * slots = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, 1, n);
    ggml_set_input(slots);
    ggml_tensor * eids = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, 1, n);
    ggml_set_input(eids);
    Layer & L = layers_[il]; // time the matrices alone (biases may live on the other device)
    ggml_tensor * saved[3] = {L.gate_exps_b, L.up_exps_b, L.down_exps_b};
    L.gate_exps_b = L.up_exps_b = L.down_exps_b = nullptr;
    ggml_tensor * d = expert_ffn(ctx, il, P, x, slots, eids);
    L.gate_exps_b = saved[0];
    L.up_exps_b = saved[1];
    L.down_exps_b = saved[2];
    ggml_build_forward_expand(gf, d);
    compute(ctx, gf, galloc);
    std::vector<float> xv((size_t) h.n_embd_exp() * n, 0.01f);
    std::vector<int32_t> sv(n, slot0);
    set_input(x, xv.data(), ggml_nbytes(x));
    set_input(slots, sv.data(), ggml_nbytes(slots));
    std::vector<double> t;
    for (int rep = 0; rep < 4; ++rep) {
        const auto t0 = std::chrono::steady_clock::now();
        ggml_backend_graph_compute(backend, gf);
        ggml_backend_synchronize(backend);
        if (rep) t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    ggml_free(ctx);
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
}

// The cost model's numbers, measured on this machine with the first MoE layer's shapes.
void Model::measure_costs() {
    int il = 0;
    while (il < hp_.n_layer && !layers_[il].moe) ++il;
    if (il == hp_.n_layer) return;
    const Pool & P1 = cache_->pool_of(il);
    const Pool & P2 = tier2_->pool_of(il);
    const int s1 = cache_->layers()[il].base, s2 = tier2_->layers()[il].base;
    const auto & src = cache_->layers()[il].src;
    costs_.expert_bytes = (double) (src[0].nbytes + src[1].nbytes + src[2].nbytes);
    // host -> device: tier-2 slot into the (still empty) first arena slot, both zeros
    std::vector<double> t;
    for (int rep = 0; rep < 4; ++rep) {
        const auto t0 = std::chrono::steady_clock::now();
        for (int r = P1.first; r < 3; ++r) {
            const char * from = (const char *) P2.mem[r] + (uint64_t) s2 * P2.slot_bytes[r];
            ExpertCache::put_slot(P1, r, s1, from, src[r].nbytes, P2.repacked[r]); // as copy_from_tier2 does
        }
        ggml_backend_synchronize(backend_);
        if (rep) t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    std::sort(t.begin(), t.end());
    costs_.h2d_bytes_per_s = costs_.expert_bytes / std::max(t[t.size() / 2], 1e-9);
    const int nb = 32; // fixed part and per-token slope from 1 and nb tokens
    const double c1 = time_expert(cpu_backend_, galloc_cpu_, P2, s2, il, 1);
    const double cn = time_expert(cpu_backend_, galloc_cpu_, P2, s2, il, nb);
    const double g1 = time_expert(backend_, galloc_, P1, s1, il, 1);
    const double gn = time_expert(backend_, galloc_, P1, s1, il, nb);
    costs_.cpu_per_token_s = std::max(0.0, (cn - c1) / (nb - 1));
    costs_.cpu_fixed_s = std::max(0.0, c1 - costs_.cpu_per_token_s);
    costs_.gpu_per_token_s = std::max(0.0, (gn - g1) / (nb - 1));
    costs_.gpu_fixed_s = std::max(0.0, g1 - costs_.gpu_per_token_s);
}

} // namespace moelite
