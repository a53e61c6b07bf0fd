// Decode attention on the CPU over the thread mirror's head-major rows (float32).
//
// One query token per sequence. Sequence b reads row rows[b] of the mirror's layer, its first
// lens[b] keys, every KV head; the query heads sharing a KV head (grouped-query attention) read
// that head's keys together, so each key and value is read from memory once per step:
//
//     keys, values  [R, Hkv, capacity, D]   (any row and head strides; keys contiguous in D)
//     q, out        [B, Hq, D]              contiguous
//     task (b, h):  scores[g][l] = scale * q[b, h*G + g] . keys[rows[b], h, l]    l < lens[b]
//                   out[b, h*G + g] = softmax_l(scores[g]) @ values[rows[b], h, :lens[b]]
//
// Why a kernel of its own: as batched matrix products (MKL) a step of four decodes on 1,500
// cached tokens read keys and values at half the memory bandwidth the weights' products reach,
// and padding every row to the longest read keys no sequence needs. Here each (sequence, KV
// head) streams its own keys once, then its values once, with the scores in a buffer that stays
// in cache between the two passes.
//
// Built into the CPU library (kernels/cpu_library.py), called through ctypes and by the fused
// decode layers (cpu_decode_layers.cpp). OpenMP resolves to the libgomp torch has already
// loaded, so the tasks run on the calling thread's OpenMP team, the one torch's own operators use.

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <vector>

#include "cpu_kernels.h"

