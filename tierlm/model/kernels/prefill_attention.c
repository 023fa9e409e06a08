/* Causal attention of prompt rows (several new query tokens per sequence: a whole prompt or a
 * SplitFuse chunk of one) read straight from the paged KV cache.
 *
 *   out[t, h] = sum_j softmax_j(scale * q[t, h] . K[s_j, h / G]) * V[s_j, h / G]
 *
 * for the step's token t = q_start + i of row (sequence) b, at position p = ctx - q_len + i, over
 * key positions j in [j0, p], j0 = max(0, p - window + 1) with a sliding window, else 0; s_j =
 * slots[b * slots_stride + j] is the cache slot of position j (tierlm.model.attention's layout; the
 * step has already written its own K/V there). G = H / Hkv query heads share each KV head.
 *
 * Why: torch's CPU flash attention ran at 60-95 GFLOP/s here (SmolLM2 shapes: 9 heads, 3 KV heads,
 * D = 64, float32 or bfloat16), under half of what float32 FMAs reach, and took 27% of a bf16
 * 512-token prefill and about a quarter of a SplitFuse chunk step, which on top gathered each
 * chunk's whole context out of the cache first (two index_selects a layer).
 *
 * How: a task is one row's KV head and a tile of up to QT = 32 of its queries: its G x QT query rows
 * (heads of the KV group side by side) meet the keys in blocks of KB = 16 positions. Each block
 * is converted once per call, keys transposed into Kt (D x 16, float32), values as rows (16 x D),
 * before the tasks start; then each of 8 query rows at a time takes D fused multiply-adds of a broadcast q element with a row of Kt: 16 scores per row with 8
 * independent accumulators. Softmax is online (flash attention): per row a running max m, sum l and
 * unnormalised output O (D floats), rescaled by e^(m_old - m_new) when the max grows; masked
 * positions (j > p, or outside the window) contribute exact zeros, and a block with no visible key
 * for a row leaves that row untouched. Blocks are aligned to absolute positions (multiples of KB)
 * and each row's arithmetic depends only on its own query and the blocks, so a row's output is
 * bit-identical however the prompt was chunked or tiled: chunked prefill equals one-shot prefill.
 *
 * Layout: q (N, H, D) with row stride q_stride elements (heads contiguous: q may be a view into the
 * fused qkv output); caches (num_slots, Hkv, D); out (N, H * D) contiguous; rows: per row b three
 * int64 (q_start, q_len, ctx). q, caches and out share one dtype, float32 (0) or bfloat16 (1); all
 * arithmetic is float32. AVX-512F, D a multiple of 64 and at most 512.
 * Returns 0, -1 for a shape it does not take, -2 when out of memory.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { KB = 16, QT = 32, RB = 8, MAX_D = 512 };

/* e^x on 16 lanes for x <= 0 (the same polynomial as decode_attention.c's exp_nonpos) */
static inline __m512 exp16_nonpos(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-06f), r);
    __m512 p = _mm512_set1_ps(1.f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
}

static inline float exp_nonpos1(float x) {  /* lane 0 of the vector version: the same value */
    return _mm512_cvtss_f32(exp16_nonpos(_mm512_set1_ps(x)));
}

