/* Few-token MoE on CPU: every touched expert's weight rows are streamed from memory once and
 * dotted with all of that expert's tokens while the row sits in L1, which is what makes decode
 * memory-bound instead of call-bound (MKL/oneDNN small-M GEMMs reach a fraction of the bandwidth here).
 *
 * Pairs (token, slot) arrive sorted by expert: pairs offsets[e] .. offsets[e+1]-1 belong to expert e,
 * pair p reads x[pair_token[p]] and carries routing weight pair_weight[p].
 * Legend: T=tokens, P=pairs (T*K), E=experts, H=hidden, I=expert intermediate.
 * Each function computes a slice of rows so the caller can split the work across threads without
 * races: gate_up writes columns [i0, i1) of act, down writes columns [h0, h1) of out.
 * Weights are fp32, or bf16 when built with -DWEIGHT_BF16 (widened to fp32 in registers: half the bytes
 * streamed); activations, accumulation and outputs are fp32 in both builds.
 * Register tiles follow the vector width and register count (cpu_simd.h).
 * Built at first use by cpu_moe_native.py (native_build) for the ISA cpu_features picks.
 */
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_simd.h"

#define MAX_GROUP (VREGS == 32 ? 8 : 6) /* pairs per pass over a weight row: 2 * MAX_GROUP accumulators, 2 weight
                                          vectors and an x vector fit the registers */
#define ROW_BLOCK 16  /* weight rows reused from L2 by every group of pairs; a multiple of LANES (SiLU vectors) */
#define K_CHUNK 1024  /* floats of each act row per pass of the down kernel: a group's chunks fit L1 */
#define L1_FLOATS 6144 /* 24 KiB: act rows of a group up to this size stay in L1 next to the weight rows */

/* res_a[p] = w_a . xs[p] and res_b[p] = w_b . xs[p] for p < NB: two weight rows share every load of x.
 * S partial sums per (row, pair) keep >= 8 independent FMA chains in flight when NB is small
 * (FMA latency 4 cycles x 2 ports); n % 16 leftovers are summed in scalar. Rows `ahead` floats further
 * are prefetched: rows here are page-sized, and hardware prefetchers stop at page boundaries. */
#define DEFINE_DOT2(NB, S)                                                                           \
    static void dot2_##NB(const wtype *w_a, const wtype *w_b, const float *const *xs, int64_t n,   \
                          int64_t ahead, float *res_a, float *res_b) {                                           \
        vec acc_a[NB][S], acc_b[NB][S];                                                            \
        for (int p = 0; p < NB; p++)                                                               \
            for (int s = 0; s < S; s++) acc_a[p][s] = acc_b[p][s] = (vec){0};                      \
        int64_t h = 0;                                                                             \
        for (; h + S * LANES <= n; h += S * LANES)                                                 \
            for (int s = 0; s < S; s++) {                                                          \
                vec wa = load_w(w_a + h + s * LANES);                                              \
                vec wb = load_w(w_b + h + s * LANES);                                              \
                __builtin_prefetch(w_a + ahead + h + s * LANES);                                  \
                __builtin_prefetch(w_b + ahead + h + s * LANES);                                  \
                PIN(wa); PIN(wb);                                                                  \
                for (int p = 0; p < NB; p++) {                                                     \
                    vec xv = *(const vec_u *)(xs[p] + h + s * LANES);                              \
                    PIN(xv);                                                                       \
                    acc_a[p][s] += wa * xv;                                                        \
                    acc_b[p][s] += wb * xv;                                                        \
                }                                                                                  \
            }                                                                                      \
        for (; h + LANES <= n; h += LANES) {                                                       \
            vec wa = load_w(w_a + h), wb = load_w(w_b + h);                                          \
            for (int p = 0; p < NB; p++) {                                                         \
                vec xv = *(const vec_u *)(xs[p] + h);                                              \
                acc_a[p][0] += wa * xv;                                                            \
                acc_b[p][0] += wb * xv;                                                            \
            }                                                                                      \
        }                                                                                          \
        for (int p = 0; p < NB; p++) {                                                             \
            for (int s = 1; s < S; s++) { acc_a[p][0] += acc_a[p][s]; acc_b[p][0] += acc_b[p][s]; }\
            float sa = hsum(acc_a[p][0]), sb = hsum(acc_b[p][0]);                                  \
            for (int64_t t = h; t < n; t++) {                                                      \
                sa += scalar_w(w_a[t]) * xs[p][t];                                                     \
                sb += scalar_w(w_b[t]) * xs[p][t];                                                     \
            }                                                                                      \
            res_a[p] = sa;                                                                         \
            res_b[p] = sb;                                                                         \
        }                                                                                          \
    }
