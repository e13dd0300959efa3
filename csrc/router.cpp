// Host-side routing: router logits [n_expert, T] -> per token the top-k expert ids (descending selection
// score) and their combine weights. Gating functions: softmax (+ optional selection bias, groups), sigmoid
// (DeepSeek-V3 style: bias, groups, renormalisation, scale), softmax over the selected top-k (gpt-oss) and
// PhiMoE's sparsemixer. The ids go to the expert cache, the weights into graph B.
#include <algorithm>
#include <cmath>
#include <numeric>

#include "common.h"
#include "model.h"

namespace moelite {

// Cache-aware routing of one token: each chosen id[j] that is not resident is replaced by the resident, unchosen,
// selectable (sel > -inf) expert of highest probability p when p[r] >= (1 - swap_threshold) * p[id[j]]; the
// result stays in descending selection-score order. The weights are then the substitutes' own probabilities.
void Model::swap_for_resident(int il, const std::vector<char> & resident, const std::vector<float> & p,
                              const std::vector<float> & sel, int32_t * id, int K) {
    const int E = (int) p.size();
    std::vector<char> chosen(E, 0);
    for (int j = 0; j < K; ++j) chosen[id[j]] = 1;
    bool changed = false;
    for (int j = 0; j < K; ++j) {
        if (resident[id[j]]) continue;
        const float floor = (1.f - opt_.swap_threshold) * p[id[j]];
        int best = -1;
        for (int e = 0; e < E; ++e)
            if (resident[e] && !chosen[e] && sel[e] != -INFINITY && p[e] >= floor && (best < 0 || p[e] > p[best]))
                best = e;
        if (best < 0) continue;
        chosen[id[j]] = 0;
        chosen[best] = 1;
        id[j] = best;
        swaps_[il]++;
        changed = true;
    }
    if (changed) std::sort(id, id + K, [&](int a, int b) { return sel[a] > sel[b] || (sel[a] == sel[b] && a < b); });
}

// Routing of layer il for T tokens from router logits in logits_src [n_expert, >= T]:
// ids/w [T * k], ids in descending selection-score order.
void Model::route(int il, ggml_tensor * logits_src, int T, std::vector<int32_t> & ids, std::vector<float> & w,
                  std::vector<float> * score, bool swap) {
    std::vector<float> logits((size_t) hp_.n_expert * T);
    ggml_backend_tensor_get(logits_src, logits.data(), 0, logits.size() * sizeof(float));
    route_host(il, logits.data(), T, ids, w, score, swap);
}

// The same from logits [n_expert, T] in host memory (the fused graph's routing op reads them in place).
void Model::route_host(int il, const float * logits, int T, std::vector<int32_t> & ids, std::vector<float> & w,
                       std::vector<float> * score, bool swap) {
    const HParams & h = hp_;
    const int E = h.n_expert, K = h.n_expert_used;
    ids.resize((size_t) T * K);
    w.resize((size_t) T * K);
    if (score) score->resize((size_t) T * K);
    std::vector<float> p(E), sel(E);
    std::vector<int> order(E);
    const std::vector<float> & bias = layers_[il].exp_probs_b;
    const std::vector<float> & escale = layers_[il].exp_scale;
    for (size_t i = 0, n = (size_t) E * T; i < n; ++i) // NaN would break the ordering the top-k sort relies on
        if (!std::isfinite(logits[i]))
            throw FormatError("layer " + std::to_string(il) + ": router logits are NaN or Inf (blk." +
                              std::to_string(il) + ".ffn_gate_inp.weight or the layer's input hold NaN/Inf)");
    // cache-aware routing: which experts are resident (held or on their way) when this layer is routed
    std::vector<char> resident;
    if (swap && opt_.swap_threshold > 0.f && cache_ && cache_->has_layer(il) && cache_->quota(il) < E) {
        resident.resize(E);
        for (int e = 0; e < E; ++e) resident[e] = cache_->resident(il, e);
    }
    for (int t = 0; t < T; ++t) {
        const float * z = &logits[(size_t) t * E];
        int32_t * id = &ids[(size_t) t * K];
        float * wt = &w[(size_t) t * K];
        auto topk_by = [&](const std::vector<float> & s) { // stable: ties to the lower expert id
            std::iota(order.begin(), order.end(), 0);
            std::partial_sort(order.begin(), order.begin() + K, order.end(),
                              [&](int a, int b) { return s[a] > s[b] || (s[a] == s[b] && a < b); });
            for (int j = 0; j < K; ++j) id[j] = order[j];
        };
        auto softmax = [&](const float * in, float * out, int n) {
            float m = -INFINITY;
            for (int i = 0; i < n; ++i) m = std::max(m, in[i]);
            double s = 0;
            for (int i = 0; i < n; ++i) {
                out[i] = std::exp(in[i] - m);
                s += out[i];
            }
            for (int i = 0; i < n; ++i) out[i] = (float) (out[i] / s);
        };
        if (h.gating == GATING_SPARSEMIXER) {
            // PhiMoE inference routing (top-2): pick the max, mask logits far below it, softmax; repeat without it
            std::vector<float> masked(z, z + E);
            for (int j = 0; j < K; ++j) {
                int best = 0;
                for (int e = 1; e < E; ++e)
                    if (masked[e] > masked[best]) best = e;
                const float thr = masked[best];
                std::vector<float> g(E);
                for (int e = 0; e < E; ++e) {
                    const float factor = std::max(std::fabs(z[e]), thr);
                    g[e] = ((thr - z[e]) / factor > 2 * h.jitter_eps) ? -INFINITY : masked[e];
                }
                softmax(g.data(), p.data(), E);
                id[j] = best;
                wt[j] = p[best];
                if (score) (*score)[(size_t) t * K + j] = z[best];
                masked[best] = -INFINITY;
            }
            continue;
        }
        if (h.gating == GATING_SOFTMAX_WEIGHT) { // gpt-oss: top-k of logits, softmax over them
            sel.assign(z, z + E);
            topk_by(sel);
            float zz[64];
            for (int j = 0; j < K; ++j) zz[j] = z[id[j]];
            softmax(zz, wt, K);
            if (score)
                for (int j = 0; j < K; ++j) (*score)[(size_t) t * K + j] = zz[j];
        } else {
            if (h.gating == GATING_SIGMOID)
                for (int e = 0; e < E; ++e) p[e] = 1.f / (1.f + std::exp(-z[e]));
            else
                softmax(z, p.data(), E);
            for (int e = 0; e < E; ++e) sel[e] = p[e] + (bias.empty() ? 0.f : bias[e]);
            if (h.n_group > 1 && h.topk_group < h.n_group) {
                // group-limited routing: keep the topk_group groups with the best score (sum of top-2 with
                // sigmoid scoring as DeepSeek-V3 and with softmax as Mistral-4, max with softmax as DeepSeek-V2)
                const int gs = E / h.n_group;
                std::vector<std::pair<float, int>> gscore(h.n_group);
                for (int g = 0; g < h.n_group; ++g) {
                    std::vector<float> v(sel.begin() + g * gs, sel.begin() + (g + 1) * gs);
                    std::sort(v.begin(), v.end(), std::greater<float>());
                    gscore[g] = {h.gating == GATING_SIGMOID || h.group_top2 ? v[0] + (gs > 1 ? v[1] : 0.f) : v[0], g};
                }
                std::stable_sort(gscore.begin(), gscore.end(), [](auto & a, auto & b) { return a.first > b.first; });
                std::vector<char> keep(h.n_group, 0);
                for (int g = 0; g < h.topk_group; ++g) keep[gscore[g].second] = 1;
                for (int e = 0; e < E; ++e)
                    if (!keep[e / gs]) sel[e] = -INFINITY;
            }
            topk_by(sel);
            if (!resident.empty()) swap_for_resident(il, resident, p, sel, id, K);
            if (score)
                for (int j = 0; j < K; ++j) (*score)[(size_t) t * K + j] = sel[id[j]];
            double s = 0;
            for (int j = 0; j < K; ++j) {
                wt[j] = p[id[j]];
                s += wt[j];
            }
            if (h.weights_norm)
                for (int j = 0; j < K; ++j) wt[j] = (float) (wt[j] / (s + (h.gating == GATING_SIGMOID ? 1e-20 : 0.0)));
        }
        for (int j = 0; j < K; ++j) wt[j] *= h.weights_scale;
        if (!escale.empty())
            for (int j = 0; j < K; ++j) wt[j] *= escale[id[j]]; // Gemma-4 per-expert scale
    }
}

} // namespace moelite
