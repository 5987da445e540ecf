/* kernel.h -- every rule's kernels for one instruction set.
 *
 * Each isa_*.c file defines FA_SUFFIX and includes this header; CMake compiles each of
 * them with its own instruction-set flags and always with -ffp-contract=off and without
 * fast-math, so the compiler may vectorise the loops but may not fuse, reorder or
 * approximate anything. Every operation a rule writes is a single IEEE-754 operation
 * (+, -, *, /, sqrt, compare, select) that is correctly rounded in scalar and vector form
 * alike; hence every path gives the same bits.
 *
 * The rules (csrc/rules/<rule>.h) are written once, in the element type T, and included
 * here twice: for float and for double. This header supplies what they share: the
 * element loop with its optional software prefetch (FA_LOOP), the temporal average
 * (FA_EMA_UPDATE), the expansion of a variant number into branch-free loops
 * (FA_VARIANTS), and at the end this path's kernel table.
 */
#include "fastadam.h"
#include "dispatch.h"

#include <math.h>
#include <stdint.h>
#include <string.h>
#include "formats/q8_maps.h"

#ifndef FA_SUFFIX
#error "define FA_SUFFIX before including kernel.h"
#endif

#define FA_CAT_(a, b) a##_##b
#define FA_CAT(a, b)  FA_CAT_(a, b)
/* fa_<name>_<f32|f64>_<isa> */
#define FA_FN(name)   FA_CAT(FA_CAT(FA_CAT(fa, name), FA_TN), FA_SUFFIX)

#if defined(_MSC_VER)
#define FA_RESTRICT __restrict
#define FA_INLINE   static __forceinline
#else
#define FA_RESTRICT __restrict__
#define FA_INLINE   static inline __attribute__((always_inline))
#endif

/* Software prefetch: FA_PREFETCH_BYTES ahead on every stream. Hardware prefetchers keep
 * up with these streams from DRAM and have nothing to hide in L2, but fall behind on data
 * that sits in L3 (measured on Zen 3: a 1e6-element float32 Adam step, 16 MB of state,
 * ran 1.1-1.6x faster with it, while from L2 or DRAM it cost a few per cent); fa_step
 * decides when to ask for it. A prefetch never changes a result, and no address beyond
 * a buffer's end is formed. */
#define FA_PREFETCH_BYTES 4096
#if defined(__GNUC__) || defined(__clang__)
#define FA_PREFETCH(ptr, rw) __builtin_prefetch((ptr), (rw), 3)
#else
#define FA_PREFETCH(ptr, rw) ((void)0)
#endif

/* Variant bit 0: prefetch within the block (set per call by the engine, not in consts). */
#define FA_V_PREFETCH 1u

/* for (i = 0; i < n; i++) BODY(i), where BODY is a rule's element update. With the
 * prefetch bit, whole cache lines (4 x 64 bytes of each stream) are updated per
 * iteration after one prefetch per line of every present stream; the elements and the
 * operations on each are the same either way. s: the block's streams (NULL: absent). */
#define FA_LOOP(V, s, n, BODY)                                                            \
    do {                                                                                  \
        size_t i_ = 0;                                                                    \
        if ((V) & FA_V_PREFETCH) {                                                        \
            enum {                                                                        \
                LINE_ = 64 / sizeof(T),                                                   \
                SEG_ = 4 * LINE_,                                                         \
                AHEAD_ = FA_PREFETCH_BYTES / sizeof(T)                                    \
            };                                                                            \
            for (; i_ + AHEAD_ + SEG_ <= (n); i_ += SEG_) {                               \
                for (size_t q_ = i_ + AHEAD_; q_ < i_ + AHEAD_ + SEG_; q_ += LINE_)       \
                    for (int k_ = 0; k_ < FA_MAX_STREAMS; k_++)                           \
                        if ((s)[k_]) FA_PREFETCH((const T *)(s)[k_] + q_, k_ != FA_GRAD); \
                for (size_t j_ = i_; j_ < i_ + SEG_; j_++) BODY(j_)                       \
            }                                                                             \
        }                                                                                 \
        for (; i_ < (n); i_++) BODY(i_)                                                   \
    } while (0)

/* The temporal average of the parameter (Kingma & Ba, Sec. 7.2), after the rule has
 * computed the new parameter value p: ema <- ema*d + (1-d)*p. Rules end their element
 * update with it. */
