/* y (M x N, fp32) = x (M x K, fp32) . W^T for W (N x K) held quantized; decode-sized M.
 *
 * Why: batch-1 decode streams W once per token, so fewer bytes per weight is more tokens/s, but
 * only if unpacking keeps up with memory. This follows llama.cpp: x is quantized to int8 in blocks
 * of 32 (scale xd = max|x| / 127), and each 32-weight block of W is a single AVX512-VNNI
 * dot product of unsigned 8-bit codes with x's signed bytes (vpdpbusd, 8 int32 lanes):
 *
 *   sum_j w_j x_j  ~=  sum_blocks  wd * xd * sum_j c_j q_j  +  (wm - off * wd) * xd * sum_j q_j
 *
 * where a weight is w = wd * (c - off) + wm, c the unsigned code of the block:
 *
 *   format        block layout (bytes)                         c            wd      off   wm
 *   TQ8  (q8)     codes (N, K) u8; step/min fp16 per group       byte         step    0     min
 *   TQ4  (q4)     codes (N, K/2): byte j = w_j | w_{j+16} << 4   nibble       step    0     min
 *   TQ3H (q3h)    codes (N, 7K/16): 7-bit pairs a*11 + b         a, b         step    0     min
 *   TQ6/5/3/2     codes (N, bK/8): b-bit little-endian stream    b bits       step    0     min
 *   Q8_0          fp16 d, 32 x s8                                s8 ^ 0x80    d       128   0
 *   Q4_0          fp16 d, 16 B nibbles (same order as TQ4)       nibble       d       8     0
 *   Q4_1          fp16 d, fp16 m, 16 B nibbles                   nibble       d       0     m
 *   Q5_0          fp16 d, u32 high bits, 16 B nibbles            5 bits       d       16    0
 *   Q5_1          fp16 d, fp16 m, u32 high bits, 16 B nibbles    5 bits       d       0     m
 *
 * K-quants group 8 such blocks of 32 (or 16 of 16) in a 256-weight super-block with one float16
 * scale and 6- or 8-bit sub-block scales:
 *
 *   Q4_K  144 B: fp16 d, fp16 dmin, 12 B of 6-bit (scale, min) pairs, 128 B nibbles
 *                block j: nibble (low for even j, high for odd) of bytes 32*(j/2)..   wd = d*sc_j, wm = -dmin*m_j
 *   Q5_K  176 B: as Q4_K plus 32 B of high bits (bit j of byte l: weight l of block j)
 *   Q6_K  210 B: 128 B low nibbles, 64 B 2-bit highs, 16 x s8 scales, fp16 d; weight = d*sc*(c - 32)
 *                with a scale per 16 weights: each half of the 32-byte block fills 4 of the 8 int32
 *                lanes of vpdpbusd, so the scale becomes a per-lane vector and the -32 offset is a
 *                lane-wise dot of 32 with x, computed once per block of x for all rows.
 *
 *   Q2_K  84 B: 16 B of 4-bit (scale, min) pairs per 16 weights, 64 B 2-bit codes, fp16 d, fp16 dmin;
 *                block j: bits 2(j%4).. of bytes 32(j/4)..; weight = d*sc*c - dmin*m per 16 weights
 *   Q3_K  110 B: 32 B high bits (bit j of byte l: weight l of block j), 64 B 2-bit low codes as Q2_K,
 *                12 B of 6-bit scales per 16 weights, fp16 d; weight = d*(sc - 32)*(c - 4)
 *   IQ4_XS 136 B: fp16 d, 2 + 4 B of 6-bit block scales, 128 B nibbles as Q4_0's; weight =
 *                d*(ls - 32) * kv[nibble], kv the 16 int8 values of IQ4_NL (18 B: fp16 d, 16 B nibbles)
 * Q2_K, Q3_K and Q6_K scale every 16 weights: each half of the 32-byte block fills 4 of the 8 int32
 * lanes of vpdpbusd, so the scale becomes a per-lane vector (Q2_K's mins use x's sums per half).
 * IQ4's values are signed bytes (a pshufb of the nibbles): unsigned c = v + 128 with off 128 in the
 * AVX512 build, signed products as for Q8_0 in the AVX2 one.
 * F16 and BF16 rows multiply float32 x directly (converted 8 at a time, no int8 rounding of x).
 *
 * which is exactly the product of the dequantized W with the int8-rounded x (the tests check that).
 * Per block the vector part accumulates lane-wise (no horizontal sum per block) and the scalar part
 * uses per-block sums xd * sum q computed once per call.
 * Steps/mins: row r's at steps + r * scale_stride (0: K / group, i.e. stored on their own).
 * q3h: a block of 32 weights is 16 pairs in 14 bytes, two 56-bit little-endian words; pdep spreads
 * each word's eight 7-bit fields into bytes, and a = p / 11 = (p * 373) >> 12 (exact for p <= 127),
 * b = p - 11 a in 16-bit lanes, so lane i holds a | b << 8: bytes w_2i, w_2i+1 in order.
 * q6, q5, q3, q2: a block of 32 codes is 4b bytes, four b-byte words of 8 codes; pdep spreads a
 * word's eight b-bit fields into the eight bytes of a 64-bit lane.
 * Rows of W are independent: threads split the rows. Requires K % 32 == 0 (K-quants: K % 256 == 0) and,
 * for TQ*, group % 32 == 0.
 *
 * Row tiles (Q4_0X16, Q6_KX16, TQX16, TQ3HX16; tierlm.quant.tiles): the same formats repacked 16
 * rows at a time so that int32 lane i of a 512-bit vpdpbusd is row i, which removes the per-row,
 * per-block scalar work above; the kernels for them follow rows_dot.
 *
 * Two builds of this file (tierlm.model.kernels): x86-64-v4 with AVX512-VNNI, everything above; and
 * x86-64-v3 (AVX2, FMA, F16C) for the CPUs without AVX-512 (most laptops), the per-row kernels only
 * (no row tiles: tierlm.quant.linear keeps rows there), computing the same sums with:
 * - vpmaddubsw + vpmaddwd for each vpdpbusd (llama.cpp's AVX2 dot): u8 x s8 products summed in pairs
 *   into int16 lanes with saturation, then pairs of those into the same int32 lanes. Exact while a
 *   pair fits int16: codes up to 7 bits (2 * 127 * 127 = 32258). 8-bit codes would overflow, so TQ8
 *   and Q8_0 run as signed bytes s = c - 128 (off = 128 moves into wm: wm + 128 wd), multiplied as
 *   llama.cpp does Q8_0, |s| times x's bytes with s's signs: at most 2 * 128 * 127 = 32512.
 * - byte shuffles and 16-bit multiplies for pdep (stream_codes, q3h_codes): pdep is microcoded on
 *   AMD Zen 1 and 2, ~90 ns each on this project's AVX2 EPYC (q6 at four per 32 weights would run
 *   ~0.1 G weights/s).
 * - AVX2 forms of the 512-bit quantization of x, the mask moves of high_bits and the 16-bit
 *   variable shifts of nibbles, with the same results.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__F16C__)
#define AVX512_BUILD 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define AVX512_BUILD 0
#else
#error "build with -march=x86-64-v4 -mavx512vnni, or with -march=x86-64-v3 (tierlm.model.kernels)"
#endif

enum { TQ8 = 0, TQ4 = 1, Q8_0 = 2, Q4_0 = 3, Q4_1 = 4, Q5_0 = 5, Q5_1 = 6, Q4_K = 7, Q5_K = 8, Q6_K = 9, TQ3H = 10, TQ6 = 11, TQ5 = 12, TQ3 = 13, TQ2 = 14, Q4_0X16 = 15, Q6_KX16 = 16, TQX16 = 17, TQ3HX16 = 18,
       Q2_K = 19, Q3_K = 20, IQ4_NL = 21, IQ4_XS = 22, F16 = 23, BF16 = 24, Q4_KX8 = 25, Q4_0X8 = 26, Q6_KX8 = 27, Q5_KX8 = 28, Q3_KX8 = 29, Q2_KX8 = 30, IQ4_XSX8 = 31, Q8_0X8 = 32, NUM_FORMATS = 33 };

/* K-quants (256 weights a super-block) */
static inline int is_k_quant(int fmt) { return (fmt >= Q4_K && fmt <= Q6_K) || fmt == Q6_KX16 || fmt == Q2_K || fmt == Q3_K || fmt == IQ4_XS || fmt == Q4_KX8 || fmt == Q6_KX8 || fmt == Q5_KX8 || fmt == Q3_KX8 || fmt == Q2_KX8 || fmt == IQ4_XSX8; }
/* Row-tile formats: the AVX512 build only */
static inline int is_tile(int fmt) { return fmt >= Q4_0X16 && fmt <= TQ3HX16; }

typedef struct {
    int8_t *q;    /* (K,) x quantized */
    float *xd;    /* (K/32,) block scales */
    float *xs;    /* (K/32,) xd * sum(q): the block's sum of int8-rounded x */
    float *xs16;  /* (K/16,) the same per half block (Q6_K's scales are per 16 weights) */
    int32_t *x3h; /* (K/32 * 8,) q3h tiles only (else NULL): per block, x's even then odd bytes per
                   * pass (q3h_x, tq3h_x16_tile) */
} XBlocks;

static inline float fp16(const uint8_t *p) { return _cvtsh_ss(*(const uint16_t *)p); }

static inline int hsum8_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 1)));
}

static void quantize_x(const float *x, int K, XBlocks *xb) {
    /* Per block of 32: max |x| by a reduction, round to nearest even (cvtps_epi32 in the default
     * rounding mode, as nearbyintf), narrow with saturation (|q| <= 127 anyway). */
#if AVX512_BUILD
    const __m512 sign = _mm512_set1_ps(-0.f);
    for (int b = 0; b < K / 32; b++) {
        const __m512 v0 = _mm512_loadu_ps(x + 32 * b), v1 = _mm512_loadu_ps(x + 32 * b + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_andnot_ps(sign, v0), _mm512_andnot_ps(sign, v1)));
        const float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
        const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, _mm512_set1_ps(id)));
        const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, _mm512_set1_ps(id)));
        _mm_storeu_si128((__m128i *)(xb->q + 32 * b), _mm512_cvtsepi32_epi8(q0));
        _mm_storeu_si128((__m128i *)(xb->q + 32 * b + 16), _mm512_cvtsepi32_epi8(q1));
        const int s0 = _mm512_reduce_add_epi32(q0), s1 = _mm512_reduce_add_epi32(q1);
        xb->xd[b] = d;
        xb->xs[b] = d * (float)(s0 + s1);
        xb->xs16[2 * b] = d * (float)s0;
        xb->xs16[2 * b + 1] = d * (float)s1;
    }
#else
    /* 4 vectors a block; two saturating packs narrow to bytes in 4-byte runs interleaved by the
     * 128-bit lanes, which a dword permute puts back in order. */
    const __m256 sign = _mm256_set1_ps(-0.f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int b = 0; b < K / 32; b++) {
        __m256 v[4], m = _mm256_setzero_ps();
        for (int i = 0; i < 4; i++) {
            v[i] = _mm256_loadu_ps(x + 32 * b + 8 * i);
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[i]));
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        const float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
        const float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
        __m256i q[4];
        for (int i = 0; i < 4; i++) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], _mm256_set1_ps(id)));
        const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        _mm256_storeu_si256((__m256i *)(xb->q + 32 * b), _mm256_permutevar8x32_epi32(bytes, order));
        const int s0 = hsum8_epi32(_mm256_add_epi32(q[0], q[1])), s1 = hsum8_epi32(_mm256_add_epi32(q[2], q[3]));
        xb->xd[b] = d;
        xb->xs[b] = d * (float)(s0 + s1);
        xb->xs16[2 * b] = d * (float)s0;
        xb->xs16[2 * b + 1] = d * (float)s1;
    }
#endif
}

#if AVX512_BUILD
/* The q3h tiles' x: per block of 32 int8 values, pass f's even weights x[8f + 2k] (k = 0..3) as
 * one int32 word, then the odd ones x[8f + 2k + 1]: words f and 4 + f (tq3h_x16_tile). */
static void q3h_x(const int8_t *q, int K, int32_t *out) {
    for (int i = 0; i < K / 8; i++) {  /* i = 4 b + f */
        int8_t e[4], o[4];
        for (int k = 0; k < 4; k++) { e[k] = q[8 * i + 2 * k]; o[k] = q[8 * i + 2 * k + 1]; }
        memcpy(out + 8 * (i / 4) + i % 4, e, 4);
        memcpy(out + 8 * (i / 4) + 4 + i % 4, o, 4);
    }
}
#endif

static inline __m256i nibbles(const uint8_t *p) {  /* 16 bytes -> 16 low nibbles, then 16 high ones */
    __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p));
#if AVX512_BUILD
    const __m256i shift = _mm256_set_epi64x(0x0004000400040004LL, 0x0004000400040004LL, 0, 0);
    return _mm256_and_si256(_mm256_srlv_epi16(v, shift), _mm256_set1_epi8(0x0F));
#else  /* no 16-bit variable shifts: the upper lane from a shifted copy */
    return _mm256_and_si256(_mm256_blend_epi32(v, _mm256_srli_epi16(v, 4), 0xF0), _mm256_set1_epi8(0x0F));
#endif
}

static inline __m256i high_bits(const uint8_t *p) {  /* bit j of a u32 -> 0x10 in byte j */
    uint32_t h;
    memcpy(&h, p, 4);
#if AVX512_BUILD
    return _mm256_and_si256(_mm256_movm_epi8((__mmask32)h), _mm256_set1_epi8(0x10));
#else  /* byte j gets byte j / 8 of h and tests its bit j % 8 */
    const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32((int)h),
                                               _mm256_set_epi64x(0x0303030303030303LL, 0x0202020202020202LL,
                                                                 0x0101010101010101LL, 0));
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit), _mm256_set1_epi8(0x10));
#endif
}

/* 32 bytes -> (byte >> shift) & mask, moved up by `up` bits */
static inline __m256i bit_field32(const uint8_t *p, int shift, int mask, int up) {
    __m256i v = _mm256_and_si256(_mm256_srli_epi16(_mm256_loadu_si256((const __m256i *)p), shift), _mm256_set1_epi8((char)mask));
    return _mm256_slli_epi16(v, up);  /* mask << up < 256: nothing crosses into the next byte */
}

/* 32 bytes -> their low (shift 0) or high (shift 4) nibbles */
static inline __m256i nibbles32(const uint8_t *p, int shift) { return bit_field32(p, shift, 0x0F, 0); }

#if !AVX512_BUILD
/* The AVX2 build's bit-field extraction (no pdep, see the header): a group of 8 fields of `bits` bits
 * fills `bits` bytes, field i starting at bit bits * i; the pshufb control puts the byte it starts in,
 * and the next one where it runs into it (else zero), in 16-bit lane i, and the multiplier
 * 2^(8 - its offset in the byte) moves it to bit 8 (what overflows 16 bits lies above the field). */
#define FIELD_BYTE(bits, i) ((bits) * (i) / 8)
#define FIELD_SHIFT(bits, i) ((bits) * (i) % 8)
#define FIELD_PAIR(bits, i, at)                                                                             \
    (char)((at) + FIELD_BYTE(bits, i)),                                                                   \
    (char)(FIELD_SHIFT(bits, i) + (bits) > 8 ? (at) + FIELD_BYTE(bits, i) + 1 : 0x80)
/* the pshufb control of 8 fields of a group starting at byte `at` of a 128-bit lane */
#define FIELD_GROUP(bits, at)                                                                               \
    FIELD_PAIR(bits, 0, at), FIELD_PAIR(bits, 1, at), FIELD_PAIR(bits, 2, at), FIELD_PAIR(bits, 3, at),   \
    FIELD_PAIR(bits, 4, at), FIELD_PAIR(bits, 5, at), FIELD_PAIR(bits, 6, at), FIELD_PAIR(bits, 7, at)
#define FIELD_MUL(bits, i) (short)(1 << (8 - FIELD_SHIFT(bits, i)))
#define FIELD_MULS(bits)                                                                                     \
    FIELD_MUL(bits, 0), FIELD_MUL(bits, 1), FIELD_MUL(bits, 2), FIELD_MUL(bits, 3), FIELD_MUL(bits, 4),   \
    FIELD_MUL(bits, 5), FIELD_MUL(bits, 6), FIELD_MUL(bits, 7)

/* 16-bit lane i: the field `shuf` gathers for it in bits 0..7 (bits above its width still to mask) */
static inline __attribute__((always_inline)) __m256i gather_fields(__m256i v, __m256i shuf, __m256i mul) {
    return _mm256_srli_epi16(_mm256_mullo_epi16(_mm256_shuffle_epi8(v, shuf), mul), 8);
}
#endif

/* 14 bytes of 7-bit pairs -> the 32 codes they hold (see the header) */
static inline __m256i q3h_codes(const uint8_t *p) {
#if AVX512_BUILD
    uint64_t lo, hi;
    memcpy(&lo, p, 8);      /* bytes 0..7: pairs 0..7 in bits 0..55 */
    memcpy(&hi, p + 6, 8);  /* bytes 6..13: pairs 8..15 in bits 8..63 (never reads past the block) */
    const uint64_t fields = 0x7F7F7F7F7F7F7F7FULL;
    __m128i pairs = _mm_set_epi64x((long long)_pdep_u64(hi >> 8, fields), (long long)_pdep_u64(lo, fields));
    __m256i v = _mm256_cvtepu8_epi16(pairs);
#else  /* pairs 0..7 from bytes 0..6, 8..15 from bytes 7..13 (byte 1 of the upper lane's load) */
    const __m256i bytes = _mm256_set_m128i(_mm_loadl_epi64((const __m128i *)(p + 6)), _mm_loadl_epi64((const __m128i *)p));
    const __m256i shuf = _mm256_setr_epi8(FIELD_GROUP(7, 0), FIELD_GROUP(7, 1));
    __m256i v = _mm256_and_si256(gather_fields(bytes, shuf, _mm256_setr_epi16(FIELD_MULS(7), FIELD_MULS(7))),
                                 _mm256_set1_epi16(0x7F));
#endif
    __m256i a = _mm256_srli_epi16(_mm256_mullo_epi16(v, _mm256_set1_epi16(373)), 12);
    __m256i b = _mm256_sub_epi16(v, _mm256_mullo_epi16(a, _mm256_set1_epi16(11)));
    return _mm256_or_si256(a, _mm256_slli_epi16(b, 8));
}

