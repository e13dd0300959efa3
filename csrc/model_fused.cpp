// The fused step: one ggml graph per ubatch when the whole step can be one (fused_ok(): CPU device, every expert
// resident, no recurrent layer, no routing trace). The per-layer step (model.cpp) stops at every MoE layer: graph A
// ends with the router logits, the host routes, the expert cache maps ids to slots, graph B runs the experts. With
// every expert resident the slot of an expert never changes, so routing can run inside the graph: a ggml custom op
// calls route_host() on the router logits in place and writes the slots. The builders, the ops, their order and
// their inputs are those of the per-layer graphs: the result is bit-identical (tests/test_fused.py), in 1 graph per
// step instead of 2 per MoE layer + 1 per dense layer + 2 (each graph costs a thread-pool wake-up, a barrier per op
// and an allocation pass: on a small model that is most of a decode step).
//
//   tokens [T] -> get_rows -> x [n_embd, T]
//   layer il: layer_front -> dense: x = its output
//                         -> MoE: router logits -> op_route -> slots [K, T] -> op_weights -> [1, K, T]
//                                 (-> op_expert_ids [K, T] when the experts have biases) -> moe_block -> x
//   x -> x_ (the residual state run_output and check_finite read); x[last n_out rows] -> output_head -> logits
#include <cmath>
#include <cstring>

#include "graph_util.h"
#include "model.h"

