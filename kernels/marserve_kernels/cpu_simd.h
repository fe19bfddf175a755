/* What marserve_kernels' C kernels share: fp32 vectors of one register's width (GCC vector extensions), a
 * horizontal sum, a sum of LANES vectors across lanes at once, a LANES x LANES transpose, a vector e^x,
 * bf16 <-> fp32, and the weight type of a build (fp32, or bf16 with -DWEIGHT_BF16: widened to fp32 in
 * registers, half the bytes streamed).
 *
 * One path per instruction set, chosen by the macros the compiler flags define (native_build passes
 * -march for the ISA that cpu_features picks, or that MARSERVE_NATIVE_ISA forces):
 *   AVX-512 (__AVX512F__): LANES 16, 32 vector registers;
 *   AVX2 + FMA (__AVX2__ && __FMA__): LANES 8, 16 registers;
 *   portable (anything else, aarch64 included): LANES 4 at the compiler's baseline (SSE2 / NEON), 16 registers
 *   assumed. Kernels size their register tiles from LANES and VREGS, so no vector is wider than a register
 *   (a wider one is split by the compiler, changes the ABI, and spills).
 * native_build hashes this header with each source, so editing it rebuilds them. */
#ifndef MARSERVE_CPU_SIMD_H
#define MARSERVE_CPU_SIMD_H

#include <stdint.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
#define LANES 16
#define VREGS 32
#define SIMD_ISA "avx512"
#elif defined(__AVX2__) && defined(__FMA__)
#define LANES 8
#define VREGS 16
#define SIMD_ISA "avx2"
#else
#define LANES 4
#define VREGS 16
#define SIMD_ISA "generic"
#endif

typedef float vec __attribute__((vector_size(4 * LANES)));
typedef float vec_u __attribute__((vector_size(4 * LANES), aligned(4))); /* unaligned access */
typedef int32_t ivec __attribute__((vector_size(4 * LANES)));
typedef uint32_t u32vec __attribute__((vector_size(4 * LANES)));
typedef uint16_t bf16vec_u __attribute__((vector_size(2 * LANES), aligned(2))); /* LANES bf16, unaligned */

/* Which ISA this build is for: native_build's tests check that the flags chose the intended path. */
const char *simd_isa(void) { return SIMD_ISA; }

/* Keeps a loaded vector in a register: otherwise gcc re-loads it for every FMA that uses it, and the
 * loads, not the FMAs, become the bottleneck. */
#if defined(__x86_64__) || defined(__i386__)
#define PIN(v) __asm__("" : "+v"(v))
#elif defined(__aarch64__)
#define PIN(v) __asm__("" : "+w"(v))
#else
#define PIN(v) ((void)0)
#endif

/* A vector of x in every lane (from memory: one broadcast load, no shuffle). */
#if LANES == 16
#define SPLAT(x) ((vec)_mm512_set1_ps(x))
#elif LANES == 8
#define SPLAT(x) ((vec)_mm256_set1_ps(x))
#else
static inline vec SPLAT(float x) { return (vec){x, x, x, x}; }
#endif

/* Butterfly swaps, the steps of a transpose: SWAP<D>(a, b) exchanges, in every block of 2D lanes, a's upper D
 * lanes with b's lower D lanes (a keeps the blocks' lower halves of both, b the upper halves). */
#if LANES == 16
#define SWAP8(a, b) do { vec lo = __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23); \
    b = __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31); a = lo; } while (0)
#define SWAP4(a, b) do { vec lo = __builtin_shufflevector(a, b, 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27); \
    b = __builtin_shufflevector(a, b, 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31); a = lo; } while (0)
#define SWAP2(a, b) do { vec lo = __builtin_shufflevector(a, b, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29); \
    b = __builtin_shufflevector(a, b, 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31); a = lo; } while (0)
#define SWAP1(a, b) do { vec lo = __builtin_shufflevector(a, b, 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30); \
    b = __builtin_shufflevector(a, b, 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31); a = lo; } while (0)
#elif LANES == 8
#define SWAP4(a, b) do { vec lo = __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11); \
    b = __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15); a = lo; } while (0)
#define SWAP2(a, b) do { vec lo = __builtin_shufflevector(a, b, 0, 1, 8, 9, 4, 5, 12, 13); \
    b = __builtin_shufflevector(a, b, 2, 3, 10, 11, 6, 7, 14, 15); a = lo; } while (0)
