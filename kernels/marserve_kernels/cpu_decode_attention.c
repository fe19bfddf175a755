/* Decode attention on CPU over the paged KV cache, with the rotary embedding and the cache write fused in.
 *
 * Every sequence of the pass brings one new token. For each sequence b and KV head g, one call:
 *   1. rotates the new token's key (rotate-half RoPE with the pass's cos/sin) and writes key and value
 *      into the cache slot slot_mapping[b];
 *   2. rotates the query heads that share KV head g (GQA group) into a local buffer;
 *   3. scores them against every cached key of the sequence (read in place through the block table,
 *      no gather), softmaxes, and sums the values into out.
 * The torch path does the same work in ~10 small ops per layer (rope, two index_copy_, an index_select
 * gather per K and V, SDPA); at one token those ops' fixed costs are most of the layer's attention time.
 *
 * Inputs q/k/v are fp32 rows with a token stride (views into the fused qkv projection), heads
 * contiguous (head stride D). The cache is fp32, or bf16 when built with -DCACHE_BF16 (rounded to
 * nearest even on write, widened on read). Accumulation is fp32.
 * Legend: B=sequences (= tokens of the pass), Hq/Hkv=query/KV heads, D=head dim, BS=block size,
 * L=tokens of a sequence after this step (context + 1).
 */
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_simd.h"

#ifdef CACHE_BF16
typedef uint16_t ctype;
static inline float load_c(const ctype *p) { return bf16_to_float(*p); }
static inline ctype store_c(float f) { return float_to_bf16(f); }
static inline vec load_cv(const ctype *p) { return load_bf16(p); }
#else
typedef float ctype;
static inline float load_c(const ctype *p) { return *p; }
static inline ctype store_c(float f) { return f; }
static inline vec load_cv(const ctype *p) { return *(const vec_u *)p; }
#endif

#define MAX_GROUP 16 /* query heads per KV head handled together (GQA ratio) */

/* out[0..D) = rotate_half RoPE of x with this token's cos/sin rows. */
static inline void rope(const float *restrict x, const float *restrict cos_row, const float *restrict sin_row,
                        float *restrict out, int64_t D) {
    const int64_t half = D / 2;
    for (int64_t i = 0; i < half; i++) {
        out[i] = x[i] * cos_row[i] - x[i + half] * sin_row[i];
        out[i + half] = x[i + half] * cos_row[i + half] + x[i] * sin_row[i + half];
    }
}

#define MAX_DV (256 / LANES) /* head dims up to 256 in register-sized chunks */

/* Per-thread scratch that grows as needed and is kept between calls (no malloc per layer). */
static float *scratch(size_t floats) {
    static __thread float *buf = NULL;
    static __thread size_t cap = 0;
    if (floats > cap) {
        float *grown = realloc(buf, floats * sizeof(float));
        if (!grown) return NULL;
        buf = grown;
        cap = floats;
    }
    return buf;
}

/* Softmax of each of the G score rows [L] in place. */
static void softmax_rows(float *restrict scores, int64_t G, int64_t L) {
    for (int64_t h = 0; h < G; h++) {
        float *sh = scores + h * L;
        float m = -INFINITY;
        for (int64_t t = 0; t < L; t++) m = sh[t] > m ? sh[t] : m;
        float z = 0.f;
        int64_t t = 0;
        vec zv = {0};
        for (; t + LANES <= L; t += LANES) {
            vec e = vexp(*(vec_u *)(sh + t) - m);
            *(vec_u *)(sh + t) = e;
            zv += e;
        }
        z = hsum(zv);
        for (; t < L; t++) {
            sh[t] = expf(sh[t] - m);
            z += sh[t];
        }
        const float inv = 1.f / z;
        for (t = 0; t < L; t++) sh[t] *= inv;
    }
}

/* One (sequence, KV head): G query heads [G, D] already rotated and scaled -> out rows [G, D].
 * scores: scratch of G * L floats. Vector form for D a multiple of 16 (every model here), scalar otherwise. */
