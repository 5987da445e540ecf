/* formats.h -- storage formats for one instruction set: widening 16-bit and 8-bit streams
 * to float32 tiles, and storing float32 tiles back (rounded to 16 bits, nearest-even or
 * stochastic, or re-quantized to 8 bits). Included by kernel.h, so every path compiles
 * the same code with its own flags; every operation is an integer operation or a
 * correctly rounded float one, so every path gives the same bits.
 * fastadam/reference/formats.py is the same sequence in NumPy (the specification).
 *
 * A stream of a block is loaded for elements [i0, i0 + n) of its tensor into a float32
 * tile, and stored from one. i0 is the tensor-local index (8-bit: a multiple of
 * FA_Q8_BLOCK; the engine never splits a block of 256 between threads or tiles). */

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

/* ---- random bits of stochastic rounding (reference: random_bits) ------------------ */
FA_INLINE uint32_t FA_CAT(fa_mix32, FA_SUFFIX)(uint32_t x)
{
    x ^= x >> 16;
    x *= 0x85EBCA6Bu;
    x ^= x >> 13;
    x *= 0xC2B2AE35u;
    x ^= x >> 16;
    return x;
}
#define FA_MIX32 FA_CAT(fa_mix32, FA_SUFFIX)
/* key[0], key[1]: the low and high halves of the stream key; the tile never crosses a
 * multiple of 2**32, so the element index's high half is one value for the tile. */
#define FA_RAND(key, i0, j)                                          \
    FA_MIX32(FA_MIX32(((uint32_t)(i0) + (uint32_t)(j)) ^ (key)[0]) + \
             ((uint32_t)((uint64_t)(i0) >> 32) ^ (key)[1]))

