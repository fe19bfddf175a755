/* What marserve_kernels' C kernels share: 16-lane fp32 vectors (GCC vector extensions, AVX-512 under
 * -march=native, split into narrower registers elsewhere), a horizontal sum, a vector e^x, bf16 <-> fp32,
 * and the weight type of a build (fp32, or bf16 with -DWEIGHT_BF16: widened to fp32 in registers, half
 * the bytes streamed). native_build hashes this header with each source, so editing it rebuilds them. */
#ifndef MARSERVE_CPU_SIMD_H
#define MARSERVE_CPU_SIMD_H

#include <stdint.h>
#include <string.h>

typedef float vec __attribute__((vector_size(64)));               /* 16 fp32 lanes */
typedef float vec_u __attribute__((vector_size(64), aligned(4))); /* unaligned access */
typedef int32_t ivec __attribute__((vector_size(64)));
#define LANES 16

/* Keeps a loaded vector in a register: otherwise gcc re-loads it for every FMA that uses it, and the
 * loads, not the FMAs, become the bottleneck. */
#define PIN(v) __asm__("" : "+v"(v))

static inline float hsum(vec v) {
    typedef float half __attribute__((vector_size(32)));
    typedef float quarter __attribute__((vector_size(16)));
    half a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
             __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    quarter b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (b[0] + b[2]) + (b[1] + b[3]);
}

/* e^x on 16 lanes (Cephes-style: 2^k * polynomial on the reduced argument, ~1 ulp); inputs are clamped to
 * [-87.3, 88.4], so e^x of a very negative x is ~1e-38 rather than 0. */
static inline vec vexp(vec x) {
    const vec hi = (vec){0} + 88.3762626647949f, lo = (vec){0} - 87.3365478515625f;
    ivec over = x > hi, under = x < lo;
    x = (vec)(((ivec)x & ~over) | ((ivec)hi & over));
    x = (vec)(((ivec)x & ~under) | ((ivec)lo & under));
    const vec magic = (vec){0} + 12582912.f; /* 1.5 * 2^23: adding it rounds to an integer */
    vec k = (x * 1.44269504088896341f + magic) - magic;
    vec r = x - k * 0.693359375f + k * 2.12194440e-4f;
    vec p = 1.9875691500e-4f * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    ivec bits = (__builtin_convertvector(k, ivec) + 127) << 23;
    return p * (vec)bits;
}

/* bf16 is the top half of an fp32. */
typedef uint16_t bf16x16_u __attribute__((vector_size(32), aligned(2)));
typedef uint32_t u32vec __attribute__((vector_size(64)));
static inline vec load_bf16(const uint16_t *p) { return (vec)(__builtin_convertvector(*(const bf16x16_u *)p, u32vec) << 16); }
static inline float bf16_to_float(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
static inline uint16_t float_to_bf16(float f) { /* round to nearest even; NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

#ifdef WEIGHT_BF16
typedef uint16_t wtype;
static inline vec load_w(const wtype *p) { return load_bf16(p); }
static inline float scalar_w(wtype v) { return bf16_to_float(v); }
#else
typedef float wtype;
static inline vec load_w(const wtype *p) { return *(const vec_u *)p; }
static inline float scalar_w(wtype v) { return v; }
#endif

#endif
