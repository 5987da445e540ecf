/* rules/adam.h -- Adam (Kingma & Ba 2015, Algorithm 1), AdamW (Loshchilov & Hutter 2019)
 * and AMSGrad (Reddi et al. 2018), as torch.optim.Adam / AdamW; fastadam/reference/adam.py
 * is the same sequence in NumPy.
 *
 * Per element, in the element type T (constants rounded once from double):
 *     g  = grad * grad_mul                    sign for maximize, 1/grad_scale
 *     g  = g + l2_weight_decay * p            only when L2 decay is on
 *     p  = p * param_decay                    AdamW; exactly 1 otherwise
 *     m  = m + one_minus_beta1 * (g - m)      torch's lerp form
 *     v  = v * beta2 + (one_minus_beta2 * g) * g
 *     vm = vm >= v ? vm : v                   AMSGrad only; denominator uses vm
 *     d  = sqrt(v) * inv_sqrt_bias_correction2 + eps             eps_root == 0
 *     d  = sqrt(v * inv_bias_correction2 + eps_root) + eps       eps_root > 0 (optax)
 *     p  = p - step_size * (m / d)
 */
#ifndef FA_RULE_ADAM_H
#define FA_RULE_ADAM_H
/* fa_options.hyper */
enum {
    FA_ADAM_BETA1,
    FA_ADAM_BETA2,
    FA_ADAM_EPS,
    FA_ADAM_DECOUPLED,
    FA_ADAM_AMSGRAD,
    FA_ADAM_BIAS_CORRECTION,
    FA_ADAM_EPS_MODE /* 0 paper, 1 hat */,
    FA_ADAM_EPS_ROOT
};
/* state streams */
enum { FA_ADAM_EXP_AVG = FA_STATE0, FA_ADAM_EXP_AVG_SQ, FA_ADAM_MAX_EXP_AVG_SQ };
/* fa_consts.v */
enum {
    ADAM_L2_WEIGHT_DECAY = FA_C_RULE,
    ADAM_PARAM_DECAY,
    ADAM_ONE_MINUS_BETA1,
    ADAM_BETA2,
    ADAM_ONE_MINUS_BETA2,
    ADAM_INV_SQRT_BIAS_CORRECTION2,
    ADAM_EPS,
    ADAM_STEP_SIZE,
    ADAM_INV_BIAS_CORRECTION2,
    ADAM_EPS_ROOT
};
#define ADAM_V_L2       (1u << FA_V_RULE_SHIFT)
#define ADAM_V_AMSGRAD  (2u << FA_V_RULE_SHIFT)
#define ADAM_V_EPS_ROOT (4u << FA_V_RULE_SHIFT)
#endif

#ifdef FA_HOST
static void fa_adam_consts(fa_consts *c, const fa_options *o, double t, double scalar)
{
    /* Powers use pow() of t as a double, as Python's float ** int (and so torch and
     * fastadam.reference) does. */
    const double *h = o->hyper;
    const double beta1 = h[FA_ADAM_BETA1], beta2 = h[FA_ADAM_BETA2];
    const int bias_correction = h[FA_ADAM_BIAS_CORRECTION] != 0.0;
    const double bias_correction1 = bias_correction ? 1.0 - pow(beta1, t) : 1.0;
    const double bias_correction2 = bias_correction ? 1.0 - pow(beta2, t) : 1.0;
    const int decoupled = h[FA_ADAM_DECOUPLED] != 0.0;
    const int l2 = !decoupled && o->weight_decay != 0.0;
    (void)scalar;
    c->v[ADAM_L2_WEIGHT_DECAY] = l2 ? o->weight_decay : 0.0;
    c->v[ADAM_PARAM_DECAY] =
        decoupled && o->weight_decay != 0.0 ? 1.0 - o->lr * o->weight_decay : 1.0;
    c->v[ADAM_ONE_MINUS_BETA1] = 1.0 - beta1;
    c->v[ADAM_BETA2] = beta2;
    c->v[ADAM_ONE_MINUS_BETA2] = 1.0 - beta2;
    c->v[ADAM_EPS] = h[FA_ADAM_EPS];
    c->v[ADAM_EPS_ROOT] = h[FA_ADAM_EPS_ROOT];
    if (h[FA_ADAM_EPS_MODE] != 0.0) { /* hat: the paper's "efficient version" */
        c->v[ADAM_INV_SQRT_BIAS_CORRECTION2] = 1.0;
        c->v[ADAM_INV_BIAS_CORRECTION2] = 1.0;
        c->v[ADAM_STEP_SIZE] = o->lr * sqrt(bias_correction2) / bias_correction1;
    } else {
        c->v[ADAM_INV_SQRT_BIAS_CORRECTION2] = 1.0 / sqrt(bias_correction2);
        c->v[ADAM_INV_BIAS_CORRECTION2] = 1.0 / bias_correction2;
        c->v[ADAM_STEP_SIZE] = o->lr / bias_correction1;
    }
    c->variant |= (l2 ? ADAM_V_L2 : 0u) | (h[FA_ADAM_AMSGRAD] != 0.0 ? ADAM_V_AMSGRAD : 0u) |
                  (h[FA_ADAM_EPS_ROOT] != 0.0 ? ADAM_V_EPS_ROOT : 0u);
}

