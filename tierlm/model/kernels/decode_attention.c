/* Attention of decode rows (one new query token each) read straight from the paged KV cache.
 *
 *   out[b, h] = sum_j softmax_j(scale * q[b, h] . K[s_bj, h / G]) * V[s_bj, h / G]
 *
 * over row b's visible key positions j in [j0, p], p = q_pos[b] (the query's own position, whose
 * K/V the step has already written), j0 = max(0, p - window + 1) with a sliding window, else 0;
 * s_bj = slots[b * max_kv + j] is the cache slot of position j (tierlm.model.attention's layout).
 * G = H / Hkv query heads share each KV head (GQA/MQA).
 *
 * Why: the torch path gathers every row's keys and values into a padded (B, Hkv, maxL, D) copy
 * (two index_selects) and calls SDPA on it: three small ops a layer, about 100 us at batch 1 on the
 * 1.1B Llama (2.5 ms of a 33 ms q4 decode step), and the gather copies the whole context every step.
 * Here each (row, KV head) task reads its slots in place: its G query heads' scores in one pass over
 * the keys (each key loaded once for all G), an exact softmax (max subtracted, float32), then one
 * pass over the values.
 *
 * Layout: q (B, H, D) with row stride q_stride elements (heads contiguous: q may be a view into the
 * fused qkv output), caches (num_slots, Hkv, D), out (B, H, D) contiguous. q, caches and out share
 * one dtype, float32 or bfloat16; all arithmetic is float32. exp is a polynomial (relative error
 * below 2e-7 for the arguments here, all <= 0). AVX2 + FMA, D a multiple of 8.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* e^x for x <= 0: x = n ln2 + r, |r| <= ln2 / 2, e^r by its degree-6 Taylor polynomial, times 2^n
 * built in the exponent bits (exp8_nonpos: the same on 8 lanes; the compiler did not vectorise this
 * one's clamp, and the scalar loop took a third of the kernel's time). */
static inline float exp_nonpos(float x) {
    x = x < -87.0f ? -87.0f : x;  /* e^-87 ~ 1.6e-38: keeps 2^n a normal float */
    const float n = (x * 1.44269504f + 12582912.f) - 12582912.f;  /* round to nearest (1.5 * 2^23 trick) */
    const float r = x - n * 0.693145752f - n * 1.42860677e-06f;    /* ln 2 in two parts: r is exact */
    float p = 1.f / 720;
    p = p * r + 1.f / 120;
    p = p * r + 1.f / 24;
    p = p * r + 1.f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    const uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
}

/* exp_nonpos on 8 lanes (the same operations, so the same values as the scalar version) */
static inline __m256 exp8_nonpos(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    const __m256 big = _mm256_set1_ps(12582912.f);
    const __m256 n = _mm256_sub_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504f), big), big);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-06f), r);
    __m256 p = _mm256_set1_ps(1.f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

/* sg[j] = e^(sg[j] - max sg) for j < L; returns their sum */
static float softmax_numerators(float *sg, int L) {
    __m256 vm = _mm256_set1_ps(sg[0]);
    int j = 0;
    for (; j + 8 <= L; j += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(sg + j));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vm), _mm256_extractf128_ps(vm, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    float m = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
    for (; j < L; j++) m = sg[j] > m ? sg[j] : m;
    __m256 vs = _mm256_setzero_ps();
    const __m256 vmax = _mm256_set1_ps(m);
    for (j = 0; j + 8 <= L; j += 8) {
        const __m256 e = exp8_nonpos(_mm256_sub_ps(_mm256_loadu_ps(sg + j), vmax));
        _mm256_storeu_ps(sg + j, e);
        vs = _mm256_add_ps(vs, e);
    }
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(vs), _mm256_extractf128_ps(vs, 1));
    s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    float sum = _mm_cvtss_f32(_mm_add_ss(s4, _mm_movehdup_ps(s4)));
    for (; j < L; j++) { sg[j] = exp_nonpos(sg[j] - m); sum += sg[j]; }
    return sum;
}

#define MAX_GROUP_DIM 4096 /* G * D floats of one task's queries and outputs kept on the stack */

