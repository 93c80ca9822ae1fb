/* Paged attention for decode steps on the CPU: one query token per sequence, keys and values read
 * in place from the block pool through each sequence's block table (no gather, no padding).
 *
 * Layouts (queries and outputs float32; the caches float32 or bfloat16, one entry point each:
 * llmos_paged_decode_f32 and llmos_paged_decode_bf16, from one body, paged_kv.h):
 *   q             [batch, heads, dim], rows q_stride floats apart (a view into a fused projection)
 *   out           [batch, heads, dim], contiguous
 *   k_cache, v_cache  [blocks, block_size, kv_heads, dim], contiguous
 *   tables        [batch, table_stride] int32 block ids;  ctx [batch] int32 context lengths (>= 1)
 * Query head h reads kv head h / (heads / kv_heads) (grouped-query attention).
 *
 * A task is one sequence, or a piece of a long one; tasks run on the process's OpenMP threads (the
 * runtime, and so the threads, torch already uses). A task makes two passes over its blocks, in
 * order: scores (q . k for every cached token and head), then exp(score - max) per head, then the
 * weighted sum of values; a last pass merges the pieces and normalises. With AVX2 and FMA, and when block_size and dim are multiples of 8, it takes 8 tokens
 * at a time: 8 dot products in 8 independent accumulators reduced together, and the value sum
 * kept in registers across the 8 tokens. Otherwise a portable loop computes the same thing.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

int llmos_paged_decode_abi(void) { return 7; }

#ifdef LLMOS_AVX2
/* [sum(a0), sum(a1), ..., sum(a7)] */
static inline __m256 hsum8x8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5, __m256 a6,
                             __m256 a7) {
    __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
    return _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
}

#endif

/* p[0..n) = exp(p - max) in place; returns the sum, and the max through *mx (an unnormalised softmax). */
static float exp_shifted(float *p, int n, float *mx) {
    float m = p[0];
    for (int t = 1; t < n; t++) m = p[t] > m ? p[t] : m;
    float sum = 0.f;
    int t = 0;
#ifdef LLMOS_AVX2
    const __m256 vm = _mm256_set1_ps(m);
    __m256 vsum = _mm256_setzero_ps();
    for (; t + 8 <= n; t += 8) {
        const __m256 e = llmos_exp256(_mm256_sub_ps(_mm256_loadu_ps(p + t), vm));
        _mm256_storeu_ps(p + t, e);
        vsum = _mm256_add_ps(vsum, e);
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, vsum);
    for (int i = 0; i < 8; i++) sum += lanes[i];
#endif
    for (; t < n; t++) { p[t] = expf(p[t] - m); sum += p[t]; }
    *mx = m;
    return sum;
}

#define KV float
#define KV_FN(name) name##_f32
#define KV_GET(p) (*(p))
#define KV_LOAD8(p) _mm256_loadu_ps(p)
#define KV_ROUND_PROBS 0
#include "paged_kv.h"
#undef KV
#undef KV_FN
#undef KV_GET
#undef KV_LOAD8
#undef KV_ROUND_PROBS

#define KV uint16_t
#define KV_FN(name) name##_bf16
#define KV_GET(p) llmos_bf16_to_f32(*(p))
#define KV_LOAD8(p) llmos_load_bf16x8(p)
#define KV_ROUND_PROBS 1
#include "paged_kv.h"
#undef KV
#undef KV_FN
#undef KV_GET
#undef KV_LOAD8
#undef KV_ROUND_PROBS