#define FA_EMA_UPDATE(V, i, p) \
    if ((V) & FA_V_EMA) ema_[i] = ema_[i] * ema_decay_ + one_minus_ema_decay_ * (p);

/* The locals FA_EMA_UPDATE reads; rules declare them once, before their loop. */
#define FA_EMA_LOCALS(c, s)                                             \
    T *FA_RESTRICT ema_ = (T *)(s)[FA_EMA];                             \
    const T ema_decay_ = (T)(c)->v[FA_C_EMA_DECAY];                     \
    const T one_minus_ema_decay_ = (T)(c)->v[FA_C_ONE_MINUS_EMA_DECAY]; \
    (void)ema_;                                                         \
    (void)ema_decay_;                                                   \
    (void)one_minus_ema_decay_;

/* switch (variant) { case k: body(c, s, n, k); ... } for k < 2^bits: each case is a
 * loop with the variant's branches resolved at compile time. */
#define FA_CASE_(F, k)        \
    case (k):                 \
        F(c, s, n, (k), fx_); \
        break;
#define FA_C4_(F, b) \
    FA_CASE_(F, (b) + 0) FA_CASE_(F, (b) + 1) FA_CASE_(F, (b) + 2) FA_CASE_(F, (b) + 3)
#define FA_C16_(F, b) FA_C4_(F, b) FA_C4_(F, (b) + 4) FA_C4_(F, (b) + 8) FA_C4_(F, (b) + 12)
#define FA_C64_(F, b) FA_C16_(F, b) FA_C16_(F, (b) + 16) FA_C16_(F, (b) + 32) FA_C16_(F, (b) + 48)
#define FA_VARIANTS_8(F, v)                        \
    switch (v) {                                   \
        FA_C4_(F, 0) FA_C4_(F, 4) default : break; \
    }
#define FA_VARIANTS_16(F, v)           \
    switch (v) {                       \
        FA_C16_(F, 0) default : break; \
    }
#define FA_VARIANTS_32(F, v)                          \
    switch (v) {                                      \
        FA_C16_(F, 0) FA_C16_(F, 16) default : break; \
    }
#define FA_VARIANTS_64(F, v)           \
    switch (v) {                       \
        FA_C64_(F, 0) default : break; \
    }

/* A rule's kernel entry: fa_<rule>_<storage>_<isa>(consts, streams, n, prefetch, fx).
 * Prefetching (FA_LOOP) addresses streams of T; 16-bit storage never asks for it. */
#define FA_DEFINE_ENTRY(rule, NVARIANTS)                                                      \
    void FA_FN(rule)(const fa_consts *c, char *const *s, size_t n, int prefetch,              \
                     const fa_fused *fx_)                                                     \
    {                                                                                         \
        const unsigned v = c->variant | (prefetch && FA_STORAGE_NATIVE ? FA_V_PREFETCH : 0u); \
        FA_CAT(FA_VARIANTS, NVARIANTS)(FA_FN(FA_CAT(rule, body)), v)                          \
    }

/* How a rule reads and writes its streams (rules/<rule>.h): FA_STREAM declares one,
 * FA_LD(name, i) loads element i as T, FA_ST(name, i, x) stores x (rounded as the
 * storage needs). Native storage: plain T arrays. */
#define FA_NATIVE_STREAM(name, slot) T *FA_RESTRICT name = (T *)s[slot]
#define FA_NATIVE_LD(name, i)        (name[i])
#define FA_NATIVE_ST(name, i, x)     (name[i] = (x))

/* ---- every rule: float and double storage ------------------------------------------ */
#define FA_STORAGE_NATIVE 1
#define FA_STREAM         FA_NATIVE_STREAM
#define FA_LD             FA_NATIVE_LD
#define FA_ST             FA_NATIVE_ST
#define T                 float
#define FA_SQRT           sqrtf
#define FA_FABS           fabsf
#define FA_TN             f32
#include "rules/all.h"
#undef T
#undef FA_SQRT
#undef FA_FABS
#undef FA_TN

#define T       double
#define FA_SQRT sqrt
#define FA_FABS fabs
#define FA_TN   f64
#include "rules/all.h"
#undef T
#undef FA_SQRT
#undef FA_FABS
#undef FA_TN
#undef FA_STREAM
#undef FA_LD
#undef FA_ST
#undef FA_STORAGE_NATIVE

/* ---- storage formats (16-bit, 8-bit) --------------------------------------------- */
#include "formats.h"

