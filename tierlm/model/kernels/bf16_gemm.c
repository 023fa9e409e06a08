/* y (M x N, fp32) = x (M x K, bf16) . W^T, W (N x K, bf16, row-major: the (out, in) layout).
 *
 * Why hand-written: batch-1 decode is a matrix-vector product that only has to stream W once.
 * oneDNN's bf16 kernels reach ~70% of this CPU's read bandwidth on it; AVX512-BF16's dot-product
 * instruction (vdpbf16ps: 32 bf16 products accumulated into 16 fp32 lanes) lets a plain loop keep
 * up with memory. Rows of W are independent, so threads split the rows.
 *
 * Blocking: 8 rows of W x up to 4 rows of x -> 32 zmm accumulators. An 8-row slab of W (8*K*2 bytes,
 * 32 KiB at K = 2048) stays in L1/L2 while every block of x rows passes over it, so W is read from
 * memory once whatever M is. Requires K % 32 == 0 (the caller checks).
 */
#include <immintrin.h>
#include <stdint.h>

#define ROWS 8

static inline __m512bh as_bh(__m512i v) { return (__m512bh)v; }

/* One slab: rows [n0, n0 + nr) of W against rows [m0, m0 + mb) of x, mb <= 4, nr <= ROWS. */
static inline void slab(const uint16_t *x, const uint16_t *w, float *y, int N, int K,
                        int n0, int nr, int m0, int mb, int prefetch) {
    __m512 acc[ROWS][4];
    for (int r = 0; r < ROWS; r++)
        for (int m = 0; m < 4; m++) acc[r][m] = _mm512_setzero_ps();
    for (int k = 0; k < K; k += 32) {
        /* Software prefetch of the next slab's cache lines at the same k, in step with this one
         * (as in quant_gemv.c), into L2 (T1; on Zen 4 10% faster than into L1: 31 against 28 GB/s at
         * M = 1); prefetches never fault, so past the last row is harmless. */
        if (prefetch)
            for (int r = 0; r < ROWS; r++) _mm_prefetch((const char *)(w + (int64_t)(n0 + ROWS + r) * K + k), _MM_HINT_T1);
        __m512i wv[ROWS];
        for (int r = 0; r < ROWS; r++)
            wv[r] = r < nr ? _mm512_loadu_si512((const void *)(w + (int64_t)(n0 + r) * K + k)) : _mm512_setzero_si512();
        for (int m = 0; m < mb; m++) {
            __m512i xv = _mm512_loadu_si512((const void *)(x + (int64_t)(m0 + m) * K + k));
            for (int r = 0; r < ROWS; r++) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], as_bh(wv[r]), as_bh(xv));
        }
    }
    for (int m = 0; m < mb; m++)
        for (int r = 0; r < nr; r++) y[(int64_t)(m0 + m) * N + n0 + r] = _mm512_reduce_add_ps(acc[r][m]);
}

void tierlm_bf16_gemm(const uint16_t *x, const uint16_t *w, float *y, int M, int N, int K, int num_threads) {
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