/* 4 * bits bytes of a little-endian bit stream -> its 32 codes of `bits` bits (a literal at call sites).
 * Tried instead: AVX512-VBMI (masked load, byte permute, vpmultishiftqb: 4 instructions per 32 codes,
 * q3h likewise): the same speed for every format (bench/quant_kernel.py, q6 24.9 / q5 26.1 / q3 31.8 /
 * q2 31.0 G weights/s against 23.9 / 27.3 / 32.1 / 31.9): decoding is not what bounds the loop.
 * Nor are the per-block products: two blocks per 512-bit vpdpbusd, one conversion and FMA per 64
 * weights (groups of 64), ran q4 at 30.0 against 30.5-30.7 G weights/s for this loop. */
static inline __attribute__((always_inline)) __m256i stream_codes(const uint8_t *p, int bits) {
#if !AVX512_BUILD
    /* Groups 0 and 1 of 8 codes from the lower lane, bytes 0.. of the block; 2 and 3 from the upper,
     * where byte 2 * bits sits at `at`: a 16-byte load ending at the block's end, or (4 * bits < 16
     * bytes) the lower lane's bytes again. Loads stay inside the block. After packus (lane by lane:
     * the first register's 8 bytes, then the second's) the codes are in order. */
    __m128i lo, hi;
    int at;
    if (bits >= 4) {
        lo = _mm_loadu_si128((const __m128i *)p);
        hi = _mm_loadu_si128((const __m128i *)(p + 4 * bits - 16));
        at = 16 - 2 * bits;
    } else {
        lo = _mm_loadl_epi64((const __m128i *)p);
        if (bits == 3) { int32_t w; memcpy(&w, p + 8, 4); lo = _mm_insert_epi32(lo, w, 2); }
        hi = lo;
        at = 2 * bits;
    }
    const __m256i v = _mm256_set_m128i(hi, lo), mul = _mm256_setr_epi16(FIELD_MULS(bits), FIELD_MULS(bits));
    const __m256i r0 = gather_fields(v, _mm256_setr_epi8(FIELD_GROUP(bits, 0), FIELD_GROUP(bits, at)), mul);
    const __m256i r1 = gather_fields(v, _mm256_setr_epi8(FIELD_GROUP(bits, bits), FIELD_GROUP(bits, at + bits)), mul);
    return _mm256_and_si256(_mm256_packus_epi16(r0, r1), _mm256_set1_epi8((char)((1 << bits) - 1)));
#else
    const uint64_t fields = 0x0101010101010101ULL * ((1u << bits) - 1);
    uint64_t w[4];
    for (int i = 0; i < 4; i++) {
        /* One 8-byte load per word (pdep takes its low 8 * bits bits): from the word's start, or, where
         * that would run past the block, ending at the word's end and shifted down. (A zeroed word
         * filled by a `bits`-byte memcpy stalls on store forwarding: 15x slower.) */
        const int off = i * bits;
        uint64_t u;
        if (off + 8 <= 4 * bits) { memcpy(&u, p + off, 8); }
        else { memcpy(&u, p + off + bits - 8, 8); u >>= 8 * (8 - bits); }
        w[i] = _pdep_u64(u, fields);
    }
    return _mm256_set_epi64x((long long)w[3], (long long)w[2], (long long)w[1], (long long)w[0]);
#endif
}

/* ggml's 6-bit (scale, min) of sub-block j from a K-quant's 12 scale bytes */
static inline void scale_min_k4(int j, const uint8_t *q, int *sc, int *m) {
    if (j < 4) { *sc = q[j] & 63; *m = q[j + 4] & 63; }
    else { *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4); *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4); }
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* Formats with a float16 step and min per group of weights (tierlm's own), not per GGUF block. */
static inline int is_tq(int fmt) { return fmt == TQ8 || fmt == TQ4 || (fmt >= TQ3H && fmt <= TQ2); }

/* Whether decode gives the block's codes as signed bytes c - 128 (the AVX2 build's 8-bit formats;
 * see the header): then wm includes + 128 wd. */
static inline int signed_codes(int fmt) { return !AVX512_BUILD && (fmt == TQ8 || fmt == Q8_0 || fmt == IQ4_NL || fmt == IQ4_XS); }

/* IQ4_NL's (and IQ4_XS's) 16 values */
static const int8_t IQ4_KV[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

static inline __m256i iq4_values(__m256i nib) {  /* nibbles -> IQ4_NL's int8 values */
    const __m256i kv = _mm256_setr_epi8(-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
                                        -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113);
    const __m256i v = _mm256_shuffle_epi8(kv, nib);
    return AVX512_BUILD ? _mm256_xor_si256(v, _mm256_set1_epi8((char)0x80)) : v;
}

/* int32 lane i = sum over bytes 4i..4i+3 of the codes c (unsigned, or signed_codes) times x's bytes q */
static inline __attribute__((always_inline)) __m256i dot4(int fmt, __m256i c, __m256i q) {
#if AVX512_BUILD
    (void)fmt;
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), c, q);
#else
    const __m256i ones = _mm256_set1_epi16(1);
    if (signed_codes(fmt)) return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(c, c), _mm256_sign_epi8(q, c)), ones);
    return _mm256_madd_epi16(_mm256_maddubs_epi16(c, q), ones);
#endif
}

#define ROWS 4  /* rows of W per pass over x: 4 independent accumulator chains, x loaded once for all */

/* One block of one row: unsigned codes c, scale wd and (wm - off * wd). fmt is a literal at every call site. */
static inline __attribute__((always_inline)) __m256i decode(int fmt, const uint8_t *row, int b, float *wd, float *wm) {
    switch (fmt) {
    case TQ8: { const __m256i c = _mm256_loadu_si256((const __m256i *)(row + 32 * b));
                return signed_codes(fmt) ? _mm256_xor_si256(c, _mm256_set1_epi8((char)0x80)) : c; }
    case TQ4: return nibbles(row + 16 * b);
    case TQ3H: return q3h_codes(row + 14 * b);
    case TQ6: return stream_codes(row + 24 * b, 6);
    case TQ5: return stream_codes(row + 20 * b, 5);
    case TQ3: return stream_codes(row + 12 * b, 3);
    case TQ2: return stream_codes(row + 8 * b, 2);
    case Q8_0: { const uint8_t *p = row + 34 * b; *wd = fp16(p);
                 const __m256i s = _mm256_loadu_si256((const __m256i *)(p + 2));
                 if (signed_codes(fmt)) { *wm = 0.f; return s; }
                 *wm = -128.f * *wd;
                 return _mm256_xor_si256(s, _mm256_set1_epi8((char)0x80)); }
    case Q4_0: { const uint8_t *p = row + 18 * b; *wd = fp16(p); *wm = -8.f * *wd; return nibbles(p + 2); }
    case Q4_1: { const uint8_t *p = row + 20 * b; *wd = fp16(p); *wm = fp16(p + 2); return nibbles(p + 4); }
    case Q5_0: { const uint8_t *p = row + 22 * b; *wd = fp16(p); *wm = -16.f * *wd;
                 return _mm256_or_si256(nibbles(p + 6), high_bits(p + 2)); }
    case Q5_1: { const uint8_t *p = row + 24 * b; *wd = fp16(p); *wm = fp16(p + 2);
                 return _mm256_or_si256(nibbles(p + 8), high_bits(p + 4)); }
    case Q4_K: case Q5_K: {
        const int j = b & 7;
        const uint8_t *p = row + (fmt == Q4_K ? 144 : 176) * (b >> 3);
        int sc, m;
        scale_min_k4(j, p + 4, &sc, &m);
        *wd = fp16(p) * (float)sc;
        *wm = -fp16(p + 2) * (float)m;
        if (fmt == Q4_K) return nibbles32(p + 16 + 32 * (j >> 1), 4 * (j & 1));
        return _mm256_or_si256(nibbles32(p + 48 + 32 * (j >> 1), 4 * (j & 1)), bit_field32(p + 16, j, 1, 4));
    }
    case Q2_K: {  /* *wd, *wm unused (per-lane scales and mins, see k16_scales) */
        const int j = b & 7;
        return bit_field32(row + 84 * (b >> 3) + 16 + 32 * (j >> 2), 2 * (j & 3), 3, 0);
    }
    case Q3_K: {
        const int j = b & 7;
        const uint8_t *p = row + 110 * (b >> 3);
        return _mm256_or_si256(bit_field32(p + 32 + 32 * (j >> 2), 2 * (j & 3), 3, 0), bit_field32(p, j, 1, 2));
    }
    case IQ4_NL: { const uint8_t *p = row + 18 * b; *wd = fp16(p); *wm = AVX512_BUILD ? -128.f * *wd : 0.f;
                   return iq4_values(nibbles(p + 2)); }
    case IQ4_XS: {
        const int j = b & 7;
        const uint8_t *p = row + 136 * (b >> 3);
        uint16_t sh;
        memcpy(&sh, p + 2, 2);
        const int ls = ((p[4 + j / 2] >> (4 * (j & 1))) & 0xF) | (((sh >> (2 * j)) & 3) << 4);
        *wd = fp16(p) * (float)(ls - 32);
        *wm = AVX512_BUILD ? -128.f * *wd : 0.f;
        return iq4_values(nibbles(p + 8 + 16 * j));
    }
    default: {  /* Q6_K: block k of half n; *wd, *wm unused (per-lane scales, see q6k_scales) */
        const int j = b & 7, n = j >> 2, k = j & 3;
        const uint8_t *p = row + 210 * (b >> 3);
        return _mm256_or_si256(nibbles32(p + 64 * n + 32 * (k & 1), 4 * (k >> 1)), bit_field32(p + 128 + 32 * n, 2 * k, 3, 4));
    }
    }
}

/* Q6_K block b: d * scale of each 16-weight half, broadcast to the 4 int32 lanes that half fills */
static inline __m256 q6k_scales(const uint8_t *row, int b) {
    const int j = b & 7, n = j >> 2, k = j & 3;
    const uint8_t *p = row + 210 * (b >> 3);
    const int8_t *sc = (const int8_t *)(p + 192) + 8 * n + 2 * k;
    const float d = fp16(p + 208);
    return _mm256_set_m128(_mm_set1_ps(d * (float)sc[1]), _mm_set1_ps(d * (float)sc[0]));
}

/* Q3_K's 6-bit scale i (0..15) of a super-block's 12 scale bytes, minus 32 */
static inline int q3k_scale(const uint8_t *s, int i) {
    const int low = i < 8 ? s[i] & 0xF : s[i - 8] >> 4;
    return (low | (((s[8 + (i & 3)] >> (2 * (i >> 2))) & 3) << 4)) - 32;
}

/* Q2_K, Q3_K, Q6_K block b: the weight scale of each 16-weight half, broadcast to the 4 int32 lanes
 * that half fills (Q2_K: and its two mins times dmin, in mins[0..1]) */
static inline __m256 k16_scales(int fmt, const uint8_t *row, int b, float *mins) {
    if (fmt == Q6_K) return q6k_scales(row, b);
    const int j = b & 7;
    float lo, hi;
    if (fmt == Q2_K) {
        const uint8_t *p = row + 84 * (b >> 3), s0 = p[2 * j], s1 = p[2 * j + 1];
        const float d = fp16(p + 80), dmin = fp16(p + 82);
        lo = d * (float)(s0 & 0xF); hi = d * (float)(s1 & 0xF);
        mins[0] = dmin * (float)(s0 >> 4); mins[1] = dmin * (float)(s1 >> 4);
    } else {  /* Q3_K */
        const uint8_t *p = row + 110 * (b >> 3);
        const float d = fp16(p + 108);
        lo = d * (float)q3k_scale(p + 96, 2 * j); hi = d * (float)q3k_scale(p + 96, 2 * j + 1);
    }
    return _mm256_set_m128(_mm_set1_ps(hi), _mm_set1_ps(lo));
}

/* ROWS rows of W (row r at codes + r * row_bytes; its steps/mins at steps + r * G) against one
 * quantized x; out[r] for r < ROWS. `prefetch`: also prefetch the next tile (once per tile, for the
 * first row of x: the later rows of x find it in cache). */
static inline __attribute__((always_inline)) void rows_dot(int fmt, const uint8_t *codes, int64_t row_bytes,
                                                           const uint16_t *steps, const uint16_t *mins, int64_t G,
                                                           int group, int K, const XBlocks *xb, float *out,
                                                           int prefetch) {
    const int tq = is_tq(fmt);
    __m256 acc[ROWS];
    float sv[ROWS], wd[ROWS], wm[ROWS];
    for (int r = 0; r < ROWS; r++) { acc[r] = _mm256_setzero_ps(); sv[r] = 0.f; wd[r] = 0.f; wm[r] = 0.f; }
    const int nb = K / 32, bpg = tq ? group / 32 : 1;
    /* Software prefetch of the next tile (the ROWS rows after these, contiguous in memory), in step
     * with this one: rows are only ~1-2 KiB, too short for the hardware prefetcher to ramp up on
     * four interleaved streams, and without it the kernel ran at half the DRAM bandwidth. Into L2
     * (T1), not L1: on Zen 4 prefetches into L1 wait for its few miss buffers, and q8 streamed at
     * 24 GB/s with T0 against 32 GB/s with T1 (a plain 2-thread read: 33 GB/s); q4 went from 41
     * to 47 G weights/s. Two tiles ahead, or four, was no better (bench/quant_kernel.py). */
    const uint8_t *next = codes + ROWS * row_bytes;
    const int64_t pf_inc = (row_bytes << 16) / nb;  /* bytes per block of x, 16.16 fixed point */
    for (int b = 0, g = 0, in_group = 0; b < nb; b++) {
        if (prefetch)
            for (int r = 0; r < ROWS; r++) _mm_prefetch((const char *)(next + r * row_bytes + ((b * pf_inc) >> 16)), _MM_HINT_T1);
        if (tq && in_group == 0)
            for (int r = 0; r < ROWS; r++) {
                wd[r] = _cvtsh_ss(steps[r * G + g]);
                wm[r] = _cvtsh_ss(mins[r * G + g]);
                if (signed_codes(fmt)) wm[r] += 128.f * wd[r];
            }
        if (++in_group == bpg) { in_group = 0; g++; }
        const __m256i xq = _mm256_loadu_si256((const __m256i *)(xb->q + 32 * b));
        const float xd = xb->xd[b], xs = xb->xs[b];
        if (fmt == Q6_K || fmt == Q3_K || fmt == Q2_K) {
            /* lane-wise off * sum(q) over each 4 bytes of x: the offset of every code (Q2_K: none) */
            const __m256i xoff = fmt == Q2_K ? _mm256_setzero_si256()
                                             : dot4(fmt, _mm256_set1_epi8(fmt == Q6_K ? 32 : 4), xq);
            const __m256 vxd = _mm256_set1_ps(xd);
            for (int r = 0; r < ROWS; r++) {
                const uint8_t *row = codes + r * row_bytes;
                float mins[2];
                __m256i c = decode(fmt, row, b, &wd[r], &wm[r]);
                __m256i dot = _mm256_sub_epi32(dot4(fmt, c, xq), xoff);
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(k16_scales(fmt, row, b, mins), vxd), acc[r]);
                if (fmt == Q2_K) sv[r] -= mins[0] * xb->xs16[2 * b] + mins[1] * xb->xs16[2 * b + 1];
            }
            continue;
        }
        if (fmt == Q8_0 && !AVX512_BUILD) {  /* exact int32 sums per block, the arithmetic of its 8-row tiles
                                                 * (q8_0x8_tile): streamed rows and resident tiles agree */
            for (int r = 0; r < ROWS; r++) {
                const __m256i c = decode(fmt, codes + r * row_bytes, b, &wd[r], &wm[r]);
                sv[r] = fmaf((float)hsum8_epi32(dot4(fmt, c, xq)), wd[r] * xd, sv[r]);
            }
            continue;
        }
        for (int r = 0; r < ROWS; r++) {
            __m256i c = decode(fmt, codes + r * row_bytes, b, &wd[r], &wm[r]);
            __m256 dot = _mm256_cvtepi32_ps(dot4(fmt, c, xq));
            acc[r] = _mm256_fmadd_ps(dot, _mm256_set1_ps(wd[r] * xd), acc[r]);
            sv[r] += wm[r] * xs;
        }
    }
    for (int r = 0; r < ROWS; r++) out[r] = hsum8(acc[r]) + sv[r];
}

/* The loop of every row kernel: tiles of R rows split over the threads, the last tile overlapping the
 * one before it instead of running short, each row of x against the tile; FULL(n0, m) fills out[0..R)
 * for rows n0.. (prefetching when m == 0), ONE(r, m) out[0] for row r alone (fewer than R rows in all). */
#define ROW_TILES_LOOP(R, FULL, ONE)                                                                       \
    const int num_tiles = (N + (R) - 1) / (R);                                                              \
    _Pragma("omp parallel for schedule(static) num_threads(num_threads)")                                  \
    for (int t = 0; t < num_tiles; t++) {                                                                  \
        const int n0 = N < (R) ? 0 : (t * (R) + (R) > N ? N - (R) : t * (R));                              \
        const int nr = N < (R) ? N : (R);                                                                  \
        float out[R];                                                                                      \
        for (int m = 0; m < M; m++) {                                                                      \
            if (nr == (R)) {                                                                               \
                FULL;                                                                                      \
                for (int r = 0; r < (R); r++) y[(int64_t)m * N + n0 + r] = out[r];                         \
            } else {                                                                                       \
                for (int r = 0; r < nr; r++) {                                                             \
                    ONE;                                                                                   \
                    y[(int64_t)m * N + r] = out[0];                                                        \
                }                                                                                          \
            }                                                                                              \
        }                                                                                                  \
    }

