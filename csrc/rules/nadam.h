/* rules/nadam.h -- NAdam (Dozat 2016: Adam with Nesterov momentum), as torch.optim.NAdam;
 * fastadam/reference/nadam.py is the same sequence in NumPy.
 *
 * The per-block scalar (fa_block.scalar) is torch's mu_product, the product of the
 * momentum coefficients mu_1 ... mu_{t-1} before step t (1 before the first step).
 * Per step, in double (torch's expressions in its order):
 *     mu         = beta1 * (1 - 0.5 * 0.96^(t * momentum_decay))
 *     mu_next    = beta1 * (1 - 0.5 * 0.96^((t + 1) * momentum_decay))
 *     mu_product = mu_product * mu
 *     grad_step  = lr * (1 - mu) / (1 - mu_product)
 *     avg_step   = lr * mu_next / (1 - mu_product * mu_next)
 * Per element, in T:
 *     g = grad * grad_mul
 *     g = g + l2_weight_decay * p                         [l2]
 *     p = p * param_decay                                 [decoupled]
 *     m = m + one_minus_beta1 * (g - m)
 *     v = v * beta2 + (one_minus_beta2 * g) * g
 *     d = sqrt(v * inv_bias_correction2) + eps
 *     p = p - (grad_step * g) / d
 *     p = p - (avg_step * m) / d
 */
#ifndef FA_RULE_NADAM_H
#define FA_RULE_NADAM_H
enum {
    FA_NADAM_BETA1,
    FA_NADAM_BETA2,
    FA_NADAM_EPS,
    FA_NADAM_MOMENTUM_DECAY,
    FA_NADAM_DECOUPLED
}; /* hyper */
enum { FA_NADAM_EXP_AVG = FA_STATE0, FA_NADAM_EXP_AVG_SQ }; /* streams */
enum {
    NADAM_L2_WEIGHT_DECAY = FA_C_RULE,
    NADAM_PARAM_DECAY,
    NADAM_ONE_MINUS_BETA1,
    NADAM_BETA2,
    NADAM_ONE_MINUS_BETA2,
    NADAM_INV_BIAS_CORRECTION2,
    NADAM_EPS,
    NADAM_MU,
    NADAM_MU_NEXT,
    NADAM_MU_PRODUCT,
    NADAM_GRAD_STEP,
    NADAM_AVG_STEP
};
#define NADAM_V_L2        (1u << FA_V_RULE_SHIFT)
#define NADAM_V_DECOUPLED (2u << FA_V_RULE_SHIFT)
#endif

#ifdef FA_HOST
static double fa_nadam_mu(const fa_options *o, double t)
{
    const double *h = o->hyper;
    return h[FA_NADAM_BETA1] * (1.0 - 0.5 * pow(0.96, t * h[FA_NADAM_MOMENTUM_DECAY]));
}

static void fa_nadam_consts(fa_consts *c, const fa_options *o, double t, double mu_product)
{
    const double *h = o->hyper;
    const double beta2 = h[FA_NADAM_BETA2];
    const double bias_correction2 = 1.0 - pow(beta2, t);
    const double mu = fa_nadam_mu(o, t), mu_next = fa_nadam_mu(o, t + 1.0);
    const double mu_product_new = mu_product * mu;
    const double mu_product_next = mu_product_new * mu_next;
    const int decoupled = h[FA_NADAM_DECOUPLED] != 0.0 && o->weight_decay != 0.0;
    const int l2 = h[FA_NADAM_DECOUPLED] == 0.0 && o->weight_decay != 0.0;
    c->v[NADAM_L2_WEIGHT_DECAY] = l2 ? o->weight_decay : 0.0;
    c->v[NADAM_PARAM_DECAY] = decoupled ? 1.0 - o->lr * o->weight_decay : 1.0;
    c->v[NADAM_ONE_MINUS_BETA1] = 1.0 - h[FA_NADAM_BETA1];
    c->v[NADAM_BETA2] = beta2;
    c->v[NADAM_ONE_MINUS_BETA2] = 1.0 - beta2;
    c->v[NADAM_INV_BIAS_CORRECTION2] = 1.0 / bias_correction2;
    c->v[NADAM_EPS] = h[FA_NADAM_EPS];
    c->v[NADAM_MU] = mu;
    c->v[NADAM_MU_NEXT] = mu_next;
    c->v[NADAM_MU_PRODUCT] = mu_product_new;
    c->v[NADAM_GRAD_STEP] = o->lr * (1.0 - mu) / (1.0 - mu_product_new);
    c->v[NADAM_AVG_STEP] = o->lr * mu_next / (1.0 - mu_product_next);
    c->variant |= (l2 ? NADAM_V_L2 : 0u) | (decoupled ? NADAM_V_DECOUPLED : 0u);
}

static double fa_nadam_scalar_after(const fa_options *o, double t, double mu_product)
{
    return mu_product * fa_nadam_mu(o, t);
}

static unsigned fa_nadam_required(const fa_options *o)
{
    (void)o;
    return 3u;
}

#else
FA_INLINE void FA_FN(nadam_body)(const fa_consts *c, char *const *s, size_t n, const unsigned V,
                                 const fa_fused *fx_)
{
    (void)fx_;
    FA_STREAM(param, FA_PARAM);
    FA_STREAM(grad, FA_GRAD);
    FA_STREAM(exp_avg, FA_NADAM_EXP_AVG);
    FA_STREAM(exp_avg_sq, FA_NADAM_EXP_AVG_SQ);
    FA_EMA_LOCALS(c, s)
    const T grad_mul = (T)c->v[FA_C_GRAD_MUL];
    const T l2_weight_decay = (T)c->v[NADAM_L2_WEIGHT_DECAY];
    const T param_decay = (T)c->v[NADAM_PARAM_DECAY];
    const T one_minus_beta1 = (T)c->v[NADAM_ONE_MINUS_BETA1];
    const T beta2 = (T)c->v[NADAM_BETA2];
    const T one_minus_beta2 = (T)c->v[NADAM_ONE_MINUS_BETA2];
    const T inv_bc2 = (T)c->v[NADAM_INV_BIAS_CORRECTION2];
    const T eps = (T)c->v[NADAM_EPS];
    const T grad_step = (T)c->v[NADAM_GRAD_STEP];
    const T avg_step = (T)c->v[NADAM_AVG_STEP];
    (void)l2_weight_decay;
    (void)param_decay;
#define FA_NADAM_ELEMENT(i)                              \
    {                                                    \
        T p = FA_LD(param, i);                           \
        T g = FA_LD(grad, i) * grad_mul;                 \
        if (V & NADAM_V_L2) g = g + l2_weight_decay * p; \
        if (V & NADAM_V_DECOUPLED) p = p * param_decay;  \
        T m = FA_LD(exp_avg, i);                         \
        m = m + one_minus_beta1 * (g - m);               \
        T v = FA_LD(exp_avg_sq, i);                      \
        v = v * beta2 + (one_minus_beta2 * g) * g;       \
        FA_ST(exp_avg, i, m);                            \
        FA_ST(exp_avg_sq, i, v);                         \
        const T d = FA_SQRT(v * inv_bc2) + eps;          \
        p = p - (grad_step * g) / d;                     \
        p = p - (avg_step * m) / d;                      \
        FA_EMA_UPDATE(V, i, p)                           \
        FA_ST(param, i, p);                              \
    }
    FA_LOOP(V, s, n, FA_NADAM_ELEMENT);
#undef FA_NADAM_ELEMENT
}
FA_DEFINE_ENTRY(nadam, 16)
#endif
