/* rules/lion.h -- Lion (Chen et al. 2023, "Symbolic Discovery of Optimization
 * Algorithms", Algorithm 2); fastadam/reference/lion.py is the same sequence in NumPy.
 *
 * Per element, in T (constants rounded once from double):
 *     g = grad * grad_mul
 *     p = p * param_decay                                 [weight_decay > 0: 1 - lr*wd]
 *     c = m * beta1 + one_minus_beta1 * g
 *     s = c > 0 ? 1 : (c < 0 ? -1 : c)                    (sign; 0, -0 and NaN pass through)
 *     p = p - lr * s
 *     m = m * beta2 + one_minus_beta2 * g
 */
#ifndef FA_RULE_LION_H
#define FA_RULE_LION_H
enum { FA_LION_BETA1, FA_LION_BETA2 }; /* hyper */
enum { FA_LION_EXP_AVG = FA_STATE0 };  /* streams */
enum {
    LION_PARAM_DECAY = FA_C_RULE,
    LION_BETA1,
    LION_ONE_MINUS_BETA1,
    LION_BETA2,
    LION_ONE_MINUS_BETA2,
    LION_LR
};
#define LION_V_DECOUPLED (1u << FA_V_RULE_SHIFT)
#endif

#ifdef FA_HOST
static void fa_lion_consts(fa_consts *c, const fa_options *o, double t, double scalar)
{
    const double *h = o->hyper;
    const int decoupled = o->weight_decay != 0.0;
    (void)t;
    (void)scalar;
    c->v[LION_PARAM_DECAY] = decoupled ? 1.0 - o->lr * o->weight_decay : 1.0;
    c->v[LION_BETA1] = h[FA_LION_BETA1];
    c->v[LION_ONE_MINUS_BETA1] = 1.0 - h[FA_LION_BETA1];
    c->v[LION_BETA2] = h[FA_LION_BETA2];
    c->v[LION_ONE_MINUS_BETA2] = 1.0 - h[FA_LION_BETA2];
    c->v[LION_LR] = o->lr;
    c->variant |= decoupled ? LION_V_DECOUPLED : 0u;
}

static unsigned fa_lion_required(const fa_options *o)
{
    (void)o;
    return 1u;
}

#else
FA_INLINE void FA_FN(lion_body)(const fa_consts *c, char *const *s, size_t n, const unsigned V,
                                const fa_fused *fx_)
{
    (void)fx_;
    FA_STREAM(param, FA_PARAM);
    FA_STREAM(grad, FA_GRAD);
    FA_STREAM(exp_avg, FA_LION_EXP_AVG);
    FA_EMA_LOCALS(c, s)
    const T grad_mul = (T)c->v[FA_C_GRAD_MUL];
    const T param_decay = (T)c->v[LION_PARAM_DECAY];
    const T beta1 = (T)c->v[LION_BETA1];
    const T one_minus_beta1 = (T)c->v[LION_ONE_MINUS_BETA1];
    const T beta2 = (T)c->v[LION_BETA2];
    const T one_minus_beta2 = (T)c->v[LION_ONE_MINUS_BETA2];
    const T lr = (T)c->v[LION_LR];
    const T one = (T)1, minus_one = (T)-1;
    (void)param_decay;
#define FA_LION_ELEMENT(i)                                   \
    {                                                        \
        T p = FA_LD(param, i);                               \
        const T g = FA_LD(grad, i) * grad_mul;               \
        if (V & LION_V_DECOUPLED) p = p * param_decay;       \
        const T m = FA_LD(exp_avg, i);                       \
        const T u = m * beta1 + one_minus_beta1 * g;         \
        const T sgn = u > 0 ? one : (u < 0 ? minus_one : u); \
        p = p - lr * sgn;                                    \
        FA_ST(exp_avg, i, m * beta2 + one_minus_beta2 * g);  \
        FA_EMA_UPDATE(V, i, p)                               \
        FA_ST(param, i, p);                                  \
    }
    FA_LOOP(V, s, n, FA_LION_ELEMENT);
#undef FA_LION_ELEMENT
}
FA_DEFINE_ENTRY(lion, 8)
#endif
