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
// Built and loaded by kernels/cpu_decode_attention.py (plain C ABI through ctypes: no torch
// headers, a one-second build). OpenMP resolves to the libgomp torch has already loaded, so the
// tasks run on the calling thread's OpenMP team, the one torch's own operators use.

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <vector>

namespace {

// exp(x) for x <= 0 (scores minus their maximum), vectorizable: x = n ln2 + r with |r| <= ln2/2,
// 2^n built in the exponent bits, exp(r) by its Taylor polynomial to degree 7 (relative error
// below 2e-7, as float32's own rounding). Below -87 the result is 0 (expf's is a denormal).
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

// One (sequence, KV head): `group` (<= kMaxGroup) queries over `len` keys, each key and value
// read once for all of them. scores: group * len floats.
template <int D>
void attend_head(const float* q, const float* k, const float* v, int64_t key_stride,
                 int64_t len, int group, float scale, float* scores, float* out) {
    // Pass 1: every query's score against each key.
    for (int64_t l = 0; l < len; ++l) {
        const float* key = k + l * key_stride;
        for (int g = 0; g < group; ++g) {
            const float* qg = q + g * D;
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int d = 0; d < D; ++d) dot += qg[d] * key[d];
            scores[g * len + l] = dot * scale;
        }
    }
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
    // Pass 2: the weighted sum of the values.
    float acc[kMaxGroup][D];
    for (int g = 0; g < group; ++g)
        for (int d = 0; d < D; ++d) acc[g][d] = 0.0f;
    for (int64_t l = 0; l < len; ++l) {
        const float* value = v + l * key_stride;
        for (int g = 0; g < group; ++g) {
            const float p = scores[g * len + l];
#pragma omp simd
            for (int d = 0; d < D; ++d) acc[g][d] += p * value[d];
        }
    }
    for (int g = 0; g < group; ++g)
        for (int d = 0; d < D; ++d) out[g * D + d] = acc[g][d] * inv_sum[g];
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
