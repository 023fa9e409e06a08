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
 * below 2e-7 for the arguments here, all <= 0), vectorised with the rest.
 */
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
 * built in the exponent bits. Plain arithmetic, so the compiler vectorises the loops that call it. */
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

#define MAX_GROUP_DIM 4096 /* G * D floats of one task's queries and outputs kept on the stack */

#define DEFINE_DECODE_ATTENTION(NAME, T, LOAD, STORE)                                                          \
    static int NAME(const T *q, int64_t q_stride, const T *kc, const T *vc, const int64_t *slots,            \
                    const int64_t *q_pos, int B, int H, int Hkv, int D, int max_kv, int window, float scale, \
                    T *out, int num_threads) {                                                               \
        const int G = H / Hkv;                                                                                 \
        int status = 0;                                                                                        \
        _Pragma("omp parallel for schedule(static) num_threads(num_threads) reduction(| : status)")           \
        for (int t = 0; t < B * Hkv; t++) {                                                                    \
            const int b = t / Hkv, kh = t % Hkv;                                                              \
            const int64_t p = q_pos[b];                                                                        \
            const int64_t j0 = window > 0 && p - window + 1 > 0 ? p - window + 1 : 0;                         \
            const int L = (int)(p - j0 + 1);                                                                   \
            float qf[MAX_GROUP_DIM], acc[MAX_GROUP_DIM];                                                       \
            float *s = malloc(sizeof(float) * (size_t)G * L); /* (G, L) scores, then weights */              \
            if (s == NULL) { status = 1; continue; }                                                          \
            for (int i = 0; i < G * D; i++) {                                                                 \
                qf[i] = LOAD(q[b * q_stride + (int64_t)kh * G * D + i]) * scale;                              \
                acc[i] = 0.f;                                                                                  \
            }                                                                                                  \
            const int64_t *row_slots = slots + (int64_t)b * max_kv + j0;                                       \
            for (int j = 0; j < L; j++) {                                                                      \
                const T *k = kc + (row_slots[j] * Hkv + kh) * D;                                               \
                for (int g = 0; g < G; g++) {                                                                  \
                    float dot = 0.f;                                                                           \
                    _Pragma("omp simd reduction(+ : dot)")                                                     \
                    for (int d = 0; d < D; d++) dot += qf[g * D + d] * LOAD(k[d]);                             \
                    s[g * L + j] = dot;                                                                        \
                }                                                                                              \
            }                                                                                                  \
            float inv[G > 0 ? G : 1];                                                                          \
            for (int g = 0; g < G; g++) {                                                                      \
                float *sg = s + (int64_t)g * L, m = sg[0], sum = 0.f;                                          \
                for (int j = 1; j < L; j++) m = sg[j] > m ? sg[j] : m;                                         \
                _Pragma("omp simd reduction(+ : sum)")                                                         \
                for (int j = 0; j < L; j++) { sg[j] = exp_nonpos(sg[j] - m); sum += sg[j]; }                   \
                inv[g] = 1.f / sum;                                                                            \
            }                                                                                                  \
            for (int j = 0; j < L; j++) {                                                                      \
                const T *v = vc + (row_slots[j] * Hkv + kh) * D;                                               \
                for (int g = 0; g < G; g++) {                                                                  \
                    const float w = s[g * L + j];                                                              \
                    _Pragma("omp simd")                                                                        \
                    for (int d = 0; d < D; d++) acc[g * D + d] += w * LOAD(v[d]);                              \
                }                                                                                              \
            }                                                                                                  \
            T *o = out + ((int64_t)b * H + (int64_t)kh * G) * D;                                               \
            for (int g = 0; g < G; g++)                                                                        \
                for (int d = 0; d < D; d++) o[g * D + d] = STORE(acc[g * D + d] * inv[g]);                     \
            free(s);                                                                                           \
        }                                                                                                      \
        return status ? -2 : 0;                                                                                \
    }

#define LOAD_F32(x) (x)
#define STORE_F32(x) (x)
DEFINE_DECODE_ATTENTION(decode_attention_f32, float, LOAD_F32, STORE_F32)
DEFINE_DECODE_ATTENTION(decode_attention_bf16, uint16_t, bf16_to_f32, f32_to_bf16)

/* dtype 0: float32, 1: bfloat16. Returns 0; -1 for a shape it does not take (H not a multiple of
 * Hkv, more than MAX_GROUP_DIM values per KV head's queries, an unknown dtype); -2 if out of memory. */
int tierlm_decode_attention(int dtype, const void *q, int64_t q_stride, const void *k_cache, const void *v_cache,
                            const int64_t *slots, const int64_t *q_pos, int B, int H, int Hkv, int D, int max_kv,
                            int window, float scale, void *out, int num_threads) {
    if (Hkv < 1 || H % Hkv || (H / Hkv) * D > MAX_GROUP_DIM || B < 1 || D < 1)
        return -1;
    if (dtype == 0)
        return decode_attention_f32(q, q_stride, k_cache, v_cache, slots, q_pos, B, H, Hkv, D, max_kv, window,
                                    scale, out, num_threads);
    if (dtype == 1)
        return decode_attention_bf16(q, q_stride, k_cache, v_cache, slots, q_pos, B, H, Hkv, D, max_kv, window,
                                     scale, out, num_threads);
    return -1;
}
