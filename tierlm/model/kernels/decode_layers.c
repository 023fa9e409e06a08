/* A decode step through every layer of a Llama- or Gemma-shaped decoder in one call
 * (tierlm.model.fused_decode).
 *
 * Per layer, for N decode rows (one new token each, N <= 8); [optional] parts are NULL pointers when
 * the model has none:
 *
 *     h = rms_norm(x) * attn_norm
 *     qkv = h W_qkv^T (+ b)              q | k | v side by side, (N, (H + 2 Hkv) D)
 *     [q, k = rms_norm per head * q_norm, k_norm]
 *     rope(q, k) in place; k, v -> their cache slots
 *     a = attention(q, cache) W_o^T (+ b)
 *     x += [rms_norm(a) * post_attn_norm]
 *     h = rms_norm(x) * mlp_norm
 *     g | u = h W_up^T (+ b)             (N, 2 F)
 *     m = (act(g) * u) W_down^T (+ b)    act: SiLU, or GELU with the tanh approximation
 *     x += [rms_norm(m) * post_mlp_norm]
 *
 * Why: the same step in Python is about 15 small calls a layer (norms, RoPE, two cache writes, the
 * attention call, chunk / SiLU / mul, residual adds, and each kernel call's argument handling), about
 * 4 ms of an 18 ms q2 step of the 1.1B Llama at batch 1: the quantized formats' kernels stream their
 * bytes as fast as bf16's do, and that fixed cost is what keeps their steps from shrinking in
 * proportion. Here the per-layer glue is a few loops over a few thousand floats.
 *
 * No kernel is repeated here: the matmuls, RMSNorm, RoPE and decode attention are the libraries the
 * Python path calls (quant_gemv.c, f32_gemm.c, rms_norm.c, rope.c, decode_attention.c), whose entry
 * points the caller passes in (the quantized GEMV: whichever build of quant_gemv.c the linear method
 * loaded, AVX512-VNNI or AVX2), so this file's results equal that path's except for the activation
 * (the C library's expf / tanhf here, torch's vectorised exp / tanh there: an ulp in about 1 value in
 * 1500). Products and sums in the order torch computes them, without FMA contraction.
 *
 * Layout: x (N, d) float32, updated in place; caches (num_slots, Hkv, D) float32; slot_mapping (N,)
 * the slot of each row's new token; kv_slots (N * max_kv) and q_pos (N,) as decode_attention.c
 * takes them; cos[t] / sin[t] (N, rot / 2) the rows of rotary table t.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef int (*gemv_fn)(int fmt, const float *x, int M, int K, const void *codes, const void *steps,
                       const void *mins, int group, int64_t row_bytes, int64_t scale_stride, float *y, int N,
                       int num_threads);
typedef void (*f32_gemm_fn)(const float *x, const float *w, float *y, int M, int N, int K, int num_threads);
typedef void (*norm_fn)(const float *x, const float *w, float *y, int n, int d, float eps, int num_threads);
typedef void (*rope_fn)(float *x, int64_t row_stride, int N, int H, int D, int rot, const float *cos_t,
                        const float *sin_t, int interleaved);
typedef int (*attn_fn)(int dtype, const void *q, int64_t q_stride, const void *k_cache, const void *v_cache,
                       const int64_t *slots, const int64_t *q_pos, int B, int H, int Hkv, int D, int max_kv,
                       int window, float scale, void *out, int num_threads);

/* One matrix, or one part of matrices stacked along the output dimension (tierlm.quant.FusedWeight):
 * fmt >= 0 is a quant_gemv.c format with its arguments; fmt == -1 a plain float32 (rows, cols) matrix
 * at codes, run by f32_gemm.c. */
typedef struct {
    const void *codes, *steps, *mins;
    int64_t row_bytes, scale_stride;
    int32_t fmt, group, rows, cols;
} Part;

typedef struct {
    const Part *parts;
    const float *bias; /* (rows,) or NULL */
    int32_t num_parts, rows;
} Matrix;

typedef struct {
    const float *attn_norm, *mlp_norm; /* (d,) float32, any +1 offset already in */
    const float *q_norm, *k_norm;      /* (D,) or NULL: RMSNorm of each head of q and k before RoPE */
    const float *post_attn_norm, *post_mlp_norm; /* (d,) or NULL: of the attention / MLP output */
    Matrix qkv, o, up, down;
    float *k_cache, *v_cache;
    int32_t window;     /* sliding window in tokens, 0 = none */
    int32_t rope_table; /* index into the step's cos / sin */
} Layer;

typedef struct {
    gemv_fn gemv;
    f32_gemm_fn f32_gemm;
    norm_fn norm;
    rope_fn rope;
    attn_fn attn;
    const Layer *layers;
    int32_t num_layers, hidden, num_heads, num_kv_heads, head_dim, rotary_dim, intermediate, interleaved;
    int32_t activation; /* ACT_SILU or ACT_GELU_TANH */
    float eps, scale;
} Model;

enum { ACT_SILU = 0, ACT_GELU_TANH = 1 };

/* a (F,) = act(g) * u, as torch's CPU kernels write them: silu(g) = g / (1 + exp(-g)); gelu_tanh(g) =
 * 0.5 g (1 + tanh(sqrt(2 / pi) (g + 0.044715 g^3))). */
__attribute__((optimize("fp-contract=off")))
static void gated_activation(int activation, const float *g, const float *u, float *a, int F) {
    if (activation == ACT_SILU) {
        for (int j = 0; j < F; j++) a[j] = g[j] / (1.f + expf(-g[j])) * u[j];
        return;
    }
    const float beta = (float)(M_SQRT2 * M_2_SQRTPI * 0.5), kappa = 0.044715f;
    for (int j = 0; j < F; j++) {
        const float x = g[j], inner = beta * (x + kappa * (x * x * x));
        a[j] = 0.5f * x * (1.f + tanhf(inner)) * u[j];
    }
}