/* One function per format, so that fmt is a literal inside OpenMP's outlined loop body (a parameter
 * would reach it as a variable, leaving the format switch inside the per-block loop). */
#define DEFINE_RUN(F)                                                                                      \
    static void run_##F(const XBlocks *xbs, int M, const uint8_t *codes, const uint16_t *steps,            \
                        const uint16_t *mins, int group, float *y, int N, int K, int64_t row_bytes,        \
                        int64_t G, int num_threads) {                                                      \
        ROW_TILES_LOOP(ROWS,                                                                               \
            rows_dot(F, codes + (int64_t)n0 * row_bytes, row_bytes, steps ? steps + (int64_t)n0 * G : 0,   \
                     mins ? mins + (int64_t)n0 * G : 0, G, group, K, &xbs[m], out, m == 0),                \
            rows_dot(F, codes + (int64_t)r * row_bytes, 0, steps ? steps + (int64_t)r * G : 0,             \
                     mins ? mins + (int64_t)r * G : 0, 0, group, K, &xbs[m], out, 0))                      \
    }
DEFINE_RUN(TQ8)
DEFINE_RUN(TQ4)
DEFINE_RUN(Q8_0)
DEFINE_RUN(Q4_0)
DEFINE_RUN(Q4_1)
DEFINE_RUN(Q5_0)
DEFINE_RUN(Q5_1)
DEFINE_RUN(Q4_K)
DEFINE_RUN(Q5_K)
DEFINE_RUN(Q6_K)
DEFINE_RUN(TQ3H)
DEFINE_RUN(TQ6)
DEFINE_RUN(TQ5)
DEFINE_RUN(TQ3)
DEFINE_RUN(TQ2)
DEFINE_RUN(Q2_K)
DEFINE_RUN(Q3_K)
DEFINE_RUN(IQ4_NL)
DEFINE_RUN(IQ4_XS)


/* ---- K-quants against x rounded per super-block (the AVX2 build's decode; prompts in both builds) ------------------------------------
 * Without VNNI each 32-weight block above pays a float conversion and FMA of its own product, and the
 * K-quants also decode their sub-block scales block by block: Q4_K ran at ~5 G weights/s on this
 * project's AVX2 EPYC, a third of what memory delivers. As llama.cpp does (its Q8_K), x is rounded to
 * int8 with one scale per 256 values instead, so a super-block's integer products are summed in
 * int32 lanes with the sub-block scales as 16-bit integers (vpmaddwd), one conversion and FMA per
 * super-block, and the mins become integer dot products of the (scale-free) sums of x per 16:
 *
 *   sum_j w_j x_j ~= d * xd * sum_i sc_i sum_{j in i} (c_j - off) q_j  -  dmin * xd * sum_i m_i sum_{j in i} q_j
 *
 * exactly the product of the dequantized W with x rounded per 256 (coarser than per 32: what
 * llama.cpp's K-quant dot products cost too). Integer ranges: a vpmaddubsw pair is at most
 * 2 * 63 * 127 (Q6_K), 2 * 127 * 127 (IQ4_XS, as signed magnitudes); the int32 sums stay below 2^25. */
typedef struct {
    int8_t *q;      /* (K,) */
    float *d;       /* (K/256,) scales */
    int16_t *bsum;  /* (K/16,) sums of q per 16 */
} XSuper;

static void quantize_x_super(const float *x, int K, XSuper *xs) {
    for (int s = 0; s < K / 256; s++) {
        float amax = 0.f;
        for (int i = 0; i < 256; i++) amax = fmaxf(amax, fabsf(x[256 * s + i]));
        const float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
        xs->d[s] = d;
        for (int g = 0; g < 16; g++) {
            int sum = 0;
            for (int i = 0; i < 16; i++) {
                const int q = (int)nearbyintf(x[256 * s + 16 * g + i] * id);
                xs->q[256 * s + 16 * g + i] = (int8_t)q;
                sum += q;
            }
            xs->bsum[16 * s + g] = (int16_t)sum;
        }
    }
}

/* M rows of x rounded per 256 (quantize_x_super), in one allocation (free() it): the M XSuper, then
 * their int8 values (64-byte aligned), scales and sums. Rows are split over the threads for prompts. */
static XSuper *x_super_rows(const float *x, int M, int K, int num_threads) {
    const size_t head = (sizeof(XSuper) * M + 63) / 64 * 64, nq = ((size_t)M * K + 63) / 64 * 64;
    const size_t size = head + nq + sizeof(float) * (size_t)M * (K / 256) + sizeof(int16_t) * (size_t)M * (K / 16);
    XSuper *xs = aligned_alloc(64, (size + 63) / 64 * 64);
    int8_t *q = (int8_t *)xs + head;
    float *d = (float *)(q + nq);
    int16_t *bsum = (int16_t *)(d + (size_t)M * (K / 256));
    #pragma omp parallel for schedule(static) num_threads(num_threads) if (M > 8)
    for (int m = 0; m < M; m++) {
        xs[m] = (XSuper){q + (int64_t)m * K, d + (int64_t)m * (K / 256), bsum + (int64_t)m * (K / 16)};
        quantize_x_super(x + (int64_t)m * K, K, &xs[m]);
    }
    return xs;
}

static inline int is_super_fmt(int fmt) { return fmt == Q2_K || fmt == Q3_K || fmt == Q4_K || fmt == Q5_K || fmt == Q6_K || fmt == IQ4_XS; }

static inline int super_bytes(int fmt) {
    return fmt == Q4_K ? 144 : fmt == Q5_K ? 176 : fmt == Q6_K ? 210 : fmt == Q3_K ? 110 : fmt == Q2_K ? 84 : 136;
}

/* int16 lanes 0-7 (the first 16 weights of a 32-byte block) s0, lanes 8-15 s1 */
static inline __m256i pair16(int s0, int s1) { return _mm256_set_m128i(_mm_set1_epi16((short)s1), _mm_set1_epi16((short)s0)); }

/* A super-block's sub-block scales, vectorized once per super-block (scalar decoding per block cost more
 * than the products): 8 (Q4_K, Q5_K: per 32 weights) or 16 (Q2_K, Q3_K, Q6_K: per 16) int16 scales, as
 * bytes in a 128-bit vector; pick16 then broadcasts the two a 32-byte block needs to its int16 halves. */
static inline __m128i k4_scales_mins(const uint8_t *q) {  /* bytes 0-7 the scales, 8-15 the mins */
    uint32_t u[4];
    memcpy(u, q, 12);
    u[3] = ((u[2] >> 4) & 0x0f0f0f0f) | (((u[1] >> 6) & 0x03030303) << 4);
    const uint32_t mins_lo = u[1] & 0x3f3f3f3f;
    u[1] = (u[2] & 0x0f0f0f0f) | (((u[0] >> 6) & 0x03030303) << 4);
    u[2] = mins_lo;
    u[0] &= 0x3f3f3f3f;
    return _mm_loadu_si128((const __m128i *)u);
}

static inline __m128i q3k_scales16(const uint8_t *q) {  /* 16 signed bytes: the scales minus 32 */
    uint32_t a[4];
    memcpy(a, q, 12);
    const uint32_t t = a[2];
    a[2] = ((a[0] >> 4) & 0x0f0f0f0f) | (((t >> 4) & 0x03030303) << 4);
    a[3] = ((a[1] >> 4) & 0x0f0f0f0f) | (((t >> 6) & 0x03030303) << 4);
    a[0] = (a[0] & 0x0f0f0f0f) | ((t & 0x03030303) << 4);
    a[1] = (a[1] & 0x0f0f0f0f) | (((t >> 2) & 0x03030303) << 4);
    return _mm_sub_epi8(_mm_loadu_si128((const __m128i *)a), _mm_set1_epi8(32));
}

/* int16 lanes 0-7 = element e0, lanes 8-15 = element e1 of v's 8 int16 (both 128-bit halves of v equal) */
static inline __attribute__((always_inline)) __m256i pick16(__m256i v, int e0, int e1) {
    const __m256i ctrl = _mm256_set_m128i(_mm_set1_epi16((short)((2 * e1) | (2 * e1 + 1) << 8)),
                                          _mm_set1_epi16((short)((2 * e0) | (2 * e0 + 1) << 8)));
    return _mm256_shuffle_epi8(v, ctrl);
}

/* One super-block of one row: int32 lanes of sum_i sc_i * sum (c - off) q, and (*mins) sum_i m_i * bsum_i;
 * *d and *dmin its float16 scales. */
static inline __attribute__((always_inline)) __m256i super_dot(int fmt, const uint8_t *p, const int8_t *xq,
                                                               const int16_t *bs, float *d, float *dmin, int *mins) {
    __m256i sumi = _mm256_setzero_si256();
    *mins = 0;
    *dmin = 0.f;
    const __m256i b0 = _mm256_loadu_si256((const __m256i *)bs);  /* 16 int16 sums of x */
    if (fmt == Q4_K || fmt == Q5_K) {
        *d = fp16(p); *dmin = fp16(p + 2);
        const __m256i sm = _mm256_cvtepu8_epi16(k4_scales_mins(p + 4));  /* lanes 0-7 scales, 8-15 mins */
        /* mins: m_j times the sum of x over block j = bsum 2j + 2j+1 */
        const __m128i pairs = _mm_hadd_epi16(_mm256_castsi256_si128(b0), _mm256_extracti128_si256(b0, 1));
        __m128i mm = _mm_madd_epi16(_mm256_extracti128_si256(sm, 1), pairs);
        mm = _mm_add_epi32(mm, _mm_unpackhi_epi64(mm, mm));
        *mins = _mm_cvtsi128_si32(_mm_add_epi32(mm, _mm_shuffle_epi32(mm, 1)));
        const __m256i sc = _mm256_permute2x128_si256(sm, sm, 0x00);  /* the 8 scales in both halves */
        for (int j = 0; j < 8; j++) {
            __m256i c = fmt == Q4_K ? nibbles32(p + 16 + 32 * (j >> 1), 4 * (j & 1))
                                    : _mm256_or_si256(nibbles32(p + 48 + 32 * (j >> 1), 4 * (j & 1)), bit_field32(p + 16, j, 1, 4));
            const __m256i prod = _mm256_maddubs_epi16(c, _mm256_loadu_si256((const __m256i *)(xq + 32 * j)));
            sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(prod, pick16(sc, j, j)));
        }
        return sumi;
    }
    if (fmt == IQ4_XS) {
        *d = fp16(p);
        uint16_t sh;
        memcpy(&sh, p + 2, 2);
        for (int j = 0; j < 8; j++) {
            const int ls = ((p[4 + j / 2] >> (4 * (j & 1))) & 0xF) | (((sh >> (2 * j)) & 3) << 4);
            const __m256i v = iq4_values(nibbles(p + 8 + 16 * j));
            const __m256i x = _mm256_loadu_si256((const __m256i *)(xq + 32 * j));
            const __m256i prod = _mm256_maddubs_epi16(_mm256_sign_epi8(v, v), _mm256_sign_epi8(x, v));
            sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(prod, _mm256_set1_epi16((short)(ls - 32))));
        }
        return sumi;
    }
    /* Q6_K, Q3_K, Q2_K: a scale per 16 weights, 16 int16 in sc16 */
    __m256i sc16;
    if (fmt == Q6_K) sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p + 192)));
    else if (fmt == Q3_K) sc16 = _mm256_cvtepi8_epi16(q3k_scales16(p + 96));
    else {  /* Q2_K: low nibbles the scales, high nibbles the mins */
        const __m128i raw = _mm_loadu_si128((const __m128i *)p);
        sc16 = _mm256_cvtepu8_epi16(_mm_and_si128(raw, _mm_set1_epi8(0x0F)));
        const __m256i m16 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(raw, 4), _mm_set1_epi8(0x0F)));
        *mins = hsum8_epi32(_mm256_madd_epi16(m16, b0));
    }
    const __m256i lo = _mm256_permute2x128_si256(sc16, sc16, 0x00), hi = _mm256_permute2x128_si256(sc16, sc16, 0x11);
    for (int j = 0; j < 8; j++) {
        const __m256i x = _mm256_loadu_si256((const __m256i *)(xq + 32 * j));
        __m256i c;
        if (fmt == Q6_K) {
            const int n = j >> 2, k = j & 3;
            c = _mm256_or_si256(nibbles32(p + 64 * n + 32 * (k & 1), 4 * (k >> 1)), bit_field32(p + 128 + 32 * n, 2 * k, 3, 4));
        } else if (fmt == Q3_K) {
            c = _mm256_or_si256(bit_field32(p + 32 + 32 * (j >> 2), 2 * (j & 3), 3, 0), bit_field32(p, j, 1, 2));
        } else {  /* Q2_K */
            c = bit_field32(p + 16 + 32 * (j >> 2), 2 * (j & 3), 3, 0);
        }
        const __m256i prod = _mm256_maddubs_epi16(c, x);
        sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(prod, pick16(j < 4 ? lo : hi, (2 * j) & 7, (2 * j + 1) & 7)));
    }
    if (fmt == Q2_K) { *d = fp16(p + 80); *dmin = fp16(p + 82); return sumi; }
    /* the codes' offset (Q6_K 32, Q3_K 4) as a min: off * sum_i sc_i bsum_i, times d */
    *d = *dmin = fp16(p + (fmt == Q6_K ? 208 : 108));
    *mins = (fmt == Q6_K ? 32 : 4) * hsum8_epi32(_mm256_madd_epi16(sc16, b0));
    return sumi;
}

#ifndef SUPER_ROWS
#define SUPER_ROWS 4
#endif
static inline __attribute__((always_inline)) void super_rows_dot(int fmt, const uint8_t *codes, int64_t row_bytes, int K,
                                                                 const XSuper *xs, float *out, int prefetch) {
    /* Per super-block an exact int32 sum, then one FMA (and one for the mins), the arithmetic of the 8-row
     * tiles, so that a row gives the same float bits from its tile and from its rows (tiered weights
     * stream rows of matrices whose resident rows are tiles). Float lanes to the end instead ran ~10%
     * faster than the horizontal sum per super-block. */
    float sacc[SUPER_ROWS], accm[SUPER_ROWS];
    for (int r = 0; r < SUPER_ROWS; r++) { sacc[r] = 0.f; accm[r] = 0.f; }
    const int sb = super_bytes(fmt);
    const uint8_t *next = codes + SUPER_ROWS * row_bytes;
    for (int s = 0; s < K / 256; s++) {
        if (prefetch)  /* the next tile's super-block s, in step (see rows_dot) */
            for (int r = 0; r < SUPER_ROWS; r++)
                for (int off = 0; off < sb; off += 64) _mm_prefetch((const char *)(next + r * row_bytes + s * sb + off), _MM_HINT_T1);
        const float xd = xs->d[s];
        for (int r = 0; r < SUPER_ROWS; r++) {
            float d, dmin;
            int mins;
            const __m256i sumi = super_dot(fmt, codes + r * row_bytes + s * sb, xs->q + 256 * s, xs->bsum + 16 * s, &d, &dmin, &mins);
            sacc[r] = fmaf((float)hsum8_epi32(sumi), d * xd, sacc[r]);
            accm[r] = fmaf((float)mins, dmin * xd, accm[r]);
        }
    }
    for (int r = 0; r < SUPER_ROWS; r++) out[r] = sacc[r] - accm[r];
}

#if !AVX512_BUILD
#define DEFINE_SUPER_RUN(F)                                                                                 \
    static void super_run_##F(const XSuper *xs, int M, const uint8_t *codes, float *y, int N, int K,        \
                              int64_t row_bytes, int num_threads) {                                         \
        ROW_TILES_LOOP(SUPER_ROWS,                                                                          \
            super_rows_dot(F, codes + (int64_t)n0 * row_bytes, row_bytes, K, &xs[m], out, m == 0),          \
            super_rows_dot(F, codes + (int64_t)r * row_bytes, 0, K, &xs[m], out, 0))                        \
    }
DEFINE_SUPER_RUN(Q2_K)
DEFINE_SUPER_RUN(Q3_K)
DEFINE_SUPER_RUN(Q4_K)
DEFINE_SUPER_RUN(Q5_K)
DEFINE_SUPER_RUN(Q6_K)
DEFINE_SUPER_RUN(IQ4_XS)

static int run_super(int fmt, const float *x, int M, int K, const uint8_t *codes, int64_t row_bytes, float *y, int N,
                     int num_threads) {
    XSuper *xs = x_super_rows(x, M, K, num_threads);
    switch (fmt) {
    case Q2_K: super_run_Q2_K(xs, M, codes, y, N, K, row_bytes, num_threads); break;
    case Q3_K: super_run_Q3_K(xs, M, codes, y, N, K, row_bytes, num_threads); break;
    case Q4_K: super_run_Q4_K(xs, M, codes, y, N, K, row_bytes, num_threads); break;
    case Q5_K: super_run_Q5_K(xs, M, codes, y, N, K, row_bytes, num_threads); break;
    case Q6_K: super_run_Q6_K(xs, M, codes, y, N, K, row_bytes, num_threads); break;
    default: super_run_IQ4_XS(xs, M, codes, y, N, K, row_bytes, num_threads); break;
    }
    free(xs);
    return 0;
}
#endif

