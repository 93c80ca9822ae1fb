/* The body of paged_attention.c, instantiated once per KV cache element type (included with KV, KV_FN,
 * KV_GET, KV_LOAD8 and KV_ROUND_PROBS defined: the element type, a name suffixer, one element and 8 elements
 * as floats, and whether the softmax probabilities are rounded to bfloat16 before weighing the values, as
 * torch's CPU flash attention does for bfloat16, the sum of probabilities staying unrounded).
 * Queries, scores, softmax statistics and sums are float32 whatever KV is: a bfloat16 cache is widened
 * as it is read (exact) and accumulated in float32. No include guard: it is meant to be included twice. */

static inline float KV_FN(dot)(const float *a, const KV *b, int n) {
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int i = 0; i < n; i++) s += a[i] * KV_GET(b + i);
    return s;
}

/* scores[h * npad + t] for t < n: scaled q . k. Portable. */
static void KV_FN(scores_portable)(const float *qb, const KV *k_cache, const int32_t *table, int n, int heads, int group,
                            int dim, int block_size, long row, long block, float scale, float *scores, int npad) {
    for (int t0 = 0; t0 < n; t0 += block_size) {
        const KV *kb = k_cache + (long)table[t0 / block_size] * block;
        const int m = n - t0 < block_size ? n - t0 : block_size;
        for (int s = 0; s < m; s++)
            for (int h = 0; h < heads; h++)
                scores[(long)h * npad + t0 + s] =
                    KV_FN(dot)(qb + (long)h * dim, kb + s * row + (long)(h / group) * dim, dim) * scale;
    }
}

static void KV_FN(values_portable)(const KV *v_cache, const int32_t *table, int n, int heads, int group, int dim,
                            int block_size, long row, long block, const float *probs, int npad, float *acc) {
    for (int t0 = 0; t0 < n; t0 += block_size) {
        const KV *vb = v_cache + (long)table[t0 / block_size] * block;
        const int m = n - t0 < block_size ? n - t0 : block_size;
        for (int s = 0; s < m; s++)
            for (int h = 0; h < heads; h++) {
                const float p = probs[(long)h * npad + t0 + s];
                const KV *vp = vb + s * row + (long)(h / group) * dim;
                float *ah = acc + (long)h * dim;
#pragma omp simd
                for (int d = 0; d < dim; d++) ah[d] += p * KV_GET(vp + d);
            }
    }
}

#ifdef LLMOS_AVX2
/* 8 tokens at a time (block_size % 8 == 0, dim % 8 == 0); tokens past n score -inf. The 8 rows are read
 * in memory order (row by row, all heads of a row together) so the hardware prefetcher sees one stream;
 * each (token, head) keeps an 8-lane partial sum in part[], and one transpose-add per head and 8 tokens
 * reduces them. part holds heads * 8 vectors. */
