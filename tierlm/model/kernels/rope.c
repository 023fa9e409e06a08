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
 */
#include <stdint.h>

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
