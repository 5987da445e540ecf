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
#define FA_RAND(key, i0, j)                                                               \
    FA_MIX32(FA_MIX32(((uint32_t)(i0) + (uint32_t)(j)) ^ (key)[0])                        \
             + ((uint32_t)((uint64_t)(i0) >> 32) ^ (key)[1]))

/* ---- bfloat16 --------------------------------------------------------------------- */
static void FA_CAT(fa_load_bf16, FA_SUFFIX)(const void *src, size_t i0, size_t n,
                                            float *FA_RESTRICT dst, const float *absmax)
{
    const uint16_t *FA_RESTRICT s = (const uint16_t *)src + i0;
    uint32_t *FA_RESTRICT d = (uint32_t *)dst;
    (void)absmax;
    for (size_t j = 0; j < n; j++) d[j] = (uint32_t)s[j] << 16;
}

/* nearest even: (u + 0x7fff + lsb) >> 16; stochastic: (u + (r >> 16)) >> 16; NaN: quiet. */
static void FA_CAT(fa_store_bf16, FA_SUFFIX)(const float *src, void *dst, size_t i0, size_t n,
                                             float *absmax, const uint32_t *key)
{
    const uint32_t *FA_RESTRICT s = (const uint32_t *)src;
    uint16_t *FA_RESTRICT d = (uint16_t *)dst + i0;
    (void)absmax;
    if (key) {
        const uint32_t k[2] = {key[0], key[1]};
        for (size_t j = 0; j < n; j++) {
            const uint32_t u = s[j];
            const uint32_t r = (u + (FA_RAND(k, i0, j) >> 16)) >> 16;
            d[j] = (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? (u >> 16) | 0x40u : r);
        }
    } else {
        for (size_t j = 0; j < n; j++) {
            const uint32_t u = s[j];
            const uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
            d[j] = (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? (u >> 16) | 0x40u : r);
        }
    }
}

/* ---- IEEE float16 (software: no F16C, the same bits on every path) ---------------- */
static void FA_CAT(fa_load_f16, FA_SUFFIX)(const void *src, size_t i0, size_t n,
                                           float *FA_RESTRICT dst, const float *absmax)
{
    const uint16_t *FA_RESTRICT s = (const uint16_t *)src + i0;
    (void)absmax;
    for (size_t j = 0; j < n; j++) {
        const uint32_t h = s[j], sign = (h & 0x8000u) << 16, e = (h >> 10) & 0x1fu,
                       m = h & 0x3ffu;
        uint32_t bits = sign | ((e + 112u) << 23) | (m << 13);     /* normal */
        if (e == 31u) bits = sign | 0x7f800000u | (m << 13);        /* inf, NaN */
        float sub = (float)(int32_t)m * 0x1p-24f;                   /* subnormal, exact */
        uint32_t sb;
        memcpy(&sb, &sub, 4);
        if (e == 0u) bits = sign | sb;
        memcpy(&dst[j], &bits, 4);
    }
}

/* rand: NULL for nearest even; else the element's 32 random bits. */
FA_INLINE uint32_t FA_CAT(fa_f16_bits, FA_SUFFIX)(uint32_t u, int stochastic, uint32_t rand)
{
    const uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    const uint32_t inc_n = stochastic ? rand >> 19 : 0xfffu + ((a >> 13) & 1u);
    uint32_t normal = (a - 0x38000000u + inc_n) >> 13;
    normal = normal < 0x7c00u ? normal : 0x7c00u;
    const int32_t e = (int32_t)(a >> 23);
    const int32_t sh0 = 126 - e;
    const uint32_t shift = (uint32_t)(sh0 < 14 ? 14 : (sh0 > 31 ? 31 : sh0));
    const uint32_t m = (a & 0x7fffffu) | 0x800000u;
    const uint32_t inc_s = stochastic ? rand >> (32u - shift)
                                      : (1u << (shift - 1u)) - 1u + ((m >> shift) & 1u);
    uint32_t sub = (m + inc_s) >> shift;
    if (sh0 > 31) sub = 0;
    uint32_t out = a >= 0x38800000u ? normal : sub;
    if (a >= 0x47800000u) out = 0x7c00u;
    if (a > 0x7f800000u) out = 0x7e00u;
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
        for (size_t j = 0; j < n; j++)
            d[j] = (uint16_t)FA_CAT(fa_f16_bits, FA_SUFFIX)(s[j], 0, 0);
    }
}

/* ---- 8-bit blockwise (bitsandbytes' dynamic maps) ----------------------------------
 * value = map[code] * absmax of its block of 256. */
static void FA_CAT(fa_load_q8, FA_SUFFIX)(const float *map, const void *src, size_t i0,
                                          size_t n, float *FA_RESTRICT dst, const float *absmax)
{
    const uint8_t *FA_RESTRICT s = (const uint8_t *)src + i0;
    for (size_t b = 0; b < n; b += FA_Q8_BLOCK) {
        const float scale = absmax[(i0 + b) / FA_Q8_BLOCK];
        const size_t e = n - b < FA_Q8_BLOCK ? n - b : FA_Q8_BLOCK;
        for (size_t j = 0; j < e; j++) dst[b + j] = map[s[b + j]] * scale;
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

/* Per block: absmax = max |x| (NaN if any x is NaN), q = x / (absmax == 0 ? 1 : absmax),
 * code = the number of thresholds (midpoints of consecutive codes) below q, found with
 * one lookup in a table over q's bit pattern (dispatch.h: fa_q8_count) and one compare;
 * NaN q: code 0. */
static void FA_CAT(fa_store_q8, FA_SUFFIX)(int is_signed, const float *src, void *dst,
                                           size_t i0, size_t n, float *absmax)
{
    uint8_t *FA_RESTRICT d = (uint8_t *)dst + i0;
    const uint32_t *FA_RESTRICT pos = fa_q8_buckets[is_signed ? 0 : 2];
    const uint32_t *FA_RESTRICT neg = fa_q8_buckets[1];
    const uint32_t zero = is_signed ? fa_q8_zero_index : 0u;
    for (size_t b = 0; b < n; b += FA_Q8_BLOCK) {
        const size_t e = n - b < FA_Q8_BLOCK ? n - b : FA_Q8_BLOCK;
        const float *FA_RESTRICT x = src + b;
        float m = 0.0f;
        int nan = 0;
        for (size_t j = 0; j < e; j++) {
            const float ax = fabsf(x[j]);
            m = ax > m ? ax : m;
            nan |= x[j] != x[j];
        }
        if (nan) m = NAN;
        absmax[(i0 + b) / FA_Q8_BLOCK] = m;
        const float div = m == 0.0f ? 1.0f : m;
        for (size_t j = 0; j < e; j++) {
            const float q = x[j] / div;
            uint32_t u;
            memcpy(&u, &q, 4);
            const uint32_t a = u & 0x7fffffffu;
            uint32_t bk = a >> 16;
            bk = bk < FA_Q8_BUCKET_LO ? FA_Q8_BUCKET_LO : (bk > FA_Q8_BUCKET_HI ? FA_Q8_BUCKET_HI : bk);
            bk -= FA_Q8_BUCKET_LO;
            const int negative = (u >> 31) != 0;
            const uint32_t t = negative ? neg[bk] : pos[bk];
            const uint32_t c = (t >> 16) + ((a & 0xffffu) > (t & 0xffffu) ? 1u : 0u);
            uint32_t code = negative ? (is_signed ? zero - c : 0u) : zero + c;
            if (q != q) code = 0u;
            d[b + j] = (uint8_t)code;
        }
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
