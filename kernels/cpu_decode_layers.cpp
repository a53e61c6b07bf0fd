// A decode step through every layer of a Llama-family model in one call (float32, the CPU).
//
// Why: at one sequence a decode step is the weights read once (~7-9 ms for builtin-bench-random)
// plus ~25 small torch operations per layer (norms, rope, residual adds, SiLU, views), each a few
// microseconds of dispatch for a few hundred floats of work: about 1.8 ms a step, 18% of it.
// Here those are plain loops between the library's own linears (cpu_linear.cpp) and the
// mirror's writes and attention (cpu_decode_attention.cpp). The same arithmetic as
// app/engine/network/model.py, which the tests compare it with.
//
// For B sequences of one new token each: x = the tokens' embeddings; per layer
//     h = rmsnorm(x) * input_norm;  q, k, v = h Wqkv^T (+ b)   [q/k rmsnorm per head: Qwen3]
//     q, k = rope(q), rope(k)        (rotate-half, the step's cos/sin rows)
//     k, v -> pool slots; the mirror rows' missing positions copied; attention over the rows
//     x += attn Wo^T;  h = rmsnorm(x) * post_norm;  x += (silu(h Wg^T) * h Wu^T) Wd^T
// then out = rmsnorm(x) * final_norm. (The logits stay torch's: the sampled rows only.)

#include <math.h>
#include <string.h>

#include <vector>

#include "cpu_kernels.h"

namespace {

// out = x / sqrt(mean(x^2) + eps) * weight over n floats (the mean summed in double).
void rms_norm(const float* x, const float* weight, int64_t n, float eps, float* out) {
    double squares = 0.0;
    for (int64_t i = 0; i < n; ++i) squares += static_cast<double>(x[i]) * x[i];
    const float inv = 1.0f / sqrtf(static_cast<float>(squares / n) + eps);
    for (int64_t i = 0; i < n; ++i) out[i] = weight[i] * (x[i] * inv);
}

// In place, as apply_rope: x[i] cos[i] - x[i + D/2] sin[i], x[i + D/2] cos[i + D/2] + x[i] sin.
void rope(float* x, const float* cos, const float* sin, int64_t dim) {
    const int64_t half = dim / 2;
    for (int64_t i = 0; i < half; ++i) {
        const float a = x[i], b = x[i + half];
        x[i] = a * cos[i] - b * sin[i];
        x[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

}  // namespace

extern "C" int kvt_decode_layers_f32(const KvtDecodeModel* model, const KvtDecodeLayer* layers,
                                     const KvtDecodeStep* step, float* out) {
    const int64_t hidden = model->hidden, inter = model->intermediate, dim = model->head_dim;
    const int64_t heads = model->num_heads, kv_heads = model->num_kv_heads, batch = step->batch;
    if (!kvt_decode_attention_supports(dim)) return 0;
    for (int64_t b = 0; b < batch; ++b) {
        if (step->ids[b] < 0 || step->ids[b] >= model->vocab_size) return -1;
        if (step->positions[b] < 0 || step->positions[b] >= model->max_positions) return -2;
    }
    // The residual stream starts as the tokens' embeddings; each sequence's rope rows.
    std::vector<float> x(batch * hidden), cos(batch * dim), sin(batch * dim);
    for (int64_t b = 0; b < batch; ++b) {
        memcpy(x.data() + b * hidden, model->embed + step->ids[b] * hidden,
               hidden * sizeof(float));
        memcpy(cos.data() + b * dim, model->rope_cos + step->positions[b] * dim,
               dim * sizeof(float));
        memcpy(sin.data() + b * dim, model->rope_sin + step->positions[b] * dim,
               dim * sizeof(float));
    }
    const int64_t qkv_width = (heads + 2 * kv_heads) * dim, q_width = heads * dim;
    const int threads = step->num_threads;
    std::vector<float> h(batch * hidden), qkv(batch * qkv_width), q(batch * q_width),
        attended(batch * q_width), delta(batch * hidden), gate_up(batch * 2 * inter),
        act(batch * inter);
    for (int64_t l = 0; l < model->num_layers; ++l) {
        const KvtDecodeLayer& w = layers[l];
        for (int64_t b = 0; b < batch; ++b)
            rms_norm(x.data() + b * hidden, w.input_norm, hidden, model->eps,
                     h.data() + b * hidden);
        kvt_linear_f32(h.data(), batch, hidden, w.wqkv, w.bqkv, hidden, qkv_width, qkv.data(),
                       qkv_width, threads);
        for (int64_t b = 0; b < batch; ++b) {
            float* row = qkv.data() + b * qkv_width;
            for (int64_t head = 0; head < heads + kv_heads; ++head) {  // q heads, then k heads
                float* v = row + head * dim;
                if (w.q_norm != nullptr)
                    rms_norm(v, head < heads ? w.q_norm : w.k_norm, dim, model->eps, v);
                rope(v, cos.data() + b * dim, sin.data() + b * dim, dim);
            }
            memcpy(q.data() + b * q_width, row, q_width * sizeof(float));
        }
        kvt_store_and_sync_f32(qkv.data() + q_width, qkv.data() + q_width + kv_heads * dim,
                               qkv_width, qkv_width, step->slots, batch, w.pool_k, w.pool_v,
                               step->copy_rows, step->copy_positions, step->copy_slots,
                               step->num_copies, step->mirror_k[l], step->mirror_v[l], kv_heads,
                               dim, step->row_stride, step->head_stride);
        kvt_decode_attention_f32(q.data(), step->mirror_k[l], step->mirror_v[l], step->rows,
                                 step->lens, attended.data(), batch, heads, kv_heads, dim,
                                 step->row_stride, step->head_stride, dim, model->scale, threads);
        kvt_linear_f32(attended.data(), batch, q_width, w.wo, nullptr, q_width, hidden,
                       delta.data(), hidden, threads);
        for (int64_t i = 0; i < batch * hidden; ++i) x[i] += delta[i];
        for (int64_t b = 0; b < batch; ++b)
            rms_norm(x.data() + b * hidden, w.post_norm, hidden, model->eps,
                     h.data() + b * hidden);
        kvt_linear_f32(h.data(), batch, hidden, w.w13, nullptr, hidden, 2 * inter,
                       gate_up.data(), 2 * inter, threads);
        for (int64_t b = 0; b < batch; ++b) {
            const float* g = gate_up.data() + b * 2 * inter;
            const float* u = g + inter;
            float* a = act.data() + b * inter;
            for (int64_t i = 0; i < inter; ++i) a[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
        }
        kvt_linear_f32(act.data(), batch, inter, w.w2, nullptr, inter, hidden, delta.data(),
                       hidden, threads);
        for (int64_t i = 0; i < batch * hidden; ++i) x[i] += delta[i];
    }
    for (int64_t b = 0; b < batch; ++b)
        rms_norm(x.data() + b * hidden, model->final_norm, hidden, model->eps, out + b * hidden);
    return 1;
}
