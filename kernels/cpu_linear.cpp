// Linear layers on the CPU (float32) over weights packed for streaming: y = x W^T (+ b).
//
// A decode step multiplies a few rows by every weight matrix, so its time is the weights read
// once from memory. The packed layout puts 64 output features side by side for each input
// feature: [out/64, in, 64]. A block of 64 outputs is then one sequential stream of in * 256
// bytes, which the hardware prefetcher follows (four rows of a plain [out, in] matrix are four
// streams), and each 64-byte line feeds every x row's 16-float products without a shuffle.
//
// Each thread takes whole blocks. Within a block, x rows go in tiles of up to 6: 6 rows x 4
// vectors of sums stay in registers, and the block's weights, read from memory for the first
// tile, come from L2 for the next (a block is in * 256 bytes: 192 KB at in = 768). Long prefills
// go in chunks of 240 rows, whose inputs stay in cache while every block passes over them
// (chunks of 48 measured 5% slower at 72 rows: the weights read twice).
//
// Measured against oneDNN's matmul over its own prepacked weights (bench/fused_decode.py: 2 cores
// of an AMD EPYC with AVX-512, the 48 linears of builtin-bench-random, 330 MB): 5-8% faster at 1-8
// rows, where a step reads the weights at the pace of `sum` over as many bytes; 0.98-1.01x at
// 72-1,000 rows, where both compute.

#include <string.h>

#include <algorithm>

#include "cpu_kernels.h"

namespace {

typedef float vec16 __attribute__((vector_size(64)));

inline vec16 load16(const float* p) {
    vec16 v;
    memcpy(&v, p, sizeof v);
    return v;
}

constexpr int kBlock = 64;       // output features per block
constexpr int kChunkRows = 240;  // x rows per pass over the weights (a multiple of 6 and 4)
constexpr int kAheadFloats = 16 * kBlock;  // prefetch distance: 16 input features, 4 KB

// R rows of x (x_stride apart) times one block [in, 64]: y[r, 0:valid] (+ bias).
template <int R>
void block_tile(const float* x, int64_t x_stride, const float* w, int64_t in, float* y,
                int64_t y_stride, int64_t valid, const float* bias) {
    vec16 acc[R][4];
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < 4; ++c) acc[r][c] = vec16{};
    for (int64_t i = 0; i < in; ++i) {
        const float* wi = w + i * kBlock;
        for (int c = 0; c < 4; ++c) __builtin_prefetch(wi + kAheadFloats + 16 * c);
        const vec16 w0 = load16(wi), w1 = load16(wi + 16), w2 = load16(wi + 32),
                    w3 = load16(wi + 48);
        for (int r = 0; r < R; ++r) {
            const float xv = x[r * x_stride + i];
            acc[r][0] += xv * w0;
            acc[r][1] += xv * w1;
            acc[r][2] += xv * w2;
            acc[r][3] += xv * w3;
        }
    }
    for (int r = 0; r < R; ++r) {
        float out[kBlock];
        for (int c = 0; c < 4; ++c) {
            vec16 v = acc[r][c];
            if (bias != nullptr) v += load16(bias + 16 * c);
            memcpy(out + 16 * c, &v, sizeof v);
        }
        memcpy(y + r * y_stride, out, static_cast<size_t>(valid) * sizeof(float));
    }
}

void block_rows(const float* x, int64_t rows, int64_t x_stride, const float* w, int64_t in,
                float* y, int64_t y_stride, int64_t valid, const float* bias) {
    int64_t r = 0;
    // Tiles of 6 where there are many rows (fewer passes over the block); a decode step's few
    // rows in one tile of up to 4, or 4 + the rest.
    if (rows > 8)
        for (; r + 6 <= rows; r += 6)
            block_tile<6>(x + r * x_stride, x_stride, w, in, y + r * y_stride, y_stride, valid,
                          bias);
    for (; r + 4 <= rows; r += 4)
        block_tile<4>(x + r * x_stride, x_stride, w, in, y + r * y_stride, y_stride, valid, bias);
    const float* xr = x + r * x_stride;
    float* yr = y + r * y_stride;
    switch (rows - r) {
        case 5: block_tile<5>(xr, x_stride, w, in, yr, y_stride, valid, bias); break;
        case 3: block_tile<3>(xr, x_stride, w, in, yr, y_stride, valid, bias); break;
        case 2: block_tile<2>(xr, x_stride, w, in, yr, y_stride, valid, bias); break;
        case 1: block_tile<1>(xr, x_stride, w, in, yr, y_stride, valid, bias); break;
        default: break;
    }
}

}  // namespace

extern "C" {

void kvt_linear_f32(const float* x, int64_t rows, int64_t x_stride, const float* packed,
                    const float* bias, int64_t in_features, int64_t out_features, float* y,
                    int64_t y_stride, int num_threads) {
    const int64_t num_blocks = (out_features + kBlock - 1) / kBlock;
    for (int64_t first = 0; first < rows; first += kChunkRows) {
        const int64_t count = std::min<int64_t>(kChunkRows, rows - first);
#pragma omp parallel for num_threads(num_threads) schedule(static)
        for (int64_t b = 0; b < num_blocks; ++b) {
            block_rows(x + first * x_stride, count, x_stride, packed + b * in_features * kBlock,
                       in_features, y + first * y_stride + b * kBlock, y_stride,
                       std::min<int64_t>(kBlock, out_features - b * kBlock),
                       bias != nullptr ? bias + b * kBlock : nullptr);
        }
    }
}

}  // extern "C"
