/* Paged attention for decode steps on the CPU: one query token per sequence, keys and values read
 * in place from the block pool through each sequence's block table (no gather, no padding).
 *
 * Layouts (float32):
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

int llmos_paged_decode_abi(void) { return 6; }

static inline float dot(const float *a, const float *b, int n) {
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

/* scores[h * npad + t] for t < n: scaled q . k. Portable. */
static void scores_portable(const float *qb, const float *k_cache, const int32_t *table, int n, int heads, int group,
                            int dim, int block_size, long row, long block, float scale, float *scores, int npad) {
    for (int t0 = 0; t0 < n; t0 += block_size) {
        const float *kb = k_cache + (long)table[t0 / block_size] * block;
        const int m = n - t0 < block_size ? n - t0 : block_size;
        for (int s = 0; s < m; s++)
            for (int h = 0; h < heads; h++)
                scores[(long)h * npad + t0 + s] =
                    dot(qb + (long)h * dim, kb + s * row + (long)(h / group) * dim, dim) * scale;
    }
}

static void values_portable(const float *v_cache, const int32_t *table, int n, int heads, int group, int dim,
                            int block_size, long row, long block, const float *probs, int npad, float *acc) {
    for (int t0 = 0; t0 < n; t0 += block_size) {
        const float *vb = v_cache + (long)table[t0 / block_size] * block;
        const int m = n - t0 < block_size ? n - t0 : block_size;
        for (int s = 0; s < m; s++)
            for (int h = 0; h < heads; h++) {
                const float p = probs[(long)h * npad + t0 + s];
                const float *vp = vb + s * row + (long)(h / group) * dim;
                float *ah = acc + (long)h * dim;
#pragma omp simd
                for (int d = 0; d < dim; d++) ah[d] += p * vp[d];
            }
    }
}

#ifdef LLMOS_AVX2
/* [sum(a0), sum(a1), ..., sum(a7)] */
static inline __m256 hsum8x8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5, __m256 a6,
                             __m256 a7) {
    __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
    return _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
}

/* 8 tokens at a time (block_size % 8 == 0, dim % 8 == 0); tokens past n score -inf. The 8 rows are read
 * in memory order (row by row, all heads of a row together) so the hardware prefetcher sees one stream;
 * each (token, head) keeps an 8-lane partial sum in part[], and one transpose-add per head and 8 tokens
 * reduces them. part holds heads * 8 vectors. */
static void scores_avx2(const float *qb, const float *k_cache, const int32_t *table, int n, int heads, int group,
                        int dim, int block_size, long row, long block, float scale, float *scores, int npad,
                        __m256 *part) {
    const __m256 vscale = _mm256_set1_ps(scale);
    for (int t0 = 0; t0 < n; t0 += 8) {
        const float *k0 = k_cache + (long)table[t0 / block_size] * block + (long)(t0 % block_size) * row;
        for (int s = 0; s < 8; s++) {
            const float *ks = k0 + s * row;
            for (int h = 0; h < heads; h++) {
                const float *qh = qb + (long)h * dim, *kh = ks + (long)(h / group) * dim;
                __m256 a = _mm256_mul_ps(_mm256_loadu_ps(qh), _mm256_loadu_ps(kh));
                __m256 c = _mm256_setzero_ps();
                int d = 8;
                for (; d + 8 < dim; d += 16) {
                    c = _mm256_fmadd_ps(_mm256_loadu_ps(qh + d), _mm256_loadu_ps(kh + d), c);
                    a = _mm256_fmadd_ps(_mm256_loadu_ps(qh + d + 8), _mm256_loadu_ps(kh + d + 8), a);
                }
                if (d < dim) c = _mm256_fmadd_ps(_mm256_loadu_ps(qh + d), _mm256_loadu_ps(kh + d), c);
                part[h * 8 + s] = _mm256_add_ps(a, c);
            }
        }
        for (int h = 0; h < heads; h++) {
            const __m256 *ph = part + h * 8;
            _mm256_storeu_ps(scores + (long)h * npad + t0,
                             _mm256_mul_ps(hsum8x8(ph[0], ph[1], ph[2], ph[3], ph[4], ph[5], ph[6], ph[7]), vscale));
        }
    }
    for (int h = 0; h < heads; h++)
        for (int t = n; t < npad; t++) scores[(long)h * npad + t] = -INFINITY;
}