static void KV_FN(scores_avx2)(const float *qb, const KV *k_cache, const int32_t *table, int n, int heads, int group,
                        int dim, int block_size, long row, long block, float scale, float *scores, int npad,
                        __m256 *part) {
    const __m256 vscale = _mm256_set1_ps(scale);
    for (int t0 = 0; t0 < n; t0 += 8) {
        const KV *k0 = k_cache + (long)table[t0 / block_size] * block + (long)(t0 % block_size) * row;
        for (int s = 0; s < 8; s++) {
            const KV *ks = k0 + s * row;
            for (int h = 0; h < heads; h++) {
                const float *qh = qb + (long)h * dim;
                const KV *kh = ks + (long)(h / group) * dim;
                __m256 a = _mm256_mul_ps(_mm256_loadu_ps(qh), KV_LOAD8(kh));
                __m256 c = _mm256_setzero_ps();
                int d = 8;
                for (; d + 8 < dim; d += 16) {
                    c = _mm256_fmadd_ps(_mm256_loadu_ps(qh + d), KV_LOAD8(kh + d), c);
                    a = _mm256_fmadd_ps(_mm256_loadu_ps(qh + d + 8), KV_LOAD8(kh + d + 8), a);
                }
                if (d < dim) c = _mm256_fmadd_ps(_mm256_loadu_ps(qh + d), KV_LOAD8(kh + d), c);
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
static void KV_FN(values_avx2)(const KV *v_cache, const int32_t *table, int n, int heads, int group, int dim,
                        int block_size, long row, long block, const float *probs, int npad, float *acc) {
    for (int t0 = 0; t0 < n; t0 += 8) {
        const KV *v0 = v_cache + (long)table[t0 / block_size] * block + (long)(t0 % block_size) * row;
        const int m = n - t0 < 8 ? n - t0 : 8;
        for (int h = 0; h < heads; h++) {
            const float *ph = probs + (long)h * npad + t0;
            const KV *vh = v0 + (long)(h / group) * dim;
            float *ah = acc + (long)h * dim;
            int d0 = 0;
            for (; d0 + 64 <= dim; d0 += 64) {
                __m256 r0 = _mm256_loadu_ps(ah + d0), r1 = _mm256_loadu_ps(ah + d0 + 8);
                __m256 r2 = _mm256_loadu_ps(ah + d0 + 16), r3 = _mm256_loadu_ps(ah + d0 + 24);
                __m256 r4 = _mm256_loadu_ps(ah + d0 + 32), r5 = _mm256_loadu_ps(ah + d0 + 40);
                __m256 r6 = _mm256_loadu_ps(ah + d0 + 48), r7 = _mm256_loadu_ps(ah + d0 + 56);
                for (int s = 0; s < m; s++) {
                    const __m256 p = _mm256_broadcast_ss(ph + s);
                    const KV *vp = vh + s * row + d0;
                    r0 = _mm256_fmadd_ps(p, KV_LOAD8(vp), r0);
                    r1 = _mm256_fmadd_ps(p, KV_LOAD8(vp + 8), r1);
                    r2 = _mm256_fmadd_ps(p, KV_LOAD8(vp + 16), r2);
                    r3 = _mm256_fmadd_ps(p, KV_LOAD8(vp + 24), r3);
                    r4 = _mm256_fmadd_ps(p, KV_LOAD8(vp + 32), r4);
                    r5 = _mm256_fmadd_ps(p, KV_LOAD8(vp + 40), r5);
                    r6 = _mm256_fmadd_ps(p, KV_LOAD8(vp + 48), r6);
                    r7 = _mm256_fmadd_ps(p, KV_LOAD8(vp + 56), r7);
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
                    r = _mm256_fmadd_ps(_mm256_broadcast_ss(ph + s), KV_LOAD8(vh + s * row + d0), r);
                _mm256_storeu_ps(ah + d0, r);
            }
        }
    }
}
#endif

/* One piece of work: tokens [t_begin, t_begin + n) of one sequence (t_begin on a block boundary). Writes, per
 * head, the max score (mx), the sum of exp(score - max) (sum) and the unnormalised weighted sum of values (acc).
 * Returns 0, or 1 when scratch memory is short. */
static int KV_FN(chunk)(const float *qb, const KV *k_cache, const KV *v_cache, const int32_t *table, int n,
                 int heads, int group, int dim, int block_size, long row, long block, float scale, int fast,
                 float *mx, float *sum, float *acc) {
    const int npad = (n + 7) / 8 * 8;
    float *scores = malloc(sizeof(float) * (size_t)heads * (size_t)npad); /* [heads, npad] */
    void *part = fast ? aligned_alloc(32, 32 * 8 * (size_t)heads) : NULL;  /* heads x 8 vectors of 8 */
    if (!scores || (fast && !part)) { free(scores); free(part); return 1; }
#ifdef LLMOS_AVX2
    if (fast)
        KV_FN(scores_avx2)(qb, k_cache, table, n, heads, group, dim, block_size, row, block, scale, scores, npad,
                    (__m256 *)part);
    else
#endif
        KV_FN(scores_portable)(qb, k_cache, table, n, heads, group, dim, block_size, row, block, scale, scores, npad);
    for (int h = 0; h < heads; h++) {
        sum[h] = exp_shifted(scores + (long)h * npad, n, mx + h);
#if KV_ROUND_PROBS /* torch's CPU attention for bfloat16 weighs the values by probabilities rounded to bfloat16 */
        float *ph = scores + (long)h * npad;
        for (int t = 0; t < n; t++) ph[t] = llmos_round_bf16(ph[t]);
#endif
    }
    memset(acc, 0, sizeof(float) * (size_t)heads * (size_t)dim);
#ifdef LLMOS_AVX2
    if (fast)
        KV_FN(values_avx2)(v_cache, table, n, heads, group, dim, block_size, row, block, scores, npad, acc);
    else
#endif
        KV_FN(values_portable)(v_cache, table, n, heads, group, dim, block_size, row, block, scores, npad, acc);
    free(part);
    free(scores);
    return 0;
}

#ifndef LLMOS_CHUNK_TOKENS
#define LLMOS_CHUNK_TOKENS 256 /* a longer context is split into pieces that run on different threads */
#endif

/* Returns 0, or the number of sequences it could not compute: a context length outside
 * [1, table_stride * block_size], a block id outside [0, blocks), or no memory for scratch space. Those
 * rows of out are zero; the caller must treat the whole call as failed.
 *
 * A context longer than LLMOS_CHUNK_TOKENS is cut into block-aligned pieces (flash-decoding): each piece
 * is its own task, and a second pass merges the pieces' softmax statistics, so a single long sequence
 * still uses every thread. */
int KV_FN(llmos_paged_decode)(const float *q, long q_stride, const KV *k_cache, const KV *v_cache, int blocks,
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
            short_mem[task] = (char)KV_FN(chunk)(q + (long)b * q_stride, k_cache, v_cache,
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