/* 2 * NB * S accumulators + 3 <= 16 registers up to NB = 6. */
DEFINE_DOT2(1, 4)
DEFINE_DOT2(2, 2)
DEFINE_DOT2(3, 2)
DEFINE_DOT2(4, 1)
DEFINE_DOT2(5, 1)
DEFINE_DOT2(6, 1)

typedef void (*dot2_fn)(const wtype *, const wtype *, const float *const *, int64_t, int64_t, float *, float *);
#if MAX_GROUP == 8
DEFINE_DOT2(7, 1)
DEFINE_DOT2(8, 1)
static const dot2_fn DOT2[MAX_GROUP + 1] = {0, dot2_1, dot2_2, dot2_3, dot2_4, dot2_5, dot2_6, dot2_7, dot2_8};
#else
static const dot2_fn DOT2[MAX_GROUP + 1] = {0, dot2_1, dot2_2, dot2_3, dot2_4, dot2_5, dot2_6};
#endif

/* act[p, i] = silu(x_p . w13[e, i]) * (x_p . w13[e, I + i]) for i in [i0, i1): x [T, H], w13 [E, 2I, H], act [P, I]. */
void moe_gate_up(const float *x, const wtype *w13, float *act, const int64_t *offsets, const int64_t *pair_token,
                 int64_t num_experts, int64_t H, int64_t I, int64_t i0, int64_t i1) {
    const float *xs[MAX_GROUP];
    float g[MAX_GROUP], u[MAX_GROUP];
    float g_blk[MAX_GROUP][ROW_BLOCK] __attribute__((aligned(64))), u_blk[MAX_GROUP][ROW_BLOCK] __attribute__((aligned(64)));
    for (int64_t e = 0; e < num_experts; e++) {
        const wtype *w = w13 + e * 2 * I * H;
        int64_t begin = offsets[e], end = offsets[e + 1];
        if (begin == end) continue;
        /* A block of rows comes from memory once; every group of pairs runs over it while it sits in L2,
         * and each group's x rows stay in L1 for the whole block. */
        for (int64_t blk = i0; blk < i1; blk += ROW_BLOCK) {
            int64_t blk_end = blk + ROW_BLOCK < i1 ? blk + ROW_BLOCK : i1;
            for (int64_t p0 = begin; p0 < end; p0 += MAX_GROUP) {
                int64_t nb = end - p0 < MAX_GROUP ? end - p0 : MAX_GROUP;
                for (int64_t p = 0; p < nb; p++) xs[p] = x + pair_token[p0 + p] * H;
                for (int64_t i = blk; i < blk_end; i++) {
                    DOT2[nb](w + i * H, w + (I + i) * H, xs, H, H, g, u); /* prefetch the next rows */
                    for (int64_t p = 0; p < nb; p++) {
                        g_blk[p][i - blk] = g[p];
                        u_blk[p][i - blk] = u[p];
                    }
                }
                /* SiLU(gate) * up for the whole block at once: whole vectors, then any rest one by one. */
                for (int64_t p = 0; p < nb; p++) {
                    float *dst = act + (p0 + p) * I + blk;
                    int64_t j = 0;
                    for (; j + LANES <= blk_end - blk; j += LANES) {
                        vec gv = *(const vec *)(g_blk[p] + j), uv = *(const vec *)(u_blk[p] + j);
                        *(vec_u *)(dst + j) = gv / (1.f + vexp(-gv)) * uv;
                    }
                    for (; j < blk_end - blk; j++)
                        dst[j] = g_blk[p][j] / (1.f + expf(-g_blk[p][j])) * u_blk[p][j];
                }
            }
        }
    }
}