namespace moelite {

bool Model::fused_ok() const {
    return opt_.fused_graph && backend_ == cpu_backend_ && opt_.expert_slots.empty() && !tier2_ && !buf_rs_ &&
           !record_routes;
}

// A ubatch that runs some layer's experts as per-expert matmuls (expert_gemm) needs its routing on the host to
// shape them: it runs per layer.
bool Model::any_expert_gemm(int T) const {
    for (int il = 0; il < hp_.n_layer; ++il)
        if (layers_[il].moe && expert_gemm(T, cache_->pool_of(il))) return true;
    return false;
}

// The custom ops run on a thread of the CPU backend's pool (n_tasks 1: thread 0 only) and must not throw (ggml is
// C): a failed routing (NaN logits) is flagged, and eval() reruns the step per layer, which raises the same error
// with the layer's name. Their userdata is the layer's RouteOp.
void Model::op_route(ggml_tensor * dst, int ith, int, void * userdata) {
    if (ith != 0) return;
    RouteOp & r = *(RouteOp *) userdata;
    Model & m = *r.model;
    const int n = r.T * m.hp_.n_expert_used;
    try {
        m.route_host(r.il, (const float *) dst->src[0]->data, r.T, r.ids, r.w, nullptr, false);
    } catch (...) {
        r.failed = true;
        r.ids.assign(n, 0);
        r.w.assign(n, 0.f);
    }
    m.step_ids[r.il] = r.ids;
    const std::vector<int> & slot_of = m.cache_->layers()[r.il].slot_of; // fixed: every expert is resident
    int32_t * slots = (int32_t *) dst->data;
    for (int i = 0; i < n; ++i) slots[i] = slot_of[r.ids[i]];
}

void Model::op_weights(ggml_tensor * dst, int ith, int, void * userdata) {
    if (ith != 0) return;
    const RouteOp & r = *(const RouteOp *) userdata;
    std::memcpy(dst->data, r.w.data(), r.w.size() * sizeof(float));
}

void Model::op_expert_ids(ggml_tensor * dst, int ith, int, void * userdata) {
    if (ith != 0) return;
    const RouteOp & r = *(const RouteOp *) userdata;
    std::memcpy(dst->data, r.ids.data(), r.ids.size() * sizeof(int32_t));
}

// One ubatch of T tokens at positions n_past_.. in one graph; logits [n_out, n_vocab] of its last n_out tokens.
// Returns false, having changed nothing but the KV rows this ubatch writes anyway, when the step is not to be
// trusted (a routing failed, the residual or the logits went non-finite): eval() reruns it per layer, where the
// checks after every layer name the culprit.
bool Model::eval_fused(const int32_t * tokens, int T, int n_out, float * logits) {
    const HParams & h = hp_;
    const int K = h.n_expert_used;
    gin_ = GraphInputs{};
    ggml_init_params ip = {fused_mem_.size(), fused_mem_.data(), true};
    ggml_context * ctx = ggml_init(ip);
    ggml_cgraph * gf = ggml_new_graph_custom(ctx, fused_nodes_, false);
    ggml_tensor * inp = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, T);
    ggml_set_input(inp);
    ggml_tensor * x = ggml_get_rows(ctx, tok_embd_, inp); // [n_embd, T]
    if (h.embd_scale != 1.f) x = ggml_scale(ctx, x, h.embd_scale);
    x = hc_streams(ctx, x); // [n_embd * hc, T] with hyper-connections
    route_ops_.clear();
    route_ops_.reserve(h.n_layer); // the ops point into it: no reallocation while the graph lives
    for (int il = 0; il < h.n_layer; ++il) {
        MoeFront f;
        ggml_tensor * y = layer_front(ctx, gf, il, x, T, f);
        if (!y) {
            route_ops_.push_back(RouteOp{this, il, T, {}, {}, false});
            RouteOp * r = &route_ops_.back();
            const Layer & L = layers_[il];
            ggml_tensor * slots = ggml_custom_4d(ctx, GGML_TYPE_I32, K, T, 1, 1, &f.logits, 1, op_route, 1, r);
            ggml_tensor * weights = ggml_custom_4d(ctx, GGML_TYPE_F32, 1, K, T, 1, &slots, 1, op_weights, 1, r);
            ggml_tensor * eids = L.gate_exps_b || L.up_exps_b || L.down_exps_b
                                     ? ggml_custom_4d(ctx, GGML_TYPE_I32, K, T, 1, 1, &slots, 1, op_expert_ids, 1, r)
                                     : nullptr;
            y = moe_block(ctx, il, f, slots, weights, eids, T);
        }
        x = y;
    }
    ggml_build_forward_expand(gf, ggml_cpy(ctx, x, rows_of(ctx, x_, 0, T)));
    ggml_tensor * out = nullptr; // more rows than one output graph takes: run_output() after
    if (n_out > 0 && n_out <= output_rows_per_graph()) {
        out = output_head(ctx, ggml_view_2d(ctx, x, x->ne[0], n_out, x->nb[1], (size_t) (T - n_out) * x->nb[1]));
        ggml_set_output(out);
        ggml_build_forward_expand(gf, out);
    }
    compute(ctx, gf, galloc_);
    set_input(inp, tokens, (size_t) T * sizeof(int32_t));
    set_graph_inputs();
    ggml_backend_graph_compute(backend_, gf);
    bool ok = true;
    for (const RouteOp & r : route_ops_) ok = ok && !r.failed;
    if (ok && out) {
        ggml_backend_tensor_get(out, logits, 0, ggml_nbytes(out));
        for (size_t i = 0, n = (size_t) h.n_vocab * n_out; i < n && ok; ++i) ok = std::isfinite(logits[i]);
    }
    ggml_free(ctx);
    if (!ok || !last_row_finite(T)) return false;
    if (n_out > 0 && !out) run_output(T, n_out, logits);
    // the cache's counters and the consistency window, kept as the per-layer step keeps them
    std::vector<int32_t> slots;
    for (const RouteOp & r : route_ops_) {
        slots.resize(r.ids.size());
        cache_->acquire(r.il, r.ids.data(), (int) r.ids.size(), slots.data());
        cache_->release(r.il);
        for (int t = 0; t < T; ++t) cache_->note_token_experts(r.il, &r.ids[(size_t) t * K], K);
    }
    return true;
}

} // namespace moelite