/* y (N, w->rows) = x (N, K) W^T + b. scratch holds N x (the largest part's rows) floats. */
static int matmul(const Model *m, const Matrix *w, const float *x, int N, int K, float *y, float *scratch,
                  int num_threads) {
    int64_t offset = 0;
    for (int p = 0; p < w->num_parts; p++) {
        const Part *part = &w->parts[p];
        float *out = w->num_parts == 1 ? y : scratch;
        if (part->fmt < 0)
            m->f32_gemm(x, (const float *)part->codes, out, N, part->rows, K, num_threads);
        else if (m->gemv(part->fmt, x, N, K, part->codes, part->steps, part->mins, part->group, part->row_bytes,
                         part->scale_stride, out, part->rows, num_threads) != 0)
            return -1;
        if (w->num_parts > 1)
            for (int n = 0; n < N; n++)
                memcpy(y + (int64_t)n * w->rows + offset, scratch + (int64_t)n * part->rows,
                       sizeof(float) * part->rows);
        offset += part->rows;
    }
    if (w->bias)
        for (int n = 0; n < N; n++)
            for (int j = 0; j < w->rows; j++) y[(int64_t)n * w->rows + j] += w->bias[j];
    return 0;
}

static int max_part_rows(const Matrix *w) {
    int r = 0;
    for (int p = 0; p < w->num_parts; p++) r = w->parts[p].rows > r ? w->parts[p].rows : r;
    return r;
}

/* Returns 0; -1 if a kernel refused its arguments; -2 if out of memory. */
int tierlm_decode_layers(const Model *m, float *x, int N, const int64_t *slot_mapping, const int64_t *kv_slots,
                         const int64_t *q_pos, int max_kv, const float *const *cos_t, const float *const *sin_t,
                         int num_threads) {
    const int d = m->hidden, D = m->head_dim, H = m->num_heads, Hkv = m->num_kv_heads, F = m->intermediate;
    const int q_size = H * D, kv_size = Hkv * D, qkv_size = q_size + 2 * kv_size;
    int widest = 0;
    for (int i = 0; i < m->num_layers; i++) {
        const Matrix *ws[4] = {&m->layers[i].qkv, &m->layers[i].o, &m->layers[i].up, &m->layers[i].down};
        for (int j = 0; j < 4; j++) widest = max_part_rows(ws[j]) > widest ? max_part_rows(ws[j]) : widest;
    }
    /* h (N, d) | qkv (N, qkv_size) | attn (N, q_size) | t (N, d) | up (N, 2F) | act (N, F) | scratch */
    const int64_t per_row = (int64_t)d + qkv_size + q_size + d + 2 * F + F + widest;
    float *buf = malloc(sizeof(float) * per_row * N);
    if (!buf) return -2;
    float *h = buf, *qkv = h + (int64_t)N * d, *attn = qkv + (int64_t)N * qkv_size, *t = attn + (int64_t)N * q_size;
    float *up = t + (int64_t)N * d, *act = up + (int64_t)N * 2 * F, *scratch = act + (int64_t)N * F;
    int status = 0;
    for (int i = 0; i < m->num_layers && status == 0; i++) {
        const Layer *L = &m->layers[i];
        m->norm(x, L->attn_norm, h, N, d, m->eps, num_threads);
        if ((status = matmul(m, &L->qkv, h, N, d, qkv, scratch, num_threads))) break;
        if (L->q_norm)  /* in place, head by head (rows of D), each token's heads contiguous */
            for (int n = 0; n < N; n++) {
                float *row = qkv + (int64_t)n * qkv_size;
                m->norm(row, L->q_norm, row, H, D, m->eps, 1);
                m->norm(row + q_size, L->k_norm, row + q_size, Hkv, D, m->eps, 1);
            }
        m->rope(qkv, qkv_size, N, H + Hkv, D, m->rotary_dim, cos_t[L->rope_table], sin_t[L->rope_table],
                m->interleaved);
        for (int n = 0; n < N; n++) {
            const float *row = qkv + (int64_t)n * qkv_size;
            memcpy(L->k_cache + slot_mapping[n] * kv_size, row + q_size, sizeof(float) * kv_size);
            memcpy(L->v_cache + slot_mapping[n] * kv_size, row + q_size + kv_size, sizeof(float) * kv_size);
        }
        if ((status = m->attn(0, qkv, qkv_size, L->k_cache, L->v_cache, kv_slots, q_pos, N, H, Hkv, D, max_kv,
                              L->window, m->scale, attn, num_threads)))
            break;
        if ((status = matmul(m, &L->o, attn, N, q_size, t, scratch, num_threads))) break;
        if (L->post_attn_norm) m->norm(t, L->post_attn_norm, t, N, d, m->eps, num_threads);
        for (int64_t j = 0; j < (int64_t)N * d; j++) x[j] += t[j];
        m->norm(x, L->mlp_norm, h, N, d, m->eps, num_threads);
        if ((status = matmul(m, &L->up, h, N, d, up, scratch, num_threads))) break;
        for (int n = 0; n < N; n++)
            gated_activation(m->activation, up + (int64_t)n * 2 * F, up + (int64_t)n * 2 * F + F, act + (int64_t)n * F,
                             F);
        if ((status = matmul(m, &L->down, act, N, F, t, scratch, num_threads))) break;
        if (L->post_mlp_norm) m->norm(t, L->post_mlp_norm, t, N, d, m->eps, num_threads);
        for (int64_t j = 0; j < (int64_t)N * d; j++) x[j] += t[j];
    }
    free(buf);
    return status;
}