/* out[t, h] += sum over pairs p of token t: pair_weight[p] * (act_p . w2[e, h]) for h in [h0, h1).
 * act [P, I], w2 [E, H, I], out [T, H] (zeroed by the caller). Routing weight applied after the activation.
 * I is long (act rows of several pairs would not fit L1), so it is cut in K_CHUNK pieces whose partial
 * dots are summed per (pair, row) first. Each pair then adds one product, rounded on its own (never fused
 * into an FMA with the running sum), to out: a token's sum is then the same fold of the same per-expert
 * values however its experts are split between calls, so with two experts per token, partial sums made
 * in separate processes add up to this call's bits (marserve/experts/parallel.py). */
void moe_down(const float *act, const wtype *w2, float *out, const int64_t *offsets, const int64_t *pair_token,
              const float *pair_weight, int64_t num_experts, int64_t H, int64_t I, int64_t h0, int64_t h1) {
    const float *as[MAX_GROUP];
    float d0[MAX_GROUP], d1[MAX_GROUP], dot[MAX_GROUP][ROW_BLOCK];
    for (int64_t e = 0; e < num_experts; e++) {
        const wtype *w = w2 + e * H * I;
        int64_t begin = offsets[e], end = offsets[e + 1];
        if (begin == end) continue;
        for (int64_t blk = h0; blk < h1; blk += ROW_BLOCK) {
            int64_t blk_end = blk + ROW_BLOCK < h1 ? blk + ROW_BLOCK : h1;
            for (int64_t p0 = begin; p0 < end; p0 += MAX_GROUP) {
                int64_t nb = end - p0 < MAX_GROUP ? end - p0 : MAX_GROUP;
                /* Whole rows (one long stream) while the group's act rows fit L1 anyway. */
                int64_t chunk = nb * I <= L1_FLOATS ? I : K_CHUNK;
                for (int64_t c = 0; c < I; c += chunk) {
                    int64_t len = I - c < chunk ? I - c : chunk;
                    for (int64_t p = 0; p < nb; p++) as[p] = act + (p0 + p) * I + c;
                    /* Two rows per pass share the loads of act; an odd last row is paired with itself. */
                    for (int64_t h = blk; h < blk_end; h += 2) {
                        int64_t h_b = h + 1 < blk_end ? h + 1 : h;
                        DOT2[nb](w + h * I + c, w + h_b * I + c, as, len, 2 * I, d0, d1);
                        for (int64_t p = 0; p < nb; p++) {
                            dot[p][h - blk] = c ? dot[p][h - blk] + d0[p] : d0[p];
                            if (h_b != h) dot[p][h_b - blk] = c ? dot[p][h_b - blk] + d1[p] : d1[p];
                        }
                    }
                }
                for (int64_t p = 0; p < nb; p++) {
                    float *o = out + pair_token[p0 + p] * H;
                    for (int64_t h = blk; h < blk_end; h++) {
                        float term = pair_weight[p0 + p] * dot[p][h - blk];
                        PIN(term); /* rounded here: not contracted into an FMA with o[h] */
                        o[h] += term;
                    }
                }
            }
        }
    }
}

/* The whole few-token MoE: gate/up split over I, then down split over H, on `threads` OpenMP threads
 * (torch's own runtime when loaded with torch, so its already-spinning workers are reused). */
void moe_small(const float *x, const wtype *w13, const wtype *w2, float *act, float *out, const int64_t *offsets,
               const int64_t *pair_token, const float *pair_weight, int64_t num_experts, int64_t H, int64_t I,
               int64_t threads) {
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        int64_t t = 0, nt = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        nt = omp_get_num_threads();
#endif
        moe_gate_up(x, w13, act, offsets, pair_token, num_experts, H, I, I * t / nt, I * (t + 1) / nt);
#pragma omp barrier
        moe_down(act, w2, out, offsets, pair_token, pair_weight, num_experts, H, I, H * t / nt, H * (t + 1) / nt);
    }
}