/* ---- prompt chunks: K-quant rows decoded once, then multiplied against many rows of x -----------------
 * For M rows of x the kernels above decode every block of W once per row of x, which costs more than
 * the products; the float path instead dequantizes bands for a float32 GEMM (MKL: 40-60 GFLOP/s on
 * this project's AVX2 EPYC, below llama.cpp's prefill). This GEMM decodes a tile of 4 rows of W once into
 * unsigned codes, 16-bit sub-block scales and per-16 float corrections, then runs every row of x (rounded
 * per 256, XSuper) against it with vpmaddubsw/vpmaddwd:
 *
 *   y = sum_s d_s xd_s sum_j <c_j q_j>_{sc_j}  -  sum_s xd_s sum_i mn_i bsum_i
 *
 * mn_i the float correction of 16 weights: the codes' offset (d sc_i off: Q6_K 32, Q3_K 4) or the min
 * (dmin m_i: Q2_K, Q4_K, Q5_K). The result is the product of the dequantized W with x rounded per 256,
 * as for decode. IQ4_XS (signed values) is not taken here. */
static inline int is_prompt_fmt(int fmt) { return fmt == Q2_K || fmt == Q3_K || fmt == Q4_K || fmt == Q5_K || fmt == Q6_K; }

typedef struct {
    uint8_t *c;     /* (ROWS, K) unsigned codes */
    __m256i *sc;    /* (ROWS, K/32) int16 scales of each half block */
    float *d;       /* (ROWS, K/256) super-block scales */
    float *mn;      /* (ROWS, K/16) corrections */
} DecodedTile;

static inline __attribute__((always_inline)) void decode_super(int fmt, const uint8_t *p, uint8_t *c, __m256i *sc,
                                                               float *d, float *mn) {
    for (int j = 0; j < 8; j++) {
        __m256i codes;
        int s0, s1;
        float m0, m1;
        if (fmt == Q4_K || fmt == Q5_K) {
            int scv, m;
            scale_min_k4(j, p + 4, &scv, &m);
            codes = fmt == Q4_K ? nibbles32(p + 16 + 32 * (j >> 1), 4 * (j & 1))
                                : _mm256_or_si256(nibbles32(p + 48 + 32 * (j >> 1), 4 * (j & 1)), bit_field32(p + 16, j, 1, 4));
            s0 = s1 = scv;
            m0 = m1 = fp16(p + 2) * (float)m;
        } else if (fmt == Q6_K) {
            const int n = j >> 2, k = j & 3;
            codes = _mm256_or_si256(nibbles32(p + 64 * n + 32 * (k & 1), 4 * (k >> 1)), bit_field32(p + 128 + 32 * n, 2 * k, 3, 4));
            const int8_t *scs = (const int8_t *)(p + 192);
            s0 = scs[2 * j]; s1 = scs[2 * j + 1];
            const float dd = fp16(p + 208) * 32.f;
            m0 = dd * (float)s0; m1 = dd * (float)s1;
        } else if (fmt == Q3_K) {
            codes = _mm256_or_si256(bit_field32(p + 32 + 32 * (j >> 2), 2 * (j & 3), 3, 0), bit_field32(p, j, 1, 2));
            s0 = q3k_scale(p + 96, 2 * j); s1 = q3k_scale(p + 96, 2 * j + 1);
            const float dd = fp16(p + 108) * 4.f;
            m0 = dd * (float)s0; m1 = dd * (float)s1;
        } else {  /* Q2_K */
            codes = bit_field32(p + 16 + 32 * (j >> 2), 2 * (j & 3), 3, 0);
            s0 = p[2 * j] & 0xF; s1 = p[2 * j + 1] & 0xF;
            const float dmin = fp16(p + 82);
            m0 = dmin * (float)(p[2 * j] >> 4); m1 = dmin * (float)(p[2 * j + 1] >> 4);
        }
        _mm256_storeu_si256((__m256i *)(c + 32 * j), codes);
        sc[j] = pair16(s0, s1);
        mn[2 * j] = m0; mn[2 * j + 1] = m1;
    }
    *d = fmt == Q4_K || fmt == Q5_K ? fp16(p) : fmt == Q6_K ? fp16(p + 208) : fmt == Q3_K ? fp16(p + 108) : fp16(p + 80);
}

static inline __attribute__((always_inline)) void prompt_tile(int fmt, const uint8_t *codes, int64_t row_bytes, int nr,
                                                              int K, const XSuper *xs, const float *xs16, int M,
                                                              DecodedTile *t, float *y, int N, int n0) {
    const int nsb = K / 256, sb = super_bytes(fmt);
    for (int r = 0; r < nr; r++)
        for (int s = 0; s < nsb; s++)
            decode_super(fmt, codes + r * row_bytes + (int64_t)s * sb, t->c + (int64_t)r * K + 256 * s,
                         t->sc + (int64_t)r * (K / 32) + 8 * s, t->d + r * nsb + s, t->mn + (int64_t)r * (K / 16) + 16 * s);
    for (int m = 0; m < M; m++) {
        const int8_t *xq = xs[m].q;
        const float *xsm = xs16 + (int64_t)m * (K / 16);
        __m256 acc[ROWS], corr[ROWS];
        for (int r = 0; r < ROWS; r++) { acc[r] = _mm256_setzero_ps(); corr[r] = _mm256_setzero_ps(); }
        for (int s = 0; s < nsb; s++) {
            __m256i sumi[ROWS];
            for (int r = 0; r < ROWS; r++) sumi[r] = _mm256_setzero_si256();
            for (int j = 0; j < 8; j++) {
                const __m256i x = _mm256_loadu_si256((const __m256i *)(xq + 256 * s + 32 * j));
                for (int r = 0; r < ROWS; r++) {
                    if (r >= nr) break;
                    const __m256i c = _mm256_loadu_si256((const __m256i *)(t->c + (int64_t)r * K + 256 * s + 32 * j));
                    sumi[r] = _mm256_add_epi32(sumi[r], _mm256_madd_epi16(_mm256_maddubs_epi16(c, x), t->sc[(int64_t)r * (K / 32) + 8 * s + j]));
                }
            }
            const float xd = xs[m].d[s];
            const __m256 x0 = _mm256_loadu_ps(xsm + 16 * s), x1 = _mm256_loadu_ps(xsm + 16 * s + 8);
            for (int r = 0; r < ROWS; r++) {
                if (r >= nr) break;
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi[r]), _mm256_set1_ps(t->d[r * nsb + s] * xd), acc[r]);
                const float *mn = t->mn + (int64_t)r * (K / 16) + 16 * s;
                corr[r] = _mm256_fmadd_ps(_mm256_loadu_ps(mn), x0, _mm256_fmadd_ps(_mm256_loadu_ps(mn + 8), x1, corr[r]));
            }
        }
        for (int r = 0; r < nr; r++) y[(int64_t)m * N + n0 + r] = hsum8(acc[r]) - hsum8(corr[r]);
    }
}

#define DEFINE_PROMPT_RUN(F)                                                                                  \
    static void prompt_run_##F(const XSuper *xs, const float *xs16, int M, const uint8_t *codes, float *y,   \
                               int N, int K, int64_t row_bytes, int num_threads) {                           \
        const int num_tiles = (N + ROWS - 1) / ROWS;                                                         \
        _Pragma("omp parallel num_threads(num_threads)")                                                     \
        {                                                                                                    \
            DecodedTile t = {aligned_alloc(64, (size_t)ROWS * K), aligned_alloc(32, sizeof(__m256i) * ROWS * (K / 32)), \
                             malloc(sizeof(float) * ROWS * (K / 256)), malloc(sizeof(float) * ROWS * (K / 16))};      \
            _Pragma("omp for schedule(static)")                                                             \
            for (int i = 0; i < num_tiles; i++) {                                                            \
                const int n0 = i * ROWS, nr = N - n0 < ROWS ? N - n0 : ROWS;                                 \
                prompt_tile(F, codes + (int64_t)n0 * row_bytes, row_bytes, nr, K, xs, xs16, M, &t, y, N, n0); \
            }                                                                                                \
            free(t.c); free(t.sc); free(t.d); free(t.mn);                                                    \
        }                                                                                                    \
    }
DEFINE_PROMPT_RUN(Q2_K)
DEFINE_PROMPT_RUN(Q3_K)
DEFINE_PROMPT_RUN(Q4_K)
DEFINE_PROMPT_RUN(Q5_K)
DEFINE_PROMPT_RUN(Q6_K)

/* y (M x N) = x (M x K) . W^T for a K-quant W, any M (see above). Returns 0, or -1 for another format or
 * a shape it does not take. */
int tierlm_quant_prompt(int fmt, const float *x, int M, int K, const uint8_t *codes, int64_t row_bytes, float *y, int N,
                        int num_threads) {
    if (!is_prompt_fmt(fmt) || K % 256 || M < 1 || N < 1) return -1;
    XSuper *xs = x_super_rows(x, M, K, num_threads);
    float *xs16 = malloc(sizeof(float) * (size_t)M * (K / 16));  /* xd * bsum: the corrections' x side */
    for (int m = 0; m < M; m++) {
        for (int i = 0; i < K / 16; i++) xs16[(int64_t)m * (K / 16) + i] = xs[m].d[i / 16] * (float)xs[m].bsum[i];
    }
    switch (fmt) {
    case Q2_K: prompt_run_Q2_K(xs, xs16, M, codes, y, N, K, row_bytes, num_threads); break;
    case Q3_K: prompt_run_Q3_K(xs, xs16, M, codes, y, N, K, row_bytes, num_threads); break;
    case Q4_K: prompt_run_Q4_K(xs, xs16, M, codes, y, N, K, row_bytes, num_threads); break;
    case Q5_K: prompt_run_Q5_K(xs, xs16, M, codes, y, N, K, row_bytes, num_threads); break;
    default: prompt_run_Q6_K(xs, xs16, M, codes, y, N, K, row_bytes, num_threads); break;
    }
    free(xs16); free(xs);
    return 0;
}

/* ---- Q4_K in tiles of 8 rows (tierlm.quant.tiles, the AVX2 build's row tiles) ---------------------------
 * Row by row, a K-quant super-block costs ~100 vector instructions per row on AVX2 (codes, a scale
 * shuffle, vpmaddubsw, vpmaddwd per 32 weights, a horizontal sum); with 8 rows interleaved 4 bytes at a
 * time, int32 lane i is row i, x's 4 bytes are broadcast, a sub-block's 8 vpmaddubsw sums are added
 * in int16 before one vpmaddwd with the 8 rows' scales, and scales and mins need no shuffles: about
 * half the instructions (llama.cpp repacks Q4_K 8 rows at a time on AVX2 for the same reason).
 * Layout per super-block (KX8_BYTES; tile t holds rows 8t..8t+7):
 *   0    the 8 rows' fp16 d; 16: their fp16 dmin
 *   32   scales u8 [sub-block j][row]; 96: mins u8 [j][row] (6-bit, decoded from the 12 scale bytes)
 *   160  codes [j][v < 4][row][b < 4], 32 bytes per (j, v): low nibble weight 32j + 4v + b of the row,
 *        high nibble weight 32j + 16 + 4v + b
 * weight = d * sc_j * code - dmin * m_j, as in the file. Measured (5632 x 2048 from cache, AVX2 EPYC, G weights/s,
 * rows -> tiles): 1 thread 8.7-9.0 -> 11.8-13.2, 2 threads 15-17 -> 19-22. Q5_K in the same layout plus a
 * plane of fifth bits ran slower than its rows (5.0-5.9 against 6.8-6.9: the bit moves cost more than
 * the tile saves); its tiles hold 6-bit codes instead (below). */
enum { KX8_ROWS = 8, KX8_BYTES = 1184 };

/* Each thread streams one contiguous run of tiles, yet from DRAM the hardware prefetcher alone left the
 * tile kernels at half their in-cache rate (Q4_K, 2 threads: 15 against 30 G weights/s): memory and
 * compute did not overlap. So every block is prefetched X8_PREFETCH bytes ahead of its use. */
#ifndef X8_PREFETCH
#define X8_PREFETCH 4096
#endif
/* x's 4 bytes at p in every int32 lane */
static inline __attribute__((always_inline)) __m256i x4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

/* Rows of x run X8_NX at a time against a tile (prompt chunks): the codes decoded once serve all of them,
 * with the same integer sums and float operations per row as one at a time. */
#define X8_NX 4

static inline __attribute__((always_inline)) void x8_prefetch(const uint8_t *t, int bytes) {
    for (int off = 0; off < bytes; off += 64) _mm_prefetch((const char *)(t + X8_PREFETCH + off), _MM_HINT_T0);
}

static inline __attribute__((always_inline)) void kx8_tile(int nx, const uint8_t *tile, int nsb, const XSuper *xs, float *out) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    __m256 acc[X8_NX], accm[X8_NX];
    for (int i = 0; i < nx; i++) acc[i] = accm[i] = _mm256_setzero_ps();
    for (int s = 0; s < nsb; s++) {
        const uint8_t *t = tile + (int64_t)s * KX8_BYTES;
        x8_prefetch(t, KX8_BYTES);
        __m256i sumi[X8_NX], summ[X8_NX];
        for (int i = 0; i < nx; i++) sumi[i] = summ[i] = _mm256_setzero_si256();
        for (int j = 0; j < 8; j++) {
            __m256i p16[X8_NX];  /* 8 sums of at most 2 * 15 * 127 each: within int16 */
            for (int i = 0; i < nx; i++) p16[i] = _mm256_setzero_si256();
            for (int v = 0; v < 4; v++) {
                const __m256i c = _mm256_loadu_si256((const __m256i *)(t + 160 + 128 * j + 32 * v));
                const __m256i lo = _mm256_and_si256(c, m4), hi = _mm256_and_si256(_mm256_srli_epi16(c, 4), m4);
                for (int i = 0; i < nx; i++) {
                    const int8_t *xq = xs[i].q + 256 * s + 32 * j + 4 * v;
                    p16[i] = _mm256_add_epi16(p16[i], _mm256_maddubs_epi16(lo, x4(xq)));
                    p16[i] = _mm256_add_epi16(p16[i], _mm256_maddubs_epi16(hi, x4(xq + 16)));
                }
            }
            const __m256i s8 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(t + 32 + 8 * j)));
            const __m256i sc = _mm256_or_si256(s8, _mm256_slli_epi32(s8, 16));
            /* m_j (int16 lanes 2i, high half zero) times the sum of x over sub-block j */
            const __m256i m = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(t + 96 + 8 * j)));
            for (int i = 0; i < nx; i++) {
                const int16_t *bs = xs[i].bsum + 16 * s;
                sumi[i] = _mm256_add_epi32(sumi[i], _mm256_madd_epi16(p16[i], sc));
                summ[i] = _mm256_add_epi32(summ[i], _mm256_madd_epi16(m, _mm256_set1_epi32((uint16_t)(bs[2 * j] + bs[2 * j + 1]))));
            }
        }
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)t));
        const __m256 dmin = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(t + 16)));
        for (int i = 0; i < nx; i++) {
            const __m256 xd = _mm256_set1_ps(xs[i].d[s]);
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi[i]), _mm256_mul_ps(d, xd), acc[i]);
            accm[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(summ[i]), _mm256_mul_ps(dmin, xd), accm[i]);
        }
    }
    for (int i = 0; i < nx; i++) _mm256_storeu_ps(out + KX8_ROWS * i, _mm256_sub_ps(acc[i], accm[i]));
}

/* The loop of the 8-row tile kernels: tiles split over the threads, rows of x against each tile X8_NX at
 * a time, then one by one; TILE(nx) fills out[0..8 nx) for tile t and rows m.. m + nx of x (the last
 * tile's padding rows are dropped). */
#define X8_TILES_LOOP(TILE)                                                                                 \
    const int num_tiles = (N + KX8_ROWS - 1) / KX8_ROWS;                                                    \
    _Pragma("omp parallel for schedule(static) num_threads(num_threads)")                                  \
    for (int t = 0; t < num_tiles; t++) {                                                                  \
        float out[X8_NX * KX8_ROWS];                                                                       \
        const int nr = N - t * KX8_ROWS < KX8_ROWS ? N - t * KX8_ROWS : KX8_ROWS;                          \
        for (int m = 0; m < M;) {                                                                          \
            const int nx = M - m >= X8_NX ? X8_NX : 1;                                                     \
            if (nx == X8_NX) TILE(X8_NX); else TILE(1);                                                    \
            for (int i = 0; i < nx; i++)                                                                   \
                for (int r = 0; r < nr; r++) y[(int64_t)(m + i) * N + t * KX8_ROWS + r] = out[KX8_ROWS * i + r]; \
            m += nx;                                                                                       \
        }                                                                                                  \
    }

static int run_kx8(const float *x, int M, int K, const uint8_t *tiles, float *y, int N, int num_threads) {
    XSuper *xs = x_super_rows(x, M, K, num_threads);
    const int nsb = K / 256;
#define KX8_CALL(nx) kx8_tile(nx, tiles + (int64_t)t * nsb * KX8_BYTES, nsb, &xs[m], out)
    X8_TILES_LOOP(KX8_CALL)
#undef KX8_CALL
    free(xs);
    return 0;
}

/* A tile's 8 rows as float32 (8 x K), equal to the gguf package's dequantization of the source rows. */
__attribute__((optimize("fp-contract=off")))
static void dequant_kx8(const uint8_t *tile, int K, float *y) {
    for (int s = 0; s < K / 256; s++) {
        const uint8_t *t = tile + (int64_t)s * KX8_BYTES;
        for (int r = 0; r < KX8_ROWS; r++) {
            const float d = fp16(t + 2 * r), dmin = fp16(t + 16 + 2 * r);
            for (int j = 0; j < 8; j++) {
                const float dl = d * (float)t[32 + 8 * j + r], ml = dmin * (float)t[96 + 8 * j + r];
                for (int w = 0; w < 32; w++) {
                    const int h = w >> 4, v = (w & 15) >> 2, b = w & 3;
                    const int c = (t[160 + 128 * j + 32 * v + 4 * r + b] >> (4 * h)) & 0xF;
                    y[(int64_t)r * K + 256 * s + 32 * j + w] = dl * (float)c - ml;
                }
            }
        }
    }
}

