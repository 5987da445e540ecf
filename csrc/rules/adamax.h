/* rules/adamax.h -- AdaMax (Kingma & Ba 2015, Algorithm 2: Adam with the infinity norm),
 * as torch.optim.Adamax; fastadam/reference/adamax.py is the same sequence in NumPy.
 *
 * Per element, in T (constants rounded once from double; clr = lr/(1 - beta1^t)):
 *     g = grad * grad_mul
 *     g = g + l2_weight_decay * p                         [l2]
 *     m = m + one_minus_beta1 * (g - m)
 *     x = u * beta2;  y = |g| + eps;  u = x >= y ? x : y   (a select: a NaN in g reaches
 *                                                          u, a NaN already in u is replaced)
 *     p = p - (clr * m) / u
 */
#ifndef FA_RULE_ADAMAX_H
#define FA_RULE_ADAMAX_H
enum { FA_ADAMAX_BETA1, FA_ADAMAX_BETA2, FA_ADAMAX_EPS };  /* hyper */
enum { FA_ADAMAX_EXP_AVG = FA_STATE0, FA_ADAMAX_EXP_INF }; /* streams */
enum {
    ADAMAX_L2_WEIGHT_DECAY = FA_C_RULE,
    ADAMAX_ONE_MINUS_BETA1,
    ADAMAX_BETA2,
    ADAMAX_EPS,
    ADAMAX_CLR
};
#define ADAMAX_V_L2 (1u << FA_V_RULE_SHIFT)
#endif

#ifdef FA_HOST
static void fa_adamax_consts(fa_consts *c, const fa_options *o, double t, double scalar)
{
    const double *h = o->hyper;
    (void)scalar;
    c->v[ADAMAX_L2_WEIGHT_DECAY] = o->weight_decay;
    c->v[ADAMAX_ONE_MINUS_BETA1] = 1.0 - h[FA_ADAMAX_BETA1];
    c->v[ADAMAX_BETA2] = h[FA_ADAMAX_BETA2];
    c->v[ADAMAX_EPS] = h[FA_ADAMAX_EPS];
    c->v[ADAMAX_CLR] = o->lr / (1.0 - pow(h[FA_ADAMAX_BETA1], t));
    c->variant |= o->weight_decay != 0.0 ? ADAMAX_V_L2 : 0u;
}

static unsigned fa_adamax_required(const fa_options *o)
{
    (void)o;
    return 3u;
}

#else
FA_INLINE void FA_FN(adamax_body)(const fa_consts *c, char *const *s, size_t n, const unsigned V,
                                  const fa_fused *fx_)
{
    (void)fx_;
    FA_STREAM(param, FA_PARAM);
    FA_STREAM(grad, FA_GRAD);
    FA_STREAM(exp_avg, FA_ADAMAX_EXP_AVG);
    FA_STREAM(exp_inf, FA_ADAMAX_EXP_INF);
    FA_EMA_LOCALS(c, s)
    const T grad_mul = (T)c->v[FA_C_GRAD_MUL];
    const T l2_weight_decay = (T)c->v[ADAMAX_L2_WEIGHT_DECAY];
    const T one_minus_beta1 = (T)c->v[ADAMAX_ONE_MINUS_BETA1];
    const T beta2 = (T)c->v[ADAMAX_BETA2];
    const T eps = (T)c->v[ADAMAX_EPS];
    const T clr = (T)c->v[ADAMAX_CLR];
    (void)l2_weight_decay;
#define FA_ADAMAX_ELEMENT(i)                              \
    {                                                     \
        T p = FA_LD(param, i);                            \
        T g = FA_LD(grad, i) * grad_mul;                  \
        if (V & ADAMAX_V_L2) g = g + l2_weight_decay * p; \
        T m = FA_LD(exp_avg, i);                          \
        m = m + one_minus_beta1 * (g - m);                \
        const T x = FA_LD(exp_inf, i) * beta2;            \
        const T y = FA_FABS(g) + eps;                     \
        const T u = x >= y ? x : y;                       \
        FA_ST(exp_avg, i, m);                             \
        FA_ST(exp_inf, i, u);                             \
        p = p - (clr * m) / u;                            \
        FA_EMA_UPDATE(V, i, p)                            \
        FA_ST(param, i, p);                               \
    }
    FA_LOOP(V, s, n, FA_ADAMAX_ELEMENT);
#undef FA_ADAMAX_ELEMENT
}
FA_DEFINE_ENTRY(adamax, 8)
#endif