static void attend_group(const float *restrict qg, int64_t G, const ctype *k_cache, const ctype *v_cache,
                         const int64_t *restrict table, int64_t L, int64_t g, int64_t Hkv, int64_t D, int64_t BS,
                         float *restrict scores, float *restrict out, int64_t out_head_stride) {
    const int64_t slot_stride = Hkv * D; /* between consecutive slots of a block */
    const int64_t nv = D / LANES;
    /* Positions are walked block by block: slot (table[t / BS], t % BS) without a division per position. */
#define FOR_POSITIONS(t, row, cache)                                                                         \
    for (int64_t blk = 0, t = 0; t < L; blk++)                                                               \
        for (const ctype *row = (cache) + table[blk] * BS * slot_stride + g * D, *blk_end = row + BS * slot_stride; \
             row < blk_end && t < L; row += slot_stride, t++)
    if (D % LANES == 0 && nv <= MAX_DV) {
        FOR_POSITIONS(t, kt, k_cache) {
            vec kv[MAX_DV];
            for (int64_t j = 0; j < nv; j++) kv[j] = load_cv(kt + j * LANES);
            for (int64_t h = 0; h < G; h++) {
                const float *qh = qg + h * D;
                vec acc = kv[0] * *(const vec_u *)qh;
                for (int64_t j = 1; j < nv; j++) acc += kv[j] * *(const vec_u *)(qh + j * LANES);
                scores[h * L + t] = hsum(acc);
            }
        }
        softmax_rows(scores, G, L);
        for (int64_t h = 0; h < G; h++) {
            vec acc[MAX_DV] = {0};
            const float *sh = scores + h * L;
            FOR_POSITIONS(t, vt, v_cache) {
                const vec p = (vec){0} + sh[t];
                for (int64_t j = 0; j < nv; j++) acc[j] += p * load_cv(vt + j * LANES);
            }
            for (int64_t j = 0; j < nv; j++) *(vec_u *)(out + h * out_head_stride + j * LANES) = acc[j];
        }
        return;
    }
    FOR_POSITIONS(t, kt, k_cache) {
        for (int64_t h = 0; h < G; h++) {
            const float *qh = qg + h * D;
            float s = 0.f;
            for (int64_t d = 0; d < D; d++) s += qh[d] * load_c(kt + d);
            scores[h * L + t] = s;
        }
    }
    softmax_rows(scores, G, L);
    for (int64_t h = 0; h < G; h++) memset(out + h * out_head_stride, 0, D * sizeof(float));
    FOR_POSITIONS(t, vt, v_cache) {
        for (int64_t h = 0; h < G; h++) {
            const float p = scores[h * L + t];
            float *oh = out + h * out_head_stride;
            for (int64_t d = 0; d < D; d++) oh[d] += p * load_c(vt + d);
        }
    }
#undef FOR_POSITIONS
}

/* Step 1 of a decode pass: each sequence's new key (rotated) and value into its slot, so that every
 * later read of the step sees them. k/v [B, Hkv, D] with token strides k_stride/v_stride. */
static void write_new_kv(const float *k, int64_t k_stride, const float *v, int64_t v_stride, const float *cos,
                         const float *sin, ctype *k_cache, ctype *v_cache, const int64_t *slot_mapping, int64_t B,
                         int64_t Hkv, int64_t D) {
    const int64_t slot_stride = Hkv * D;
    for (int64_t b = 0; b < B; b++) {
        ctype *kdst = k_cache + slot_mapping[b] * slot_stride;
        ctype *vdst = v_cache + slot_mapping[b] * slot_stride;
        for (int64_t g = 0; g < Hkv; g++) {
            float kr[D];
            rope(k + b * k_stride + g * D, cos + b * D, sin + b * D, kr, D);
            for (int64_t d = 0; d < D; d++) {
                kdst[g * D + d] = store_c(kr[d]);
                vdst[g * D + d] = store_c(v[b * v_stride + g * D + d]);
            }
        }
    }
}

/* Steps 2-3 for one work item (sequence b = item / Hkv, KV head g = item % Hkv): rotate and scale the
 * group's G query heads into the end of `scores` (G * max_len + G * D floats), attend, write out rows. */
