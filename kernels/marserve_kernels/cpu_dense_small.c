/* Few-token dense linear on CPU: y[T, N] = x[T, K] @ W[N, K]^T (+ bias[N]) for a plain row-major W.
 *
 * Decode reads every weight once per step, so a linear layer with a handful of tokens is a stream over
 * W: each weight row comes from memory once and is dotted with all T tokens while it sits in L1
 * (tokens in groups of up to MAX_GROUP, whose x rows stay in L1; a block of ROW_BLOCK rows is reused
 * from L2 by every group). oneDNN's GEMMs reach 50-70% of the memory bandwidth at these shapes, even
 * on its packed layout; this reaches ~90% (docs/benchmarks.md, "CPU linear layers").
 * Weights are fp32, or bf16 when built with -DWEIGHT_BF16 (widened to fp32 in registers: half the bytes
 * streamed); activations, accumulation and outputs are fp32 in both builds.
 * Built at first use by cpu_dense_native.py (native_build) with -O3 -march=<this machine>.
 */
#ifdef _OPENMP
#include <omp.h>
#endif
#include <stdint.h>
#include <string.h>

typedef float vec __attribute__((vector_size(64)));               /* 16 fp32 lanes */
typedef float vec_u __attribute__((vector_size(64), aligned(4))); /* unaligned access */
#define LANES 16

#ifdef WEIGHT_BF16
typedef uint16_t wtype;
typedef uint16_t wvec_u __attribute__((vector_size(32), aligned(2))); /* 16 bf16 */
typedef uint32_t u32vec __attribute__((vector_size(64)));
static inline vec load_w(const wtype *p) {
    u32vec u = __builtin_convertvector(*(const wvec_u *)p, u32vec) << 16; /* bf16 = the top half of fp32 */
    return (vec)u;
}
static inline float scalar_w(wtype v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
#else
typedef float wtype;
static inline vec load_w(const wtype *p) { return *(const vec_u *)p; }
static inline float scalar_w(wtype v) { return v; }
#endif

#define MAX_GROUP 8     /* tokens per pass over a weight row: 2 rows x 8 tokens = 16 accumulators */
#define ROW_BLOCK 16    /* weight rows reused from L2 by every group of tokens */
#define K_CHUNK 1024    /* floats of each x row per pass when a group's whole rows would not fit L1 */
#define L1_FLOATS 8192  /* 32 KiB of the 48 KiB L1: a group's x rows up to this size stay whole */

/* Keeps a loaded vector in a register: otherwise gcc re-loads it for every FMA that uses it. */
#define PIN(v) __asm__("" : "+v"(v))

static inline float hsum(vec v) {
    typedef float half __attribute__((vector_size(32)));
    typedef float quarter __attribute__((vector_size(16)));
    half a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
             __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    quarter b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (b[0] + b[2]) + (b[1] + b[3]);
}

/* res_a[p] = w_a[0:n) . xs[p][0:n) and res_b[p] = w_b . xs[p] for p < NB: two weight rows share every
 * load of x, NB tokens share every load of w. S partial sums per (row, token) keep >= 8 independent FMA
 * chains in flight when NB is small; n % 16 leftovers are summed in scalar. `ahead` floats further on
 * is prefetched (the next pair of rows when streaming). */
#define DEFINE_DOT2(NB, S)                                                                             \
    static void dot2_##NB(const wtype *w_a, const wtype *w_b, const float *const *xs, int64_t n,     \
                          int64_t ahead, float *res_a, float *res_b) {                                \
        vec acc_a[NB][S], acc_b[NB][S];                                                              \
        for (int p = 0; p < NB; p++)                                                                 \
            for (int s = 0; s < S; s++) acc_a[p][s] = acc_b[p][s] = (vec){0};                        \
        int64_t h = 0;                                                                               \
        for (; h + S * LANES <= n; h += S * LANES)                                                   \
            for (int s = 0; s < S; s++) {                                                            \
                vec wa = load_w(w_a + h + s * LANES);                                                \
                vec wb = load_w(w_b + h + s * LANES);                                                \
                __builtin_prefetch(w_a + ahead + h + s * LANES);                                    \
                __builtin_prefetch(w_b + ahead + h + s * LANES);                                    \
                PIN(wa); PIN(wb);                                                                    \
                for (int p = 0; p < NB; p++) {                                                       \
                    vec xv = *(const vec_u *)(xs[p] + h + s * LANES);                                \
                    PIN(xv);                                                                         \
                    acc_a[p][s] += wa * xv;                                                          \
                    acc_b[p][s] += wb * xv;                                                          \
                }                                                                                    \
            }                                                                                        \
        for (; h + LANES <= n; h += LANES) {                                                         \
            vec wa = load_w(w_a + h), wb = load_w(w_b + h);                                          \
            for (int p = 0; p < NB; p++) {                                                           \
                vec xv = *(const vec_u *)(xs[p] + h);                                                \
                acc_a[p][0] += wa * xv;                                                              \
                acc_b[p][0] += wb * xv;                                                              \
            }                                                                                        \
        }                                                                                            \
        for (int p = 0; p < NB; p++) {                                                               \
            for (int s = 1; s < S; s++) { acc_a[p][0] += acc_a[p][s]; acc_b[p][0] += acc_b[p][s]; }  \
            float sa = hsum(acc_a[p][0]), sb = hsum(acc_b[p][0]);                                    \
            for (int64_t t = h; t < n; t++) {                                                        \
                sa += scalar_w(w_a[t]) * xs[p][t];                                                   \
                sb += scalar_w(w_b[t]) * xs[p][t];                                                   \
            }                                                                                        \
            res_a[p] = sa;                                                                           \
            res_b[p] = sb;                                                                           \
        }                                                                                            \
    }
