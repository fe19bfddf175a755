/* Few-token dense linear on CPU: y[T, N] = x[T, K] @ W[N, K]^T (+ bias[N]) for a plain row-major W.
 *
 * Decode reads every weight once per step, so a linear layer with a handful of tokens is a stream over
 * W: each weight row comes from memory once and is dotted with all T tokens while it sits in L1 or L2.
 * Two forms: below OUTER_MIN_T tokens the dot form (4 rows x up to DOT_T tokens per pass, token groups
 * reusing a block of rows from L2), from there the outer-product form on a transposed block of W (fewer
 * loads per FMA, no sums across lanes, once the transpose is paid for by enough tokens). oneDNN's GEMMs
 * reach 50-75% of the memory bandwidth at decode shapes, even on its packed layout (docs/benchmarks.md,
 * "CPU linear layers").
 * Weights are fp32, or bf16 when built with -DWEIGHT_BF16 (widened to fp32 in registers: half the bytes
 * streamed); activations, accumulation and outputs are fp32 in both builds.
 * Register tiles follow the vector width (cpu_simd.h): AVX-512 runs 4 rows x 4 tokens and 12-token outer passes,
 * AVX2 and the portable path 4 x 2 (4 x 1) and 6-token passes, so no accumulator spills on 16 registers.
 * Built at first use by cpu_dense_native.py (native_build) for the ISA cpu_features picks.
 */
#ifdef _OPENMP
#include <omp.h>
#endif
#include <stdint.h>
#include <string.h>

#include "cpu_simd.h"

#define K_CHUNK 1024    /* floats of each x row per pass when a group's whole rows would not fit L1 */
#define L1_FLOATS 8192  /* 32 KiB of the 48 KiB L1: a group's x rows up to this size stay whole */


/* ---- Many tokens: the outer-product form on a transposed block --------------------------------------
 * With many tokens the dot form below is compute-bound, and its sums across lanes and x loads cost a
 * large share. Here a block of BN rows x KC columns of W is transposed (and widened to fp32) into
 * an L1 scratch wt[KC][BN] once per call, and each group of up to TB tokens accumulates
 * y[t, n:n+BN] += x[t, k] * wt[k, :] over the chunk: 2 vector loads and TB broadcasts feed 2*TB FMAs,
 * and the outputs come out as whole vectors, no sums across lanes. */
#define BN (2 * LANES) /* rows per block: two vectors of outputs */
#define KC 256         /* columns per chunk: wt is KC x BN fp32 = 16 (AVX2) or 32 KiB (AVX-512) */
#define TB (VREGS == 32 ? 12 : 6) /* tokens per pass: 2 * TB accumulators + 2 weight vectors + a broadcast fit */
#define T_SUPER 64     /* tokens whose outputs one block keeps in its buffer; more are done in turns */

/* wt[k][col0 + i] = w[i][k] for i, k < LANES (w rows ldw apart); `pf` rows are prefetched alongside. */
static inline void transpose_block(const wtype *w, int64_t ldw, const wtype *pf, float *wt, int col0) {
    vec r[LANES];
    for (int i = 0; i < LANES; i++) {
        r[i] = load_w(w + i * ldw);
        __builtin_prefetch(pf + i * ldw);
    }
    TRANSPOSE(r);
    for (int k = 0; k < LANES; k++) *(vec *)(wt + k * BN + col0) = r[k];
}

