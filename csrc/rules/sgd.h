/* rules/sgd.h -- stochastic gradient descent with momentum and Nesterov momentum
 * (Sutskever et al. 2013), as torch.optim.SGD; fastadam/reference/sgd.py is the same
 * sequence in NumPy.
 *
 * Per element, in T (constants rounded once from double):
 *     g = grad * grad_mul
 *     g = g + l2_weight_decay * p                         [l2]
 *     b = g                                               [momentum, first step: torch's clone]
 *     b = b * momentum + one_minus_dampening * g          [momentum, later steps]
 *     u = g + momentum * b  [nesterov] | u = b  [momentum] | u = g
 *     p = p - lr * u
 */
#ifndef FA_RULE_SGD_H
#define FA_RULE_SGD_H
enum { FA_SGD_MOMENTUM, FA_SGD_DAMPENING, FA_SGD_NESTEROV }; /* hyper */
enum { FA_SGD_MOMENTUM_BUFFER = FA_STATE0 };                 /* streams */
enum { SGD_L2_WEIGHT_DECAY = FA_C_RULE, SGD_MOMENTUM, SGD_ONE_MINUS_DAMPENING, SGD_LR };
#define SGD_V_L2       (1u << FA_V_RULE_SHIFT)
#define SGD_V_MOMENTUM (2u << FA_V_RULE_SHIFT)
#define SGD_V_FIRST    (4u << FA_V_RULE_SHIFT)
#define SGD_V_NESTEROV (8u << FA_V_RULE_SHIFT)
#endif

#ifdef FA_HOST
static void fa_sgd_consts(fa_consts *c, const fa_options *o, double t, double scalar)
{
    const double *h = o->hyper;
    const int momentum = h[FA_SGD_MOMENTUM] != 0.0;
    (void)scalar;
    c->v[SGD_L2_WEIGHT_DECAY] = o->weight_decay;
    c->v[SGD_MOMENTUM] = h[FA_SGD_MOMENTUM];
    c->v[SGD_ONE_MINUS_DAMPENING] = 1.0 - h[FA_SGD_DAMPENING];
    c->v[SGD_LR] = o->lr;
    c->variant |= (o->weight_decay != 0.0 ? SGD_V_L2 : 0u) | (momentum ? SGD_V_MOMENTUM : 0u) |
                  (momentum && t == 1.0 ? SGD_V_FIRST : 0u) |
                  (momentum && h[FA_SGD_NESTEROV] != 0.0 ? SGD_V_NESTEROV : 0u);
}

static unsigned fa_sgd_required(const fa_options *o)
{
    return o->hyper[FA_SGD_MOMENTUM] != 0.0 ? 1u : 0u;
}

#else
FA_INLINE void FA_FN(sgd_body)(const fa_consts *c, char *const *s, size_t n, const unsigned V,
                               const fa_fused *fx_)
{
    (void)fx_;
    FA_STREAM(param, FA_PARAM);
    FA_STREAM(grad, FA_GRAD);
    FA_STREAM(buf, FA_SGD_MOMENTUM_BUFFER);
    FA_EMA_LOCALS(c, s)
    const T grad_mul = (T)c->v[FA_C_GRAD_MUL];
    const T l2_weight_decay = (T)c->v[SGD_L2_WEIGHT_DECAY];
    const T momentum = (T)c->v[SGD_MOMENTUM];
    const T one_minus_dampening = (T)c->v[SGD_ONE_MINUS_DAMPENING];
    const T lr = (T)c->v[SGD_LR];
    (void)buf;
    (void)momentum;
    (void)one_minus_dampening;
    (void)l2_weight_decay;
#define FA_SGD_ELEMENT(i)                                               \
    {                                                                   \
        T p = FA_LD(param, i);                                          \
        T g = FA_LD(grad, i) * grad_mul;                                \
        if (V & SGD_V_L2) g = g + l2_weight_decay * p;                  \
        T u = g;                                                        \
        if (V & SGD_V_MOMENTUM) {                                       \
            T b;                                                        \
            if (V & SGD_V_FIRST)                                        \
                b = g;                                                  \
            else                                                        \
                b = FA_LD(buf, i) * momentum + one_minus_dampening * g; \
            FA_ST(buf, i, b);                                           \
            if (V & SGD_V_NESTEROV)                                     \
                u = g + momentum * b;                                   \
            else                                                        \
                u = b;                                                  \
        }                                                               \
        p = p - lr * u;                                                 \
        FA_EMA_UPDATE(V, i, p)                                          \
        FA_ST(param, i, p);                                             \
    }
    FA_LOOP(V, s, n, FA_SGD_ELEMENT);
#undef FA_SGD_ELEMENT
}
FA_DEFINE_ENTRY(sgd, 64)
#endif
