/* The attention half of a decoder layer at decode, on CPU, in one call: everything between one layer's
 * MoE output and its experts.
 *
 *   residual += x; xn = rmsnorm(residual) * ln1            (the first layer: residual = x)
 *   qkv = xn @ Wqkv^T (+ bias); clip / q-k norms as the architecture says
 *   RoPE, K/V into the paged cache, attention of each query head over its sequence   (cpu_decode_attention.c)
 *   o = attn @ Wo^T; residual += o; h = rmsnorm(residual) * ln2
 *   z = h @ Wgate^T (+ MAR affinity: scale * max over memory slots of <h / |h|, memory[e, s]>)
 *   top-k of z -> expert ids and routing weights (softmax over all E, renormalised over the k if asked)
 *   and, when the layer's experts are all resident (w13/w2 given): out = the chosen experts on h
 *   (cpu_moe_small.c), in the same OpenMP team.
 *
 * Without resident experts the caller fetches the chosen ones (the ExpertProvider interface) and runs them
 * itself, so that a tiered expert store can sit between routing and use (decode_layer_attention). With
 * them, decode_layers runs every layer of the pass in one call (no Python between layers, whose cold-cache
 * cost after each layer's weight stream was ~100 us per layer).
 * Why one call: at one token per sequence a layer's attention weights stream in ~15-70 us, while the torch
 * modules around them (two norms, three projections, attention, routing) cost ~150 us of per-op overhead
 * per layer. Here the OpenMP team starts once per layer and the phases are separated by barriers; the
 * projections split their weight rows over the threads (cpu_dense_small.c), attention its (sequence, KV head)
 * items (cpu_decode_attention.c), the small serial phases run on one thread.
 *
 * Builds: fp32 (weights, KV cache and activations fp32), or bf16 with -DWEIGHT_BF16 -DCACHE_BF16 -DACT_BF16
 * (all three bf16; accumulation fp32, and every value torch's bf16 path would round is rounded here at the
 * same point, so the two paths agree to bf16 precision). Norm weights, q/k-norm weights and biases come
 * as fp32 copies. Legend: B=sequences (one token each), H=hidden, Hq/Hkv=query/KV heads, D=head dim,
 * NQKV=(Hq + 2 Hkv) * D, E=experts, K=experts per token, S=MAR memory slots.
 */
#include "cpu_dense_small.c"
#include "cpu_decode_attention.c"
/* The attention kernel's GQA limit, taken as a value now: a macro would expand to whatever MAX_GROUP means
 * where it is used, i.e. the MoE kernel's group size (6 or 8) defined below. */
enum { LAYER_MAX_GROUP = MAX_GROUP };
#undef MAX_GROUP /* the three sources are one translation unit here: their local constants must not clash */
#undef K_CHUNK
#undef L1_FLOATS
#include "cpu_moe_small.c"

#include <math.h>

#ifdef ACT_BF16
typedef uint16_t atype;
static inline float load_a(const atype *p) { return bf16_to_float(*p); }
static inline atype store_a(float f) { return float_to_bf16(f); }
static inline float round_a(float f) { return bf16_to_float(float_to_bf16(f)); }
#else
typedef float atype;
static inline float load_a(const atype *p) { return *p; }
static inline atype store_a(float f) { return f; }
static inline float round_a(float f) { return f; }
#endif

#define MAX_EXPERTS 4096

/* What a layer keeps from one pass to the next (field order = decode_layer_native.py's _Layer). */
struct layer_args {
    int64_t H, Hq, Hkv, D, E, K, S; /* E = 0: a dense-MLP layer, no routing */
    int64_t qk_norm;                /* 0 none, 1 per head (qwen3_moe), 2 over the whole q and k (olmoe) */
    int64_t renormalise;            /* routing weights renormalised over the top k */
    int64_t threads;
    float eps, qk_eps, clip, mar_scale, attn_scale; /* clip <= 0: no clipping */
    const float *ln1, *ln2, *qkv_bias, *q_norm, *k_norm; /* fp32; bias, q/k norms NULL when absent */
    const wtype *qkv_w, *o_w, *gate_w, *mar_memory;    /* mar_memory [E, S, H], NULL on non-MAR layers */
    ctype *k_cache, *v_cache;
    const wtype *w13, *w2; /* [E, 2I, H], [E, H, I]: every expert, when resident; NULL otherwise */
    int64_t I;
};