/* acc[t][0:BN] += sum over k < kc of x[t][k] * wt[k][0:BN] for t < NT (x rows ldx apart). */
#define DEFINE_OUTER(NT)                                                                               \
    static void outer_##NT(const float *x, int64_t ldx, const float *wt, int64_t kc, float *acc) {    \
        vec a0[NT], a1[NT];                                                                            \
        for (int t = 0; t < NT; t++) {                                                                 \
            a0[t] = *(const vec *)(acc + t * BN);                                                      \
            a1[t] = *(const vec *)(acc + t * BN + LANES);                                              \
        }                                                                                              \
        for (int64_t k = 0; k < kc; k++) {                                                             \
            vec w0 = *(const vec *)(wt + k * BN), w1 = *(const vec *)(wt + k * BN + LANES);           \
            PIN(w0); PIN(w1);                                                                          \
            for (int t = 0; t < NT; t++) {                                                             \
                vec xb = SPLAT(x[t * ldx + k]); /* a broadcast load, no shuffle */                    \
                a0[t] += xb * w0;                                                                      \
                a1[t] += xb * w1;                                                                      \
            }                                                                                          \
        }                                                                                              \
        for (int t = 0; t < NT; t++) {                                                                 \
            *(vec *)(acc + t * BN) = a0[t];                                                            \
            *(vec *)(acc + t * BN + LANES) = a1[t];                                                    \
        }                                                                                              \
    }
typedef void (*outer_fn)(const float *, int64_t, const float *, int64_t, float *);
DEFINE_OUTER(1) DEFINE_OUTER(2) DEFINE_OUTER(3) DEFINE_OUTER(4) DEFINE_OUTER(5) DEFINE_OUTER(6)
#if TB == 12
DEFINE_OUTER(7) DEFINE_OUTER(8) DEFINE_OUTER(9) DEFINE_OUTER(10) DEFINE_OUTER(11) DEFINE_OUTER(12)
static const outer_fn OUTER[TB + 1] = {0, outer_1, outer_2, outer_3, outer_4, outer_5, outer_6,
                                       outer_7, outer_8, outer_9, outer_10, outer_11, outer_12};
#else
static const outer_fn OUTER[TB + 1] = {0, outer_1, outer_2, outer_3, outer_4, outer_5, outer_6};
#endif

/* Rows [n0, n1) of y by the outer-product form (same contract as dense_rows4). */
static void dense_rows_outer(const float *x, int64_t ldx, const wtype *w, const float *bias, float *y, int64_t T,
                             int64_t K, int64_t N, int64_t n0, int64_t n1) {
    float wt[KC * BN] __attribute__((aligned(64)));
    float acc[T_SUPER * BN] __attribute__((aligned(64)));
    for (int64_t blk = n0; blk < n1; blk += BN) {
        int64_t nr = n1 - blk < BN ? n1 - blk : BN; /* rows in this block; the rest of wt stays 0 */
        for (int64_t ts = 0; ts < T; ts += T_SUPER) {
            int64_t tn = T - ts < T_SUPER ? T - ts : T_SUPER;
            for (int64_t t = 0; t < tn; t++)
                for (int j = 0; j < BN; j++) acc[t * BN + j] = bias && j < nr ? bias[blk + j] : 0.f;
            for (int64_t c = 0; c < K; c += KC) {
                int64_t kc = K - c < KC ? K - c : KC;
                /* Where the next chunk's data is: the same rows further on, or the next block. */
                const wtype *next = c + KC < K ? w + blk * K + c + KC : w + (blk + BN < n1 ? blk + BN : blk) * K;
                int64_t k = 0;
                if (nr == BN)
                    for (; k + LANES <= kc; k += LANES) {
                        transpose_block(w + blk * K + c + k, K, next + k, wt + k * BN, 0);
                        transpose_block(w + (blk + LANES) * K + c + k, K, next + LANES * K + k, wt + k * BN, LANES);
                    }
                for (int64_t kk = k; kk < kc; kk++) /* a short block or K's tail: one by one */
                    for (int j = 0; j < BN; j++) wt[kk * BN + j] = j < nr ? scalar_w(w[(blk + j) * K + c + kk]) : 0.f;
                int64_t groups = (tn + TB - 1) / TB;
                for (int64_t g = 0; g < groups; g++) {
                    int64_t t0 = tn * g / groups, nt = tn * (g + 1) / groups - t0;
                    OUTER[nt](x + (ts + t0) * ldx + c, ldx, wt, kc, acc + t0 * BN);
                }
            }
            for (int64_t t = 0; t < tn; t++) memcpy(y + (ts + t) * N + blk, acc + t * BN, nr * sizeof(float));
        }
    }
}

