/* adam_kernel.h -- THE Adam kernel, written once as a plain C loop.
 *
 * Each isa_*.c file defines FA_SUFFIX and includes this header; CMake compiles
 * each of them with its own instruction-set flags and always with
 * -ffp-contract=off and without fast-math, so the compiler may vectorise the
 * loop but may not fuse, reorder or approximate anything. Every operation
 * below is a single IEEE-754 operation (+, -, *, /, sqrt, compare) that is
 * correctly rounded in scalar and vector form alike; hence every path gives
 * the same bits. fastadam/reference.py is the same sequence in NumPy.
 *
 * Per element, in the element type T (constants rounded once from double):
 *     g  = grad * grad_mul                    sign for maximize, 1/grad_scale
 *     g  = g + l2_weight_decay * p            only when L2 decay is on
 *     p  = p * param_decay                    AdamW; exactly 1 otherwise
 *     m  = m + one_minus_beta1 * (g - m)      torch's lerp form
 *     v  = v * beta2 + (one_minus_beta2 * g) * g
 *     vm = vm >= v ? vm : v                   AMSGrad only; denominator uses vm
 *     d  = sqrt(v) * inv_sqrt_bias_correction2 + eps
 *     p  = p - step_size * (m / d)
 */
#include "fastadam.h"

#ifndef FA_SUFFIX
#error "define FA_SUFFIX before including adam_kernel.h"
#endif

#define FA_CAT_(a, b) a##_##b
#define FA_CAT(a, b) FA_CAT_(a, b)

#if defined(_MSC_VER)
#define FA_RESTRICT __restrict
#define FA_INLINE static __forceinline
#else
#define FA_RESTRICT __restrict__
#define FA_INLINE static inline __attribute__((always_inline))
#endif

/* Software prefetch: FA_PREFETCH_BYTES ahead on every stream. Hardware prefetchers
 * keep up with these 4-5 streams from DRAM and have nothing to hide in L2, but fall
 * behind on data that sits in L3 (measured on Zen 3: a 1e6-element float32 step,
 * 16 MB of state, ran 1.1-1.6x faster with it, while from L2 or DRAM it cost a few
 * per cent); fa_adam_step decides when to ask for it. A prefetch never changes a
 * result, and no address beyond a buffer's end is formed. */
#define FA_PREFETCH_BYTES 4096
#if defined(__GNUC__) || defined(__clang__)
#define FA_PREFETCH(ptr, rw) __builtin_prefetch((ptr), (rw), 3)
#else
#define FA_PREFETCH(ptr, rw) ((void)0)
#endif

/* The loop body, instantiated for constant (L2, AMSGRAD, PREFETCH) so that the
 * compiler sees eight branch-free loops. With PREFETCH, whole cache lines (64 bytes
 * of each stream) are updated per iteration after one prefetch per stream; the
 * elements and the operations on each are the same either way. */
#define FA_DEFINE_KERNEL(T, SQRT, NAME)                                              \
    FA_INLINE void NAME##_body(const fa_step_consts *c, T *FA_RESTRICT param,        \
                               const T *FA_RESTRICT grad, T *FA_RESTRICT exp_avg,    \
                               T *FA_RESTRICT exp_avg_sq,                            \
                               T *FA_RESTRICT max_exp_avg_sq, size_t n,              \
                               const int L2, const int AMSGRAD, const int PREFETCH)  \
    {                                                                                \
        const T grad_mul = (T)c->grad_mul;                                           \
        const T l2_weight_decay = (T)c->l2_weight_decay;                             \
        const T param_decay = (T)c->param_decay;                                     \
        const T one_minus_beta1 = (T)c->one_minus_beta1;                             \
        const T beta2 = (T)c->beta2;                                                 \
        const T one_minus_beta2 = (T)c->one_minus_beta2;                             \
        const T inv_sqrt_bc2 = (T)c->inv_sqrt_bias_correction2;                      \
        const T eps = (T)c->eps;                                                     \
        const T step_size = (T)c->step_size;                                         \
        /* SEG: 4 cache lines of each stream per iteration, a constant trip count \
         * the vectoriser handles; the prefetches go out first, a loop of their own. */ \
        enum { LINE = 64 / sizeof(T), SEG = 4 * LINE, AHEAD = FA_PREFETCH_BYTES / sizeof(T) }; \
        size_t i = 0;                                                                \
        if (PREFETCH) {                                                              \
            for (; i + AHEAD + SEG <= n; i += SEG) {                                 \
                for (size_t q = i + AHEAD; q < i + AHEAD + SEG; q += LINE) {         \
                    FA_PREFETCH(param + q, 1);                                       \
                    FA_PREFETCH(grad + q, 0);                                        \
                    FA_PREFETCH(exp_avg + q, 1);                                     \
                    FA_PREFETCH(exp_avg_sq + q, 1);                                  \
                    if (AMSGRAD) FA_PREFETCH(max_exp_avg_sq + q, 1);                 \
                }                                                                    \
                for (size_t j = i; j < i + SEG; j++) FA_ADAM_ELEMENT(T, SQRT, j)     \
            }                                                                        \
        }                                                                            \
        for (; i < n; i++) FA_ADAM_ELEMENT(T, SQRT, i)                               \
    }                                                                                \
    void FA_CAT(NAME, FA_SUFFIX)(const fa_step_consts *c, void *param,               \
                                 const void *grad, void *exp_avg, void *exp_avg_sq,  \
                                 void *max_exp_avg_sq, size_t n, int prefetch)       \
    {                                                                                \
        T *p = (T *)param, *m = (T *)exp_avg, *v = (T *)exp_avg_sq;                  \
        T *vm = (T *)max_exp_avg_sq;                                                 \
        const T *g = (const T *)grad;                                                \
        const int pf = prefetch != 0;                                                \
        if (c->l2) {                                                                 \
            if (c->amsgrad) {                                                        \
                if (pf) NAME##_body(c, p, g, m, v, vm, n, 1, 1, 1);                  \
                else NAME##_body(c, p, g, m, v, vm, n, 1, 1, 0);                     \
            } else {                                                                 \
                if (pf) NAME##_body(c, p, g, m, v, vm, n, 1, 0, 1);                  \
                else NAME##_body(c, p, g, m, v, vm, n, 1, 0, 0);                     \
            }                                                                        \
        } else {                                                                     \
            if (c->amsgrad) {                                                        \
                if (pf) NAME##_body(c, p, g, m, v, vm, n, 0, 1, 1);                  \
                else NAME##_body(c, p, g, m, v, vm, n, 0, 1, 0);                     \
            } else {                                                                 \
                if (pf) NAME##_body(c, p, g, m, v, vm, n, 0, 0, 1);                  \
                else NAME##_body(c, p, g, m, v, vm, n, 0, 0, 0);                     \
            }                                                                        \
        }                                                                            \
    }

