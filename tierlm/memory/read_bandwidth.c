/* A memory read kernel for measuring RAM read bandwidth (tierlm.memory.hardware.memory_read_bandwidth).
 *
 * Each thread streams its contiguous share of the buffer with 256-bit loads, folding them into four
 * independent accumulators with XOR (one cycle, no floating-point latency chain), so the loop is
 * bound by the loads and nothing else: the ceiling a batch-1 decode kernel, which also does its
 * arithmetic on the bytes, can approach but not pass. The result is returned so the loads cannot be
 * optimised away.
 *
 * buf: nbytes readable bytes (any alignment); bytes past the last whole 128-byte block are not read.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

uint64_t tierlm_read_bytes(const void *buf, int64_t nbytes, int num_threads) {
    const __m256i *p = (const __m256i *)buf;
    const int64_t num_blocks = nbytes / 128;  /* 4 vectors of 32 bytes: two cache lines */
    uint64_t total = 0;
#pragma omp parallel num_threads(num_threads) reduction(^ : total)
    {
        const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int64_t begin = num_blocks * t / nt, end = num_blocks * (t + 1) / nt;
        __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t i = begin; i < end; i++) {
            const __m256i *q = p + 4 * i;
            a0 = _mm256_xor_si256(a0, _mm256_loadu_si256(q));
            a1 = _mm256_xor_si256(a1, _mm256_loadu_si256(q + 1));
            a2 = _mm256_xor_si256(a2, _mm256_loadu_si256(q + 2));
            a3 = _mm256_xor_si256(a3, _mm256_loadu_si256(q + 3));
        }
        __m256i a = _mm256_xor_si256(_mm256_xor_si256(a0, a1), _mm256_xor_si256(a2, a3));
        uint64_t lanes[4];
        _mm256_storeu_si256((__m256i *)lanes, a);
        total ^= lanes[0] ^ lanes[1] ^ lanes[2] ^ lanes[3];
    }
    return total;
}
