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
 * One sequence is one task: it walks its blocks in order and, for every cached token, uses the
 * token's whole row (all kv heads, contiguous) at once, so memory is read in long sequential runs.
 * Tasks run on the process's OpenMP threads: the runtime, and so the threads, torch already uses.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int llmos_paged_decode_abi(void) { return 2; }

static inline float dot(const float *a, const float *b, int n) {
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

void llmos_paged_decode(const float *q, long q_stride, const float *k_cache, const float *v_cache,
                        const int32_t *tables, int table_stride, const int32_t *ctx, float *out, int batch,
                        int heads, int kv_heads, int dim, int block_size, float scale) {
    const int group = heads / kv_heads;
    const long row = (long)kv_heads * dim; /* floats per cached token */
    const long block = row * block_size;   /* floats per block */
#pragma omp parallel for schedule(dynamic, 1)
    for (int b = 0; b < batch; b++) {
        const int n = ctx[b];
        const int32_t *table = tables + (long)b * table_stride;
        const float *qb = q + (long)b * q_stride;
        float *ob = out + (long)b * heads * dim;
        float *scores = malloc(sizeof(float) * (size_t)heads * (size_t)n); /* [heads, n] */
        float *acc = calloc((size_t)heads * (size_t)dim, sizeof(float));
        if (!scores || !acc) { free(scores); free(acc); continue; }
        for (int t0 = 0; t0 < n; t0 += block_size) {
            const float *kb = k_cache + (long)table[t0 / block_size] * block;
            const int m = n - t0 < block_size ? n - t0 : block_size;
            for (int s = 0; s < m; s++)
                for (int h = 0; h < heads; h++)
                    scores[(long)h * n + t0 + s] = dot(qb + (long)h * dim, kb + s * row + (long)(h / group) * dim, dim)
                                                   * scale;
        }
        for (int h = 0; h < heads; h++) {
            float *sh = scores + (long)h * n;
            float mx = sh[0];
            for (int t = 1; t < n; t++) mx = sh[t] > mx ? sh[t] : mx;
            float sum = 0.f;
            for (int t = 0; t < n; t++) { sh[t] = expf(sh[t] - mx); sum += sh[t]; }
            const float inv = 1.f / sum;
            for (int t = 0; t < n; t++) sh[t] *= inv;
        }
        for (int t0 = 0; t0 < n; t0 += block_size) {
            const float *vb = v_cache + (long)table[t0 / block_size] * block;
            const int m = n - t0 < block_size ? n - t0 : block_size;
            for (int s = 0; s < m; s++)
                for (int h = 0; h < heads; h++) {
                    const float p = scores[(long)h * n + t0 + s];
                    const float *vp = vb + s * row + (long)(h / group) * dim;
                    float *ah = acc + (long)h * dim;
#pragma omp simd
                    for (int d = 0; d < dim; d++) ah[d] += p * vp[d];
                }
        }
        memcpy(ob, acc, sizeof(float) * (size_t)heads * (size_t)dim);
        free(scores);
        free(acc);
    }
}