/* acc[h] += sum over tokens of probs[h, t] * v[t, h]; 64 dims at a time stay in registers over 8 tokens. */
static void values_avx2(const float *v_cache, const int32_t *table, int n, int heads, int group, int dim,
                        int block_size, long row, long block, const float *probs, int npad, float *acc) {
    for (int t0 = 0; t0 < n; t0 += 8) {
        const float *v0 = v_cache + (long)table[t0 / block_size] * block + (long)(t0 % block_size) * row;
        const int m = n - t0 < 8 ? n - t0 : 8;
        for (int h = 0; h < heads; h++) {
            const float *ph = probs + (long)h * npad + t0;
            const float *vh = v0 + (long)(h / group) * dim;
            float *ah = acc + (long)h * dim;
            int d0 = 0;
            for (; d0 + 64 <= dim; d0 += 64) {
                __m256 r0 = _mm256_loadu_ps(ah + d0), r1 = _mm256_loadu_ps(ah + d0 + 8);
                __m256 r2 = _mm256_loadu_ps(ah + d0 + 16), r3 = _mm256_loadu_ps(ah + d0 + 24);
                __m256 r4 = _mm256_loadu_ps(ah + d0 + 32), r5 = _mm256_loadu_ps(ah + d0 + 40);
                __m256 r6 = _mm256_loadu_ps(ah + d0 + 48), r7 = _mm256_loadu_ps(ah + d0 + 56);
                for (int s = 0; s < m; s++) {
                    const __m256 p = _mm256_broadcast_ss(ph + s);
                    const float *vp = vh + s * row + d0;
                    r0 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vp), r0);
                    r1 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vp + 8), r1);
                    r2 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vp + 16), r2);
                    r3 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vp + 24), r3);
                    r4 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vp + 32), r4);
                    r5 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vp + 40), r5);
                    r6 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vp + 48), r6);
                    r7 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vp + 56), r7);
                }
                _mm256_storeu_ps(ah + d0, r0);
                _mm256_storeu_ps(ah + d0 + 8, r1);
                _mm256_storeu_ps(ah + d0 + 16, r2);
                _mm256_storeu_ps(ah + d0 + 24, r3);
                _mm256_storeu_ps(ah + d0 + 32, r4);
                _mm256_storeu_ps(ah + d0 + 40, r5);
                _mm256_storeu_ps(ah + d0 + 48, r6);
                _mm256_storeu_ps(ah + d0 + 56, r7);
            }
            for (; d0 < dim; d0 += 8) { /* the last dims when dim is not a multiple of 64 */
                __m256 r = _mm256_loadu_ps(ah + d0);
                for (int s = 0; s < m; s++)
                    r = _mm256_fmadd_ps(_mm256_broadcast_ss(ph + s), _mm256_loadu_ps(vh + s * row + d0), r);
                _mm256_storeu_ps(ah + d0, r);
            }
        }
    }
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

/* One piece of work: tokens [t_begin, t_begin + n) of one sequence (t_begin on a block boundary). Writes, per
 * head, the max score (mx), the sum of exp(score - max) (sum) and the unnormalised weighted sum of values (acc).
 * Returns 0, or 1 when scratch memory is short. */
static int chunk(const float *qb, const float *k_cache, const float *v_cache, const int32_t *table, int n,
                 int heads, int group, int dim, int block_size, long row, long block, float scale, int fast,
                 float *mx, float *sum, float *acc) {
    const int npad = (n + 7) / 8 * 8;
    float *scores = malloc(sizeof(float) * (size_t)heads * (size_t)npad); /* [heads, npad] */
    void *part = fast ? aligned_alloc(32, 32 * 8 * (size_t)heads) : NULL;  /* heads x 8 vectors of 8 */
    if (!scores || (fast && !part)) { free(scores); free(part); return 1; }
#ifdef LLMOS_AVX2
    if (fast)
        scores_avx2(qb, k_cache, table, n, heads, group, dim, block_size, row, block, scale, scores, npad,
                    (__m256 *)part);
    else
#endif
        scores_portable(qb, k_cache, table, n, heads, group, dim, block_size, row, block, scale, scores, npad);
    for (int h = 0; h < heads; h++) sum[h] = exp_shifted(scores + (long)h * npad, n, mx + h);
    memset(acc, 0, sizeof(float) * (size_t)heads * (size_t)dim);
#ifdef LLMOS_AVX2
    if (fast)
        values_avx2(v_cache, table, n, heads, group, dim, block_size, row, block, scores, npad, acc);
    else
#endif
        values_portable(v_cache, table, n, heads, group, dim, block_size, row, block, scores, npad, acc);
    free(part);
    free(scores);
    return 0;
}

#define LLMOS_CHUNK_TOKENS 256 /* a longer context is split into pieces that run on different threads */

/* Returns 0, or the number of sequences it could not compute: a context length outside
 * [1, table_stride * block_size], a block id outside [0, blocks), or no memory for scratch space. Those
 * rows of out are zero; the caller must treat the whole call as failed.
 *
 * A context longer than LLMOS_CHUNK_TOKENS is cut into block-aligned pieces (flash-decoding): each piece
 * is its own task, and a second pass merges the pieces' softmax statistics, so a single long sequence
 * still uses every thread. */