#define SWAP1(a, b) do { vec lo = __builtin_shufflevector(a, b, 0, 8, 2, 10, 4, 12, 6, 14); \
    b = __builtin_shufflevector(a, b, 1, 9, 3, 11, 5, 13, 7, 15); a = lo; } while (0)
#else
#define SWAP2(a, b) do { vec lo = __builtin_shufflevector(a, b, 0, 1, 4, 5); \
    b = __builtin_shufflevector(a, b, 2, 3, 6, 7); a = lo; } while (0)
#define SWAP1(a, b) do { vec lo = __builtin_shufflevector(a, b, 0, 4, 2, 6); \
    b = __builtin_shufflevector(a, b, 1, 5, 3, 7); a = lo; } while (0)
#endif

/* TRANSPOSE_SUM(acc, out): acc[0..LANES) -> out, whose lane i is the sum of acc[i]'s lanes (acc is
 * consumed). At each level a pair of vectors is swapped and added, so LANES sums cost ~3 * LANES vector ops
 * where one horizontal sum each would cost ~2 * log2(LANES) * LANES. Unrolled by pragma so that gcc keeps
 * the accumulators in registers (without it, it zeroes and reloads a stack copy). */
#define SUM_LEVEL(acc, SWAP, D) \
    _Pragma("GCC unroll 8") for (int i_ = 0; i_ < (D); i_++) { SWAP(acc[i_], acc[i_ + (D)]); acc[i_] += acc[i_ + (D)]; }
#if LANES == 16
#define TRANSPOSE_SUM(acc, out) do { SUM_LEVEL(acc, SWAP8, 8) SUM_LEVEL(acc, SWAP4, 4) SUM_LEVEL(acc, SWAP2, 2) \
    SWAP1(acc[0], acc[1]); (out) = acc[0] + acc[1]; } while (0)
#elif LANES == 8
#define TRANSPOSE_SUM(acc, out) do { SUM_LEVEL(acc, SWAP4, 4) SUM_LEVEL(acc, SWAP2, 2) \
    SWAP1(acc[0], acc[1]); (out) = acc[0] + acc[1]; } while (0)
#else
#define TRANSPOSE_SUM(acc, out) do { SUM_LEVEL(acc, SWAP2, 2) SWAP1(acc[0], acc[1]); (out) = acc[0] + acc[1]; } while (0)
#endif

/* r[0..LANES) rows -> columns, in place: afterwards r[k] lane i holds what r[i] lane k held. */
#define TRANSPOSE_LEVEL(r, SWAP, D) \
    for (int i_ = 0; i_ < LANES; i_ += 2 * (D)) for (int j_ = 0; j_ < (D); j_++) SWAP(r[i_ + j_], r[i_ + j_ + (D)]);
#if LANES == 16
#define TRANSPOSE(r) do { TRANSPOSE_LEVEL(r, SWAP8, 8) TRANSPOSE_LEVEL(r, SWAP4, 4) TRANSPOSE_LEVEL(r, SWAP2, 2) \
    TRANSPOSE_LEVEL(r, SWAP1, 1) } while (0)
#elif LANES == 8
#define TRANSPOSE(r) do { TRANSPOSE_LEVEL(r, SWAP4, 4) TRANSPOSE_LEVEL(r, SWAP2, 2) TRANSPOSE_LEVEL(r, SWAP1, 1) } while (0)
#else
#define TRANSPOSE(r) do { TRANSPOSE_LEVEL(r, SWAP2, 2) TRANSPOSE_LEVEL(r, SWAP1, 1) } while (0)
#endif

static inline float hsum(vec v) {
    typedef float quarter __attribute__((vector_size(16)));
#if LANES == 16
    typedef float half __attribute__((vector_size(32)));
    half a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
             __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    quarter b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
#elif LANES == 8
    quarter b = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
#else
    quarter b = v;
#endif
    return (b[0] + b[2]) + (b[1] + b[3]);
}

/* e^x on LANES lanes (Cephes-style: 2^k * polynomial on the reduced argument, ~1 ulp); inputs are clamped to
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

/* bf16 is the top half of an fp32: widening is a shift. */
static inline vec load_bf16(const uint16_t *p) { return (vec)(__builtin_convertvector(*(const bf16vec_u *)p, u32vec) << 16); }
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