/* ---- bfloat16 --------------------------------------------------------------------- */
FA_INLINE float FA_CAT(fa_bf16_f32, FA_SUFFIX)(uint16_t h)
{
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
/* Nearest-even: u + 0x7fff + lsb, cut to the top half; stochastic: u + (rand >> 16),
 * cut. A NaN keeps its top half with the quiet bit set. (The select on 32 bits before the
 * one narrowing keeps the compiler's vector code short.) */
FA_INLINE uint16_t FA_CAT(fa_bf16_rne, FA_SUFFIX)(float x)
{
    uint32_t u;
    memcpy(&u, &x, 4);
    uint32_t r = u + 0x7fffu + ((u >> 16) & 1u);
    r = x != x ? u | 0x400000u : r;
    return (uint16_t)(r >> 16);
}
FA_INLINE uint16_t FA_CAT(fa_bf16_sr, FA_SUFFIX)(float x, uint32_t rand)
{
    uint32_t u;
    memcpy(&u, &x, 4);
    uint32_t r = u + (rand >> 16);
    r = x != x ? u | 0x400000u : r;
    return (uint16_t)(r >> 16);
}

static void FA_CAT(fa_load_bf16, FA_SUFFIX)(const void *src, size_t i0, size_t n,
                                            float *FA_RESTRICT dst, const float *absmax)
{
    const uint16_t *FA_RESTRICT s = (const uint16_t *)src + i0;
    uint32_t *FA_RESTRICT d = (uint32_t *)dst;
    (void)absmax;
    for (size_t j = 0; j < n; j++) d[j] = (uint32_t)s[j] << 16;
}

static void FA_CAT(fa_store_bf16, FA_SUFFIX)(const float *src, void *dst, size_t i0, size_t n,
                                             float *absmax, const uint32_t *key)
{
    const float *FA_RESTRICT s = src;
    uint16_t *FA_RESTRICT d = (uint16_t *)dst + i0;
    (void)absmax;
    if (key) {
        const uint32_t k[2] = {key[0], key[1]};
        for (size_t j = 0; j < n; j++)
            d[j] = FA_CAT(fa_bf16_sr, FA_SUFFIX)(s[j], FA_RAND(k, i0, j));
    } else {
        for (size_t j = 0; j < n; j++) d[j] = FA_CAT(fa_bf16_rne, FA_SUFFIX)(s[j]);
    }
}

/* ---- IEEE float16 (software: no F16C, the same bits on every path) ----------------
 * Written with selects only (FA_SEL), which compilers if-convert and vectorize. */
FA_INLINE uint32_t FA_CAT(fa_sel, FA_SUFFIX)(uint32_t c, uint32_t a, uint32_t b)
{
    const uint32_t m = 0u - c;
    return (a & m) | (b & ~m);
}
#define FA_SEL FA_CAT(fa_sel, FA_SUFFIX)

static void FA_CAT(fa_load_f16, FA_SUFFIX)(const void *src, size_t i0, size_t n,
                                           float *FA_RESTRICT dst, const float *absmax)
{
    const uint16_t *FA_RESTRICT s = (const uint16_t *)src + i0;
    uint32_t *FA_RESTRICT d = (uint32_t *)dst;
    (void)absmax;
    for (size_t j = 0; j < n; j++) {
        const uint32_t h = s[j], sign = (h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
        const float sub = (float)(int32_t)m * 0x1p-24f; /* subnormal: exact */
        uint32_t sb;
        memcpy(&sb, &sub, 4);
        uint32_t bits = sign | ((e + 112u) << 23) | (m << 13);         /* normal */
        bits = FA_SEL(e == 31u, sign | 0x7f800000u | (m << 13), bits); /* inf, NaN */
        bits = FA_SEL(e == 0u, sign | sb, bits);
        d[j] = bits;
    }
}

/* float32 bits -> float16 bits: nearest even, or stochastic with 32 random bits. */
FA_INLINE uint32_t FA_CAT(fa_f16_bits, FA_SUFFIX)(uint32_t u, int stochastic, uint32_t rand)
{
    const uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    /* normal float16 range: rebias the exponent (127 - 15 = 112), drop 13 bits */
    const uint32_t inc_n = stochastic ? rand >> 19 : 0xfffu + ((a >> 13) & 1u);
    uint32_t normal = (a - 0x38000000u + inc_n) >> 13;
    normal = FA_SEL(normal < 0x7c00u, normal, 0x7c00u);
    /* subnormal range: value / 2**-24 = m * 2**(e - 126); shift = 126 - e, in [14, 31] */
    const uint32_t e = a >> 23;
    const uint32_t shift = 126u - FA_SEL(e > 112u, 112u, FA_SEL(e < 95u, 95u, e));
    const uint32_t m = (a & 0x7fffffu) | 0x800000u;
    const uint32_t inc_s =
        stochastic ? rand >> (32u - shift) : (1u << (shift - 1u)) - 1u + ((m >> shift) & 1u);
    const uint32_t sub = FA_SEL(e < 95u, 0u, (m + inc_s) >> shift); /* below 2**-32: 0 */
    uint32_t out = FA_SEL(a >= 0x38800000u, normal, sub);
    out = FA_SEL(a >= 0x47800000u, 0x7c00u, out); /* >= 65536 and inf */
    out = FA_SEL(a > 0x7f800000u, 0x7e00u, out);  /* NaN */
    return out | sign;
}

static void FA_CAT(fa_store_f16, FA_SUFFIX)(const float *src, void *dst, size_t i0, size_t n,
                                            float *absmax, const uint32_t *key)
{
    const uint32_t *FA_RESTRICT s = (const uint32_t *)src;
    uint16_t *FA_RESTRICT d = (uint16_t *)dst + i0;
    (void)absmax;
    if (key) {
        const uint32_t k[2] = {key[0], key[1]};
        for (size_t j = 0; j < n; j++)
            d[j] = (uint16_t)FA_CAT(fa_f16_bits, FA_SUFFIX)(s[j], 1, FA_RAND(k, i0, j));
    } else {
        for (size_t j = 0; j < n; j++) d[j] = (uint16_t)FA_CAT(fa_f16_bits, FA_SUFFIX)(s[j], 0, 0);
    }
}

/* ---- 8-bit blockwise (bitsandbytes' dynamic maps) ----------------------------------
 * value = map[code] * absmax of its block of 256. */
static void FA_CAT(fa_load_q8, FA_SUFFIX)(const float *FA_RESTRICT map, const void *src, size_t i0,
                                          size_t n, float *FA_RESTRICT dst, const float *absmax)
{
    const uint8_t *FA_RESTRICT s = (const uint8_t *)src + i0;
    for (size_t b = 0; b < n; b += FA_Q8_BLOCK) {
        const float scale = absmax[(i0 + b) / FA_Q8_BLOCK];
        const size_t e = n - b < FA_Q8_BLOCK ? n - b : FA_Q8_BLOCK;
        const uint8_t *FA_RESTRICT c = s + b;
        float *FA_RESTRICT d = dst + b;
        size_t j = 0;
        /* compilers do not emit gathers for this loop: written out where the ISA has them */
#if defined(__AVX512F__)
        /* Zen 4's gathers fetch about one element a cycle: the 256 codes sit in 16
         * registers instead, and 8 two-register permutes plus 7 blends pick one. */
        const __m512 vs = _mm512_set1_ps(scale);
        __m512 t[16];
        for (int r = 0; r < 16; r++) t[r] = _mm512_loadu_ps(map + 16 * r);
        const __m512i b5 = _mm512_set1_epi32(32), b6 = _mm512_set1_epi32(64),
                      b7 = _mm512_set1_epi32(128);
        for (; j + 16 <= e; j += 16) {
            const __m512i k = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(c + j)));
            const __mmask16 m5 = _mm512_test_epi32_mask(k, b5), m6 = _mm512_test_epi32_mask(k, b6),
                            m7 = _mm512_test_epi32_mask(k, b7);
            __m512 r0 = _mm512_permutex2var_ps(t[0], k, t[1]);
            __m512 r1 = _mm512_permutex2var_ps(t[2], k, t[3]);
            __m512 r2 = _mm512_permutex2var_ps(t[4], k, t[5]);
            __m512 r3 = _mm512_permutex2var_ps(t[6], k, t[7]);
            __m512 r4 = _mm512_permutex2var_ps(t[8], k, t[9]);
            __m512 r5 = _mm512_permutex2var_ps(t[10], k, t[11]);
            __m512 r6 = _mm512_permutex2var_ps(t[12], k, t[13]);
            __m512 r7 = _mm512_permutex2var_ps(t[14], k, t[15]);
            r0 = _mm512_mask_blend_ps(m5, r0, r1);
            r2 = _mm512_mask_blend_ps(m5, r2, r3);
            r4 = _mm512_mask_blend_ps(m5, r4, r5);
            r6 = _mm512_mask_blend_ps(m5, r6, r7);
            r0 = _mm512_mask_blend_ps(m6, r0, r2);
            r4 = _mm512_mask_blend_ps(m6, r4, r6);
            r0 = _mm512_mask_blend_ps(m7, r0, r4);
            _mm512_storeu_ps(d + j, _mm512_mul_ps(r0, vs));
        }
#elif defined(__AVX2__)
        const __m256 vs = _mm256_set1_ps(scale);
        for (; j + 8 <= e; j += 8) {
            const __m256i k = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(c + j)));
            _mm256_storeu_ps(d + j, _mm256_mul_ps(_mm256_i32gather_ps(map, k, 4), vs));
        }