/* Counting sort of the (token, slot) pairs by expert (stable: each expert's pairs stay in token order):
 * index [2E + 1 + P] int64 receives offsets [E + 1] (pairs of expert e are offsets[e] .. offsets[e+1]-1), a fill
 * counter per expert, and pair_token [P]; pair_weight [P] the pairs' routing weights. A negative id is a slot
 * without an expert here (another process runs it: marserve/experts/parallel.py): the pair is left out, so the
 * others are grouped exactly as in a call without it. Returns -1 for an expert id >= num_experts, else 0. */
static int group_pairs(const int64_t *topk_ids, const float *topk_weights, int64_t P, int64_t K, int64_t num_experts,
                       int64_t *index, float *pair_weight) {
    int64_t *offsets = index, *fill = index + num_experts + 1, *pair_token = fill + num_experts;
    memset(offsets, 0, (num_experts + 1) * sizeof(int64_t));
    for (int64_t p = 0; p < P; p++) {
        if (topk_ids[p] >= num_experts) return -1;
        if (topk_ids[p] >= 0) offsets[topk_ids[p] + 1]++;
    }
    for (int64_t e = 0; e < num_experts; e++) {
        offsets[e + 1] += offsets[e];
        fill[e] = offsets[e];
    }
    for (int64_t p = 0; p < P; p++) {
        if (topk_ids[p] < 0) continue;
        int64_t q = fill[topk_ids[p]]++;
        pair_token[q] = p / K;
        pair_weight[q] = topk_weights[p];
    }
    return 0;
}

/* The whole call from the router's output: a counting sort groups the (token, slot) pairs by expert
 * (stable: each expert's pairs stay in token order), then moe_small. topk_ids [T, K] int64, topk_weights
 * [T, K] fp32 (ids < 0: no expert, skipped). Returns 0, -1 for an expert id >= num_experts, -2 if out of memory. Doing the grouping here
 * saves the ~10 small torch ops it takes in Python, which is most of a call at decode sizes. */
int moe_routed(const float *x, const wtype *w13, const wtype *w2, float *out, const int64_t *topk_ids,
               const float *topk_weights, int64_t T, int64_t K, int64_t num_experts, int64_t H, int64_t I,
               int64_t threads) {
    int64_t P = T * K;
    int64_t *offsets = calloc(2 * num_experts + 1 + P, sizeof(int64_t));
    float *pair_weight = malloc((P + 1) * sizeof(float)), *act = malloc((P * I + 1) * sizeof(float));
    if (!offsets || !pair_weight || !act) {
        free(offsets); free(pair_weight); free(act);
        return -2;
    }
    if (group_pairs(topk_ids, topk_weights, P, K, num_experts, offsets, pair_weight)) {
        free(offsets); free(pair_weight); free(act);
        return -1;
    }
    const int64_t *pair_token = offsets + 2 * num_experts + 1;
    moe_small(x, w13, w2, act, out, offsets, pair_token, pair_weight, num_experts, H, I, threads);
    free(offsets); free(pair_weight); free(act);
    return 0;
}

/* Sum of x[0:n) on `threads` threads: the read-bandwidth probe `marserve bench moe` compares the kernel against. */
double read_sum(const float *x, int64_t n, int64_t threads) {
    double total = 0.0;
#pragma omp parallel num_threads(threads) if (threads > 1) reduction(+ : total)
    {
        int64_t t = 0, nt = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        nt = omp_get_num_threads();
#endif
        int64_t begin = n * t / nt / (4 * LANES) * (4 * LANES), end = t == nt - 1 ? n : n * (t + 1) / nt / (4 * LANES) * (4 * LANES);
        vec acc[4] = {{0}, {0}, {0}, {0}};
        int64_t i = begin;
        for (; i + 4 * LANES <= end; i += 4 * LANES)
            for (int j = 0; j < 4; j++) acc[j] += *(const vec_u *)(x + i + j * LANES);
        double s = hsum(acc[0] + acc[1] + acc[2] + acc[3]);
        for (; i < end; i++) s += x[i];
        total += s;
    }
    return total;
}
