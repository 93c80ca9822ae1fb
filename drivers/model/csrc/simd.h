/* Small SIMD helpers shared by the native CPU kernels, and the bfloat16 conversions. */
#ifndef LLMOS_SIMD_H
#define LLMOS_SIMD_H

#include <stdint.h>

/* bfloat16 is the top half of a float32: widening is exact; narrowing rounds to nearest even, as torch
 * does (NaN stays a quiet NaN). */
static inline float llmos_bf16_to_f32(uint16_t v) {
    union { uint32_t u; float f; } x = {(uint32_t)v << 16};
    return x.f;
}

static inline uint16_t llmos_f32_to_bf16(float f) {
    union { float f; uint32_t u; } x = {f};
    if ((x.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x.u >> 16) | 0x40u);
    return (uint16_t)((x.u + 0x7fffu + ((x.u >> 16) & 1u)) >> 16);
}

/* f rounded to the nearest bfloat16, as a float: a torch operator on bfloat16 tensors rounds its result so */
static inline float llmos_round_bf16(float f) { return llmos_bf16_to_f32(llmos_f32_to_bf16(f)); }

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LLMOS_AVX2 1

/* e^x for 8 floats: Cody-Waite range reduction and a degree-5 polynomial (the classic Cephes expf
 * scheme), within 2 ulp of expf over the float range; inputs below -87.3 give 0, above 88.7 give +inf. */
static inline __m256 llmos_exp256(__m256 x) {
    const __m256 hi = _mm256_set1_ps(88.3762626647949f), lo = _mm256_set1_ps(-87.3365447504f);
    const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
    __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    const __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(under, _mm256_mul_ps(y, _mm256_castsi256_ps(pow2n)));
}

/* 8 bfloat16 values widened to 8 floats (exact) */
static inline __m256 llmos_load_bf16x8(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
#endif

#endif
