/* rules/radam.h -- RAdam (Liu et al. 2020: Adam with a rectified variance), as
 * torch.optim.RAdam; fastadam/reference/radam.py is the same sequence in NumPy.
 *
 * Per step, in double (torch's expressions in its order):
 *     rho_inf = 2 / (1 - beta2) - 1;  rho_t = rho_inf - 2 t beta2^t / (1 - beta2^t)
 *     rectified (rho_t > 5): step_size = lr * sqrt(1 - beta2^t) * rect / (1 - beta1^t),
 *         rect = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))
 *     otherwise:             step_size = lr / (1 - beta1^t)
 * Per element, in T:
 *     g = grad * grad_mul
 *     g = g + l2_weight_decay * p                         [l2]
 *     p = p * param_decay                                 [decoupled]
 *     m = m + one_minus_beta1 * (g - m)
 *     v = v * beta2 + (one_minus_beta2 * g) * g
 *     p = p - step_size * (m / (sqrt(v) + eps))           [rectified]
 *     p = p - step_size * m                               [otherwise]
 */
#ifndef FA_RULE_RADAM_H
#define FA_RULE_RADAM_H
enum { FA_RADAM_BETA1, FA_RADAM_BETA2, FA_RADAM_EPS, FA_RADAM_DECOUPLED }; /* hyper */
enum { FA_RADAM_EXP_AVG = FA_STATE0, FA_RADAM_EXP_AVG_SQ };                /* streams */
enum {
    RADAM_L2_WEIGHT_DECAY = FA_C_RULE,
    RADAM_PARAM_DECAY,
    RADAM_ONE_MINUS_BETA1,
    RADAM_BETA2,
    RADAM_ONE_MINUS_BETA2,
    RADAM_EPS,
    RADAM_RHO_T,
    RADAM_RECT,
    RADAM_STEP_SIZE
};
#define RADAM_V_L2        (1u << FA_V_RULE_SHIFT)
#define RADAM_V_DECOUPLED (2u << FA_V_RULE_SHIFT)
#define RADAM_V_RECTIFIED (4u << FA_V_RULE_SHIFT)
#endif

#ifdef FA_HOST
static void fa_radam_consts(fa_consts *c, const fa_options *o, double t, double scalar)
{
    const double *h = o->hyper;
    const double beta1 = h[FA_RADAM_BETA1], beta2 = h[FA_RADAM_BETA2];
    const double bias_correction1 = 1.0 - pow(beta1, t);
    const double bias_correction2 = 1.0 - pow(beta2, t);
    const double rho_inf = 2.0 / (1.0 - beta2) - 1.0;
    const double rho_t = rho_inf - 2.0 * t * pow(beta2, t) / bias_correction2;
    const int rectified = rho_t > 5.0;
    const int decoupled = h[FA_RADAM_DECOUPLED] != 0.0 && o->weight_decay != 0.0;
    const int l2 = h[FA_RADAM_DECOUPLED] == 0.0 && o->weight_decay != 0.0;
    double rect = 1.0, step_size = o->lr / bias_correction1;
    (void)scalar;
    if (rectified) {
        rect = sqrt((rho_t - 4.0) * (rho_t - 2.0) * rho_inf /
                    ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t));
        step_size = o->lr * sqrt(bias_correction2) * rect / bias_correction1;
    }
    c->v[RADAM_L2_WEIGHT_DECAY] = l2 ? o->weight_decay : 0.0;
    c->v[RADAM_PARAM_DECAY] = decoupled ? 1.0 - o->lr * o->weight_decay : 1.0;
    c->v[RADAM_ONE_MINUS_BETA1] = 1.0 - beta1;
    c->v[RADAM_BETA2] = beta2;
    c->v[RADAM_ONE_MINUS_BETA2] = 1.0 - beta2;
    c->v[RADAM_EPS] = h[FA_RADAM_EPS];
    c->v[RADAM_RHO_T] = rho_t;
    c->v[RADAM_RECT] = rect;
    c->v[RADAM_STEP_SIZE] = step_size;
    c->variant |= (l2 ? RADAM_V_L2 : 0u) | (decoupled ? RADAM_V_DECOUPLED : 0u) |
                  (rectified ? RADAM_V_RECTIFIED : 0u);
}

static unsigned fa_radam_required(const fa_options *o)
{
    (void)o;
    return 3u;
}

#else
FA_INLINE void FA_FN(radam_body)(const fa_consts *c, char *const *s, size_t n, const unsigned V,
                                 const fa_fused *fx_)
{
    (void)fx_;
    FA_STREAM(param, FA_PARAM);
    FA_STREAM(grad, FA_GRAD);
    FA_STREAM(exp_avg, FA_RADAM_EXP_AVG);
    FA_STREAM(exp_avg_sq, FA_RADAM_EXP_AVG_SQ);
    FA_EMA_LOCALS(c, s)
    const T grad_mul = (T)c->v[FA_C_GRAD_MUL];
    const T l2_weight_decay = (T)c->v[RADAM_L2_WEIGHT_DECAY];
    const T param_decay = (T)c->v[RADAM_PARAM_DECAY];
    const T one_minus_beta1 = (T)c->v[RADAM_ONE_MINUS_BETA1];
    const T beta2 = (T)c->v[RADAM_BETA2];
    const T one_minus_beta2 = (T)c->v[RADAM_ONE_MINUS_BETA2];
    const T eps = (T)c->v[RADAM_EPS];
    const T step_size = (T)c->v[RADAM_STEP_SIZE];
    (void)l2_weight_decay;
    (void)param_decay;
    (void)eps;
#define FA_RADAM_ELEMENT(i)                               \
    {                                                     \
        T p = FA_LD(param, i);                            \
        T g = FA_LD(grad, i) * grad_mul;                  \
        if (V & RADAM_V_L2) g = g + l2_weight_decay * p;  \
        if (V & RADAM_V_DECOUPLED) p = p * param_decay;   \
        T m = FA_LD(exp_avg, i);                          \
        m = m + one_minus_beta1 * (g - m);                \
        T v = FA_LD(exp_avg_sq, i);                       \
        v = v * beta2 + (one_minus_beta2 * g) * g;        \
        FA_ST(exp_avg, i, m);                             \
        FA_ST(exp_avg_sq, i, v);                          \
        if (V & RADAM_V_RECTIFIED)                        \
            p = p - step_size * (m / (FA_SQRT(v) + eps)); \
        else                                              \
            p = p - step_size * m;                        \
        FA_EMA_UPDATE(V, i, p)                            \
        FA_ST(param, i, p);                               \
    }
    FA_LOOP(V, s, n, FA_RADAM_ELEMENT);
#undef FA_RADAM_ELEMENT
}
FA_DEFINE_ENTRY(radam, 32)
#endif