DEFINE_DOT2(1, 4)
DEFINE_DOT2(2, 2)
DEFINE_DOT2(3, 2)
DEFINE_DOT2(4, 1)
DEFINE_DOT2(5, 1)
DEFINE_DOT2(6, 1)
DEFINE_DOT2(7, 1)
DEFINE_DOT2(8, 1)

typedef void (*dot2_fn)(const wtype *, const wtype *, const float *const *, int64_t, int64_t, float *, float *);
static const dot2_fn DOT2[MAX_GROUP + 1] = {0, dot2_1, dot2_2, dot2_3, dot2_4, dot2_5, dot2_6, dot2_7, dot2_8};

/* Rows [n0, n1) of y: y[t, n] = x[t] . w[n] (+ bias[n]). x [T, K] with row stride ldx, y [T, N]. */
static void dense_rows(const float *x, int64_t ldx, const wtype *w, const float *bias, float *y, int64_t T,
                       int64_t K, int64_t N, int64_t n0, int64_t n1) {
    const float *xs[MAX_GROUP];
    float d0[MAX_GROUP], d1[MAX_GROUP];
    int64_t groups = (T + MAX_GROUP - 1) / MAX_GROUP;
    for (int64_t blk = n0; blk < n1; blk += ROW_BLOCK) {
        int64_t blk_end = blk + ROW_BLOCK < n1 ? blk + ROW_BLOCK : n1;
        for (int64_t g = 0; g < groups; g++) {
            int64_t t0 = T * g / groups, nb = T * (g + 1) / groups - t0; /* balanced groups: 12 = 6 + 6 */
            int64_t chunk = nb * K <= L1_FLOATS ? K : K_CHUNK;
            for (int64_t c = 0; c < K; c += chunk) {
                int64_t len = K - c < chunk ? K - c : chunk;
                for (int64_t p = 0; p < nb; p++) xs[p] = x + (t0 + p) * ldx + c;
                /* Two rows per pass share the loads of x; an odd last row is paired with itself. */
                for (int64_t n = blk; n < blk_end; n += 2) {
                    int64_t n_b = n + 1 < blk_end ? n + 1 : n;
                    DOT2[nb](w + n * K + c, w + n_b * K + c, xs, len, 2 * K, d0, d1);
                    for (int64_t p = 0; p < nb; p++) {
                        float *o = y + (t0 + p) * N;
                        if (c == 0) {
                            o[n] = d0[p] + (bias ? bias[n] : 0.f);
                            if (n_b != n) o[n_b] = d1[p] + (bias ? bias[n_b] : 0.f);
                        } else {
                            o[n] += d0[p];
                            if (n_b != n) o[n_b] += d1[p];
                        }
                    }
                }
            }
        }
    }
}

/* y[T, N] = x[T, K] @ w[N, K]^T (+ bias[N], NULL for none) on `threads` OpenMP threads, each taking a
 * contiguous slice of the N rows (torch's own OpenMP runtime when loaded with torch, so its already
 * spinning workers are reused). x rows are ldx floats apart (>= K); y is contiguous. */
void dense_small(const float *x, int64_t ldx, const wtype *w, const float *bias, float *y, int64_t T, int64_t K,
                 int64_t N, int64_t threads) {
    if (threads <= 1 || N < 4) {
        dense_rows(x, ldx, w, bias, y, T, K, N, 0, N);
        return;
    }
#pragma omp parallel num_threads(threads)
    {
        int64_t t = 0, nt = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        nt = omp_get_num_threads();
#endif
        /* Even boundaries: rows go in pairs. */
        int64_t n0 = N * t / nt / 2 * 2, n1 = t == nt - 1 ? N : N * (t + 1) / nt / 2 * 2;
        dense_rows(x, ldx, w, bias, y, T, K, N, n0, n1);
    }
}