/* What every layer of one pass shares (field order = decode_layer_native.py's _Pass). */
struct pass_args {
    const float *cos, *sin;                 /* [B, D] */
    const int64_t *block_tables;            /* [B, bt_stride] */
    const int64_t *seq_lens, *slot_mapping; /* [B]: tokens after this step; the new token's cache slot */
    int64_t bt_stride, B, BS;
    float *xn, *qkv, *attn, *o, *inv_norm; /* scratch: [B, H], [B, NQKV], [B, Hq * D], [B, H], [B] */
    /* scratch of the experts: [2E + 1 + B*K] int64 (counting sort), [B*K] pair weights, [B*K, I] act, [B, H] */
    int64_t *moe_index;
    float *pair_weight, *act, *moe_out;
};

/* s = x + residual (x alone when first), stored back into residual; out = rmsnorm(s) * w (fp32, each value
 * rounded where torch's path rounds). Returns 1 / max(|out|, 1e-12) (the MAR affinity's normalisation). */
static float add_norm_row(const float *x, atype *residual, int first, const float *w, float eps, int64_t H,
                          float *out) {
    float ss = 0.f;
    for (int64_t h = 0; h < H; h++) {
        const float s = round_a(first ? x[h] : x[h] + load_a(residual + h));
        residual[h] = store_a(s);
        ss += s * s;
    }
    const float inv = 1.f / sqrtf(ss / (float)H + eps);
    float nn = 0.f;
    for (int64_t h = 0; h < H; h++) {
        out[h] = round_a(w[h] * round_a(load_a(residual + h) * inv));
        nn += out[h] * out[h];
    }
    const float n = sqrtf(nn);
    return 1.f / (n > 1e-12f ? n : 1e-12f);
}

/* x[0:n) = rmsnorm(x) * w in place (fp32 statistics). */
static void norm_inplace(float *x, const float *w, float eps, int64_t n) {
    float ss = 0.f;
    for (int64_t i = 0; i < n; i++) ss += x[i] * x[i];
    const float inv = 1.f / sqrtf(ss / (float)n + eps);
    for (int64_t i = 0; i < n; i++) x[i] = round_a(w[i] * round_a(x[i] * inv));
}

static void clip_row(float *x, float c, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] = x[i] > c ? c : x[i] < -c ? -c : x[i];
}

/* One sequence's q/k/v row after the projection: rounding, clipping and q/k norms in the architecture's order. */
static void shape_qkv_row(const struct layer_args *L, float *row) {
    const int64_t D = L->D, nq = L->Hq * D, nk = L->Hkv * D, n = nq + 2 * nk;
    for (int64_t i = 0; i < n; i++) row[i] = round_a(row[i]);
    if (L->qk_norm == 2) { /* olmoe: norm the whole q and k projections, then clip all three */
        norm_inplace(row, L->q_norm, L->qk_eps, nq);
        norm_inplace(row + nq, L->k_norm, L->qk_eps, nk);
        if (L->clip > 0) clip_row(row, L->clip, n);
        return;
    }
    if (L->clip > 0) clip_row(row, L->clip, n);
    if (L->qk_norm == 1) /* qwen3_moe: each head on its own, q heads with q_norm, k heads with k_norm */
        for (int64_t h = 0; h < L->Hq + L->Hkv; h++)
            norm_inplace(row + h * D, h < L->Hq ? L->q_norm : L->k_norm, L->qk_eps, D);
}

/* Top-k of one token's router logits z[0:E) -> ids (largest first), weights. */
static void route_row(const float *z, int64_t E, int64_t K, int renormalise, int64_t *ids, float *weights) {
    if (K <= 0) return;
    unsigned char taken[MAX_EXPERTS];
    memset(taken, 0, (size_t)E);
    float top[MAX_EXPERTS];
    top[0] = -INFINITY; /* written below (K >= 1); set so that gcc sees it set */
    for (int64_t k = 0; k < K; k++) {
        int64_t best = -1;
        for (int64_t e = 0; e < E; e++)
            if (!taken[e] && (best < 0 || z[e] > z[best])) best = e;
        taken[best] = 1;
        ids[k] = best;
        top[k] = z[best];
    }
    /* softmax over all E, restricted to the top k: exp(z_k - logsumexp(z)); renormalised: a softmax over the k */
    float m = top[0], sum = 0.f;
    if (renormalise) {
        for (int64_t k = 0; k < K; k++) sum += expf(top[k] - m);
    } else {
        for (int64_t e = 0; e < E; e++) sum += expf(z[e] - m);
    }
    for (int64_t k = 0; k < K; k++) weights[k] = expf(top[k] - m) / sum;
}