/* Q4_0 in tiles of 8 rows (the AVX2 build; tierlm.quant.tiles): per block of 32 weights (144 bytes, as
 * the 8 rows' blocks), the 8 rows' fp16 d, then 4 x 32 bytes [v < 4][row][b < 4]: low nibble weight
 * 4v + b of the row, high nibble weight 16 + 4v + b; weight = d * (nibble - 8). As for Q4_K, int32 lane
 * i is row i and a block's 8 vpmaddubsw sums add in int16 before one vpmaddwd. */
enum { Q40X8_BYTES = 144 };

static inline __attribute__((always_inline)) void q4_0x8_tile(int nx, const uint8_t *tile, int nb, const XBlocks *xb, float *out) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    __m256 acc[X8_NX], accm[X8_NX];
    for (int i = 0; i < nx; i++) acc[i] = accm[i] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const uint8_t *t = tile + (int64_t)b * Q40X8_BYTES;
        x8_prefetch(t, Q40X8_BYTES);
        __m256i p16[X8_NX];
        for (int i = 0; i < nx; i++) p16[i] = _mm256_setzero_si256();
        for (int v = 0; v < 4; v++) {
            const __m256i c = _mm256_loadu_si256((const __m256i *)(t + 16 + 32 * v));
            const __m256i lo = _mm256_and_si256(c, m4), hi = _mm256_and_si256(_mm256_srli_epi16(c, 4), m4);
            for (int i = 0; i < nx; i++) {
                const int8_t *xq = xb[i].q + 32 * b + 4 * v;
                p16[i] = _mm256_add_epi16(p16[i], _mm256_add_epi16(_mm256_maddubs_epi16(lo, x4(xq)), _mm256_maddubs_epi16(hi, x4(xq + 16))));
            }
        }
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)t));
        for (int i = 0; i < nx; i++) {
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p16[i], ones)), _mm256_mul_ps(d, _mm256_set1_ps(xb[i].xd[b])), acc[i]);
            accm[i] = _mm256_fmadd_ps(d, _mm256_set1_ps(8.f * xb[i].xs[b]), accm[i]);  /* the -8 offset: 8 d sum(x) */
        }
    }
    for (int i = 0; i < nx; i++) _mm256_storeu_ps(out + KX8_ROWS * i, _mm256_sub_ps(acc[i], accm[i]));
}

static void run_q4_0x8(const XBlocks *xbs, int M, const uint8_t *tiles, float *y, int N, int K, int num_threads) {
    const int nb = K / 32;
#define Q40X8_CALL(nx) q4_0x8_tile(nx, tiles + (int64_t)t * nb * Q40X8_BYTES, nb, &xbs[m], out)
    X8_TILES_LOOP(Q40X8_CALL)
#undef Q40X8_CALL
}

__attribute__((optimize("fp-contract=off")))
static void dequant_q4_0x8(const uint8_t *tile, int K, float *y) {
    for (int b = 0; b < K / 32; b++) {
        const uint8_t *t = tile + (int64_t)b * Q40X8_BYTES;
        for (int r = 0; r < KX8_ROWS; r++) {
            const float d = fp16(t + 2 * r);
            for (int w = 0; w < 32; w++) {
                const int h = w >> 4, v = (w & 15) >> 2, bb = w & 3;
                const int c = (t[16 + 32 * v + 4 * r + bb] >> (4 * h)) & 0xF;
                y[(int64_t)r * K + 32 * b + w] = d * (float)(c - 8);
            }
        }
    }
}

/* Q8_0 in tiles of 8 rows (the AVX2 build; tierlm.quant.tiles): per block of 32 weights (272 bytes, as the
 * 8 rows' blocks), the 8 rows' fp16 d, then 8 x 32 bytes [v < 8][row][b < 4]: weight 4v + b of the row.
 * As the rows do, |c| (unsigned) times x's bytes with c's signs: a pair up to 2 * 128 * 127, one
 * vpmaddwd each; the tile saves the rows' per-block scale broadcasts and keeps one stream per thread. */
enum { Q80X8_BYTES = 272 };

static inline __attribute__((always_inline)) void q8_0x8_tile(int nx, const uint8_t *tile, int nb, const XBlocks *xb, float *out) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[X8_NX];
    for (int i = 0; i < nx; i++) acc[i] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const uint8_t *t = tile + (int64_t)b * Q80X8_BYTES;
        x8_prefetch(t, Q80X8_BYTES);
        __m256i sumi[X8_NX];
        for (int i = 0; i < nx; i++) sumi[i] = _mm256_setzero_si256();
        for (int v = 0; v < 8; v++) {
            const __m256i c = _mm256_loadu_si256((const __m256i *)(t + 16 + 32 * v));
            const __m256i ac = _mm256_sign_epi8(c, c);
            for (int i = 0; i < nx; i++) {
                const __m256i p = _mm256_maddubs_epi16(ac, _mm256_sign_epi8(x4(xb[i].q + 32 * b + 4 * v), c));
                sumi[i] = _mm256_add_epi32(sumi[i], _mm256_madd_epi16(p, ones));
            }
        }
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)t));
        for (int i = 0; i < nx; i++)
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi[i]), _mm256_mul_ps(d, _mm256_set1_ps(xb[i].xd[b])), acc[i]);
    }
    for (int i = 0; i < nx; i++) _mm256_storeu_ps(out + KX8_ROWS * i, acc[i]);
}

static void run_q8_0x8(const XBlocks *xbs, int M, const uint8_t *tiles, float *y, int N, int K, int num_threads) {
    const int nb = K / 32;
#define Q80X8_CALL(nx) q8_0x8_tile(nx, tiles + (int64_t)t * nb * Q80X8_BYTES, nb, &xbs[m], out)
    X8_TILES_LOOP(Q80X8_CALL)
#undef Q80X8_CALL
}

__attribute__((optimize("fp-contract=off")))
static void dequant_q8_0x8(const uint8_t *tile, int K, float *y) {
    for (int b = 0; b < K / 32; b++) {
        const uint8_t *t = tile + (int64_t)b * Q80X8_BYTES;
        for (int r = 0; r < KX8_ROWS; r++) {
            const float d = fp16(t + 2 * r);
            for (int w = 0; w < 32; w++) y[(int64_t)r * K + 32 * b + w] = d * (float)(int8_t)t[16 + 32 * (w >> 2) + 4 * r + (w & 3)];
        }
    }
}


/* ---- Q6_K and Q5_K in tiles of 8 rows of 6-bit codes (the AVX2 build; tierlm.quant.tiles) -------------
 * As for Q4_K, int32 lane i is row i and x's bytes are broadcast, but 6-bit codes (Q5_K's 5 fit) in the
 * file's split layout (nibbles + a plane of high bits) cost three ops per 32 codes to merge. Packed four
 * codes to three bytes instead, three codes come out with one vpand each and the fourth from the three
 * bytes' top bits. A vpmaddubsw pair is at most 2 * 63 * 127, so two add in int16 before vpmaddwd.
 * Per super-block (tile t holds rows 8t..8t+7), Q6_K (Q6_KX8_BYTES):
 *   0    the 8 rows' fp16 d; 16: scales int8 [pair p < 8][row][2]: sub-blocks 2p and 2p+1 of 16 weights
 *   144  codes [p < 8][triple u < 2][byte vector a < 3][row][b < 4]
 * Q5_K (Q5_KX8_BYTES): 0 d, 16 dmin, 32 scales u8 [j][row], 96 mins u8 [j][row], 160 codes as above
 * with p = j, the sub-block of 32 weights.
 * Code vector k < 8 of pair p is byte vector k % 4 of triple k / 4 when k % 4 < 3 (bits 0-5), else the
 * triple's top bits (vector 0's bits 6-7 the code's bits 0-1, vector 1's 2-3, vector 2's 4-5). Byte b of
 * row r in code vector k is weight 32p + 2k + b of the row for b < 2, 32p + 16 + 2k + b - 2 for b >= 2,
 * so that a vpmaddwd pair is sub-blocks 2p, 2p+1 (Q6_K's scale pair) and x is read permuted the same way
 * (x_perm6). weight = d * sc * (code - 32) (Q6_K), d * sc_j * code - dmin * m_j (Q5_K), as in the file;
 * the -32 is 32 d sum_i sc_i bsum_i, Q5_K's mins sum_j m_j (bsum_2j + bsum_2j+1). The int32 sums and
 * their conversion and FMA per super-block are those of the rows (super_rows_dot), so a row's tile and
 * its streamed row give the same bits. Measured (5632 x 2048 from cache, AVX2 EPYC, G weights/s, rows ->
 * tiles, one run): 1 thread Q6_K 7.8 -> 12.8, Q5_K 7.1 -> 12.3; 2 threads Q6_K 12.6-16 -> 23-24, Q5_K
 * 11-15 -> 22-27 (Q4_K's tiles: 18.8 and 32-39). Q5_K pays 212 bytes a row per 256 weights for the file's
 * 176 (its peak RSS stays within 1.1x llama.cpp's on a 1.1B Q5_K_M). */
enum { Q6_KX8_BYTES = 1680, Q5_KX8_BYTES = 1696 };

/* x's int8 values in the tiles' order: per 32, bytes 4k + b = x 2k + b (b < 2), 16 + 2k + b - 2 (b >= 2) */
static void x_perm6(const int8_t *q, int K, int8_t *out) {
    for (int g = 0; g < K; g += 32)
        for (int k = 0; k < 8; k++) {
            memcpy(out + g + 4 * k, q + g + 2 * k, 2);
            memcpy(out + g + 4 * k + 2, q + g + 16 + 2 * k, 2);
        }
}

/* The four code vectors of a triple (three byte vectors at c): c[0..3] */
static inline __attribute__((always_inline)) void k6_codes(const uint8_t *c, __m256i *cv) {
    const __m256i m6 = _mm256_set1_epi8(0x3F), top = _mm256_set1_epi8((char)0xC0);
    const __m256i v0 = _mm256_loadu_si256((const __m256i *)c), v1 = _mm256_loadu_si256((const __m256i *)(c + 32));
    const __m256i v2 = _mm256_loadu_si256((const __m256i *)(c + 64));
    cv[0] = _mm256_and_si256(v0, m6);
    cv[1] = _mm256_and_si256(v1, m6);
    cv[2] = _mm256_and_si256(v2, m6);
    /* masked to bits 6-7 first, so the 16-bit shifts bring no bits over from the next byte */
    cv[3] = _mm256_or_si256(_mm256_or_si256(_mm256_srli_epi16(_mm256_and_si256(v0, top), 6),
                                            _mm256_srli_epi16(_mm256_and_si256(v1, top), 4)),
                            _mm256_srli_epi16(_mm256_and_si256(v2, top), 2));
}

/* int32 lanes: the four code vectors against x, the int16 pairs times sc. 5-bit codes (q5) give pairs of
 * at most 2 * 31 * 127: all four add in int16 before one vpmaddwd. */
static inline __attribute__((always_inline)) __m256i k6_dot(int q5, const __m256i *cv, const int8_t *x, __m256i sc) {
    const __m256i p0 = _mm256_add_epi16(_mm256_maddubs_epi16(cv[0], x4(x)), _mm256_maddubs_epi16(cv[1], x4(x + 4)));
    const __m256i p1 = _mm256_add_epi16(_mm256_maddubs_epi16(cv[2], x4(x + 8)), _mm256_maddubs_epi16(cv[3], x4(x + 12)));
    if (q5) return _mm256_madd_epi16(_mm256_add_epi16(p0, p1), sc);
    return _mm256_add_epi32(_mm256_madd_epi16(p0, sc), _mm256_madd_epi16(p1, sc));
}

/* nx rows of x (xp: the first, permuted by x_perm6; the next ones K bytes apart) against a tile */
static inline __attribute__((always_inline)) void k6x8_tile(int q5, int nx, const uint8_t *tile, int nsb, int K,
                                                            const int8_t *xp, const XSuper *xs, float *out) {
    const int bytes = q5 ? Q5_KX8_BYTES : Q6_KX8_BYTES, at = q5 ? 160 : 144;
    __m256 acc[X8_NX], accm[X8_NX];
    for (int i = 0; i < nx; i++) acc[i] = accm[i] = _mm256_setzero_ps();
    for (int s = 0; s < nsb; s++) {
        const uint8_t *t = tile + (int64_t)s * bytes;
        x8_prefetch(t, bytes);
        __m256i sumi[X8_NX], summ[X8_NX];
        for (int i = 0; i < nx; i++) sumi[i] = summ[i] = _mm256_setzero_si256();
        for (int p = 0; p < 8; p++) {
            __m256i sc;
            if (q5) {  /* sc_j in both int16 halves; m_j (high half zero) times x's sum over the block */
                const __m256i s8 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(t + 32 + 8 * p)));
                sc = _mm256_or_si256(s8, _mm256_slli_epi32(s8, 16));
                const __m256i m = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(t + 96 + 8 * p)));
                for (int i = 0; i < nx; i++) {
                    const int16_t *bs = xs[i].bsum + 16 * s;
                    summ[i] = _mm256_add_epi32(summ[i], _mm256_madd_epi16(m, _mm256_set1_epi32((uint16_t)(bs[2 * p] + bs[2 * p + 1]))));
                }
            } else {  /* (sc_2p, sc_2p+1) per row, against (bsum_2p, bsum_2p+1) for the -32 */
                sc = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(t + 16 + 16 * p)));
                for (int i = 0; i < nx; i++) {
                    int32_t b2;
                    memcpy(&b2, xs[i].bsum + 16 * s + 2 * p, 4);
                    summ[i] = _mm256_add_epi32(summ[i], _mm256_madd_epi16(sc, _mm256_set1_epi32(b2)));
                }
            }
            for (int u = 0; u < 2; u++) {
                __m256i cv[4];
                k6_codes(t + at + 192 * p + 96 * u, cv);
                for (int i = 0; i < nx; i++)
                    sumi[i] = _mm256_add_epi32(sumi[i], k6_dot(q5, cv, xp + (int64_t)i * K + 256 * s + 32 * p + 16 * u, sc));
            }
        }
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)t));
        for (int i = 0; i < nx; i++) {
            const __m256 xd = _mm256_set1_ps(xs[i].d[s]), dx = _mm256_mul_ps(d, xd);
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi[i]), dx, acc[i]);
            if (q5) accm[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(summ[i]),
                                              _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(t + 16))), xd), accm[i]);
            else accm[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_slli_epi32(summ[i], 5)), dx, accm[i]);
        }
    }
    for (int i = 0; i < nx; i++) _mm256_storeu_ps(out + KX8_ROWS * i, _mm256_sub_ps(acc[i], accm[i]));
}

/* A tile's 8 rows as float32 (8 x K), equal to the gguf package's dequantization of the source rows. Per
 * row, triple u of pair p holds weights 32p + 8u .. + 8 (its bytes b < 2) and 32p + 16 + 8u .. + 8 (b >= 2),
 * each in order of code vector, then byte. */
__attribute__((optimize("fp-contract=off")))
static void dequant_k6x8(int q5, const uint8_t *tile, int K, float *y) {
    const int bytes = q5 ? Q5_KX8_BYTES : Q6_KX8_BYTES, at = q5 ? 160 : 144;
    for (int s = 0; s < K / 256; s++) {
        const uint8_t *t = tile + (int64_t)s * bytes;
        for (int r = 0; r < KX8_ROWS; r++) {
            const float d = fp16(t + 2 * r), dmin = q5 ? fp16(t + 16 + 2 * r) : 0.f;
            for (int p = 0; p < 8; p++) {
                float dl[2], ml = 0.f;
                if (q5) { dl[0] = dl[1] = d * (float)t[32 + 8 * p + r]; ml = dmin * (float)t[96 + 8 * p + r]; }
                else for (int h = 0; h < 2; h++) dl[h] = d * (float)((const int8_t *)t)[16 + 16 * p + 2 * r + h];
                /* [h][a][b & 1] from the 16 codes [a][b] (lanes 4a + b) */
                const __m128i order = _mm_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15);
                for (int u = 0; u < 2; u++) {
                    const uint8_t *c = t + at + 192 * p + 96 * u + 4 * r;
                    uint32_t w[3], codes[4];
                    memcpy(&w[0], c, 4); memcpy(&w[1], c + 32, 4); memcpy(&w[2], c + 64, 4);
                    for (int a = 0; a < 3; a++) codes[a] = w[a] & 0x3F3F3F3Fu;
                    codes[3] = ((w[0] >> 6) & 0x03030303u) | ((w[1] >> 4) & 0x0C0C0C0Cu) | ((w[2] >> 2) & 0x30303030u);
                    const __m128i v = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)codes), order);
                    float *out = y + (int64_t)r * K + 256 * s + 32 * p + 8 * u;
                    for (int h = 0; h < 2; h++) {
                        __m256i ci = _mm256_cvtepu8_epi32(h ? _mm_unpackhi_epi64(v, v) : v);
                        if (!q5) ci = _mm256_sub_epi32(ci, _mm256_set1_epi32(32));
                        __m256 f = _mm256_mul_ps(_mm256_set1_ps(dl[h]), _mm256_cvtepi32_ps(ci));
                        if (q5) f = _mm256_sub_ps(f, _mm256_set1_ps(ml));
                        _mm256_storeu_ps(out + 16 * h, f);
                    }
                }
            }
        }
    }
}

