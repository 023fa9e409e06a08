/* Rotary position embedding applied in place to float32 rows (tierlm.model.rope.apply_rope).
 *
 *   pair j of a head (j < rot / 2): (a, b) -> (a cos_j - b sin_j, b cos_j + a sin_j)
 *
 * with the pairs at (2j, 2j + 1) ("interleaved": GPT-J, llama.cpp's permuted llama weights) or at
 * (j, j + rot / 2) ("half": HF); features from rot on pass through. x: N rows of H heads of D
 * features (heads contiguous, rows row_stride floats apart: q and k side by side in the fused qkv
 * output), cos/sin: (N, rot / 2).
 *
 * Why: torch's version is ~10 small ops a layer (views, 4 muls, add, sub, stack or cat), ~45 us at
 * batch 1 on the 1.1B Llama, 1 ms of a 23 ms Q4_0 decode step; this is one pass of a few us.
 * Products and sums in that order, without FMA contraction, so the values equal torch's bit for bit.
 *
 * bfloat16 (tierlm_rope_bf16): x, cos and sin in bfloat16, as the bf16 model runs. torch computes each
 * of the six products and sums in float32 and rounds it to bfloat16 (round to nearest even) before
 * the next one uses it; this does the same roundings in the same places, so it too equals torch bit
 * for bit. torch's bf16 path: ~140 us a layer for a 38-token SplitFuse step of SmolLM2 (9 + 3 heads
 * of 64), ~19 us at batch 1; this one ~22 and ~2 us (bench/results/rope.md). It is slower than the
 * float32 one (three roundings an element, done in integer lanes), still a fraction of torch's.
 */
#include <stdint.h>
#include <string.h>

__attribute__((optimize("fp-contract=off")))
void tierlm_rope(float *x, int64_t row_stride, int N, int H, int D, int rot, const float *cos_t, const float *sin_t,
                 int interleaved) {
    const int half = rot / 2;
    for (int n = 0; n < N; n++) {
        const float *c = cos_t + (int64_t)n * half, *s = sin_t + (int64_t)n * half;
        for (int h = 0; h < H; h++) {
            float *v = x + (int64_t)n * row_stride + (int64_t)h * D;
            if (interleaved) {
                for (int j = 0; j < half; j++) {
                    const float a = v[2 * j], b = v[2 * j + 1];
                    v[2 * j] = a * c[j] - b * s[j];
                    v[2 * j + 1] = b * c[j] + a * s[j];
                }
            } else {
                for (int j = 0; j < half; j++) {
                    const float a = v[j], b = v[j + half];
                    v[j] = a * c[j] - b * s[j];
                    v[j + half] = b * c[j] + a * s[j];
                }
            }
        }
    }
}

/* Rounding a float32 to bfloat16 precision (nearest even), kept as a float32: add half an ulp of
 * bfloat16 (less one, plus the kept lowest bit: ties go to even) and clear the low 16 bits. NaNs need
 * no care: every NaN here has a nonzero top mantissa bit (bf16 inputs carry no low bits, and the FPU's
 * own NaN is 0xFFC00000), so the add neither carries out of it nor leaves Inf. */
static inline float round_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
    memcpy(&f, &u, 4);
    return f;
}

enum { MAX_ROT = 512 };

/* Each element i of the rotated span is out_i = R(R(x_i c_i) + R(p_i s_i)), with p_i its pair's other
 * element, c_i its pair's cos and s_i its sin, negated for the pair's first element (a c - b s = a c +
 * b (-s), and R(-y) = -R(y)): one loop of contiguous float32 arrays, which the compiler vectorises. */
__attribute__((optimize("fp-contract=off")))
void tierlm_rope_bf16(uint16_t *x, int64_t row_stride, int N, int H, int D, int rot, const uint16_t *cos_t,
                      const uint16_t *sin_t, int interleaved) {
    rot = rot < MAX_ROT ? rot : MAX_ROT;  /* the caller keeps rot <= MAX_ROT */
    const int half = rot / 2;
    float c[MAX_ROT], s[MAX_ROT], f[MAX_ROT], p[MAX_ROT];
    for (int n = 0; n < N; n++) {
        /* pair j's elements: (2j, 2j + 1) interleaved, (j, j + half) in halves */
        const int second = interleaved ? 1 : half, stride = interleaved ? 2 : 1;
        const uint16_t *cn = cos_t + (int64_t)n * half, *sn = sin_t + (int64_t)n * half;
        for (int j = 0; j < half; j++) {
            float cj, sj;
            const uint32_t cu = (uint32_t)cn[j] << 16, su = (uint32_t)sn[j] << 16;
            memcpy(&cj, &cu, 4);
            memcpy(&sj, &su, 4);
            c[stride * j] = c[stride * j + second] = cj;
            s[stride * j] = -sj;
            s[stride * j + second] = sj;
        }
        for (int h = 0; h < H; h++) {
            uint16_t *v = x + (int64_t)n * row_stride + (int64_t)h * D;
            for (int i = 0; i < rot; i++) {
                const uint32_t u = (uint32_t)v[i] << 16;
                memcpy(&f[i], &u, 4);
            }
            if (interleaved)
                for (int i = 0; i < rot; i++) p[i] = f[i ^ 1];
            else
                for (int i = 0; i < rot; i++) p[i] = f[i < half ? i + half : i - half];
            for (int i = 0; i < rot; i++) {
                const float y = round_bf16(round_bf16(f[i] * c[i]) + round_bf16(p[i] * s[i]));
                uint32_t u;
                memcpy(&u, &y, 4);
                v[i] = (uint16_t)(u >> 16);
            }
        }
    }
}