/* 16 values of dtype at p -> float32 */
static inline __m512 load16(int dtype, const void *p) {
    if (dtype == 0) return _mm512_loadu_ps(p);
    const __m256i h = _mm256_loadu_si256((const __m256i *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static inline void store16(int dtype, void *p, __m512 v) {
    if (dtype == 0) { _mm512_storeu_ps(p, v); return; }
    /* round to nearest even, as torch does (no NaNs here: l > 0 and the inputs are finite) */
    __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(u));
}

typedef struct {
    int b, g, i0, i1;  /* row, KV head, queries [i0, i1) of the row */
} Task;

typedef struct {
    float *q;   /* (R, D) the task's query rows, scaled */
    float *o;   /* (R, D) unnormalised outputs */
    float *m, *l;
} Scratch;

/* One KV head of one row: key block i (positions KB * (first + i) ..) at kt + i * KB * D, transposed
 * (D x KB), its values at vb + i * KB * D (KB x D), float32; positions past the context are zeros. */
typedef struct {
    float *kt, *vb;
    int64_t first;  /* the first block held */
} Blocks;

static void load_block(int dtype, const uint8_t *kc, const uint8_t *vc, const int64_t *slots, int64_t ctx, int g,
                       int Hkv, int D, int64_t kb, float *kt, float *vb) {
    const int esz = dtype == 0 ? 4 : 2;
    const int64_t row_bytes = (int64_t)Hkv * D * esz;
    for (int k = 0; k < KB; k++) {
        const int64_t j = kb + k;
        float *vk = vb + (int64_t)k * D;
        if (j >= ctx) {
            memset(vk, 0, sizeof(float) * D);
            for (int d = 0; d < D; d++) kt[d * KB + k] = 0.f;
            continue;
        }
        const uint8_t *kr = kc + slots[j] * row_bytes + (int64_t)g * D * esz;
        const uint8_t *vr = vc + slots[j] * row_bytes + (int64_t)g * D * esz;
        for (int d = 0; d < D; d += 16) {
            _mm512_storeu_ps(vk + d, load16(dtype, vr + (int64_t)d * esz));
            float tmp[16];
            _mm512_storeu_ps(tmp, load16(dtype, kr + (int64_t)d * esz));
            for (int e = 0; e < 16; e++) kt[(d + e) * KB + k] = tmp[e];
        }
    }
}

static void run_task(int dtype, const Task *t, const uint8_t *q, int64_t q_stride, const Blocks *blocks,
                     const int64_t *row, int H, int G, int D, int window, float scale, uint8_t *out, Scratch *s) {
    const int nq = t->i1 - t->i0, esz = dtype == 0 ? 4 : 2;
    const int R = G * nq, Rp = (R + RB - 1) / RB * RB;
    const int64_t q_start = row[0], q_len = row[1], ctx = row[2];
    const int64_t first_pos = ctx - q_len;
    /* row r = head (r / nq) of the group, query i0 + r % nq */
    for (int r = 0; r < Rp; r++) {
        float *qr = s->q + (int64_t)r * D;
        if (r >= R) { memset(qr, 0, sizeof(float) * D); continue; }
        const int h = t->g * G + r / nq;
        const int64_t tok = q_start + t->i0 + r % nq;
        const uint8_t *src = q + (tok * q_stride + (int64_t)h * D) * esz;
        for (int d = 0; d < D; d += 16)
            _mm512_storeu_ps(qr + d, _mm512_mul_ps(load16(dtype, src + (int64_t)d * esz), _mm512_set1_ps(scale)));
        s->m[r] = -INFINITY;
        s->l[r] = 0.f;
        memset(s->o + (int64_t)r * D, 0, sizeof(float) * D);
    }
    const int64_t p_lo = first_pos + t->i0, p_hi = first_pos + t->i1 - 1;
    const int64_t j_lo = window > 0 && p_lo - window + 1 > 0 ? p_lo - window + 1 : 0;
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    for (int64_t kb = j_lo / KB * KB; kb <= p_hi; kb += KB) {
        const float *kt = blocks->kt + (kb / KB - blocks->first) * (int64_t)KB * D;  /* (D, KB) */
        const float *vb = blocks->vb + (kb / KB - blocks->first) * (int64_t)KB * D;  /* (KB, D) */
        const __m512i jv = _mm512_add_epi32(lane, _mm512_set1_epi32((int)kb));
        for (int r0 = 0; r0 < R; r0 += RB) {
            __m512 acc[RB];
            for (int r = 0; r < RB; r++) acc[r] = _mm512_setzero_ps();
            const float *q0 = s->q + (int64_t)r0 * D;
            for (int d = 0; d < D; d++) {
                const __m512 kd = _mm512_loadu_ps(kt + d * KB);
                for (int r = 0; r < RB; r++) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(q0[(int64_t)r * D + d]), kd, acc[r]);
            }
            for (int r = r0; r < r0 + RB && r < R; r++) {
                const int64_t p = first_pos + t->i0 + r % nq;
                /* visible: j <= p and, with a window, p - j < window */
                __mmask16 vis = _mm512_cmple_epi32_mask(jv, _mm512_set1_epi32((int)p));
                if (window > 0) vis &= _mm512_cmpgt_epi32_mask(jv, _mm512_set1_epi32((int)(p - window)));
                if (!vis) continue;
                const __m512 sc = acc[r - r0];
                const float bmax = _mm512_mask_reduce_max_ps(vis, sc);
                const float m_old = s->m[r];
                const float m_new = bmax > m_old ? bmax : m_old;
                const float corr = m_old == -INFINITY ? 0.f : exp_nonpos1(m_old - m_new);
                const __m512 e = _mm512_maskz_mov_ps(vis, exp16_nonpos(_mm512_sub_ps(sc, _mm512_set1_ps(m_new))));
                s->m[r] = m_new;
                s->l[r] = s->l[r] * corr + _mm512_reduce_add_ps(e);
                float ev[KB];
                _mm512_storeu_ps(ev, e);
                float *o = s->o + (int64_t)r * D;
                const __m512 vc_ = _mm512_set1_ps(corr);
                for (int d0 = 0; d0 < D; d0 += 64) {  /* 4 independent accumulators per pass */
                    __m512 a0 = _mm512_mul_ps(_mm512_loadu_ps(o + d0), vc_);
                    __m512 a1 = _mm512_mul_ps(_mm512_loadu_ps(o + d0 + 16), vc_);
                    __m512 a2 = _mm512_mul_ps(_mm512_loadu_ps(o + d0 + 32), vc_);
                    __m512 a3 = _mm512_mul_ps(_mm512_loadu_ps(o + d0 + 48), vc_);
                    for (int k = 0; k < KB; k++) {
                        const __m512 ek = _mm512_set1_ps(ev[k]);
                        const float *vk = vb + (int64_t)k * D + d0;
                        a0 = _mm512_fmadd_ps(ek, _mm512_loadu_ps(vk), a0);
                        a1 = _mm512_fmadd_ps(ek, _mm512_loadu_ps(vk + 16), a1);
                        a2 = _mm512_fmadd_ps(ek, _mm512_loadu_ps(vk + 32), a2);
                        a3 = _mm512_fmadd_ps(ek, _mm512_loadu_ps(vk + 48), a3);
                    }
                    _mm512_storeu_ps(o + d0, a0);
                    _mm512_storeu_ps(o + d0 + 16, a1);
                    _mm512_storeu_ps(o + d0 + 32, a2);
                    _mm512_storeu_ps(o + d0 + 48, a3);
                }
            }
        }
    }
    for (int r = 0; r < R; r++) {
        const int h = t->g * G + r / nq;
        const int64_t tok = q_start + t->i0 + r % nq;
        uint8_t *dst = out + (tok * H + h) * (int64_t)D * esz;
        const __m512 inv = _mm512_set1_ps(1.f / s->l[r]);  /* l >= 1: the row's own position is visible */
        const float *o = s->o + (int64_t)r * D;
        for (int d = 0; d < D; d += 16) store16(dtype, dst + (int64_t)d * esz, _mm512_mul_ps(_mm512_loadu_ps(o + d), inv));
    }
}

int tierlm_prefill_attention(int dtype, const void *q, int64_t q_stride, const void *k_cache, const void *v_cache,
                             const int64_t *slots, int64_t slots_stride, const int64_t *rows, int num_rows, int H,
                             int Hkv, int D, int window, float scale, void *out, int num_threads) {
    if ((dtype != 0 && dtype != 1) || D % 64 != 0 || D > MAX_D || Hkv < 1 || H % Hkv != 0 || num_rows < 0)
        return -1;
    const int G = H / Hkv;
    for (int b = 0; b < num_rows; b++) {
        const int64_t q_len = rows[3 * b + 1], ctx = rows[3 * b + 2];
        if (q_len < 1 || ctx < q_len || ctx > slots_stride || ctx > INT32_MAX) return -1;
    }
    /* Tiles of QT queries, or smaller until there are 4 tasks a thread: a SplitFuse chunk of one
     * sequence on a model with one KV head (Gemma-3) is otherwise a single task on one core. Rows
     * are independent, so the tile size changes no result. */
    int qt = QT, num_tasks = 0;
    for (;; qt /= 2) {
        num_tasks = 0;
        for (int b = 0; b < num_rows; b++) num_tasks += Hkv * (int)((rows[3 * b + 1] + qt - 1) / qt);
        if (qt <= 4 || num_tasks >= 4 * num_threads) break;
    }
    Task *tasks = malloc(sizeof(Task) * (num_tasks > 0 ? num_tasks : 1));
    if (!tasks) return -2;
    /* the costliest tiles (latest queries: most keys) first, so that dynamic scheduling balances */
    int n = 0;
    for (int b = 0; b < num_rows; b++) {
        const int64_t q_len = rows[3 * b + 1];
        for (int i0 = (int)((q_len - 1) / qt * qt); i0 >= 0; i0 -= qt)
            for (int g = 0; g < Hkv; g++) {
                tasks[n].b = b, tasks[n].g = g, tasks[n].i0 = i0;
                tasks[n].i1 = i0 + qt < q_len ? i0 + qt : (int)q_len;
                n++;
            }
    }
    /* Every (row, KV head)'s key blocks transposed and values in float32, once, before the tasks:
     * the tiles of a long prompt all meet the same blocks, and converting them per tile cost about
     * a tenth of the kernel. From the row's first visible block (a window hides the ones before). */
    Blocks *blocks = malloc(sizeof(Blocks) * ((size_t)num_rows * Hkv + 1));
    int64_t *block_start = malloc(sizeof(int64_t) * ((size_t)num_rows + 1));  /* in blocks, per row */
    if (!blocks || !block_start) { free(blocks); free(block_start); free(tasks); return -2; }
    int64_t total_blocks = 0;
    for (int b = 0; b < num_rows; b++) {
        const int64_t q_len = rows[3 * b + 1], ctx = rows[3 * b + 2], first_pos = ctx - q_len;
        const int64_t lo = window > 0 && first_pos - window + 1 > 0 ? (first_pos - window + 1) / KB : 0;
        block_start[b] = total_blocks;
        for (int g = 0; g < Hkv; g++) blocks[b * Hkv + g].first = lo;
        total_blocks += Hkv * ((ctx + KB - 1) / KB - lo);
    }
    block_start[num_rows] = total_blocks;
    float *block_buf = malloc(sizeof(float) * ((size_t)2 * total_blocks * KB * D + 1));
    if (!block_buf) { free(blocks); free(block_start); free(tasks); return -2; }
    for (int b = 0; b < num_rows; b++) {
        const int64_t per_head = (block_start[b + 1] - block_start[b]) / Hkv;
        for (int g = 0; g < Hkv; g++) {
            Blocks *bl = &blocks[b * Hkv + g];
            bl->kt = block_buf + (block_start[b] + g * per_head) * (int64_t)KB * D;
            bl->vb = bl->kt + total_blocks * (int64_t)KB * D;
        }
    }
    const int Rp = (G * QT + RB - 1) / RB * RB;
    int status = 0;
#pragma omp parallel num_threads(num_threads)
    {
#pragma omp for schedule(static)
        for (int64_t i = 0; i < total_blocks; i++) {
            int b = 0;
            while (block_start[b + 1] <= i) b++;
            const int64_t per_head = (block_start[b + 1] - block_start[b]) / Hkv, rel = i - block_start[b];
            const int g = (int)(rel / per_head);
            const Blocks *bl = &blocks[b * Hkv + g];
            const int64_t blk = rel % per_head;
            load_block(dtype, k_cache, v_cache, slots + (int64_t)b * slots_stride, rows[3 * b + 2], g, Hkv, D,
                       (bl->first + blk) * KB, bl->kt + blk * KB * D, bl->vb + blk * KB * D);
        }
        Scratch s;
        float *buf = malloc(sizeof(float) * ((size_t)2 * Rp * D + 2 * Rp));
        if (!buf) {
#pragma omp atomic write
            status = -2;
        } else {
            s.q = buf, s.o = buf + (size_t)Rp * D, s.m = s.o + (size_t)Rp * D, s.l = s.m + Rp;
        }
#pragma omp for schedule(dynamic, 1)
        for (int i = 0; i < num_tasks; i++) {
            if (!buf) continue;
            const Task *t = &tasks[i];
            run_task(dtype, t, q, q_stride, &blocks[t->b * Hkv + t->g], rows + 3 * t->b, H, G, D, window, scale,
                     out, &s);
        }
        free(buf);
    }
    free(block_buf);
    free(block_start);
    free(blocks);
    free(tasks);
    return status;
}