#endif
        for (; j < e; j++) {
            const uint32_t k = c[j];
            d[j] = map[k] * scale;
        }
    }
}
static void FA_CAT(fa_load_q8s, FA_SUFFIX)(const void *src, size_t i0, size_t n, float *dst,
                                           const float *absmax)
{
    FA_CAT(fa_load_q8, FA_SUFFIX)(fa_q8_maps[0], src, i0, n, dst, absmax);
}
static void FA_CAT(fa_load_q8u, FA_SUFFIX)(const void *src, size_t i0, size_t n, float *dst,
                                           const float *absmax)
{
    FA_CAT(fa_load_q8, FA_SUFFIX)(fa_q8_maps[1], src, i0, n, dst, absmax);
}

/* The block maximum of |x|, on bit patterns: non-negative floats order as integers, and
 * a NaN's magnitude is above inf's, so a NaN wins (stored as the quiet NaN 0x7fc00000). */
FA_INLINE float FA_CAT(fa_absmax, FA_SUFFIX)(const float *src, size_t n)
{
    const uint32_t *FA_RESTRICT x = (const uint32_t *)src;
    uint32_t m = 0;
    for (size_t j = 0; j < n; j++) {
        const uint32_t a = x[j] & 0x7fffffffu;
        m = a > m ? a : m;
    }
    if (m > 0x7f800000u) m = 0x7fc00000u;
    float f;
    memcpy(&f, &m, 4);
    return f;
}

/* Per block: absmax = max |x| (NaN if any x is NaN), q = x / (absmax == 0 ? 1 : absmax),
 * code = the number of thresholds (midpoints of consecutive codes) below q, found with
 * one lookup in a table over q's bit pattern (dispatch.h: fa_q8_buckets) and one
 * compare; NaN q: code 0. table: the signed map's (positive half, then negative half) or
 * the unsigned map's; zero: the index of the code 0.0. */