/* ---- every rule over bfloat16 storage, fused: a block whose param, grad and state are
 * all bfloat16 is updated in one loop that widens on load and rounds on store (the
 * operations of formats.h, element by element), computing in float. The average stays
 * float32. Nearest-even and stochastic rounding are two instantiations. */
#define FA_STORAGE_NATIVE 0
#define FA_STREAM(name, slot)                               \
    uint16_t *FA_RESTRICT name = (uint16_t *)s[slot];       \
    const uint32_t *name##_key_ = fx_ ? fx_->key[slot] : 0; \
    (void)name##_key_
#define FA_LD(name, i)    FA_CAT(fa_bf16_f32, FA_SUFFIX)(name[i])
#define T                 float
#define FA_SQRT           sqrtf
#define FA_FABS           fabsf
#define FA_TN             bf16
#define FA_ST(name, i, x) (name[i] = FA_CAT(fa_bf16_rne, FA_SUFFIX)(x))
#include "rules/all.h"
#undef FA_TN
#undef FA_ST
#define FA_TN bf16sr
#define FA_ST(name, i, x) \
    (name[i] = FA_CAT(fa_bf16_sr, FA_SUFFIX)(x, FA_RAND(name##_key_, fx_->i0, i)))
#include "rules/all.h"
#undef FA_TN
#undef FA_ST
#undef T
#undef FA_SQRT
#undef FA_FABS
#undef FA_STREAM
#undef FA_LD
#undef FA_STORAGE_NATIVE

/* ---- gradient statistics ------------------------------------------------------------
 * Sum of squares with 16 interleaved double accumulators: lane j takes the elements
 * whose index within the segment is j mod 16, in order. Each lane is one sequential
 * chain, so vectorising across lanes does not change a bit. acc[16] carries on across
 * the segments of one chunk; nonfinite accumulates x*0, which is NaN iff x is inf/NaN. */
#define FA_DEFINE_SUMSQ(TT, NAME, WIDEN)                                                    \
    static void FA_CAT(NAME, FA_SUFFIX)(const void *src, size_t n, double *FA_RESTRICT acc, \
                                        double *FA_RESTRICT nonfinite)                      \
    {                                                                                       \
        const TT *FA_RESTRICT x = (const TT *)src;                                          \
        double a[16], z[16];                                                                \
        for (int j = 0; j < 16; j++) {                                                      \
            a[j] = acc[j];                                                                  \
            z[j] = 0.0;                                                                     \
        }                                                                                   \
        size_t i = 0;                                                                       \
        for (; i + 16 <= n; i += 16)                                                        \
            for (int j = 0; j < 16; j++) {                                                  \
                const double d = WIDEN(x[i + j]);                                           \
                a[j] = a[j] + d * d;                                                        \
                z[j] = z[j] + d * 0.0;                                                      \
            }                                                                               \
        for (int j = 0; i + (size_t)j < n; j++) {                                           \
            const double d = WIDEN(x[i + j]);                                               \
            a[j] = a[j] + d * d;                                                            \
            z[j] = z[j] + d * 0.0;                                                          \
        }                                                                                   \
        double zs = 0.0;                                                                    \
        for (int j = 0; j < 16; j++) {                                                      \
            acc[j] = a[j];                                                                  \
            zs = zs + z[j];                                                                 \
        }                                                                                   \
        *nonfinite = *nonfinite + zs;                                                       \
    }

#define FA_WIDEN_PLAIN(x) ((double)(x))
#define FA_WIDEN_BF16(x)  FA_CAT(fa_bf16_to_double, FA_SUFFIX)(x)
#define FA_WIDEN_F16(x)   FA_CAT(fa_f16_to_double, FA_SUFFIX)(x)
FA_DEFINE_SUMSQ(float, fa_sumsq_f32, FA_WIDEN_PLAIN)
FA_DEFINE_SUMSQ(double, fa_sumsq_f64, FA_WIDEN_PLAIN)
FA_DEFINE_SUMSQ(uint16_t, fa_sumsq_bf16, FA_WIDEN_BF16)
FA_DEFINE_SUMSQ(uint16_t, fa_sumsq_f16, FA_WIDEN_F16)

/* ---- the traffic-only pattern for the roofline: same loads and stores, one add each */
FA_INLINE void FA_CAT(fa_traffic_body, FA_SUFFIX)(float *const *s, size_t n, const int NS)
{
    float *FA_RESTRICT p = s[0];
    const float *FA_RESTRICT g = s[1];
    float *FA_RESTRICT a = NS > 2 ? s[2] : 0;
    float *FA_RESTRICT b = NS > 3 ? s[3] : 0;
    float *FA_RESTRICT d = NS > 4 ? s[4] : 0;
    float *FA_RESTRICT e = NS > 5 ? s[5] : 0;
    for (size_t i = 0; i < n; i++) {
        const float x = g[i];
        p[i] += x;
        if (NS > 2) a[i] += x;
        if (NS > 3) b[i] += x;
        if (NS > 4) d[i] += x;
        if (NS > 5) e[i] += x;
    }
}

static void FA_CAT(fa_traffic, FA_SUFFIX)(float *const *s, int nstreams, size_t n)
{
    switch (nstreams) {
    case 2:
        FA_CAT(fa_traffic_body, FA_SUFFIX)(s, n, 2);
        break;
    case 3:
        FA_CAT(fa_traffic_body, FA_SUFFIX)(s, n, 3);
        break;
    case 4:
        FA_CAT(fa_traffic_body, FA_SUFFIX)(s, n, 4);
        break;
    case 5:
        FA_CAT(fa_traffic_body, FA_SUFFIX)(s, n, 5);
        break;
    default:
        FA_CAT(fa_traffic_body, FA_SUFFIX)(s, n, 6);
        break;
    }
}

/* The traffic of streams of any element size: per tile of 1024 elements, every stream's
 * bytes of the tile are read (stream 1) or read and written (the others). */
static void FA_CAT(fa_traffic_any, FA_SUFFIX)(char *const *s, const size_t *esize, int nstreams,
                                              size_t n, unsigned *sink)
{
    unsigned acc = 0;
    for (size_t t0 = 0; t0 < n; t0 += 1024) {
        const size_t len = n - t0 < 1024 ? n - t0 : 1024;
        for (int k = 0; k < nstreams; k++) {
            unsigned char *FA_RESTRICT b = (unsigned char *)s[k] + t0 * esize[k];
            const size_t nb = len * esize[k];
            if (k == 1) {
                unsigned char x = 0;
                for (size_t j = 0; j < nb; j++) x ^= b[j];
                acc += x;
            } else {
                for (size_t j = 0; j < nb; j++) b[j] = (unsigned char)(b[j] + 1u);
            }
        }
    }
    *sink += acc;
}

/* ---- this path's table (dispatch.c picks one) ------------------------------------- */
#define FA_RULE_PAIR(rule)                              \
    {FA_CAT(FA_CAT(FA_CAT(fa, rule), f32), FA_SUFFIX),  \
     FA_CAT(FA_CAT(FA_CAT(fa, rule), f64), FA_SUFFIX),  \
     FA_CAT(FA_CAT(FA_CAT(fa, rule), bf16), FA_SUFFIX), \
     FA_CAT(FA_CAT(FA_CAT(fa, rule), bf16sr), FA_SUFFIX)}
const fa_kernel_table FA_CAT(fa_table, FA_SUFFIX) = {
    {FA_RULE_PAIR(adam), FA_RULE_PAIR(sgd), FA_RULE_PAIR(adagrad), FA_RULE_PAIR(rmsprop),
     FA_RULE_PAIR(adamax), FA_RULE_PAIR(nadam), FA_RULE_PAIR(radam), FA_RULE_PAIR(lion)},
    FA_CAT(fa_traffic, FA_SUFFIX),
    {FA_CAT(fa_sumsq_f32, FA_SUFFIX), FA_CAT(fa_sumsq_f64, FA_SUFFIX),
     FA_CAT(fa_sumsq_bf16, FA_SUFFIX), FA_CAT(fa_sumsq_f16, FA_SUFFIX)},
    {0, FA_CAT(fa_load_bf16, FA_SUFFIX), FA_CAT(fa_load_f16, FA_SUFFIX),
     FA_CAT(fa_load_q8s, FA_SUFFIX), FA_CAT(fa_load_q8u, FA_SUFFIX)},
    {0, FA_CAT(fa_store_bf16, FA_SUFFIX), FA_CAT(fa_store_f16, FA_SUFFIX),
     FA_CAT(fa_store_q8s, FA_SUFFIX), FA_CAT(fa_store_q8u, FA_SUFFIX)},
    FA_CAT(fa_traffic_any, FA_SUFFIX),
};