/* ---- Q3_K and Q2_K in tiles of 8 rows (the AVX2 build; tierlm.quant.tiles) -------------------------------
 * Their rows are the slowest of the K-quants (Q3_K ~5 G weights/s a thread: three bit fields and a scale
 * per 16 weights). In tiles, in the order of the 6-bit tiles above (the pairs of 16-weight sub-blocks, x
 * permuted by x_perm6), Q3_K's codes (q + 4 h: 0-7) sit in nibbles, Q2_K's in 2-bit fields, so each code
 * vector is one or two ops, and a pair's eight vpmaddubsw sums add in int16 (at most 8 * 2 * 7 * 127)
 * before one vpmaddwd with the rows' scale pairs. Per super-block:
 *   Q3_K (Q3_KX8_BYTES): 0 the 8 rows' fp16 d; 16 scales int8 (sc - 32) [p][row][2]; 144 codes
 *        [p][v < 4][row][b < 4]: code vector 2v in the low nibbles, 2v + 1 in the high ones;
 *        weight = d * sc * (code - 4) (the file's 2 low bits plus 4 * its high-mask bit)
 *   Q2_K (Q2_KX8_BYTES): 0 d; 16 dmin; 32 the file's scale bytes (scale | min << 4) [p][row][2]; 160 codes
 *        [p][v < 2][row][b < 4]: code vector 4v + f in bits 2f; weight = d * sc * code - dmin * m
 * 146 bytes a row per 256 weights for Q3_K's 110 (a nibble per 3-bit code), 84 for Q2_K's 84. The int32
 * sums, conversions and FMAs are the rows' (super_rows_dot). */
enum { Q3_KX8_BYTES = 1168, Q2_KX8_BYTES = 672 };

static inline __attribute__((always_inline)) void klow_tile(int q2, int nx, const uint8_t *tile, int nsb, int K,
                                                            const int8_t *xp, const XSuper *xs, float *out) {
    const int bytes = q2 ? Q2_KX8_BYTES : Q3_KX8_BYTES;
    const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(3);
    __m256 acc[X8_NX], accm[X8_NX];
    for (int i = 0; i < nx; i++) acc[i] = accm[i] = _mm256_setzero_ps();
    for (int s = 0; s < nsb; s++) {
        const uint8_t *t = tile + (int64_t)s * bytes;
        x8_prefetch(t, bytes);
        __m256i sumi[X8_NX], summ[X8_NX];
        for (int i = 0; i < nx; i++) sumi[i] = summ[i] = _mm256_setzero_si256();
        for (int p = 0; p < 8; p++) {
            __m256i sc, mn, p16[X8_NX];
            for (int i = 0; i < nx; i++) p16[i] = _mm256_setzero_si256();
            if (q2) {
                const __m128i raw = _mm_loadu_si128((const __m128i *)(t + 32 + 16 * p));
                sc = _mm256_cvtepu8_epi16(_mm_and_si128(raw, _mm_set1_epi8(0x0F)));
                mn = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(raw, 4), _mm_set1_epi8(0x0F)));
                for (int v = 0; v < 2; v++) {
                    const __m256i c = _mm256_loadu_si256((const __m256i *)(t + 160 + 64 * p + 32 * v));
                    const __m256i f0 = _mm256_and_si256(c, m2), f1 = _mm256_and_si256(_mm256_srli_epi16(c, 2), m2);
                    const __m256i f2 = _mm256_and_si256(_mm256_srli_epi16(c, 4), m2), f3 = _mm256_and_si256(_mm256_srli_epi16(c, 6), m2);
                    for (int i = 0; i < nx; i++) {
                        const int8_t *x = xp + (int64_t)i * K + 256 * s + 32 * p + 16 * v;
                        p16[i] = _mm256_add_epi16(p16[i], _mm256_add_epi16(_mm256_maddubs_epi16(f0, x4(x)), _mm256_maddubs_epi16(f1, x4(x + 4))));
                        p16[i] = _mm256_add_epi16(p16[i], _mm256_add_epi16(_mm256_maddubs_epi16(f2, x4(x + 8)), _mm256_maddubs_epi16(f3, x4(x + 12))));
                    }
                }
            } else {
                sc = mn = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(t + 16 + 16 * p)));
                for (int v = 0; v < 4; v++) {
                    const __m256i c = _mm256_loadu_si256((const __m256i *)(t + 144 + 128 * p + 32 * v));
                    const __m256i lo = _mm256_and_si256(c, m4), hi = _mm256_and_si256(_mm256_srli_epi16(c, 4), m4);
                    for (int i = 0; i < nx; i++) {
                        const int8_t *x = xp + (int64_t)i * K + 256 * s + 32 * p + 8 * v;
                        p16[i] = _mm256_add_epi16(p16[i], _mm256_add_epi16(_mm256_maddubs_epi16(lo, x4(x)), _mm256_maddubs_epi16(hi, x4(x + 4))));
                    }
                }
            }
            for (int i = 0; i < nx; i++) {
                int32_t b2;
                memcpy(&b2, xs[i].bsum + 16 * s + 2 * p, 4);
                summ[i] = _mm256_add_epi32(summ[i], _mm256_madd_epi16(mn, _mm256_set1_epi32(b2)));
                sumi[i] = _mm256_add_epi32(sumi[i], _mm256_madd_epi16(p16[i], sc));
            }
        }
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)t));
        for (int i = 0; i < nx; i++) {
            const __m256 xd = _mm256_set1_ps(xs[i].d[s]), dx = _mm256_mul_ps(d, xd);
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi[i]), dx, acc[i]);
            if (q2) accm[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(summ[i]), _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(t + 16))), xd), accm[i]);
            else accm[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_slli_epi32(summ[i], 2)), dx, accm[i]);
        }
    }
    for (int i = 0; i < nx; i++) _mm256_storeu_ps(out + KX8_ROWS * i, _mm256_sub_ps(acc[i], accm[i]));
}

/* A tile's 8 rows as float32 (8 x K), equal to the gguf package's dequantization of the source rows. */
__attribute__((optimize("fp-contract=off")))
static void dequant_klow(int q2, const uint8_t *tile, int K, float *y) {
    const int bytes = q2 ? Q2_KX8_BYTES : Q3_KX8_BYTES;
    for (int s = 0; s < K / 256; s++) {
        const uint8_t *t = tile + (int64_t)s * bytes;
        for (int r = 0; r < KX8_ROWS; r++) {
            const float d = fp16(t + 2 * r), dmin = q2 ? fp16(t + 16 + 2 * r) : 0.f;
            for (int p = 0; p < 8; p++)
                for (int h = 0; h < 2; h++) {  /* sub-block 2p + h: bytes b = 2h, 2h + 1 of every code vector */
                    const int sb = q2 ? t[32 + 16 * p + 2 * r + h] : 0;
                    const float dl = q2 ? d * (float)(sb & 0xF) : d * (float)((const int8_t *)t)[16 + 16 * p + 2 * r + h];
                    const float ml = q2 ? dmin * (float)(sb >> 4) : 0.f;
                    float *out = y + (int64_t)r * K + 256 * s + 32 * p + 16 * h;
                    for (int k = 0; k < 8; k++)
                        for (int e = 0; e < 2; e++) {
                            const int b = 2 * h + e;
                            const int code = q2 ? (t[160 + 64 * p + 32 * (k >> 2) + 4 * r + b] >> (2 * (k & 3))) & 3
                                                : (t[144 + 128 * p + 32 * (k >> 1) + 4 * r + b] >> (4 * (k & 1))) & 0xF;
                            out[2 * k + e] = q2 ? dl * (float)code - ml : dl * (float)(code - 4);
                        }
                }
        }
    }
}

/* The tiles whose x is read permuted by x_perm6 (Q6_K, Q5_K, Q3_K, Q2_K): x rounded per 256, then that
 * copy, then one X8_TILES_LOOP per format, so that the tile kernel's flag is a literal inside OpenMP's
 * outlined body (see DEFINE_RUN). */
static int run_pair_tiles(int fmt, const float *x, int M, int K, const uint8_t *tiles, float *y, int N, int num_threads) {
    XSuper *xs = x_super_rows(x, M, K, num_threads);
    int8_t *xp = aligned_alloc(64, ((size_t)M * K + 63) / 64 * 64);
    for (int m = 0; m < M; m++) x_perm6(xs[m].q, K, xp + (int64_t)m * K);
    const int nsb = K / 256;
    const int bytes = fmt == Q6_KX8 ? Q6_KX8_BYTES : fmt == Q5_KX8 ? Q5_KX8_BYTES : fmt == Q3_KX8 ? Q3_KX8_BYTES : Q2_KX8_BYTES;
#define PAIR_ARGS tiles + (int64_t)t * nsb * bytes, nsb, K, xp + (int64_t)m * K, &xs[m], out
#define Q6_CALL(nx) k6x8_tile(0, nx, PAIR_ARGS)
#define Q5_CALL(nx) k6x8_tile(1, nx, PAIR_ARGS)
#define Q3_CALL(nx) klow_tile(0, nx, PAIR_ARGS)
#define Q2_CALL(nx) klow_tile(1, nx, PAIR_ARGS)
    switch (fmt) {
    case Q6_KX8: { X8_TILES_LOOP(Q6_CALL) } break;
    case Q5_KX8: { X8_TILES_LOOP(Q5_CALL) } break;
    case Q3_KX8: { X8_TILES_LOOP(Q3_CALL) } break;
    default: { X8_TILES_LOOP(Q2_CALL) } break;
    }
#undef Q2_CALL
#undef Q3_CALL
#undef Q5_CALL
#undef Q6_CALL
#undef PAIR_ARGS
    free(xp); free(xs);
    return 0;
}

/* ---- IQ4_XS in tiles of 8 rows (the AVX2 build; tierlm.quant.tiles) -----------------------------------
 * The layout of the Q4_K tiles: per super-block the 8 rows' fp16 d (0), their 6-bit scales minus 32 as
 * int8 [j][row] (16), then codes [j][v < 4][row][b < 4] (80): low nibble weight 32j + 4v + b of the row,
 * high nibble 32j + 16 + 4v + b (IQ4_XS_X8_BYTES, 138 bytes a row per 256 weights for the file's 136).
 * The nibbles index IQ4_NL's signed values (vpshufb); as signed bytes times signed x they multiply as
 * |x| times the value with x's sign (vpsign), up to 2 * 127 * 127 a pair, so every vpmaddubsw takes its
 * own vpmaddwd with the rows' scales. weight = d * (ls - 32) * value, as in the file. */
enum { IQ4_XS_X8_BYTES = 1104 };

static inline __attribute__((always_inline)) void iq4_xsx8_tile(int nx, const uint8_t *tile, int nsb, int K, const XSuper *xs,
                                                                const int8_t *xa, float *out) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const __m256i kv = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)IQ4_KV));
    __m256 acc[X8_NX];
    for (int i = 0; i < nx; i++) acc[i] = _mm256_setzero_ps();
    for (int s = 0; s < nsb; s++) {
        const uint8_t *t = tile + (int64_t)s * IQ4_XS_X8_BYTES;
        x8_prefetch(t, IQ4_XS_X8_BYTES);
        __m256i sumi[X8_NX];
        for (int i = 0; i < nx; i++) sumi[i] = _mm256_setzero_si256();
        for (int j = 0; j < 8; j++) {
            const __m256i s16 = _mm256_cvtepu16_epi32(_mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i *)(t + 16 + 8 * j))));
            const __m256i sc = _mm256_or_si256(s16, _mm256_slli_epi32(s16, 16));  /* the row's scale in both int16 halves */
            for (int v = 0; v < 4; v++) {
                const __m256i c = _mm256_loadu_si256((const __m256i *)(t + 80 + 128 * j + 32 * v));
                const __m256i lo = _mm256_shuffle_epi8(kv, _mm256_and_si256(c, m4));
                const __m256i hi = _mm256_shuffle_epi8(kv, _mm256_and_si256(_mm256_srli_epi16(c, 4), m4));
                for (int i = 0; i < nx; i++) {
                    const int at = 256 * s + 32 * j + 4 * v;
                    const int8_t *xq = xs[i].q + at, *xb = xa + (int64_t)i * K + at;
                    const __m256i p0 = _mm256_maddubs_epi16(x4(xb), _mm256_sign_epi8(lo, x4(xq)));
                    const __m256i p1 = _mm256_maddubs_epi16(x4(xb + 16), _mm256_sign_epi8(hi, x4(xq + 16)));
                    sumi[i] = _mm256_add_epi32(sumi[i], _mm256_add_epi32(_mm256_madd_epi16(p0, sc), _mm256_madd_epi16(p1, sc)));
                }
            }
        }
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)t));
        for (int i = 0; i < nx; i++)
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi[i]), _mm256_mul_ps(d, _mm256_set1_ps(xs[i].d[s])), acc[i]);
    }
    for (int i = 0; i < nx; i++) _mm256_storeu_ps(out + KX8_ROWS * i, acc[i]);
}

static int run_iq4_xsx8(const float *x, int M, int K, const uint8_t *tiles, float *y, int N, int num_threads) {
    XSuper *xs = x_super_rows(x, M, K, num_threads);
    int8_t *xa = aligned_alloc(64, ((size_t)M * K + 63) / 64 * 64);  /* |x| (x is within +-127) */
    for (int64_t i = 0; i < (int64_t)M * K; i++) xa[i] = (int8_t)abs(xs[0].q[i]);
    const int nsb = K / 256;
#define IQ4_CALL(nx) iq4_xsx8_tile(nx, tiles + (int64_t)t * nsb * IQ4_XS_X8_BYTES, nsb, K, &xs[m], xa + (int64_t)m * K, out)
    X8_TILES_LOOP(IQ4_CALL)
#undef IQ4_CALL
    free(xa); free(xs);
    return 0;
}

__attribute__((optimize("fp-contract=off")))
static void dequant_iq4_xsx8(const uint8_t *tile, int K, float *y) {
    for (int s = 0; s < K / 256; s++) {
        const uint8_t *t = tile + (int64_t)s * IQ4_XS_X8_BYTES;
        for (int r = 0; r < KX8_ROWS; r++) {
            const float d = fp16(t + 2 * r);
            for (int j = 0; j < 8; j++) {
                const float dl = d * (float)((const int8_t *)t)[16 + 8 * j + r];
                for (int w = 0; w < 32; w++) {
                    const int h = w >> 4, v = (w & 15) >> 2, b = w & 3;
                    const int c = (t[80 + 128 * j + 32 * v + 4 * r + b] >> (4 * h)) & 0xF;
                    y[(int64_t)r * K + 256 * s + 32 * j + w] = dl * (float)IQ4_KV[c];
                }
            }
        }
    }
}

/* F16 and BF16 rows: 8 weights at a time widened to float32 against x as it is. */
static inline __m256 load8_half(const uint8_t *p, int bf16) {
    const __m128i h = _mm_loadu_si128((const __m128i *)p);
    return bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)) : _mm256_cvtph_ps(h);
}

static inline __attribute__((always_inline)) void half_rows(int bf16, const uint8_t *codes, int64_t row_bytes,
                                                            int nr, const float *x, int K, float *out, int prefetch) {
    __m256 acc[ROWS];
    for (int r = 0; r < ROWS; r++) acc[r] = _mm256_setzero_ps();
    const uint8_t *next = codes + ROWS * row_bytes;
    for (int k = 0; k < K; k += 8) {
        if (prefetch && (k & 31) == 0)  /* one 64-byte line of each next row per 32 weights */
            for (int r = 0; r < ROWS; r++) _mm_prefetch((const char *)(next + r * row_bytes + 2 * k), _MM_HINT_T1);
        const __m256 xv = _mm256_loadu_ps(x + k);
        for (int r = 0; r < ROWS; r++)
            if (r < nr) acc[r] = _mm256_fmadd_ps(load8_half(codes + r * row_bytes + 2 * k, bf16), xv, acc[r]);
    }
    for (int r = 0; r < ROWS; r++) out[r] = hsum8(acc[r]);
}

static void run_half(int bf16, const float *x, int M, const uint8_t *codes, float *y, int N, int K, int64_t row_bytes,
                     int num_threads) {
    const int num_tiles = (N + ROWS - 1) / ROWS;
    #pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int t = 0; t < num_tiles; t++) {
        const int n0 = N < ROWS ? 0 : (t * ROWS + ROWS > N ? N - ROWS : t * ROWS);
        const int nr = N < ROWS ? N : ROWS;
        float out[ROWS];
        for (int m = 0; m < M; m++) {
            if (bf16) half_rows(1, codes + (int64_t)n0 * row_bytes, row_bytes, nr, x + (int64_t)m * K, K, out, m == 0);
            else half_rows(0, codes + (int64_t)n0 * row_bytes, row_bytes, nr, x + (int64_t)m * K, K, out, m == 0);
            for (int r = 0; r < nr; r++) y[(int64_t)m * N + n0 + r] = out[r];
        }
    }
}

#if AVX512_BUILD
/* Tiles are read as one sequential stream each, which the hardware prefetcher follows by itself.
 * q3h's first tiles (p in 16-bit lanes) ran at 22-23 G weights/s from DRAM against 52 in cache, and
 * software prefetches 4 KiB ahead brought them to 42-43 (the same prefetches made the bit-plane
 * tiles 0.45-0.87x as fast). Its byte-lookup tiles run faster without them: 58-67 against 42 with
 * (A/B in one process, 5632 x 2048, 2 threads, AMD EPYC), so no tile kernel prefetches. */

/* Q4_0 repacked into tiles of 16 rows (tierlm.quant.gguf.interleave_q4_0): tile t holds rows
 * 16t..16t+15 (zero rows pad the last tile), block by block, 288 bytes a block: the 16 rows' fp16 d,
 * then four 64-byte chunks; chunk l holds bytes 4l..4l+3 of the block of row i at 4i..4i+3. So int32
 * lane i of a 512-bit vpdpbusd is row i: a block of all 16 rows is 8 vpdpbusd against x's 4 bytes
 * broadcast (low nibbles: weights 4l..4l+3, high: 16+4l..16+4l+3), one float conversion and two
 * FMAs with the vector of 16 scales -- no per-row scalar work and no horizontal sums, against ~12
 * instructions per row and block in rows_dot. Each tile is one sequential stream. */