/* ---- The dot form on 4 rows x DOT_T tokens, with the sums across lanes done LANES at a time -----------
 * DOT_T = LANES / 4 (4 with AVX-512, 2 with AVX2, 1 portable), so the tile has exactly LANES accumulators:
 * 4 weight vectors and DOT_T x vectors feed 4 * DOT_T FMAs (AVX-512: 16 accumulators + 8 loads of 32
 * registers; AVX2: 8 + 5 of 16), and the LANES accumulators are summed across lanes together
 * (TRANSPOSE_SUM), ending in one vector of LANES sums; at 16 lanes 45 vector ops for 16 outputs where one
 * horizontal sum each costs ~7. For 1-DOT_T tokens this is a plain stream over W.
 * PF: prefetch the rows `ahead` further (the pass that streams the rows from memory; later token groups
 * find them in cache). */
#define DOT_T (LANES / 4)
#define W_LINE (64 / (int)sizeof(wtype))          /* weights per cache line */
#define W_STEP (W_LINE > LANES ? W_LINE : LANES) /* weights per row per step: a cache line, or a vector */
/* One token: row after row (dense_rows_one) on AVX2 and the portable path, where it streams at ~100% of the
 * read bandwidth against ~75% for the 4-row tiles (AMD EPYC Zen 3, 32000 x 512 fp32, 2 threads, interleaved
 * runs); AVX-512 keeps the tiles, measured at ~90% on an Intel Xeon (docs/benchmarks.md), until the row form
 * is measured there. -DONE_TOKEN_ROWS=0/1 overrides. */
#ifndef ONE_TOKEN_ROWS
#define ONE_TOKEN_ROWS (LANES < 16)
#endif
#define ONE_TOKEN_PREFETCH 16384 /* bytes ahead the row form prefetches (Zen 3: 4-32 KiB alike; none: bf16 25-35% slower) */
/* One vector of 4 weight rows at column s, dotted with NT tokens. */
#define DOT4_STEP(NT, s) do {                                                                          \
        vec wv[4];                                                                                     \
        for (int r = 0; r < 4; r++) {                                                                  \
            wv[r] = load_w(w + r * ldw + (s));                                                         \
            PIN(wv[r]);                                                                                \
        }                                                                                              \
        for (int t = 0; t < NT; t++) {                                                                 \
            vec xv = *(const vec_u *)(x + t * ldx + (s));                                              \
            PIN(xv);                                                                                   \
            for (int r = 0; r < 4; r++) acc[r * DOT_T + t] += wv[r] * xv;                              \
        }                                                                                              \
    } while (0)
#define DEFINE_DOT4(NT, PF)                                                                            \
    static void dot4_##NT##_##PF(const wtype *w, int64_t ldw, const float *x, int64_t ldx, int64_t n,     \
                                 int64_t ahead, float *res) {                                          \
        vec acc[LANES];                                                                                \
        _Pragma("GCC unroll 16") for (int i = 0; i < LANES; i++) acc[i] = (vec){0};                    \
        int64_t h = 0;                                                                                 \
        for (; h + W_STEP <= n; h += W_STEP) { /* a cache line of each row per step: one prefetch each */ \
            if (PF)                                                                                    \
                for (int r = 0; r < 4; r++) __builtin_prefetch(w + r * ldw + h + ahead);               \
            _Pragma("GCC unroll 4") for (int64_t s = h; s < h + W_STEP; s += LANES)                    \
                DOT4_STEP(NT, s);                                                                      \
        }                                                                                              \
        for (; h + LANES <= n; h += LANES) DOT4_STEP(NT, h);                                           \
        vec sums;                                                                                      \
        TRANSPOSE_SUM(acc, sums);                                                                      \
        *(vec_u *)res = sums; /* res[r * DOT_T + t] */                                                 \
        for (; h < n; h++) /* n % LANES leftovers */                                                   \
            for (int r = 0; r < 4; r++)                                                                \
                for (int t = 0; t < NT; t++) res[r * DOT_T + t] += scalar_w(w[r * ldw + h]) * x[t * ldx + h]; \
    }
