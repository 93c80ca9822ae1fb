/* Fused element-wise kernels for the paged engine's forward on the CPU (contiguous rows), in float32
 * and in bfloat16. Each replaces a chain of small torch operators whose dispatch costs more than their
 * arithmetic at decode batch sizes. Rows are split over the process's OpenMP threads when there are enough.
 *
 * The bfloat16 kernels compute in float32 and round to bfloat16 where the transformers Llama's chain of
 * bfloat16 operators rounds (each operator's result), so a bfloat16 model gives the tokens that
 * transformers' own forward gives: the residual sum; the normalised row, then its product with the weight
 * (LlamaRMSNorm: float32 statistics, two roundings); silu(gate), then its product with up; x * cos,
 * rotate_half(x) * sin, then their sum.
 */
#include <math.h>
#include <stdint.h>

#include "simd.h"

#define LLMOS_PAR_MIN 32768 /* below this many elements one thread is faster than a fork/join */

int llmos_fused_ops_abi(void) { return 2; }

/* If delta: h += delta (the residual add). Then out = w * (h / sqrt(mean(h^2) + eps)), as LlamaRMSNorm. */
void llmos_add_rms_norm(float *h, const float *delta, const float *w, float *out, int rows, int dim, float eps) {
#pragma omp parallel for if ((long)rows * dim >= LLMOS_PAR_MIN)
    for (int r = 0; r < rows; r++) {
        float *x = h + (long)r * dim;
        float *o = out + (long)r * dim;
        if (delta) {
            const float *dr = delta + (long)r * dim;
#pragma omp simd
            for (int i = 0; i < dim; i++) x[i] += dr[i];
        }
        float ss = 0.f;
#pragma omp simd reduction(+ : ss)
        for (int i = 0; i < dim; i++) ss += x[i] * x[i];
        const float inv = 1.0f / sqrtf(ss / (float)dim + eps);
#pragma omp simd
        for (int i = 0; i < dim; i++) o[i] = w[i] * (x[i] * inv);
    }
}

/* out[r, i] = silu(gu[r, i]) * gu[r, inter + i]: the gated MLP's activation on a fused gate|up row. */
void llmos_silu_mul(const float *gu, float *out, int rows, int inter) {
#pragma omp parallel for if ((long)rows * inter >= LLMOS_PAR_MIN)
    for (int r = 0; r < rows; r++) {
        const float *g = gu + (long)r * 2 * inter, *u = g + inter;
        float *o = out + (long)r * inter;
        int i = 0;
#ifdef LLMOS_AVX2
        const __m256 one = _mm256_set1_ps(1.f), zero = _mm256_setzero_ps();
        for (; i + 8 <= inter; i += 8) {
            const __m256 x = _mm256_loadu_ps(g + i);
            const __m256 e = llmos_exp256(_mm256_sub_ps(zero, x));
            _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
        }
#endif
        for (; i < inter; i++) o[i] = g[i] / (1.f + expf(-g[i])) * u[i];
    }
}

/* Rotary position embedding in place on the first `heads` heads (of `dim` floats) of each token's row
 * (queries, then keys): x' = x * cos + rotate_half(x) * sin, with rotate_half(x) = (-x2, x1).
 * cos, sin: [tokens, dim]; rows are row_stride >= heads * dim floats apart. */
void llmos_rope(float *x, long row_stride, const float *cos, const float *sin, int tokens, int heads, int dim) {
    const int half = dim / 2;
#pragma omp parallel for if ((long)tokens * heads * dim >= LLMOS_PAR_MIN)
    for (int t = 0; t < tokens; t++) {
        const float *c = cos + (long)t * dim, *s = sin + (long)t * dim;
        for (int h = 0; h < heads; h++) {
            float *v = x + (long)t * row_stride + (long)h * dim;
#pragma omp simd
            for (int i = 0; i < half; i++) {
                const float a = v[i], b = v[i + half];
                v[i] = a * c[i] - b * s[i];
                v[i + half] = b * c[i + half] + a * s[i + half];
            }
        }
    }
}

typedef uint16_t bf16;
#define F(x) llmos_bf16_to_f32(x)
#define R(x) llmos_round_bf16(x)

void llmos_add_rms_norm_bf16(bf16 *h, const bf16 *delta, const bf16 *w, bf16 *out, int rows, int dim, float eps) {
#pragma omp parallel for if ((long)rows * dim >= LLMOS_PAR_MIN)
    for (int r = 0; r < rows; r++) {
        bf16 *x = h + (long)r * dim;
        bf16 *o = out + (long)r * dim;
        if (delta) {
            const bf16 *dr = delta + (long)r * dim;
#pragma omp simd
            for (int i = 0; i < dim; i++) x[i] = llmos_f32_to_bf16(F(x[i]) + F(dr[i]));
        }
        float ss = 0.f;
#pragma omp simd reduction(+ : ss)
        for (int i = 0; i < dim; i++) ss += F(x[i]) * F(x[i]);
        const float inv = 1.0f / sqrtf(ss / (float)dim + eps);
#pragma omp simd
        for (int i = 0; i < dim; i++) o[i] = llmos_f32_to_bf16(F(w[i]) * R(F(x[i]) * inv));
    }
}

void llmos_silu_mul_bf16(const bf16 *gu, bf16 *out, int rows, int inter) {
#pragma omp parallel for if ((long)rows * inter >= LLMOS_PAR_MIN)
    for (int r = 0; r < rows; r++) {
        const bf16 *g = gu + (long)r * 2 * inter, *u = g + inter;
        bf16 *o = out + (long)r * inter;
        int i = 0;
#ifdef LLMOS_AVX2
        const __m256 one = _mm256_set1_ps(1.f), zero = _mm256_setzero_ps();
        float act[8];
        for (; i + 8 <= inter; i += 8) {
            const __m256 x = llmos_load_bf16x8(g + i);
            _mm256_storeu_ps(act, _mm256_div_ps(x, _mm256_add_ps(one, llmos_exp256(_mm256_sub_ps(zero, x)))));
            for (int j = 0; j < 8; j++) o[i + j] = llmos_f32_to_bf16(R(act[j]) * F(u[i + j]));
        }
#endif
        for (; i < inter; i++) o[i] = llmos_f32_to_bf16(R(F(g[i]) / (1.f + expf(-F(g[i])))) * F(u[i]));
    }
}

void llmos_rope_bf16(bf16 *x, long row_stride, const bf16 *cos, const bf16 *sin, int tokens, int heads, int dim) {
    const int half = dim / 2;
#pragma omp parallel for if ((long)tokens * heads * dim >= LLMOS_PAR_MIN)
    for (int t = 0; t < tokens; t++) {
        const bf16 *c = cos + (long)t * dim, *s = sin + (long)t * dim;
        for (int h = 0; h < heads; h++) {
            bf16 *v = x + (long)t * row_stride + (long)h * dim;
#pragma omp simd
            for (int i = 0; i < half; i++) {
                const float a = F(v[i]), b = F(v[i + half]);
                v[i] = llmos_f32_to_bf16(R(a * F(c[i])) + R(-b * F(s[i])));
                v[i + half] = llmos_f32_to_bf16(R(b * F(c[i + half])) + R(a * F(s[i + half])));
            }
        }
    }
}