namespace {

// exp(x) for x <= 0 (scores minus their maximum), vectorizable: x = n ln2 + r with |r| <= ln2/2,
// 2^n built in the exponent bits, exp(r) by its Taylor polynomial to degree 7 (relative error
// below 2e-7, as float32's own rounding). Below -87 it gives exp(-87), 1.6e-38, where expf gives
// a denormal or 0: nothing beside the largest score's weight of 1.
inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float n = nearbyintf(x * 1.44269504088896341f);
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f;  // ln2 in two parts: r exact
    float p = 1.98412698e-4f;  // 1/7!
    p = p * r + 1.38888889e-3f;
    p = p * r + 8.33333333e-3f;
    p = p * r + 4.16666667e-2f;
    p = p * r + 1.66666667e-1f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

constexpr int kMaxGroup = 16;  // query heads one pass over a KV head's keys serves
constexpr int kBlock = 64;     // keys per block: a block of values (D <= 128) stays in L1
// Rows fetched ahead of use. The hardware's prefetcher alone left the kernel at ~75% of the
// rate `sum` reads the same bytes; 64 rows ahead measured 25-35% faster than none, 32 and 128
// a little slower (4 rows x 2,000 keys x 12 layers, 2 threads).
constexpr int kAhead = 64;

inline void prefetch_row(const float* row, int dim) {
    for (int c = 0; c < dim; c += 16) __builtin_prefetch(row + c);  // one 64-byte line each
}

// 16 floats: one AVX-512 register, two AVX2 ones (GCC splits it), as the CPU has.
typedef float vec16 __attribute__((vector_size(64)));
typedef float vec8 __attribute__((vector_size(32)));
typedef float vec4 __attribute__((vector_size(16)));

inline vec16 load16(const float* p) {
    vec16 v;
    memcpy(&v, p, sizeof v);  // an unaligned load
    return v;
}

inline float sum16(vec16 v) {
    vec8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
             __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    vec4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (b[0] + b[2]) + (b[1] + b[3]);
}

// scores[g * len + l] = scale * q[g] . key[l] for the block's keys. Four keys at a time: four
// independent sums per query (one sum alone would wait on each add's latency).
template <int D>
void block_scores(const float* q, const float* k, int64_t key_stride, int64_t first,
                  int64_t count, int group, int64_t len, float scale, float* scores) {
    constexpr int C = D / 16;
    int64_t l = first;
    for (; l + 4 <= first + count; l += 4) {
        const float* k0 = k + l * key_stride;
        for (int j = 0; j < 4 && l + kAhead + j < len; ++j)
            prefetch_row(k0 + (kAhead + j) * key_stride, D);
        for (int g = 0; g < group; ++g) {
            const float* qg = q + g * D;
            vec16 a0 = {}, a1 = {}, a2 = {}, a3 = {};
            for (int c = 0; c < C; ++c) {
                const vec16 qc = load16(qg + 16 * c);
                a0 += qc * load16(k0 + 16 * c);
                a1 += qc * load16(k0 + key_stride + 16 * c);
                a2 += qc * load16(k0 + 2 * key_stride + 16 * c);
                a3 += qc * load16(k0 + 3 * key_stride + 16 * c);
            }
            float* s = scores + g * len + l;
            s[0] = sum16(a0) * scale;
            s[1] = sum16(a1) * scale;
            s[2] = sum16(a2) * scale;
            s[3] = sum16(a3) * scale;
        }
    }
    for (; l < first + count; ++l) {
        const float* key = k + l * key_stride;
        for (int g = 0; g < group; ++g) {
            vec16 a = {};
            for (int c = 0; c < C; ++c) a += load16(q + g * D + 16 * c) * load16(key + 16 * c);
            scores[g * len + l] = sum16(a) * scale;
        }
    }
}

// One (sequence, KV head): `group` (<= kMaxGroup) queries over `len` keys, each key and value
// read from memory once for all of them. scores: group * len floats.
template <int D>
void attend_head(const float* q, const float* k, const float* v, int64_t key_stride,
                 int64_t len, int group, float scale, float* scores, float* out) {
    static_assert(D % 16 == 0, "head sizes are multiples of 16");
    constexpr int C = D / 16;
    // Pass 1: every query's score against each key.
    for (int64_t first = 0; first < len; first += kBlock)
        block_scores<D>(q, k, key_stride, first, std::min<int64_t>(kBlock, len - first), group,
                        len, scale, scores);
    // Softmax of each query's scores, in place; 1 / sum kept for the output.
    float inv_sum[kMaxGroup];
    for (int g = 0; g < group; ++g) {
        float* s = scores + g * len;
        float top = s[0];
#pragma omp simd reduction(max : top)
        for (int64_t l = 1; l < len; ++l) top = s[l] > top ? s[l] : top;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t l = 0; l < len; ++l) {
            s[l] = exp_nonpositive(s[l] - top);
            sum += s[l];
        }
        inv_sum[g] = 1.0f / sum;
    }
    // Pass 2: the weighted sum of the values, a block at a time: the first query brings the
    // block's values into L1, the others find them there; each query's sum stays in registers
    // through the block.
    vec16 acc[kMaxGroup][C] = {};
    for (int64_t first = 0; first < len; first += kBlock) {
        const int64_t end = std::min<int64_t>(first + kBlock, len);
        for (int64_t l = first + kAhead; l < std::min<int64_t>(end + kAhead, len); ++l)
            prefetch_row(v + l * key_stride, D);
        for (int g = 0; g < group; ++g) {
            vec16 a[C];
            for (int c = 0; c < C; ++c) a[c] = acc[g][c];
            const float* p = scores + g * len;
            for (int64_t l = first; l < end; ++l) {
                const float* value = v + l * key_stride;
                for (int c = 0; c < C; ++c) a[c] += p[l] * load16(value + 16 * c);
            }
            for (int c = 0; c < C; ++c) acc[g][c] = a[c];
        }
    }
    for (int g = 0; g < group; ++g)
        for (int c = 0; c < C; ++c) {
            const vec16 r = acc[g][c] * inv_sum[g];
            memcpy(out + g * D + 16 * c, &r, sizeof r);
        }
}