static unsigned fa_adam_required(const fa_options *o)
{
    return o->hyper[FA_ADAM_AMSGRAD] != 0.0 ? 7u : 3u;
}

#else /* the kernel, in the element type T */
FA_INLINE void FA_FN(adam_body)(const fa_consts *c, char *const *s, size_t n, const unsigned V,
                                const fa_fused *fx_)
{
    (void)fx_;
    FA_STREAM(param, FA_PARAM);
    FA_STREAM(grad, FA_GRAD);
    FA_STREAM(exp_avg, FA_ADAM_EXP_AVG);
    FA_STREAM(exp_avg_sq, FA_ADAM_EXP_AVG_SQ);
    FA_STREAM(max_exp_avg_sq, FA_ADAM_MAX_EXP_AVG_SQ);
    FA_EMA_LOCALS(c, s)
    const T grad_mul = (T)c->v[FA_C_GRAD_MUL];
    const T l2_weight_decay = (T)c->v[ADAM_L2_WEIGHT_DECAY];
    const T param_decay = (T)c->v[ADAM_PARAM_DECAY];
    const T one_minus_beta1 = (T)c->v[ADAM_ONE_MINUS_BETA1];
    const T beta2 = (T)c->v[ADAM_BETA2];
    const T one_minus_beta2 = (T)c->v[ADAM_ONE_MINUS_BETA2];
    const T inv_sqrt_bc2 = (T)c->v[ADAM_INV_SQRT_BIAS_CORRECTION2];
    const T inv_bc2 = (T)c->v[ADAM_INV_BIAS_CORRECTION2];
    const T eps = (T)c->v[ADAM_EPS];
    const T eps_root = (T)c->v[ADAM_EPS_ROOT];
    const T step_size = (T)c->v[ADAM_STEP_SIZE];
    (void)max_exp_avg_sq;
    (void)inv_bc2;
    (void)eps_root;
#define FA_ADAM_ELEMENT(i)                              \
    {                                                   \
        T p = FA_LD(param, i);                          \
        T g = FA_LD(grad, i) * grad_mul;                \
        if (V & ADAM_V_L2) g = g + l2_weight_decay * p; \
        p = p * param_decay;                            \
        T m = FA_LD(exp_avg, i);                        \
        m = m + one_minus_beta1 * (g - m);              \
        T v = FA_LD(exp_avg_sq, i);                     \
        v = v * beta2 + (one_minus_beta2 * g) * g;      \
        FA_ST(exp_avg, i, m);                           \
        FA_ST(exp_avg_sq, i, v);                        \
        if (V & ADAM_V_AMSGRAD) {                       \
            T vm = FA_LD(max_exp_avg_sq, i);            \
            vm = vm >= v ? vm : v;                      \
            FA_ST(max_exp_avg_sq, i, vm);               \
            v = vm;                                     \
        }                                               \
        T d;                                            \
        if (V & ADAM_V_EPS_ROOT)                        \
            d = FA_SQRT(v * inv_bc2 + eps_root) + eps;  \
        else                                            \
            d = FA_SQRT(v) * inv_sqrt_bc2 + eps;        \
        p = p - step_size * (m / d);                    \
        FA_EMA_UPDATE(V, i, p)                          \
        FA_ST(param, i, p);                             \
    }
    FA_LOOP(V, s, n, FA_ADAM_ELEMENT);
#undef FA_ADAM_ELEMENT
}
FA_DEFINE_ENTRY(adam, 32)
#endif