static void attend_item(int64_t item, const float *q, int64_t q_stride, const float *cos, const float *sin,
                        const ctype *k_cache, const ctype *v_cache, const int64_t *block_tables, int64_t bt_stride,
                        const int64_t *seq_lens, float *out, int64_t Hq, int64_t Hkv, int64_t D, int64_t BS,
                        float scale, int64_t max_len, float *scores) {
    const int64_t G = Hq / Hkv, b = item / Hkv, g = item % Hkv;
    float *qg = scores + G * max_len; /* the group's rotated, scaled queries [G, D] */
    for (int64_t h = 0; h < G; h++) {
        rope(q + b * q_stride + (g * G + h) * D, cos + b * D, sin + b * D, qg + h * D, D);
        for (int64_t d = 0; d < D; d++) qg[h * D + d] *= scale;
    }
    attend_group(qg, G, k_cache, v_cache, block_tables + b * bt_stride, seq_lens[b], g, Hkv, D, BS, scores,
                 out + (b * Hq + g * G) * D, D);
}

static int64_t max_seq_len(const int64_t *seq_lens, int64_t B) {
    int64_t max_len = 0;
    for (int64_t b = 0; b < B; b++) max_len = seq_lens[b] > max_len ? seq_lens[b] : max_len;
    return max_len;
}

/* q [B, Hq, D], k/v [B, Hkv, D]: fp32, token strides q_stride/k_stride/v_stride (in floats), heads contiguous.
 * cos/sin [B, D] fp32 contiguous. k_cache/v_cache [N_blocks, BS, Hkv, D]. block_tables [B, bt_stride] int64.
 * seq_lens [B] int64: tokens of each sequence including the new one (L). slot_mapping [B] int64. out [B, Hq, D] fp32.
 * Returns 0, -1 for a bad shape (Hq not a multiple of Hkv, group too large, odd D), -2 out of memory. */
int decode_attention(const float *q, int64_t q_stride, const float *k, int64_t k_stride, const float *v,
                     int64_t v_stride, const float *cos, const float *sin, ctype *k_cache, ctype *v_cache,
                     const int64_t *block_tables, int64_t bt_stride, const int64_t *seq_lens,
                     const int64_t *slot_mapping, float *out, int64_t B, int64_t Hq, int64_t Hkv, int64_t D,
                     int64_t BS, float scale, int64_t threads) {
    if (Hkv <= 0 || Hq % Hkv != 0 || Hq / Hkv > MAX_GROUP || D % 2 != 0 || D <= 0) return -1;
    const int64_t G = Hq / Hkv;
    write_new_kv(k, k_stride, v, v_stride, cos, sin, k_cache, v_cache, slot_mapping, B, Hkv, D);
    const int64_t max_len = max_seq_len(seq_lens, B);
    int failed = 0;
    const size_t need = (size_t)(G * max_len + G * D);
#define WORK_ITEM(item, scores)                                                                               \
    attend_item(item, q, q_stride, cos, sin, k_cache, v_cache, block_tables, bt_stride, seq_lens, out, Hq, Hkv, D, \
                BS, scale, max_len, scores)
    /* One work item per (sequence, KV head); no parallel region at all for one thread. */
    if (threads <= 1) {
        float *scores = scratch(need);
        if (!scores) return -2;
        for (int64_t item = 0; item < B * Hkv; item++) WORK_ITEM(item, scores);
        return 0;
    }
#pragma omp parallel num_threads(threads)
    {
        float *scores = scratch(need);
        if (!scores) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < B * Hkv; item++) {
            if (scores) WORK_ITEM(item, scores);
        }
    }
#undef WORK_ITEM
    return failed ? -2 : 0;
}

/* The same call with its arguments in one struct: ctypes converts each argument of a call separately
 * (~0.1 us apiece), so a caller that keeps one struct per forward pass and changes only the per-layer
 * fields pays for one pointer instead of 22 conversions. Field order = decode_attention's parameters. */
struct decode_args {
    const float *q;
    int64_t q_stride;
    const float *k;
    int64_t k_stride;
    const float *v;
    int64_t v_stride;
    const float *cos, *sin;
    ctype *k_cache, *v_cache;
    const int64_t *block_tables;
    int64_t bt_stride;
    const int64_t *seq_lens, *slot_mapping;
    float *out;
    int64_t B, Hq, Hkv, D, BS;
    float scale;
    int64_t threads;
};

int decode_attention_struct(const struct decode_args *a) {
    return decode_attention(a->q, a->q_stride, a->k, a->k_stride, a->v, a->v_stride, a->cos, a->sin, a->k_cache,
                            a->v_cache, a->block_tables, a->bt_stride, a->seq_lens, a->slot_mapping, a->out, a->B,
                            a->Hq, a->Hkv, a->D, a->BS, a->scale, a->threads);
}