template <int D>
void decode_attention(const float* q, const float* keys, const float* values,
                      const int64_t* rows, const int64_t* lens, float* out, int64_t batch,
                      int64_t num_heads, int64_t num_kv_heads, int64_t row_stride,
                      int64_t head_stride, int64_t key_stride, float scale, int num_threads) {
    const int group = static_cast<int>(num_heads / num_kv_heads);
    const int64_t num_tasks = batch * num_kv_heads;
    int64_t longest = 0;
    for (int64_t b = 0; b < batch; ++b) longest = std::max(longest, lens[b]);
#pragma omp parallel num_threads(num_threads)
    {
        std::vector<float> scores(static_cast<size_t>(std::min(group, kMaxGroup)) * longest);
        // Dynamic: rows differ in length, and a thread that finishes early takes the next task.
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < num_tasks; ++task) {
            const int64_t b = task / num_kv_heads, h = task % num_kv_heads;
            const int64_t base = rows[b] * row_stride + h * head_stride;
            const int64_t head = b * num_heads + h * group;  // first query head of the group
            // More than kMaxGroup query heads per KV head (rare): its keys are read per 16.
            for (int g = 0; g < group; g += kMaxGroup) {
                attend_head<D>(q + (head + g) * D, keys + base, values + base, key_stride,
                               lens[b], std::min(kMaxGroup, group - g), scale, scores.data(),
                               out + (head + g) * D);
            }
        }
    }
}

}  // namespace

extern "C" {

// The step's writes that attention reads, in one call instead of a dozen torch operations per
// layer: the new keys and values into their pool slots (a negative slot is padding, skipped),
// then the positions the mirror's rows lack copied from the pool (thread_mirror.py decides
// which: for a thread it already holds, just the new tokens).
//
//     key, value        [T, Hkv, D] (any token stride; each token's heads contiguous)
//     pool_k, pool_v    [N * bs, Hkv, D] contiguous
//     mirror_k/v        [R, Hkv, capacity, D] with row and head strides, contiguous in D
void kvt_store_and_sync_f32(const float* key, const float* value, int64_t key_stride,
                            int64_t value_stride, const int64_t* slots, int64_t num_tokens,
                            float* pool_k, float* pool_v, const int64_t* copy_rows,
                            const int64_t* copy_positions, const int64_t* copy_slots,
                            int64_t num_copies, float* mirror_k, float* mirror_v,
                            int64_t num_kv_heads, int64_t head_dim, int64_t row_stride,
                            int64_t head_stride) {
    const int64_t token_floats = num_kv_heads * head_dim;
    const size_t head_bytes = static_cast<size_t>(head_dim) * sizeof(float);
    for (int64_t t = 0; t < num_tokens; ++t) {
        if (slots[t] < 0) continue;
        memcpy(pool_k + slots[t] * token_floats, key + t * key_stride, head_bytes * num_kv_heads);
        memcpy(pool_v + slots[t] * token_floats, value + t * value_stride,
               head_bytes * num_kv_heads);
    }
    for (int64_t i = 0; i < num_copies; ++i) {
        const int64_t from = copy_slots[i] * token_floats;
        const int64_t to = copy_rows[i] * row_stride + copy_positions[i] * head_dim;
        for (int64_t h = 0; h < num_kv_heads; ++h) {
            memcpy(mirror_k + to + h * head_stride, pool_k + from + h * head_dim, head_bytes);
            memcpy(mirror_v + to + h * head_stride, pool_v + from + h * head_dim, head_bytes);
        }
    }
}

// The head sizes it is built for; kvt_decode_attention_f32 returns 0 for any other, and the
// caller takes another path.
int kvt_decode_attention_supports(int64_t head_dim) {
    return head_dim == 16 || head_dim == 32 || head_dim == 64 || head_dim == 80 || head_dim == 96 ||
           head_dim == 128 || head_dim == 256;
}

int kvt_decode_attention_f32(const float* q, const float* keys, const float* values,
                             const int64_t* rows, const int64_t* lens, float* out, int64_t batch,
                             int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                             int64_t row_stride, int64_t head_stride, int64_t key_stride,
                             float scale, int num_threads) {
    if (num_kv_heads < 1 || num_heads % num_kv_heads != 0) return 0;
#define KVT_CASE(DIM)                                                                           \
    case DIM:                                                                                   \
        decode_attention<DIM>(q, keys, values, rows, lens, out, batch, num_heads, num_kv_heads, \
                              row_stride, head_stride, key_stride, scale, num_threads);         \
        return 1;
    switch (head_dim) {
        KVT_CASE(16)
        KVT_CASE(32)
        KVT_CASE(64)
        KVT_CASE(80)
        KVT_CASE(96)
        KVT_CASE(128)
        KVT_CASE(256)
    }
#undef KVT_CASE
    return 0;
}

}  // extern "C"