int llmos_paged_decode(const float *q, long q_stride, const float *k_cache, const float *v_cache, int blocks,
                       const int32_t *tables, int table_stride, const int32_t *ctx, float *out, int batch,
                       int heads, int kv_heads, int dim, int block_size, float scale) {
    const int group = heads / kv_heads;
    const long row = (long)kv_heads * dim; /* floats per cached token */
    const long block = row * block_size;   /* floats per block */
#ifdef LLMOS_AVX2
    const int fast = block_size % 8 == 0 && dim % 8 == 0;
#else
    const int fast = 0;
#endif
    const int piece = (LLMOS_CHUNK_TOKENS + block_size - 1) / block_size * block_size; /* tokens per task */
    /* check every sequence, and number the tasks: sequence b owns tasks first[b] .. first[b + 1] - 1 */
    int *first = malloc(sizeof(int) * ((size_t)batch + 1));
    char *bad = calloc((size_t)batch + 1, 1);
    if (!first || !bad) { free(first); free(bad); memset(out, 0, sizeof(float) * (size_t)batch * heads * dim); return batch; }
    int failed = 0;
    first[0] = 0;
    for (int b = 0; b < batch; b++) {
        const int n = ctx[b];
        const int32_t *table = tables + (long)b * table_stride;
        bad[b] = n < 1 || (long)n > (long)table_stride * block_size;
        for (int i = 0; !bad[b] && i < (n + block_size - 1) / block_size; i++) bad[b] = table[i] < 0 || table[i] >= blocks;
        first[b + 1] = first[b] + (bad[b] ? 0 : (n + piece - 1) / piece);
    }
    const int tasks = first[batch];
    const size_t stride = (size_t)heads * (size_t)(dim + 2); /* per task: mx[heads], sum[heads], acc[heads*dim] */
    float *stats = malloc(sizeof(float) * stride * (size_t)(tasks > 0 ? tasks : 1));
    char *short_mem = calloc((size_t)(tasks > 0 ? tasks : 1), 1);
    if (!stats || !short_mem) {
        free(first); free(bad); free(stats); free(short_mem);
        memset(out, 0, sizeof(float) * (size_t)batch * heads * dim);
        return batch;
    }
#pragma omp parallel
    {
#pragma omp for schedule(dynamic, 1)
        for (int task = 0; task < tasks; task++) {
            int b = 0, lo = 0, hi = batch; /* the sequence owning this task: first[b] <= task < first[b + 1] */
            while (lo < hi) { const int mid = (lo + hi) / 2; if (first[mid + 1] <= task) lo = mid + 1; else hi = mid; }
            b = lo;
            const int t_begin = (task - first[b]) * piece;
            const int n = ctx[b] - t_begin < piece ? ctx[b] - t_begin : piece;
            float *st = stats + stride * (size_t)task;
            short_mem[task] = (char)chunk(q + (long)b * q_stride, k_cache, v_cache,
                                          tables + (long)b * table_stride + t_begin / block_size, n, heads, group,
                                          dim, block_size, row, block, scale, fast, st, st + heads, st + 2 * heads);
        }
#pragma omp for schedule(static) reduction(+ : failed)
        for (int b = 0; b < batch; b++) {
            float *ob = out + (long)b * heads * dim;
            int ok = !bad[b];
            for (int task = first[b]; ok && task < first[b + 1]; task++) ok = !short_mem[task];
            if (!ok) { memset(ob, 0, sizeof(float) * (size_t)heads * (size_t)dim); failed += 1; continue; }
            for (int h = 0; h < heads; h++) {
                float m = -INFINITY;
                for (int task = first[b]; task < first[b + 1]; task++) {
                    const float mt = stats[stride * (size_t)task + h];
                    m = mt > m ? mt : m;
                }
                float total = 0.f;
                float *oh = ob + (long)h * dim;
                memset(oh, 0, sizeof(float) * (size_t)dim);
                for (int task = first[b]; task < first[b + 1]; task++) {
                    const float *st = stats + stride * (size_t)task;
                    const float w = expf(st[h] - m);
                    total += st[heads + h] * w;
                    const float *ah = st + 2 * heads + (long)h * dim;
#pragma omp simd
                    for (int d = 0; d < dim; d++) oh[d] += w * ah[d];
                }
                const float inv = 1.f / total;
#pragma omp simd
                for (int d = 0; d < dim; d++) oh[d] *= inv;
            }
        }
    }
    free(first); free(bad); free(stats); free(short_mem);
    return failed;
}
