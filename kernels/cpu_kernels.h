// The C entry points of kvthreads' CPU library (kernels/cpu_library.py builds every .cpp named
// there into one shared object), for the files that call each other's: the fused decode layers
// (cpu_decode_layers.cpp) run the packed linears (cpu_linear.cpp) and the mirror's writes and
// decode attention (cpu_decode_attention.cpp).

#pragma once

#include <stdint.h>

extern "C" {

// A decode step through every layer at once (cpu_decode_layers.cpp); the Python side mirrors
// these three structs field by field (kernels/cpu_decode_layers.py).
struct KvtDecodeModel {
    int64_t hidden, intermediate, num_heads, num_kv_heads, head_dim, num_layers;
    float eps, scale;
    int64_t vocab_size, max_positions;
    const float* embed;       // [vocab_size, hidden]
    const float* rope_cos;    // [max_positions, head_dim]
    const float* rope_sin;
    const float* final_norm;  // [hidden]
};

struct KvtDecodeLayer {  // one layer's weights and pool, fixed from load on
    const float* input_norm;  // [hidden]
    const float* post_norm;   // [hidden]
    const float* q_norm;      // [head_dim], or null (no q/k norm)
    const float* k_norm;
    const float* wqkv;        // packed q, k, v projections (cpu_linear.cpp's layout)
    const float* bqkv;        // their bias, padded; or null
    const float* wo;
    const float* w13;         // packed gate, up
    const float* w2;
    float* pool_k;            // [N * bs, Hkv, D]
    float* pool_v;
};

struct KvtDecodeStep {  // one step of `batch` decodes through the thread mirror
    int64_t batch;
    const int64_t* ids;        // [batch] each sequence's new token ...
    const int64_t* positions;  // ... and its position
    const int64_t* rows;  // [batch] each sequence's mirror row ...
    const int64_t* lens;  // ... and its keys, the new one included
    const int64_t* slots;  // [batch] the new token's pool slot
    const int64_t* copy_rows;  // the positions the mirror's rows lack, and the slots they
    const int64_t* copy_positions;  // are copied from (thread_mirror.py)
    const int64_t* copy_slots;
    int64_t num_copies;
    float* const* mirror_k;  // [num_layers] each layer's rows [R, Hkv, capacity, D]
    float* const* mirror_v;
    int64_t row_stride, head_stride;
    int num_threads;
};

// Writes the step's hidden states after the final norm into out [batch, hidden]. Returns 1; 0
// where decode attention is not built for the head size, -1 for a token id past the vocabulary,
// -2 for a position past the rope tables (nothing written in those cases).
int kvt_decode_layers_f32(const KvtDecodeModel* model, const KvtDecodeLayer* layers,
                          const KvtDecodeStep* step, float* out);

// y[r, o] = x[r, :] . W[o, :] (+ bias[o]) for W packed by kernels/cpu_linear.py: [out/64, in,
// 64], the out rows padded to a multiple of 64 with zeros. x rows x_stride apart, contiguous in
// `in`; y rows y_stride apart. bias: padded to a multiple of 64, or null.
void kvt_linear_f32(const float* x, int64_t rows, int64_t x_stride, const float* packed,
                    const float* bias, int64_t in_features, int64_t out_features, float* y,
                    int64_t y_stride, int num_threads);

void kvt_store_and_sync_f32(const float* key, const float* value, int64_t key_stride,
                            int64_t value_stride, const int64_t* slots, int64_t num_tokens,
                            float* pool_k, float* pool_v, const int64_t* copy_rows,
                            const int64_t* copy_positions, const int64_t* copy_slots,
                            int64_t num_copies, float* mirror_k, float* mirror_v,
                            int64_t num_kv_heads, int64_t head_dim, int64_t row_stride,
                            int64_t head_stride);

int kvt_decode_attention_supports(int64_t head_dim);

int kvt_decode_attention_f32(const float* q, const float* keys, const float* values,
                             const int64_t* rows, const int64_t* lens, float* out, int64_t batch,
                             int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                             int64_t row_stride, int64_t head_stride, int64_t key_stride,
                             float scale, int num_threads);

}  // extern "C"