FA_INLINE void FA_CAT(fa_quantize, FA_SUFFIX)(const uint32_t *FA_RESTRICT table, uint32_t zero,
                                              uint32_t neg_offset, uint32_t min_code,
                                              const float *FA_RESTRICT x, uint8_t *FA_RESTRICT d,
                                              size_t n, float div)
{
    size_t j = 0;
    /* the same operations on 16 (8) lanes, with the table lookup as a gather */
#if defined(__AVX512F__)
    {
        const __m512 vdiv = _mm512_set1_ps(div);
        const __m512i lo = _mm512_set1_epi32((int)FA_Q8_BUCKET_LO);
        const __m512i hi = _mm512_set1_epi32((int)FA_Q8_BUCKET_HI);
        const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff), low16 = _mm512_set1_epi32(0xffff);
        const __m512i vneg_offset = _mm512_set1_epi32((int)neg_offset);
        const __m512i vzero = _mm512_set1_epi32((int)zero), one = _mm512_set1_epi32(1);
        const __m512i nil = _mm512_setzero_si512(), vmin = _mm512_set1_epi32((int)min_code);
        for (; j + 16 <= n; j += 16) {
            const __m512 q = _mm512_div_ps(_mm512_loadu_ps(x + j), vdiv);
            const __m512i u = _mm512_castps_si512(q);
            const __m512i a = _mm512_and_si512(u, abs_mask);
            const __mmask16 negative = _mm512_cmpneq_epi32_mask(_mm512_srli_epi32(u, 31), nil);
            __m512i bk = _mm512_min_epu32(_mm512_max_epu32(_mm512_srli_epi32(a, 16), lo), hi);
            bk = _mm512_sub_epi32(bk, lo);
            bk = _mm512_mask_add_epi32(bk, negative, bk, vneg_offset);
            const __m512i t = _mm512_i32gather_epi32(bk, (const void *)table, 4);
            const __mmask16 above =
                _mm512_cmpgt_epu32_mask(_mm512_and_si512(a, low16), _mm512_and_si512(t, low16));
            __m512i c = _mm512_srli_epi32(t, 16);
            c = _mm512_mask_add_epi32(c, above, c, one);
            const __m512i pos = _mm512_add_epi32(vzero, c);
            const __m512i neg = _mm512_max_epi32(_mm512_sub_epi32(vzero, c), nil);
            __m512i code = _mm512_mask_blend_epi32(negative, pos, neg);
            code = _mm512_mask_max_epu32(
                code, _mm512_cmp_ps_mask(q, _mm512_setzero_ps(), _CMP_GT_OQ), code, vmin);
            code = _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(q, q, _CMP_ORD_Q), code);
            _mm_storeu_si128((__m128i *)(d + j), _mm512_cvtepi32_epi8(code));
        }
    }
#elif defined(__AVX2__)
    {
        const __m256 vdiv = _mm256_set1_ps(div);
        const __m256i lo = _mm256_set1_epi32((int)FA_Q8_BUCKET_LO);
        const __m256i hi = _mm256_set1_epi32((int)FA_Q8_BUCKET_HI);
        const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff), low16 = _mm256_set1_epi32(0xffff);
        const __m256i vneg_offset = _mm256_set1_epi32((int)neg_offset);
        const __m256i vzero = _mm256_set1_epi32((int)zero), one = _mm256_set1_epi32(1);
        const __m256i nil = _mm256_setzero_si256(), vmin = _mm256_set1_epi32((int)min_code);
        uint32_t codes[8];
        for (; j + 8 <= n; j += 8) {
            const __m256 q = _mm256_div_ps(_mm256_loadu_ps(x + j), vdiv);
            const __m256i u = _mm256_castps_si256(q);
            const __m256i a = _mm256_and_si256(u, abs_mask);
            const __m256i negative = _mm256_srai_epi32(u, 31); /* all ones where q < 0 */
            __m256i bk = _mm256_min_epu32(_mm256_max_epu32(_mm256_srli_epi32(a, 16), lo), hi);
            bk = _mm256_sub_epi32(bk, lo);
            bk = _mm256_add_epi32(bk, _mm256_and_si256(negative, vneg_offset));
            const __m256i t = _mm256_i32gather_epi32((const int *)table, bk, 4);
            /* both sides are below 2**16: the signed compare is the unsigned one */
            const __m256i above =
                _mm256_cmpgt_epi32(_mm256_and_si256(a, low16), _mm256_and_si256(t, low16));
            const __m256i c =
                _mm256_add_epi32(_mm256_srli_epi32(t, 16), _mm256_and_si256(above, one));
            const __m256i pos = _mm256_add_epi32(vzero, c);
            const __m256i neg = _mm256_max_epi32(_mm256_sub_epi32(vzero, c), nil);
            __m256i code = _mm256_blendv_epi8(pos, neg, negative);
            const __m256i positive =
                _mm256_castps_si256(_mm256_cmp_ps(q, _mm256_setzero_ps(), _CMP_GT_OQ));
            code = _mm256_max_epu32(code, _mm256_and_si256(positive, vmin));
            code = _mm256_and_si256(code, _mm256_castps_si256(_mm256_cmp_ps(q, q, _CMP_ORD_Q)));
            _mm256_storeu_si256((__m256i *)codes, code);
            for (int k = 0; k < 8; k++) d[j + k] = (uint8_t)codes[k];
        }
    }
