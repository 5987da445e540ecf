/* formats.c -- the host side of the storage formats: the key of stochastic rounding's
 * random bits, and the 8-bit quantization tables (built once by fa_init from the maps).
 * Built with baseline flags only; the per-element code is formats.h. */
#include "fastadam.h"
#include "dispatch.h"
#include "formats/q8_maps.h"

#include <string.h>

static uint64_t splitmix64(uint64_t x)
{
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

uint64_t fa_rng_base(uint64_t seed, uint64_t index)
{
    return splitmix64(splitmix64(seed) ^ index);
}

uint64_t fa_stream_key(uint64_t base, uint64_t step, unsigned stream)
{
    return splitmix64(splitmix64(base ^ step) ^ (uint64_t)stream);
}

uint32_t fa_q8_buckets[3 * FA_Q8_NBUCKETS];
uint32_t fa_q8_zero_index;

static uint32_t bits_of(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

/* table[b] for a sorted list of bit patterns l[0..n): (count of l < bucket start) << 16 |
 * (low 16 bits of the one l inside the bucket, or 0xffff). -1 if a bucket holds two. */
static int build(uint32_t *table, const uint32_t *l, int n)
{
    int c = 0;
    for (uint32_t b = 0; b < FA_Q8_NBUCKETS; b++) {
        const uint32_t lo = (b + FA_Q8_BUCKET_LO) << 16, hi = lo | 0xffffu;
        while (c < n && l[c] < lo) c++;
        uint32_t low = 0xffffu;
        int inside = 0;
        for (int k = c; k < n && l[k] <= hi; k++) {
            low = l[k] & 0xffffu;
            inside++;
        }
        if (inside > 1 || (b == 0 && (inside || c))) return -1; /* bucket 0 takes |q| < 2**-24 */
        table[b] = ((uint32_t)c << 16) | low;
    }
    return 0;
}

int fa_q8_init(void)
{
    uint32_t pos[256], neg[256], uns[256];
    int npos = 0, nneg = 0, nuns = 0, err = 0;
    for (int j = 0; j + 1 < 256; j++) { /* the thresholds: float32 midpoints */
        const float ts = (fa_q8_maps[0][j] + fa_q8_maps[0][j + 1]) * 0.5f;
        const float tu = (fa_q8_maps[1][j] + fa_q8_maps[1][j + 1]) * 0.5f;
        if (ts < 0.0f)
            neg[nneg++] = bits_of(-ts) - 1u; /* |t| <= |q|  <=>  bits(|t|) - 1 < a */
        else
            pos[npos++] = bits_of(ts);
        uns[nuns++] = bits_of(tu);
    }
    /* neg[] holds the magnitudes in decreasing order: reverse it */
    for (int i = 0; i < nneg / 2; i++) {
        const uint32_t t = neg[i];
        neg[i] = neg[nneg - 1 - i];
        neg[nneg - 1 - i] = t;
    }
    fa_q8_zero_index = (uint32_t)nneg;
    err |= build(fa_q8_buckets, pos, npos);
    err |= build(fa_q8_buckets + FA_Q8_NBUCKETS, neg, nneg);
    err |= build(fa_q8_buckets + 2 * FA_Q8_NBUCKETS, uns, nuns);
    return err ? -1 : 0;
}