/* One layer. x [B, H] and residual [B, H] in the activation dtype (residual updated in place; with first = 1
 * it is only written: residual = x). Outputs: h [B, H] (activation dtype; may be NULL when the experts run
 * here), and for MoE layers z [B, E] fp32 router logits, ids [B, K] int64, weights [B, K] fp32; with resident
 * experts (L->w13) and out given, out [B, H] = the MoE block's output (activation dtype; may alias x).
 * Returns 0, -1 for a shape the kernel does not take, -2 when out of memory. */
static int layer_step(const struct layer_args *L, const struct pass_args *P, const atype *x, atype *residual,
                      int64_t first, atype *h, float *z, int64_t *ids, float *weights, atype *out) {
    const int64_t B = P->B, H = L->H, Hq = L->Hq, Hkv = L->Hkv, D = L->D, E = L->E;
    const int64_t NQKV = (Hq + 2 * Hkv) * D;
    if (Hkv <= 0 || Hq % Hkv != 0 || Hq / Hkv > LAYER_MAX_GROUP || D % 2 != 0 || D <= 0 || E > MAX_EXPERTS ||
        (E > 0 && (L->K < 1 || L->K > E)))
        return -1;
    void (*rows)(const float *, int64_t, const wtype *, const float *, float *, int64_t, int64_t, int64_t, int64_t,
                 int64_t) = B >= OUTER_MIN_T ? dense_rows_outer : dense_rows4;
    const int64_t max_len = max_seq_len(P->seq_lens, B);
    const int run_experts = E > 0 && L->w13 && out;
    const size_t need = (size_t)((Hq / Hkv) * (max_len + D));
    int failed = 0;
#pragma omp parallel num_threads(L->threads > 1 ? L->threads : 1) if (L->threads > 1)
    {
        int64_t t = 0, nt = 1, n0, n1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        nt = omp_get_num_threads();
#endif
#pragma omp single
        for (int64_t b = 0; b < B; b++) {
            const float *xb;
#ifdef ACT_BF16
            for (int64_t i = 0; i < H; i++) P->o[b * H + i] = load_a(x + b * H + i);
            xb = P->o + b * H;
#else
            xb = x + b * H;
#endif
            add_norm_row(xb, residual + b * H, (int)first, L->ln1, L->eps, H, P->xn + b * H);
        }
        split_rows(NQKV, t, nt, &n0, &n1);
        if (n1 > n0) rows(P->xn, H, L->qkv_w, L->qkv_bias, P->qkv, B, H, NQKV, n0, n1);
#pragma omp barrier
#pragma omp single
        {
            for (int64_t b = 0; b < B; b++) shape_qkv_row(L, P->qkv + b * NQKV);
            write_new_kv(P->qkv + Hq * D, NQKV, P->qkv + (Hq + Hkv) * D, NQKV, P->cos, P->sin, L->k_cache,
                         L->v_cache, P->slot_mapping, B, Hkv, D);
        }
        float *scores = scratch(need);
        if (!scores) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < B * Hkv; item++)
            if (scores)
                attend_item(item, P->qkv, NQKV, P->cos, P->sin, L->k_cache, L->v_cache, P->block_tables,
                            P->bt_stride, P->seq_lens, P->attn, Hq, Hkv, D, P->BS, L->attn_scale, max_len, scores);
#ifdef ACT_BF16
#pragma omp single
        for (int64_t i = 0; i < B * Hq * D; i++) P->attn[i] = round_a(P->attn[i]);
#endif
        split_rows(H, t, nt, &n0, &n1);
        if (n1 > n0) rows(P->attn, Hq * D, L->o_w, NULL, P->o, B, Hq * D, H, n0, n1);
#pragma omp barrier
#pragma omp single
        for (int64_t b = 0; b < B; b++) {
            float *ob = P->o + b * H;
            for (int64_t i = 0; i < H; i++) ob[i] = round_a(ob[i]);
            P->inv_norm[b] = add_norm_row(ob, residual + b * H, 0, L->ln2, L->eps, H, P->xn + b * H);
            if (h)
                for (int64_t i = 0; i < H; i++) h[b * H + i] = store_a(P->xn[b * H + i]);
        }
        if (E > 0) {
            split_rows(E, t, nt, &n0, &n1);
            if (n1 > n0) {
                rows(P->xn, H, L->gate_w, NULL, z, B, H, E, n0, n1);
                for (int64_t b = 0; b < B; b++) {
                    const float *hb = P->xn + b * H;
                    for (int64_t e = n0; e < n1; e++) {
                        float g = round_a(z[b * E + e]);
                        if (L->mar_memory) {
                            float best = -INFINITY;
                            for (int64_t s = 0; s < L->S; s++) {
                                const wtype *m = L->mar_memory + (e * L->S + s) * H;
                                float dot = 0.f;
                                for (int64_t i = 0; i < H; i++) dot += hb[i] * scalar_w(m[i]);
                                best = dot > best ? dot : best;
                            }
                            g += L->mar_scale * best * P->inv_norm[b];
                        }
                        z[b * E + e] = g;
                    }
                }
            }
#pragma omp barrier
            if (!run_experts) {
#pragma omp for
                for (int64_t b = 0; b < B; b++)
                    route_row(z + b * E, E, L->K, (int)L->renormalise, ids + b * L->K, weights + b * L->K);
            }
        }
        if (run_experts) { /* moe_small's two phases, in this team: gate/up split over I, down over H */
            const int64_t I = L->I, *offsets = P->moe_index, *pair_token = P->moe_index + 2 * E + 1;
#ifdef ACT_BF16
            float *moe_out = P->moe_out; /* fp32 sums, rounded into out at the end */
#else
            float *moe_out = out; /* x (which out may alias) was last read by the input norm */
#endif
#pragma omp single
            { /* routing, the pair sort and the zeroed sums in one serial step: one barrier, not three */
                for (int64_t b = 0; b < B; b++)
                    route_row(z + b * E, E, L->K, (int)L->renormalise, ids + b * L->K, weights + b * L->K);
                group_pairs(ids, weights, B * L->K, L->K, E, P->moe_index, P->pair_weight); /* ids < E: ours */
                for (int64_t q = 0; q < B * L->K; q++) /* the routing weights, as torch's path rounds them */
                    P->pair_weight[q] = round_a(P->pair_weight[q]);
                memset(moe_out, 0, B * H * sizeof(float));
            }
            moe_gate_up(P->xn, L->w13, P->act, offsets, pair_token, E, H, I, I * t / nt, I * (t + 1) / nt);
#pragma omp barrier
            moe_down(P->act, L->w2, moe_out, offsets, pair_token, P->pair_weight, E, H, I, H * t / nt,
                     H * (t + 1) / nt);
#ifdef ACT_BF16
#pragma omp barrier
#pragma omp for
            for (int64_t i = 0; i < B * H; i++) out[i] = store_a(P->moe_out[i]);
#endif
        }
    }
    return failed ? -2 : 0;
}

/* The attention half and routing of one layer (its experts run by the caller). */
int decode_layer_attention(const struct layer_args *L, const struct pass_args *P, const atype *x, atype *residual,
                           int64_t first, atype *h, float *z, int64_t *ids, float *weights) {
    return layer_step(L, P, x, residual, first, h, z, ids, weights, NULL);
}

/* Every layer of a decode pass, each with resident experts: x [B, H] the embeddings, residual [B, H] written,
 * out [B, H] the last layer's MoE output (each layer's output is the next one's x); z [n, B, E],
 * ids/weights [n, B, K] every layer's routing. Returns 0, or the first failing layer's code. */
int decode_layers(const struct layer_args *const *layers, int64_t n, const struct pass_args *P, const atype *x,
                  atype *residual, atype *out, float *z, int64_t *ids, float *weights) {
    const int64_t B = P->B;
    for (int64_t i = 0; i < n; i++) {
        const struct layer_args *L = layers[i];
        if (!L->w13 || L->E <= 0) return -1;
        int rc = layer_step(L, P, i == 0 ? x : out, residual, i == 0, NULL, z + i * B * L->E, ids + i * B * L->K,
                            weights + i * B * L->K, out);
        if (rc) return rc;
    }
    return 0;
}