/* 8 consecutive values of a float32 or bfloat16 (bf16 = 1, a literal at every call site) array as floats */
static inline __attribute__((always_inline)) __m256 load8(const void *base, int64_t i, int bf16) {
    if (!bf16) return _mm256_loadu_ps((const float *)base + i);
    const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)base + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* Scores of gn (<= 8, a literal after the switch below) query heads qf (gn, D) against one key k (D,):
 * s[g * L] = qf[g] . k. The key is loaded once for all gn heads, and each head has its own
 * accumulator: gn independent FMA chains instead of one latency-bound reduction per dot (the
 * `omp simd reduction` loops this replaced kept the sum on the stack: ~5x slower). */
static inline __attribute__((always_inline)) void scores_block(int gn, const float *qf, const void *k, int D, int bf16,
                                                               float *s, int L) {
    __m256 a[8];
    for (int g = 0; g < gn; g++) a[g] = _mm256_setzero_ps();
    for (int d = 0; d < D; d += 8) {
        const __m256 kv = load8(k, d, bf16);
        for (int g = 0; g < gn; g++) a[g] = _mm256_fmadd_ps(_mm256_loadu_ps(qf + g * D + d), kv, a[g]);
    }
    for (int g = 0; g < gn; g++) s[(int64_t)g * L] = hsum8(a[g]);
}

/* acc (nc * 8 floats, nc <= 8 a literal) += sum_j w[j] * V_j[d0 .. d0 + 8 nc) over the L visible keys,
 * the accumulators in registers for the whole pass over the keys. */
static inline __attribute__((always_inline)) void values_block(int nc, const float *w, const void *vc,
                                                               const int64_t *row_slots, int L, int64_t v_off,
                                                               int64_t slot_stride, int bf16, float *acc) {
    __m256 a[8];
    for (int c = 0; c < nc; c++) a[c] = _mm256_setzero_ps();
    for (int j = 0; j < L; j++) {
        const __m256 wj = _mm256_set1_ps(w[j]);
        const int64_t base = row_slots[j] * slot_stride + v_off;
        for (int c = 0; c < nc; c++) a[c] = _mm256_fmadd_ps(wj, load8(vc, base + 8 * c, bf16), a[c]);
    }
    for (int c = 0; c < nc; c++) _mm256_storeu_ps(acc + 8 * c, a[c]);
}