static void q4_0x16_tile(const uint8_t *tile, int nb, const XBlocks *xb, float *out) {
    const __m512i low = _mm512_set1_epi8(0x0F);
    __m512 acc = _mm512_setzero_ps(), accm = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const uint8_t *p = tile + 288 * (int64_t)b;
        const int32_t *xw = (const int32_t *)(xb->q + 32 * b);
        __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
        for (int l = 0; l < 4; l++) {
            const __m512i v = _mm512_loadu_si512((const void *)(p + 32 + 64 * l));
            s0 = _mm512_dpbusd_epi32(s0, _mm512_and_si512(v, low), _mm512_set1_epi32(xw[l]));
            s1 = _mm512_dpbusd_epi32(s1, _mm512_and_si512(_mm512_srli_epi16(v, 4), low), _mm512_set1_epi32(xw[4 + l]));
        }
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1)), _mm512_mul_ps(d, _mm512_set1_ps(xb->xd[b])), acc);
        accm = _mm512_fmadd_ps(d, _mm512_set1_ps(xb->xs[b]), accm);  /* the -8 offset: d * 8 * xd * sum q */
    }
    _mm512_storeu_ps(out, _mm512_fnmadd_ps(accm, _mm512_set1_ps(8.f), acc));
}

/* Q6_K repacked into tiles of 16 rows (tierlm.quant.tiles): per 256-weight super-block, 3360 bytes:
 * the 16 rows' fp16 d (32 B), their int8 scales sub-block by sub-block (16 x 16 B), then 8 blocks of
 * 32 weights (384 B each): four 64-byte chunks of low nibbles laid out as in Q4_0's tiles (chunk l,
 * row i, byte b: weight 4l+b in the low nibble, 16+4l+b in the high one) and two 64-byte chunks of
 * the codes' top 2 bits (chunk h, row i, byte b: weight 16h+4l+b's in bits 2l..2l+1). A code c is
 * 6 bits; weight = d * scale * (c - 32), the scale per 16 weights, so each half of a block
 * (4 vpdpbusd) is converted and scaled on its own. Same bytes as Q6_K: 210 per row and super-block. */
static void q6_kx16_tile(const uint8_t *tile, int nsb, const XBlocks *xb, float *out) {
    const __m512i low = _mm512_set1_epi8(0x0F), top = _mm512_set1_epi8(0x30);
    __m512 acc = _mm512_setzero_ps(), accm = _mm512_setzero_ps();
    for (int sb = 0; sb < nsb; sb++) {
        const uint8_t *p = tile + 3360 * (int64_t)sb;
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
        for (int t = 0; t < 8; t++) {
            const uint8_t *blk = p + 288 + 384 * t;
            const int b = 8 * sb + t;  /* block of x */
            const int32_t *xw = (const int32_t *)(xb->q + 32 * b);
            const __m512i h0 = _mm512_loadu_si512((const void *)(blk + 256)), h1 = _mm512_loadu_si512((const void *)(blk + 320));
            __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
            for (int l = 0; l < 4; l++) {
                const __m512i v = _mm512_loadu_si512((const void *)(blk + 64 * l));
                /* bits 2l..2l+1 of each byte up to bits 4..5 (what crosses a byte lands below bit 4) */
                const __m512i u0 = l < 3 ? _mm512_slli_epi16(h0, 4 - 2 * l) : _mm512_srli_epi16(h0, 2);
                const __m512i u1 = l < 3 ? _mm512_slli_epi16(h1, 4 - 2 * l) : _mm512_srli_epi16(h1, 2);
                const __m512i c0 = _mm512_or_si512(_mm512_and_si512(v, low), _mm512_and_si512(u0, top));
                const __m512i c1 = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(v, 4), low), _mm512_and_si512(u1, top));
                s0 = _mm512_dpbusd_epi32(s0, c0, _mm512_set1_epi32(xw[l]));
                s1 = _mm512_dpbusd_epi32(s1, c1, _mm512_set1_epi32(xw[4 + l]));
            }
            const __m512 sc0 = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p + 32 + 32 * t)))));
            const __m512 sc1 = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p + 48 + 32 * t)))));
            const __m512 xd = _mm512_set1_ps(xb->xd[b]);
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s0), _mm512_mul_ps(sc0, xd), acc);
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s1), _mm512_mul_ps(sc1, xd), acc);
            accm = _mm512_fmadd_ps(sc0, _mm512_set1_ps(xb->xs16[2 * b]), accm);  /* the -32 offset */
            accm = _mm512_fmadd_ps(sc1, _mm512_set1_ps(xb->xs16[2 * b + 1]), accm);
        }
    }
    _mm512_storeu_ps(out, _mm512_fnmadd_ps(accm, _mm512_set1_ps(32.f), acc));
}

/* tierlm's group-wise formats (q8, q6, q5, q4, q3, q2) in tiles of 16 rows (tierlm.quant.tiles):
 * per group of `group` weights, the 16 rows' fp16 steps and mins (64 B), then per block of 32
 * weights the codes in bit planes, 64-byte chunks in which row i owns bytes 4i..4i+3, byte b of a
 * row standing for weights 16h + 4l + b (h = 0, 1; l = 0..3):
 *   byte plane (q8)            8 chunks, chunk 4h + l: the code
 *   nibble plane (q6, q5, q4)  4 chunks, chunk l: h = 0 in the low nibble, h = 1 in the high one
 *   2-bit plane (q6, q3, q2)   2 chunks, chunk h: bits 2l..2l+1
 *   1-bit plane (q5, q3)       1 chunk: bit 4h + l
 * and a code is its planes' fields side by side, lowest plane first (q6: nibble | 2 bits << 4; q5:
 * nibble | bit << 4; q3: 2 bits | bit << 2). Each field is a shift and a mask of the chunk (a
 * 16-bit shift: what crosses into the next byte lands outside the mask). weight = min + step * c. */
static inline __attribute__((always_inline)) __m512i plane_field(__m512i v, int from, int to, int width) {
    const __m512i u = to >= from ? _mm512_slli_epi16(v, to - from) : _mm512_srli_epi16(v, from - to);
    return _mm512_and_si512(u, _mm512_set1_epi8((char)(((1 << width) - 1) << to)));
}

static inline __attribute__((always_inline)) void tq_x16_tile(int bits, const uint8_t *tile, int nb, int group,
                                                              const XBlocks *xb, float *out) {
    const int nib = bits >= 4 && bits <= 6, two = bits == 6 || bits <= 3, one = bits == 5 || bits == 3;
    const int block_bytes = bits * 64, bpg = group / 32;
    const int two_at = nib ? 4 : 0, one_at = nib ? 4 : 2;  /* where a plane's field sits in the code */
    __m512 acc = _mm512_setzero_ps(), accm = _mm512_setzero_ps();
    const uint8_t *p = tile;
    for (int b = 0; b < nb; b++) {
        if (b % bpg == 0) p += 64;  /* past the group's steps and mins (read below) */
        const uint8_t *head = p - 64 - (int64_t)(b % bpg) * block_bytes;
        const int32_t *xw = (const int32_t *)(xb->q + 32 * b);
        __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
        const uint8_t *q = p;
        __m512i n[4], t[2], o = _mm512_setzero_si512();
        for (int i = 0; i < 4; i++) n[i] = o;
        t[0] = t[1] = o;
        if (bits == 8) {
            for (int l = 0; l < 4; l++) {
                s0 = _mm512_dpbusd_epi32(s0, _mm512_loadu_si512((const void *)(q + 64 * l)), _mm512_set1_epi32(xw[l]));
                s1 = _mm512_dpbusd_epi32(s1, _mm512_loadu_si512((const void *)(q + 256 + 64 * l)), _mm512_set1_epi32(xw[4 + l]));
            }
        } else {
            if (nib) { for (int l = 0; l < 4; l++) n[l] = _mm512_loadu_si512((const void *)(q + 64 * l)); q += 256; }
            if (two) { t[0] = _mm512_loadu_si512((const void *)q); t[1] = _mm512_loadu_si512((const void *)(q + 64)); q += 128; }
            if (one) o = _mm512_loadu_si512((const void *)q);
            for (int l = 0; l < 4; l++) {
                __m512i c0 = _mm512_setzero_si512(), c1 = _mm512_setzero_si512();
                if (nib) { c0 = plane_field(n[l], 0, 0, 4); c1 = plane_field(n[l], 4, 0, 4); }
                if (two) {
                    c0 = _mm512_or_si512(c0, plane_field(t[0], 2 * l, two_at, 2));
                    c1 = _mm512_or_si512(c1, plane_field(t[1], 2 * l, two_at, 2));
                }
                if (one) {
                    c0 = _mm512_or_si512(c0, plane_field(o, l, one_at, 1));
                    c1 = _mm512_or_si512(c1, plane_field(o, 4 + l, one_at, 1));
                }
                s0 = _mm512_dpbusd_epi32(s0, c0, _mm512_set1_epi32(xw[l]));
                s1 = _mm512_dpbusd_epi32(s1, c1, _mm512_set1_epi32(xw[4 + l]));
            }
        }
        const __m512 step = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)head));
        const __m512 mn = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(head + 32)));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1)), _mm512_mul_ps(step, _mm512_set1_ps(xb->xd[b])), acc);
        accm = _mm512_fmadd_ps(mn, _mm512_set1_ps(xb->xs[b]), accm);
        p += block_bytes;
    }
    _mm512_storeu_ps(out, _mm512_add_ps(acc, accm));
}

/* p -> p / 11 and p % 11 for the 121 pair values (0 past them): vpermi2b's two 64-byte tables */
static const uint8_t Q3H_DIV[128] = {
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3,
    3, 3, 3, 3, 3, 3, 3, 3, 3, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 6, 6, 6, 6,
    6, 6, 6, 6, 6, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 9, 9, 9, 9, 9, 9,
    9, 9, 9, 9, 9, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 0, 0, 0, 0, 0, 0, 0};
static const uint8_t Q3H_MOD[128] = {
    0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0,
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0, 1,
    2, 3, 4, 5, 6, 7, 8, 9, 10, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0, 1, 2,
    3, 4, 5, 6, 7, 8, 9, 10, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0, 0, 0, 0, 0, 0, 0};

/* q3h in tiles of 16 rows: per group the 16 steps and mins (64 B) as for TQX16, then per block of 32
 * weights 224 bytes of the 7-bit pair values p = a * 11 + b (a, b: the codes of weights 2j, 2j+1).
 * Pass f = 0..3 of a block fills byte k of row i's 32-bit lane (byte 4i + k: "position" 4i + k) with
 * pair 4f + k (weights 8f + 2k and + 1):
 *   passes 0..2  3 chunks of 64 B, chunk f, byte 4i + k: the pair's p in bits 0..6, and in bit 7
 *                bit 4 + f of pass 3's p at that position
 *   pass 3       32 B of low nibbles, byte j: position j in the low nibble, 32 + j in the high one
 * So passes 0..2 need no unpacking at all, and pass 3 gathers its p with three shifts and three bit
 * selects (vpternlog). Each pass looks up a = p / 11 and b = p % 11 in two 128-entry byte tables
 * (vpermi2b, which reads only bits 0..6 of an index: bit 7 may be anything) and runs two vpdpbusd, a
 * against x's even weights and b against its odd ones (q3h_x): a block of 256 pairs in 24
 * instructions. Measured against the layouts tried before (2 threads, AMD EPYC Zen 4, G weights/s):
 *   p in 16-bit lanes from 4-, 2- and 1-bit planes, two vpdpwssd on a and p as a (x0 - 11 x1) + p x1:
 *     52 in L3 (5632 x 2048, batch 1); 34 from DRAM
 *   p in bytes, its 3 high bits read as 64-bit masks (kmov, a masked add per bit): 75-88 in L3
 *   p in bytes from nibble, 2-bit and 1-bit planes (two shifts and two selects a pass): in L3, A/B
 *     in one process, 89 and 76 at 5632 x 2048 and 2048 x 5632; this layout 104 and 86 (batch 8:
 *     1.10-1.24x). From DRAM, without software prefetch (see before the Q4_0 tiles), this layout
 *     runs 58-67, q4's tiles 55 in the same minutes: batch-1 decode is memory-bound again.
 * Same bytes as q3h's rows.
 *
 * vpermi2b is AVX512-VBMI (Ice Lake, Zen 4 and later; not Skylake or Cascade Lake): CPUs without it
 * run the same tiles with the split computed by multiplies (q3h_split_bw, below). Forced here, that
 * kernel ran 74 G weights/s in L3 and 66 from DRAM against the VBMI one's 121 and 79 (medians of 5,
 * one process, a fast spell of this machine). */
/* A tile kernel's loop over the tiles of a matrix: NAME(xbs, M, tiles, group, y, N, K, num_threads),
 * tiles of TILE_BYTES (an expression of K and group) each, tiles split over the threads; DOT computes
 * the 16 rows of `tile` against `xb` into `out`. Each tile is one sequential stream. */
#define DEFINE_TILE_LOOP(NAME, TILE_BYTES, DOT)                                                           \
    static void NAME(const XBlocks *xbs, int M, const uint8_t *tiles, int group, float *y, int N, int K,  \
                     int num_threads) {                                                                   \
        const int num_tiles = (N + 15) / 16;                                                              \
        const int64_t tile_bytes = TILE_BYTES;                                                            \
        _Pragma("omp parallel for schedule(static) num_threads(num_threads)")                             \
        for (int t = 0; t < num_tiles; t++) {                                                             \
            float out[16];                                                                                \
            const int nr = N - 16 * t < 16 ? N - 16 * t : 16;                                             \
            const uint8_t *tile = tiles + t * tile_bytes;                                                 \
            for (int m = 0; m < M; m++) {                                                                 \
                const XBlocks *xb = &xbs[m];                                                              \
                DOT;                                                                                      \
                memcpy(y + (int64_t)m * N + 16 * t, out, sizeof(float) * nr);                             \
            }                                                                                             \
        }                                                                                                 \
    }

/* One q3h tile kernel (TILE) and its loop over tiles (NAME, DEFINE_TILE_LOOP), for a way to split pair
 * values into a = p / 11 and b = p % 11 (SPLIT(v, tables, &a, &b), bit 7 of v ignored): instantiated
 * twice, once with vpermi2b inside a VBMI target region and once without (q3h_split_bw), since a
 * function built for VBMI cannot be inlined into code that must run on CPUs without it. */
#define DEFINE_Q3H_TILES(NAME, TILE, SPLIT)                                                                           \
static inline __attribute__((always_inline)) void TILE(const uint8_t *tile, int nb, int group,                        \
                                                      const XBlocks *xb, float *out) {                                \
    const int bpg = group / 32;                                                                                       \
    const __m512i m4 = _mm512_set1_epi8(0x0F), m5 = _mm512_set1_epi8(0x1F), m6 = _mm512_set1_epi8(0x3F);              \
    const __m512i tables[4] = {_mm512_loadu_si512((const void *)Q3H_DIV),                                             \
                               _mm512_loadu_si512((const void *)(Q3H_DIV + 64)),                                      \
                               _mm512_loadu_si512((const void *)Q3H_MOD),                                             \
                               _mm512_loadu_si512((const void *)(Q3H_MOD + 64))};                                     \
    __m512 acc = _mm512_setzero_ps(), accm = _mm512_setzero_ps();                                                     \
    const uint8_t *p = tile;                                                                                          \
    /* group by group: its steps and mins converted once */                                                           \
    for (int b0 = 0; b0 < nb; b0 += bpg) {                                                                            \
        const uint8_t *head = p;                                                                                      \
        const __m512 step = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)head));                               \
        const __m512 mn = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(head + 32)));                          \
        p += 64;                                                                                                      \
        for (int b = b0; b < b0 + bpg; b++) {                                                                         \
            const int32_t *xw = xb->x3h + 8 * b;                                                                      \
            const __m512i c0 = _mm512_loadu_si512((const void *)p);                                                   \
            const __m512i c1 = _mm512_loadu_si512((const void *)(p + 64));                                            \
            const __m512i c2 = _mm512_loadu_si512((const void *)(p + 128));                                           \
            const __m256i e32 = _mm256_loadu_si256((const __m256i *)(p + 192));                                       \
            /* pass 3: positions 0..31 from the low nibbles, 32..63 from the high ones (bits 4..7 are                 \
             * garbage), then bit 7 of chunk f into bit 4 + f; 16-bit shifts: what crosses from the                   \
             * next byte lands in bits the selects drop */                                                            \
            __m512i v3 = _mm512_inserti64x4(_mm512_castsi256_si512(e32), _mm256_srli_epi16(e32, 4), 1);               \
            v3 = _mm512_ternarylogic_epi32(v3, _mm512_srli_epi16(c0, 3), m4, 0xE4);  /* m ? x : y */                  \
            v3 = _mm512_ternarylogic_epi32(v3, _mm512_srli_epi16(c1, 2), m5, 0xE4);                                   \
            v3 = _mm512_ternarylogic_epi32(v3, _mm512_srli_epi16(c2, 1), m6, 0xE4);                                   \
            const __m512i v[4] = {c0, c1, c2, v3};                                                                    \
            __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();                                         \
            for (int f = 0; f < 4; f++) {                                                                             \
                __m512i a, c;                                                                                         \
                SPLIT(v[f], tables, &a, &c);                                                                          \
                const __m512i xe = _mm512_set1_epi32(xw[f]), xo = _mm512_set1_epi32(xw[4 + f]);                       \
                if (f % 2) s1 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(s1, a, xe), c, xo);                           \
                else s0 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(s0, a, xe), c, xo);                                 \
            }                                                                                                         \
            const __m512 sum = _mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1));                                          \
            acc = _mm512_fmadd_ps(sum, _mm512_mul_ps(step, _mm512_set1_ps(xb->xd[b])), acc);                          \
            accm = _mm512_fmadd_ps(mn, _mm512_set1_ps(xb->xs[b]), accm);                                              \
            p += 224;                                                                                                 \
        }                                                                                                             \
    }                                                                                                                 \
    _mm512_storeu_ps(out, _mm512_add_ps(acc, accm));                                                                  \
}                                                                                                                     \
DEFINE_TILE_LOOP(NAME, (int64_t)(K / group) * (64 + (int64_t)(group / 32) * 224), TILE(tile, K / 32, group, xb, out))