#endif
    for (; j < n; j++) {
        const float q = x[j] / div;
        uint32_t u;
        memcpy(&u, &q, 4);
        const uint32_t a = u & 0x7fffffffu, negative = u >> 31;
        uint32_t bk = a >> 16;
        bk = bk < FA_Q8_BUCKET_LO ? FA_Q8_BUCKET_LO : (bk > FA_Q8_BUCKET_HI ? FA_Q8_BUCKET_HI : bk);
        bk = bk - FA_Q8_BUCKET_LO + negative * neg_offset;
        const uint32_t t = table[bk];
        const uint32_t c = (t >> 16) + ((a & 0xffffu) > (t & 0xffffu) ? 1u : 0u);
        uint32_t code = negative ? (zero >= c ? zero - c : 0u) : zero + c;
        code = q > 0.0f && code < min_code ? min_code : code;
        code = q != q ? 0u : code;
        d[j] = (uint8_t)code;
    }
}

static void FA_CAT(fa_store_q8, FA_SUFFIX)(int is_signed, const float *src, void *dst, size_t i0,
                                           size_t n, float *absmax)
{
    uint8_t *FA_RESTRICT d = (uint8_t *)dst + i0;
    /* signed: positive half at 0, negative half right after; unsigned: a negative q
     * (only -0.0 can occur) reads the unsigned table's bucket 0, count 0: code 0 */
    const uint32_t *table = fa_q8_buckets + (is_signed ? 0u : 2u * FA_Q8_NBUCKETS);
    const uint32_t neg_offset = is_signed ? FA_Q8_NBUCKETS : 0u;
    const uint32_t zero = is_signed ? fa_q8_zero_index : 0u;
    const uint32_t min_code = is_signed ? 0u : 1u; /* a positive denominator never stores as 0 */
    for (size_t b = 0; b < n; b += FA_Q8_BLOCK) {
        const size_t e = n - b < FA_Q8_BLOCK ? n - b : FA_Q8_BLOCK;
        const float m = FA_CAT(fa_absmax, FA_SUFFIX)(src + b, e);
        absmax[(i0 + b) / FA_Q8_BLOCK] = m;
        FA_CAT(fa_quantize, FA_SUFFIX)(table, zero, neg_offset, min_code, src + b, d + b, e,
                                       m == 0.0f ? 1.0f : m);
    }
}
static void FA_CAT(fa_store_q8s, FA_SUFFIX)(const float *src, void *dst, size_t i0, size_t n,
                                            float *absmax, const uint32_t *key)
{
    (void)key;
    FA_CAT(fa_store_q8, FA_SUFFIX)(1, src, dst, i0, n, absmax);
}
static void FA_CAT(fa_store_q8u, FA_SUFFIX)(const float *src, void *dst, size_t i0, size_t n,
                                            float *absmax, const uint32_t *key)
{
    (void)key;
    FA_CAT(fa_store_q8, FA_SUFFIX)(0, src, dst, i0, n, absmax);
}

/* ---- gradient statistics of 16-bit gradients (widened exactly) -------------------- */
FA_INLINE double FA_CAT(fa_bf16_to_double, FA_SUFFIX)(uint16_t h)
{
    const uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return (double)f;
}
FA_INLINE double FA_CAT(fa_f16_to_double, FA_SUFFIX)(uint16_t h)
{
    float f;
    FA_CAT(fa_load_f16, FA_SUFFIX)(&h, 0, 1, &f, 0);
    return (double)f;
}