/* One (row b, KV head kh) task: its G query heads' outputs. Returns 0, or 1 when out of memory. */
static inline __attribute__((always_inline)) int attend(const void *q, int64_t q_stride, const void *kc, const void *vc,
                                                        const int64_t *slots, const int64_t *q_pos, int b, int kh,
                                                        int H, int Hkv, int D, int max_kv, int window, float scale,
                                                        void *out, int bf16) {
    const int G = H / Hkv;
    const int64_t p = q_pos[b];
    const int64_t j0 = window > 0 && p - window + 1 > 0 ? p - window + 1 : 0;
    const int L = (int)(p - j0 + 1);
    float qf[MAX_GROUP_DIM], acc[MAX_GROUP_DIM];
    float *s = malloc(sizeof(float) * (size_t)G * L); /* (G, L) scores, then weights */
    if (s == NULL) return 1;
    const int64_t q0 = b * q_stride + (int64_t)kh * G * D;
    for (int i = 0; i < G * D; i++)
        qf[i] = (bf16 ? bf16_to_f32(((const uint16_t *)q)[q0 + i]) : ((const float *)q)[q0 + i]) * scale;
    const int64_t *row_slots = slots + (int64_t)b * max_kv + j0;
    const int64_t slot_stride = (int64_t)Hkv * D, kv_off = (int64_t)kh * D;
    for (int j = 0; j < L; j++) {
        const void *k = bf16 ? (const void *)((const uint16_t *)kc + row_slots[j] * slot_stride + kv_off)
                             : (const void *)((const float *)kc + row_slots[j] * slot_stride + kv_off);
        for (int g0 = 0; g0 < G; g0 += 8) {
            float *sj = s + (int64_t)g0 * L + j;
            const float *qg = qf + g0 * D;
            switch (G - g0 < 8 ? G - g0 : 8) {
            case 1: scores_block(1, qg, k, D, bf16, sj, L); break;
            case 2: scores_block(2, qg, k, D, bf16, sj, L); break;
            case 3: scores_block(3, qg, k, D, bf16, sj, L); break;
            case 4: scores_block(4, qg, k, D, bf16, sj, L); break;
            case 5: scores_block(5, qg, k, D, bf16, sj, L); break;
            case 6: scores_block(6, qg, k, D, bf16, sj, L); break;
            case 7: scores_block(7, qg, k, D, bf16, sj, L); break;
            default: scores_block(8, qg, k, D, bf16, sj, L); break;
            }
        }
    }
    float inv[G > 0 ? G : 1];
    for (int g = 0; g < G; g++) inv[g] = 1.f / softmax_numerators(s + (int64_t)g * L, L);
    for (int g = 0; g < G; g++)
        for (int d0 = 0; d0 < D; d0 += 64) {
            const float *w = s + (int64_t)g * L;
            float *a = acc + g * D + d0;
            switch ((D - d0 < 64 ? D - d0 : 64) / 8) {
            case 1: values_block(1, w, vc, row_slots, L, kv_off + d0, slot_stride, bf16, a); break;
            case 2: values_block(2, w, vc, row_slots, L, kv_off + d0, slot_stride, bf16, a); break;
            case 3: values_block(3, w, vc, row_slots, L, kv_off + d0, slot_stride, bf16, a); break;
            case 4: values_block(4, w, vc, row_slots, L, kv_off + d0, slot_stride, bf16, a); break;
            case 5: values_block(5, w, vc, row_slots, L, kv_off + d0, slot_stride, bf16, a); break;
            case 6: values_block(6, w, vc, row_slots, L, kv_off + d0, slot_stride, bf16, a); break;
            case 7: values_block(7, w, vc, row_slots, L, kv_off + d0, slot_stride, bf16, a); break;
            default: values_block(8, w, vc, row_slots, L, kv_off + d0, slot_stride, bf16, a); break;
            }
        }
    const int64_t o0 = ((int64_t)b * H + (int64_t)kh * G) * D;
    for (int g = 0; g < G; g++)
        for (int d = 0; d < D; d++) {
            const float o = acc[g * D + d] * inv[g];
            if (bf16) ((uint16_t *)out)[o0 + g * D + d] = f32_to_bf16(o);
            else ((float *)out)[o0 + g * D + d] = o;
        }
    free(s);
    return 0;
}

#define DEFINE_DECODE_ATTENTION(NAME, BF16)                                                                    \
    static int NAME(const void *q, int64_t q_stride, const void *kc, const void *vc, const int64_t *slots,   \
                    const int64_t *q_pos, int B, int H, int Hkv, int D, int max_kv, int window, float scale, \
                    void *out, int num_threads) {                                                            \
        int status = 0;                                                                                        \
        _Pragma("omp parallel for schedule(static) num_threads(num_threads) reduction(| : status)")           \
        for (int t = 0; t < B * Hkv; t++)                                                                      \
            status |= attend(q, q_stride, kc, vc, slots, q_pos, t / Hkv, t % Hkv, H, Hkv, D, max_kv, window,   \
                             scale, out, BF16);                                                                \
        return status ? -2 : 0;                                                                                \
    }

DEFINE_DECODE_ATTENTION(decode_attention_f32, 0)
DEFINE_DECODE_ATTENTION(decode_attention_bf16, 1)

/* dtype 0: float32, 1: bfloat16. Returns 0; -1 for a shape it does not take (H not a multiple of
 * Hkv, more than MAX_GROUP_DIM values per KV head's queries, D not a multiple of 8, an unknown
 * dtype); -2 if out of memory. */
int tierlm_decode_attention(int dtype, const void *q, int64_t q_stride, const void *k_cache, const void *v_cache,
                            const int64_t *slots, const int64_t *q_pos, int B, int H, int Hkv, int D, int max_kv,
                            int window, float scale, void *out, int num_threads) {
    if (Hkv < 1 || H % Hkv || (H / Hkv) * D > MAX_GROUP_DIM || B < 1 || D < 8 || D % 8)
        return -1;
    if (dtype == 0)
        return decode_attention_f32(q, q_stride, k_cache, v_cache, slots, q_pos, B, H, Hkv, D, max_kv, window,
                                    scale, out, num_threads);
    if (dtype == 1)
        return decode_attention_bf16(q, q_stride, k_cache, v_cache, slots, q_pos, B, H, Hkv, D, max_kv, window,
                                     scale, out, num_threads);
    return -1;
}