/* a = p / 11 and b = p % 11 per byte in vpermi2b's two 128-entry tables (bits 0..6 of v index them) */
#pragma GCC push_options
#pragma GCC target("avx512vbmi")
static inline __attribute__((always_inline)) void q3h_split_vbmi(__m512i v, const __m512i *t, __m512i *a,
                                                                  __m512i *b) {
    *a = _mm512_permutex2var_epi8(t[0], v, t[1]);
    *b = _mm512_permutex2var_epi8(t[2], v, t[3]);
}
DEFINE_Q3H_TILES(tiles_tq3h_vbmi, tq3h_x16_tile_vbmi, q3h_split_vbmi)
#pragma GCC pop_options

/* The same without VBMI (Cascade Lake, Cooper Lake): a = (p * 373) >> 12 (exact for p <= 127) as the
 * high half of p * 5968 in 16-bit lanes, even and odd bytes apart, then b = p - 11 a bytewise (11 a
 * <= 110: no carry between the bytes of a 16-bit product). Nine instructions where vpermi2b takes
 * two. */
static inline __attribute__((always_inline)) void q3h_split_bw(__m512i v, const __m512i *t, __m512i *a,
                                                                __m512i *b) {
    (void)t;
    const __m512i p = _mm512_and_si512(v, _mm512_set1_epi8(0x7F)), k = _mm512_set1_epi16(5968);
    const __m512i even = _mm512_mulhi_epu16(_mm512_and_si512(p, _mm512_set1_epi16(0x00FF)), k);
    const __m512i odd = _mm512_mulhi_epu16(_mm512_srli_epi16(p, 8), k);
    *a = _mm512_or_si512(even, _mm512_slli_epi16(odd, 8));
    *b = _mm512_sub_epi8(p, _mm512_mullo_epi16(*a, _mm512_set1_epi16(11)));
}
DEFINE_Q3H_TILES(tiles_tq3h_bw, tq3h_x16_tile_bw, q3h_split_bw)

/* fmt Q4_0X16, Q6_KX16 or TQX16 (then `bits` 2..8 and `group`): tiles of 16 rows (the last padded),
 * through DEFINE_TILE_LOOP. One function per (format, bits), so that both are literals inside OpenMP's
 * outlined loop body (as DEFINE_RUN). */
static inline __attribute__((always_inline)) void tile_dot(int fmt, int bits, const uint8_t *tile, int K, int group,
                                                           const XBlocks *xb, float *out) {
    if (fmt == Q4_0X16) q4_0x16_tile(tile, K / 32, xb, out);
    else if (fmt == Q6_KX16) q6_kx16_tile(tile, K / 256, xb, out);
    else tq_x16_tile(bits, tile, K / 32, group, xb, out);
}

#define DEFINE_TILES(NAME, FMT, BITS)                                                                     \
    DEFINE_TILE_LOOP(NAME, FMT == Q4_0X16 ? 288 * (int64_t)(K / 32)                                       \
                           : FMT == Q6_KX16 ? 3360 * (int64_t)(K / 256)                                   \
                           : (int64_t)(K / group) * (64 + (int64_t)(group / 32) * 64 * BITS),             \
                     tile_dot(FMT, BITS, tile, K, group, xb, out))
DEFINE_TILES(tiles_q4_0, Q4_0X16, 0)
DEFINE_TILES(tiles_q6_k, Q6_KX16, 0)
DEFINE_TILES(tiles_tq8, TQX16, 8)
DEFINE_TILES(tiles_tq6, TQX16, 6)
DEFINE_TILES(tiles_tq5, TQX16, 5)
DEFINE_TILES(tiles_tq4, TQX16, 4)
DEFINE_TILES(tiles_tq3, TQX16, 3)
DEFINE_TILES(tiles_tq2, TQX16, 2)
#endif

typedef void (*run_fn)(const XBlocks *, int, const uint8_t *, const uint16_t *, const uint16_t *, int, float *, int,
                       int, int64_t, int64_t, int);
/* indexed by the format ids of the enum; GGUF types ignore steps, mins and group (their blocks hold them) */
static const run_fn RUNS[NUM_FORMATS] = {run_TQ8, run_TQ4, run_Q8_0, run_Q4_0, run_Q4_1, run_Q5_0, run_Q5_1, run_Q4_K,
                                         run_Q5_K, run_Q6_K, run_TQ3H, run_TQ6, run_TQ5, run_TQ3, run_TQ2,
                                         [Q2_K] = run_Q2_K, run_Q3_K, run_IQ4_NL, run_IQ4_XS};

#if AVX512_BUILD
/* Which q3h tile kernel runs: -1 (the default) the VBMI one where the CPU has it, 0 the other one
 * (what CPUs without VBMI run; the tests call this to check it here too). */
static int q3h_split_choice = -1;

void tierlm_quant_q3h_split(int choice) { q3h_split_choice = choice; }

static int q3h_vbmi(void) { return q3h_split_choice != 0 && __builtin_cpu_supports("avx512vbmi"); }
#endif

/* Whether the AVX2 build runs K-quants block by block against x rounded per 32 (1) instead of per
 * super-block (0, the default; the tests set 1 to check that path too). */
static int kquant_blocks32 = 0;

void tierlm_quant_kquant_blocks32(int on) { kquant_blocks32 = on; }

/* Returns 0, or -1 for an unknown format (the AVX2 build: row tiles too) or a shape the kernel does not take. */
int tierlm_quant_gemv(int fmt, const float *x, int M, int K, const uint8_t *codes, const uint16_t *steps,
                      const uint16_t *mins, int group, int64_t row_bytes, int64_t scale_stride, float *y, int N,
                      int num_threads) {
    if (fmt < 0 || fmt >= NUM_FORMATS || (!AVX512_BUILD && is_tile(fmt)) || K % 32 || M < 1 || (is_k_quant(fmt) && K % 256)
        || ((is_tq(fmt) || fmt == TQX16 || fmt == TQ3HX16) && (group < 32 || group % 32 || K % group))
        || (fmt == TQX16 && (row_bytes < 2 || row_bytes > 8 || row_bytes == 7)))
        return -1;
    if (fmt == F16 || fmt == BF16) {
        run_half(fmt == BF16, x, M, codes, y, N, K, row_bytes, num_threads);
        return 0;
    }
    if (fmt == Q4_KX8) return run_kx8(x, M, K, codes, y, N, num_threads);
    if (fmt >= Q6_KX8 && fmt <= Q2_KX8) return run_pair_tiles(fmt, x, M, K, codes, y, N, num_threads);
    if (fmt == IQ4_XSX8) return run_iq4_xsx8(x, M, K, codes, y, N, num_threads);
#if !AVX512_BUILD
    if (is_super_fmt(fmt) && !kquant_blocks32) return run_super(fmt, x, M, K, codes, row_bytes, y, N, num_threads);
#endif
    int nb = K / 32;
    /* steps/mins of row r start at r * G: K / group when stored on their own, larger when they sit
     * inside packed rows (codes, steps, mins per row: tierlm.quant.base.QuantizedWeight.packed_rows) */
    const int64_t G = scale_stride > 0 ? scale_stride : (group > 0 ? K / group : 0);
    XBlocks *xbs = malloc(sizeof(XBlocks) * M);
    int8_t *q = aligned_alloc(64, ((size_t)M * K + 63) / 64 * 64);
    float *f = malloc(sizeof(float) * 4 * (size_t)M * nb);
    int32_t *x3h = fmt == TQ3HX16 ? malloc(sizeof(int32_t) * 8 * (size_t)M * nb) : NULL;
    for (int m = 0; m < M; m++) {
        xbs[m] = (XBlocks){q + (int64_t)m * K, f + (4 * m) * nb, f + (4 * m + 1) * nb, f + (4 * m + 2) * nb,
                           x3h ? x3h + (int64_t)8 * m * nb : NULL};
        quantize_x(x + (int64_t)m * K, K, &xbs[m]);
#if AVX512_BUILD
        if (x3h) q3h_x(xbs[m].q, K, xbs[m].x3h);
#endif
    }
    if (fmt == Q4_0X8) run_q4_0x8(xbs, M, codes, y, N, K, num_threads);
    else if (fmt == Q8_0X8) run_q8_0x8(xbs, M, codes, y, N, K, num_threads);
    else
#if AVX512_BUILD
    /* Tiles: codes is the tiles; steps, mins and scale_stride unused; for TQX16, row_bytes is the bits
     * per code and group the weights per group. */
    if (fmt == Q4_0X16) tiles_q4_0(xbs, M, codes, group, y, N, K, num_threads);
    else if (fmt == Q6_KX16) tiles_q6_k(xbs, M, codes, group, y, N, K, num_threads);
    else if (fmt == TQ3HX16) (q3h_vbmi() ? tiles_tq3h_vbmi : tiles_tq3h_bw)(xbs, M, codes, group, y, N, K, num_threads);
    else if (fmt == TQX16) {
        switch (row_bytes) {
        case 8: tiles_tq8(xbs, M, codes, group, y, N, K, num_threads); break;
        case 6: tiles_tq6(xbs, M, codes, group, y, N, K, num_threads); break;
        case 5: tiles_tq5(xbs, M, codes, group, y, N, K, num_threads); break;
        case 4: tiles_tq4(xbs, M, codes, group, y, N, K, num_threads); break;
        case 3: tiles_tq3(xbs, M, codes, group, y, N, K, num_threads); break;
        default: tiles_tq2(xbs, M, codes, group, y, N, K, num_threads); break;
        }
    }
    else
#endif
        RUNS[fmt](xbs, M, codes, steps, mins, group, y, N, K, row_bytes, G, num_threads);
    free(x3h); free(f); free(q); free(xbs);
    return 0;
}

/* ---- dequantization (prompt chunks: a band of rows to float32 for a GEMM) ----------------------------
 * The GGUF block types to float32, equal bit for bit to the gguf package's numpy reference (which the
 * tests check): the same float32 operations in the same order, and no contraction into FMAs (which
 * would round once instead of twice). Plain C that the compiler vectorizes; a band of rows is a few
 * times a row's bytes of work, small against the GEMM that follows. */

__attribute__((optimize("fp-contract=off")))
static void dequant_row(int fmt, const uint8_t *p, int K, float *y) {
    switch (fmt) {
    case Q8_0: for (int b = 0; b < K / 32; b++, p += 34) { const float d = fp16(p);
                   for (int l = 0; l < 32; l++) y[32 * b + l] = (float)(int8_t)p[2 + l] * d; } break;
    case Q4_0: case Q4_1: case IQ4_NL: {
        const int sz = fmt == Q4_1 ? 20 : 18, at = fmt == Q4_1 ? 4 : 2;
        for (int b = 0; b < K / 32; b++, p += sz) {
            const float d = fp16(p), m = fmt == Q4_1 ? fp16(p + 2) : 0.f;
            for (int l = 0; l < 32; l++) {
                const int c = (p[at + (l & 15)] >> (l < 16 ? 0 : 4)) & 0xF;
                y[32 * b + l] = fmt == Q4_0 ? d * (float)(c - 8) : fmt == IQ4_NL ? d * (float)IQ4_KV[c] : d * (float)c + m;
            }
        }
        break;
    }
    case Q5_0: case Q5_1: {
        const int sz = fmt == Q5_1 ? 24 : 22, at = fmt == Q5_1 ? 4 : 2;
        for (int b = 0; b < K / 32; b++, p += sz) {
            const float d = fp16(p), m = fmt == Q5_1 ? fp16(p + 2) : 0.f;
            uint32_t h;
            memcpy(&h, p + at, 4);
            for (int l = 0; l < 32; l++) {
                const int c = ((p[at + 4 + (l & 15)] >> (l < 16 ? 0 : 4)) & 0xF) | (((h >> l) & 1) << 4);
                y[32 * b + l] = fmt == Q5_0 ? d * (float)(c - 16) : d * (float)c + m;
            }
        }
        break;
    }
    case Q2_K: for (int s = 0; s < K / 256; s++, p += 84, y += 256) {
        const float d = fp16(p + 80), dmin = fp16(p + 82);
        for (int i = 0; i < 16; i++) {  /* 16 weights a scale: bits 2(i/2 % 4).. of bytes 32(i/8) + 16(i%2).. */
            const float dl = d * (float)(p[i] & 0xF), ml = dmin * (float)(p[i] >> 4);
            const uint8_t *q = p + 16 + 32 * (i >> 3) + 16 * (i & 1);
            for (int l = 0; l < 16; l++) y[16 * i + l] = dl * (float)((q[l] >> (2 * ((i >> 1) & 3))) & 3) - ml;
        }
    } break;
    case Q3_K: for (int s = 0; s < K / 256; s++, p += 110, y += 256) {
        const float d = fp16(p + 108);
        for (int i = 0; i < 16; i++) {
            const float dl = d * (float)q3k_scale(p + 96, i);
            const int j = i >> 1;  /* the 32-weight block */
            const uint8_t *q = p + 32 + 32 * (j >> 2) + 16 * (i & 1), *hm = p + 16 * (i & 1);
            for (int l = 0; l < 16; l++) {
                const int c = ((q[l] >> (2 * (j & 3))) & 3) - (((hm[l] >> j) & 1) ? 0 : 4);
                y[16 * i + l] = dl * (float)c;
            }
        }
    } break;
    case Q4_K: case Q5_K: {
        const int sz = fmt == Q4_K ? 144 : 176, at = fmt == Q4_K ? 16 : 48;
        for (int s = 0; s < K / 256; s++, p += sz, y += 256) {
            const float d = fp16(p), dmin = fp16(p + 2);
            for (int j = 0; j < 8; j++) {
                int sc, m;
                scale_min_k4(j, p + 4, &sc, &m);
                const float dl = d * (float)sc, ml = dmin * (float)m;
                const uint8_t *q = p + at + 32 * (j >> 1);
                for (int l = 0; l < 32; l++) {
                    int c = (q[l] >> (4 * (j & 1))) & 0xF;
                    if (fmt == Q5_K) c |= ((p[16 + l] >> j) & 1) << 4;
                    y[32 * j + l] = dl * (float)c - ml;
                }
            }
        }
        break;
    }
    case Q6_K: for (int s = 0; s < K / 256; s++, p += 210, y += 256) {
        const float d = fp16(p + 208);
        for (int i = 0; i < 16; i++) {  /* block j = i/2 is block k = j%4 of half n = j/4 (see decode) */
            const int j = i >> 1, n = j >> 2, k = j & 3;
            const float dl = d * (float)((const int8_t *)(p + 192))[i];
            const uint8_t *ql = p + 64 * n + 32 * (k & 1) + 16 * (i & 1), *qh = p + 128 + 32 * n + 16 * (i & 1);
            for (int l = 0; l < 16; l++) {
                const int c = (((ql[l] >> (4 * (k >> 1))) & 0xF) | (((qh[l] >> (2 * k)) & 3) << 4)) - 32;
                y[16 * i + l] = dl * (float)c;
            }
        }
    } break;
    case IQ4_XS: for (int s = 0; s < K / 256; s++, p += 136, y += 256) {
        const float d = fp16(p);
        uint16_t sh;
        memcpy(&sh, p + 2, 2);
        for (int j = 0; j < 8; j++) {
            const int ls = ((p[4 + j / 2] >> (4 * (j & 1))) & 0xF) | (((sh >> (2 * j)) & 3) << 4);
            const float dl = d * (float)(ls - 32);
            for (int l = 0; l < 32; l++) y[32 * j + l] = dl * (float)IQ4_KV[(p[8 + 16 * j + (l & 15)] >> (l < 16 ? 0 : 4)) & 0xF];
        }
    } break;
    case F16: for (int k = 0; k < K; k++) y[k] = fp16(p + 2 * k); break;
    default: /* BF16 */ for (int k = 0; k < K; k++) { uint32_t u = (uint32_t)(p[2 * k] | p[2 * k + 1] << 8) << 16; memcpy(y + k, &u, 4); } break;
    }
}

/* out (N x K, fp32) = the N rows of W (row n at codes + n * row_bytes) dequantized. Returns 0, or -1 for
 * a format that is not a GGUF block type (tierlm's own formats dequantize in torch) or a shape it does
 * not take. */
int tierlm_quant_dequant(int fmt, const uint8_t *codes, int64_t row_bytes, int N, int K, float *out, int num_threads) {
    if (fmt >= Q4_KX8 && fmt <= Q8_0X8) {  /* N tiles of 8 rows (row_bytes: bytes per tile) -> 8N rows */
        if (K % (fmt == Q4_0X8 || fmt == Q8_0X8 ? 32 : 256) || N < 0) return -1;
        #pragma omp parallel for schedule(static) num_threads(num_threads)
        for (int t = 0; t < N; t++) {
            const uint8_t *tile = codes + (int64_t)t * row_bytes;
            float *rows = out + (int64_t)t * KX8_ROWS * K;
            if (fmt == Q4_KX8) dequant_kx8(tile, K, rows);
            else if (fmt == Q4_0X8) dequant_q4_0x8(tile, K, rows);
            else if (fmt == Q6_KX8 || fmt == Q5_KX8) dequant_k6x8(fmt == Q5_KX8, tile, K, rows);
            else if (fmt == IQ4_XSX8) dequant_iq4_xsx8(tile, K, rows);
            else if (fmt == Q8_0X8) dequant_q8_0x8(tile, K, rows);
            else dequant_klow(fmt == Q2_KX8, tile, K, rows);
        }
        return 0;
    }
    const int gguf = (fmt >= Q8_0 && fmt <= Q6_K) || (fmt >= Q2_K && fmt <= BF16);
    if (!gguf || K % 32 || N < 0 || (is_k_quant(fmt) && K % 256)) return -1;
    #pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int n = 0; n < N; n++) dequant_row(fmt, codes + (int64_t)n * row_bytes, K, out + (int64_t)n * K);
    return 0;
}