typedef void (*dot4_fn)(const wtype *, int64_t, const float *, int64_t, int64_t, int64_t, float *);
DEFINE_DOT4(1, 0) DEFINE_DOT4(1, 1)
#if DOT_T == 4
DEFINE_DOT4(2, 0) DEFINE_DOT4(3, 0) DEFINE_DOT4(4, 0) DEFINE_DOT4(2, 1) DEFINE_DOT4(3, 1) DEFINE_DOT4(4, 1)
static const dot4_fn DOT4[2][DOT_T + 1] = {{0, dot4_1_0, dot4_2_0, dot4_3_0, dot4_4_0},
                                           {0, dot4_1_1, dot4_2_1, dot4_3_1, dot4_4_1}};
#elif DOT_T == 2
DEFINE_DOT4(2, 0) DEFINE_DOT4(2, 1)
static const dot4_fn DOT4[2][DOT_T + 1] = {{0, dot4_1_0, dot4_2_0}, {0, dot4_1_1, dot4_2_1}};
#else
static const dot4_fn DOT4[2][DOT_T + 1] = {{0, dot4_1_0}, {0, dot4_1_1}};
#endif

/* One token: y[n] = x . w[n] row after row, so W is read as one sequential stream (the 4-row tiles read
 * four streams a row apart, which the hardware prefetchers of the AMD hosts follow poorly when rows are
 * short), with a software prefetch per cache line far enough ahead to cover the memory latency. Four
 * accumulators along K keep the FMA chains independent. */
static void dense_rows_one(const float *x, const wtype *w, const float *bias, float *y, int64_t K, int64_t n0,
                           int64_t n1) {
    for (int64_t n = n0; n < n1; n++) {
        const wtype *wr = w + n * K;
        vec a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
        int64_t h = 0;
        for (; h + 4 * LANES <= K; h += 4 * LANES) {
            for (int b = 0; b < 4 * LANES * (int)sizeof(wtype); b += 64) /* every cache line */
                __builtin_prefetch((const char *)(wr + h) + b + ONE_TOKEN_PREFETCH);
            a0 += load_w(wr + h) * *(const vec_u *)(x + h);
            a1 += load_w(wr + h + LANES) * *(const vec_u *)(x + h + LANES);
            a2 += load_w(wr + h + 2 * LANES) * *(const vec_u *)(x + h + 2 * LANES);
            a3 += load_w(wr + h + 3 * LANES) * *(const vec_u *)(x + h + 3 * LANES);
        }
        for (; h + LANES <= K; h += LANES) a0 += load_w(wr + h) * *(const vec_u *)(x + h);
        float sum = hsum((a0 + a1) + (a2 + a3));
        for (; h < K; h++) sum += scalar_w(wr[h]) * x[h];
        y[n] = sum + (bias ? bias[n] : 0.f);
    }
}

#define ROWS4_BLOCK 16 /* weight rows reused from L2 by every group of DOT_T tokens */
/* Rows [n0, n1) of y: y[t, n] = x[t] . w[n] (+ bias[n]), x [T, K] with rows ldx floats apart, y [T, N].
 * Tokens in balanced groups of up to DOT_T; a block of 16 rows comes from memory once (the first group's
 * pass) and is reused from L2 by the other groups, each group's x rows staying in L1 (chunked along K
 * when they would not fit). A last block of fewer than 4 rows repeats
 * its last row (computed twice, stored once). */
