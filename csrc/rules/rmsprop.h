/* rules/rmsprop.h -- RMSprop (Tieleman & Hinton 2012; centered: Graves 2013), as
 * torch.optim.RMSprop; fastadam/reference/rmsprop.py is the same sequence in NumPy.
 *
 * Per element, in T (constants rounded once from double):
 *     g = grad * grad_mul
 *     g = g + l2_weight_decay * p                         [l2]
 *     v = v * alpha + (one_minus_alpha * g) * g
 *     a = a + one_minus_alpha * (g - a);  d = sqrt(v - a * a) + eps    [centered]
 *     d = sqrt(v) + eps                                                [otherwise]
 *     b = b * momentum + g / d;  p = p - lr * b           [momentum > 0]
 *     p = p - (lr * g) / d                                [otherwise]
 */
#ifndef FA_RULE_RMSPROP_H
#define FA_RULE_RMSPROP_H
enum { FA_RMSPROP_ALPHA, FA_RMSPROP_EPS, FA_RMSPROP_MOMENTUM, FA_RMSPROP_CENTERED }; /* hyper */
enum { FA_RMSPROP_SQUARE_AVG = FA_STATE0, FA_RMSPROP_MOMENTUM_BUFFER, FA_RMSPROP_GRAD_AVG };
enum {
    RMSPROP_L2_WEIGHT_DECAY = FA_C_RULE,
    RMSPROP_ALPHA,
    RMSPROP_ONE_MINUS_ALPHA,
    RMSPROP_EPS,
    RMSPROP_MOMENTUM,
    RMSPROP_LR
};
#define RMSPROP_V_L2       (1u << FA_V_RULE_SHIFT)
#define RMSPROP_V_CENTERED (2u << FA_V_RULE_SHIFT)
#define RMSPROP_V_MOMENTUM (4u << FA_V_RULE_SHIFT)
#endif

#ifdef FA_HOST
static void fa_rmsprop_consts(fa_consts *c, const fa_options *o, double t, double scalar)
{
    const double *h = o->hyper;
    (void)t;
    (void)scalar;
    c->v[RMSPROP_L2_WEIGHT_DECAY] = o->weight_decay;
    c->v[RMSPROP_ALPHA] = h[FA_RMSPROP_ALPHA];
    c->v[RMSPROP_ONE_MINUS_ALPHA] = 1.0 - h[FA_RMSPROP_ALPHA];
    c->v[RMSPROP_EPS] = h[FA_RMSPROP_EPS];
    c->v[RMSPROP_MOMENTUM] = h[FA_RMSPROP_MOMENTUM];
    c->v[RMSPROP_LR] = o->lr;
    c->variant |= (o->weight_decay != 0.0 ? RMSPROP_V_L2 : 0u) |
                  (h[FA_RMSPROP_CENTERED] != 0.0 ? RMSPROP_V_CENTERED : 0u) |
                  (h[FA_RMSPROP_MOMENTUM] > 0.0 ? RMSPROP_V_MOMENTUM : 0u);
}

static unsigned fa_rmsprop_required(const fa_options *o)
{
    return 1u | (o->hyper[FA_RMSPROP_MOMENTUM] > 0.0 ? 2u : 0u) |
           (o->hyper[FA_RMSPROP_CENTERED] != 0.0 ? 4u : 0u);
}

#else
FA_INLINE void FA_FN(rmsprop_body)(const fa_consts *c, char *const *s, size_t n, const unsigned V,
                                   const fa_fused *fx_)
{
    (void)fx_;
    FA_STREAM(param, FA_PARAM);
    FA_STREAM(grad, FA_GRAD);
    FA_STREAM(square_avg, FA_RMSPROP_SQUARE_AVG);
    FA_STREAM(buf, FA_RMSPROP_MOMENTUM_BUFFER);
    FA_STREAM(grad_avg, FA_RMSPROP_GRAD_AVG);
    FA_EMA_LOCALS(c, s)
    const T grad_mul = (T)c->v[FA_C_GRAD_MUL];
    const T l2_weight_decay = (T)c->v[RMSPROP_L2_WEIGHT_DECAY];
    const T alpha = (T)c->v[RMSPROP_ALPHA];
    const T one_minus_alpha = (T)c->v[RMSPROP_ONE_MINUS_ALPHA];
    const T eps = (T)c->v[RMSPROP_EPS];
    const T momentum = (T)c->v[RMSPROP_MOMENTUM];
    const T lr = (T)c->v[RMSPROP_LR];
    (void)buf;
    (void)grad_avg;
    (void)momentum;
    (void)l2_weight_decay;
#define FA_RMSPROP_ELEMENT(i)                                                 \
    {                                                                         \
        T p = FA_LD(param, i);                                                \
        T g = FA_LD(grad, i) * grad_mul;                                      \
        if (V & RMSPROP_V_L2) g = g + l2_weight_decay * p;                    \
        const T v = FA_LD(square_avg, i) * alpha + (one_minus_alpha * g) * g; \
        FA_ST(square_avg, i, v);                                              \
        T d;                                                                  \
        if (V & RMSPROP_V_CENTERED) {                                         \
            T a = FA_LD(grad_avg, i);                                         \
            a = a + one_minus_alpha * (g - a);                                \
            FA_ST(grad_avg, i, a);                                            \
            d = FA_SQRT(v - a * a) + eps;                                     \
        } else {                                                              \
            d = FA_SQRT(v) + eps;                                             \
        }                                                                     \
        if (V & RMSPROP_V_MOMENTUM) {                                         \
            const T b = FA_LD(buf, i) * momentum + g / d;                     \
            FA_ST(buf, i, b);                                                 \
            p = p - lr * b;                                                   \
        } else {                                                              \
            p = p - (lr * g) / d;                                             \
        }                                                                     \
        FA_EMA_UPDATE(V, i, p)                                                \
        FA_ST(param, i, p);                                                   \
    }
    FA_LOOP(V, s, n, FA_RMSPROP_ELEMENT);
#undef FA_RMSPROP_ELEMENT
}
FA_DEFINE_ENTRY(rmsprop, 32)
#endif
