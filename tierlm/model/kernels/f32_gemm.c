/* y (M x N, fp32) = x (M x K, fp32) . W^T, W (N x K, fp32, row-major: the (out, in) layout), for
 * decode-sized M.
 *
 * Why hand-written: on AMD CPUs torch's BLAS (MKL) runs small-M float32 products far below both
 * limits: on this project's Zen 4, for a 11264 x 2048 matrix, 4.7 ms at M = 1 (19 GB/s of weights),
 * 9.6 ms at M = 2 and 15.8 ms at M = 16 (47 GFLOP/s), where streaming W once takes about 3 ms. A
 * batch of decodes is exactly that product, so continuous batching got slower per step with every
 * sequence added. This loop reads W once for all M rows of x (as kernels/bf16_gemm.c does for bf16).
 *
 * Blocking: 8 rows of W x up to 4 rows of x -> 32 zmm accumulators (16 fp32 lanes each, fused
 * multiply-adds); the 8-row slab of W (8 * K * 4 bytes, 64 KiB at K = 2048) stays in L2 while every
 * block of x rows passes over it. The next slab is prefetched into L2 in step with this one (rows are
 * too short for the hardware prefetcher on eight interleaved streams; see quant_gemv.c for why L2).
 * Rows of W are independent, so threads split the slabs. Requires K % 16 == 0 (the caller checks).
 */
#include <immintrin.h>
#include <stdint.h>

#define ROWS 8

/* One slab: rows [n0, n0 + nr) of W against rows [m0, m0 + mb) of x, mb <= 4, nr <= ROWS. */
static inline void slab(const float *x, const float *w, float *y, int N, int K, int n0, int nr, int m0, int mb,
                        int prefetch) {
    __m512 acc[ROWS][4];
    for (int r = 0; r < ROWS; r++)
        for (int m = 0; m < 4; m++) acc[r][m] = _mm512_setzero_ps();
    for (int k = 0; k < K; k += 16) {
        if (prefetch)  /* prefetches never fault, so past the last row is harmless */
            for (int r = 0; r < ROWS; r++) _mm_prefetch((const char *)(w + (int64_t)(n0 + ROWS + r) * K + k), _MM_HINT_T1);
        __m512 wv[ROWS];
        for (int r = 0; r < ROWS; r++) wv[r] = r < nr ? _mm512_loadu_ps(w + (int64_t)(n0 + r) * K + k) : _mm512_setzero_ps();
        for (int m = 0; m < mb; m++) {
            __m512 xv = _mm512_loadu_ps(x + (int64_t)(m0 + m) * K + k);
            for (int r = 0; r < ROWS; r++) acc[r][m] = _mm512_fmadd_ps(wv[r], xv, acc[r][m]);
        }
    }
    for (int m = 0; m < mb; m++)
        for (int r = 0; r < nr; r++) y[(int64_t)(m0 + m) * N + n0 + r] = _mm512_reduce_add_ps(acc[r][m]);
}

void tierlm_f32_gemm(const float *x, const float *w, float *y, int M, int N, int K, int num_threads) {
    int num_slabs = (N + ROWS - 1) / ROWS;
    #pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int s = 0; s < num_slabs; s++) {
        int n0 = s * ROWS;
        int nr = N - n0 < ROWS ? N - n0 : ROWS;
        for (int m0 = 0; m0 < M; m0 += 4) {
            int mb = M - m0 < 4 ? M - m0 : 4;
            slab(x, w, y, N, K, n0, nr, m0, mb, m0 == 0);
        }
    }
}