/* One element, index i: the whole update, in the order given at the top. */
#define FA_ADAM_ELEMENT(T, SQRT, i)                                                  \
    {                                                                                \
        T p = param[i];                                                              \
        T g = grad[i] * grad_mul;                                                    \
        if (L2) g = g + l2_weight_decay * p;                                         \
        p = p * param_decay;                                                         \
        T m = exp_avg[i];                                                            \
        m = m + one_minus_beta1 * (g - m);                                           \
        T v = exp_avg_sq[i];                                                         \
        v = v * beta2 + (one_minus_beta2 * g) * g;                                   \
        exp_avg[i] = m;                                                              \
        exp_avg_sq[i] = v;                                                           \
        T vd = v;                                                                    \
        if (AMSGRAD) {                                                               \
            T vm = max_exp_avg_sq[i];                                                \
            vm = vm >= v ? vm : v;                                                   \
            max_exp_avg_sq[i] = vm;                                                  \
            vd = vm;                                                                 \
        }                                                                            \
        T d = SQRT(vd) * inv_sqrt_bc2 + eps;                                         \
        param[i] = p - step_size * (m / d);                                          \
    }

#include <math.h>

FA_DEFINE_KERNEL(float, sqrtf, fa_kernel_f32)
FA_DEFINE_KERNEL(double, sqrt, fa_kernel_f64)

/* Sum of squares with 16 interleaved double accumulators: lane j takes the elements
 * whose index within the segment is j mod 16, in order. Each lane is one sequential
 * chain, so vectorising across lanes does not change a bit. acc[16] carries on across
 * the segments of one chunk; nonfinite accumulates x*0, which is NaN iff x is inf/NaN. */
#define FA_DEFINE_SUMSQ(T, NAME)                                                       \
    void FA_CAT(NAME, FA_SUFFIX)(const void *src, size_t n, double *FA_RESTRICT acc,   \
                                 double *FA_RESTRICT nonfinite)                        \
    {                                                                                  \
        const T *FA_RESTRICT x = (const T *)src;                                       \
        double a[16], z[16];                                                           \
        for (int j = 0; j < 16; j++) { a[j] = acc[j]; z[j] = 0.0; }                    \
        size_t i = 0;                                                                  \
        for (; i + 16 <= n; i += 16)                                                   \
            for (int j = 0; j < 16; j++) {                                             \
                const double d = (double)x[i + j];                                     \
                a[j] = a[j] + d * d;                                                   \
                z[j] = z[j] + d * 0.0;                                                 \
            }                                                                          \
        for (int j = 0; i + (size_t)j < n; j++) {                                      \
            const double d = (double)x[i + j];                                         \
            a[j] = a[j] + d * d;                                                       \
            z[j] = z[j] + d * 0.0;                                                     \
        }                                                                              \
        double zs = 0.0;                                                               \
        for (int j = 0; j < 16; j++) { acc[j] = a[j]; zs = zs + z[j]; }                \
        *nonfinite = *nonfinite + zs;                                                  \
    }

FA_DEFINE_SUMSQ(float, fa_sumsq_f32)
FA_DEFINE_SUMSQ(double, fa_sumsq_f64)

/* The traffic-only pattern for the roofline: same loads and stores, one add each. */
void FA_CAT(fa_traffic_f32, FA_SUFFIX)(float *FA_RESTRICT p, const float *FA_RESTRICT g,
                                       float *FA_RESTRICT m, float *FA_RESTRICT v, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        const float x = g[i];
        p[i] += x;
        m[i] += x;
        v[i] += x;
    }
}