static void dense_rows4(const float *x, int64_t ldx, const wtype *w, const float *bias, float *y, int64_t T,
                        int64_t K, int64_t N, int64_t n0, int64_t n1) {
#if ONE_TOKEN_ROWS
    if (T == 1) {
        dense_rows_one(x, w, bias, y, K, n0, n1);
        return;
    }
#endif
    float res[LANES] __attribute__((aligned(64)));
    int64_t groups = (T + DOT_T - 1) / DOT_T;
    for (int64_t blk = n0; blk < n1; blk += ROWS4_BLOCK) {
        int64_t blk_end = blk + ROWS4_BLOCK < n1 ? blk + ROWS4_BLOCK : n1;
        for (int64_t g = 0; g < groups; g++) {
            int64_t t0 = T * g / groups, nb = T * (g + 1) / groups - t0; /* balanced: 6 = 3 + 3 (DOT_T 4) */
            int64_t chunk = nb * K <= L1_FLOATS ? K : K_CHUNK;
            for (int64_t c = 0; c < K; c += chunk) {
                int64_t len = K - c < chunk ? K - c : chunk;
                for (int64_t n = blk; n < blk_end; n += 4) {
                    int64_t nr = blk_end - n < 4 ? blk_end - n : 4;
                    const wtype *wr = w + n * K + c;
                    if (nr == 4) {
                        /* One token: the hardware prefetchers alone stream faster (measured). */
                        DOT4[g == 0 && T > 1][nb](wr, K, x + t0 * ldx + c, ldx, len, 4 * K, res);
                    } else { /* the block's last rows: copies of the last one fill the 4 */
                        const wtype *rows[4];
                        for (int r = 0; r < 4; r++) rows[r] = w + (n + (r < nr ? r : nr - 1)) * K + c;
                        for (int r = 0; r < 4; r++)
                            for (int t = 0; t < nb; t++) {
                                float sum = 0.f;
                                for (int64_t h = 0; h < len; h++) sum += scalar_w(rows[r][h]) * x[(t0 + t) * ldx + c + h];
                                res[r * DOT_T + t] = sum;
                            }
                    }
                    for (int64_t t = 0; t < nb; t++) {
                        float *o = y + (t0 + t) * N + n;
                        for (int64_t r = 0; r < nr; r++)
                            o[r] = (c == 0 ? (bias ? bias[n + r] : 0.f) : o[r]) + res[r * DOT_T + t];
                    }
                }
            }
        }
    }
}

#ifndef OUTER_MIN_T
#define OUTER_MIN_T 48 /* tokens from which the outer-product form is faster (measured) */
#endif

/* Rows [n0, n1) of thread t's share of N rows among nt: boundaries on multiples of BN rows (the outer form's
 * blocks, a multiple of the dot form's groups of 4); the last thread takes the rest. */
static void split_rows(int64_t N, int64_t t, int64_t nt, int64_t *n0, int64_t *n1) {
    *n0 = N * t / nt / BN * BN;
    *n1 = t == nt - 1 ? N : N * (t + 1) / nt / BN * BN;
}

/* y[T, N] = x[T, K] @ w[N, K]^T (+ bias[N], NULL for none) on `threads` OpenMP threads, each taking a
 * contiguous slice of the N rows (torch's own OpenMP runtime when loaded with torch, so its already
 * spinning workers are reused). x rows are ldx floats apart (>= K); y is contiguous. */
void dense_small(const float *x, int64_t ldx, const wtype *w, const float *bias, float *y, int64_t T, int64_t K,
                 int64_t N, int64_t threads) {
    void (*rows)(const float *, int64_t, const wtype *, const float *, float *, int64_t, int64_t, int64_t, int64_t,
                 int64_t) = T >= OUTER_MIN_T ? dense_rows_outer : dense_rows4;
    if (threads <= 1 || N < 4) {
        rows(x, ldx, w, bias, y, T, K, N, 0, N);
        return;
    }
#pragma omp parallel num_threads(threads)
    {
        int64_t t = 0, nt = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        nt = omp_get_num_threads();
#endif
        int64_t n0, n1;
        split_rows(N, t, nt, &n0, &n1);
        rows(x, ldx, w, bias, y, T, K, N, n0, n1);
    }
}
